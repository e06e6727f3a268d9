//! `vigil probe`: what each path to a machine's BMC sees now, side by side.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::json;

use crate::bmc::{self, Bmc, Depth};
use crate::config::{self, Config, ProfileSet};
use crate::model::{BmcSnapshot, SensorKind};

/// The machines named, or all of them.
pub(super) fn select<'a>(
    cfg: &'a Config,
    names: &[String],
    all: bool,
) -> anyhow::Result<Vec<config::Machine<'a>>> {
    if all {
        return Ok(cfg.machines().collect());
    }
    if names.is_empty() {
        bail!("name a node (or host), or give --all");
    }
    names
        .iter()
        .map(|n| {
            cfg.machine(n).with_context(|| {
                format!(
                    "no node or host named {n} in {} (known: {})",
                    cfg.path.display(),
                    cfg.machines()
                        .map(|m| m.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect()
}

fn describe(s: &BmcSnapshot) -> String {
    let mut o = String::new();
    let _ = write!(o, "power {:?}, health {:?}", s.power, s.health);
    if let Some(b) = &s.boot {
        let _ = write!(o, ", boot {b:?}");
    }
    for kind in [
        SensorKind::Temperature,
        SensorKind::Voltage,
        SensorKind::Fan,
    ] {
        let v: Vec<String> = s
            .sensors
            .iter()
            .filter(|r| r.kind == kind)
            .take(6)
            .map(|r| {
                let crit = if r.is_critical() { " CRITICAL" } else { "" };
                match (r.value, r.upper_critical) {
                    (Some(v), Some(c)) => format!("{} {v} (crit {c}){crit}", r.name),
                    (Some(v), None) => format!("{} {v}{crit}", r.name),
                    _ => format!("{} -{crit}", r.name),
                }
            })
            .collect();
        if !v.is_empty() {
            let n = s.sensors.iter().filter(|r| r.kind == kind).count();
            let _ = write!(
                o,
                "\n    {kind:?}: {}{}",
                v.join(", "),
                if n > 6 {
                    format!(" … ({n} in all)")
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(w) = &s.watchdog {
        let _ = write!(
            o,
            "\n    watchdog: {}, timeout {} ms{}",
            if w.running { "running" } else { "stopped" },
            w.timeout_ms,
            if w.expired { ", EXPIRED" } else { "" }
        );
    }
    for g in &s.gaps {
        let _ = write!(o, "\n    not read: {g}");
    }
    if !s.psus.is_empty() {
        let p: Vec<String> = s
            .psus
            .iter()
            .map(|p| format!("{} {:?}", p.name, p.health))
            .collect();
        let _ = write!(o, "\n    PSUs: {}", p.join(", "));
    }
    o
}

/// One path's result: not configured, or what it read.
type PathResult = Option<anyhow::Result<BmcSnapshot>>;

fn path_json(r: &PathResult) -> serde_json::Value {
    match r {
        None => serde_json::Value::Null,
        Some(Ok(s)) => serde_json::to_value(s).unwrap_or_default(),
        Some(Err(e)) => json!({ "error": format!("{e:#}") }),
    }
}

fn path_text(r: &PathResult) -> String {
    match r {
        None => "not configured".into(),
        Some(Ok(s)) => describe(s),
        Some(Err(e)) => format!("ERROR {e:#}"),
    }
}

pub(super) fn run(file: &Path, names: &[String], all: bool, json_out: bool) -> anyhow::Result<u8> {
    let (cfg, profiles, _d) = config::load(file)?;
    let machines = select(&cfg, names, all)?;
    let rt = tokio::runtime::Runtime::new().context("the runtime cannot start")?;
    let results = rt.block_on(probe_all(&machines, &profiles));
    let mut failed = false;
    let mut out = Vec::new();
    for (m, (redfish, ipmi)) in machines.iter().zip(results) {
        // A configured path that cannot be read is a failure of the probe.
        failed |= matches!(redfish, Some(Err(_))) || matches!(ipmi, Some(Err(_)));
        if json_out {
            out.push(json!({
                "machine": m.name,
                "firmware_profile": m.firmware_profile,
                "redfish": path_json(&redfish),
                "ipmi": path_json(&ipmi),
            }));
        } else {
            println!(
                "{} ({})\n  redfish: {}\n  ipmi:    {}",
                m.name,
                m.firmware_profile,
                path_text(&redfish),
                path_text(&ipmi)
            );
            if let (Some(Ok(r)), Some(Ok(i))) = (&redfish, &ipmi)
                && r.power != i.power
            {
                println!(
                    "  !! the paths disagree on power: redfish {:?}, ipmi {:?}",
                    r.power, i.power
                );
            }
        }
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if failed { 1 } else { 0 })
}

/// One path: not configured (`None`), or a full read (then the session is closed).
async fn read_path<B: Bmc>(b: Result<B, bmc::SetupError>) -> PathResult {
    match b {
        Err(bmc::SetupError::NoRedfish(_) | bmc::SetupError::NoIpmi(_)) => None,
        Err(e) => Some(Err(e.into())),
        Ok(b) => {
            let r = b.status(Depth::Full).await;
            b.close().await;
            Some(r.map_err(anyhow::Error::from))
        }
    }
}

async fn probe_all(
    machines: &[config::Machine<'_>],
    profiles: &ProfileSet,
) -> Vec<(PathResult, PathResult)> {
    let futs = machines.iter().map(|m| {
        futures_util::future::join(
            read_path(bmc::redfish_for(m, profiles)),
            read_path(bmc::ipmi_for(m)),
        )
    });
    futures_util::future::join_all(futs).await
}
