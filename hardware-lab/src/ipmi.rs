//! The lab's IPMI BMCs: one real OpenIPMI `ipmi_sim` per server, kept in step with the server.
//!
//! Overview: [`IpmiSim::spawn`] renders `hardware-lab/ipmi/` (lan.conf, node.emu, node.sdrs
//! compiled with `sdrcomp -8`) for one server and starts `ipmi_sim` on 127.0.0.1 with SIGPIPE
//! ignored (see the recipe's gotchas). Power goes through `chassis_control`, which runs
//! `vigil-lab ipmi-chassis`: it asks the lab's control API, so IPMI and Redfish read and act on
//! the same power model. [`sync`] is one task per server that mirrors the server into the BMC:
//! the faults in force become the console lines of `faults.tsv` (sensors change, the SEL gets
//! the records ipmitool shows), a watchdog expiry asserts the watchdog sensor, and when the BMC
//! is down (bmc-down, dark, bmc-reboot, ipmi-down) the process is stopped and started again on
//! the way up (sessions lost, SEL kept, sensor states restored silently).
//!
//! The watchdog is armed and petted in-band by [`crate::ipmi_host`]. With an action (hard reset,
//! power down, power cycle), ipmi_sim counts it down, logs the expiry, sets Get Watchdog Timer's
//! expiration flag and acts; this task clears sensor 0 afterwards. A status-only watchdog never
//! runs in ipmi_sim, so its expiry is the lab model's, mirrored as the Watchdog2 sensor and its
//! SEL record, without the expiration flag. Limits, on purpose: Get Chassis Status's fault
//! bits and last power event are constant in ipmi_sim (README.md): power faults show in the
//! sensors and the SEL, as on most real BMCs.
//!
//! Key types: [`IpmiSim`], [`sync`].

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::faults::FaultKind;
use crate::server::SimServer;

const LAN_CONF: &str = include_str!("../ipmi/lan.conf.tmpl");
const NODE_EMU: &str = include_str!("../ipmi/node.emu.tmpl");
const NODE_SDRS: &str = include_str!("../ipmi/node.sdrs");
/// The console lines per fault (one source for the lab and `verify.sh`).
pub const FAULTS_TSV: &str = include_str!("../ipmi/faults.tsv");

/// One running `ipmi_sim`.
#[derive(Debug)]
pub struct IpmiSim {
    name: String,
    /// UDP port of RMCP/RMCP+.
    pub port: u16,
    /// TCP port of the console.
    pub console_port: u16,
    /// TCP port of the system interface (VM codec): [`host`] connects here as the host.
    pub host_port: u16,
    cmd: Vec<String>,
    state_dir: PathBuf,
    child: Option<Child>,
}

/// The `vigil-lab` binary (for chassis_control): this one, or the one beside the test binary.
pub fn find_lab_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIGIL_LAB_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    if exe.file_name().is_some_and(|n| n == "vigil-lab") {
        return Some(exe);
    }
    let dir = exe.parent()?;
    [dir.join("vigil-lab"), dir.parent()?.join("vigil-lab")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Whether `ipmi_sim` and `sdrcomp` are installed (Debian package openipmi).
pub fn available() -> bool {
    ["ipmi_sim", "sdrcomp"].iter().all(|b| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()))
    })
}

impl IpmiSim {
    /// Renders the configuration for `name` under `dir` and starts the BMC; returns once it
    /// answers an RMCP presence ping.
    pub fn spawn(
        name: &str,
        dir: &Path,
        user: &str,
        password: &str,
        control_url: &str,
    ) -> anyhow::Result<Self> {
        if user.len() > 16 || password.len() > 16 {
            bail!("{name}: ipmi_sim takes a user name and a password of 16 bytes at most");
        }
        let lab = find_lab_binary().context(
            "the vigil-lab binary (ipmi_sim's chassis_control) cannot be found: build it or set VIGIL_LAB_BIN",
        )?;
        let state_dir = dir.join(name);
        let sim_dir = state_dir.join("ipmi_sim").join(name);
        // A fresh BMC: no SEL or users left from an earlier run.
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&sim_dir)?;
        let sdrs = state_dir.join("node.sdrs");
        std::fs::write(&sdrs, NODE_SDRS)?;
        let out = Command::new("sdrcomp")
            .arg("-8")
            .arg("-o")
            .arg(sim_dir.join("sdr.20.main"))
            .arg(&sdrs)
            .output()
            .context("sdrcomp cannot run (install the openipmi package)")?;
        if !out.status.success() {
            bail!(
                "sdrcomp failed on node.sdrs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let guid: String = {
            use sha2::Digest;
            sha2::Sha256::digest(name.as_bytes())[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let chassis = format!(
            "{} ipmi-chassis --control-url '{control_url}' --server {name}",
            lab.display()
        );
        // Its three ports come from below the ephemeral range: vigil's API and heartbeat ports
        // (and the tests' sockets) are ephemeral ports picked and released before the daemon
        // binds them, and an ipmi_sim of a lab started meanwhile must not take one of them.
        // Two labs may still draw the same low port: ipmi_sim then exits at once, naming it,
        // and the BMC is started again on other ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = crate::rack::free_low_port(false)?;
            let console_port = crate::rack::free_low_port(true)?;
            let host_port = crate::rack::free_low_port(true)?;
            let render = |t: &str| {
                t.replace("{{NAME}}", name)
                    .replace("{{PORT}}", &port.to_string())
                    .replace("{{CONSOLE_PORT}}", &console_port.to_string())
                    .replace("{{HOST_PORT}}", &host_port.to_string())
                    .replace("{{USER}}", user)
                    .replace("{{PASSWORD}}", password)
                    .replace("{{GUID}}", &guid)
                    .replace("{{CHASSIS_CONTROL}}", &chassis)
            };
            let lan = state_dir.join("lan.conf");
            let emu = state_dir.join("node.emu");
            std::fs::write(&lan, render(LAN_CONF))?;
            std::fs::set_permissions(&lan, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            std::fs::write(&emu, render(NODE_EMU))?;
            // SIGPIPE ignored: a console client that goes away must not kill the BMC.
            let cmd = vec![
                "sh".to_string(),
                "-c".to_string(),
                format!(
                    "trap '' PIPE; exec ipmi_sim -c '{}' -f '{}' -s '{}' -n",
                    lan.display(),
                    emu.display(),
                    state_dir.display()
                ),
            ];
            let mut sim = IpmiSim {
                name: name.to_string(),
                port,
                console_port,
                host_port,
                cmd,
                state_dir: state_dir.clone(),
                child: None,
            };
            match sim.start() {
                Ok(()) => return Ok(sim),
                Err(e) if attempt < 5 && format!("{e:#}").contains("in use") => {
                    tracing::debug!(server = name, error = %format!("{e:#}"), "ipmi_sim port taken: other ports");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the process (again) and waits until it answers.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.state_dir.join("ipmi_sim.log"))?;
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("ipmi_sim cannot start (install the openipmi package)")?;
        self.child = Some(child);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                let log = std::fs::read_to_string(self.state_dir.join("ipmi_sim.log"))
                    .unwrap_or_default();
                bail!("{}: ipmi_sim exited ({status}): {}", self.name, log.trim());
            }
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        bail!(
            "{}: ipmi_sim does not answer on UDP port {} (a bad node.emu line leaves it without LAN)",
            self.name,
            self.port
        )
    }

    /// Whether the process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the process (SIGTERM, by its PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = c.wait();
        }
    }

    /// Sends console lines; returns the error lines (`**...`) ipmi_sim printed.
    pub fn console(&self, lines: &[String]) -> anyhow::Result<Vec<String>> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.console_port))
            .with_context(|| format!("{}: the ipmi_sim console cannot be reached", self.name))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut errors = Vec::new();
        read_prompt(&mut s)?;
        for l in lines {
            s.write_all(format!("{l}\n").as_bytes())?;
            let text = read_prompt(&mut s)?;
            errors.extend(
                text.lines()
                    .map(|l| l.trim_matches(['\r', ' ']))
                    .filter(|l| l.starts_with("**"))
                    .map(String::from),
            );
        }
        Ok(errors)
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads up to the next `> ` prompt at the start of a line (log lines may come first).
fn read_prompt(s: &mut std::net::TcpStream) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 512];
    loop {
        let n = s
            .read(&mut b)
            .context("the ipmi_sim console stopped answering")?;
        if n == 0 {
            bail!("the ipmi_sim console closed");
        }
        buf.extend_from_slice(&b[..n]);
        let t = String::from_utf8_lossy(&buf);
        if t.ends_with("> ")
            && (t.len() == 2 || t[..t.len() - 2].ends_with(['\n', '\r', '\u{1}', '\u{3}']))
        {
            return Ok(t.into_owned());
        }
    }
}

/// An RMCP/ASF presence ping (DMTF ASF 2.0 §3.2.4.3): the cheapest "is the BMC there".
pub fn ping(port: u16) -> bool {
    let Ok(s) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let pkt = [
        0x06, 0x00, 0xff, 0x06, 0x00, 0x00, 0x11, 0xbe, 0x80, 0x01, 0x00, 0x00,
    ];
    if s.send_to(&pkt, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut b = [0u8; 64];
    matches!(s.recv(&mut b), Ok(n) if n >= 8 && b[8] == 0x40)
}

/// The faults `faults.tsv` has lines for, as keys there.
fn fault_key(kind: FaultKind, all: bool) -> Option<&'static str> {
    Some(match kind {
        FaultKind::ThermalTrip => "thermal-trip",
        FaultKind::PsuFailure if all => "psu-failure-all",
        FaultKind::PsuFailure => "psu-failure",
        FaultKind::PowerLoss => "power-loss",
        FaultKind::VrFault => "vr-fault",
        FaultKind::CpuIerr => "cpu-ierr",
        FaultKind::MemoryUncorrectable => "memory-uncorrectable",
        FaultKind::KernelPanic => "kernel-panic",
        FaultKind::PostHang => "post-hang",
        _ => return None,
    })
}

/// The console lines of `fault` for `phase` (inject or repair).
pub fn fault_lines(fault: &str, phase: &str) -> Vec<String> {
    FAULTS_TSV
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut c = l.splitn(3, '\t');
            (c.next()? == fault && c.next()? == phase).then(|| c.next().map(String::from))?
        })
        .collect()
}

/// The same lines with event generation off and SEL additions left out: restores sensor states
/// after a BMC restart without logging the events a second time.
fn silently(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| !l.starts_with("sel_add"))
        .map(|l| match l.rsplit_once(' ') {
            Some((head, "1")) => format!("{head} 0"),
            _ => l,
        })
        .collect()
}

/// Mirrors `server` into its BMC until `cancel`; stops the BMC at the end.
pub async fn sync(
    server: Arc<SimServer>,
    sim: IpmiSim,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let sim = Arc::new(std::sync::Mutex::new(sim));
    let mut applied: BTreeSet<&'static str> = BTreeSet::new();
    let mut watchdog_asserted = false;
    // Expiries whose action bit was cleared in sensor 0 (ipmi_sim logs an expiry only when the
    // bit changes, and never clears it: README.md, Watchdog 7).
    let mut expiries_cleared = 0;
    loop {
        let (want, expired, down, to_clear) = {
            let s = server.state();
            let now = server.clock.now();
            let want: BTreeSet<&'static str> = s
                .faults
                .iter()
                .filter_map(|(f, _)| fault_key(f.kind, f.all))
                .collect();
            let down = !s.bmc_reachable(now) || s.mood.ipmi_down;
            let w = s.watchdog;
            // Status only: the model's expiry is mirrored into sensor 0. With an action,
            // ipmi_sim's own expiry wrote it; its bit is cleared once the next OS has armed
            // the timer, so that the next expiry logs again.
            let status_only = w.action == crate::server::WatchdogAction::None;
            let to_clear =
                (!status_only && w.armed && w.expiries > expiries_cleared).then_some(w.expiries);
            (want, status_only && w.expired, down, to_clear)
        };
        let sim2 = sim.clone();
        let step = {
            let applied = applied.clone();
            let want = want.clone();
            tokio::task::spawn_blocking(
                move || -> anyhow::Result<(BTreeSet<&'static str>, bool)> {
                    let mut sim = sim2.lock().unwrap_or_else(|p| p.into_inner());
                    if down {
                        if sim.running() {
                            tracing::info!(server = %sim.name, "IPMI BMC down");
                            sim.stop();
                        }
                        return Ok((applied, watchdog_asserted));
                    }
                    let mut applied = applied;
                    let mut wd = watchdog_asserted;
                    if !sim.running() {
                        sim.start()?;
                        tracing::info!(server = %sim.name, "IPMI BMC up again");
                        // Sensor states are not persisted by ipmi_sim: restore them silently.
                        let mut lines = Vec::new();
                        for f in &applied {
                            lines.extend(silently(fault_lines(f, "inject")));
                        }
                        if wd {
                            lines.push("sensor_set_bit 0x20 0 0 0 1 0".into());
                        }
                        sim.console(&lines)?;
                    }
                    let mut lines = Vec::new();
                    for f in applied.difference(&want) {
                        lines.extend(fault_lines(f, "repair"));
                    }
                    for f in want.difference(&applied) {
                        lines.extend(fault_lines(f, "inject"));
                    }
                    if expired != wd {
                        // Expiry logs "Timer expired"; the re-arm clears it silently (ipmi_sim
                        // never clears it itself, README gotcha 8).
                        lines.push(if expired {
                            "sensor_set_bit 0x20 0 0 0 1 1".into()
                        } else {
                            "sensor_set_bit 0x20 0 0 0 0 0".into()
                        });
                        wd = expired;
                    }
                    if to_clear.is_some() {
                        lines.extend((1..=3).map(|o| format!("sensor_set_bit 0x20 0 0 {o} 0 0")));
                    }
                    if !lines.is_empty() {
                        let errors = sim.console(&lines)?;
                        if !errors.is_empty() {
                            tracing::warn!(server = %sim.name, ?errors, "ipmi_sim refused console lines");
                        }
                    }
                    applied = want;
                    Ok((applied, wd))
                },
            )
        };
        match step.await {
            Ok(Ok((a, wd))) => {
                applied = a;
                watchdog_asserted = wd;
                if let Some(n) = to_clear {
                    expiries_cleared = n;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "IPMI BMC sync failed"),
            Err(e) => tracing::warn!(error = %e, "IPMI BMC sync panicked"),
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = server.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let _ =
        tokio::task::spawn_blocking(move || sim.lock().unwrap_or_else(|p| p.into_inner()).stop())
            .await;
    Ok(())
}

/// `vigil-lab ipmi-chassis`: ipmi_sim's chassis_control program. Blocking std I/O and no
/// runtime: ipmi_sim waits for it, so it must answer in milliseconds.
pub fn chassis_main(control_url: &str, server: &str, args: &[String]) -> i32 {
    let host = control_url.trim_start_matches("http://");
    let path = format!("/servers/{server}/ipmi/chassis");
    let (method, body) = match args {
        [op, _] if op == "get" => ("GET", String::new()),
        [op, what, value] if op == "set" => (
            "POST",
            serde_json::json!({ "op": what, "value": value }).to_string(),
        ),
        _ => {
            println!("usage: ipmi-chassis get power|boot | set OP VALUE");
            return 1;
        }
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let res = (|| -> std::io::Result<String> {
        let addr: std::net::SocketAddr = host
            .parse()
            .map_err(|_| std::io::Error::other("bad control URL"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        s.take(64 << 10).read_to_string(&mut out)?;
        Ok(out)
    })();
    let text = match res {
        Ok(t) => t,
        Err(e) => {
            println!("lab control API unreachable: {e}");
            return 1;
        }
    };
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        println!("lab control API answered something that is not HTTP");
        return 1;
    };
    let ok = head
        .split_whitespace()
        .nth(1)
        .is_some_and(|s| s.starts_with('2'));
    if !ok {
        println!("lab refused: {}", body.lines().next().unwrap_or(""));
        return 1;
    }
    if method == "GET" {
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        match args[1].as_str() {
            "power" => println!("power:{}", v["power"].as_u64().unwrap_or(0)),
            "boot" => println!("boot:{}", v["boot"].as_str().unwrap_or("default")),
            other => {
                println!("unknown parameter {other}");
                return 1;
            }
        }
    }
    0
}
