//! `vigil log`: the fencing log as a timeline an operator can read at 3 a.m., and `verify`.

use std::io::{BufRead, Seek};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::config;
use crate::journal::{self, Record};

/// One line per record: sequence, time, node, kind, epoch, message; and the evidence indented.
pub fn render(r: &Record) -> String {
    let mut s = format!(
        "#{:<5} {}  {:<10} {:<20} {}{}",
        r.seq,
        r.time,
        r.node.as_deref().unwrap_or("-"),
        serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        r.epoch.map(|e| format!("[epoch {e}] ")).unwrap_or_default(),
        r.message
    );
    if let Some(ev) = r
        .detail
        .get("why")
        .and_then(|w| w.get("evidence"))
        .or(r.detail.get("evidence"))
        .and_then(|e| e.as_array())
    {
        for e in ev {
            s.push_str(&format!(
                "\n{:>34} {} = {}",
                "",
                e["what"].as_str().unwrap_or(""),
                e["value"].as_str().unwrap_or("")
            ));
        }
    }
    s
}

fn since_cutoff(since: Option<&str>) -> anyhow::Result<Option<String>> {
    let Some(s) = since else { return Ok(None) };
    if let Ok(d) = humantime::parse_duration(s) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t = now.saturating_sub(d);
        return Ok(Some(crate::clock::rfc3339(t.as_secs(), t.subsec_millis())));
    }
    if s.len() >= 10 && s.as_bytes()[4] == b'-' {
        return Ok(Some(s.to_string()));
    }
    anyhow::bail!("--since {s}: give a duration (\"2h\") or a time (\"2026-11-28T03:00:00Z\")")
}

pub(super) fn show(
    file: &Path,
    node: Option<&str>,
    since: Option<&str>,
    follow: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let (cfg, _p, _d) = config::load(file)?;
    let path = cfg.appliance.state_dir.join(journal::FILE_NAME);
    let cutoff = since_cutoff(since)?;
    let keep = |r: &Record| {
        node.is_none_or(|n| r.node.as_deref() == Some(n))
            && cutoff
                .as_ref()
                .is_none_or(|c| r.time.as_str() >= c.as_str())
    };
    let print = |r: &Record| {
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            println!("{}", render(r));
        }
    };
    let records = journal::verify(&path)
        .with_context(|| "the fencing log does not verify; `vigil log verify` says where")?;
    for r in records.iter().filter(|r| keep(r)) {
        print(r);
    }
    if !follow {
        return Ok(0);
    }
    // Follow: read what is appended from here on.
    let mut f =
        std::fs::File::open(&path).with_context(|| format!("{} cannot be read", path.display()))?;
    let mut pos = f.seek(std::io::SeekFrom::End(0))?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(&path)?.len();
        if len < pos {
            anyhow::bail!(
                "{} shrank while being followed: it was truncated",
                path.display()
            );
        }
        if len == pos {
            continue;
        }
        f.seek(std::io::SeekFrom::Start(pos))?;
        let mut reader = std::io::BufReader::new(&f);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                break;
            }
            pos += line.len() as u64;
            if let Ok(r) = serde_json::from_str::<Record>(line.trim_end()) {
                if keep(&r) {
                    print(&r);
                }
            }
            line.clear();
        }
    }
}

pub(super) fn verify(file: &Path) -> anyhow::Result<u8> {
    let (cfg, _p, _d) = config::load(file)?;
    let path = cfg.appliance.state_dir.join(journal::FILE_NAME);
    match journal::verify(&path) {
        Ok(r) => {
            println!(
                "{}: {} records, chain intact{}",
                path.display(),
                r.len(),
                r.last()
                    .map(|l| format!(", last #{} at {}", l.seq, l.time))
                    .unwrap_or_default()
            );
            Ok(0)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(1)
        }
    }
}
