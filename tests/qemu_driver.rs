//! The QEMU driver with the real QEMU: a twin pre-created and paused holds no boot disk and runs
//! nothing; resumed, it gets its disk and boots; the lab guest then says what it sees (CPU model
//! and topology, memory, MAC, SMBIOS identity, disks), which must be what the spec asked for,
//! and heartbeats as the node under the epoch with the key it got through fw_cfg.

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil::config::Secret;
use vigil::virt::qemu::{NetMode, QemuDriver};
use vigil::virt::qmp::Qmp;
use vigil::virt::spec::{BootSpec, DiskSpec, VmSpec};
use vigil::virt::{GuestIdentity, Hypervisor, VmState};

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

fn guest() -> PathBuf {
    let g = root().join("target/guest");
    assert!(
        g.join("vmlinux").is_file(),
        "no guest in {}: run scripts/test.sh (it builds one)",
        g.display()
    );
    g
}

/// Kills the test's QEMU by its pid file when the test ends, passed or failed (a paused twin
/// left behind would wait for ever).
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Ok(pid) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let pid = pid.trim();
        // Only that QEMU (its command line names the pid file's folder).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let dir = self.0.parent().unwrap().display().to_string();
        if String::from_utf8_lossy(&cmdline).contains(&dir) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .status();
        }
    }
}

/// The files a process has open.
fn open_files(pid: &str) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The guest's line that starts with `vigil-guest: {what}`, once it is written.
fn guest_line(serial: &Path, what: &str, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(serial).unwrap_or_default();
        if let Some(l) = log
            .lines()
            .find(|l| l.starts_with(&format!("vigil-guest: {what}")))
        {
            return l.to_string();
        }
        assert!(
            t0.elapsed() < within,
            "the guest never said {what:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn a_pre_created_twin_gets_its_disk_at_resume_and_sees_what_the_spec_says() {
    let run = tempfile::tempdir().unwrap();
    let driver = QemuDriver {
        run_dir: run.path().to_path_buf(),
        binary: PathBuf::from("qemu-system-x86_64"),
        net: NetMode::User,
    };
    let hb = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = hb.local_addr().unwrap().port();
    // The twin of the Dell R750 capture (its CPU model, SMBIOS identity and first MAC), small
    // enough for TCG on two cores, booting the lab's guest, with a 1 MiB boot disk.
    let mut spec = golden_spec("dell-poweredge-r750");
    spec.name = format!("vigil-n1-e7-{}", std::process::id());
    spec.cpu.sockets = 1;
    spec.cpu.cores = 2;
    spec.cpu.threads = 1;
    spec.memory_mib = 256;
    spec.nics.truncate(1);
    let disk = run.path().join("boot.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    spec.disk = Some(DiskSpec {
        source: disk.display().to_string(),
        controller: "virtio-blk-pci".into(),
    });
    let g = guest();
    spec.boot = BootSpec::Kernel {
        kernel: g.join("vmlinux").display().to_string(),
        initrd: g.join("initrd.gz").display().to_string(),
        append: "console=ttyS0 quiet panic=-1".into(),
    };
    let key = "9d0c1b2a39485766758493a2b1c0d9e8";
    let id = GuestIdentity {
        appliance: format!("10.0.2.2:{port}"),
        key: Secret::new(key),
    };
    let name = spec.name.clone();
    let dir = run.path().join(&name);
    let _cleanup = KillOnDrop(dir.join("qemu.pid"));

    // Pre-created: paused before its first instruction, without its disk (QEMU has not even
    // opened it: the physical node may still be using it until the fence).
    assert_eq!(
        driver.create(&spec, &id, true).await.unwrap(),
        VmState::Paused
    );
    let pid = std::fs::read_to_string(dir.join("qemu.pid")).unwrap();
    let pid = pid.trim();
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .replace('\0', " ");
    assert!(!cmdline.contains("boot.raw"), "{cmdline}");
    assert!(!open_files(pid).contains(&disk));
    let mut q = Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(5))
        .await
        .unwrap();
    let blocks = q.execute("query-block", None).await.unwrap();
    assert!(
        !blocks.to_string().contains("boot.raw"),
        "a disk before the resume: {blocks}"
    );
    assert_eq!(q.status().await.unwrap(), "prelaunch");
    drop(q);
    // Nothing ran: no line on its serial console.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default(),
        ""
    );

    // Resumed (the failover, after the fence): the disk first, then the CPUs.
    assert_eq!(driver.start(&name).await.unwrap(), VmState::Running);
    assert!(open_files(pid).contains(&disk), "QEMU has the disk open");
    let serial = dir.join("serial.log");
    let disks = guest_line(&serial, "disks:", Duration::from_secs(90));
    assert!(
        disks.contains("vda:2048"),
        "the guest sees its 1 MiB disk: {disks}"
    );
    // What the guest sees is what the spec says.
    let node = guest_line(&serial, "node ", Duration::from_secs(5));
    assert!(node.contains("node n1 epoch 7"), "{node}");
    let mac = spec.nics[0].mac.to_ascii_lowercase();
    assert!(node.contains(&format!("eth0 {mac}")), "{node} vs {mac}");
    let hw = guest_line(&serial, "hardware:", Duration::from_secs(5));
    let uuid = spec.smbios_uuid.clone().unwrap();
    for want in [
        format!("vendor '{}'", spec.smbios_manufacturer.clone().unwrap()),
        format!("product '{}'", spec.smbios_product.clone().unwrap()),
        format!("serial '{}'", spec.smbios_serial.clone().unwrap()),
        format!("uuid {uuid}"),
        "cpus 2 sockets 1".to_string(),
    ] {
        assert!(hw.contains(&want), "{want:?} not in {hw}");
    }
    // QEMU names the model (its model-id string, as /proc/cpuinfo shows it).
    assert!(hw.contains("cpu 'Intel Xeon Processor (Icelake)'"), "{hw}");
    let mem_kib: u64 = hw
        .split("memory ")
        .nth(1)
        .and_then(|m| m.split_whitespace().next())
        .and_then(|m| m.parse().ok())
        .unwrap();
    assert!(
        (200_000..=262_144).contains(&mem_kib),
        "256 MiB less the kernel's own: {mem_kib} kB"
    );

    // And it heartbeats as the node, under the epoch, signed with the key.
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(60);
    let beat = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no heartbeat from the twin");
        if let Ok(Ok(n)) = tokio::time::timeout(left, hb.recv(&mut buf)).await {
            let u = vigil::heartbeat::wire::decode(&buf[..n]).unwrap();
            break vigil::heartbeat::wire::verify(u, key.as_bytes()).unwrap();
        }
    };
    assert_eq!((beat.node.as_str(), beat.epoch), ("n1", 7));
    driver.destroy(&name).await.unwrap();
    assert_eq!(driver.status(&name).await, VmState::Absent);
}
