//! The evidence matrix, row by row, on a fake clock, millisecond-exact; and the properties every
//! verdict must keep.

use proptest::prelude::*;

use super::*;
use crate::model::{Protocol, PsuReading, SensorReading};

const T: Thresholds = Thresholds {
    heartbeat_timeout: Duration::from_millis(3000),
    evidence_samples: 3,
    evidence_for: Duration::from_millis(2000),
    watchdog_timeout: Duration::from_millis(10_000),
    poll_interval: Duration::from_millis(1000),
    post_timeout: Duration::from_millis(4000),
};

fn snap(power: PowerReading) -> BmcSnapshot {
    BmcSnapshot {
        protocol: Protocol::Redfish,
        power,
        boot: Some(if power == PowerReading::On {
            BootProgress::OsRunning
        } else {
            BootProgress::None
        }),
        health: Health::Ok,
        sensors: Vec::new(),
        psus: vec![
            PsuReading {
                name: "PS1".into(),
                health: Health::Ok,
            },
            PsuReading {
                name: "PS2".into(),
                health: Health::Ok,
            },
        ],
        new_log: Vec::new(),
        watchdog: None,
        full: true,
        gaps: Vec::new(),
    }
}

fn sel(msg: &str, sensor_type: &str) -> LogEntry {
    LogEntry {
        id: msg.len().to_string(),
        created: None,
        severity: Health::Critical,
        message: msg.into(),
        sensor_type: Some(sensor_type.into()),
        asserted: true,
    }
}

fn hb(at: Millis) -> Observation {
    Observation::Heartbeat {
        at,
        incarnation: [1; 16],
        watchdog: WatchdogReport::Petted,
    }
}

fn bmc(at: Millis, s: BmcSnapshot) -> Observation {
    Observation::Bmc { at, result: Ok(s) }
}

fn bmc_err(at: Millis) -> Observation {
    Observation::Bmc {
        at,
        result: Err(BmcFailure {
            transient: true,
            message: "timeout".into(),
        }),
    }
}

/// A healthy node for 10 s: heartbeats and BMC samples every second.
fn healthy_until(d: &mut Diagnoser, until: Millis) {
    let mut t = 0;
    while t < until {
        d.observe(hb(t + 500));
        d.observe(bmc(t + 1000, snap(PowerReading::On)));
        t += 1000;
    }
}

/// After healthy time, a fault from `at`: heartbeats stop (unless `hb_alive`), and each sample
/// is `fault(t)`; returns the verdict at `check`.
fn timeline(
    at: Millis,
    hb_alive: bool,
    check: Millis,
    fault: impl Fn(Millis) -> BmcSnapshot,
) -> Diagnosis {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, at);
    let mut t = at;
    while t <= check {
        if hb_alive {
            d.observe(hb(t));
        }
        d.observe(bmc(t, fault(t)));
        t += 1000;
    }
    d.evaluate(
        check,
        RackView {
            total: 4,
            ..Default::default()
        },
    )
}

#[test]
fn nothing_wrong_is_healthy() {
    let d = timeline(10_000, true, 20_000, |_| snap(PowerReading::On));
    assert_eq!(d.kind, Kind::Healthy);
}

#[test]
fn a_failed_psu_with_the_os_alive_is_degraded_not_fenced() {
    let d = timeline(10_000, true, 20_000, |_| {
        let mut s = snap(PowerReading::On);
        s.health = Health::Warning;
        s.psus[0].health = Health::Critical;
        s
    });
    assert_eq!(d.kind, Kind::Degraded);
    assert!(!d.kind.fences());
}

#[test]
fn power_loss_is_confirmed_exactly_when_three_samples_have_held_two_seconds() {
    let fault = |t: Millis| {
        let mut s = snap(PowerReading::Off);
        if t == 10_000 {
            s.new_log = vec![sel(
                "Power Supply PS1 Status | Power Supply AC lost | Asserted",
                "Power Supply / Converter",
            )];
        }
        s.health = Health::Critical;
        s
    };
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 9_000);
    d.observe(hb(9_500));
    for t in [10_000, 11_000, 12_000] {
        d.observe(bmc(t, fault(t)));
    }
    let rack = RackView {
        total: 4,
        ..Default::default()
    };
    // Off with the last heartbeat only 500 ms old: the power decides, not the heartbeat timeout.
    let at = d.evaluate(11_999, rack);
    assert_eq!(
        (at.kind, at.candidate),
        (
            Kind::Suspect,
            Some(Kind::HardwareFault(HardwareKind::Power))
        )
    );
    let at = d.evaluate(12_000, rack);
    assert_eq!(at.kind, Kind::HardwareFault(HardwareKind::Power), "{at:?}");
    assert_eq!((at.samples, at.held_ms, at.since), (3, 2000, 10_000));
    assert!(at.evidence.iter().any(|e| e.value.contains("AC lost")));
}

#[test]
fn a_thermal_trip_a_vr_fault_and_dead_psus_are_told_apart() {
    let off_with = |s: BmcSnapshot, log: LogEntry| {
        move |t: Millis| {
            let mut x = s.clone();
            if t == 10_000 {
                x.new_log = vec![log.clone()];
            }
            x
        }
    };
    let mut hot = snap(PowerReading::Off);
    hot.sensors = vec![SensorReading {
        kind: SensorKind::Temperature,
        name: "CPU1 Temp".into(),
        value: Some(111.0),
        upper_critical: Some(103.0),
        upper_fatal: None,
        lower_critical: None,
        health: Health::Critical,
    }];
    let d = timeline(
        10_000,
        false,
        14_000,
        off_with(
            hot,
            sel(
                "Processor CPU1 Status | Thermal Trip | Asserted",
                "Processor",
            ),
        ),
    );
    assert_eq!(d.kind, Kind::HardwareFault(HardwareKind::Thermal));

    let d = timeline(
        10_000,
        false,
        14_000,
        off_with(
            snap(PowerReading::Off),
            sel(
                "Voltage CPU1 VCCIN | Upper Critical going high | Asserted",
                "Voltage",
            ),
        ),
    );
    assert_eq!(d.kind, Kind::HardwareFault(HardwareKind::VoltageRegulator));

    let mut dead = snap(PowerReading::Off);
    dead.psus
        .iter_mut()
        .for_each(|p| p.health = Health::Critical);
    let d = timeline(
        10_000,
        false,
        14_000,
        off_with(
            dead,
            sel(
                "Power Supply PS2 Status | Failure detected | Asserted",
                "Power Supply / Converter",
            ),
        ),
    );
    assert_eq!(d.kind, Kind::HardwareFault(HardwareKind::Psu));
}

#[test]
fn cpu_and_memory_errors_with_the_host_on_are_hardware_faults() {
    let on_with = |log: LogEntry| {
        move |t: Millis| {
            let mut s = snap(PowerReading::On);
            if t == 10_000 {
                s.new_log = vec![log.clone()];
            }
            s
        }
    };
    let d = timeline(
        10_000,
        false,
        16_000,
        on_with(sel("Processor CPU1 Status | IERR | Asserted", "Processor")),
    );
    assert_eq!(d.kind, Kind::HardwareFault(HardwareKind::Cpu));
    let d = timeline(
        10_000,
        false,
        16_000,
        on_with(sel(
            "Memory DIMM A1 | Uncorrectable ECC | Asserted",
            "Memory",
        )),
    );
    assert_eq!(d.kind, Kind::HardwareFault(HardwareKind::Memory));
}

#[test]
fn a_hang_waits_for_its_watchdog_and_a_panic_needs_none() {
    // OS frozen at 10 s: heartbeats stop; the watchdog expires at 20 s and the BMC logs it.
    let hang = |t: Millis| {
        let mut s = snap(PowerReading::On);
        if t == 20_000 {
            s.new_log = vec![sel(
                "Watchdog 2 IPMI Watchdog | Timer expired, status only | Asserted",
                "Watchdog",
            )];
        }
        s
    };
    let before = timeline(10_000, false, 19_000, hang);
    assert_eq!(
        before.kind,
        Kind::Suspect,
        "hang or isolation cannot be told yet: {before:?}"
    );
    let after = timeline(10_000, false, 22_000, hang);
    assert_eq!(after.kind, Kind::SoftwareHang, "{after:#?}");

    let panic = |t: Millis| {
        let mut s = snap(PowerReading::On);
        if t == 10_000 {
            s.new_log = vec![sel(
                "OS Critical Stop OS Status | Run-time critical stop | Asserted",
                "OS Stop/Shutdown",
            )];
        }
        s
    };
    assert_eq!(
        timeline(10_000, false, 14_000, panic).kind,
        Kind::SoftwareHang
    );
}

#[test]
fn a_watchdog_that_resets_or_powers_down_a_hung_host_still_shows_a_hang() {
    // OS frozen at 10 s; its watchdog (action hard reset) runs out at 20 s: ipmi_sim logs the
    // expiry and the host goes through POST again. Not a boot to wait for: the OS hung.
    let reset = |t: Millis| {
        if t < 20_000 {
            return snap(PowerReading::On);
        }
        let mut s = snap(PowerReading::On);
        s.boot = Some(BootProgress::Post("MemoryInitializationStarted".into()));
        if t == 20_000 {
            s.new_log = vec![sel(
                "Watchdog2 IPMI Watchdog | Hard reset | Asserted",
                "Watchdog2",
            )];
        }
        s
    };
    assert_eq!(timeline(10_000, false, 19_000, reset).kind, Kind::Suspect);
    let d = timeline(10_000, false, 23_000, reset);
    assert_eq!(d.kind, Kind::SoftwareHang, "{d:#?}");
    assert!(d.why.contains("Hard reset"), "{}", d.why);

    // Action power down: the host is off, which nobody asked for, but no power fault.
    let down = |t: Millis| {
        if t < 20_000 {
            return snap(PowerReading::On);
        }
        let mut s = snap(PowerReading::Off);
        if t == 20_000 {
            s.new_log = vec![sel(
                "Watchdog 2 IPMI Watchdog | Power down | Asserted",
                "Watchdog",
            )];
        }
        s
    };
    let d = timeline(10_000, false, 23_000, down);
    assert_eq!(d.kind, Kind::SoftwareHang, "{d:#?}");
    assert!(d.why.contains("turned off by its watchdog"), "{}", d.why);

    // The OS back after the reset: its heartbeat clears the record's weight.
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    let mut t = 10_000;
    while t <= 30_000 {
        // POST until 26 s, then the OS runs and speaks again from 27 s.
        d.observe(bmc(
            t,
            if t < 26_000 {
                reset(t)
            } else {
                snap(PowerReading::On)
            },
        ));
        if t >= 27_000 {
            d.observe(hb(t));
        }
        t += 1000;
    }
    let v = d.evaluate(
        30_000,
        RackView {
            total: 4,
            ..Default::default()
        },
    );
    assert_eq!(v.kind, Kind::Healthy, "{v:#?}");
}

#[test]
fn a_host_stuck_in_post_is_a_post_failure_and_one_walking_through_it_is_not() {
    let stuck = |_| {
        let mut s = snap(PowerReading::On);
        s.boot = Some(BootProgress::Post("MemoryInitializationStarted".into()));
        s
    };
    assert_eq!(timeline(10_000, false, 13_000, stuck).kind, Kind::Suspect);
    assert_eq!(
        timeline(10_000, false, 17_000, stuck).kind,
        Kind::PostFailure
    );
    let stages = [
        "PrimaryProcessorInitializationStarted",
        "MemoryInitializationStarted",
        "PCIResourceConfigStarted",
        "SystemHardwareInitializationComplete",
    ];
    let walking = move |t: Millis| {
        let mut s = snap(PowerReading::On);
        s.boot = Some(BootProgress::Post(
            stages[((t - 10_000) / 3000) as usize % 4].into(),
        ));
        s
    };
    assert_eq!(timeline(10_000, false, 21_000, walking).kind, Kind::Suspect);
}

#[test]
fn a_sensor_critical_while_the_node_was_fine_is_not_evidence() {
    let odd = SensorReading {
        kind: SensorKind::Voltage,
        name: "PS1 PG FAIL".into(),
        value: None,
        upper_critical: None,
        upper_fatal: None,
        lower_critical: None,
        health: Health::Critical,
    };
    let mut d = Diagnoser::new(T, 0);
    for t in (0..10_000).step_by(1000) {
        d.observe(hb(t + 500));
        let mut s = snap(PowerReading::On);
        s.sensors = vec![odd.clone()];
        d.observe(bmc(t + 1000, s));
    }
    for t in (11_000..=14_000).step_by(1000) {
        let mut s = snap(PowerReading::Off);
        s.sensors = vec![odd.clone()];
        d.observe(bmc(t, s));
    }
    assert_eq!(
        d.evaluate(14_000, RackView::default()).kind,
        Kind::HardwareFault(HardwareKind::Power)
    );
}

#[test]
fn records_of_an_earlier_fault_do_not_colour_a_new_one() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    // A VR fault, repaired: the node is fine again for a while.
    let mut vr = snap(PowerReading::Off);
    vr.new_log = vec![sel(
        "Voltage CPU1 VCCIN | Upper Critical going high | Asserted",
        "Voltage",
    )];
    d.observe(bmc(10_000, vr));
    for t in (11_000..20_000).step_by(1000) {
        d.observe(hb(t));
        d.observe(bmc(t, snap(PowerReading::On)));
    }
    // Then plain power loss: it is power, not the old VR record.
    for t in (20_000..=23_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::Off)));
    }
    assert_eq!(
        d.evaluate(23_000, RackView::default()).kind,
        Kind::HardwareFault(HardwareKind::Power)
    );
}

#[test]
fn a_freshly_powered_on_node_is_not_isolated_before_its_os_could_speak() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    for t in (10_000..30_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::Off)));
    }
    d.observe(Observation::PowerRequested {
        at: 30_000,
        on: true,
    });
    for t in (30_000..=36_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::On)));
    }
    // 26 s since the last heartbeat, but only 6 s since the power-on: not isolated yet.
    assert_eq!(d.evaluate(36_000, RackView::default()).kind, Kind::Suspect);
}

#[test]
fn a_cut_network_with_a_live_os_is_isolated_after_the_watchdog_timeout() {
    // Heartbeats stop at 10 s (last at 9.5 s), no watchdog expiry ever comes.
    let early = timeline(10_000, false, 15_000, |_| snap(PowerReading::On));
    assert_eq!(early.kind, Kind::Suspect);
    let late = timeline(10_000, false, 24_000, |_| snap(PowerReading::On));
    assert_eq!(late.kind, Kind::Isolated, "{late:?}");
}

#[test]
fn an_unreadable_bmc_is_bmc_lost_with_heartbeats_and_dark_without() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    for t in (10_000..=14_000).step_by(1000) {
        d.observe(hb(t));
        d.observe(bmc_err(t));
    }
    assert_eq!(d.evaluate(14_000, RackView::default()).kind, Kind::BmcLost);

    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    for t in (10_000..=14_000).step_by(1000) {
        d.observe(bmc_err(t));
    }
    let v = d.evaluate(14_000, RackView::default());
    assert_eq!(v.kind, Kind::Dark);
    assert!(!v.kind.fences());
}

#[test]
fn one_or_two_bmc_errors_are_not_a_lost_bmc() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    d.observe(hb(10_000));
    d.observe(bmc_err(10_500));
    d.observe(bmc_err(11_000));
    assert_eq!(d.evaluate(11_000, RackView::default()).kind, Kind::Healthy);
}

#[test]
fn every_node_lost_at_once_is_the_appliance_isolated() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    for t in (10_000..=15_000).step_by(1000) {
        d.observe(bmc_err(t));
    }
    let v = d.evaluate(
        15_000,
        RackView {
            total: 4,
            heartbeat_lost: 4,
            bmc_lost: 4,
        },
    );
    assert_eq!(v.kind, Kind::ApplianceIsolated);
    assert!(!v.kind.fences());
}

#[test]
fn an_off_that_vigil_asked_for_is_not_a_fault() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    d.observe(Observation::PowerRequested {
        at: 10_000,
        on: false,
    });
    for t in (10_000..=16_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::Off)));
    }
    assert_eq!(d.evaluate(16_000, RackView::default()).kind, Kind::Suspect);
}

#[test]
fn an_off_asked_for_stays_asked_for_while_the_firmware_refuses_it_for_a_while() {
    // The fence is requested at 10 s; the firmware refuses the power-off for 40 s (the host
    // reads On), then it takes: still the Off vigil asked for.
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 10_000);
    d.observe(Observation::PowerRequested {
        at: 10_000,
        on: false,
    });
    for t in (10_000..50_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::On)));
    }
    for t in (50_000..=56_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::Off)));
    }
    assert_eq!(d.evaluate(56_000, RackView::default()).kind, Kind::Suspect);
    // Once it has been off and comes back on, a later Off is news again.
    for t in (57_000..=60_000).step_by(1000) {
        d.observe(hb(t));
        d.observe(bmc(t, snap(PowerReading::On)));
    }
    for t in (61_000..=70_000).step_by(1000) {
        d.observe(bmc(t, snap(PowerReading::Off)));
    }
    assert_eq!(
        d.evaluate(70_000, RackView::default()).kind,
        Kind::HardwareFault(HardwareKind::Power)
    );
}

#[test]
fn an_unknown_power_state_is_ambiguous_and_never_fences() {
    let d = timeline(10_000, false, 30_000, |_| snap(PowerReading::Unknown));
    assert_eq!(d.kind, Kind::Suspect);
    assert!(d.why.contains("ambiguous"));
}

#[test]
fn a_reboot_is_counted_from_a_new_incarnation() {
    let mut d = Diagnoser::new(T, 0);
    d.observe(hb(1000));
    d.observe(Observation::Heartbeat {
        at: 2000,
        incarnation: [2; 16],
        watchdog: WatchdogReport::Petted,
    });
    assert_eq!(d.reboots(), 1);
}

#[test]
fn a_flapping_node_needs_twice_the_evidence() {
    let mut d = Diagnoser::new(T, 0);
    healthy_until(&mut d, 2_000);
    // Off/On/Off/On every second: each change resets persistence and counts as a flap.
    let mut t = 2_000;
    for i in 0..8 {
        d.observe(bmc(
            t,
            snap(if i % 2 == 0 {
                PowerReading::Off
            } else {
                PowerReading::On
            }),
        ));
        d.observe(hb(t));
        t += 1000;
    }
    for _ in 0..4 {
        d.observe(bmc(t, snap(PowerReading::Off)));
        t += 1000;
    }
    // Four samples over three seconds would confirm a steady node; a flapping one needs six.
    let v = d.evaluate(t - 1000, RackView::default());
    assert!(v.flapping);
    assert_eq!(v.kind, Kind::Suspect, "{v:?}");
}

/// A random timeline of heartbeats (sometimes late, never past the timeout) and BMC samples that
/// are healthy, transient errors, or single odd readings.
fn noisy() -> impl Strategy<Value = Vec<(u64, u8)>> {
    proptest::collection::vec((50u64..900, 0u8..10), 10..200)
}

proptest! {
    /// What the monitor relies on to skip quiet machines: while `quiet_until` holds, the
    /// verdict read at any later moment is the one read now.
    #[test]
    fn a_quiet_verdict_holds_until_quiet_until(steps in noisy(), probes in proptest::collection::vec(0u64..10_000, 1..8)) {
        let mut d = Diagnoser::new(T, 0);
        let mut t = 0;
        let rack = RackView { total: 4, ..Default::default() };
        for (gap, what) in steps {
            t += gap;
            match what {
                0..=3 => d.observe(hb(t)),
                4..=5 => d.observe(bmc_err(t)),
                6 => d.observe(bmc(t, snap(PowerReading::Unknown))),
                7 => d.observe(bmc(t, snap(PowerReading::Off))),
                _ => d.observe(bmc(t, snap(PowerReading::On))),
            }
            let now = d.evaluate(t, rack);
            if let Some(until) = d.quiet_until(t, &now) {
                prop_assert!(until > t);
                for p in &probes {
                    let at = t + p % (until - t);
                    let later = d.evaluate(at, rack);
                    prop_assert_eq!(later.kind, now.kind, "at {} (quiet until {})", at, until);
                    prop_assert_eq!(later.candidate, now.candidate);
                }
            }
        }
    }

    #[test]
    fn transient_noise_alone_never_yields_a_fencing_verdict(steps in noisy()) {
        let mut d = Diagnoser::new(T, 0);
        let mut t = 0;
        let mut last_hb = 0;
        for (gap, what) in steps {
            t += gap;
            match what {
                // Heartbeats keep coming, a little irregular.
                0..=3 => { d.observe(hb(t)); last_hb = t; }
                // The BMC errs (slow, 5xx, reboot).
                4..=5 => d.observe(bmc_err(t)),
                // One odd reading: Off, Unknown, PoweringOff, Warning.
                6 => d.observe(bmc(t, snap(PowerReading::Unknown))),
                _ => d.observe(bmc(t, snap(PowerReading::On))),
            }
            // The heartbeat never goes silent past its timeout in this noise.
            if t - last_hb > 2500 { d.observe(hb(t)); last_hb = t; }
            let v = d.evaluate(t, RackView { total: 4, ..Default::default() });
            prop_assert!(!v.kind.fences(), "{:?} at {} ms", v, t);
        }
    }

    #[test]
    fn a_single_bad_sample_never_fences(at in 5_000u64..20_000, bad in 0u8..3) {
        let mut d = Diagnoser::new(T, 0);
        let mut t = 0;
        while t < 30_000 {
            if t != at { d.observe(hb(t)); }
            let s = if t / 1000 == at / 1000 {
                snap([PowerReading::Off, PowerReading::PoweringOff, PowerReading::Unknown][bad as usize])
            } else {
                snap(PowerReading::On)
            };
            d.observe(bmc(t, s));
            let v = d.evaluate(t, RackView::default());
            prop_assert!(!v.kind.fences(), "{:?} at {}", v, t);
            t += 1000;
        }
    }

    #[test]
    fn every_fencing_verdict_stands_on_persistent_evidence(steps in proptest::collection::vec((100u64..1500, 0u8..6), 5..120)) {
        let mut d = Diagnoser::new(T, 0);
        let mut t = 0;
        for (gap, what) in steps {
            t += gap;
            match what {
                0 => d.observe(hb(t)),
                1 => d.observe(bmc(t, snap(PowerReading::Off))),
                2 => d.observe(bmc_err(t)),
                3 => d.observe(bmc(t, snap(PowerReading::On))),
                4 => {
                    let mut s = snap(PowerReading::On);
                    s.new_log = vec![sel("Processor CPU1 Status | IERR | Asserted", "Processor")];
                    d.observe(bmc(t, s));
                }
                _ => {}
            }
            let v = d.evaluate(t, RackView::default());
            if v.kind.fences() {
                prop_assert!(v.samples >= T.evidence_samples, "{:?}", v);
                prop_assert!(v.held_ms >= T.evidence_for.as_millis() as u64, "{:?}", v);
            }
        }
    }
}
