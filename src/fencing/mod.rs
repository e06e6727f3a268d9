//! Fencing: make certain a node can no longer run its workload, and prove it.
//!
//! Overview (the rules; the executor that runs them is `daemon::fence`): a [`FencePlan`] lists
//! the methods for a node in order (Redfish ForceOff first, then IPMI chassis power off), each
//! with its own timeout and retries. A method whose BMC path cannot be reached at all (nothing
//! was sent) hands over to the next at once instead of waiting out its timeout. `daemon::fence::fence` walks the plan. Before every action it *reads* the power
//! state: a node already off is confirmed without any action, which is also how an interrupted
//! fence converges after a crash (the log shows the action was announced; the read shows whether
//! it took; nothing is re-sent that is not needed). Every action is written to the fencing log and
//! fsynced before it is sent, and again with its answer. A fence is confirmed only when the power
//! state reads `Off` on [`CONFIRM_READS`] consecutive reads *and* the other path, where it
//! answers, does not say otherwise: `PoweringOff` is not off, a read error breaks the run, a
//! stale BMC that keeps saying `On` never confirms, and two paths that disagree are ambiguous
//! evidence, which never confirms a fence. A "busy" refusal
//! (the firmware's 409 right after an Off, 400 during POST) is retried after a pause. When every
//! method fails, the node is left fence-pending, logged loudly, and no failover may start until a
//! later fence confirms it or an operator acknowledges it is off ([`ack_off`]).
//!
//! Scope: one fence of one node. When to fence is the supervisor's; the verdict is diagnosis's.
//!
//! Key types: [`FencePlan`], [`Method`], [`FenceOutcome`], [`FenceError`], [`state_of`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::bmc::Bmc;
use crate::journal::{Journal, JournalError, RecordKind};

/// Consecutive `Off` reads that confirm a fence.
pub const CONFIRM_READS: u32 = 2;
/// Time between confirmation reads.
pub const CONFIRM_INTERVAL: Duration = Duration::from_millis(150);
/// Pause before retrying a method the BMC said it is too busy for.
pub const BUSY_PAUSE: Duration = Duration::from_millis(500);

/// A way to power a node off.
#[derive(Clone)]
pub struct Method {
    /// Its name in logs (`redfish ForceOff`).
    pub name: String,
    /// The BMC it goes through.
    pub bmc: Arc<dyn Bmc>,
    /// How long one attempt (action and confirmation) may take.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// The other path to the same BMC, read once more when this one confirms Off: an On there
    /// means the paths disagree and the fence is not confirmed; no answer there is no veto.
    pub cross: Option<Arc<dyn Bmc>>,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Method")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("cross", &self.cross.is_some())
            .finish()
    }
}

/// The methods for one node, in order.
#[derive(Debug, Clone)]
pub struct FencePlan {
    /// The node.
    pub node: String,
    /// Methods, tried in order.
    pub methods: Vec<Method>,
    /// How long the firmware takes to show an Off it has accepted (from its profile): an
    /// action announced before a crash is given this long to show before anything is re-sent.
    pub reflect: Duration,
}

impl FencePlan {
    /// The plan as it is logged.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        self.methods
            .iter()
            .map(|m| json!({ "method": m.name, "timeout_ms": m.timeout.as_millis() as u64, "retries": m.retries }))
            .collect()
    }
}

/// How a fence ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum FenceOutcome {
    /// Power read back Off.
    Confirmed {
        /// Through which method.
        method: String,
        /// It was off before any action of this fence.
        already_off: bool,
        /// Power actions sent by this fence.
        actions: u32,
        /// How long, ms.
        elapsed_ms: u64,
    },
    /// Every method failed; the node is fence-pending.
    Pending {
        /// What each attempt got.
        attempts: Vec<String>,
    },
}

/// Why a fence could not even be attempted.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The fencing log cannot be written: no action is taken without its record.
    #[error("no action taken: the fencing log cannot be written")]
    Journal(#[from] JournalError),
    /// The node has no method at all.
    #[error("{0} has no fencing method (no Redfish and no IPMI endpoint)")]
    NoMethod(String),
}

/// Readings run-length encoded for the log: "On x40, PoweringOff x3, Off x2".
pub fn summarize(reads: &[String]) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for r in reads {
        match out.last_mut() {
            Some((v, n)) if v == r => *n += 1,
            _ => out.push((r.clone(), 1)),
        }
    }
    out.iter()
        .map(|(v, n)| {
            if *n > 1 {
                format!("{v} x{n}")
            } else {
                v.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An operator's explicit confirmation that `node` is off (they pulled its power, say).
pub fn ack_off(
    journal: &Arc<Mutex<Journal>>,
    node: &str,
    by: &str,
    reason: &str,
    epoch: Option<u64>,
) -> Result<(), JournalError> {
    journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .append(
            Some(node),
            RecordKind::AckOff,
            epoch,
            format!("{by} confirmed {node} is off: {reason}"),
            json!({ "by": by, "reason": reason }),
        )
        .map(drop)
}

/// The plan for a configured machine: Redfish ForceOff, then IPMI chassis power off, each
/// cross-checked on the other path.
pub fn plan_for(
    name: &str,
    paths: &crate::bmc::paths::Paths,
    policy: &crate::config::Policy,
    profile_off_reflect: Duration,
) -> FencePlan {
    // Enough for the request, the firmware's own delay to reflect the Off, and reads.
    let timeout = policy.bmc_request_timeout * 2
        + profile_off_reflect
        + CONFIRM_INTERVAL * (CONFIRM_READS + 2);
    let mut methods = Vec::new();
    if let Some(b) = &paths.redfish {
        methods.push(Method {
            name: "redfish ForceOff".into(),
            bmc: b.clone(),
            timeout,
            retries: 2,
            cross: paths.ipmi.clone(),
        });
    }
    if let Some(b) = &paths.ipmi {
        methods.push(Method {
            name: "ipmi chassis power off".into(),
            bmc: b.clone(),
            timeout,
            retries: 2,
            cross: paths.redfish.clone(),
        });
    }
    FencePlan {
        node: name.to_string(),
        methods,
        reflect: profile_off_reflect,
    }
}

/// What the fencing log says of a node's fences, rebuilt on start.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FenceState {
    /// A fence began and has neither confirmed nor gone pending: interrupted.
    pub interrupted: bool,
    /// The last fence ended pending, with no later confirmation or acknowledgement.
    pub pending: bool,
    /// The node is known off (confirmed or acknowledged) since its last power-on.
    pub off: bool,
    /// It is known off on an operator's word: an ack-off, with no fence begun or confirmed
    /// since (a BMC reading is not to override it).
    pub acked: bool,
    /// The epoch of the last fence.
    pub epoch: Option<u64>,
}

/// Replays the log for `node`.
pub fn state_of(records: &[crate::journal::Record], node: &str) -> FenceState {
    let mut s = FenceState::default();
    for r in records.iter().filter(|r| r.node.as_deref() == Some(node)) {
        match r.kind {
            RecordKind::FenceBegin => {
                s.acked = false;
                s.interrupted = true;
                s.epoch = r.epoch;
                // A new fence is not confirmed by an older one: the node may have been powered
                // on since by other means (an operator's hands after a maintenance fence).
                s.off = false;
            }
            RecordKind::FenceConfirmed | RecordKind::AckOff => {
                s.interrupted = false;
                s.pending = false;
                s.off = true;
                s.acked = r.kind == RecordKind::AckOff;
            }
            RecordKind::FencePending => {
                s.interrupted = false;
                s.pending = true;
            }
            RecordKind::PowerOn | RecordKind::FailbackDone => s.off = false,
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_summarized_by_runs() {
        let r: Vec<String> = ["On", "On", "PoweringOff", "Off", "Off"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(summarize(&r), "On x2, PoweringOff, Off x2");
    }

    #[test]
    fn the_log_replay_tells_interrupted_pending_and_off() {
        use crate::journal::Journal;
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(
            Some("db1"),
            RecordKind::FenceBegin,
            Some(3),
            "b",
            json!(null),
        )
        .unwrap();
        j.append(
            Some("db1"),
            RecordKind::FenceAction,
            Some(3),
            "a",
            json!(null),
        )
        .unwrap();
        assert_eq!(
            state_of(j.records(), "db1"),
            FenceState {
                interrupted: true,
                pending: false,
                off: false,
                acked: false,
                epoch: Some(3)
            }
        );
        j.append(
            Some("db1"),
            RecordKind::FencePending,
            Some(3),
            "p",
            json!(null),
        )
        .unwrap();
        assert!(state_of(j.records(), "db1").pending);
        j.append(Some("db1"), RecordKind::AckOff, Some(3), "ack", json!(null))
            .unwrap();
        let s = state_of(j.records(), "db1");
        assert!(s.off && !s.pending && !s.interrupted && s.acked);
        assert_eq!(state_of(j.records(), "web1"), FenceState::default());
        // A later fence that began is not confirmed by that one (the node may have been
        // powered on by hand in between, with no record of it).
        j.append(
            Some("db1"),
            RecordKind::FenceBegin,
            Some(4),
            "b",
            json!(null),
        )
        .unwrap();
        let s = state_of(j.records(), "db1");
        assert!(!s.off && s.interrupted && s.epoch == Some(4));
    }
}
