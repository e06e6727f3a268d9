//! A node's hardware profile: what its virtual twin must look like.
//!
//! Captured from the BMC's inventory (`vigil profile capture`) and stored as JSON in the state
//! directory; the VM spec is built from it.

use serde::{Deserialize, Serialize};

/// CPU identity and topology.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// Vendor (`Intel(R) Corporation`, `AMD`).
    pub vendor: Option<String>,
    /// Model string (`Intel(R) Xeon(R) Gold 6354 CPU @ 3.00GHz`).
    pub model: Option<String>,
    /// Family, model, stepping where exposed.
    pub family: Option<String>,
    /// CPUID model.
    pub cpuid_model: Option<String>,
    /// Stepping.
    pub stepping: Option<String>,
    /// Sockets populated.
    pub sockets: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
    /// Threads per core.
    pub threads_per_core: u32,
    /// Feature flags, where the BMC exposes them.
    pub flags: Vec<String>,
}

/// A memory module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dimm {
    /// Its id.
    pub id: String,
    /// Size in MiB.
    pub size_mib: u64,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Its id.
    pub id: String,
    /// MAC address, lower case with colons.
    pub mac: String,
    /// Speed in Mbit/s.
    pub speed_mbps: Option<u64>,
}

/// A PCIe function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcieDevice {
    /// Its id.
    pub id: String,
    /// Name.
    pub name: Option<String>,
    /// Class code.
    pub class: Option<String>,
    /// Vendor id.
    pub vendor_id: Option<String>,
    /// Device id.
    pub device_id: Option<String>,
}

/// A drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Its id.
    pub id: String,
    /// Model.
    pub model: Option<String>,
    /// Capacity in bytes.
    pub capacity_bytes: Option<u64>,
    /// Protocol (SATA, SAS, NVMe).
    pub protocol: Option<String>,
}

/// SMBIOS type 1 identity (licences are often bound to it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Smbios {
    /// Manufacturer.
    pub manufacturer: Option<String>,
    /// Product (model).
    pub product: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// System UUID.
    pub uuid: Option<String>,
}

/// How the node boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// UEFI.
    Uefi,
    /// Legacy BIOS.
    Legacy,
    /// Not reported.
    Unknown,
}

/// One node's hardware profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareProfile {
    /// The node.
    pub node: String,
    /// CPU.
    pub cpu: Cpu,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// DIMMs.
    pub dimms: Vec<Dimm>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// PCIe devices.
    pub pcie: Vec<PcieDevice>,
    /// Storage controllers by name.
    pub storage_controllers: Vec<String>,
    /// Drives.
    pub drives: Vec<Drive>,
    /// SMBIOS identity.
    pub smbios: Smbios,
    /// Boot mode.
    pub boot_mode: BootMode,
}

/// What changed between two captures, one line each.
pub fn diff(old: &HardwareProfile, new: &HardwareProfile) -> Vec<String> {
    let mut d = Vec::new();
    let (a, b) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, d: &mut Vec<String>) {
        use serde_json::Value::*;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&std::string::String> =
                    x.keys().chain(y.keys()).collect();
                for k in keys {
                    walk(
                        &format!("{path}.{k}"),
                        x.get(k).unwrap_or(&Null),
                        y.get(k).unwrap_or(&Null),
                        d,
                    );
                }
            }
            _ if a != b => d.push(format!("{}: {} -> {}", path.trim_start_matches('.'), a, b)),
            _ => {}
        }
    }
    walk("", &a, &b, &mut d);
    d
}
