//! `vigil agent`: run the heartbeat agent of a node, from flags or an agent file.
//!
//! The agent file (`/etc/vigil/agent.toml` under systemd) has the same keys as the flags:
//!
//! ```toml
//! node = "db1"
//! appliance = "10.0.0.2:7481"
//! key = "credential:heartbeat-key"
//! interval = "1s"
//! watchdog = "/dev/watchdog"   # or "none"
//! ```
//!
//! Flags override the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::reader::{Table, parse_document};
use crate::config::{Diagnostics, SecretRef, Source};
use crate::heartbeat::agent::{self, AgentConfig, WatchdogTarget, parse_boot_id};

/// The agent's flags.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// An agent file (keys: node, appliance, key, interval, watchdog, epoch, virtual).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's name, as the appliance knows it.
    #[arg(long)]
    pub node: Option<String>,
    /// The appliance's heartbeat address (HOST:PORT).
    #[arg(long)]
    pub appliance: Option<String>,
    /// The heartbeat key: file:PATH, credential:NAME or env:VAR.
    #[arg(long)]
    pub key: Option<String>,
    /// How often to send (e.g. 1s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// The watchdog to pet: a device (/dev/watchdog), unix:PATH (the lab), or none.
    #[arg(long)]
    pub watchdog: Option<String>,
    /// The failover epoch (virtual nodes carry the epoch they were booted for).
    #[arg(long)]
    pub epoch: Option<u64>,
    /// This is a virtual node.
    #[arg(long = "virtual")]
    pub virtual_node: bool,
    /// The boot id (a UUID), or "random"; read from /proc by default.
    #[arg(long)]
    pub boot_id: Option<String>,
    /// Stop after this many heartbeats (tests, benchmarks).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Default)]
struct FileValues {
    node: Option<String>,
    appliance: Option<String>,
    key: Option<String>,
    interval: Option<Duration>,
    watchdog: Option<String>,
    epoch: Option<u64>,
    virtual_node: bool,
}

fn read_file(path: &Path) -> anyhow::Result<FileValues> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("agent file {} cannot be read", path.display()))?;
    let src = Source::new(path, text);
    let mut d = Diagnostics::new();
    let mut v = FileValues::default();
    if let Some(doc) = parse_document(&src, &mut d) {
        let t = Table::root(&src, &doc);
        v.node = t.string(&mut d, "node").map(|s| s.into_inner());
        v.appliance = t.string(&mut d, "appliance").map(|s| s.into_inner());
        v.key = t.string(&mut d, "key").map(|s| s.into_inner());
        v.interval = t.duration(&mut d, "interval").map(|s| s.into_inner());
        v.watchdog = t.string(&mut d, "watchdog").map(|s| s.into_inner());
        v.epoch = t
            .integer(&mut d, "epoch", 0..=i64::MAX)
            .map(|s| *s.get_ref() as u64);
        v.virtual_node = t.boolean(&mut d, "virtual").is_some_and(|b| *b.get_ref());
        t.finish(&mut d);
    }
    if d.has_errors() {
        bail!("{d}");
    }
    Ok(v)
}

pub(super) fn run(args: AgentArgs) -> anyhow::Result<u8> {
    let file = match &args.config {
        Some(p) => read_file(p)?,
        None => FileValues::default(),
    };
    let base = args
        .config
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let node = args
        .node
        .or(file.node)
        .context("no node name: give --node or `node` in the agent file")?;
    let appliance = args.appliance.or(file.appliance).context(
        "no appliance address: give --appliance HOST:PORT or `appliance` in the agent file",
    )?;
    let key = args.key.or(file.key).context(
        "no heartbeat key: give --key file:PATH|credential:NAME|env:VAR or `key` in the agent file",
    )?;
    let key = SecretRef::parse(&key, &base).map_err(|e| anyhow::anyhow!("--key: {e}"))?;
    let boot_id = match args.boot_id.as_deref() {
        None => None,
        Some("random") => Some(rand::random::<[u8; 16]>()),
        Some(s) => Some(parse_boot_id(s).context("--boot-id is not a UUID")?),
    };
    let cfg = AgentConfig {
        node,
        appliance,
        key,
        interval: args
            .interval
            .or(file.interval)
            .unwrap_or(Duration::from_secs(1)),
        watchdog: WatchdogTarget::parse(
            args.watchdog.or(file.watchdog).as_deref().unwrap_or("none"),
        ),
        epoch: args.epoch.or(file.epoch).unwrap_or(0),
        virtual_node: args.virtual_node || file.virtual_node,
        boot_id,
        count: args.count,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the agent's runtime cannot start")?;
    rt.block_on(agent::run(cfg))?;
    Ok(0)
}
