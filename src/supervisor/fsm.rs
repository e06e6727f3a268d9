//! The per-node state machine and the rack's gate on it. Pure: state, input and time in; next
//! state and actions out.
//!
//! Overview: a node is [`Phase::Watching`] while nothing needs doing. A confirmed fencing verdict
//! makes it [`Phase::Requested`] (an isolated node first waits out its grace in
//! [`Phase::Waiting`]); the rack's gate ([`Rack::grant`]) turns requests into failover jobs
//! within the storm guard and never while paused or in observe mode. A job runs the whole
//! failover (fence, place, boot, first heartbeat) and reports its steps and its end; the machine
//! follows: [`Phase::Failover`] with its step, then [`Phase::RunningVirtual`], or
//! [`Phase::FencePending`] (waiting for an operator's acknowledgement), or [`Phase::Parked`]
//! (fenced, but no twin could be placed or booted: retried later). While the twin runs, a
//! physical node seen powered on is fenced again at once (a node and its twin never run
//! together), and an automatic failback starts once the repaired node has been healthy for the
//! policy's delay, unless it failed again within the quarantine after a previous failback.
//! Every phase has a deadline; one past it is reported.
//!
//! Key types: [`Node`], [`Phase`], [`Input`], [`Action`], [`Rack`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Failback, HangAction, Mode, Policy};
use crate::diagnosis::{Diagnosis, Kind};
use crate::model::{Health, Millis, PowerReading};

/// Where a failover job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Fencing the node.
    Fencing,
    /// Fence confirmed.
    Fenced,
    /// Choosing a host.
    Placing,
    /// Booting the twin, waiting for its first heartbeat.
    BootingVirtual,
}

/// What a node is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "phase")]
pub enum Phase {
    /// Nothing to do: healthy, degraded, suspect, BMC lost, dark, isolated within its grace...
    Watching,
    /// A confirmed isolation, waiting out the grace.
    Waiting {
        /// Until when.
        until: Millis,
    },
    /// Wants a failover; waiting for the rack's gate.
    Requested {
        /// Since when.
        since: Millis,
    },
    /// A failover job runs.
    Failover {
        /// Its epoch.
        epoch: u64,
        /// Its step.
        step: Step,
        /// Since when it runs.
        since: Millis,
    },
    /// No method confirmed the fence: waiting for an operator's acknowledgement.
    FencePending {
        /// The epoch.
        epoch: u64,
    },
    /// Fenced, but no twin could be placed or booted; retried at `retry_at`.
    Parked {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
        /// When to try again.
        retry_at: Millis,
    },
    /// The twin runs.
    RunningVirtual {
        /// The epoch.
        epoch: u64,
        /// Where.
        host: String,
        /// Since when.
        since: Millis,
    },
    /// A failback job runs.
    FailingBack {
        /// The epoch of the twin being stopped.
        epoch: u64,
        /// Since when.
        since: Millis,
    },
    /// An operator took the node out of automation.
    Maintenance,
}

/// What the physical node's BMC shows now (for the twin-running checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Physical {
    /// Power.
    pub power: PowerReading,
    /// Health rollup.
    pub health: Health,
}

/// What happened to a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The monitor's current verdict, with the physical node's BMC view.
    Verdict(Diagnosis, Option<Physical>),
    /// Time passed.
    Tick,
    /// The failover job reached a step.
    Progress(Step),
    /// The failover job ended with the twin running and heartbeating.
    FailoverDone {
        /// Where.
        host: String,
    },
    /// The fence could not be confirmed.
    FencePending,
    /// Fenced, but no twin runs (placement refused or boot failed).
    FailoverStalled {
        /// Why.
        reason: String,
    },
    /// The failback job ended: the node runs and heartbeats again.
    FailbackDone,
    /// The failback job failed.
    FailbackFailed {
        /// Why.
        reason: String,
        /// Whether the log says the twin still runs (the failback ended before stopping it).
        twin_running: bool,
        /// Whether the node's fence still holds (the failback ended before powering it on).
        fence_holds: bool,
    },
    /// An operator acknowledged the node is off.
    AckOff,
    /// An operator put the node in maintenance (true) or took it out.
    Maintenance(bool),
    /// An operator asks for a failover now.
    FailoverNow,
    /// An operator asks for a failback now.
    FailbackNow,
    /// The running twin is dead or hung (its hypervisor says so): replace it elsewhere.
    TwinLost {
        /// What the hypervisor read.
        reason: String,
    },
    /// Move the running twin to another host (a rebalance, or an operator's move).
    Move {
        /// The host it goes to.
        to: String,
        /// Why (the rebalance's reason, or the operator's request).
        why: String,
    },
    /// A move ended with the twin running and heartbeating on `host` (the one it went to, or
    /// the one it never left when the move was refused before anything was stopped).
    TwinMoved {
        /// Where it runs.
        host: String,
    },
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Start a failover job. `fenced` when the fence is already confirmed or acknowledged.
    StartFailover {
        /// The node.
        node: String,
        /// Its epoch.
        epoch: u64,
        /// Skip the fence.
        fenced: bool,
        /// Why (the verdict).
        why: String,
    },
    /// Start a failback job.
    StartFailback {
        /// The node.
        node: String,
        /// The twin's epoch.
        epoch: u64,
    },
    /// Move a running twin: stop it where it runs, confirmed, then start it on `to` (the
    /// node's fence still holds: no new fence, the same epoch).
    MoveTwin {
        /// The node.
        node: String,
        /// The twin's epoch.
        epoch: u64,
        /// Where it runs now.
        from: String,
        /// Where it goes.
        to: String,
        /// Why.
        why: String,
    },
    /// Fence the physical node again: it came on while its twin runs.
    Refence {
        /// The node.
        node: String,
        /// The twin's epoch.
        epoch: u64,
    },
    /// Power-cycle the node in place (policy for software hangs).
    PowerCycle {
        /// The node.
        node: String,
    },
    /// Write to the fencing log why nothing was done (once per occasion).
    Refuse {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// A phase ran past its deadline.
    Overdue {
        /// The node.
        node: String,
        /// Which phase.
        phase: String,
        /// For how long, ms.
        for_ms: u64,
    },
}

/// How long a node may stay in each phase before it is reported overdue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A whole failover job.
    pub failover: Duration,
    /// A whole failback job.
    pub failback: Duration,
    /// Between retries of a parked failover.
    pub parked_retry: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            failover: Duration::from_secs(180),
            failback: Duration::from_secs(180),
            parked_retry: Duration::from_secs(30),
        }
    }
}

/// One node's machine.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// Its phase.
    pub phase: Phase,
    /// Its latest verdict.
    pub verdict: Option<Kind>,
    /// When the physical node was last seen repaired (off or on, health OK) while its twin runs.
    #[serde(skip)]
    repaired_since: Option<Millis>,
    /// When the last failback completed (for the quarantine).
    pub last_failback: Option<Millis>,
    /// A refusal already logged for this occasion.
    #[serde(skip)]
    refused: Option<String>,
    /// An overdue phase already reported.
    #[serde(skip)]
    overdue_reported: bool,
    /// When vigil last power-cycled it for a software hang (policy `power-cycle`): once per
    /// incident, until a verdict that does not fence says it is back.
    #[serde(skip)]
    power_cycled: Option<Millis>,
    /// When vigil last fenced it again for coming on beside its twin: one refence per
    /// [`REFENCE_AGAIN`] while it keeps reading on (a fence in flight takes its time; a verdict
    /// per pass must not send a fence per pass), at once again after it has read off.
    #[serde(skip)]
    refenced: Option<Millis>,
    /// A move of its running twin is under way (`Some`), with the physical node's repair clock
    /// as it stood when the move began: a move is not a failure (the storm guard does not count
    /// it) and does not restart that clock.
    #[serde(skip)]
    moving: Option<Option<Millis>>,
    /// When the node went virtual in this incident (its first twin ran): the quarantine counts
    /// from here, whatever twin losses or moves restarted the twin since.
    #[serde(skip)]
    virtual_since: Option<Millis>,
}

/// How long after a refence another is asked for while the node still reads on (the runtime
/// keeps one in flight per node; this spaces out the retries of one that failed, and lets the
/// BMC's reading catch up with one that took).
pub const REFENCE_AGAIN: Millis = 5_000;

impl Node {
    /// A node in `phase` (Watching on a fresh start; whatever the log says after a restart).
    pub fn new(name: &str, phase: Phase) -> Self {
        Self {
            name: name.to_string(),
            phase,
            verdict: None,
            repaired_since: None,
            last_failback: None,
            refused: None,
            overdue_reported: false,
            power_cycled: None,
            refenced: None,
            moving: None,
            virtual_since: None,
        }
    }

    /// Whether a move of its running twin is under way.
    pub fn is_moving(&self) -> bool {
        self.moving.is_some()
    }

    fn refuse(&mut self, reason: String) -> Vec<Action> {
        if self.refused.as_deref() == Some(reason.as_str()) {
            return Vec::new();
        }
        self.refused = Some(reason.clone());
        vec![Action::Refuse {
            node: self.name.clone(),
            reason,
        }]
    }

    fn set(&mut self, p: Phase) {
        if !matches!(p, Phase::Failover { .. }) {
            self.moving = None;
        }
        if matches!(p, Phase::Watching) {
            self.virtual_since = None;
        }
        if p != self.phase {
            self.overdue_reported = false;
            self.repaired_since = None;
        }
        self.phase = p;
    }

    /// Takes an input at `now` under `policy`; returns the actions. `epoch` is the epoch a new
    /// failover would get (the rack's next).
    pub fn step(
        &mut self,
        input: Input,
        now: Millis,
        policy: &Policy,
        deadlines: &Deadlines,
    ) -> Vec<Action> {
        let name = self.name.clone();
        match (&self.phase.clone(), input) {
            // Operators first: maintenance overrides everything but a job in flight.
            (Phase::Failover { .. } | Phase::FailingBack { .. }, Input::Maintenance(true)) => {
                self.refuse("a job is running: maintenance starts when it ends".into())
            }
            (_, Input::Maintenance(true)) => {
                self.set(Phase::Maintenance);
                Vec::new()
            }
            (Phase::Maintenance, Input::Maintenance(false)) => {
                self.set(Phase::Watching);
                Vec::new()
            }
            // A failback asked of a node that runs no twin (or is busy): said, every time.
            (p, Input::FailbackNow) if !matches!(p, Phase::RunningVirtual { .. }) => {
                let state = self.state_name();
                vec![Action::Refuse {
                    node: name.clone(),
                    reason: format!(
                        "failback of {name} refused: {name} is {state}, and only a node running on its twin (running-virtual) fails back"
                    ),
                }]
            }
            // A move, asked by an operator or the rebalance policy.
            (Phase::RunningVirtual { epoch, host, .. }, Input::Move { to, why }) => {
                // An operator's request is answered every time (not once per occasion).
                if *host == to {
                    return vec![Action::Refuse {
                        node: name.clone(),
                        reason: format!("move of {name}'s twin refused: it already runs on {to}"),
                    }];
                }
                if host.is_empty() {
                    return vec![Action::Refuse {
                        node: name.clone(),
                        reason: format!(
                            "move of {name}'s twin refused: where it runs is not known yet (a failback just fell through); try again in a moment"
                        ),
                    }];
                }
                let (epoch, from) = (*epoch, host.clone());
                let repaired = self.repaired_since;
                self.set(Phase::Failover {
                    epoch,
                    step: Step::Placing,
                    since: now,
                });
                self.moving = Some(repaired);
                vec![Action::MoveTwin {
                    node: name,
                    epoch,
                    from,
                    to,
                    why,
                }]
            }
            (_, Input::Move { to, .. }) => {
                let state = self.state_name();
                vec![Action::Refuse {
                    node: name.clone(),
                    reason: format!(
                        "move of {name}'s twin to {to} refused: {name} is {state}, and only a twin that runs (running-virtual) is moved"
                    ),
                }]
            }
            (Phase::Maintenance, _) => Vec::new(),

            // Verdicts while nothing runs.
            (Phase::Watching, Input::Verdict(d, _)) => {
                self.verdict = Some(d.kind);
                if !d.kind.fences() {
                    self.refused = None;
                    if d.kind != Kind::Suspect {
                        self.power_cycled = None;
                    }
                    return Vec::new();
                }
                if policy.mode == Mode::Observe {
                    return self.refuse(format!(
                        "observe mode: {} would have failed over ({})",
                        name,
                        d.kind.name()
                    ));
                }
                match d.kind {
                    Kind::Isolated => {
                        self.set(Phase::Waiting {
                            until: now + policy.isolation_grace.as_millis() as Millis,
                        });
                        Vec::new()
                    }
                    Kind::SoftwareHang if policy.on_software_hang == HangAction::Alert => self
                        .refuse(format!(
                            "software hang on {name}: policy on_software_hang = alert"
                        )),
                    Kind::SoftwareHang if policy.on_software_hang == HangAction::PowerCycle => {
                        // Once per incident: the evidence of the hang (a watchdog or panic
                        // record since the last heartbeat) stands until the OS speaks again,
                        // through the whole reboot the cycle causes.
                        if let Some(at) = self.power_cycled {
                            return self.refuse(format!(
                                "software hang on {name}: power-cycled at {at} ms, waiting for it to come back"
                            ));
                        }
                        self.power_cycled = Some(now);
                        vec![Action::PowerCycle { node: name }]
                    }
                    _ => {
                        self.set(Phase::Requested { since: now });
                        Vec::new()
                    }
                }
            }
            (Phase::Waiting { .. }, Input::Verdict(d, _)) => {
                self.verdict = Some(d.kind);
                if d.kind != Kind::Isolated && !d.kind.fences() {
                    self.set(Phase::Watching);
                } else if d.kind != Kind::Isolated {
                    self.set(Phase::Requested { since: now });
                }
                Vec::new()
            }
            (Phase::Waiting { until }, Input::Tick) if now >= *until => {
                self.set(Phase::Requested { since: now });
                Vec::new()
            }
            (Phase::Requested { .. }, Input::Verdict(d, _)) => {
                self.verdict = Some(d.kind);
                if !d.kind.fences() {
                    // It recovered (or the verdict turned ambiguous) before the gate opened.
                    self.set(Phase::Watching);
                }
                Vec::new()
            }
            (Phase::Watching | Phase::Waiting { .. }, Input::FailoverNow) => {
                self.set(Phase::Requested { since: now });
                Vec::new()
            }

            // The job's progress and end.
            (Phase::Failover { epoch, since, .. }, Input::Progress(step)) => {
                self.set(Phase::Failover {
                    epoch: *epoch,
                    step,
                    since: *since,
                });
                Vec::new()
            }
            (Phase::Failover { epoch, .. }, Input::FailoverDone { host }) => {
                self.set(Phase::RunningVirtual {
                    epoch: *epoch,
                    host,
                    since: now,
                });
                self.virtual_since.get_or_insert(now);
                self.repaired_since = None;
                Vec::new()
            }
            (Phase::Failover { epoch, .. }, Input::FencePending) => {
                self.set(Phase::FencePending { epoch: *epoch });
                Vec::new()
            }
            (
                Phase::Failover { epoch, .. } | Phase::Parked { epoch, .. },
                Input::FailoverStalled { reason },
            ) => {
                self.set(Phase::Parked {
                    epoch: *epoch,
                    reason,
                    retry_at: now + deadlines.parked_retry.as_millis() as Millis,
                });
                Vec::new()
            }
            (Phase::FencePending { epoch }, Input::AckOff) => {
                let epoch = *epoch;
                self.set(Phase::Failover {
                    epoch,
                    step: Step::Fenced,
                    since: now,
                });
                vec![Action::StartFailover {
                    node: name,
                    epoch,
                    fenced: true,
                    why: "an operator acknowledged the node is off".into(),
                }]
            }
            (
                Phase::Parked {
                    epoch, retry_at, ..
                },
                Input::Tick,
            ) if now >= *retry_at => {
                let epoch = *epoch;
                self.set(Phase::Failover {
                    epoch,
                    step: Step::Placing,
                    since: now,
                });
                vec![Action::StartFailover {
                    node: name,
                    epoch,
                    fenced: true,
                    why: "retrying a failover that could not place or boot the twin".into(),
                }]
            }

            // While the twin runs.
            (Phase::RunningVirtual { epoch, since, .. }, Input::Verdict(d, phys)) => {
                self.verdict = Some(d.kind);
                let epoch = *epoch;
                let since = *since;
                let Some(p) = phys else { return Vec::new() };
                if matches!(p.power, PowerReading::On | PowerReading::PoweringOn) {
                    self.repaired_since = None;
                    if self
                        .refenced
                        .is_some_and(|t| now.saturating_sub(t) < REFENCE_AGAIN)
                    {
                        return Vec::new();
                    }
                    self.refenced = Some(now);
                    return vec![Action::Refence { node: name, epoch }];
                }
                if p.power == PowerReading::Off {
                    // Off again: a later power-on is a new occasion, fenced at once.
                    self.refenced = None;
                }
                if p.health == Health::Ok && p.power == PowerReading::Off {
                    let r = *self.repaired_since.get_or_insert(now);
                    if let Failback::Auto { healthy_delay } = policy.failback
                        && now.saturating_sub(r) >= healthy_delay.as_millis() as Millis
                    {
                        // (Counted from when it went virtual, not from its current twin's
                        // start: a twin replaced or moved since is the same incident.)
                        let failed = self.virtual_since.unwrap_or(since);
                        let quarantined = self.last_failback.is_some_and(|f| {
                            failed.saturating_sub(f) < policy.quarantine.as_millis() as Millis
                        });
                        if quarantined {
                            return self.refuse(format!(
                                "{name} failed again within the quarantine ({}) after its last failback: it stays on its twin until an operator decides",
                                humantime::format_duration(policy.quarantine)
                            ));
                        }
                        self.set(Phase::FailingBack { epoch, since: now });
                        return vec![Action::StartFailback { node: name, epoch }];
                    }
                } else {
                    self.repaired_since = None;
                }
                Vec::new()
            }
            (Phase::RunningVirtual { epoch, .. }, Input::TwinLost { reason }) => {
                // Like a twin that failed to boot: parked, and retried at once (the fence
                // still holds; the job stops what is left of the old twin first and avoids
                // the host it failed on).
                self.set(Phase::Parked {
                    epoch: *epoch,
                    reason,
                    retry_at: now,
                });
                Vec::new()
            }
            (Phase::Failover { epoch, .. }, Input::TwinMoved { host }) => {
                // The physical node's repair clock goes on: a move is not a new failure.
                let repaired = self.moving.take().flatten();
                self.set(Phase::RunningVirtual {
                    epoch: *epoch,
                    host,
                    since: now,
                });
                self.repaired_since = repaired;
                Vec::new()
            }
            (Phase::RunningVirtual { epoch, .. }, Input::FailbackNow) => {
                let epoch = *epoch;
                self.set(Phase::FailingBack { epoch, since: now });
                vec![Action::StartFailback { node: name, epoch }]
            }
            (Phase::FailingBack { .. }, Input::FailbackDone) => {
                self.last_failback = Some(now);
                self.set(Phase::Watching);
                Vec::new()
            }
            (
                Phase::FailingBack { epoch, .. },
                Input::FailbackFailed {
                    reason,
                    twin_running,
                    fence_holds,
                },
            ) => {
                let epoch = *epoch;
                let why = format!("failback of {name} failed: {reason}");
                if twin_running {
                    // Ended before the twin was stopped: it runs on (its host is filled in by
                    // the runtime from where it is placed).
                    self.set(Phase::RunningVirtual {
                        epoch,
                        host: String::new(),
                        since: now,
                    });
                } else if fence_holds {
                    // The twin was stopped, the node never powered on: the twin is started
                    // again at once, under the fence that still holds.
                    self.set(Phase::Parked {
                        epoch,
                        reason: why.clone(),
                        retry_at: now,
                    });
                } else {
                    // The node was powered on and did not come back: it failed again. A new
                    // failover (the gate, a new epoch, a fence) brings its twin back.
                    self.set(Phase::Requested { since: now });
                }
                self.refuse(why)
            }

            // Deadlines.
            (
                p @ (Phase::Failover { since, .. } | Phase::FailingBack { since, .. }),
                Input::Tick,
            ) => {
                let limit = if matches!(p, Phase::Failover { .. }) {
                    deadlines.failover
                } else {
                    deadlines.failback
                };
                let for_ms = now.saturating_sub(*since);
                if for_ms > limit.as_millis() as Millis && !self.overdue_reported {
                    self.overdue_reported = true;
                    let phase = serde_json::to_value(p)
                        .ok()
                        .and_then(|v| v["phase"].as_str().map(String::from))
                        .unwrap_or_default();
                    return vec![Action::Overdue {
                        node: name,
                        phase,
                        for_ms,
                    }];
                }
                Vec::new()
            }

            // Verdicts during jobs are recorded, not acted upon.
            (_, Input::Verdict(d, _)) => {
                self.verdict = Some(d.kind);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The state name the API and the status table show.
    pub fn state_name(&self) -> String {
        match (&self.phase, self.verdict) {
            (Phase::Watching, Some(Kind::Healthy)) => "healthy".into(),
            (Phase::Watching, Some(Kind::Degraded)) => "degraded".into(),
            (Phase::Watching, Some(Kind::BmcLost)) => "bmc-lost".into(),
            (Phase::Watching, Some(Kind::Dark)) => "dark".into(),
            (Phase::Watching, Some(k)) if k.fences() => "diagnosed".into(),
            (Phase::Watching, _) => "suspect".into(),
            (Phase::Waiting { .. } | Phase::Requested { .. }, _) => "diagnosed".into(),
            (
                Phase::Failover {
                    step: Step::Fencing,
                    ..
                },
                _,
            ) => "fencing".into(),
            (
                Phase::Failover {
                    step: Step::Fenced, ..
                },
                _,
            ) => "fenced".into(),
            (
                Phase::Failover {
                    step: Step::Placing,
                    ..
                },
                _,
            ) => "placing".into(),
            (
                Phase::Failover {
                    step: Step::BootingVirtual,
                    ..
                },
                _,
            ) => "booting-virtual".into(),
            (Phase::FencePending { .. }, _) => "fence-pending".into(),
            (Phase::Parked { .. }, _) => "fenced".into(),
            (Phase::RunningVirtual { .. }, _) => "running-virtual".into(),
            (Phase::FailingBack { .. }, _) => "failing-back".into(),
            (Phase::Maintenance, _) => "maintenance".into(),
        }
    }
}

/// The rack: every node's machine, the storm guard and the operator's pause.
#[derive(Debug, Clone, Serialize)]
pub struct Rack {
    /// The nodes.
    pub nodes: BTreeMap<String, Node>,
    /// Automation paused by an operator.
    pub paused: bool,
    /// The last epoch handed out.
    pub epoch: u64,
    /// Nodes with a pre-created paused twin, and the epoch reserved for it: that node's next
    /// failover takes this epoch, so that it resumes the twin rather than starting another.
    pub standby: BTreeMap<String, u64>,
    /// A storm refusal already logged.
    #[serde(skip)]
    storm_logged: bool,
}

impl Rack {
    /// A rack of nodes, the highest epoch so far being `epoch`.
    pub fn new(nodes: BTreeMap<String, Node>, epoch: u64) -> Self {
        Self {
            nodes,
            paused: false,
            epoch,
            standby: BTreeMap::new(),
            storm_logged: false,
        }
    }

    /// A new epoch, higher than any handed out (a failover's, or a pre-created twin's). Each
    /// node's epochs rise: a reserved one is taken only by that node's next failover.
    pub fn reserve_epoch(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    /// Turns requests into failover jobs within the storm guard; returns the actions.
    pub fn grant(&mut self, policy: &Policy, now: Millis) -> Vec<Action> {
        let total = self.nodes.len().max(1);
        let running = self
            .nodes
            .values()
            // (A move is not a failure: it is neither a failover running nor a node failing.)
            .filter(|n| matches!(n.phase, Phase::Failover { .. }) && !n.is_moving())
            .count();
        let requested: Vec<String> = self
            .nodes
            .values()
            .filter(|n| matches!(n.phase, Phase::Requested { .. }))
            .map(|n| n.name.clone())
            .collect();
        if requested.is_empty() {
            self.storm_logged = false;
            return Vec::new();
        }
        if self.paused {
            return requested
                .iter()
                .flat_map(|n| {
                    self.nodes
                        .get_mut(n)
                        .map(|x| x.refuse("automation is paused by an operator".into()))
                        .unwrap_or_default()
                })
                .collect();
        }
        let failing = self
            .nodes
            .values()
            .filter(|n| {
                matches!(
                    n.phase,
                    Phase::Requested { .. } | Phase::Waiting { .. } | Phase::Failover { .. }
                ) && !n.is_moving()
            })
            .count();
        let fraction = failing as f64 / total as f64;
        if total >= 2 && fraction > policy.storm_guard.max_failing_fraction {
            if self.storm_logged {
                return Vec::new();
            }
            self.storm_logged = true;
            return requested
                .iter()
                .map(|n| Action::Refuse {
                    node: n.clone(),
                    reason: format!(
                        "storm guard: {failing} of {total} nodes failing at once (more than {:.0} %): vigil fences nobody; this looks like its own view failing, not the rack",
                        policy.storm_guard.max_failing_fraction * 100.0
                    ),
                })
                .collect();
        }
        let slots = (policy.storm_guard.max_concurrent_failovers as usize).saturating_sub(running);
        let mut out = Vec::new();
        for n in requested.into_iter().take(slots) {
            let epoch = match self.standby.remove(&n) {
                Some(e) => e,
                None => self.reserve_epoch(),
            };
            if let Some(node) = self.nodes.get_mut(&n) {
                let why = node
                    .verdict
                    .map(|k| k.name())
                    .unwrap_or_else(|| "operator request".into());
                node.set(Phase::Failover {
                    epoch,
                    step: Step::Fencing,
                    since: now,
                });
                out.push(Action::StartFailover {
                    node: n,
                    epoch,
                    fenced: false,
                    why,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
