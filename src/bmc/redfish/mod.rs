//! The Redfish driver.
//!
//! Overview: [`RedfishBmc`] talks to one BMC over HTTPS with the trust configured for it
//! (`tls.rs`). It is polite: one request in flight at a time (a mutex around every exchange,
//! session setup included), a connect and a request timeout, a cap on every body, one session
//! (X-Auth-Token) reused across polls, renewed on a 401 and deleted on [`Bmc::close`]; HTTP Basic
//! where the firmware profile says so, or where the BMC has no SessionService. The fast status is
//! one GET of the System; the full status adds the legacy Thermal and Power resources (or the
//! Sensors collection where the firmware has only the new model) and the new SEL records.
//! Firmware quirks come from the profile: an already-off error on ForceOff is read back and
//! counted as done; a 409 on On after Off and a 400 during POST are "busy, retry".
//!
//! Scope: the HTTP exchange and the walk over resources. Parsing is `parse.rs` (pure).
//!
//! Key types: [`RedfishBmc`].

pub mod http;
pub mod inventory;
pub mod parse;
pub mod tls;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{ActionOutcome, Bmc, BmcError, BoxFuture, Depth, PowerAction};
use crate::config::profile::AuthMode;
use crate::config::{FirmwareProfile, Quirk, RedfishEndpoint, Secret};
use crate::model::{
    BmcSnapshot, HardwareProfile, LogEntry, PowerReading, Protocol, PsuReading, SensorReading,
};

/// The largest body vigil reads from a BMC. The biggest resources in the real captures are a
/// few hundred KiB (a Sensors collection, a long SEL); 4 MiB leaves room and stops a BMC that
/// streams garbage from filling the appliance's memory.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Members of a Sensors collection read one by one at most (firmware that does not expand).
const MAX_SENSOR_READS: usize = 32;
/// How long to use Basic after the BMC's session table was found full.
const SESSION_RETRY: Duration = Duration::from_secs(60);
/// SEL entry ids remembered to tell new records from old (firmware with non-numeric ids).
const MAX_REMEMBERED_LOG_IDS: usize = 4096;

/// Timeouts of one BMC.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// A whole request, body included.
    pub request: Duration,
}

#[derive(Debug, Default)]
struct Session {
    token: Option<String>,
    location: Option<String>,
    /// The BMC has no usable SessionService: Basic on every request.
    basic_only: bool,
    /// The BMC's session table was full: Basic until then, then a session is tried again.
    /// (Sessions leak when an appliance is killed without logging out; the BMC frees them only
    /// after its own idle timeout, often half an hour. Redfish services accept Basic too.)
    basic_until: Option<std::time::Instant>,
}

#[derive(Debug, Default)]
struct LogCursor {
    /// Whether the log has been read once (records before that are history, not news).
    primed: bool,
    max_numeric: Option<u64>,
    seen: BTreeSet<String>,
}

/// Session logins (and the connections they open) in flight at once, appliance-wide.
const LOGINS_AT_ONCE: usize = 32;
static LOGINS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LOGINS_AT_ONCE);

/// A Redfish BMC.
#[derive(Debug)]
pub struct RedfishBmc {
    endpoint: String,
    http: http::Client,
    username: String,
    password: Secret,
    profile: FirmwareProfile,
    timeouts: Timeouts,
    /// Held for every exchange: at most one request in flight to this BMC.
    session: Mutex<Session>,
    log: StdMutex<LogCursor>,
    /// Sensor URIs worth reading on firmware with only a Sensors collection (found once).
    sensor_uris: StdMutex<Option<Vec<String>>>,
    /// The chassis resource (its links to the sensors) and the SEL's entries URI, read once:
    /// a full poll then costs the readings alone. Forgotten when a read through them fails, so
    /// a BMC whose layout changed (a firmware update) is walked again.
    nav: StdMutex<Nav>,
}

#[derive(Debug, Default)]
struct Nav {
    chassis: Option<Arc<Value>>,
    entries: Option<String>,
}

/// Walks an error's sources into one line: rustls and the OS give the reason (an untrusted
/// certificate, a refused connection) a level or two down.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

impl RedfishBmc {
    /// A driver for `endpoint` with `profile`'s layout and quirks.
    pub fn new(
        name: &str,
        endpoint: &RedfishEndpoint,
        username: &str,
        password: Secret,
        profile: FirmwareProfile,
        timeouts: Timeouts,
    ) -> Result<Self, BmcError> {
        let tls = tls::client_config(&endpoint.trust).map_err(|e| BmcError::Tls {
            endpoint: format!("{name} {}", endpoint.url),
            reason: chain(&e),
        })?;
        let http = http::Client::new(&endpoint.url, tls, timeouts.connect, timeouts.request)
            .map_err(|e| BmcError::Connect {
                endpoint: format!("{name} {}", endpoint.url),
                reason: e.to_string(),
            })?;
        Ok(Self {
            endpoint: format!("{name} {}", endpoint.url),
            http,
            username: username.to_string(),
            password,
            session: Mutex::new(Session {
                basic_only: profile.redfish.auth == AuthMode::Basic,
                ..Session::default()
            }),
            profile,
            timeouts,
            log: StdMutex::new(LogCursor::default()),
            sensor_uris: StdMutex::new(None),
            nav: StdMutex::new(Nav::default()),
        })
    }

    fn map_err(&self, what: &str, e: http::HttpError) -> BmcError {
        use http::HttpError as H;
        let endpoint = self.endpoint.clone();
        match e {
            H::Timeout => BmcError::Timeout {
                endpoint,
                what: what.to_string(),
                timeout_ms: self.timeouts.request.as_millis() as u64,
            },
            H::Tls(reason) => BmcError::Tls { endpoint, reason },
            H::TooLarge(limit) => BmcError::TooLarge {
                endpoint,
                what: what.to_string(),
                limit,
            },
            H::Protocol(reason) => BmcError::Malformed {
                endpoint,
                what: what.to_string(),
                reason,
            },
            e @ (H::Url { .. } | H::Connect(_) | H::Io(_)) => BmcError::Connect {
                endpoint,
                reason: e.to_string(),
            },
        }
    }

    fn redfish_message(body: &[u8]) -> String {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let m = v["error"]["@Message.ExtendedInfo"][0]["Message"]
            .as_str()
            .or(v["error"]["message"].as_str())
            .unwrap_or("");
        m.chars().take(200).collect()
    }

    /// Opens a session (the session lock is held by the caller).
    async fn login(&self, s: &mut Session) -> Result<(), BmcError> {
        let what = "session login";
        // A login is a new connection too (the TLS handshake): at most LOGINS_AT_ONCE of them
        // in the whole appliance, so a big rack's start (10,000 at once) queues here instead of
        // timing out on an overloaded appliance and leaving sessions open on the BMCs. The
        // wait is not a request: its timeout starts when the permit is taken.
        let _permit = LOGINS.acquire().await;
        let credentials = serde_json::to_vec(
            &json!({ "UserName": self.username, "Password": self.password.expose() }),
        )
        .unwrap_or_default();
        let resp = self
            .http
            .send(
                "POST",
                "/redfish/v1/SessionService/Sessions",
                &[],
                Some(&credentials),
                MAX_BODY_BYTES,
            )
            .await
            .map_err(|e| self.map_err(what, e))?;
        let token = resp.header("X-Auth-Token").map(String::from);
        let location = resp.header("Location").map(String::from);
        let (status, body) = (resp.status, resp.body);
        match status {
            200..=299 => {
                let Some(token) = token else {
                    return Err(BmcError::Malformed {
                        endpoint: self.endpoint.clone(),
                        what: what.into(),
                        reason: "no X-Auth-Token in the answer".into(),
                    });
                };
                let location = location.or_else(|| {
                    serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["@odata.id"].as_str().map(String::from))
                });
                s.token = Some(token);
                s.location = location;
                Ok(())
            }
            401 | 403 => Err(BmcError::Auth {
                endpoint: self.endpoint.clone(),
            }),
            503 => Err(BmcError::SessionLimit {
                endpoint: self.endpoint.clone(),
            }),
            404 | 405 | 501 => {
                // No SessionService: Basic it is, from now on.
                s.basic_only = true;
                Ok(())
            }
            other => Err(BmcError::Http {
                endpoint: self.endpoint.clone(),
                what: what.into(),
                status: other,
                message: Self::redfish_message(&body),
            }),
        }
    }

    /// One exchange: authenticated, timed, capped; a 401 on a session renews it once.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), BmcError> {
        let what = format!("{method} {path}");
        let mut s = self.session.lock().await;
        for attempt in 0..2 {
            let fallback = s.basic_until.is_some_and(|t| std::time::Instant::now() < t);
            if !s.basic_only && !fallback && s.token.is_none() {
                match self.login(&mut s).await {
                    Ok(()) => s.basic_until = None,
                    Err(BmcError::SessionLimit { .. }) => {
                        tracing::warn!(bmc = %self.endpoint, "the BMC has no free session: using Basic authentication for a minute");
                        s.basic_until = Some(std::time::Instant::now() + SESSION_RETRY);
                    }
                    Err(e) => return Err(e),
                }
            }
            let basic = s.basic_only || s.token.is_none();
            let auth = match (&s.token, basic) {
                (Some(t), false) => ("X-Auth-Token", t.clone()),
                _ => (
                    "Authorization",
                    http::basic_auth(&self.username, self.password.expose()),
                ),
            };
            let json = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
            let resp = self
                .http
                .send(
                    method,
                    path,
                    &[(auth.0, &auth.1)],
                    json.as_deref(),
                    MAX_BODY_BYTES,
                )
                .await
                .map_err(|e| self.map_err(&what, e))?;
            let status = resp.status;
            if status == 401 && !basic && attempt == 0 {
                // The session expired or the BMC rebooted: log in again, once.
                s.token = None;
                s.location = None;
                continue;
            }
            let bytes = resp.body;
            if status == 401 {
                return Err(BmcError::Auth {
                    endpoint: self.endpoint.clone(),
                });
            }
            return Ok((status, bytes));
        }
        Err(BmcError::Auth {
            endpoint: self.endpoint.clone(),
        })
    }

    /// GET a resource as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, BmcError> {
        self.get_only(path, None).await
    }

    /// GET a resource, keeping only the properties at `pointers` (all of it when `None`); see
    /// [`parse::project`].
    async fn get_only(&self, path: &str, pointers: Option<&[&str]>) -> Result<Value, BmcError> {
        let (status, body) = self.exchange("GET", path, None).await?;
        let what = format!("GET {path}");
        if !(200..300).contains(&status) {
            return Err(BmcError::Http {
                endpoint: self.endpoint.clone(),
                what,
                status,
                message: Self::redfish_message(&body),
            });
        }
        match pointers {
            Some(p) => parse::project(&body, p),
            None => serde_json::from_slice(&body),
        }
        .map_err(|e| BmcError::Malformed {
            endpoint: self.endpoint.clone(),
            what,
            reason: e.to_string(),
        })
    }

    pub(crate) fn system_path(&self) -> String {
        format!("/redfish/v1/Systems/{}", self.profile.redfish.system_id)
    }

    fn chassis_path(&self) -> String {
        format!("/redfish/v1/Chassis/{}", self.profile.redfish.chassis_id)
    }

    async fn read_sensors(
        &self,
        chassis: &Value,
    ) -> Result<(Vec<SensorReading>, Vec<PsuReading>), BmcError> {
        let r = &self.profile.redfish;
        let mut sensors = Vec::new();
        let mut psus = Vec::new();
        if let Some(t) =
            parse::link(chassis, "Thermal").filter(|_| r.thermal.iter().any(|x| x == "Thermal"))
        {
            sensors.extend(parse::legacy_thermal(&self.get(t).await?));
        }
        if let Some(p) =
            parse::link(chassis, "Power").filter(|_| r.power.iter().any(|x| x == "Power"))
        {
            let (volts, ps, _redundancy) = parse::legacy_power(&self.get(p).await?);
            sensors.extend(volts);
            psus.extend(ps);
        }
        if sensors.is_empty() && r.sensors {
            sensors.extend(self.read_sensor_collection(chassis).await?);
        }
        if psus.is_empty()
            && let Some(ps) = parse::link(chassis, "PowerSubsystem")
        {
            let sub = self.get(ps).await?;
            if let Some(c) = parse::link(&sub, "PowerSupplies") {
                let coll = self.get(c).await?;
                for m in parse::members(&coll).iter().take(8) {
                    psus.push(parse::psu(&self.get(m).await?));
                }
            }
        }
        Ok((sensors, psus))
    }

    async fn read_sensor_collection(
        &self,
        chassis: &Value,
    ) -> Result<Vec<SensorReading>, BmcError> {
        let known = self
            .sensor_uris
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let uris = match known {
            Some(u) => u,
            None => {
                let Some(link) = parse::link(chassis, "Sensors") else {
                    return Ok(Vec::new());
                };
                let coll = self.get(link).await?;
                let mut keep = Vec::new();
                for m in parse::members(&coll).iter().take(MAX_SENSOR_READS * 4) {
                    if keep.len() >= MAX_SENSOR_READS {
                        break;
                    }
                    if let Ok(v) = self.get(m).await
                        && parse::sensor(&v).is_some()
                    {
                        keep.push(m.clone());
                    }
                }
                *self.sensor_uris.lock().unwrap_or_else(|p| p.into_inner()) = Some(keep.clone());
                keep
            }
        };
        let mut out = Vec::new();
        for u in uris {
            if let Some(s) = parse::sensor(&self.get(&u).await?) {
                out.push(s);
            }
        }
        Ok(out)
    }

    async fn read_new_log(&self) -> Result<Vec<LogEntry>, BmcError> {
        let Some(svc) = &self.profile.redfish.sel else {
            return Ok(Vec::new());
        };
        let known = self.nav().entries.clone();
        let entries_uri = match known {
            Some(u) => u,
            None => {
                let svc_v = self.get(svc).await?;
                parse::link(&svc_v, "Entries")
                    .map(String::from)
                    .unwrap_or_else(|| format!("{}/Entries", svc.trim_end_matches('/')))
            }
        };
        let coll = match self.get(&entries_uri).await {
            Ok(c) => {
                self.nav().entries = Some(entries_uri);
                c
            }
            Err(e) => {
                self.nav().entries = None;
                return Err(e);
            }
        };
        let entries = parse::log_entries(&coll);
        let mut cur = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = Vec::new();
        for e in entries {
            let is_new = match e.id.parse::<u64>() {
                Ok(n) => cur.max_numeric.is_none_or(|m| n > m),
                Err(_) => !cur.seen.contains(&e.id),
            };
            if let Ok(n) = e.id.parse::<u64>() {
                cur.max_numeric = Some(cur.max_numeric.map_or(n, |m| m.max(n)));
            } else if cur.seen.len() < MAX_REMEMBERED_LOG_IDS {
                cur.seen.insert(e.id.clone());
            }
            if is_new && cur.primed {
                fresh.push(e);
            }
        }
        cur.primed = true;
        Ok(fresh)
    }

    fn nav(&self) -> std::sync::MutexGuard<'_, Nav> {
        self.nav.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn status_inner(&self, depth: Depth) -> Result<BmcSnapshot, BmcError> {
        let r = &self.profile.redfish;
        let pointers =
            parse::system_pointers(&r.power_state, r.boot_progress.as_deref(), &r.health);
        let system = self.get_only(&self.system_path(), Some(&pointers)).await?;
        let (power, boot, health) = parse::system_status(
            &system,
            &r.power_state,
            r.boot_progress.as_deref(),
            &r.health,
        );
        let mut snap = BmcSnapshot {
            protocol: Protocol::Redfish,
            power,
            boot,
            health,
            sensors: Vec::new(),
            psus: Vec::new(),
            new_log: Vec::new(),
            watchdog: None,
            full: depth == Depth::Full,
            gaps: Vec::new(),
        };
        if depth == Depth::Full {
            let known = self.nav().chassis.clone();
            let chassis = match known {
                Some(c) => Ok(c),
                None => self.get(&self.chassis_path()).await.map(Arc::new),
            };
            match chassis {
                Ok(chassis) => match self.read_sensors(&chassis).await {
                    Ok((sensors, psus)) => {
                        snap.sensors = sensors;
                        snap.psus = psus;
                        self.nav().chassis = Some(chassis);
                    }
                    Err(e) => {
                        self.nav().chassis = None;
                        snap.gaps.push(format!("sensors: {e}"));
                    }
                },
                Err(e) => snap.gaps.push(format!("chassis: {e}")),
            }
            match self.read_new_log().await {
                Ok(l) => snap.new_log = l,
                Err(e) => snap.gaps.push(format!("SEL: {e}")),
            }
        }
        Ok(snap)
    }

    fn reset_type(&self, action: PowerAction) -> Result<&str, BmcError> {
        let r = &self.profile.redfish;
        match action {
            PowerAction::Off => Ok(&r.power_off),
            PowerAction::On => Ok(&r.power_on),
            PowerAction::Cycle => r
                .power_cycle
                .as_deref()
                .ok_or_else(|| BmcError::Unsupported {
                    endpoint: self.endpoint.clone(),
                    what: "power cycle".into(),
                }),
        }
    }

    async fn power_inner(&self, action: PowerAction) -> Result<ActionOutcome, BmcError> {
        let rt = self.reset_type(action)?.to_string();
        let system = self.get(&self.system_path()).await?;
        // Idempotence: a host already in the asked state is not sent the action at all.
        let r = &self.profile.redfish;
        let (now, _, _) = parse::system_status(&system, &r.power_state, None, &r.health);
        match (action, now) {
            (PowerAction::Off, PowerReading::Off) | (PowerAction::On, PowerReading::On) => {
                return Ok(ActionOutcome::AlreadyDone);
            }
            _ => {}
        }
        let target = system["Actions"]["#ComputerSystem.Reset"]["target"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("{}/Actions/ComputerSystem.Reset", self.system_path()));
        let (status, body) = self
            .exchange("POST", &target, Some(&json!({ "ResetType": rt })))
            .await?;
        if (200..300).contains(&status) {
            return Ok(ActionOutcome::Accepted);
        }
        let code = status;
        let what = format!("ComputerSystem.Reset {rt}");
        // An error to a power action may mean "already so": read back before believing it.
        if action == PowerAction::Off || action == PowerAction::On {
            let want = if action == PowerAction::Off {
                PowerReading::Off
            } else {
                PowerReading::On
            };
            let quirk_says_already = action == PowerAction::Off
                && self
                    .profile
                    .quirk(|q| match q {
                        Quirk::AlreadyOffError { status } if *status == code => Some(()),
                        _ => None,
                    })
                    .is_some();
            if (quirk_says_already || (400..500).contains(&status))
                && let Ok(v) = self.get(&self.system_path()).await
            {
                let r = &self.profile.redfish;
                let (now, _, _) = parse::system_status(&v, &r.power_state, None, &r.health);
                if now == want {
                    return Ok(ActionOutcome::AlreadyDone);
                }
            }
        }
        let busy = self
            .profile
            .quirk(|q| match q {
                Quirk::OnAfterOffConflict { status, .. }
                    if *status == code && action == PowerAction::On =>
                {
                    Some(())
                }
                Quirk::ResetDuringPost { status } if *status == code => Some(()),
                _ => None,
            })
            .is_some();
        Err(BmcError::Http {
            endpoint: self.endpoint.clone(),
            what: if busy {
                format!("{what} (busy: retry later)")
            } else {
                what
            },
            // A quirk's "not now" is reported as 409 so that is_transient() says "retry".
            status: if busy { 409 } else { code },
            message: Self::redfish_message(&body),
        })
    }

    async fn close_inner(&self) {
        let mut s = self.session.lock().await;
        if let (Some(token), Some(loc)) = (s.token.take(), s.location.take()) {
            // Logging out is a courtesy to the BMC's session table; if it fails the session times
            // out on the BMC by itself.
            let _logged_out = self
                .http
                .send("DELETE", &loc, &[("X-Auth-Token", &token)], None, 64 << 10)
                .await;
        }
        self.http.close().await;
    }
}

impl Bmc for RedfishBmc {
    fn protocol(&self) -> Protocol {
        Protocol::Redfish
    }

    fn status(&self, depth: Depth) -> BoxFuture<'_, Result<BmcSnapshot, BmcError>> {
        Box::pin(self.status_inner(depth))
    }

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<ActionOutcome, BmcError>> {
        Box::pin(self.power_inner(action))
    }

    fn inventory(&self, node: &str) -> BoxFuture<'_, Result<HardwareProfile, BmcError>> {
        let node = node.to_string();
        Box::pin(async move { inventory::capture(self, &node).await })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close_inner())
    }
}
