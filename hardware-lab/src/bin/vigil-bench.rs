//! vigil's benchmarks against the hardware lab. They print their figures; nothing here is a test.
//!
//! - `vigil-bench poll [--runs N]`: one status poll (fast and full), median and p99, for every
//!   machine of the lab's rack, over Redfish and over IPMI.
//! - `vigil-bench detect [--runs N]`: fault to verdict, for each fault kind, p50 and p99, with
//!   `vigil watch` judging the lab.
//! - `vigil-bench recovery --guest DIR [--runs N]`: fault to the twin's first heartbeat with
//!   `vigil run` and real QEMU twins, for a hardware fault and a software hang, the phases
//!   (detect, fence, boot) broken out from the fencing log.
//!
//! Build with `cargo build --release --workspace` and run `target/release/vigil-bench ...`: the
//! lab and vigil binaries are taken from beside it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "vigil-bench",
    about = "vigil's benchmarks against the hardware lab"
)]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// One status poll per firmware profile.
    Poll {
        /// Polls per profile.
        #[arg(long, default_value_t = 200)]
        runs: usize,
    },
    /// Fault to verdict per fault kind.
    Detect {
        /// Injections per fault kind (power-loss and os-hang; the other kinds get a quarter).
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Fault to the twin's first heartbeat, with QEMU twins.
    Recovery {
        /// The built guest (hardware-lab/guest/build.sh).
        #[arg(long)]
        guest: PathBuf,
        /// Failovers per fault kind.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build the workspace (cargo build --release --workspace)",
            p.display()
        );
    }
    Ok(p)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

struct Lab {
    child: Child,
    dir: tempfile::TempDir,
    endpoints: Value,
}

impl Lab {
    fn start(topology: &str, extra: &[&str]) -> anyhow::Result<Lab> {
        let dir = tempfile::tempdir()?;
        let topo = dir.path().join("t.toml");
        std::fs::write(&topo, topology)?;
        let log = std::fs::File::create(dir.path().join("lab.log"))?;
        let child = Command::new(bin("vigil-lab")?)
            .args(["up", "--topology"])
            .arg(&topo)
            .arg("--state-dir")
            .arg(dir.path().join("lab"))
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let ep = dir.path().join("lab/endpoints.json");
        let t0 = Instant::now();
        while !ep.is_file() {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the lab did not come up");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        let endpoints = serde_json::from_str(&std::fs::read_to_string(&ep)?)?;
        Ok(Lab {
            child,
            dir,
            endpoints,
        })
    }

    fn config(&self) -> PathBuf {
        PathBuf::from(self.endpoints["vigil_config"].as_str().unwrap_or_default())
    }

    fn control(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = self.endpoints["control_url"]
            .as_str()
            .context("no control url")?
            .to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (code, text) = rt.block_on(vigil_lab::control::request(
            &url,
            method,
            path,
            body.as_ref(),
        ))?;
        if code != 200 {
            bail!("{method} {path}: {code} {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        // Twins this benchmark's appliance started.
        let vms = self.dir.path().join("lab/appliance/vms");
        for host in std::fs::read_dir(vms)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            for vm in std::fs::read_dir(host.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                if let Ok(pid) = std::fs::read_to_string(vm.path().join("qemu.pid")) {
                    let _ = Command::new("kill").arg(pid.trim()).status();
                }
            }
        }
    }
}

fn rack4() -> anyhow::Result<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/rack4.toml");
    Ok(std::fs::read_to_string(p)?.replace(
        "time_scale = 0.02",
        "time_scale = 0.005\nwatchdog_timeout_ms = 2000",
    ))
}

fn poll(runs: usize) -> anyhow::Result<()> {
    let _p = rustls::crypto::ring::default_provider().install_default();
    let lab = Lab::start(&rack4()?, &[])?;
    let (cfg, profiles, _) = vigil::config::load(&lab.config())?;
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "status poll of one BMC, session reused, {runs} fast polls and {} full ones each (Redfish over HTTPS to the lab's BMC; IPMI over RMCP+ suite 3 to the lab's ipmi_sim):",
        runs / 4
    );
    println!(
        "{:<10} {:<13} {:<8} {:>10} {:>10} {:>10} {:>10}",
        "machine", "firmware", "path", "fast p50", "fast p99", "full p50", "full p99"
    );
    let mut medians: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for m in cfg.machines() {
        let paths = vigil::bmc::paths::Paths::for_machine(&m, &profiles)?;
        for (path, b) in [("redfish", paths.redfish), ("ipmi", paths.ipmi)] {
            let Some(b) = b else { continue };
            let (fast, full) = rt.block_on(async {
                use vigil::bmc::Depth;
                let _warm = b.status(Depth::Full).await;
                let mut fast = Vec::new();
                let mut full = Vec::new();
                for _ in 0..runs {
                    let t = Instant::now();
                    let _r = b.status(Depth::Fast).await;
                    fast.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                for _ in 0..runs / 4 {
                    let t = Instant::now();
                    let _r = b.status(Depth::Full).await;
                    full.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                b.close().await;
                (fast, full)
            });
            let (mut fast, mut full) = (fast, full);
            let f50 = pct(&mut fast, 0.5);
            medians.entry(path).or_default().push(f50);
            println!(
                "{:<10} {:<13} {:<8} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
                m.name,
                m.firmware_profile,
                path,
                f50,
                pct(&mut fast, 0.99),
                pct(&mut full, 0.5),
                pct(&mut full, 0.99)
            );
        }
    }
    for (path, mut v) in medians {
        println!(
            "median of the machines' fast-poll medians, {path}: {:.2} ms",
            pct(&mut v, 0.5)
        );
    }
    Ok(())
}

/// `vigil watch --json` as a child, its verdicts on a channel.
fn watch(cfg: &Path) -> anyhow::Result<(Child, std::sync::mpsc::Receiver<(Instant, Value)>)> {
    let mut child = Command::new(bin("vigil")?)
        .args(["watch", "--json", "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send((Instant::now(), v)).is_err()
            {
                return;
            }
        }
    });
    Ok((child, rx))
}

fn verdict_name(v: &Value) -> String {
    let k = &v["diagnosis"]["kind"];
    match k["kind"].as_str() {
        Some(sub) => format!("{}:{sub}", k["verdict"].as_str().unwrap_or("")),
        None => k["verdict"].as_str().unwrap_or("").to_string(),
    }
}

/// Verdicts as they come, with the latest per node kept.
struct Verdicts {
    rx: std::sync::mpsc::Receiver<(Instant, Value)>,
    latest: BTreeMap<String, (Instant, String)>,
}

impl Verdicts {
    fn take(&mut self, at: Instant, v: &Value) {
        if let Some(n) = v["node"].as_str() {
            self.latest.insert(n.to_string(), (at, verdict_name(v)));
        }
    }

    fn drain(&mut self) {
        while let Ok((at, v)) = self.rx.try_recv() {
            self.take(at, &v);
        }
    }

    /// Waits until `node`'s verdict is `want`; returns when it became so.
    fn wait(&mut self, node: &str, want: &str, within: Duration) -> Option<Instant> {
        let t0 = Instant::now();
        self.drain();
        loop {
            if let Some((at, v)) = self.latest.get(node)
                && v == want
            {
                return Some(*at);
            }
            let left = within.checked_sub(t0.elapsed())?;
            if let Ok((at, v)) = self.rx.recv_timeout(left) {
                self.take(at, &v);
            }
        }
    }
}

fn detect(runs: usize) -> anyhow::Result<()> {
    let lab = Lab::start(&rack4()?, &[])?;
    let (mut child, rx) = watch(&lab.config())?;
    let mut rx = Verdicts {
        rx,
        latest: BTreeMap::new(),
    };
    let nodes = ["db1", "web1", "web2", "batch1"];
    for n in nodes {
        rx.wait(n, "healthy", Duration::from_secs(20))
            .context("the rack never became healthy")?;
    }
    let kinds: &[(&str, Value, &str)] = &[
        (
            "power-loss",
            json!({"kind": "power-loss"}),
            "hardware-fault:power",
        ),
        ("os-hang", json!({"kind": "os-hang"}), "software-hang"),
        (
            "thermal-trip",
            json!({"kind": "thermal-trip"}),
            "hardware-fault:thermal",
        ),
        (
            "vr-fault",
            json!({"kind": "vr-fault"}),
            "hardware-fault:voltage-regulator",
        ),
        (
            "psu-failure --all",
            json!({"kind": "psu-failure", "all": true}),
            "hardware-fault:psu",
        ),
        (
            "cpu-ierr",
            json!({"kind": "cpu-ierr"}),
            "hardware-fault:cpu",
        ),
        (
            "memory-uncorrectable",
            json!({"kind": "memory-uncorrectable"}),
            "hardware-fault:memory",
        ),
        (
            "kernel-panic",
            json!({"kind": "kernel-panic"}),
            "software-hang",
        ),
        ("post-hang", json!({"kind": "post-hang"}), "post-failure"),
        (
            "network-isolation",
            json!({"kind": "network-isolation"}),
            "isolated",
        ),
    ];
    println!(
        "fault to verdict (vigil watch on the lab: BMC poll 1 s, heartbeats 1 s, 3 misses, evidence 3 samples over 300 ms (polled every 100 ms under suspicion), OS watchdog 2 s):"
    );
    println!(
        "{:<22} {:>5} {:>9} {:>9} {:>9}",
        "fault", "runs", "p50", "p99", "max"
    );
    let mut i = 0usize;
    for (name, fault, verdict) in kinds {
        let n = if *name == "power-loss" || *name == "os-hang" {
            runs
        } else {
            (runs / 4).max(3)
        };
        let mut lat = Vec::new();
        for _ in 0..n {
            let node = nodes[i % nodes.len()];
            i += 1;
            // A random moment within the poll interval, as faults come.
            std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000));
            rx.drain();
            let t0 = Instant::now();
            lab.control(
                "POST",
                &format!("/servers/{node}/inject"),
                Some(fault.clone()),
            )?;
            match rx.wait(node, verdict, Duration::from_secs(30)) {
                Some(at) => lat.push(at.duration_since(t0).as_secs_f64()),
                None => eprintln!("{name} on {node}: no {verdict} within 30 s"),
            }
            lab.control("POST", &format!("/servers/{node}/repair"), None)?;
            rx.wait(node, "healthy", Duration::from_secs(30))
                .with_context(|| format!("{node} did not recover after {name}"))?;
        }
        let max = lat.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "{:<22} {:>5} {:>8.2}s {:>8.2}s {:>8.2}s",
            name,
            lat.len(),
            pct(&mut lat.clone(), 0.5),
            pct(&mut lat, 0.99),
            max
        );
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    Ok(())
}

fn api(addr: &str, method: &str, path: &str, token: Option<&str>) -> anyhow::Result<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let body = r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok(serde_json::from_str(body).unwrap_or(Value::Null))
}

fn node_state(addr: &str, node: &str) -> String {
    api(addr, "GET", "/api/status", None)
        .ok()
        .and_then(|v| {
            v["nodes"].as_array()?.iter().find(|n| n["name"] == node)?["state"]
                .as_str()
                .map(String::from)
        })
        .unwrap_or_default()
}

fn wait_state(addr: &str, node: &str, want: &str, within: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if node_state(addr, node) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn recovery(guest: &Path, runs: usize) -> anyhow::Result<()> {
    let guest = guest.canonicalize().context("no guest")?;
    let lab = Lab::start(&rack4()?, &["--guest", &guest.display().to_string()])?;
    let log = std::fs::File::create(lab.dir.path().join("vigil.log"))?;
    let mut app = Command::new(bin("vigil")?)
        .args(["run", "--config"])
        .arg(lab.config())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let addr = lab.endpoints["api_listen"]
        .as_str()
        .context("no api")?
        .to_string();
    let token = std::fs::read_to_string(lab.dir.path().join("lab/secrets/api-token"))?
        .trim()
        .to_string();
    let nodes = ["db1", "web1", "web2", "batch1"];
    for n in nodes {
        if !wait_state(&addr, n, "healthy", Duration::from_secs(30)) {
            bail!("the rack never became healthy");
        }
    }
    let journal = lab.dir.path().join("lab/appliance/fencing.log");
    let mut table: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut i = 0usize;
    for (kind, fault) in [
        ("hardware fault (power loss)", "power-loss"),
        ("software hang (OS hang)", "os-hang"),
    ] {
        for _ in 0..runs {
            let node = nodes[i % nodes.len()];
            i += 1;
            std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000));
            let injected = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            lab.control(
                "POST",
                &format!("/servers/{node}/inject"),
                Some(json!({ "kind": fault })),
            )?;
            if !wait_state(&addr, node, "running-virtual", Duration::from_secs(60)) {
                eprintln!("{node}: failover did not complete");
                continue;
            }
            let recs = vigil::journal::verify(&journal)?;
            let t = |k: vigil::journal::RecordKind| {
                recs.iter()
                    .rev()
                    .find(|r| r.node.as_deref() == Some(node) && r.kind == k)
                    .and_then(|r| vigil::clock::parse_rfc3339_ms(&r.time))
            };
            use vigil::journal::RecordKind as K;
            if let (Some(b), Some(f), Some(h)) =
                (t(K::FailoverBegin), t(K::FenceConfirmed), t(K::VmHeartbeat))
            {
                let e = table.entry(kind).or_default();
                e.entry("detect")
                    .or_default()
                    .push(b.saturating_sub(injected) as f64 / 1000.0);
                e.entry("fence")
                    .or_default()
                    .push(f.saturating_sub(b) as f64 / 1000.0);
                e.entry("boot")
                    .or_default()
                    .push(h.saturating_sub(f) as f64 / 1000.0);
                e.entry("total")
                    .or_default()
                    .push(h.saturating_sub(injected) as f64 / 1000.0);
            }
            // Back for the next run: repair (vigil fences the node again, its twin running), fail back.
            lab.control("POST", &format!("/servers/{node}/repair"), None)?;
            let _ = api(
                &addr,
                "POST",
                &format!("/api/nodes/{node}/failback"),
                Some(&token),
            );
            if !wait_state(&addr, node, "healthy", Duration::from_secs(90)) {
                bail!("{node} did not fail back");
            }
        }
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(app.id().to_string())
        .status();
    let _ = app.wait();
    println!(
        "fault to the twin's first heartbeat (vigil run on the lab, QEMU {} twins; {runs} failovers each):",
        if Path::new("/dev/kvm").exists() {
            "TCG/KVM"
        } else {
            "TCG"
        }
    );
    println!(
        "{:<28} {:>7} {:>15} {:>15} {:>15} {:>15}",
        "fault", "runs", "detect p50/p99", "fence p50/p99", "boot p50/p99", "total p50/p99"
    );
    for (kind, phases) in &mut table {
        let mut cell = |k: &str| {
            let v = phases.get_mut(k).map(std::mem::take).unwrap_or_default();
            let mut v2 = v.clone();
            (
                v.len(),
                format!(
                    "{:.2}/{:.2}s",
                    pct(&mut v2.clone(), 0.5),
                    pct(&mut v2, 0.99)
                ),
            )
        };
        let (n, d) = cell("detect");
        let (_, f) = cell("fence");
        let (_, b) = cell("boot");
        let (_, t) = cell("total");
        println!("{kind:<28} {n:>7} {d:>15} {f:>15} {b:>15} {t:>15}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().what {
        What::Poll { runs } => poll(runs),
        What::Detect { runs } => detect(runs),
        What::Recovery { guest, runs } => recovery(&guest, runs),
    }
}
