//! The power and boot model of one simulated server: pure, with time as an input.
//!
//! Overview: a real server does not switch state at once. A ForceOff shows `PoweringOff` for a
//! while before `Off`; a power-on shows `PoweringOn`, then the host walks through POST (processor,
//! memory, PCI initialisation) before the OS boots and runs. [`PowerModel`] keeps the phase the
//! server is in and when it entered it, and answers "what does the BMC report now?" for any `now`.
//! Every duration comes from the server's firmware profile, scaled by the lab's time scale (real
//! POSTs take minutes; the lab keeps their proportions in seconds).
//!
//! Scope: power, boot progress and the faults that act on them (power lost, hung in POST). It does
//! not know about Redfish, IPMI or the OS: those read it.
//!
//! Key types: [`PowerModel`], [`PowerState`], [`PowerEvent`].

use serde::Serialize;

/// Milliseconds since the lab started.
pub type Millis = u64;

/// Power as a BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PowerState {
    /// Off.
    Off,
    /// On its way on (PSU and VRs ramping, BMC releasing reset).
    PoweringOn,
    /// On (POST or OS).
    On,
    /// On its way off.
    PoweringOff,
}

impl PowerState {
    /// The Redfish `PowerState` string.
    pub fn redfish(self) -> &'static str {
        match self {
            PowerState::Off => "Off",
            PowerState::PoweringOn => "PoweringOn",
            PowerState::On => "On",
            PowerState::PoweringOff => "PoweringOff",
        }
    }

    /// Whether the chassis is drawing power (IPMI "Chassis Power is on").
    pub fn is_powered(self) -> bool {
        !matches!(self, PowerState::Off)
    }
}

/// The Redfish BootProgress stages a POST walks through, with the share of the POST time each
/// takes to be reached (the last one is reached when POST ends).
const POST_STAGES: &[(&str, u32)] = &[
    ("PrimaryProcessorInitializationStarted", 0),
    ("BusInitializationStarted", 10),
    ("MemoryInitializationStarted", 20),
    ("SecondaryProcessorInitializationStarted", 45),
    ("PCIResourceConfigStarted", 55),
    ("SystemHardwareInitializationComplete", 85),
];

/// How long the OS takes from the end of POST to running, as a share of the POST time.
const OS_BOOT_SHARE_PERCENT: u64 = 20;

/// Durations of one server's transitions, already scaled to lab time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timing {
    /// ForceOff until Off.
    pub off_reflect: Millis,
    /// On until PowerState On (POST starts).
    pub on_reflect: Millis,
    /// POST, from On until the OS boot starts.
    pub post: Millis,
}

/// What the server is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Off since `since`.
    Off {
        /// When it went off.
        since: Millis,
        /// Whether someone asked for it (a reset action) or it was lost (a fault).
        requested: bool,
    },
    /// Going off; off at `until`.
    PoweringOff {
        /// When it will read Off.
        until: Millis,
    },
    /// Going on; POST starts at `until`.
    PoweringOn {
        /// When it will read On.
        until: Millis,
    },
    /// On, in POST or booting the OS, since `since` (the end of PoweringOn).
    Booting {
        /// When POST started.
        since: Millis,
    },
    /// On, stuck in POST at stage index `stage` (a post-hang fault).
    PostHung {
        /// The stage it is stuck at.
        stage: usize,
    },
    /// On, OS running since `since`.
    Running {
        /// When the OS started running.
        since: Millis,
    },
}

/// A transition the rest of the lab reacts to (the OS starting or dying with the power).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PowerEvent {
    /// The OS reached "running": start its agent.
    OsRunning,
    /// Power went away (requested or not): the OS dies with it.
    PoweredOff,
    /// Power came on: POST starts.
    PoweredOn,
}

/// A server's power and boot state over time.
#[derive(Debug, Clone, Serialize)]
pub struct PowerModel {
    timing: Timing,
    phase: Phase,
    /// When the last Off was reached, for the "On too soon after Off" quirk.
    last_off_at: Option<Millis>,
    /// A fault that keeps the next POST hung at this stage.
    hang_post_at: Option<usize>,
}

impl PowerModel {
    /// A server that is running (OS up) or off at `now`.
    pub fn new(timing: Timing, running: bool, now: Millis) -> Self {
        Self {
            timing,
            phase: if running {
                Phase::Running { since: now }
            } else {
                Phase::Off {
                    since: now,
                    requested: true,
                }
            },
            last_off_at: None,
            hang_post_at: None,
        }
    }

    /// Its timing.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The current phase (after [`PowerModel::tick`]).
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When it last reached Off.
    pub fn last_off_at(&self) -> Option<Millis> {
        self.last_off_at
    }

    /// Moves the phase forward to `now`, returning what happened on the way, in order.
    pub fn tick(&mut self, now: Millis) -> Vec<PowerEvent> {
        let mut events = Vec::new();
        loop {
            let next = match self.phase {
                Phase::PoweringOff { until } if now >= until => {
                    self.last_off_at = Some(until);
                    events.push(PowerEvent::PoweredOff);
                    Phase::Off {
                        since: until,
                        requested: true,
                    }
                }
                Phase::PoweringOn { until } if now >= until => {
                    events.push(PowerEvent::PoweredOn);
                    match self.hang_post_at {
                        Some(stage) => Phase::PostHung { stage },
                        None => Phase::Booting { since: until },
                    }
                }
                Phase::Booting { since } if now >= since + self.boot_time() => {
                    events.push(PowerEvent::OsRunning);
                    Phase::Running {
                        since: since + self.boot_time(),
                    }
                }
                _ => break,
            };
            self.phase = next;
        }
        events
    }

    fn boot_time(&self) -> Millis {
        self.timing.post + self.timing.post * OS_BOOT_SHARE_PERCENT / 100
    }

    /// What the BMC reports as PowerState.
    pub fn power_state(&self) -> PowerState {
        match self.phase {
            Phase::Off { .. } => PowerState::Off,
            Phase::PoweringOff { .. } => PowerState::PoweringOff,
            Phase::PoweringOn { .. } => PowerState::PoweringOn,
            Phase::Booting { .. } | Phase::PostHung { .. } | Phase::Running { .. } => {
                PowerState::On
            }
        }
    }

    /// The Redfish BootProgress.LastState.
    pub fn boot_progress(&self, now: Millis) -> &'static str {
        match self.phase {
            Phase::Off { .. } | Phase::PoweringOn { .. } | Phase::PoweringOff { .. } => "None",
            Phase::PostHung { stage } => POST_STAGES[stage.min(POST_STAGES.len() - 1)].0,
            Phase::Booting { since } => {
                let elapsed = now.saturating_sub(since);
                if elapsed >= self.timing.post {
                    return "OSBootStarted";
                }
                let pct = elapsed * 100 / self.timing.post.max(1);
                POST_STAGES
                    .iter()
                    .rev()
                    .find(|(_, at)| pct >= u64::from(*at))
                    .map_or(POST_STAGES[0].0, |(s, _)| s)
            }
            Phase::Running { .. } => "OSRunning",
        }
    }

    /// Whether the host is in POST (for the "reset during POST" quirk).
    pub fn in_post(&self, now: Millis) -> bool {
        match self.phase {
            Phase::PostHung { .. } => true,
            Phase::Booting { since } => now.saturating_sub(since) < self.timing.post,
            _ => false,
        }
    }

    /// Whether the OS is running.
    pub fn os_running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    /// A requested power-off (ForceOff, IPMI chassis power off). Already off: nothing changes.
    pub fn power_off(&mut self, now: Millis) -> Vec<PowerEvent> {
        let mut ev = self.tick(now);
        match self.phase {
            Phase::Off { .. } | Phase::PoweringOff { .. } => {}
            _ => {
                self.phase = Phase::PoweringOff {
                    until: now + self.timing.off_reflect,
                };
                ev.extend(self.tick(now));
            }
        }
        ev
    }

    /// A requested power-on. Already on or on its way: nothing changes.
    pub fn power_on(&mut self, now: Millis) -> Vec<PowerEvent> {
        let mut ev = self.tick(now);
        if let Phase::Off { .. } = self.phase {
            self.phase = Phase::PoweringOn {
                until: now + self.timing.on_reflect,
            };
            ev.extend(self.tick(now));
        }
        ev
    }

    /// A reset of a powered host (ForceRestart, PowerCycle): POST starts again at once.
    pub fn restart(&mut self, now: Millis) -> Vec<PowerEvent> {
        let mut ev = self.tick(now);
        match self.phase {
            Phase::Off { .. } | Phase::PoweringOff { .. } | Phase::PoweringOn { .. } => {}
            _ => {
                ev.push(PowerEvent::PoweredOff);
                self.phase = Phase::PoweringOn { until: now };
                ev.extend(self.tick(now));
            }
        }
        ev
    }

    /// Power lost without a request (PSU, AC, thermal trip, VR): off at once.
    pub fn lose_power(&mut self, now: Millis) -> Vec<PowerEvent> {
        let mut ev = self.tick(now);
        if !matches!(self.phase, Phase::Off { .. }) {
            self.phase = Phase::Off {
                since: now,
                requested: false,
            };
            self.last_off_at = Some(now);
            ev.push(PowerEvent::PoweredOff);
        }
        ev
    }

    /// Makes POST hang at `stage` (an index into the POST stages) from the next boot on; a
    /// running host is reset into the hang, as a kernel panic with reboot would do.
    pub fn hang_post(&mut self, stage: usize, now: Millis) -> Vec<PowerEvent> {
        self.hang_post_at = Some(stage.min(POST_STAGES.len() - 1));
        self.restart(now)
    }

    /// Clears a POST hang; a host stuck in it continues booting from `now`.
    pub fn clear_post_hang(&mut self, now: Millis) {
        self.hang_post_at = None;
        if let Phase::PostHung { .. } = self.phase {
            self.phase = Phase::Booting { since: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        off_reflect: 100,
        on_reflect: 50,
        post: 1000,
    };

    #[test]
    fn force_off_reads_powering_off_before_off() {
        let mut m = PowerModel::new(T, true, 0);
        assert_eq!(m.power_off(10), vec![]);
        assert_eq!(m.power_state(), PowerState::PoweringOff);
        assert_eq!(m.tick(109), vec![]);
        assert_eq!(m.power_state(), PowerState::PoweringOff);
        assert_eq!(m.tick(110), vec![PowerEvent::PoweredOff]);
        assert_eq!(m.power_state(), PowerState::Off);
        assert_eq!(m.last_off_at(), Some(110));
        // Already off: a second ForceOff changes nothing.
        assert_eq!(m.power_off(200), vec![]);
        assert_eq!(m.power_state(), PowerState::Off);
    }

    #[test]
    fn power_on_walks_through_post_to_os_running() {
        let mut m = PowerModel::new(T, false, 0);
        m.power_on(0);
        assert_eq!(m.power_state(), PowerState::PoweringOn);
        assert_eq!(m.tick(50), vec![PowerEvent::PoweredOn]);
        assert_eq!(m.boot_progress(50), "PrimaryProcessorInitializationStarted");
        m.tick(50 + 300);
        assert_eq!(m.boot_progress(350), "MemoryInitializationStarted");
        assert!(m.in_post(350));
        m.tick(1050);
        assert_eq!(m.boot_progress(1050), "OSBootStarted");
        assert!(!m.in_post(1050));
        assert_eq!(m.tick(1250), vec![PowerEvent::OsRunning]);
        assert_eq!(m.boot_progress(1250), "OSRunning");
        assert!(m.os_running());
    }

    #[test]
    fn a_long_gap_replays_every_event_in_order() {
        let mut m = PowerModel::new(T, false, 0);
        m.power_on(0);
        assert_eq!(
            m.tick(10_000),
            vec![PowerEvent::PoweredOn, PowerEvent::OsRunning]
        );
    }

    #[test]
    fn lost_power_is_off_at_once_and_unrequested() {
        let mut m = PowerModel::new(T, true, 0);
        assert_eq!(m.lose_power(5), vec![PowerEvent::PoweredOff]);
        assert_eq!(
            m.phase(),
            Phase::Off {
                since: 5,
                requested: false
            }
        );
    }

    #[test]
    fn a_post_hang_holds_its_stage_until_cleared() {
        let mut m = PowerModel::new(T, true, 0);
        m.hang_post(2, 100);
        m.tick(100_000);
        assert_eq!(m.boot_progress(100_000), "MemoryInitializationStarted");
        assert!(m.in_post(100_000));
        m.clear_post_hang(100_000);
        assert_eq!(m.tick(101_200), vec![PowerEvent::OsRunning]);
    }
}
