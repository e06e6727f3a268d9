//! The libvirt driver: the same VM spec as domain XML, driven through `virsh` with a connect
//! URI per host (`qemu:///system` on the failover server itself, `qemu+ssh://` or `qemu+tls://`
//! for a remote one).
//!
//! Overview: [`domain_xml`] renders a [`VmSpec`] (pure, golden-tested, and validated against
//! libvirt's own RNG schema by `virt-xml-validate` in the tests); [`LibvirtDriver`] defines,
//! starts (optionally paused), reads back, stops (ACPI, then destroy) and undefines domains, one
//! `virsh` invocation per step, always reading the state back after an action.
//!
//! Why `virsh` and not the `virt` bindings: they pin an exact `libc` that conflicts with nix
//! (DESIGN.md). Why no XML library: the document is small and fixed, and every value goes through
//! one escaping function.
//!
//! The node's identity reaches the guest as for the QEMU driver, through fw_cfg
//! (`<sysinfo type='fwcfg'>`), the key as a *file* entry so it is never on a command line or in
//! the domain XML. With a local URI (`qemu:///system`) the file is written in the VM's folder on
//! this machine. With a remote one (`qemu+ssh://host/system`, `qemu+tls://...`: a URI that names
//! a host) nothing of the domain is on this machine's disk as the host sees it: the key is
//! uploaded over the libvirt connection itself into a storage volume of a dir pool on that host
//! (`vigil-keys`, made at first use under `/var/lib/libvirt/vigil-keys`, mode 0711; each key
//! 0400 and owned by the user QEMU runs as there, from the host's capabilities), streamed
//! from memory (never written here), and the volume is deleted once QEMU has read it; the serial
//! console is a pty (`virsh console`) and UEFI variables are where libvirt keeps them.
//!
//! A pre-created twin (`create(.., paused = true)`) is defined without its boot disk, with an
//! empty PCIe root port; `start` attaches the disk live (`attach-device --live`), reads it back
//! (`domblklist`), and only then resumes: until the failover, after the fence, the shared disk is
//! not even opened on the failover server. (A SATA disk cannot be hot-plugged: it is in the
//! domain from the start, as with the QEMU driver.)
//!
//! Key types: [`LibvirtDriver`], [`Files`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::qemu::NetMode;
use super::spec::{Accel, BootSpec, VmSpec};
use super::{GuestIdentity, Hypervisor, VirtError, VmState};
use crate::bmc::BoxFuture;

/// XML text and attribute escaping.
fn x(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // XML 1.0 has no place for other control characters: drop them.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => o.push(c),
        }
    }
    o
}

/// The libvirt disk bus for a QEMU controller name.
fn disk_bus(controller: &str) -> (&'static str, &'static str) {
    match controller {
        "ahci" => ("sata", "sda"),
        // libvirt 9.0 has no NVMe disk bus; virtio is the closest it offers (the fidelity
        // report already names the controller the physical node has).
        _ => ("virtio", "vda"),
    }
}

/// Where a domain's files are, as its libvirt host sees them.
#[derive(Debug, Clone, Copy)]
pub enum Files<'a> {
    /// In the VM's folder on this machine (a local libvirtd).
    Local(&'a Path),
    /// On a remote host: the key in a storage volume at this path there; the serial console on
    /// a pty; UEFI variables where libvirt keeps them.
    Remote {
        /// The key volume's path on the host.
        key: &'a str,
    },
}

/// The domain XML for `spec`, its files (serial log, key, UEFI variables) in `dir`.
pub fn domain_xml(spec: &VmSpec, dir: &Path, net: &NetMode, id: &GuestIdentity) -> String {
    domain_xml_for(spec, Files::Local(dir), net, id, false)
}

/// The `<disk>` element of a twin's boot disk.
pub fn disk_xml(disk: &super::spec::DiskSpec) -> String {
    let (bus, dev) = disk_bus(&disk.controller);
    let src = &disk.source;
    let source = if let Some(rest) = src.strip_prefix("rbd:") {
        format!(
            "<disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source protocol='rbd' name='{}'/>\n",
            x(rest)
        )
    } else if let Some(rest) = src.strip_prefix("iscsi://") {
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (h, p) = host.split_once(':').unwrap_or((host, "3260"));
        format!(
            "<disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source protocol='iscsi' name='{}'>\n        <host name='{}' port='{}'/>\n      </source>\n",
            x(path),
            x(h),
            x(p)
        )
    } else {
        format!(
            "<disk type='file' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source file='{}'/>\n",
            x(src)
        )
    };
    format!("    {source}      <target dev='{dev}' bus='{bus}'/>\n    </disk>\n")
}

/// Whether `disk` can be attached live to a paused twin: a virtio disk (a PCIe device) into an
/// empty root port can; a SATA disk cannot.
fn hot_attachable(disk: &super::spec::DiskSpec) -> bool {
    disk_bus(&disk.controller).0 == "virtio"
}

/// The domain XML for `spec` with its files as `files` says; `spare_port` adds an empty PCIe
/// root port (a pre-created twin's boot disk goes there at its resume).
pub fn domain_xml_for(
    spec: &VmSpec,
    files: Files<'_>,
    net: &NetMode,
    id: &GuestIdentity,
    spare_port: bool,
) -> String {
    let d = |f: &str| match files {
        Files::Local(dir) => x(&dir.join(f).display().to_string()),
        Files::Remote { .. } => String::new(),
    };
    let mut o = String::new();
    let kind = match spec.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    o.push_str(&format!("<domain type='{kind}'>\n"));
    o.push_str(&format!("  <name>{}</name>\n", x(&spec.name)));
    if let Some(u) = &spec.smbios_uuid {
        o.push_str(&format!("  <uuid>{}</uuid>\n", x(u)));
    }
    o.push_str(&format!(
        "  <description>vigil twin of {} (epoch {})</description>\n",
        x(&spec.node),
        spec.epoch
    ));
    o.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n",
        spec.memory_mib
    ));
    o.push_str(&format!("  <vcpu>{}</vcpu>\n", spec.cpu.vcpus()));
    // SMBIOS type 1: licences are often bound to these.
    o.push_str("  <sysinfo type='smbios'>\n    <system>\n");
    for (k, v) in [
        ("manufacturer", &spec.smbios_manufacturer),
        ("product", &spec.smbios_product),
        ("serial", &spec.smbios_serial),
        ("uuid", &spec.smbios_uuid),
    ] {
        if let Some(v) = v {
            o.push_str(&format!("      <entry name='{k}'>{}</entry>\n", x(v)));
        }
    }
    o.push_str("    </system>\n  </sysinfo>\n");
    o.push_str("  <sysinfo type='fwcfg'>\n");
    o.push_str(&format!(
        "    <entry name='opt/vigil/node'>{}</entry>\n",
        x(&spec.node)
    ));
    o.push_str(&format!(
        "    <entry name='opt/vigil/epoch'>{}</entry>\n",
        spec.epoch
    ));
    o.push_str(&format!(
        "    <entry name='opt/vigil/appliance'>{}</entry>\n",
        x(&id.appliance)
    ));
    let key = match files {
        Files::Local(_) => d("key"),
        Files::Remote { key } => x(key),
    };
    o.push_str(&format!("    <entry name='opt/vigil/key' file='{key}'/>\n"));
    o.push_str("  </sysinfo>\n");
    o.push_str("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n");
    match &spec.boot {
        BootSpec::Kernel {
            kernel,
            initrd,
            append,
        } => {
            o.push_str(&format!("    <kernel>{}</kernel>\n", x(kernel)));
            o.push_str(&format!("    <initrd>{}</initrd>\n", x(initrd)));
            o.push_str(&format!("    <cmdline>{}</cmdline>\n", x(append)));
        }
        BootSpec::Uefi => {
            o.push_str("    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\n");
            match files {
                Files::Local(_) => o.push_str(&format!(
                    "    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{}</nvram>\n",
                    d("OVMF_VARS.fd")
                )),
                // (libvirt keeps it under its own folder on the host.)
                Files::Remote { .. } => {
                    o.push_str("    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>\n")
                }
            }
            o.push_str("    <boot dev='hd'/>\n");
        }
        BootSpec::Bios => o.push_str("    <boot dev='hd'/>\n"),
    }
    o.push_str("    <smbios mode='sysinfo'/>\n  </os>\n");
    o.push_str("  <features>\n    <acpi/>\n  </features>\n");
    if spec.cpu.model == "host" {
        o.push_str("  <cpu mode='host-passthrough' check='none'>\n");
    } else {
        // The named model exactly, or no start (fallback='forbid'). check='partial', not 'full':
        // libvirt's CPU map differs from QEMU's own model definitions (libvirt 9.0's
        // Icelake-Server still lists vme and mpx, which QEMU 10 under TCG does not give), so a
        // full check refuses every twin; the features the host cannot give are already
        // disabled below, which is what the QEMU driver's `,enforce` guarantees.
        o.push_str("  <cpu mode='custom' match='exact' check='partial'>\n");
        o.push_str(&format!(
            "    <model fallback='forbid'>{}</model>\n",
            x(&spec.cpu.model)
        ));
    }
    o.push_str(&format!(
        "    <topology sockets='{}' dies='1' cores='{}' threads='{}'/>\n",
        spec.cpu.sockets, spec.cpu.cores, spec.cpu.threads
    ));
    if spec.cpu.model != "host" {
        for f in &spec.cpu.minus {
            o.push_str(&format!(
                "    <feature policy='disable' name='{}'/>\n",
                x(f)
            ));
        }
    }
    o.push_str("  </cpu>\n");
    o.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    o.push_str("  <devices>\n");
    if spare_port {
        // libvirt fills free root ports with the devices it places itself (the NICs, its USB
        // controller) before it adds ports of its own: enough are given that some stay empty
        // for the disk (the attach is read back: a disk that found no port is an error, said).
        o.push_str("    <controller type='pci' index='0' model='pcie-root'/>\n");
        for _ in 0..spec.nics.len() + 4 {
            o.push_str("    <controller type='pci' model='pcie-root-port'/>\n");
        }
    }
    if let Some(disk) = &spec.disk {
        o.push_str(&disk_xml(disk));
    }
    for n in &spec.nics {
        let model = match n.model.as_str() {
            "virtio-net-pci" => "virtio",
            m => m,
        };
        match net {
            NetMode::User => o.push_str("    <interface type='user'>\n"),
            NetMode::Bridge(br) => o.push_str(&format!(
                "    <interface type='bridge'>\n      <source bridge='{}'/>\n",
                x(br)
            )),
        }
        o.push_str(&format!(
            "      <mac address='{}'/>\n      <model type='{}'/>\n    </interface>\n",
            x(&n.mac),
            x(model)
        ));
    }
    match files {
        Files::Local(_) => o.push_str(&format!(
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n",
            d("serial.log")
        )),
        Files::Remote { .. } => {
            o.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
        }
    }
    // No graphics element at all: no display (`<graphics type='none'>` is newer than libvirt 9.0).
    o.push_str(
        "    <video>\n      <model type='none'/>\n    </video>\n    <memballoon model='none'/>\n",
    );
    o.push_str("  </devices>\n</domain>\n");
    o
}

/// The `uid:gid` of the DAC base label in a host's capabilities (`<baselabel
/// type='kvm'>+64055:+64055</baselabel>` in the `dac` security model): the user QEMU runs as.
pub fn dac_owner(capabilities: &str) -> Option<(u32, u32)> {
    let dac = capabilities.split("<model>dac</model>").nth(1)?;
    let dac = dac.split("</secmodel>").next()?;
    let label = dac.split("<baselabel").nth(1)?;
    let label = label.split('>').nth(1)?.split('<').next()?;
    let (u, g) = label.split_once(':')?;
    Some((
        u.trim().trim_start_matches('+').parse().ok()?,
        g.trim().trim_start_matches('+').parse().ok()?,
    ))
}

/// The CPU features a libvirt refusal names ("... does not provide required features: a, b").
pub fn missing_features(err: &str) -> Vec<String> {
    err.split("required features:")
        .nth(1)
        .map(|rest| {
            rest.split(';')
                .next()
                .unwrap_or("")
                .split(',')
                .map(|f| f.trim().to_string())
                .filter(|f| {
                    !f.is_empty()
                        && f.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The libvirt driver for one host.
#[derive(Debug, Clone)]
pub struct LibvirtDriver {
    /// The connect URI (`qemu:///system`, `qemu+ssh://root@host/system`, `test:///default`).
    pub uri: String,
    /// Where VM folders (domain XML, key, serial log) live.
    pub run_dir: PathBuf,
    /// The `virsh` binary.
    pub virsh: PathBuf,
    /// How NICs are connected.
    pub net: NetMode,
    /// How long one virsh call may take.
    pub timeout: Duration,
    /// With a remote URI: the storage pool on the host that keys are uploaded to (made at first
    /// use as a dir pool at `key_pool_dir`, mode 0700, if it does not exist).
    pub key_pool: String,
    /// Where that pool keeps its volumes on the host.
    pub key_pool_dir: PathBuf,
}

impl LibvirtDriver {
    /// A driver for `uri` with its VM folders under `run_dir`.
    pub fn new(uri: &str, run_dir: PathBuf, net: NetMode) -> Self {
        LibvirtDriver {
            uri: uri.to_string(),
            run_dir,
            virsh: PathBuf::from("virsh"),
            net,
            timeout: Duration::from_secs(60),
            key_pool: "vigil-keys".into(),
            key_pool_dir: PathBuf::from("/var/lib/libvirt/vigil-keys"),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    /// Whether the URI names a host (`qemu+ssh://root@fo1/system`): then the libvirt host's disk
    /// is not this machine's, whatever the name resolves to.
    pub fn remote(&self) -> bool {
        self.uri
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(""))
            .is_some_and(|authority| !authority.is_empty())
    }

    /// Makes sure the key pool exists and is active on the host.
    async fn key_pool_ready(&self) -> Result<(), String> {
        match self.virsh(&["pool-info", &self.key_pool]).await {
            Ok(info)
                if info
                    .lines()
                    .any(|l| l.starts_with("State:") && l.contains("running")) =>
            {
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if e.contains("not found") || e.contains("no storage pool") => {
                // 0711: QEMU (its own user on the host) may reach a key it is given by name, and
                // nobody may list them; each key is 0400 and QEMU's.
                let xml = format!(
                    "<pool type='dir'>\n  <name>{}</name>\n  <target>\n    <path>{}</path>\n    <permissions>\n      <mode>0711</mode>\n    </permissions>\n  </target>\n</pool>\n",
                    x(&self.key_pool),
                    x(&self.key_pool_dir.display().to_string())
                );
                let file = self.run_dir.join(format!("{}.pool.xml", self.key_pool));
                std::fs::create_dir_all(&self.run_dir).map_err(|e| e.to_string())?;
                std::fs::write(&file, xml).map_err(|e| e.to_string())?;
                // (Another job may be making it at the same moment: "already exists" is fine.)
                match self
                    .virsh(&["pool-define", &file.display().to_string()])
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.contains("already exists") => {}
                    Err(e) => return Err(e),
                }
                let _ = self.virsh(&["pool-build", &self.key_pool]).await;
            }
            Err(e) => return Err(e),
        }
        match self.virsh(&["pool-start", &self.key_pool]).await {
            Ok(_) => Ok(()),
            Err(e) if e.contains("already active") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The user and group QEMU runs as on the host (its DAC base label in the capabilities),
    /// if the host says.
    async fn qemu_owner(&self) -> Option<(u32, u32)> {
        dac_owner(&self.virsh(&["capabilities"]).await.ok()?)
    }

    /// Uploads `key` over the libvirt connection into a volume of the key pool named after the
    /// VM, streamed from memory; returns the volume's path on the host.
    async fn upload_key(&self, vm: &str, key: &crate::config::Secret) -> Result<String, String> {
        self.key_pool_ready()
            .await
            .map_err(|e| format!("the key pool {} cannot be used: {e}", self.key_pool))?;
        let vol = format!("{vm}.key");
        // A volume left by an interrupted start goes first.
        let _ = self
            .virsh(&["vol-delete", "--pool", &self.key_pool, &vol])
            .await;
        let bytes = key.expose().as_bytes();
        // Readable by QEMU's user only (root's where the host names none).
        let owner = match self.qemu_owner().await {
            Some((u, g)) => format!("<owner>{u}</owner><group>{g}</group>"),
            None => {
                tracing::warn!(uri = %self.uri, vm, "the host names no user QEMU runs as (no DAC security model in its capabilities): the key volume stays root's, which a QEMU not running as root cannot read");
                String::new()
            }
        };
        let vol_xml = self.run_dir.join(format!("{vm}.key-volume.xml"));
        std::fs::write(
            &vol_xml,
            format!(
                "<volume>\n  <name>{}</name>\n  <capacity unit='bytes'>{}</capacity>\n  <target>\n    <format type='raw'/>\n    <permissions>{owner}<mode>0400</mode></permissions>\n  </target>\n</volume>\n",
                x(&vol),
                bytes.len()
            ),
        )
        .map_err(|e| e.to_string())?;
        let created = self
            .virsh(&["vol-create", &self.key_pool, &vol_xml.display().to_string()])
            .await;
        let _ = std::fs::remove_file(&vol_xml);
        created?;
        let uploaded = self
            .virsh_input(
                &["vol-upload", "--pool", &self.key_pool, &vol, "/dev/stdin"],
                bytes,
            )
            .await;
        if let Err(e) = uploaded {
            self.delete_key(vm).await;
            return Err(format!("the key cannot be uploaded: {e}"));
        }
        match self
            .virsh(&["vol-path", "--pool", &self.key_pool, &vol])
            .await
        {
            Ok(path) => Ok(path.trim().to_string()),
            Err(e) => {
                self.delete_key(vm).await;
                Err(e)
            }
        }
    }

    /// Deletes the VM's key volume on the host (QEMU read it at start).
    async fn delete_key(&self, vm: &str) {
        let _ = self
            .virsh(&["vol-delete", "--pool", &self.key_pool, &format!("{vm}.key")])
            .await;
    }

    /// One virsh call: Ok(stdout) or Err(its message).
    async fn virsh(&self, args: &[&str]) -> Result<String, String> {
        self.virsh_input(args, &[]).await
    }

    /// One virsh call with `input` on its standard input (nothing: /dev/null).
    async fn virsh_input(&self, args: &[&str], input: &[u8]) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(&self.virsh);
        cmd.arg("-q").arg("-c").arg(&self.uri).args(args);
        cmd.stdin(if input.is_empty() {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::piped()
        });
        cmd.stdout(std::process::Stdio::piped());
        cmd.stderr(std::process::Stdio::piped());
        cmd.kill_on_drop(true);
        let run = async {
            let mut child = cmd.spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                // (A virsh that ended early says why on its stderr: a broken pipe here would
                // only hide it.)
                let _ = stdin.write_all(input).await;
                // (Dropped: virsh reads to the end.)
            }
            child.wait_with_output().await
        };
        let out = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(format!("virsh cannot run: {e}")),
            Err(_) => {
                return Err(format!(
                    "virsh {} took more than {} s",
                    args.first().unwrap_or(&""),
                    self.timeout.as_secs()
                ));
            }
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let e = String::from_utf8_lossy(&out.stderr);
            Err(e
                .lines()
                .map(|l| l.trim_start_matches("error: ").trim())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "))
        }
    }

    /// Parses `virsh domstate` output.
    pub fn parse_state(s: &str) -> VmState {
        match s.trim() {
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "shut off" => VmState::Stopped,
            other => VmState::Other(other.to_string()),
        }
    }

    async fn state(&self, name: &str) -> VmState {
        match self.virsh(&["domstate", name]).await {
            Ok(s) => Self::parse_state(&s),
            Err(e) if e.contains("failed to get domain") || e.contains("Domain not found") => {
                VmState::Absent
            }
            Err(e) => VmState::Other(format!("unreadable: {e}")),
        }
    }

    fn refused(name: &str, reason: String) -> VirtError {
        VirtError::Refused {
            vm: name.to_string(),
            reason: format!("libvirt: {reason}"),
        }
    }

    async fn create_inner(
        &self,
        spec: &VmSpec,
        id: &GuestIdentity,
        paused: bool,
    ) -> Result<VmState, VirtError> {
        let name = spec.name.as_str();
        if matches!(self.state(name).await, VmState::Running | VmState::Paused) {
            return Err(VirtError::Exists(name.to_string()));
        }
        let dir = self.dir(name);
        let io = |what: &'static str| {
            move |e: std::io::Error| VirtError::Io {
                vm: name.to_string(),
                what,
                reason: e.to_string(),
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create its folder"))?;
        let remote = self.remote();
        let key_path = if remote {
            Some(
                self.upload_key(name, &id.key)
                    .await
                    .map_err(|e| Self::refused(name, e))?,
            )
        } else {
            super::write_key(&dir, &id.key).map_err(io("write its key"))?;
            None
        };
        let r = self
            .define_and_start(spec, id, paused, &dir, key_path.as_deref())
            .await;
        // QEMU read its fw_cfg files at start (before pausing, with --paused), and a failed
        // start needs them no more: the key does not stay on any disk.
        if remote {
            self.delete_key(name).await;
        } else {
            let _ = std::fs::remove_file(dir.join("key"));
        }
        r
    }

    async fn define_and_start(
        &self,
        spec: &VmSpec,
        id: &GuestIdentity,
        paused: bool,
        dir: &Path,
        key_path: Option<&str>,
    ) -> Result<VmState, VirtError> {
        let name = spec.name.as_str();
        let io = |what: &'static str| {
            move |e: std::io::Error| VirtError::Io {
                vm: name.to_string(),
                what,
                reason: e.to_string(),
            }
        };
        let files = match key_path {
            Some(key) => Files::Remote { key },
            None => Files::Local(dir),
        };
        // A pre-created twin waits without its boot disk: attached at the resume (`start`),
        // after the fence.
        let mut spec = spec.clone();
        let pending_file = dir.join("disk-pending.json");
        let pending = match spec.disk.take() {
            Some(d) if paused && hot_attachable(&d) => Some(d),
            other => {
                spec.disk = other;
                None
            }
        };
        match &pending {
            Some(d) => std::fs::write(
                &pending_file,
                serde_json::to_vec(d).map_err(|e| io("record its pending disk")(e.into()))?,
            )
            .map_err(io("record its pending disk"))?,
            None => {
                let _ = std::fs::remove_file(&pending_file);
            }
        }
        let xml_path = dir.join("domain.xml");
        let xml = xml_path.display().to_string();
        // libvirt's CPU map is not QEMU's: a model may need features there that this host's
        // QEMU cannot give (libvirt 9.0's Icelake-Server lists vme, which TCG lacks). libvirt
        // names them when it refuses to start; they are disabled too, said in the log and in
        // the VM's folder (cpu-disabled-by-libvirt.txt), and the start is tried again, twice at
        // most. Never a silent downgrade: what is given up is written down.
        let mut disabled: Vec<String> = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            std::fs::write(
                &xml_path,
                domain_xml_for(&spec, files, &self.net, id, pending.is_some()),
            )
            .map_err(io("write its domain XML"))?;
            self.virsh(&["define", &xml])
                .await
                .map_err(|e| Self::refused(name, e))?;
            let mut start = vec!["start", name];
            if paused {
                start.push("--paused");
            }
            match self.virsh(&start).await {
                Ok(_) => break,
                Err(e) => {
                    let _ = self.virsh(&["undefine", name, "--nvram"]).await;
                    let missing = missing_features(&e);
                    if attempt < 3 && !missing.is_empty() && spec.cpu.model != "host" {
                        tracing::warn!(vm = name, features = ?missing, "libvirt's CPU model needs features this host cannot give: disabled");
                        for f in missing {
                            if !spec.cpu.minus.contains(&f) {
                                spec.cpu.minus.push(f.clone());
                                disabled.push(f);
                            }
                        }
                        continue;
                    }
                    return Err(Self::refused(name, e));
                }
            }
        }
        if !disabled.is_empty() {
            std::fs::write(
                dir.join("cpu-disabled-by-libvirt.txt"),
                disabled.join("\n") + "\n",
            )
            .map_err(io("write the features libvirt disabled"))?;
        }
        let st = self.state(name).await;
        match (&st, paused) {
            (VmState::Running, false) | (VmState::Paused, true) => Ok(st),
            _ => Err(Self::refused(
                name,
                format!("started, but reads back {st:?}"),
            )),
        }
    }

    /// Attaches a pre-created twin's boot disk, live, into its empty root port, and reads it
    /// back (`domblklist`). Done already (an earlier resume that failed later): nothing again.
    async fn attach_pending_disk(&self, name: &str) -> Result<(), VirtError> {
        let pending = self.dir(name).join("disk-pending.json");
        let Ok(text) = std::fs::read(&pending) else {
            return Ok(());
        };
        let fail = |reason: String| {
            Self::refused(name, format!("its boot disk cannot be attached: {reason}"))
        };
        let disk: super::spec::DiskSpec =
            serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
        let (_, dev) = disk_bus(&disk.controller);
        let attached = |list: &str| {
            list.lines()
                .any(|l| l.split_whitespace().next() == Some(dev))
        };
        let before = self.virsh(&["domblklist", name]).await.map_err(fail)?;
        if !attached(&before) {
            let file = self.dir(name).join("disk.xml");
            std::fs::write(&file, disk_xml(&disk)).map_err(|e| fail(e.to_string()))?;
            self.virsh(&["attach-device", name, &file.display().to_string(), "--live"])
                .await
                .map_err(fail)?;
            let after = self.virsh(&["domblklist", name]).await.map_err(fail)?;
            if !attached(&after) {
                return Err(fail(format!("domblklist does not show {dev}: {after}")));
            }
        }
        let _done = std::fs::remove_file(&pending);
        Ok(())
    }

    async fn stop_inner(&self, name: &str, grace: Duration) -> Result<(), VirtError> {
        if matches!(self.state(name).await, VmState::Absent | VmState::Stopped) {
            return Ok(());
        }
        // ACPI power button first: the guest may shut down cleanly.
        let _ = self.virsh(&["shutdown", name, "--mode", "acpi"]).await;
        let t0 = tokio::time::Instant::now();
        while t0.elapsed() < grace {
            if matches!(self.state(name).await, VmState::Stopped | VmState::Absent) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = self.virsh(&["destroy", name]).await;
        match self.state(name).await {
            VmState::Stopped | VmState::Absent => Ok(()),
            st => Err(VirtError::NotStopped {
                vm: name.to_string(),
                state: format!("{st:?}"),
            }),
        }
    }
}

impl Hypervisor for LibvirtDriver {
    fn kind(&self) -> &'static str {
        "libvirt"
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
            // Resumes a paused twin. A stopped one is not restarted here: its key left the disk
            // once QEMU read it, so it is created again instead.
            if self.state(&name).await == VmState::Paused {
                self.attach_pending_disk(&name).await?;
                self.virsh(&["resume", &name])
                    .await
                    .map_err(|e| Self::refused(&name, e))?;
            }
            match self.state(&name).await {
                VmState::Running => Ok(VmState::Running),
                st => Err(Self::refused(&name, format!("reads back {st:?}"))),
            }
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
            let _ = self.virsh(&["destroy", &name]).await;
            let _ = self.virsh(&["undefine", &name, "--nvram"]).await;
            let _ = std::fs::remove_file(self.dir(&name).join("key"));
            let _ = std::fs::remove_file(self.dir(&name).join("disk-pending.json"));
            if self.remote() {
                self.delete_key(&name).await;
            }
            match self.state(&name).await {
                VmState::Absent => Ok(()),
                st => Err(VirtError::NotStopped {
                    vm: name.clone(),
                    state: format!("{st:?}"),
                }),
            }
        })
    }

    fn adjustments(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir(name).join("cpu-disabled-by-libvirt.txt"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|f| format!("cpu feature {} disabled (libvirt's CPU model needs it; the host cannot give it)", f.trim()))
            .collect()
    }

    fn list(&self) -> BoxFuture<'_, Vec<(String, VmState)>> {
        Box::pin(async move { self.list_checked().await.unwrap_or_default() })
    }

    fn list_checked(&self) -> BoxFuture<'_, Result<Vec<(String, VmState)>, VirtError>> {
        Box::pin(async move {
            let names = self
                .virsh(&["list", "--all", "--name"])
                .await
                .map_err(|reason| VirtError::Io {
                    vm: "*".into(),
                    what: "list the host's domains",
                    reason,
                })?;
            let mut out = Vec::new();
            for n in names
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with("vigil-"))
            {
                out.push((n.to_string(), self.state(n).await));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_features_to_disable() {
        assert_eq!(
            missing_features(
                "Failed to start domain 'x'; the CPU is incompatible with host CPU: Host CPU does not provide required features: vme, mpx"
            ),
            vec!["vme", "mpx"]
        );
        assert!(missing_features("Domain not found").is_empty());
        // Nothing that could smuggle XML in.
        assert!(missing_features("required features: <evil/>").is_empty());
    }

    #[test]
    fn the_user_qemu_runs_as_comes_from_the_dac_base_label() {
        let caps = "<capabilities><host><secmodel>\n<model>selinux</model>\n<doi>0</doi>\n<baselabel type='kvm'>system_u:system_r:svirt_t:s0</baselabel>\n</secmodel>\n<secmodel>\n<model>dac</model>\n<doi>0</doi>\n<baselabel type='kvm'>+64055:+994</baselabel>\n<baselabel type='qemu'>+64055:+994</baselabel>\n</secmodel></host></capabilities>";
        assert_eq!(dac_owner(caps), Some((64055, 994)));
        // No DAC model (no security driver): nothing said, root keeps it.
        assert_eq!(
            dac_owner("<secmodel><model>none</model><doi>0</doi></secmodel>"),
            None
        );
        assert_eq!(
            dac_owner(
                "<secmodel><model>dac</model><baselabel type='kvm'>+x:+1</baselabel></secmodel>"
            ),
            None
        );
    }

    #[test]
    fn remote_is_a_uri_that_names_a_host() {
        let d = |u: &str| LibvirtDriver::new(u, PathBuf::from("/tmp"), NetMode::User).remote();
        assert!(!d("qemu:///system"));
        assert!(!d("qemu:///system?socket=/run/x/libvirt-sock"));
        assert!(!d("test:///default"));
        assert!(d("qemu+ssh://root@fo1/system"));
        assert!(d("qemu+tls://fo1.example:16514/system"));
        assert!(d("qemu+tcp://127.0.0.1:16509/system"));
    }

    #[test]
    fn values_are_escaped() {
        assert_eq!(x("a<b>&'\"\u{1}c"), "a&lt;b&gt;&amp;&apos;&quot;c");
    }
}
