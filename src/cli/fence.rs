//! `vigil fence` (by hand, with --dry-run and --ack-off) and `vigil power-on`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use serde_json::json;

use crate::bmc::{self, Bmc, Depth, PowerAction};
use crate::config;
use crate::fencing::{self, FenceOutcome};
use crate::journal::{self, Journal, RecordKind};

fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown operator".into())
}

/// Everything needed to fence one machine.
pub(super) struct Setup {
    pub cfg: config::Config,
    pub profiles: config::ProfileSet,
    pub name: String,
}

pub(super) fn setup(file: &Path, node: &str) -> anyhow::Result<Setup> {
    let (cfg, profiles, _d) = config::load(file)?;
    cfg.machine(node).with_context(|| {
        format!(
            "no node or host named {node} in {} (known: {})",
            file.display(),
            cfg.machines()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok(Setup {
        cfg,
        profiles,
        name: node.to_string(),
    })
}

pub(super) fn run(
    file: &Path,
    node: &str,
    dry_run: bool,
    method: Option<&str>,
    ack_off: bool,
    by: Option<String>,
    reason: Option<String>,
) -> anyhow::Result<u8> {
    let s = setup(file, node)?;
    let m = s.cfg.machine(&s.name).context("machine vanished")?;
    let rt = tokio::runtime::Runtime::new().context("the runtime cannot start")?;
    if ack_off {
        let reason =
            reason.context("--ack-off needs --reason \"what you did to make sure it is off\"")?;
        let by = by.unwrap_or_else(operator);
        let journal = match Journal::open(&s.cfg.appliance.state_dir) {
            Ok(j) => Arc::new(Mutex::new(j)),
            // The running appliance holds the log: the acknowledgement goes through its API,
            // which writes it (a node's pending fence goes on at once; a failed host's twins
            // count stopped at their failover's next try).
            Err(crate::journal::JournalError::Busy(_)) => {
                let (code, answer) = super::daemon::api(
                    &s.cfg,
                    "POST",
                    &format!("/api/nodes/{node}/ack-off"),
                    Some(&serde_json::json!({ "by": by, "reason": reason })),
                )?;
                if code != 202 {
                    anyhow::bail!(
                        "the appliance refused the acknowledgement (HTTP {code}): {answer}"
                    );
                }
                println!(
                    "{node}: sent to the running appliance as off on {by}'s word ({reason}); it records it in the fencing log (`vigil log --node {node}`)"
                );
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        fencing::ack_off(&journal, node, &by, &reason, None)?;
        println!("{node}: recorded as off on {by}'s word ({reason}); a failover may now proceed");
        return Ok(0);
    }
    let profile = s
        .profiles
        .get(m.firmware_profile)
        .context("unknown firmware profile")?;
    let paths = bmc::paths::Paths::for_machine(&m, &s.profiles)?;
    let mut plan = fencing::plan_for(node, &paths, m.policy, profile.timing.power_off_reflect);
    if let Some(only) = method {
        plan.methods.retain(|m| m.name.starts_with(only));
        if plan.methods.is_empty() {
            bail!("{node} has no {only} path configured");
        }
    }
    if dry_run {
        println!("fence plan for {node} ({}):", m.firmware_profile);
        let mut ok = true;
        for (i, meth) in plan.methods.iter().enumerate() {
            let r = rt.block_on(async {
                let r = meth.bmc.status(Depth::Fast).await;
                meth.bmc.close().await;
                r
            });
            match r {
                Ok(snap) => println!(
                    "  {}. {} (timeout {} ms, {} retries): reachable, credentials accepted, power {:?} now",
                    i + 1,
                    meth.name,
                    meth.timeout.as_millis(),
                    meth.retries,
                    snap.power
                ),
                Err(e) => {
                    ok = false;
                    println!("  {}. {}: NOT USABLE: {e}", i + 1, meth.name);
                }
            }
        }
        if plan.methods.is_empty() {
            println!("  no method: {node} cannot be fenced");
            ok = false;
        }
        println!("(dry run: nothing was sent)");
        return Ok(if ok { 0 } else { 1 });
    }
    let journal = Arc::new(Mutex::new(Journal::open(&s.cfg.appliance.state_dir)?));
    let by = operator();
    let outcome = rt.block_on(async {
        let r = crate::daemon::fence::fence(
            &plan,
            &journal,
            None,
            json!({ "verdict": "manual", "by": by }),
        )
        .await;
        paths.close().await;
        r
    })?;
    match outcome {
        FenceOutcome::Confirmed {
            method,
            already_off,
            actions,
            elapsed_ms,
        } => {
            println!(
                "{node} is off (confirmed through {method} in {elapsed_ms} ms; {}).",
                if already_off {
                    "it was already off: no action sent".to_string()
                } else {
                    format!("{actions} power action(s) sent")
                }
            );
            Ok(0)
        }
        FenceOutcome::Pending { attempts } => {
            eprintln!("FENCE PENDING: {node} could not be confirmed off:");
            for a in attempts {
                eprintln!("  - {a}");
            }
            eprintln!(
                "Make sure it is off (pull its power), then: vigil fence --config {} {node} --ack-off --reason \"...\"",
                file.display()
            );
            Ok(1)
        }
    }
}

pub(super) fn power_on(file: &Path, node: &str) -> anyhow::Result<u8> {
    let s = setup(file, node)?;
    let m = s.cfg.machine(&s.name).context("machine vanished")?;
    let mut journal = Journal::open(&s.cfg.appliance.state_dir)?;
    if journal::twin_running(journal.records(), node) {
        bail!(
            "{node}'s virtual twin is running: powering the node on would run both at once. Fail back instead (vigil failback), which stops the twin first"
        );
    }
    // Whichever path answers: a repaired node's Redfish service may still be coming up.
    let b = bmc::paths::Paths::for_machine(&m, &s.profiles)?;
    journal.append(
        Some(node),
        RecordKind::PowerOn,
        None,
        format!("{} powers {node} on by hand", operator()),
        json!({ "by": operator() }),
    )?;
    let rt = tokio::runtime::Runtime::new().context("the runtime cannot start")?;
    let r = rt.block_on(async {
        let r = b.power(PowerAction::On).await;
        b.close().await;
        r
    })?;
    println!("{node}: power on {r:?}");
    Ok(0)
}
