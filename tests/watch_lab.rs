//! `vigil watch` against the hardware lab: every fault of the evidence matrix gives its verdict,
//! in time; a minute of transient noise gives no verdict that would fence.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Lab;
use serde_json::{Value, json};

struct Watch {
    child: Child,
    rx: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    latest: std::collections::BTreeMap<String, String>,
}

impl Watch {
    fn start(lab: &Lab) -> Watch {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
            .args(["watch", "--json", "--config"])
            .arg(lab.config_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Watch {
            child,
            rx,
            seen: Vec::new(),
            latest: Default::default(),
        }
    }

    fn take(&mut self, v: Value) {
        self.latest.insert(
            v["node"].as_str().unwrap().to_string(),
            name(&v["diagnosis"]["kind"]),
        );
        self.seen.push(v);
    }

    fn drain(&mut self) {
        while let Ok(v) = self.rx.try_recv() {
            self.take(v);
        }
    }

    /// Waits for `node`'s verdict to become `verdict` (as `Kind::name` spells it); returns how long
    /// it took.
    fn expect(&mut self, node: &str, verdict: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        self.drain();
        loop {
            if self.latest.get(node).map(String::as_str) == Some(verdict) {
                return t0.elapsed();
            }
            let left = within.checked_sub(t0.elapsed()).unwrap_or_else(|| {
                let mine: Vec<String> = self
                    .seen
                    .iter()
                    .filter(|v| v["node"] == node)
                    .map(|v| {
                        format!(
                            "{} {} {}",
                            v["diagnosis"]["kind"],
                            v["diagnosis"]["why"],
                            v["diagnosis"]["evidence"]
                        )
                    })
                    .collect();
                panic!("{node} never became {verdict} within {within:?}; its verdicts: {mine:#?}")
            });
            if let Ok(v) = self.rx.recv_timeout(left) {
                self.take(v);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// `{"verdict":"hardware-fault","kind":"power"}` -> `hardware-fault:power`.
fn name(k: &Value) -> String {
    match k["kind"].as_str() {
        Some(sub) => format!("{}:{sub}", k["verdict"].as_str().unwrap()),
        None => k["verdict"].as_str().unwrap_or_default().to_string(),
    }
}

fn fast_rack(t: String) -> String {
    // Short POSTs (repaired servers come back within seconds) and a 2 s watchdog.
    t.replace(
        "time_scale = 0.02",
        "time_scale = 0.005\nwatchdog_timeout_ms = 2000",
    )
}

#[test]
fn every_fault_gives_its_verdict_in_time() {
    let lab = Lab::rack4(fast_rack);
    let mut w = Watch::start(&lab);
    for n in ["db1", "web1", "web2", "batch1"] {
        w.expect(n, "healthy", Duration::from_secs(15));
    }
    // (fault, its parameters, the verdict, how long it may take)
    let rounds: &[&[(&str, Value, &str, u64)]] = &[
        &[
            (
                "db1",
                json!({"kind": "power-loss"}),
                "hardware-fault:power",
                4,
            ),
            ("web1", json!({"kind": "os-hang"}), "software-hang", 10),
            ("web2", json!({"kind": "network-isolation"}), "isolated", 12),
            (
                "batch1",
                json!({"kind": "thermal-trip"}),
                "hardware-fault:thermal",
                4,
            ),
        ],
        &[
            (
                "db1",
                json!({"kind": "vr-fault"}),
                "hardware-fault:voltage-regulator",
                4,
            ),
            ("web1", json!({"kind": "cpu-ierr"}), "hardware-fault:cpu", 6),
            (
                "web2",
                json!({"kind": "memory-uncorrectable"}),
                "hardware-fault:memory",
                6,
            ),
            ("batch1", json!({"kind": "post-hang"}), "post-failure", 8),
        ],
        &[
            (
                "db1",
                json!({"kind": "psu-failure", "all": true}),
                "hardware-fault:psu",
                4,
            ),
            ("web1", json!({"kind": "kernel-panic"}), "software-hang", 6),
            ("web2", json!({"kind": "psu-failure"}), "degraded", 6),
            ("batch1", json!({"kind": "bmc-down"}), "bmc-lost", 8),
        ],
        &[("db1", json!({"kind": "dark"}), "dark", 10)],
    ];
    let mut took = Vec::new();
    for round in rounds {
        for (node, fault, _, _) in round.iter() {
            lab.inject(node, fault.clone());
        }
        for (node, fault, verdict, secs) in round.iter() {
            let t = w.expect(node, verdict, Duration::from_secs(*secs));
            took.push(format!(
                "{node} {}: {verdict} in {} ms",
                fault["kind"],
                t.as_millis()
            ));
        }
        for (node, _, _, _) in round.iter() {
            lab.repair(node);
        }
        for (node, _, _, _) in round.iter() {
            w.expect(node, "healthy", Duration::from_secs(20));
        }
    }
    eprintln!("{}", took.join("\n"));
    // Nothing else in the rack was judged to need a fence while all this happened.
    w.drain();
    for v in &w.seen {
        if ["failover1", "backup1"].contains(&v["node"].as_str().unwrap()) {
            assert!(
                ["healthy", "suspect", "degraded"]
                    .contains(&name(&v["diagnosis"]["kind"]).as_str()),
                "{v}"
            );
        }
    }
}

#[test]
fn a_minute_of_transient_noise_gives_no_fencing_verdict() {
    let lab = Lab::rack4(fast_rack);
    let mut w = Watch::start(&lab);
    for n in ["db1", "web1", "web2", "batch1"] {
        w.expect(n, "healthy", Duration::from_secs(15));
    }
    let out = Command::new(common::lab_binary())
        .args(["soak", "--for", "60s", "--state-dir"])
        .arg(lab.state_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = injected
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(total >= 20, "the soak injected too little: {injected}");
    w.drain();
    // Verdicts that fence at once: none. "Isolated" fences only after the isolation grace
    // (60 s by default): a heartbeat loss burst may show it briefly, never for that long.
    let fencing = ["software-hang", "post-failure"];
    let bad: Vec<&Value> = w
        .seen
        .iter()
        .filter(|v| {
            let n = name(&v["diagnosis"]["kind"]);
            n.starts_with("hardware-fault") || fencing.contains(&n.as_str())
        })
        .collect();
    assert!(bad.is_empty(), "noise made a fencing verdict: {bad:#?}");
    let mut isolated_since: std::collections::BTreeMap<String, u64> = Default::default();
    for v in &w.seen {
        let node = v["node"].as_str().unwrap().to_string();
        let at = v["at"].as_u64().unwrap();
        if name(&v["diagnosis"]["kind"]) == "isolated" {
            isolated_since.entry(node).or_insert(at);
        } else if let Some(since) = isolated_since.remove(&node) {
            assert!(
                at - since < 15_000,
                "{node} stayed isolated {} ms under noise",
                at - since
            );
        }
    }
    assert!(
        isolated_since.is_empty(),
        "still isolated at the end of the soak: {isolated_since:?}"
    );
    eprintln!(
        "soak: injected {injected}; {} verdict changes, none fencing",
        w.seen.len()
    );
}

#[test]
fn with_redfish_down_a_node_is_still_watched_and_judged_through_ipmi() {
    let lab = Lab::rack4(fast_rack);
    let mut w = Watch::start(&lab);
    for n in ["db1", "web1"] {
        w.expect(n, "healthy", Duration::from_secs(15));
    }
    // Only the BMC's Redfish service dies: its IPMI side still answers, so the node's
    // out-of-band evidence is not lost.
    lab.inject("web1", json!({"kind": "redfish-down"}));
    std::thread::sleep(Duration::from_secs(4));
    w.drain();
    let web1: Vec<String> = w
        .seen
        .iter()
        .filter(|v| v["node"] == "web1")
        .map(|v| name(&v["diagnosis"]["kind"]))
        .collect();
    assert!(
        web1.iter().all(|k| k == "healthy"),
        "web1 with only Redfish down: {web1:?}"
    );
    // A thermal trip now is seen through IPMI alone (power off, the CPU temperature sensor
    // and the SEL's thermal-trip record) and judged a hardware fault.
    lab.inject("web1", json!({"kind": "thermal-trip"}));
    let t = w.expect("web1", "hardware-fault:thermal", Duration::from_secs(8));
    eprintln!("web1 thermal-trip through IPMI: {} ms", t.as_millis());
    let last = w
        .seen
        .iter()
        .rev()
        .find(|v| v["node"] == "web1")
        .unwrap()
        .to_string();
    assert!(last.contains("IPMI") || last.contains("ipmi"), "{last}");
}

#[test]
fn a_hang_whose_watchdog_resets_or_powers_off_the_host_is_a_software_hang() {
    // The OSes arm their BMC's watchdog with an action (in-band, in the real ipmi_sim): db1
    // hard reset, web1 power down, web2 power cycle. The BMC acts one countdown after the hang,
    // so vigil sees a host in POST again, or off, and must still call it a hang, not a boot to
    // wait for nor a power fault.
    let lab = Lab::rack4(|t| {
        fast_rack(t)
            .replace("watchdog_timeout_ms = 2000", "watchdog_timeout_ms = 3000")
            .replace(
                "firmware_profile = \"idrac9\"",
                "firmware_profile = \"idrac9\"\nwatchdog_action = \"hard-reset\"",
            )
            .replace(
                "firmware_profile = \"ilo5\"",
                "firmware_profile = \"ilo5\"\nwatchdog_action = \"power-down\"",
            )
            .replace(
                "firmware_profile = \"xcc\"",
                "firmware_profile = \"xcc\"\nwatchdog_action = \"power-cycle\"",
            )
    });
    let mut w = Watch::start(&lab);
    for n in ["db1", "web1", "web2"] {
        w.expect(n, "healthy", Duration::from_secs(15));
    }
    for n in ["db1", "web1", "web2"] {
        lab.inject(n, json!({"kind": "os-hang"}));
    }
    for (n, acted) in [
        ("db1", "WatchdogRestart"),
        ("web1", "WatchdogOff"),
        ("web2", "WatchdogOff"),
    ] {
        let t = w.expect(n, "software-hang", Duration::from_secs(12));
        let resets = lab.server(n)["resets"].to_string();
        assert!(resets.contains(acted), "{n}: {resets}");
        eprintln!("{n}: software-hang in {} ms", t.as_millis());
    }
    // Nothing on the way was called a hardware fault.
    w.drain();
    let wrong: Vec<&Value> = w
        .seen
        .iter()
        .filter(|v| name(&v["diagnosis"]["kind"]).starts_with("hardware-fault"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
