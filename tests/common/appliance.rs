//! Helpers for tests that run `vigil run` against the lab with real QEMU twins.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Lab;

/// Tests of one binary run in parallel threads; those that boot QEMU twins take this first, so
/// that two of them never boot guests at once on this 2-core machine (a twin's TCG boot then
/// takes several times as long, and the tests' bounds are about vigil, not about the machine).
static TWINS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the twin-booting slot until dropped (a test that panicked leaves it usable).
pub fn twin_slot() -> std::sync::MutexGuard<'static, ()> {
    TWINS.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to print when a node does not get where a test waits for it: its fencing-log records
/// and the tail of the appliance's output.
pub fn explain(lab: &Lab, node: &str, app_log: &Path) -> String {
    let recs: Vec<String> = journal_lines(lab)
        .into_iter()
        .filter(|r| r["node"] == node)
        .map(|r| format!("#{} {} {}", r["seq"], r["kind"], r["message"]))
        .collect();
    let out = std::fs::read_to_string(app_log).unwrap_or_default();
    let tail: Vec<&str> = out.lines().rev().take(30).collect();
    format!(
        "{node}'s records:\n{}\nlast lines of {}:\n{}",
        recs.join("\n"),
        app_log.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// The fencing log's complete lines, as JSON (the appliance may be writing the last one).
pub fn journal_lines(lab: &Lab) -> Vec<Value> {
    let text =
        std::fs::read_to_string(lab.state_dir().join("appliance/fencing.log")).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The guest the twins boot: `target/guest`, built by scripts/test.sh.
pub fn guest() -> PathBuf {
    let g = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest");
    assert!(
        g.join("vmlinux").is_file() && g.join("initrd.gz").is_file(),
        "no guest in {}: run scripts/test.sh (it builds one)",
        g.display()
    );
    g
}

pub fn fast_rack(t: String) -> String {
    t.replace(
        "time_scale = 0.02",
        "time_scale = 0.005\nwatchdog_timeout_ms = 2000",
    )
}

/// The lab with twins enabled.
pub fn lab() -> Lab {
    let t = fast_rack(
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("hardware-lab/topologies/rack4.toml"),
        )
        .unwrap(),
    );
    Lab::start_with(&t, &["--guest", guest().to_str().unwrap()])
}

/// A running `vigil run`, its output captured to a file.
pub struct Appliance {
    pub child: Child,
    pub out: PathBuf,
}

impl Appliance {
    pub fn start(lab: &Lab, tag: &str) -> Appliance {
        Self::start_env(lab, tag, &[])
    }

    /// Started with `env` set (fault injection: `VIGIL_CRASH_AT`).
    pub fn start_env(lab: &Lab, tag: &str, env: &[(&str, &str)]) -> Appliance {
        let out = lab.dir.path().join(format!("vigil-{tag}.log"));
        let f = std::fs::File::create(&out).unwrap();
        let child = Command::new(assert_cmd::cargo::cargo_bin("vigil"))
            .args(["run", "--config"])
            .arg(lab.config_path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Appliance { child, out }
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// One HTTP request to the appliance's API.
pub fn api(lab: &Lab, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = lab.endpoints["api_listen"].as_str().unwrap();
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, Value::Null);
    };
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    // An appliance going down (killed, or stopping) may close the connection it just accepted:
    // no answer, as when it does not accept at all.
    if write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").is_err() {
        return (0, Value::Null);
    }
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    let Some((head, body)) = r.split_once("\r\n\r\n") else {
        return (0, Value::Null);
    };
    (
        head.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

pub fn state(lab: &Lab, node: &str) -> String {
    let (_, v) = api(lab, "GET", "/api/status", None);
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("")
        .to_string()
}

pub fn wait_state(lab: &Lab, node: &str, want: &str, within: Duration) {
    let t0 = Instant::now();
    loop {
        let s = state(lab, node);
        if s == want {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "{node} never became {want} within {within:?} (now {s:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn token(lab: &Lab) -> String {
    std::fs::read_to_string(lab.state_dir().join("secrets/api-token"))
        .unwrap()
        .trim()
        .to_string()
}

/// Live QEMU twins of `node` started by this lab's appliance (found by their process name and
/// their folder, so parallel tests do not count each other's).
pub fn twins(lab: &Lab, node: &str) -> usize {
    let mine = lab.state_dir().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| {
            c.starts_with("qemu-system")
                && c.contains(&format!("-name vigil-{node}-e"))
                && c.contains(&mine)
        })
        .count()
}

pub fn journal(lab: &Lab) -> Vec<vigil::journal::Record> {
    vigil::journal::verify(&lab.state_dir().join("appliance/fencing.log")).unwrap()
}

/// Safety invariants over the fencing log: no twin started without a confirmed (or
/// acknowledged) fence since the node's last power-on; never a power-on while a twin runs.
pub fn check_log_invariants(records: &[vigil::journal::Record], node: &str) {
    use vigil::journal::RecordKind as K;
    let mut fenced = false;
    let mut twin_running = false;
    for r in records.iter().filter(|r| r.node.as_deref() == Some(node)) {
        match r.kind {
            K::FenceConfirmed | K::AckOff => fenced = true,
            K::PowerOn => {
                assert!(
                    !twin_running,
                    "#{}: {node} powered on while its twin runs",
                    r.seq
                );
                fenced = false;
            }
            K::VmStart => {
                assert!(
                    fenced,
                    "#{}: a twin of {node} started without a confirmed fence",
                    r.seq
                );
                twin_running = true;
            }
            K::VmStopped | K::FailoverFailed => twin_running = false,
            _ => {}
        }
    }
}

/// Stops every twin this test's lab started (by the pid files of its VM folders).
pub fn stop_twins(lab: &Lab) {
    let vms = lab.state_dir().join("appliance/vms");
    for host in std::fs::read_dir(&vms)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        for vm in std::fs::read_dir(host.path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            if let Ok(pid) = std::fs::read_to_string(vm.path().join("qemu.pid")) {
                // (A QEMU the lab froze, its host hung, acts on the TERM once let go; a pid file
                // whose QEMU is gone answers "no such process", said nowhere.)
                for sig in ["-TERM", "-CONT"] {
                    let _ = Command::new("kill")
                        .args([sig, pid.trim()])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
            }
        }
    }
}

pub struct Cleanup<'a>(pub &'a Lab);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        stop_twins(self.0);
    }
}
