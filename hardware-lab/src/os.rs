//! The simulated operating system of a server: the real `vigil agent`, started when the server's
//! boot reaches "OS running" and dying with its power.
//!
//! Overview: one [`OsSim`] per server runs three things:
//! - the agent process, reconciled every tick with the server's OS state: started (with a fresh
//!   boot id) when the OS boots, frozen with SIGSTOP when it hangs (so its heartbeats and its
//!   watchdog pets stop, exactly as a hung kernel's would), thawed on repair, killed on power-off;
//! - a heartbeat relay: the agent sends to the relay's port, which forwards to the appliance
//!   unless the server's service network is cut (isolation, dark), so the agent itself never
//!   knows it is isolated, like a real one;
//! - the in-band watchdog channel: a unix datagram socket the agent pets through (the lab's
//!   stand-in for /dev/watchdog), which feeds the server's watchdog model; [`crate::ipmi_host`]
//!   passes the pets on to the server's real IPMI BMC.
//!
//! On a failover or backup server, [`host_vms`] makes the virtual nodes the appliance runs
//! there die with the server's power and freeze while its OS hangs.
//!
//! Scope: processes and sockets. What the OS state *is* comes from `server.rs`.
//!
//! Key types: [`OsSim`], [`host_vms`], [`find_vigil_binary`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::{UdpSocket, UnixDatagram};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::power::PowerEvent;
use crate::server::{OsState, SimServer};

/// How often the agent process is reconciled with the OS state.
const RECONCILE_EVERY: Duration = Duration::from_millis(50);

/// Finds the `vigil` binary: `$VIGIL_BIN`, else beside this executable (or one folder up, for
/// test executables in target/*/deps).
pub fn find_vigil_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIGIL_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("vigil"), dir.parent()?.join("vigil")]
        .into_iter()
        .find(|p| p.is_file())
}

/// The OS side of one server.
#[derive(Debug)]
pub struct OsSim {
    /// The server.
    pub server: Arc<SimServer>,
    /// The `vigil` binary the agent runs from.
    pub vigil: PathBuf,
    /// The heartbeat key file.
    pub key_file: PathBuf,
    /// The heartbeat interval.
    pub interval: Duration,
    /// The relay the agent sends to (bound).
    pub relay: std::net::UdpSocket,
    /// Where the relay forwards to (the appliance).
    pub appliance: SocketAddr,
    /// The watchdog channel's path.
    pub watchdog_path: PathBuf,
    /// Where the agent's output goes.
    pub log_path: PathBuf,
}

struct Agent {
    child: Child,
    stopped: bool,
}

impl Agent {
    fn pid(&self) -> Option<Pid> {
        self.child.id().map(|p| Pid::from_raw(p as i32))
    }

    fn signal(&mut self, sig: Signal) {
        if let Some(pid) = self.pid() {
            // The process may have exited on its own a moment ago; nothing to do then.
            let _gone = kill(pid, sig);
        }
    }
}

impl OsSim {
    /// Runs until `cancel`; the agent dies with it.
    pub async fn run(self, cancel: CancellationToken) -> std::io::Result<()> {
        self.relay.set_nonblocking(true)?;
        let relay = UdpSocket::from_std(self.relay.try_clone()?)?;
        let _stale = std::fs::remove_file(&self.watchdog_path);
        let wd = UnixDatagram::bind(&self.watchdog_path)?;
        let mut agent: Option<Agent> = None;
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        let mut buf = [0u8; 2048];
        let mut wbuf = [0u8; 64];
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                r = relay.recv_from(&mut buf) => {
                    let Ok((n, _from)) = r else { continue };
                    if self.server.heartbeat_passes() {
                        // A lost datagram is what UDP does; the appliance sees it as loss.
                        let _sent = relay.send_to(&buf[..n], self.appliance).await;
                    }
                }
                r = wd.recv(&mut wbuf) => {
                    if r.is_ok() {
                        self.server.pet_watchdog();
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.reconcile(&mut agent).await {
                        break Err(e);
                    }
                }
            }
        };
        if let Some(mut a) = agent.take() {
            // SIGKILL ends a stopped process too: it is never resumed to die (it would send
            // what its timers owe first).
            let _killed = a.child.kill().await;
        }
        let _removed = std::fs::remove_file(&self.watchdog_path);
        result
    }

    async fn reconcile(&self, agent: &mut Option<Agent>) -> std::io::Result<()> {
        let (events, os) = self.server.take_os_events();
        let rebooted = events
            .iter()
            .any(|e| matches!(e, PowerEvent::PoweredOff | PowerEvent::OsRunning));
        // The process may have died by itself (a crash): the OS is then seen as not running it.
        if let Some(a) = agent.as_mut()
            && let Ok(Some(_status)) = a.child.try_wait()
        {
            *agent = None;
        }
        let should_run = matches!(os, OsState::Running | OsState::Isolated | OsState::Hung);
        if (!should_run || rebooted)
            && let Some(mut a) = agent.take()
        {
            // Killed as it is, frozen or not: a hung OS that is reset or powered off sends
            // nothing more. (Resumed first, it sent the heartbeats and pets its timers owed,
            // after its BMC's watchdog had already acted.)
            let _killed = a.child.kill().await;
        }
        if should_run && agent.is_none() && os != OsState::Hung {
            *agent = Some(self.spawn()?);
        }
        if let Some(a) = agent.as_mut() {
            let frozen = os == OsState::Hung;
            if frozen != a.stopped {
                a.signal(if frozen {
                    Signal::SIGSTOP
                } else {
                    Signal::SIGCONT
                });
                a.stopped = frozen;
            }
        }
        Ok(())
    }

    fn spawn(&self) -> std::io::Result<Agent> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.vigil)
            .arg("agent")
            .args(["--node", &self.server.name])
            .args(["--appliance", &self.relay.local_addr()?.to_string()])
            .arg("--key")
            .arg(format!("file:{}", self.key_file.display()))
            .args(["--interval", &format!("{}ms", self.interval.as_millis())])
            .arg("--watchdog")
            .arg(format!("unix:{}", self.watchdog_path.display()))
            .args(["--boot-id", "random"])
            .env("VIGIL_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Agent {
            child,
            stopped: false,
        })
    }
}

/// The folder for the lab's unix sockets (short: unix socket paths are limited to 108 bytes).
pub fn socket_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("wd")
}

/// A failover or backup server's virtual nodes live on its power and its kernel: while the
/// server is off, none of them runs; while its OS hangs, none of them is scheduled. The appliance
/// starts them with real QEMU on this machine, in `vms_dir/<vm>/` (its QEMU driver's folder for
/// this host). Each time the server goes off (read off, or a reset or cycle passed through off),
/// every QEMU of that folder is killed (SIGKILL, by the PID it wrote, checked to be that QEMU)
/// within [`HOST_VMS_EVERY`], well before a fence can confirm the Off (two reads 150 ms apart);
/// while its OS is hung they are frozen (SIGSTOP), and they go on (SIGCONT) when it runs again
/// or this task ends. The appliance then finds its twins there stopped, or silent, as it would
/// on a real host that lost power or whose kernel hung. Runs until `cancel`.
pub async fn host_vms(
    server: Arc<SimServer>,
    vms_dir: PathBuf,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    // The QEMUs this task froze, to be let go when the OS runs again.
    let mut frozen: std::collections::BTreeSet<i32> = std::collections::BTreeSet::new();
    let mut offs_seen = server.state().power_offs;
    loop {
        let (off, hung, offs) = {
            let st = server.state();
            (
                st.power.power_state() == crate::power::PowerState::Off,
                st.os == OsState::Hung,
                st.power_offs,
            )
        };
        let went_off = off || offs != offs_seen;
        offs_seen = offs;
        if went_off || hung {
            for (vm, pid) in host_qemus(&vms_dir) {
                if went_off {
                    tracing::info!(server = %server.name, vm = %vm, pid, "the host went off: its virtual node dies with it");
                    let _gone = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    frozen.remove(&pid);
                } else if frozen.insert(pid) {
                    tracing::info!(server = %server.name, vm = %vm, pid, "the host's OS hangs: its virtual node is frozen with it");
                    let _gone = kill(Pid::from_raw(pid), Signal::SIGSTOP);
                }
            }
        }
        if !hung || went_off {
            for pid in std::mem::take(&mut frozen) {
                // (Only a PID this task froze, and only while it is still a QEMU of this host.)
                if host_qemus(&vms_dir).iter().any(|(_, p)| *p == pid) {
                    let _gone = kill(Pid::from_raw(pid), Signal::SIGCONT);
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                // Nothing is left stopped behind the lab (a stopped QEMU ignores SIGTERM).
                for pid in frozen {
                    if host_qemus(&vms_dir).iter().any(|(_, p)| *p == pid) {
                        let _gone = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    }
                }
                return Ok(());
            }
            _ = tokio::time::sleep(HOST_VMS_EVERY) => {}
        }
    }
}

/// How often [`host_vms`] reads its server's power and OS.
pub const HOST_VMS_EVERY: Duration = Duration::from_millis(20);

/// The QEMUs of a host's VM folder that still run: (VM, PID), each PID read from the VM's pid
/// file and checked against its command line (the file may be stale and the number reused).
fn host_qemus(vms_dir: &Path) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for vm in std::fs::read_dir(vms_dir).into_iter().flatten().flatten() {
        let Ok(pid) = std::fs::read_to_string(vm.path().join("qemu.pid")) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(&*vm.path().to_string_lossy()) {
            out.push((vm.file_name().to_string_lossy().into_owned(), pid));
        }
    }
    out
}
