//! One RMCP+ session to one BMC, over UDP: set-up (Open Session, RAKP 1-4, Set Session
//! Privilege Level), requests with retransmits, keep-alive and Close Session.
//!
//! Politeness, as for Redfish: one request in flight per BMC (the state lock is held for the
//! whole exchange), one session per BMC (opened lazily, reused, closed on shutdown), and a
//! retransmit *budget* per BMC: a BMC that stopped answering costs one timeout per request, not
//! three, once it has used its budget, so a dead BMC cannot slow a rack's polling down.
//!
//! Why retransmit at all: IPMI is UDP; a lost datagram on a busy management network is normal,
//! and a fence must not fail for one. Retransmits carry a new session sequence number and the
//! same request sequence number, so a late answer to an earlier copy is still recognised.
//! Chassis Control may thus run twice on the BMC (ipmi_sim does not de-duplicate); power off and
//! on are idempotent, which is why vigil never retransmits anything else that acts.

use std::sync::{Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

use super::wire::{self, Keys, Rakp, Suite, WireError, payload};
use crate::bmc::BmcError;
use crate::config::Secret;

/// Retransmits after the first send, while the budget lasts.
pub const RETRANSMITS: u32 = 2;
/// The most retransmits a BMC may bank; one comes back every [`BUDGET_REFILL`].
pub const BUDGET: u32 = 12;
/// How fast the retransmit budget refills.
pub const BUDGET_REFILL: Duration = Duration::from_secs(5);
/// A session idle this long gets a keep-alive (Get Device ID); BMCs drop idle sessions after
/// 60 s by default (IPMI v2.0 §22.19).
pub const KEEPALIVE: Duration = Duration::from_secs(20);
/// Largest datagram read; IPMI packets are a few hundred bytes at most.
const MAX_DATAGRAM: usize = 1024;

/// An established session.
#[derive(Debug)]
struct Session {
    sock: UdpSocket,
    keys: Keys,
    bmc_sid: u32,
    console_sid: u32,
    seq: u32,
    last_ok: Instant,
}

#[derive(Debug, Default)]
struct State {
    session: Option<Session>,
    rq_seq: u8,
    /// Sessions opened since start (the lab counts them too: a leak shows as a difference).
    opened: u64,
}

#[derive(Debug)]
struct Budget {
    tokens: u32,
    refilled: Instant,
}

/// Counters, for probes and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Retransmits sent.
    pub retransmits: u64,
    /// Datagrams dropped: undecodable, failing integrity, or for another request.
    pub dropped: u64,
}

/// The link to one BMC. At most one session, one request in flight.
#[derive(Debug)]
pub struct Link {
    endpoint: String,
    addr: String,
    user: String,
    password: Secret,
    suite: Suite,
    attempt_timeout: Duration,
    state: Mutex<State>,
    budget: StdMutex<Budget>,
    stats: StdMutex<LinkStats>,
    keepalive_started: std::sync::atomic::AtomicBool,
    me: Weak<Link>,
}

/// A completed exchange: the completion code and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Completion code (0 = success).
    pub cc: u8,
    /// Response data after the completion code.
    pub data: Vec<u8>,
}

impl Link {
    /// A link; nothing is sent until the first request. `request_timeout` bounds one whole
    /// request including its retransmits.
    pub fn new(
        host: &str,
        port: u16,
        user: &str,
        password: Secret,
        suite: Suite,
        request_timeout: Duration,
    ) -> std::sync::Arc<Self> {
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        std::sync::Arc::new_cyclic(|me| Link {
            endpoint: format!("ipmi://{addr}"),
            addr,
            user: user.to_string(),
            password,
            suite,
            attempt_timeout: (request_timeout / (RETRANSMITS + 1)).max(Duration::from_millis(50)),
            state: Mutex::new(State::default()),
            budget: StdMutex::new(Budget {
                tokens: BUDGET,
                refilled: Instant::now(),
            }),
            stats: StdMutex::new(LinkStats::default()),
            keepalive_started: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// `ipmi://host:port`, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_retransmit(&self) -> bool {
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let earned = (b.refilled.elapsed().as_millis() / BUDGET_REFILL.as_millis()) as u32;
        if earned > 0 {
            b.tokens = (b.tokens + earned).min(BUDGET);
            b.refilled = Instant::now();
        }
        if b.tokens == 0 {
            return false;
        }
        b.tokens -= 1;
        true
    }

    fn timeout(&self, what: &str) -> BmcError {
        BmcError::Timeout {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            timeout_ms: (self.attempt_timeout * (RETRANSMITS + 1)).as_millis() as u64,
        }
    }

    fn malformed(&self, what: &str, reason: impl std::fmt::Display) -> BmcError {
        BmcError::Malformed {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    fn drop_datagram(&self) {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += 1;
    }

    /// Sends `pkt` (built afresh per attempt by `build`) and waits for a datagram `accept`
    /// takes, retransmitting within the budget.
    async fn round_trip<T>(
        &self,
        sock: &UdpSocket,
        what: &str,
        mut build: impl FnMut() -> Vec<u8>,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<T, BmcError> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for attempt in 0..=RETRANSMITS {
            if attempt > 0 {
                if !self.take_retransmit() {
                    break;
                }
                self.stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retransmits += 1;
                tracing::debug!(bmc = %self.endpoint, what, attempt, "IPMI retransmit");
            }
            let pkt = build();
            sock.send(&pkt).await.map_err(|e| BmcError::Connect {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            })?;
            let deadline = tokio::time::Instant::now() + self.attempt_timeout;
            loop {
                match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    // A refused port (ICMP unreachable) shows as an error on a connected socket.
                    Ok(Err(e)) => {
                        return Err(BmcError::Connect {
                            endpoint: self.endpoint.clone(),
                            reason: e.to_string(),
                        });
                    }
                    Ok(Ok(n)) => match accept(&buf[..n]) {
                        Some(t) => return Ok(t),
                        None => self.drop_datagram(),
                    },
                }
            }
        }
        Err(self.timeout(what))
    }

    async fn open(&self) -> Result<Session, BmcError> {
        let bind = if self.addr.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let connect_err = |e: std::io::Error| BmcError::Connect {
            endpoint: self.endpoint.clone(),
            reason: e.to_string(),
        };
        let sock = UdpSocket::bind(bind).await.map_err(connect_err)?;
        sock.connect(&self.addr).await.map_err(connect_err)?;
        let (console_sid, tag, console_rand) = {
            let mut r = rand::rng();
            (
                r.random_range(1..u32::MAX),
                r.random::<u8>() & 0x3f,
                r.random::<[u8; 16]>(),
            )
        };
        let suite = self.suite;

        // Open Session: the BMC assigns its session id and confirms the algorithms.
        let req = wire::open_session_request(tag, 0x04, console_sid, suite);
        // Named with the suite: a BMC that lacks it often stays silent (ipmi_sim does).
        let what = format!("open session (cipher suite {})", suite.id());
        let open = self
            .round_trip(
                &sock,
                &what,
                || wire::encode(payload::OPEN_REQUEST, 0, 0, &req, None, [0; 16]),
                |d| {
                    let p = wire::decode(d, None).ok()?;
                    (p.payload_type == payload::OPEN_RESPONSE).then_some(())?;
                    let r = wire::parse_open_response(&p.payload).ok()?;
                    (r.tag == tag).then_some(r)
                },
            )
            .await?;
        if open.status != 0 {
            return Err(self.setup_status("open session", open.status));
        }
        if !wire::algorithms_match(suite, open.algorithms) {
            return Err(BmcError::Unsupported {
                endpoint: self.endpoint.clone(),
                what: format!(
                    "cipher suite {} (the BMC chose algorithms {:?})",
                    suite.id(),
                    open.algorithms
                ),
            });
        }

        // RAKP 1/2: the BMC proves it knows the password.
        let role = 0x14; // admin, name-only lookup (as ipmitool)
        let user = self.user.as_bytes().to_vec();
        let m1 = wire::rakp1(tag, open.bmc_sid, &console_rand, role, &user);
        let r2 = self
            .round_trip(
                &sock,
                "RAKP 1",
                || wire::encode(payload::RAKP1, 0, 0, &m1, None, [0; 16]),
                |d| {
                    let p = wire::decode(d, None).ok()?;
                    (p.payload_type == payload::RAKP2).then_some(())?;
                    let r = wire::parse_rakp2(&p.payload, suite).ok()?;
                    (r.tag == tag).then_some(r)
                },
            )
            .await?;
        if r2.status != 0 {
            return Err(self.setup_status("RAKP 2", r2.status));
        }
        let rakp = Rakp {
            suite,
            console_sid,
            bmc_sid: open.bmc_sid,
            console_rand,
            bmc_rand: r2.bmc_rand,
            bmc_guid: r2.bmc_guid,
            role,
            user,
        };
        let kuid = wire::user_key(self.password.expose());
        if r2.code != rakp.rakp2_code(&kuid) {
            // Either the password is wrong or something answered that does not know it.
            return Err(BmcError::Auth {
                endpoint: self.endpoint.clone(),
            });
        }

        // RAKP 3/4: we prove it; both derive the session keys.
        let m3 = wire::rakp3(tag, open.bmc_sid, &rakp.rakp3_code(&kuid));
        let (t4, s4, _, icv) = self
            .round_trip(
                &sock,
                "RAKP 3",
                || wire::encode(payload::RAKP3, 0, 0, &m3, None, [0; 16]),
                |d| {
                    let p = wire::decode(d, None).ok()?;
                    (p.payload_type == payload::RAKP4).then_some(())?;
                    let r = wire::parse_rakp4(&p.payload, suite).ok()?;
                    (r.0 == tag).then_some(r)
                },
            )
            .await?;
        let _ = t4;
        if s4 != 0 {
            return Err(self.setup_status("RAKP 4", s4));
        }
        let sik = rakp.sik(&kuid);
        if icv != rakp.rakp4_icv(&sik) {
            return Err(self.malformed("RAKP 4", WireError::Integrity));
        }
        let mut s = Session {
            sock,
            keys: Keys::derive(suite, &sik),
            bmc_sid: open.bmc_sid,
            console_sid,
            seq: 0,
            last_ok: Instant::now(),
        };
        // Sessions start at the lowest privilege whatever was negotiated: Chassis Control needs
        // operator or admin, so raise it now (ipmi-rs never does; its power-off fails 0xD4).
        let mut rq = 1;
        let a = self
            .send_in(
                &mut s,
                &mut rq,
                0x06,
                0x3b,
                &[0x04],
                "set session privilege",
            )
            .await?;
        if a.cc != 0 {
            return Err(if matches!(a.cc, 0x80 | 0x81 | 0xd4) {
                BmcError::Auth {
                    endpoint: self.endpoint.clone(),
                }
            } else {
                self.completion("set session privilege", a.cc)
            });
        }
        Ok(s)
    }

    fn setup_status(&self, what: &str, status: u8) -> BmcError {
        match status {
            0x01 | 0x0b => BmcError::SessionLimit {
                endpoint: self.endpoint.clone(),
            },
            0x0d | 0x0f | 0x09 | 0x0a | 0x12 => BmcError::Auth {
                endpoint: self.endpoint.clone(),
            },
            0x04..=0x07 | 0x10 | 0x11 => BmcError::Unsupported {
                endpoint: self.endpoint.clone(),
                what: format!(
                    "cipher suite {}: {}",
                    self.suite.id(),
                    wire::status_text(status)
                ),
            },
            _ => self.malformed(
                what,
                format!("RMCP+ status {status:#04x}: {}", wire::status_text(status)),
            ),
        }
    }

    /// The error for a completion code.
    pub fn completion(&self, what: &str, cc: u8) -> BmcError {
        BmcError::Ipmi {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            cc,
        }
    }

    async fn send_in(
        &self,
        s: &mut Session,
        rq: &mut u8,
        netfn: u8,
        cmd: u8,
        data: &[u8],
        what: &str,
    ) -> Result<Answer, BmcError> {
        let rq_seq = *rq;
        *rq = (*rq % 63) + 1;
        let msg = wire::encode_request(netfn, cmd, rq_seq, data);
        let keys = s.keys.clone();
        let (bmc_sid, console_sid) = (s.bmc_sid, s.console_sid);
        let seq = std::sync::atomic::AtomicU32::new(s.seq);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let ans = self
            .round_trip(
                &s.sock,
                what,
                || {
                    // A fresh sequence number per copy: a BMC's replay window would reject
                    // an identical one.
                    seq.store(seq.load(relaxed).wrapping_add(1).max(1), relaxed);
                    let iv = rand::rng().random::<[u8; 16]>();
                    wire::encode(
                        payload::IPMI,
                        bmc_sid,
                        seq.load(relaxed),
                        &msg,
                        Some(&keys),
                        iv,
                    )
                },
                |d| {
                    let p = wire::decode(d, Some(&keys)).ok()?;
                    (p.payload_type == payload::IPMI && p.session_id == console_sid)
                        .then_some(())?;
                    let r = wire::decode_reply(&p.payload).ok()?;
                    (r.rq_seq == rq_seq && r.cmd == cmd && r.netfn == netfn + 1).then_some(Answer {
                        cc: r.cc,
                        data: r.data,
                    })
                },
            )
            .await;
        s.seq = seq.load(relaxed);
        if ans.is_ok() {
            s.last_ok = Instant::now();
        }
        ans
    }

    /// Sends one request and returns its answer (any completion code). Opens the session when
    /// there is none; a request that gets no answer drops the session (the BMC may have
    /// rebooted and forgotten it), so the next one starts afresh.
    pub async fn request(
        &self,
        netfn: u8,
        cmd: u8,
        data: &[u8],
        what: &str,
    ) -> Result<Answer, BmcError> {
        let mut st = self.state.lock().await;
        if st.session.is_none() {
            let s = self.open().await?;
            st.opened += 1;
            st.rq_seq = 2;
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sessions_opened += 1;
            tracing::debug!(bmc = %self.endpoint, suite = self.suite.id(), "IPMI session opened");
            st.session = Some(s);
            self.start_keepalive();
        }
        let State {
            session, rq_seq, ..
        } = &mut *st;
        let s = session.as_mut().expect("opened above");
        let r = self.send_in(s, rq_seq, netfn, cmd, data, what).await;
        if matches!(r, Err(BmcError::Timeout { .. })) {
            tracing::debug!(bmc = %self.endpoint, what, "no answer: the session is dropped");
            *session = None;
        }
        r
    }

    /// Sends `Close Session` (best effort, one attempt) and forgets the session. Idempotent.
    pub async fn close(&self) {
        let mut st = self.state.lock().await;
        let State {
            session, rq_seq, ..
        } = &mut *st;
        if let Some(mut s) = session.take() {
            let sid = s.bmc_sid.to_le_bytes();
            let rq = *rq_seq;
            *rq_seq = (rq % 63) + 1;
            let msg = wire::encode_request(0x06, 0x3c, rq, &sid);
            s.seq = s.seq.wrapping_add(1).max(1);
            let iv = rand::rng().random::<[u8; 16]>();
            let pkt = wire::encode(payload::IPMI, s.bmc_sid, s.seq, &msg, Some(&s.keys), iv);
            if s.sock.send(&pkt).await.is_ok() {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                let _ = tokio::time::timeout(self.attempt_timeout, s.sock.recv(&mut buf)).await;
            }
            tracing::debug!(bmc = %self.endpoint, "IPMI session closed");
        }
    }

    /// Whether a session is open now.
    pub async fn has_session(&self) -> bool {
        self.state.lock().await.session.is_some()
    }

    /// Keeps an idle session alive with Get Device ID every [`KEEPALIVE`]; ends with the link.
    fn start_keepalive(&self) {
        use std::sync::atomic::Ordering;
        if self.keepalive_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEPALIVE / 2).await;
                let Some(link) = me.upgrade() else { return };
                let idle = {
                    let st = link.state.lock().await;
                    st.session.as_ref().map(|s| s.last_ok.elapsed())
                };
                if idle.is_some_and(|i| i >= KEEPALIVE) {
                    let _ = link.request(0x06, 0x01, &[], "keep-alive").await;
                }
            }
        });
    }
}
