//! From a node's hardware profile to the spec of its virtual twin, with a fidelity report. Pure.
//!
//! Overview: [`build`] takes the recorded [`HardwareProfile`], what the chosen host can give, and
//! the policy, and decides the twin: a QEMU CPU model matched to the physical CPU
//! (`firmware-profiles/cpu-models.toml`) minus the features the host cannot give, or
//! host-passthrough; the topology (sockets x cores x threads) and memory, capped to the node's
//! `virtual` size; one NIC per physical MAC; the SMBIOS type 1 identity (licences are bound to
//! it); the boot mode; the node's boot disk on shared storage, behind an emulated controller of
//! the physical kind. Every choice lands in the [`Fidelity`] report: what matches, what was
//! substituted (and why), what is missing. The report goes to the fencing log with the failover.
//!
//! Scope: deciding. Rendering the spec as a QEMU command line or libvirt XML is `qemu.rs` and
//! `libvirt.rs`.
//!
//! Key types: [`VmSpec`], [`Fidelity`], [`build`], [`CpuTable`].

use serde::{Deserialize, Serialize};

use crate::config::CpuPolicy;
use crate::model::HardwareProfile;
use crate::model::profile::BootMode;

/// The CPU table shipped with vigil.
const CPU_TABLE: &str = include_str!("../../firmware-profiles/cpu-models.toml");

/// One row of the CPU table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuRow {
    /// Substrings of the physical model string.
    #[serde(rename = "match")]
    pub patterns: Vec<String>,
    /// For EPYC: the model number's last digit (generation).
    #[serde(default)]
    pub last_digit: Option<String>,
    /// The family, for reports.
    pub family: String,
    /// The QEMU model.
    pub qemu: String,
    /// Features of the model TCG cannot give.
    #[serde(default)]
    pub unavailable_tcg: Vec<String>,
}

/// The CPU table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTable {
    /// Rows, first match wins.
    #[serde(rename = "model")]
    pub rows: Vec<CpuRow>,
}

impl CpuTable {
    /// The table shipped with vigil.
    pub fn builtin() -> Self {
        toml::from_str(CPU_TABLE).expect("the shipped CPU table parses (tested)")
    }

    /// The row for a physical CPU model string.
    pub fn lookup(&self, model: &str) -> Option<&CpuRow> {
        let m = model.to_ascii_lowercase();
        let epyc_digit = m
            .split("epyc")
            .nth(1)
            .and_then(|rest| rest.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.chars().last())
            .map(String::from);
        self.rows.iter().find(|r| {
            r.patterns
                .iter()
                .any(|p| m.contains(&p.to_ascii_lowercase()))
                && r.last_digit
                    .as_ref()
                    .is_none_or(|d| epyc_digit.as_ref() == Some(d))
        })
    }
}

/// How the host runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// What the chosen host can give one virtual node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// vCPUs at most.
    pub vcpus: u32,
    /// Memory at most, MiB.
    pub memory_mib: u64,
    /// KVM or TCG.
    pub accel: Accel,
}

/// The CPU of the twin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSpec {
    /// The QEMU model, or `host` for passthrough.
    pub model: String,
    /// Features removed because the host cannot give them.
    pub minus: Vec<String>,
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl CpuSpec {
    /// vCPUs in all.
    pub fn vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }
}

/// A NIC of the twin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// The node's MAC.
    pub mac: String,
    /// The emulated model.
    pub model: String,
}

/// How the twin boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum BootSpec {
    /// Legacy BIOS (SeaBIOS) from the boot disk.
    Bios,
    /// UEFI (OVMF) from the boot disk.
    Uefi,
    /// A kernel and initrd given directly (the lab's guest).
    Kernel {
        /// The kernel.
        kernel: String,
        /// The initrd.
        initrd: String,
        /// Its command line.
        append: String,
    },
}

/// The twin's boot disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// A path, `iscsi://...`, `rbd:...`, `nbd://...`.
    pub source: String,
    /// The emulated controller (`virtio-blk-pci`, `nvme`, `ahci`).
    pub controller: String,
}

/// One line of the fidelity report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Substitution {
    /// What (`cpu`, `memory`, `nic 1`).
    pub what: String,
    /// The physical node's.
    pub physical: String,
    /// The twin's.
    pub virtual_: String,
    /// Why.
    pub why: String,
}

/// What matches, what was substituted, what is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Matching as recorded.
    pub matches: Vec<String>,
    /// Substituted.
    pub substituted: Vec<Substitution>,
    /// Not given to the twin at all.
    pub missing: Vec<String>,
}

/// A virtual node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The VM's name: `vigil-<node>-e<epoch>`.
    pub name: String,
    /// The node it stands in for.
    pub node: String,
    /// The failover epoch it is booted for.
    pub epoch: u64,
    /// CPU.
    pub cpu: CpuSpec,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// NICs.
    pub nics: Vec<NicSpec>,
    /// SMBIOS manufacturer.
    pub smbios_manufacturer: Option<String>,
    /// SMBIOS product.
    pub smbios_product: Option<String>,
    /// SMBIOS serial.
    pub smbios_serial: Option<String>,
    /// SMBIOS UUID.
    pub smbios_uuid: Option<String>,
    /// Boot.
    pub boot: BootSpec,
    /// Boot disk.
    pub disk: Option<DiskSpec>,
    /// KVM or TCG.
    pub accel: Accel,
    /// The report.
    pub fidelity: Fidelity,
}

/// What besides the profile decides the twin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs<'a> {
    /// The node.
    pub node: &'a str,
    /// The failover epoch.
    pub epoch: u64,
    /// The node's cap (`[node.virtual]`), if any.
    pub cap_vcpus: Option<u32>,
    /// The node's memory cap, MiB.
    pub cap_memory_mib: Option<u64>,
    /// Named model or passthrough.
    pub cpu_policy: CpuPolicy,
    /// The node's boot disk.
    pub boot_disk: Option<&'a str>,
    /// A direct kernel boot instead of the recorded boot mode (the lab's guest).
    pub kernel: Option<BootSpec>,
}

/// SMBIOS strings QEMU takes on its command line: no commas (QEMU's option separator) and
/// printable ASCII only.
fn smbios_clean(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .map(|v| {
            v.chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .filter(|c| *c != ',')
                .collect::<String>()
        })
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Builds the twin of `p` for a host with `limits`.
pub fn build(
    p: &HardwareProfile,
    inputs: &Inputs<'_>,
    limits: HostLimits,
    table: &CpuTable,
) -> VmSpec {
    let mut f = Fidelity::default();

    // CPU model.
    let physical = p.cpu.model.clone().unwrap_or_else(|| "unknown CPU".into());
    let cpu_model = match (inputs.cpu_policy, limits.accel) {
        (CpuPolicy::HostPassthrough, Accel::Kvm) => {
            f.substituted.push(Substitution {
                what: "cpu model".into(),
                physical,
                virtual_: "host (passthrough)".into(),
                why: "policy cpu_model = host-passthrough".into(),
            });
            CpuSpec {
                model: "host".into(),
                minus: Vec::new(),
                sockets: 1,
                cores: 1,
                threads: 1,
            }
        }
        (policy, accel) => match table.lookup(&physical) {
            Some(row) => {
                let minus = if accel == Accel::Tcg {
                    row.unavailable_tcg.clone()
                } else {
                    Vec::new()
                };
                if policy == CpuPolicy::HostPassthrough {
                    f.substituted.push(Substitution {
                        what: "cpu model".into(),
                        physical: physical.clone(),
                        virtual_: row.qemu.clone(),
                        why: "host-passthrough needs KVM; this host emulates (TCG)".into(),
                    });
                } else {
                    f.matches.push(format!(
                        "cpu model: {physical} -> {} ({})",
                        row.qemu, row.family
                    ));
                }
                for m in &minus {
                    f.missing.push(format!(
                        "cpu feature {m} (the host cannot give it under TCG)"
                    ));
                }
                CpuSpec {
                    model: row.qemu.clone(),
                    minus,
                    sockets: 1,
                    cores: 1,
                    threads: 1,
                }
            }
            None => {
                f.substituted.push(Substitution {
                    what: "cpu model".into(),
                    physical: physical.clone(),
                    virtual_: "qemu64".into(),
                    why: "no x86 model in firmware-profiles/cpu-models.toml matches it".into(),
                });
                CpuSpec {
                    model: "qemu64".into(),
                    minus: Vec::new(),
                    sockets: 1,
                    cores: 1,
                    threads: 1,
                }
            }
        },
    };

    // Topology, capped by the node's virtual size and the host.
    let (ps, pc, pt) = (
        p.cpu.sockets.max(1),
        p.cpu.cores_per_socket.max(1),
        p.cpu.threads_per_core.max(1),
    );
    let cap = inputs
        .cap_vcpus
        .unwrap_or(u32::MAX)
        .min(limits.vcpus)
        .max(1);
    let (mut s, mut c, mut t) = (ps, pc, pt);
    if s * c * t > cap {
        // Keep the shape as far as it goes: threads, then sockets, then cores shrink.
        if t > 1 && cap % t != 0 {
            t = 1;
        }
        while s * c * t > cap && s > 1 {
            s -= 1;
        }
        c = (cap / (s * t)).max(1);
    }
    let cpu = CpuSpec {
        sockets: s,
        cores: c,
        threads: t,
        ..cpu_model
    };
    let topo = format!("{ps} sockets x {pc} cores x {pt} threads");
    if (s, c, t) == (ps, pc, pt) {
        f.matches.push(format!("cpu topology: {topo}"));
    } else {
        f.substituted.push(Substitution {
            what: "cpu topology".into(),
            physical: topo,
            virtual_: format!("{s} sockets x {c} cores x {t} threads"),
            why: format!("capped at {cap} vCPUs (the node's [virtual] size or the host)"),
        });
    }

    // Memory.
    let mem_cap = inputs
        .cap_memory_mib
        .unwrap_or(u64::MAX)
        .min(limits.memory_mib)
        .max(64);
    let memory_mib = if p.memory_mib == 0 {
        mem_cap.min(1024)
    } else {
        p.memory_mib.min(mem_cap)
    };
    if memory_mib == p.memory_mib {
        f.matches.push(format!("memory: {} MiB", p.memory_mib));
    } else {
        f.substituted.push(Substitution {
            what: "memory".into(),
            physical: format!("{} MiB", p.memory_mib),
            virtual_: format!("{memory_mib} MiB"),
            why: format!("capped at {mem_cap} MiB (the node's [virtual] size or the host)"),
        });
    }

    // NICs: one per physical MAC; virtio, which every modern guest OS drives.
    let nics: Vec<NicSpec> = p
        .nics
        .iter()
        .map(|n| NicSpec {
            mac: n.mac.clone(),
            model: "virtio-net-pci".into(),
        })
        .collect();
    if nics.is_empty() {
        f.missing.push("network: the profile records no MAC".into());
    } else {
        f.matches.push(format!(
            "MACs: {}",
            nics.iter()
                .map(|n| n.mac.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        f.substituted.push(Substitution {
            what: "nic model".into(),
            physical: format!("{} physical interface(s)", nics.len()),
            virtual_: "virtio-net-pci".into(),
            why: "paravirtual NIC with the node's MACs".into(),
        });
    }

    // SMBIOS identity.
    let smbios = [
        ("manufacturer", &p.smbios.manufacturer),
        ("product", &p.smbios.product),
        ("serial", &p.smbios.serial),
        ("uuid", &p.smbios.uuid),
    ];
    for (k, v) in smbios {
        match v {
            Some(v) => f.matches.push(format!("smbios {k}: {v}")),
            None => f.missing.push(format!("smbios {k}: not recorded")),
        }
    }

    // Boot.
    let boot = match (&inputs.kernel, p.boot_mode) {
        (Some(k), mode) => {
            f.substituted.push(Substitution {
                what: "boot".into(),
                physical: format!("{mode:?}"),
                virtual_: "direct kernel boot".into(),
                why: "the lab's guest boots a kernel and initrd".into(),
            });
            k.clone()
        }
        (None, BootMode::Uefi) => {
            f.matches.push("boot mode: UEFI (OVMF)".into());
            BootSpec::Uefi
        }
        (None, BootMode::Legacy) => {
            f.matches.push("boot mode: legacy BIOS (SeaBIOS)".into());
            BootSpec::Bios
        }
        (None, BootMode::Unknown) => {
            f.substituted.push(Substitution {
                what: "boot mode".into(),
                physical: "not recorded".into(),
                virtual_: "UEFI (OVMF)".into(),
                why: "the profile does not say; UEFI is what current servers use".into(),
            });
            BootSpec::Uefi
        }
    };

    // Storage: the physical kind, emulated.
    let controller = if p
        .drives
        .iter()
        .any(|d| d.protocol.as_deref() == Some("NVMe"))
    {
        "nvme"
    } else if p
        .drives
        .iter()
        .any(|d| matches!(d.protocol.as_deref(), Some("SATA")))
    {
        "ahci"
    } else {
        "virtio-blk-pci"
    };
    let disk = inputs.boot_disk.map(|src| DiskSpec {
        source: src.to_string(),
        controller: controller.into(),
    });
    match &disk {
        Some(d) => f
            .matches
            .push(format!("boot disk: {} on {}", d.source, d.controller)),
        None => f
            .missing
            .push("boot disk: the node has none configured".into()),
    }
    if !p.pcie.is_empty() {
        let accel: Vec<String> = p
            .pcie
            .iter()
            .filter(|d| {
                d.name.as_deref().is_some_and(|n| {
                    n.contains("GPU") || n.contains("BlueField") || n.contains("DPU")
                })
            })
            .map(|d| d.name.clone().unwrap_or_default())
            .collect();
        if !accel.is_empty() {
            f.missing.push(format!(
                "PCIe accelerators (no emulation): {}",
                accel.join(", ")
            ));
        }
    }

    VmSpec {
        name: format!("vigil-{}-e{}", inputs.node, inputs.epoch),
        node: inputs.node.to_string(),
        epoch: inputs.epoch,
        cpu,
        memory_mib,
        nics,
        smbios_manufacturer: smbios_clean(&p.smbios.manufacturer),
        smbios_product: smbios_clean(&p.smbios.product),
        smbios_serial: smbios_clean(&p.smbios.serial),
        smbios_uuid: smbios_clean(&p.smbios.uuid),
        boot,
        disk,
        accel: limits.accel,
        fidelity: f,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_table_parses_and_matches_real_models() {
        let t = CpuTable::builtin();
        assert_eq!(
            t.lookup("Intel(R) Xeon(R) Gold 6354 CPU @ 3.00GHz")
                .unwrap()
                .qemu,
            "Icelake-Server"
        );
        assert_eq!(
            t.lookup("Intel(R) Xeon(R) Platinum 8462Y+").unwrap().qemu,
            "SapphireRapids"
        );
        assert_eq!(
            t.lookup("AMD EPYC 7763 64-Core Processor").unwrap().qemu,
            "EPYC-Milan"
        );
        assert_eq!(
            t.lookup("AMD EPYC 7702 64-Core Processor").unwrap().qemu,
            "EPYC-Rome"
        );
        assert_eq!(
            t.lookup("Multi-Core Intel(R) Xeon(R) processor E5-1603")
                .unwrap()
                .qemu,
            "Broadwell"
        );
        assert!(t.lookup("NVIDIA Grace").is_none());
    }
}
