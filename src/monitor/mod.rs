//! The monitor: both paths to every machine, watched, and judged continuously.
//!
//! Overview: [`start_sources`] starts the heartbeat listener and one poller task per machine;
//! both send [`Observation`]s, stamped with the appliance clock, down one channel. [`Monitor`]
//! holds a [`Diagnoser`] per machine, feeds it, re-evaluates every machine on every observation
//! and on a short tick (a heartbeat timing out produces no observation), and reports each change
//! of verdict. A machine under suspicion is polled faster ("hurry") so that the samples that
//! confirm or clear a verdict come quickly: a 1 s poll still confirms a power loss in about a
//! second.
//!
//! Scope: detection and diagnosis only; the monitor never acts. `vigil watch` prints what it
//! says; `vigil run` hands it to the supervisor.
//!
//! Key types: [`Monitor`], [`VerdictChange`], [`Sources`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bmc::{self, Bmc, Depth};
use crate::clock::Clock;
use crate::config::{Config, ProfileSet};
use crate::diagnosis::{BmcFailure, Diagnoser, Diagnosis, Kind, Observation, RackView, Thresholds};
use crate::heartbeat::listener::{Counters, Listener, Peer};
use crate::model::Millis;

/// How often every machine is re-evaluated between observations.
pub const TICK: Duration = Duration::from_millis(100);
/// A machine under suspicion is polled this many times faster.
pub const HURRY_FACTOR: u32 = 10;
/// ... but never more often than this.
pub const MIN_POLL: Duration = Duration::from_millis(100);
/// Every this many polls is a full one (sensors, PSUs, SEL); in a hurry, all are.
pub const FULL_EVERY: u32 = 5;

/// A change of a machine's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct VerdictChange {
    /// When (appliance clock).
    pub at: Millis,
    /// The machine.
    pub node: String,
    /// What it was.
    pub previous: Kind,
    /// What it is, with its evidence.
    pub diagnosis: Diagnosis,
}

struct Watched {
    name: String,
    diag: Diagnoser,
    last: Option<Diagnosis>,
    hurry: Arc<Hurry>,
    /// Set while the machine sleeps: nothing but a new observation (or a change of the rack's
    /// view) can change its verdict before then.
    quiet_until: Option<Millis>,
}

/// "Poll this machine faster": set by the monitor when a machine is under suspicion; the poller
/// is woken at once, so the confirming samples do not wait out a normal interval.
#[derive(Debug, Default)]
pub struct Hurry {
    flag: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Hurry {
    /// Sets or clears the flag, waking the poller when it is newly set.
    pub fn set(&self, on: bool) {
        if on && !self.flag.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        } else if !on {
            self.flag.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the machine is under suspicion.
    pub fn get(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// The diagnosers of every machine.
///
/// Cost: a pass evaluates only the machines that may have changed: those observed since the
/// last pass, those whose verdict time alone can change (anything not plainly healthy or
/// degraded), and quiet machines whose heartbeat timeout is due. A quiet machine sleeps in a
/// queue ordered by that moment ([`Diagnoser::quiet_until`]), so a rack of 10,000 healthy nodes
/// costs a pass about what its observations cost, not 10,000 evaluations. When the appliance's
/// own isolation changes (every machine lost on both paths, or no longer), every machine is
/// evaluated.
pub struct Monitor {
    machines: Vec<Watched>,
    index: HashMap<String, usize>,
    /// Observed since the last pass (or due): evaluated on the next pass.
    dirty: BTreeSet<usize>,
    /// Neither quiet nor observed: time alone may change their verdict, so they are evaluated
    /// every [`TICK`] (the granularity the monitor has always promised for time-driven changes).
    unsettled: BTreeSet<usize>,
    /// When the unsettled machines were last evaluated.
    last_sweep: Option<Millis>,
    /// Quiet machines, by when they must be looked at again.
    sleeping: BTreeSet<(Millis, usize)>,
    /// The appliance-isolation answer the machines were last evaluated against.
    last_isolated: Option<bool>,
    /// The machines the last pass evaluated.
    touched: Vec<usize>,
    /// Counters: passes, machines evaluated, passes that woke every machine.
    pub counts: MonitorCounts,
}

/// What the monitor did, for profiling and the debug log.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonitorCounts {
    /// Passes.
    pub passes: u64,
    /// Machine evaluations.
    pub evaluations: u64,
    /// Passes on which the appliance's own isolation changed, so every machine was evaluated.
    pub whole_rack: u64,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("machines", &self.machines.len())
            .field("sleeping", &self.sleeping.len())
            .finish()
    }
}

impl Monitor {
    /// A monitor for every machine of `cfg`, starting at `now`.
    pub fn new(cfg: &Config, hurry: &HashMap<String, Arc<Hurry>>, now: Millis) -> Self {
        let mut machines: Vec<Watched> = cfg
            .machines()
            .map(|m| Watched {
                name: m.name.to_string(),
                diag: Diagnoser::new(Thresholds::from_policy(m.policy), now),
                last: None,
                hurry: hurry.get(m.name).cloned().unwrap_or_default(),
                quiet_until: None,
            })
            .collect();
        machines.sort_by(|a, b| a.name.cmp(&b.name));
        let index = machines
            .iter()
            .enumerate()
            .map(|(i, w)| (w.name.clone(), i))
            .collect();
        Self {
            dirty: (0..machines.len()).collect(),
            unsettled: BTreeSet::new(),
            last_sweep: None,
            machines,
            index,
            sleeping: BTreeSet::new(),
            last_isolated: None,
            touched: Vec::new(),
            counts: MonitorCounts::default(),
        }
    }

    fn wake(&mut self, i: usize) {
        if let Some(t) = self.machines[i].quiet_until.take() {
            self.sleeping.remove(&(t, i));
        }
        self.unsettled.remove(&i);
        self.dirty.insert(i);
    }

    /// Feeds an observation of `node`.
    pub fn observe(&mut self, node: &str, o: Observation) {
        if let Some(&i) = self.index.get(node) {
            self.machines[i].diag.observe(o);
            self.wake(i);
        }
    }

    /// Whether the appliance itself is cut off at `now`: every machine lost on both paths. A
    /// sleeping machine has a live heartbeat, so any sleeper answers no at once; otherwise the
    /// first machine with a live path does.
    fn appliance_isolated(&self, now: Millis) -> bool {
        self.machines.len() >= 2
            && self.sleeping.is_empty()
            && self.dirty.iter().chain(&self.unsettled).all(|&i| {
                let d = &self.machines[i].diag;
                d.heartbeat_lost(now) && d.bmc_unreachable(now)
            })
    }

    /// Re-evaluates every machine that may have changed; returns the changes of verdict (or of
    /// what a suspicion points at).
    pub fn evaluate(&mut self, now: Millis) -> Vec<VerdictChange> {
        // Quiet machines whose heartbeat timeout is due.
        while let Some(&(t, i)) = self.sleeping.first() {
            if t > now {
                break;
            }
            self.wake(i);
        }
        let isolated = self.appliance_isolated(now);
        let total = self.machines.len();
        // A verdict reads the rack's view only to ask whether the appliance itself is cut off:
        // when that answer changes, nobody may stay asleep on the old one. (Waking everyone
        // whenever one node's heartbeat came or went would cost a big rack a whole evaluation
        // on most passes.)
        let rack = if isolated {
            RackView {
                total,
                heartbeat_lost: total,
                bmc_lost: total,
            }
        } else {
            RackView {
                total,
                ..RackView::default()
            }
        };
        if self.last_isolated != Some(isolated) {
            for i in 0..self.machines.len() {
                self.wake(i);
            }
            self.last_isolated = Some(isolated);
            self.counts.whole_rack += 1;
        }
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_sub(t) >= TICK.as_millis() as Millis)
        {
            self.last_sweep = Some(now);
            let unsettled = std::mem::take(&mut self.unsettled);
            self.dirty.extend(unsettled);
        }
        self.counts.passes += 1;
        self.counts.evaluations += self.dirty.len() as u64;
        let mut out = Vec::new();
        self.touched.clear();
        let due = std::mem::take(&mut self.dirty);
        for i in due {
            self.touched.push(i);
            let w = &mut self.machines[i];
            let d = w.diag.evaluate(now, rack);
            // Poll faster while evidence is building (a candidate verdict), or while the host
            // is on and the verdict undecided (hang or isolation: the watchdog will tell); not
            // for settled states such as a node vigil itself powered off.
            let powered = w
                .diag
                .latest()
                .is_some_and(|s| s.power == crate::model::PowerReading::On);
            w.hurry
                .set(d.candidate.is_some() || (d.kind == Kind::Suspect && powered));
            let quiet = w.diag.quiet_until(now, &d);
            let changed = match &w.last {
                // Nothing read yet is not news.
                None => !(d.kind == Kind::Suspect && d.candidate.is_none()),
                Some(l) => l.kind != d.kind || l.candidate != d.candidate,
            };
            if changed {
                let previous = w.last.as_ref().map_or(Kind::Suspect, |l| l.kind);
                out.push(VerdictChange {
                    at: now,
                    node: w.name.clone(),
                    previous,
                    diagnosis: d.clone(),
                });
                w.last = Some(d);
            } else if w.last.is_some() {
                w.last = Some(d);
            }
            match quiet {
                Some(t) => {
                    w.quiet_until = Some(t);
                    self.sleeping.insert((t, i));
                }
                None => {
                    self.unsettled.insert(i);
                }
            }
        }
        out
    }

    /// The machines the last [`Monitor::evaluate`] looked at (their diagnosis may be new).
    pub fn touched(&self) -> impl Iterator<Item = &str> {
        self.touched.iter().map(|&i| self.machines[i].name.as_str())
    }

    /// How many machines sleep (quiet until their heartbeat timeout or a new observation).
    pub fn sleeping(&self) -> usize {
        self.sleeping.len()
    }

    /// The current diagnosis of `node`.
    pub fn current(&self, node: &str) -> Option<&Diagnosis> {
        self.index
            .get(node)
            .and_then(|&i| self.machines[i].last.as_ref())
    }

    /// The diagnoser of `node`.
    pub fn diagnoser(&self, node: &str) -> Option<&Diagnoser> {
        self.index.get(node).map(|&i| &self.machines[i].diag)
    }
}

/// A heartbeat from a virtual twin (routed to the supervisor, not to the node's diagnosis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinBeat {
    /// The node it stands in for.
    pub node: String,
    /// The epoch it was booted for.
    pub epoch: u64,
    /// When it arrived.
    pub at: Millis,
}

/// The running listener and pollers.
pub struct Sources {
    /// Heartbeats of virtual twins.
    pub twins: tokio::sync::broadcast::Sender<TwinBeat>,
    /// Observations, stamped, from every source.
    pub rx: mpsc::Receiver<(String, Observation)>,
    /// Per-machine "poll faster" flags, set by the monitor.
    pub hurry: HashMap<String, Arc<Hurry>>,
    /// Each machine's BMC, through whichever path answers (Redfish first).
    pub bmcs: HashMap<String, Arc<dyn Bmc>>,
    /// Each machine's paths, for fencing (the same drivers, so sessions are shared).
    pub paths: HashMap<String, bmc::paths::Paths>,
    /// Heartbeat counters.
    pub counters: Arc<Counters>,
    /// The tasks.
    pub tasks: JoinSet<()>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("bmcs", &self.bmcs.len())
            .finish()
    }
}

/// Why the sources could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// The heartbeat address cannot be bound.
    #[error("the heartbeat listener cannot bind {addr}")]
    Bind {
        /// Where.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A heartbeat key cannot be read.
    #[error("the heartbeat key of {node} cannot be read: {reason}")]
    Key {
        /// Whose.
        node: String,
        /// Why.
        reason: String,
    },
    /// A BMC driver cannot be built.
    #[error("{0}")]
    Bmc(#[from] bmc::SetupError),
}

/// Starts the heartbeat listener and a poller per machine, as tasks of the current runtime.
pub fn start_sources(
    cfg: &Config,
    profiles: &ProfileSet,
    clock: Clock,
    cancel: &CancellationToken,
    observer: Option<bmc::paths::Observer>,
) -> Result<Sources, SourcesError> {
    let (tx, rx) = mpsc::channel(4096);
    let mut tasks = JoinSet::new();
    let mut peers = HashMap::new();
    for m in cfg.machines() {
        let key = m.heartbeat.key.resolve().map_err(|e| SourcesError::Key {
            node: m.name.to_string(),
            reason: e.to_string(),
        })?;
        peers.insert(
            m.name.to_string(),
            Peer {
                key,
                address: m.heartbeat.address,
            },
        );
    }
    let (htx, mut hrx) = mpsc::channel(4096);
    let addr = cfg.appliance.heartbeat_listen;
    let listener = Listener::bind(addr, peers, clock, htx)
        .map_err(|source| SourcesError::Bind { addr, source })?;
    let counters = listener.counters.clone();
    tasks.spawn(listener.run(cancel.child_token()));
    let htx2 = tx.clone();
    let c2 = cancel.child_token();
    let (twins, _) = tokio::sync::broadcast::channel(1024);
    let twins2 = twins.clone();
    tasks.spawn(async move {
        loop {
            let r = tokio::select! {
                _ = c2.cancelled() => return,
                r = hrx.recv() => r,
            };
            let Some(r) = r else { return };
            if r.heartbeat.virtual_node {
                // Nobody listening (no failover in progress) is fine.
                let _receivers = twins2.send(TwinBeat {
                    node: r.heartbeat.node.clone(),
                    epoch: r.heartbeat.epoch,
                    at: r.at,
                });
                continue;
            }
            let obs = Observation::Heartbeat {
                at: r.at,
                incarnation: r.heartbeat.incarnation,
                watchdog: r.heartbeat.watchdog,
            };
            if htx2.send((r.heartbeat.node.clone(), obs)).await.is_err() {
                return;
            }
        }
    });

    let mut hurry = HashMap::new();
    let mut bmcs: HashMap<String, Arc<dyn Bmc>> = HashMap::new();
    let mut paths = HashMap::new();
    for m in cfg.machines() {
        let mut p = bmc::paths::Paths::for_machine(&m, profiles)?;
        if let Some(o) = &observer {
            p = p.observed(m.name, o.clone());
        }
        if !p.any() {
            tracing::warn!(
                node = m.name,
                "no BMC path (neither redfish_url nor ipmi_host): the node is watched by its heartbeat alone and cannot be fenced"
            );
            continue;
        }
        let b: Arc<dyn Bmc> = Arc::new(p.clone());
        let flag = Arc::new(Hurry::default());
        hurry.insert(m.name.to_string(), flag.clone());
        bmcs.insert(m.name.to_string(), b.clone());
        paths.insert(m.name.to_string(), p);
        tasks.spawn(poll(
            m.name.to_string(),
            b,
            Pace {
                interval: m.policy.bmc_poll_interval,
                request_timeout: m.policy.bmc_request_timeout,
            },
            flag,
            clock,
            tx.clone(),
            cancel.child_token(),
        ));
    }
    Ok(Sources {
        twins,
        rx,
        hurry,
        bmcs,
        paths,
        counters,
        tasks,
    })
}

/// How a machine's BMC is polled.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Between two polls.
    interval: Duration,
    /// One request's timeout (a slow BMC's back-off is counted in it).
    request_timeout: Duration,
}

/// One machine's poller: fast reads every interval, a full one every few, all full in a hurry.
async fn poll(
    node: String,
    b: Arc<dyn Bmc>,
    pace: Pace,
    hurry: Arc<Hurry>,
    clock: Clock,
    tx: mpsc::Sender<(String, Observation)>,
    cancel: CancellationToken,
) {
    let Pace {
        interval,
        request_timeout,
    } = pace;
    let mut n: u32 = 0;
    let mut timeouts: u32 = 0;
    // Spread the first polls of a rack over one interval instead of all at once.
    let offset =
        (node.bytes().map(u64::from).sum::<u64>() * 37) % interval.as_millis().max(1) as u64;
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(offset)) => {}
    }
    loop {
        let started = clock.now();
        let in_hurry = hurry.get();
        let depth = if in_hurry || n % FULL_EVERY == 0 {
            Depth::Full
        } else {
            Depth::Fast
        };
        n = n.wrapping_add(1);
        let result = tokio::select! {
            _ = cancel.cancelled() => break,
            r = b.status(depth) => r,
        };
        let at = clock.now();
        // A BMC that did not answer in time may still be working on the request: it gets no
        // new one until it has had that long again per timeout in a row (up to four), and no
        // hurried ones, so vigil never stacks requests on a slow BMC. ("BMC lost" needs several
        // failures over several intervals anyway: hurrying a silent BMC gains nothing.)
        let timed_out = matches!(result, Err(bmc::BmcError::Timeout { .. }));
        timeouts = if timed_out {
            timeouts.saturating_add(1)
        } else {
            0
        };
        let result = result.map_err(|e| BmcFailure {
            transient: e.is_transient(),
            message: e.to_string(),
        });
        if tx
            .send((node.clone(), Observation::Bmc { at, result }))
            .await
            .is_err()
        {
            break;
        }
        let fast = (interval / HURRY_FACTOR).max(MIN_POLL);
        if timeouts > 0 {
            let rest = clock.instant(at) + interval + request_timeout * timeouts.min(4);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(rest.into()) => {}
            }
            continue;
        }
        let every = if hurry.get() { fast } else { interval };
        let next = clock.instant(started) + every;
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next.into()) => {}
            // Suspicion arrived while sleeping a normal interval: the next sample comes at the
            // fast pace from the last one, not at the end of the interval.
            _ = hurry.wake.notified() => {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep_until((clock.instant(started) + fast).into()) => {}
                }
            }
        }
    }
    b.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::wire::WatchdogReport;
    use crate::model::{BmcSnapshot, BootProgress, Health, PowerReading, Protocol};

    fn config(nodes: &[&str]) -> (tempfile::TempDir, Config) {
        let d = tempfile::tempdir().unwrap();
        let mut t = format!(
            "[appliance]\nstate_dir = \"{}/appliance\"\napi_listen = \"127.0.0.1:0\"\nheartbeat_listen = \"127.0.0.1:0\"\n\n[policy]\nmode = \"observe\"\nheartbeat_interval = \"1s\"\nheartbeat_misses = 3\nbmc_poll_interval = \"1s\"\n",
            d.path().display()
        );
        std::fs::write(
            d.path().join("secret"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            d.path().join("secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let fp = vec!["AB"; 32].join(":");
        for (i, n) in nodes.iter().enumerate() {
            let port = 9 + i;
            t.push_str(&format!(
                "\n[[node]]\nname = \"{n}\"\nfirmware_profile = \"dmtf-generic\"\n[node.bmc]\nredfish_url = \"https://127.0.0.1:{port}\"\nfingerprint_sha256 = \"{fp}\"\nusername = \"admin\"\npassword = \"file:secret\"\n[node.heartbeat]\naddress = \"127.0.0.1\"\nkey = \"file:secret\"\n"
            ));
        }
        let p = d.path().join("vigil.toml");
        std::fs::write(&p, t).unwrap();
        let (cfg, _, _) = crate::config::load(&p).unwrap();
        (d, cfg)
    }

    fn hb(at: Millis) -> Observation {
        Observation::Heartbeat {
            at,
            incarnation: [7; 16],
            watchdog: WatchdogReport::Petted,
        }
    }

    fn on(at: Millis) -> Observation {
        Observation::Bmc {
            at,
            result: Ok(BmcSnapshot {
                protocol: Protocol::Redfish,
                power: PowerReading::On,
                boot: Some(BootProgress::OsRunning),
                health: Health::Ok,
                sensors: Vec::new(),
                psus: Vec::new(),
                new_log: Vec::new(),
                watchdog: None,
                full: true,
                gaps: Vec::new(),
            }),
        }
    }

    /// A quiet machine is not evaluated on every pass, yet its heartbeat timeout is seen at the
    /// same millisecond as when every machine was evaluated on every pass (the reference: a
    /// lone diagnoser fed the same observations).
    #[test]
    fn quiet_machines_sleep_but_their_timeout_is_seen_on_time() {
        let (_d, cfg) = config(&["a", "b", "c"]);
        let mut mon = Monitor::new(&cfg, &HashMap::new(), 0);
        let mut reference = Diagnoser::new(Thresholds::from_policy(&cfg.policy), 0);
        for n in ["a", "b", "c"] {
            mon.observe(n, hb(500));
            mon.observe(n, on(600));
        }
        reference.observe(hb(500));
        reference.observe(on(600));
        let first = mon.evaluate(600);
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(first.iter().all(|c| c.diagnosis.kind == Kind::Healthy));
        assert_eq!(mon.sleeping(), 3);
        // Nothing observed, nothing due: a pass looks at nobody.
        mon.evaluate(1500);
        assert_eq!(mon.touched().count(), 0);
        // a and c keep speaking; b falls silent after its heartbeat at 500.
        let mut t = 600;
        let timeout = cfg.policy.heartbeat_timeout().as_millis() as Millis;
        let mut b_changed_at = None;
        while t < 500 + timeout + 2000 {
            t += 50;
            if t % 1000 == 0 {
                for n in ["a", "c"] {
                    mon.observe(n, hb(t));
                    mon.observe(n, on(t));
                }
            }
            for c in mon.evaluate(t) {
                if c.node == "b" && b_changed_at.is_none() {
                    b_changed_at = Some(t);
                }
            }
        }
        // The reference judges b on every 50 ms step: the first step where it is no longer
        // healthy is when the monitor must have seen it too.
        let mut want = None;
        let mut t = 600;
        while t < 500 + timeout + 2000 {
            t += 50;
            let d = reference.evaluate(
                t,
                RackView {
                    total: 3,
                    ..RackView::default()
                },
            );
            if d.kind != Kind::Healthy || d.candidate.is_some() {
                want = Some(t);
                break;
            }
        }
        assert!(want.is_some(), "the reference never lost b's heartbeat");
        assert_eq!(b_changed_at, want);
        assert_ne!(mon.current("b").map(|d| d.kind), Some(Kind::Healthy));
        assert_eq!(mon.current("a").map(|d| d.kind), Some(Kind::Healthy));
    }
}
