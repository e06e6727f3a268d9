//! Logging: `tracing` to stderr (human-readable or JSON lines), or to journald under systemd.
//!
//! Overview: the log is for operators following what vigil does; the fencing log (`journal`) is
//! the audit record. Fields, not interpolation: `node`, `bmc`, `protocol`, `action`, `verdict`,
//! `elapsed_ms`. The level filter comes from `VIGIL_LOG` (same syntax as `RUST_LOG`), `info` by
//! default.
//!
//! Scope: installing the subscriber once per process. Nothing here redacts: secrets are kept out
//! of logs by their types ([`crate::config::Secret`] prints `[redacted]`).
//!
//! Key types: [`LogFormat`], [`init`].

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines on stderr (journald when running under systemd).
    Text,
    /// One JSON object per line on stderr.
    Json,
}

/// The environment variable holding the level filter.
pub const LOG_ENV: &str = "VIGIL_LOG";

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM` to the device and
/// inode of the stream it gave us, and we compare them so an inherited variable does not fool us.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Installs the global subscriber. Returns which sink was chosen, for a first log line.
pub fn init(format: LogFormat) -> &'static str {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if format == LogFormat::Text && stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            if registry.with(layer).try_init().is_ok() {
                return "journald";
            }
            return "none";
        }
        // No journal socket after all: fall through to stderr.
    }
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if result.is_ok() { "stderr" } else { "none" }
}
