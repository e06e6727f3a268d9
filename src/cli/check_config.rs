//! `vigil check-config FILE`: every problem at once, exit 0 only when the file is usable.

use std::io::Write;
use std::path::Path;

use crate::config::{self, ConfigError};

/// Exit code when the file has errors (or cannot be read).
pub const EXIT_INVALID: u8 = 1;

pub(super) fn run(file: &Path, json: bool, show: bool) -> anyhow::Result<u8> {
    let checked = match config::check(file) {
        Ok(c) => c,
        Err(e @ ConfigError::Unreadable { .. }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "valid": false, "problems": [ { "severity": "error", "file": file, "line": 0, "column": 0, "message": e.to_string() } ] })
                );
            } else {
                eprintln!("error: {e}");
            }
            return Ok(EXIT_INVALID);
        }
        Err(e) => return Err(e.into()),
    };
    let d = &checked.diagnostics;
    let valid = checked.config.is_some() && !d.has_errors();
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::json!({ "valid": valid, "problems": d });
        if show && let Some(c) = &checked.config {
            v["config"] = serde_json::to_value(c)?;
        }
        writeln!(out, "{v}")?;
    } else {
        if !d.is_empty() {
            // Problems go to stderr so that `--show` output stays clean on stdout.
            eprintln!("{d}");
        }
        if show && let Some(c) = &checked.config {
            writeln!(out, "{}", serde_json::to_string_pretty(c)?)?;
        }
        if valid {
            let c = checked
                .config
                .as_ref()
                .map_or((0, 0), |c| (c.nodes.len(), c.hosts.len()));
            eprintln!(
                "{}: valid ({} nodes, {} hosts, {} firmware profiles)",
                file.display(),
                c.0,
                c.1,
                checked.profiles.iter().count()
            );
        }
    }
    Ok(if valid { 0 } else { EXIT_INVALID })
}
