//! Corrections of the DMTF mockups' own authoring errors, applied to what the lab serves from
//! them.
//!
//! The DMTF public mockups (`dmtf-public-*`) are synthetic: written by hand to show shapes, not
//! captured from firmware. The DMTF Redfish Service Validator finds errors in them that no
//! firmware behaviour explains, and the lab's `dmtf-generic` BMC must pass the validator with no
//! failure at all (issue 3). So the lab corrects exactly these, and only for DMTF mockups; the
//! vendors' captures are served as the firmware wrote them (their non-conformances are that
//! firmware's real behaviour). Each correction, with the mockup resource that shows it:
//!
//! | correction | shown by (dmtf-public-rackmount1) |
//! |---|---|
//! | `@Redfish.Copyright` removed (the validator rejects it outside mockups) | every resource |
//! | a resource's missing `Id` is its last path segment | `/redfish/v1/ServiceConditions` |
//! | a Role's missing `RoleId` is its `Id` | `AccountService/Roles/{Administrator,Operator,ReadOnly}` |
//! | an action `target` not under `/Actions/` is moved there | `PowerSupplies/Bay1` (PowerSupply.Reset), its `Metrics`, `Heaters/CPU1Heater/Metrics` |
//! | a date-time without seconds gets `:00` | `TaskService/Tasks/545` (`StartTime`, `EndTime`) |
//! | a link to a resource the mockup does not have is dropped (`DataSourceUri`, a registry `Location` `Uri`, `Links/Session` to a captured session) | `PowerSupplies/Bay1/Metrics` (13 PS1 sensors), `Registries/Base.1.5.0` (`Base.1.5.0.json`), `TaskService/Tasks/545` (session 1234567890ABCDEG) |
//!
//! The vendors' captures get one correction, of the lab data's own gap, not of the firmware:
//! `shared/lab-data` dropped whole services from them to save space (`SOURCES.md`: accounts,
//! certificates, schemas, registries, telemetry, fabrics, jobs, licences, component integrity,
//! keys), so links into those services are removed from what the lab serves ([`trim_dropped`]):
//! a BMC does not advertise what it does not serve. What the validator still finds in a vendor
//! capture is that firmware's real behaviour, declared per firmware profile in
//! `hardware-lab/validator/<profile>.toml` with the capture file that shows it.
//!
//! Key functions: [`correct`], [`trim_dropped`].

use serde_json::Value;

/// Whether a mockup is a DMTF synthetic one whose authoring errors the lab corrects.
pub fn applies_to(mockup: &str) -> bool {
    mockup.starts_with("dmtf-public-")
}

/// The services `shared/lab-data/SOURCES.md` says were dropped from the vendor captures.
pub const DROPPED_SERVICES: &[&str] = &[
    "AccountService",
    "CertificateService",
    "JsonSchemas",
    "Schemas",
    "Registries",
    "TelemetryService",
    "Fabrics",
    "JobService",
    "LicenseService",
    "ComponentIntegrity",
    "KeyService",
];

fn into_dropped(v: &Value) -> bool {
    let Some(o) = v.as_object() else {
        return false;
    };
    o.len() == 1
        && o.get("@odata.id")
            .and_then(Value::as_str)
            .and_then(|u| u.strip_prefix("/redfish/v1/"))
            .is_some_and(|rest| {
                let first = rest.split('/').next().unwrap_or("");
                DROPPED_SERVICES
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(first))
            })
}

/// Removes, from a vendor capture's payload, the links into services the lab data dropped
/// (see the module's header): a property whose value is such a link, and such links in arrays.
pub fn trim_dropped(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.retain(|_, x| !into_dropped(x));
            o.values_mut().for_each(trim_dropped);
        }
        Value::Array(a) => {
            a.retain(|x| !into_dropped(x));
            a.iter_mut().for_each(trim_dropped);
        }
        _ => {}
    }
}

fn is_datetime_without_seconds(s: &str) -> Option<String> {
    // YYYY-MM-DDTHH:MM followed by Z or +HH:MM / -HH:MM.
    let b = s.as_bytes();
    if b.len() < 17 || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10)) {
        return None;
    }
    if !(digits(11..13) && digits(14..16)) {
        return None;
    }
    let zone = &s[16..];
    let zone_ok = zone == "Z"
        || (zone.len() == 6
            && (zone.starts_with('+') || zone.starts_with('-'))
            && zone.as_bytes()[3] == b':');
    zone_ok.then(|| format!("{}:00{}", &s[..16], zone))
}

/// Corrects `v`, the payload served at `path`; `exists(uri)` says whether the lab serves a
/// resource there.
pub fn correct(path: &str, v: &mut Value, exists: &dyn Fn(&str) -> bool) {
    if let Some(o) = v.as_object_mut() {
        o.remove("@Redfish.Copyright");
        let ty = o
            .get("@odata.type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !ty.is_empty() && !ty.contains("Collection.") && !o.contains_key("Id") {
            let id = path.rsplit('/').next().unwrap_or(path).to_string();
            o.insert("Id".into(), Value::String(id));
        }
        if ty.starts_with("#Role.") && !o.contains_key("RoleId") {
            if let Some(id) = o.get("Id").cloned() {
                o.insert("RoleId".into(), id);
            }
        }
    }
    walk(path, v, exists);
}

fn walk(path: &str, v: &mut Value, exists: &dyn Fn(&str) -> bool) {
    match v {
        Value::Object(o) => {
            // Actions: { "#Type.Action": { "target": ... } }.
            if let Some(Value::Object(actions)) = o.get_mut("Actions") {
                for (name, a) in actions.iter_mut() {
                    let Some(short) = name.strip_prefix('#') else {
                        continue;
                    };
                    if let Some(Value::String(t)) = a.get_mut("target")
                        && !t.contains("/Actions/")
                    {
                        *t = format!("{path}/Actions/{short}");
                    }
                }
            }
            // Dangling links.
            let dangling = |x: &Value| {
                x.as_str()
                    .is_some_and(|u| u.starts_with("/redfish/v1") && !exists(u))
            };
            if o.get("DataSourceUri").is_some_and(dangling) {
                o.remove("DataSourceUri");
            }
            if o.contains_key("PublicationUri") && o.get("Uri").is_some_and(dangling) {
                o.remove("Uri");
            }
            if let Some(Value::Object(links)) = o.get_mut("Links")
                && links
                    .get("Session")
                    .and_then(|s| s.get("@odata.id"))
                    .is_some_and(dangling)
            {
                links.remove("Session");
            }
            for (_, x) in o.iter_mut() {
                if let Value::String(s) = x {
                    if let Some(fixed) = is_datetime_without_seconds(s) {
                        *s = fixed;
                    }
                } else {
                    walk(path, x, exists);
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                walk(path, x, exists);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_correction() {
        let exists = |u: &str| u == "/redfish/v1/Chassis/1U/Sensors/AmbientTemp";
        let mut v = json!({
            "@odata.type": "#Role.v1_3_0.Role",
            "@Redfish.Copyright": "Copyright DMTF",
            "Actions": { "#PowerSupply.Reset": { "target": "/redfish/v1/Chassis/1U/PowerSubsystem/PowerSupplies/Bay1/PowerSupply.Reset" } },
            "Reading": { "DataSourceUri": "/redfish/v1/Chassis/1U/Sensors/PS1Fan" },
            "Other": { "DataSourceUri": "/redfish/v1/Chassis/1U/Sensors/AmbientTemp" },
            "StartTime": "2012-03-07T14:44+06:00",
            "Fine": "2012-03-07T14:44:10+06:00",
            "Links": { "Session": { "@odata.id": "/redfish/v1/SessionService/Sessions/1234567890ABCDEG" } },
            "Location": [{ "Uri": "/redfish/v1/Registries/Base.1.5.0.json", "PublicationUri": "https://x" }]
        });
        correct("/redfish/v1/AccountService/Roles/Operator", &mut v, &exists);
        assert!(v.get("@Redfish.Copyright").is_none());
        assert_eq!(v["Id"], "Operator");
        assert_eq!(v["RoleId"], "Operator");
        assert_eq!(
            v["Actions"]["#PowerSupply.Reset"]["target"],
            "/redfish/v1/AccountService/Roles/Operator/Actions/PowerSupply.Reset"
        );
        assert!(v["Reading"].get("DataSourceUri").is_none());
        assert_eq!(
            v["Other"]["DataSourceUri"],
            "/redfish/v1/Chassis/1U/Sensors/AmbientTemp"
        );
        assert_eq!(v["StartTime"], "2012-03-07T14:44:00+06:00");
        assert_eq!(v["Fine"], "2012-03-07T14:44:10+06:00");
        assert!(v["Links"].get("Session").is_none());
        assert!(v["Location"][0].get("Uri").is_none());
        assert_eq!(v["Location"][0]["PublicationUri"], "https://x");
        // Collections get no Id.
        let mut c = json!({ "@odata.type": "#RoleCollection.RoleCollection" });
        correct("/redfish/v1/AccountService/Roles", &mut c, &exists);
        assert!(c.get("Id").is_none());
    }

    #[test]
    fn links_into_dropped_services_are_trimmed_and_nothing_else() {
        let mut v = json!({
            "AccountService": { "@odata.id": "/redfish/v1/AccountService" },
            "Systems": { "@odata.id": "/redfish/v1/Systems" },
            "Links": {
                "Certificates": [
                    { "@odata.id": "/redfish/v1/CertificateService/Certificates/1" },
                    { "@odata.id": "/redfish/v1/Managers/1/Certificates/2" }
                ],
                "Registry": { "@odata.id": "/redfish/v1/Registries/Base", "Name": "kept: not a bare link" }
            }
        });
        trim_dropped(&mut v);
        assert_eq!(
            v,
            json!({
                "Systems": { "@odata.id": "/redfish/v1/Systems" },
                "Links": {
                    "Certificates": [{ "@odata.id": "/redfish/v1/Managers/1/Certificates/2" }],
                    "Registry": { "@odata.id": "/redfish/v1/Registries/Base", "Name": "kept: not a bare link" }
                }
            })
        );
    }

    #[test]
    fn only_dmtf_mockups() {
        assert!(applies_to("dmtf-public-rackmount1"));
        assert!(!applies_to("dell-poweredge-r750"));
    }
}
