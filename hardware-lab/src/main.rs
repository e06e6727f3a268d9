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
        /// A built guest (vmlinux, initrd.gz) that the failover and backup servers boot twins from.
        #[arg(long)]
        guest: Option<PathBuf>,
        /// No IPMI BMCs (ipmi_sim), even where the topology asks for them.
        #[arg(long)]
        no_ipmi: bool,
    },
    /// Scale mode: N Redfish BMCs (127.64.0.1, 127.64.0.2, ..., one port) and their nodes'
    /// heartbeat senders in this one process, until SIGINT or SIGTERM; writes DIR/scale.json
    /// (the control API: /scale/stats, /scale/reset, /scale/inject?node=&fault=, /scale/repair)
    /// and DIR/vigil.toml (observe mode).
    Scale {
        /// How many nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Where the lab keeps its files (created if needed).
        #[arg(long)]
        state_dir: PathBuf,
        /// How often each node sends a heartbeat.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        heartbeat_interval: Duration,
        /// How often vigil is told to poll each BMC.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        poll_interval: Duration,
        /// The OS watchdog timeout (an OS hang's SEL record comes after it).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        watchdog_timeout: Duration,
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
        /// heartbeat-loss: the share of heartbeats lost, percent.
        #[arg(long, default_value_t = 50)]
        percent: u8,
    },
    /// End every fault of a server of a running lab.
    Repair {
        /// The running lab's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The server.
        server: String,
    },
    /// Inject transient noise into a running lab for a while: slow and erroring BMCs, BMC
    /// reboots, 1 s heartbeat blackouts, 50 % heartbeat loss bursts. None of it may make vigil
    /// fence anybody.
    Soak {
        /// The running lab's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// How long.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Only these servers (default: every node).
        #[arg(long)]
        server: Vec<String>,
    },
    /// ipmi_sim's chassis_control program (run by ipmi_sim, not by people): `get power`,
    /// `set power 0`, ... answered from the lab's power model through the control API.
    #[command(hide = true)]
    IpmiChassis {
        /// The lab's control API.
        #[arg(long)]
        control_url: String,
        /// The server.
        #[arg(long)]
        server: String,
        /// What ipmi_sim appends: get power | set power 0 | ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check the scenario files (hardware-lab/scenarios/*.toml) and list them.
    Scenarios,
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
    // chassis_control runs per IPMI request while ipmi_sim waits: no runtime, no logging set-up.
    if let Command::IpmiChassis {
        control_url,
        server,
        args,
    } = &cli.command
    {
        let code = vigil_lab::ipmi::chassis_main(control_url, server, args);
        return ExitCode::from(code as u8);
    }
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
            guest,
            no_ipmi,
        } => {
            let t = Topology::load(&topology)?;
            let guest = match guest {
                Some(g) => Some(
                    g.canonicalize()
                        .with_context(|| format!("guest folder {} cannot be found", g.display()))?,
                ),
                None => None,
            };
            let rack = Rack::start(
                &t,
                &state_dir,
                RackOptions {
                    agents: true,
                    guest,
                    no_ipmi,
                },
            )?;
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
        Command::Scale {
            nodes,
            state_dir,
            heartbeat_interval,
            poll_interval,
            watchdog_timeout,
        } => {
            let cancel = tokio_util::sync::CancellationToken::new();
            let opts = vigil_lab::scale::ScaleOptions {
                nodes,
                heartbeat_interval,
                poll_interval,
                watchdog_timeout,
            };
            let lab = vigil_lab::scale::ScaleLab::start(&opts, &state_dir, &cancel).await?;
            let e = &lab.endpoints;
            eprintln!(
                "scale lab is up in {} ms: {} BMCs on {}..:{}, control {}; vigil config {}",
                e.started_in_ms,
                e.nodes,
                e.first_address,
                e.port,
                e.control_url,
                e.vigil_config.display()
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            eprintln!("stopping the scale lab");
            cancel.cancel();
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
            percent,
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
                percent,
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
        Command::Soak {
            state_dir,
            duration,
            server,
        } => soak(&state_dir, duration, server).await,
        Command::IpmiChassis { .. } => unreachable!("handled before the runtime starts"),
        Command::Scenarios => {
            let all = vigil_lab::scenario::Scenario::all()?;
            for s in &all {
                for e in &s.expect {
                    println!(
                        "{:<22} {:<8} {:<34} within {:<5} then {:?}",
                        s.name, e.node, e.verdict, e.within, e.outcome
                    );
                }
            }
            println!("{} scenarios, all valid", all.len());
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

/// One noise of the soak, on one server.
fn noise(n: u32) -> Fault {
    let r = |lo: u64, hi: u64| lo + rand::random::<u64>() % (hi - lo + 1);
    match n % 6 {
        0 => Fault {
            delay_ms: r(300, 1500),
            duration_ms: Some(r(2000, 5000)),
            ..Fault::new(FaultKind::Slow)
        },
        1 => Fault {
            status: if rand::random::<bool>() { 503 } else { 500 },
            count: r(1, 2) as u32,
            duration_ms: Some(5000),
            ..Fault::new(FaultKind::HttpError)
        },
        2 => Fault {
            duration_ms: Some(1000),
            ..Fault::new(FaultKind::NetworkIsolation)
        },
        3 => Fault {
            percent: 50,
            duration_ms: Some(5000),
            ..Fault::new(FaultKind::HeartbeatLoss)
        },
        4 => Fault {
            duration_ms: Some(r(1000, 2000)),
            ..Fault::new(FaultKind::BmcReboot)
        },
        _ => Fault {
            delay_ms: r(100, 400),
            duration_ms: Some(r(3000, 8000)),
            ..Fault::new(FaultKind::Slow)
        },
    }
}

async fn soak(
    state_dir: &std::path::Path,
    duration: Duration,
    only: Vec<String>,
) -> anyhow::Result<()> {
    let e = Endpoints::load(state_dir)?;
    let servers: Vec<String> = if only.is_empty() {
        e.servers
            .iter()
            .filter(|(_, s)| s.role == vigil_lab::rack::Role::Node)
            .map(|(n, _)| n.clone())
            .collect()
    } else {
        only
    };
    if servers.is_empty() {
        bail!("no server to soak");
    }
    let deadline = tokio::time::Instant::now() + duration;
    let mut counts: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    while tokio::time::Instant::now() < deadline {
        let s = &servers[rand::random::<u64>() as usize % servers.len()];
        let f = noise(rand::random::<u32>());
        let (code, body) = control::request(
            &e.control_url,
            "POST",
            &format!("/servers/{s}/inject"),
            Some(&serde_json::to_value(&f)?),
        )
        .await?;
        if code != 200 {
            bail!("the lab refused: {body}");
        }
        *counts.entry(f.kind.name()).or_default() += 1;
        let pause = 1000 + rand::random::<u64>() % 2000;
        tokio::time::sleep(
            Duration::from_millis(pause)
                .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
    // Let the last noises end by themselves before reporting.
    tokio::time::sleep(Duration::from_secs(8)).await;
    println!("{}", serde_json::to_string(&counts)?);
    Ok(())
}
