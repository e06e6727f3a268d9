//! `vigil check-config` as an operator runs it: the real binary on real files.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vigil.toml")
}

fn vigil() -> Command {
    let mut c = Command::cargo_bin("vigil").unwrap();
    c.env_remove("CREDENTIALS_DIRECTORY");
    c
}

/// A copy of the example with `edit` applied, in a temporary folder, plus that folder.
fn broken(edit: impl FnOnce(String) -> String) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example()).unwrap();
    let p = dir.path().join("vigil.toml");
    std::fs::write(&p, edit(text)).unwrap();
    (dir, p)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn the_example_is_valid() {
    let out = vigil().arg("check-config").arg(example()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("valid (4 nodes, 2 hosts, 6 firmware profiles)"),
        "{stderr}"
    );
    assert!(!stderr.contains("error:"), "{stderr}");
}

#[test]
fn the_example_with_its_credentials_has_no_problem_at_all() {
    let creds = tempfile::tempdir().unwrap();
    for name in [
        "api-token",
        "bmc-failover1",
        "hb-failover1",
        "bmc-backup1",
        "hb-backup1",
        "bmc-db1",
        "hb-db1",
        "bmc-web1",
        "hb-web1",
        "bmc-web2",
        "hb-web2",
        "bmc-batch1",
        "hb-batch1",
    ] {
        std::fs::write(creds.path().join(name), "not-a-real-secret\n").unwrap();
    }
    let out = vigil()
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .args(["check-config", "--json"])
        .arg(example())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
}

#[test]
fn an_unknown_key_is_reported_at_its_line_with_a_suggestion() {
    let (_d, p) = broken(|t| t.replace("heartbeat_misses = 3 ", "hearbeat_misses = 3 "));
    let text = std::fs::read_to_string(&p).unwrap();
    let line = line_of(&text, "hearbeat_misses");
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:{line}:1: error: unknown key `hearbeat_misses` in [policy]",
            p.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("did you mean `heartbeat_misses`?"),
        "{stderr}"
    );
}

#[test]
fn bad_toml_is_reported_at_its_line() {
    let (_d, p) = broken(|t| t.replace("[policy.storm_guard]", "[policy.storm_guard"));
    let text = std::fs::read_to_string(&p).unwrap();
    let line = line_of(&text, "[policy.storm_guard");
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:{line}:", p.display())),
        "{stderr}"
    );
    assert!(stderr.contains("is not valid TOML"), "{stderr}");
}

#[test]
fn a_missing_secret_file_is_reported_without_its_value() {
    let (_d, p) = broken(|t| t.replace("\"credential:bmc-web1\"", "\"file:secrets/web1-bmc\""));
    let text = std::fs::read_to_string(&p).unwrap();
    let line = line_of(&text, "file:secrets/web1-bmc");
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:{line}:12: error: secret file", p.display())),
        "{stderr}"
    );
    assert!(stderr.contains("web1-bmc cannot be read"), "{stderr}");
}

#[test]
fn a_world_readable_secret_is_refused_and_a_private_one_accepted() {
    let (d, p) = broken(|t| t.replace("\"credential:bmc-web1\"", "\"file:web1-bmc\""));
    let secret = d.path().join("web1-bmc");
    std::fs::write(&secret, "hunter2-not-real\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is readable by other users (mode 644)"),
        "{stderr}"
    );
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the secret leaked: {stderr}");

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_inline_password_is_refused_without_being_echoed() {
    let (_d, p) = broken(|t| t.replace("\"credential:bmc-web1\"", "\"Sup3rS3cret\""));
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("must be a secret reference, not a value"),
        "{stderr}"
    );
    // The excerpt shows the source line (the operator's own file); the message must not repeat it.
    let messages: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert!(
        messages.iter().all(|l| !l.contains("Sup3rS3cret")),
        "{stderr}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let (_d, p) = broken(|t| {
        t.replace("firmware_profile = \"ilo5\"", "firmware_profile = \"ilo4\"")
            .replace("name = \"web2\"", "name = \"web1\"")
            .replace("bmc_poll_interval = \"1s\"", "bmc_poll_interval = \"10s\"")
            .replace(
                "redfish_url = \"https://127.0.0.1:18444\"",
                "redfish_url = \"https://127.0.0.1:18441\"",
            )
            .replace(
                "isolation_group = \"web\"\nboot_disk = \"/srv/vigil/disks/web2.img\"",
                "isolation_group = \"pci\"\nboot_disk = \"/srv/vigil/disks/web2.img\"",
            )
    });
    let out = vigil()
        .args(["check-config", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["severity"] == "error")
        .map(|p| {
            format!(
                "{}:{} {}",
                p["line"],
                p["column"],
                p["message"].as_str().unwrap()
            )
        })
        .collect();
    let has = |s: &str| errors.iter().any(|e| e.contains(s));
    assert!(has("unknown firmware profile \"ilo4\""), "{errors:#?}");
    assert!(has("the name \"web1\" is used twice"), "{errors:#?}");
    assert!(has("is shorter than the BMC poll interval"), "{errors:#?}");
    assert!(
        has("has the same BMC endpoint (redfish 127.0.0.1:18441) as db1"),
        "{errors:#?}"
    );
    assert!(has("only 2 hosts"), "{errors:#?}");
    assert!(
        errors.iter().all(|e| !e.starts_with("0:")),
        "every error has a position: {errors:#?}"
    );
}

#[test]
fn a_virtual_node_too_big_for_every_host_is_an_error() {
    let (_d, p) = broken(|t| {
        t.replace("virtual = { vcpus = 2, memory = \"512MiB\" }\n\n[node.bmc]\nredfish_url = \"https://127.0.0.1:18441\"", "virtual = { vcpus = 64, memory = \"512MiB\" }\n\n[node.bmc]\nredfish_url = \"https://127.0.0.1:18441\"")
    });
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("node \"db1\" needs 64 vCPUs"), "{stderr}");
}

#[test]
fn rebalancing_is_rack_wide_and_its_delay_only_counts_when_automatic() {
    // Per node: an error at its line, pointing at [policy].
    let (_d, p) = broken(|t| {
        t.replacen(
            "heartbeat_misses = 5\n",
            "heartbeat_misses = 5\nrebalance = \"auto\"\n",
            1,
        )
    });
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rebalancing is a rack-wide choice and cannot be set per node"),
        "{stderr}"
    );
    // A delay without "auto": a warning that says it does nothing.
    let (_d, p) = broken(|t| t.replace("# rebalance_after = \"5m\"", "rebalance_after = \"2m\""));
    let out = vigil().arg("check-config").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("`rebalance_after` has no effect while `rebalance = \"manual\"`"),
        "{stderr}"
    );
    // "auto" with its delay, as the effective configuration shows it.
    let (_d, p) = broken(|t| {
        t.replace("rebalance = \"manual\"", "rebalance = \"auto\"")
            .replace("# rebalance_after = \"5m\"", "rebalance_after = \"2m\"")
    });
    let out = vigil()
        .args(["check-config", "--show"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["policy"]["rebalance"]["mode"], "auto");
    assert_eq!(v["policy"]["rebalance"]["after"], "2m");
    // The example's own choice: by hand.
    let out = vigil()
        .args(["check-config", "--show"])
        .arg(example())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["policy"]["rebalance"]["mode"], "manual");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = vigil()
        .args(["check-config", "/nonexistent/vigil.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("configuration file /nonexistent/vigil.toml cannot be read"),
        "{stderr}"
    );
}

#[test]
fn show_prints_the_effective_configuration_with_references_not_secrets() {
    let out = vigil()
        .args(["check-config", "--show"])
        .arg(example())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"][0]["bmc"]["password"], "credential:bmc-db1");
    // db1 overrides heartbeat_misses; web1 inherits the rack's.
    assert_eq!(v["nodes"][0]["policy"]["heartbeat_misses"], 5);
    assert_eq!(v["nodes"][1]["policy"]["heartbeat_misses"], 3);
    assert_eq!(v["policy"]["bmc_request_timeout"], "3s");
}

/// The README's configuration reference documents every key the example uses, and only keys
/// vigil knows: the reference cannot drift from the code without a failing test.
#[test]
fn the_readme_documents_every_key() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let text = std::fs::read_to_string(example()).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let mut keys = Vec::new();
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            toml::Value::Array(a) if a.iter().all(toml::Value::is_table) => {
                for v in a {
                    walk(prefix, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    walk("", &toml::Value::Table(doc), &mut keys);
    keys.sort();
    keys.dedup();
    // Keys the example leaves out but the reference must still cover.
    keys.extend(
        [
            "appliance.firmware_profiles_dir",
            "policy.failback_healthy_delay",
            "policy.rebalance_after",
            "node.bmc.ca_file",
            "node.bmc.insecure_skip_verify",
        ]
        .map(String::from),
    );
    // Hosts take the same machine keys as nodes; the reference documents them once, as node.*.
    let keys: Vec<String> = keys
        .into_iter()
        .map(|k| {
            // A node's policy overrides take the rack's [policy] keys.
            if let Some(rest) = k.strip_prefix("node.policy.") {
                return format!("policy.{rest}");
            }
            for shared in [
                "host.bmc.",
                "host.heartbeat.",
                "host.name",
                "host.firmware_profile",
            ] {
                if k.starts_with(shared) {
                    return k.replacen("host.", "node.", 1);
                }
            }
            k
        })
        .collect();
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !readme.contains(&format!("`{k}`")))
        .collect();
    assert!(missing.is_empty(), "README does not document: {missing:?}");
}
