//! The fence executor: runs a [`FencePlan`] against the BMCs, writing the fencing log before
//! every action. The rules it follows are in [`crate::fencing`]; this is the I/O half (it reads
//! the clock for its deadlines, as every executor does; decisions take time as input).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::bmc::{ActionOutcome, Bmc, BmcError, Depth, PowerAction};
use crate::fencing::{
    BUSY_PAUSE, CONFIRM_INTERVAL, CONFIRM_READS, FenceError, FenceOutcome, FencePlan, Method,
    summarize,
};
use crate::journal::{Journal, JournalError, RecordKind};
use crate::model::PowerReading;

/// Test-only fault injection: `VIGIL_CRASH_AT=<step>` makes the process abort at that step of a
/// fence, exactly as a kill -9 would, so that tests can prove the restart converges. Steps:
/// `fence-begin`, `after-announce`, `after-action`, `before-confirm`; `move-stopped` (a moving
/// twin confirmed stopped, its replacement not started yet); `twin-started` (a twin started and
/// read back running, its first heartbeat not arrived yet).
pub(crate) fn crash_point(step: &str) {
    if std::env::var("VIGIL_CRASH_AT").is_ok_and(|s| s == step) {
        eprintln!("VIGIL_CRASH_AT={step}: aborting here, as a kill -9 would");
        std::process::abort();
    }
}

enum Read {
    Off,
    NotOff(PowerReading),
    Failed(BmcError),
}

async fn read_power(bmc: &dyn Bmc, timeout: Duration) -> Read {
    match tokio::time::timeout(timeout, bmc.status(Depth::Fast)).await {
        Ok(Ok(s)) if s.power == PowerReading::Off => Read::Off,
        Ok(Ok(s)) => Read::NotOff(s.power),
        Ok(Err(e)) => Read::Failed(e),
        Err(_) => Read::Failed(BmcError::Timeout {
            endpoint: "fence".into(),
            what: "power read".into(),
            timeout_ms: timeout.as_millis() as u64,
        }),
    }
}

/// How a confirmation wait ended.
struct Confirmation {
    ok: bool,
    reads: Vec<String>,
    /// What the other path said when this one read Off (or why it could not tell).
    cross: Option<String>,
}

/// Reads through `m` until `CONFIRM_READS` consecutive Off reads that the other path does not
/// contradict, or the deadline. With `stop_on_on`, a read that says the host is on ends the
/// wait at once (the action was surely not sent: retry it rather than wait).
async fn confirm(m: &Method, deadline: tokio::time::Instant, stop_on_on: bool) -> Confirmation {
    let mut streak = 0;
    let mut seen = Vec::new();
    let mut cross = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Confirmation {
                ok: false,
                reads: seen,
                cross,
            };
        }
        match read_power(m.bmc.as_ref(), left).await {
            Read::Off => {
                streak += 1;
                seen.push("Off".into());
                if streak >= CONFIRM_READS {
                    let Some(other) = &m.cross else {
                        return Confirmation {
                            ok: true,
                            reads: seen,
                            cross: None,
                        };
                    };
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match read_power(other.as_ref(), left.max(CONFIRM_INTERVAL)).await {
                        Read::Off => {
                            return Confirmation {
                                ok: true,
                                reads: seen,
                                cross: Some(format!("{:?} also reads Off", other.protocol())),
                            };
                        }
                        // The other path cannot answer: it gives no veto.
                        Read::Failed(e) => {
                            return Confirmation {
                                ok: true,
                                reads: seen,
                                cross: Some(format!(
                                    "{:?} could not be read ({e}): not cross-checked",
                                    other.protocol()
                                )),
                            };
                        }
                        // The paths disagree: ambiguous, so not confirmed; read again.
                        Read::NotOff(p) => {
                            streak = 0;
                            let note = format!("{:?} says {p:?}", other.protocol());
                            seen.push(format!("but {note}"));
                            cross = Some(format!("the paths disagree: {note}"));
                        }
                    }
                }
            }
            Read::NotOff(p) => {
                streak = 0;
                seen.push(format!("{p:?}"));
                if stop_on_on && matches!(p, PowerReading::On) {
                    return Confirmation {
                        ok: false,
                        reads: seen,
                        cross,
                    };
                }
            }
            Read::Failed(e) => {
                streak = 0;
                seen.push(format!("error: {e}"));
            }
        }
        if seen.len() > 200 {
            seen.drain(..100);
        }
        tokio::time::sleep(
            CONFIRM_INTERVAL.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
}

/// Fences `plan.node`. `epoch` is the failover's, `why` the verdict that asked for it (both
/// logged). Returns how it ended; an error means nothing was attempted.
pub async fn fence(
    plan: &FencePlan,
    journal: &Arc<Mutex<Journal>>,
    epoch: Option<u64>,
    why: serde_json::Value,
) -> Result<FenceOutcome, FenceError> {
    let node = plan.node.as_str();
    if plan.methods.is_empty() {
        return Err(FenceError::NoMethod(node.to_string()));
    }
    let started = tokio::time::Instant::now();
    // Was a power action announced by a fence that never finished (the appliance crashed)?
    let resumed = {
        let j = journal.lock().unwrap_or_else(|p| p.into_inner());
        j.records()
            .iter()
            .rev()
            .filter(|r| r.node.as_deref() == Some(node))
            .find(|r| {
                matches!(
                    r.kind,
                    RecordKind::FenceAction
                        | RecordKind::FenceActionResult
                        | RecordKind::FenceConfirmed
                        | RecordKind::FencePending
                        | RecordKind::AckOff
                        | RecordKind::PowerOn
                )
            })
            .is_some_and(|r| {
                matches!(
                    r.kind,
                    RecordKind::FenceAction | RecordKind::FenceActionResult
                )
            })
    };
    let log = |kind, msg: String, detail| -> Result<(), JournalError> {
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(Some(node), kind, epoch, msg, detail)
            .map(drop)
    };
    log(
        RecordKind::FenceBegin,
        if resumed {
            format!(
                "resuming the interrupted fence of {node}: reading its power before sending anything again"
            )
        } else {
            format!("fencing {node}: {} method(s) in order", plan.methods.len())
        },
        json!({ "plan": plan.describe(), "why": why, "resumed": resumed }),
    )?;
    tracing::warn!(node, action = "fence", epoch, "fence begins");
    crash_point("fence-begin");
    let mut attempts = Vec::new();
    let mut actions = 0;
    for m in &plan.methods {
        for attempt in 1..=m.retries + 1 {
            let deadline = tokio::time::Instant::now() + m.timeout;
            // Read first: a node already off (or on its way off) needs no action, and an
            // interrupted fence whose action did take is confirmed without a second one: it is
            // given the firmware's reflect time to show it.
            let first = read_power(m.bmc.as_ref(), m.timeout).await;
            let wait_first = matches!(first, Read::Off | Read::NotOff(PowerReading::PoweringOff))
                || (resumed && actions == 0 && attempt == 1);
            if wait_first {
                let until = if matches!(first, Read::Off) {
                    deadline
                } else {
                    (tokio::time::Instant::now()
                        + plan.reflect
                        + CONFIRM_INTERVAL * (CONFIRM_READS + 1))
                        .min(deadline)
                };
                let c = confirm(m, until, false).await;
                if c.ok {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    log(
                        RecordKind::FenceConfirmed,
                        format!(
                            "{node} is off (read back Off {CONFIRM_READS} times through {}{}; no action was needed)",
                            m.name,
                            c.cross
                                .as_deref()
                                .map(|x| format!("; {x}"))
                                .unwrap_or_default()
                        ),
                        json!({ "method": m.name, "already_off": true, "reads": summarize(&c.reads), "cross_check": c.cross, "elapsed_ms": elapsed_ms }),
                    )?;
                    tracing::warn!(node, action = "fence", method = %m.name, elapsed_ms, "fence confirmed (already off)");
                    return Ok(FenceOutcome::Confirmed {
                        method: m.name.clone(),
                        already_off: actions == 0,
                        actions,
                        elapsed_ms,
                    });
                }
            }
            log(
                RecordKind::FenceAction,
                format!(
                    "sending power off to {node} through {} (attempt {attempt})",
                    m.name
                ),
                json!({ "method": m.name, "attempt": attempt }),
            )?;
            crash_point("after-announce");
            actions += 1;
            let r = tokio::time::timeout(m.timeout, m.bmc.power(PowerAction::Off)).await;
            crash_point("after-action");
            // Nothing reached the BMC (no connection): nothing to confirm.
            let unreachable = matches!(&r, Ok(Err(BmcError::Connect { .. })));
            // The BMC answered that it did not do it (a 4xx, an IPMI completion code): the
            // power-off surely was not performed on this path. Supermicro refuses one for as
            // long as the host is in POST, which for a host stuck in POST is forever.
            let refused = matches!(
                &r,
                Ok(Err(BmcError::Http {
                    status: 400..=499,
                    ..
                } | BmcError::Ipmi { .. }))
            );
            let (result_text, go_on, busy) = match &r {
                Ok(Ok(ActionOutcome::Accepted)) => ("accepted".to_string(), true, false),
                Ok(Ok(ActionOutcome::AlreadyDone)) => ("already off".to_string(), true, false),
                Ok(Err(e)) => (
                    format!("error: {e}"),
                    e.is_transient(),
                    e.to_string().contains("busy"),
                ),
                Err(_) => (
                    format!("no answer within {} ms", m.timeout.as_millis()),
                    true,
                    false,
                ),
            };
            log(
                RecordKind::FenceActionResult,
                format!("{} answered: {result_text}", m.name),
                json!({ "method": m.name, "attempt": attempt, "result": result_text }),
            )?;
            crash_point("before-confirm");
            let last_method = std::ptr::eq(m, plan.methods.last().expect("not empty"));
            if (unreachable || refused) && !last_method {
                // Another path may do it now: hand over at once rather than wait this one out.
                attempts.push(format!(
                    "{} attempt {attempt}: {result_text}; trying the next method",
                    m.name
                ));
                break;
            }
            if go_on {
                let c = confirm(m, deadline, unreachable).await;
                let reads = &c.reads;
                if c.ok {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    log(
                        RecordKind::FenceConfirmed,
                        format!(
                            "{node} is off: read back Off {CONFIRM_READS} times through {} after {elapsed_ms} ms{}",
                            m.name,
                            c.cross
                                .as_deref()
                                .map(|x| format!("; {x}"))
                                .unwrap_or_default()
                        ),
                        json!({ "method": m.name, "already_off": false, "reads": summarize(reads), "cross_check": c.cross, "elapsed_ms": elapsed_ms, "actions": actions }),
                    )?;
                    tracing::warn!(node, action = "fence", method = %m.name, elapsed_ms, "fence confirmed");
                    return Ok(FenceOutcome::Confirmed {
                        method: m.name.clone(),
                        already_off: false,
                        actions,
                        elapsed_ms,
                    });
                }
                attempts.push(format!(
                    "{} attempt {attempt}: {result_text}; not confirmed: read {}",
                    m.name,
                    summarize(reads)
                ));
            } else {
                attempts.push(format!("{} attempt {attempt}: {result_text}", m.name));
                break;
            }
            if busy {
                tokio::time::sleep(BUSY_PAUSE).await;
            }
        }
    }
    log(
        RecordKind::FencePending,
        format!(
            "FENCE PENDING: {node} could not be confirmed off by any method; no failover until it is, or until an operator runs `vigil fence {node} --ack-off`"
        ),
        json!({ "attempts": attempts }),
    )?;
    tracing::error!(node, action = "fence", attempts = ?attempts, "FENCE PENDING: no method confirmed the node off; no failover will start");
    Ok(FenceOutcome::Pending { attempts })
}
