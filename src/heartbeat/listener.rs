//! The appliance's heartbeat listener: every datagram verified, garbage dropped at almost no cost.
//!
//! Overview: one UDP socket; each datagram is decoded (length, magic, version and name checks,
//! no allocation on failure), its claimed node looked up, its source address checked where one is
//! configured, its HMAC verified under that node's key, and its sequence checked by the
//! [`Tracker`] against replays. Accepted heartbeats go to the monitor as observations. Refusals
//! are counted by reason and logged at most once per reason per ten seconds, so a flood cannot
//! flood the journal or delay real heartbeats behind log writes.
//!
//! Key types: [`Listener`], [`Counters`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::tracker::{Refusal, Tracker, Verdict};
use super::wire::{self, Heartbeat, MAX_PACKET, WireError};
use crate::clock::Clock;
use crate::config::Secret;
use crate::model::Millis;

/// The listener's socket receive buffer.
pub const RECV_BUFFER_BYTES: usize = 8 << 20;

/// Refusals and acceptances, by reason (for metrics and tests).
#[derive(Debug, Default)]
pub struct Counters {
    /// Accepted.
    pub accepted: AtomicU64,
    /// Wrong size, magic, version or name.
    pub malformed: AtomicU64,
    /// A node nobody configured.
    pub unknown_node: AtomicU64,
    /// From an address other than the node's.
    pub wrong_address: AtomicU64,
    /// Bad HMAC.
    pub bad_mac: AtomicU64,
    /// Replays and stale incarnations.
    pub replay: AtomicU64,
}

impl Counters {
    /// Everything refused.
    pub fn refused(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
            + self.unknown_node.load(Ordering::Relaxed)
            + self.wrong_address.load(Ordering::Relaxed)
            + self.bad_mac.load(Ordering::Relaxed)
            + self.replay.load(Ordering::Relaxed)
    }
}

/// A node's key and expected address.
#[derive(Debug, Clone)]
pub struct Peer {
    /// HMAC key.
    pub key: Secret,
    /// Where its heartbeats must come from, if known.
    pub address: Option<IpAddr>,
}

/// An accepted heartbeat, for the monitor.
#[derive(Debug, Clone)]
pub struct Received {
    /// The heartbeat.
    pub heartbeat: Heartbeat,
    /// When it arrived.
    pub at: Millis,
    /// Whether it started a new incarnation.
    pub reboot: bool,
}

/// The listener.
#[derive(Debug)]
pub struct Listener {
    sock: UdpSocket,
    peers: HashMap<String, Peer>,
    tracker: Tracker,
    clock: Clock,
    tx: mpsc::Sender<Received>,
    /// Counters, shared with whoever reports them.
    pub counters: Arc<Counters>,
    last_log: HashMap<&'static str, Instant>,
}

impl Listener {
    /// Binds `addr` for `peers`; accepted heartbeats go to `tx`. Call it within a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        peers: HashMap<String, Peer>,
        clock: Clock,
        tx: mpsc::Sender<Received>,
    ) -> std::io::Result<Self> {
        let std_sock = std::net::UdpSocket::bind(addr)?;
        std_sock.set_nonblocking(true)?;
        // A deep receive buffer absorbs a burst of garbage while the loop drains it, so real
        // heartbeats are not dropped by the kernel behind it. RcvBufForce passes the system's
        // rmem_max when the appliance may (it runs with CAP_NET_ADMIN as root); otherwise the
        // ordinary option gives what the system allows.
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(&std_sock, sockopt::RcvBufForce, &RECV_BUFFER_BYTES).is_err() {
            let _best_effort = setsockopt(&std_sock, sockopt::RcvBuf, &RECV_BUFFER_BYTES);
        }
        let sock = UdpSocket::from_std(std_sock)?;
        Ok(Self {
            sock,
            peers,
            tracker: Tracker::new(),
            clock,
            tx,
            counters: Arc::new(Counters::default()),
            last_log: HashMap::new(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// The tracker (stats per node).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    fn refuse(
        &mut self,
        reason: &'static str,
        counter: &AtomicU64,
        node: Option<&str>,
        from: SocketAddr,
    ) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = node {
            self.tracker.note_refused(n);
        }
        let now = Instant::now();
        if self
            .last_log
            .get(reason)
            .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(10))
        {
            self.last_log.insert(reason, now);
            tracing::warn!(peer = %from, node = node.unwrap_or("-"), reason, refused_total = self.counters.refused(), "heartbeat refused (further refusals of this kind are counted, not logged, for 10 s)");
        }
    }

    /// Handles one datagram. Returns the accepted heartbeat, if any.
    pub fn handle(&mut self, packet: &[u8], from: SocketAddr) -> Option<Received> {
        let counters = self.counters.clone();
        let u = match wire::decode(packet) {
            Ok(u) => u,
            Err(_) => {
                self.refuse("malformed", &counters.malformed, None, from);
                return None;
            }
        };
        let node = u.node.to_string();
        let Some(peer) = self.peers.get(&node) else {
            self.refuse("unknown node", &counters.unknown_node, None, from);
            return None;
        };
        if peer.address.is_some_and(|a| a != from.ip()) {
            self.refuse(
                "wrong source address",
                &counters.wrong_address,
                Some(&node),
                from,
            );
            return None;
        }
        let hb = match wire::verify(u, peer.key.expose().as_bytes()) {
            Ok(hb) => hb,
            Err(WireError::Mac) | Err(_) => {
                self.refuse("bad HMAC", &counters.bad_mac, Some(&node), from);
                return None;
            }
        };
        let at = self.clock.now();
        // A virtual twin speaks under its node's name but is tracked apart: its heartbeats are
        // not the physical node's, and their sequence numbers are its own.
        let tracked = if hb.virtual_node {
            let mut t = hb.clone();
            t.node = format!("{}@virtual", hb.node);
            t
        } else {
            hb.clone()
        };
        match self.tracker.accept(&tracked, at) {
            Verdict::Accepted { reboot } => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                if reboot {
                    tracing::info!(node = %node, "heartbeat from a new incarnation: the node rebooted");
                }
                Some(Received {
                    heartbeat: hb,
                    at,
                    reboot,
                })
            }
            Verdict::Refused(r) => {
                let why = match r {
                    Refusal::Replay => "replayed sequence number",
                    Refusal::StaleIncarnation => "stale incarnation",
                };
                self.counters.replay.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if self
                    .last_log
                    .get(why)
                    .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(10))
                {
                    self.last_log.insert(why, now);
                    tracing::warn!(peer = %from, node = %node, reason = why, "heartbeat refused");
                }
                None
            }
        }
    }

    /// Receives until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        // One byte more than the largest heartbeat: a longer datagram shows as too long.
        let mut buf = [0u8; MAX_PACKET + 1];
        loop {
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.sock.recv_from(&mut buf) => r,
            };
            let Ok((n, from)) = r else { continue };
            if let Some(rx) = self.handle(&buf[..n], from) {
                // A monitor that cannot keep up loses heartbeats rather than stalling the socket.
                let _dropped_if_full = self.tx.try_send(rx);
            }
        }
    }
}
