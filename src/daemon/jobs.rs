//! The failover and failback jobs: the I/O that the state machine asks for.
//!
//! Overview: [`failover`] fences the node (unless the fence is already confirmed or
//! acknowledged), loads its hardware profile, places its twin, boots it and waits for the twin's
//! first heartbeat under the node's name and the new epoch; every step is written to the fencing
//! log before it is taken. No twin is started unless the fencing log shows the node's fence
//! confirmed or acknowledged: the job checks the log itself rather than trust its caller. Before
//! creating a twin it lists every host's VMs: a twin of the same epoch that already runs (the
//! appliance crashed after starting it) is adopted, never doubled; a twin of an older epoch is
//! stopped and confirmed stopped first. [`failback`] stops the twin, confirms it stopped, and
//! only then powers the physical node on and waits for its heartbeat: the two never run at once.
//! [`move_twin`] moves a running twin to another host (a rebalance or an operator's move): the
//! destination reserved, the twin stopped and confirmed stopped, then started there by
//! [`failover`] with the node's fence still holding.
//!
//! Scope: one job. When to run one is the state machine's; concurrency is the runtime's.
//!
//! Key types: [`Env`], [`failover`], [`failback`], [`move_twin`], [`JobEnd`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::broadcast;

use crate::bmc::{Bmc, Depth, PowerAction};
use crate::clock::Clock;
use crate::config::{Config, HostConfig, NodeConfig, ProfileSet};
use crate::fencing::{self, FenceOutcome};
use crate::journal::{Journal, RecordKind};
use crate::model::{HardwareProfile, Millis, PowerReading};
use crate::monitor::TwinBeat;
use crate::placement::{self, Decision, HostView, Placed, Request};
use crate::supervisor::fsm::Step;
use crate::virt::spec::{self, BootSpec, CpuTable, HostLimits};
use crate::virt::{GuestIdentity, Hypervisor, VmState};

/// How long a twin may take from start to its first heartbeat.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a repaired node may take from power-on to its first heartbeat.
pub const RETURN_TIMEOUT: Duration = Duration::from_secs(600);
/// How many times a failback reads the hardware of the server in the node's place when its BMC
/// fails in a way worth another try.
const INVENTORY_TRIES: u32 = 5;
/// How long a twin is given to shut down gracefully at failback.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Everything a job needs, shared by all jobs.
#[derive(Clone)]
pub struct Env {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Firmware profiles.
    pub profiles: Arc<ProfileSet>,
    /// The fencing log.
    pub journal: Arc<Mutex<Journal>>,
    /// BMC drivers by machine.
    pub bmcs: HashMap<String, Arc<dyn Bmc>>,
    /// Each node's BMC paths (the same drivers), for fencing.
    pub paths: HashMap<String, crate::bmc::paths::Paths>,
    /// Hypervisors by host.
    pub hypervisors: HashMap<String, Arc<dyn Hypervisor>>,
    /// Which hosts are healthy now (the monitor's verdicts).
    pub host_health: Arc<Mutex<HashMap<String, bool>>>,
    /// Twins and where they run.
    pub placed: Arc<Mutex<Vec<Placed>>>,
    /// Per node, a host its twin died on: the replacement goes elsewhere (cleared on failback).
    pub avoid: Arc<Mutex<HashMap<String, String>>>,
    /// Pre-created twins and where they wait, by node: (epoch, place). Placement counts them
    /// like running twins, so paused twins never overcommit a host; a failover that finds no
    /// room otherwise removes other nodes' paused twins to make it.
    pub standby: Arc<Mutex<HashMap<String, (u64, Placed)>>>,
    /// Paused twins a job is resuming or removing right now (one job each: a failover making
    /// room never removes the twin its own node's failover is resuming).
    pub claims: Arc<Mutex<std::collections::HashSet<String>>>,
    /// What the monitor says of each failover or backup server, for fencing it (so that its
    /// twins count stopped): see [`HostJudged`].
    pub host_judged: Arc<Mutex<HashMap<String, HostJudged>>>,
    /// Failover and backup servers fenced (confirmed off, or pending) and not seen healthy
    /// since: they take no twin, whatever their verdict says meanwhile (a host vigil powered
    /// off reads as "off at vigil's request", not as failed).
    pub fenced_hosts: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Held while a failover or backup server is fenced (its twins to count stopped): one
    /// host fence at a time, so two nodes' jobs never fence the same host twice.
    pub host_fence: Arc<tokio::sync::Mutex<()>>,
    /// Twins' heartbeats.
    pub twins: broadcast::Sender<TwinBeat>,
    /// Physical nodes' heartbeat arrivals (node, at), for failback.
    pub returns: broadcast::Sender<(String, u64)>,
    /// The clock.
    pub clock: Clock,
    /// The CPU table.
    pub cpu_table: Arc<CpuTable>,
    /// KVM or TCG here.
    pub accel: spec::Accel,
    /// Tells the monitor that vigil itself asked for a power state (node, on).
    pub power_requested: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("hosts", &self.hypervisors.len())
            .finish()
    }
}

/// Whether a failover or backup server may be fenced, by its verdict and the policy (the run
/// loop's judgement, read by the job that needs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostJudged {
    /// Failed, in a way that fences (hardware fault, hang, POST failure, isolation past its
    /// grace) with the appliance acting: why.
    Failed(String),
    /// Not failed, or not in a way that fences: why (healthy, dark, isolated within its grace,
    /// the appliance observing only, ...).
    NotFailed(String),
}

/// How a failover job ended short of a running twin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The fence could not be confirmed.
    FencePending,
    /// Fenced, but no twin runs: why.
    Stalled(String),
}

impl JobEnd {
    /// Why, in words.
    pub fn reason(self) -> String {
        match self {
            JobEnd::FencePending => "the fence is pending".into(),
            JobEnd::Stalled(why) => why,
        }
    }
}

impl Env {
    fn log(
        &self,
        node: &str,
        kind: RecordKind,
        epoch: Option<u64>,
        msg: String,
        detail: serde_json::Value,
    ) -> Result<(), JobEnd> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(Some(node), kind, epoch, msg, detail)
            .map(drop)
            .map_err(|e| JobEnd::Stalled(format!("no action taken: {e}")))
    }

    fn host_views(&self) -> Vec<HostView> {
        let health = self
            .host_health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fenced = self
            .fenced_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.cfg
            .hosts
            .iter()
            .map(|h| HostView {
                name: h.name.clone(),
                role: h.role,
                capacity: h.capacity,
                healthy: self.hypervisors.contains_key(&h.name)
                    && health.get(&h.name).copied().unwrap_or(true)
                    && !fenced.contains(&h.name),
            })
            .collect()
    }

    /// What runs, and what waits paused except `node`'s own pre-created twin: what placement
    /// counts for `node`'s twin ([`placement::choose_with`]).
    fn occupied(&self, node: &str) -> (Vec<Placed>, Vec<Placed>) {
        // (`node`'s own entry is what this placement replaces.)
        let mut running = self
            .placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        running.retain(|p| p.node != node);
        let waiting = self
            .standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(n, _)| n.as_str() != node)
            .map(|(_, (_, p))| p.clone())
            .collect();
        (running, waiting)
    }

    /// The move placement proposes now ([`placement::rebalance`]): only moves `movable` allows
    /// (twin, destination), and only between hosts `sound` says are judged healthy now (not
    /// merely "not failed": a move is planned work, never made toward or away from a host in
    /// doubt).
    pub fn rebalance_proposal(
        &self,
        movable: &dyn Fn(&Placed, &str) -> bool,
        sound: &dyn Fn(&str) -> bool,
    ) -> Option<placement::Move> {
        let views: Vec<HostView> = self
            .host_views()
            .into_iter()
            .map(|mut v| {
                v.healthy &= sound(&v.name);
                v
            })
            .collect();
        let placed = self
            .placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let waiting: Vec<Placed> = self
            .standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(_, p)| p.clone())
            .collect();
        // A node whose twin once died on a host is never sent back there (its failover would
        // not take that host, and the move would end where it began).
        let avoid = self.avoid.lock().unwrap_or_else(|p| p.into_inner()).clone();
        placement::rebalance(&views, &placed, &waiting, &|p: &Placed, to: &str| {
            movable(p, to) && avoid.get(&p.node).is_none_or(|h| h != to)
        })
    }

    /// Claims a paused twin for a resume or a removal: false if another job holds it.
    fn claim(&self, vm: &str) -> bool {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.to_string())
    }

    /// Lets a claimed paused twin go.
    fn unclaim(&self, vm: &str) {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
    }

    /// `node`'s pre-created twin of `epoch` waits no more (resumed, or removed).
    pub fn forget_standby(&self, node: &str, epoch: u64) {
        let mut s = self.standby.lock().unwrap_or_else(|p| p.into_inner());
        if s.get(node).is_some_and(|(e, _)| *e == epoch) {
            s.remove(node);
        }
    }

    /// `node`'s twin counts on `host` no more (stopped there, or its reservation given back).
    fn unplace(&self, node: &str, host: &str) {
        self.placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| !(p.node == node && p.host == host));
    }

    fn fence_state(&self, node: &str) -> fencing::FenceState {
        let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        fencing::state_of(j.records(), node)
    }
}

fn vm_name(node: &str, epoch: u64) -> String {
    format!("vigil-{node}-e{epoch}")
}

/// The epoch in a twin's VM name (`vigil-NODE-eEPOCH`), if `vm` is one of `node`'s.
pub fn twin_epoch(vm: &str, node: &str) -> Option<u64> {
    vm.strip_prefix(&format!("vigil-{node}-e"))?.parse().ok()
}

/// `node`'s recorded hardware profile, if its file reads and parses.
fn recorded_profile(node: &NodeConfig) -> Option<HardwareProfile> {
    let text = std::fs::read_to_string(&node.hardware_profile).ok()?;
    serde_json::from_str(&text).ok()
}

async fn load_profile(env: &Env, node: &NodeConfig) -> Result<HardwareProfile, String> {
    if let Some(p) = recorded_profile(node) {
        return Ok(p);
    }
    // No recorded profile: capture it now (a failed node's BMC usually still answers).
    let bmc = env
        .bmcs
        .get(&node.name)
        .ok_or("no recorded hardware profile and no BMC to capture one")?;
    let p = bmc.inventory(&node.name).await.map_err(|e| {
        format!(
            "no recorded hardware profile ({}), and capturing one failed: {e}",
            node.hardware_profile.display()
        )
    })?;
    if let Some(dir) = node.hardware_profile.parent() {
        let _made = std::fs::create_dir_all(dir);
    }
    let _saved = std::fs::write(
        &node.hardware_profile,
        serde_json::to_vec_pretty(&p).unwrap_or_default(),
    );
    Ok(p)
}

/// What decides a node's twin besides its profile: its configured caps, CPU policy and boot
/// disk (shared by the failover job and `vigil failover --dry-run`).
pub fn spec_inputs(node: &NodeConfig, epoch: u64, kernel: Option<BootSpec>) -> spec::Inputs<'_> {
    spec::Inputs {
        node: &node.name,
        epoch,
        cap_vcpus: node.virtual_size.map(|v| v.vcpus),
        cap_memory_mib: node.virtual_size.map(|v| v.memory_bytes >> 20),
        cpu_policy: node.policy.cpu_model,
        boot_disk: node.boot_disk.as_deref(),
        kernel,
    }
}

/// Power-fences `node` for `epoch` through its configured methods, recording `verdict` as the
/// reason; the failover and the refence of a node powered on beside its twin both go through
/// here, so both say the same in the log and tell the lab the same power request.
pub async fn fence_node(
    env: &Env,
    node_name: &str,
    epoch: Option<u64>,
    verdict: &str,
) -> Result<FenceOutcome, fencing::FenceError> {
    // A node, or a failover or backup server fenced so that its twins count stopped.
    let machine = env.cfg.machine(node_name);
    let reflect = machine
        .and_then(|m| env.profiles.get(m.firmware_profile))
        .map(|p| p.timing.power_off_reflect)
        .unwrap_or(Duration::from_secs(10));
    let policy = machine.map(|m| m.policy.clone()).unwrap_or_default();
    let none = crate::bmc::paths::Paths {
        redfish: None,
        ipmi: None,
        observer: None,
    };
    let plan = fencing::plan_for(
        node_name,
        env.paths.get(node_name).unwrap_or(&none),
        &policy,
        reflect,
    );
    let _ = env.power_requested.send((node_name.to_string(), false));
    crate::daemon::fence::fence(&plan, &env.journal, epoch, json!({ "verdict": verdict })).await
}

/// What a node's twin asks of a host: the node's configured size, or its profile's (the
/// failover, the pre-creation and `vigil failover --dry-run` ask the same).
pub fn twin_request(node: &NodeConfig, profile: &HardwareProfile) -> Request {
    // (Counts from a BMC: saturating, so a hostile one cannot overflow the product.)
    let vcpus = node
        .virtual_size
        .map_or(
            profile
                .cpu
                .sockets
                .saturating_mul(profile.cpu.cores_per_socket)
                .saturating_mul(profile.cpu.threads_per_core),
            |v| v.vcpus,
        )
        .max(1);
    let memory_bytes = node
        .virtual_size
        .map_or(profile.memory_mib << 20, |v| v.memory_bytes);
    Request {
        node: node.name.clone(),
        group: node.isolation_group.clone(),
        vcpus,
        memory_bytes,
    }
}

/// What `node`'s twin asks of a host by its recorded profile, with no BMC read: for counting
/// the twins a restart finds. None without a readable recorded profile.
pub fn recorded_request(node: &NodeConfig) -> Option<Request> {
    recorded_profile(node).map(|p| twin_request(node, &p))
}

/// The twin of `node` for `epoch` on `host_name`: its hypervisor, its VM spec (with the
/// fidelity report) and the identity it boots with.
fn twin_spec(
    env: &Env,
    node: &NodeConfig,
    profile: &HardwareProfile,
    host_name: &str,
    epoch: u64,
) -> Result<(Arc<dyn Hypervisor>, spec::VmSpec, GuestIdentity), JobEnd> {
    let host: &HostConfig = env
        .cfg
        .host(host_name)
        .ok_or_else(|| JobEnd::Stalled(format!("{host_name} is not a configured host")))?;
    let hv = env
        .hypervisors
        .get(host_name)
        .cloned()
        .ok_or_else(|| JobEnd::Stalled(format!("no driver for {host_name}")))?;
    let kernel = host.guest_kernel.as_ref().map(|g| BootSpec::Kernel {
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        append: format!("console=ttyS0 quiet panic=-1 {}", g.args)
            .trim()
            .to_string(),
    });
    let inputs = spec_inputs(node, epoch, kernel);
    let limits = HostLimits {
        vcpus: host.capacity.vcpus,
        memory_mib: host.capacity.memory_bytes >> 20,
        accel: env.accel,
    };
    let vm = spec::build(profile, &inputs, limits, &env.cpu_table);
    let key =
        node.heartbeat.key.resolve().map_err(|e| {
            JobEnd::Stalled(format!("the node's heartbeat key cannot be read: {e}"))
        })?;
    let id = GuestIdentity {
        appliance: crate::virt::qemu::guest_appliance_addr(
            env.cfg.appliance.heartbeat_listen,
            &crate::virt::qemu::NetMode::User,
        ),
        key,
    };
    Ok((hv, vm, id))
}

/// Removes a paused twin that will not be resumed (it never ran, or ran no more since it was
/// paused), confirmed gone, and says so in the log.
async fn remove_paused(
    env: &Env,
    node_name: &str,
    epoch: u64,
    host: &str,
    hv: &dyn Hypervisor,
    vm: &str,
    why: &str,
) -> Result<(), JobEnd> {
    hv.destroy(vm)
        .await
        .map_err(|e| JobEnd::Stalled(format!("the paused twin {vm} would not go: {e}")))?;
    env.forget_standby(node_name, epoch);
    env.log(
        node_name,
        RecordKind::VmStopped,
        Some(epoch),
        format!("removed {vm} on {host}, paused, not resumed: {why}"),
        json!({ "vm": vm, "host": host, "paused": true }),
    )
}

/// Pre-creates `node`'s twin for `epoch` (reserved for the node's next failover) on the host
/// placement picks now, paused before its first instruction: QEMU is started, the guest runs
/// nothing, and its boot disk is attached only when the failover resumes it (after the fence).
/// The record is written before QEMU starts. Returns the host.
pub async fn precreate(env: &Env, node_name: &str, epoch: u64) -> Result<String, String> {
    let node = env
        .cfg
        .node(node_name)
        .ok_or_else(|| format!("{node_name} is not a configured node"))?;
    let profile = load_profile(env, node).await?;
    let req = twin_request(node, &profile);
    let views = env.host_views();
    // Placed and reserved under one lock: two nodes' pre-creations never take the same room.
    let host_name = {
        let mut standby = env.standby.lock().unwrap_or_else(|p| p.into_inner());
        let running = env.placed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let waiting: Vec<Placed> = standby
            .iter()
            .filter(|(n, _)| n.as_str() != node_name)
            .map(|(_, (_, p))| p.clone())
            .collect();
        match placement::choose_with(&req, &views, &running, &waiting) {
            Ok(Decision::Place { host }) => {
                standby.insert(node_name.to_string(), (epoch, Placed::of(&req, &host)));
                host
            }
            Ok(Decision::AlreadyPlaced { host }) => {
                return Err(format!("{node_name} has a twin running on {host}"));
            }
            Err(refusal) => return Err(refusal.to_string()),
        }
    };
    let made = precreate_on(env, node, &profile, &host_name, epoch).await;
    if made.is_err() {
        env.forget_standby(node_name, epoch);
    }
    made
}

async fn precreate_on(
    env: &Env,
    node: &NodeConfig,
    profile: &HardwareProfile,
    host_name: &str,
    epoch: u64,
) -> Result<String, String> {
    let node_name = node.name.as_str();
    let (hv, vm, id) = twin_spec(env, node, profile, host_name, epoch).map_err(JobEnd::reason)?;
    env.log(
        node_name,
        RecordKind::VmStandby,
        Some(epoch),
        format!(
            "pre-creating {} on {host_name}, paused: {} ({} vCPUs, {} MiB); it runs nothing until {node_name}'s next failover resumes it after the fence",
            vm.name,
            vm.cpu.model,
            vm.cpu.vcpus(),
            vm.memory_mib
        ),
        json!({ "vm": vm.name, "host": host_name, "spec": vm, "fidelity": vm.fidelity }),
    )
    .map_err(JobEnd::reason)?;
    match hv.create(&vm, &id, true).await {
        Ok(VmState::Paused) => {
            let still = env
                .standby
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(node_name)
                .is_some_and(|(e, _)| *e == epoch);
            if still {
                return Ok(host_name.to_string());
            }
            // Its room went to a failover (or its node's failover began) while it was being
            // made: it goes, counted nowhere.
            let why = "its room went to a failover, or its node's failover began, while it was being made";
            remove_paused(env, node_name, epoch, host_name, hv.as_ref(), &vm.name, why)
                .await
                .map_err(JobEnd::reason)?;
            Err(format!("{} was removed: {why}", vm.name))
        }
        Ok(other) => {
            let _gone = hv.destroy(&vm.name).await;
            Err(format!(
                "{} reads back {other:?} after a paused create",
                vm.name
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Before anything moves back: is the server now in `node`'s place the one its twin was built
/// from? Its hardware profile is read from its BMC and compared with the recorded one. The same:
/// go on. Different (a replacement server, or a repair that changed parts) and not accepted by
/// an operator: the differences are logged and the failback refused, the twin left running.
/// Accepted: the differences are logged and the new profile becomes the recorded one (the next
/// twin is built from it). A server whose hardware cannot be read is not moved to.
async fn check_the_server_in_place(
    env: &Env,
    node_name: &str,
    epoch: u64,
    replacement: bool,
) -> Result<(), String> {
    let node = env
        .cfg
        .node(node_name)
        .ok_or_else(|| format!("{node_name} is not a configured node"))?;
    let Some(recorded) = recorded_profile(node) else {
        // Nothing to compare with (the capture the twin was built from is gone): the next
        // failover captures the server as it is then.
        return Ok(());
    };
    let bmc = env
        .bmcs
        .get(node_name)
        .cloned()
        .ok_or("no BMC to read the server in the node's place")?;
    // (A BMC answering slowly or busy is tried again: a few seconds are nothing to a failback.)
    let mut tries = 0;
    let now = loop {
        tries += 1;
        match bmc.inventory(node_name).await {
            Ok(p) => break p,
            Err(e) if e.is_transient() && tries < INVENTORY_TRIES => {
                tracing::warn!(node = %node_name, tries, error = %e, "the server's hardware could not be read; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => {
                let why = format!(
                    "failback of {node_name} refused: the hardware of the server in its place cannot be read ({e}, after {tries} tries), so it cannot be compared with the profile its twin was built from. The twin keeps running"
                );
                env.log(
                    node_name,
                    RecordKind::Refusal,
                    Some(epoch),
                    why.clone(),
                    json!({ "error": e.to_string() }),
                )
                .map_err(JobEnd::reason)?;
                return Err(why);
            }
        }
    };
    let differences = crate::model::profile::diff(&recorded, &now);
    if differences.is_empty() {
        return Ok(());
    }
    let shown: Vec<&String> = differences.iter().take(12).collect();
    let more = differences.len().saturating_sub(shown.len());
    let summary = format!(
        "{}{}",
        shown
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    );
    if !replacement {
        env.log(
            node_name,
            RecordKind::Refusal,
            Some(epoch),
            format!(
                "failback of {node_name} refused: the server in its place is not the one its twin was built from ({} difference(s): {summary}). The twin keeps running. If this is a replacement server, fail back with --accept-profile (POST .../failback?accept_profile=true)",
                differences.len()
            ),
            json!({ "differences": differences }),
        )
        .map_err(JobEnd::reason)?;
        return Err(format!(
            "the server in {node_name}'s place differs from the recorded profile ({} difference(s))",
            differences.len()
        ));
    }
    // Recorded first (whole, or not at all: written aside, then renamed over), so that the
    // next twin is built from the server that now runs the workload.
    let path = &node.hardware_profile;
    let aside = path.with_extension("json.new");
    std::fs::write(&aside, serde_json::to_vec_pretty(&now).unwrap_or_default())
        .and_then(|()| std::fs::rename(&aside, path))
        .map_err(|e| {
            format!(
                "the new hardware profile cannot be recorded at {} ({e}): nothing moved",
                path.display()
            )
        })?;
    env.log(
        node_name,
        RecordKind::Operator,
        Some(epoch),
        format!(
            "{node_name} moves to the replacement server in its place, its differences accepted by an operator ({} difference(s): {summary}); its profile is recorded anew",
            differences.len()
        ),
        json!({ "differences": differences }),
    )
    .map_err(JobEnd::reason)?;
    Ok(())
}

/// Removes `node`'s pre-created twin of `epoch` on `host` that no failover will take.
pub async fn remove_standby(
    env: &Env,
    node: &str,
    epoch: u64,
    host: &str,
    why: &str,
) -> Result<(), String> {
    let hv = env
        .hypervisors
        .get(host)
        .ok_or_else(|| format!("no driver for {host}"))?;
    remove_paused(
        env,
        node,
        epoch,
        host,
        hv.as_ref(),
        &vm_name(node, epoch),
        why,
    )
    .await
    .map_err(JobEnd::reason)
}

/// Runs a failover of `node` for `epoch`. Returns the host its twin runs on.
pub async fn failover(
    env: &Env,
    node_name: &str,
    epoch: u64,
    fenced: bool,
    why: &str,
    moving: Option<(&str, Millis)>,
    progress: &(dyn Fn(Step) + Send + Sync),
) -> Result<String, JobEnd> {
    let node = env
        .cfg
        .node(node_name)
        .ok_or_else(|| JobEnd::Stalled(format!("{node_name} is not a configured node")))?
        .clone();
    let started = env.clock.now();
    // Subscribe before anything boots, so no early heartbeat is missed.
    let mut twin_beats = env.twins.subscribe();
    if !fenced {
        env.log(
            node_name,
            RecordKind::FailoverBegin,
            Some(epoch),
            format!("failover of {node_name} begins (epoch {epoch}): {why}"),
            json!({ "why": why }),
        )?;
        match fence_node(env, node_name, Some(epoch), why).await {
            Ok(FenceOutcome::Confirmed { .. }) => {}
            Ok(FenceOutcome::Pending { .. }) => return Err(JobEnd::FencePending),
            Err(e) => return Err(JobEnd::Stalled(e.to_string())),
        }
    }
    // Invariant 1: no twin unless the log shows the fence confirmed or acknowledged.
    let fence = env.fence_state(node_name);
    if !fence.off {
        return Err(JobEnd::Stalled(
            "the fencing log does not show the fence confirmed: no twin is started".into(),
        ));
    }
    // A fence confirmed earlier (a retry, a lost twin's replacement, a move) holds only while
    // the node stays off: one powered on since (by hand, by its BMC) is fenced again before a
    // twin starts beside it. (A BMC that does not answer now is no evidence it came on: the
    // log's confirmation stands. An operator's ack-off is taken over the BMC's reading: that
    // reading is what it overrides.)
    if fenced
        && !fence.acked
        && let Some(bmc) = env.bmcs.get(node_name)
    {
        let power = tokio::time::timeout(node.policy.bmc_request_timeout, bmc.status(Depth::Fast))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|s| s.power);
        if let Some(p @ (PowerReading::On | PowerReading::PoweringOn | PowerReading::PoweringOff)) =
            power
        {
            env.log(
                node_name,
                RecordKind::Refusal,
                Some(epoch),
                format!("{node_name} reads {p:?} although its fence was confirmed: it is fenced again before its twin starts (a node and its twin never run together)"),
                json!({ "power": p }),
            )?;
            let end = match fence_node(
                env,
                node_name,
                Some(epoch),
                "on again before its twin starts",
            )
            .await
            {
                Ok(FenceOutcome::Confirmed { .. }) => None,
                Ok(FenceOutcome::Pending { .. }) => Some(JobEnd::FencePending),
                Err(e) => Some(JobEnd::Stalled(e.to_string())),
            };
            if let Some(end) = end {
                // Not confirmed off: whatever twin of it runs (one adopted after a restart, one
                // a failed stop left) is stopped, so the two never run together while an
                // operator makes sure.
                stop_twins_of(env, node_name).await;
                return Err(end);
            }
        }
    }
    progress(Step::Fenced);
    let fenced_at = env.clock.now();
    progress(Step::Placing);
    let profile = load_profile(env, &node).await.map_err(JobEnd::Stalled)?;

    // The paused twins this job claims, let go whichever way it ends.
    let mut held = Held(env, Vec::new());
    // This node's pre-created twin is this failover's to resume or remove: it is no longer
    // counted as waiting (nor chosen by another failover making room); a resume is placed again.
    env.standby
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(node_name);
    // Invariant 3: one twin per node. Adopt this epoch's if it runs, unless it runs on the
    // host it was lost on (it stopped heartbeating there: stopped, never adopted); stop any
    // older one.
    let mut adopted: Option<String> = None;
    // Whether `adopted` is a twin found running (its room is taken already) rather than a
    // paused one to resume.
    let mut adopted_running = false;
    // This epoch's pre-created twin (paused, never run), if one waits: (host, vm).
    let mut standby: Option<(String, String)> = None;
    let avoid = env
        .avoid
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node_name)
        .cloned();
    // Hosts whose hypervisor cannot be read. One where, by the log, a twin of this node may
    // still run stops the job, unless that host is judged failed and fenced (confirmed off)
    // now: nothing is started elsewhere until that twin is confirmed stopped. The others take
    // no twin this time.
    let may_run = {
        let j = env.journal.lock().unwrap_or_else(|p| p.into_inner());
        crate::journal::twin_hosts(j.records(), node_name)
    };
    let mut unreadable: Vec<String> = Vec::new();
    for (host, hv) in &env.hypervisors {
        let vms = match hv.list_checked().await {
            Ok(vms) => vms,
            Err(e) if may_run.contains(host) => {
                // Its twins count stopped only once the host is fenced: then it takes no twin.
                stop_by_host_fence(env, &node, epoch, host, &e.to_string(), &mut twin_beats)
                    .await?;
                unreadable.push(host.clone());
                continue;
            }
            Err(e) => {
                tracing::warn!(node = %node_name, host = %host, error = %e, "a host's hypervisor cannot be read: it takes no twin now");
                unreadable.push(host.clone());
                continue;
            }
        };
        for (vm, state) in vms {
            let Some(e) = twin_epoch(&vm, node_name) else {
                continue;
            };
            if state == VmState::Paused {
                if !env.claim(&vm) {
                    // Another failover is removing it to make room: neither resumed nor
                    // removed here.
                    continue;
                }
                held.1.push(vm.clone());
                if e == epoch && avoid.as_deref() != Some(host.as_str()) {
                    standby = Some((host.clone(), vm));
                } else {
                    // Paused: a pre-created twin this failover does not take (reserved before
                    // a restart, or on the host a lost twin died on), or a stale twin that was
                    // paused. It runs nothing; it goes.
                    remove_paused(
                        env,
                        node_name,
                        e,
                        host,
                        hv.as_ref(),
                        &vm,
                        "it is not this failover's",
                    )
                    .await?;
                }
                continue;
            }
            let live = state == VmState::Running;
            // A twin that is neither live nor gone (crashed, hung, not answering) is stopped
            // too, whatever its epoch: a replacement never starts beside what is left of it.
            let leftover = matches!(state, VmState::Other(_));
            if state == VmState::Stopped {
                // A dead twin (its process gone): clear it away, it runs nothing; the log says
                // so, or a restart would count it as running still.
                let _ = hv.destroy(&vm).await;
                env.log(
                    node_name,
                    RecordKind::VmStopped,
                    Some(e),
                    format!("{vm} on {host} had stopped by itself: cleared away"),
                    json!({ "vm": vm, "host": host }),
                )?;
                continue;
            }
            if e == epoch && live && avoid.as_deref() != Some(host.as_str()) {
                adopted = Some(host.clone());
                adopted_running = true;
            } else if live || leftover {
                hv.stop(&vm, STOP_GRACE).await.map_err(|e| {
                    JobEnd::Stalled(format!("a stale twin ({vm}) would not stop: {e}"))
                })?;
                env.log(
                    node_name,
                    RecordKind::VmStopped,
                    Some(e),
                    if e == epoch {
                        format!("stopped {vm} on {host}, the lost twin, and confirmed it stopped before starting its replacement")
                    } else {
                        format!("stopped {vm}, a twin of an older epoch, before starting epoch {epoch}")
                    },
                    json!({ "vm": vm, "host": host }),
                )?;
            }
        }
    }
    let req = twin_request(&node, &profile);
    // A pre-created twin is resumed where it waits, if that host can still take it now.
    if adopted.is_none()
        && let Some((h, vm)) = standby
    {
        let here: Vec<HostView> = env
            .host_views()
            .into_iter()
            .filter(|v| v.name == h)
            .collect();
        let (running, waiting) = env.occupied(node_name);
        match placement::choose_with(&req, &here, &running, &waiting) {
            Ok(_) => adopted = Some(h),
            Err(refusal) => {
                if let Some(hv) = env.hypervisors.get(&h) {
                    let why = format!("{h} cannot take it now ({refusal})");
                    remove_paused(env, node_name, epoch, &h, hv.as_ref(), &vm, &why).await?;
                }
            }
        }
    }
    let host_name = match adopted {
        Some(h) => h,
        None => {
            let mut views = env.host_views();
            for v in views.iter_mut().filter(|v| unreadable.contains(&v.name)) {
                v.healthy = false;
            }
            if let Some(bad) = env
                .avoid
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(node_name)
            {
                // The host this node's twin died on counts as unhealthy for its replacement.
                for v in views.iter_mut().filter(|v| &v.name == bad) {
                    v.healthy = false;
                }
            }
            let (running, waiting) = env.occupied(node_name);
            // A move's destination first, if it can take the twin now; where placement would
            // put it otherwise (the twin is stopped already: it must run somewhere).
            let preferred = moving.and_then(|(p, _)| {
                let here: Vec<HostView> = views.iter().filter(|v| v.name == p).cloned().collect();
                placement::choose_with(&req, &here, &running, &waiting).ok()
            });
            let choice = match preferred.map_or_else(
                || placement::choose_with(&req, &views, &running, &waiting),
                Ok,
            ) {
                Ok(d) => Ok(d),
                // Other nodes' paused twins give way to a failed node's: placed by what runs,
                // then room is made on that host.
                Err(_) => match placement::choose(&req, &views, &running) {
                    Ok(Decision::Place { host }) => {
                        make_room(env, node_name, &req, &views, &host).await?;
                        Ok(Decision::Place { host })
                    }
                    other => other,
                },
            };
            match choice {
                Ok(Decision::Place { host } | Decision::AlreadyPlaced { host }) => host,
                Err(refusal) => {
                    env.log(
                        node_name,
                        RecordKind::Refusal,
                        Some(epoch),
                        format!("{refusal}"),
                        json!({ "reasons": refusal.reasons }),
                    )?;
                    return Err(JobEnd::Stalled(refusal.to_string()));
                }
            }
        }
    };
    // Checked again and taken in one step (paused twins, then what runs, locked in that order
    // as pre-creation does): two failovers placed at once never overcommit a host.
    let here: Vec<HostView> = env
        .host_views()
        .into_iter()
        .filter(|v| v.name == host_name)
        .collect();
    let reserved = {
        let standby = env.standby.lock().unwrap_or_else(|p| p.into_inner());
        let mut placed = env.placed.lock().unwrap_or_else(|p| p.into_inner());
        placed.retain(|p| p.node != node_name);
        let waiting: Vec<Placed> = standby
            .iter()
            .filter(|(n, _)| n.as_str() != node_name)
            .map(|(_, (_, p))| p.clone())
            .collect();
        let fits =
            adopted_running || placement::choose_with(&req, &here, &placed, &waiting).is_ok();
        if fits {
            placed.push(Placed::of(&req, &host_name));
        }
        fits
    };
    // Until the twin is created or resumed, a job that ends here gives the room back.
    let mut room = Room(env, node_name, !adopted_running);
    if !reserved {
        let why = format!(
            "{host_name}'s room for {node_name}'s twin was taken by another twin meanwhile: placed again at the next try"
        );
        env.log(
            node_name,
            RecordKind::Refusal,
            Some(epoch),
            why.clone(),
            json!({ "host": host_name }),
        )?;
        return Err(JobEnd::Stalled(why));
    }
    env.log(
        node_name,
        RecordKind::Placement,
        Some(epoch),
        format!("{node_name}'s twin goes to {host_name}"),
        json!({ "host": host_name, "vcpus": req.vcpus, "memory_mib": req.memory_bytes >> 20 }),
    )?;

    let (hv, vm, id) = twin_spec(env, &node, &profile, &host_name, epoch)?;
    progress(Step::BootingVirtual);
    let boot_started = env.clock.now();
    let already = hv.status(&vm.name).await;
    if !matches!(already, VmState::Running) {
        env.log(
            node_name,
            RecordKind::VmStart,
            Some(epoch),
            format!(
                "{} {} on {host_name}: {} ({} vCPUs, {} MiB)",
                if already == VmState::Paused {
                    "resuming the pre-created"
                } else {
                    "starting"
                },
                vm.name,
                vm.cpu.model,
                vm.cpu.vcpus(),
                vm.memory_mib
            ),
            json!({ "vm": vm.name, "host": host_name, "spec": vm, "fidelity": vm.fidelity }),
        )?;
        let mut cold = already != VmState::Paused;
        if !cold && let Err(e) = hv.start(&vm.name).await {
            // The pre-created twin would not resume: it goes, and a cold one takes its place
            // in this same job (a retry would find it paused again and fail again).
            let why = format!("it would not resume ({e}); a cold twin is started instead");
            remove_paused(
                env,
                node_name,
                epoch,
                &host_name,
                hv.as_ref(),
                &vm.name,
                &why,
            )
            .await?;
            env.log(
                node_name,
                RecordKind::VmStart,
                Some(epoch),
                format!("starting {} on {host_name}, cold", vm.name),
                json!({ "vm": vm.name, "host": host_name, "spec": vm, "fidelity": vm.fidelity }),
            )?;
            cold = true;
        }
        if cold {
            match hv.create(&vm, &id, false).await {
                Ok(_) => {}
                Err(e) => {
                    env.log(
                        node_name,
                        RecordKind::FailoverFailed,
                        Some(epoch),
                        format!("{} did not start: {e}", vm.name),
                        json!({ "error": e.to_string(), "vm": vm.name, "host": host_name }),
                    )?;
                    env.placed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|p| p.node != node_name);
                    return Err(JobEnd::Stalled(e.to_string()));
                }
            }
        }
    }
    room.2 = false;
    let state = hv.status(&vm.name).await;
    // What the hypervisor gave up beyond the fidelity report already logged with vm-start.
    let adjusted = hv.adjustments(&vm.name);
    env.log(
        node_name,
        RecordKind::VmRunning,
        Some(epoch),
        if adjusted.is_empty() {
            format!("{} reads back {state:?} on {host_name}", vm.name)
        } else {
            format!(
                "{} reads back {state:?} on {host_name}; the hypervisor also changed: {}",
                vm.name,
                adjusted.join("; ")
            )
        },
        json!({ "vm": vm.name, "state": state, "fidelity_adjustments": adjusted }),
    )?;
    super::fence::crash_point("twin-started");

    // Wait for the twin's first heartbeat under the node's name and this epoch.
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let r = tokio::time::timeout_at(deadline, twin_beats.recv()).await;
        match r {
            // (A beat that arrived before this boot began is an older twin's of the same epoch,
            // one that a move or a twin loss just stopped: not this one's.)
            Ok(Ok(b)) if b.node == node_name && b.epoch == epoch && b.at >= boot_started => {
                let now = env.clock.now();
                match moving {
                    Some((_, down)) => env.log(
                        node_name,
                        RecordKind::VmHeartbeat,
                        Some(epoch),
                        format!("{node_name}'s twin heartbeats from {host_name} under epoch {epoch}: move complete (its workload was down {} ms, from the stop to this heartbeat; boot {} ms)", now.saturating_sub(down), now - boot_started),
                        json!({ "host": host_name, "vm": vm.name, "down_ms": now.saturating_sub(down), "boot_ms": now - boot_started, "moved": true }),
                    )?,
                    None => env.log(
                        node_name,
                        RecordKind::VmHeartbeat,
                        Some(epoch),
                        format!("{}'s twin heartbeats from {host_name} under epoch {epoch}: failover complete ({} ms from start, {} ms from the confirmed fence, boot {} ms)", node_name, now - started, now - fenced_at, now - boot_started),
                        json!({ "host": host_name, "vm": vm.name, "total_ms": now - started, "fence_ms": fenced_at - started, "boot_ms": now - boot_started }),
                    )?,
                }
                return Ok(host_name);
            }
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                let stopped = hv.stop(&vm.name, Duration::from_secs(2)).await;
                env.placed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|p| p.node != node_name);
                env.log(
                    node_name,
                    RecordKind::FailoverFailed,
                    Some(epoch),
                    match &stopped {
                        Ok(()) => format!(
                            "{} sent no heartbeat within {} s: stopped",
                            vm.name,
                            BOOT_TIMEOUT.as_secs()
                        ),
                        Err(e) => format!(
                            "{} sent no heartbeat within {} s, and could not be confirmed stopped ({e})",
                            vm.name,
                            BOOT_TIMEOUT.as_secs()
                        ),
                    },
                    json!({ "vm": vm.name, "host": host_name, "stopped": stopped.is_ok() }),
                )?;
                return Err(JobEnd::Stalled(format!("{} sent no heartbeat", vm.name)));
            }
        }
    }
}

/// Stops every twin of `node` that runs (or waits, or hangs) on any host, each confirmed
/// stopped and logged; one that will not stop is logged as such.
async fn stop_twins_of(env: &Env, node: &str) {
    for (host, hv) in &env.hypervisors {
        let Ok(vms) = hv.list_checked().await else {
            continue;
        };
        for (vm, state) in vms {
            let Some(e) = twin_epoch(&vm, node) else {
                continue;
            };
            if matches!(state, VmState::Absent | VmState::Stopped) {
                continue;
            }
            let r = hv.stop(&vm, STOP_GRACE).await;
            let _ = match &r {
                Ok(()) => env.log(
                    node,
                    RecordKind::VmStopped,
                    Some(e),
                    format!("stopped {vm} on {host} and confirmed it stopped: {node} reads on and is not confirmed off (a node and its twin never run together)"),
                    json!({ "vm": vm, "host": host }),
                ),
                Err(err) => env.log(
                    node,
                    RecordKind::FailoverFailed,
                    Some(e),
                    format!("{vm} on {host} could not be confirmed stopped ({err}) while {node} reads on"),
                    json!({ "vm": vm, "host": host, "error": err.to_string(), "stopped": false }),
                ),
            };
            if r.is_ok() {
                env.unplace(node, host);
            }
        }
    }
}

/// How a move ended.
#[derive(Debug)]
pub enum MoveEnd {
    /// The twin runs and heartbeats on this host: the destination, another host placement chose
    /// once the twin was stopped, or the host it never left (the move was refused before
    /// anything was stopped, and the log says why).
    Runs(String),
    /// The twin was stopped, or may have been, and none runs elsewhere yet: retried as a
    /// failover whose fence still holds.
    Stalled(JobEnd),
}

/// Moves `node_name`'s running twin (epoch `epoch`) from `from` to `to`: a rebalance, or an
/// operator's `vigil move`. The destination's room is checked and reserved first (the twin
/// counts on both hosts meanwhile), so a refused move stops nothing. Then the twin is stopped
/// (ACPI, then forced) and confirmed stopped where it runs, logged `vm-stopped`, and only then
/// started on `to` by [`failover`] with the node's fence still holding (same epoch, no new
/// fence): the node never has two twins at once, and the workload is down from the stop to the
/// new twin's first heartbeat.
pub async fn move_twin(
    env: &Env,
    node_name: &str,
    epoch: u64,
    from: &str,
    to: &str,
    why: &str,
    progress: &(dyn Fn(Step) + Send + Sync),
) -> MoveEnd {
    let refuse = |reason: String| {
        let msg = format!("move of {node_name}'s twin from {from} to {to} refused: {reason}");
        let _ = env.log(
            node_name,
            RecordKind::Refusal,
            Some(epoch),
            msg,
            json!({ "from": from, "to": to }),
        );
        MoveEnd::Runs(from.to_string())
    };
    let Some(node) = env.cfg.node(node_name).cloned() else {
        return refuse(format!("{node_name} is not a configured node"));
    };
    let (Some(hv_from), Some(hv_to)) = (env.hypervisors.get(from), env.hypervisors.get(to)) else {
        return refuse(format!(
            "{to} is not a failover or backup server with a hypervisor"
        ));
    };
    let Some(req) = recorded_request(&node) else {
        return refuse("the node's recorded hardware profile cannot be read".into());
    };
    let vm = vm_name(node_name, epoch);
    match hv_from.status(&vm).await {
        VmState::Running => {}
        st => return refuse(format!("{vm} reads back {st:?} on {from}, not running")),
    }
    if hv_to.list_checked().await.is_err() {
        return refuse(format!("{to}'s hypervisor cannot be read"));
    }
    if env
        .avoid
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node_name)
        .is_some_and(|h| h == to)
    {
        return refuse(format!(
            "{node_name}'s twin died on {to} before: its twins are not placed there again until it fails back"
        ));
    }
    // The destination's room, checked and taken in one step as a failover does (paused twins,
    // then what runs, locked in that order). The node keeps its place on `from` until its twin
    // there is confirmed stopped.
    let here: Vec<HostView> = env
        .host_views()
        .into_iter()
        .filter(|v| v.name == to)
        .collect();
    let taken = {
        let standby = env.standby.lock().unwrap_or_else(|p| p.into_inner());
        let mut placed = env.placed.lock().unwrap_or_else(|p| p.into_inner());
        let others: Vec<Placed> = placed
            .iter()
            .filter(|p| p.node != node_name)
            .cloned()
            .collect();
        let waiting: Vec<Placed> = standby
            .iter()
            .filter(|(n, _)| n.as_str() != node_name)
            .map(|(_, (_, p))| p.clone())
            .collect();
        match placement::choose_with(&req, &here, &others, &waiting) {
            Ok(_) => {
                placed.push(Placed::of(&req, to));
                Ok(())
            }
            Err(refusal) => Err(refusal),
        }
    };
    if let Err(refusal) = taken {
        return refuse(format!("{to} cannot take it ({refusal})"));
    }
    if let Err(e) = env.log(
        node_name,
        RecordKind::TwinMove,
        Some(epoch),
        format!("{node_name}'s twin moves from {from} to {to} ({why}): it is stopped on {from}, confirmed stopped, then started on {to}"),
        json!({ "vm": vm, "from": from, "to": to, "why": why }),
    ) {
        env.unplace(node_name, to);
        return MoveEnd::Stalled(e);
    }
    // The workload is down from here until the twin's first heartbeat on `to`.
    let down = env.clock.now();
    let stopped = match hv_from.stop(&vm, STOP_GRACE).await {
        Ok(()) => hv_from.destroy(&vm).await,
        Err(e) => Err(e),
    };
    if let Err(e) = stopped {
        // It may still run: the failover that retries this finds it and adopts it where it
        // runs, or stops it first. Nothing goes to `to`.
        env.unplace(node_name, to);
        let _ = env.log(
            node_name,
            RecordKind::FailoverFailed,
            Some(epoch),
            format!("{vm} on {from} could not be confirmed stopped for its move ({e}); nothing is started on {to}"),
            // ("stopped": false: the log must not count it stopped.)
            json!({ "vm": vm, "host": from, "error": e.to_string(), "stopped": false }),
        );
        return MoveEnd::Stalled(JobEnd::Stalled(e.to_string()));
    }
    if let Err(e) = env.log(
        node_name,
        RecordKind::VmStopped,
        Some(epoch),
        format!("stopped {vm} on {from} and confirmed it stopped, for its move to {to}"),
        json!({ "vm": vm, "host": from }),
    ) {
        env.unplace(node_name, to);
        return MoveEnd::Stalled(e);
    }
    // It runs on `from` no more: only the destination's reservation stays.
    env.unplace(node_name, from);
    super::fence::crash_point("move-stopped");
    match failover(env, node_name, epoch, true, why, Some((to, down)), progress).await {
        Ok(host) => MoveEnd::Runs(host),
        Err(e) => {
            // Whatever the failover ended on, no twin of this node runs on `to` now: its
            // reservation there goes (the parked retry places it afresh).
            env.unplace(node_name, to);
            MoveEnd::Stalled(e)
        }
    }
}

/// A node's place reserved by a failover that has not yet created or resumed its twin: given back
/// if the job ends before (armed).
struct Room<'a>(&'a Env, &'a str, bool);

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if self.2 {
            self.0
                .placed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|p| p.node != self.1);
        }
    }
}

/// Paused twins a job has claimed ([`Env::claim`]), let go when it ends.
struct Held<'a>(&'a Env, Vec<String>);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for vm in &self.1 {
            self.0.unclaim(vm);
        }
    }
}

/// Makes room on `host` for `node`'s twin by removing other nodes' pre-created twins there,
/// the largest first, until placement accepts it (each removal logged under its own node, whose
/// pre-created twin is made again where there is room). Only a twin that reads back paused is
/// removed: never one that runs, nor one still being made. Not enough room after that: stalled
/// (retried by the state machine).
async fn make_room(
    env: &Env,
    node: &str,
    req: &Request,
    views: &[HostView],
    host: &str,
) -> Result<(), JobEnd> {
    let here: Vec<HostView> = views.iter().filter(|v| v.name == host).cloned().collect();
    let hv = env
        .hypervisors
        .get(host)
        .ok_or_else(|| JobEnd::Stalled(format!("no driver for {host}")))?;
    let mut passed: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let (running, waiting) = env.occupied(node);
        if placement::choose_with(req, &here, &running, &waiting).is_ok() {
            return Ok(());
        }
        let victim = waiting
            .iter()
            .filter(|p| {
                p.host == host
                    && !passed.contains(&p.node)
                    && !running.iter().any(|r| r.node == p.node)
            })
            .max_by_key(|p| (p.vcpus, p.memory_bytes, p.node.clone()))
            .and_then(|p| {
                let e = env
                    .standby
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .get(&p.node)?
                    .0;
                Some((p.node.clone(), e))
            });
        let Some((other, e)) = victim else {
            return Err(JobEnd::Stalled(format!(
                "no room on {host} for {node}'s twin, even without the paused twins that could give way"
            )));
        };
        passed.insert(other.clone());
        let vm = vm_name(&other, e);
        if hv.status(&vm).await != VmState::Paused {
            // Still being made, or gone: not removed from under its job.
            continue;
        }
        // Claimed before it goes: its own node's failover, starting now, does not resume it (nor
        // does this remove one that failover claimed first).
        if !env.claim(&vm) {
            continue;
        }
        let why = format!("{node}'s failover needs its room on {host}");
        let removed = remove_paused(env, &other, e, host, hv.as_ref(), &vm, &why).await;
        env.unclaim(&vm);
        removed?;
    }
}

/// A twin of `node` may still run on `host` (by the log), and `host`'s hypervisor cannot be read
/// (`error`): the twin counts stopped only once `host` itself is confirmed off. `host` is fenced
/// through its BMC when, and only when, the evidence says it failed: the run loop judges it
/// failed in a way that fences ([`HostJudged::Failed`]: a hardware fault, a hang, a POST
/// failure, an isolation past its grace, with the appliance acting), and no twin that may run
/// there (of any node) heartbeats for one heartbeat timeout; both are read again once the host
/// fence lock is held. Otherwise nothing is fenced and nothing started: a logged refusal, tried
/// again by the state machine. A host whose fence is pending is not fenced again: an operator
/// confirms it off. None is fenced twice: not a host the log shows fenced since the twin
/// started (another node's job, or this one before a crash, did it). On success each of
/// `node`'s twins there is logged stopped, by the host's fence.
async fn stop_by_host_fence(
    env: &Env,
    node: &NodeConfig,
    epoch: u64,
    host: &str,
    error: &str,
    beats: &mut broadcast::Receiver<TwinBeat>,
) -> Result<(), JobEnd> {
    let node_name = node.name.as_str();
    let prefix = format!(
        "{host}'s hypervisor cannot be read ({error}), and a twin of {node_name} started there is not known to be stopped"
    );
    let ack = format!("`vigil fence {host} --ack-off --reason ...`");
    let refuse = |why: String| -> JobEnd {
        let why = format!("{prefix}; {why}");
        match env.log(
            node_name,
            RecordKind::Refusal,
            Some(epoch),
            why.clone(),
            json!({ "host": host, "error": error }),
        ) {
            Ok(()) => JobEnd::Stalled(why),
            Err(e) => e,
        }
    };
    let pending = {
        let j = env.journal.lock().unwrap_or_else(|p| p.into_inner());
        fencing::state_of(j.records(), host).pending
    };
    if pending {
        return Err(refuse(format!(
            "{host}'s fence is pending (not confirmed off): no twin is started elsewhere until an operator confirms it off ({ack})"
        )));
    }
    let judged = || {
        env.host_judged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .cloned()
            .unwrap_or_else(|| HostJudged::NotFailed("not judged yet".into()))
    };
    let failed = match judged() {
        HostJudged::Failed(why) => why,
        HostJudged::NotFailed(why) => {
            return Err(refuse(format!(
                "{host} itself is not judged failed ({why}), so it is not fenced: no twin is started elsewhere until that twin is confirmed stopped (its hypervisor answering again, or {host} confirmed off: {ack})"
            )));
        }
    };
    // Every node whose twin may run there: one still heartbeating runs, whatever its host's
    // hypervisor says, and its host is not fenced under it.
    let there_nodes: std::collections::HashSet<String> = {
        let j = env.journal.lock().unwrap_or_else(|p| p.into_inner());
        env.cfg
            .nodes
            .iter()
            .filter(|n| {
                crate::journal::twins_may_run(j.records(), &n.name)
                    .values()
                    .any(|h| h == host)
            })
            .map(|n| n.name.clone())
            .collect()
    };
    let beating = |b: &TwinBeat| {
        format!(
            "{host} is judged failed ({failed}), but {}'s twin there still heartbeats (epoch {}): {host} is not fenced under a running twin, and no other twin is started",
            b.node, b.epoch
        )
    };
    let silent_until = tokio::time::Instant::now() + node.policy.heartbeat_timeout();
    loop {
        match tokio::time::timeout_at(silent_until, beats.recv()).await {
            Ok(Ok(b)) if there_nodes.contains(&b.node) => return Err(refuse(beating(&b))),
            Ok(Ok(_)) => continue,
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                return Err(refuse(format!(
                    "{n} twin heartbeats were missed while listening for silence: {host} is not fenced on that"
                )));
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err(refuse("the appliance is stopping".into()));
            }
            Err(_) => break,
        }
    }
    let _one_at_a_time = env.host_fence.lock().await;
    let there: Vec<String> = {
        let j = env.journal.lock().unwrap_or_else(|p| p.into_inner());
        crate::journal::twins_may_run(j.records(), node_name)
            .into_iter()
            .filter(|(_, h)| h == host)
            .map(|(vm, _)| vm)
            .collect()
    };
    if there.is_empty() {
        // Fenced meanwhile (by another node's job), or acknowledged off by an operator.
        return Ok(());
    }
    // The evidence again, now that the lock is held (another host's fence may have taken long).
    let failed = match judged() {
        HostJudged::Failed(why) => why,
        HostJudged::NotFailed(why) => {
            return Err(refuse(format!(
                "{host} is no longer judged failed ({why}): it is not fenced"
            )));
        }
    };
    loop {
        match beats.try_recv() {
            Ok(b) if there_nodes.contains(&b.node) => return Err(refuse(beating(&b))),
            Ok(_) => continue,
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(_) => {
                return Err(refuse(
                    "twin heartbeats could not be read to the end: it is not fenced".into(),
                ));
            }
        }
    }
    let why = format!(
        "{host} is judged failed ({failed}) and its hypervisor cannot be read ({error}); {} of {node_name} started there and not known stopped: {host} is fenced so that nothing it ran runs on",
        there.join(", ")
    );
    tracing::error!(node = %node_name, host = %host, twins = ?there, "fencing a failed host so its twins count stopped");
    let outcome = fence_node(env, host, None, &why).await;
    if matches!(
        outcome,
        Ok(FenceOutcome::Confirmed { .. } | FenceOutcome::Pending { .. })
    ) {
        env.fenced_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string());
    }
    match outcome {
        Ok(FenceOutcome::Confirmed { .. }) => {}
        Ok(FenceOutcome::Pending { .. }) => {
            return Err(refuse(format!(
                "{host}'s fence is pending (not confirmed off): no twin is started elsewhere until it is, or until an operator confirms it off ({ack})"
            )));
        }
        Err(e) => {
            return Err(refuse(format!(
                "{host}'s fence failed ({e}): no twin is started elsewhere"
            )));
        }
    }
    // Whatever the fenced host's twins sent before it went off is not the replacement's.
    *beats = beats.resubscribe();
    for vm in there {
        env.log(
            node_name,
            RecordKind::VmStopped,
            twin_epoch(&vm, node_name),
            format!("{vm} on {host} counts stopped: {host} was fenced, confirmed off"),
            json!({ "vm": vm, "host": host, "by_host_fence": true }),
        )?;
    }
    Ok(())
}

/// Fails `node` back from its twin of `epoch`: stop the twin, confirm, power the node on, wait
/// for its heartbeat.
pub async fn failback(
    env: &Env,
    node_name: &str,
    epoch: u64,
    replacement: bool,
) -> Result<(), String> {
    let vm = vm_name(node_name, epoch);
    let mut returns = env.returns.subscribe();
    let log = |kind, msg: String, detail| {
        env.log(node_name, kind, Some(epoch), msg, detail)
            .map_err(JobEnd::reason)
    };
    // The check belongs before anything moves: a failback resumed after a restart (its
    // FailbackBegin is in the log) may already have stopped the twin.
    let resumed = env
        .journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .records()
        .iter()
        .any(|r| {
            r.node.as_deref() == Some(node_name)
                && r.kind == RecordKind::FailbackBegin
                && r.epoch == Some(epoch)
        });
    if !resumed {
        check_the_server_in_place(env, node_name, epoch, replacement).await?;
    }
    log(
        RecordKind::FailbackBegin,
        format!("failback of {node_name} begins: stopping {vm} first"),
        json!({ "vm": vm }),
    )?;
    // Stop the twin wherever it runs, and confirm it stopped, before anything else.
    for (host, hv) in &env.hypervisors {
        let s = hv.status(&vm).await;
        if matches!(s, VmState::Absent) {
            continue;
        }
        hv.stop(&vm, STOP_GRACE).await.map_err(|e| e.to_string())?;
        let after = hv.status(&vm).await;
        if !matches!(after, VmState::Stopped | VmState::Absent) {
            return Err(format!(
                "{vm} on {host} still reads {after:?}: the node is not powered on"
            ));
        }
        log(
            RecordKind::VmStopped,
            format!("{vm} stopped on {host} (read back {after:?})"),
            json!({ "vm": vm, "host": host }),
        )?;
        let _removed = hv.destroy(&vm).await;
    }
    env.placed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| p.node != node_name);
    let bmc = env
        .bmcs
        .get(node_name)
        .cloned()
        .ok_or("no BMC to power the node on")?;
    log(
        RecordKind::PowerOn,
        format!("powering {node_name} on"),
        serde_json::Value::Null,
    )?;
    let _ = env.power_requested.send((node_name.to_string(), true));
    let mut tries = 0;
    loop {
        match bmc.power(PowerAction::On).await {
            Ok(_) => break,
            Err(e) if e.is_transient() && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("power on failed: {e}")),
        }
    }
    let deadline = tokio::time::Instant::now() + RETURN_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, returns.recv()).await {
            Ok(Ok((n, _))) if n == node_name => break,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            _ => {
                return Err(format!(
                    "{node_name} did not heartbeat within {} s of its power-on",
                    RETURN_TIMEOUT.as_secs()
                ));
            }
        }
    }
    log(
        RecordKind::FailbackDone,
        format!("{node_name} heartbeats again: failback complete"),
        serde_json::Value::Null,
    )?;
    Ok(())
}
