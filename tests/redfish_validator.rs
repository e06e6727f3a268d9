//! The DMTF Redfish Service Validator (redfish-service-validator 3.1.8, offline with the DMTF
//! CSDL; installed into .venv by scripts/install-test-deps.sh) against the lab's dmtf-generic
//! BMC: no failure at all. (The DMTF mockup's own authoring errors are corrected in what the lab
//! serves; hardware-lab/src/conformance.rs lists each one.)

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::Lab;

#[test]
fn the_dmtf_generic_bmc_passes_the_redfish_service_validator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let validator = root.join(".venv/bin/rf_service_validator");
    let csdl = root.join(".cache/redfish-csdl");
    assert!(
        validator.is_file() && csdl.join("ServiceRoot_v1.xml").is_file(),
        "the validator or its schemas are missing: run scripts/install-test-deps.sh"
    );
    let t = std::fs::read_to_string(root.join("hardware-lab/topologies/rack4.toml")).unwrap();
    let lab = Lab::start_with(&t, &["--no-ipmi"]);
    let s = &lab.endpoints["servers"]["backup1"];
    assert_eq!(s["firmware_profile"], "dmtf-generic");
    let password = std::fs::read_to_string(s["password_file"].as_str().unwrap()).unwrap();
    let logs = lab.dir.path().join("validator");
    let out = Command::new(&validator)
        .arg("--rhost")
        .arg(s["redfish_url"].as_str().unwrap())
        .args(["--user", s["username"].as_str().unwrap()])
        .args(["--password", password.trim()])
        .args(["--authtype", "Session", "--skipschema"])
        .arg("--schema_directory")
        .arg(&csdl)
        .arg("--logdir")
        .arg(&logs)
        // The lab's CA, for python-requests.
        .env("REQUESTS_CA_BUNDLE", lab.endpoints["ca_file"].as_str().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // The summary: | PASS | WARN | FAIL | NOT TESTED | then the numbers.
    let numbers: Vec<u64> = text
        .lines()
        .skip_while(|l| !l.contains("FAIL"))
        .nth(2)
        .unwrap_or("")
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let failures: Vec<String> = std::fs::read_dir(&logs)
        .into_iter()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("Debug"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ERROR - FAIL"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        out.status.success() && numbers.len() == 4 && numbers[2] == 0,
        "summary {numbers:?} (pass, warn, fail, not tested); failures:\n{}\n{text}",
        failures.join("\n")
    );
    // It did look at the service: thousands of properties passed.
    assert!(numbers[0] > 1000, "{numbers:?}");
    // And the lab's own secrets are not in what the validator saw.
    assert!(!text.contains(password.trim()));
}
