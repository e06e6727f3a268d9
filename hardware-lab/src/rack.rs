//! A rack from a topology file: every server's BMC started, and the files the appliance needs.
//!
//! Overview: [`Topology`] is the lab's own file (`hardware-lab/topologies/*.toml`). [`Rack::start`]
//! makes a CA, starts a Redfish BMC per server on its own loopback port, writes the BMC passwords
//! and heartbeat keys as private files, the CA certificate, `endpoints.json` (where everything is)
//! and `vigil.toml` (a configuration for this rack, which it checks with vigil's own validator
//! before saying it is up), and serves the control API for fault injection.
//!
//! Scope: starting and stopping. What a server does is `server.rs`; its HTTP face `redfish.rs`.
//!
//! Key types: [`Topology`], [`Rack`], [`Endpoints`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use vigil::config::{Diagnostics, ProfileSet};

use crate::clock::LabClock;
use crate::mockup::Mockup;
use crate::redfish::{Bmc, BmcLayout, run_bmc};
use crate::server::SimServer;
use crate::tls::LabCa;

/// What a server is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A protected node.
    Node,
    /// The failover server.
    Failover,
    /// The backup server.
    Backup,
}

/// A virtual node's or host's size.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, as vigil writes it (`"512MiB"`).
    pub memory: String,
    /// Slots (hosts only).
    #[serde(default)]
    pub slots: Option<u32>,
}

/// One server of the topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Its name.
    pub name: String,
    /// Node, failover or backup.
    pub role: Role,
    /// The firmware profile its BMC follows.
    pub firmware_profile: String,
    /// The real capture its BMC is seeded from (defaults to the profile's first).
    #[serde(default)]
    pub mockup: Option<String>,
    /// The BMC user (defaults to the firmware family's usual one).
    #[serde(default)]
    pub username: Option<String>,
    /// Nodes: the isolation group.
    #[serde(default)]
    pub isolation_group: Option<String>,
    /// Nodes: the virtual twin's size; hosts: their capacity.
    #[serde(default)]
    pub size: Option<Size>,
    /// What its BMC does when the OS stops petting the watchdog: none (status only, the
    /// default), hard-reset, power-down or power-cycle.
    #[serde(default)]
    pub watchdog_action: crate::server::WatchdogAction,
}

/// A topology file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The rack's name.
    pub name: String,
    /// Lab time per real time for the firmware's durations (0.02: a 5-minute POST takes 6 s).
    #[serde(default = "default_scale")]
    pub time_scale: f64,
    /// How often the servers' agents send heartbeats (ms).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// The watchdog timeout the servers' OSes set (lab ms).
    #[serde(default = "default_watchdog_ms")]
    pub watchdog_timeout_ms: u64,
    /// Whether every server also gets a real IPMI BMC (`ipmi_sim`, Debian package openipmi).
    #[serde(default = "default_true")]
    pub ipmi: bool,
    /// The servers.
    #[serde(rename = "server")]
    pub servers: Vec<ServerSpec>,
}

fn default_true() -> bool {
    true
}

fn default_scale() -> f64 {
    0.02
}

fn default_heartbeat_ms() -> u64 {
    1000
}

fn default_watchdog_ms() -> u64 {
    crate::server::DEFAULT_WATCHDOG_TIMEOUT_MS
}

/// How a rack is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackOptions {
    /// Run each server's OS as the real `vigil agent` (heartbeats, watchdog pets). Without it,
    /// the OS state pets the watchdog by itself and nothing sends heartbeats.
    pub agents: bool,
    /// A built guest (vmlinux and initrd.gz, hardware-lab/guest/build.sh): the failover and
    /// backup servers boot twins from it.
    pub guest: Option<PathBuf>,
    /// No IPMI BMCs even where the topology asks for them.
    pub no_ipmi: bool,
}

impl Default for RackOptions {
    fn default() -> Self {
        Self {
            agents: true,
            guest: None,
            no_ipmi: false,
        }
    }
}

impl Topology {
    /// Reads a topology file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("topology {} cannot be read", path.display()))?;
        let t: Topology = toml::from_str(&text)
            .with_context(|| format!("topology {} is invalid", path.display()))?;
        let mut seen = std::collections::BTreeSet::new();
        for s in &t.servers {
            if !seen.insert(&s.name) {
                bail!(
                    "topology {}: server {} appears twice",
                    path.display(),
                    s.name
                );
            }
        }
        if !(t.time_scale > 0.0 && t.time_scale <= 1.0) {
            bail!("topology {}: time_scale must be in (0, 1]", path.display());
        }
        // A watchdog with an action runs in ipmi_sim with a 2 s pre-timeout (ipmi_host), which
        // must fit inside the countdown with room for a pet; IPMI counts it in 100 ms units.
        if let Some(s) = t
            .servers
            .iter()
            .find(|s| s.watchdog_action != crate::server::WatchdogAction::None)
            && !(3_000..=6_553_500).contains(&t.watchdog_timeout_ms)
        {
            bail!(
                "topology {}: server {} has watchdog_action {:?}, which needs watchdog_timeout_ms between 3000 and 6553500 (it is {})",
                path.display(),
                s.name,
                s.watchdog_action,
                t.watchdog_timeout_ms
            );
        }
        Ok(t)
    }
}

/// Where one server's BMC and heartbeat are (written to `endpoints.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerEndpoints {
    /// Node, failover or backup.
    pub role: Role,
    /// Firmware profile.
    pub firmware_profile: String,
    /// Mockup the BMC is seeded from.
    pub mockup: String,
    /// `https://127.0.0.1:PORT`.
    pub redfish_url: String,
    /// The lab CA certificate (PEM) that signed the BMC's certificate.
    pub ca_file: PathBuf,
    /// SHA-256 of the BMC's certificate.
    pub fingerprint_sha256: String,
    /// IPMI host, when the server has an IPMI BMC running.
    pub ipmi_host: Option<String>,
    /// IPMI port.
    pub ipmi_port: Option<u16>,
    /// BMC user.
    pub username: String,
    /// File holding the BMC password (mode 0600).
    pub password_file: PathBuf,
    /// File holding the heartbeat key (mode 0600).
    pub heartbeat_key_file: PathBuf,
    /// Where the server's agent sends heartbeats.
    pub heartbeat_target: String,
}

/// `endpoints.json`: where everything in the rack is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    /// The rack's name.
    pub rack: String,
    /// The lab's control API.
    pub control_url: String,
    /// The lab CA certificate.
    pub ca_file: PathBuf,
    /// The generated configuration.
    pub vigil_config: PathBuf,
    /// The appliance's heartbeat address in that configuration.
    pub heartbeat_listen: String,
    /// The appliance's API address in that configuration.
    pub api_listen: String,
    /// Each server.
    pub servers: BTreeMap<String, ServerEndpoints>,
}

impl Endpoints {
    /// Reads `DIR/endpoints.json`.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let p = state_dir.join("endpoints.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{} cannot be read: is a lab running with this --state-dir?",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", p.display()))
    }
}

/// A running rack.
#[derive(Debug)]
pub struct Rack {
    /// Its servers by name.
    pub servers: BTreeMap<String, Arc<SimServer>>,
    /// Where everything is.
    pub endpoints: Endpoints,
    /// Stops everything.
    pub cancel: CancellationToken,
    tasks: JoinSet<std::io::Result<()>>,
}

fn usual_user(profile: &str) -> &'static str {
    match profile {
        "idrac9" => "root",
        "xcc" => "USERID",
        "supermicro" => "ADMIN",
        _ => "admin",
    }
}

/// A fresh random secret (48 hex digits).
pub(crate) fn random_secret() -> String {
    (0..24)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Writes a file only its owner may read (secrets, configurations that name them).
pub(crate) fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content)
        .with_context(|| format!("{} cannot be written", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A loopback UDP port free now (bound and released: fine for the lab, which starts everything
/// at once).
pub(crate) fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A loopback port free now (TCP or UDP) below Linux's ephemeral range (32768 and up), for the
/// programs the lab starts that bind their own ports (ipmi_sim): they never take a port that
/// was picked from the ephemeral range and released for vigil to bind later.
pub(crate) fn free_low_port(tcp: bool) -> anyhow::Result<u16> {
    for _ in 0..200 {
        let p: u16 = rand::random_range(20_000..32_000);
        let free = if tcp {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        } else {
            std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        };
        if free {
            return Ok(p);
        }
    }
    anyhow::bail!("no free loopback port between 20000 and 32000")
}

impl Rack {
    /// Starts a rack in `state_dir` (created if needed). Its servers run as tasks of the current
    /// tokio runtime, which must exist.
    pub fn start(
        topology: &Topology,
        state_dir: &Path,
        options: RackOptions,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir.join("secrets"))
            .with_context(|| format!("state dir {} cannot be created", state_dir.display()))?;
        let state_dir = state_dir
            .canonicalize()
            .with_context(|| format!("state dir {} cannot be resolved", state_dir.display()))?;
        let mut d = Diagnostics::new();
        let profiles = ProfileSet::builtin(&mut d);
        if d.has_errors() {
            bail!("the built-in firmware profiles are broken:\n{d}");
        }
        let clock = LabClock::start();
        let vigil_bin = if options.agents {
            Some(crate::os::find_vigil_binary().context(
                "the vigil binary (for the servers' agents) is not beside vigil-lab: build it (cargo build) or set VIGIL_BIN",
            )?)
        } else {
            None
        };
        let sock_dir = crate::os::socket_dir(&state_dir);
        std::fs::create_dir_all(&sock_dir)?;
        std::fs::create_dir_all(state_dir.join("logs"))?;

        let ca = LabCa::new(&topology.name)?;
        let ca_file = state_dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.pem)?;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut mockups: BTreeMap<String, Arc<Mockup>> = BTreeMap::new();
        let mut servers = BTreeMap::new();
        let mut eps = BTreeMap::new();
        let heartbeat_listen = format!("127.0.0.1:{}", free_udp_port()?);
        let appliance_hb: std::net::SocketAddr = heartbeat_listen.parse()?;
        let api_listen = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            format!("127.0.0.1:{}", l.local_addr()?.port())
        };

        let control = std::net::TcpListener::bind("127.0.0.1:0")?;
        control.set_nonblocking(true)?;
        let control_url = format!("http://{}", control.local_addr()?);
        let ipmi = topology.ipmi && !options.no_ipmi;
        if ipmi && !crate::ipmi::available() {
            bail!(
                "the topology asks for IPMI BMCs but ipmi_sim/sdrcomp are not installed (Debian package openipmi; scripts/install-test-deps.sh installs it), or run with --no-ipmi"
            );
        }
        let ipmi_dir = state_dir.join("ipmi");

        for spec in &topology.servers {
            let profile = profiles
                .get(&spec.firmware_profile)
                .with_context(|| {
                    format!(
                        "server {}: unknown firmware profile {} (known: {})",
                        spec.name,
                        spec.firmware_profile,
                        profiles.names().collect::<Vec<_>>().join(", ")
                    )
                })?
                .clone();
            let mockup_name = spec
                .mockup
                .clone()
                .or_else(|| profile.mockups.first().cloned())
                .with_context(|| {
                    format!(
                        "server {}: profile {} names no capture to seed its BMC from",
                        spec.name, profile.name
                    )
                })?;
            let mockup = match mockups.get(&mockup_name) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(Mockup::named(&mockup_name)?);
                    mockups.insert(mockup_name.clone(), m.clone());
                    m
                }
            };
            let username = spec
                .username
                .clone()
                .unwrap_or_else(|| usual_user(&profile.name).to_string());
            // 16 hex characters (64 random bits): ipmi_sim refuses longer passwords (IPMI 2.0
            // allows 20; a 20-byte one in lan.conf makes every RAKP 2 fail).
            let password: String = random_secret().chars().take(16).collect();
            let password_file = state_dir.join("secrets").join(format!("{}-bmc", spec.name));
            write_private(&password_file, &format!("{password}\n"))?;
            let heartbeat_key_file = state_dir.join("secrets").join(format!("{}-hb", spec.name));
            write_private(&heartbeat_key_file, &format!("{}\n", random_secret()))?;

            let layout = BmcLayout::new(&mockup, &profile);
            let server = Arc::new(SimServer::new(
                &spec.name,
                profile.clone(),
                mockup.clone(),
                &username,
                &password,
                clock,
                topology.time_scale,
            ));
            {
                let mut st = server.state();
                st.watchdog.timeout_ms = topology.watchdog_timeout_ms;
                st.watchdog.action = spec.watchdog_action;
                st.watchdog.in_band = ipmi;
            }
            let heartbeat_target = match &vigil_bin {
                Some(vigil) => {
                    server.set_self_petting(false);
                    let relay = std::net::UdpSocket::bind("127.0.0.1:0")?;
                    let target = relay.local_addr()?.to_string();
                    let os = crate::os::OsSim {
                        server: server.clone(),
                        vigil: vigil.clone(),
                        key_file: heartbeat_key_file.clone(),
                        interval: std::time::Duration::from_millis(topology.heartbeat_interval_ms),
                        relay,
                        appliance: appliance_hb,
                        watchdog_path: sock_dir.join(format!("{}.wd", spec.name)),
                        log_path: state_dir
                            .join("logs")
                            .join(format!("{}-agent.log", spec.name)),
                    };
                    tasks.spawn(os.run(cancel.child_token()));
                    target
                }
                None => heartbeat_listen.clone(),
            };
            if matches!(spec.role, Role::Failover | Role::Backup) {
                // Its twins die with its power (they run on this machine, in the folder the
                // appliance's QEMU driver uses for this host).
                tasks.spawn(crate::os::host_vms(
                    server.clone(),
                    state_dir.join("appliance").join("vms").join(&spec.name),
                    cancel.child_token(),
                ));
            }
            let cert = ca.issue(&spec.name)?;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.set_nonblocking(true)?;
            let port = listener.local_addr()?.port();
            let bmc = Arc::new(Bmc {
                server: server.clone(),
                layout,
            });
            tasks.spawn(run_bmc(bmc, listener, cert.clone(), cancel.child_token()));
            let ipmi_port = if ipmi {
                let sim = crate::ipmi::IpmiSim::spawn(
                    &spec.name,
                    &ipmi_dir,
                    &username,
                    &password,
                    &control_url,
                )?;
                let port = sim.port;
                tasks.spawn(crate::ipmi_host::run(
                    server.clone(),
                    sim.host_port,
                    cancel.child_token(),
                ));
                tasks.spawn(crate::ipmi::sync(server.clone(), sim, cancel.child_token()));
                Some(port)
            } else {
                None
            };
            eps.insert(
                spec.name.clone(),
                ServerEndpoints {
                    role: spec.role,
                    firmware_profile: profile.name.clone(),
                    mockup: mockup_name,
                    redfish_url: format!("https://127.0.0.1:{port}"),
                    ca_file: ca_file.clone(),
                    fingerprint_sha256: cert.fingerprint.clone(),
                    ipmi_host: ipmi_port.map(|_| "127.0.0.1".to_string()),
                    ipmi_port,
                    username,
                    password_file,
                    heartbeat_key_file,
                    heartbeat_target,
                },
            );
            servers.insert(spec.name.clone(), server);
        }

        let control_listener = tokio::net::TcpListener::from_std(control)?;
        let app = crate::control::router(servers.clone());
        let ctl_cancel = cancel.child_token();
        tasks.spawn(async move {
            axum::serve(control_listener, app)
                .with_graceful_shutdown(async move { ctl_cancel.cancelled().await })
                .await
        });

        let vigil_config = state_dir.join("vigil.toml");
        let endpoints = Endpoints {
            rack: topology.name.clone(),
            control_url,
            ca_file,
            vigil_config: vigil_config.clone(),
            heartbeat_listen,
            api_listen,
            servers: eps,
        };
        let api_token = state_dir.join("secrets").join("api-token");
        write_private(&api_token, &format!("{}\n", random_secret()))?;
        std::fs::write(
            &vigil_config,
            vigil_toml(
                topology,
                &endpoints,
                &state_dir,
                &profiles,
                options.guest.as_deref(),
            ),
        )?;
        // The rack is only up when vigil itself accepts its configuration.
        let checked = vigil::config::check(&vigil_config)?;
        if checked.diagnostics.has_errors() {
            cancel.cancel();
            bail!(
                "the generated {} is not valid:\n{}",
                vigil_config.display(),
                checked.diagnostics
            );
        }
        std::fs::write(
            state_dir.join("endpoints.json"),
            serde_json::to_string_pretty(&endpoints)?,
        )?;
        Ok(Self {
            servers,
            endpoints,
            cancel,
            tasks,
        })
    }

    /// Stops every BMC and the control API, and waits for them.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "a lab server stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "a lab task panicked"),
            }
        }
    }
}

/// A vigil configuration for this rack: nodes pin their BMC's certificate, hosts trust the lab CA
/// (so both trust forms are exercised).
fn vigil_toml(
    t: &Topology,
    e: &Endpoints,
    state_dir: &Path,
    profiles: &ProfileSet,
    guest: Option<&Path>,
) -> String {
    // A POST stage is a fraction of a whole POST: twice the longest scaled POST is safely stuck.
    let post_timeout_ms = t
        .servers
        .iter()
        .filter_map(|s| profiles.get(&s.firmware_profile))
        .map(|p| (p.timing.post.as_secs_f64() * 1000.0 * t.time_scale * 2.0) as u64)
        .max()
        .unwrap_or(10_000)
        .max(1000);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Generated by vigil-lab for rack \"{}\". Secrets are files in secrets/ (mode 0600).\n",
        t.name
    );
    let _ = writeln!(
        s,
        "[appliance]\nstate_dir = \"{}\"\napi_listen = \"{}\"\napi_token = \"file:secrets/api-token\"\nheartbeat_listen = \"{}\"\n",
        state_dir.join("appliance").display(),
        e.api_listen,
        e.heartbeat_listen
    );
    let _ = writeln!(
        s,
        "[policy]\nmode = \"act\"\nheartbeat_interval = \"{}ms\"\nheartbeat_misses = 3\nwatchdog_timeout = \"{}ms\"\npost_timeout = \"{}ms\"\nbmc_poll_interval = \"{}ms\"\nbmc_request_timeout = \"2s\"\nbmc_connect_timeout = \"1s\"\n",
        t.heartbeat_interval_ms,
        t.watchdog_timeout_ms,
        post_timeout_ms,
        // The BMC is polled as often as heartbeats come, so both paths are seen together.
        t.heartbeat_interval_ms
    );
    for spec in &t.servers {
        let ep = &e.servers[&spec.name];
        let (table, extra) = match spec.role {
            Role::Node => {
                let mut x = String::new();
                if let Some(g) = &spec.isolation_group {
                    let _ = writeln!(x, "isolation_group = \"{g}\"");
                }
                if let Some(sz) = &spec.size {
                    let _ = writeln!(
                        x,
                        "virtual = {{ vcpus = {}, memory = \"{}\" }}",
                        sz.vcpus, sz.memory
                    );
                }
                ("node", x)
            }
            Role::Failover | Role::Backup => {
                let sz = spec.size.clone().unwrap_or(Size {
                    vcpus: 4,
                    memory: "2GiB".into(),
                    slots: Some(4),
                });
                let guest = guest
                    .map(|g| {
                        format!(
                            "kernel = \"{}\"\ninitrd = \"{}\"\n",
                            g.join("vmlinux").display(),
                            g.join("initrd.gz").display()
                        )
                    })
                    .unwrap_or_default();
                (
                    "host",
                    format!(
                        "role = \"{}\"\nhypervisor = \"qemu\"\nuri = \"local\"\ncapacity = {{ vcpus = {}, memory = \"{}\", slots = {} }}\n{guest}",
                        if spec.role == Role::Failover {
                            "failover"
                        } else {
                            "backup"
                        },
                        sz.vcpus,
                        sz.memory,
                        sz.slots.unwrap_or(4)
                    ),
                )
            }
        };
        let trust = if spec.role == Role::Node {
            format!("fingerprint_sha256 = \"{}\"", ep.fingerprint_sha256)
        } else {
            "ca_file = \"ca.pem\"".to_string()
        };
        let ipmi = match (&ep.ipmi_host, ep.ipmi_port) {
            (Some(h), Some(p)) => format!("ipmi_host = \"{h}\"\nipmi_port = {p}\n"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "[[{table}]]\nname = \"{}\"\nfirmware_profile = \"{}\"\n{extra}\n[{table}.bmc]\nredfish_url = \"{}\"\n{trust}\n{ipmi}username = \"{}\"\npassword = \"file:secrets/{}-bmc\"\n\n[{table}.heartbeat]\naddress = \"127.0.0.1\"\nkey = \"file:secrets/{}-hb\"\n",
            spec.name, ep.firmware_profile, ep.redfish_url, ep.username, spec.name, spec.name
        );
    }
    s
}
