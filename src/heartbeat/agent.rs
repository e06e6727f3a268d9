//! `vigil agent`: the node side. Sends a signed heartbeat every interval and pets the host
//! watchdog, the way an OS shows it is alive to both of vigil's paths.
//!
//! Overview: the heartbeat proves the OS can reach the appliance over the service network; the
//! watchdog proves, to the BMC, that the OS is running at all. A hung OS stops both; a cut network
//! stops only the heartbeat (the verdict "isolated", not "hang"). The agent therefore pets the
//! watchdog on its own schedule, independent of whether sends succeed.
//!
//! Watchdogs: a device file such as `/dev/watchdog` (on servers the `ipmi_watchdog` kernel driver
//! exposes the BMC's IPMI watchdog there; a byte written pets it, `V` before closing disarms it),
//! `unix:PATH` (the hardware lab's in-band channel: one datagram per pet), or `none`.
//!
//! Scope: sending. Receiving and judging heartbeats is the appliance's (`listener.rs`, diagnosis).
//!
//! Key types: [`AgentConfig`], [`run`], [`AgentError`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use super::wire::{Heartbeat, WatchdogReport, encode};
use crate::config::{Secret, SecretError, SecretRef};

/// Where the agent pets a watchdog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogTarget {
    /// No watchdog.
    None,
    /// A watchdog device file (`/dev/watchdog`).
    Device(PathBuf),
    /// The lab's in-band channel: a unix datagram socket.
    Unix(PathBuf),
}

impl WatchdogTarget {
    /// Parses `none`, `unix:PATH` or a device path.
    pub fn parse(s: &str) -> Self {
        match s {
            "none" | "" => WatchdogTarget::None,
            _ => match s.strip_prefix("unix:") {
                Some(p) => WatchdogTarget::Unix(PathBuf::from(p)),
                None => WatchdogTarget::Device(PathBuf::from(s)),
            },
        }
    }
}

/// What the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name (as the appliance knows it).
    pub node: String,
    /// Where the appliance listens for heartbeats.
    pub appliance: String,
    /// The HMAC key.
    pub key: SecretRef,
    /// How often.
    pub interval: Duration,
    /// The watchdog to pet.
    pub watchdog: WatchdogTarget,
    /// The failover epoch this node runs under (0 on the physical node).
    pub epoch: u64,
    /// Whether this is a virtual node.
    pub virtual_node: bool,
    /// The boot id: `None` reads `/proc/sys/kernel/random/boot_id`.
    pub boot_id: Option<[u8; 16]>,
    /// Stop after this many heartbeats (tests and benchmarks); `None` runs until signalled.
    pub count: Option<u64>,
}

/// Why the agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The key cannot be read.
    #[error("the heartbeat key cannot be read")]
    Key(#[source] SecretError),
    /// The appliance address does not resolve.
    #[error("the appliance address {0} does not resolve to any address")]
    Resolve(String),
    /// The appliance cannot be reached (no route, refused).
    #[error("the appliance at {addr} cannot be reached")]
    Unreachable {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node name cannot be sent.
    #[error("node name {0:?} is not 1-63 characters of a-z, 0-9, '-', '_', '.'")]
    Name(String),
    /// The boot id cannot be read.
    #[error("the boot id cannot be read from /proc/sys/kernel/random/boot_id")]
    BootId(#[source] std::io::Error),
    /// The watchdog cannot be opened.
    #[error("the watchdog {path} cannot be opened")]
    Watchdog {
        /// Which.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket cannot be made.
    #[error("a UDP socket cannot be opened")]
    Socket(#[source] std::io::Error),
}

/// Parses a boot id: 32 hex digits, dashes allowed (the /proc format).
pub fn parse_boot_id(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Pet {
    None,
    Device(tokio::fs::File),
    Unix(tokio::net::UnixDatagram, PathBuf),
}

impl Pet {
    async fn pet(&mut self) -> WatchdogReport {
        match self {
            Pet::None => WatchdogReport::None,
            Pet::Device(f) => match f.write_all(b"\0").await {
                Ok(()) => match f.flush().await {
                    Ok(()) => WatchdogReport::Petted,
                    Err(_) => WatchdogReport::Failed,
                },
                Err(_) => WatchdogReport::Failed,
            },
            Pet::Unix(s, p) => match s.send_to(b"pet", &*p).await {
                Ok(_) => WatchdogReport::Petted,
                Err(_) => WatchdogReport::Failed,
            },
        }
    }

    /// Disarms a device watchdog on a clean stop (the "magic close"), so stopping the agent on
    /// purpose does not reset the machine.
    async fn disarm(&mut self) {
        if let Pet::Device(f) = self {
            // Best effort: if the write fails the watchdog stays armed, which is the safe side.
            let _disarmed = f.write_all(b"V").await;
            let _flushed = f.flush().await;
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT (or `count` heartbeats). Returns how many were sent.
pub async fn run(cfg: AgentConfig) -> Result<u64, AgentError> {
    let key: Secret = cfg.key.resolve().map_err(AgentError::Key)?;
    let name_ok = !cfg.node.is_empty()
        && cfg.node.len() <= super::wire::MAX_NAME
        && cfg
            .node
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !name_ok {
        return Err(AgentError::Name(cfg.node.clone()));
    }
    let incarnation = match cfg.boot_id {
        Some(b) => b,
        None => {
            let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map_err(AgentError::BootId)?;
            parse_boot_id(&s)
                .ok_or_else(|| AgentError::BootId(std::io::Error::other("not a UUID")))?
        }
    };
    let addr: SocketAddr = tokio::net::lookup_host(&cfg.appliance)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| AgentError::Resolve(cfg.appliance.clone()))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("constant address parses")
    } else {
        "[::]:0".parse().expect("constant address parses")
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(AgentError::Socket)?;
    let unreachable = |source| AgentError::Unreachable {
        addr: cfg.appliance.clone(),
        source,
    };
    sock.connect(addr).await.map_err(unreachable)?;
    let mut pet = match &cfg.watchdog {
        WatchdogTarget::None => Pet::None,
        WatchdogTarget::Device(p) => Pet::Device(
            tokio::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .await
                .map_err(|source| AgentError::Watchdog {
                    path: p.clone(),
                    source,
                })?,
        ),
        WatchdogTarget::Unix(p) => Pet::Unix(
            tokio::net::UnixDatagram::unbound().map_err(AgentError::Socket)?,
            p.clone(),
        ),
    };
    // Sequence numbers start from the clock so that an agent restarted within the same boot
    // (same incarnation) never goes back: the appliance would take that for a replay.
    let mut seq = unix_ms().saturating_mul(1000);
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Socket)?;
    let mut last_error_logged: Option<std::time::Instant> = None;
    tracing::info!(node = %cfg.node, appliance = %addr, interval_ms = cfg.interval.as_millis() as u64, epoch = cfg.epoch, "agent started");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        let watchdog = pet.pet().await;
        seq += 1;
        let hb = Heartbeat {
            node: cfg.node.clone(),
            virtual_node: cfg.virtual_node,
            incarnation,
            seq,
            sent_ms: unix_ms(),
            epoch: cfg.epoch,
            interval_ms: cfg.interval.as_millis().min(u32::MAX as u128) as u32,
            watchdog,
        };
        let packet = encode(&hb, key.expose().as_bytes());
        match sock.send(&packet).await {
            Ok(_) => {
                if sent == 0 {
                    // A refused port answers the first datagram with ICMP, which a connected
                    // socket reports on the next call: wait for it briefly, so that a wrong
                    // address fails at start with a clear error instead of sending into nothing.
                    let mut buf = [0u8; 16];
                    if let Ok(Err(e)) =
                        tokio::time::timeout(Duration::from_millis(100), sock.recv(&mut buf)).await
                        && e.kind() == std::io::ErrorKind::ConnectionRefused
                    {
                        return Err(unreachable(e));
                    }
                    // The unit is ready once the first heartbeat has left.
                    let _not_under_systemd = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
                sent += 1;
            }
            Err(e) if sent == 0 => return Err(unreachable(e)),
            Err(e) => {
                // The appliance may be restarting: keep sending, but say so at most every 30 s.
                if last_error_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(node = %cfg.node, appliance = %addr, error = %e, "heartbeat send failed");
                    last_error_logged = Some(std::time::Instant::now());
                }
            }
        }
        if cfg.count.is_some_and(|c| sent >= c) {
            break;
        }
    }
    pet.disarm().await;
    tracing::info!(node = %cfg.node, sent, "agent stopped");
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_parse_in_the_proc_format() {
        let b = parse_boot_id("0b9c6b3e-2f1d-4a5e-9c3f-1e2d3c4b5a69\n").unwrap();
        assert_eq!(b[0], 0x0b);
        assert_eq!(b[15], 0x69);
        assert!(parse_boot_id("xyz").is_none());
    }

    #[test]
    fn watchdog_targets_parse() {
        assert_eq!(WatchdogTarget::parse("none"), WatchdogTarget::None);
        assert_eq!(
            WatchdogTarget::parse("unix:/run/lab/db1.wd"),
            WatchdogTarget::Unix("/run/lab/db1.wd".into())
        );
        assert_eq!(
            WatchdogTarget::parse("/dev/watchdog"),
            WatchdogTarget::Device("/dev/watchdog".into())
        );
    }
}
