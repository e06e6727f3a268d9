//! BMC drivers: one narrow trait for what failover needs from a BMC, over Redfish and IPMI.
//!
//! Overview: [`Bmc`] has three things: a status snapshot (fast: power, boot progress, health;
//! full: also sensors, PSUs and new SEL records), a power action (idempotent: off on an off host
//! counts as done), and the inventory that makes a hardware profile. Errors are typed
//! ([`BmcError`]) and say whether they are transient, so policy never matches strings.
//!
//! Scope: talking to BMCs politely (one request in flight per BMC, timeouts, capped bodies,
//! sessions reused and closed). Deciding what a reading means is diagnosis's job.
//!
//! Key types: [`Bmc`], [`BmcError`], [`PowerAction`], [`Depth`].

pub mod ipmi;
pub mod paths;
pub mod redfish;

use std::future::Future;
use std::pin::Pin;

use crate::model::{BmcSnapshot, HardwareProfile, Protocol};

/// A boxed future, so that drivers can sit behind `dyn Bmc`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How much a status read fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Power, boot progress, health: one or two requests.
    Fast,
    /// Also sensors, PSUs and new SEL records.
    Full,
}

/// A power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    /// Hard off (fencing).
    Off,
    /// On.
    On,
    /// Power cycle.
    Cycle,
}

/// What the BMC said to a power action.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionOutcome {
    /// Accepted.
    Accepted,
    /// The host already was in the asked state (the firmware answered an error that means so,
    /// or the read-before showed it).
    AlreadyDone,
}

/// Why a BMC request failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BmcError {
    /// No connection could be made.
    #[error("{endpoint}: cannot connect ({reason})")]
    Connect {
        /// The BMC.
        endpoint: String,
        /// Why (walked from the error's sources).
        reason: String,
    },
    /// The BMC's certificate is not the one trusted for it.
    #[error("{endpoint}: TLS certificate not trusted ({reason})")]
    Tls {
        /// The BMC.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("{endpoint}: no answer to {what} within {timeout_ms} ms")]
    Timeout {
        /// The BMC.
        endpoint: String,
        /// What was asked.
        what: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// An HTTP error status.
    #[error("{endpoint}: {what} answered HTTP {status}: {message}")]
    Http {
        /// The BMC.
        endpoint: String,
        /// What was asked.
        what: String,
        /// The status.
        status: u16,
        /// The Redfish error message, if any (never a credential).
        message: String,
    },
    /// The credentials were refused.
    #[error("{endpoint}: credentials refused")]
    Auth {
        /// The BMC.
        endpoint: String,
    },
    /// Every session slot is taken.
    #[error("{endpoint}: the BMC has no free session")]
    SessionLimit {
        /// The BMC.
        endpoint: String,
    },
    /// The answer could not be understood.
    #[error("{endpoint}: {what} answered something that is not valid ({reason})")]
    Malformed {
        /// The BMC.
        endpoint: String,
        /// What was asked.
        what: String,
        /// Why.
        reason: String,
    },
    /// The answer was larger than any real resource.
    #[error("{endpoint}: {what} answered more than {limit} bytes")]
    TooLarge {
        /// The BMC.
        endpoint: String,
        /// What was asked.
        what: String,
        /// The cap.
        limit: usize,
    },
    /// The firmware does not offer what was asked.
    #[error("{endpoint}: {what} is not supported by this BMC")]
    Unsupported {
        /// The BMC.
        endpoint: String,
        /// What.
        what: String,
    },
    /// An IPMI completion code other than success.
    #[error("{endpoint}: {what} answered IPMI completion code {cc:#04x} ({})", ipmi_cc_text(*cc))]
    Ipmi {
        /// The BMC.
        endpoint: String,
        /// What was asked.
        what: String,
        /// The completion code.
        cc: u8,
    },
    /// A secret could not be read.
    #[error("the BMC password cannot be read: {0}")]
    Secret(String),
}

impl BmcError {
    /// Whether trying again later may succeed. Credentials, TLS trust and unsupported requests
    /// need an operator; everything else is the network or the BMC having a bad moment.
    pub fn is_transient(&self) -> bool {
        match self {
            BmcError::Connect { .. }
            | BmcError::Timeout { .. }
            | BmcError::SessionLimit { .. }
            | BmcError::Malformed { .. }
            | BmcError::TooLarge { .. } => true,
            BmcError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 409,
            // Busy, timed out inside the BMC, response unavailable, unspecified (ipmi_sim's
            // answer when its chassis-control program fails): worth another try.
            BmcError::Ipmi { cc, .. } => matches!(cc, 0xc0 | 0xc3 | 0xce | 0xff),
            BmcError::Tls { .. }
            | BmcError::Auth { .. }
            | BmcError::Unsupported { .. }
            | BmcError::Secret(_) => false,
        }
    }
}

/// What an IPMI completion code means (IPMI v2.0 §5.2), for error messages.
pub fn ipmi_cc_text(cc: u8) -> &'static str {
    match cc {
        0xc0 => "node busy",
        0xc1 => "invalid command",
        0xc2 => "command invalid for this LUN",
        0xc3 => "timeout while processing",
        0xc4 => "out of space",
        0xc5 => "reservation cancelled or invalid",
        0xc6 => "request data truncated",
        0xc7 => "request data length invalid",
        0xc8 => "request data field length limit exceeded",
        0xc9 => "parameter out of range",
        0xca => "cannot return the number of requested bytes",
        0xcb => "requested sensor, data or record not present",
        0xcc => "invalid data field in request",
        0xcd => "command illegal for this sensor or record type",
        0xce => "response could not be provided",
        0xcf => "duplicated request",
        0xd0 => "SDR repository in update mode",
        0xd1 => "device in firmware update mode",
        0xd2 => "BMC initialization in progress",
        0xd3 => "destination unavailable",
        0xd4 => "insufficient privilege level",
        0xd5 => "not supported in present state",
        0xd6 => "sub-function disabled",
        0xff => "unspecified error",
        _ => "unknown completion code",
    }
}

/// Why a driver could not be built for a machine.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The machine's BMC has no Redfish endpoint.
    #[error("{0} has no redfish_url")]
    NoRedfish(String),
    /// The machine's BMC has no IPMI endpoint.
    #[error("{0} has no ipmi_host")]
    NoIpmi(String),
    /// The firmware profile is unknown (check-config reports this too).
    #[error("{machine}: unknown firmware profile {profile}")]
    Profile {
        /// The machine.
        machine: String,
        /// The profile.
        profile: String,
    },
    /// The driver refused (TLS trust, password).
    #[error(transparent)]
    Bmc(#[from] BmcError),
}

/// The Redfish driver for a configured machine.
pub fn redfish_for(
    m: &crate::config::Machine<'_>,
    profiles: &crate::config::ProfileSet,
) -> Result<redfish::RedfishBmc, SetupError> {
    let ep = m
        .bmc
        .redfish
        .as_ref()
        .ok_or_else(|| SetupError::NoRedfish(m.name.to_string()))?;
    let profile = profiles
        .get(m.firmware_profile)
        .ok_or_else(|| SetupError::Profile {
            machine: m.name.to_string(),
            profile: m.firmware_profile.to_string(),
        })?
        .clone();
    if ep.trust == crate::config::RedfishTrust::InsecureSkipVerify {
        tracing::warn!(node = m.name, bmc = %ep.url, "TLS verification is off for this BMC (insecure_skip_verify): anyone on its network can impersonate it");
    }
    let password = m
        .bmc
        .password
        .resolve()
        .map_err(|e| BmcError::Secret(e.to_string()))?;
    Ok(redfish::RedfishBmc::new(
        m.name,
        ep,
        &m.bmc.username,
        password,
        profile,
        redfish::Timeouts {
            connect: m.policy.bmc_connect_timeout,
            request: m.policy.bmc_request_timeout,
        },
    )?)
}

/// The IPMI driver for a configured machine.
pub fn ipmi_for(m: &crate::config::Machine<'_>) -> Result<ipmi::IpmiBmc, SetupError> {
    let ep = m
        .bmc
        .ipmi
        .as_ref()
        .ok_or_else(|| SetupError::NoIpmi(m.name.to_string()))?;
    let password = m
        .bmc
        .password
        .resolve()
        .map_err(|e| BmcError::Secret(e.to_string()))?;
    Ok(ipmi::IpmiBmc::new(
        &ep.host,
        ep.port,
        ep.cipher_suite,
        &m.bmc.username,
        password,
        m.policy.bmc_request_timeout,
    )?)
}

/// A BMC, through one protocol.
pub trait Bmc: Send + Sync {
    /// Which protocol this driver speaks.
    fn protocol(&self) -> Protocol;

    /// Reads the status.
    fn status(&self, depth: Depth) -> BoxFuture<'_, Result<BmcSnapshot, BmcError>>;

    /// Performs a power action (idempotent).
    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<ActionOutcome, BmcError>>;

    /// Reads the inventory into a hardware profile for `node`.
    fn inventory(&self, node: &str) -> BoxFuture<'_, Result<HardwareProfile, BmcError>>;

    /// Closes sessions (logs out). Idempotent.
    fn close(&self) -> BoxFuture<'_, ()>;
}
