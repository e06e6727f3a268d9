//! The IPMI driver against the lab's real OpenIPMI `ipmi_sim` BMCs, with `ipmitool` (an IPMI
//! client we did not write) reading the same BMC as the reference.

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Lab;
use serde_json::json;
use vigil::bmc::ipmi::IpmiBmc;
use vigil::bmc::{self, ActionOutcome, Bmc, BmcError, Depth, PowerAction};
use vigil::config;
use vigil::config::Secret;
use vigil::model::{Health, PowerReading};

struct Creds {
    port: u16,
    user: String,
    password: String,
}

fn creds(lab: &Lab, name: &str) -> Creds {
    let s = &lab.endpoints["servers"][name];
    Creds {
        port: s["ipmi_port"].as_u64().unwrap() as u16,
        user: s["username"].as_str().unwrap().to_string(),
        password: std::fs::read_to_string(s["password_file"].as_str().unwrap())
            .unwrap()
            .trim()
            .to_string(),
    }
}

fn driver(lab: &Lab, name: &str) -> IpmiBmc {
    let (cfg, _, _) = config::load(&lab.config_path()).unwrap();
    let m = cfg.machine(name).unwrap();
    bmc::ipmi_for(&m).unwrap()
}

/// ipmitool on the same BMC (the password through the environment, not argv).
fn ipmitool(c: &Creds, args: &[&str]) -> String {
    let out = Command::new("ipmitool")
        .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
        .arg(c.port.to_string())
        .args(["-U", &c.user, "-E"])
        .args(args)
        .env("IPMI_PASSWORD", &c.password)
        .output()
        .expect("ipmitool is installed (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "ipmitool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ipmitool sensor get NAME` threshold lines as numbers.
fn ipmitool_threshold(c: &Creds, sensor: &str, label: &str) -> Option<f64> {
    ipmitool(c, &["sensor", "get", sensor])
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn readings_match_ipmitool_on_every_server() {
    let lab = Lab::rack4(|t| t);
    for name in ["db1", "web1", "web2", "batch1", "failover1", "backup1"] {
        let c = creds(&lab, name);
        let b = driver(&lab, name);
        let s = b.status(Depth::Full).await.unwrap();
        assert!(s.gaps.is_empty(), "{name}: {:?}", s.gaps);
        let want = if ipmitool(&c, &["chassis", "power", "status"]).contains("is on") {
            PowerReading::On
        } else {
            PowerReading::Off
        };
        assert_eq!(s.power, want, "{name}");
        assert_eq!(s.health, Health::Ok, "{name}");
        // Every analog sensor: value and thresholds as ipmitool decodes them.
        let elist = ipmitool(&c, &["sdr", "elist"]);
        for r in &s.sensors {
            let line = elist
                .lines()
                .find(|l| l.starts_with(&r.name))
                .unwrap_or_else(|| panic!("{name}: ipmitool has no {}:\n{elist}", r.name));
            let theirs: f64 = line
                .split('|')
                .nth(4)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(r.value, Some(theirs), "{name} {}", r.name);
            assert_eq!(
                r.upper_critical,
                ipmitool_threshold(&c, &r.name, "Upper Critical"),
                "{name} {}",
                r.name
            );
            assert_eq!(
                r.upper_fatal,
                ipmitool_threshold(&c, &r.name, "Upper Non-Recoverable"),
                "{name} {}",
                r.name
            );
        }
        assert_eq!(s.sensors.len(), 2, "{name}: {:?}", s.sensors);
        // The rest of what an operator would ask ipmitool answers too.
        let st = ipmitool(&c, &["chassis", "status"]);
        assert!(st.contains("System Power         : on"), "{name}: {st}");
        let wd = ipmitool(&c, &["mc", "watchdog", "get"]);
        assert!(wd.contains("Watchdog Timer Use"), "{name}: {wd}");
        assert_eq!(s.psus.len(), 2, "{name}");
        b.close().await;
    }
}

#[tokio::test]
async fn faults_reach_sensors_and_the_sel_as_ipmitool_sees_them() {
    let lab = Lab::rack4(|t| t);
    let c = creds(&lab, "db1");
    let b = driver(&lab, "db1");
    // The first full read primes the SEL cursor: what was there is history.
    assert!(b.status(Depth::Full).await.unwrap().new_log.is_empty());
    lab.inject("db1", json!({"kind": "thermal-trip"}));
    // The lab mirrors the fault into ipmi_sim within a few hundred ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut news = Vec::new();
    let mut last = None;
    while Instant::now() < deadline {
        let s = b.status(Depth::Full).await.unwrap();
        news.extend(s.new_log.clone());
        let done = news.iter().any(|e| e.message.contains("Thermal Trip"));
        last = Some(s);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = last.unwrap();
    let msgs: Vec<&str> = news.iter().map(|e| e.message.as_str()).collect();
    assert!(
        msgs.contains(&"Temperature CPU1 Temp | Upper Critical going high | Asserted"),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&"Processor CPU1 Status | Thermal Trip | Asserted"),
        "{msgs:?}"
    );
    assert_eq!(s.power, PowerReading::Off, "a thermal trip cuts power");
    assert_eq!(s.health, Health::Critical);
    let t = s.sensors.iter().find(|r| r.name == "CPU1 Temp").unwrap();
    assert!(t.is_critical() && t.value == Some(100.0), "{t:?}");
    // ipmitool lists the same records, in the same order, with the same words.
    let elist = ipmitool(&c, &["sel", "elist"]);
    let theirs: Vec<String> = elist
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            format!("{} | {} | {}", f[3], f[4], f[5])
        })
        .collect();
    assert_eq!(theirs.len(), news.len(), "{elist}\n{msgs:?}");
    for (ours, theirs) in msgs.iter().zip(&theirs) {
        assert!(
            theirs.starts_with(ours),
            "ours {ours:?} vs ipmitool {theirs:?}"
        );
    }
    // Reported once.
    assert!(b.status(Depth::Full).await.unwrap().new_log.is_empty());
    b.close().await;
}

#[tokio::test]
async fn power_actions_are_idempotent_and_reach_the_lab() {
    let lab = Lab::rack4(|t| t);
    let c = creds(&lab, "web1");
    let b = driver(&lab, "web1");
    assert_eq!(
        b.power(PowerAction::Off).await.unwrap(),
        ActionOutcome::Accepted
    );
    // The lab's Redfish shows the same power model: PoweringOff, then Off.
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.status(Depth::Fast).await.unwrap().power != PowerReading::Off {
        assert!(Instant::now() < deadline, "never off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lab.server("web1")["power_state"], "Off");
    assert!(ipmitool(&c, &["chassis", "power", "status"]).contains("is off"));
    assert_eq!(
        b.power(PowerAction::Off).await.unwrap(),
        ActionOutcome::AlreadyDone
    );
    assert_eq!(
        b.power(PowerAction::On).await.unwrap(),
        ActionOutcome::Accepted
    );
    let resets: Vec<String> = lab.server("web1")["resets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_str().unwrap().to_string())
        .collect();
    assert_eq!(resets, vec!["Off", "On"]);
    b.close().await;
}

#[tokio::test]
async fn credentials_suites_and_sessions() {
    let lab = Lab::rack4(|t| t);
    let c = creds(&lab, "batch1");
    let wrong = IpmiBmc::new(
        "127.0.0.1",
        c.port,
        3,
        &c.user,
        Secret::new("not-the-password"),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = wrong.status(Depth::Fast).await.unwrap_err();
    assert!(matches!(e, BmcError::Auth { .. }), "{e}");
    assert!(!e.is_transient());
    assert!(!e.to_string().contains("not-the-password"));
    // ipmi_sim offers suites 0-3: a request for 17 is refused, never downgraded.
    let s17 = IpmiBmc::new(
        "127.0.0.1",
        c.port,
        17,
        &c.user,
        Secret::new(c.password.clone()),
        Duration::from_secs(2),
    )
    .unwrap();
    // ipmi_sim does not even answer an Open Session for algorithms it lacks; the error says
    // which suite was asked for, so the operator knows where to look.
    let e = s17.status(Depth::Fast).await.unwrap_err();
    assert!(
        matches!(e, BmcError::Unsupported { .. } | BmcError::Timeout { .. }),
        "suite 17 against ipmi_sim: {e}"
    );
    assert!(e.to_string().contains("cipher suite 17"), "{e}");
    // 30 sessions opened and closed one after another: the user's limit is 10, so a leak
    // would show as a refusal long before the end.
    for i in 0..30 {
        let b = driver(&lab, "batch1");
        b.status(Depth::Fast)
            .await
            .unwrap_or_else(|e| panic!("session {i}: {e}"));
        b.close().await;
        assert_eq!(b.stats().sessions_opened, 1);
    }
    // One session serves many requests.
    let b = driver(&lab, "batch1");
    for _ in 0..5 {
        b.status(Depth::Full).await.unwrap();
    }
    assert_eq!(b.stats().sessions_opened, 1);
    b.close().await;
}

#[tokio::test]
async fn a_silent_bmc_costs_its_timeout_and_a_restarted_one_gets_a_new_session() {
    let lab = Lab::rack4(|t| t);
    let b = driver(&lab, "web2");
    b.status(Depth::Fast).await.unwrap();
    lab.inject("web2", json!({"kind": "ipmi-down"}));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Redfish still answers (only the IPMI service is down).
    let (cfg, profiles, _) = config::load(&lab.config_path()).unwrap();
    let rf = bmc::redfish_for(&cfg.machine("web2").unwrap(), &profiles).unwrap();
    assert_eq!(
        rf.status(Depth::Fast).await.unwrap().power,
        PowerReading::On
    );
    rf.close().await;
    let t0 = Instant::now();
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(
        matches!(e, BmcError::Connect { .. } | BmcError::Timeout { .. }),
        "{e}"
    );
    // Bounded by the configured request timeout (plus a margin for this shared machine).
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    lab.repair("web2");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.status(Depth::Fast).await {
            Ok(s) => {
                assert_eq!(s.power, PowerReading::On);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The BMC forgot the old session: a new one was opened.
    assert_eq!(b.stats().sessions_opened, 2);
    b.close().await;
}

/// rack4 with db1's OS setting a hard-reset watchdog and web1's a power-down one, 3 s each.
fn watchdog_rack(t: String) -> String {
    t.replace(
        "time_scale = 0.02",
        "time_scale = 0.005\nwatchdog_timeout_ms = 3000",
    )
    .replace(
        "firmware_profile = \"idrac9\"",
        "firmware_profile = \"idrac9\"\nwatchdog_action = \"hard-reset\"",
    )
    .replace(
        "firmware_profile = \"ilo5\"",
        "firmware_profile = \"ilo5\"\nwatchdog_action = \"power-down\"",
    )
}

/// Waits until `f` holds, for at most `secs`; returns how long it took.
fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    t0.elapsed()
}

fn sel_count(c: &Creds, needle: &str) -> usize {
    ipmitool(c, &["sel", "elist"])
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_os_watchdog_runs_in_the_bmc_in_band_and_acts_when_the_os_hangs() {
    let lab = Lab::rack4(watchdog_rack);
    let (db1, web1) = (creds(&lab, "db1"), creds(&lab, "web1"));
    // The OS (the real `vigil agent`) armed the BMC's timer in-band, as an OS driver does.
    until(10, "db1's OS arms its watchdog", || {
        ipmitool(&db1, &["mc", "watchdog", "get"]).contains("Hard Reset (0x31)")
    });
    let wd = ipmitool(&db1, &["mc", "watchdog", "get"]);
    for want in [
        "SMS/OS (0x04)",
        "Initial Countdown:      3.0 sec",
        "Timer Expiration Flags: None (0x00)",
    ] {
        assert!(wd.contains(want), "{want}: {wd}");
    }
    assert!(ipmitool(&web1, &["mc", "watchdog", "get"]).contains("Power Down (0x32)"));
    // Petted, it does not run out: two countdowns pass without an expiry.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(sel_count(&db1, "Watchdog2"), 0);
    assert_eq!(sel_count(&web1, "Watchdog2"), 0);
    let b = driver(&lab, "db1");
    let w = b.status(Depth::Full).await.unwrap().watchdog.unwrap();
    assert!(!w.expired && w.timeout_ms == 3000, "{w:?}");

    lab.inject("db1", json!({"kind": "os-hang"}));
    lab.inject("web1", json!({"kind": "os-hang"}));
    // One countdown after the last pet, the BMC's own watchdog acts: its record, its
    // expiration flag, and the host reset (db1) or off (web1), seen on every path.
    until(8, "db1's watchdog resets it", || {
        sel_count(&db1, "Watchdog2 IPMI Watchdog | Hard reset | Asserted") == 1
    });
    assert!(ipmitool(&db1, &["mc", "watchdog", "get"]).contains("Timer Expiration Flags: (0x10)"));
    assert!(
        b.status(Depth::Full)
            .await
            .unwrap()
            .watchdog
            .unwrap()
            .expired
    );
    let s = lab.server("db1");
    assert!(
        s["resets"].to_string().contains("WatchdogRestart"),
        "{}",
        s["resets"]
    );
    assert!(
        s["sel"].to_string().contains("Hard reset"),
        "the Redfish SEL shows it too: {}",
        s["sel"]
    );
    until(8, "web1's watchdog powers it off", || {
        sel_count(&web1, "Watchdog2 IPMI Watchdog | Power down | Asserted") == 1
    });
    until(5, "web1 off on both faces", || {
        ipmitool(&web1, &["chassis", "power", "status"]).contains("is off")
            && lab.server("web1")["power_state"] == "Off"
    });
    // The hang is in force until repaired: db1 boots again and hangs before its agent starts,
    // so nobody re-arms the timer and it does not fire a second time.
    until(20, "db1 back up, hung", || {
        let s = lab.server("db1");
        s["power_state"] == "On" && s["os"] == "hung" && s["boot_progress"] == "OSRunning"
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sel_count(&db1, "Hard reset"), 1);

    // Repaired, the OS arms the timer again (clearing the flag) and a second hang is logged
    // again: the lab clears the sensor bit that ipmi_sim never clears by itself.
    lab.repair("db1");
    until(10, "db1's new OS re-arms", || {
        ipmitool(&db1, &["mc", "watchdog", "get"]).contains("Timer Expiration Flags: None")
    });
    assert!(!ipmitool(&db1, &["sdr", "elist"]).contains("Hard reset"));
    std::thread::sleep(Duration::from_secs(2));
    lab.inject("db1", json!({"kind": "os-hang"}));
    until(8, "the second expiry is logged", || {
        sel_count(&db1, "Hard reset") == 2
    });
    b.close().await;
}
