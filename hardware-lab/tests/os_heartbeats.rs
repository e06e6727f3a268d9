//! The simulated OS: the real `vigil agent` per server, whose heartbeats stop, pause or change
//! incarnation exactly as the server's faults say, received here on the appliance's address.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use vigil::heartbeat::wire::{self, WatchdogReport};
use vigil_lab::faults::{Fault, FaultKind};
use vigil_lab::rack::{Rack, RackOptions, Topology};

/// What the appliance's address received in a window: per node, the count and incarnations.
#[derive(Debug, Default)]
struct Seen {
    count: BTreeMap<String, usize>,
    incarnations: BTreeMap<String, Vec<[u8; 16]>>,
}

async fn listen(sock: &UdpSocket, keys: &BTreeMap<String, Vec<u8>>, window: Duration) -> Seen {
    let mut seen = Seen::default();
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    while let Some(left) = window.checked_sub(t0.elapsed()) {
        let Ok(Ok(n)) = tokio::time::timeout(left, sock.recv(&mut buf)).await else {
            break;
        };
        let u = wire::decode(&buf[..n]).expect("the agent sends well-formed packets");
        let key = &keys[u.node];
        let hb = wire::verify(u, key).expect("signed with the node's key");
        assert_eq!(hb.watchdog, WatchdogReport::Petted, "{}", hb.node);
        *seen.count.entry(hb.node.clone()).or_default() += 1;
        let inc = seen.incarnations.entry(hb.node).or_default();
        if inc.last() != Some(&hb.incarnation) {
            inc.push(hb.incarnation);
        }
    }
    seen
}

/// Discards what the socket holds: heartbeats sent before the moment being tested (the
/// socket is shared, so those sent between two windows are still queued).
fn drain(sock: &UdpSocket) {
    let mut buf = [0u8; 512];
    while sock.try_recv(&mut buf).is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_follow_the_servers_faults() {
    let dir = tempfile::tempdir().unwrap();
    let mut t =
        Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/rack4.toml"))
            .unwrap();
    t.heartbeat_interval_ms = 200;
    t.watchdog_timeout_ms = 1000;
    // Short POSTs: a repaired server is back within a second or two.
    t.time_scale = 0.005;
    let rack = Rack::start(
        &t,
        dir.path(),
        RackOptions {
            agents: true,
            guest: None,
            no_ipmi: true,
        },
    )
    .unwrap();
    let sock = UdpSocket::bind(&rack.endpoints.heartbeat_listen)
        .await
        .unwrap();
    let keys: BTreeMap<String, Vec<u8>> = rack
        .endpoints
        .servers
        .iter()
        .map(|(n, e)| {
            (
                n.clone(),
                std::fs::read_to_string(&e.heartbeat_key_file)
                    .unwrap()
                    .trim()
                    .as_bytes()
                    .to_vec(),
            )
        })
        .collect();

    // Every server's OS is up and heartbeating.
    let s = listen(&sock, &keys, Duration::from_secs(2)).await;
    assert_eq!(s.count.len(), 6, "{s:?}");
    let first: BTreeMap<_, _> = s
        .incarnations
        .iter()
        .map(|(n, i)| (n.clone(), i[0]))
        .collect();

    // A hang freezes the agent; an isolation cuts its network; a power loss kills it.
    rack.servers["db1"].inject(Fault::new(FaultKind::OsHang));
    rack.servers["web1"].inject(Fault::new(FaultKind::NetworkIsolation));
    rack.servers["web2"].inject(Fault::new(FaultKind::PowerLoss));
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain(&sock);
    let s = listen(&sock, &keys, Duration::from_secs(2)).await;
    for n in ["db1", "web1", "web2"] {
        assert!(!s.count.contains_key(n), "{n} still heartbeats: {s:?}");
    }
    assert!(s.count["batch1"] >= 5, "{s:?}");
    // The hung OS stops petting its watchdog, which runs out; the isolated one keeps petting.
    let db1 = rack.servers["db1"].state().watchdog;
    let web1 = rack.servers["web1"].state().watchdog;
    assert!(db1.expired, "{db1:?}");
    assert!(!web1.expired, "{web1:?}");

    // Repaired: the thawed and reconnected OSes resume in the same incarnation; the server that
    // lost power boots again, and its OS comes back as a new incarnation.
    for n in ["db1", "web1", "web2"] {
        rack.servers[n].repair();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = listen(&sock, &keys, Duration::from_secs(2)).await;
    for n in ["db1", "web1", "web2"] {
        assert!(s.count.get(n).copied().unwrap_or(0) >= 5, "{n}: {s:?}");
    }
    assert_eq!(s.incarnations["db1"], vec![first["db1"]]);
    assert_eq!(s.incarnations["web1"], vec![first["web1"]]);
    assert_ne!(s.incarnations["web2"], vec![first["web2"]]);
    assert!(!rack.servers["db1"].state().watchdog.expired);

    let pids_before = agent_pids(dir.path());
    assert_eq!(pids_before, 6);
    rack.stop().await;
    // Nothing is left behind.
    assert_eq!(agent_pids(dir.path()), 0);
}

/// How many agent processes of this lab are running (found by their watchdog socket path).
fn agent_pids(state_dir: &Path) -> usize {
    let needle = state_dir.join("wd").display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let s = String::from_utf8_lossy(c);
            s.contains(&needle) && s.starts_with(|_: char| true) && s.contains("agent")
        })
        .count()
}
