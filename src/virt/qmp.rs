//! A small QMP client: line-delimited JSON over QEMU's unix socket.
//!
//! Overview: connect, read the greeting, `qmp_capabilities`, then one command at a time; events
//! that arrive in between are skipped. Every exchange has a timeout and a cap on line length, so a
//! wedged QEMU cannot hang or flood the appliance. A few commands are all vigil needs; the `qapi`
//! crate would add ~50 s of build for them (DESIGN.md, "Dependencies").
//!
//! Key types: [`Qmp`], [`QmpError`].

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest QMP line read.
const MAX_LINE: usize = 1 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket cannot be reached (QEMU is not running).
    #[error("QMP socket {path} cannot be reached")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("QMP: no answer to {0} in time")]
    Timeout(String),
    /// The connection broke (QEMU exited).
    #[error("QMP: the connection closed during {0}")]
    Closed(String),
    /// QEMU answered an error.
    #[error("QMP: {cmd} failed: {desc}")]
    Command {
        /// The command.
        cmd: String,
        /// QEMU's description.
        desc: String,
    },
    /// Not QMP.
    #[error("QMP: unexpected answer to {0}")]
    Protocol(String),
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    timeout: Duration,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let s = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))?
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            rd: BufReader::new(r),
            wr: w,
            timeout,
        };
        let greeting = q.read_line("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol("greeting".into()));
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_line(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(
            self.timeout,
            (&mut self.rd).take(MAX_LINE as u64).read_line(&mut line),
        )
        .await
        .map_err(|_| QmpError::Timeout(what.into()))?
        .map_err(|_| QmpError::Closed(what.into()))?;
        if n == 0 {
            return Err(QmpError::Closed(what.into()));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(what.into()))
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.wr
            .write_all(line.as_bytes())
            .await
            .map_err(|_| QmpError::Closed(cmd.into()))?;
        loop {
            let v = self.read_line(cmd).await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    cmd: cmd.into(),
                    desc: e["desc"].as_str().unwrap_or("unknown error").to_string(),
                });
            }
            return Err(QmpError::Protocol(cmd.into()));
        }
    }

    /// `query-status`: "running", "paused", "prelaunch", "shutdown", ...
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v["status"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| QmpError::Protocol("query-status".into()))
    }
}

use tokio::io::AsyncReadExt as _;
