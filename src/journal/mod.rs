//! The fencing log: the appliance's durable, append-only, hash-chained record of every verdict,
//! action and result, and the evidence behind it.
//!
//! Overview: one JSON object per line in `<state_dir>/fencing.log`. Each record carries a
//! sequence number, the wall-clock time, the node, its kind, the failover epoch, the evidence,
//! the result, and the SHA-256 of the previous record, and its own hash over all of that, so a
//! truncated, edited, reordered or deleted record is detected ([`verify`]). A record is written
//! and fsynced *before* the action it announces, and again with the result: if the log cannot be
//! written (disk full, read-only), [`Journal::append`] fails and the caller takes no action. On
//! start the appliance replays the log ([`Journal::open`]) to rebuild what it was doing.
//!
//! Scope: the file. What the records mean for the state machines is theirs; reading them for
//! people is `vigil log`.
//!
//! Key types: [`Journal`], [`Record`], [`RecordKind`], [`JournalError`].

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file name in the state directory.
pub const FILE_NAME: &str = "fencing.log";
/// The hash "before" the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// A record line longer than this is refused (evidence is bounded; a bigger line is corruption).
pub const MAX_LINE: usize = 1 << 20;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    /// The appliance started (and what it recovered).
    Start,
    /// A verdict changed.
    Verdict,
    /// A fence begins (before any action).
    FenceBegin,
    /// A power action is about to be sent (written before it is).
    FenceAction,
    /// The power action's answer.
    FenceActionResult,
    /// The fence is confirmed: power read back Off.
    FenceConfirmed,
    /// Every method failed: the node stays fence-pending.
    FencePending,
    /// An operator confirmed the node is off.
    AckOff,
    /// A failover begins, with its epoch.
    FailoverBegin,
    /// A virtual node was placed.
    Placement,
    /// A virtual node is being started.
    VmStart,
    /// A virtual node is running.
    VmRunning,
    /// The virtual node's first heartbeat arrived: failover complete.
    VmHeartbeat,
    /// The failover failed.
    FailoverFailed,
    /// Failback begins.
    FailbackBegin,
    /// The virtual node is stopped and confirmed stopped.
    VmStopped,
    /// The physical node was powered on.
    PowerOn,
    /// Failback complete: the node heartbeats again.
    FailbackDone,
    /// An operator action (maintenance, pause, resume).
    Operator,
    /// Nothing was done, and why (storm guard, appliance isolated, observe mode).
    Refusal,
    /// A running twin was found dead or hung: it is stopped and replaced on another host.
    TwinLost,
    /// A running twin moves to another host (a rebalance, or an operator's move): it is stopped
    /// and confirmed stopped where it runs, then started on the other host under the same epoch.
    TwinMove,
    /// A twin was pre-created, paused before its first instruction, for the node's next
    /// failover (its epoch reserved): it runs nothing until that failover, after the fence is
    /// confirmed, resumes it.
    VmStandby,
}

/// One record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number, from 1, +1 each record.
    pub seq: u64,
    /// Wall-clock time, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The node concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What happened.
    pub kind: RecordKind,
    /// The failover epoch it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// A short human sentence.
    pub message: String,
    /// Structured details: verdict and evidence, method, readings, result.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
    /// Hash of the previous record.
    pub prev: String,
    /// Hash of this record (over every field above).
    #[serde(default)]
    pub hash: String,
}

impl Record {
    fn compute_hash(&self) -> String {
        let mut r = self.clone();
        r.hash = String::new();
        let body = serde_json::to_string(&r).unwrap_or_default();
        let d = Sha256::digest(body.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why the log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// It cannot be opened, read or written.
    #[error("fencing log {path} cannot be {what}")]
    Io {
        /// The file.
        path: PathBuf,
        /// read, written, fsynced.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another vigil process has the log open.
    #[error(
        "fencing log {0} is in use by another vigil process (is the daemon running? use its API)"
    )]
    Busy(PathBuf),
    /// A line is not a record.
    #[error("fencing log {path}, line {line}: not a record ({reason})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// Why.
        reason: String,
    },
    /// The hash chain is broken.
    #[error(
        "fencing log {path}, line {line}: {reason}: the log was edited, reordered or truncated"
    )]
    Chain {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What does not match.
        reason: String,
    },
}

/// Called with every record appended (the event stream, metrics).
pub type Listener = Box<dyn Fn(&Record) + Send>;

/// The open log.
pub struct Journal {
    listener: Option<Listener>,
    path: PathBuf,
    file: File,
    /// An exclusive lock on `<log>.lock` held while the journal is open: two writers would break
    /// the chain, so a second vigil process (the CLI while the daemon runs) is refused.
    _lock: nix::fcntl::Flock<File>,
    last_seq: u64,
    last_hash: String,
    /// The records recovery and the fencing code read back: every kind but verdicts and
    /// refusals (see [`remembered`]).
    records: Vec<Record>,
}

/// Whether a record of `kind` is kept in memory after it is written. Verdicts and refusals
/// announce no action: nothing reads them back to decide (the file and the event stream carry
/// them to operators). At 10,000 nodes they are nearly every record and each holds its
/// evidence as JSON: kept, they were a third of the appliance's heap after a start and grew
/// with every change of verdict for as long as it ran.
pub fn remembered(kind: RecordKind) -> bool {
    !matches!(kind, RecordKind::Verdict | RecordKind::Refusal)
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("records", &self.records.len())
            .finish()
    }
}

/// Wall-clock now as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    crate::clock::wall_rfc3339()
}

/// Reads and checks every record of `path`. Returns them in order.
pub fn verify(path: &Path) -> Result<Vec<Record>, JournalError> {
    let io = |what, source| JournalError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("read", e)),
    };
    let mut reader = BufReader::new(f);
    let mut out: Vec<Record> = Vec::new();
    let mut prev = GENESIS.to_string();
    let mut line_no = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| io("read", e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            return Err(JournalError::Chain {
                path: path.to_path_buf(),
                line: line_no,
                reason: if n > MAX_LINE {
                    "a line is longer than any record".into()
                } else {
                    "the last record is cut short".into()
                },
            });
        }
        let r: Record =
            serde_json::from_slice(&buf[..buf.len() - 1]).map_err(|e| JournalError::Corrupt {
                path: path.to_path_buf(),
                line: line_no,
                reason: e.to_string(),
            })?;
        let chain = |reason: String| JournalError::Chain {
            path: path.to_path_buf(),
            line: line_no,
            reason,
        };
        if r.seq != out.len() as u64 + 1 {
            return Err(chain(format!(
                "sequence number {} where {} was expected",
                r.seq,
                out.len() + 1
            )));
        }
        if r.prev != prev {
            return Err(chain("it does not follow the record before it".into()));
        }
        if r.compute_hash() != r.hash {
            return Err(chain("its content does not match its hash".into()));
        }
        prev = r.hash.clone();
        out.push(r);
    }
    Ok(out)
}

impl Journal {
    /// Opens (creating) the log in `state_dir`, checking the whole chain first.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let path = state_dir.join(FILE_NAME);
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::Io {
            path: path.clone(),
            what: "created",
            source,
        })?;
        let lock_path = path.with_extension("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| JournalError::Io {
                path: lock_path.clone(),
                what: "opened",
                source,
            })?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| JournalError::Busy(path.clone()))?;
        let mut records = verify(&path)?;
        let (last_seq, last_hash) = records
            .last()
            .map_or((0, GENESIS.to_string()), |r| (r.seq, r.hash.clone()));
        records.retain(|r| remembered(r.kind));
        records.shrink_to_fit();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                what: "opened for writing",
                source,
            })?;
        Ok(Self {
            listener: None,
            path,
            file,
            _lock: lock,
            last_seq,
            last_hash,
            records,
        })
    }

    /// Calls `f` with every record appended from now on.
    pub fn set_listener(&mut self, f: Listener) {
        self.listener = Some(f);
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records kept in memory (see [`remembered`]): read at open, plus those appended since.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The highest failover epoch recorded.
    pub fn last_epoch(&self) -> u64 {
        self.records
            .iter()
            .filter_map(|r| r.epoch)
            .max()
            .unwrap_or(0)
    }

    /// Appends a record and fsyncs it. On error nothing may be done that the record announces.
    pub fn append(
        &mut self,
        node: Option<&str>,
        kind: RecordKind,
        epoch: Option<u64>,
        message: impl Into<String>,
        detail: serde_json::Value,
    ) -> Result<Record, JournalError> {
        self.write(node, kind, epoch, message.into(), detail, true)
    }

    /// Appends a record that announces no action (a verdict) without its own fsync: the caller
    /// writes a pass's records and then calls [`Journal::sync`] once, before anything the pass
    /// decides is done (group commit). At 10,000 nodes a start writes 10,000 first verdicts; one
    /// fsync each held the appliance's loop for tens of seconds.
    pub fn append_unsynced(
        &mut self,
        node: Option<&str>,
        kind: RecordKind,
        epoch: Option<u64>,
        message: impl Into<String>,
        detail: serde_json::Value,
    ) -> Result<Record, JournalError> {
        self.write(node, kind, epoch, message.into(), detail, false)
    }

    /// Makes every record appended so far durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.file.sync_data().map_err(|e| JournalError::Io {
            path: self.path.clone(),
            what: "fsynced",
            source: e,
        })
    }

    fn write(
        &mut self,
        node: Option<&str>,
        kind: RecordKind,
        epoch: Option<u64>,
        message: String,
        detail: serde_json::Value,
        sync: bool,
    ) -> Result<Record, JournalError> {
        let mut r = Record {
            seq: self.last_seq + 1,
            time: now_rfc3339(),
            node: node.map(String::from),
            kind,
            epoch,
            message,
            detail,
            prev: self.last_hash.clone(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        let mut line = serde_json::to_vec(&r).map_err(|e| JournalError::Io {
            path: self.path.clone(),
            what: "written",
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let io = |what, source| JournalError::Io {
            path: self.path.clone(),
            what,
            source,
        };
        self.file.write_all(&line).map_err(|e| io("written", e))?;
        if sync {
            self.file.sync_data().map_err(|e| io("fsynced", e))?;
        }
        self.last_seq = r.seq;
        self.last_hash = r.hash.clone();
        if remembered(r.kind) {
            self.records.push(r.clone());
        }
        if let Some(l) = &self.listener {
            l(&r);
        }
        Ok(r)
    }
}

/// The hosts where a twin of `node` may still run according to the log (see [`twins_may_run`]).
pub fn twin_hosts(records: &[Record], node: &str) -> std::collections::BTreeSet<String> {
    twins_may_run(records, node).into_values().collect()
}

/// The twins of `node` that may still run according to the log, VM to host: each twin started
/// (`vm-start`, with its VM and host) and not since recorded stopped: a `vm-stopped` of that VM,
/// a `failover-failed` that says it was stopped or never started, or its host's own fence
/// confirmed (or acknowledged off) after it started. A host that is off runs no VM.
pub fn twins_may_run(records: &[Record], node: &str) -> std::collections::BTreeMap<String, String> {
    let mut live: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for r in records {
        let vm = r.detail["vm"].as_str().map(String::from);
        match r.kind {
            // The host's fence: its node field names the host.
            RecordKind::FenceConfirmed | RecordKind::AckOff => {
                if let Some(host) = r.node.as_deref() {
                    live.retain(|_, h| h != host);
                }
            }
            _ if r.node.as_deref() != Some(node) => {}
            RecordKind::VmStart => {
                if let (Some(vm), Some(host)) = (vm, r.detail["host"].as_str()) {
                    live.insert(vm, host.to_string());
                }
            }
            RecordKind::VmStopped => {
                if let Some(vm) = vm {
                    live.remove(&vm);
                }
            }
            RecordKind::FailoverFailed if r.detail["stopped"] != false => {
                if let Some(vm) = vm {
                    live.remove(&vm);
                }
            }
            _ => {}
        }
    }
    live
}

/// Whether `node`'s virtual twin is running according to the log: started and not stopped since.
pub fn twin_running(records: &[Record], node: &str) -> bool {
    let mut running = false;
    for r in records.iter().filter(|r| r.node.as_deref() == Some(node)) {
        match r.kind {
            RecordKind::VmStart | RecordKind::VmRunning | RecordKind::VmHeartbeat => running = true,
            RecordKind::VmStopped => running = false,
            // Unless it says its twin could not be confirmed stopped.
            RecordKind::FailoverFailed if r.detail["stopped"] != false => running = false,
            _ => {}
        }
    }
    running
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_hosts_a_twin_may_run_on_follow_starts_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let mut add = |kind, detail| {
            j.append(Some("db1"), kind, Some(1), "x", detail).unwrap();
        };
        add(
            RecordKind::VmStart,
            json!({ "vm": "vigil-db1-e1", "host": "failover1" }),
        );
        add(
            RecordKind::VmStopped,
            json!({ "vm": "vigil-db1-e1", "host": "failover1" }),
        );
        add(
            RecordKind::VmStart,
            json!({ "vm": "vigil-db1-e2", "host": "backup1" }),
        );
        add(
            RecordKind::FailoverFailed,
            json!({ "vm": "vigil-db1-e2", "stopped": false }),
        );
        add(
            RecordKind::VmStart,
            json!({ "vm": "vigil-db1-e3", "host": "failover1" }),
        );
        add(RecordKind::FailoverFailed, json!({ "vm": "vigil-db1-e3" }));
        let hosts: Vec<String> = twin_hosts(j.records(), "db1").into_iter().collect();
        // e2 could not be confirmed stopped on backup1; e1 and e3 are gone.
        assert_eq!(hosts, vec!["backup1"]);
        assert!(twin_hosts(j.records(), "web1").is_empty());
    }

    #[test]
    fn a_host_fenced_after_a_twin_started_runs_it_no_more_but_one_started_after_may_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        fn add(j: &mut Journal, node: &str, kind: RecordKind, detail: serde_json::Value) {
            j.append(Some(node), kind, Some(1), "x", detail).unwrap();
        }
        add(
            &mut j,
            "db1",
            RecordKind::VmStart,
            json!({ "vm": "vigil-db1-e1", "host": "failover1" }),
        );
        add(
            &mut j,
            "web1",
            RecordKind::VmStart,
            json!({ "vm": "vigil-web1-e2", "host": "backup1" }),
        );
        // failover1's fence begun is not enough: only confirmed (or acknowledged) off.
        add(&mut j, "failover1", RecordKind::FenceBegin, json!(null));
        assert_eq!(
            twins_may_run(j.records(), "db1").get("vigil-db1-e1"),
            Some(&"failover1".to_string())
        );
        add(&mut j, "failover1", RecordKind::FenceConfirmed, json!(null));
        assert!(twin_hosts(j.records(), "db1").is_empty());
        // Another host's twin is untouched by it.
        assert_eq!(
            twin_hosts(j.records(), "web1")
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["backup1"]
        );
        // A twin started on failover1 after its fence (back in service) may run again, until
        // failover1's next fence (here an operator's ack-off).
        add(
            &mut j,
            "db1",
            RecordKind::VmStart,
            json!({ "vm": "vigil-db1-e3", "host": "failover1" }),
        );
        assert_eq!(
            twin_hosts(j.records(), "db1")
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["failover1"]
        );
        add(&mut j, "failover1", RecordKind::AckOff, json!(null));
        assert!(twin_hosts(j.records(), "db1").is_empty());
    }

    #[test]
    fn records_chain_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(
            Some("db1"),
            RecordKind::FenceBegin,
            Some(1),
            "fence",
            json!({"verdict": "x"}),
        )
        .unwrap();
        j.append(
            Some("db1"),
            RecordKind::FenceConfirmed,
            Some(1),
            "off",
            json!(null),
        )
        .unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.records().len(), 2);
        assert_eq!(j.last_epoch(), 1);
        assert_eq!(j.records()[1].prev, j.records()[0].hash);
    }

    #[test]
    fn verdicts_and_refusals_are_written_and_chained_but_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let v = j
            .append_unsynced(
                Some("db1"),
                RecordKind::Verdict,
                None,
                "v",
                json!({"why": [1, 2]}),
            )
            .unwrap();
        j.append(Some("db1"), RecordKind::Refusal, None, "no", json!(null))
            .unwrap();
        let f = j
            .append(
                Some("db1"),
                RecordKind::FenceBegin,
                Some(3),
                "fence",
                json!(null),
            )
            .unwrap();
        j.sync().unwrap();
        assert_eq!(j.records(), [f]);
        assert_eq!(verify(&dir.path().join(FILE_NAME)).unwrap().len(), 3);
        drop(j);
        // The file has all three, chained; a reopen keeps the same one and goes on after them.
        let all = verify(&dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], v);
        assert_eq!(all[2].prev, all[1].hash);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!((j.records().len(), j.last_epoch()), (1, 3));
        let next = j
            .append(
                Some("db1"),
                RecordKind::FenceConfirmed,
                Some(3),
                "off",
                json!(null),
            )
            .unwrap();
        assert_eq!((next.seq, next.prev.as_str()), (4, all[2].hash.as_str()));
        assert_eq!(verify(&dir.path().join(FILE_NAME)).unwrap().len(), 4);
    }

    fn tampered(edit: impl Fn(String) -> String) -> JournalError {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        for i in 0..3 {
            j.append(
                Some("db1"),
                RecordKind::Verdict,
                None,
                format!("v{i}"),
                json!(null),
            )
            .unwrap();
        }
        drop(j);
        let p = dir.path().join(FILE_NAME);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, edit(text)).unwrap();
        Journal::open(dir.path()).unwrap_err()
    }

    #[test]
    fn an_edit_a_deletion_and_a_truncation_are_detected() {
        let e = tampered(|t| t.replace("\"v1\"", "\"v9\""));
        assert!(matches!(e, JournalError::Chain { line: 2, .. }), "{e}");
        let e = tampered(|t| {
            let l: Vec<&str> = t.lines().collect();
            format!("{}\n{}\n", l[0], l[2])
        });
        assert!(matches!(e, JournalError::Chain { line: 2, .. }), "{e}");
        let e = tampered(|t| t[..t.len() - 10].to_string());
        assert!(e.to_string().contains("cut short"), "{e}");
        let e = tampered(|t| format!("{t}garbage\n"));
        assert!(matches!(e, JournalError::Corrupt { line: 4, .. }), "{e}");
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _j = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            Journal::open(dir.path()),
            Err(JournalError::Busy(_))
        ));
    }

    #[test]
    fn an_unwritable_log_refuses_to_append() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        // /dev/full accepts the open and fails every write with ENOSPC, as a full disk does.
        j.file = OpenOptions::new().append(true).open("/dev/full").unwrap();
        let e = j
            .append(None, RecordKind::Start, None, "start", json!(null))
            .unwrap_err();
        assert!(
            e.to_string().contains("cannot be written") || e.to_string().contains("fsynced"),
            "{e}"
        );
        assert_eq!(j.records().len(), 0);
    }
}
