//! Two Redfish clients we did not write read and reset every lab BMC: the DMTF `redfish`
//! library and OpenStack's `sushy` (tests/python/redfish_clients.py; both installed into .venv by
//! scripts/install-test-deps.sh). The lab must serve what real clients expect, not only vigil.

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::Lab;
use serde_json::Value;

#[test]
fn dmtf_redfish_and_sushy_read_and_reset_every_lab_bmc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/install-test-deps.sh",
        python.display()
    );
    let lab = Lab::rack4(|t| t);
    let ca = lab.endpoints["ca_file"].as_str().unwrap().to_string();
    for name in ["db1", "web1", "web2", "batch1", "failover1", "backup1"] {
        let s = &lab.endpoints["servers"][name];
        let out = Command::new(&python)
            .arg(root.join("tests/python/redfish_clients.py"))
            .arg(s["redfish_url"].as_str().unwrap())
            .arg(s["username"].as_str().unwrap())
            .arg(s["password_file"].as_str().unwrap())
            .arg(&ca)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{name}: {stdout}");
        assert_eq!(lines[0]["client"], "redfish");
        assert_eq!(lines[0]["power"], "On", "{name}");
        assert_eq!(lines[1]["client"], "sushy");
        assert_eq!(lines[1]["power"], "PowerState.ON", "{name}");
        // Both found the same system, and sushy read the reset types the firmware offers.
        assert_eq!(lines[0]["system"], lines[1]["system"], "{name}");
        let types = lines[1]["reset_types"].as_array().unwrap();
        assert!(
            types.iter().any(|t| t == "ResetType.FORCE_OFF"),
            "{name}: {types:?}"
        );
        let v = lab.server(name);
        // Each client powered the host off and on through the lab's power model...
        let resets: Vec<&str> = v["resets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[1].as_str().unwrap())
            .collect();
        assert_eq!(
            resets.iter().filter(|r| **r == "Off").count(),
            2,
            "{name}: {resets:?}"
        );
        // ...and logged out: no session left behind.
        assert_eq!(v["sessions_open"], 0, "{name}: {v}");
        assert_eq!(v["sessions_opened"], 2, "{name}");
    }
}
