//! The lab's control API: see a server's state, inject a fault, repair it.
//!
//! Overview: plain HTTP with JSON on loopback (it is the lab's own back door, not a BMC):
//!
//! | method and path | does |
//! |---|---|
//! | `GET /servers` | every server's state |
//! | `GET /servers/{name}` | one server's state: power, boot progress, OS, faults, SEL, sessions, resets |
//! | `POST /servers/{name}/inject` | a [`Fault`] as JSON |
//! | `POST /servers/{name}/repair` | ends every fault of that server |
//!
//! `vigil-lab inject` and `repair` are clients of it ([`request`]), and tests use it directly.
//!
//! Key types: [`router`], [`ServerView`], [`request`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::faults::Fault;
use crate::server::{OsState, SelEntry, SimServer};

type Servers = Arc<BTreeMap<String, Arc<SimServer>>>;

/// What the control API shows of a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerView {
    /// Its name.
    pub name: String,
    /// Redfish PowerState now.
    pub power_state: String,
    /// BootProgress.LastState now.
    pub boot_progress: String,
    /// The OS.
    pub os: OsState,
    /// Whether its BMC answers.
    pub bmc_reachable: bool,
    /// Health rollup.
    pub health: String,
    /// Faults in force.
    pub faults: Vec<Fault>,
    /// SEL records added by the lab.
    pub sel: Vec<SelView>,
    /// Sessions open now.
    pub sessions_open: usize,
    /// Sessions ever opened by clients.
    pub sessions_opened: u64,
    /// Sessions closed by clients.
    pub sessions_closed: u64,
    /// Session requests refused at the limit.
    pub sessions_refused: u64,
    /// Reset actions received (lab ms, type).
    pub resets: Vec<(u64, String)>,
}

/// A SEL record as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelView {
    /// Record id.
    pub id: u32,
    /// Severity.
    pub severity: String,
    /// ipmitool-style message.
    pub message: String,
}

impl From<&SelEntry> for SelView {
    fn from(e: &SelEntry) -> Self {
        Self {
            id: e.id,
            severity: e.severity.to_string(),
            message: e.message(),
        }
    }
}

/// The view of one server now.
pub fn view(server: &SimServer) -> ServerView {
    let now = server.clock.now();
    let s = server.state();
    ServerView {
        name: server.name.clone(),
        power_state: s.power.power_state().redfish().to_string(),
        boot_progress: s.power.boot_progress(now).to_string(),
        os: s.os,
        bmc_reachable: s.bmc_reachable(now),
        health: s.health().to_string(),
        faults: s.faults.iter().map(|(f, _)| f.clone()).collect(),
        sel: s.sel.iter().map(SelView::from).collect(),
        sessions_open: s.sessions.len(),
        sessions_opened: s.sessions_opened,
        sessions_closed: s.sessions_closed,
        sessions_refused: s.sessions_refused,
        resets: s.resets.clone(),
    }
}

/// The control API's routes.
pub fn router(servers: BTreeMap<String, Arc<SimServer>>) -> Router {
    Router::new()
        .route("/servers", get(list))
        .route("/servers/{name}", get(one))
        .route("/servers/{name}/inject", post(inject))
        .route("/servers/{name}/repair", post(repair))
        .route(
            "/servers/{name}/ipmi/chassis",
            get(ipmi_chassis_get).post(ipmi_chassis_set),
        )
        .with_state(Arc::new(servers))
}

fn unknown(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": format!("no server named {name}") })),
    )
        .into_response()
}

async fn list(State(servers): State<Servers>) -> Json<Vec<ServerView>> {
    Json(servers.values().map(|s| view(s)).collect())
}

async fn one(State(servers): State<Servers>, Path(name): Path<String>) -> Response {
    match servers.get(&name) {
        Some(s) => Json(view(s)).into_response(),
        None => unknown(&name),
    }
}

async fn inject(
    State(servers): State<Servers>,
    Path(name): Path<String>,
    Json(fault): Json<Fault>,
) -> Response {
    match servers.get(&name) {
        Some(s) => {
            tracing::info!(server = %name, fault = %fault.kind.name(), "fault injected");
            s.inject(fault);
            Json(view(s)).into_response()
        }
        None => unknown(&name),
    }
}

async fn repair(State(servers): State<Servers>, Path(name): Path<String>) -> Response {
    match servers.get(&name) {
        Some(s) => {
            tracing::info!(server = %name, "repaired");
            s.repair();
            Json(view(s)).into_response()
        }
        None => unknown(&name),
    }
}

/// What `ipmi_sim`'s chassis_control reads: power is 1 exactly when Redfish says On or
/// PoweringOff (so IPMI and Redfish agree, and a power cycle's 1 Hz poll sees the off delay).
async fn ipmi_chassis_get(State(servers): State<Servers>, Path(name): Path<String>) -> Response {
    let Some(s) = servers.get(&name) else {
        return unknown(&name);
    };
    let st = s.state();
    let on = matches!(
        st.power.power_state(),
        crate::power::PowerState::On | crate::power::PowerState::PoweringOff
    );
    Json(json!({ "power": u8::from(on), "boot": "default" })).into_response()
}

/// A chassis control from `ipmi_sim`: `{"op": "power", "value": "0"}` and the like.
async fn ipmi_chassis_set(
    State(servers): State<Servers>,
    Path(name): Path<String>,
    Json(req): Json<serde_json::Value>,
) -> Response {
    use crate::server::PowerAction;
    let Some(s) = servers.get(&name) else {
        return unknown(&name);
    };
    let op = req["op"].as_str().unwrap_or("");
    let value = req["value"].as_str().unwrap_or("").trim_matches('"');
    let action = match (op, value) {
        ("power", "0") => Some(PowerAction::Off),
        ("power", "1") => Some(PowerAction::On),
        ("reset", _) => Some(PowerAction::Restart),
        // A soft shutdown: the lab's OS obeys ACPI at once.
        ("shutdown", _) => Some(PowerAction::Off),
        ("boot" | "identify", _) => None,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": format!("unknown chassis control {op} {value}") })),
            )
                .into_response();
        }
    };
    if let Some(a) = action {
        tracing::info!(server = %name, action = ?a, "IPMI chassis control");
        let now = s.clock.now();
        s.state().power_action(a, now);
        s.changed.notify_waiters();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The URL is not `http://HOST:PORT`.
    #[error("control URL {0} is not http://HOST:PORT")]
    BadUrl(String),
    /// The lab did not answer.
    #[error("the lab's control API at {url} cannot be reached")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The lab answered something that is not HTTP.
    #[error("the lab's control API answered something that is not HTTP")]
    BadResponse,
}

/// One HTTP/1.1 request to the control API (loopback; no client library needed for this).
pub async fn request(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), ControlError> {
    let host = url
        .strip_prefix("http://")
        .ok_or_else(|| ControlError::BadUrl(url.to_string()))?;
    let unreachable = |source| ControlError::Unreachable {
        url: url.to_string(),
        source,
    };
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(unreachable)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(unreachable)?;
    let mut resp = Vec::new();
    stream
        .take(16 << 20)
        .read_to_end(&mut resp)
        .await
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or(ControlError::BadResponse)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ControlError::BadResponse)?;
    Ok((status, rest.to_string()))
}
