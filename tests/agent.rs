//! `vigil agent` as a node runs it: signed heartbeats on the wire, clear errors on a missing key
//! or an unreachable appliance, and the watchdog petted through the lab's channel.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use assert_cmd::Command;
use vigil::heartbeat::wire::{self, WatchdogReport};

fn agent() -> Command {
    Command::cargo_bin("vigil").unwrap()
}

#[test]
fn heartbeats_are_signed_sequenced_and_pet_the_watchdog() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wd_path = dir.path().join("wd.sock");
    let wd = UnixDatagram::bind(&wd_path).unwrap();
    wd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let out = agent()
        .args([
            "agent",
            "--node",
            "db1",
            "--interval",
            "50ms",
            "--count",
            "4",
            "--key",
            "env:HB_KEY",
        ])
        .args(["--appliance", &sock.local_addr().unwrap().to_string()])
        .arg("--watchdog")
        .arg(format!("unix:{}", wd_path.display()))
        .args([
            "--epoch",
            "7",
            "--virtual",
            "--boot-id",
            "0b9c6b3e-2f1d-4a5e-9c3f-1e2d3c4b5a69",
        ])
        .env("HB_KEY", "k-db1")
        .timeout(Duration::from_secs(10))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seqs = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..4 {
        let n = sock.recv(&mut buf).unwrap();
        let hb = wire::verify(wire::decode(&buf[..n]).unwrap(), b"k-db1").unwrap();
        assert_eq!(hb.node, "db1");
        assert_eq!(hb.epoch, 7);
        assert!(hb.virtual_node);
        assert_eq!(hb.incarnation[0], 0x0b);
        assert_eq!(hb.watchdog, WatchdogReport::Petted);
        seqs.push(hb.seq);
        // Another key does not verify it.
        assert!(wire::verify(wire::decode(&buf[..n]).unwrap(), b"k-web1").is_err());
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let mut pets = 0;
    while wd.recv(&mut buf).is_ok() {
        pets += 1;
        if pets == 4 {
            break;
        }
    }
    assert_eq!(pets, 4);
}

#[test]
fn a_missing_key_is_a_clear_error() {
    let out = agent()
        .args([
            "agent",
            "--node",
            "db1",
            "--appliance",
            "127.0.0.1:9",
            "--key",
            "file:/nonexistent/hb-key",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the heartbeat key cannot be read") && err.contains("/nonexistent/hb-key"),
        "{err}"
    );
    let out = agent()
        .args(["agent", "--node", "db1", "--appliance", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no heartbeat key"));
}

#[test]
fn an_unreachable_appliance_is_a_clear_error() {
    // A port nothing listens on answers with ICMP port unreachable.
    let free = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = agent()
        .args([
            "agent",
            "--node",
            "db1",
            "--key",
            "env:HB_KEY",
            "--appliance",
            &free.to_string(),
        ])
        .env("HB_KEY", "k")
        .timeout(Duration::from_secs(10))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the appliance at {free} cannot be reached")),
        "{err}"
    );
    let out = agent()
        .args([
            "agent",
            "--node",
            "db1",
            "--key",
            "env:HB_KEY",
            "--appliance",
            "no-such-host.invalid:7481",
        ])
        .env("HB_KEY", "k")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not resolve"));
}

#[test]
fn the_agent_file_is_checked_like_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("agent.toml");
    std::fs::write(&f, "node = \"db1\"\napliance = \"127.0.0.1:9\"\n").unwrap();
    let out = agent()
        .arg("agent")
        .arg("--config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml:2:1: error: unknown key `apliance`"),
        "{err}"
    );
    assert!(err.contains("did you mean `appliance`?"), "{err}");
}

#[test]
fn logs_are_json_lines_with_fields_when_asked() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = agent()
        .args([
            "--log-format",
            "json",
            "agent",
            "--node",
            "db1",
            "--interval",
            "50ms",
            "--count",
            "1",
            "--key",
            "env:HB_KEY",
        ])
        .args(["--appliance", &sock.local_addr().unwrap().to_string()])
        .env("HB_KEY", "k-db1")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let started = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "agent started")
        .unwrap_or_else(|| panic!("no JSON line: {err}"));
    assert_eq!(started["node"], "db1");
    assert_eq!(started["level"], "INFO");
    assert!(!err.contains("k-db1"), "the key leaked into the log");
}
