//! Every firmware profile against the real mockups it names: each id, pointer, link, reset type
//! and log service the profile declares must really be there, as the real BMC served it.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use vigil::config::{Diagnostics, ProfileSet};

/// The shared lab data: `$VIGIL_LAB_DATA`, else `../shared/lab-data` beside the repository.
fn lab_data() -> PathBuf {
    std::env::var_os("VIGIL_LAB_DATA").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/lab-data"),
        PathBuf::from,
    )
}

/// A captured Redfish service: "tall" captures keep the `redfish/v1` prefix, "short" ones are
/// rooted at /redfish/v1 itself.
struct Mockup {
    root: PathBuf,
}

impl Mockup {
    fn open(name: &str) -> Self {
        let dir = lab_data().join("redfish-mockups").join(name);
        assert!(dir.is_dir(), "mockup {} is missing", dir.display());
        let tall = dir.join("redfish/v1/index.json");
        let root = if tall.is_file() {
            dir.join("redfish/v1")
        } else {
            dir
        };
        Self { root }
    }

    /// GET `uri` (an @odata.id; trailing slashes and fragments are ignored, as some iLO firmware
    /// writes every id with a trailing slash).
    fn get(&self, uri: &str) -> Option<Value> {
        let uri = uri.split('#').next().unwrap().trim_end_matches('/');
        let rel = uri
            .strip_prefix("/redfish/v1")
            .unwrap_or(uri)
            .trim_start_matches('/');
        let file = if rel.is_empty() {
            self.root.join("index.json")
        } else {
            self.root.join(rel).join("index.json")
        };
        let text = std::fs::read_to_string(file).ok()?;
        Some(serde_json::from_str(&text).expect("mockup JSON parses"))
    }
}

fn link<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name)?.get("@odata.id")?.as_str()
}

fn reset_types(m: &Mockup, system: &Value) -> Vec<String> {
    let action = &system["Actions"]["#ComputerSystem.Reset"];
    if let Some(v) = action
        .get("ResetType@Redfish.AllowableValues")
        .and_then(Value::as_array)
    {
        return v
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect();
    }
    let info_uri = action["@Redfish.ActionInfo"]
        .as_str()
        .expect("reset types inline or in an ActionInfo");
    let info = m.get(info_uri).expect("the ActionInfo resource exists");
    info["Parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["Name"] == "ResetType")
        .expect("ActionInfo lists ResetType")["AllowableValues"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

#[test]
fn every_profile_fits_every_mockup_it_names() {
    let mut d = Diagnostics::new();
    let profiles = ProfileSet::builtin(&mut d);
    assert!(d.is_empty(), "{d}");
    let mut checked = 0;
    for p in profiles.iter() {
        let r = &p.redfish;
        for name in &p.mockups {
            let ctx = format!("profile {} on mockup {name}", p.name);
            let m = Mockup::open(name);
            let root = m
                .get("/redfish/v1")
                .unwrap_or_else(|| panic!("{ctx}: no service root"));
            let system = m
                .get(&format!("/redfish/v1/Systems/{}", r.system_id))
                .unwrap_or_else(|| panic!("{ctx}: no system {}", r.system_id));
            let chassis = m
                .get(&format!("/redfish/v1/Chassis/{}", r.chassis_id))
                .unwrap_or_else(|| panic!("{ctx}: no chassis {}", r.chassis_id));
            let manager = m
                .get(&format!("/redfish/v1/Managers/{}", r.manager_id))
                .unwrap_or_else(|| panic!("{ctx}: no manager {}", r.manager_id));

            // The vendor a BMC announces, where it announces one.
            let announced = [
                root.get("Vendor"),
                manager.get("Manufacturer"),
                system.get("Manufacturer"),
            ];
            assert!(
                announced
                    .iter()
                    .flatten()
                    .any(|v| v.as_str() == Some(p.vendor.as_str())),
                "{ctx}: vendor {:?} not announced ({announced:?})",
                p.vendor
            );

            let power = system.pointer(&r.power_state).and_then(Value::as_str);
            assert!(
                matches!(
                    power,
                    Some("On" | "Off" | "PoweringOn" | "PoweringOff" | "Paused")
                ),
                "{ctx}: power state at {} is {power:?}",
                r.power_state
            );
            assert!(
                system.pointer(&r.health).and_then(Value::as_str).is_some(),
                "{ctx}: no health at {}",
                r.health
            );
            match &r.boot_progress {
                Some(bp) => assert!(
                    system.pointer(bp).and_then(Value::as_str).is_some(),
                    "{ctx}: no boot progress at {bp}"
                ),
                None => assert!(
                    system.get("BootProgress").is_none(),
                    "{ctx}: the system has BootProgress but the profile omits it"
                ),
            }

            let mut want = r.reset_types.clone();
            let mut have = reset_types(&m, &system);
            want.sort();
            have.sort();
            assert_eq!(want, have, "{ctx}: reset types");

            for l in r.thermal.iter().chain(&r.power) {
                let uri =
                    link(&chassis, l).unwrap_or_else(|| panic!("{ctx}: chassis has no {l} link"));
                assert!(
                    m.get(uri).is_some(),
                    "{ctx}: {l} ({uri}) is not in the capture"
                );
            }
            assert_eq!(
                link(&chassis, "Sensors").is_some(),
                r.sensors,
                "{ctx}: Sensors link"
            );
            if let Some(sel) = &r.sel {
                let svc = m
                    .get(sel)
                    .unwrap_or_else(|| panic!("{ctx}: no log service {sel}"));
                assert!(
                    svc["@odata.type"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("LogService"),
                    "{ctx}: {sel} is not a LogService"
                );
            }
            checked += 1;
        }
    }
    // Six profiles; ilo5 fits two captures.
    assert_eq!(checked, 7);
}

#[test]
fn a_profile_that_names_a_wrong_pointer_is_caught() {
    // The check above must be able to fail: a pointer that is not in the capture resolves to
    // nothing.
    let m = Mockup::open("dell-poweredge-r750");
    let system = m.get("/redfish/v1/Systems/System.Embedded.1").unwrap();
    assert!(system.pointer("/PowerState").is_some());
    assert!(system.pointer("/Power/State").is_none());
    assert!(m.get("/redfish/v1/Systems/System.Embedded.2").is_none());
}
