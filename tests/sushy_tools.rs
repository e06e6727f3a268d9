//! The Redfish driver, `vigil probe` and `vigil fence` against OpenStack's sushy-tools emulator
//! (fake driver): a Redfish service we did not write, with its own shapes (UUID system ids, no
//! SessionService, no sensors, power changes that land 1-11 s after the reset is accepted).

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil::bmc::{self, ActionOutcome, Bmc, Depth, PowerAction};
use vigil::config;
use vigil::model::{Health, PowerReading};

const SYSTEM: &str = "27946b59-9e44-4fa7-8e91-f3527a1ef094";

struct Emulator {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start() -> Emulator {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join(".venv/bin");
    assert!(
        venv.join("sushy-emulator").is_file(),
        "sushy-tools is missing from .venv: run scripts/install-test-deps.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A certificate of its own; vigil pins its fingerprint.
    sh(Command::new("openssl").current_dir(d).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sushy",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    ]));
    // sushy-tools wants bcrypt hashes in its htpasswd.
    let hash = sh(Command::new(venv.join("python")).args([
        "-c",
        "import bcrypt; print(bcrypt.hashpw(b'sushy-pass', bcrypt.gensalt()).decode())",
    ]));
    std::fs::write(d.join("htpasswd"), format!("admin:{}\n", hash.trim())).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        d.join("emulator.conf"),
        format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
             SUSHY_EMULATOR_SSL_CERT = '{0}/cert.pem'\n\
             SUSHY_EMULATOR_SSL_KEY = '{0}/key.pem'\n\
             SUSHY_EMULATOR_AUTH_FILE = '{0}/htpasswd'\n\
             SUSHY_EMULATOR_STATE_DIR = '{0}/state'\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '{SYSTEM}', 'name': 'fake', 'power_state': 'On', \
             'nics': [{{'mac': '00:5c:52:31:3a:9c', 'ip': '172.22.0.100'}}]}}]\n",
            d.display()
        ),
    )
    .unwrap();
    let child = Command::new(venv.join("sushy-emulator"))
        .arg("--config")
        .arg(d.join("emulator.conf"))
        .arg("--fake")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("emulator.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "sushy-emulator never listened: {}",
            std::fs::read_to_string(d.join("emulator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Emulator { child, dir, port }
}

/// A vigil configuration with one node behind the emulator, and an operator profile for it.
fn configure(e: &Emulator) -> std::path::PathBuf {
    let d = e.dir.path();
    let fp = sh(Command::new("openssl").current_dir(d).args([
        "x509",
        "-in",
        "cert.pem",
        "-noout",
        "-fingerprint",
        "-sha256",
    ]));
    let fp = fp.trim().split('=').nth(1).unwrap().to_string();
    std::fs::create_dir_all(d.join("profiles")).unwrap();
    std::fs::write(
        d.join("profiles/sushy-emulator.toml"),
        format!(
            r#"name = "sushy-emulator"
description = "OpenStack sushy-tools emulator, fake driver"
vendor = "Sushy Emulator"
mockups = []

[redfish]
auth = "basic"
max_sessions = 1
system_id = "{SYSTEM}"
chassis_id = "15693887-7984-9484-3272-842188918912"
manager_id = "{SYSTEM}"
power_state = "/PowerState"
health = "/Status/HealthRollUp"
reset_types = ["On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "Nmi", "ForceOn"]
power_off = "ForceOff"
power_on = "On"
power_cycle = "ForceRestart"
thermal = []
power = []
sensors = false

[timing]
# The fake driver applies a reset 1-11 s after accepting it.
power_off_reflect = "12s"
power_on_reflect = "12s"
post = "1m"
"#
        ),
    )
    .unwrap();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/bmc"), "sushy-pass\n").unwrap();
    std::fs::write(d.join("secrets/hb"), "0123456789abcdef0123456789abcdef\n").unwrap();
    for f in ["secrets/bmc", "secrets/hb"] {
        std::fs::set_permissions(
            d.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let cfg = d.join("vigil.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[appliance]
state_dir = "{0}/appliance"
api_listen = "127.0.0.1:0"
heartbeat_listen = "127.0.0.1:0"
firmware_profiles_dir = "{0}/profiles"

[policy]
bmc_request_timeout = "5s"

[[node]]
name = "fake"
firmware_profile = "sushy-emulator"

[node.bmc]
redfish_url = "https://127.0.0.1:{1}"
fingerprint_sha256 = "{fp}"
username = "admin"
password = "file:secrets/bmc"

[node.heartbeat]
address = "127.0.0.1"
key = "file:secrets/hb"
"#,
            d.display(),
            e.port
        ),
    )
    .unwrap();
    cfg
}

fn vigil(args: &[&str]) -> std::process::Output {
    Command::new(assert_cmd::cargo::cargo_bin("vigil"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_driver_probe_and_fence_work_against_sushy_tools() {
    let _p = rustls::crypto::ring::default_provider().install_default();
    let e = start();
    let cfg = configure(&e);
    let check = vigil(&["check-config", cfg.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let (c, profiles, _) = config::load(&cfg).unwrap();
    let b = bmc::redfish_for(&c.machine("fake").unwrap(), &profiles).unwrap();
    let s = b.status(Depth::Full).await.unwrap();
    assert_eq!(s.power, PowerReading::On);
    assert_eq!(s.health, Health::Ok);
    assert!(s.boot.is_none(), "sushy has no BootProgress");
    // Its inventory: the MAC it was given.
    let p = b.inventory("fake").await.unwrap();
    let macs: Vec<String> = p.nics.iter().map(|n| n.mac.to_lowercase()).collect();
    assert!(macs.contains(&"00:5c:52:31:3a:9c".to_string()), "{p:?}");

    let probe = vigil(&["probe", "--config", cfg.to_str().unwrap(), "fake"]);
    let out = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success(), "{out}");
    assert!(out.contains("redfish: power On"), "{out}");

    // A fence: the emulator accepts ForceOff at once and applies it 1-11 s later; vigil waits
    // for two Off reads, within the profile's reflect time.
    let t0 = Instant::now();
    let f = vigil(&["fence", "--config", cfg.to_str().unwrap(), "fake"]);
    let out = String::from_utf8_lossy(&f.stdout);
    assert!(
        f.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&f.stderr)
    );
    assert!(out.contains("1 power action(s) sent"), "{out}");
    eprintln!("fence against sushy-tools: {:?}", t0.elapsed());
    assert_eq!(
        b.status(Depth::Fast).await.unwrap().power,
        PowerReading::Off
    );
    assert_eq!(
        b.power(PowerAction::Off).await.unwrap(),
        ActionOutcome::AlreadyDone
    );
    assert_eq!(
        b.power(PowerAction::On).await.unwrap(),
        ActionOutcome::Accepted
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.status(Depth::Fast).await.unwrap().power != PowerReading::On {
        assert!(Instant::now() < deadline, "never came back on");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    b.close().await;
    let v = vigil(&["log", "verify", "--config", cfg.to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}
