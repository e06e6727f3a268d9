//! The validated configuration: plain, immutable data with every default filled in.
//!
//! Overview: [`Config`] is what the rest of vigil reads. It is built only by `parse.rs`, which
//! checks everything first, so holding a `Config` means holding a configuration that passed
//! `vigil check-config`. A reload builds a new `Config`; nothing mutates one in place.
//!
//! Scope: types and their defaults (named constants with units). No I/O.
//!
//! Key types: [`Config`], [`Policy`], [`NodeConfig`], [`HostConfig`], [`BmcConfig`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::secret::SecretRef;

/// Where the appliance keeps its fencing log and state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vigil";
/// The status API's address unless told otherwise: loopback, so it is never exposed by accident.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7480";
/// Where heartbeats are received unless told otherwise.
pub const DEFAULT_HEARTBEAT_LISTEN: &str = "0.0.0.0:7481";
/// Standard IPMI-over-LAN port (RMCP).
pub const DEFAULT_IPMI_PORT: u16 = 623;
/// RMCP+ cipher suite 3 (HMAC-SHA1, AES-CBC-128): what nearly every BMC offers.
pub const DEFAULT_IPMI_CIPHER_SUITE: u8 = 3;
/// The isolation group of a node that names none.
pub const DEFAULT_ISOLATION_GROUP: &str = "default";

/// Defaults of the policy, each with its unit in the type.
pub mod defaults {
    use std::time::Duration;

    /// Heartbeats are sent every second.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    /// Three missed heartbeats make a node's heartbeat "lost".
    pub const HEARTBEAT_MISSES: u32 = 3;
    /// BMCs are polled every second for power state and health.
    pub const BMC_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// A TCP/TLS connect to a BMC gives up after this long.
    pub const BMC_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// One BMC request gives up after this long.
    pub const BMC_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
    /// A fencing verdict needs this many consecutive samples agreeing.
    pub const EVIDENCE_SAMPLES: u32 = 3;
    /// ... held for at least this long (a machine under suspicion is polled ten times faster,
    /// so three samples come within this).
    pub const EVIDENCE_FOR: Duration = Duration::from_millis(300);
    /// The host watchdog timeout the nodes' OS sets: a lost heartbeat with no watchdog expiry
    /// after this long means the OS is alive (isolated), not hung.
    pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(10);
    /// A host at one POST stage longer than this is stuck in POST.
    pub const POST_TIMEOUT: Duration = Duration::from_secs(180);
    /// An isolated node (alive, unreachable by clients) is failed over only after this long.
    pub const ISOLATION_GRACE: Duration = Duration::from_secs(60);
    /// At most this many failovers run at once.
    pub const STORM_MAX_CONCURRENT: u32 = 2;
    /// When more than this fraction of nodes fail at once, nobody is fenced.
    pub const STORM_MAX_FRACTION: f64 = 0.5;
    /// An automatic failback waits for the node to be healthy this long.
    pub const FAILBACK_HEALTHY_DELAY: Duration = Duration::from_secs(300);
    /// How long a rebalance move must stand before `rebalance = "auto"` makes it.
    pub const REBALANCE_AFTER: Duration = Duration::from_secs(300);
    /// A node that fails again this soon after failback stays on its virtual twin.
    pub const QUARANTINE: Duration = Duration::from_secs(3600);
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The appliance itself.
    pub appliance: Appliance,
    /// The rack-wide policy (nodes may override parts of it).
    pub policy: Policy,
    /// The failover and backup servers.
    pub hosts: Vec<HostConfig>,
    /// The protected nodes.
    pub nodes: Vec<NodeConfig>,
}

impl Config {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<&HostConfig> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Every watched machine: the nodes, then the hosts (which are watched like nodes).
    pub fn machines(&self) -> impl Iterator<Item = Machine<'_>> {
        self.nodes
            .iter()
            .map(|n| Machine {
                name: &n.name,
                firmware_profile: &n.firmware_profile,
                bmc: &n.bmc,
                heartbeat: &n.heartbeat,
                policy: &n.policy,
                is_host: false,
            })
            .chain(self.hosts.iter().map(|h| Machine {
                name: &h.name,
                firmware_profile: &h.firmware_profile,
                bmc: &h.bmc,
                heartbeat: &h.heartbeat,
                policy: &self.policy,
                is_host: true,
            }))
    }

    /// The machine (node or host) named `name`.
    pub fn machine(&self, name: &str) -> Option<Machine<'_>> {
        self.machines().find(|m| m.name == name)
    }
}

/// What nodes and hosts have in common, borrowed from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Machine<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its BMC's firmware profile.
    pub firmware_profile: &'a str,
    /// Its BMC.
    pub bmc: &'a BmcConfig,
    /// Its heartbeat.
    pub heartbeat: &'a HeartbeatConfig,
    /// The policy in force for it.
    pub policy: &'a Policy,
    /// Whether it is a failover/backup server.
    pub is_host: bool,
}

/// The appliance's own settings.
#[derive(Debug, Clone, Serialize)]
pub struct Appliance {
    /// Where the fencing log, hardware profiles and state live.
    pub state_dir: PathBuf,
    /// The status API's listen address.
    pub api_listen: SocketAddr,
    /// The token that API actions require (reads need none).
    pub api_token: Option<SecretRef>,
    /// Where heartbeats are received (UDP).
    pub heartbeat_listen: SocketAddr,
    /// A folder of extra firmware profiles, beside the built-in ones.
    pub firmware_profiles_dir: Option<PathBuf>,
}

/// Whether vigil acts on its verdicts or only reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Diagnose and report; never fence or fail over.
    Observe,
    /// Fence and fail over as the policy says.
    Act,
}

/// What a software hang (OS alive on the BMC's side, heartbeats and watchdog dead) leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HangAction {
    /// Fence and boot the virtual twin, as for a hardware fault.
    Failover,
    /// Power-cycle the node in place through its BMC and wait for it.
    PowerCycle,
    /// Report only.
    Alert,
}

/// How the workload returns to a repaired node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Failback {
    /// Only on `vigil failback`.
    Manual,
    /// Automatically once the node has been healthy for `healthy_delay`.
    Auto {
        /// How long the repaired node must be healthy first.
        #[serde(with = "humantime_serde_compat")]
        healthy_delay: Duration,
    },
}

/// Whether running twins are moved off a loaded failover server to a backup server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Rebalance {
    /// Only on `vigil rebalance` or `vigil move` (a move stops the twin: an outage for its
    /// workload, which an operator times).
    Manual,
    /// Automatically, once the same move has stood for `after`.
    Auto {
        /// How long a failover server must stay loaded, with a backup server able to take the
        /// twin, before the move is made.
        #[serde(with = "humantime_serde_compat")]
        after: Duration,
    },
}

/// How a virtual node's CPU is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuPolicy {
    /// A named QEMU model matched to the physical CPU, minus what the host cannot give.
    Named,
    /// Whatever the failover server's CPU is (fastest; licence-bound software may notice).
    HostPassthrough,
}

/// The storm guard: when too much fails at once, the fault is most likely vigil's own view.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StormGuard {
    /// At most this many failovers run at once.
    pub max_concurrent_failovers: u32,
    /// When more than this fraction of the nodes fail together, nobody is fenced.
    pub max_failing_fraction: f64,
}

/// Detection and action thresholds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Act, or only observe.
    pub mode: Mode,
    /// How often nodes send heartbeats.
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// How many intervals without a heartbeat make it lost.
    pub heartbeat_misses: u32,
    /// How often each BMC is polled.
    #[serde(with = "humantime_serde_compat")]
    pub bmc_poll_interval: Duration,
    /// Connect timeout for one BMC connection.
    #[serde(with = "humantime_serde_compat")]
    pub bmc_connect_timeout: Duration,
    /// Timeout of one BMC request.
    #[serde(with = "humantime_serde_compat")]
    pub bmc_request_timeout: Duration,
    /// Consecutive samples a fencing verdict needs.
    pub evidence_samples: u32,
    /// How long the evidence of a fencing verdict must hold.
    #[serde(with = "humantime_serde_compat")]
    pub evidence_for: Duration,
    /// The host watchdog timeout the nodes' OS sets.
    #[serde(with = "humantime_serde_compat")]
    pub watchdog_timeout: Duration,
    /// How long a POST stage may last before the host counts as stuck in POST.
    #[serde(with = "humantime_serde_compat")]
    pub post_timeout: Duration,
    /// How long an isolated node is given before it is failed over.
    #[serde(with = "humantime_serde_compat")]
    pub isolation_grace: Duration,
    /// The storm guard (rack-wide only).
    pub storm_guard: StormGuard,
    /// What a software hang leads to.
    pub on_software_hang: HangAction,
    /// How workloads return.
    pub failback: Failback,
    /// A node failing again this soon after failback stays virtual.
    #[serde(with = "humantime_serde_compat")]
    pub quarantine: Duration,
    /// How virtual nodes' CPUs are chosen.
    pub cpu_model: CpuPolicy,
    /// Keep a paused twin of every watched node ready on the host placement picks for it, so
    /// that a failover resumes it instead of starting QEMU (rack-wide only).
    pub precreate_twins: bool,
    /// Whether twins are moved off loaded failover servers by themselves (rack-wide only).
    pub rebalance: Rebalance,
}

impl Policy {
    /// How long without a heartbeat before it counts as lost.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval * self.heartbeat_misses
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Observe,
            heartbeat_interval: defaults::HEARTBEAT_INTERVAL,
            heartbeat_misses: defaults::HEARTBEAT_MISSES,
            bmc_poll_interval: defaults::BMC_POLL_INTERVAL,
            bmc_connect_timeout: defaults::BMC_CONNECT_TIMEOUT,
            bmc_request_timeout: defaults::BMC_REQUEST_TIMEOUT,
            evidence_samples: defaults::EVIDENCE_SAMPLES,
            evidence_for: defaults::EVIDENCE_FOR,
            watchdog_timeout: defaults::WATCHDOG_TIMEOUT,
            post_timeout: defaults::POST_TIMEOUT,
            isolation_grace: defaults::ISOLATION_GRACE,
            storm_guard: StormGuard {
                max_concurrent_failovers: defaults::STORM_MAX_CONCURRENT,
                max_failing_fraction: defaults::STORM_MAX_FRACTION,
            },
            on_software_hang: HangAction::Failover,
            failback: Failback::Manual,
            quarantine: defaults::QUARANTINE,
            cpu_model: CpuPolicy::Named,
            precreate_twins: false,
            rebalance: Rebalance::Manual,
        }
    }
}

/// How vigil trusts a BMC's HTTPS certificate. There is no global "accept anything".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedfishTrust {
    /// Certificates chaining to this CA (PEM file).
    CaFile(PathBuf),
    /// Exactly the leaf certificate with this SHA-256 fingerprint (BMCs are addressed by IP and
    /// often have self-signed certificates: pinning is the honest way to trust one).
    Fingerprint(#[serde(serialize_with = "hex_colon")] [u8; 32]),
    /// No verification: an explicit per-node opt-in, warned about at every start.
    InsecureSkipVerify,
}

fn hex_colon<S: serde::Serializer>(fp: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_fingerprint(fp))
}

/// `AB:CD:...` form of a SHA-256 fingerprint.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The Redfish side of a BMC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedfishEndpoint {
    /// `https://host[:port]`, no path.
    pub url: String,
    /// How its certificate is trusted.
    pub trust: RedfishTrust,
}

/// The IPMI side of a BMC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpmiEndpoint {
    /// Host name or address.
    pub host: String,
    /// UDP port.
    pub port: u16,
    /// RMCP+ cipher suite: 3 or 17.
    pub cipher_suite: u8,
}

/// A machine's BMC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BmcConfig {
    /// Redfish, when the BMC speaks it.
    pub redfish: Option<RedfishEndpoint>,
    /// IPMI, when the BMC speaks it.
    pub ipmi: Option<IpmiEndpoint>,
    /// The BMC user name (not a secret).
    pub username: String,
    /// Where the BMC password is.
    pub password: SecretRef,
}

/// A machine's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeartbeatConfig {
    /// The address its heartbeats come from, when it is known; others are dropped.
    pub address: Option<IpAddr>,
    /// Where the HMAC key is.
    pub key: SecretRef,
}

/// The size a node's virtual twin is given at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VirtualSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// A protected node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeConfig {
    /// Unique name.
    pub name: String,
    /// The firmware profile of its BMC.
    pub firmware_profile: String,
    /// Its BMC.
    pub bmc: BmcConfig,
    /// Its heartbeat.
    pub heartbeat: HeartbeatConfig,
    /// Where its hardware profile is stored.
    pub hardware_profile: PathBuf,
    /// Its boot disk on shared storage (a path, `iscsi://`, `rbd:`), when it has one.
    pub boot_disk: Option<String>,
    /// Virtual nodes of different isolation groups never share a host.
    pub isolation_group: String,
    /// The most its virtual twin may take.
    pub virtual_size: Option<VirtualSize>,
    /// The policy in force for this node (the rack's, with its own overrides).
    pub policy: Policy,
}

/// What a hypervisor host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostRole {
    /// Takes failed nodes first.
    Failover,
    /// Takes them when the failover server is full, loaded or failed.
    Backup,
}

/// How a host runs virtual nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorDriver {
    /// QEMU started directly and driven over QMP.
    Qemu,
    /// libvirt, through virsh.
    Libvirt,
}

/// What a host can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capacity {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Virtual nodes at most.
    pub slots: u32,
}

/// A failover or backup server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostConfig {
    /// Unique name (shared namespace with nodes).
    pub name: String,
    /// Failover or backup.
    pub role: HostRole,
    /// qemu or libvirt.
    pub hypervisor: HypervisorDriver,
    /// The driver's URI (`local` for QEMU here, `qemu+ssh://...` for libvirt).
    pub uri: String,
    /// What it can give.
    pub capacity: Capacity,
    /// The firmware profile of its BMC.
    pub firmware_profile: String,
    /// Its BMC (hosts are watched like nodes).
    pub bmc: BmcConfig,
    /// Its heartbeat.
    pub heartbeat: HeartbeatConfig,
    /// Boot twins on this host from this kernel and initrd instead of their disks.
    pub guest_kernel: Option<GuestKernel>,
}

/// A kernel and initrd that twins on a host boot directly (network-booted workloads, and the
/// hardware lab's guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestKernel {
    /// The kernel (an uncompressed vmlinux boots fastest under TCG).
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
    /// Extra kernel command line.
    pub args: String,
}

/// Serde helpers to show durations as humantime strings in JSON output.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}
