//! The appliance's heartbeat listener under a flood of garbage, forgeries and replays: every
//! real heartbeat still gets through, and every bad packet is refused and counted.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use vigil::clock::Clock;
use vigil::config::Secret;
use vigil::heartbeat::listener::{Listener, Peer};
use vigil::heartbeat::wire::{Heartbeat, WatchdogReport, encode};

fn hb(seq: u64) -> Heartbeat {
    Heartbeat {
        node: "db1".into(),
        virtual_node: false,
        incarnation: [3; 16],
        seq,
        sent_ms: 1_000 + seq,
        epoch: 0,
        interval_ms: 100,
        watchdog: WatchdogReport::Petted,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_heartbeats_get_through_a_flood_and_bad_packets_are_counted() {
    let (tx, mut rx) = mpsc::channel(100_000);
    let peers: HashMap<String, Peer> = [(
        "db1".to_string(),
        Peer {
            key: Secret::new("db1-key"),
            address: None,
        },
    )]
    .into();
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), peers, Clock::start(), tx).unwrap();
    let addr = listener.local_addr().unwrap();
    let counters = listener.counters.clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(listener.run(cancel.clone()));

    // The flood, bounded in count and time: random bytes, well-formed packets with a wrong key,
    // and replays of one real heartbeat, at about 30,000 packets a second: three times the
    // heartbeat rate of a 10,000-node rack, and more than any real network would deliver as
    // junk. (A flood beyond what a core can read is dropped by the kernel before the listener
    // sees it, garbage and real packets alike: that is what rate limits upstream are for.)
    let flood = std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let forged = encode(&hb(10_000_000), b"not-the-key");
        let replay = encode(&hb(1), b"db1-key");
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < 120_000 && t0.elapsed() < Duration::from_secs(4) {
            for _ in 0..100 {
                let junk: Vec<u8> = (0..(sent % 200) as usize)
                    .map(|i| (i as u64 * 31 + sent) as u8)
                    .collect();
                let _ = s.send_to(&junk, addr);
                let _ = s.send_to(&forged, addr);
                let _ = s.send_to(&replay, addr);
                sent += 3;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        sent
    });
    // The real sender: 30 heartbeats, 100 ms apart, during the flood.
    let real = UdpSocket::bind("127.0.0.1:0").unwrap();
    for seq in 2..32 {
        real.send_to(&encode(&hb(seq), b"db1-key"), addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let flooded = flood.join().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    let _ = task.await;
    let mut got = Vec::new();
    while let Ok(r) = rx.try_recv() {
        got.push(r.heartbeat.seq);
    }
    // The replayed heartbeat (seq 1) is accepted at most once, before the real ones move on.
    got.retain(|s| *s != 1);
    assert_eq!(
        got,
        (2..32).collect::<Vec<_>>(),
        "real heartbeats lost or reordered under the flood"
    );
    let refused = counters.refused();
    assert!(
        counters.bad_mac.load(Ordering::Relaxed) > 1000,
        "forgeries not counted"
    );
    assert!(
        counters.replay.load(Ordering::Relaxed) > 1000,
        "replays not counted"
    );
    eprintln!(
        "flood: {flooded} packets sent, {refused} refused, 30 of 30 real heartbeats accepted"
    );
}
