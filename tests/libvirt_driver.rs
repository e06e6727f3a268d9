//! The libvirt driver: its domain XML accepted by libvirt itself (every captured server's twin,
//! through the `test:///default` driver in one virsh session), and the whole lifecycle on a real
//! libvirtd (started here on a private socket, stopped by its PID) driving the real QEMU: the lab
//! guest boots as a twin and heartbeats as the node, under the epoch, with the key it got
//! through fw_cfg.

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil::config::Secret;
use vigil::virt::libvirt::LibvirtDriver;
use vigil::virt::qemu::NetMode;
use vigil::virt::spec::{BootSpec, VmSpec};
use vigil::virt::{GuestIdentity, Hypervisor, VirtError, VmState};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn golden_spec(name: &str) -> VmSpec {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!("tests/golden/vmspec-{name}.json"))).unwrap(),
    )
    .unwrap();
    serde_json::from_value(v["spec"].clone()).unwrap()
}

#[test]
fn libvirt_accepts_the_twin_of_every_captured_server() {
    let golden = root().join("tests/golden");
    let mut script = String::new();
    let mut n = 0;
    for e in std::fs::read_dir(&golden).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "xml") {
            // libvirt's own schema first (virt-xml-validate, package libvirt-clients).
            let v = Command::new("virt-xml-validate")
                .arg(&p)
                .arg("domain")
                .output()
                .expect("virt-xml-validate is installed (scripts/install-test-deps.sh)");
            assert!(
                v.status.success(),
                "{}: {}{}",
                p.display(),
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );
            // Then the driver: define, start, read back, stop, remove, in one connection
            // (the test driver's state lives for one connection).
            script.push_str(&format!(
                "define {0}\nstart vigil-n1-e7\ndomstate vigil-n1-e7\ndumpxml vigil-n1-e7\ndestroy vigil-n1-e7\ndomstate vigil-n1-e7\nundefine vigil-n1-e7\n",
                p.display()
            ));
            n += 1;
        }
    }
    assert!(n >= 10, "{n} golden domains");
    let mut child = Command::new("virsh")
        .args(["-c", "test:///default"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.trim().is_empty(), "{err}");
    assert_eq!(
        text.matches("Domain 'vigil-n1-e7' defined").count(),
        n,
        "{text}"
    );
    assert_eq!(text.matches("Domain 'vigil-n1-e7' started").count(), n);
    assert_eq!(text.matches("\nrunning\n").count(), n, "{text}");
    assert_eq!(text.matches("\nshut off\n").count(), n, "{text}");
    // What libvirt kept: the CPU model with the TCG-missing features disabled, the identity.
    assert!(text.contains("<model fallback='forbid'>Icelake-Server</model>"));
    assert!(text.contains("<feature policy='disable' name='avx512f'/>"));
    assert!(text.contains("<entry name='manufacturer'>Dell Inc.</entry>"));
    assert!(text.contains("<mac address='c8:4b:d6:7b:ab:93'/>"));
    assert!(text.contains("<entry name='opt/vigil/epoch'>7</entry>"));
}

/// A libvirtd of this test's own, on a private socket; stopped by its PID.
struct Libvirtd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Libvirtd {
    fn start() -> Libvirtd {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("libvirtd.conf");
        // Also on TCP, on loopback only, without authentication: a URI that names a host, as a
        // remote failover server's would (its files are not this machine's, as far as the
        // driver may assume).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_ro_perms = \"0700\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_ro = \"none\"\nauth_unix_rw = \"none\"\nlisten_tls = 0\nlisten_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\nauth_tcp = \"none\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("libvirtd.log")).unwrap();
        let child = Command::new("libvirtd")
            .arg("--listen")
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("libvirtd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("libvirtd is installed (scripts/install-test-deps.sh)");
        let d = Libvirtd { child, dir, port };
        // The first start probes QEMU's capabilities (~8 s here).
        let t0 = Instant::now();
        loop {
            let ok = Command::new("virsh")
                .args(["-q", "-c", &d.uri(), "version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "libvirtd never answered: {}",
                std::fs::read_to_string(d.dir.path().join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    fn tcp_uri(&self) -> String {
        format!("qemu+tcp://127.0.0.1:{}/system", self.port)
    }

    fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.path().join("libvirt-sock").display()
        )
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn guest() -> PathBuf {
    let g = root().join("target/guest");
    assert!(
        g.join("vmlinux").is_file(),
        "no guest in {}: run scripts/test.sh (it builds one)",
        g.display()
    );
    g
}

#[tokio::test]
async fn a_twin_runs_its_whole_life_on_a_real_libvirtd() {
    let lv = Libvirtd::start();
    let run = tempfile::tempdir().unwrap();
    let driver = LibvirtDriver::new(&lv.uri(), run.path().to_path_buf(), NetMode::User);
    // The twin of the Dell R750 capture, small enough for TCG on two cores, booting the lab's
    // guest; it must heartbeat as n1 under epoch 7 to this socket.
    let hb = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = hb.local_addr().unwrap().port();
    let mut spec = golden_spec("dell-poweredge-r750");
    spec.name = format!("vigil-n1-e7-{}", std::process::id());
    spec.cpu.sockets = 1;
    spec.cpu.cores = 1;
    spec.cpu.threads = 1;
    spec.memory_mib = 256;
    // A boot disk on "shared storage" (a file here), attached only at the resume.
    let disk = run.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    spec.disk = Some(vigil::virt::spec::DiskSpec {
        source: disk.display().to_string(),
        controller: "virtio-blk-pci".into(),
    });
    spec.nics.truncate(1);
    let g = guest();
    spec.boot = BootSpec::Kernel {
        kernel: g.join("vmlinux").display().to_string(),
        initrd: g.join("initrd.gz").display().to_string(),
        append: "console=ttyS0 quiet panic=-1".into(),
    };
    let key = "4c1b0e6f0a1d2c3b4a5968778695a4b3";
    let id = GuestIdentity {
        appliance: format!("10.0.2.2:{port}"),
        key: Secret::new(key),
    };
    let name = spec.name.clone();

    // Pre-created and paused: a failover then only resumes it.
    let st = driver.create(&spec, &id, true).await.unwrap();
    assert_eq!(st, VmState::Paused);
    assert!(
        !run.path().join(&name).join("key").exists(),
        "the key stays on disk after QEMU read it"
    );
    let xml = std::fs::read_to_string(run.path().join(&name).join("domain.xml")).unwrap();
    assert!(!xml.contains(key), "the key is in the domain XML");
    // Paused, it has no disk yet: not even opened before the failover's fence.
    let blocks = |uri: &str, name: &str| {
        let o = Command::new("virsh")
            .args(["-q", "-c", uri, "domblklist", name])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        !blocks(&lv.uri(), &name).contains("vda"),
        "{}",
        blocks(&lv.uri(), &name)
    );
    // Never a second twin of the same name.
    assert!(matches!(
        driver.create(&spec, &id, false).await,
        Err(VirtError::Exists(_))
    ));
    // What libvirt made the driver give up is reported, feature by feature, and each is
    // disabled in the domain it defined.
    let defined = std::fs::read_to_string(run.path().join(&name).join("domain.xml")).unwrap();
    let adjusted = driver.adjustments(&name);
    eprintln!("libvirt adjustments: {adjusted:?}");
    for a in adjusted {
        let f = a.split_whitespace().nth(2).unwrap();
        assert!(
            defined.contains(&format!("<feature policy='disable' name='{f}'/>")),
            "{a}"
        );
    }
    assert_eq!(driver.start(&name).await.unwrap(), VmState::Running);
    // Attached at the resume, into the spare root port, and read back live.
    let b = blocks(&lv.uri(), &name);
    assert!(
        b.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["vda", disk.to_str().unwrap()]),
        "{b}"
    );
    // (Starting an already-running twin attaches nothing twice.)
    assert_eq!(driver.start(&name).await.unwrap(), VmState::Running);
    assert!(
        driver
            .list()
            .await
            .contains(&(name.clone(), VmState::Running))
    );

    // The guest boots and heartbeats as the node, under the epoch, signed with the key.
    let beat = first_beat(&hb, key, 7).await;
    assert_eq!(beat.node, "n1");
    assert!(beat.virtual_node);

    // Graceful stop (ACPI: the guest powers off), confirmed; then gone.
    driver.stop(&name, Duration::from_secs(20)).await.unwrap();
    assert_eq!(driver.status(&name).await, VmState::Stopped);
    driver.destroy(&name).await.unwrap();
    assert_eq!(driver.status(&name).await, VmState::Absent);
    assert!(!driver.list().await.iter().any(|(n, _)| n == &name));

    // Through a URI that names a host: nothing of the domain on this machine's disk counts. The
    // key goes up the libvirt connection into a volume of the key pool (made here at first
    // use), streamed from memory, and is deleted once QEMU read it; the guest still gets it.
    let remote_run = tempfile::tempdir().unwrap();
    let mut remote = LibvirtDriver::new(
        &lv.tcp_uri(),
        remote_run.path().to_path_buf(),
        NetMode::User,
    );
    assert!(remote.remote() && !driver.remote());
    remote.key_pool = format!("vigil-keys-{}", std::process::id());
    let pool_dir = lv.dir.path().join("keys");
    remote.key_pool_dir = pool_dir.clone();
    spec.name = format!("vigil-n1-e8-{}", std::process::id());
    spec.epoch = 8;
    spec.disk = None;
    let name = spec.name.clone();
    assert_eq!(
        remote.create(&spec, &id, true).await.unwrap(),
        VmState::Paused
    );
    let written: Vec<PathBuf> = walk(remote_run.path());
    assert!(
        !written
            .iter()
            .any(|p| p.file_name().is_some_and(|f| f == "key")),
        "a key file here: {written:?}"
    );
    let xml = std::fs::read_to_string(remote_run.path().join(&name).join("domain.xml")).unwrap();
    assert!(!xml.contains(key), "the key is in the domain XML");
    assert!(
        xml.contains(&format!(
            "<entry name='opt/vigil/key' file='{}/{name}.key'/>",
            pool_dir.display()
        )),
        "{xml}"
    );
    assert!(xml.contains("<serial type='pty'>"), "{xml}");
    assert!(
        std::fs::read_dir(&pool_dir).unwrap().next().is_none(),
        "the key volume outlived the start"
    );
    assert_eq!(remote.start(&name).await.unwrap(), VmState::Running);
    let beat = first_beat(&hb, key, 8).await;
    assert_eq!(beat.node, "n1");
    remote.destroy(&name).await.unwrap();
    assert_eq!(remote.status(&name).await, VmState::Absent);
    for step in ["pool-destroy", "pool-undefine"] {
        let _ = Command::new("virsh")
            .args(["-q", "-c", &lv.uri(), step, &remote.key_pool])
            .output();
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// The first heartbeat under `epoch` on `hb`, verified with `key` (90 s at most).
async fn first_beat(
    hb: &tokio::net::UdpSocket,
    key: &str,
    epoch: u64,
) -> vigil::heartbeat::wire::Heartbeat {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no heartbeat of epoch {epoch} within 90 s");
        if let Ok(Ok(n)) = tokio::time::timeout(left, hb.recv(&mut buf)).await {
            let u = vigil::heartbeat::wire::decode(&buf[..n]).unwrap();
            let b = vigil::heartbeat::wire::verify(u, key.as_bytes()).unwrap();
            if b.epoch == epoch {
                return b;
            }
        }
    }
}
