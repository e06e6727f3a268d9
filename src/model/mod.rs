//! The shared domain types: what a BMC reports, what a heartbeat tells, what a machine is made of.
//!
//! Overview: the floor everything stands on. Drivers produce these types; diagnosis, fencing and
//! placement consume them; none of those imports a driver. Time is [`Millis`] on the appliance's
//! monotonic clock, stamped by whoever observed the thing (the poller, the listener), never read
//! inside the pure core.
//!
//! Scope: plain data with serde, no I/O.
//!
//! Key types: [`BmcSnapshot`], [`PowerReading`], [`Health`], [`SensorReading`], [`LogEntry`],
//! [`HardwareProfile`].

pub mod profile;

use serde::{Deserialize, Serialize};

pub use profile::HardwareProfile;

/// Milliseconds on the appliance's monotonic clock.
pub type Millis = u64;

/// Which path a reading came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Redfish over HTTPS.
    Redfish,
    /// IPMI over LAN (RMCP+).
    Ipmi,
}

/// Power as a BMC reports it. Only an explicit `Off` is off: anything missing, unknown or
/// unparseable is `Unknown`, never a default `On` or `Off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerReading {
    /// On.
    On,
    /// Off.
    Off,
    /// Turning on.
    PoweringOn,
    /// Turning off (not off yet: a fence is not confirmed by it).
    PoweringOff,
    /// Not reported, or not understood.
    Unknown,
}

impl PowerReading {
    /// Parses a Redfish PowerState value.
    pub fn from_redfish(v: Option<&str>) -> Self {
        match v {
            Some("On") => PowerReading::On,
            Some("Off") => PowerReading::Off,
            Some("PoweringOn") => PowerReading::PoweringOn,
            Some("PoweringOff") => PowerReading::PoweringOff,
            _ => PowerReading::Unknown,
        }
    }
}

/// A health rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// OK.
    Ok,
    /// Warning.
    Warning,
    /// Critical.
    Critical,
    /// Not reported or not understood.
    Unknown,
}

impl Health {
    /// Parses a Redfish Health value.
    pub fn from_redfish(v: Option<&str>) -> Self {
        match v {
            Some("OK") => Health::Ok,
            Some("Warning") => Health::Warning,
            Some("Critical") => Health::Critical,
            _ => Health::Unknown,
        }
    }
}

/// Where the host is in its boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "stage", content = "raw")]
pub enum BootProgress {
    /// Not booting (off, or the firmware says None).
    None,
    /// In POST, at the named stage.
    Post(String),
    /// The OS is booting.
    OsBooting,
    /// The OS is running.
    OsRunning,
    /// A value we do not know.
    Other(String),
}

impl BootProgress {
    /// Parses a Redfish BootProgress.LastState.
    pub fn from_redfish(v: &str) -> Self {
        match v {
            "None" => BootProgress::None,
            "OSRunning" => BootProgress::OsRunning,
            "OSBootStarted" => BootProgress::OsBooting,
            "PrimaryProcessorInitializationStarted"
            | "BusInitializationStarted"
            | "MemoryInitializationStarted"
            | "SecondaryProcessorInitializationStarted"
            | "PCIResourceConfigStarted"
            | "SystemHardwareInitializationComplete"
            | "SetupEntered" => BootProgress::Post(v.to_string()),
            other => BootProgress::Other(other.to_string()),
        }
    }
}

/// What a sensor measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    /// Degrees Celsius.
    Temperature,
    /// Volts.
    Voltage,
    /// RPM or percent.
    Fan,
}

/// One sensor reading with its thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorReading {
    /// What it measures.
    pub kind: SensorKind,
    /// Its name.
    pub name: String,
    /// The reading, when present.
    pub value: Option<f64>,
    /// Upper critical threshold.
    pub upper_critical: Option<f64>,
    /// Upper fatal threshold.
    pub upper_fatal: Option<f64>,
    /// Lower critical threshold.
    pub lower_critical: Option<f64>,
    /// The BMC's own health of it.
    pub health: Health,
}

impl SensorReading {
    /// Whether the reading is past a critical (or fatal) threshold, or the BMC says Critical.
    pub fn is_critical(&self) -> bool {
        let over = |t: Option<f64>| matches!((self.value, t), (Some(v), Some(t)) if v >= t);
        let under = |t: Option<f64>| matches!((self.value, t), (Some(v), Some(t)) if v <= t);
        self.health == Health::Critical
            || over(self.upper_critical)
            || over(self.upper_fatal)
            || under(self.lower_critical)
    }
}

/// A power supply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsuReading {
    /// Its name.
    pub name: String,
    /// Its health.
    pub health: Health,
}

/// One SEL / log record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The BMC's id of it.
    pub id: String,
    /// When, as the BMC wrote it.
    pub created: Option<String>,
    /// Severity.
    pub severity: Health,
    /// The message.
    pub message: String,
    /// Redfish SensorType or IPMI sensor type name.
    pub sensor_type: Option<String>,
    /// Assert or deassert.
    pub asserted: bool,
}

/// The host watchdog as the BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchdogReading {
    /// Whether it is running.
    pub running: bool,
    /// The countdown left, ms.
    pub countdown_ms: u64,
    /// Its timeout, ms.
    pub timeout_ms: u64,
    /// Whether it expired since last set.
    pub expired: bool,
}

/// Everything one poll of a BMC saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BmcSnapshot {
    /// Through which path.
    pub protocol: Protocol,
    /// Power.
    pub power: PowerReading,
    /// Boot progress, when the firmware reports it.
    pub boot: Option<BootProgress>,
    /// Health rollup of the system.
    pub health: Health,
    /// Temperatures, voltages, fans (a full read only; empty on a fast one).
    pub sensors: Vec<SensorReading>,
    /// PSUs (full read only).
    pub psus: Vec<PsuReading>,
    /// SEL records new since the last poll (full read only).
    pub new_log: Vec<LogEntry>,
    /// The watchdog, where the path reports it (IPMI).
    pub watchdog: Option<WatchdogReading>,
    /// Whether this was a full read (sensors, PSUs, SEL) or a fast one.
    pub full: bool,
    /// Parts of a full read that failed (the snapshot holds the rest): a BMC that cannot serve
    /// its SEL still tells its power state.
    pub gaps: Vec<String>,
}
