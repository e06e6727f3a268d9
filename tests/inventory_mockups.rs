//! Hardware profile capture against every real capture in the lab data: the profile must match
//! what the capture says (CPUs, memory, MACs), read here independently from the files.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vigil::bmc::BmcError;
use vigil::bmc::redfish::inventory::{Fetch, profile_from};

fn lab_data() -> PathBuf {
    std::env::var_os("VIGIL_LAB_DATA").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/lab-data"),
        PathBuf::from,
    )
}

/// A capture on disk, served read-only through the same `Fetch` the driver implements.
struct Disk(PathBuf);

impl Disk {
    fn open(name: &str) -> Self {
        let d = lab_data().join("redfish-mockups").join(name);
        let tall = d.join("redfish/v1");
        Disk(if tall.join("index.json").is_file() {
            tall
        } else {
            d
        })
    }
    fn read(&self, uri: &str) -> Option<Value> {
        let uri = uri.split(['#', '?']).next().unwrap().trim_end_matches('/');
        let rel = uri
            .strip_prefix("/redfish/v1")
            .unwrap_or(uri)
            .trim_start_matches('/');
        let f = if rel.is_empty() {
            self.0.join("index.json")
        } else {
            self.0.join(rel).join("index.json")
        };
        serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok()
    }
}

impl Fetch for Disk {
    async fn fetch(&self, uri: &str) -> Result<Value, BmcError> {
        self.read(uri).ok_or_else(|| BmcError::Http {
            endpoint: "disk".into(),
            what: uri.into(),
            status: 404,
            message: String::new(),
        })
    }
}

fn members(v: &Value) -> Vec<String> {
    v["Members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["@odata.id"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn every_capture_yields_a_profile_that_matches_it() {
    let dir = lab_data().join("redfish-mockups");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 11, "{names:?}");
    for name in &names {
        let disk = Disk::open(name);
        let systems = members(&disk.read("/redfish/v1/Systems").unwrap());
        // The host system: the first that has processors (GB200's HGX baseboard has none).
        let sys_uri = systems
            .iter()
            .find(|s| disk.read(s).is_some_and(|v| v.get("Processors").is_some()))
            .unwrap_or(&systems[0]);
        let sys = disk.read(sys_uri).unwrap();
        let p = profile_from(&disk, "n", sys_uri)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));

        // MACs: exactly the system's interfaces that have a real MAC.
        let want: BTreeSet<String> = sys["EthernetInterfaces"]["@odata.id"]
            .as_str()
            .and_then(|c| disk.read(c))
            .map(|c| members(&c))
            .unwrap_or_default()
            .iter()
            .filter_map(|m| disk.read(m))
            .filter_map(|n| {
                n["PermanentMACAddress"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .or(n["MACAddress"].as_str())
                    .map(|m| m.to_ascii_lowercase().replace('-', ":"))
            })
            .filter(|m| m.len() == 17 && m != "00:00:00:00:00:00")
            .collect();
        let got: BTreeSet<String> = p.nics.iter().map(|n| n.mac.clone()).collect();
        assert_eq!(got, want, "{name}: MACs");

        // Memory: the summary when the capture has one.
        if let Some(g) = sys["MemorySummary"]["TotalSystemMemoryGiB"]
            .as_f64()
            .filter(|g| *g > 0.0)
        {
            assert_eq!(p.memory_mib, (g * 1024.0).round() as u64, "{name}: memory");
        }
        // SMBIOS identity is the system's.
        assert_eq!(
            p.smbios.serial.as_deref(),
            sys["SerialNumber"]
                .as_str()
                .map(str::trim)
                .filter(|s| !s.is_empty()),
            "{name}: serial"
        );
        assert_eq!(
            p.smbios.uuid,
            sys["UUID"].as_str().map(|u| u.to_ascii_lowercase()),
            "{name}: uuid"
        );
    }
}

#[tokio::test]
async fn cpus_match_what_the_captures_are_known_to_hold() {
    // From shared/lab-data/SOURCES.md.
    let cases = [
        (
            "dell-poweredge-r750",
            "/redfish/v1/Systems/System.Embedded.1",
            2,
            18,
            2,
            "6354",
        ),
        (
            "hpe-proliant-dl385-gen10plus-v2",
            "/redfish/v1/Systems/1",
            2,
            64,
            2,
            "7763",
        ),
        (
            "lenovo-thinksystem-sr670-v2",
            "/redfish/v1/Systems/1",
            2,
            32,
            2,
            "8362",
        ),
        (
            "supermicro-sys-821ge-tnhr",
            "/redfish/v1/Systems/1",
            2,
            32,
            2,
            "8462Y+",
        ),
    ];
    for (name, sys, sockets, cores, threads, model) in cases {
        let p = profile_from(&Disk::open(name), "n", sys).await.unwrap();
        assert_eq!(
            (
                p.cpu.sockets,
                p.cpu.cores_per_socket,
                p.cpu.threads_per_core
            ),
            (sockets, cores, threads),
            "{name}"
        );
        assert!(
            p.cpu.model.as_deref().unwrap_or_default().contains(model),
            "{name}: {:?}",
            p.cpu.model
        );
    }
    let p = profile_from(
        &Disk::open("dell-poweredge-r750"),
        "n",
        "/redfish/v1/Systems/System.Embedded.1",
    )
    .await
    .unwrap();
    assert_eq!(p.dimms.len(), 8);
}

/// The twin of every captured server: VM spec, fidelity report and QEMU command line, compared
/// with the reviewed files in tests/golden/ (regenerate with VIGIL_UPDATE_GOLDEN=1 and review
/// the diff).
#[tokio::test]
async fn vm_specs_of_every_capture_match_their_golden_files() {
    use vigil::config::CpuPolicy;
    use vigil::virt::GuestIdentity;
    use vigil::virt::qemu::{NetMode, args};
    use vigil::virt::spec::{Accel, CpuTable, HostLimits, Inputs, build};

    let dir = lab_data().join("redfish-mockups");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let table = CpuTable::builtin();
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("VIGIL_UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for name in &names {
        let disk = Disk::open(name);
        let systems = members(&disk.read("/redfish/v1/Systems").unwrap());
        let sys_uri = systems
            .iter()
            .find(|s| disk.read(s).is_some_and(|v| v.get("Processors").is_some()))
            .unwrap_or(&systems[0]);
        let p = profile_from(&disk, "n1", sys_uri).await.unwrap();
        let inputs = Inputs {
            node: "n1",
            epoch: 7,
            cap_vcpus: Some(8),
            cap_memory_mib: Some(4096),
            cpu_policy: CpuPolicy::Named,
            boot_disk: Some("/srv/vigil/disks/n1.img"),
            kernel: None,
        };
        let spec = build(
            &p,
            &inputs,
            HostLimits {
                vcpus: 16,
                memory_mib: 16384,
                accel: Accel::Tcg,
            },
            &table,
        );
        assert!(spec.cpu.vcpus() <= 8, "{name}");
        assert!(spec.memory_mib <= 4096, "{name}");
        let id = GuestIdentity {
            appliance: "10.0.2.2:7481".into(),
            key: vigil::config::Secret::new("not-in-the-args"),
        };
        let a = args(
            &spec,
            Path::new("/run/vigil/vms/vigil-n1-e7"),
            &NetMode::User,
            &id,
            false,
        );
        assert!(
            a.iter().all(|x| !x.contains("not-in-the-args")),
            "{name}: the key leaked into QEMU's arguments"
        );
        let got =
            serde_json::to_string_pretty(&serde_json::json!({ "spec": spec, "qemu_args": a }))
                .unwrap()
                + "\n";
        // The same twin for libvirt: its domain XML.
        let xml = vigil::virt::libvirt::domain_xml(
            &spec,
            Path::new("/run/vigil/vms/vigil-n1-e7"),
            &NetMode::User,
            &id,
        );
        assert!(
            !xml.contains("not-in-the-args"),
            "{name}: the key leaked into the domain XML"
        );
        for (f, got) in [
            (golden_dir.join(format!("vmspec-{name}.json")), got),
            (golden_dir.join(format!("domain-{name}.xml")), xml),
        ] {
            if update {
                std::fs::write(&f, &got).unwrap();
            } else if std::fs::read_to_string(&f).ok().as_deref() != Some(got.as_str()) {
                mismatches.push(format!(
                    "{} differs (run with VIGIL_UPDATE_GOLDEN=1 and review)",
                    f.display()
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}
