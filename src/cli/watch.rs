//! `vigil watch`: observe mode. Detection and diagnosis only, never an action: each verdict is
//! printed as it changes, with its evidence. Operators adopt a failover tool by watching it judge
//! their rack for weeks before they let it act.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::clock::Clock;
use crate::config;
use crate::diagnosis::Kind;
use crate::monitor::{self, Monitor, VerdictChange};

/// Wall-clock time as RFC 3339 with milliseconds (UTC), for the printed lines.
pub fn wall_now() -> String {
    crate::clock::wall_rfc3339()
}

/// One line for a change of verdict.
pub fn describe(c: &VerdictChange) -> String {
    let d = &c.diagnosis;
    let now = match (d.kind, d.candidate) {
        (Kind::Suspect, Some(k)) => format!("suspect ({}?)", k.name()),
        (k, _) => k.name(),
    };
    let ev: Vec<String> = d
        .evidence
        .iter()
        .map(|e| format!("{}={}", e.what, e.value))
        .collect();
    format!(
        "{} {}: {} -> {}: {} [held {} ms over {} samples{}] {}",
        wall_now(),
        c.node,
        c.previous.name(),
        now,
        d.why,
        d.held_ms,
        d.samples,
        if d.flapping { ", flapping" } else { "" },
        ev.join("; ")
    )
}

pub(super) fn run(
    file: &Path,
    only: Option<&str>,
    json: bool,
    stop_after: Option<Duration>,
) -> anyhow::Result<u8> {
    let (cfg, profiles, _d) = config::load(file)?;
    if let Some(n) = only {
        cfg.machine(n)
            .with_context(|| format!("no node or host named {n} in {}", file.display()))?;
    }
    let rt = tokio::runtime::Runtime::new().context("the runtime cannot start")?;
    rt.block_on(async move {
        let clock = Clock::start();
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut src = monitor::start_sources(&cfg, &profiles, clock, &cancel, None)?;
        let mut mon = Monitor::new(&cfg, &src.hurry, clock.now());
        eprintln!(
            "watching {} machines (observe mode: vigil never acts here); heartbeats on {}",
            cfg.machines().count(),
            cfg.appliance.heartbeat_listen
        );
        let mut tick = tokio::time::interval(monitor::TICK);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let deadline = stop_after.map(|d| tokio::time::Instant::now() + d);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
                o = src.rx.recv() => {
                    let Some((node, obs)) = o else { break };
                    mon.observe(&node, obs);
                }
                _ = tick.tick() => {}
            }
            for c in mon.evaluate(clock.now()) {
                if only.is_some_and(|n| n != c.node) {
                    continue;
                }
                if json {
                    let mut v = serde_json::to_value(&c)?;
                    v["time"] = serde_json::Value::String(wall_now());
                    println!("{v}");
                } else {
                    println!("{}", describe(&c));
                }
            }
        }
        cancel.cancel();
        while src.tasks.join_next().await.is_some() {}
        anyhow::Ok(())
    })?;
    Ok(0)
}
