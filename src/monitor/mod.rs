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

use std::collections::{BTreeMap, HashMap};
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
    diag: Diagnoser,
    last: Option<Diagnosis>,
    hurry: Arc<Hurry>,
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
pub struct Monitor {
    machines: BTreeMap<String, Watched>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("machines", &self.machines.len())
            .finish()
    }
}

impl Monitor {
    /// A monitor for every machine of `cfg`, starting at `now`.
    pub fn new(cfg: &Config, hurry: &HashMap<String, Arc<Hurry>>, now: Millis) -> Self {
        let machines = cfg
            .machines()
            .map(|m| {
                (
                    m.name.to_string(),
                    Watched {
                        diag: Diagnoser::new(Thresholds::from_policy(m.policy), now),
                        last: None,
                        hurry: hurry.get(m.name).cloned().unwrap_or_default(),
                    },
                )
            })
            .collect();
        Self { machines }
    }

    /// Feeds an observation of `node`.
    pub fn observe(&mut self, node: &str, o: Observation) {
        if let Some(w) = self.machines.get_mut(node) {
            w.diag.observe(o);
        }
    }

    /// The rack's view at `now`.
    pub fn rack(&self, now: Millis) -> RackView {
        RackView {
            total: self.machines.len(),
            heartbeat_lost: self
                .machines
                .values()
                .filter(|w| w.diag.heartbeat_lost(now))
                .count(),
            bmc_lost: self
                .machines
                .values()
                .filter(|w| w.diag.bmc_unreachable(now))
                .count(),
        }
    }

    /// Re-evaluates every machine; returns the changes of verdict (or of what a suspicion
    /// points at).
    pub fn evaluate(&mut self, now: Millis) -> Vec<VerdictChange> {
        let rack = self.rack(now);
        let mut out = Vec::new();
        for (name, w) in &mut self.machines {
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
            let changed = match &w.last {
                // Nothing read yet is not news.
                None => !(d.kind == Kind::Suspect && d.candidate.is_none()),
                Some(l) => l.kind != d.kind || l.candidate != d.candidate,
            };
            if changed {
                let previous = w.last.as_ref().map_or(Kind::Suspect, |l| l.kind);
                out.push(VerdictChange {
                    at: now,
                    node: name.clone(),
                    previous,
                    diagnosis: d.clone(),
                });
                w.last = Some(d);
            } else if w.last.is_some() {
                w.last = Some(d);
            }
        }
        out
    }

    /// The current diagnosis of `node`.
    pub fn current(&self, node: &str) -> Option<&Diagnosis> {
        self.machines.get(node).and_then(|w| w.last.as_ref())
    }

    /// The diagnoser of `node`.
    pub fn diagnoser(&self, node: &str) -> Option<&Diagnoser> {
        self.machines.get(node).map(|w| &w.diag)
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
            m.policy.bmc_poll_interval,
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

/// One machine's poller: fast reads every interval, a full one every few, all full in a hurry.
async fn poll(
    node: String,
    b: Arc<dyn Bmc>,
    interval: Duration,
    hurry: Arc<Hurry>,
    clock: Clock,
    tx: mpsc::Sender<(String, Observation)>,
    cancel: CancellationToken,
) {
    let mut n: u32 = 0;
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
