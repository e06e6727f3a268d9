//! The host side of a lab server's IPMI system interface: the simulated OS's in-band path to its
//! BMC's watchdog.
//!
//! Overview: each `ipmi_sim` has a system interface (`serial 15 ... codec VM` in lan.conf.tmpl), a
//! TCP port where the host connects, as QEMU's `ipmi-bmc-extern` does for a virtual machine.
//! [`run`] is that host for one server. It keeps one connection to the port, reconnecting while
//! the BMC is down or restarting, and mirrors the OS's watchdog into it:
//! - a fresh OS arms the timer: Set Watchdog Timer (use SMS/OS, the topology's action, the
//!   lab's countdown, SMS/OS expiration flag cleared), then Reset Watchdog Timer to start it;
//! - each pet from the OS (the agent's datagram, or the OS state itself when no agent runs) is a
//!   Reset Watchdog Timer, at most one a second;
//! - a host going off or resetting stops the timer with a Set that keeps the expiration flag:
//!   ipmi_sim does not stop it on chassis control, as real BMCs do (README.md, Watchdog 8).
//!
//! Back from the BMC come its watchdog's actions: RESET restarts the host and POWEROFF turns it
//! off in the lab's power model, with the record the Redfish face's SEL shows; ipmi_sim has
//! already written its own (sensor 0, `Hard reset` ...) and set the expiration flag that Get
//! Watchdog Timer reports.
//!
//! Why the pre-timeout: ipmi_sim 2.0.33 does not restart a running countdown on a pet. With a
//! "messaging" pre-timeout of 2 s, each pre-timeout re-arms it to the latest pet's deadline, so
//! the expiry comes one countdown after the last pet (README.md, Watchdog 5). Its ATTN commands
//! are ignored here. A status-only timer never runs in ipmi_sim (Watchdog 3): it is armed and
//! petted the same way, so Get Watchdog Timer shows what the OS set, and the lab's model counts
//! it down.
//!
//! Wire format (both ways): `0xA0` ends a message, `0xA1` a command; `0xAA` escapes the next
//! byte, sent as `byte | 0x10`. A request is `seq, netfn << 2 | lun, cmd, data..., checksum`
//! (two's complement of the byte sum); a response is `seq, netfn << 2 | lun, cmd, cc, data...,
//! checksum`. `host-stub.py` is the reference client this follows.
//!
//! Key items: [`run`], [`encode_request`], [`Decoder`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::server::{PowerAction, SimServer, WatchdogAction};

const MSG_END: u8 = 0xA0;
const CMD_END: u8 = 0xA1;
const ESCAPE: u8 = 0xAA;
/// The longest frame accepted from the BMC; a longer one is dropped whole.
const MAX_FRAME: usize = 256;

/// Host capabilities: power (0x01), reset (0x02), attention (0x10). ipmi_sim accepts a hard-reset
/// action only from a host that declared reset.
const CAPABILITIES: u8 = 0x13;

const NETFN_APP: u8 = 0x06;
const CMD_RESET_WATCHDOG: u8 = 0x22;
const CMD_SET_WATCHDOG: u8 = 0x24;
/// Timer use SMS/OS (the OS's watchdog), "don't stop" and "don't log" clear.
const USE_SMS_OS: u8 = 0x04;
/// Pre-timeout interrupt "messaging", in the action byte's bits 6:4.
const PRETIMEOUT_MESSAGING: u8 = 0x30;
/// Seconds of pre-timeout: 2 or more, or the expiry comes a second early (README.md).
const PRETIMEOUT_S: u8 = 2;
/// The SMS/OS bit of the expiration flags.
const FLAG_SMS_OS: u8 = 0x10;

/// How often the OS's watchdog state is read and mirrored.
const TICK: Duration = Duration::from_millis(250);
/// Pets are passed on at most this often (the agent pets once per heartbeat interval).
const PET_EVERY: Duration = Duration::from_secs(1);
/// Wait between connection attempts while the BMC is down.
const RECONNECT: Duration = Duration::from_millis(300);

/// The bytes of one in-band request.
pub fn encode_request(seq: u8, netfn: u8, cmd: u8, data: &[u8]) -> Vec<u8> {
    let mut body = vec![seq, netfn << 2, cmd];
    body.extend_from_slice(data);
    let sum = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    body.push(sum.wrapping_neg());
    let mut out = Vec::with_capacity(body.len() + 4);
    escape_into(&body, &mut out);
    out.push(MSG_END);
    out
}

fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if matches!(b, MSG_END | CMD_END | ESCAPE) {
            out.extend_from_slice(&[ESCAPE, b | 0x10]);
        } else {
            out.push(b);
        }
    }
}

/// The Set Watchdog Timer data an OS sends for `action` and `timeout_ms`; `clear_flag` clears
/// the SMS/OS expiration flag (a fresh OS does; the stop on power-off keeps it).
pub fn set_watchdog_data(action: WatchdogAction, timeout_ms: u64, clear_flag: bool) -> [u8; 6] {
    let (pre, pre_s) = if action == WatchdogAction::None {
        (0, 0)
    } else {
        (PRETIMEOUT_MESSAGING, PRETIMEOUT_S)
    };
    let count = u16::try_from(timeout_ms / 100)
        .unwrap_or(u16::MAX)
        .to_le_bytes();
    [
        USE_SMS_OS,
        pre | action.code(),
        pre_s,
        if clear_flag { FLAG_SMS_OS } else { 0 },
        count[0],
        count[1],
    ]
}

/// One frame from the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A response to a request: seq, netfn/lun, cmd, completion code, data, checksum.
    Message(Vec<u8>),
    /// A command to the host: its code, then its arguments.
    Command(Vec<u8>),
}

/// Splits the BMC's byte stream into frames, unescaping.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    escaped: bool,
    overlong: bool,
}

impl Decoder {
    /// Feeds `bytes`; returns the frames they completed. Empty frames and frames longer than
    /// 256 bytes are dropped.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                MSG_END | CMD_END => {
                    let f = std::mem::take(&mut self.buf);
                    let overlong = std::mem::take(&mut self.overlong);
                    self.escaped = false;
                    if f.is_empty() || overlong {
                        continue;
                    }
                    out.push(if b == MSG_END {
                        Frame::Message(f)
                    } else {
                        Frame::Command(f)
                    });
                }
                ESCAPE => self.escaped = true,
                _ => {
                    let b = if std::mem::take(&mut self.escaped) {
                        b & !0x10
                    } else {
                        b
                    };
                    if self.buf.len() >= MAX_FRAME {
                        self.overlong = true;
                    } else {
                        self.buf.push(b);
                    }
                }
            }
        }
        out
    }
}

/// Plays the host of `server`'s BMC system interface at `port` until `cancel`.
pub async fn run(
    server: Arc<SimServer>,
    port: u16,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    loop {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_secs(1),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            match serve(&server, stream, &cancel).await {
                Ok(()) => return Ok(()),
                // The BMC went away (bmc-down, a restart): connect again once it is back.
                Err(e) => {
                    tracing::debug!(server = %server.name, error = %e, "IPMI host connection lost")
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RECONNECT) => {}
        }
    }
}

/// One connection: returns `Ok` when cancelled, an error when the BMC closed it.
async fn serve(
    server: &SimServer,
    mut stream: TcpStream,
    cancel: &CancellationToken,
) -> std::io::Result<()> {
    stream.write_all(&[0x08, CAPABILITIES, CMD_END]).await?;
    let mut seq: u8 = 0;
    let mut decoder = Decoder::default();
    // What this BMC has been told: the timer is set and running for the OS now up.
    let mut armed_here = false;
    let mut last_pet_sent = 0;
    let mut last_reset: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    let mut buf = [0u8; 512];
    loop {
        let mut out = Vec::new();
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = stream.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                for f in decoder.feed(&buf[..n]) {
                    tracing::trace!(server = %server.name, frame = ?f, "from the IPMI BMC");
                    on_frame(server, &f);
                }
            }
            _ = tick.tick() => {
                let (armed, last_pet, action, timeout_ms) = {
                    let s = server.state();
                    let w = s.watchdog;
                    (w.armed, w.last_pet, w.action, w.timeout_ms)
                };
                let mut request = |cmd: u8, data: &[u8]| {
                    seq = seq.wrapping_add(1);
                    out.extend(encode_request(seq, NETFN_APP, cmd, data));
                };
                if armed && !armed_here {
                    request(CMD_SET_WATCHDOG, &set_watchdog_data(action, timeout_ms, true));
                    request(CMD_RESET_WATCHDOG, &[]);
                    armed_here = true;
                    last_pet_sent = last_pet;
                    last_reset = Some(Instant::now());
                } else if armed
                    && last_pet > last_pet_sent
                    && last_reset.is_none_or(|t| t.elapsed() >= PET_EVERY)
                {
                    request(CMD_RESET_WATCHDOG, &[]);
                    last_pet_sent = last_pet;
                    last_reset = Some(Instant::now());
                } else if !armed && armed_here {
                    request(CMD_SET_WATCHDOG, &set_watchdog_data(action, timeout_ms, false));
                    armed_here = false;
                }
            }
        }
        if !out.is_empty() {
            tracing::trace!(server = %server.name, bytes = ?out, "to the IPMI BMC");
            stream.write_all(&out).await?;
        }
    }
}

fn on_frame(server: &SimServer, f: &Frame) {
    match f {
        Frame::Message(m) => {
            // seq, netfn/lun, cmd, cc, ...: a refusal is worth a line (Set Watchdog's answer
            // carries junk after the completion code in ipmi_sim; only the code is read).
            if let [_, _, cmd, cc, ..] = m.as_slice()
                && *cc != 0
            {
                tracing::warn!(server = %server.name, cmd = format!("{cmd:#04x}"), cc = format!("{cc:#04x}"), "the IPMI BMC refused an in-band watchdog request");
            }
        }
        Frame::Command(c) => {
            let power = match c.first() {
                Some(0x04) => PowerAction::Restart,
                Some(0x03) => PowerAction::Off,
                // Version, attention (the pre-timeout), interrupt enables, NMI: nothing to do.
                _ => return,
            };
            tracing::info!(server = %server.name, ?power, "the IPMI BMC's watchdog expired and acts on the host");
            let now = server.clock.now();
            server.state().watchdog_expired(Some(power), now);
            server.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_as_ipmi_sim_reads_them() {
        // Reset Watchdog Timer, seq 1 (README.md): 01 18 22 C5 A0.
        assert_eq!(
            encode_request(1, NETFN_APP, CMD_RESET_WATCHDOG, &[]),
            vec![0x01, 0x18, 0x22, 0xC5, 0xA0]
        );
        // A byte equal to a delimiter is escaped: seq 0xA0.
        let e = encode_request(0xA0, NETFN_APP, CMD_RESET_WATCHDOG, &[]);
        assert_eq!(&e[..2], &[ESCAPE, 0xB0]);
        let mut d = Decoder::default();
        let frames = d.feed(&e);
        let Frame::Message(m) = &frames[0] else {
            panic!("{frames:?}")
        };
        assert_eq!(m[0], 0xA0);
        assert_eq!(m.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
    }

    #[test]
    fn set_watchdog_data_for_each_action() {
        assert_eq!(
            set_watchdog_data(WatchdogAction::HardReset, 10_000, true),
            [0x04, 0x31, 0x02, 0x10, 0x64, 0x00]
        );
        assert_eq!(
            set_watchdog_data(WatchdogAction::PowerDown, 5_000, false),
            [0x04, 0x32, 0x02, 0x00, 0x32, 0x00]
        );
        assert_eq!(
            set_watchdog_data(WatchdogAction::None, 2_000, true),
            [0x04, 0x00, 0x00, 0x10, 0x14, 0x00]
        );
        // Longer than the field holds: the longest it can.
        assert_eq!(
            set_watchdog_data(WatchdogAction::PowerCycle, 10_000_000, true)[4..],
            [0xff, 0xff]
        );
    }

    #[test]
    fn the_decoder_splits_commands_and_messages_and_drops_junk() {
        let mut d = Decoder::default();
        // What ipmi_sim sends on connect, a response split across reads, then RESET.
        let mut frames = d.feed(&[0xff, 0x01, 0xA1, 0x00, 0xA1, 0x01, 0x1C]);
        frames.extend(d.feed(&[0x22, 0x00, 0xC1, 0xA0, 0xA1, 0x04, 0xA1]));
        assert_eq!(
            frames,
            vec![
                Frame::Command(vec![0xff, 0x01]),
                Frame::Command(vec![0x00]),
                Frame::Message(vec![0x01, 0x1C, 0x22, 0x00, 0xC1]),
                Frame::Command(vec![0x04]),
            ]
        );
        // An overlong frame is dropped whole; the next one is read.
        let mut junk = vec![0x55; 1000];
        junk.extend([0xA1, 0x03, 0xA1]);
        assert_eq!(d.feed(&junk), vec![Frame::Command(vec![0x03])]);
    }
}
