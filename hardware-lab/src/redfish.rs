//! The Redfish face of a simulated BMC: HTTPS, Basic auth and sessions, the capture's resources
//! with the server's live state laid over them, ComputerSystem.Reset with the firmware's quirks,
//! and the BMC's injected moods.
//!
//! Overview: every resource is the real capture's JSON (`mockup.rs`), so payload shapes, Oem
//! blocks and ids are those of the real firmware. Only what a live BMC changes is overlaid: the
//! system's PowerState, BootProgress and health, the chassis' health, the readings and health of
//! the sensors a fault touches, the PSUs, and the SEL. Requests go through, in order: the BMC's
//! mood (unreachable, slow, erroring), authentication (the service root and `$metadata` are open,
//! as the spec says), then the resource or action.
//!
//! Scope: HTTP only. State and faults live in `server.rs`.
//!
//! Key types: [`BmcLayout`], [`router`], [`run_bmc`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vigil::config::Quirk;

use crate::mockup::{Mockup, normalize};
use crate::power::{Millis, PowerState};
use crate::server::{OsState, PowerAction, SelEntry, ServerState, Session, SimServer};
use crate::tls::BmcCert;

/// The largest request body the BMC reads (a reset or session request is tiny).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The size of the body the `oversized-body` mood answers with.
pub const OVERSIZED_BODY_BYTES: usize = 64 << 20;

/// Where this server's live resources are, found once from the capture and the profile.
#[derive(Debug, Clone)]
pub struct BmcLayout {
    /// The System resource of the host.
    pub system: String,
    /// The chassis carrying its thermal and power.
    pub chassis: String,
    /// ComputerSystem.Reset's target.
    pub reset_target: String,
    /// The sessions collection.
    pub sessions: String,
    /// The SEL entries collection, when the firmware has a SEL.
    pub sel_entries: Option<String>,
    /// Legacy Thermal.
    pub thermal: Option<String>,
    /// Legacy Power.
    pub power: Option<String>,
    /// The sensor a thermal trip drives over its threshold.
    pub temp_sensor: Option<String>,
    /// The sensor a VR fault drives out of range.
    pub volt_sensor: Option<String>,
    /// PowerSubsystem's PSUs.
    pub psus: Vec<String>,
    /// The highest numeric id among the capture's own SEL entries (new ones follow it).
    pub sel_base_id: u32,
}

fn link(v: &Value, name: &str) -> Option<String> {
    v.get(name)?
        .get("@odata.id")?
        .as_str()
        .map(|s| normalize(s).to_string())
}

fn members(m: &Mockup, uri: &str) -> Vec<String> {
    m.get(uri)
        .and_then(|c| c["Members"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["@odata.id"].as_str().map(|s| normalize(s).to_string()))
        .collect()
}

impl BmcLayout {
    /// Finds the layout of `mockup` as `profile` describes it.
    pub fn new(mockup: &Mockup, profile: &vigil::config::FirmwareProfile) -> Self {
        let r = &profile.redfish;
        let system = format!("/redfish/v1/Systems/{}", r.system_id);
        let chassis = format!("/redfish/v1/Chassis/{}", r.chassis_id);
        let sys = mockup.get(&system).cloned().unwrap_or(Value::Null);
        let ch = mockup.get(&chassis).cloned().unwrap_or(Value::Null);
        let reset_target = sys["Actions"]["#ComputerSystem.Reset"]["target"]
            .as_str()
            .map_or_else(
                || format!("{system}/Actions/ComputerSystem.Reset"),
                |s| normalize(s).to_string(),
            );
        let sessions = mockup
            .get("/redfish/v1/SessionService")
            .and_then(|s| link(s, "Sessions"))
            .unwrap_or_else(|| "/redfish/v1/SessionService/Sessions".to_string());
        let sel_entries = r.sel.as_ref().map(|svc| {
            mockup
                .get(svc)
                .and_then(|s| link(s, "Entries"))
                .unwrap_or_else(|| format!("{}/Entries", normalize(svc)))
        });
        let sel_base_id = sel_entries
            .as_ref()
            .and_then(|e| mockup.get(e))
            .and_then(|c| c["Members"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m["Id"].as_str().and_then(|i| i.parse::<u32>().ok()))
            .max()
            .unwrap_or(0);
        let sensors = link(&ch, "Sensors")
            .map(|s| members(mockup, &s))
            .unwrap_or_default();
        let sensor_of = |kind: &str| {
            sensors
                .iter()
                .find(|s| {
                    mockup
                        .get(s)
                        .is_some_and(|v| v["ReadingType"] == kind && v.get("Reading").is_some())
                })
                .cloned()
        };
        let psus = link(&ch, "PowerSubsystem")
            .and_then(|ps| mockup.get(&ps).and_then(|v| link(v, "PowerSupplies")))
            .map(|c| members(mockup, &c))
            .unwrap_or_default();
        Self {
            temp_sensor: sensor_of("Temperature"),
            volt_sensor: sensor_of("Voltage"),
            thermal: link(&ch, "Thermal"),
            power: link(&ch, "Power"),
            psus,
            system,
            chassis,
            reset_target,
            sessions,
            sel_entries,
            sel_base_id,
        }
    }
}

/// State shared by the handlers of one BMC.
#[derive(Debug)]
pub struct Bmc {
    /// The server.
    pub server: Arc<SimServer>,
    /// Where things are.
    pub layout: BmcLayout,
}

/// The BMC's HTTP routes.
pub fn router(bmc: Arc<Bmc>) -> Router {
    Router::new().fallback(handle).with_state(bmc)
}

fn redfish_json(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

/// A Redfish error body, as the Base message registry shapes it.
fn redfish_error(status: StatusCode, message_id: &str, message: &str) -> Response {
    redfish_json(
        status,
        &json!({
            "error": {
                "code": format!("Base.1.8.{message_id}"),
                "message": message,
                "@Message.ExtendedInfo": [{
                    "@odata.type": "#Message.v1_1_1.Message",
                    "MessageId": format!("Base.1.8.{message_id}"),
                    "Message": message,
                    "Severity": "Critical",
                    "Resolution": "None"
                }]
            }
        }),
    )
}

async fn handle(State(bmc): State<Arc<Bmc>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let (delay, error) = {
        let mut s = bmc.server.state();
        let error = match &mut s.mood.http_error {
            Some((status, n)) if *n > 0 => {
                *n -= 1;
                Some(*status)
            }
            _ => None,
        };
        (s.mood.delay_ms, error)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(status) = error {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return redfish_error(
            status,
            "GeneralError",
            "The BMC failed to complete the request (injected by the lab).",
        );
    }
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return redfish_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "GeneralError",
                "The request body is too large.",
            );
        }
    };
    let path = normalize(parts.uri.path()).to_string();
    let method = parts.method.clone();

    // Open resources: the service root and the metadata documents.
    if method == Method::GET {
        if path == "/redfish" {
            return redfish_json(StatusCode::OK, &json!({ "v1": "/redfish/v1/" }));
        }
        if path == "/redfish/v1" || path == "/redfish/v1/odata" || path == "/redfish/v1/$metadata" {
            return get_resource(&bmc, &path);
        }
    }
    if method == Method::POST && path == bmc.layout.sessions {
        return create_session(&bmc, &body);
    }
    if authenticate(&bmc, &parts.headers).is_none() {
        {
            let mut r = redfish_error(
                StatusCode::UNAUTHORIZED,
                "InsufficientPrivilege",
                "There are insufficient privileges for the account or credentials associated with the current session to perform the requested operation.",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Redfish\""),
            );
            return r;
        }
    }
    match method {
        Method::GET | Method::HEAD => get_resource(&bmc, &path),
        Method::POST if path == bmc.layout.reset_target => reset(&bmc, &body),
        Method::DELETE if path.starts_with(&format!("{}/", bmc.layout.sessions)) => {
            delete_session(&bmc, &path)
        }
        Method::POST | Method::PATCH | Method::PUT | Method::DELETE => {
            if bmc.server.mockup.get(&path).is_some() {
                redfish_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "OperationNotAllowed",
                    "The operation is not allowed on this resource in the lab.",
                )
            } else {
                not_found(&path)
            }
        }
        _ => redfish_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "OperationNotAllowed",
            "The method is not allowed.",
        ),
    }
}

fn not_found(path: &str) -> Response {
    redfish_error(
        StatusCode::NOT_FOUND,
        "ResourceMissingAtURI",
        &format!("The resource at the URI '{path}' was not found."),
    )
}

fn authenticate(bmc: &Bmc, headers: &HeaderMap) -> Option<String> {
    if let Some(token) = headers.get("X-Auth-Token").and_then(|v| v.to_str().ok()) {
        let s = bmc.server.state();
        return s
            .sessions
            .iter()
            .find(|x| x.token == token)
            .map(|x| x.user.clone());
    }
    let basic = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (u, p) = decoded.split_once(':')?;
    (u == bmc.server.username && p == bmc.server.password).then(|| u.to_string())
}

fn create_session(bmc: &Bmc, body: &Bytes) -> Response {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            return redfish_error(
                StatusCode::BAD_REQUEST,
                "MalformedJSON",
                "The request body submitted was malformed JSON and could not be parsed by the receiving service.",
            );
        }
    };
    let (u, p) = (v["UserName"].as_str(), v["Password"].as_str());
    if u != Some(bmc.server.username.as_str()) || p != Some(bmc.server.password.as_str()) {
        return redfish_error(
            StatusCode::UNAUTHORIZED,
            "InsufficientPrivilege",
            "The authentication credentials included with this request are missing or invalid.",
        );
    }
    let max = bmc.server.profile.redfish.max_sessions as usize;
    let mut s = bmc.server.state();
    if s.sessions.len() >= max {
        s.sessions_refused += 1;
        return redfish_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SessionLimitExceeded",
            "The session establishment failed due to the number of simultaneous sessions exceeding the limit of the implementation.",
        );
    }
    s.sessions_opened += 1;
    let id = format!("{}", s.sessions_opened);
    let token: String = (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() % 16))
        .collect();
    s.sessions.push(Session {
        id: id.clone(),
        token: token.clone(),
        user: bmc.server.username.clone(),
    });
    let uri = format!("{}/{id}", bmc.layout.sessions);
    let mut r = redfish_json(
        StatusCode::CREATED,
        &json!({
            "@odata.id": uri,
            "@odata.type": "#Session.v1_3_0.Session",
            "Id": id,
            "Name": "User Session",
            "UserName": bmc.server.username,
        }),
    );
    if let Ok(t) = HeaderValue::from_str(&token) {
        r.headers_mut().insert("X-Auth-Token", t);
    }
    if let Ok(l) = HeaderValue::from_str(&uri) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    r
}

fn delete_session(bmc: &Bmc, path: &str) -> Response {
    let id = path.rsplit('/').next().unwrap_or_default();
    let mut s = bmc.server.state();
    let before = s.sessions.len();
    s.sessions.retain(|x| x.id != id);
    if s.sessions.len() < before {
        s.sessions_closed += 1;
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found(path)
    }
}

/// The reset action, with the firmware's quirks.
fn reset(bmc: &Bmc, body: &Bytes) -> Response {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some(rt) = v["ResetType"].as_str() else {
        return redfish_error(
            StatusCode::BAD_REQUEST,
            "ActionParameterMissing",
            "The action ComputerSystem.Reset requires the parameter ResetType to be present in the request body.",
        );
    };
    let p = &bmc.server.profile;
    if !p.redfish.reset_types.iter().any(|t| t == rt) {
        return redfish_error(
            StatusCode::BAD_REQUEST,
            "ActionParameterValueNotInList",
            &format!(
                "The value '{rt}' for the parameter ResetType is not in the list of acceptable values."
            ),
        );
    }
    let now = bmc.server.clock.now();
    let mut s = bmc.server.state();
    let power = s.power.power_state();
    for q in &p.quirks {
        match q.quirk {
            Quirk::ResetDuringPost { status } if s.power.in_post(now) => {
                return quirk_error(
                    status,
                    "The host is in POST; the reset cannot be performed now.",
                );
            }
            Quirk::AlreadyOffError { status }
                if power == PowerState::Off && matches!(rt, "ForceOff" | "GracefulShutdown") =>
            {
                return quirk_error(status, "Server is already powered OFF.");
            }
            Quirk::OnAfterOffConflict { status, window } if matches!(rt, "On" | "ForceOn") => {
                let w = bmc.server.lab_time(window);
                let too_soon = match power {
                    PowerState::PoweringOff => true,
                    PowerState::Off => s.power.last_off_at().is_some_and(|t| now < t + w),
                    _ => false,
                };
                if too_soon {
                    return quirk_error(status, "Server is already powered ON.");
                }
            }
            _ => {}
        }
    }
    let action = match rt {
        "On" | "ForceOn" => Some(PowerAction::On),
        "ForceOff" => Some(PowerAction::Off),
        // A graceful shutdown needs a live OS to carry it out.
        "GracefulShutdown" => {
            (s.os == OsState::Running || s.os == OsState::Isolated).then_some(PowerAction::Off)
        }
        "GracefulRestart" => {
            (s.os == OsState::Running || s.os == OsState::Isolated).then_some(PowerAction::Restart)
        }
        "ForceRestart" => Some(PowerAction::Restart),
        "PowerCycle" => Some(PowerAction::Cycle),
        "PushPowerButton" => Some(if power == PowerState::Off {
            PowerAction::On
        } else {
            PowerAction::Off
        }),
        _ => None, // Nmi and the like: accepted, no power change.
    };
    match action {
        Some(a) => s.power_action(a, now),
        None => s.resets.push((now, rt.to_string())),
    }
    StatusCode::NO_CONTENT.into_response()
}

fn quirk_error(status: u16, message: &str) -> Response {
    redfish_error(
        StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
        "ActionNotSupported",
        message,
    )
}

fn get_resource(bmc: &Bmc, path: &str) -> Response {
    let now = bmc.server.clock.now();
    let s = bmc.server.state();
    let v = if path == bmc.layout.sessions {
        Some(sessions_collection(&bmc.layout, &s))
    } else if let Some(id) = path.strip_prefix(&format!("{}/", bmc.layout.sessions)) {
        s.sessions.iter().find(|x| x.id == id).map(|x| {
            json!({
                "@odata.id": path, "@odata.type": "#Session.v1_3_0.Session",
                "Id": x.id, "Name": "User Session", "UserName": x.user,
            })
        })
    } else if Some(path) == bmc.layout.sel_entries.as_deref() {
        // Some captures did not record the SEL's entries (XCC); the real BMC has them, so the
        // lab serves an empty collection of its own where the capture has none.
        let base = bmc.server.mockup.get(path).cloned().unwrap_or_else(|| {
            json!({
                "@odata.id": path,
                "@odata.type": "#LogEntryCollection.LogEntryCollection",
                "Name": "Log Service Entries",
                "Members@odata.count": 0,
                "Members": [],
            })
        });
        Some(sel_collection(&bmc.layout, base, &s.sel))
    } else if let Some(e) = bmc
        .layout
        .sel_entries
        .as_ref()
        .and_then(|e| path.strip_prefix(&format!("{e}/")))
        .and_then(|id| id.parse::<u32>().ok())
        .and_then(|id| s.sel.iter().find(|x| x.id + bmc.layout.sel_base_id == id))
    {
        Some(sel_entry(&bmc.layout, e))
    } else {
        bmc.server.mockup.get(path).cloned().map(|mut v| {
            // The DMTF mockups carry a copyright annotation that no real BMC serves (and that
            // the Redfish validator rejects).
            if let Some(o) = v.as_object_mut() {
                o.remove("@Redfish.Copyright");
            }
            overlay(bmc, path, &mut v, &s, now);
            v
        })
    };
    let mut v = v;
    if let Some(v) = v.as_mut()
        && crate::conformance::applies_to(&bmc.server.mockup.name)
    {
        // The DMTF mockups' own authoring errors, corrected (crate::conformance says which).
        let live: Vec<&str> = s.sessions.iter().map(|x| x.id.as_str()).collect();
        let sessions = format!("{}/", bmc.layout.sessions);
        let mockup = &bmc.server.mockup;
        let exists = |u: &str| {
            let u = crate::mockup::normalize(u);
            match u.strip_prefix(&sessions) {
                Some(id) => live.contains(&id),
                None => mockup.get(u).is_some(),
            }
        };
        crate::conformance::correct(path, v, &exists);
    } else if let Some(v) = v.as_mut() {
        crate::conformance::trim_dropped(v);
    }
    let (malformed, oversized) = (s.mood.malformed_json, s.mood.oversized_body);
    drop(s);
    let Some(v) = v else {
        return not_found(path);
    };
    if oversized {
        let chunk = Bytes::from(vec![b' '; 1 << 20]);
        let chunks = OVERSIZED_BODY_BYTES / chunk.len();
        let stream = futures_util::stream::iter(
            std::iter::once(Bytes::from_static(b"{\"Padding\": \""))
                .chain(std::iter::repeat_n(chunk, chunks))
                .chain(std::iter::once(Bytes::from_static(b"\"}")))
                .map(Ok::<_, Infallible>),
        );
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        return r;
    }
    if malformed {
        let text = v.to_string();
        let cut = &text[..text.len() / 2];
        let mut r = (StatusCode::OK, cut.to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        return r;
    }
    redfish_json(StatusCode::OK, &v)
}

fn sessions_collection(layout: &BmcLayout, s: &ServerState) -> Value {
    let members: Vec<Value> = s
        .sessions
        .iter()
        .map(|x| json!({ "@odata.id": format!("{}/{}", layout.sessions, x.id) }))
        .collect();
    json!({
        "@odata.id": layout.sessions,
        "@odata.type": "#SessionCollection.SessionCollection",
        "Name": "Session Collection",
        "Members@odata.count": members.len(),
        "Members": members,
    })
}

/// The Redfish SensorType for an IPMI sensor type name.
fn redfish_sensor_type(ipmi: &str) -> &'static str {
    match ipmi {
        "Temperature" => "Temperature",
        "Voltage" => "Voltage",
        "Power Supply" => "Power Supply / Converter",
        "Power Unit" => "PowerUnit",
        "Processor" => "Processor",
        "Memory" => "Memory",
        "Watchdog 2" => "Watchdog",
        "OS Critical Stop" => "OS Stop/Shutdown",
        "System Firmware Progress" => "System Firmware Progress",
        _ => "Other Units-based Sensor",
    }
}

/// Formats Unix seconds as RFC 3339 UTC, as vigil itself writes times.
pub fn rfc3339(secs: u64) -> String {
    vigil::clock::rfc3339(secs, 0)
}

fn sel_entry(layout: &BmcLayout, e: &SelEntry) -> Value {
    let id = e.id + layout.sel_base_id;
    let base = layout.sel_entries.as_deref().unwrap_or_default();
    json!({
        "@odata.id": format!("{base}/{id}"),
        "@odata.type": "#LogEntry.v1_15_0.LogEntry",
        "Id": id.to_string(),
        "Name": format!("Log Entry {id}"),
        "Created": rfc3339(e.created),
        "EntryType": "SEL",
        "EntryCode": if e.direction == "Asserted" { "Assert" } else { "Deassert" },
        "Severity": e.severity,
        "Message": e.message(),
        "SensorType": redfish_sensor_type(e.sensor_type),
    })
}

fn sel_collection(layout: &BmcLayout, mut base: Value, sel: &[SelEntry]) -> Value {
    let mut members = base["Members"].as_array().cloned().unwrap_or_default();
    members.extend(sel.iter().map(|e| sel_entry(layout, e)));
    base["Members@odata.count"] = json!(members.len());
    base["Members"] = Value::Array(members);
    base
}

fn set_health(v: &mut Value, health: &str) {
    if let Some(st) = v.get_mut("Status").and_then(Value::as_object_mut) {
        st.insert("Health".into(), json!(health));
        if st.contains_key("HealthRollup") {
            st.insert("HealthRollup".into(), json!(health));
        }
    }
}

/// Lays the server's live state over a captured resource.
fn overlay(bmc: &Bmc, path: &str, v: &mut Value, s: &ServerState, now: Millis) {
    use crate::faults::FaultKind as F;
    let l = &bmc.layout;
    let r = &bmc.server.profile.redfish;
    let power = s.mood.stale_power.unwrap_or(s.power.power_state());
    if path == l.system {
        let missing = s.mood.power_state_missing_until.is_some_and(|u| now < u)
            && bmc
                .server
                .profile
                .quirk(|q| matches!(q, Quirk::PowerStateMissing).then_some(()))
                .is_some();
        if let Some(key) = r.power_state.strip_prefix('/') {
            if missing {
                if let Some(o) = v.as_object_mut() {
                    o.remove(key);
                }
            } else {
                v[key] = json!(power.redfish());
            }
        }
        if r.boot_progress.is_some() {
            v["BootProgress"]["LastState"] = json!(s.power.boot_progress(now));
        }
        set_health(v, s.health());
    } else if path == l.chassis {
        if v.get("PowerState").is_some() {
            v["PowerState"] = json!(power.redfish());
        }
        set_health(v, s.health());
    } else if Some(path) == l.thermal.as_deref() {
        if s.has_fault(F::ThermalTrip)
            && let Some(t) = v
                .get_mut("Temperatures")
                .and_then(Value::as_array_mut)
                .and_then(|a| {
                    a.iter_mut()
                        .find(|t| t.get("ReadingCelsius").is_some_and(|r| r.is_number()))
                })
        {
            let crit = t["UpperThresholdCritical"].as_f64().unwrap_or(95.0);
            t["ReadingCelsius"] = json!(crit + 8.0);
            set_health(t, "Critical");
        }
    } else if Some(path) == l.power.as_deref() {
        // A healthy lab server's PSUs are healthy whatever the capture's were.
        let failed = failed_psus(s);
        if let Some(psus) = v.get_mut("PowerSupplies").and_then(Value::as_array_mut) {
            for (i, p) in psus.iter_mut().enumerate() {
                set_health(p, if i < failed { "Critical" } else { "OK" });
            }
        }
        if let Some(red) = v.get_mut("Redundancy").and_then(Value::as_array_mut) {
            for r in red {
                set_health(
                    r,
                    match failed {
                        0 => "OK",
                        1 => "Warning",
                        _ => "Critical",
                    },
                );
            }
        }
        if s.has_fault(F::VrFault)
            && let Some(volt) = v
                .get_mut("Voltages")
                .and_then(Value::as_array_mut)
                .and_then(|a| {
                    a.iter_mut()
                        .find(|t| t.get("ReadingVolts").is_some_and(|r| r.is_number()))
                })
        {
            let base = volt["UpperThresholdCritical"]
                .as_f64()
                .or(volt["ReadingVolts"].as_f64())
                .unwrap_or(1.8);
            volt["ReadingVolts"] = json!((base * 1.25 * 100.0).round() / 100.0);
            set_health(volt, "Critical");
        }
    } else if Some(path) == l.temp_sensor.as_deref() && s.has_fault(F::ThermalTrip) {
        let crit = v["Thresholds"]["UpperCritical"]["Reading"]
            .as_f64()
            .unwrap_or(95.0);
        v["Reading"] = json!(crit + 8.0);
        set_health(v, "Critical");
    } else if Some(path) == l.volt_sensor.as_deref() && s.has_fault(F::VrFault) {
        let base = v["Thresholds"]["UpperCritical"]["Reading"]
            .as_f64()
            .or(v["Reading"].as_f64())
            .unwrap_or(1.8);
        v["Reading"] = json!((base * 1.25 * 100.0).round() / 100.0);
        set_health(v, "Critical");
    } else if let Some(i) = l.psus.iter().position(|p| p == path) {
        set_health(v, if i < failed_psus(s) { "Critical" } else { "OK" });
    }
}

/// How many PSUs are failed (AC loss fails them all).
fn failed_psus(s: &ServerState) -> usize {
    use crate::faults::FaultKind as F;
    let mut n = 0;
    for (f, _) in &s.faults {
        n = n.max(match f.kind {
            F::PowerLoss => usize::MAX,
            F::PsuFailure if f.all => usize::MAX,
            F::PsuFailure => 1,
            _ => 0,
        });
    }
    n
}

/// Runs the BMC on `addr` until `cancel`: serving while it is reachable, closing its port while
/// it is down (connections are refused, as from a dead BMC) and reopening it on the same port.
pub async fn run_bmc(
    bmc: Arc<Bmc>,
    listener: std::net::TcpListener,
    cert: BmcCert,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let mut listener = Some(listener);
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(cert.config.clone());
    loop {
        // Wait while the BMC is down.
        loop {
            let (reachable, until) = {
                let s = bmc.server.state();
                (
                    s.bmc_reachable(bmc.server.clock.now()) && !s.mood.redfish_down,
                    s.mood.unreachable_until,
                )
            };
            if reachable {
                break;
            }
            // A dead BMC refuses connections: close the port (it is bound again on the way up).
            listener = None;
            let wait = until
                .map(|u| u.saturating_sub(bmc.server.clock.now()).clamp(1, 200))
                .unwrap_or(200);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = bmc.server.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
        let l = match listener.take() {
            Some(l) => l,
            None => {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                l
            }
        };
        let handle = axum_server::Handle::new();
        // TCP_NODELAY on accepted connections, as real BMC web servers do: without it a small
        // answer waits for the peer's delayed ACK (~40 ms) one request in four.
        let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls.clone())
            .acceptor(axum_server::accept::NoDelayAcceptor::new());
        let server = axum_server::from_tcp(l)?
            .acceptor(acceptor)
            .handle(handle.clone())
            .serve(router(bmc.clone()).into_make_service());
        let mut server = std::pin::pin!(server);
        // Serve until the BMC goes down or the lab stops.
        let stop = loop {
            let reachable = {
                let s = bmc.server.state();
                s.bmc_reachable(bmc.server.clock.now()) && !s.mood.redfish_down
            };
            if !reachable {
                break false;
            }
            tokio::select! {
                r = &mut server => { r?; return Ok(()); }
                _ = cancel.cancelled() => break true,
                _ = bmc.server.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        };
        handle.shutdown();
        // The server future ends once its connections are closed; if a client holds one past
        // the timeout the socket is dropped with the future anyway, so the result is moot.
        let _closed = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
        if stop {
            return Ok(());
        }
    }
}
