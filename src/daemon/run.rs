//! `vigil run`: the appliance. One tokio runtime; the monitor, the state machines, the jobs, the
//! API; systemd's readiness and watchdog; SIGTERM and SIGHUP.
//!
//! Overview: on start the fencing log is opened (exclusively) and replayed, and the hypervisors
//! are listed, so that every node starts in the phase the log and the real world say it is in:
//! an interrupted fence is resumed by reading the BMC, a twin that runs is adopted, a failback
//! half done is finished. Then the loop: observations feed the monitor; every tick the monitor's
//! verdicts feed the state machines, the rack's gate grants failovers within the storm guard,
//! and the actions run as jobs (at most one per node). READY=1 goes to systemd once every
//! machine has had a first full BMC read; WATCHDOG=1 is sent from a task inside the runtime, so
//! a stalled runtime stops it. SIGTERM records the jobs in flight and stops (they resume on the
//! next start); SIGHUP reloads the policy from a configuration that validates, and keeps the old
//! one otherwise.
//!
//! Key types: [`Options`], [`run`], [`Status`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{self, Config, HypervisorDriver, Mode};
use crate::daemon::jobs::{self, Env, HostJudged, JobEnd};
use crate::diagnosis::{Diagnosis, Kind, Observation};
use crate::journal::{Journal, Record, RecordKind};
use crate::model::Millis;
use crate::monitor::{self, Monitor};
use crate::supervisor::fsm::{Action, Deadlines, Input, Node, Phase, Physical, Rack, Step};
use crate::virt::qemu::{NetMode, QemuDriver, probe_accel};
use crate::virt::spec::CpuTable;
use crate::virt::{Hypervisor, VmState};

/// How `vigil run` is started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Stop after this long (tests, the demo); until a signal otherwise.
    pub stop_after: Option<Duration>,
    /// The QEMU binary (default `qemu-system-x86_64`).
    pub qemu: Option<PathBuf>,
    /// Stops the appliance when cancelled (the demo, tests).
    pub stop: Option<CancellationToken>,
}

/// What an operator (the API) asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Maintenance on or off.
    Maintenance(String, bool),
    /// Fail over now.
    Failover(String),
    /// Fail back now.
    Failback(String),
    /// Fail back now, to the server now in the node's place even if its hardware differs from
    /// the recorded profile (a replacement): the differences are logged and the profile
    /// recorded anew.
    FailbackReplacement(String),
    /// Fence now and leave the node off, in maintenance (no failover).
    Fence(String),
    /// The node is off, on an operator's word.
    AckOff {
        /// The node.
        node: String,
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
    /// Move a node's running twin to another host.
    Move {
        /// The node.
        node: String,
        /// The failover or backup server it goes to.
        to: String,
    },
    /// Pause all automation.
    Pause,
    /// Resume automation.
    Resume,
}

/// One node as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// Whether it is a failover/backup server.
    pub host: bool,
    /// State name (healthy, fencing, running-virtual, ...).
    pub state: String,
    /// The phase with its data.
    pub phase: Phase,
    /// The current diagnosis.
    pub diagnosis: Option<Diagnosis>,
}

/// A host as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// Its name.
    pub name: String,
    /// Failover or backup.
    pub role: config::HostRole,
    /// Capacity.
    pub capacity: config::Capacity,
    /// Twins on it.
    pub twins: Vec<crate::placement::Placed>,
    /// Pre-created twins waiting on it, paused (counted against its capacity too).
    pub standby: Vec<crate::placement::Placed>,
    /// Healthy.
    pub healthy: bool,
}

/// The whole status.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    /// Nodes and hosts.
    pub nodes: Vec<NodeStatus>,
    /// Hosts and their load.
    pub hosts: Vec<HostStatus>,
    /// Automation paused.
    pub paused: bool,
    /// Observe or act.
    pub mode: String,
    /// Whether the first full poll of every machine is done.
    pub ready: bool,
    /// Heartbeats refused (forged, replayed, malformed).
    pub heartbeats_refused: u64,
    /// Heartbeats accepted.
    pub heartbeats_accepted: u64,
    /// The rebalance move placement proposes now (a failover server past its load mark and a
    /// backup server that can take one of its twins), made by `vigil rebalance`, or by itself
    /// with `rebalance = "auto"` once it has stood for `rebalance_after`.
    pub rebalance: Option<crate::placement::Move>,
}

/// Shared between the loop and the API.
#[derive(Debug)]
pub struct Shared {
    /// The status, rebuilt every tick.
    pub status: RwLock<Status>,
    /// Every fencing-log record as it is written (the event stream).
    pub events: broadcast::Sender<Record>,
    /// Commands to the loop.
    pub commands: mpsc::Sender<Command>,
    /// Metrics.
    pub metrics: Arc<crate::api::metrics::Metrics>,
}

/// How often each running twin's state is read back from its hypervisor.
const TWIN_CHECK: Duration = Duration::from_secs(2);
/// Observations are taken as they come, but a pass over the rack (verdicts, the machines, the
/// status) runs at most this often on their account: at 10,000 nodes they arrive 15,000 times a
/// second, and a pass per observation would spend the appliance on passes. The delay this adds
/// to a verdict is at most this, against detection targets of seconds.
const PASS_EVERY: Duration = Duration::from_millis(20);
/// Queued observations are taken in batches of this many...
const OBS_BATCH: usize = 4096;
/// ... for at most this long before a pass may run.
const OBS_DRAIN_MAX: Duration = Duration::from_millis(200);
/// The whole status is rebuilt at least this often (in between, only the nodes a pass touched).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What a job reports back.
#[derive(Debug)]
enum JobResult {
    Progress(String, Step),
    Failover(String, Result<String, JobEnd>),
    Failback(String, Result<(), String>),
    Other(String, Result<(), String>),
    /// A running twin read back as not running: (node, epoch, host, since when that twin ran
    /// there, what it read).
    TwinLost(String, u64, String, Millis, String),
    /// A pre-created twin: (node, its reserved epoch, the host it waits on or why not).
    Standby(String, u64, Result<String, String>),
    /// A pre-created twin read back: (node, epoch, what was read where it is not paused; empty
    /// when it waits as it should).
    StandbyCheck(String, u64, String),
    /// A refence (a node powered on beside its twin) ended.
    Refenced(String, Result<(), String>),
    /// A move of a running twin ended: (node, where it was to go, how it ended).
    Moved(String, String, jobs::MoveEnd),
}

/// How often each pre-created twin is read back from its hypervisor.
const STANDBY_CHECK: Millis = 10_000;

/// How long after a failed pre-creation the next one is tried.
const STANDBY_RETRY: Millis = 60_000;

/// How long a move that did not end where it was to go is not proposed again.
const REBALANCE_RETRY: Millis = 600_000;

/// Append one record to the fencing log. The journal's listener (set in `run`) forwards it to
/// the event stream and the metrics, so this does not send it anywhere itself.
/// Every BMC keeps a connection open (and an IPMI socket where configured): a big rack needs
/// more descriptors than a shell's default soft limit of 1,024. The soft limit is raised to the
/// hard one, as Go's runtime does at start (the unit sets `LimitNOFILE=`); a hard limit too low
/// for the rack is said at once, not discovered as connection errors.
fn raise_open_files(machines: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let need = machines as u64 * 2 + 256;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= need {
        return;
    }
    let now = if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if now < need {
        tracing::warn!(
            open_files = now,
            needed = need,
            machines,
            "the open-file limit is too low for this many BMC connections: raise LimitNOFILE"
        );
    }
}

fn append(
    journal: &Arc<Mutex<Journal>>,
    node: Option<&str>,
    kind: RecordKind,
    epoch: Option<u64>,
    msg: String,
    detail: serde_json::Value,
) {
    if let Err(e) = journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .append(node, kind, epoch, msg, detail)
    {
        tracing::error!(error = %e, "the fencing log cannot be written: no action will be taken until it can")
    }
}

/// Rebuilds each node's phase from the fencing log and the hypervisors. Returns the phases and
/// the jobs to resume.
/// What `recover` found: the nodes' phases, the jobs to resume, what it says of them, and the
/// pre-created twins still waiting (node → reserved epoch and host).
type Recovered = (
    BTreeMap<String, Node>,
    Vec<Action>,
    Vec<String>,
    BTreeMap<String, (u64, String)>,
);

/// Whether a failover or backup server may be fenced (so that its twins count stopped), by its
/// verdict `d`, the policy, and how long it has been judged isolated (`isolated_for`, ms): as a
/// node would be fenced by default (an isolation only past its grace, a hang only when the
/// policy acts on hangs, nothing in observe mode; dark, BMC lost and appliance-isolated never).
fn judge_host(d: &Diagnosis, policy: &config::Policy, isolated_for: Millis) -> HostJudged {
    let name = d.kind.name();
    if !d.kind.fences() {
        return HostJudged::NotFailed(format!("judged {name}"));
    }
    if policy.mode != Mode::Act {
        return HostJudged::NotFailed(format!("judged {name}, but the appliance only observes"));
    }
    let grace = policy.isolation_grace.as_millis() as Millis;
    if d.kind == Kind::Isolated && isolated_for < grace {
        return HostJudged::NotFailed(format!(
            "judged isolated for {} s, within its grace of {} s",
            isolated_for / 1000,
            grace / 1000
        ));
    }
    if d.kind == Kind::SoftwareHang && policy.on_software_hang == config::HangAction::Alert {
        return HostJudged::NotFailed(format!(
            "judged {name}, and the policy only alerts on a hang"
        ));
    }
    HostJudged::Failed(format!("judged {name}: {}", d.why))
}

/// A job's progress, said to the run loop as `node`'s.
fn progress_to(
    jtx: &mpsc::UnboundedSender<JobResult>,
    node: &str,
) -> impl Fn(Step) + Send + Sync + 'static {
    let (jtx, node) = (jtx.clone(), node.to_string());
    move |s: Step| {
        let _ = jtx.send(JobResult::Progress(node.clone(), s));
    }
}

/// Whether a node's twin found running after a restart is still booting, by the node's records
/// since its failover began: no heartbeat since, or a twin started after the last heartbeat (a
/// replacement, a move) that has not heartbeat yet. A booting twin is waited for (the failover's
/// boot timeout); one taken for running would be lost after twice the heartbeat timeout.
fn twin_booting(since_begin: &[&Record]) -> bool {
    let last = |k: RecordKind| since_begin.iter().rposition(|r| r.kind == k);
    match (last(RecordKind::VmStart), last(RecordKind::VmHeartbeat)) {
        (_, None) => true,
        (Some(s), Some(h)) => s > h,
        (None, Some(_)) => false,
    }
}

async fn recover(
    cfg: &Config,
    records: &[Record],
    hvs: &HashMap<String, Arc<dyn Hypervisor>>,
) -> Recovered {
    let mut nodes = BTreeMap::new();
    let mut resume = Vec::new();
    let mut notes = Vec::new();
    let mut running: HashMap<String, (String, u64)> = HashMap::new();
    // Paused twins by node: (host, epoch).
    let mut paused: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for (host, hv) in hvs {
        for (vm, s) in hv.list().await {
            if let Some(rest) = vm.strip_prefix("vigil-")
                && let Some((node, e)) = rest.rsplit_once("-e")
                && let Ok(e) = e.parse::<u64>()
                && matches!(s, VmState::Running | VmState::Paused)
            {
                if s == VmState::Paused {
                    // A paused twin runs nothing: it is not adopted as running (a failover
                    // interrupted before its fence resumes the fence, then resumes the twin).
                    paused
                        .entry(node.to_string())
                        .or_default()
                        .push((host.clone(), e));
                } else {
                    running.insert(node.to_string(), (host.clone(), e));
                }
            }
        }
    }
    let mut standby = BTreeMap::new();
    for n in &cfg.nodes {
        let mine: Vec<&Record> = records
            .iter()
            .filter(|r| r.node.as_deref() == Some(n.name.as_str()))
            .collect();
        let last = |k: RecordKind| mine.iter().rposition(|r| r.kind == k);
        let begin = last(RecordKind::FailoverBegin);
        let done = |k| last(k).is_some_and(|i| begin.is_some_and(|b| i > b));
        let phase = match begin {
            Some(b) if !done(RecordKind::FailbackDone) => {
                let epoch = mine[b].epoch.unwrap_or(0);
                if last(RecordKind::FailbackBegin).is_some_and(|i| i > b) {
                    notes.push(format!(
                        "{}: resuming an interrupted failback of epoch {epoch}",
                        n.name
                    ));
                    resume.push(Action::StartFailback {
                        node: n.name.clone(),
                        epoch,
                    });
                    Phase::FailingBack { epoch, since: 0 }
                } else if let Some((host, e)) = running.get(&n.name).filter(|(_, e)| *e == epoch) {
                    notes.push(format!(
                        "{0}: twin vigil-{0}-e{e} runs on {host}: adopted",
                        n.name
                    ));
                    if twin_booting(&mine[b..]) {
                        resume.push(Action::StartFailover {
                            node: n.name.clone(),
                            epoch,
                            fenced: true,
                            why: "resuming after a restart: waiting for the twin's heartbeat"
                                .into(),
                        });
                        Phase::Failover {
                            epoch,
                            step: Step::BootingVirtual,
                            since: 0,
                        }
                    } else {
                        Phase::RunningVirtual {
                            epoch,
                            host: host.clone(),
                            since: 0,
                        }
                    }
                } else {
                    let fs = crate::fencing::state_of(records, &n.name);
                    if fs.pending {
                        notes.push(format!(
                            "{}: fence pending (epoch {epoch}): waiting for an operator",
                            n.name
                        ));
                        Phase::FencePending { epoch }
                    } else if fs.off {
                        notes.push(format!(
                            "{}: fenced (epoch {epoch}), no twin runs: starting it",
                            n.name
                        ));
                        resume.push(Action::StartFailover {
                            node: n.name.clone(),
                            epoch,
                            fenced: true,
                            why: "resuming after a restart".into(),
                        });
                        Phase::Failover {
                            epoch,
                            step: Step::Placing,
                            since: 0,
                        }
                    } else {
                        notes.push(format!("{}: a fence of epoch {epoch} was interrupted: resuming it (the BMC is read before anything is sent)", n.name));
                        resume.push(Action::StartFailover {
                            node: n.name.clone(),
                            epoch,
                            fenced: false,
                            why: "resuming an interrupted fence after a restart".into(),
                        });
                        Phase::Failover {
                            epoch,
                            step: Step::Fencing,
                            since: 0,
                        }
                    }
                }
            }
            _ => {
                // A watched node's paused twin of an epoch above its last failover's is its
                // pre-created twin: its next failover resumes it (the highest, if several;
                // the others are removed by that failover).
                let last_failover = begin.and_then(|b| mine[b].epoch).unwrap_or(0);
                if let Some((host, e)) = paused.get(&n.name).and_then(|v| {
                    v.iter()
                        .filter(|(_, e)| *e > last_failover)
                        .max_by_key(|(_, e)| *e)
                }) {
                    notes.push(format!(
                        "{0}: pre-created twin vigil-{0}-e{e} waits, paused, on {host}",
                        n.name
                    ));
                    standby.insert(n.name.clone(), (*e, host.clone()));
                }
                Phase::Watching
            }
        };
        nodes.insert(n.name.clone(), Node::new(&n.name, phase));
    }
    (nodes, resume, notes, standby)
}

fn hypervisors(cfg: &Config, opts: &Options) -> HashMap<String, Arc<dyn Hypervisor>> {
    let mut out: HashMap<String, Arc<dyn Hypervisor>> = HashMap::new();
    for h in &cfg.hosts {
        match h.hypervisor {
            HypervisorDriver::Qemu => {
                out.insert(
                    h.name.clone(),
                    Arc::new(QemuDriver {
                        run_dir: cfg.appliance.state_dir.join("vms").join(&h.name),
                        binary: opts
                            .qemu
                            .clone()
                            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
                        net: NetMode::User,
                    }),
                );
            }
            HypervisorDriver::Libvirt => {
                out.insert(
                    h.name.clone(),
                    Arc::new(crate::virt::libvirt::LibvirtDriver::new(
                        &h.uri,
                        cfg.appliance.state_dir.join("vms").join(&h.name),
                        NetMode::User,
                    )),
                );
            }
        }
    }
    out
}

/// Runs the appliance until a signal (or `opts.stop_after`).
pub async fn run(path: &Path, opts: Options) -> anyhow::Result<()> {
    let (cfg, profiles, diags) = config::load(path)?;
    for d in diags.iter() {
        tracing::warn!(problem = %d.message, "configuration");
    }
    for m in cfg.machines() {
        if m.bmc
            .redfish
            .as_ref()
            .is_some_and(|r| r.trust == config::RedfishTrust::InsecureSkipVerify)
        {
            tracing::warn!(
                node = m.name,
                "insecure_skip_verify: this BMC's certificate is not verified"
            );
        }
    }
    let cfg = Arc::new(cfg);
    let journal = Arc::new(Mutex::new(
        Journal::open(&cfg.appliance.state_dir)
            .context("the fencing log cannot be used: vigil takes no action without it")?,
    ));
    let clock = Clock::start();
    let cancel = CancellationToken::new();
    let hvs = hypervisors(&cfg, &opts);
    let records = journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .records()
        .to_vec();
    let (nodes, resume, notes, standby) = recover(&cfg, &records, &hvs).await;
    let last_epoch = journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .last_epoch();
    let (events, _) = broadcast::channel(1024);
    {
        // Every record reaches the event stream (and the metrics) from the journal itself, job
        // records included.
        let tx = events.clone();
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_listener(Box::new(move |r| {
                let _listeners = tx.send(r.clone());
            }));
    }
    append(
        &journal,
        None,
        RecordKind::Start,
        None,
        format!(
            "vigil {} starts: {} nodes, {} hosts, mode {:?}; {}",
            env!("CARGO_PKG_VERSION"),
            cfg.nodes.len(),
            cfg.hosts.len(),
            cfg.policy.mode,
            if notes.is_empty() {
                "nothing to recover".to_string()
            } else {
                notes.join("; ")
            }
        ),
        json!({ "recovered": notes }),
    );

    let metrics = Arc::new(crate::api::metrics::Metrics::new());
    let observer: crate::bmc::paths::Observer = {
        let m = metrics.clone();
        Arc::new(move |node, protocol, took, ok| m.bmc_request(node, protocol, took, ok))
    };
    raise_open_files(cfg.machines().count());
    let mut src = monitor::start_sources(&cfg, &profiles, clock, &cancel, Some(observer))?;
    let mut mon = Monitor::new(&cfg, &src.hurry, clock.now());
    let mut rack = Rack::new(nodes, last_epoch);
    // Pre-created twins found at start wait for their nodes' failovers; with pre-creation off
    // in this configuration, they are removed (they never ran).
    let mut unwanted_standby = Vec::new();
    let mut kept_standby = HashMap::new();
    for (n, (e, host)) in standby {
        // Counted by placement like the twins that run, by the node's recorded profile (one
        // without a readable profile is removed: it could not be counted).
        let req = cfg.node(&n).and_then(jobs::recorded_request);
        match (cfg.policy.precreate_twins, req) {
            (true, Some(req)) => {
                rack.standby.insert(n.clone(), e);
                kept_standby.insert(n, (e, crate::placement::Placed::of(&req, &host)));
            }
            (false, _) => unwanted_standby.push((n, e, host, "pre-creation is off in this configuration")),
            (true, None) => unwanted_standby.push((n, e, host, "the node's recorded hardware profile cannot be read, so its size cannot be counted")),
        }
    }
    let mut policy = cfg.policy.clone();
    let deadlines = Deadlines::default();
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let (returns, _) = broadcast::channel(1024);
    // Shared, not copied: a job or an action takes a reference count, not the rack's maps
    // (at 10,000 nodes a copy per action was milliseconds, and a storm of refusals took seconds).
    // The nodes in an incident (failed over, or failing over or back): only they may run a
    // twin or have lost one, whatever an old record of a watched node says.
    let in_incident: Vec<&config::NodeConfig> = cfg
        .nodes
        .iter()
        .filter(|n| {
            rack.nodes
                .get(&n.name)
                .is_some_and(|x| !matches!(x.phase, Phase::Watching | Phase::Maintenance))
        })
        .collect();
    let env = Arc::new(Env {
        cfg: cfg.clone(),
        profiles: Arc::new(profiles),
        journal: journal.clone(),
        bmcs: src.bmcs.clone(),
        paths: src.paths.clone(),
        hypervisors: hvs,
        host_health: Arc::new(Mutex::new(HashMap::new())),
        // The twins the log says may run, where they run, whatever their node's phase (one
        // being failed back runs until it is stopped): counted by placement from the start.
        placed: Arc::new(Mutex::new(
            in_incident
                .iter()
                .filter_map(|n| {
                    let host = crate::journal::twins_may_run(&records, &n.name)
                        .into_iter()
                        .max_by_key(|(vm, _)| jobs::twin_epoch(vm, &n.name))?
                        .1;
                    jobs::recorded_request(n).map(|req| crate::placement::Placed::of(&req, &host))
                })
                .collect(),
        )),
        standby: Arc::new(Mutex::new(kept_standby)),
        host_judged: Arc::new(Mutex::new(HashMap::new())),
        claims: Arc::new(Mutex::new(std::collections::HashSet::new())),
        // A host the log shows fenced (off or pending) takes no twin until seen healthy again.
        fenced_hosts: Arc::new(Mutex::new(
            cfg.hosts
                .iter()
                .filter(|h| {
                    let f = crate::fencing::state_of(&records, &h.name);
                    f.off || f.pending
                })
                .map(|h| h.name.clone())
                .collect(),
        )),
        // Where each node's twin died in its current incident, by the log (the last one): its
        // twins are not placed there again until it fails back, across restarts too.
        avoid: Arc::new(Mutex::new(
            in_incident
                .iter()
                .filter_map(|n| {
                    let mine: Vec<&Record> = records
                        .iter()
                        .filter(|r| r.node.as_deref() == Some(n.name.as_str()))
                        .collect();
                    let begin = mine
                        .iter()
                        .rposition(|r| r.kind == RecordKind::FailoverBegin)?;
                    let lost = mine[begin..]
                        .iter()
                        .rev()
                        .find(|r| r.kind == RecordKind::TwinLost)?;
                    Some((n.name.clone(), lost.detail["host"].as_str()?.to_string()))
                })
                .collect(),
        )),
        host_fence: Arc::new(tokio::sync::Mutex::new(())),
        twins: src.twins.clone(),
        returns: returns.clone(),
        clock,
        cpu_table: Arc::new(CpuTable::builtin()),
        accel: probe_accel(),
        power_requested: ptx,
    });
    let (ctx, mut crx) = mpsc::channel(64);
    let shared = Arc::new(Shared {
        status: RwLock::new(Status::default()),
        events: events.clone(),
        commands: ctx,
        metrics,
    });
    let api_task = crate::api::serve(cfg.clone(), shared.clone(), cancel.child_token()).await?;

    // The systemd watchdog is pinged from a task of this runtime: if the runtime stalls, the
    // pings stop and systemd restarts us.
    let beat = Arc::new(AtomicU64::new(0));
    if let Some(wd) = sd_notify::watchdog_enabled() {
        let c = cancel.child_token();
        let beat = beat.clone();
        src.tasks.spawn(async move {
            let mut t = tokio::time::interval(wd / 2);
            loop {
                tokio::select! { _ = c.cancelled() => return, _ = t.tick() => {} }
                beat.fetch_add(1, Ordering::Relaxed);
                let _not_systemd = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }

    let (jtx, mut jrx) = mpsc::unbounded_channel::<JobResult>();
    let mut jobs: JoinSet<()> = JoinSet::new();
    for (n, e, host, why) in unwanted_standby {
        let (env, jtx) = (env.clone(), jtx.clone());
        jobs.spawn(async move {
            let r = jobs::remove_standby(&env, &n, e, &host, why).await;
            let _ = jtx.send(JobResult::Other(n, r));
        });
    }
    let mut pending: Vec<Action> = resume;
    let mut first_full: std::collections::HashSet<String> = std::collections::HashSet::new();
    let machines = cfg.machines().count();
    let mut ready = false;
    let mut tick = tokio::time::interval(monitor::TICK);
    let mut last_pass = tokio::time::Instant::now();
    let mut pass_due = false;
    let mut status_built: Option<tokio::time::Instant> = None;
    // A command or a job result moved a node: the next status is rebuilt whole.
    let mut status_full = true;
    // Where each machine is in the status' node list.
    let status_pos: HashMap<String, usize> = cfg
        .machines()
        .enumerate()
        .map(|(i, m)| (m.name.to_string(), i))
        .collect();
    let mut last_twin_check: Millis = 0;
    // The last heartbeat of each node's twin: (epoch, when).
    let mut twin_beats: HashMap<String, (u64, Millis)> = HashMap::new();
    let mut twin_rx = env.twins.subscribe();
    let mut twin_checks: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Pre-creations in flight, and when a failed one may be tried again.
    let mut standby_jobs: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Pre-creations in flight whose node has had a failover since (its twin is of no use:
    // the node's epochs went past it).
    let mut standby_stale: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut standby_retry: HashMap<String, Millis> = HashMap::new();
    let mut last_standby_check: Millis = 0;
    let mut standby_checks: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Nodes being fenced again (powered on beside their twin): one refence at a time.
    let mut refencing: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Since when each failover or backup server has been judged isolated (its grace).
    let mut host_isolated_since: HashMap<String, Millis> = HashMap::new();
    // The rebalance move placement proposes, and since when it has stood unchanged.
    let mut proposal: Option<(crate::placement::Move, Millis)> = None;
    // Moves that ended elsewhere than asked (node, destination): when last, and how many times
    // in a row. Not proposed again for REBALANCE_RETRY, doubled at each failure (16 times at
    // most): a move that keeps failing stops the workload ever more rarely.
    let mut failed_moves: HashMap<(String, String), (Millis, u32)> = HashMap::new();
    // Nodes whose next failback moves to a replacement server, accepted by an operator.
    let mut accept_profile: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let deadline = opts.stop_after.map(|d| tokio::time::Instant::now() + d);
    let external_stop = opts.stop.clone().unwrap_or_default();
    tracing::info!(nodes = cfg.nodes.len(), hosts = cfg.hosts.len(), api = %cfg.appliance.api_listen, heartbeats = %cfg.appliance.heartbeat_listen, "vigil runs");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = external_stop.cancelled() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = hup.recv() => {
                match config::load(path) {
                    Ok((new, _, _)) => {
                        policy = new.policy.clone();
                        // `rebalance_after` counts from now under the new policy.
                        if let Some((_, since)) = proposal.as_mut() {
                            *since = clock.now();
                        }
                        append(&journal, None, RecordKind::Operator, None, "configuration reloaded (SIGHUP): the new policy is in force; node and host changes take effect at the next start".into(), serde_json::Value::Null);
                    }
                    Err(e) => {
                        let detail = match &e { config::ConfigError::Invalid { diagnostics, .. } => diagnostics.to_string(), other => other.to_string() };
                        tracing::error!(error = %e, "SIGHUP: the new configuration is invalid and was refused; the old one stays");
                        append(&journal, None, RecordKind::Operator, None, format!("SIGHUP: new configuration refused ({e}); the old one stays"), json!({ "problems": detail }));
                    }
                }
            }
            _ = tokio::time::sleep_until(last_pass + PASS_EVERY), if pass_due => {}
            o = src.rx.recv() => {
                let Some(first) = o else { break };
                // Everything queued is taken now; the pass that reads it runs at its pace.
                let mut next = Some(first);
                let mut taken = 0usize;
                let drain_started = std::time::Instant::now();
                while let Some((node, obs)) = next.take() {
                    if let Observation::Heartbeat { at, .. } = &obs {
                        let _listeners = returns.send((node.clone(), *at));
                    }
                    // (Latency and errors per path are counted by the paths' observer.)
                    if let Observation::Bmc { result: Ok(s), .. } = &obs && s.full && !first_full.contains(&node) {
                        first_full.insert(node.clone());
                    }
                    mon.observe(&node, obs);
                    taken += 1;
                    // Everything already queued is taken before a pass judges anyone: a pass
                    // that ran ahead of queued heartbeats would see them as lost. (Bounded, so
                    // a flood cannot starve the passes.)
                    if taken % OBS_BATCH != 0 || drain_started.elapsed() < OBS_DRAIN_MAX {
                        next = src.rx.try_recv().ok();
                    }
                }
                if last_pass.elapsed() < PASS_EVERY {
                    pass_due = true;
                    continue;
                }
            }
            Some((node, on)) = prx.recv() => {
                mon.observe(&node, Observation::PowerRequested { at: clock.now(), on });
            }
            Some(r) = jrx.recv() => {
                status_full = true;
                let now = clock.now();
                let (node, input) = match r {
                    JobResult::Progress(n, s) => (n, Input::Progress(s)),
                    JobResult::Failover(n, Ok(host)) => (n, Input::FailoverDone { host }),
                    JobResult::Failover(n, Err(JobEnd::FencePending)) => (n, Input::FencePending),
                    JobResult::Failover(n, Err(JobEnd::Stalled(reason))) => (n, Input::FailoverStalled { reason }),
                    JobResult::Failback(n, Ok(())) => {
                        env.avoid.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
                        (n, Input::FailbackDone)
                    }
                    JobResult::Failback(n, Err(reason)) => {
                        // How far it went, by the log: the twin still running, or stopped with
                        // the node still fenced, or the node powered on.
                        let (twin_running, fence_holds) = {
                            let j = journal.lock().unwrap_or_else(|p| p.into_inner());
                            (
                                crate::journal::twin_running(j.records(), &n),
                                crate::fencing::state_of(j.records(), &n).off,
                            )
                        };
                        (n, Input::FailbackFailed { reason, twin_running, fence_holds })
                    }
                    JobResult::Moved(n, to, end) => {
                        // A move that did not end where it was to go is not proposed again for a
                        // while: the rebalance would only stop the same workload again.
                        if matches!(&end, jobs::MoveEnd::Runs(h) if *h == to) {
                            failed_moves.remove(&(n.clone(), to));
                        } else {
                            let e = failed_moves.entry((n.clone(), to)).or_insert((now, 0));
                            *e = (now, e.1.saturating_add(1));
                        }
                        match end {
                            jobs::MoveEnd::Runs(host) => (n, Input::TwinMoved { host }),
                            jobs::MoveEnd::Stalled(JobEnd::FencePending) => (n, Input::FencePending),
                            jobs::MoveEnd::Stalled(JobEnd::Stalled(reason)) => (n, Input::FailoverStalled { reason }),
                        }
                    }
                    JobResult::Refenced(n, r) => {
                        refencing.remove(&n);
                        if let Err(e) = r { tracing::error!(node = %n, error = %e, "the refence failed: tried again while the node reads on"); }
                        continue;
                    }
                    JobResult::Other(n, r) => {
                        if let Err(e) = r { tracing::error!(node = %n, error = %e, "job failed"); }
                        continue;
                    }
                    JobResult::Standby(n, epoch, r) => {
                        standby_jobs.remove(&n);
                        let stale = standby_stale.remove(&n);
                        match r {
                            Ok(host) => {
                                let watching = matches!(rack.nodes.get(&n).map(|x| &x.phase), Some(Phase::Watching));
                                if watching && !stale && !rack.standby.contains_key(&n) {
                                    tracing::info!(node = %n, epoch, host = %host, "pre-created twin waits, paused");
                                    rack.standby.insert(n, epoch);
                                } else {
                                    // The node moved on while its twin was being made (a failover
                                    // took a fresh epoch): that twin never runs.
                                    let env = env.clone();
                                    let jtx = jtx.clone();
                                    jobs.spawn(async move {
                                        let r = jobs::remove_standby(&env, &n, epoch, &host, "the node's failover began while it was being made, under a fresh epoch").await;
                                        let _ = jtx.send(JobResult::Other(n, r));
                                    });
                                }
                            }
                            Err(e) => {
                                tracing::warn!(node = %n, epoch, error = %e, "no pre-created twin");
                                standby_retry.insert(n.clone(), now + STANDBY_RETRY);
                                append(&journal, Some(&n), RecordKind::Refusal, Some(epoch), format!("{n}: no pre-created twin ({e}); a failover would start one cold; tried again in {} s", STANDBY_RETRY / 1000), json!({ "error": e }));
                            }
                        }
                        continue;
                    }
                    JobResult::StandbyCheck(n, epoch, read) => {
                        standby_checks.remove(&n);
                        let counted = env.standby.lock().unwrap_or_else(|p| p.into_inner()).get(&n).is_some_and(|(e, _)| *e == epoch);
                        if rack.standby.get(&n) == Some(&epoch) && !counted {
                            // Removed to make room for another node's failover (logged
                            // then): a new one is made where there is room.
                            rack.standby.remove(&n);
                            continue;
                        }
                        if !read.is_empty() && rack.standby.get(&n) == Some(&epoch) {
                            env.forget_standby(&n, epoch);
                            // Its host lost power, or its QEMU died: a failover would start
                            // cold. Dropped, and a new one made (what is left of it is cleared
                            // by the node's next failover).
                            rack.standby.remove(&n);
                            tracing::warn!(node = %n, epoch, read = %read, "the pre-created twin is gone");
                            append(&journal, Some(&n), RecordKind::VmStopped, Some(epoch), format!("{n}'s pre-created twin vigil-{n}-e{epoch} is not waiting any more ({read}): dropped; a new one is made"), json!({ "read": read, "paused": true }));
                        }
                        continue;
                    }
                    JobResult::TwinLost(n, epoch, host, ran_since, read) => {
                        twin_checks.remove(&n);
                        // Only if it is still that twin that is supposed to run: the same epoch
                        // on another host, or started there again since (a move that came back),
                        // is another twin.
                        let current = matches!(rack.nodes.get(&n).map(|x| &x.phase), Some(Phase::RunningVirtual { epoch: e, host: h, since }) if *e == epoch && *h == host && *since == ran_since);
                        if !current || read.is_empty() {
                            continue;
                        }
                        tracing::error!(node = %n, epoch, host = %host, state = %read, "the twin is not running: it is stopped and replaced on another host");
                        append(&journal, Some(&n), RecordKind::TwinLost, Some(epoch), format!("{n}'s twin on {host} reads back {read}: it is stopped and replaced on another host"), json!({ "host": host, "state": read }));
                        env.placed.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| p.node != n);
                        env.avoid.lock().unwrap_or_else(|p| p.into_inner()).insert(n.clone(), host.clone());
                        (n, Input::TwinLost { reason: format!("twin on {host} reads back {read}") })
                    }
                };
                if let Some(x) = rack.nodes.get_mut(&node) {
                    pending.extend(x.step(input, now, &policy, &deadlines));
                    // Back on its twin after a failback that did not go through: the twin is
                    // watched again on the host it runs on.
                    if let Phase::RunningVirtual { host, .. } = &mut x.phase
                        && host.is_empty()
                        && let Some(p) = env.placed.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|p| p.node == node)
                    {
                        *host = p.host.clone();
                    }
                }
            }
            Some(c) = crx.recv() => {
                status_full = true;
                let now = clock.now();
                let act = |n: &str, i: Input, rack: &mut Rack| rack.nodes.get_mut(n).map(|x| x.step(i, now, &policy, &deadlines)).unwrap_or_default();
                match c {
                    Command::Pause => { rack.paused = true; append(&journal, None, RecordKind::Operator, None, "automation paused by an operator".into(), serde_json::Value::Null); }
                    Command::Resume => { rack.paused = false; append(&journal, None, RecordKind::Operator, None, "automation resumed by an operator".into(), serde_json::Value::Null); }
                    Command::Maintenance(n, on) => {
                        append(&journal, Some(&n), RecordKind::Operator, None, format!("{n}: maintenance {}", if on { "on" } else { "off" }), serde_json::Value::Null);
                        pending.extend(act(&n, Input::Maintenance(on), &mut rack));
                    }
                    Command::Failover(n) => pending.extend(act(&n, Input::FailoverNow, &mut rack)),
                    Command::Move { node, to } => {
                        if refencing.contains(&node) {
                            append(&journal, Some(&node), RecordKind::Refusal, None, format!("move of {node}'s twin to {to} refused: {node} is being fenced again (it came on beside its twin); ask again once it reads off"), json!({ "to": to }));
                        } else if cfg.hosts.iter().any(|h| h.name == to) {
                            append(&journal, Some(&node), RecordKind::Operator, None, format!("{node}: move of its twin to {to} requested by an operator"), json!({ "to": to }));
                            pending.extend(act(&node, Input::Move { to, why: "asked by an operator".into() }, &mut rack));
                        } else {
                            append(&journal, Some(&node), RecordKind::Refusal, None, format!("move of {node}'s twin to {to} refused: {to} is not a failover or backup server"), json!({ "to": to }));
                        }
                    }
                    Command::Failback(n) => pending.extend(act(&n, Input::FailbackNow, &mut rack)),
                    Command::FailbackReplacement(n) => {
                        append(&journal, Some(&n), RecordKind::Operator, None, format!("{n}: failback to the server now in its place requested, its hardware accepted even where it differs from the recorded profile"), serde_json::Value::Null);
                        let acts = act(&n, Input::FailbackNow, &mut rack);
                        // The acceptance goes with this failback only (a refused request
                        // leaves none behind for a later one).
                        if acts.iter().any(|a| matches!(a, Action::StartFailback { node, .. } if *node == n)) {
                            accept_profile.insert(n.clone());
                        }
                        pending.extend(acts);
                    }
                    Command::Fence(n) => {
                        // Only a node nothing else acts on: one action per node at a time.
                        let idle = matches!(rack.nodes.get(&n).map(|x| &x.phase), Some(Phase::Watching | Phase::Maintenance));
                        if idle {
                            append(&journal, Some(&n), RecordKind::Operator, None, format!("{n}: fence requested by an operator; it goes to maintenance, so automation leaves it off (no failover)"), serde_json::Value::Null);
                            pending.extend(act(&n, Input::Maintenance(true), &mut rack));
                            let env = env.clone();
                            let jtx = jtx.clone();
                            jobs.spawn(async move {
                                let r = match jobs::fence_node(&env, &n, None, "operator").await {
                                    Ok(crate::fencing::FenceOutcome::Confirmed { .. }) => Ok(()),
                                    Ok(crate::fencing::FenceOutcome::Pending { .. }) => Err("fence pending: not confirmed off".to_string()),
                                    Err(e) => Err(e.to_string()),
                                };
                                let _ = jtx.send(JobResult::Other(n, r));
                            });
                        } else {
                            append(&journal, Some(&n), RecordKind::Refusal, None, format!("{n}: operator fence refused: the node is busy (a failover or failback is in progress, or it runs virtual); put it in maintenance when that is done"), serde_json::Value::Null);
                        }
                    }
                    Command::AckOff { node, by, reason } => {
                        let epoch = match rack.nodes.get(&node).map(|x| &x.phase) { Some(Phase::FencePending { epoch }) => Some(*epoch), _ => None };
                        if let Err(e) = crate::fencing::ack_off(&journal, &node, &by, &reason, epoch) {
                            tracing::error!(error = %e, "ack-off could not be logged");
                        } else {
                            pending.extend(act(&node, Input::AckOff, &mut rack));
                        }
                    }
                }
            }
            r = twin_rx.recv() => {
                // (Lagged: some beats were skipped, the next ones count; the sender lives in
                // `env` as long as this loop.)
                if let Ok(b) = r {
                    twin_beats.insert(b.node.clone(), (b.epoch, b.at));
                }
            }
            _ = tick.tick() => {
                // Twins are watched like nodes: every TWIN_CHECK, each running twin's state is
                // read back from its hypervisor (one check in flight per node), and a twin
                // whose heartbeats stopped (a hung guest, a cut link, while QEMU still runs) is
                // lost too.
                let now = clock.now();
                if now.saturating_sub(last_twin_check) >= TWIN_CHECK.as_millis() as Millis {
                    last_twin_check = now;
                    let c = mon.counts;
                    tracing::debug!(passes = c.passes, evaluations = c.evaluations, whole_rack = c.whole_rack, sleeping = mon.sleeping(), "monitor");
                    // Rebalancing: what placement proposes now, among twins whose node only
                    // runs virtual (no job under way) and hosts judged healthy; made here once it
                    // has stood for `rebalance_after` with `rebalance = "auto"`, one move at a
                    // time, and never while any node is in the middle of a failover, a fence or
                    // a failback (a move is planned work: it waits for a calm rack).
                    let blocked = |n: &str, to: &str| {
                        failed_moves.get(&(n.to_string(), to.to_string())).is_some_and(|(at, times)| {
                            now.saturating_sub(*at) < REBALANCE_RETRY << (times.saturating_sub(1)).min(4)
                        })
                    };
                    let fresh = env.rebalance_proposal(
                        // (Not a node being fenced again: it came on beside its twin; nor a move
                        // that failed lately.)
                        &|p, to| !refencing.contains(&p.node) && !blocked(&p.node, to) && matches!(rack.nodes.get(&p.node).map(|x| &x.phase), Some(Phase::RunningVirtual { host, .. }) if *host == p.host),
                        &|h| mon.current(h).is_some_and(|d| d.kind == Kind::Healthy),
                    );
                    proposal = match (fresh, proposal.take()) {
                        (Some(m), Some((old, since))) if old.node == m.node && old.from == m.from && old.to == m.to => Some((m, since)),
                        (Some(m), _) => Some((m, now)),
                        (None, _) => None,
                    };
                    let calm = rack.nodes.values().all(|x| matches!(x.phase, Phase::Watching | Phase::Maintenance | Phase::RunningVirtual { .. }));
                    if let (config::Rebalance::Auto { after }, Some((m, since))) = (policy.rebalance, &proposal)
                        && policy.mode == Mode::Act
                        && !rack.paused
                        && calm
                        && now.saturating_sub(*since) >= after.as_millis() as Millis
                    {
                        let why = format!(
                            "automatic rebalance: {} at {:.0}% load, past the {:.0}% mark, for {}",
                            m.from,
                            m.load * 100.0,
                            crate::placement::LOADED * 100.0,
                            humantime::format_duration(after)
                        );
                        let (n, to) = (m.node.clone(), m.to.clone());
                        proposal = None;
                        status_full = true;
                        if let Some(x) = rack.nodes.get_mut(&n) {
                            pending.extend(x.step(Input::Move { to, why }, now, &policy, &deadlines));
                        }
                    }
                    let silent_after = policy.heartbeat_timeout().as_millis() as Millis * 2;
                    for (n, x) in &rack.nodes {
                        let Phase::RunningVirtual { epoch, host, since } = &x.phase else { continue };
                        let Some(hv) = env.hypervisors.get(host).cloned() else { continue };
                        if !twin_checks.insert(n.clone()) {
                            continue;
                        }
                        let last = match twin_beats.get(n) {
                            Some((e, at)) if e == epoch => (*at).max(*since),
                            _ => *since,
                        };
                        let silence = now.saturating_sub(last);
                        if silence > silent_after {
                            let _ = jtx.send(JobResult::TwinLost(n.clone(), *epoch, host.clone(), *since, format!("no heartbeat for {silence} ms")));
                            continue;
                        }
                        let (n, epoch, host, since, jtx) = (n.clone(), *epoch, host.clone(), *since, jtx.clone());
                        jobs.spawn(async move {
                            let st = hv.status(&format!("vigil-{n}-e{epoch}")).await;
                            let read = match st {
                                VmState::Running => String::new(),
                                other => format!("{other:?}"),
                            };
                            let _ = jtx.send(JobResult::TwinLost(n, epoch, host, since, read));
                        });
                    }
                    // Pre-created twins: one for each watched node judged healthy that has
                    // none, made one at a time per node, its epoch reserved (and written to
                    // the log) before QEMU starts.
                    // Pre-created twins are read back too (less often: they run nothing).
                    if now.saturating_sub(last_standby_check) >= STANDBY_CHECK {
                        last_standby_check = now;
                        for (n, epoch) in &rack.standby {
                            if !standby_checks.insert(n.clone()) {
                                continue;
                            }
                            let (n, epoch, env, jtx) = (n.clone(), *epoch, env.clone(), jtx.clone());
                            jobs.spawn(async move {
                                let vm = format!("vigil-{n}-e{epoch}");
                                let mut read = Vec::new();
                                let mut waiting = false;
                                for (host, hv) in &env.hypervisors {
                                    match hv.status(&vm).await {
                                        VmState::Paused => waiting = true,
                                        VmState::Absent => {}
                                        // Only read, never acted on here: a failover may
                                        // have just taken and resumed it (what is left of a
                                        // dead one is cleared by the node's next failover).
                                        other => read.push(format!("{other:?} on {host}")),
                                    }
                                }
                                let read = if waiting {
                                    String::new()
                                } else if read.is_empty() {
                                    "absent".to_string()
                                } else {
                                    read.join(", ")
                                };
                                let _ = jtx.send(JobResult::StandbyCheck(n, epoch, read));
                            });
                        }
                    }
                    if policy.precreate_twins && policy.mode == Mode::Act {
                        let want: Vec<String> = rack
                            .nodes
                            .iter()
                            .filter(|(n, x)| {
                                matches!(x.phase, Phase::Watching)
                                    && !rack.standby.contains_key(*n)
                                    && !standby_jobs.contains(*n)
                                    && standby_retry.get(*n).is_none_or(|t| *t <= now)
                                    && mon.current(n).is_some_and(|d| d.kind == Kind::Healthy)
                            })
                            .map(|(n, _)| n.clone())
                            .collect();
                        for n in want {
                            let epoch = rack.reserve_epoch();
                            standby_jobs.insert(n.clone());
                            let (env, jtx) = (env.clone(), jtx.clone());
                            jobs.spawn(async move {
                                let r = jobs::precreate(&env, &n, epoch).await;
                                let _ = jtx.send(JobResult::Standby(n, epoch, r));
                            });
                        }
                    }
                }
            }
        }
        // Every pass: verdicts to the log and the machines, the gate, the actions.
        pass_due = false;
        last_pass = tokio::time::Instant::now();
        let pass_started = std::time::Instant::now();
        let now = clock.now();
        let mut changed: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut verdicts_written = false;
        for c in mon.evaluate(now) {
            changed.insert(c.node.clone());
            let d = &c.diagnosis;
            shared.metrics.verdict(&c.node, d);
            if d.kind != Kind::Suspect || d.candidate.is_some() {
                let r = journal.lock().unwrap_or_else(|p| p.into_inner()).append_unsynced(
                    Some(&c.node),
                    RecordKind::Verdict,
                    None,
                    format!(
                        "{}: {} -> {}: {}",
                        c.node,
                        c.previous.name(),
                        d.kind.name(),
                        d.why
                    ),
                    json!({ "verdict": d.kind, "candidate": d.candidate, "why": { "evidence": d.evidence }, "held_ms": d.held_ms, "samples": d.samples }),
                );
                match r {
                    Ok(_) => verdicts_written = true,
                    Err(e) => {
                        tracing::error!(error = %e, "the fencing log cannot be written: no action will be taken until it can")
                    }
                }
            }
        }
        // The pass's verdicts are made durable together, before anything the pass decides.
        if verdicts_written && let Err(e) = journal.lock().unwrap_or_else(|p| p.into_inner()).sync()
        {
            tracing::error!(error = %e, "the fencing log cannot be written: no action will be taken until it can");
        }
        {
            let mut judged = env.host_judged.lock().unwrap_or_else(|p| p.into_inner());
            let mut fenced = env.fenced_hosts.lock().unwrap_or_else(|p| p.into_inner());
            for h in &cfg.hosts {
                let d = mon.current(&h.name);
                if d.is_none_or(|d| d.kind != Kind::Isolated) {
                    host_isolated_since.remove(&h.name);
                }
                if d.is_some_and(|d| d.kind == Kind::Healthy) {
                    // Back in service after a fence (its OS heartbeats again).
                    fenced.remove(&h.name);
                }
                let j = match d {
                    None => HostJudged::NotFailed("not judged yet".into()),
                    Some(d) => {
                        let isolated_for = if d.kind == Kind::Isolated {
                            now.saturating_sub(
                                *host_isolated_since.entry(h.name.clone()).or_insert(now),
                            )
                        } else {
                            0
                        };
                        judge_host(d, &policy, isolated_for)
                    }
                };
                judged.insert(h.name.clone(), j);
            }
        }
        {
            let mut health = env.host_health.lock().unwrap_or_else(|p| p.into_inner());
            for h in &cfg.hosts {
                let ok = mon.current(&h.name).is_none_or(|d| {
                    matches!(
                        d.kind,
                        Kind::Healthy | Kind::Degraded | Kind::Suspect | Kind::BmcLost
                    )
                });
                health.insert(h.name.clone(), ok);
            }
        }
        // The machines that can move: those whose verdict just changed or points at a fault,
        // and those in the middle of something (their deadlines run). A watching node whose
        // healthy (or degraded, or plain suspect) verdict stayed what it was has nothing new to
        // say: in Watching, such a verdict and a Tick do nothing.
        let mut stepped: Vec<String> = mon
            .touched()
            .filter(|n| {
                rack.nodes.contains_key(*n)
                    && (changed.contains(*n)
                        || mon
                            .current(n)
                            .is_some_and(|d| d.kind.fences() || d.candidate.is_some()))
            })
            .map(String::from)
            .collect();
        stepped.extend(
            rack.nodes
                .iter()
                .filter(|(_, x)| !matches!(x.phase, Phase::Watching))
                .map(|(n, _)| n.clone()),
        );
        stepped.sort_unstable();
        stepped.dedup();
        for name in &stepped {
            let Some(d) = mon.current(name).cloned() else {
                continue;
            };
            let phys = mon
                .diagnoser(name)
                .and_then(|x| x.latest())
                .map(|s| Physical {
                    power: s.power,
                    health: s.health,
                });
            if let Some(x) = rack.nodes.get_mut(name) {
                pending.extend(x.step(Input::Verdict(d, phys), now, &policy, &deadlines));
                pending.extend(x.step(Input::Tick, now, &policy, &deadlines));
            }
        }
        pending.extend(rack.grant(&policy, now));
        let mut refusals_written = false;
        for a in pending.drain(..) {
            let env = env.clone();
            let jtx = jtx.clone();
            match a {
                Action::StartFailover {
                    node,
                    epoch,
                    fenced,
                    why,
                } => {
                    tracing::warn!(node = %node, epoch, fenced, why = %why, "failover starts");
                    if standby_jobs.contains(&node) {
                        standby_stale.insert(node.clone());
                    }
                    jobs.spawn(async move {
                        let progress = progress_to(&jtx, &node);
                        let r =
                            jobs::failover(&env, &node, epoch, fenced, &why, None, &progress).await;
                        let _ = jtx.send(JobResult::Failover(node, r));
                    });
                }
                Action::MoveTwin {
                    node,
                    epoch,
                    from,
                    to,
                    why,
                } => {
                    tracing::warn!(node = %node, epoch, from = %from, to = %to, why = %why, "the twin moves");
                    jobs.spawn(async move {
                        let progress = progress_to(&jtx, &node);
                        let r =
                            jobs::move_twin(&env, &node, epoch, &from, &to, &why, &progress).await;
                        let _ = jtx.send(JobResult::Moved(node, to, r));
                    });
                }
                Action::StartFailback { node, epoch } => {
                    tracing::warn!(node = %node, epoch, "failback starts");
                    let replacement = accept_profile.remove(&node);
                    jobs.spawn(async move {
                        let r = jobs::failback(&env, &node, epoch, replacement).await;
                        let _ = jtx.send(JobResult::Failback(node, r));
                    });
                }
                Action::Refence { node, epoch } => {
                    // One refence in flight per node (a fence takes its time on a slow BMC).
                    if !refencing.insert(node.clone()) {
                        continue;
                    }
                    tracing::error!(node = %node, epoch, "the physical node is on while its twin runs: fencing it again");
                    append(
                        &journal,
                        Some(&node),
                        RecordKind::Refusal,
                        Some(epoch),
                        format!(
                            "{node} was powered on while its twin runs: it is fenced again (a node and its twin never run together)"
                        ),
                        serde_json::Value::Null,
                    );
                    jobs.spawn(async move {
                        // Said back whichever way the job ends (a panic too): a node left
                        // marked in flight would never be fenced again.
                        struct Said(Option<(mpsc::UnboundedSender<JobResult>, String)>);
                        impl Drop for Said {
                            fn drop(&mut self) {
                                if let Some((tx, n)) = self.0.take() {
                                    let _ = tx.send(JobResult::Refenced(
                                        n,
                                        Err("the refence job ended early".into()),
                                    ));
                                }
                            }
                        }
                        let mut said = Said(Some((jtx.clone(), node.clone())));
                        let r = jobs::fence_node(&env, &node, Some(epoch), "twin running")
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string());
                        said.0 = None;
                        let _ = jtx.send(JobResult::Refenced(node, r));
                    });
                }
                Action::PowerCycle { node } => {
                    append(
                        &journal,
                        Some(&node),
                        RecordKind::Operator,
                        None,
                        format!("software hang on {node}: power-cycling it in place (policy)"),
                        serde_json::Value::Null,
                    );
                    jobs.spawn(async move {
                        let r = match env.bmcs.get(&node) {
                            Some(b) => b
                                .power(crate::bmc::PowerAction::Cycle)
                                .await
                                .map(drop)
                                .map_err(|e| e.to_string()),
                            None => Err("no BMC".into()),
                        };
                        let _ = jtx.send(JobResult::Other(node, r));
                    });
                }
                Action::Refuse { node, reason } => {
                    // A refusal announces nothing to do: group-committed with the pass.
                    tracing::warn!(node = %node, reason = %reason, "no action");
                    let r = journal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .append_unsynced(
                            Some(&node),
                            RecordKind::Refusal,
                            None,
                            reason,
                            serde_json::Value::Null,
                        );
                    match r {
                        Ok(_) => refusals_written = true,
                        Err(e) => {
                            tracing::error!(error = %e, "the fencing log cannot be written: no action will be taken until it can")
                        }
                    }
                }
                Action::Overdue {
                    node,
                    phase,
                    for_ms,
                } => {
                    tracing::error!(node = %node, phase = %phase, for_ms, "a job runs past its deadline");
                    append(
                        &journal,
                        Some(&node),
                        RecordKind::Operator,
                        None,
                        format!("{node}: {phase} has run for {for_ms} ms, past its deadline"),
                        serde_json::Value::Null,
                    );
                }
            }
        }
        if refusals_written && let Err(e) = journal.lock().unwrap_or_else(|p| p.into_inner()).sync()
        {
            tracing::error!(error = %e, "the fencing log cannot be written: no action will be taken until it can");
        }
        while let Some(r) = jobs.try_join_next() {
            if let Err(e) = r {
                tracing::error!(error = %e, "a job panicked");
            }
        }
        if !ready && first_full.len() >= src.bmcs.len().min(machines) {
            ready = true;
            let _not_systemd = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::info!("first full poll done: ready");
        }
        // The status the API serves: whole every STATUS_EVERY (and after a command or a job
        // result), in between only the machines this pass looked at or moved.
        let node_status = |name: &str, host: bool| {
            let node = rack.nodes.get(name);
            NodeStatus {
                name: name.to_string(),
                host,
                state: node.map(Node::state_name).unwrap_or_else(|| {
                    mon.current(name)
                        .map(|d| d.kind.name())
                        .unwrap_or_else(|| "suspect".into())
                }),
                phase: node.map(|x| x.phase.clone()).unwrap_or(Phase::Watching),
                diagnosis: mon.current(name).cloned(),
            }
        };
        let placed = env.placed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let waiting: Vec<crate::placement::Placed> = env
            .standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(_, p)| p.clone())
            .collect();
        let health = env
            .host_health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fenced = env
            .fenced_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let hosts: Vec<HostStatus> = cfg
            .hosts
            .iter()
            .map(|h| HostStatus {
                name: h.name.clone(),
                role: h.role,
                capacity: h.capacity,
                twins: placed
                    .iter()
                    .filter(|p| p.host == h.name)
                    .cloned()
                    .collect(),
                standby: waiting
                    .iter()
                    .filter(|p| p.host == h.name)
                    .cloned()
                    .collect(),
                healthy: health.get(&h.name).copied().unwrap_or(true)
                    && env.hypervisors.contains_key(&h.name)
                    && !fenced.contains(&h.name),
            })
            .collect();
        let whole = status_full || status_built.is_none_or(|t| t.elapsed() >= STATUS_EVERY);
        let status_started = std::time::Instant::now();
        if whole {
            status_full = false;
            status_built = Some(tokio::time::Instant::now());
            let status = Status {
                nodes: cfg
                    .machines()
                    .map(|m| node_status(m.name, m.is_host))
                    .collect(),
                hosts,
                paused: rack.paused,
                mode: format!("{:?}", policy.mode).to_lowercase(),
                ready,
                heartbeats_refused: src.counters.refused(),
                heartbeats_accepted: src
                    .counters
                    .accepted
                    .load(std::sync::atomic::Ordering::Relaxed),
                rebalance: proposal.as_ref().map(|(m, _)| m.clone()),
            };
            shared.metrics.update(&status);
            *shared.status.write().unwrap_or_else(|p| p.into_inner()) = status;
        } else {
            let mut st = shared.status.write().unwrap_or_else(|p| p.into_inner());
            // (The hosts' own verdicts, and the nodes that moved; the evidence of the others is
            // refreshed by the whole rebuild.)
            let mut moved: Vec<usize> = changed
                .iter()
                .map(String::as_str)
                .chain(stepped.iter().map(String::as_str))
                .filter_map(|n| status_pos.get(n).copied())
                .collect();
            moved.sort_unstable();
            moved.dedup();
            for &i in &moved {
                if let Some(e) = st.nodes.get_mut(i) {
                    let fresh = node_status(&e.name, e.host);
                    *e = fresh;
                }
            }
            st.hosts = hosts;
            st.paused = rack.paused;
            st.mode = format!("{:?}", policy.mode).to_lowercase();
            st.ready = ready;
            st.heartbeats_refused = src.counters.refused();
            st.heartbeats_accepted = src
                .counters
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed);
            shared.metrics.update_nodes(
                moved
                    .iter()
                    .filter_map(|&i| st.nodes.get(i))
                    .map(|n| (n.name.as_str(), n.state.as_str())),
            );
        }
        // A pass holds up every observation behind it: a long one is worth a line.
        let took = pass_started.elapsed();
        if took > Duration::from_millis(250) {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                status_ms = status_started.elapsed().as_millis() as u64,
                whole_status = whole,
                evaluated = mon.touched().count(),
                verdicts = changed.len(),
                "a slow pass"
            );
        }
    }
    // Stopping: record what was in flight; it resumes on the next start.
    let inflight: Vec<String> = rack
        .nodes
        .values()
        .filter(|n| matches!(n.phase, Phase::Failover { .. } | Phase::FailingBack { .. }))
        .map(|n| format!("{} ({})", n.name, n.state_name()))
        .collect();
    append(
        &journal,
        None,
        RecordKind::Operator,
        None,
        if inflight.is_empty() {
            "vigil stops; nothing in flight".into()
        } else {
            format!(
                "vigil stops with jobs in flight, parked for the next start: {}",
                inflight.join(", ")
            )
        },
        serde_json::Value::Null,
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Nobody reads observations any more: a poller or the heartbeat relay blocked on a full
    // queue must see that (and a poller then closes its BMC session) rather than wait forever.
    src.rx.close();
    cancel.cancel();
    jobs.abort_all();
    while jobs.join_next().await.is_some() {}
    while src.tasks.join_next().await.is_some() {}
    let _ = api_task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: RecordKind) -> Record {
        Record {
            seq: 0,
            time: String::new(),
            node: Some("db1".into()),
            kind,
            epoch: Some(1),
            message: String::new(),
            detail: serde_json::Value::Null,
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn a_twin_started_after_the_last_heartbeat_is_still_booting() {
        use RecordKind as K;
        let booting = |kinds: &[K]| {
            let rs: Vec<Record> = kinds.iter().map(|k| rec(*k)).collect();
            twin_booting(&rs.iter().collect::<Vec<_>>())
        };
        assert!(booting(&[K::FailoverBegin, K::VmStart, K::VmRunning]));
        assert!(!booting(&[
            K::FailoverBegin,
            K::VmStart,
            K::VmRunning,
            K::VmHeartbeat
        ]));
        // Moved (or replaced) and restarted before the new twin's first heartbeat.
        assert!(booting(&[
            K::FailoverBegin,
            K::VmStart,
            K::VmHeartbeat,
            K::TwinMove,
            K::VmStopped,
            K::VmStart,
            K::VmRunning,
        ]));
        assert!(!booting(&[
            K::FailoverBegin,
            K::VmStart,
            K::VmHeartbeat,
            K::TwinMove,
            K::VmStopped,
            K::VmStart,
            K::VmHeartbeat,
        ]));
    }
}
