//! The DMTF Redfish Service Validator (redfish-service-validator 3.1.8, offline with the DMTF
//! CSDL; installed into .venv by scripts/install-test-deps.sh) against the lab's BMCs:
//! - the dmtf-generic BMC: no failure at all (the DMTF mockup's own authoring errors are
//!   corrected in what the lab serves; hardware-lab/src/conformance.rs lists each one);
//! - every vendor profile's BMC: no failure but those its firmware profile declares in
//!   hardware-lab/validator/<profile>.toml, each named, with the capture file that shows it;
//!   and no declaration that no failure matches any more (a stale excuse hides nothing).

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Lab;

/// One validator run: its summary numbers (pass, warn, fail, not tested), its failures as
/// (the resource being validated, the failure's text), and its stdout.
struct Run {
    numbers: Vec<u64>,
    failures: Vec<(String, String)>,
    ok: bool,
    text: String,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn validate(lab: &Lab, server: &str) -> Run {
    let validator = root().join(".venv/bin/rf_service_validator");
    let csdl = root().join(".cache/redfish-csdl");
    assert!(
        validator.is_file() && csdl.join("ServiceRoot_v1.xml").is_file(),
        "the validator or its schemas are missing: run scripts/install-test-deps.sh"
    );
    let s = &lab.endpoints["servers"][server];
    let password = std::fs::read_to_string(s["password_file"].as_str().unwrap()).unwrap();
    let logs = lab.dir.path().join(format!("validator-{server}"));
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
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // The lab's own secrets are not in what the validator saw.
    assert!(!text.contains(password.trim()));
    // The summary: | PASS | WARN | FAIL | NOT TESTED | then the numbers.
    let numbers: Vec<u64> = text
        .lines()
        .skip_while(|l| !l.contains("FAIL"))
        .nth(2)
        .unwrap_or("")
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let mut failures = Vec::new();
    let debug_logs: Vec<PathBuf> = std::fs::read_dir(&logs)
        .into_iter()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("Debug"))
        .collect();
    for p in debug_logs {
        let mut current = String::new();
        for l in std::fs::read_to_string(p).unwrap_or_default().lines() {
            if let Some(uri) = l
                .split(" - INFO - Validating ")
                .nth(1)
                .and_then(|u| u.strip_suffix("..."))
            {
                current = uri.trim_end_matches('/').to_string();
            } else if let Some(f) = l.split("ERROR - FAIL - ").nth(1) {
                failures.push((current.clone(), f.to_string()));
            }
        }
    }
    Run {
        numbers,
        failures,
        ok: out.status.success(),
        text,
    }
}

#[test]
fn the_dmtf_generic_bmc_passes_the_redfish_service_validator() {
    let t = std::fs::read_to_string(root().join("hardware-lab/topologies/rack4.toml")).unwrap();
    let lab = Lab::start_with(&t, &["--no-ipmi"]);
    assert_eq!(
        lab.endpoints["servers"]["backup1"]["firmware_profile"],
        "dmtf-generic"
    );
    let r = validate(&lab, "backup1");
    let failures: Vec<String> = r
        .failures
        .iter()
        .map(|(u, f)| format!("{u}: {f}"))
        .collect();
    assert!(
        r.ok && r.numbers.len() == 4 && r.numbers[2] == 0,
        "summary {:?} (pass, warn, fail, not tested); failures:\n{}\n{}",
        r.numbers,
        failures.join("\n"),
        r.text
    );
    // It did look at the service: thousands of properties passed.
    assert!(r.numbers[0] > 1000, "{:?}", r.numbers);
}

/// A failure a firmware profile declares as that firmware's real behaviour.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Declared {
    /// "firmware": in the firmware's own payload as captured; "capture": a link the firmware
    /// serves to a resource the capture does not have.
    kind: String,
    /// What it is, in a few words.
    name: String,
    /// How many failures it matched when it was written (documentation, not checked: the
    /// lab's live resources, the SEL and sessions, vary).
    #[allow(dead_code)]
    count: usize,
    /// The resources validated when it fails: `*` is one path segment.
    uris: Vec<String>,
    /// The property path it is about (`*` is one segment), or "" for the resource itself.
    property: String,
    /// What the validator says (a part of its text).
    message: String,
    /// Why, where more than the name is needed.
    #[serde(default)]
    why: String,
    /// The capture file that shows it, under shared/lab-data/redfish-mockups.
    shown_by: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Declarations {
    profile: String,
    mockup: String,
    declared: Vec<Declared>,
}

fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), text.split('/').collect());
    p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| *p == "*" || p == t)
}

impl Declared {
    fn matches(&self, uri: &str, failure: &str) -> bool {
        // "/Prop/0/Sub (value): message", or the message alone for the resource itself.
        let (property, rest) = match failure.split_once(" (") {
            Some((p, _)) if failure.starts_with('/') => {
                let rest = failure.split_once("): ").map_or(failure, |(_, r)| r);
                (p, rest)
            }
            _ => ("", failure),
        };
        let property = property
            .split('/')
            .map(|s| if s.parse::<u64>().is_ok() { "*" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        self.uris.iter().any(|u| glob(u, uri))
            && glob(&self.property, &property)
            && rest.contains(&self.message)
    }
}

#[test]
fn every_vendor_bmc_fails_the_validator_only_where_its_firmware_declares() {
    let t = std::fs::read_to_string(root().join("hardware-lab/topologies/rack4.toml")).unwrap();
    let lab = Lab::start_with(&t, &["--no-ipmi"]);
    let servers: Vec<(String, String)> = lab.endpoints["servers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v["firmware_profile"].as_str().unwrap().to_string(),
            )
        })
        .filter(|(_, p)| p != "dmtf-generic")
        .collect();
    let profiles: std::collections::BTreeSet<&str> =
        servers.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        profiles.len(),
        5,
        "the rack holds every vendor profile: {profiles:?}"
    );
    let runs: Vec<(String, String, Run)> = std::thread::scope(|s| {
        let handles: Vec<_> = servers
            .iter()
            .map(|(server, profile)| {
                let lab = &lab;
                s.spawn(move || (server.clone(), profile.clone(), validate(lab, server)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut problems = Vec::new();
    for (server, profile, run) in &runs {
        let path = root().join(format!("hardware-lab/validator/{profile}.toml"));
        let d: Declarations = toml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(d.profile, *profile, "{}", path.display());
        assert_eq!(
            d.mockup,
            lab.endpoints["servers"][server]["mockup"]
                .as_str()
                .unwrap_or(""),
            "{}",
            path.display()
        );
        // It looked at the service.
        assert!(
            run.numbers.len() == 4 && run.numbers[0] > 1000,
            "{server} ({profile}): summary {:?}\n{}",
            run.numbers,
            run.text
        );
        let mut used = vec![0usize; d.declared.len()];
        for (uri, f) in &run.failures {
            match d.declared.iter().position(|x| x.matches(uri, f)) {
                Some(i) => used[i] += 1,
                None => problems.push(format!("{server} ({profile}) undeclared: {uri}: {f}")),
            }
        }
        for (x, n) in d.declared.iter().zip(&used) {
            assert!(
                ["firmware", "capture"].contains(&x.kind.as_str()) && !x.name.is_empty(),
                "{}: {x:?}",
                path.display()
            );
            let shown = mockup_file(&x.shown_by);
            assert!(
                shown.is_file(),
                "{}: {:?} shown_by {} is not a capture file",
                path.display(),
                x.name,
                shown.display()
            );
            if *n == 0 {
                problems.push(format!(
                    "{server} ({profile}) declares {:?} ({}; {}), which no failure matched",
                    x.name, x.message, x.why
                ));
            }
        }
        // The total agrees with the summary: nothing was missed in the logs.
        assert_eq!(
            run.failures.len() as u64,
            run.numbers[2],
            "{server} ({profile})"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn mockup_file(rel: &str) -> PathBuf {
    let data = std::env::var_os("VIGIL_LAB_DATA")
        .map_or_else(|| root().join("../shared/lab-data"), PathBuf::from);
    data.join("redfish-mockups").join(rel)
}
