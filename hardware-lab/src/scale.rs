//! Scale mode: thousands of Redfish BMCs and their nodes' heartbeat senders in one process.
//!
//! Overview: `vigil-lab scale --nodes N` is the rack an appliance meets at a large site, made as
//! cheap as it can be made so that most of the machine is left to the appliance under test. Each
//! BMC is a real HTTPS server on a loopback address of its own (`127.64.0.1`, `127.64.0.2`, ...,
//! one port for all), with Basic and SessionService authentication, a session limit per BMC
//! (its firmware profile's), and the resources vigil reads from a dmtf-generic BMC, in the shapes
//! of the DMTF mockup the full lab also serves. Each node sends authenticated UDP heartbeats at
//! the configured interval, spread over the interval. Faults (power loss, thermal trip, OS hang,
//! BMC down, slow BMC) act on every path at once, as in the full lab, with the same SEL records.
//!
//! What makes it cheap: a healthy BMC's answers are the same bytes for every BMC, serialized once
//! and shared; only a BMC under a fault renders its own. One accept task per BMC and one task for
//! all heartbeats; no process per server. What it leaves out, compared with the full lab: no
//! ipmi_sim (one process per server is not viable at this count), no power model with POST
//! stages, no operating system; one certificate for every BMC (vigil pins it by fingerprint, and
//! the handshake costs the appliance the same as with one certificate each).
//!
//! What it counts, for the scale benchmark: requests in flight per BMC (the most ever seen),
//! sessions open per BMC and in all (a leak shows after the appliance stops), refusals, and for
//! every BMC the gap between two status polls (`GET` of the System), the longest and how many
//! were late.
//!
//! Key types: [`ScaleLab`], [`ScaleOptions`], [`ScaleStats`], [`ScaleFault`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::mockup::Mockup;
use crate::rack::{random_secret as secret, write_private};

/// The first BMC address; the others follow it.
pub const FIRST_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 64, 0, 1);
/// The firmware profile every scale BMC follows.
pub const PROFILE: &str = "dmtf-generic";
/// Its mockup.
const MOCKUP: &str = "dmtf-public-rackmount1";
/// Every BMC's user.
const USERNAME: &str = "admin";
/// The largest request body a BMC reads (a session login or a reset).
const MAX_BODY: usize = 16 * 1024;

/// What goes wrong with a scale node (a subset of the full lab's faults, with the same prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleFault {
    /// AC lost: off, heartbeats stop, PSU and power-unit SEL records.
    PowerLoss,
    /// The CPU trips: off, temperature over fatal, heartbeats stop.
    ThermalTrip,
    /// The OS freezes: on, heartbeats stop, the watchdog record after its timeout.
    OsHang,
    /// The BMC is unreachable (connections reset); the OS is fine.
    BmcDown,
    /// The BMC answers every request late by `delay_ms`.
    Slow,
}

impl ScaleFault {
    fn cuts_heartbeats(self) -> bool {
        matches!(self, Self::PowerLoss | Self::ThermalTrip | Self::OsHang)
    }

    fn powers_off(self) -> bool {
        matches!(self, Self::PowerLoss | Self::ThermalTrip)
    }
}

/// How big a rack, and how it is paced.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// How many nodes (each with a BMC).
    pub nodes: usize,
    /// How often each node sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// How often vigil is told to poll each BMC (written into vigil.toml; the lab measures it).
    pub poll_interval: Duration,
    /// The watchdog timeout the nodes' OS sets (an OS hang's SEL record comes after it).
    pub watchdog_timeout: Duration,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        Self {
            nodes: 1000,
            heartbeat_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(2),
            // As in the detection benchmark of the full lab, so the figures compare (a software
            // hang is called when the watchdog's record shows, so it bounds that verdict).
            watchdog_timeout: Duration::from_secs(2),
        }
    }
}

/// Where everything of a scale rack is (written as DIR/scale.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleEndpoints {
    /// The lab's control API.
    pub control_url: String,
    /// How many nodes.
    pub nodes: usize,
    /// The first BMC's address.
    pub first_address: Ipv4Addr,
    /// The port every BMC listens on.
    pub port: u16,
    /// The appliance's API address, as vigil.toml says.
    pub api_listen: String,
    /// The appliance's heartbeat address, as vigil.toml says.
    pub heartbeat_listen: String,
    /// The vigil configuration for this rack.
    pub vigil_config: PathBuf,
    /// How long the lab took to start (everything bound and written), ms.
    pub started_in_ms: u64,
}

/// The lab's counters (since the last reset, except what is open now).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleStats {
    /// Nodes.
    pub nodes: usize,
    /// Since the last reset, ms.
    pub window_ms: u64,
    /// Requests answered.
    pub requests: u64,
    /// Status polls (GET of a System).
    pub polls: u64,
    /// Nodes polled at least twice in the window (so a gap was measured).
    pub nodes_polled: usize,
    /// The longest gap between two polls of one healthy BMC, ms.
    pub max_poll_gap_ms: u64,
    /// Which BMC it was.
    pub max_poll_gap_node: String,
    /// Gaps longer than two poll intervals (polled late by more than one interval).
    pub late_polls: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// The most requests ever in flight at one BMC at once.
    pub max_in_flight_per_bmc: u32,
    /// Sessions open now, in all.
    pub sessions_open: u64,
    /// The most sessions ever open at one BMC.
    pub max_sessions_per_bmc: u32,
    /// Sessions created.
    pub sessions_created: u64,
    /// Sessions deleted by their client.
    pub sessions_deleted: u64,
    /// Logins refused for want of a free session.
    pub sessions_refused: u64,
    /// Requests refused for bad credentials.
    pub auth_failures: u64,
    /// TLS handshakes.
    pub handshakes: u64,
}

#[derive(Debug, Default)]
struct NodeState {
    fault: Option<(ScaleFault, Instant, u64)>,
    /// Faulted since the last reset: its gaps are its fault's, not the appliance's.
    faulted: bool,
    sessions: Vec<(u32, String)>,
    next_session: u32,
    sel: Vec<Value>,
    last_poll: Option<Instant>,
}

#[derive(Debug)]
struct Node {
    name: String,
    key: String,
    incarnation: [u8; 16],
    st: Mutex<NodeState>,
    in_flight: AtomicU32,
    down: AtomicBool,
}

/// Healthy answers, serialized once.
#[derive(Debug)]
struct Bodies {
    root: Bytes,
    system_on: Value,
    chassis: Bytes,
    thermal: Value,
    power: Bytes,
    log_service: Bytes,
    entries: Value,
    system_on_bytes: Bytes,
    thermal_bytes: Bytes,
    entries_bytes: Bytes,
    system_path: String,
    chassis_path: String,
    thermal_path: String,
    power_path: String,
    log_path: String,
    entries_path: String,
    sessions_path: String,
    reset_path: String,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    polls: AtomicU64,
    heartbeats: AtomicU64,
    max_in_flight: AtomicU32,
    max_sessions: AtomicU32,
    sessions_open: AtomicU64,
    sessions_created: AtomicU64,
    sessions_deleted: AtomicU64,
    sessions_refused: AtomicU64,
    auth_failures: AtomicU64,
    handshakes: AtomicU64,
}

#[derive(Debug, Default)]
struct Gaps {
    since: Option<Instant>,
    max_ms: u64,
    max_node: usize,
    late: u64,
    polled: Vec<u32>,
}

#[derive(Debug)]
struct Shared {
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    bodies: Bodies,
    basic: String,
    password: String,
    max_sessions: usize,
    poll_interval: Duration,
    watchdog_timeout: Duration,
    counters: Counters,
    gaps: Mutex<Gaps>,
}

/// A running scale rack.
#[derive(Debug)]
pub struct ScaleLab {
    shared: Arc<Shared>,
    /// Where everything is.
    pub endpoints: ScaleEndpoints,
}

fn strip(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("@Redfish.Copyright");
        for (_, x) in o.iter_mut() {
            strip(x);
        }
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(strip);
    }
}

/// Every Status of a resource reads OK: the reference mockup's warnings are its author's, not a
/// healthy node's.
fn all_ok(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        if let Some(st) = o.get_mut("Status").and_then(Value::as_object_mut) {
            for k in ["Health", "HealthRollup"] {
                if st.contains_key(k) {
                    st.insert(k.into(), json!("OK"));
                }
            }
        }
        for (_, x) in o.iter_mut() {
            all_ok(x);
        }
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(all_ok);
    }
}

fn bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

impl Bodies {
    fn load(profile: &vigil::config::FirmwareProfile) -> anyhow::Result<Self> {
        let m = Mockup::named(MOCKUP).with_context(|| format!("mockup {MOCKUP}"))?;
        let r = &profile.redfish;
        let get = |p: &str| -> anyhow::Result<Value> {
            let mut v = m
                .get(p)
                .cloned()
                .with_context(|| format!("mockup {MOCKUP} has no {p}"))?;
            strip(&mut v);
            all_ok(&mut v);
            Ok(v)
        };
        let system_path = format!("/redfish/v1/Systems/{}", r.system_id);
        let chassis_path = format!("/redfish/v1/Chassis/{}", r.chassis_id);
        let log_path = r
            .sel
            .clone()
            .context("the dmtf-generic profile names no SEL")?;
        let mut system_on = get(&system_path)?;
        system_on["PowerState"] = json!("On");
        system_on["BootProgress"]["LastState"] = json!("OSRunning");
        let chassis = get(&chassis_path)?;
        let mut thermal = get(&format!("{chassis_path}/Thermal"))?;
        // A healthy node runs cool: every reading below its first threshold.
        if let Some(ts) = thermal["Temperatures"].as_array_mut() {
            for t in ts {
                if let (Some(r), Some(u)) = (
                    t["ReadingCelsius"].as_f64(),
                    t["UpperThresholdNonCritical"].as_f64(),
                ) && r >= u
                {
                    t["ReadingCelsius"] = json!((u - 5.0).max(0.0));
                }
            }
        }
        let power = get(&format!("{chassis_path}/Power"))?;
        let log_service = get(&log_path)?;
        let entries_path = format!("{log_path}/Entries");
        let entries = get(&entries_path)?;
        let root = get("/redfish/v1")?;
        Ok(Self {
            root: bytes(&root),
            system_on_bytes: bytes(&system_on),
            thermal_bytes: bytes(&thermal),
            entries_bytes: bytes(&entries),
            system_on,
            chassis: bytes(&chassis),
            thermal,
            power: bytes(&power),
            log_service: bytes(&log_service),
            entries,
            thermal_path: format!("{chassis_path}/Thermal"),
            power_path: format!("{chassis_path}/Power"),
            reset_path: format!("{system_path}/Actions/ComputerSystem.Reset"),
            system_path,
            chassis_path,
            log_path,
            entries_path,
            sessions_path: "/redfish/v1/SessionService/Sessions".into(),
        })
    }
}

fn sel_record(
    id: u64,
    base: &str,
    severity: &str,
    sensor_type: &str,
    sensor: &str,
    event: &str,
) -> Value {
    // The same message shape as the full lab's SEL (ipmitool's `sel elist` columns).
    json!({
        "@odata.id": format!("{base}/{id}"),
        "@odata.type": "#LogEntry.v1_15_0.LogEntry",
        "Id": id.to_string(),
        "Name": format!("Log Entry {id}"),
        "Created": crate::redfish::rfc3339(unix_now_ms() / 1000),
        "EntryType": "SEL",
        "EntryCode": "Assert",
        "Severity": severity,
        "Message": format!("{sensor_type} {sensor} | {event} | Asserted"),
        "SensorType": match sensor_type {
            "Power Supply" => "Power Supply / Converter",
            "Power Unit" => "PowerUnit",
            "Watchdog 2" => "Watchdog",
            other => other,
        },
    })
}

/// The SEL records a fault writes when it strikes.
fn fault_records(
    f: ScaleFault,
) -> &'static [(&'static str, &'static str, &'static str, &'static str)] {
    match f {
        ScaleFault::PowerLoss => &[
            (
                "Critical",
                "Power Supply",
                "PS1 Status",
                "Power Supply AC lost",
            ),
            (
                "Critical",
                "Power Supply",
                "PS2 Status",
                "Power Supply AC lost",
            ),
            (
                "Critical",
                "Power Unit",
                "Pwr Unit Status",
                "Power off/down",
            ),
        ],
        ScaleFault::ThermalTrip => &[
            (
                "Critical",
                "Temperature",
                "CPU1 Temp",
                "Upper Critical going high",
            ),
            (
                "Critical",
                "Temperature",
                "CPU1 Temp",
                "Upper Non-recoverable going high",
            ),
            ("Critical", "Processor", "CPU1 Status", "Thermal Trip"),
        ],
        ScaleFault::OsHang | ScaleFault::BmcDown | ScaleFault::Slow => &[],
    }
}

type Resp = Response<Full<Bytes>>;

fn answer(status: StatusCode, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Resp {
    answer(
        status,
        bytes(
            &json!({ "error": { "code": "Base.1.0.GeneralError", "message": message,
            "@Message.ExtendedInfo": [{ "MessageId": "Base.1.0.GeneralError", "Message": message }] } }),
        ),
    )
}

impl Shared {
    /// One request to BMC `i`.
    async fn handle(self: Arc<Self>, i: usize, req: Request<Incoming>) -> Result<Resp, Infallible> {
        let node = &self.nodes[i];
        let now_in = node.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        // Counted down however the request ends (answered, or dropped with its connection).
        struct Done<'a>(&'a AtomicU32);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _done = Done(&node.in_flight);
        self.counters
            .max_in_flight
            .fetch_max(now_in, Ordering::Relaxed);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let slow = {
            let st = node.st.lock().unwrap_or_else(|p| p.into_inner());
            match st.fault {
                Some((ScaleFault::Slow, _, d)) => Some(Duration::from_millis(d)),
                _ => None,
            }
        };
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        Ok(self.route(i, req).await)
    }

    fn authorized(&self, st: &NodeState, req: &Request<Incoming>) -> bool {
        let h = req.headers();
        if let Some(t) = h.get("X-Auth-Token").and_then(|v| v.to_str().ok()) {
            return st.sessions.iter().any(|(_, tok)| tok == t);
        }
        h.get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == self.basic)
    }

    async fn route(&self, i: usize, req: Request<Incoming>) -> Resp {
        let b = &self.bodies;
        let node = &self.nodes[i];
        let method = req.method().clone();
        let path = req.uri().path().trim_end_matches('/').to_string();
        if method == Method::GET && (path == "/redfish/v1" || path == "/redfish") {
            return answer(StatusCode::OK, b.root.clone());
        }
        if method == Method::POST && path == b.sessions_path {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
            };
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if v["UserName"] != USERNAME || v["Password"] != self.password.as_str() {
                self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                return error(StatusCode::UNAUTHORIZED, "invalid credentials");
            }
            let mut st = node.st.lock().unwrap_or_else(|p| p.into_inner());
            if st.sessions.len() >= self.max_sessions {
                self.counters
                    .sessions_refused
                    .fetch_add(1, Ordering::Relaxed);
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the maximum number of sessions is reached",
                );
            }
            st.next_session += 1;
            let id = st.next_session;
            let token = format!("{:032x}", rand::random::<u128>());
            st.sessions.push((id, token.clone()));
            self.counters
                .max_sessions
                .fetch_max(st.sessions.len() as u32, Ordering::Relaxed);
            drop(st);
            self.counters
                .sessions_created
                .fetch_add(1, Ordering::Relaxed);
            self.counters.sessions_open.fetch_add(1, Ordering::Relaxed);
            let loc = format!("{}/{id}", b.sessions_path);
            let mut r = answer(
                StatusCode::CREATED,
                bytes(
                    &json!({ "@odata.id": loc, "@odata.type": "#Session.v1_7_0.Session",
                    "Id": id.to_string(), "Name": "User Session", "UserName": USERNAME }),
                ),
            );
            if let (Ok(t), Ok(l)) = (
                hyper::header::HeaderValue::from_str(&token),
                hyper::header::HeaderValue::from_str(&loc),
            ) {
                r.headers_mut().insert("X-Auth-Token", t);
                r.headers_mut().insert(hyper::header::LOCATION, l);
            }
            return r;
        }
        let authorized = {
            let st = node.st.lock().unwrap_or_else(|p| p.into_inner());
            self.authorized(&st, &req)
        };
        if !authorized {
            self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::UNAUTHORIZED, "authentication required");
        }
        if method == Method::POST && path == b.reset_path {
            let body = Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return match v["ResetType"].as_str() {
                Some("ForceOff" | "On" | "ForceRestart" | "GracefulShutdown") => {
                    // Scale nodes are watched, not fenced: the benchmark runs vigil in observe
                    // mode. A reset is accepted and changes nothing, so a stray one is visible in
                    // the counters rather than silently simulated.
                    answer(StatusCode::NO_CONTENT, Bytes::new())
                }
                _ => error(StatusCode::BAD_REQUEST, "unsupported ResetType"),
            };
        }
        let mut st = node.st.lock().unwrap_or_else(|p| p.into_inner());
        if method == Method::DELETE
            && let Some(id) = path
                .strip_prefix(&b.sessions_path)
                .and_then(|s| s.strip_prefix('/'))
                .and_then(|s| s.parse::<u32>().ok())
        {
            let before = st.sessions.len();
            st.sessions.retain(|(x, _)| *x != id);
            if st.sessions.len() == before {
                return error(StatusCode::NOT_FOUND, "no such session");
            }
            self.counters
                .sessions_deleted
                .fetch_add(1, Ordering::Relaxed);
            self.counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
            return answer(StatusCode::NO_CONTENT, Bytes::new());
        }
        if method != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let fault = st.fault;
        if path == b.system_path {
            self.counters.polls.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if let Some(last) = st.last_poll.replace(now)
                && !st.faulted
            {
                let gap = now.duration_since(last).as_millis() as u64;
                let mut g = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
                if g.since.is_some_and(|s| last >= s) {
                    if gap > g.max_ms {
                        g.max_ms = gap;
                        g.max_node = i;
                    }
                    if gap > 2 * self.poll_interval.as_millis() as u64 {
                        g.late += 1;
                    }
                    if let Some(c) = g.polled.get_mut(i) {
                        *c = c.saturating_add(1);
                    }
                }
            }
            return match fault {
                Some((f, _, _)) if f.powers_off() => {
                    let mut v = b.system_on.clone();
                    v["PowerState"] = json!("Off");
                    v["BootProgress"]["LastState"] = json!("None");
                    v["Status"]["Health"] = json!("Critical");
                    v["Status"]["HealthRollup"] = json!("Critical");
                    answer(StatusCode::OK, bytes(&v))
                }
                _ => answer(StatusCode::OK, b.system_on_bytes.clone()),
            };
        }
        if path == b.chassis_path {
            return answer(StatusCode::OK, b.chassis.clone());
        }
        if path == b.thermal_path {
            return match fault {
                Some((ScaleFault::ThermalTrip, _, _)) => {
                    let mut v = b.thermal.clone();
                    if let Some(t) = v["Temperatures"].get_mut(0) {
                        let fatal = t["UpperThresholdFatal"].as_f64().unwrap_or(100.0);
                        t["ReadingCelsius"] = json!(fatal + 3.0);
                        t["Status"]["Health"] = json!("Critical");
                    }
                    answer(StatusCode::OK, bytes(&v))
                }
                _ => answer(StatusCode::OK, b.thermal_bytes.clone()),
            };
        }
        if path == b.power_path {
            return answer(StatusCode::OK, b.power.clone());
        }
        if path == b.log_path {
            return answer(StatusCode::OK, b.log_service.clone());
        }
        if path == b.entries_path {
            // An OS hang's watchdog record is written when the watchdog runs out.
            if let Some((ScaleFault::OsHang, since, _)) = fault
                && since.elapsed() >= self.watchdog_timeout
                && st.sel.is_empty()
            {
                let id = self.first_free_id(&st);
                st.sel.push(sel_record(
                    id,
                    &b.entries_path,
                    "Warning",
                    "Watchdog 2",
                    "IPMI Watchdog",
                    "Timer expired, status only",
                ));
            }
            if st.sel.is_empty() {
                return answer(StatusCode::OK, b.entries_bytes.clone());
            }
            let mut v = b.entries.clone();
            let mut members = v["Members"].as_array().cloned().unwrap_or_default();
            members.extend(st.sel.iter().cloned());
            v["Members@odata.count"] = json!(members.len());
            v["Members"] = Value::Array(members);
            return answer(StatusCode::OK, bytes(&v));
        }
        error(StatusCode::NOT_FOUND, "no such resource")
    }

    fn first_free_id(&self, st: &NodeState) -> u64 {
        let base = self.bodies.entries["Members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["Id"].as_str().and_then(|s| s.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        base + st.sel.len() as u64 + 1
    }
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn node_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_ADDRESS) + i as u32)
}

/// Raises this process's open-file limit as far as it may go: a listener and a connection per
/// BMC need two descriptors each.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    // Root may raise the hard limit too; anyone may raise the soft one up to the hard one.
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    let to = want.min(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, to, hard).is_ok() {
        to
    } else {
        soft
    }
}

impl ScaleLab {
    /// Starts a scale rack: binds every BMC, starts the heartbeat senders and the control API,
    /// writes DIR/vigil.toml, DIR/secrets/ and DIR/scale.json. Everything stops with `cancel`.
    pub async fn start(
        opts: &ScaleOptions,
        state_dir: &Path,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        anyhow::ensure!(
            (1..=1_000_000).contains(&opts.nodes),
            "--nodes must be between 1 and 1,000,000"
        );
        raise_fd_limit(2 * opts.nodes as u64 + 1024);
        std::fs::create_dir_all(state_dir.join("secrets"))
            .with_context(|| format!("state dir {} cannot be created", state_dir.display()))?;
        let state_dir = state_dir.canonicalize()?;
        let mut diags = vigil::config::Diagnostics::new();
        let profiles = vigil::config::ProfileSet::builtin(&mut diags);
        let profile = profiles
            .get(PROFILE)
            .with_context(|| format!("no firmware profile {PROFILE}"))?;
        let bodies = Bodies::load(profile)?;
        let ca = crate::tls::LabCa::new("scale")?;
        let cert = ca.issue("scale")?;
        let password = secret();
        let nodes: Vec<Node> = (0..opts.nodes)
            .map(|i| Node {
                name: format!("n{i:05}"),
                key: secret(),
                incarnation: rand::random(),
                st: Mutex::new(NodeState::default()),
                in_flight: AtomicU32::new(0),
                down: AtomicBool::new(false),
            })
            .collect();
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let shared = Arc::new(Shared {
            index,
            bodies,
            basic: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{password}"))
            ),
            password: password.clone(),
            max_sessions: profile.redfish.max_sessions.max(1) as usize,
            poll_interval: opts.poll_interval,
            watchdog_timeout: opts.watchdog_timeout,
            counters: Counters::default(),
            gaps: Mutex::new(Gaps {
                polled: vec![0; nodes.len()],
                ..Gaps::default()
            }),
            nodes,
        });

        // One port for every address. Best: one listener on the loopback device for all of
        // them (each connection's own address says which BMC it is for), so 10,000 BMCs cost
        // 10,000 descriptors, not 20,000 (this machine's hard limit is 20,000 and cannot be
        // raised). Binding to a device needs CAP_NET_RAW; without it, a listener per address.
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.config.clone());
        let port = match loopback_listener() {
            Ok(l) => {
                let port = l.local_addr()?.port();
                tokio::spawn(accept_loop(
                    l,
                    None,
                    shared.clone(),
                    acceptor.clone(),
                    cancel.child_token(),
                ));
                port
            }
            Err(e) => {
                tracing::info!(error = %e, "no listener on the loopback device: one listener per BMC");
                let listeners = bind_all(opts.nodes)?;
                let port = listeners
                    .first()
                    .map(|l| l.local_addr())
                    .transpose()?
                    .map_or(0, |a| a.port());
                for (i, l) in listeners.into_iter().enumerate() {
                    l.set_nonblocking(true)?;
                    let l = tokio::net::TcpListener::from_std(l)?;
                    tokio::spawn(accept_loop(
                        l,
                        Some(i),
                        shared.clone(),
                        acceptor.clone(),
                        cancel.child_token(),
                    ));
                }
                port
            }
        };

        // The appliance's ports, and the heartbeat senders.
        let heartbeat_listen = format!("127.0.0.1:{}", crate::rack::free_udp_port()?);
        let api_listen = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        );
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let target: SocketAddr = heartbeat_listen.parse()?;
        tokio::spawn(heartbeats(
            sock,
            target,
            shared.clone(),
            opts.heartbeat_interval,
            cancel.child_token(),
        ));

        // Secrets and the configuration.
        write_private(&state_dir.join("secrets/bmc"), &format!("{password}\n"))?;
        write_private(
            &state_dir.join("secrets/api-token"),
            &format!("{}\n", secret()),
        )?;
        let hb = state_dir.join("secrets/hb");
        std::fs::create_dir_all(&hb)?;
        for n in &shared.nodes {
            write_private(&hb.join(&n.name), &format!("{}\n", n.key))?;
        }
        let vigil_config = state_dir.join("vigil.toml");
        write_private(
            &vigil_config,
            &vigil_toml(
                opts,
                &state_dir,
                &api_listen,
                &heartbeat_listen,
                port,
                &cert.fingerprint,
                &shared,
            ),
        )?;

        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let control_url = format!("http://{}", control.local_addr()?);
        let app = control_router(shared.clone());
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(control, app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await;
        });
        let endpoints = ScaleEndpoints {
            control_url,
            nodes: opts.nodes,
            first_address: FIRST_ADDRESS,
            port,
            api_listen,
            heartbeat_listen,
            vigil_config,
            started_in_ms: t0.elapsed().as_millis() as u64,
        };
        let tmp = state_dir.join("scale.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)?;
        std::fs::rename(&tmp, state_dir.join("scale.json"))?;
        tracing::info!(
            nodes = opts.nodes,
            port,
            started_ms = endpoints.started_in_ms,
            "scale lab up"
        );
        Ok(Self { shared, endpoints })
    }

    /// The counters now.
    pub fn stats(&self) -> ScaleStats {
        self.shared.stats()
    }
}

fn bind_all(n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut last = None;
    for _attempt in 0..8 {
        let first = std::net::TcpListener::bind((node_address(0), 0))
            .with_context(|| format!("{} cannot be bound", node_address(0)))?;
        let port = first.local_addr()?.port();
        let mut all = Vec::with_capacity(n);
        all.push(first);
        let mut clash = false;
        for i in 1..n {
            match std::net::TcpListener::bind((node_address(i), port)) {
                Ok(l) => all.push(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    clash = true;
                    last = Some(e);
                    break;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("BMC {i} cannot listen on {}:{port}", node_address(i))
                    });
                }
            }
        }
        if !clash {
            return Ok(all);
        }
    }
    Err(anyhow::anyhow!(
        "no port is free on all of {}..{}: {last:?}",
        node_address(0),
        node_address(n - 1)
    ))
}

/// A listener on every address of the loopback device (and nothing else).
fn loopback_listener() -> std::io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind_device(Some(b"lo"))?;
    s.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    s.listen(4096)
}

/// Accepts for one BMC (`Some(i)`), or for all of them on the loopback listener (`None`: the
/// address a connection was made to names its BMC; any other address is dropped).
async fn accept_loop(
    l: tokio::net::TcpListener,
    only: Option<usize>,
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    cancel: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let i = match only {
            Some(i) => i,
            None => match tcp.local_addr() {
                Ok(SocketAddr::V4(a)) => {
                    let i = u32::from(*a.ip()).wrapping_sub(u32::from(FIRST_ADDRESS)) as usize;
                    if i >= shared.nodes.len() {
                        continue;
                    }
                    i
                }
                _ => continue,
            },
        };
        if shared.nodes[i].down.load(Ordering::Relaxed) {
            // A BMC that is down resets every connection.
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            shared.counters.handshakes.fetch_add(1, Ordering::Relaxed);
            let s2 = shared.clone();
            let svc = hyper::service::service_fn(move |req| s2.clone().handle(i, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = &mut conn => return,
                    // A BMC that goes down drops its connections too.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if shared.nodes[i].down.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn heartbeats(
    sock: tokio::net::UdpSocket,
    target: SocketAddr,
    shared: Arc<Shared>,
    interval: Duration,
    cancel: CancellationToken,
) {
    use vigil::heartbeat::wire::{Heartbeat, WatchdogReport, encode};
    // Spread the nodes over the interval in slots of 10 ms, as independent machines would be.
    const SLOT: Duration = Duration::from_millis(10);
    let slots = (interval.as_millis() / SLOT.as_millis()).max(1) as usize;
    let n = shared.nodes.len();
    let mut seq: Vec<u64> = vec![unix_now_ms(); n];
    let mut tick = tokio::time::interval(SLOT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slot = 0usize;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let from = n * slot / slots;
        let to = n * (slot + 1) / slots;
        slot = (slot + 1) % slots;
        for (node, seq) in shared.nodes[from..to].iter().zip(&mut seq[from..to]) {
            let cut = node
                .st
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fault
                .is_some_and(|(f, _, _)| f.cuts_heartbeats());
            if cut {
                continue;
            }
            *seq += 1;
            let hb = Heartbeat {
                node: node.name.clone(),
                virtual_node: false,
                incarnation: node.incarnation,
                seq: *seq,
                sent_ms: unix_now_ms(),
                epoch: 0,
                interval_ms: interval.as_millis() as u32,
                watchdog: WatchdogReport::Petted,
            };
            let pkt = encode(&hb, node.key.as_bytes());
            if sock.send_to(&pkt, target).await.is_ok() {
                shared.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Shared {
    fn stats(&self) -> ScaleStats {
        let c = &self.counters;
        let g = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
        ScaleStats {
            nodes: self.nodes.len(),
            window_ms: g.since.map_or(0, |s| s.elapsed().as_millis() as u64),
            requests: c.requests.load(Ordering::Relaxed),
            polls: c.polls.load(Ordering::Relaxed),
            nodes_polled: g.polled.iter().filter(|&&x| x > 0).count(),
            max_poll_gap_ms: g.max_ms,
            max_poll_gap_node: self
                .nodes
                .get(g.max_node)
                .map(|n| n.name.clone())
                .unwrap_or_default(),
            late_polls: g.late,
            heartbeats_sent: c.heartbeats.load(Ordering::Relaxed),
            max_in_flight_per_bmc: c.max_in_flight.load(Ordering::Relaxed),
            sessions_open: c.sessions_open.load(Ordering::Relaxed),
            max_sessions_per_bmc: c.max_sessions.load(Ordering::Relaxed),
            sessions_created: c.sessions_created.load(Ordering::Relaxed),
            sessions_deleted: c.sessions_deleted.load(Ordering::Relaxed),
            sessions_refused: c.sessions_refused.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            handshakes: c.handshakes.load(Ordering::Relaxed),
        }
    }

    /// Starts a measuring window: counters and gaps from zero (open sessions stay counted).
    fn reset(&self) {
        let c = &self.counters;
        for a in [
            &c.requests,
            &c.polls,
            &c.heartbeats,
            &c.sessions_created,
            &c.sessions_deleted,
            &c.sessions_refused,
            &c.auth_failures,
            &c.handshakes,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        c.max_in_flight.store(0, Ordering::Relaxed);
        let mut g = self.gaps.lock().unwrap_or_else(|p| p.into_inner());
        g.since = Some(Instant::now());
        g.max_ms = 0;
        g.late = 0;
        g.polled.iter_mut().for_each(|x| *x = 0);
        drop(g);
        for n in &self.nodes {
            let mut st = n.st.lock().unwrap_or_else(|p| p.into_inner());
            st.faulted = st.fault.is_some();
        }
    }

    fn inject(&self, node: &str, fault: ScaleFault, delay_ms: u64) -> Result<u64, String> {
        let &i = self
            .index
            .get(node)
            .ok_or_else(|| format!("no node {node}"))?;
        let n = &self.nodes[i];
        let mut st = n.st.lock().unwrap_or_else(|p| p.into_inner());
        if st.fault.is_some() {
            return Err(format!("{node} already has a fault: repair it first"));
        }
        st.fault = Some((fault, Instant::now(), delay_ms));
        st.faulted = true;
        for (sev, ty, sensor, event) in fault_records(fault) {
            let id = self.first_free_id(&st);
            st.sel.push(sel_record(
                id,
                &self.bodies.entries_path,
                sev,
                ty,
                sensor,
                event,
            ));
        }
        drop(st);
        if fault == ScaleFault::BmcDown {
            n.down.store(true, Ordering::Relaxed);
        }
        Ok(unix_now_ms())
    }

    fn repair(&self, node: &str) -> Result<(), String> {
        let &i = self
            .index
            .get(node)
            .ok_or_else(|| format!("no node {node}"))?;
        let n = &self.nodes[i];
        let mut st = n.st.lock().unwrap_or_else(|p| p.into_inner());
        st.fault = None;
        n.down.store(false, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct InjectQuery {
    node: String,
    fault: ScaleFault,
    #[serde(default)]
    delay_ms: u64,
}

#[derive(Debug, Deserialize)]
struct NodeQuery {
    node: String,
}

fn control_router(shared: Arc<Shared>) -> axum::Router {
    use axum::extract::{Query, State};
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/scale/stats",
            get(|State(s): State<Arc<Shared>>| async move { axum::Json(s.stats()) }),
        )
        .route(
            "/scale/reset",
            post(|State(s): State<Arc<Shared>>| async move {
                s.reset();
                axum::Json(json!({ "reset": true }))
            }),
        )
        .route(
            "/scale/inject",
            post(
                |State(s): State<Arc<Shared>>, Query(q): Query<InjectQuery>| async move {
                    match s.inject(&q.node, q.fault, q.delay_ms) {
                        Ok(at) => (StatusCode::OK, axum::Json(json!({ "injected_at_ms": at }))),
                        Err(e) => (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": e }))),
                    }
                },
            ),
        )
        .route(
            "/scale/repair",
            post(
                |State(s): State<Arc<Shared>>, Query(q): Query<NodeQuery>| async move {
                    match s.repair(&q.node) {
                        Ok(()) => (StatusCode::OK, axum::Json(json!({ "repaired": q.node }))),
                        Err(e) => (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": e }))),
                    }
                },
            ),
        )
        .with_state(shared)
}

fn vigil_toml(
    opts: &ScaleOptions,
    state_dir: &Path,
    api_listen: &str,
    heartbeat_listen: &str,
    port: u16,
    fingerprint: &str,
    shared: &Shared,
) -> String {
    let ms = |d: Duration| d.as_millis();
    let mut s = String::with_capacity(400 * opts.nodes + 1024);
    let _ = writeln!(
        s,
        "# Generated by vigil-lab scale for {} nodes. Secrets are files in secrets/ (mode 0600).\n",
        opts.nodes
    );
    let _ = writeln!(
        s,
        "[appliance]\nstate_dir = \"{}\"\napi_listen = \"{api_listen}\"\napi_token = \"file:secrets/api-token\"\nheartbeat_listen = \"{heartbeat_listen}\"\n",
        state_dir.join("appliance").display(),
    );
    // Observe: the scale rack measures watching and diagnosing; it has no failover servers.
    let _ = writeln!(
        s,
        "[policy]\nmode = \"observe\"\nheartbeat_interval = \"{}ms\"\nheartbeat_misses = 3\nwatchdog_timeout = \"{}ms\"\nbmc_poll_interval = \"{}ms\"\nbmc_request_timeout = \"2s\"\nbmc_connect_timeout = \"1s\"\n",
        ms(opts.heartbeat_interval),
        ms(opts.watchdog_timeout),
        ms(opts.poll_interval),
    );
    for (i, n) in shared.nodes.iter().enumerate() {
        let _ = writeln!(
            s,
            "[[node]]\nname = \"{}\"\nfirmware_profile = \"{PROFILE}\"\n[node.bmc]\nredfish_url = \"https://{}:{port}\"\nfingerprint_sha256 = \"{fingerprint}\"\nusername = \"{USERNAME}\"\npassword = \"file:secrets/bmc\"\n[node.heartbeat]\naddress = \"127.0.0.1\"\nkey = \"file:secrets/hb/{}\"\n",
            n.name,
            node_address(i),
            n.name
        );
    }
    s
}
