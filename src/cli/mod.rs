//! The command line: clap types and one function per subcommand.
//!
//! Overview: `main.rs` parses [`Cli`], installs logging and calls [`run`], which returns the
//! process exit code. Subcommands print for people by default and JSON with `--json`.
//!
//! Scope: argument parsing, printing and exit codes; the work itself is in the library modules.
//!
//! Key types: [`Cli`], [`Command`].

mod agent;
mod check_config;
mod daemon;
mod demo;
mod failover_plan;
mod fence;
pub mod log;
mod probe;
pub mod profile;
pub mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// vigil: out-of-band failover for bare-metal clusters.
#[derive(Debug, Parser)]
#[command(name = "vigil", version, about, long_about = None)]
pub struct Cli {
    /// How log lines are written (stderr; journald under systemd).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file and report every problem, with file:line:column.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
        /// Print problems (and, with --show, the configuration) as JSON.
        #[arg(long)]
        json: bool,
        /// Print the effective configuration, defaults filled in (secrets as references).
        #[arg(long)]
        show: bool,
    },
    /// Run the heartbeat agent of a node (on the node, or inside a virtual node).
    Agent(agent::AgentArgs),
    /// Read each path to machines' BMCs now and print what they see, side by side.
    Probe {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Nodes or hosts to probe.
        machines: Vec<String>,
        /// Probe every node and host.
        #[arg(long)]
        all: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Observe mode: detect and diagnose only, never act; print each verdict as it changes.
    Watch {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Only this node (or host).
        node: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this long (default: until SIGINT/SIGTERM).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// The demo: the lab's rack, the appliance, a hardware fault and a software hang failed
    /// over to QEMU twins, and a summary.
    Demo {
        /// A built guest (vmlinux, initrd.gz); scripts/demo.sh builds one in target/guest.
        #[arg(long, default_value = "target/guest")]
        guest: PathBuf,
        /// Where to keep the lab's files and the fencing log (default: a new folder in /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the appliance: watch, diagnose, fence, fail over, fail back (under systemd).
    Run {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Stop after this long (tests).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// The rack as the running appliance sees it, as a table.
    Status {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fail a node over by hand (fence, then boot its twin), through the running appliance;
    /// --dry-run shows the twin's spec, fidelity report and placement.
    Failover {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The node.
        node: String,
        /// Show what would happen; do nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Fail a node back from its twin (stop the twin, confirm, power the node on).
    Failback {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The node.
        node: String,
        /// Move to the server now in the node's place even where its hardware differs from the
        /// recorded profile (a replacement server): the differences are logged and the profile
        /// recorded anew. Without it, such a failback is refused and the differences shown.
        #[arg(long)]
        accept_profile: bool,
    },
    /// Move a node's running twin to another failover or backup server, through the running
    /// appliance: stopped and confirmed stopped where it runs, then started there (an outage for
    /// its workload from the stop to the new twin's first heartbeat).
    Move {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The node whose twin moves.
        node: String,
        /// The failover or backup server it goes to.
        #[arg(long)]
        to: String,
    },
    /// Make the rebalance move the running appliance proposes (a twin off a failover server past
    /// its load mark, to a backup server), or show it (--dry-run).
    Rebalance {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Show the proposed move; do nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Fence a node by hand (confirmed power-off), show the plan (--dry-run), or record an
    /// operator's confirmation that it is off (--ack-off).
    Fence {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The node.
        node: String,
        /// Show the plan and check each method's reachability and credentials; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Use only this path's method (redfish or ipmi), e.g. when the other is known broken.
        #[arg(long, value_parser = ["redfish", "ipmi"])]
        method: Option<String>,
        /// Record that you made sure the node is off (it lets a pending failover proceed).
        #[arg(long)]
        ack_off: bool,
        /// Who acknowledges (default: $SUDO_USER or $USER).
        #[arg(long)]
        by: Option<String>,
        /// What you did to make sure it is off.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Power a repaired node on for inspection (refused while its virtual twin runs).
    PowerOn {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The node.
        node: String,
    },
    /// The fencing log: a readable timeline, or `verify` to check its hash chain.
    Log {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// `verify` checks the chain instead of printing.
        action: Option<LogAction>,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// Only since this time ("2h", or "2026-11-28T03:00:00Z").
        #[arg(long)]
        since: Option<String>,
        /// Keep printing records as they are written.
        #[arg(long)]
        follow: bool,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
    },
    /// Hardware profiles: what each node's virtual twin must look like.
    Profile {
        /// What to do.
        #[command(subcommand)]
        action: ProfileAction,
    },
}

/// `vigil log` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogAction {
    /// Check the hash chain: every record present, in order, unedited.
    Verify,
}

/// `vigil profile` subcommands.
#[derive(Debug, Subcommand)]
pub enum ProfileAction {
    /// Capture nodes' hardware profiles from their BMCs into the state directory.
    Capture {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Nodes to capture.
        nodes: Vec<String>,
        /// Capture every node.
        #[arg(long)]
        all: bool,
        /// Show what changed since the previous capture.
        #[arg(long)]
        diff: bool,
    },
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::CheckConfig { file, json, show } => check_config::run(&file, json, show),
        Command::Agent(args) => agent::run(args),
        Command::Run { config, duration } => daemon::run(&config, duration),
        Command::Demo { guest, dir } => demo::run(&guest, dir),
        Command::Status { config, json } => daemon::status(&config, json),
        Command::Failover {
            config,
            node,
            dry_run,
        } => daemon::failover(&config, &node, dry_run),
        Command::Failback {
            config,
            node,
            accept_profile,
        } => daemon::failback(&config, &node, accept_profile),
        Command::Move { config, node, to } => daemon::move_twin(&config, &node, &to),
        Command::Rebalance { config, dry_run } => daemon::rebalance(&config, dry_run),
        Command::Watch {
            config,
            node,
            json,
            duration,
        } => watch::run(&config, node.as_deref(), json, duration),
        Command::Fence {
            config,
            node,
            dry_run,
            method,
            ack_off,
            by,
            reason,
        } => fence::run(
            &config,
            &node,
            dry_run,
            method.as_deref(),
            ack_off,
            by,
            reason,
        ),
        Command::PowerOn { config, node } => fence::power_on(&config, &node),
        Command::Log {
            config,
            action: Some(LogAction::Verify),
            ..
        } => log::verify(&config),
        Command::Log {
            config,
            action: None,
            node,
            since,
            follow,
            json,
        } => log::show(&config, node.as_deref(), since.as_deref(), follow, json),
        Command::Probe {
            config,
            machines,
            all,
            json,
        } => probe::run(&config, &machines, all, json),
        Command::Profile {
            action:
                ProfileAction::Capture {
                    config,
                    nodes,
                    all,
                    diff,
                },
        } => profile::capture(&config, &nodes, all, diff),
    }
}
