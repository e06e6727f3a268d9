//! The Redfish driver against the hardware lab's BMCs (a Redfish implementation of ours, run as a
//! child process, seeded from real captures): every firmware profile, every BMC misbehaviour.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::Lab;
use serde_json::json;
use vigil::bmc::{self, ActionOutcome, Bmc, BmcError, Depth, PowerAction};
use vigil::config;
use vigil::model::{Health, PowerReading};

fn setup() {
    let _already = rustls::crypto::ring::default_provider().install_default();
}

fn driver(lab: &Lab, name: &str) -> bmc::redfish::RedfishBmc {
    let (cfg, profiles, _) = config::load(&lab.config_path()).unwrap();
    let m = cfg.machine(name).unwrap();
    bmc::redfish_for(&m, &profiles).unwrap()
}

#[tokio::test]
async fn every_firmware_profile_gives_a_full_snapshot_and_leaks_no_session() {
    setup();
    let lab = Lab::rack4(|t| t);
    for name in ["db1", "web1", "web2", "batch1", "failover1", "backup1"] {
        let b = driver(&lab, name);
        for _ in 0..3 {
            let s = b.status(Depth::Fast).await.unwrap();
            assert_eq!(s.power, PowerReading::On, "{name}");
        }
        let s = b.status(Depth::Full).await.unwrap();
        assert_eq!(s.health, Health::Ok, "{name}: {s:?}");
        assert!(s.gaps.is_empty(), "{name}: {:?}", s.gaps);
        assert!(!s.sensors.is_empty(), "{name} has no sensors");
        // One session for all those requests, closed at the end.
        assert_eq!(lab.server(name)["sessions_open"], 1, "{name}");
        b.close().await;
        let v = lab.server(name);
        assert_eq!(
            (
                v["sessions_open"].as_u64(),
                v["sessions_opened"].as_u64(),
                v["sessions_closed"].as_u64()
            ),
            (Some(0), Some(1), Some(1)),
            "{name}"
        );
    }
}

#[tokio::test]
async fn new_sel_records_are_reported_once_and_history_never() {
    setup();
    let lab = Lab::rack4(|t| t);
    let b = driver(&lab, "db1");
    // The capture's own SEL (five old records) is history, not news.
    assert!(b.status(Depth::Full).await.unwrap().new_log.is_empty());
    lab.inject("db1", json!({"kind": "thermal-trip"}));
    let s = b.status(Depth::Full).await.unwrap();
    assert_eq!(s.power, PowerReading::Off);
    assert_eq!(s.health, Health::Critical);
    let msgs: Vec<&str> = s.new_log.iter().map(|e| e.message.as_str()).collect();
    assert!(msgs.iter().any(|m| m.contains("Thermal Trip")), "{msgs:?}");
    assert!(
        s.sensors
            .iter()
            .any(|r| r.is_critical() && r.name.contains("CPU1")),
        "{:?}",
        s.sensors
    );
    assert!(b.status(Depth::Full).await.unwrap().new_log.is_empty());
    b.close().await;
}

#[tokio::test]
async fn power_off_is_idempotent_on_every_firmware() {
    setup();
    let lab = Lab::rack4(|t| t);
    for name in ["db1", "web1", "backup1", "web2"] {
        let b = driver(&lab, name);
        assert_eq!(
            b.power(PowerAction::Off).await.unwrap(),
            ActionOutcome::Accepted,
            "{name}"
        );
        let t0 = Instant::now();
        while b.status(Depth::Fast).await.unwrap().power != PowerReading::Off {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{name} never read Off"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Read first: an off host is not sent a ForceOff at all.
        let resets = lab.server(name)["resets"].as_array().unwrap().len();
        assert_eq!(
            b.power(PowerAction::Off).await.unwrap(),
            ActionOutcome::AlreadyDone,
            "{name}"
        );
        assert_eq!(
            lab.server(name)["resets"].as_array().unwrap().len(),
            resets,
            "{name}"
        );
        if name == "db1" {
            // iDRAC refuses an On right after the Off (within its window): busy, retry later.
            let e = b.power(PowerAction::On).await.unwrap_err();
            assert!(e.is_transient(), "{e}");
            assert!(e.to_string().contains("busy"), "{e}");
        }
        b.close().await;
    }
}

#[tokio::test]
async fn bmc_misbehaviour_is_typed_and_bounded() {
    setup();
    let lab = Lab::rack4(|t| t);
    let b = driver(&lab, "backup1");
    b.status(Depth::Fast).await.unwrap();

    // Slow beyond the request timeout (2 s in the lab's vigil.toml): a transient timeout.
    lab.inject("backup1", json!({"kind": "slow", "delay_ms": 3000}));
    let t0 = Instant::now();
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(
        matches!(e, BmcError::Timeout { .. }) && e.is_transient(),
        "{e:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2900),
        "{:?}",
        t0.elapsed()
    );
    lab.repair("backup1");

    lab.inject(
        "backup1",
        json!({"kind": "http-error", "status": 503, "count": 1}),
    );
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(
        matches!(e, BmcError::Http { status: 503, .. }) && e.is_transient(),
        "{e:?}"
    );
    b.status(Depth::Fast).await.unwrap();
    lab.repair("backup1");

    lab.inject("backup1", json!({"kind": "malformed-json"}));
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(matches!(e, BmcError::Malformed { .. }), "{e:?}");
    lab.repair("backup1");

    lab.inject("backup1", json!({"kind": "oversized-body"}));
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(matches!(e, BmcError::TooLarge { .. }), "{e:?}");
    lab.repair("backup1");

    // A stale PowerState is read as the BMC says: fencing must confirm across reads and paths.
    lab.inject("backup1", json!({"kind": "stale-power-state"}));
    assert_eq!(
        b.power(PowerAction::Off).await.unwrap(),
        ActionOutcome::Accepted
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.status(Depth::Fast).await.unwrap().power, PowerReading::On);
    lab.repair("backup1");
    assert_eq!(
        b.status(Depth::Fast).await.unwrap().power,
        PowerReading::Off
    );
    b.close().await;
}

#[tokio::test]
async fn sessions_survive_a_bmc_reboot_and_a_full_session_table() {
    setup();
    let lab = Lab::rack4(|t| t);
    let b = driver(&lab, "web2");
    b.status(Depth::Fast).await.unwrap();
    // The BMC reboots: unreachable for a while, then our session is gone (401) and renewed.
    lab.inject("web2", json!({"kind": "bmc-reboot", "duration_ms": 500}));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(
        matches!(e, BmcError::Connect { .. }) && e.is_transient(),
        "{e:?}"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    b.status(Depth::Fast).await.unwrap();
    assert_eq!(lab.server("web2")["sessions_open"], 1);

    // Someone else (or a killed appliance) holds every session slot: vigil reads with Basic
    // authentication instead, taking no slot.
    b.close().await;
    lab.inject("web2", json!({"kind": "session-exhaustion"}));
    let max = lab.server("web2")["sessions_open"].as_u64().unwrap();
    assert_eq!(b.status(Depth::Fast).await.unwrap().power, PowerReading::On);
    assert_eq!(lab.server("web2")["sessions_open"].as_u64().unwrap(), max);
    assert!(lab.server("web2")["sessions_refused"].as_u64().unwrap() >= 1);
    lab.repair("web2");
    b.status(Depth::Fast).await.unwrap();
    b.close().await;
    assert_eq!(lab.server("web2")["sessions_open"], 0);
}

#[tokio::test]
async fn a_wrong_pin_or_password_is_refused_and_not_transient() {
    setup();
    let lab = Lab::rack4(|t| t);
    let (cfg, profiles, _) = config::load(&lab.config_path()).unwrap();
    let m = cfg.machine("db1").unwrap();
    let mut bmc_cfg = m.bmc.clone();
    if let Some(r) = bmc_cfg.redfish.as_mut() {
        r.trust = config::RedfishTrust::Fingerprint([0xAB; 32]);
    }
    let m2 = config::Machine { bmc: &bmc_cfg, ..m };
    let b = bmc::redfish_for(&m2, &profiles).unwrap();
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(
        matches!(e, BmcError::Tls { .. }) && !e.is_transient(),
        "{e:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "wrong").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut bmc_cfg = m.bmc.clone();
    bmc_cfg.password = config::SecretRef::File(pw);
    let m3 = config::Machine { bmc: &bmc_cfg, ..m };
    let b = bmc::redfish_for(&m3, &profiles).unwrap();
    let e = b.status(Depth::Fast).await.unwrap_err();
    assert!(
        matches!(e, BmcError::Auth { .. }) && !e.is_transient(),
        "{e:?}"
    );
    assert!(!e.to_string().contains("wrong"));
}

#[test]
fn probe_and_profile_capture_from_the_command_line() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    let out = assert_cmd::Command::cargo_bin("vigil")
        .unwrap()
        .args(["probe", "--all", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 6);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|m| m["redfish"]["power"] == "on"),
        "{v}"
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for s in lab.secrets() {
        assert!(!text.contains(&s), "a secret leaked into probe's output");
    }

    let out = assert_cmd::Command::cargo_bin("vigil")
        .unwrap()
        .args(["profile", "capture", "--all", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: vigil::model::HardwareProfile = serde_json::from_str(
        &std::fs::read_to_string(lab.state_dir().join("appliance/profiles/db1.json")).unwrap(),
    )
    .unwrap();
    // The R750 capture: 2 x Xeon Gold 6354, 18 cores / 36 threads each.
    assert_eq!(
        (
            p.cpu.sockets,
            p.cpu.cores_per_socket,
            p.cpu.threads_per_core
        ),
        (2, 18, 2)
    );
    assert!(p.cpu.model.unwrap().contains("6354"));
    assert!(!p.nics.is_empty());
    let out = assert_cmd::Command::cargo_bin("vigil")
        .unwrap()
        .args(["profile", "capture", "db1", "--diff", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("db1: unchanged since the previous capture")
    );
}
