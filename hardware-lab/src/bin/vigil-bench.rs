//! vigil's benchmarks against the hardware lab. They print their figures; nothing here is a test.
//!
//! - `vigil-bench poll [--runs N]`: one status poll (fast and full), median and p99, for every
//!   machine of the lab's rack, over Redfish and over IPMI.
//! - `vigil-bench detect [--runs N]`: fault to verdict, for each fault kind, p50 and p99, with
//!   `vigil watch` judging the lab.
//! - `vigil-bench twins --guest DIR [--runs N] [--block B]`: fence confirmed to the twin's first
//!   heartbeat, a cold twin (QEMU started at failover) against a pre-created one (paused, resumed
//!   at failover), p50/p99 over N failovers each, in alternating blocks of B on one lab; split
//!   into the hypervisor's part (vm-start to vm-running) and the guest's boot.
//! - `vigil-bench recovery --guest DIR [--runs N]`: fault to the twin's first heartbeat with
//!   `vigil run` and real QEMU twins, for a hardware fault and a software hang, the phases
//!   (detect, fence, boot) broken out from the fencing log.
//!
//! - `vigil-bench scale [--sizes 1000,3000,10000] [--window 60s] [--faults 12]`: the real
//!   `vigil run` against the lab's scale mode (`vigil-lab scale`): per size, the appliance's CPU
//!   and memory (total and per node), the achieved poll and heartbeat rates, the longest gap
//!   between two polls of one BMC, politeness (requests in flight and sessions per BMC, sessions
//!   left open after it stops), and fault-to-verdict latency for faults injected at random.
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
    /// The appliance watching thousands of nodes (the lab's scale mode).
    Scale {
        /// Rack sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,3000,10000")]
        sizes: Vec<usize>,
        /// How long each size is measured (after every BMC has been polled and a settling time).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        window: Duration,
        /// Faults injected at random moments of the window (power loss, OS hang, thermal trip in
        /// turn), plus one slow BMC and one BMC that goes down.
        #[arg(long, default_value_t = 12)]
        faults: usize,
    },
    /// Fence confirmed to the twin's first heartbeat, a cold twin against a pre-created one,
    /// in alternating blocks on one lab.
    Twins {
        /// The built guest (hardware-lab/guest/build.sh).
        #[arg(long)]
        guest: PathBuf,
        /// Failovers of each kind.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Failovers per block (the appliance restarts between blocks, with pre-creation on
        /// or off).
        #[arg(long, default_value_t = 5)]
        block: usize,
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

/// `vigil-bench twins`: see the module header.
fn twins(guest: &Path, runs: usize, block: usize) -> anyhow::Result<()> {
    use vigil::journal::RecordKind as K;
    let guest = guest.canonicalize().context("no guest")?;
    let lab = Lab::start(&rack4()?, &["--guest", &guest.display().to_string()])?;
    let cfg = lab.config();
    let plain = std::fs::read_to_string(&cfg)?;
    let addr = lab.endpoints["api_listen"]
        .as_str()
        .context("no api")?
        .to_string();
    let token = std::fs::read_to_string(lab.dir.path().join("lab/secrets/api-token"))?
        .trim()
        .to_string();
    let journal = lab.dir.path().join("lab/appliance/fencing.log");
    let nodes = ["db1", "web1", "web2", "batch1"];
    // Per kind: (fence confirmed to heartbeat, vm-start to vm-running, vm-running to heartbeat).
    let mut got: BTreeMap<&str, Vec<(f64, f64, f64)>> = BTreeMap::new();
    let mut i = 0usize;
    let mut block_no = 0usize;
    let count =
        |got: &BTreeMap<&str, Vec<(f64, f64, f64)>>, k: &str| got.get(k).map_or(0, Vec::len);
    while count(&got, "cold") < runs || count(&got, "pre-created") < runs {
        let pre = block_no % 2 == 1;
        block_no += 1;
        if count(&got, if pre { "pre-created" } else { "cold" }) >= runs {
            continue;
        }
        std::fs::write(
            &cfg,
            if pre {
                plain.replacen("[policy]\n", "[policy]\nprecreate_twins = true\n", 1)
            } else {
                plain.clone()
            },
        )?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(lab.dir.path().join("vigil.log"))?;
        let mut app = Command::new(bin("vigil")?)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        for n in nodes {
            if !wait_state(&addr, n, "healthy", Duration::from_secs(60)) {
                bail!("the rack never became healthy");
            }
        }
        for _ in 0..block {
            let node = nodes[i % nodes.len()];
            i += 1;
            let latest = |k: K| -> Option<(u64, u64)> {
                let recs = vigil::journal::verify(&journal).ok()?;
                recs.iter()
                    .rev()
                    .find(|r| r.node.as_deref() == Some(node) && r.kind == k)
                    .and_then(|r| Some((r.seq, vigil::clock::parse_rfc3339_ms(&r.time)?)))
            };
            if pre {
                // Its paused twin is there: a pre-creation newer than its last twin start.
                let t0 = Instant::now();
                while latest(K::VmStandby).map(|x| x.0) <= latest(K::VmStart).map(|x| x.0)
                    || std::fs::read_dir(lab.dir.path().join("lab/appliance/vms"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
                        .all(|v| {
                            !v.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("vigil-{node}-e"))
                        })
                {
                    if t0.elapsed() > Duration::from_secs(60) {
                        bail!("{node} got no pre-created twin");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                // And QEMU has it paused (the create returned).
                std::thread::sleep(Duration::from_millis(500));
            }
            std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000));
            lab.control(
                "POST",
                &format!("/servers/{node}/inject"),
                Some(json!({ "kind": "power-loss" })),
            )?;
            if !wait_state(&addr, node, "running-virtual", Duration::from_secs(60)) {
                eprintln!("{node}: failover did not complete");
            } else {
                let recs = vigil::journal::verify(&journal)?;
                let last = |k: K| {
                    recs.iter()
                        .rev()
                        .find(|r| r.node.as_deref() == Some(node) && r.kind == k)
                };
                let ms = |r: Option<&vigil::journal::Record>| {
                    r.and_then(|r| vigil::clock::parse_rfc3339_ms(&r.time))
                };
                let start = last(K::VmStart);
                // The kind is what the log says happened, not what was asked for.
                let kind =
                    if start.is_some_and(|r| r.message.starts_with("resuming the pre-created")) {
                        "pre-created"
                    } else {
                        "cold"
                    };
                if let (Some(f), Some(s), Some(r), Some(h)) = (
                    ms(last(K::FenceConfirmed)),
                    ms(start),
                    ms(last(K::VmRunning)),
                    ms(last(K::VmHeartbeat)),
                ) {
                    got.entry(kind).or_default().push((
                        h.saturating_sub(f) as f64 / 1000.0,
                        r.saturating_sub(s) as f64 / 1000.0,
                        h.saturating_sub(r) as f64 / 1000.0,
                    ));
                }
            }
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
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(app.id().to_string())
            .status();
        let _ = app.wait();
    }
    println!(
        "fence confirmed to the twin's first heartbeat (vigil run on the lab, power-loss failovers, QEMU {} twins of 1-2 vCPUs booting the lab guest; blocks of {block}, alternating):",
        match vigil::virt::qemu::probe_accel() {
            vigil::virt::spec::Accel::Kvm => "KVM",
            vigil::virt::spec::Accel::Tcg => "TCG",
        }
    );
    println!(
        "{:<12} {:>5} {:>22} {:>22} {:>22}",
        "twin",
        "runs",
        "fence->heartbeat p50/p99/max",
        "vm-start->running p50/p99",
        "running->heartbeat p50/p99"
    );
    for (kind, v) in &got {
        let col = |f: fn(&(f64, f64, f64)) -> f64| v.iter().map(f).collect::<Vec<f64>>();
        let mut a = col(|x| x.0);
        let mut b = col(|x| x.1);
        let mut c = col(|x| x.2);
        let max = a.iter().copied().fold(0.0, f64::max);
        println!(
            "{kind:<12} {:>5} {:>22} {:>22} {:>22}",
            v.len(),
            format!(
                "{:.2}/{:.2}/{:.2}s",
                pct(&mut a.clone(), 0.5),
                pct(&mut a, 0.99),
                max
            ),
            format!("{:.2}/{:.2}s", pct(&mut b.clone(), 0.5), pct(&mut b, 0.99)),
            format!("{:.2}/{:.2}s", pct(&mut c.clone(), 0.5), pct(&mut c, 0.99)),
        );
    }
    Ok(())
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
        What::Twins { guest, runs, block } => twins(&guest, runs, block.max(1)),
        What::Scale {
            sizes,
            window,
            faults,
        } => scale(&sizes, window, faults),
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/PID/status` figure in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// One gauge of vigil's /metrics.
fn metric(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return f64::NAN;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The fencing log's records as vigil writes them (its /api/events stream), stamped on arrival.
fn events(addr: &str) -> anyhow::Result<std::sync::mpsc::Receiver<(Instant, Value)>> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines().map_while(Result::ok) {
            if let Some(d) = line.strip_prefix("data: ")
                && let Ok(v) = serde_json::from_str::<Value>(d)
                && tx.send((Instant::now(), v)).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

fn record_verdict(r: &Value) -> Option<(String, String)> {
    if r["kind"] != "verdict" {
        return None;
    }
    let k = &r["detail"]["verdict"];
    let name = match k["kind"].as_str() {
        Some(sub) => format!("{}:{sub}", k["verdict"].as_str().unwrap_or("")),
        None => k["verdict"].as_str().unwrap_or("").to_string(),
    };
    Some((r["node"].as_str()?.to_string(), name))
}

struct ScaleRow {
    nodes: usize,
    lab_start_ms: u64,
    lab_rss_mib: f64,
    lab_cores: f64,
    vigil_ready_s: f64,
    cores: f64,
    rss_mib: f64,
    hwm_mib: f64,
    polls_per_s: f64,
    hb_per_s: f64,
    max_gap_ms: u64,
    late: u64,
    in_flight: u64,
    sessions_per_bmc: u64,
    leaked: u64,
    detect: BTreeMap<&'static str, Vec<f64>>,
    missed: usize,
}

fn scale(sizes: &[usize], window: Duration, faults: usize) -> anyhow::Result<()> {
    const POLL_S: f64 = 2.0;
    const HB_S: f64 = 1.0;
    let mut rows = Vec::new();
    for &n in sizes {
        eprintln!("scale: {n} nodes ...");
        rows.push(scale_one(n, window, faults)?);
    }
    println!(
        "\nvigil run against vigil-lab scale (Redfish status poll every {POLL_S} s, heartbeats every {HB_S} s, 3 misses; a full poll every 5th; window {} s; CPU and memory of the vigil process alone):",
        window.as_secs()
    );
    println!(
        "{:>6} {:>6} {:>8} {:>9} {:>8} {:>8} {:>10} {:>10} {:>9} {:>6} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "nodes",
        "cores",
        "RSS MiB",
        "peak MiB",
        "µcore/n",
        "KiB/n",
        "polls/s",
        "hb/s",
        "max gap",
        "late",
        "inflight",
        "sess/BMC",
        "leaked",
        "lab start",
        "lab MiB",
        "lab cores"
    );
    for r in &rows {
        println!(
            "{:>6} {:>6.3} {:>8.0} {:>9.0} {:>8.1} {:>8.1} {:>10} {:>10} {:>7}ms {:>6} {:>9} {:>9} {:>7} {:>7}ms {:>9.0} {:>9.3}",
            r.nodes,
            r.cores,
            r.rss_mib,
            r.hwm_mib,
            r.cores * 1e6 / r.nodes as f64,
            r.rss_mib * 1024.0 / r.nodes as f64,
            format!("{:.0}/{:.0}", r.polls_per_s, r.nodes as f64 / POLL_S),
            format!("{:.0}/{:.0}", r.hb_per_s, r.nodes as f64 / HB_S),
            r.max_gap_ms,
            r.late,
            r.in_flight,
            r.sessions_per_bmc,
            r.leaked,
            r.lab_start_ms,
            r.lab_rss_mib,
            r.lab_cores,
        );
    }
    println!("\nfault to verdict at each size (the verdict record on vigil's event stream):");
    println!(
        "{:>6} {:<14} {:>5} {:>8} {:>8} {:>8}",
        "nodes", "fault", "runs", "p50", "p99", "max"
    );
    for r in &rows {
        for (k, v) in &r.detect {
            let mut v = v.clone();
            let max = v.iter().copied().fold(f64::NAN, f64::max);
            println!(
                "{:>6} {:<14} {:>5} {:>7.2}s {:>7.2}s {:>7.2}s",
                r.nodes,
                k,
                v.len(),
                pct(&mut v.clone(), 0.5),
                pct(&mut v, 0.99),
                max
            );
        }
        if r.missed > 0 {
            println!(
                "{:>6} {} faults gave no verdict within 30 s",
                r.nodes, r.missed
            );
        }
    }
    println!(
        "\n(vigil ready: {})",
        rows.iter()
            .map(|r| format!("{} nodes in {:.1} s", r.nodes, r.vigil_ready_s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn scale_one(n: usize, window: Duration, faults: usize) -> anyhow::Result<ScaleRow> {
    let dir = tempfile::tempdir()?;
    let sd = dir.path().join("lab");
    let mut lab = Command::new(bin("vigil-lab")?)
        .args(["scale", "--nodes", &n.to_string(), "--state-dir"])
        .arg(&sd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let stop = |c: &mut Child| {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let _ = c.wait();
    };
    let t0 = Instant::now();
    let ep = loop {
        if let Ok(t) = std::fs::read_to_string(sd.join("scale.json"))
            && let Ok(v) = serde_json::from_str::<Value>(&t)
        {
            break v;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            stop(&mut lab);
            bail!("the scale lab did not start within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let control = ep["control_url"]
        .as_str()
        .context("no control_url")?
        .trim_start_matches("http://")
        .to_string();
    let api_addr = ep["api_listen"]
        .as_str()
        .context("no api_listen")?
        .to_string();
    let lab_start_ms = ep["started_in_ms"].as_u64().unwrap_or(0);
    let lab_stats = |c: &str| api(c, "GET", "/scale/stats", None).unwrap_or(Value::Null);
    let mut vigil = Command::new(bin("vigil")?)
        .args(["run", "--config"])
        .arg(sd.join("vigil.toml"))
        .current_dir(&sd)
        .env(
            "VIGIL_LOG",
            std::env::var("VIGIL_BENCH_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("VIGIL_BENCH_LOG_FILE") {
            Some(f) => Stdio::from(std::fs::File::create(f)?),
            None => Stdio::null(),
        })
        .spawn()?;
    let vpid = vigil.id();
    let result = (|| -> anyhow::Result<ScaleRow> {
        // Ready: every BMC has a session (polled at least once), then a settling time.
        let t1 = Instant::now();
        loop {
            let s = lab_stats(&control);
            if s["sessions_open"].as_u64().unwrap_or(0) >= n as u64 {
                break;
            }
            if t1.elapsed() > Duration::from_secs(180) {
                bail!("vigil did not reach every BMC within 180 s: {s}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let vigil_ready_s = t1.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(15));
        let ev = events(&api_addr)?;
        api(&control, "POST", "/scale/reset", None)?;
        let hb0 = metric(&api_addr, "vigil_heartbeats_accepted");
        let c0 = cpu_seconds(vpid);
        let l0 = cpu_seconds(lab.id());
        let w0 = Instant::now();
        // The faults: at random moments of the window's first two thirds (so each has time to
        // be judged), on distinct random nodes.
        let kinds: [(&str, &str); 3] = [
            ("power-loss", "hardware-fault:power"),
            ("os-hang", "software-hang"),
            ("thermal-trip", "hardware-fault:thermal"),
        ];
        let mut at: Vec<u64> = (0..faults)
            .map(|_| rand::random::<u64>() % (window.as_millis() as u64 * 2 / 3).max(1))
            .collect();
        at.sort_unstable();
        let mut used = std::collections::BTreeSet::new();
        let mut pick = || loop {
            let i = rand::random::<u64>() as usize % n;
            if used.insert(i) {
                return format!("n{i:05}");
            }
        };
        // One slow BMC (answers after 5 s, past the 2 s timeout) and one that goes down, for
        // the whole window: their cost must stay their own.
        let slow = pick();
        let down = pick();
        api(
            &control,
            "POST",
            &format!("/scale/inject?node={slow}&fault=slow&delay_ms=5000"),
            None,
        )?;
        api(
            &control,
            "POST",
            &format!("/scale/inject?node={down}&fault=bmc-down"),
            None,
        )?;
        let mut pending: Vec<(String, &str, &str, Instant)> = Vec::new();
        let mut detect: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        let mut missed = 0;
        let mut next = 0;
        while w0.elapsed() < window {
            while next < at.len() && w0.elapsed().as_millis() as u64 >= at[next] {
                let (fault, verdict) = kinds[next % kinds.len()];
                let node = pick();
                let t = Instant::now();
                api(
                    &control,
                    "POST",
                    &format!("/scale/inject?node={node}&fault={fault}"),
                    None,
                )?;
                pending.push((node, fault, verdict, t));
                next += 1;
            }
            while let Ok((when, r)) = ev.recv_timeout(Duration::from_millis(50)) {
                if let Some((node, v)) = record_verdict(&r)
                    && let Some(i) = pending
                        .iter()
                        .position(|(n2, _, want, _)| *n2 == node && *want == v)
                {
                    let (_, fault, _, t) = pending.swap_remove(i);
                    let key: &'static str =
                        kinds.iter().find(|k| k.0 == fault).map_or("?", |k| k.0);
                    detect
                        .entry(key)
                        .or_default()
                        .push(when.duration_since(t).as_secs_f64());
                }
            }
            pending.retain(|(node, fault, _, t)| {
                let keep = t.elapsed() < Duration::from_secs(30);
                if !keep {
                    eprintln!("  {fault} on {node}: no verdict within 30 s");
                    missed += 1;
                }
                keep
            });
        }
        let secs = w0.elapsed().as_secs_f64();
        let cores = (cpu_seconds(vpid) - c0) / secs;
        let lab_cores = (cpu_seconds(lab.id()) - l0) / secs;
        // The slow and the down BMC come back before vigil stops, so that it can close its
        // sessions there too (a BMC that is down when its client stops keeps the session until
        // its own idle timeout: that is the BMC's, not a leak of vigil's).
        for node in [&slow, &down] {
            api(
                &control,
                "POST",
                &format!("/scale/repair?node={node}"),
                None,
            )?;
        }
        let hb1 = metric(&api_addr, "vigil_heartbeats_accepted");
        let s = lab_stats(&control);
        missed += pending.len();
        let rss = proc_kib(vpid, "VmRSS:") as f64 / 1024.0;
        let hwm = proc_kib(vpid, "VmHWM:") as f64 / 1024.0;
        let lab_pid = lab.id();
        let lab_rss_mib = proc_kib(lab_pid, "VmRSS:") as f64 / 1024.0;
        Ok(ScaleRow {
            nodes: n,
            lab_start_ms,
            lab_rss_mib,
            lab_cores,
            vigil_ready_s,
            cores,
            rss_mib: rss,
            hwm_mib: hwm,
            polls_per_s: s["polls"].as_f64().unwrap_or(0.0) / secs,
            hb_per_s: (hb1 - hb0) / secs,
            max_gap_ms: s["max_poll_gap_ms"].as_u64().unwrap_or(0),
            late: s["late_polls"].as_u64().unwrap_or(0),
            in_flight: s["max_in_flight_per_bmc"].as_u64().unwrap_or(0),
            sessions_per_bmc: s["max_sessions_per_bmc"].as_u64().unwrap_or(0),
            leaked: 0,
            detect,
            missed,
        })
    })();
    std::thread::sleep(Duration::from_secs(5));
    stop(&mut vigil);
    let leaked = lab_stats(&control)["sessions_open"]
        .as_u64()
        .unwrap_or(u64::MAX);
    stop(&mut lab);
    let mut row = result?;
    row.leaked = leaked;
    Ok(row)
}
