//! The `vigil-lab` binary: start a rack, inject faults into it, repair them, look at it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use vigil_lab::control;
use vigil_lab::faults::{Fault, FaultKind};
use vigil_lab::rack::{Endpoints, Rack, RackOptions, Topology};

/// vigil's hardware lab: a simulated rack of BMCs and operating systems on one machine.
#[derive(Debug, Parser)]
#[command(name = "vigil-lab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a rack and run until SIGINT or SIGTERM; writes DIR/endpoints.json and DIR/vigil.toml.
    Up {
        /// The topology file (see hardware-lab/topologies/).
        #[arg(long)]
        topology: PathBuf,
        /// Where the lab keeps its files (created if needed).
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Inject a fault into a server of a running lab.
    Inject {
        /// The running lab's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The server.
        server: String,
        /// The fault (os-hang, kernel-panic, post-hang, power-loss, psu-failure, vr-fault,
        /// thermal-trip, cpu-ierr, memory-uncorrectable, network-isolation, bmc-down, dark, slow,
        /// http-error, session-exhaustion, malformed-json, oversized-body, stale-power-state,
        /// bmc-reboot).
        fault: String,
        /// How long it lasts (lab time, e.g. "30s"); until repaired if absent.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// psu-failure: all PSUs (the server loses power), not one.
        #[arg(long)]
        all: bool,
        /// kernel-panic: panic in every boot.
        #[arg(long)]
        reboot_loop: bool,
        /// slow: the delay of every answer.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        delay: Duration,
        /// http-error: the status answered.
        #[arg(long, default_value_t = 503)]
        status: u16,
        /// http-error: how many requests get it.
        #[arg(long, default_value_t = 3)]
        count: u32,
    },
    /// End every fault of a server of a running lab.
    Repair {
        /// The running lab's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The server.
        server: String,
    },
    /// Show the state of a running lab's servers.
    Status {
        /// The running lab's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// One server only.
        server: Option<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: the runtime cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            topology,
            state_dir,
        } => {
            let t = Topology::load(&topology)?;
            let rack = Rack::start(&t, &state_dir, RackOptions::default())?;
            let e = &rack.endpoints;
            eprintln!(
                "lab \"{}\" is up: {} servers; control {}; vigil config {}",
                e.rack,
                e.servers.len(),
                e.control_url,
                e.vigil_config.display()
            );
            for (name, s) in &e.servers {
                eprintln!(
                    "  {name:<10} {:<8} {:<12} {}  ({})",
                    format!("{:?}", s.role).to_lowercase(),
                    s.firmware_profile,
                    s.redfish_url,
                    s.mockup
                );
            }
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            eprintln!("stopping the lab");
            rack.stop().await;
            Ok(())
        }
        Command::Inject {
            state_dir,
            server,
            fault,
            duration,
            all,
            reboot_loop,
            delay,
            status,
            count,
        } => {
            let Some(kind) = FaultKind::parse(&fault) else {
                let names: Vec<String> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                bail!("unknown fault {fault}; the lab knows: {}", names.join(", "));
            };
            let f = Fault {
                kind,
                duration_ms: duration.map(|d| d.as_millis() as u64),
                all,
                reboot_loop,
                delay_ms: delay.as_millis() as u64,
                status,
                count,
            };
            let e = Endpoints::load(&state_dir)?;
            let (code, body) = control::request(
                &e.control_url,
                "POST",
                &format!("/servers/{server}/inject"),
                Some(&serde_json::to_value(&f)?),
            )
            .await?;
            if code != 200 {
                bail!("the lab refused: {body}");
            }
            println!("{body}");
            Ok(())
        }
        Command::Repair { state_dir, server } => {
            let e = Endpoints::load(&state_dir)?;
            let (code, body) = control::request(
                &e.control_url,
                "POST",
                &format!("/servers/{server}/repair"),
                None,
            )
            .await?;
            if code != 200 {
                bail!("the lab refused: {body}");
            }
            println!("{body}");
            Ok(())
        }
        Command::Status { state_dir, server } => {
            let e = Endpoints::load(&state_dir)?;
            let path = match &server {
                Some(s) => format!("/servers/{s}"),
                None => "/servers".to_string(),
            };
            let (code, body) = control::request(&e.control_url, "GET", &path, None)
                .await
                .context("the lab is not answering")?;
            if code != 200 {
                bail!("the lab refused: {body}");
            }
            println!("{body}");
            Ok(())
        }
    }
}
