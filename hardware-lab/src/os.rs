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
//!   stand-in for /dev/watchdog), which feeds the server's watchdog model.
//!
//! Scope: processes and sockets. What the OS state *is* comes from `server.rs`.
//!
//! Key types: [`OsSim`], [`find_vigil_binary`].

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
            a.signal(Signal::SIGCONT);
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
            a.signal(Signal::SIGCONT);
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
