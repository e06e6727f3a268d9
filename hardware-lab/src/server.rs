//! One simulated server: its power model, its faults, its SEL, its BMC's sessions and moods.
//!
//! Overview: a [`SimServer`] is the single truth about a server that both of its BMC faces read
//! (Redfish now; IPMI reads the same state) and that fault injection writes. Everything is behind
//! one mutex: a BMC answers one request at a time per server in practice, and the lab's contention
//! is tiny. Time is the lab clock ([`crate::clock::LabClock`]), so a test can reason about it.
//!
//! Scope: state and the rules that change it. Serving HTTP is `redfish.rs`; the control API is
//! `control.rs`.
//!
//! Key types: [`SimServer`], [`ServerState`], [`SelEntry`], [`BmcMood`].

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vigil::config::FirmwareProfile;

use crate::clock::LabClock;
use crate::faults::{Fault, FaultKind};
use crate::mockup::Mockup;
use crate::power::{Millis, PowerEvent, PowerModel, PowerState, Timing};

/// One SEL record, as a real BMC writes it (the IPMI sensor type, name and event, which Redfish
/// BMCs carry over into their SEL LogEntry messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SelEntry {
    /// Record id, increasing.
    pub id: u32,
    /// Unix seconds.
    pub created: u64,
    /// `OK`, `Warning` or `Critical`.
    pub severity: &'static str,
    /// IPMI sensor type (`Power Supply`, `Temperature`, `Processor`, ...).
    pub sensor_type: &'static str,
    /// The sensor's name (`PS1 Status`, `CPU1 Temp`).
    pub sensor: String,
    /// The event (`Failure detected`, `Upper Critical going high`).
    pub event: &'static str,
    /// `Asserted` or `Deasserted`.
    pub direction: &'static str,
}

impl SelEntry {
    /// The message as ipmitool's `sel elist` and Redfish SEL entries show it.
    pub fn message(&self) -> String {
        format!(
            "{} {} | {} | {}",
            self.sensor_type, self.sensor, self.event, self.direction
        )
    }
}

/// How the BMC itself misbehaves (independent of the host's faults).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BmcMood {
    /// Every answer is delayed this long.
    pub delay_ms: u64,
    /// The next `count` requests answer `status`.
    pub http_error: Option<(u16, u32)>,
    /// GETs answer truncated JSON.
    pub malformed_json: bool,
    /// GETs answer a body far larger than any resource.
    pub oversized_body: bool,
    /// PowerState is frozen at this value.
    pub stale_power: Option<PowerState>,
    /// The BMC is unreachable (down, rebooting, or its network cut) until this lab time
    /// (`u64::MAX`: until repaired).
    pub unreachable_until: Option<Millis>,
    /// The Redfish service alone is down.
    pub redfish_down: bool,
    /// The IPMI service alone is down.
    pub ipmi_down: bool,
    /// After a BMC reboot, PowerState is missing until this lab time (firmware with the
    /// `power-state-missing` quirk).
    pub power_state_missing_until: Option<Millis>,
}

/// What the simulated OS is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OsState {
    /// Not running (host off or in POST).
    Down,
    /// Running, heartbeating, petting the watchdog.
    Running,
    /// Frozen: no heartbeats, watchdog not petted.
    Hung,
    /// Running, watchdog petted, but its heartbeats never reach the appliance.
    Isolated,
}

/// What the BMC does when the OS stops petting its watchdog: the action the OS sets (Set
/// Watchdog Timer's timeout action), a per-server choice in the topology.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchdogAction {
    /// Status only: the expiry is logged and the host left as it is. ipmi_sim cannot run such a
    /// timer (a Reset Watchdog with no action stops it), so the lab's own model counts it down.
    #[default]
    None,
    /// Hard reset (Linux `ipmi_watchdog`'s default): the host reboots.
    HardReset,
    /// Power down: the hung host turns itself off.
    PowerDown,
    /// Power cycle: off, then on again.
    PowerCycle,
}

impl WatchdogAction {
    /// The timeout action's code in Set Watchdog Timer (IPMI 2.0 table 27-2).
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::HardReset => 1,
            Self::PowerDown => 2,
            Self::PowerCycle => 3,
        }
    }

    /// The Watchdog 2 sensor's event for an expiry with this action (IPMI table 42-3, as the
    /// lab's Redfish SEL writes it).
    pub fn event(self) -> &'static str {
        match self {
            Self::None => "Timer expired, status only",
            Self::HardReset => "Hard reset",
            Self::PowerDown => "Power down",
            Self::PowerCycle => "Power cycle",
        }
    }
}

/// The host's IPMI watchdog timer, as the OS arms and pets it and the BMC counts it down.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Watchdog {
    /// Whether the OS has armed it (it does at boot; a power-off stops it).
    pub armed: bool,
    /// Its timeout.
    pub timeout_ms: Millis,
    /// When it was last petted.
    pub last_pet: Millis,
    /// Whether it ran out (cleared by the next pet).
    pub expired: bool,
    /// What the BMC does when it runs out.
    pub action: WatchdogAction,
    /// Whether the server's real IPMI BMC counts it down (the OS arms and pets ipmi_sim's
    /// watchdog in-band, and ipmi_sim's expiry acts): then the model does not expire it itself,
    /// unless the action is status only, which ipmi_sim cannot run.
    pub in_band: bool,
    /// Expiries so far (the IPMI mirror clears the sensor after each, so the next one logs).
    pub expiries: u64,
}

impl Watchdog {
    /// The countdown the BMC reports (Get Watchdog Timer's present count), in ms.
    pub fn countdown(&self, now: Millis) -> Millis {
        if !self.armed {
            return self.timeout_ms;
        }
        self.timeout_ms
            .saturating_sub(now.saturating_sub(self.last_pet))
    }
}

/// A Redfish session.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    /// Its id (the last part of its URI).
    pub id: String,
    /// The token (never logged; it lives only in the lab).
    #[serde(skip)]
    pub token: String,
    /// Who opened it.
    pub user: String,
}

/// Everything mutable about a server.
#[derive(Debug, Serialize)]
pub struct ServerState {
    /// Power and boot.
    pub power: PowerModel,
    /// The OS.
    pub os: OsState,
    /// Faults in force, with when they end (`None`: until repaired).
    pub faults: Vec<(Fault, Option<Millis>)>,
    /// SEL records added since the lab started (the capture's own come first).
    pub sel: Vec<SelEntry>,
    /// Next SEL record id.
    next_sel_id: u32,
    /// The BMC's mood.
    pub mood: BmcMood,
    /// Open sessions.
    pub sessions: Vec<Session>,
    /// Sessions ever opened (for the lab's leak accounting).
    pub sessions_opened: u64,
    /// Sessions ever closed by the client.
    pub sessions_closed: u64,
    /// Sessions the BMC refused because its limit was reached.
    pub sessions_refused: u64,
    /// Reset actions received, by type, in order (for tests counting power actions).
    pub resets: Vec<(Millis, String)>,
    /// Transitions not yet taken by the simulated OS.
    #[serde(skip)]
    pub pending_events: Vec<PowerEvent>,
    /// How many times the host went off (each PoweredOff, a reset's or a cycle's too): what
    /// runs on its power dies with it, even when no reading ever saw it Off.
    pub power_offs: u64,
    /// The host watchdog.
    pub watchdog: Watchdog,
    /// Whether the OS state itself pets the watchdog (no agent process runs for this server).
    pub self_petting: bool,
}

/// One simulated server.
#[derive(Debug)]
pub struct SimServer {
    /// Its name in the topology.
    pub name: String,
    /// Its firmware profile.
    pub profile: FirmwareProfile,
    /// The capture its Redfish BMC is seeded from.
    pub mockup: Arc<Mockup>,
    /// The BMC user.
    pub username: String,
    /// The BMC password (lab-generated).
    pub password: String,
    /// The lab clock.
    pub clock: LabClock,
    /// Lab time per real time of the firmware profile's durations.
    pub time_scale: f64,
    /// Signalled when a fault is injected or repaired, so the BMC's listener reacts at once.
    pub changed: tokio::sync::Notify,
    state: Mutex<ServerState>,
}

/// The watchdog timeout an OS sets in the lab (lab milliseconds).
pub const DEFAULT_WATCHDOG_TIMEOUT_MS: Millis = 10_000;

/// Scales a profile duration to lab time.
fn scaled(d: std::time::Duration, scale: f64) -> Millis {
    ((d.as_secs_f64() * 1000.0 * scale).round() as Millis).max(1)
}

impl SimServer {
    /// A server following `profile`, seeded from `mockup`, running its OS.
    pub fn new(
        name: &str,
        profile: FirmwareProfile,
        mockup: Arc<Mockup>,
        username: &str,
        password: &str,
        clock: LabClock,
        time_scale: f64,
    ) -> Self {
        let t = profile.timing;
        let timing = Timing {
            off_reflect: scaled(t.power_off_reflect, time_scale),
            on_reflect: scaled(t.power_on_reflect, time_scale),
            post: scaled(t.post, time_scale),
        };
        let now = clock.now();
        Self {
            name: name.to_string(),
            profile,
            mockup,
            username: username.to_string(),
            password: password.to_string(),
            clock,
            time_scale,
            changed: tokio::sync::Notify::new(),
            state: Mutex::new(ServerState {
                power: PowerModel::new(timing, true, now),
                os: OsState::Running,
                faults: Vec::new(),
                sel: Vec::new(),
                next_sel_id: 1,
                mood: BmcMood::default(),
                sessions: Vec::new(),
                sessions_opened: 0,
                sessions_closed: 0,
                sessions_refused: 0,
                resets: Vec::new(),
                pending_events: Vec::new(),
                power_offs: 0,
                watchdog: Watchdog {
                    armed: true,
                    timeout_ms: DEFAULT_WATCHDOG_TIMEOUT_MS,
                    last_pet: now,
                    expired: false,
                    action: WatchdogAction::None,
                    in_band: false,
                    expiries: 0,
                },
                self_petting: true,
            }),
        }
    }

    /// The state, brought up to date with the clock (power transitions, faults that ended).
    pub fn state(&self) -> MutexGuard<'_, ServerState> {
        // A poisoned lock means a lab thread panicked mid-update; the lab is a test tool and the
        // state is still the best there is, so keep serving it.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now();
        s.advance(now);
        s
    }

    /// Scales a profile duration to this lab's time.
    pub fn lab_time(&self, d: std::time::Duration) -> Millis {
        scaled(d, self.time_scale)
    }

    /// Injects a fault (see [`crate::faults`] for what each one does).
    pub fn inject(&self, fault: Fault) {
        let now = self.clock.now();
        let mut s = self.state();
        let until = fault.duration_ms.map(|d| now + d);
        s.apply(&fault, now, self.post_stage_for_hang());
        if fault.kind == FaultKind::SessionExhaustion {
            // Someone else (a forgotten script, another tool) holds every slot.
            while s.sessions.len() < self.profile.redfish.max_sessions as usize {
                let id = format!("phantom-{}", s.sessions.len());
                s.sessions.push(Session {
                    id,
                    token: format!("lab-phantom-token-{}", rand::random::<u64>()),
                    user: "lab-phantom".to_string(),
                });
            }
        }
        s.faults.push((fault, until));
        drop(s);
        self.changed.notify_waiters();
    }

    /// Ends every fault; the server comes back as a repaired one would (powered on, booting).
    pub fn repair(&self) {
        let now = self.clock.now();
        let mut s = self.state();
        let faults = std::mem::take(&mut s.faults);
        for (f, _) in faults.iter().rev() {
            s.undo(f, now);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// The OS petted the watchdog (through the in-band channel).
    pub fn pet_watchdog(&self) {
        let now = self.clock.now();
        let mut s = self.state();
        // Only a running OS pets. A datagram that arrives once the host is down or the OS hung
        // was sent before (or by an agent resumed only to be killed on a reset): arming the
        // timer of a host in POST with it would make the BMC reset it again a countdown later.
        if !matches!(s.os, OsState::Running | OsState::Isolated) {
            return;
        }
        s.watchdog.armed = true;
        s.watchdog.last_pet = now;
        s.watchdog.expired = false;
    }

    /// Whether a heartbeat sent now reaches the appliance (the service network is up).
    pub fn heartbeat_passes(&self) -> bool {
        let s = self.state();
        // Only a running OS sends: a datagram still in flight from an OS that hung or went down
        // is not passed on after the fact.
        if s.os != OsState::Running || s.has(FaultKind::NetworkIsolation) || s.has(FaultKind::Dark)
        {
            return false;
        }
        let loss = s
            .faults
            .iter()
            .filter(|(f, _)| f.kind == FaultKind::HeartbeatLoss)
            .map(|(f, _)| f.percent)
            .max()
            .unwrap_or(0);
        loss == 0 || rand::random::<u8>() % 100 >= loss
    }

    /// Takes the power transitions not yet seen by the OS simulation, with the OS state now.
    pub fn take_os_events(&self) -> (Vec<PowerEvent>, OsState) {
        let mut s = self.state();
        (std::mem::take(&mut s.pending_events), s.os)
    }

    /// Whether the OS state pets the watchdog by itself (no agent process), or an agent does.
    pub fn set_self_petting(&self, on: bool) {
        self.state().self_petting = on;
    }

    fn post_stage_for_hang(&self) -> usize {
        // Memory initialisation: where real POSTs most often stop (DIMM training).
        2
    }
}

impl ServerState {
    /// Adds a SEL record.
    pub fn add_sel(
        &mut self,
        severity: &'static str,
        sensor_type: &'static str,
        sensor: &str,
        event: &'static str,
        direction: &'static str,
    ) {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = self.next_sel_id;
        self.next_sel_id += 1;
        self.sel.push(SelEntry {
            id,
            created,
            severity,
            sensor_type,
            sensor: sensor.to_string(),
            event,
            direction,
        });
    }

    fn has(&self, kind: FaultKind) -> bool {
        self.faults.iter().any(|(f, _)| f.kind == kind)
    }

    /// Whether a fault of `kind` is in force.
    pub fn has_fault(&self, kind: FaultKind) -> bool {
        self.has(kind)
    }

    /// Brings power and faults up to `now`.
    fn advance(&mut self, now: Millis) {
        let events = self.power.tick(now);
        self.on_power_events(&events);
        if self.self_petting && matches!(self.os, OsState::Running | OsState::Isolated) {
            self.watchdog.armed = true;
            self.watchdog.last_pet = now;
            self.watchdog.expired = false;
        }
        let model_counts = !self.watchdog.in_band || self.watchdog.action == WatchdogAction::None;
        if model_counts
            && self.watchdog.armed
            && !self.watchdog.expired
            && now.saturating_sub(self.watchdog.last_pet) >= self.watchdog.timeout_ms
        {
            let power = match self.watchdog.action {
                WatchdogAction::None => None,
                WatchdogAction::HardReset => Some(PowerAction::Restart),
                WatchdogAction::PowerDown => Some(PowerAction::Off),
                WatchdogAction::PowerCycle => Some(PowerAction::Cycle),
            };
            self.watchdog_expired(power, now);
        }
        // Faults with a duration end by themselves, as a repair of just them.
        let (ended, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.faults)
            .into_iter()
            .partition(|(_, until)| until.is_some_and(|u| now >= u));
        self.faults = kept;
        for (f, _) in ended.iter().rev() {
            self.undo(f, now);
        }
        if let Some(u) = self.mood.unreachable_until
            && now >= u
        {
            self.mood.unreachable_until = None;
        }
    }

    /// The watchdog ran out: the Watchdog 2 record, then the action's power change (`None` for
    /// status only). Called by the model's own countdown, or by the host connection when the real
    /// IPMI BMC sends RESET or POWEROFF.
    pub fn watchdog_expired(&mut self, power: Option<PowerAction>, now: Millis) {
        self.watchdog.expired = true;
        self.watchdog.expiries += 1;
        let event = self.watchdog.action.event();
        self.add_sel("Warning", "Watchdog 2", "IPMI Watchdog", event, "Asserted");
        if let Some(p) = power {
            // Not a request through a BMC interface: `resets` keeps it apart from those.
            self.resets.push((now, format!("Watchdog{p:?}")));
            // A cycle of a powered host is seen from outside as a restart (POST again), as in
            // `power_action`. In-band, ipmi_sim sends POWEROFF and turns the host on again itself
            // through chassis control, so the host connection passes `Off`.
            let ev = match p {
                PowerAction::Off => self.power.power_off(now),
                PowerAction::Restart | PowerAction::Cycle => self.power.restart(now),
                PowerAction::On => self.power.power_on(now),
            };
            self.on_power_events(&ev);
        }
    }

    fn on_power_events(&mut self, events: &[PowerEvent]) {
        for e in events {
            match e {
                PowerEvent::PoweredOff | PowerEvent::PoweredOn => {
                    if *e == PowerEvent::PoweredOff {
                        self.power_offs += 1;
                    }
                    self.os = OsState::Down;
                    // A reset stops the watchdog; the next OS arms it again.
                    self.watchdog.armed = false;
                    self.watchdog.expired = false;
                }
                PowerEvent::OsRunning => {
                    self.os = if self.has(FaultKind::OsHang) {
                        // The hang is in force until repaired: the OS hangs again once up
                        // (before its agent starts), as after a watchdog reset.
                        OsState::Hung
                    } else if self.has(FaultKind::NetworkIsolation) || self.has(FaultKind::Dark) {
                        OsState::Isolated
                    } else {
                        OsState::Running
                    }
                }
            }
            self.pending_events.push(*e);
        }
    }

    /// Performs a power action requested through a BMC (Redfish reset or IPMI chassis control).
    pub fn power_action(&mut self, action: PowerAction, now: Millis) {
        self.resets.push((now, format!("{action:?}")));
        let ev = match action {
            PowerAction::Off => self.power.power_off(now),
            PowerAction::On => {
                // A host whose power is gone cannot come on until the cause is repaired.
                if self.power_blocked() {
                    Vec::new()
                } else {
                    self.power.power_on(now)
                }
            }
            PowerAction::Restart => self.power.restart(now),
            // A cycle of a powered host is seen from outside as a restart (POST again); of
            // an off host, as a power-on.
            PowerAction::Cycle => match self.power.power_state() {
                PowerState::Off if !self.power_blocked() => self.power.power_on(now),
                PowerState::Off => Vec::new(),
                _ => self.power.restart(now),
            },
        };
        self.on_power_events(&ev);
    }

    fn power_blocked(&self) -> bool {
        self.faults
            .iter()
            .any(|(f, _)| f.kind.cuts_power() || (f.kind == FaultKind::PsuFailure && f.all))
    }

    fn apply(&mut self, f: &Fault, now: Millis, hang_stage: usize) {
        use FaultKind::*;
        match f.kind {
            OsHang => {
                if self.os != OsState::Down {
                    self.os = OsState::Hung;
                }
                // Status only: the record is written at the hang, as the lab always has (the
                // scenarios' timelines rest on it). With an action, the expiry writes it, one
                // countdown after the last pet, and acts.
                if self.watchdog.action == WatchdogAction::None {
                    self.add_sel(
                        "Warning",
                        "Watchdog 2",
                        "IPMI Watchdog",
                        "Timer expired, status only",
                        "Asserted",
                    );
                }
            }
            KernelPanic => {
                self.add_sel(
                    "Critical",
                    "OS Critical Stop",
                    "OS Status",
                    "Run-time critical stop",
                    "Asserted",
                );
                if f.reboot_loop {
                    // Panics again in every boot: seen from outside as a POST/boot cycle that never
                    // reaches the OS. Modelled as a host that restarts and hangs in late POST.
                    let ev = self.power.hang_post(5, now);
                    self.on_power_events(&ev);
                } else if self.os != OsState::Down {
                    self.os = OsState::Hung;
                }
            }
            PostHang => {
                self.add_sel(
                    "Critical",
                    "System Firmware Progress",
                    "BIOS POST",
                    "System Firmware Hang",
                    "Asserted",
                );
                let ev = self.power.hang_post(hang_stage, now);
                self.on_power_events(&ev);
            }
            PowerLoss => {
                self.add_sel(
                    "Critical",
                    "Power Supply",
                    "PS1 Status",
                    "Power Supply AC lost",
                    "Asserted",
                );
                self.add_sel(
                    "Critical",
                    "Power Supply",
                    "PS2 Status",
                    "Power Supply AC lost",
                    "Asserted",
                );
                self.add_sel(
                    "Critical",
                    "Power Unit",
                    "Pwr Unit Status",
                    "Power off/down",
                    "Asserted",
                );
                let ev = self.power.lose_power(now);
                self.on_power_events(&ev);
            }
            PsuFailure => {
                self.add_sel(
                    "Critical",
                    "Power Supply",
                    "PS1 Status",
                    "Failure detected",
                    "Asserted",
                );
                if f.all {
                    self.add_sel(
                        "Critical",
                        "Power Supply",
                        "PS2 Status",
                        "Failure detected",
                        "Asserted",
                    );
                    let ev = self.power.lose_power(now);
                    self.on_power_events(&ev);
                } else {
                    self.add_sel(
                        "Warning",
                        "Power Supply",
                        "PS Redundancy",
                        "Redundancy Lost",
                        "Asserted",
                    );
                }
            }
            VrFault => {
                self.add_sel(
                    "Critical",
                    "Voltage",
                    "CPU1 VCCIN",
                    "Upper Critical going high",
                    "Asserted",
                );
                self.add_sel(
                    "Critical",
                    "Power Unit",
                    "Pwr Unit Status",
                    "Power off/down",
                    "Asserted",
                );
                let ev = self.power.lose_power(now);
                self.on_power_events(&ev);
            }
            ThermalTrip => {
                self.add_sel(
                    "Critical",
                    "Temperature",
                    "CPU1 Temp",
                    "Upper Critical going high",
                    "Asserted",
                );
                self.add_sel(
                    "Critical",
                    "Processor",
                    "CPU1 Status",
                    "Thermal Trip",
                    "Asserted",
                );
                let ev = self.power.lose_power(now);
                self.on_power_events(&ev);
            }
            CpuIerr => {
                self.add_sel("Critical", "Processor", "CPU1 Status", "IERR", "Asserted");
                if self.os != OsState::Down {
                    self.os = OsState::Hung;
                }
            }
            MemoryUncorrectable => {
                self.add_sel(
                    "Critical",
                    "Memory",
                    "DIMM A1",
                    "Uncorrectable ECC",
                    "Asserted",
                );
                if self.os != OsState::Down {
                    self.os = OsState::Hung;
                }
            }
            NetworkIsolation => {
                if self.os == OsState::Running {
                    self.os = OsState::Isolated;
                }
            }
            HeartbeatLoss => {}
            BmcDown => self.mood.unreachable_until = Some(Millis::MAX),
            Dark => {
                self.mood.unreachable_until = Some(Millis::MAX);
                if self.os == OsState::Running {
                    self.os = OsState::Isolated;
                }
            }
            Slow => self.mood.delay_ms = f.delay_ms,
            HttpError => self.mood.http_error = Some((f.status, f.count)),
            SessionExhaustion => {}
            MalformedJson => self.mood.malformed_json = true,
            OversizedBody => self.mood.oversized_body = true,
            StalePowerState => self.mood.stale_power = Some(self.power.power_state()),
            RedfishDown => self.mood.redfish_down = true,
            IpmiDown => self.mood.ipmi_down = true,
            BmcReboot => {
                let until = now + f.duration_ms.unwrap_or(5_000);
                self.mood.unreachable_until = Some(until);
                // A rebooting BMC loses its sessions.
                self.sessions.clear();
                self.mood.power_state_missing_until = Some(until + 2_000);
            }
        }
    }

    fn undo(&mut self, f: &Fault, now: Millis) {
        use FaultKind::*;
        match f.kind {
            OsHang | CpuIerr | MemoryUncorrectable | NetworkIsolation => {
                if matches!(self.os, OsState::Hung | OsState::Isolated) {
                    self.os = OsState::Running;
                }
                if matches!(f.kind, CpuIerr | MemoryUncorrectable) {
                    self.add_sel("OK", "Processor", "CPU1 Status", "IERR", "Deasserted");
                }
            }
            KernelPanic | PostHang => {
                self.power.clear_post_hang(now);
                if self.os == OsState::Hung {
                    self.os = OsState::Running;
                }
            }
            PowerLoss | VrFault | ThermalTrip => {
                self.add_sel(
                    "OK",
                    "Power Unit",
                    "Pwr Unit Status",
                    "Power off/down",
                    "Deasserted",
                );
                // Repaired hardware is powered on by the technician, as on a real rack.
                let ev = self.power.power_on(now);
                self.on_power_events(&ev);
            }
            PsuFailure => {
                self.add_sel(
                    "OK",
                    "Power Supply",
                    "PS1 Status",
                    "Failure detected",
                    "Deasserted",
                );
                if f.all {
                    let ev = self.power.power_on(now);
                    self.on_power_events(&ev);
                }
            }
            BmcDown | Dark | BmcReboot => {
                self.mood.unreachable_until = None;
                if self.os == OsState::Isolated && f.kind == Dark {
                    self.os = OsState::Running;
                }
            }
            HeartbeatLoss => {}
            Slow => self.mood.delay_ms = 0,
            HttpError => self.mood.http_error = None,
            SessionExhaustion => self.sessions.retain(|s| !s.user.starts_with("lab-phantom")),
            MalformedJson => self.mood.malformed_json = false,
            OversizedBody => self.mood.oversized_body = false,
            StalePowerState => self.mood.stale_power = None,
            RedfishDown => self.mood.redfish_down = false,
            IpmiDown => self.mood.ipmi_down = false,
        }
    }

    /// Whether the BMC answers at `now`.
    pub fn bmc_reachable(&self, now: Millis) -> bool {
        self.mood.unreachable_until.is_none_or(|u| now >= u)
    }

    /// The Redfish health rollup of the system: Critical for a hardware fault, Warning for a
    /// degradation, OK otherwise.
    pub fn health(&self) -> &'static str {
        use FaultKind::*;
        let critical = self.faults.iter().any(|(f, _)| {
            matches!(
                f.kind,
                PowerLoss | VrFault | ThermalTrip | CpuIerr | MemoryUncorrectable | PostHang
            ) || (f.kind == PsuFailure && f.all)
        });
        if critical {
            "Critical"
        } else if self.has(PsuFailure) {
            "Warning"
        } else {
            "OK"
        }
    }
}

/// A power action as both BMC faces request it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Off (ForceOff, chassis power off).
    Off,
    /// On.
    On,
    /// Warm reset (ForceRestart, chassis power reset).
    Restart,
    /// Off then on (PowerCycle, chassis power cycle).
    Cycle,
}
