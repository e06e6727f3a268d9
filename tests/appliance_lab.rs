//! `vigil run` against the hardware lab with real QEMU twins: failover, the node powered on under
//! its running twin, failback; kill -9 at random moments of failovers with the safety invariants
//! checked after each; the API, its token and readiness; and no secret anywhere in what the
//! appliance writes or answers.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use common::appliance::*;
use serde_json::json;

/// The raw server-sent events of `/api/events` while `act` runs, read until the stream carries
/// the resume record or 10 s pass.
fn events_while(lab: &Lab, act: impl FnOnce()) -> String {
    use std::io::{Read, Write};
    let addr = lab.endpoints["api_listen"].as_str().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // The stream is subscribed once its response head arrives.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n")
        && t0.elapsed() < Duration::from_secs(10)
    {
        if let Ok(n) = s.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    act();
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&got).contains("automation resumed")
        && t0.elapsed() < Duration::from_secs(10)
    {
        if let Ok(n) = s.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    // One more short read: a duplicate would follow right behind.
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(n) = s.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_hardware_fault_fails_over_and_back_and_the_node_never_runs_beside_its_twin() {
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "a");
    wait_state(&lab, "db1", "healthy", Duration::from_secs(20));
    // Actions need the token.
    assert_eq!(api(&lab, "POST", "/api/pause", None).0, 401);
    assert_eq!(api(&lab, "POST", "/api/pause", Some("wrong")).0, 401);
    // The event stream carries every record of the log exactly once.
    let stream = events_while(&lab, || {
        let t = token(&lab);
        assert_eq!(api(&lab, "POST", "/api/pause", Some(&t)).0, 202);
        assert_eq!(api(&lab, "POST", "/api/resume", Some(&t)).0, 202);
    });
    for msg in [
        "automation paused by an operator",
        "automation resumed by an operator",
    ] {
        assert_eq!(
            stream.matches(msg).count(),
            1,
            "{msg} in the event stream: {stream}"
        );
    }

    lab.inject("db1", json!({"kind": "power-loss"}));
    wait_state(&lab, "db1", "running-virtual", Duration::from_secs(40));
    assert_eq!(twins(&lab, "db1"), 1);
    // The technician repairs db1 and powers it on: with its twin running, vigil fences it again.
    lab.repair("db1");
    let t0 = Instant::now();
    loop {
        let s = lab.server("db1");
        if s["power_state"] == "Off" && t0.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "db1 runs beside its twin: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(twins(&lab, "db1"), 1);
    // Failback: the twin stops first, then db1 comes back.
    let (code, _) = api(&lab, "POST", "/api/nodes/db1/failback", Some(&token(&lab)));
    assert_eq!(code, 202);
    wait_state(&lab, "db1", "healthy", Duration::from_secs(60));
    assert_eq!(twins(&lab, "db1"), 0);
    let recs = journal(&lab);
    check_log_invariants(&recs, "db1");
    let kinds: Vec<_> = recs
        .iter()
        .filter(|r| r.node.as_deref() == Some("db1"))
        .map(|r| r.kind)
        .collect();
    use vigil::journal::RecordKind as K;
    let pos = |k: K| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("no {k:?} in {kinds:?}"))
    };
    assert!(pos(K::FenceConfirmed) < pos(K::VmStart));
    assert!(pos(K::VmStart) < pos(K::VmHeartbeat));
    assert!(
        pos(K::FailbackBegin) < pos(K::VmStopped)
            && pos(K::VmStopped) < pos(K::PowerOn)
            && pos(K::PowerOn) < pos(K::FailbackDone)
    );
    // An operator fence: web2 is powered off and stays off, in maintenance, with no twin.
    assert_eq!(api(&lab, "POST", "/api/nodes/web2/fence", None).0, 401);
    let (code, _) = api(&lab, "POST", "/api/nodes/web2/fence", Some(&token(&lab)));
    assert_eq!(code, 202);
    wait_state(&lab, "web2", "maintenance", Duration::from_secs(10));
    let t0 = Instant::now();
    while !journal(&lab)
        .iter()
        .any(|r| r.node.as_deref() == Some("web2") && r.kind == K::FenceConfirmed)
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "web2 never fenced");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lab.server("web2")["power_state"], "Off");
    assert_eq!(twins(&lab, "web2"), 0);
    // The metrics saw it.
    let m = {
        use std::io::{Read, Write};
        let addr = lab.endpoints["api_listen"].as_str().unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    assert!(m.contains("vigil_recovery_seconds_count 1"), "{m}");
    // BMC latency per node and path, as a histogram.
    assert!(
        m.lines()
            .any(|l| l.starts_with("vigil_bmc_request_seconds_count{")
                && l.contains("node=\"web2\"")
                && l.contains("protocol=\"redfish\"")),
        "{m}"
    );
    assert!(
        m.contains("vigil_node_state{node=\"db1\",state=\"healthy\"} 1"),
        "{m}"
    );
    app.stop();
    secrets_never_leak(&lab, &[app.out.clone()]);
}

/// Every log, fencing-log record and API answer is searched for the lab's passwords and keys.
fn secrets_never_leak(lab: &Lab, logs: &[PathBuf]) {
    let mut texts: Vec<(String, String)> = logs
        .iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(p).unwrap_or_default(),
            )
        })
        .collect();
    texts.push((
        "fencing log".into(),
        std::fs::read_to_string(lab.state_dir().join("appliance/fencing.log")).unwrap(),
    ));
    texts.push((
        "lab log".into(),
        std::fs::read_to_string(lab.dir.path().join("lab.log")).unwrap_or_default(),
    ));
    for agent in std::fs::read_dir(lab.state_dir().join("logs"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        texts.push((
            agent.path().display().to_string(),
            std::fs::read_to_string(agent.path()).unwrap_or_default(),
        ));
    }
    for vm in std::fs::read_dir(lab.state_dir().join("appliance/vms"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        for v in std::fs::read_dir(vm.path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            for f in ["serial.log", "qemu.log", "spec.json"] {
                texts.push((
                    v.path().join(f).display().to_string(),
                    std::fs::read_to_string(v.path().join(f)).unwrap_or_default(),
                ));
            }
        }
    }
    for secret in lab.secrets() {
        assert!(secret.len() >= 16);
        for (name, text) in &texts {
            assert!(!text.contains(&secret), "a secret leaked into {name}");
        }
    }
}

#[test]
fn kill_dash_nine_at_random_moments_of_failovers_converges_safely() {
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let token = token(&lab);
    let mut logs = Vec::new();
    let nodes = ["db1", "web1", "web2", "batch1"];
    let rounds = 20;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut app = Appliance::start(&lab, "k0");
    logs.push(app.out.clone());
    for n in nodes {
        wait_state(&lab, n, "healthy", Duration::from_secs(30));
    }
    for round in 0..rounds {
        let node = nodes[round % nodes.len()];
        lab.inject(node, json!({"kind": "power-loss"}));
        // Kill -9 somewhere in detection, fencing, placement or the twin's boot.
        let delay = Duration::from_millis(rand(5000));
        let t0 = Instant::now();
        while t0.elapsed() < delay {
            assert!(twins(&lab, node) <= 1, "round {round}: two twins of {node}");
            std::thread::sleep(Duration::from_millis(50));
        }
        app.kill9();
        app = Appliance::start(&lab, &format!("k{}", round + 1));
        logs.push(app.out.clone());
        let t0 = Instant::now();
        loop {
            assert!(twins(&lab, node) <= 1, "round {round}: two twins of {node}");
            if state(&lab, node) == "running-virtual" {
                break;
            }
            // (Within the failover's own boot timeout, 90 s, and its retry: a twin whose
            // heartbeats never arrive is stopped and started again, which converges too.)
            assert!(
                t0.elapsed() < Duration::from_secs(150),
                "round {round}: {node}'s failover did not complete after the restart (state {:?})\n{}",
                state(&lab, node),
                explain(&lab, node, &app.out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(twins(&lab, node), 1, "round {round}");
        check_log_invariants(&journal(&lab), node);
        // Bring it back for the next round: repair (the technician powers it on; vigil fences
        // it again, its twin running), then fail back.
        lab.repair(node);
        let (code, _) = api(
            &lab,
            "POST",
            &format!("/api/nodes/{node}/failback"),
            Some(&token),
        );
        assert_eq!(code, 202);
        wait_state(&lab, node, "healthy", Duration::from_secs(90));
        assert_eq!(twins(&lab, node), 0, "round {round}");
    }
    app.stop();
    let recs = journal(&lab);
    for n in nodes {
        check_log_invariants(&recs, n);
    }
    // Every failover got its own epoch, and each epoch had exactly one twin start (a restart
    // that finds its twin running adopts it)... except where that twin is known not to run
    // any more: it never heartbeat within the boot timeout and was stopped (logged so), or a
    // restart found none running (killed between its vm-start record and its QEMU's start).
    let mut seen: std::collections::BTreeMap<(String, u64), bool> = Default::default();
    for r in &recs {
        let key = || (r.node.clone().unwrap_or_default(), r.epoch.unwrap_or(0));
        if r.kind == vigil::journal::RecordKind::Start {
            for note in r.detail["recovered"].as_array().into_iter().flatten() {
                let note = note.as_str().unwrap_or_default();
                for ((n, e), stopped) in seen.iter_mut() {
                    if note == format!("{n}: fenced (epoch {e}), no twin runs: starting it") {
                        *stopped = true;
                    }
                }
            }
        }
        match r.kind {
            vigil::journal::RecordKind::VmStart => {
                let again = seen.insert(key(), false);
                assert!(
                    again.is_none_or(|stopped| stopped),
                    "#{}: epoch {} of {} started twice, the first not known stopped",
                    r.seq,
                    key().1,
                    key().0
                );
            }
            vigil::journal::RecordKind::FailoverFailed
                if r.message.contains("sent no heartbeat") && r.detail["stopped"] == true =>
            {
                if let Some(s) = seen.get_mut(&key()) {
                    *s = true;
                }
            }
            _ => {}
        }
    }
    secrets_never_leak(&lab, &logs);
}

#[test]
fn readiness_and_the_watchdog_reach_systemd() {
    use std::os::unix::net::UnixDatagram;
    let lab = Lab::rack4(|t| t);
    let sock_path = lab.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
        .args(["run", "--config"])
        .arg(lab.config_path())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20)
        && !(got.iter().any(|m: &String| m.contains("READY=1"))
            && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    assert!(
        got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2,
        "{got:?}"
    );
    assert!(status.success(), "SIGTERM stops it cleanly");
    let recs = journal(&lab);
    assert!(
        recs.last().unwrap().message.contains("vigil stops"),
        "{:?}",
        recs.last()
    );
}

#[test]
fn sighup_keeps_the_old_configuration_when_the_new_one_is_invalid() {
    let lab = Lab::rack4(|t| t);
    let mut app = Appliance::start(&lab, "hup");
    wait_state(&lab, "db1", "healthy", Duration::from_secs(20));
    let cfg = lab.config_path();
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        good.replace("heartbeat_misses = 3", "heartbeat_mises = 3"),
    )
    .unwrap();
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(app.child.id().to_string())
        .status();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        state(&lab, "db1"),
        "healthy",
        "still running on the old configuration"
    );
    std::fs::write(&cfg, &good).unwrap();
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(app.child.id().to_string())
        .status();
    std::thread::sleep(Duration::from_secs(1));
    // While the appliance holds the fencing log, an operator's `vigil fence --ack-off` goes
    // through its API, for a failover or backup server as for a node; a name that is neither is
    // refused.
    let ack = |who: &str| {
        Command::new(assert_cmd::cargo::cargo_bin("vigil"))
            .args([
                "fence",
                who,
                "--ack-off",
                "--by",
                "alice",
                "--reason",
                "pulled its cords",
            ])
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let o = ack("backup1");
    assert!(
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains("sent to the running appliance"),
        "{o:?}"
    );
    let o = ack("nosuch");
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("no node or host named nosuch"),
        "{o:?}"
    );
    app.stop();
    let recs = journal(&lab);
    assert!(
        recs.iter().any(|r| r.node.as_deref() == Some("backup1")
            && r.kind == vigil::journal::RecordKind::AckOff
            && r.message.contains("alice")),
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r.message.contains("new configuration refused")
                && r.detail["problems"]
                    .as_str()
                    .unwrap_or("")
                    .contains("heartbeat_mises")),
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r.message.contains("configuration reloaded"))
    );
}

/// The operator page in a real headless Chromium: the rack at a glance and the failover's
/// timeline, drawn.
#[test]
fn the_operator_page_shows_the_rack_and_draws_the_failover() {
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "page");
    wait_state(&lab, "db1", "healthy", Duration::from_secs(20));
    lab.inject("db1", json!({"kind": "thermal-trip"}));
    wait_state(&lab, "db1", "running-virtual", Duration::from_secs(40));
    let url = format!("http://{}/", lab.endpoints["api_listen"].as_str().unwrap());
    let profile = tempfile::tempdir().unwrap();
    let shot = lab.dir.path().join("page.png");
    let chrome = |extra: &[&str]| {
        // Virtual time lets the page's fetches and timers run before the DOM is dumped; `timeout`
        // bounds Chromium from outside in any case.
        Command::new("timeout")
            .args([
                "60",
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=6000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium is installed by scripts/install-test-deps.sh")
    };
    let out = chrome(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-node=\"db1\""), "{dom}");
    let card = dom.split("data-node=\"db1\"").nth(1).unwrap_or("");
    assert!(
        card.contains("running-virtual") && card.contains("twin on <b>failover1</b>"),
        "{card}"
    );
    assert!(dom.contains("data-host=\"failover1\""), "{dom}");
    // The timeline is drawn: an SVG with the fence and the twin's heartbeat marked on it.
    let tl = dom
        .split("class=\"timeline\" data-node=\"db1\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no timeline for db1: {dom}"));
    assert!(
        tl.contains("<svg") && tl.contains("fenced") && tl.contains("twin heartbeat"),
        "{tl}"
    );
    let out = chrome(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1200,900",
    ]);
    assert!(
        shot.is_file() && std::fs::metadata(&shot).unwrap().len() > 10_000,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop();
}

#[test]
fn a_twin_that_dies_is_stopped_and_replaced_on_the_backup_server() {
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "twin-lost");
    wait_state(&lab, "web1", "healthy", Duration::from_secs(30));
    lab.inject("web1", json!({"kind": "power-loss"}));
    wait_state(&lab, "web1", "running-virtual", Duration::from_secs(40));
    // The twin's QEMU dies (kill -9 by the pid it wrote), on a healthy failover server.
    assert!(
        lab.state_dir()
            .join("appliance/vms/failover1/vigil-web1-e1/qemu.pid")
            .exists()
    );
    kill_twin_qemu(&lab, "web1");
    // vigil notices, replaces it on the backup server, and the replacement heartbeats.
    let t0 = Instant::now();
    let placed_on_backup = loop {
        let recs = journal(&lab);
        let lost = recs.iter().position(|r| {
            r.node.as_deref() == Some("web1") && r.kind == vigil::journal::RecordKind::TwinLost
        });
        if let Some(i) = lost {
            let after = &recs[i..];
            let placement = after.iter().find(|r| {
                r.node.as_deref() == Some("web1") && r.kind == vigil::journal::RecordKind::Placement
            });
            let beat = after.iter().any(|r| {
                r.node.as_deref() == Some("web1")
                    && r.kind == vigil::journal::RecordKind::VmHeartbeat
            });
            if let (Some(p), true) = (placement, beat) {
                break p.detail["host"].as_str().unwrap_or("").to_string();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "web1's twin was not replaced\n{}",
            explain(&lab, "web1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(placed_on_backup, "backup1");
    wait_state(&lab, "web1", "running-virtual", Duration::from_secs(10));
    assert_eq!(twins(&lab, "web1"), 1);
    check_log_invariants(&journal(&lab), "web1");
    // Failback from the replacement.
    lab.repair("web1");
    let t = token(&lab);
    let t0 = Instant::now();
    while api(&lab, "POST", "/api/nodes/web1/failback", Some(&t)).0 != 202 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_state(&lab, "web1", "healthy", Duration::from_secs(90));
    assert_eq!(twins(&lab, "web1"), 0);
    check_log_invariants(&journal(&lab), "web1");
    app.stop();
}

#[test]
fn a_twin_that_stops_heartbeating_is_stopped_and_replaced() {
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "twin-silent");
    wait_state(&lab, "web2", "healthy", Duration::from_secs(30));
    lab.inject("web2", json!({"kind": "power-loss"}));
    wait_state(&lab, "web2", "running-virtual", Duration::from_secs(40));
    // The twin's QEMU keeps running, but its network link goes down (QMP set_link): no
    // heartbeat reaches the appliance any more, exactly like a hung guest.
    let qmp_path = lab
        .state_dir()
        .join("appliance/vms/failover1/vigil-web2-e1/qmp.sock");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut q = vigil::virt::qmp::Qmp::connect(&qmp_path, Duration::from_secs(5))
            .await
            .unwrap();
        q.execute("set_link", Some(json!({ "name": "n0", "up": false })))
            .await
            .unwrap();
    });
    let t0 = Instant::now();
    let host = loop {
        let recs = journal(&lab);
        let mine: Vec<_> = recs
            .iter()
            .filter(|r| r.node.as_deref() == Some("web2"))
            .collect();
        use vigil::journal::RecordKind as K;
        if let Some(i) = mine.iter().position(|r| r.kind == K::TwinLost) {
            let after = &mine[i..];
            let stopped = after.iter().any(|r| r.kind == K::VmStopped);
            let placed = after.iter().find(|r| r.kind == K::Placement);
            let beat = after.iter().any(|r| r.kind == K::VmHeartbeat);
            if let (true, Some(p), true) = (stopped, placed, beat) {
                assert!(
                    mine[i].message.contains("no heartbeat"),
                    "{}",
                    mine[i].message
                );
                let at = |k: K| after.iter().position(|r| r.kind == k).unwrap();
                assert!(
                    at(K::VmStopped) < at(K::VmStart),
                    "the replacement started before the silent twin was confirmed stopped"
                );
                break p.detail["host"].as_str().unwrap_or("").to_string();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "web2's silent twin was not replaced\n{}",
            explain(&lab, "web2", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The silent twin was stopped (confirmed) before its replacement started elsewhere.
    assert_eq!(host, "backup1");
    assert_eq!(twins(&lab, "web2"), 1);
    check_log_invariants(&journal(&lab), "web2");
    app.stop();
}

/// Kills `node`'s twin's QEMU (SIGKILL, by its pid file), as if it died.
fn kill_twin_qemu(lab: &Lab, node: &str) {
    let vms = lab.state_dir().join("appliance/vms");
    let pidfile = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .flat_map(|h| std::fs::read_dir(h.path()).unwrap().flatten())
        .find(|v| {
            v.file_name()
                .to_string_lossy()
                .starts_with(&format!("vigil-{node}-e"))
        })
        .unwrap_or_else(|| panic!("no twin of {node}"))
        .path()
        .join("qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(
        Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
}

/// Cuts `node`'s power and waits (60 s at most) for it to run on its twin, calling `check`
/// every 100 ms meanwhile.
fn fail_over_watching(lab: &Lab, app: &Appliance, node: &str, check: &dyn Fn()) {
    lab.inject(node, json!({"kind": "power-loss"}));
    let t0 = Instant::now();
    while state(lab, node) != "running-virtual" {
        check();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{node} did not fail over\n{}",
            explain(lab, node, &app.out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many QEMUs run (or wait, paused) on `host`: those in its VM folder.
fn qemus_on(lab: &Lab, host: &str) -> usize {
    let dir = format!("{}/appliance/vms/{host}/", lab.state_dir().display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("qemu-system") && c.contains(&dir))
        .count()
}

#[test]
fn a_failover_takes_the_room_of_other_nodes_paused_twins_and_no_host_is_overcommitted() {
    use vigil::journal::RecordKind as K;
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let cfg = lab.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[policy]\n",
        "[policy]\nprecreate_twins = true\n",
        1,
    );
    // Three slots for four nodes: failover1 takes one twin, backup1 two.
    let at = text.find("name = \"failover1\"").unwrap();
    let (head, tail) = text.split_at(at);
    let tail = tail.replacen("slots = 4 }", "slots = 1 }", 1);
    std::fs::write(&cfg, format!("{head}{tail}")).unwrap();
    let mut app = Appliance::start(&lab, "make-room");
    let nodes = ["db1", "web1", "web2", "batch1"];
    let refused = |n: &str, after: u64| {
        journal(&lab).iter().any(|r| {
            r.seq > after
                && r.node.as_deref() == Some(n)
                && r.kind == K::Refusal
                && r.message.contains("no pre-created twin")
        })
    };
    let overcommitted = || {
        assert!(qemus_on(&lab, "failover1") <= 1, "failover1 overcommitted");
        assert!(qemus_on(&lab, "backup1") <= 2, "backup1 overcommitted");
    };
    // Three paused twins, and for the fourth node a refusal that says there is no room.
    let t0 = Instant::now();
    let left_out = loop {
        overcommitted();
        let waiting: Vec<&str> = nodes
            .iter()
            .copied()
            .filter(|n| twins(&lab, n) == 1)
            .collect();
        if waiting.len() == 3
            && let Some(n) = nodes.iter().copied().find(|n| !waiting.contains(n))
            && refused(n, 0)
        {
            break n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not three paused twins and a refusal\n{}",
            explain(&lab, "db1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let others: Vec<&str> = nodes.iter().copied().filter(|n| *n != left_out).collect();
    let waits = waiting_by_host(&journal(&lab), &others);
    assert_eq!(waits.get("failover1").map(Vec::len), Some(1), "{waits:?}");
    assert_eq!(waits.get("backup1").map(Vec::len), Some(2), "{waits:?}");
    // The node without one fails: its twin is placed by what runs, and a paused twin on that
    // host gives way first (removed, confirmed gone, logged under its own node).
    fail_over_watching(&lab, &app, left_out, &overcommitted);
    let recs = journal(&lab);
    check_log_invariants(&recs, left_out);
    let start = recs
        .iter()
        .find(|r| r.node.as_deref() == Some(left_out) && r.kind == K::VmStart)
        .unwrap();
    let host = start.detail["host"].as_str().unwrap().to_string();
    let removed = recs
        .iter()
        .find(|r| r.kind == K::VmStopped && r.message.contains("needs its room"))
        .unwrap_or_else(|| {
            panic!(
                "no paused twin gave way\n{}",
                explain(&lab, left_out, &app.out)
            )
        });
    let evicted = removed.node.clone().unwrap();
    assert!(removed.seq < start.seq);
    assert!(
        waits[&host].contains(&evicted),
        "{evicted} did not wait on {host}: {waits:?}"
    );
    assert_eq!(twins(&lab, &evicted), 0);
    // The node whose paused twin gave way gets none again while there is no room: refused, in
    // the log; never a host over its slots.
    let t0 = Instant::now();
    while !refused(&evicted, removed.seq) {
        overcommitted();
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no refusal for {evicted}\n{}",
            explain(&lab, &evicted, &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    overcommitted();
    assert_eq!(twins(&lab, &evicted), 0);
    // A node whose paused twin died just before its own failover (before any read-back noticed):
    // the failover starts one cold, and the dead one is counted nowhere any more (the status
    // lists it neither waiting nor twice).
    let y = nodes
        .iter()
        .copied()
        .find(|n| *n != left_out && *n != evicted && twins(&lab, n) == 1)
        .unwrap();
    kill_twin_qemu(&lab, y);
    fail_over_watching(&lab, &app, y, &overcommitted);
    overcommitted();
    let t0 = Instant::now();
    loop {
        let (_, st) = api(&lab, "GET", "/api/status", None);
        let listed = |key: &str| -> usize {
            st["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|h| h[key].as_array().unwrap().iter())
                .filter(|t| t["node"] == y)
                .count()
        };
        if listed("twins") == 1 && listed("standby") == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{y} is counted {} time(s) running and {} time(s) waiting: {st}",
            listed("twins"),
            listed("standby")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    check_log_invariants(&journal(&lab), y);
    app.stop();
}

/// Where each of `nodes`' latest pre-created twin waits, by the log: host -> nodes (sorted).
fn waiting_by_host(
    recs: &[vigil::journal::Record],
    nodes: &[&str],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut by_host: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for n in nodes {
        let r = recs
            .iter()
            .rfind(|r| {
                r.node.as_deref() == Some(*n) && r.kind == vigil::journal::RecordKind::VmStandby
            })
            .unwrap_or_else(|| panic!("no pre-created twin of {n}"));
        by_host
            .entry(r.detail["host"].as_str().unwrap().to_string())
            .or_default()
            .push(n.to_string());
    }
    for v in by_host.values_mut() {
        v.sort();
    }
    by_host
}

/// Waits (10 s at most) until `/api/status` lists the paused twins on the hosts `want` says.
fn wait_status_standby(lab: &Lab, want: &std::collections::BTreeMap<String, Vec<String>>) {
    let t0 = Instant::now();
    loop {
        let (_, st) = api(lab, "GET", "/api/status", None);
        let mut got: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for h in st["hosts"].as_array().into_iter().flatten() {
            let mut ns: Vec<String> = h["standby"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["node"].as_str().unwrap_or("").to_string())
                .collect();
            ns.sort();
            if !ns.is_empty() {
                got.insert(h["name"].as_str().unwrap_or("").to_string(), ns);
            }
        }
        if &got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the status shows paused twins {got:?}, the log {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pre_created_twin_is_resumed_at_failover_and_made_again_after_failback() {
    use vigil::journal::RecordKind as K;
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let cfg = lab.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen("[policy]\n", "[policy]\nprecreate_twins = true\n", 1),
    )
    .unwrap();
    let mut app = Appliance::start(&lab, "standby");
    let nodes = ["db1", "web1", "web2", "batch1"];
    // Each watched node gets one paused twin, written to the log before QEMU starts.
    let standby_of = |recs: &[vigil::journal::Record], n: &str| -> Vec<u64> {
        recs.iter()
            .filter(|r| r.node.as_deref() == Some(n) && r.kind == K::VmStandby)
            .map(|r| r.epoch.unwrap())
            .collect()
    };
    let t0 = Instant::now();
    while !nodes
        .iter()
        .all(|n| standby_of(&journal(&lab), n).len() == 1 && twins(&lab, n) == 1)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no pre-created twin for every node\n{}",
            explain(&lab, "db1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Paused, it runs nothing: the nodes are healthy on their own hardware, no twin started.
    let recs = journal(&lab);
    assert!(!recs.iter().any(|r| r.kind == K::VmStart), "a twin started");
    let reserved = standby_of(&recs, "db1")[0];
    // Paused twins count against their hosts like running ones: never an overcommitted host.
    // rack4's servers give 4 vCPUs each; db1 and batch1 ask 2, web1 and web2 1: the four do
    // not all wait on failover1. The status shows where each waits, as the log does.
    let waits = waiting_by_host(&recs, &nodes);
    let size = |n: &str| if n == "db1" || n == "batch1" { 2 } else { 1 };
    for (host, ns) in &waits {
        let vcpus: u32 = ns.iter().map(|n| size(n)).sum();
        assert!(vcpus <= 4, "{host} overcommitted by paused twins: {ns:?}");
    }
    assert_eq!(waits.len(), 2, "{waits:?}");
    wait_status_standby(&lab, &waits);

    // db1 fails: the failover takes the reserved epoch and resumes that twin (no second QEMU).
    lab.inject("db1", json!({"kind": "power-loss"}));
    let t0 = Instant::now();
    while state(&lab, "db1") != "running-virtual" {
        assert!(twins(&lab, "db1") <= 1, "two twins of db1");
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "{}",
            explain(&lab, "db1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(twins(&lab, "db1"), 1);
    let recs = journal(&lab);
    check_log_invariants(&recs, "db1");
    let start = recs
        .iter()
        .find(|r| r.node.as_deref() == Some("db1") && r.kind == K::VmStart)
        .unwrap();
    assert_eq!(start.epoch, Some(reserved));
    assert!(
        start.message.starts_with("resuming the pre-created"),
        "{}",
        start.message
    );
    let begin = recs
        .iter()
        .position(|r| r.node.as_deref() == Some("db1") && r.kind == K::FailoverBegin)
        .unwrap();
    let confirmed = recs
        .iter()
        .position(|r| r.node.as_deref() == Some("db1") && r.kind == K::FenceConfirmed)
        .unwrap();
    assert!(begin < confirmed && recs[begin].epoch == Some(reserved));

    // A restart finds the paused twins of the others and makes no new ones.
    app.kill9();
    let mut app = Appliance::start(&lab, "standby-2");
    wait_state(&lab, "db1", "running-virtual", Duration::from_secs(20));
    let t0 = Instant::now();
    while !journal(&lab)
        .iter()
        .any(|r| r.kind == K::Start && r.message.contains("pre-created twin vigil-web1-e"))
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "no recovery note");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    for n in ["web1", "web2", "batch1"] {
        assert_eq!(standby_of(&journal(&lab), n).len(), 1, "{n}");
        assert_eq!(twins(&lab, n), 1, "{n}");
    }
    // The restart counts what it found: db1's running twin and the others' paused ones are on
    // their hosts in the status (and in placement) from the start.
    let recs = journal(&lab);
    let db1_host = recs
        .iter()
        .rfind(|r| r.node.as_deref() == Some("db1") && r.kind == K::Placement)
        .map(|r| r.detail["host"].as_str().unwrap().to_string())
        .unwrap();
    wait_status_standby(&lab, &waiting_by_host(&recs, &["web1", "web2", "batch1"]));
    let (_, st) = api(&lab, "GET", "/api/status", None);
    let running: Vec<(String, String)> = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| {
            h["twins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        h["name"].as_str().unwrap().to_string(),
                        t["node"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(running, vec![(db1_host, "db1".to_string())], "{st}");
    // A pre-created twin that dies (its QEMU killed) is noticed and made again.
    kill_twin_qemu(&lab, "web2");
    let t0 = Instant::now();
    while standby_of(&journal(&lab), "web2").len() < 2 || twins(&lab, "web2") != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "web2's dead pre-created twin was not made again\n{}",
            explain(&lab, "web2", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        journal(&lab)
            .iter()
            .any(|r| r.node.as_deref() == Some("web2")
                && r.kind == K::VmStopped
                && r.message.contains("not waiting any more"))
    );

    // Killed in the middle of batch1's fence (its paused twin waiting): the restart resumes the
    // fence, then the twin; never the twin on the strength of an older fence.
    let reserved_b = *standby_of(&journal(&lab), "batch1").last().unwrap();
    lab.inject("batch1", json!({"kind": "power-loss"}));
    let t0 = Instant::now();
    while !journal_lines(&lab)
        .iter()
        .any(|r| r["node"] == "batch1" && r["kind"] == "failover-begin")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "batch1 never failed over"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    app.kill9();
    let mut app = Appliance::start(&lab, "standby-3");
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(40));
    assert_eq!(twins(&lab, "batch1"), 1);
    let recs = journal(&lab);
    check_log_invariants(&recs, "batch1");
    let mine: Vec<_> = recs
        .iter()
        .filter(|r| r.node.as_deref() == Some("batch1") && r.epoch == Some(reserved_b))
        .collect();
    let confirmed = mine.iter().position(|r| r.kind == K::FenceConfirmed);
    let started = mine.iter().position(|r| r.kind == K::VmStart).unwrap();
    assert!(
        confirmed.is_some_and(|c| c < started),
        "no fence of epoch {reserved_b} confirmed before its twin started: {:?}",
        mine.iter()
            .map(|r| (r.kind, r.message.clone()))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "batch1 after the kill: {:?}",
        mine.iter().map(|r| r.kind).collect::<Vec<_>>()
    );

    // Failback: the twin stops before db1 powers on; then a new paused twin, a new epoch.
    lab.repair("db1");
    let t = token(&lab);
    let t0 = Instant::now();
    while api(&lab, "POST", "/api/nodes/db1/failback", Some(&t)).0 != 202 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_state(&lab, "db1", "healthy", Duration::from_secs(90));
    let t0 = Instant::now();
    while standby_of(&journal(&lab), "db1").len() < 2 || twins(&lab, "db1") != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no new pre-created twin for db1\n{}",
            explain(&lab, "db1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = standby_of(&journal(&lab), "db1");
    assert!(again[1] > reserved, "{again:?}");
    check_log_invariants(&journal(&lab), "db1");
    app.stop();
}

#[test]
fn a_failback_to_a_server_whose_hardware_differs_waits_for_an_operator() {
    use vigil::journal::RecordKind as K;
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "replacement");
    wait_state(&lab, "web2", "healthy", Duration::from_secs(30));
    lab.inject("web2", json!({"kind": "power-loss"}));
    wait_state(&lab, "web2", "running-virtual", Duration::from_secs(40));
    // The server now in web2's place is not the one recorded: as if the failed one had been
    // swapped for another with more memory and its own serial number.
    let (cfg, _, _) = vigil::config::load(&lab.config_path()).unwrap();
    let file = cfg.node("web2").unwrap().hardware_profile.clone();
    let mut recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let actual_serial = recorded["smbios"]["serial"].clone();
    recorded["smbios"]["serial"] = json!("OLD-SERVER-0001");
    recorded["memory_mib"] = json!(recorded["memory_mib"].as_u64().unwrap() / 2);
    std::fs::write(&file, serde_json::to_vec_pretty(&recorded).unwrap()).unwrap();
    lab.repair("web2");

    // A plain failback is refused before anything moves: the twin keeps running, the
    // differences are in the log.
    let t = token(&lab);
    let t0 = Instant::now();
    while api(&lab, "POST", "/api/nodes/web2/failback", Some(&t)).0 != 202 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    let t0 = Instant::now();
    let refusal = loop {
        if let Some(r) = journal(&lab).into_iter().find(|r| {
            r.node.as_deref() == Some("web2")
                && r.kind == K::Refusal
                && r.message.starts_with("failback of web2 refused")
        }) {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no refusal\n{}",
            explain(&lab, "web2", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refusal
            .message
            .contains("smbios.serial: \"OLD-SERVER-0001\" -> ")
            && refusal.message.contains("memory_mib"),
        "{}",
        refusal.message
    );
    wait_state(&lab, "web2", "running-virtual", Duration::from_secs(10));
    assert_eq!(twins(&lab, "web2"), 1);
    let recs = journal(&lab);
    assert!(
        !recs
            .iter()
            .any(|r| r.node.as_deref() == Some("web2") && r.kind == K::FailbackBegin),
        "nothing moved"
    );
    // The CLI says so too, and returns at once.
    let t0 = Instant::now();
    let out = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
        .args(["failback", "web2", "--config"])
        .arg(lab.config_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("refused: failback of web2 refused"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    wait_state(&lab, "web2", "running-virtual", Duration::from_secs(10));
    // Still watched where it runs (the phase names the twin's host again).
    let host = recs
        .iter()
        .rev()
        .find(|r| r.node.as_deref() == Some("web2") && r.kind == K::Placement)
        .and_then(|r| r.detail["host"].as_str().map(String::from))
        .unwrap();
    let (_, status) = api(&lab, "GET", "/api/status", None);
    let web2 = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "web2")
        .unwrap()
        .clone();
    assert!(
        web2["phase"]
            .to_string()
            .contains(&format!("\"host\":\"{host}\"")),
        "{web2}"
    );

    // Accepted by an operator: the differences are logged, the profile recorded anew, and the
    // workload moves (twin stopped first).
    let (code, _) = api(
        &lab,
        "POST",
        "/api/nodes/web2/failback?accept_profile=true",
        Some(&t),
    );
    assert_eq!(code, 202);
    wait_state(&lab, "web2", "healthy", Duration::from_secs(90));
    assert_eq!(twins(&lab, "web2"), 0);
    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(now["smbios"]["serial"], actual_serial);
    let recs = journal(&lab);
    check_log_invariants(&recs, "web2");
    let mine: Vec<_> = recs
        .iter()
        .filter(|r| r.node.as_deref() == Some("web2"))
        .collect();
    let accepted = mine
        .iter()
        .position(|r| {
            r.kind == K::Operator && r.message.contains("moves to the replacement server")
        })
        .expect("the accepted differences are logged");
    let begin = mine
        .iter()
        .rposition(|r| r.kind == K::FailbackBegin)
        .unwrap();
    assert!(accepted < begin);
    app.stop();
}

#[test]
fn a_failover_server_that_loses_power_has_its_twins_placed_again_on_the_backup_server() {
    use vigil::journal::RecordKind as K;
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "host-lost");
    wait_state(&lab, "batch1", "healthy", Duration::from_secs(30));
    lab.inject("batch1", json!({"kind": "power-loss"}));
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(40));
    let placed = |recs: &[vigil::journal::Record]| -> Vec<String> {
        recs.iter()
            .filter(|r| r.node.as_deref() == Some("batch1") && r.kind == K::Placement)
            .map(|r| r.detail["host"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(placed(&journal(&lab)), vec!["failover1"]);
    // The failover server loses power: its twins die with it (the lab kills their QEMU).
    lab.inject("failover1", json!({"kind": "power-loss"}));
    let t0 = Instant::now();
    loop {
        let recs = journal(&lab);
        let lost = recs
            .iter()
            .any(|r| r.node.as_deref() == Some("batch1") && r.kind == K::TwinLost);
        let beats = recs
            .iter()
            .filter(|r| r.node.as_deref() == Some("batch1") && r.kind == K::VmHeartbeat)
            .count();
        if lost && beats == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "batch1's twin was not placed again\n{}",
            explain(&lab, "batch1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(placed(&journal(&lab)), vec!["failover1", "backup1"]);
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(10));
    assert_eq!(twins(&lab, "batch1"), 1);
    check_log_invariants(&journal(&lab), "batch1");
    app.stop();
}

#[test]
fn a_dry_run_failover_shows_the_twin_its_fidelity_and_its_host_and_touches_nothing() {
    let lab = Lab::rack4(|t| t);
    let vigil = |args: &[&str]| {
        Command::new(assert_cmd::cargo::cargo_bin("vigil"))
            .args(args)
            .arg("--config")
            .arg(lab.config_path())
            .output()
            .unwrap()
    };
    // No recorded profile yet: it says how to make one.
    let out = vigil(&["failover", "db1", "--dry-run"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vigil profile capture"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(vigil(&["profile", "capture", "--all"]).status.success());
    let out = vigil(&["failover", "db1", "--dry-run"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "db1's twin would be vigil-db1-e1",
        "placement: Place { host: \"failover1\" }",
        "cpu: Icelake-Server",
        "= smbios uuid: 4c4c4544-004c-4c10-8056-c3c04f305233",
        "~ memory: 131072 MiB -> 512 MiB",
        "- PCIe accelerators (no emulation)",
        "(dry run: nothing was fenced or started)",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let s = lab.server("db1");
    assert_eq!(s["power_state"], "On");
    assert_eq!(s["resets"], json!([]));
}

#[test]
fn a_twin_on_a_host_that_cannot_be_read_is_replaced_only_once_that_host_is_fenced() {
    use vigil::journal::RecordKind as K;
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    let mut app = Appliance::start(&lab, "unreadable-1");
    wait_state(&lab, "batch1", "healthy", Duration::from_secs(30));
    lab.inject("batch1", json!({"kind": "power-loss"}));
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(40));
    assert_eq!(twins(&lab, "batch1"), 1);
    // The appliance restarts and finds failover1's hypervisor unreadable (a libvirt host that
    // does not answer), while batch1's twin still runs there.
    app.kill9();
    let cfg = lab.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let at = text.find("name = \"failover1\"").unwrap();
    let (head, tail) = text.split_at(at);
    let tail = tail.replacen(
        "hypervisor = \"qemu\"\nuri = \"local\"",
        "hypervisor = \"libvirt\"\nuri = \"qemu+unix:///system?socket=/nonexistent/libvirt-sock\"",
        1,
    );
    // (An isolated host is judged failed after its grace, shortened here.)
    let text =
        format!("{head}{tail}").replacen("[policy]\n", "[policy]\nisolation_grace = \"3s\"\n", 1);
    assert!(text.contains("isolation_grace = \"3s\""));
    std::fs::write(&cfg, text).unwrap();
    let mut app = Appliance::start(&lab, "unreadable-2");
    let of = |kind: K, who: &str, text: &str| {
        journal(&lab)
            .into_iter()
            .filter(|r| r.node.as_deref() == Some(who) && r.kind == kind)
            .filter(|r| r.message.contains(text))
            .collect::<Vec<_>>()
    };
    // 1. failover1 itself looks healthy (its BMC and heartbeat): only its hypervisor does not
    // answer. That is no evidence it failed: failover1 is not fenced, and no other twin starts,
    // on the first try nor on the retry 30 s later; each refusal says why.
    let t0 = Instant::now();
    while of(K::Refusal, "batch1", "not judged failed").len() < 2 {
        assert!(twins(&lab, "batch1") <= 1, "a second twin of batch1");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not refused twice\n{}",
            explain(&lab, "batch1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let reason = of(K::Refusal, "batch1", "not judged failed")[0]
        .message
        .clone();
    assert!(
        reason.contains("failover1") && reason.contains("cannot be read"),
        "{reason}"
    );
    assert!(of(K::FenceBegin, "failover1", "").is_empty());
    assert_eq!(twins(&lab, "batch1"), 1);
    assert_eq!(of(K::VmStart, "batch1", "").len(), 1);
    // 2. failover1 is cut off the network (its own heartbeats lost: judged failed once its
    // isolation outlasts the grace), but batch1's twin there still heartbeats: it runs, and
    // failover1 is not fenced under it.
    lab.inject("failover1", json!({"kind": "network-isolation"}));
    let t0 = Instant::now();
    while of(K::Refusal, "batch1", "still heartbeats").is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no refusal for a heartbeating twin\n{}",
            explain(&lab, "batch1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(of(K::FenceBegin, "failover1", "").is_empty());
    assert_eq!(of(K::VmStart, "batch1", "").len(), 1);
    assert_eq!(twins(&lab, "batch1"), 1);
    lab.repair("failover1");
    // 3. failover1's OS hangs, and its twins with it (the lab freezes their QEMU): failover1 is
    // judged failed and batch1's twin is silent. vigil fences failover1 through its BMC (the lab
    // kills its QEMUs with its power), logs the twin stopped by that fence, and only then
    // starts the replacement on the backup server. Never two twins at once.
    lab.inject("failover1", json!({"kind": "os-hang"}));
    let t0 = Instant::now();
    while of(K::VmHeartbeat, "batch1", "").len() < 2 {
        assert!(twins(&lab, "batch1") <= 1, "a second twin of batch1");
        assert!(
            t0.elapsed() < Duration::from_secs(150),
            "batch1's twin was not replaced after failover1's fence\n{}",
            explain(&lab, "batch1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let recs = journal(&lab);
    let seq = |kind: K, who: &str, text: &str| {
        recs.iter()
            .find(|r| r.node.as_deref() == Some(who) && r.kind == kind && r.message.contains(text))
            .map(|r| r.seq)
            .unwrap_or_else(|| {
                panic!(
                    "no {kind:?} of {who} ({text})\n{}",
                    explain(&lab, "batch1", &app.out)
                )
            })
    };
    let fenced = seq(K::FenceConfirmed, "failover1", "");
    let counted = seq(K::VmStopped, "batch1", "failover1 was fenced");
    let second = recs
        .iter()
        .filter(|r| r.node.as_deref() == Some("batch1") && r.kind == K::VmStart)
        .nth(1)
        .expect("a second vm-start");
    assert!(fenced < counted && counted < second.seq);
    assert_eq!(second.detail["host"], "backup1", "{}", second.message);
    let why = &recs[recs
        .iter()
        .position(|r| r.seq == seq(K::FenceBegin, "failover1", ""))
        .unwrap()];
    assert!(
        why.detail["why"]["verdict"]
            .as_str()
            .unwrap_or("")
            .contains("judged failed"),
        "{:?}",
        why.detail
    );
    assert_eq!(lab.server("failover1")["power_state"], "Off");
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(10));
    assert_eq!(twins(&lab, "batch1"), 1);
    // 4. kill -9 and a restart: the log shows failover1 fenced after the old twin started, so
    // it converges on the twin on backup1: no second fence, no other twin.
    app.kill9();
    let mut app = Appliance::start(&lab, "unreadable-3");
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(of(K::FenceBegin, "failover1", "").len(), 1);
    assert_eq!(of(K::VmStart, "batch1", "").len(), 2);
    assert_eq!(twins(&lab, "batch1"), 1);
    check_log_invariants(&journal(&lab), "batch1");
    app.stop();
}

/// `vigil` with `args` and the lab's configuration; (exit code, stdout + stderr).
fn vigil_cli(lab: &Lab, args: &[&str], check: &dyn Fn()) -> (i32, String) {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
        .args(args)
        .arg("--config")
        .arg(lab.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        check();
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "vigil {args:?} hangs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A node never has two twins by the log: each `vm-start` follows the end of the one before
/// (stopped, or failed to start).
fn one_twin_at_a_time(recs: &[vigil::journal::Record], node: &str) {
    use vigil::journal::RecordKind as K;
    let mut running: Option<u64> = None;
    for r in recs.iter().filter(|r| r.node.as_deref() == Some(node)) {
        match r.kind {
            K::VmStart => {
                assert!(
                    running.is_none(),
                    "#{}: a twin of {node} starts while the one of #{} was not stopped",
                    r.seq,
                    running.unwrap_or(0)
                );
                running = Some(r.seq);
            }
            K::VmStopped => running = None,
            // (Unless it says its twin could not be confirmed stopped.)
            K::FailoverFailed if r.detail["stopped"] != false => running = None,
            _ => {}
        }
    }
}

/// Starts the appliance with `VIGIL_CRASH_AT=step`, asks it to move batch1's twin to
/// failover1, and waits (60 s at most, `check` every 100 ms) for it to abort at that step.
fn move_into_a_crash(lab: &Lab, token: &str, step: &str, check: &dyn Fn()) {
    let mut crashing = Appliance::start_env(
        lab,
        &format!("crash-at-{step}"),
        &[("VIGIL_CRASH_AT", step)],
    );
    wait_state(lab, "batch1", "running-virtual", Duration::from_secs(60));
    assert_eq!(
        api(
            lab,
            "POST",
            "/api/nodes/batch1/move?to=failover1",
            Some(token)
        )
        .0,
        202
    );
    let t0 = Instant::now();
    while crashing.child.try_wait().unwrap().is_none() {
        check();
        assert!(t0.elapsed() < Duration::from_secs(60), "no crash at {step}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the twin of `node` heartbeat from, in order (`vm-heartbeat` records).
fn beats_from(recs: &[vigil::journal::Record], node: &str) -> Vec<String> {
    recs.iter()
        .filter(|r| {
            r.node.as_deref() == Some(node) && r.kind == vigil::journal::RecordKind::VmHeartbeat
        })
        .map(|r| r.detail["host"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_loaded_failover_server_is_rebalanced_by_hand_and_by_policy_without_a_second_fence() {
    use vigil::journal::RecordKind as K;
    let _slot = twin_slot();
    let lab = lab();
    let _cleanup = Cleanup(&lab);
    // backup1 takes one twin at most (a move that would not fit is refused below).
    let cfg = lab.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(text.matches("slots = 2 }").count(), 1, "backup1's size");
    std::fs::write(&cfg, text.replacen("slots = 2 }", "slots = 1 }", 1)).unwrap();
    let mut app = Appliance::start(&lab, "rebalance");
    for n in ["db1", "batch1", "backup1"] {
        wait_state(&lab, n, "healthy", Duration::from_secs(30));
    }
    let one_each = || {
        for n in ["db1", "batch1"] {
            assert!(twins(&lab, n) <= 1, "two twins of {n}");
        }
    };
    let host_healthy = |h: &str| {
        let (_, st) = api(&lab, "GET", "/api/status", None);
        st["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["name"] == h && x["healthy"] == true)
    };
    // The backup server is cut off while db1 and batch1 fail: both twins go to failover1,
    // the second past its 80% mark (4 of 4 vCPUs), as nothing else can take it.
    lab.inject("backup1", json!({"kind": "network-isolation"}));
    let t0 = Instant::now();
    while host_healthy("backup1") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "backup1 stays healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    fail_over_watching(&lab, &app, "db1", &one_each);
    fail_over_watching(&lab, &app, "batch1", &one_each);
    assert_eq!(beats_from(&journal(&lab), "db1"), ["failover1"]);
    assert_eq!(beats_from(&journal(&lab), "batch1"), ["failover1"]);
    // While backup1 is not healthy, nothing is proposed.
    let (code, out) = vigil_cli(&lab, &["rebalance", "--dry-run"], &one_each);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to move"), "{out}");
    // backup1 comes back: the move is proposed, shown by the dry run, and nothing moves.
    lab.repair("backup1");
    let t0 = Instant::now();
    loop {
        let (_, st) = api(&lab, "GET", "/api/status", None);
        if st["rebalance"]["node"].is_string() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no rebalance proposed: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (code, out) = vigil_cli(&lab, &["rebalance", "--dry-run"], &one_each);
    assert_eq!(code, 0, "{out}");
    // (The smallest twin moves; db1 and batch1 are the same size: by name.)
    assert!(
        out.contains("move batch1's twin from failover1 (100% load) to backup1 (dry run"),
        "{out}"
    );
    assert!(!journal(&lab).iter().any(|r| r.kind == K::TwinMove));
    // Made by hand: stopped and confirmed stopped on failover1, then started on backup1, and
    // the command returns once it heartbeats there. Never two batch1 QEMUs, sampled
    // throughout; no new fence.
    let fences = |recs: &[vigil::journal::Record]| {
        recs.iter()
            .filter(|r| r.node.as_deref() == Some("batch1") && r.kind == K::FenceBegin)
            .count()
    };
    let fenced_once = fences(&journal(&lab));
    let (code, out) = vigil_cli(&lab, &["rebalance"], &one_each);
    assert_eq!(code, 0, "{out}\n{}", explain(&lab, "batch1", &app.out));
    let recs = journal(&lab);
    let at = |k: K, host: &str| {
        recs.iter()
            .position(|r| {
                r.node.as_deref() == Some("batch1")
                    && r.kind == k
                    && (host.is_empty() || r.detail["host"] == host)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {k:?} on {host:?}\n{}",
                    explain(&lab, "batch1", &app.out)
                )
            })
    };
    let (mv, stopped, started) = (
        at(K::TwinMove, ""),
        at(K::VmStopped, "failover1"),
        recs.iter()
            .rposition(|r| r.node.as_deref() == Some("batch1") && r.kind == K::VmStart)
            .unwrap(),
    );
    assert!(
        mv < stopped && stopped < started,
        "{mv} {stopped} {started}"
    );
    let done = recs
        .iter()
        .rfind(|r| r.node.as_deref() == Some("batch1") && r.kind == K::VmHeartbeat)
        .unwrap();
    assert!(done.message.contains("move complete"), "{}", done.message);
    assert!(done.detail["down_ms"].is_u64(), "{}", done.detail);
    assert_eq!(recs[started].detail["host"], "backup1");
    assert_eq!(beats_from(&recs, "batch1"), ["failover1", "backup1"]);
    assert_eq!(fences(&recs), fenced_once, "a move fenced batch1 again");
    assert_eq!(twins(&lab, "batch1"), 1);
    assert_eq!(qemus_on(&lab, "backup1"), 1);
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(10));
    // Nothing more to move (failover1 at 50%).
    let (_, st) = api(&lab, "GET", "/api/status", None);
    assert!(st["rebalance"].is_null(), "{st}");
    // Moves that are refused say why, and stop nothing: to where it runs; of a node with no
    // twin; to a server that does not exist.
    let (code, out) = vigil_cli(&lab, &["move", "db1", "--to", "failover1"], &one_each);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already runs on failover1"), "{out}");
    let (code, out) = vigil_cli(&lab, &["move", "web1", "--to", "backup1"], &one_each);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("only a twin that runs"), "{out}");
    let (code, out) = vigil_cli(&lab, &["move", "db1", "--to", "nowhere"], &one_each);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("no failover or backup server named nowhere"),
        "{out}"
    );
    // To a host without room (backup1's one slot is batch1's): refused by the move itself,
    // before anything is stopped; db1's twin runs on where it was.
    let (code, out) = vigil_cli(&lab, &["move", "db1", "--to", "backup1"], &one_each);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "move of db1's twin from failover1 to backup1 refused: backup1 cannot take it"
        ),
        "{out}"
    );
    assert!(out.contains("all 1 slots taken"), "{out}");
    assert!(
        !journal(&lab)
            .iter()
            .any(|r| r.node.as_deref() == Some("db1")
                && matches!(r.kind, K::VmStopped | K::TwinMove)),
        "db1's twin was touched"
    );
    wait_state(&lab, "db1", "running-virtual", Duration::from_secs(10));
    assert_eq!(twins(&lab, "db1"), 1);
    // The appliance crashes right after a moving twin is confirmed stopped: the restart starts
    // it again (the fence still holds: no new fence), and never two.
    app.stop();
    let t = token(&lab);
    move_into_a_crash(&lab, &t, "move-stopped", &one_each);
    assert_eq!(
        twins(&lab, "batch1"),
        0,
        "the moving twin was confirmed stopped"
    );
    let mut app = Appliance::start(&lab, "rebalance-2");
    let t0 = Instant::now();
    while beats_from(&journal(&lab), "batch1").len() < 3 {
        one_each();
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "batch1's twin was not started again after the crash\n{}",
            explain(&lab, "batch1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        fences(&journal(&lab)),
        fenced_once,
        "the restart fenced batch1 again"
    );
    assert_eq!(twins(&lab, "batch1"), 1);
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(10));
    // The operator puts batch1 back on failover1, and the appliance crashes right after that
    // twin is started there, before its first heartbeat: the restart takes it as booting (not
    // as a twin that stopped heartbeating), adopts it, and starts no other.
    app.stop();
    move_into_a_crash(&lab, &t, "twin-started", &one_each);
    let count = |k: K| {
        journal(&lab)
            .iter()
            .filter(|r| r.node.as_deref() == Some("batch1") && r.kind == k)
            .count()
    };
    let crashed_at = journal(&lab).last().unwrap().seq;
    let (starts, lost, beats) = (
        count(K::VmStart),
        count(K::TwinLost),
        beats_from(&journal(&lab), "batch1").len(),
    );
    assert_eq!(twins(&lab, "batch1"), 1);
    let mut app = Appliance::start(&lab, "rebalance-3");
    let t0 = Instant::now();
    while beats_from(&journal(&lab), "batch1").len() == beats {
        one_each();
        assert!(
            // (vigil's own bound: a twin that sends nothing within its 90 s boot timeout is
            // stopped and started again, at the parked retry 30 s later.)
            t0.elapsed() < Duration::from_secs(180),
            "the adopted twin's heartbeat was not seen\n{}\nthe twin's console:\n{}\nstatus: {}",
            explain(&lab, "batch1", &app.out),
            std::fs::read_to_string(
                lab.state_dir()
                    .join("appliance/vms/failover1/vigil-batch1-e2/serial.log")
            )
            .unwrap_or_default(),
            api(&lab, "GET", "/api/status", None).1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // No second twin: the adopted one heartbeats; or, only if it never did within the boot
    // timeout (in 1 of 24 runs here its heartbeats did not reach the restarted
    // appliance; cause not found), it was stopped first and one more started.
    let gave_up = journal(&lab).iter().any(|r| {
        r.seq > crashed_at
            && r.node.as_deref() == Some("batch1")
            && r.kind == K::FailoverFailed
            && r.message.contains("sent no heartbeat")
            && r.detail["stopped"] == true
    });
    assert_eq!(
        count(K::VmStart),
        starts + usize::from(gave_up),
        "a second twin was started"
    );
    assert_eq!(
        count(K::TwinLost),
        lost,
        "the booting twin was taken for lost"
    );
    assert_eq!(fences(&journal(&lab)), fenced_once);
    assert_eq!(twins(&lab, "batch1"), 1);
    wait_state(&lab, "batch1", "running-virtual", Duration::from_secs(10));
    if gave_up {
        // (Started again where placement put it: back to failover1 by hand.)
        let (code, out) = vigil_cli(&lab, &["move", "batch1", "--to", "failover1"], &one_each);
        assert_eq!(code, 0, "{out}");
    }
    assert_eq!(
        beats_from(&journal(&lab), "batch1").last().unwrap(),
        "failover1"
    );
    // By policy: failover1 is loaded again; rebalance = "auto" is turned on (SIGHUP), and after
    // 2 s of the same proposal the move is made by itself.
    let n = beats_from(&journal(&lab), "batch1").len();
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[policy]\n",
        "[policy]\nrebalance = \"auto\"\nrebalance_after = \"2s\"\n",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &app.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t0 = Instant::now();
    while beats_from(&journal(&lab), "batch1").len() <= n {
        one_each();
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no automatic rebalance\n{}",
            explain(&lab, "batch1", &app.out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let recs = journal(&lab);
    let auto = recs.iter().rfind(|r| r.kind == K::TwinMove).unwrap();
    assert!(
        auto.message
            .contains("automatic rebalance: failover1 at 100% load"),
        "{}",
        auto.message
    );
    assert_eq!(beats_from(&recs, "batch1").last().unwrap(), "backup1");
    assert_eq!(fences(&recs), fenced_once);
    // Once balanced, it stays: no further move within a few proposals' time.
    std::thread::sleep(Duration::from_secs(6));
    let moves = journal(&lab)
        .iter()
        .filter(|r| r.kind == K::TwinMove)
        .count();
    assert_eq!(moves, recs.iter().filter(|r| r.kind == K::TwinMove).count());
    for n in ["db1", "batch1"] {
        check_log_invariants(&journal(&lab), n);
        one_twin_at_a_time(&journal(&lab), n);
        assert_eq!(twins(&lab, n), 1);
    }
    app.stop();
}
