//! The systemd units: `systemd-analyze verify` is silent on both, and the daemon's sandbox rates
//! an exposure of 2.0 or lower.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn units_with_binary(dir: &Path) -> Vec<PathBuf> {
    // verify checks that ExecStart= exists: point it at the binary this test suite built.
    let bin = assert_cmd::cargo::cargo_bin("vigil");
    let mut out = Vec::new();
    for unit in ["vigil.service", "vigil-agent.service"] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("systemd")
                .join(unit),
        )
        .unwrap();
        assert!(
            text.contains("/usr/bin/vigil "),
            "{unit} runs /usr/bin/vigil"
        );
        let p = dir.join(unit);
        std::fs::write(
            &p,
            text.replace("/usr/bin/vigil ", &format!("{} ", bin.display())),
        )
        .unwrap();
        out.push(p);
    }
    out
}

#[test]
fn units_verify_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    for unit in units_with_binary(dir.path()) {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("systemd-analyze is installed");
        // verify exits 0 even when it warns: silence is the test.
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && all.trim().is_empty(),
            "{}: {all}",
            unit.display()
        );
    }
}

fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // "→ Overall exposure level for vigil.service: 1.1 OK 🙂"
    line.split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_daemon_is_sandboxed_to_an_exposure_of_two_or_less() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_with_binary(dir.path());
    let daemon = exposure(&units[0]);
    assert!(daemon <= 2.0, "vigil.service exposure {daemon}");
    // The agent needs /dev/ipmi0 and /dev/watchdog as root; it is held to the same bar.
    let agent = exposure(&units[1]);
    assert!(agent <= 2.0, "vigil-agent.service exposure {agent}");
}

#[test]
fn a_weakened_unit_is_rated_worse() {
    // The rating must be able to fail: strip the sandbox and the exposure rises past the bar.
    let dir = tempfile::tempdir().unwrap();
    let units = units_with_binary(dir.path());
    let text = std::fs::read_to_string(&units[0]).unwrap();
    let bare: String = text
        .lines()
        .filter(|l| {
            !l.starts_with("Protect")
                && !l.starts_with("Private")
                && !l.starts_with("SystemCall")
                && !l.starts_with("Restrict")
                && !l.starts_with("CapabilityBoundingSet")
                && !l.starts_with("DynamicUser")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let p = dir.path().join("bare.service");
    std::fs::write(&p, bare).unwrap();
    assert!(exposure(&p) > 2.0);
}
