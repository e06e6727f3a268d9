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
    diff_values(
        &serde_json::to_value(old).unwrap_or_default(),
        &serde_json::to_value(new).unwrap_or_default(),
    )
}

/// What changed between two JSON documents, one line per path: objects key by key; arrays (NICs,
/// DIMMs, drives, flags) as collections, since a BMC may list the same parts in another order
/// after a reboot: an element only in the old one is "removed", only in the new one "added".
fn diff_values(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, d: &mut Vec<String>) {
        use serde_json::Value::*;
        let here = path.trim_start_matches('.');
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
            (Array(x), Array(y)) => {
                let mut added: Vec<&serde_json::Value> = y.iter().collect();
                let mut removed = Vec::new();
                for v in x {
                    match added.iter().position(|w| *w == v) {
                        Some(i) => {
                            added.remove(i);
                        }
                        None => removed.push(v),
                    }
                }
                d.extend(removed.iter().map(|v| format!("{here}: removed {v}")));
                d.extend(added.iter().map(|v| format!("{here}: added {v}")));
            }
            _ if a != b => d.push(format!("{here}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut d = Vec::new();
    walk("", a, b, &mut d);
    d
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parts_listed_in_another_order_are_no_difference_and_changed_ones_are_named() {
        let old = json!({
            "smbios": { "serial": "A1" },
            "memory_mib": 1024,
            "nics": [{ "mac": "aa", "speed": 10 }, { "mac": "bb", "speed": 10 }],
        });
        // The same parts, listed the other way round: nothing to report.
        let same = json!({
            "smbios": { "serial": "A1" },
            "memory_mib": 1024,
            "nics": [{ "mac": "bb", "speed": 10 }, { "mac": "aa", "speed": 10 }],
        });
        assert!(diff_values(&old, &same).is_empty());
        let new = json!({
            "smbios": { "serial": "B2" },
            "memory_mib": 1024,
            "nics": [{ "mac": "bb", "speed": 10 }, { "mac": "cc", "speed": 25 }],
        });
        assert_eq!(
            diff_values(&old, &new),
            vec![
                r#"nics: removed {"mac":"aa","speed":10}"#.to_string(),
                r#"nics: added {"mac":"cc","speed":25}"#.to_string(),
                r#"smbios.serial: "A1" -> "B2""#.to_string(),
            ]
        );
    }
}
