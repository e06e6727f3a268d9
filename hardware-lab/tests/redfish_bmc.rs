//! The lab's Redfish BMCs over real HTTPS on loopback: trust, authentication, sessions, power
//! transitions, each firmware profile's quirks, every fault's print and every BMC mood.

// An integration-test crate is a test module as a whole: its helpers may unwrap (a panic is a
// failed test) and its #[test] functions need no inner `mod tests`.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use vigil_lab::faults::{Fault, FaultKind};
use vigil_lab::rack::{Rack, RackOptions, Topology};

struct Lab {
    rack: Rack,
    _dir: tempfile::TempDir,
    client: reqwest::Client,
}

fn lab() -> Lab {
    // reqwest is built without a default crypto provider (as vigil is): install ring once.
    let _already = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let t = Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/rack4.toml"))
        .unwrap();
    let rack = Rack::start(
        &t,
        dir.path(),
        RackOptions {
            agents: false,
            guest: None,
            no_ipmi: true,
        },
    )
    .unwrap();
    let ca = std::fs::read(&rack.endpoints.ca_file).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Lab {
        rack,
        _dir: dir,
        client,
    }
}

impl Lab {
    fn url(&self, server: &str, path: &str) -> String {
        format!("{}{path}", self.rack.endpoints.servers[server].redfish_url)
    }
    fn creds(&self, server: &str) -> (String, String) {
        let e = &self.rack.endpoints.servers[server];
        let pw = std::fs::read_to_string(&e.password_file)
            .unwrap()
            .trim()
            .to_string();
        (e.username.clone(), pw)
    }
    fn system(&self, server: &str) -> String {
        let p = &self.rack.servers[server].profile.redfish;
        format!("/redfish/v1/Systems/{}", p.system_id)
    }
    async fn get(&self, server: &str, path: &str) -> reqwest::Result<reqwest::Response> {
        let (u, p) = self.creds(server);
        self.client
            .get(self.url(server, path))
            .basic_auth(u, Some(p))
            .send()
            .await
    }
    async fn get_json(&self, server: &str, path: &str) -> Value {
        let r = self.get(server, path).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path} on {server}");
        r.json().await.unwrap()
    }
    async fn power(&self, server: &str) -> Option<String> {
        let v = self.get_json(server, &self.system(server)).await;
        v["PowerState"].as_str().map(String::from)
    }
    async fn reset(&self, server: &str, kind: &str) -> (StatusCode, String) {
        let (u, p) = self.creds(server);
        let sys = self.get_json(server, &self.system(server)).await;
        let target = sys["Actions"]["#ComputerSystem.Reset"]["target"]
            .as_str()
            .unwrap()
            .to_string();
        let r = self
            .client
            .post(self.url(server, &target))
            .basic_auth(u, Some(p))
            .json(&json!({ "ResetType": kind }))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }
    fn inject(&self, server: &str, f: Fault) {
        self.rack.servers[server].inject(f);
    }
    async fn wait_power(&self, server: &str, want: &str, within: Duration) {
        let t0 = Instant::now();
        loop {
            if self.power(server).await.as_deref() == Some(want) {
                return;
            }
            assert!(t0.elapsed() < within, "{server} never read {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn the_service_root_is_open_and_everything_else_needs_credentials() {
    let lab = lab();
    let root = lab
        .client
        .get(lab.url("db1", "/redfish/v1/"))
        .send()
        .await
        .unwrap();
    assert_eq!(root.status(), StatusCode::OK);
    assert_eq!(root.json::<Value>().await.unwrap()["Vendor"], "Dell");
    let sys = lab.system("db1");
    let anon = lab.client.get(lab.url("db1", &sys)).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    let wrong = lab
        .client
        .get(lab.url("db1", &sys))
        .basic_auth("root", Some("calvin"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let v = lab.get_json("db1", &sys).await;
    assert_eq!(v["PowerState"], "On");
    assert_eq!(v["BootProgress"]["LastState"], "OSRunning");
    // The capture is Critical; a healthy lab server is not.
    assert_eq!(v["Status"]["HealthRollup"], "OK");
    lab.rack.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_lab_ca_is_refused() {
    let lab = lab();
    let stranger = reqwest::Client::builder()
        .tls_certs_only([])
        .build()
        .unwrap();
    let e = stranger
        .get(lab.url("db1", "/redfish/v1"))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    lab.rack.stop().await;
}

#[tokio::test]
async fn sessions_are_limited_as_the_firmware_is_and_freed_by_logout() {
    let lab = lab();
    let (u, p) = lab.creds("web2"); // XCC: 3 sessions
    let max = lab.rack.servers["web2"].profile.redfish.max_sessions as usize;
    let sessions = lab.url("web2", "/redfish/v1/SessionService/Sessions");
    let mut opened = Vec::new();
    for _ in 0..max {
        let r = lab
            .client
            .post(&sessions)
            .json(&json!({"UserName": u, "Password": p}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let token = r.headers()["X-Auth-Token"].to_str().unwrap().to_string();
        let loc = r.headers()["Location"].to_str().unwrap().to_string();
        opened.push((token, loc));
    }
    let r = lab
        .client
        .post(&sessions)
        .json(&json!({"UserName": u, "Password": p}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("SessionLimitExceeded"));
    // A token authenticates; a made-up one does not.
    let sys = lab.url("web2", &lab.system("web2"));
    let ok = lab
        .client
        .get(&sys)
        .header("X-Auth-Token", &opened[0].0)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let bad = lab
        .client
        .get(&sys)
        .header("X-Auth-Token", "0123")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    // Logging out frees a slot.
    let (token, loc) = &opened[0];
    let r = lab
        .client
        .delete(lab.url("web2", loc))
        .header("X-Auth-Token", token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = lab
        .client
        .post(&sessions)
        .json(&json!({"UserName": u, "Password": p}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let view = vigil_lab::control::view(&lab.rack.servers["web2"]);
    assert_eq!(
        (
            view.sessions_opened,
            view.sessions_closed,
            view.sessions_refused
        ),
        (max as u64 + 1, 1, 1)
    );
    lab.rack.stop().await;
}

#[tokio::test]
async fn force_off_reads_powering_off_then_off_and_on_boots_through_post() {
    let lab = lab();
    let (s, _) = lab.reset("backup1", "ForceOff").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(lab.power("backup1").await.as_deref(), Some("PoweringOff"));
    lab.wait_power("backup1", "Off", Duration::from_secs(5))
        .await;
    // dmtf-generic: ForceOff on an off host is simply accepted.
    assert_eq!(
        lab.reset("backup1", "ForceOff").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(lab.reset("backup1", "On").await.0, StatusCode::NO_CONTENT);
    lab.wait_power("backup1", "On", Duration::from_secs(5))
        .await;
    let sys = lab.system("backup1");
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let v = lab.get_json("backup1", &sys).await;
        let st = v["BootProgress"]["LastState"].as_str().unwrap().to_string();
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        if st == "OSRunning" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("OSRunning"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|s| s == "MemoryInitializationStarted"),
        "{seen:?}"
    );
    assert!(seen.iter().any(|s| s == "OSBootStarted"), "{seen:?}");
    // A reset type the firmware does not offer is refused.
    let (s, body) = lab.reset("backup1", "Hibernate").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("ActionParameterValueNotInList"));
    lab.rack.stop().await;
}

#[tokio::test]
async fn each_firmware_answers_its_own_quirks() {
    let lab = lab();
    // iDRAC9: ForceOff on an off host is 409, and so is an On right after the Off.
    lab.reset("db1", "ForceOff").await;
    lab.wait_power("db1", "Off", Duration::from_secs(5)).await;
    let (s, body) = lab.reset("db1", "ForceOff").await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(lab.reset("db1", "On").await.0, StatusCode::CONFLICT);
    // iLO 5: already off is 400.
    lab.reset("web1", "ForceOff").await;
    lab.wait_power("web1", "Off", Duration::from_secs(5)).await;
    assert_eq!(
        lab.reset("web1", "ForceOff").await.0,
        StatusCode::BAD_REQUEST
    );
    // Supermicro: a reset during POST is 400.
    assert_eq!(
        lab.reset("batch1", "ForceRestart").await.0,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lab.reset("batch1", "ForceOff").await.0,
        StatusCode::BAD_REQUEST
    );
    // OpenBMC: after a BMC reboot, PowerState is missing for a while.
    lab.inject(
        "failover1",
        Fault {
            duration_ms: Some(300),
            ..Fault::new(FaultKind::BmcReboot)
        },
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t0 = Instant::now();
    let missing = loop {
        if let Ok(r) = lab.get("failover1", &lab.system("failover1")).await
            && r.status() == StatusCode::OK
        {
            break r.json::<Value>().await.unwrap().get("PowerState").is_none();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the BMC never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        missing,
        "PowerState should be missing right after an OpenBMC reboot"
    );
    lab.rack.stop().await;
}

/// What a hardware fault looks like on Redfish: power, health and the SEL.
#[tokio::test]
async fn every_host_fault_shows_on_redfish_as_on_a_real_server() {
    let lab = lab();
    let cases: &[(FaultKind, bool, &str, &str, &str)] = &[
        // fault, all PSUs, power after, health, SEL message fragment
        (
            FaultKind::PowerLoss,
            false,
            "Off",
            "Critical",
            "Power Supply AC lost",
        ),
        (
            FaultKind::PsuFailure,
            false,
            "On",
            "Warning",
            "Redundancy Lost",
        ),
        (
            FaultKind::PsuFailure,
            true,
            "Off",
            "Critical",
            "PS2 Status | Failure detected",
        ),
        (
            FaultKind::VrFault,
            false,
            "Off",
            "Critical",
            "VCCIN | Upper Critical going high",
        ),
        (
            FaultKind::ThermalTrip,
            false,
            "Off",
            "Critical",
            "Thermal Trip",
        ),
        (FaultKind::CpuIerr, false, "On", "Critical", "IERR"),
        (
            FaultKind::MemoryUncorrectable,
            false,
            "On",
            "Critical",
            "Uncorrectable ECC",
        ),
        (
            FaultKind::OsHang,
            false,
            "On",
            "OK",
            "Watchdog 2 IPMI Watchdog | Timer expired",
        ),
        (
            FaultKind::KernelPanic,
            false,
            "On",
            "OK",
            "Run-time critical stop",
        ),
        (
            FaultKind::PostHang,
            false,
            "On",
            "Critical",
            "System Firmware Hang",
        ),
    ];
    let sel = "/redfish/v1/Managers/iDRAC.Embedded.1/LogServices/Sel/Entries";
    for (kind, all, power, health, msg) in cases {
        lab.inject(
            "db1",
            Fault {
                all: *all,
                ..Fault::new(*kind)
            },
        );
        let sys = lab.get_json("db1", &lab.system("db1")).await;
        assert_eq!(sys["PowerState"], *power, "{kind:?}");
        assert_eq!(sys["Status"]["HealthRollup"], *health, "{kind:?}");
        // Some records come at once, the watchdog's when its timeout runs out.
        let t0 = Instant::now();
        loop {
            let entries = lab.get_json("db1", sel).await;
            let last: Vec<String> = entries["Members"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .take(3)
                .map(|e| e["Message"].as_str().unwrap().to_string())
                .collect();
            if last.iter().any(|m| m.contains(msg)) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(3), "{kind:?}: {last:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if *kind == FaultKind::PostHang {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let sys = lab.get_json("db1", &lab.system("db1")).await;
            assert_eq!(
                sys["BootProgress"]["LastState"],
                "MemoryInitializationStarted"
            );
        }
        lab.rack.servers["db1"].repair();
        lab.wait_power("db1", "On", Duration::from_secs(5)).await;
    }
    // Sensors: a thermal trip drives the CPU temperature over its critical threshold on both
    // the legacy Thermal resource and the Sensors collection.
    lab.inject("db1", Fault::new(FaultKind::ThermalTrip));
    let th = lab
        .get_json("db1", "/redfish/v1/Chassis/System.Embedded.1/Thermal")
        .await;
    let t = &th["Temperatures"][0];
    assert!(t["ReadingCelsius"].as_f64().unwrap() > t["UpperThresholdCritical"].as_f64().unwrap());
    let view = vigil_lab::control::view(&lab.rack.servers["db1"]);
    assert_eq!(view.power_state, "Off");
    lab.rack.servers["db1"].repair();
    lab.inject("db1", Fault::new(FaultKind::PsuFailure));
    let pw = lab
        .get_json("db1", "/redfish/v1/Chassis/System.Embedded.1/Power")
        .await;
    assert_eq!(pw["PowerSupplies"][0]["Status"]["Health"], "Critical");
    assert_ne!(pw["PowerSupplies"][1]["Status"]["Health"], "Critical");
    lab.rack.stop().await;
}

#[tokio::test]
async fn overlays_never_add_properties_the_capture_lacks() {
    let lab = lab();
    // The DMTF capture's Power resource has no Redundancy: a PSU fault must not add a null one.
    lab.inject("backup1", Fault::new(FaultKind::PsuFailure));
    lab.inject("backup1", Fault::new(FaultKind::VrFault));
    let power = lab
        .get_json("backup1", "/redfish/v1/Chassis/1U/Power")
        .await;
    let v = power.as_object().unwrap();
    for (k, val) in v {
        assert!(!val.is_null(), "{k} is null");
    }
    let sys = lab.get_json("backup1", &lab.system("backup1")).await;
    assert!(sys.get("@Redfish.Copyright").is_none());
    lab.rack.stop().await;
}

#[tokio::test]
async fn a_lost_power_cannot_be_switched_back_on_until_repaired() {
    let lab = lab();
    lab.inject("backup1", Fault::new(FaultKind::PowerLoss));
    assert_eq!(lab.power("backup1").await.as_deref(), Some("Off"));
    assert_eq!(lab.reset("backup1", "On").await.0, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lab.power("backup1").await.as_deref(), Some("Off"));
    lab.rack.servers["backup1"].repair();
    lab.wait_power("backup1", "On", Duration::from_secs(5))
        .await;
    lab.rack.stop().await;
}

#[tokio::test]
async fn bmc_moods_slow_erroring_malformed_oversized_stale() {
    let lab = lab();
    let sys = lab.system("backup1");
    lab.inject(
        "backup1",
        Fault {
            delay_ms: 400,
            ..Fault::new(FaultKind::Slow)
        },
    );
    let t0 = Instant::now();
    lab.get_json("backup1", &sys).await;
    assert!(t0.elapsed() >= Duration::from_millis(400));
    lab.rack.servers["backup1"].repair();

    lab.inject(
        "backup1",
        Fault {
            status: 500,
            count: 2,
            ..Fault::new(FaultKind::HttpError)
        },
    );
    assert_eq!(
        lab.get("backup1", &sys).await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        lab.get("backup1", &sys).await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        lab.get("backup1", &sys).await.unwrap().status(),
        StatusCode::OK
    );
    lab.rack.servers["backup1"].repair();

    lab.inject("backup1", Fault::new(FaultKind::MalformedJson));
    let text = lab
        .get("backup1", &sys)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err());
    lab.rack.servers["backup1"].repair();

    lab.inject("backup1", Fault::new(FaultKind::OversizedBody));
    let mut r = lab.get("backup1", &sys).await.unwrap();
    let mut n = 0usize;
    while let Some(chunk) = r.chunk().await.unwrap() {
        n += chunk.len();
    }
    assert!(n >= vigil_lab::redfish::OVERSIZED_BODY_BYTES, "{n}");
    lab.rack.servers["backup1"].repair();

    lab.inject("backup1", Fault::new(FaultKind::StalePowerState));
    lab.reset("backup1", "ForceOff").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lab.power("backup1").await.as_deref(),
        Some("On"),
        "the BMC lies: PowerState is stale"
    );
    assert_eq!(
        vigil_lab::control::view(&lab.rack.servers["backup1"]).power_state,
        "Off"
    );
    lab.rack.servers["backup1"].repair();
    assert_eq!(lab.power("backup1").await.as_deref(), Some("Off"));
    lab.rack.stop().await;
}

#[tokio::test]
async fn a_dead_bmc_refuses_connections_and_comes_back_on_the_same_port() {
    let lab = lab();
    let sys = lab.system("web1");
    lab.inject("web1", Fault::new(FaultKind::BmcDown));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = lab.get("web1", &sys).await.unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    lab.rack.servers["web1"].repair();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = lab.get("web1", &sys).await {
            assert_eq!(r.status(), StatusCode::OK);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A BMC reboot drops every session.
    let (u, p) = lab.creds("web1");
    let r = lab
        .client
        .post(lab.url("web1", "/redfish/v1/SessionService/Sessions"))
        .json(&json!({"UserName": u, "Password": p}))
        .send()
        .await
        .unwrap();
    let token = r.headers()["X-Auth-Token"].to_str().unwrap().to_string();
    lab.inject(
        "web1",
        Fault {
            duration_ms: Some(300),
            ..Fault::new(FaultKind::BmcReboot)
        },
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = lab
        .client
        .get(lab.url("web1", &sys))
        .header("X-Auth-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    lab.rack.stop().await;
}

#[tokio::test]
async fn the_rack_writes_a_configuration_vigil_accepts() {
    let lab = lab();
    let e = &lab.rack.endpoints;
    let checked = vigil::config::check(&e.vigil_config).unwrap();
    assert!(!checked.diagnostics.has_errors(), "{}", checked.diagnostics);
    let cfg = checked.config.unwrap();
    assert_eq!(cfg.nodes.len(), 4);
    assert_eq!(cfg.hosts.len(), 2);
    // Secrets are private files.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&e.servers["db1"].password_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(e.vigil_config.with_file_name("endpoints.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["servers"]["db1"]["firmware_profile"], "idrac9");
    lab.rack.stop().await;
}
