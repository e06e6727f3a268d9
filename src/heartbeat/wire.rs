//! The heartbeat packet: what a node's agent sends, and how the appliance checks it.
//!
//! Overview: one UDP datagram per interval, authenticated with HMAC-SHA256 under the node's key.
//! Layout (big-endian integers):
//!
//! ```text
//! 0   4  magic "VGHB"
//! 4   1  version (1)
//! 5   1  flags: bit 0 = sent by a virtual node
//! 6   1  name length n (1..=63)
//! 7   n  node name (ASCII)
//! .  16  incarnation: the sender's boot id; a new one means the node rebooted
//! .   8  sequence number, +1 per packet within an incarnation
//! .   8  send time, Unix milliseconds (the sender's clock)
//! .   8  failover epoch (0 for the physical node; a virtual node carries the epoch it was
//!        booted for, so a stale one is told apart)
//! .   4  the sender's interval in milliseconds
//! .   1  watchdog: 0 = none, 1 = petted, 2 = petting failed
//! .  32  HMAC-SHA256 of everything before it
//! ```
//!
//! [`decode`] checks the cheap things first (length, magic, version, name) so that garbage costs
//! almost nothing; the HMAC is checked only against the key of a node that exists ([`verify`]).
//!
//! Scope: bytes only. Replay and reboot tracking are the tracker's (it keeps per-node state).
//!
//! Key types: [`Heartbeat`], [`WireError`], [`encode`], [`decode`], [`verify`].

use hmac::{KeyInit, Mac};
use sha2::Sha256;

/// "VGHB".
pub const MAGIC: [u8; 4] = *b"VGHB";
/// The only version spoken.
pub const VERSION: u8 = 1;
/// Longest node name.
pub const MAX_NAME: usize = 63;
/// Bytes after the name and before the MAC.
const BODY_AFTER_NAME: usize = 16 + 8 + 8 + 8 + 4 + 1;
/// MAC length.
pub const MAC_LEN: usize = 32;
/// The largest valid packet; anything longer is rejected unread.
pub const MAX_PACKET: usize = 7 + MAX_NAME + BODY_AFTER_NAME + MAC_LEN;
/// The smallest valid packet.
pub const MIN_PACKET: usize = 7 + 1 + BODY_AFTER_NAME + MAC_LEN;

/// Flag: sent by a virtual node.
pub const FLAG_VIRTUAL: u8 = 1;

/// The state of the sender's watchdog as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchdogReport {
    /// The agent pets no watchdog.
    None,
    /// Petted this interval.
    Petted,
    /// Petting failed (the device went away).
    Failed,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The node it is from.
    pub node: String,
    /// Sent by a virtual node.
    pub virtual_node: bool,
    /// Boot id of the sender.
    pub incarnation: [u8; 16],
    /// Sequence number within the incarnation.
    pub seq: u64,
    /// Sender's clock at send, Unix ms.
    pub sent_ms: u64,
    /// Failover epoch (0: physical).
    pub epoch: u64,
    /// Sender's interval, ms.
    pub interval_ms: u32,
    /// Watchdog.
    pub watchdog: WatchdogReport,
}

/// Why a packet was rejected. Cheap to build: no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than any valid packet or longer than the largest.
    #[error("packet length is not that of a heartbeat")]
    Length,
    /// Not "VGHB".
    #[error("not a heartbeat (bad magic)")]
    Magic,
    /// An unknown version.
    #[error("unknown heartbeat version")]
    Version,
    /// The name is empty, too long, not ASCII, or does not fit the packet.
    #[error("malformed node name")]
    Name,
    /// An unknown watchdog value.
    #[error("malformed watchdog field")]
    Watchdog,
    /// The MAC does not match the node's key: forged, or the wrong key.
    #[error("bad HMAC (forged, or sent with another key)")]
    Mac,
}

type HmacSha256 = hmac::Hmac<Sha256>;

fn mac(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Encodes and signs a heartbeat. The name must be 1..=63 ASCII bytes (checked by the caller's
/// configuration; an invalid one is truncated to what fits, never a panic).
pub fn encode(hb: &Heartbeat, key: &[u8]) -> Vec<u8> {
    let name: Vec<u8> = hb
        .node
        .bytes()
        .filter(u8::is_ascii)
        .take(MAX_NAME)
        .collect();
    let mut b = Vec::with_capacity(MAX_PACKET);
    b.extend_from_slice(&MAGIC);
    b.push(VERSION);
    b.push(if hb.virtual_node { FLAG_VIRTUAL } else { 0 });
    b.push(name.len() as u8);
    b.extend_from_slice(&name);
    b.extend_from_slice(&hb.incarnation);
    b.extend_from_slice(&hb.seq.to_be_bytes());
    b.extend_from_slice(&hb.sent_ms.to_be_bytes());
    b.extend_from_slice(&hb.epoch.to_be_bytes());
    b.extend_from_slice(&hb.interval_ms.to_be_bytes());
    b.push(match hb.watchdog {
        WatchdogReport::None => 0,
        WatchdogReport::Petted => 1,
        WatchdogReport::Failed => 2,
    });
    let m = mac(key, &b);
    b.extend_from_slice(&m);
    b
}

/// A packet that passed the cheap checks, not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified<'a> {
    /// The node name it claims.
    pub node: &'a str,
    signed: &'a [u8],
    mac: &'a [u8],
    heartbeat: Heartbeat,
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Parses a packet without authenticating it: length, magic, version, name. Never panics.
pub fn decode(p: &[u8]) -> Result<Unverified<'_>, WireError> {
    if p.len() < MIN_PACKET || p.len() > MAX_PACKET {
        return Err(WireError::Length);
    }
    if p[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    if p[4] != VERSION {
        return Err(WireError::Version);
    }
    let n = p[6] as usize;
    if n == 0 || n > MAX_NAME || p.len() != 7 + n + BODY_AFTER_NAME + MAC_LEN {
        return Err(WireError::Name);
    }
    let name = &p[7..7 + n];
    if !name
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(WireError::Name);
    }
    let node = std::str::from_utf8(name).map_err(|_| WireError::Name)?;
    let b = &p[7 + n..];
    let mut incarnation = [0u8; 16];
    incarnation.copy_from_slice(&b[..16]);
    let watchdog = match b[44] {
        0 => WatchdogReport::None,
        1 => WatchdogReport::Petted,
        2 => WatchdogReport::Failed,
        _ => return Err(WireError::Watchdog),
    };
    let mut interval = [0u8; 4];
    interval.copy_from_slice(&b[40..44]);
    let split = p.len() - MAC_LEN;
    Ok(Unverified {
        node,
        signed: &p[..split],
        mac: &p[split..],
        heartbeat: Heartbeat {
            node: node.to_string(),
            virtual_node: p[5] & FLAG_VIRTUAL != 0,
            incarnation,
            seq: be64(&b[16..]),
            sent_ms: be64(&b[24..]),
            epoch: be64(&b[32..]),
            interval_ms: u32::from_be_bytes(interval),
            watchdog,
        },
    })
}

/// Authenticates a decoded packet under `key`, in constant time.
pub fn verify(u: Unverified<'_>, key: &[u8]) -> Result<Heartbeat, WireError> {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(u.signed);
    m.verify_slice(u.mac).map_err(|_| WireError::Mac)?;
    Ok(u.heartbeat)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hb() -> Heartbeat {
        Heartbeat {
            node: "db1".into(),
            virtual_node: false,
            incarnation: [7; 16],
            seq: 42,
            sent_ms: 1_790_000_000_000,
            epoch: 0,
            interval_ms: 1000,
            watchdog: WatchdogReport::Petted,
        }
    }

    #[test]
    fn a_heartbeat_round_trips_under_its_key() {
        let p = encode(&hb(), b"k1");
        assert!(p.len() <= MAX_PACKET);
        let u = decode(&p).unwrap();
        assert_eq!(u.node, "db1");
        assert_eq!(verify(u, b"k1").unwrap(), hb());
    }

    #[test]
    fn another_key_or_a_flipped_bit_is_a_bad_mac() {
        let p = encode(&hb(), b"k1");
        assert_eq!(verify(decode(&p).unwrap(), b"k2"), Err(WireError::Mac));
        for i in 7 + 3..p.len() {
            let mut q = p.clone();
            q[i] ^= 1;
            match decode(&q) {
                Ok(u) => assert_eq!(verify(u, b"k1"), Err(WireError::Mac), "bit in byte {i}"),
                Err(e) => assert_eq!(e, WireError::Watchdog, "byte {i}"),
            }
        }
    }

    #[test]
    fn garbage_is_rejected_before_any_hmac() {
        assert_eq!(decode(b"hello"), Err(WireError::Length));
        let mut p = encode(&hb(), b"k");
        p[0] = b'X';
        assert_eq!(decode(&p), Err(WireError::Magic));
        let mut p = encode(&hb(), b"k");
        p[4] = 9;
        assert_eq!(decode(&p), Err(WireError::Version));
        let mut p = encode(&hb(), b"k");
        p[6] = 4;
        assert_eq!(decode(&p), Err(WireError::Name));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _outcome = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_packets(i in 0usize..90, v in any::<u8>(), cut in 0usize..100) {
            let mut p = encode(&hb(), b"k");
            let i = i % p.len();
            p[i] = v;
            p.truncate(p.len().saturating_sub(cut % 8));
            if let Ok(u) = decode(&p) {
                let _outcome = verify(u, b"k");
            }
        }
    }
}
