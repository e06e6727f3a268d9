//! Diagnosis: evidence and time in, verdict out. Pure: no I/O, no clock of its own.
//!
//! Overview: a [`Diagnoser`] per node is fed [`Observation`]s — verified heartbeats, BMC samples
//! (a snapshot or a failed read), and the power actions vigil itself requested — each stamped by
//! whoever observed it. At every BMC sample it classifies what the two paths show together (the
//! evidence matrix of DESIGN.md) into a raw [`Kind`]; [`Diagnoser::evaluate`] turns that into a
//! [`Diagnosis`]: a verdict that leads to a fence only when the same raw kind has held for
//! `evidence_samples` consecutive samples *and* for `evidence_for`. Until then it is `Suspect`,
//! which fences nobody. Transient BMC errors never classify as a fault; ambiguity (power Unknown,
//! a PoweringOff nobody asked for) gives a verdict that does not fence and says why. A node whose
//! raw kind keeps flapping has its persistence doubled until it settles.
//!
//! How the paths are read (heartbeat / BMC):
//! - alive / readable: healthy, or degraded (health Warning or Critical, a failed PSU, a sensor
//!   past its threshold) — never fenced while its OS answers;
//! - lost / Off that vigil did not ask for: hardware fault, its kind from the new SEL records and
//!   sensors (thermal, voltage regulator, PSU, else power);
//! - lost / On with a CPU IERR or uncorrectable memory error in the SEL: hardware fault CPU/memory;
//! - lost / On, stuck in POST: POST failure; an OS critical stop (panic) or a watchdog expiry:
//!   software hang; running OS, no expiry after `watchdog_timeout`: isolated (it pets its watchdog);
//! - alive / unreadable: BMC lost; lost / unreadable: dark; every node at once: appliance isolated.
//!
//! Scope: one node's verdict, with the rack's view passed in. What a verdict leads to (fence,
//! wait, alert) is the supervisor's policy, helped by [`Kind::fences`].
//!
//! Key types: [`Diagnoser`], [`Observation`], [`Diagnosis`], [`Kind`], [`HardwareKind`].

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::heartbeat::wire::WatchdogReport;
use crate::model::{BmcSnapshot, BootProgress, Health, LogEntry, Millis, PowerReading, SensorKind};

/// Samples kept per node: the last good one and the failures since (a run this long is lost).
const MAX_SAMPLES: usize = 64;
/// SEL records kept per node for classification.
const MAX_LOG: usize = 128;
/// How far back SEL records count for classifying a fault.
const LOG_WINDOW_MS: Millis = 120_000;
/// Raw-kind changes within this window that make a node "flapping".
const FLAP_WINDOW_MS: Millis = 60_000;
/// How many changes in the window make it flapping.
const FLAP_CHANGES: usize = 6;

/// What kind of hardware failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HardwareKind {
    /// Power lost (AC, power unit) or an unexplained power-off.
    Power,
    /// All PSUs failed.
    Psu,
    /// A voltage regulator.
    VoltageRegulator,
    /// Thermal trip.
    Thermal,
    /// CPU internal error / machine check.
    Cpu,
    /// Uncorrectable memory error.
    Memory,
}

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict", content = "kind")]
pub enum Kind {
    /// Both paths fine.
    Healthy,
    /// Serving, but the BMC reports a problem (alert, no fence).
    Degraded,
    /// Alive (watchdog petted) but unreachable by its clients.
    Isolated,
    /// OS hung or panicked; the hardware is on.
    SoftwareHang,
    /// Stuck in POST.
    PostFailure,
    /// Hardware failed.
    HardwareFault(HardwareKind),
    /// Heartbeats fine, BMC unreachable: cannot fence.
    BmcLost,
    /// Both paths lost: no automatic failover without a confirmed fence.
    Dark,
    /// Every node lost at once: the appliance's own view is broken; fence nobody.
    ApplianceIsolated,
    /// The evidence is not enough yet, or not clear: no fence.
    Suspect,
}

impl Kind {
    /// Whether this verdict, once confirmed, leads to a fence by default policy (isolated only
    /// after its grace, which the supervisor counts).
    pub fn fences(self) -> bool {
        matches!(
            self,
            Kind::SoftwareHang | Kind::PostFailure | Kind::HardwareFault(_) | Kind::Isolated
        )
    }

    /// Whether two raw kinds are the same finding for persistence: a hardware fault whose kind
    /// is refined by a later, fuller read (power, then thermal once the SEL is read) has been
    /// persisting all along.
    pub fn same_finding(self, other: Kind) -> bool {
        match (self, other) {
            (Kind::HardwareFault(_), Kind::HardwareFault(_)) => true,
            (a, b) => a == b,
        }
    }

    /// A short name for logs and tables.
    pub fn name(self) -> String {
        match self {
            Kind::HardwareFault(h) => format!(
                "hardware-fault:{}",
                serde_json::to_value(h)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
            other => serde_json::to_value(other)
                .ok()
                .and_then(|v| v["verdict"].as_str().map(String::from))
                .unwrap_or_default(),
        }
    }
}

/// The thresholds diagnosis uses (from the node's policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// No heartbeat for this long: lost.
    pub heartbeat_timeout: Duration,
    /// Consecutive samples a fencing verdict needs.
    pub evidence_samples: u32,
    /// How long they must hold.
    pub evidence_for: Duration,
    /// How long a hung OS's watchdog takes to expire (after which silence means "petted").
    pub watchdog_timeout: Duration,
    /// The BMC poll interval (a BMC silent for three of them is lost).
    pub poll_interval: Duration,
    /// How long a host may stay at one POST stage before it counts as stuck.
    pub post_timeout: Duration,
}

impl Thresholds {
    /// From a node's policy.
    pub fn from_policy(p: &crate::config::Policy) -> Self {
        Self {
            heartbeat_timeout: p.heartbeat_timeout(),
            evidence_samples: p.evidence_samples,
            evidence_for: p.evidence_for,
            watchdog_timeout: p.watchdog_timeout,
            poll_interval: p.bmc_poll_interval,
            post_timeout: p.post_timeout,
        }
    }
}

/// A BMC read that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BmcFailure {
    /// Whether trying again may help.
    pub transient: bool,
    /// What went wrong.
    pub message: String,
}

/// Something observed about a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A verified heartbeat.
    Heartbeat {
        /// When it arrived.
        at: Millis,
        /// Its incarnation (a change is a reboot).
        incarnation: [u8; 16],
        /// What it says of the watchdog.
        watchdog: WatchdogReport,
    },
    /// A BMC read.
    Bmc {
        /// When it completed.
        at: Millis,
        /// What it gave.
        result: Result<BmcSnapshot, BmcFailure>,
    },
    /// vigil itself asked for this power state (a fence, a failback): not a fault.
    PowerRequested {
        /// When.
        at: Millis,
        /// On (true) or off (false).
        on: bool,
    },
}

/// One reading behind a verdict, for the fencing log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// What was read (`power`, `heartbeat`, `sel`, `sensor CPU1 Temp`).
    pub what: String,
    /// Its value.
    pub value: String,
}

fn ev(what: impl Into<String>, value: impl Into<String>) -> Evidence {
    Evidence {
        what: what.into(),
        value: value.into(),
    }
}

/// A verdict with the readings that produced it and how long they persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// The verdict.
    pub kind: Kind,
    /// For `Suspect`: what it would be if the evidence persists.
    pub candidate: Option<Kind>,
    /// Why, in one sentence.
    pub why: String,
    /// The readings.
    pub evidence: Vec<Evidence>,
    /// Since when the evidence has held.
    pub since: Millis,
    /// For how long (ms) at the time of the verdict.
    pub held_ms: u64,
    /// Over how many consecutive samples.
    pub samples: u32,
    /// Whether the raw kind has been flapping (persistence doubled).
    pub flapping: bool,
}

/// How many nodes the appliance currently cannot see, for the rack-wide checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RackView {
    /// Nodes watched.
    pub total: usize,
    /// Nodes whose heartbeat is lost.
    pub heartbeat_lost: usize,
    /// Nodes whose BMC is unreachable.
    pub bmc_lost: usize,
}

impl RackView {
    /// Every path to every node lost at once (two nodes or more): the appliance is the one cut off.
    pub fn appliance_isolated(&self) -> bool {
        self.total >= 2 && self.heartbeat_lost == self.total && self.bmc_lost == self.total
    }
}

#[derive(Debug, Clone)]
struct Sample {
    at: Millis,
    result: Result<BmcSnapshot, BmcFailure>,
}

#[derive(Debug, Clone)]
struct Candidate {
    kind: Kind,
    since: Millis,
    samples: u32,
    why: String,
    evidence: Vec<Evidence>,
}

/// The diagnosis state of one node.
#[derive(Debug, Clone)]
pub struct Diagnoser {
    t: Thresholds,
    started: Millis,
    last_heartbeat: Option<Millis>,
    incarnation: Option<[u8; 16]>,
    reboots: u32,
    samples: VecDeque<Sample>,
    log: VecDeque<(Millis, LogEntry)>,
    requested_off: Option<Millis>,
    /// The host has read Off since that request (only then is a later On "back on").
    requested_seen_off: bool,
    candidate: Option<Candidate>,
    changes: VecDeque<Millis>,
    /// The last sample at which the node was plainly fine (heartbeat and power on): SEL records
    /// from before it belong to an earlier, finished story.
    last_fine: Option<Millis>,
    /// When the host was last seen coming on (the first On after something else).
    powered_on_at: Option<Millis>,
    /// The boot stage last reported, and since when.
    stage: Option<(BootProgress, Millis)>,
    /// Whether a heartbeat arrived since the last BMC sample (the OS is speaking now).
    fresh_heartbeat: bool,
    /// Sensors already past a threshold while the node was fine: real servers carry some
    /// (a discrete sensor read as a voltage, a capture's old fault). Only sensors that became
    /// critical since are evidence.
    baseline_critical: std::collections::BTreeSet<String>,
}

impl Diagnoser {
    /// A diagnoser for a node first watched at `now`.
    pub fn new(t: Thresholds, now: Millis) -> Self {
        Self {
            t,
            started: now,
            last_heartbeat: None,
            incarnation: None,
            reboots: 0,
            samples: VecDeque::new(),
            log: VecDeque::new(),
            requested_off: None,
            requested_seen_off: false,
            candidate: None,
            changes: VecDeque::new(),
            last_fine: None,
            powered_on_at: None,
            stage: None,
            fresh_heartbeat: false,
            baseline_critical: std::collections::BTreeSet::new(),
        }
    }

    /// New thresholds (a reloaded policy); the evidence gathered so far is kept.
    pub fn set_thresholds(&mut self, t: Thresholds) {
        self.t = t;
    }

    /// How many reboots (incarnation changes) were seen.
    pub fn reboots(&self) -> u32 {
        self.reboots
    }

    /// When the last heartbeat arrived.
    pub fn last_heartbeat(&self) -> Option<Millis> {
        self.last_heartbeat
    }

    /// Whether the heartbeat is lost at `now`.
    pub fn heartbeat_lost(&self, now: Millis) -> bool {
        !self.heartbeat_alive(now)
    }

    /// Until when, with no new observation and the same rack view, [`Diagnoser::evaluate`]
    /// cannot change its kind or candidate: for a node whose `verdict` (evaluated at `now`) is
    /// healthy or degraded with nothing building up, the moment
    /// its heartbeat times out. `None` when time alone could change the verdict sooner or
    /// otherwise: a verdict building up, a BMC whose last read failed, a node never heard.
    ///
    /// Why this holds: a healthy or degraded verdict rests on a live heartbeat, the latest BMC
    /// reading and the SEL since the last heartbeat; of these only the heartbeat's liveness
    /// depends on the time. A BMC read that failed starts the count towards "BMC lost", which
    /// does depend on it. The monitor uses this to skip re-evaluating quiet machines on every
    /// pass (a property test checks it against `evaluate`).
    pub fn quiet_until(&self, now: Millis, verdict: &Diagnosis) -> Option<Millis> {
        // A node no BMC reading has come from (yet, or at all) is suspect until one comes or
        // its BMC fails: neither happens without an observation.
        if self.samples.is_empty() && verdict.kind == Kind::Suspect && verdict.candidate.is_none() {
            return Some(Millis::MAX);
        }
        let settled =
            matches!(verdict.kind, Kind::Healthy | Kind::Degraded) && verdict.candidate.is_none();
        // (The candidate a settled verdict carries is that same non-fencing kind: it only counts
        // how long the finding has held, and cannot turn into anything else without a sample.)
        if !settled || self.samples.back()?.result.is_err() {
            return None;
        }
        let last_hb = self.last_heartbeat?;
        let until = last_hb + self.t.heartbeat_timeout.as_millis() as Millis + 1;
        (until > now).then_some(until)
    }

    /// Whether the BMC is unreachable at `now` (persistently, not one error).
    pub fn bmc_unreachable(&self, now: Millis) -> bool {
        self.bmc_lost(now).is_some()
    }

    /// The latest BMC snapshot, if any.
    pub fn latest(&self) -> Option<&BmcSnapshot> {
        self.latest_snapshot().map(|(_, s)| s)
    }

    /// Takes an observation. Returns whether it was a BMC sample (which advances persistence).
    pub fn observe(&mut self, o: Observation) {
        match o {
            Observation::Heartbeat {
                at, incarnation, ..
            } => {
                if self.incarnation.is_some_and(|i| i != incarnation) {
                    self.reboots += 1;
                }
                self.incarnation = Some(incarnation);
                self.last_heartbeat = Some(self.last_heartbeat.map_or(at, |l| l.max(at)));
                self.fresh_heartbeat = true;
                // The OS speaks and the host was last seen on with no news: what was logged up
                // to that reading is history.
                if let Some(last) = self.samples.back()
                    && let Ok(snap) = &last.result
                    && snap.power == PowerReading::On
                    && !snap.new_log.iter().any(|e| e.asserted)
                    && self.last_fine.is_none_or(|f| f < last.at)
                {
                    self.last_fine = Some(last.at);
                }
            }
            Observation::PowerRequested { at, on } => {
                self.requested_off = if on { None } else { Some(at) };
                self.requested_seen_off = false;
            }
            Observation::Bmc { at, result } => {
                if let Ok(s) = &result {
                    let was_on = self
                        .latest_snapshot()
                        .is_some_and(|(_, p)| p.power == PowerReading::On);
                    if s.power == PowerReading::On && !was_on {
                        self.powered_on_at = Some(at);
                    }
                    if let Some(b) = &s.boot
                        && self.stage.as_ref().is_none_or(|(prev, _)| prev != b)
                    {
                        self.stage = Some((b.clone(), at));
                    }
                    // Recoveries (deasserted records) do not spoil a fine sample.
                    let news = s.new_log.iter().any(|e| e.asserted);
                    if s.power == PowerReading::On && self.fresh_heartbeat && !news {
                        self.last_fine = Some(at);
                        if s.full {
                            self.baseline_critical = s
                                .sensors
                                .iter()
                                .filter(|r| r.is_critical())
                                .map(|r| r.name.clone())
                                .collect();
                        }
                    }
                    self.fresh_heartbeat = false;
                    for e in &s.new_log {
                        self.log.push_back((at, e.clone()));
                    }
                    while self.log.len() > MAX_LOG {
                        self.log.pop_front();
                    }
                    if self.requested_off.is_some() {
                        if s.power == PowerReading::Off {
                            self.requested_seen_off = true;
                        } else if s.power == PowerReading::On && self.requested_seen_off {
                            // Back on after a requested off: later Offs are news again. (On
                            // reads *before* the Off showed are the fence still in progress:
                            // firmware that refuses a power-off for a while, as Supermicro's
                            // does during POST, must not make the Off it finally takes look
                            // like a power loss nobody asked for.)
                            self.requested_off = None;
                            self.requested_seen_off = false;
                        }
                    }
                }
                // Only the last good reading and the failures since are ever read (the latest
                // snapshot; "BMC lost" counts the failures after it): a good reading makes the
                // samples before it history, and a rack of 10,000 nodes need not keep them.
                if result.is_ok() {
                    self.samples.clear();
                }
                self.samples.push_back(Sample { at, result });
                while self.samples.len() > MAX_SAMPLES {
                    self.samples.pop_front();
                }
                self.step(at);
            }
        }
    }

    fn heartbeat_alive(&self, now: Millis) -> bool {
        let timeout = self.t.heartbeat_timeout.as_millis() as Millis;
        match self.last_heartbeat {
            Some(l) => now.saturating_sub(l) <= timeout,
            // Never heard: give a new node one timeout to speak before calling it lost.
            None => now.saturating_sub(self.started) <= timeout,
        }
    }

    /// The BMC is lost when its last reads all failed for three poll intervals (or the policy's
    /// sample count, whichever is more) — one failure, or a few transient ones, are not enough.
    fn bmc_lost(&self, now: Millis) -> Option<String> {
        let last_ok = self
            .samples
            .iter()
            .rev()
            .find(|s| s.result.is_ok())
            .map(|s| s.at);
        // The failures since the last good reading, the latest first (no allocation: this
        // runs for every awake machine on every pass).
        let mut failures = self
            .samples
            .iter()
            .rev()
            .map_while(|s| s.result.as_ref().err());
        let latest = failures.next();
        let count = usize::from(latest.is_some()) + failures.count();
        let need = (self.t.evidence_samples as usize).max(3);
        let span = self.t.poll_interval.as_millis() as Millis * 3;
        let since = last_ok.unwrap_or(self.started);
        if count >= need && now.saturating_sub(since) >= span {
            Some(latest.map(|f| f.message.clone()).unwrap_or_default())
        } else {
            None
        }
    }

    fn latest_snapshot(&self) -> Option<(Millis, &BmcSnapshot)> {
        self.samples
            .iter()
            .rev()
            .find_map(|s| s.result.as_ref().ok().map(|r| (s.at, r)))
    }

    fn recent_log(&self, now: Millis) -> impl Iterator<Item = &LogEntry> {
        let fine = self.last_fine.unwrap_or(0);
        self.log
            .iter()
            .filter(move |(at, _)| *at >= fine && now.saturating_sub(*at) <= LOG_WINDOW_MS)
            .map(|(_, e)| e)
    }

    /// A watchdog expiry logged after the node's last heartbeat (its message): the OS stopped
    /// petting and the BMC's timer ran out, whatever it then did to the host (reset, power down
    /// or cycle). A heartbeat after the record (the OS back after the reset) clears it.
    fn watchdog_fired_since_heartbeat(&self) -> Option<String> {
        self.logged_since_heartbeat(|e, m| {
            e.sensor_type
                .as_deref()
                .is_some_and(|t| t.starts_with("Watchdog"))
                || m.contains("watchdog")
        })
    }

    /// An asserted record matching `pred` (given the entry and its lower-cased message) seen
    /// after the node's last heartbeat: its message. A heartbeat after it clears it.
    fn logged_since_heartbeat(&self, pred: impl Fn(&LogEntry, &str) -> bool) -> Option<String> {
        let last_hb = self.last_heartbeat.unwrap_or(0);
        self.log
            .iter()
            .filter(|(at, e)| *at > last_hb && e.asserted)
            .map(|(_, e)| e)
            .find(|e| pred(e, &e.message.to_ascii_lowercase()))
            .map(|e| e.message.clone())
    }

    fn log_has(&self, now: Millis, pred: impl Fn(&LogEntry, &str) -> bool) -> Option<String> {
        self.recent_log(now)
            .filter(|e| e.asserted)
            .find(|e| pred(e, &e.message.to_ascii_lowercase()))
            .map(|e| e.message.clone())
    }

    /// What the two paths show together right now (before persistence).
    pub fn classify(&self, now: Millis, rack: RackView) -> (Kind, String, Vec<Evidence>) {
        let hb = self.heartbeat_alive(now);
        let hb_ev = ev(
            "heartbeat",
            match self.last_heartbeat {
                Some(l) => format!(
                    "{} (last {} ms ago, timeout {} ms)",
                    if hb { "alive" } else { "lost" },
                    now.saturating_sub(l),
                    self.t.heartbeat_timeout.as_millis()
                ),
                None => format!(
                    "{} (never received)",
                    if hb { "not yet expected" } else { "lost" }
                ),
            },
        );
        if rack.appliance_isolated() {
            return (
                Kind::ApplianceIsolated,
                format!(
                    "every path to all {} nodes is lost at once: the appliance itself is cut off",
                    rack.total
                ),
                vec![hb_ev],
            );
        }
        if let Some(err) = self.bmc_lost(now) {
            let bmc_ev = ev("bmc", format!("unreachable: {err}"));
            return if hb {
                (
                    Kind::BmcLost,
                    "heartbeats arrive but the BMC cannot be read: cannot fence".into(),
                    vec![hb_ev, bmc_ev],
                )
            } else {
                (
                    Kind::Dark,
                    "heartbeat and BMC both lost: no automatic failover without a confirmed fence"
                        .into(),
                    vec![hb_ev, bmc_ev],
                )
            };
        }
        let Some((snap_at, snap)) = self.latest_snapshot() else {
            return (Kind::Suspect, "no BMC reading yet".into(), vec![hb_ev]);
        };
        let mut evidence = vec![
            hb_ev,
            ev("power", format!("{:?}", snap.power)),
            ev("health", format!("{:?}", snap.health)),
        ];
        if let Some(b) = &snap.boot {
            evidence.push(ev("boot progress", format!("{b:?}")));
        }
        if snap.protocol == crate::model::Protocol::Ipmi {
            // Say which path the evidence came through, and why not the usual one.
            let why = snap.gaps.iter().find(|g| g.starts_with("redfish:"));
            evidence.push(ev(
                "bmc path",
                match why {
                    Some(g) => format!("IPMI ({g})"),
                    None => "IPMI".to_string(),
                },
            ));
        }
        if now.saturating_sub(snap_at) > self.t.poll_interval.as_millis() as Millis * 3 {
            evidence.push(ev("bmc", "last reading is old (the BMC answers errors)"));
        }
        let critical: Vec<_> = snap
            .sensors
            .iter()
            .filter(|s| s.is_critical() && !self.baseline_critical.contains(&s.name))
            .collect();
        for s in critical.iter().take(4) {
            evidence.push(ev(
                format!("sensor {}", s.name),
                format!("{:?} (critical {:?})", s.value, s.upper_critical),
            ));
        }
        for e in self.recent_log(now).filter(|e| e.asserted).take(6) {
            evidence.push(ev("sel", e.message.clone()));
        }

        if matches!(snap.power, PowerReading::Off | PowerReading::PoweringOff)
            && self.requested_off.is_some()
        {
            return (
                Kind::Suspect,
                "powered off at vigil's own request".into(),
                evidence,
            );
        }
        // A host that is off cannot be running its OS, whatever the last heartbeat says: a
        // power loss is not made to wait for the heartbeat timeout.
        let off_unasked = matches!(snap.power, PowerReading::Off | PowerReading::PoweringOff)
            && self.requested_off.is_none();
        // A record that says the OS or CPU died, seen after the node's last heartbeat with none
        // since, means the same: the heartbeat timeout need not be waited out. A heartbeat after
        // the record (a reboot) clears it.
        let fatal_since_hb = self
            .logged_since_heartbeat(|_, m| {
                m.contains("critical stop") || m.contains("ierr") || m.contains("uncorrectable")
            })
            .is_some();
        if hb && !off_unasked && !fatal_since_hb {
            let failed_psus = snap
                .psus
                .iter()
                .filter(|p| p.health == Health::Critical)
                .count();
            let degraded = snap.health == Health::Warning
                || snap.health == Health::Critical
                || failed_psus > 0
                || !critical.is_empty();
            return if degraded {
                (
                    Kind::Degraded,
                    "the OS answers, but the BMC reports a problem: alert, no fence".into(),
                    evidence,
                )
            } else {
                (Kind::Healthy, "both paths fine".into(), evidence)
            };
        }

        // Heartbeat lost from here on: what does the hardware say?
        match snap.power {
            PowerReading::Unknown => (
                Kind::Suspect,
                "heartbeat lost and the BMC does not say whether the host is powered: ambiguous, no fence".into(),
                evidence,
            ),
            PowerReading::Off | PowerReading::PoweringOff if self.requested_off.is_some() => (
                Kind::Suspect,
                "powered off at vigil's own request".into(),
                evidence,
            ),
            PowerReading::PoweringOff => (
                Kind::Suspect,
                "heartbeat lost and the host is powering off, which nobody asked for: waiting for Off".into(),
                evidence,
            ),
            PowerReading::Off => {
                let thermal = critical.iter().any(|s| s.kind == SensorKind::Temperature)
                    || self.log_has(now, |_, m| m.contains("thermal trip") || (m.contains("temperature") && m.contains("critical"))).is_some();
                let vr = critical.iter().any(|s| s.kind == SensorKind::Voltage)
                    || self.log_has(now, |e, m| {
                        e.sensor_type.as_deref() == Some("Voltage") || m.starts_with("voltage") || m.contains("vcc")
                    })
                    .is_some();
                let psu = self
                    .log_has(now, |_, m| m.contains("power supply") && m.contains("failure detected"))
                    .is_some()
                    && snap.psus.iter().all(|p| p.health != Health::Ok);
                let (kind, what) = if thermal {
                    (HardwareKind::Thermal, "a thermal trip")
                } else if vr {
                    (HardwareKind::VoltageRegulator, "a voltage regulator fault")
                } else if psu {
                    (HardwareKind::Psu, "every PSU failed")
                } else if let Some(m) = self.watchdog_fired_since_heartbeat() {
                    // A watchdog whose action is power down (or cycle) turned the hung host off.
                    return (
                        Kind::SoftwareHang,
                        format!("heartbeat lost and the host is off, turned off by its watchdog: the OS hung: {m}"),
                        evidence,
                    );
                } else {
                    (HardwareKind::Power, "power lost")
                };
                (
                    Kind::HardwareFault(kind),
                    format!("heartbeat lost and the host is off, which nobody asked for: {what}"),
                    evidence,
                )
            }
            PowerReading::PoweringOn => match self.watchdog_fired_since_heartbeat() {
                Some(m) => (
                    Kind::SoftwareHang,
                    format!("heartbeat lost and its watchdog expired since (the BMC powers it on again): the OS hung: {m}"),
                    evidence,
                ),
                None => (
                    Kind::Suspect,
                    "heartbeat lost while the host powers on: waiting for its boot".into(),
                    evidence,
                ),
            },
            PowerReading::On => {
                if let Some(m) = self.log_has(now, |e, m| {
                    m.contains("ierr") || m.contains("machine check") || (e.sensor_type.as_deref() == Some("Processor") && m.contains("error"))
                }) {
                    return (Kind::HardwareFault(HardwareKind::Cpu), format!("heartbeat lost, host on, CPU error in the SEL: {m}"), evidence);
                }
                if let Some(m) = self.log_has(now, |_, m| m.contains("uncorrectable")) {
                    return (Kind::HardwareFault(HardwareKind::Memory), format!("heartbeat lost, host on, memory error in the SEL: {m}"), evidence);
                }
                if let Some(m) = self.watchdog_fired_since_heartbeat() {
                    // A watchdog with a reset action reboots the hung host: the POST that
                    // follows is the BMC's doing, not a boot to wait for.
                    return (Kind::SoftwareHang, format!("heartbeat lost, host on, and its watchdog expired since: the OS hung: {m}"), evidence);
                }
                if let Some(BootProgress::Post(stage)) = &snap.boot {
                    // Stuck only when one stage has lasted longer than any POST stage should;
                    // a host walking through POST is booting, not failing.
                    let at_stage = self.stage.as_ref().map_or(0, |(_, since)| now.saturating_sub(*since));
                    let limit = self.t.post_timeout.as_millis() as Millis;
                    return if at_stage >= limit {
                        (Kind::PostFailure, format!("heartbeat lost and the host has been stuck in POST ({stage}) for {at_stage} ms"), evidence)
                    } else {
                        (Kind::Suspect, format!("heartbeat lost and the host is in POST ({stage}, {at_stage} ms of the {limit} ms a stage may take): booting"), evidence)
                    };
                }
                if matches!(snap.boot, Some(BootProgress::OsBooting) | Some(BootProgress::None)) {
                    return (Kind::Suspect, "heartbeat lost while the OS boots".into(), evidence);
                }
                if let Some(m) = self.log_has(now, |_, m| m.contains("critical stop") || m.contains("os stop")) {
                    return (Kind::SoftwareHang, format!("heartbeat lost, host on, the OS stopped: {m}"), evidence);
                }
                let wd_expired = snap.watchdog.is_some_and(|w| w.expired)
                    || self.log_has(now, |e, m| e.sensor_type.as_deref() == Some("Watchdog") || m.contains("watchdog")).is_some();
                if wd_expired {
                    return (Kind::SoftwareHang, "heartbeat lost, host on, and its watchdog expired: the OS is hung".into(), evidence);
                }
                // Silence counts from the last heartbeat, or from the host's last power-on or
                // OS start if later: a freshly booted OS has not had time to speak yet.
                let os_up = self.stage.as_ref().and_then(|(b, since)| (*b == BootProgress::OsRunning).then_some(*since));
                let quiet_from = [self.last_heartbeat, self.powered_on_at, os_up, Some(self.started)]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(0);
                let lost_for = now.saturating_sub(quiet_from);
                let wd = self.t.watchdog_timeout.as_millis() as Millis;
                if lost_for >= wd + self.t.poll_interval.as_millis() as Millis {
                    (
                        Kind::Isolated,
                        format!("heartbeat lost for {lost_for} ms, host on, OS running, and its watchdog did not expire in {wd} ms: the OS is alive but cut off"),
                        evidence,
                    )
                } else {
                    (
                        Kind::Suspect,
                        "heartbeat lost, host on: hang or isolation, waiting for the watchdog to tell".into(),
                        evidence,
                    )
                }
            }
        }
    }

    fn flapping(&self, now: Millis) -> bool {
        self.changes
            .iter()
            .filter(|t| now.saturating_sub(**t) <= FLAP_WINDOW_MS)
            .count()
            >= FLAP_CHANGES
    }

    /// Advances persistence at a BMC sample.
    fn step(&mut self, at: Millis) {
        let (kind, why, evidence) = self.classify(at, RackView::default());
        match &mut self.candidate {
            Some(c) if c.kind.same_finding(kind) => {
                c.kind = kind;
                c.samples += 1;
                c.why = why;
                c.evidence = evidence;
            }
            _ => {
                if self.candidate.is_some() {
                    self.changes.push_back(at);
                    while self.changes.len() > 32 {
                        self.changes.pop_front();
                    }
                }
                self.candidate = Some(Candidate {
                    kind,
                    since: at,
                    samples: 1,
                    why,
                    evidence,
                });
            }
        }
    }

    /// The verdict at `now`, given the rack's view.
    pub fn evaluate(&self, now: Millis, rack: RackView) -> Diagnosis {
        let (raw, why, evidence) = self.classify(now, rack);
        let flapping = self.flapping(now);
        let factor = if flapping { 2 } else { 1 };
        let need_samples = self.t.evidence_samples.max(1) * factor;
        let need_ms = self.t.evidence_for.as_millis() as u64 * u64::from(factor);
        match &self.candidate {
            // The raw kind now agrees with the one that has been building up.
            Some(c) if c.kind.same_finding(raw) => {
                let held = now.saturating_sub(c.since);
                let confirmed = !raw.fences() || (c.samples >= need_samples && held >= need_ms);
                Diagnosis {
                    kind: if confirmed { raw } else { Kind::Suspect },
                    candidate: (!confirmed).then_some(raw),
                    why: if confirmed {
                        why
                    } else {
                        format!(
                            "{why} (not yet persistent: {} of {need_samples} samples, {held} of {need_ms} ms)",
                            c.samples
                        )
                    },
                    evidence,
                    since: c.since,
                    held_ms: held,
                    samples: c.samples,
                    flapping,
                }
            }
            // Something new since the last sample (a heartbeat timed out, the rack view changed):
            // no fencing verdict can stand on it yet.
            _ => Diagnosis {
                kind: if raw.fences() { Kind::Suspect } else { raw },
                candidate: raw.fences().then_some(raw),
                why: if raw.fences() {
                    format!("{why} (not yet persistent: no sample has confirmed it)")
                } else {
                    why
                },
                evidence,
                since: now,
                held_ms: 0,
                samples: 0,
                flapping,
            },
        }
    }
}

#[cfg(test)]
mod tests;
