//! Every scenario of hardware-lab/scenarios, end to end: `vigil run` against the lab with real
//! QEMU twins. For each: the timeline is played, the expected verdict must appear in the fencing
//! log, then the outcome must follow (a failover: fence confirmed, twin heartbeating; or nothing
//! at all for the hold), and a failover is failed back. The safety invariants are checked on the
//! log after each. Scenarios on different servers run two at a time (the storm guard allows two
//! concurrent failovers; half the rack failing at once is its limit).

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Lab;
use common::appliance::*;
use serde_json::Value;

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    steps: Vec<(Duration, String, Option<Value>)>,
    expects: Vec<Expect>,
}

#[derive(Debug, Clone)]
struct Expect {
    node: String,
    verdict: String,
    within: Duration,
    failover: bool,
    hold: Duration,
}

fn dur(v: &toml::Value) -> Duration {
    humantime::parse_duration(v.as_str().unwrap()).unwrap()
}

/// The scenario files (vigil-lab's own test checks their schema; this reads what it plays).
fn scenarios() -> Vec<Scenario> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hardware-lab/scenarios");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let t: toml::Value = toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            assert_eq!(
                t["topology"].as_str(),
                Some("rack4.toml"),
                "{}",
                p.display()
            );
            Scenario {
                name: t["name"].as_str().unwrap().to_string(),
                steps: t["timeline"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| {
                        (
                            dur(&s["at"]),
                            s["server"].as_str().unwrap().to_string(),
                            s.get("inject").map(|f| serde_json::to_value(f).unwrap()),
                        )
                    })
                    .collect(),
                expects: t["expect"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| Expect {
                        node: e["node"].as_str().unwrap().to_string(),
                        verdict: e["verdict"].as_str().unwrap().to_string(),
                        within: dur(&e["within"]),
                        failover: e["outcome"].as_str() == Some("failover"),
                        hold: e.get("hold").map(dur).unwrap_or_default(),
                    })
                    .collect(),
            }
        })
        .collect()
}

fn last_seq(lab: &Lab) -> u64 {
    journal_lines(lab)
        .last()
        .and_then(|r| r["seq"].as_u64())
        .unwrap_or(0)
}

/// The first record of `node` after `seq` that `pred` accepts, waiting up to `within`.
fn wait_record(
    lab: &Lab,
    node: &str,
    seq: u64,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let t0 = Instant::now();
    loop {
        if let Some(r) = journal_lines(lab)
            .into_iter()
            .find(|r| r["seq"].as_u64().unwrap_or(0) > seq && r["node"] == node && pred(r))
        {
            return Some(r);
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Plays one scenario and checks what follows; returns a line for the summary.
fn play(lab: &Lab, s: &Scenario) -> String {
    for e in &s.expects {
        wait_state(lab, &e.node, "healthy", Duration::from_secs(90));
    }
    let seq0 = last_seq(lab);
    let t0 = Instant::now();
    for (at, server, fault) in &s.steps {
        std::thread::sleep(at.saturating_sub(t0.elapsed()));
        match fault {
            Some(f) => {
                lab.inject(server, f.clone());
            }
            None => {
                lab.repair(server);
            }
        }
    }
    let mut out = Vec::new();
    for e in &s.expects {
        let node = e.node.as_str();
        if e.verdict != "healthy" {
            let want = format!("-> {}:", e.verdict);
            // A generous bound (this machine is shared); the time taken is printed.
            let r = wait_record(
                lab,
                node,
                seq0,
                e.within * 2 + Duration::from_secs(5),
                |r| r["kind"] == "verdict" && r["message"].as_str().unwrap_or("").contains(&want),
            );
            let r = r.unwrap_or_else(|| {
                let mine: Vec<String> = journal_lines(lab)
                    .iter()
                    .filter(|r| r["seq"].as_u64().unwrap_or(0) > seq0 && r["node"] == node)
                    .map(|r| r["message"].to_string())
                    .collect();
                panic!(
                    "{}: no verdict {} for {node}; its records: {mine:#?}",
                    s.name, e.verdict
                )
            });
            out.push(format!(
                "{}: {} in {} ms",
                s.name,
                e.verdict,
                t0.elapsed().as_millis()
            ));
            let _ = r;
        }
        if e.failover {
            let hb = wait_record(lab, node, seq0, Duration::from_secs(90), |r| {
                r["kind"] == "vm-heartbeat" || r["kind"] == "failover-failed"
            })
            .unwrap_or_else(|| panic!("{}: {node} never failed over", s.name));
            assert_eq!(hb["kind"], "vm-heartbeat", "{}: {hb}", s.name);
            assert_eq!(twins(lab, node), 1, "{}", s.name);
            if std::env::var("VIGIL_SCENARIOS").is_ok() {
                for r in journal_lines(lab)
                    .iter()
                    .filter(|r| r["seq"].as_u64().unwrap_or(0) > seq0 && r["node"] == node)
                {
                    eprintln!("  {} {} {}", r["time"], r["kind"], r["message"]);
                }
            }
            out.push(format!(
                "{}: twin heartbeating after {} ms",
                s.name,
                t0.elapsed().as_millis()
            ));
        } else {
            std::thread::sleep(e.hold);
            let acted: Vec<String> = journal_lines(lab)
                .iter()
                .filter(|r| r["seq"].as_u64().unwrap_or(0) > seq0 && r["node"] == node)
                .filter(|r| {
                    ["failover-begin", "fence-begin", "fence-action", "vm-start"]
                        .contains(&r["kind"].as_str().unwrap_or(""))
                })
                .map(|r| r["message"].to_string())
                .collect();
            assert!(
                acted.is_empty(),
                "{}: {node} was acted on: {acted:#?}",
                s.name
            );
            assert_eq!(twins(lab, node), 0, "{}", s.name);
        }
    }
    // Back to a healthy rack for the next scenario: repair, and fail back what failed over.
    for e in &s.expects {
        lab.repair(&e.node);
        if e.failover {
            let t = Instant::now();
            loop {
                let (code, body) = api(
                    lab,
                    "POST",
                    &format!("/api/nodes/{}/failback", e.node),
                    Some(&token(lab)),
                );
                if code == 202 {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{}: failback refused: {code} {body}",
                    s.name
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        wait_state(lab, &e.node, "healthy", Duration::from_secs(120));
        assert_eq!(twins(lab, &e.node), 0, "{}", s.name);
        check_log_invariants(&journal(lab), &e.node);
    }
    out.join("\n")
}

#[test]
fn every_scenario_end_to_end() {
    let mut all = scenarios();
    assert!(all.len() >= 20, "{} scenarios", all.len());
    // VIGIL_SCENARIOS=a,b plays only those (for a closer look at one).
    if let Ok(only) = std::env::var("VIGIL_SCENARIOS") {
        all.retain(|s| only.split(',').any(|o| o == s.name));
    }
    let t = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("hardware-lab/topologies/rack4.toml"),
    )
    .unwrap()
    .replace(
        "time_scale = 0.02",
        "time_scale = 0.005\nwatchdog_timeout_ms = 2000",
    );
    let lab = Lab::start_with(&t, &["--guest", guest().to_str().unwrap()]);
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "scenarios");
    // Rounds: at most two scenarios at once, on different servers.
    let mut left = all.clone();
    let mut summary = Vec::new();
    while !left.is_empty() {
        let first = left.remove(0);
        let busy = first.expects[0].node.clone();
        let second = left
            .iter()
            .position(|s| s.expects.iter().all(|e| e.node != busy))
            .map(|i| left.remove(i));
        let round: Vec<Scenario> = std::iter::once(first).chain(second).collect();
        let lines: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = round
                .iter()
                .map(|s| {
                    let lab = &lab;
                    sc.spawn(move || play(lab, s))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        summary.extend(lines);
    }
    eprintln!("{}", summary.join("\n"));
    let v = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
        .args(["log", "verify", "--config"])
        .arg(lab.config_path())
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    app.stop();
}
