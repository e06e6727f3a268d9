//! The lab's scale mode and the appliance against it: a rack of a few hundred BMCs in one lab
//! process, watched by the real `vigil run`. What must hold at any size: every BMC is polled at
//! its pace, never with more than one request in flight or more than one session, a slow BMC
//! gets no second request while it still works on the first, a fault is judged, and when vigil
//! stops no session is left open. (The figures at 1,000 to 10,000 nodes are the scale
//! benchmark's: `vigil-bench scale`.)

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const NODES: usize = 200;

fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

fn json(addr: &str, method: &str, path: &str) -> Value {
    let (code, body) = http(addr, method, path);
    assert_eq!(code, 200, "{method} {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http(addr, "GET", "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn a_scale_rack_is_watched_politely_and_its_faults_are_judged() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("lab");
    let lab = Stop(
        Command::new(common::lab_binary())
            .args(["scale", "--nodes", &NODES.to_string(), "--state-dir"])
            .arg(&sd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut ep = Value::Null;
    wait_for("scale.json", Duration::from_secs(30), || {
        std::fs::read_to_string(sd.join("scale.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .map(|v| ep = v)
            .is_some()
    });
    let control = ep["control_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let api = ep["api_listen"].as_str().unwrap().to_string();
    assert_eq!(ep["nodes"], NODES);

    // The configuration the lab wrote is one vigil accepts, with a BMC per node.
    let check = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
        .arg("check-config")
        .arg(sd.join("vigil.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let toml = std::fs::read_to_string(sd.join("vigil.toml")).unwrap();
    assert_eq!(
        toml.matches("redfish_url = \"https://127.64.").count(),
        NODES
    );
    // Secrets are files only the lab's user can read, and no secret is in the configuration.
    let bmc_password = std::fs::read_to_string(sd.join("secrets/bmc")).unwrap();
    assert!(!toml.contains(bmc_password.trim()));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(sd.join("secrets/bmc"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "secrets/bmc is readable by others");

    let vigil = Stop(
        Command::new(assert_cmd::cargo::cargo_bin("vigil"))
            .args(["run", "--config"])
            .arg(sd.join("vigil.toml"))
            .current_dir(&sd)
            .env("VIGIL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Every BMC reached, with one session each.
    wait_for("a session at every BMC", Duration::from_secs(60), || {
        json(&control, "GET", "/scale/stats")["sessions_open"] == NODES
    });
    std::thread::sleep(Duration::from_secs(4));
    json(&control, "POST", "/scale/reset");
    let hb0 = metric(&api, "vigil_heartbeats_accepted");
    let sent0 = json(&control, "GET", "/scale/stats")["heartbeats_sent"]
        .as_f64()
        .unwrap();
    // A slow BMC (answers after 5 s, past vigil's 2 s timeout), one that goes down, and a
    // power loss.
    json(
        &control,
        "POST",
        "/scale/inject?node=n00007&fault=slow&delay_ms=5000",
    );
    json(&control, "POST", "/scale/inject?node=n00013&fault=bmc-down");
    let t0 = Instant::now();
    json(
        &control,
        "POST",
        "/scale/inject?node=n00011&fault=power-loss",
    );
    let mut verdict = Value::Null;
    wait_for("the power loss's verdict", Duration::from_secs(20), || {
        let (_, body) = http(&api, "GET", "/api/log?node=n00011");
        let log: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        log.as_array()
            .into_iter()
            .flatten()
            .find(|r| {
                r["kind"] == "verdict" && r["detail"]["verdict"]["verdict"] == "hardware-fault"
            })
            .map(|r| verdict = r.clone())
            .is_some()
    });
    assert_eq!(verdict["detail"]["verdict"]["kind"], "power", "{verdict}");
    eprintln!("power loss judged in {:?}", t0.elapsed());
    // Let the window run to 20 s: ten poll intervals.
    std::thread::sleep(Duration::from_secs(20).saturating_sub(t0.elapsed()));
    let s = json(&control, "GET", "/scale/stats");
    eprintln!("{s}");
    let window_s = s["window_ms"].as_f64().unwrap() / 1000.0;
    let polls = s["polls"].as_f64().unwrap();
    let want = NODES as f64 * window_s / 2.0;
    assert!(
        polls >= 0.9 * want,
        "{polls} polls in {window_s} s, {want} expected"
    );
    // Politeness: one request and one session per BMC, the slow one included.
    assert_eq!(s["max_in_flight_per_bmc"], 1, "{s}");
    assert_eq!(s["max_sessions_per_bmc"], 1, "{s}");
    assert_eq!(s["sessions_refused"], 0, "{s}");
    assert_eq!(s["auth_failures"], 0, "{s}");
    // The faulted BMCs' cost stays theirs: every healthy BMC was polled, none late by more
    // than an interval (a shared, noisy machine is allowed one in a hundred).
    assert_eq!(s["nodes_polled"], NODES - 3, "{s}");
    let late = s["late_polls"].as_f64().unwrap();
    assert!(late * 100.0 <= polls, "{late} late polls of {polls}: {s}");
    // The heartbeats arrive and are accepted (the power-lost node's stop).
    let accepted = metric(&api, "vigil_heartbeats_accepted") - hb0;
    let sent = s["heartbeats_sent"].as_f64().unwrap() - sent0;
    assert!(
        accepted >= 0.95 * sent && sent >= 0.9 * (NODES - 1) as f64 * window_s,
        "{accepted} accepted of {sent} sent in {window_s} s"
    );
    // When vigil stops it closes every session (the slow and the down BMC are back first: a
    // BMC that is down when its client stops keeps the session until its own timeout).
    json(&control, "POST", "/scale/repair?node=n00007");
    json(&control, "POST", "/scale/repair?node=n00013");
    std::thread::sleep(Duration::from_secs(8));
    drop(vigil);
    let s = json(&control, "GET", "/scale/stats");
    assert_eq!(s["sessions_open"], 0, "sessions left open: {s}");
    drop(lab);
    assert!(!Path::new(&sd).join("scale.json.tmp").exists());
}
