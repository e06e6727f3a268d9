//! `vigil demo`: the hardware lab's 4-node rack, the appliance against it, a hardware fault and a
//! software hang failed over to real QEMU twins, progress shown live, and a summary at the end.
//!
//! The lab runs as a child process (the `vigil-lab` binary beside `vigil`: no lab code is linked
//! into the appliance). The appliance runs in this process, exactly as `vigil run` does. The
//! fencing log is left in the demo's folder for reading with `vigil log`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::clock::parse_rfc3339_ms;
use crate::config;
use crate::daemon::run::{self, Options};
use crate::journal::{self, Record, RecordKind};
use crate::virt::Hypervisor;

/// The rack the demo runs: the lab's 4-node rack with a 3 s OS watchdog (so a hang is told from
/// an isolation within seconds) and POSTs at 2 % of their real length.
const TOPOLOGY: &str = include_str!("../../hardware-lab/topologies/rack4.toml");

/// The faults injected: (node, fault, what it is).
const FAULTS: &[(&str, &str, &str)] = &[
    (
        "db1",
        "thermal-trip",
        "hardware fault: the CPU overheats and the board trips",
    ),
    (
        "web1",
        "os-hang",
        "software hang: the OS freezes, its watchdog runs out",
    ),
];

fn lab_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("vigil-lab");
    if p.is_file() {
        return Ok(p);
    }
    bail!(
        "the vigil-lab binary is not beside {} (build the workspace: cargo build --workspace)",
        exe.display()
    )
}

struct Lab(Child);

impl Drop for Lab {
    fn drop(&mut self) {
        // End only what we started, by its PID.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn control(url: &str, path: &str, body: Value) -> anyhow::Result<()> {
    let host = url.strip_prefix("http://").context("bad control URL")?;
    let mut s = std::net::TcpStream::connect(host)?;
    let b = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    )?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    if !r.starts_with("HTTP/1.1 200") {
        bail!("the lab refused {path}: {}", r.lines().next().unwrap_or(""));
    }
    Ok(())
}

fn ms_between(a: Option<&Record>, b: Option<&Record>) -> Option<u64> {
    let (a, b) = (parse_rfc3339_ms(&a?.time)?, parse_rfc3339_ms(&b?.time)?);
    b.checked_sub(a)
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |m| format!("{:.2} s", m as f64 / 1000.0))
}

pub(super) fn run(guest: &Path, dir: Option<PathBuf>) -> anyhow::Result<u8> {
    let t_start = Instant::now();
    let guest = guest.canonicalize().with_context(|| format!("the guest folder {} is missing: build it with hardware-lab/guest/build.sh (scripts/demo.sh does)", guest.display()))?;
    for f in ["vmlinux", "initrd.gz"] {
        if !guest.join(f).is_file() {
            bail!(
                "{} has no {f}: build the guest with hardware-lab/guest/build.sh",
                guest.display()
            );
        }
    }
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("vigil-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let topology = dir.join("rack4.toml");
    std::fs::write(
        &topology,
        TOPOLOGY.replace(
            "time_scale = 0.02",
            "time_scale = 0.02\nwatchdog_timeout_ms = 3000",
        ),
    )?;
    let state = dir.join("lab");
    println!(
        "vigil demo: a 4-node rack (iDRAC9, iLO 5, XCC, Supermicro BMCs seeded from real captures), one failover and one backup server running QEMU twins."
    );
    let log = std::fs::File::create(dir.join("lab.log"))?;
    let lab = Lab(Command::new(lab_binary()?)
        .args(["up", "--topology"])
        .arg(&topology)
        .arg("--state-dir")
        .arg(&state)
        .arg("--guest")
        .arg(&guest)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("the lab cannot start")?);
    let ep_path = state.join("endpoints.json");
    let t0 = Instant::now();
    while !ep_path.is_file() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "the lab did not come up; see {}",
                dir.join("lab.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let endpoints: Value = serde_json::from_str(&std::fs::read_to_string(&ep_path)?)?;
    let cfg_path = PathBuf::from(
        endpoints["vigil_config"]
            .as_str()
            .context("no vigil_config in endpoints.json")?,
    );
    let control_url = endpoints["control_url"]
        .as_str()
        .context("no control_url")?
        .to_string();
    let (cfg, _, _) = config::load(&cfg_path)?;
    println!(
        "lab up in {:.1} s; the appliance starts (config {})",
        t_start.elapsed().as_secs_f64(),
        cfg_path.display()
    );

    let rt = tokio::runtime::Runtime::new()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let appliance = {
        let stop = stop.clone();
        let p = cfg_path.clone();
        rt.spawn(async move {
            run::run(
                &p,
                Options {
                    stop: Some(stop),
                    stop_after: Some(Duration::from_secs(600)),
                    ..Options::default()
                },
            )
            .await
        })
    };
    let status = |cfg: &config::Config| -> Option<Value> {
        super::daemon::api(cfg, "GET", "/api/status", None)
            .ok()
            .map(|(_, v)| v)
    };
    let states = |v: &Value| -> BTreeMap<String, String> {
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                Some((
                    n["name"].as_str()?.to_string(),
                    n["state"].as_str()?.to_string(),
                ))
            })
            .collect()
    };
    // Ready: every machine read and healthy.
    let t0 = Instant::now();
    loop {
        if let Some(v) = status(&cfg)
            && v["ready"] == true
            && states(&v).values().all(|s| s == "healthy")
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            stop.cancel();
            bail!("the rack did not become healthy within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "{:>6.1}s  all 6 machines healthy; injecting:",
        t_start.elapsed().as_secs_f64()
    );
    let mut injected: BTreeMap<&str, u64> = BTreeMap::new();
    for (node, fault, what) in FAULTS {
        control(
            &control_url,
            &format!("/servers/{node}/inject"),
            json!({ "kind": fault }),
        )?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        injected.insert(node, now);
        println!(
            "{:>6.1}s  {node}: {fault} ({what})",
            t_start.elapsed().as_secs_f64()
        );
    }
    // Follow the failovers live.
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let t0 = Instant::now();
    let done = loop {
        if let Some(v) = status(&cfg) {
            for (n, s) in states(&v) {
                if FAULTS.iter().any(|(f, _, _)| *f == n) && last.get(&n) != Some(&s) {
                    println!("{:>6.1}s  {n}: {s}", t_start.elapsed().as_secs_f64());
                    last.insert(n, s);
                }
            }
            if FAULTS
                .iter()
                .all(|(n, _, _)| last.get(*n).map(String::as_str) == Some("running-virtual"))
            {
                break true;
            }
        }
        if t0.elapsed() > Duration::from_secs(100) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.cancel();
    let _ = rt.block_on(appliance);
    // Summary from the fencing log.
    let records = journal::verify(&cfg.appliance.state_dir.join(journal::FILE_NAME))?;
    println!(
        "\nsummary (from the fencing log, {} records, chain intact):",
        records.len()
    );
    let mut all_ok = done;
    for (node, fault, _) in FAULTS {
        let mine: Vec<&Record> = records
            .iter()
            .filter(|r| r.node.as_deref() == Some(node))
            .collect();
        let find = |k: RecordKind| mine.iter().copied().find(|r| r.kind == k);
        // The verdict that led to the failover: the first fencing one after the injection.
        let verdict = mine.iter().copied().find(|r| {
            r.kind == RecordKind::Verdict
                && !["suspect", "healthy", "degraded"]
                    .contains(&r.detail["verdict"]["verdict"].as_str().unwrap_or("suspect"))
        });
        // The first suspicion: when the fault was first seen.
        let seen = mine
            .iter()
            .copied()
            .find(|r| r.kind == RecordKind::Verdict && r.detail["candidate"].is_object());
        let begin = find(RecordKind::FailoverBegin);
        let confirmed = find(RecordKind::FenceConfirmed);
        let start = find(RecordKind::VmStart);
        let beat = find(RecordKind::VmHeartbeat);
        let host = find(RecordKind::Placement)
            .and_then(|r| r.detail["host"].as_str().map(String::from))
            .unwrap_or_else(|| "-".into());
        let inj = injected.get(node).copied();
        let since = |r: Option<&Record>| {
            r.and_then(|r| parse_rfc3339_ms(&r.time))
                .zip(inj)
                .map(|(t, i)| t.saturating_sub(i))
        };
        println!("  {node} ({fault}):");
        if let Some(v) = verdict {
            println!("    verdict    {}", v.message);
            for e in v.detail["why"]["evidence"].as_array().into_iter().flatten() {
                println!(
                    "               {} = {}",
                    e["what"].as_str().unwrap_or(""),
                    e["value"].as_str().unwrap_or("")
                );
            }
        }
        println!(
            "    detected   first seen {} after the fault, verdict confirmed after {}",
            secs(since(seen)),
            secs(since(verdict))
        );
        println!(
            "    fenced     {} (fence took {}; {})",
            secs(since(confirmed)),
            secs(ms_between(find(RecordKind::FenceBegin), confirmed)),
            confirmed.map_or("not confirmed", |r| if r.detail["already_off"] == true {
                "the node was already off: no action needed"
            } else {
                "power action sent, Off read back twice"
            })
        );
        println!(
            "    twin       on {host}, booted in {}",
            secs(ms_between(start, beat))
        );
        println!(
            "    recovered  {} after the fault (first heartbeat of the twin under epoch {})",
            secs(since(beat)),
            begin
                .and_then(|b| b.epoch)
                .map_or("-".into(), |e| e.to_string())
        );
        if beat.is_none() {
            all_ok = false;
        }
    }
    // The twins are the demo's own: stop them.
    for h in &cfg.hosts {
        let d = crate::virt::qemu::QemuDriver {
            run_dir: cfg.appliance.state_dir.join("vms").join(&h.name),
            binary: PathBuf::from("qemu-system-x86_64"),
            net: crate::virt::qemu::NetMode::User,
        };
        rt.block_on(async {
            for (vm, _) in d.list().await {
                let _ = d.stop(&vm, Duration::from_secs(3)).await;
            }
        });
    }
    drop(lab);
    println!(
        "\nthe fencing log stays in {}: read it with",
        cfg.appliance.state_dir.display()
    );
    println!("  vigil log --config {}", cfg_path.display());
    println!(
        "demo {} in {:.1} s",
        if all_ok { "succeeded" } else { "FAILED" },
        t_start.elapsed().as_secs_f64()
    );
    Ok(if all_ok { 0 } else { 1 })
}
