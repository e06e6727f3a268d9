//! Fencing against the hardware lab: every firmware, every BMC misbehaviour, a crash at every
//! step, and a fencing log that cannot be written or has been tampered with.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;

use assert_cmd::Command;
use common::Lab;
use serde_json::json;

fn vigil(cfg: &Path, args: &[&str]) -> Output {
    Command::cargo_bin("vigil")
        .unwrap()
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap()
}

fn fence(cfg: &Path, node: &str) -> Output {
    vigil(cfg, &["fence", node])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// ForceOff actions the lab's BMC of `node` received.
fn offs(lab: &Lab, node: &str) -> usize {
    lab.server(node)["resets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r[1] == "Off")
        .count()
}

#[test]
fn every_firmware_is_fenced_once_and_a_second_fence_sends_nothing() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    for node in ["db1", "web1", "web2", "batch1", "failover1", "backup1"] {
        let o = fence(&cfg, node);
        assert!(o.status.success(), "{node}: {}", text(&o));
        assert!(
            text(&o).contains("power action(s) sent"),
            "{node}: {}",
            text(&o)
        );
        assert_eq!(lab.server(node)["power_state"], "Off");
        let o = fence(&cfg, node);
        assert!(
            o.status.success() && text(&o).contains("already off: no action sent"),
            "{node}: {}",
            text(&o)
        );
        assert_eq!(offs(&lab, node), 1, "{node}");
    }
    let v = vigil(&cfg, &["log", "verify"]);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn a_slow_or_erring_bmc_is_still_fenced_and_a_lying_one_is_not_believed() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    lab.inject("db1", json!({"kind": "slow", "delay_ms": 800}));
    let o = fence(&cfg, "db1");
    assert!(o.status.success(), "{}", text(&o));
    lab.inject(
        "web2",
        json!({"kind": "http-error", "status": 503, "count": 2}),
    );
    let o = fence(&cfg, "web2");
    assert!(o.status.success(), "{}", text(&o));
    // A BMC that keeps saying On after the Off took: never confirmed, fence pending.
    lab.inject("batch1", json!({"kind": "stale-power-state"}));
    let o = fence(&cfg, "batch1");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FENCE PENDING"), "{}", text(&o));
    let log = text(&vigil(&cfg, &["log", "--node", "batch1"]));
    assert!(log.contains("fence-pending"), "{log}");
    // The whole BMC down (Redfish and IPMI with it): pending, and nothing was sent.
    lab.inject("backup1", json!({"kind": "bmc-down"}));
    let o = fence(&cfg, "backup1");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(offs(&lab, "backup1"), 0);
    // Operator acknowledgement lifts the pending state, with who and why in the log.
    let o = vigil(
        &cfg,
        &[
            "fence",
            "backup1",
            "--ack-off",
            "--by",
            "alice",
            "--reason",
            "pulled the power cords",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let log = text(&vigil(&cfg, &["log", "--node", "backup1", "--json"]));
    assert!(
        log.contains("\"ack-off\"")
            && log.contains("alice")
            && log.contains("pulled the power cords"),
        "{log}"
    );
}

#[test]
fn with_redfish_down_the_fence_goes_through_ipmi_and_every_fence_is_cross_checked() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    // Both paths up: Redfish fences, IPMI confirms it.
    let o = fence(&cfg, "web1");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("redfish ForceOff"), "{}", text(&o));
    let log = text(&vigil(&cfg, &["log", "--node", "web1", "--json"]));
    assert!(log.contains("Ipmi also reads Off"), "{log}");
    // Redfish crashed, IPMI answers: fenced through IPMI at once (no Redfish timeouts waited
    // out), once.
    lab.inject("db1", json!({"kind": "redfish-down"}));
    let t0 = std::time::Instant::now();
    let o = fence(&cfg, "db1");
    let took = t0.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ipmi chassis power off"), "{}", text(&o));
    assert_eq!(lab.server("db1")["power_state"], "Off");
    assert_eq!(offs(&lab, "db1"), 1);
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
    let log = text(&vigil(&cfg, &["log", "--node", "db1", "--json"]));
    assert!(log.contains("not cross-checked"), "{log}");
    // IPMI down, Redfish up: Redfish fences; the IPMI cross-check gives no veto.
    lab.inject("web2", json!({"kind": "ipmi-down"}));
    let o = fence(&cfg, "web2");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("redfish ForceOff"), "{}", text(&o));
    assert_eq!(offs(&lab, "web2"), 1);
    let v = vigil(&cfg, &["log", "verify"]);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn a_bmc_reboot_in_the_middle_of_a_fence_is_waited_out() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    lab.inject("web1", json!({"kind": "bmc-reboot", "duration_ms": 1500}));
    let o = fence(&cfg, "web1");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(lab.server("web1")["power_state"], "Off");
}

#[test]
fn a_crash_at_any_step_converges_without_a_needless_second_action() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    // (step, node, power actions that must have been sent in all)
    for (step, node, want) in [
        ("fence-begin", "db1", 1),
        ("after-announce", "web1", 1),
        ("after-action", "web2", 1),
        ("before-confirm", "batch1", 1),
    ] {
        let o = Command::cargo_bin("vigil")
            .unwrap()
            .args(["fence", node, "--config"])
            .arg(&cfg)
            .env("VIGIL_CRASH_AT", step)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "{step}: the crash did not happen: {}",
            text(&o)
        );
        // The restarted appliance reads the BMC and finishes the fence.
        let o = fence(&cfg, node);
        assert!(o.status.success(), "{step}: {}", text(&o));
        assert_eq!(
            offs(&lab, node),
            want,
            "{step}: power actions sent to {node}"
        );
        if step == "after-action" || step == "before-confirm" {
            assert!(text(&o).contains("no action sent"), "{step}: {}", text(&o));
        }
    }
    let v = vigil(&cfg, &["log", "verify"]);
    assert!(
        v.status.success(),
        "the log survives every crash: {}",
        text(&v)
    );
}

#[test]
fn a_tampered_or_truncated_log_is_detected() {
    let lab = Lab::rack4(|t| t);
    let cfg = lab.config_path();
    assert!(fence(&cfg, "db1").status.success());
    let log = lab.state_dir().join("appliance/fencing.log");
    let orig = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, orig.replacen("redfish ForceOff", "ipmi", 1)).unwrap();
    let v = vigil(&cfg, &["log", "verify"]);
    assert_eq!(v.status.code(), Some(1));
    assert!(text(&v).contains("does not match its hash"), "{}", text(&v));
    std::fs::write(&log, &orig[..orig.len() - 20]).unwrap();
    let v = vigil(&cfg, &["log", "verify"]);
    assert!(text(&v).contains("cut short"), "{}", text(&v));
    // And no fence runs on a log that does not verify.
    let o = fence(&cfg, "web1");
    assert!(!o.status.success());
    assert_eq!(offs(&lab, "web1"), 0);
}

/// A mounted, full file system for the appliance's state.
struct FullDisk(tempfile::TempDir);

impl FullDisk {
    fn new() -> FullDisk {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "this test mounts a tmpfs and needs root (CI runs as root)"
        );
        // Fill it, leaving less than one record.
        let _ = std::fs::write(d.path().join("filler"), vec![0u8; 64 * 1024]);
        FullDisk(d)
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn no_action_is_taken_when_the_log_cannot_be_written() {
    let lab = Lab::rack4(|t| t);
    let disk = FullDisk::new();
    let text_cfg = std::fs::read_to_string(lab.config_path()).unwrap();
    let state_line = text_cfg
        .lines()
        .find(|l| l.starts_with("state_dir"))
        .unwrap()
        .to_string();
    let cfg = lab.config_path().with_file_name("full.toml");
    std::fs::write(
        &cfg,
        text_cfg.replace(
            &state_line,
            &format!("state_dir = \"{}\"", disk.0.path().display()),
        ),
    )
    .unwrap();
    let o = fence(&cfg, "db1");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no action taken: the fencing log cannot be written"),
        "{}",
        text(&o)
    );
    assert_eq!(
        offs(&lab, "db1"),
        0,
        "a power action was sent without its log record"
    );
    assert_eq!(lab.server("db1")["power_state"], "On");
}
