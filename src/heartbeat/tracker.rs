//! Per-node heartbeat tracking: replay protection, reboots, loss and jitter. Pure.
//!
//! Overview: a verified heartbeat is accepted only if it moves its node forward: a higher
//! sequence number within the same incarnation, or a new incarnation whose send time is later than
//! anything seen from the current one (a reboot). Anything else is a replay, however valid its
//! HMAC. Loss is counted from sequence gaps, jitter as the mean deviation of inter-arrival times
//! from the sender's interval.
//!
//! Key types: [`Tracker`], [`NodeStats`], [`Verdict`].

use std::collections::HashMap;

use serde::Serialize;

use super::wire::Heartbeat;
use crate::model::Millis;

/// Why a verified heartbeat was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// Not newer than what was seen: a replay (or a duplicate).
    Replay,
    /// From an incarnation older than the current one.
    StaleIncarnation,
}

/// What happened to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted; `reboot` when it starts a new incarnation.
    Accepted {
        /// A new incarnation.
        reboot: bool,
    },
    /// Refused.
    Refused(Refusal),
}

/// What is known of one node's heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeStats {
    /// Current incarnation.
    #[serde(skip)]
    pub incarnation: Option<[u8; 16]>,
    /// Last sequence number.
    pub last_seq: u64,
    /// Sender's time of the last one.
    pub last_sent_ms: u64,
    /// Arrival time of the last one.
    pub last_arrival: Option<Millis>,
    /// Accepted heartbeats.
    pub received: u64,
    /// Heartbeats missing from sequence gaps.
    pub lost: u64,
    /// Incarnation changes.
    pub reboots: u64,
    /// Mean absolute deviation of inter-arrival times from the interval, ms (EWMA).
    pub jitter_ms: f64,
    /// The failover epoch the last one carried.
    pub epoch: u64,
    /// Refused (replays, stale).
    pub refused: u64,
}

impl NodeStats {
    /// Loss rate since the node's current incarnation began.
    pub fn loss_rate(&self) -> f64 {
        let total = self.received + self.lost;
        if total == 0 {
            0.0
        } else {
            self.lost as f64 / total as f64
        }
    }
}

/// The tracker of every node.
#[derive(Debug, Default)]
pub struct Tracker {
    nodes: HashMap<String, NodeStats>,
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stats of `node`.
    pub fn stats(&self, node: &str) -> Option<&NodeStats> {
        self.nodes.get(node)
    }

    /// Records a refusal that happened before tracking (a bad MAC).
    pub fn note_refused(&mut self, node: &str) {
        if let Some(s) = self.nodes.get_mut(node) {
            s.refused += 1;
        }
    }

    /// Takes a verified heartbeat arriving at `now`.
    pub fn accept(&mut self, hb: &Heartbeat, now: Millis) -> Verdict {
        let s = self.nodes.entry(hb.node.clone()).or_default();
        let reboot = match s.incarnation {
            None => false,
            Some(i) if i == hb.incarnation => {
                if hb.seq <= s.last_seq {
                    s.refused += 1;
                    return Verdict::Refused(Refusal::Replay);
                }
                false
            }
            Some(_) => {
                if hb.sent_ms <= s.last_sent_ms {
                    s.refused += 1;
                    return Verdict::Refused(Refusal::StaleIncarnation);
                }
                true
            }
        };
        if !reboot && s.incarnation.is_some() {
            s.lost += hb
                .seq
                .saturating_sub(s.last_seq)
                .saturating_sub(1)
                .min(1_000_000);
            if let Some(prev) = s.last_arrival {
                let gap = now.saturating_sub(prev) as f64;
                let dev = (gap - f64::from(hb.interval_ms)).abs();
                s.jitter_ms = if s.received <= 1 {
                    dev
                } else {
                    s.jitter_ms * 0.9 + dev * 0.1
                };
            }
        }
        if reboot {
            s.reboots += 1;
            s.lost = 0;
            s.received = 0;
        }
        s.incarnation = Some(hb.incarnation);
        s.last_seq = hb.seq;
        s.last_sent_ms = hb.sent_ms;
        s.last_arrival = Some(now);
        s.received += 1;
        s.epoch = hb.epoch;
        Verdict::Accepted { reboot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::wire::WatchdogReport;

    fn hb(inc: u8, seq: u64, sent: u64) -> Heartbeat {
        Heartbeat {
            node: "db1".into(),
            virtual_node: false,
            incarnation: [inc; 16],
            seq,
            sent_ms: sent,
            epoch: 0,
            interval_ms: 1000,
            watchdog: WatchdogReport::Petted,
        }
    }

    #[test]
    fn replays_and_duplicates_are_refused() {
        let mut t = Tracker::new();
        assert_eq!(
            t.accept(&hb(1, 10, 100), 1000),
            Verdict::Accepted { reboot: false }
        );
        assert_eq!(
            t.accept(&hb(1, 10, 100), 1001),
            Verdict::Refused(Refusal::Replay)
        );
        assert_eq!(
            t.accept(&hb(1, 9, 99), 1002),
            Verdict::Refused(Refusal::Replay)
        );
        assert_eq!(
            t.accept(&hb(1, 11, 101), 2000),
            Verdict::Accepted { reboot: false }
        );
    }

    #[test]
    fn a_new_incarnation_is_a_reboot_unless_it_is_older() {
        let mut t = Tracker::new();
        t.accept(&hb(1, 10, 5_000), 1000);
        // A replay of a packet from a previous boot: older send time.
        assert_eq!(
            t.accept(&hb(0, 99, 4_000), 1100),
            Verdict::Refused(Refusal::StaleIncarnation)
        );
        assert_eq!(
            t.accept(&hb(2, 1, 6_000), 1200),
            Verdict::Accepted { reboot: true }
        );
        assert_eq!(t.stats("db1").unwrap().reboots, 1);
    }

    #[test]
    fn gaps_count_as_loss_and_irregular_arrivals_as_jitter() {
        let mut t = Tracker::new();
        t.accept(&hb(1, 1, 1), 1000);
        t.accept(&hb(1, 2, 2), 2000);
        t.accept(&hb(1, 5, 5), 5300);
        let s = t.stats("db1").unwrap();
        assert_eq!((s.received, s.lost), (3, 2));
        assert!((s.loss_rate() - 0.4).abs() < 1e-9);
        assert!(s.jitter_ms > 0.0);
    }
}
