//! The inventory walk: a node's hardware profile from its Redfish service.
//!
//! Overview: the System resource gives the SMBIOS identity and boot mode; its Processors,
//! Memory, EthernetInterfaces, Storage and PCIe collections give the rest. The walk is bounded
//! ([`MAX_REQUESTS`]) so that a BMC with thousands of resources cannot keep it going, and it is
//! kept apart from the status path: it runs on `vigil profile capture`, not on every poll.
//!
//! Key types: [`capture`], [`profile_from`].

use serde_json::Value;

use super::RedfishBmc;
use super::parse::{link, members, number};
use crate::bmc::BmcError;
use crate::model::HardwareProfile;
use crate::model::profile::{BootMode, Cpu, Dimm, Drive, Nic, PcieDevice, Smbios};

/// At most this many GETs for one inventory walk.
pub const MAX_REQUESTS: usize = 400;

/// Something that can GET Redfish resources (the driver, or a capture read from disk in tests).
pub trait Fetch {
    /// GET `uri` as JSON.
    fn fetch(&self, uri: &str)
    -> impl std::future::Future<Output = Result<Value, BmcError>> + Send;
}

impl Fetch for RedfishBmc {
    async fn fetch(&self, uri: &str) -> Result<Value, BmcError> {
        self.get(uri).await
    }
}

struct Budget<'a, F> {
    f: &'a F,
    left: usize,
}

impl<F: Fetch + Sync> Budget<'_, F> {
    async fn get(&mut self, uri: &str) -> Option<Value> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.f.fetch(uri).await.ok()
    }

    async fn collection(&mut self, v: &Value, name: &str) -> Vec<Value> {
        let Some(c) = link(v, name) else {
            return Vec::new();
        };
        let Some(coll) = self.get(c).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in members(&coll) {
            if let Some(x) = self.get(&m).await {
                out.push(x);
            }
        }
        out
    }
}

fn s(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

fn mac(v: &Value) -> Option<String> {
    let m = s(&v["PermanentMACAddress"]).or(s(&v["MACAddress"]))?;
    let m = m.to_ascii_lowercase().replace('-', ":");
    (m.len() == 17 && m != "00:00:00:00:00:00").then_some(m)
}

/// Captures the hardware profile of `node` from `system_uri` through `f`.
pub async fn profile_from<F: Fetch + Sync>(
    f: &F,
    node: &str,
    system_uri: &str,
) -> Result<HardwareProfile, BmcError> {
    let system = f.fetch(system_uri).await?;
    let mut b = Budget {
        f,
        left: MAX_REQUESTS,
    };

    let procs: Vec<Value> = b
        .collection(&system, "Processors")
        .await
        .into_iter()
        .filter(|p| p["ProcessorType"].as_str().is_none_or(|t| t == "CPU"))
        .filter(|p| p["Status"]["State"].as_str() != Some("Absent"))
        .collect();
    let first = procs.first().cloned().unwrap_or(Value::Null);
    let summary = &system["ProcessorSummary"];
    let sockets = if procs.is_empty() {
        number(&summary["Count"]).unwrap_or(0.0) as u32
    } else {
        procs.len() as u32
    };
    let cores = number(&first["TotalCores"]).unwrap_or(0.0) as u32;
    let threads = number(&first["TotalThreads"]).unwrap_or(0.0) as u32;
    let cpu = Cpu {
        vendor: s(&first["Manufacturer"]),
        model: s(&first["Model"]).or(s(&summary["Model"])),
        family: s(&first["ProcessorId"]["EffectiveFamily"]),
        cpuid_model: s(&first["ProcessorId"]["EffectiveModel"]),
        stepping: s(&first["ProcessorId"]["Step"]),
        sockets,
        cores_per_socket: cores,
        threads_per_core: threads.checked_div(cores).unwrap_or(1).max(1),
        flags: Vec::new(),
    };

    let dimms: Vec<Dimm> = b
        .collection(&system, "Memory")
        .await
        .iter()
        .filter(|m| m["Status"]["State"].as_str() != Some("Absent"))
        .filter_map(|m| {
            let size = number(&m["CapacityMiB"])? as u64;
            (size > 0).then(|| Dimm {
                id: s(&m["Id"]).unwrap_or_default(),
                size_mib: size,
            })
        })
        .collect();
    let memory_mib = match number(&system["MemorySummary"]["TotalSystemMemoryGiB"]) {
        Some(g) if g > 0.0 => (g * 1024.0).round() as u64,
        _ => dimms.iter().map(|d| d.size_mib).sum(),
    };

    let nics: Vec<Nic> = b
        .collection(&system, "EthernetInterfaces")
        .await
        .iter()
        .filter_map(|n| {
            Some(Nic {
                id: s(&n["Id"]).unwrap_or_default(),
                mac: mac(n)?,
                speed_mbps: number(&n["SpeedMbps"]).map(|x| x as u64),
            })
        })
        .collect();

    let mut pcie = Vec::new();
    let pcie_links: Vec<String> = system["PCIeDevices"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| s(&l["@odata.id"])).collect())
        .unwrap_or_default();
    let mut pcie_devs = Vec::new();
    for l in pcie_links.iter().take(64) {
        if let Some(d) = b.get(l).await {
            pcie_devs.push(d);
        }
    }
    if pcie_devs.is_empty() {
        pcie_devs = b.collection(&system, "PCIeDevices").await;
    }
    for d in pcie_devs {
        let func = match link(&d, "PCIeFunctions") {
            Some(fl) => match b.get(fl).await {
                Some(c) => match members(&c).first() {
                    Some(m) => b.get(m).await.unwrap_or(Value::Null),
                    None => Value::Null,
                },
                None => Value::Null,
            },
            None => Value::Null,
        };
        pcie.push(PcieDevice {
            id: s(&d["Id"]).unwrap_or_default(),
            name: s(&d["Name"]),
            class: s(&func["ClassCode"]).or(s(&func["DeviceClass"])),
            vendor_id: s(&func["VendorId"]),
            device_id: s(&func["DeviceId"]),
        });
    }

    let mut storage_controllers = Vec::new();
    let mut drives = Vec::new();
    for st in b.collection(&system, "Storage").await.iter().take(32) {
        for c in st["StorageControllers"].as_array().into_iter().flatten() {
            if let Some(n) = s(&c["Name"]).or(s(&c["Model"])) {
                storage_controllers.push(n);
            }
        }
        if storage_controllers.is_empty() || st["StorageControllers"].is_null() {
            if let Some(n) = s(&st["Name"]) {
                storage_controllers.push(n);
            }
        }
        for dl in st["Drives"].as_array().into_iter().flatten().take(64) {
            if let Some(u) = s(&dl["@odata.id"])
                && let Some(d) = b.get(&u).await
            {
                drives.push(Drive {
                    id: s(&d["Id"]).unwrap_or_default(),
                    model: s(&d["Model"]),
                    capacity_bytes: number(&d["CapacityBytes"]).map(|x| x as u64),
                    protocol: s(&d["Protocol"]),
                });
            }
        }
    }
    storage_controllers.dedup();

    let boot_mode = match system["Boot"]["BootSourceOverrideMode"].as_str() {
        Some("UEFI") => BootMode::Uefi,
        Some("Legacy") => BootMode::Legacy,
        _ => BootMode::Unknown,
    };
    Ok(HardwareProfile {
        node: node.to_string(),
        cpu,
        memory_mib,
        dimms,
        nics,
        pcie,
        storage_controllers,
        drives,
        smbios: Smbios {
            manufacturer: s(&system["Manufacturer"]),
            product: s(&system["Model"]),
            serial: s(&system["SerialNumber"]),
            uuid: s(&system["UUID"]).map(|u| u.to_ascii_lowercase()),
        },
        boot_mode,
    })
}

/// Captures the hardware profile of the node behind `bmc`.
pub async fn capture(bmc: &RedfishBmc, node: &str) -> Result<HardwareProfile, BmcError> {
    profile_from(bmc, node, &bmc.system_path()).await
}
