//! Test helpers: the hardware lab as a child process (the appliance never links the lab, and
//! neither do its tests), and its control API.

#![allow(dead_code)] // Each test crate uses a different subset of these helpers.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod appliance;

/// The `vigil-lab` binary built beside this test (cargo test --workspace builds it).
pub fn lab_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("vigil-lab");
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// A running lab, stopped (SIGTERM, then waited for) when dropped.
pub struct Lab {
    child: Child,
    pub dir: tempfile::TempDir,
    pub endpoints: Value,
}

impl Lab {
    /// Starts `topology` (a file under hardware-lab/topologies, or a TOML text) and waits for it.
    pub fn start(topology_text: &str) -> Lab {
        Lab::start_with(topology_text, &[])
    }

    /// Starts a topology with extra `vigil-lab up` arguments (such as `--guest DIR`).
    pub fn start_with(topology_text: &str, extra: &[&str]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let topo = dir.path().join("topology.toml");
        std::fs::write(&topo, topology_text).unwrap();
        let state = dir.path().join("lab");
        let log = std::fs::File::create(dir.path().join("lab.log")).unwrap();
        let child = Command::new(lab_binary())
            .arg("up")
            .arg("--topology")
            .arg(&topo)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .env("VIGIL_BIN", assert_cmd::cargo::cargo_bin("vigil"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let ep = state.join("endpoints.json");
        let t0 = Instant::now();
        while !ep.is_file() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the lab did not come up: {}",
                std::fs::read_to_string(dir.path().join("lab.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let endpoints = serde_json::from_str(&std::fs::read_to_string(&ep).unwrap()).unwrap();
        Lab {
            child,
            dir,
            endpoints,
        }
    }

    /// The rack4 topology with a few settings changed.
    pub fn rack4(edit: impl FnOnce(String) -> String) -> Lab {
        let t = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("hardware-lab/topologies/rack4.toml"),
        )
        .unwrap();
        Lab::start(&edit(t))
    }

    pub fn config_path(&self) -> PathBuf {
        PathBuf::from(self.endpoints["vigil_config"].as_str().unwrap())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    /// A control API call; returns the JSON answer.
    pub fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = self.endpoints["control_url"].as_str().unwrap();
        let host = url.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, rest) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(" 200 "), "{method} {path}: {head}\n{rest}");
        serde_json::from_str(rest).unwrap()
    }

    pub fn inject(&self, server: &str, fault: Value) -> Value {
        self.control("POST", &format!("/servers/{server}/inject"), Some(fault))
    }

    pub fn repair(&self, server: &str) -> Value {
        self.control("POST", &format!("/servers/{server}/repair"), None)
    }

    pub fn server(&self, server: &str) -> Value {
        self.control("GET", &format!("/servers/{server}"), None)
    }

    /// Every secret the lab made (BMC passwords, heartbeat keys, the API token), to check that
    /// none of them leaks into output.
    pub fn secrets(&self) -> Vec<String> {
        let dir = self.state_dir().join("secrets");
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                std::fs::read_to_string(e.unwrap().path())
                    .unwrap()
                    .trim()
                    .to_string()
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // End only what we started, by its PID.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
