//! Faults the lab can inject: one per row of the evidence matrix, and the ways BMCs misbehave.
//!
//! Overview: each [`FaultKind`] acts on a server the way the real fault would, on every path at
//! once: power (the power model), the SEL (the records real BMCs write), the sensors and health
//! the BMC reports, the OS (hung, isolated), and the BMC's own reachability and answers. A fault
//! lasts until repaired, or for `--for DURATION`.
//!
//! | fault | power | SEL | OS | BMC |
//! |---|---|---|---|---|
//! | `os-hang` | on | watchdog expired | hung | fine |
//! | `kernel-panic` (`--reboot-loop`) | on (cycling) | OS critical stop | hung (or never boots) | fine |
//! | `post-hang` | on, stuck in POST | firmware hang | down | fine |
//! | `power-loss` | off | AC lost, power off | down | fine |
//! | `psu-failure` (`--all`) | on (off with all) | PSU failure, redundancy lost | fine (down) | fine |
//! | `vr-fault` | off | VCCIN over critical | down | fine |
//! | `thermal-trip` | off | CPU temp over critical, thermal trip | down | fine |
//! | `cpu-ierr` | on | processor IERR | hung | fine |
//! | `memory-uncorrectable` | on | uncorrectable ECC | hung | fine |
//! | `network-isolation` | on | — | alive, heartbeats cut | fine |
//! | `heartbeat-loss` (`--percent`) | on | — | alive, that share of heartbeats lost | fine |
//! | `bmc-down` | — | — | fine | unreachable |
//! | `dark` | — | — | heartbeats cut | unreachable |
//! | `slow` (`--delay`) | | | | answers late |
//! | `http-error` (`--status`, `--count`) | | | | answers an error N times |
//! | `session-exhaustion` | | | | every session slot taken |
//! | `malformed-json` | | | | truncated JSON |
//! | `oversized-body` | | | | a 64 MiB body |
//! | `stale-power-state` | | | | PowerState frozen |
//! | `bmc-reboot` (`--for`) | | | | unreachable, sessions lost, then PowerState missing a while |
//! | `redfish-down` | | | | Redfish refuses connections; IPMI answers |
//! | `ipmi-down` | | | | IPMI silent; Redfish answers |
//!
//! Key types: [`FaultKind`], [`Fault`].

use serde::{Deserialize, Serialize};

use crate::power::Millis;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The OS freezes.
    OsHang,
    /// The kernel panics (optionally in every boot).
    KernelPanic,
    /// POST stops at memory initialisation.
    PostHang,
    /// AC power is lost.
    PowerLoss,
    /// One PSU fails (all with `all`).
    PsuFailure,
    /// A voltage regulator fails.
    VrFault,
    /// The CPU overheats and the board trips.
    ThermalTrip,
    /// The CPU signals an internal error.
    CpuIerr,
    /// Memory reports an uncorrectable error.
    MemoryUncorrectable,
    /// The node's service network is cut.
    NetworkIsolation,
    /// A share of the node's heartbeats is lost (a congested or flaky network).
    HeartbeatLoss,
    /// The BMC is unreachable.
    BmcDown,
    /// Both paths are lost.
    Dark,
    /// The BMC answers slowly.
    Slow,
    /// The BMC answers HTTP errors.
    HttpError,
    /// Every session slot is taken.
    SessionExhaustion,
    /// The BMC answers truncated JSON.
    MalformedJson,
    /// The BMC answers a huge body.
    OversizedBody,
    /// The BMC's PowerState stops changing.
    StalePowerState,
    /// The BMC reboots.
    BmcReboot,
    /// Only the BMC's Redfish service is down (it crashed; IPMI still answers).
    RedfishDown,
    /// Only the BMC's IPMI service is down (Redfish still answers).
    IpmiDown,
}

impl FaultKind {
    /// Every kind, for listings and tests.
    pub const ALL: &'static [FaultKind] = &[
        FaultKind::OsHang,
        FaultKind::KernelPanic,
        FaultKind::PostHang,
        FaultKind::PowerLoss,
        FaultKind::PsuFailure,
        FaultKind::VrFault,
        FaultKind::ThermalTrip,
        FaultKind::CpuIerr,
        FaultKind::MemoryUncorrectable,
        FaultKind::NetworkIsolation,
        FaultKind::HeartbeatLoss,
        FaultKind::BmcDown,
        FaultKind::Dark,
        FaultKind::Slow,
        FaultKind::HttpError,
        FaultKind::SessionExhaustion,
        FaultKind::MalformedJson,
        FaultKind::OversizedBody,
        FaultKind::StalePowerState,
        FaultKind::BmcReboot,
        FaultKind::RedfishDown,
        FaultKind::IpmiDown,
    ];

    /// Its name on the command line and in scenario files.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// Whether the host cannot be powered on while this fault lasts.
    pub fn cuts_power(self) -> bool {
        matches!(
            self,
            FaultKind::PowerLoss | FaultKind::VrFault | FaultKind::ThermalTrip
        )
    }
}

/// A fault with its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// How long (lab milliseconds); `None` until repaired.
    #[serde(default)]
    pub duration_ms: Option<Millis>,
    /// `psu-failure`: all PSUs, not one.
    #[serde(default)]
    pub all: bool,
    /// `kernel-panic`: panic in every boot.
    #[serde(default)]
    pub reboot_loop: bool,
    /// `slow`: the delay.
    #[serde(default)]
    pub delay_ms: u64,
    /// `http-error`: the status.
    #[serde(default = "default_status")]
    pub status: u16,
    /// `http-error`: how many times.
    #[serde(default = "default_count")]
    pub count: u32,
    /// `heartbeat-loss`: the share lost, percent.
    #[serde(default = "default_percent")]
    pub percent: u8,
}

fn default_percent() -> u8 {
    50
}

fn default_status() -> u16 {
    503
}

fn default_count() -> u32 {
    1
}

impl Fault {
    /// A fault of `kind` with default parameters.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            duration_ms: None,
            all: false,
            reboot_loop: false,
            delay_ms: 2_000,
            status: default_status(),
            count: default_count(),
            percent: default_percent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_its_name() {
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(&k.name()), Some(*k), "{k:?}");
        }
        assert_eq!(FaultKind::parse("power-loss"), Some(FaultKind::PowerLoss));
        assert_eq!(FaultKind::parse("power_loss"), None);
    }
}
