//! The status API, the metrics and the operator page. No logic: each route reads the status the
//! supervisor publishes, or turns a request into a [`Command`] for it.
//!
//! Routes:
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the operator page: the rack at a glance and each failover's timeline, drawn |
//! | `GET /api/status` | nodes (state, verdict, evidence), hosts (capacity, twins), pause, readiness, the rebalance move proposed now |
//! | `GET /api/log?node=N&limit=K` | the fencing log's last records |
//! | `GET /api/events` | server-sent events: each fencing-log record as it is written |
//! | `GET /metrics` | Prometheus text |
//! | `POST /api/pause`, `/api/resume` | all automation (token) |
//! | `POST /api/nodes/{node}/maintenance`, `/resume`, `/failover`, `/failback` | one node (token) |
//! | `POST /api/nodes/{node}/move?to=HOST` | move the node's running twin to that failover or backup server (token) |
//! | `POST /api/nodes/{node}/ack-off` | `{"by": "...", "reason": "..."}`: the node is off (token) |
//!
//! Actions need `Authorization: Bearer <token>` with the token of `appliance.api_token`; without
//! a configured token they are refused. Reads need none (the API listens on loopback by default).
//!
//! Key types: [`serve`].

pub mod metrics;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::daemon::run::{Command, Shared};

#[derive(Clone)]
struct App {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    token: Option<Secret>,
}

/// Compares in constant time (the token must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(app: &App, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let refuse = |code: StatusCode, msg: &str| {
        Err(Box::new(
            (code, Json(json!({ "error": msg }))).into_response(),
        ))
    };
    let Some(token) = &app.token else {
        return refuse(
            StatusCode::FORBIDDEN,
            "actions are disabled: no appliance.api_token is configured",
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same(given.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        refuse(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required for actions",
        )
    }
}

async fn send(app: &App, headers: &HeaderMap, c: Command) -> Response {
    if let Err(r) = authorized(app, headers) {
        return *r;
    }
    if let Some(n) = match &c {
        Command::Maintenance(n, _)
        | Command::Failover(n)
        | Command::Failback(n)
        | Command::FailbackReplacement(n)
        | Command::Move { node: n, .. } => Some(n),
        _ => None,
    } && app.cfg.node(n).is_none()
    {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no node named {n}") })),
        )
            .into_response();
    }
    if let Command::Move { to, .. } = &c
        && !app.cfg.hosts.iter().any(|h| h.name == *to)
    {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no failover or backup server named {to}") })),
        )
            .into_response();
    }
    // A failover or backup server may be acknowledged off too (its twins then count stopped).
    if let Command::AckOff { node, .. } = &c
        && app.cfg.machine(node).is_none()
    {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no node or host named {node}") })),
        )
            .into_response();
    }
    match app.shared.commands.send(c.clone()).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "accepted": format!("{c:?}") })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "the supervisor is stopping" })),
        )
            .into_response(),
    }
}

/// `POST /api/nodes/NODE/move?to=HOST`: where the twin goes.
#[derive(Deserialize)]
struct MoveQuery {
    to: String,
}

/// `POST /api/nodes/NODE/failback?accept_profile=true`: to a replacement server.
#[derive(Deserialize)]
struct FailbackQuery {
    #[serde(default)]
    accept_profile: bool,
}

#[derive(Deserialize)]
struct AckBody {
    by: String,
    reason: String,
}

#[derive(Deserialize)]
struct LogQuery {
    node: Option<String>,
    limit: Option<usize>,
}

/// Serves the API until `cancel`. Returns once it listens.
pub async fn serve(
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let token = match &cfg.appliance.api_token {
        Some(r) => Some(
            r.resolve()
                .map_err(|e| anyhow::anyhow!("the API token cannot be read: {e}"))?,
        ),
        None => None,
    };
    let app = App {
        cfg: cfg.clone(),
        shared: shared.clone(),
        token,
    };
    // Durations of fences and boots come from the log's records.
    let mut rx = shared.events.subscribe();
    let s2 = shared.clone();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = c2.cancelled() => return,
                r = rx.recv() => match r {
                    Ok(r) => s2.metrics.record(&r),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            }
        }
    });
    let router =
        Router::new()
            .route("/", get(|| async { Html(include_str!("page.html")) }))
            .route(
                "/api/status",
                get(|State(a): State<App>| async move {
                    Json(
                        a.shared
                            .status
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone(),
                    )
                }),
            )
            .route(
                "/api/log",
                get(
                    |State(a): State<App>, Query(q): Query<LogQuery>| async move {
                        let path = a.cfg.appliance.state_dir.join(crate::journal::FILE_NAME);
                        match crate::journal::verify(&path) {
                            Ok(rs) => {
                                let mut rs: Vec<_> = rs
                                    .into_iter()
                                    .filter(|r| {
                                        q.node.as_ref().is_none_or(|n| r.node.as_deref() == Some(n))
                                    })
                                    .collect();
                                let keep = q.limit.unwrap_or(200).min(5000);
                                if rs.len() > keep {
                                    rs.drain(..rs.len() - keep);
                                }
                                Json(json!(rs)).into_response()
                            }
                            Err(e) => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                Json(json!({ "error": e.to_string() })),
                            )
                                .into_response(),
                        }
                    },
                ),
            )
            .route(
                "/api/events",
                get(|State(a): State<App>| async move {
                    let rx = a.shared.events.subscribe();
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        loop {
                            match rx.recv().await {
                                Ok(r) => {
                                    let e = Event::default()
                                        .event("record")
                                        .data(serde_json::to_string(&r).unwrap_or_default());
                                    return Some((Ok::<_, Infallible>(e), rx));
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                    continue;
                                }
                                Err(_) => return None,
                            }
                        }
                    });
                    Sse::new(stream).keep_alive(KeepAlive::default())
                }),
            )
            .route(
                "/metrics",
                get(|State(a): State<App>| async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        a.shared.metrics.encode(),
                    )
                }),
            )
            .route(
                "/api/pause",
                post(|State(a): State<App>, h: HeaderMap| async move {
                    send(&a, &h, Command::Pause).await
                }),
            )
            .route(
                "/api/resume",
                post(|State(a): State<App>, h: HeaderMap| async move {
                    send(&a, &h, Command::Resume).await
                }),
            )
            .route(
                "/api/nodes/{node}/maintenance",
                post(
                    |State(a): State<App>, h: HeaderMap, Path(n): Path<String>| async move {
                        send(&a, &h, Command::Maintenance(n, true)).await
                    },
                ),
            )
            .route(
                "/api/nodes/{node}/resume",
                post(
                    |State(a): State<App>, h: HeaderMap, Path(n): Path<String>| async move {
                        send(&a, &h, Command::Maintenance(n, false)).await
                    },
                ),
            )
            .route(
                "/api/nodes/{node}/failover",
                post(
                    |State(a): State<App>, h: HeaderMap, Path(n): Path<String>| async move {
                        send(&a, &h, Command::Failover(n)).await
                    },
                ),
            )
            .route(
                "/api/nodes/{node}/move",
                post(
                    |State(a): State<App>,
                     h: HeaderMap,
                     Path(n): Path<String>,
                     Query(q): Query<MoveQuery>| async move {
                        send(&a, &h, Command::Move { node: n, to: q.to }).await
                    },
                ),
            )
            .route(
                "/api/nodes/{node}/fence",
                post(
                    |State(a): State<App>, h: HeaderMap, Path(n): Path<String>| async move {
                        send(&a, &h, Command::Fence(n)).await
                    },
                ),
            )
            .route(
                "/api/nodes/{node}/failback",
                post(
                    |State(a): State<App>,
                     h: HeaderMap,
                     Path(n): Path<String>,
                     Query(q): Query<FailbackQuery>| async move {
                        let c = if q.accept_profile {
                            Command::FailbackReplacement(n)
                        } else {
                            Command::Failback(n)
                        };
                        send(&a, &h, c).await
                    },
                ),
            )
            .route(
                "/api/nodes/{node}/ack-off",
                post(
                    |State(a): State<App>,
                     h: HeaderMap,
                     Path(n): Path<String>,
                     Json(b): Json<AckBody>| async move {
                        send(
                            &a,
                            &h,
                            Command::AckOff {
                                node: n,
                                by: b.by,
                                reason: b.reason,
                            },
                        )
                        .await
                    },
                ),
            )
            .with_state(app);
    let listener = tokio::net::TcpListener::bind(cfg.appliance.api_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!("the API cannot listen on {}: {e}", cfg.appliance.api_listen)
        })?;
    Ok(tokio::spawn(async move {
        let _served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    }))
}
