//! The QEMU driver: virtual nodes as QEMU processes on this machine, driven over QMP.
//!
//! Overview: [`args`] renders a [`VmSpec`] as a QEMU command line (pure, golden-tested).
//! [`QemuDriver`] runs it: each VM gets a folder under the run directory with its spec, QMP
//! socket, serial log and pid file. QEMU runs in its own process group, so that a restart of the
//! appliance does not take its virtual nodes down: a restarted appliance finds them again from
//! their folders and QMP sockets ([`Hypervisor::list`]). The node's identity and heartbeat key
//! reach the guest through fw_cfg, never the command line; the key file exists only until QEMU
//! has read it. Every action is followed by a QMP `query-status` read-back.
//!
//! Scope: local QEMU. Remote servers are driven through libvirt.
//!
//! Key types: [`QemuDriver`], [`args`], [`NetMode`], [`probe_accel`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::qmp::Qmp;
use super::spec::{Accel, BootSpec, VmSpec};
use super::{GuestIdentity, Hypervisor, VirtError, VmState, write_key};
use crate::bmc::BoxFuture;

/// QMP exchanges give up after this long.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// How the VM's NICs reach the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// QEMU user-mode networking (the lab): the guest reaches the host's loopback as 10.0.2.2.
    User,
    /// A tap on a host bridge (production): the twin takes over the node's MAC on the bridge.
    Bridge(String),
}

/// Whether KVM really works here: /dev/kvm must exist *and* the CPU must offer VT-x/AMD-V
/// (on these machines /dev/kvm exists but is a paravirtual stub and guests never run).
pub fn probe_accel() -> Accel {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vt = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if dev && vt { Accel::Kvm } else { Accel::Tcg }
}

/// fw_cfg string values escape commas by doubling them (QEMU's option syntax).
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

/// The QEMU command line for `spec` (without the binary), with the VM's files in `dir`.
pub fn args(
    spec: &VmSpec,
    dir: &Path,
    net: &NetMode,
    id: &GuestIdentity,
    paused: bool,
) -> Vec<String> {
    let d = |f: &str| dir.join(f).display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},process={}", spec.name, spec.name)]);
    push(&[
        "-accel",
        match spec.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        },
    ]);
    push(&["-machine", "q35"]);
    let mut cpu = spec.cpu.model.clone();
    for m in &spec.cpu.minus {
        cpu.push_str(&format!(",-{m}"));
    }
    if spec.cpu.model != "host" && spec.cpu.model != "qemu64" {
        // Refuse to start rather than silently give the guest less than the spec says.
        cpu.push_str(",enforce");
    }
    push(&["-cpu", &cpu]);
    push(&[
        "-smp",
        &format!(
            "sockets={},cores={},threads={}",
            spec.cpu.sockets, spec.cpu.cores, spec.cpu.threads
        ),
    ]);
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", d("qmp.sock")),
    ]);
    push(&["-serial", &format!("file:{}", d("serial.log"))]);
    push(&["-pidfile", &d("qemu.pid")]);
    let mut smbios = "type=1".to_string();
    for (k, v) in [
        ("manufacturer", &spec.smbios_manufacturer),
        ("product", &spec.smbios_product),
        ("serial", &spec.smbios_serial),
        ("uuid", &spec.smbios_uuid),
    ] {
        if let Some(v) = v {
            smbios.push_str(&format!(",{k}={v}"));
        }
    }
    push(&["-smbios", &smbios]);
    if let Some(u) = &spec.smbios_uuid {
        // The system UUID the guest sees (SMBIOS type 1 and the VM's own UUID agree).
        push(&["-uuid", u]);
    }
    for (i, n) in spec.nics.iter().enumerate() {
        let backend = match net {
            NetMode::User => format!("user,id=n{i},restrict=off"),
            NetMode::Bridge(br) => format!("bridge,id=n{i},br={br}"),
        };
        push(&["-netdev", &backend]);
        push(&["-device", &format!("{},netdev=n{i},mac={}", n.model, n.mac)]);
    }
    match &spec.boot {
        BootSpec::Kernel {
            kernel,
            initrd,
            append,
        } => {
            push(&["-kernel", kernel, "-initrd", initrd, "-append", append]);
        }
        BootSpec::Uefi => {
            push(&[
                "-drive",
                "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            ]);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,file={}", d("OVMF_VARS.fd")),
            ]);
        }
        BootSpec::Bios => {}
    }
    if let Some(disk) = &spec.disk
        && paused
        && hot_attachable(disk)
    {
        // Pre-created: the disk is attached when the failover resumes the twin (after the
        // fence), into this empty slot; until then QEMU does not even open it.
        push(&[
            "-device",
            &format!("pcie-root-port,id={DISK_PORT},chassis=1"),
        ]);
    } else if let Some(disk) = &spec.disk {
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=d0,format=raw,cache=none",
                esc(&disk.source)
            ),
        ]);
        match disk.controller.as_str() {
            "nvme" => push(&["-device", "nvme,drive=d0,serial=vigil0"]),
            "ahci" => push(&[
                "-device",
                "ahci,id=ahci0",
                "-device",
                "ide-hd,drive=d0,bus=ahci0.0",
            ]),
            _ => push(&["-device", "virtio-blk-pci,drive=d0"]),
        }
    }
    push(&[
        "-fw_cfg",
        &format!("name=opt/vigil/node,string={}", esc(&spec.node)),
    ]);
    push(&[
        "-fw_cfg",
        &format!("name=opt/vigil/epoch,string={}", spec.epoch),
    ]);
    push(&[
        "-fw_cfg",
        &format!("name=opt/vigil/appliance,string={}", esc(&id.appliance)),
    ]);
    push(&["-fw_cfg", &format!("name=opt/vigil/key,file={}", d("key"))]);
    if paused {
        push(&["-S"]);
    }
    a
}

/// The PCIe slot a pre-created twin's boot disk goes into at failover.
const DISK_PORT: &str = "vigil-disk-port";

/// Whether `disk`'s controller can be attached to a paused twin through QMP: a PCIe device
/// (virtio-blk, NVMe) into an empty root port can; an IDE disk on AHCI cannot, so that one is
/// on the command line even for a pre-created twin.
fn hot_attachable(disk: &crate::virt::spec::DiskSpec) -> bool {
    disk.controller != "ahci"
}

/// The local QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    /// Where VM folders live.
    pub run_dir: PathBuf,
    /// The QEMU binary.
    pub binary: PathBuf,
    /// How NICs are connected.
    pub net: NetMode,
}

/// The address a guest uses to reach the appliance's heartbeat port: with user-mode networking
/// the host's loopback is 10.0.2.2.
pub fn guest_appliance_addr(listen: SocketAddr, net: &NetMode) -> String {
    match net {
        NetMode::User if listen.ip().is_loopback() || listen.ip().is_unspecified() => {
            format!("10.0.2.2:{}", listen.port())
        }
        _ => listen.to_string(),
    }
}

impl QemuDriver {
    fn dir(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    async fn qmp(&self, name: &str) -> Result<Qmp, VirtError> {
        Qmp::connect(&self.dir(name).join("qmp.sock"), QMP_TIMEOUT)
            .await
            .map_err(|e| VirtError::Qmp {
                vm: name.into(),
                reason: e.to_string(),
            })
    }

    fn pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir(name).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn alive(pid: i32) -> bool {
        // A zombie (exited, not yet reaped) is not alive.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('Z'))
                    .map(|z| !z)
            })
            .unwrap_or(false)
    }

    async fn state(&self, name: &str) -> VmState {
        if !self.dir(name).is_dir() {
            return VmState::Absent;
        }
        match self.qmp(name).await {
            Ok(mut q) => match q.status().await {
                Ok(s) if s == "running" => VmState::Running,
                Ok(s) if s == "paused" || s == "prelaunch" => VmState::Paused,
                Ok(s) => VmState::Other(s),
                Err(_) => VmState::Stopped,
            },
            Err(_) => match self.pid(name) {
                Some(p) if Self::alive(p) => VmState::Other("not answering QMP".into()),
                _ => VmState::Stopped,
            },
        }
    }

    async fn create_inner(
        &self,
        spec: &VmSpec,
        id: &GuestIdentity,
        paused: bool,
    ) -> Result<VmState, VirtError> {
        let dir = self.dir(&spec.name);
        if dir.join("qemu.pid").exists()
            && matches!(
                self.state(&spec.name).await,
                VmState::Running | VmState::Paused
            )
        {
            return Err(VirtError::Exists(spec.name.clone()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| VirtError::Io {
            vm: spec.name.clone(),
            what: "create its folder",
            reason: e.to_string(),
        })?;
        let io = |what: &'static str| {
            move |e: std::io::Error| VirtError::Io {
                vm: spec.name.clone(),
                what,
                reason: e.to_string(),
            }
        };
        std::fs::write(
            dir.join("spec.json"),
            serde_json::to_vec_pretty(spec).unwrap_or_default(),
        )
        .map_err(io("write its spec"))?;
        write_key(&dir, &id.key).map_err(io("write its key"))?;
        if spec.boot == BootSpec::Uefi {
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", dir.join("OVMF_VARS.fd"))
                .map_err(io("copy the UEFI variables"))?;
        }
        let _stale = std::fs::remove_file(dir.join("qmp.sock"));
        let _stale = std::fs::remove_file(dir.join("disk-pending.json"));
        if paused && let Some(disk) = spec.disk.as_ref().filter(|d| hot_attachable(d)) {
            std::fs::write(
                dir.join("disk-pending.json"),
                serde_json::to_vec(disk).unwrap_or_default(),
            )
            .map_err(io("write its pending disk"))?;
        }
        let log = std::fs::File::create(dir.join("qemu.log")).map_err(io("open its log"))?;
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.args(args(spec, &dir, &self.net, id, paused))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io("open its log"))?)
            .stderr(log);
        // Its own process group: a signal to the appliance's group (Ctrl-C, systemd stopping
        // the appliance) must not take the virtual nodes down with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| VirtError::Spawn {
            vm: spec.name.clone(),
            reason: e.to_string(),
        })?;
        // Wait for QMP; QEMU exiting first means it refused the spec (see qemu.log).
        let t0 = tokio::time::Instant::now();
        let state = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                return Err(VirtError::Refused {
                    vm: spec.name.clone(),
                    reason: format!(
                        "QEMU exited ({status}): {}",
                        log.lines().last().unwrap_or("")
                    ),
                });
            }
            if dir.join("qmp.sock").exists()
                && let Ok(mut q) = self.qmp(&spec.name).await
                && let Ok(s) = q.status().await
            {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _killed = child.kill();
                return Err(VirtError::Qmp {
                    vm: spec.name.clone(),
                    reason: "QMP did not answer within 10 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // QEMU has read its fw_cfg files: the key need not stay on disk.
        let _removed = std::fs::remove_file(dir.join("key"));
        // The child is deliberately not waited for here: it must outlive this process if need
        // be. A reaper thread collects it if it exits while we run.
        std::thread::spawn(move || {
            let _status = child.wait();
        });
        Ok(match state.as_str() {
            "running" => VmState::Running,
            "paused" | "prelaunch" => VmState::Paused,
            s => VmState::Other(s.into()),
        })
    }

    /// Attaches a pre-created twin's boot disk before its first instruction runs: the drive
    /// (any source `-drive` takes: a path, iSCSI, RBD, NBD) through the human monitor's
    /// `drive_add`, which QMP has no structured equivalent of for every source, then its
    /// controller into the empty root port. Read back through `query-block`.
    async fn attach_pending_disk(&self, name: &str, q: &mut Qmp) -> Result<(), VirtError> {
        let pending = self.dir(name).join("disk-pending.json");
        let Ok(text) = std::fs::read(&pending) else {
            return Ok(());
        };
        let fail = |reason: String| VirtError::Qmp {
            vm: name.into(),
            reason: format!("its boot disk cannot be attached: {reason}"),
        };
        let disk: crate::virt::spec::DiskSpec =
            serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
        // A resume that failed half-way (or an appliance killed in it) is tried again: what is
        // already there is not added twice (QEMU would refuse the duplicate id for ever).
        let blocks = q
            .execute("query-block", None)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let drive = blocks
            .as_array()
            .and_then(|b| b.iter().find(|d| d["device"] == "d0").cloned());
        if drive
            .as_ref()
            .is_some_and(|d| d["qdev"].as_str().is_some_and(|q| q.contains("vigil-disk")))
        {
            let _done = std::fs::remove_file(&pending);
            return Ok(());
        }
        if drive.is_none() {
            let out = q
                .execute(
                    "human-monitor-command",
                    Some(serde_json::json!({ "command-line": format!(
                    "drive_add 0 file={},if=none,id=d0,format=raw,cache=none",
                    esc(&disk.source)
                ) })),
                )
                .await
                .map_err(|e| fail(e.to_string()))?;
            // The human monitor answers "OK" or the error in words.
            let said = out.as_str().unwrap_or_default().trim().to_string();
            if said != "OK" {
                return Err(fail(format!("drive_add: {said}")));
            }
        }
        let device = if disk.controller == "nvme" {
            serde_json::json!({ "driver": "nvme", "drive": "d0", "serial": "vigil0", "bus": DISK_PORT, "id": "vigil-disk" })
        } else {
            serde_json::json!({ "driver": "virtio-blk-pci", "drive": "d0", "bus": DISK_PORT, "id": "vigil-disk" })
        };
        q.execute("device_add", Some(device))
            .await
            .map_err(|e| fail(format!("device_add: {e}")))?;
        let blocks = q
            .execute("query-block", None)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let attached = blocks.as_array().is_some_and(|b| {
            b.iter().any(|d| {
                d["device"] == "d0"
                    && d["inserted"]["file"].is_string()
                    && d["qdev"].as_str().is_some_and(|q| q.contains("vigil-disk"))
            })
        });
        if !attached {
            return Err(fail(format!("query-block does not show it: {blocks}")));
        }
        let _done = std::fs::remove_file(&pending);
        Ok(())
    }

    async fn stop_inner(&self, name: &str, grace: Duration) -> Result<(), VirtError> {
        let deadline = tokio::time::Instant::now() + grace;
        if let Ok(mut q) = self.qmp(name).await {
            // A paused guest cannot see an ACPI power button: go straight to quit.
            let status = q.status().await.unwrap_or_default();
            let cmd = if status == "running" {
                "system_powerdown"
            } else {
                "quit"
            };
            let _sent = q.execute(cmd, None).await;
        }
        while tokio::time::Instant::now() < deadline {
            if matches!(self.state(name).await, VmState::Stopped | VmState::Absent) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Forced: quit over QMP, then SIGKILL by pid.
        if let Ok(mut q) = self.qmp(name).await {
            let _sent = q.execute("quit", None).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(pid) = self.pid(name)
            && Self::alive(pid)
        {
            let _killed = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match self.state(name).await {
            VmState::Stopped | VmState::Absent => Ok(()),
            s => Err(VirtError::NotStopped {
                vm: name.into(),
                state: format!("{s:?}"),
            }),
        }
    }
}

impl Hypervisor for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn create(
        &self,
        spec: &VmSpec,
        id: &GuestIdentity,
        paused: bool,
    ) -> BoxFuture<'_, Result<VmState, VirtError>> {
        let spec = spec.clone();
        let id = id.clone();
        Box::pin(async move { self.create_inner(&spec, &id, paused).await })
    }

    fn start(&self, name: &str) -> BoxFuture<'_, Result<VmState, VirtError>> {
        let name = name.to_string();
        Box::pin(async move {
            let mut q = self.qmp(&name).await?;
            self.attach_pending_disk(&name, &mut q).await?;
            q.execute("cont", None).await.map_err(|e| VirtError::Qmp {
                vm: name.clone(),
                reason: e.to_string(),
            })?;
            // QMP serves one client at a time: the read-back needs this one closed.
            drop(q);
            Ok(self.state(&name).await)
        })
    }

    fn status(&self, name: &str) -> BoxFuture<'_, VmState> {
        let name = name.to_string();
        Box::pin(async move { self.state(&name).await })
    }

    fn stop(&self, name: &str, grace: Duration) -> BoxFuture<'_, Result<(), VirtError>> {
        let name = name.to_string();
        Box::pin(async move { self.stop_inner(&name, grace).await })
    }

    fn destroy(&self, name: &str) -> BoxFuture<'_, Result<(), VirtError>> {
        let name = name.to_string();
        Box::pin(async move {
            self.stop_inner(&name, Duration::from_secs(1)).await?;
            let _gone = std::fs::remove_dir_all(self.dir(&name));
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Vec<(String, VmState)>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let names: Vec<String> = std::fs::read_dir(&self.run_dir)
                .map(|r| {
                    r.filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect()
                })
                .unwrap_or_default();
            for n in names {
                let s = self.state(&n).await;
                out.push((n, s));
            }
            out.sort();
            out
        })
    }
}
