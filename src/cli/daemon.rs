//! `vigil run`, `vigil status`, `vigil failover`, `vigil failback`, `vigil move`,
//! `vigil rebalance`.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::config;
use crate::daemon::run::{self, Options};

pub(super) fn run(file: &Path, stop_after: Option<Duration>) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Runtime::new().context("the runtime cannot start")?;
    rt.block_on(run::run(
        file,
        Options {
            stop_after,
            ..Options::default()
        },
    ))?;
    Ok(0)
}

/// One HTTP/1.1 request to the appliance's API on loopback.
pub fn api(
    cfg: &config::Config,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let addr = cfg.appliance.api_listen;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| {
            format!("the appliance's API at {addr} does not answer: is `vigil run` running?")
        })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let token = match (&cfg.appliance.api_token, method) {
        (Some(t), "POST") => format!(
            "Authorization: Bearer {}\r\n",
            t.resolve()
                .map_err(|e| anyhow::anyhow!("the API token cannot be read: {e}"))?
                .expose()
        ),
        _ => String::new(),
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{token}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.take(16 << 20).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("the API answered something that is not HTTP")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, serde_json::from_str(rest).unwrap_or(Value::Null)))
}

pub(super) fn status(file: &Path, json: bool) -> anyhow::Result<u8> {
    let (cfg, _, _) = config::load(file)?;
    let (code, v) = api(&cfg, "GET", "/api/status", None)?;
    if code != 200 {
        bail!("the API answered {code}: {v}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{:<12} {:<18} {:<28} WHY", "NODE", "STATE", "VERDICT");
    for n in v["nodes"].as_array().into_iter().flatten() {
        let d = &n["diagnosis"];
        let verdict = match (d["kind"]["verdict"].as_str(), d["kind"]["kind"].as_str()) {
            (Some(a), Some(b)) => format!("{a}:{b}"),
            (Some(a), None) => a.to_string(),
            _ => "-".into(),
        };
        let why: String = d["why"].as_str().unwrap_or("").chars().take(70).collect();
        println!(
            "{:<12} {:<18} {:<28} {}{}",
            n["name"].as_str().unwrap_or(""),
            n["state"].as_str().unwrap_or(""),
            verdict,
            why,
            if n["host"] == true { " (host)" } else { "" }
        );
    }
    println!();
    println!("{:<12} {:<9} {:<14} TWINS", "HOST", "ROLE", "SLOTS");
    for h in v["hosts"].as_array().into_iter().flatten() {
        let twins: Vec<&str> = h["twins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["node"].as_str())
            .collect();
        println!(
            "{:<12} {:<9} {:<14} {}",
            h["name"].as_str().unwrap_or(""),
            h["role"].as_str().unwrap_or(""),
            format!("{}/{}", twins.len(), h["capacity"]["slots"]),
            twins.join(", ")
        );
    }
    println!(
        "\nmode {}{}",
        v["mode"].as_str().unwrap_or(""),
        if v["paused"] == true {
            ", automation paused"
        } else {
            ""
        }
    );
    Ok(0)
}

fn node_state(cfg: &config::Config, node: &str) -> anyhow::Result<String> {
    let (_, v) = api(cfg, "GET", "/api/status", None)?;
    Ok(v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .and_then(|n| n["state"].as_str().map(String::from))
        .unwrap_or_default())
}

/// Asks the running appliance for a failover or failback and follows it until `done` state.
fn through_api(
    file: &Path,
    node: &str,
    action: &str,
    done: &str,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let (cfg, _, _) = config::load(file)?;
    cfg.node(node)
        .with_context(|| format!("no node named {node} in {}", file.display()))?;
    // The node's last record and state before the request: a refusal after that record ends
    // the wait.
    let seen = api(&cfg, "GET", &format!("/api/log?node={node}&limit=1"), None)
        .ok()
        .and_then(|(_, v)| v.as_array()?.last()?["seq"].as_u64())
        .unwrap_or(0);
    let before = node_state(&cfg, node)?;
    let (code, v) = api(&cfg, "POST", &format!("/api/nodes/{node}/{action}"), None)?;
    if code != 202 {
        bail!("the appliance refused: {v}");
    }
    let t0 = Instant::now();
    let mut last = String::new();
    let mut log_read: Option<Instant> = None;
    // Whether the node has left the state it was in: back in it, the job ended short.
    let mut left = false;
    while t0.elapsed() < timeout {
        let s = node_state(&cfg, node)?;
        if s != last {
            eprintln!("{:>6.1}s  {node}: {s}", t0.elapsed().as_secs_f64());
            last = s.clone();
        }
        if s == done {
            return Ok(0);
        }
        left |= s != before;
        if left && s == before {
            // The job ran and the node is back where it was: it did not go through. The log
            // says why (the first refusal or failure since the request).
            let verb = action.split('?').next().unwrap_or(action);
            let why = api(
                &cfg,
                "GET",
                &format!("/api/log?node={node}&limit=200"),
                None,
            )
            .ok()
            .and_then(|(_, log)| {
                let since: Vec<&Value> = log
                    .as_array()?
                    .iter()
                    .filter(|r| r["seq"].as_u64().is_some_and(|q| q > seen))
                    .collect();
                let says = |r: &&&Value, kind: &str| {
                    r["kind"] == kind && r["message"].as_str().is_some_and(|m| m.contains(verb))
                };
                // This action's refusal first, then a failed failover.
                since
                    .iter()
                    .find(|r| says(r, "refusal"))
                    .or_else(|| since.iter().find(|r| r["kind"] == "failover-failed"))
                    .and_then(|r| r["message"].as_str().map(String::from))
            })
            .unwrap_or_else(|| format!("the {action} did not go through"));
            eprintln!("refused: {why}\nsee `vigil log --node {node}`");
            return Ok(1);
        }
        // A refusal of this action since the request (a failback refused for a server that is
        // not the one recorded, or refused by the state machine): it is said, and the wait ends.
        // Looked for only while the node is where it was (a job under way is left alone), and
        // at most every 2 s: the appliance reads its whole log to answer.
        let verb = action.split('?').next().unwrap_or(action);
        let look = s == before && log_read.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if look {
            log_read = Some(Instant::now());
        }
        if look
            && let Ok((_, log)) = api(&cfg, "GET", &format!("/api/log?node={node}&limit=20"), None)
            && let Some(r) = log.as_array().and_then(|rs| {
                rs.iter().find(|r| {
                    r["seq"].as_u64().is_some_and(|q| q > seen)
                        && r["kind"] == "refusal"
                        && r["message"].as_str().is_some_and(|m| m.contains(verb))
                })
            })
        {
            eprintln!(
                "refused: {}\nsee `vigil log --node {node}`",
                r["message"].as_str().unwrap_or_default()
            );
            return Ok(1);
        }
        if s == "fence-pending" {
            eprintln!(
                "the fence is pending: make sure {node} is off, then `vigil fence --ack-off` (see `vigil log --node {node}`)"
            );
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "{node} did not reach {done} within {} s; see `vigil log --node {node}`",
        timeout.as_secs()
    );
    Ok(1)
}

pub(super) fn failover(file: &Path, node: &str, dry_run: bool) -> anyhow::Result<u8> {
    if dry_run {
        return super::failover_plan::dry_run(file, node);
    }
    through_api(
        file,
        node,
        "failover",
        "running-virtual",
        Duration::from_secs(240),
    )
}

pub(super) fn failback(file: &Path, node: &str, accept_profile: bool) -> anyhow::Result<u8> {
    through_api(
        file,
        node,
        if accept_profile {
            "failback?accept_profile=true"
        } else {
            "failback"
        },
        "healthy",
        Duration::from_secs(900),
    )
}

/// Asks the running appliance to move `node`'s twin to `to`, and follows the fencing log until
/// the twin heartbeats again (exit 0 if on `to`), or the move is refused (exit 1, with why).
fn move_through_api(cfg: &config::Config, node: &str, to: &str) -> anyhow::Result<u8> {
    let seen = api(cfg, "GET", &format!("/api/log?node={node}&limit=1"), None)
        .ok()
        .and_then(|(_, v)| v.as_array()?.last()?["seq"].as_u64())
        .unwrap_or(0);
    let (code, v) = api(
        cfg,
        "POST",
        &format!("/api/nodes/{node}/move?to={to}"),
        None,
    )?;
    if code != 202 {
        bail!("the appliance refused: {v}");
    }
    let t0 = Instant::now();
    let mut said = seen;
    let mut unanswered = 0;
    let mut moving = false;
    while t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(300));
        let Ok((_, log)) = api(cfg, "GET", &format!("/api/log?node={node}&limit=50"), None) else {
            unanswered += 1;
            if unanswered >= 30 {
                eprintln!(
                    "the appliance stopped answering during the move; when it is back, see `vigil log --node {node}` (a restart finishes the move: it starts the twin again where there is room)"
                );
                return Ok(1);
            }
            continue;
        };
        unanswered = 0;
        for r in log.as_array().into_iter().flatten() {
            let Some(seq) = r["seq"].as_u64().filter(|q| *q > said) else {
                continue;
            };
            said = seq;
            let kind = r["kind"].as_str().unwrap_or_default();
            let msg = r["message"].as_str().unwrap_or_default();
            eprintln!("{:>6.1}s  {kind}: {msg}", t0.elapsed().as_secs_f64());
            if kind == "twin-move" {
                moving = true;
            }
            if kind == "refusal" && msg.starts_with("move of") {
                eprintln!("refused; see `vigil log --node {node}`");
                return Ok(1);
            }
            // Once the twin was stopped for the move: a refusal or a failure of its start is
            // the move's end here (the appliance tries again by itself, as for a failover).
            // (A node found on again is fenced again within the move: that goes on.)
            let refenced = msg.contains("it is fenced again before its twin starts");
            if moving && (kind == "refusal" && !refenced || kind == "failover-failed") {
                eprintln!(
                    "{node}'s twin was stopped for the move and is not running yet; the appliance retries it; see `vigil log --node {node}`"
                );
                return Ok(1);
            }
            if kind == "vm-heartbeat" {
                let host = r["detail"]["host"].as_str().unwrap_or_default();
                if host == to {
                    return Ok(0);
                }
                eprintln!(
                    "{node}'s twin runs on {host}, not {to}: the move did not go where asked; see `vigil log --node {node}`"
                );
                return Ok(1);
            }
        }
    }
    eprintln!("{node}'s twin did not heartbeat again within 300 s; see `vigil log --node {node}`");
    Ok(1)
}

pub(super) fn move_twin(file: &Path, node: &str, to: &str) -> anyhow::Result<u8> {
    let (cfg, _, _) = config::load(file)?;
    cfg.node(node)
        .with_context(|| format!("no node named {node} in {}", file.display()))?;
    if !cfg.hosts.iter().any(|h| h.name == to) {
        bail!(
            "no failover or backup server named {to} in {}",
            file.display()
        );
    }
    move_through_api(&cfg, node, to)
}

pub(super) fn rebalance(file: &Path, dry_run: bool) -> anyhow::Result<u8> {
    let (cfg, _, _) = config::load(file)?;
    let (code, v) = api(&cfg, "GET", "/api/status", None)?;
    if code != 200 {
        bail!("the API answered {code}: {v}");
    }
    let m = &v["rebalance"];
    let (Some(node), Some(from), Some(to)) =
        (m["node"].as_str(), m["from"].as_str(), m["to"].as_str())
    else {
        println!(
            "nothing to move: no healthy failover server is past {:.0}% load with a healthy backup server able to take one of its twins",
            crate::placement::LOADED * 100.0
        );
        return Ok(0);
    };
    println!(
        "move {node}'s twin from {from} ({:.0}% load) to {to}{}",
        m["load"].as_f64().unwrap_or(0.0) * 100.0,
        if dry_run {
            " (dry run: nothing done)"
        } else {
            ""
        }
    );
    if dry_run {
        return Ok(0);
    }
    move_through_api(&cfg, node, to)
}
