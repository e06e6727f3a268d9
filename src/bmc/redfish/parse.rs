//! Lenient readers of Redfish resources: JSON in, domain types out, pure.
//!
//! Overview: real BMCs differ in everything that is optional, spell numbers as integers, floats or
//! strings, and add enum values the schema never had. These readers take a `serde_json::Value`
//! and pull out what vigil needs, accepting every spelling and turning anything not understood
//! into `Unknown`, never a default that could mislead a fence (a missing PowerState is not On).
//! `redfish-codegen`'s strict structs are not used: one unknown enum value fails a whole document
//! there (see DESIGN.md, "Dependencies").
//!
//! Scope: one resource at a time; fetching and following links is the driver's.
//!
//! Key types: [`system_status`], [`legacy_thermal`], [`legacy_power`], [`sensor`], [`log_entries`].

use serde_json::Value;

use crate::model::{
    BootProgress, Health, LogEntry, PowerReading, PsuReading, SensorKind, SensorReading,
};

/// A number as BMCs write it: an integer, a float, or a numeric string.
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
}

fn text(v: &Value) -> Option<&str> {
    v.as_str()
}

fn health_of(v: &Value) -> Health {
    let st = &v["Status"];
    Health::from_redfish(text(&st["Health"]))
}

/// The `@odata.id` of a link property.
pub fn link<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name)?.get("@odata.id")?.as_str()
}

/// The member links of a collection.
pub fn members(v: &Value) -> Vec<String> {
    v["Members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["@odata.id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Power, boot progress and health from a ComputerSystem, at the profile's pointers.
pub fn system_status(
    system: &Value,
    power_pointer: &str,
    boot_pointer: Option<&str>,
    health_pointer: &str,
) -> (PowerReading, Option<BootProgress>, Health) {
    let power = PowerReading::from_redfish(system.pointer(power_pointer).and_then(Value::as_str));
    let boot = boot_pointer
        .and_then(|p| system.pointer(p))
        .and_then(Value::as_str)
        .map(BootProgress::from_redfish);
    let mut health = Health::from_redfish(system.pointer(health_pointer).and_then(Value::as_str));
    if health == Health::Unknown {
        // Some firmware fills Health but not HealthRollup (or the other way round).
        health = Health::from_redfish(system["Status"]["HealthRollup"].as_str())
            .max_known(Health::from_redfish(system["Status"]["Health"].as_str()));
    }
    (power, boot, health)
}

impl Health {
    /// The worse of two, where Unknown loses to anything known.
    pub fn max_known(self, other: Health) -> Health {
        match (self, other) {
            (Health::Unknown, o) => o,
            (s, Health::Unknown) => s,
            (s, o) => s.max(o),
        }
    }
}

/// Temperatures and fans from a legacy `Thermal` resource.
pub fn legacy_thermal(v: &Value) -> Vec<SensorReading> {
    let mut out = Vec::new();
    for t in v["Temperatures"].as_array().into_iter().flatten() {
        out.push(SensorReading {
            kind: SensorKind::Temperature,
            name: text(&t["Name"]).unwrap_or("temperature").to_string(),
            value: number(&t["ReadingCelsius"]),
            upper_critical: number(&t["UpperThresholdCritical"]),
            upper_fatal: number(&t["UpperThresholdFatal"]),
            lower_critical: number(&t["LowerThresholdCritical"]),
            health: health_of(t),
        });
    }
    for f in v["Fans"].as_array().into_iter().flatten() {
        out.push(SensorReading {
            kind: SensorKind::Fan,
            name: text(&f["Name"])
                .or(text(&f["FanName"]))
                .unwrap_or("fan")
                .to_string(),
            value: number(&f["Reading"]),
            upper_critical: None,
            upper_fatal: None,
            lower_critical: number(&f["LowerThresholdCritical"]),
            health: health_of(f),
        });
    }
    out
}

/// Voltages, PSUs and the PSU redundancy from a legacy `Power` resource.
pub fn legacy_power(v: &Value) -> (Vec<SensorReading>, Vec<PsuReading>, Option<Health>) {
    let volts = v["Voltages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| SensorReading {
            kind: SensorKind::Voltage,
            name: text(&t["Name"]).unwrap_or("voltage").to_string(),
            value: number(&t["ReadingVolts"]),
            upper_critical: number(&t["UpperThresholdCritical"]),
            upper_fatal: number(&t["UpperThresholdFatal"]),
            lower_critical: number(&t["LowerThresholdCritical"]),
            health: health_of(t),
        })
        .collect();
    let psus = v["PowerSupplies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| PsuReading {
            name: text(&p["Name"])
                .or(text(&p["MemberId"]))
                .unwrap_or("psu")
                .to_string(),
            health: health_of(p),
        })
        .collect();
    let redundancy = v["Redundancy"]
        .as_array()
        .and_then(|r| r.first())
        .map(health_of);
    (volts, psus, redundancy)
}

/// A sensor from a `Sensors` collection member (temperature, voltage or fan), if it is one.
pub fn sensor(v: &Value) -> Option<SensorReading> {
    let kind = match text(&v["ReadingType"])? {
        "Temperature" => SensorKind::Temperature,
        "Voltage" => SensorKind::Voltage,
        "Rotational" | "Percent" if v["PhysicalContext"] == "Fan" => SensorKind::Fan,
        "Rotational" => SensorKind::Fan,
        _ => return None,
    };
    let th = &v["Thresholds"];
    Some(SensorReading {
        kind,
        name: text(&v["Name"])
            .or(text(&v["Id"]))
            .unwrap_or("sensor")
            .to_string(),
        value: number(&v["Reading"]),
        upper_critical: number(&th["UpperCritical"]["Reading"]),
        upper_fatal: number(&th["UpperFatal"]["Reading"]),
        lower_critical: number(&th["LowerCritical"]["Reading"]),
        health: health_of(v),
    })
}

/// A PSU from a PowerSubsystem `PowerSupplies` member.
pub fn psu(v: &Value) -> PsuReading {
    PsuReading {
        name: text(&v["Name"])
            .or(text(&v["Id"]))
            .unwrap_or("psu")
            .to_string(),
        health: health_of(v),
    }
}

/// The log entries of a LogEntry collection whose members are expanded (most BMCs expand SEL
/// members; links-only members are skipped here and fetched by the driver).
pub fn log_entries(v: &Value) -> Vec<LogEntry> {
    v["Members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(log_entry)
        .collect()
}

/// One LogEntry, if it has an id and a message.
pub fn log_entry(e: &Value) -> Option<LogEntry> {
    let id = text(&e["Id"])?.to_string();
    let message = text(&e["Message"])?.to_string();
    Some(LogEntry {
        id,
        created: text(&e["Created"]).map(String::from),
        severity: Health::from_redfish(text(&e["Severity"])),
        message,
        sensor_type: text(&e["SensorType"]).map(String::from),
        asserted: text(&e["EntryCode"]) != Some("Deassert"),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn only_an_explicit_off_is_off() {
        let s = |v: Value| system_status(&v, "/PowerState", None, "/Status/HealthRollup").0;
        assert_eq!(s(json!({"PowerState": "Off"})), PowerReading::Off);
        assert_eq!(
            s(json!({"PowerState": "PoweringOff"})),
            PowerReading::PoweringOff
        );
        assert_eq!(s(json!({})), PowerReading::Unknown);
        assert_eq!(s(json!({"PowerState": null})), PowerReading::Unknown);
        assert_eq!(s(json!({"PowerState": "off"})), PowerReading::Unknown);
        assert_eq!(s(json!({"PowerState": 0})), PowerReading::Unknown);
        assert_eq!(s(json!({"PowerState": "Paused"})), PowerReading::Unknown);
    }

    #[test]
    fn numbers_come_as_ints_floats_or_strings() {
        assert_eq!(number(&json!(85)), Some(85.0));
        assert_eq!(number(&json!(85.0)), Some(85.0));
        assert_eq!(number(&json!(" 85.5")), Some(85.5));
        assert_eq!(number(&json!("N/A")), None);
        assert_eq!(number(&json!(null)), None);
    }

    #[test]
    fn a_sensor_past_its_critical_threshold_is_critical() {
        let t = legacy_thermal(&json!({"Temperatures": [
            {"Name": "CPU1 Temp", "ReadingCelsius": "104", "UpperThresholdCritical": 103, "Status": {"Health": "OK"}},
            {"Name": "Inlet", "ReadingCelsius": 22, "UpperThresholdCritical": 47}
        ]}));
        assert!(t[0].is_critical());
        assert!(!t[1].is_critical());
    }

    #[test]
    fn health_falls_back_between_rollup_and_own() {
        let (_, _, h) = system_status(
            &json!({"Status": {"Health": "Warning"}}),
            "/PowerState",
            None,
            "/Status/HealthRollup",
        );
        assert_eq!(h, Health::Warning);
    }

    proptest! {
        #[test]
        fn readers_never_panic_on_arbitrary_json(s in "\\PC{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _a = system_status(&v, "/PowerState", Some("/BootProgress/LastState"), "/Status/HealthRollup");
                let _b = legacy_thermal(&v);
                let _c = legacy_power(&v);
                let _d = sensor(&v);
                let _e = log_entries(&v);
                let _f = members(&v);
            }
        }

        #[test]
        fn readers_never_panic_on_arbitrary_shapes(
            power in prop_oneof![Just(json!("On")), Just(json!(1)), Just(json!(null)), Just(json!([])), Just(json!({"x": 1}))],
            reading in prop_oneof![Just(json!("12")), Just(json!(1e308)), Just(json!(-1)), Just(json!({})), Just(json!("x"))],
        ) {
            let v = json!({"PowerState": power, "Temperatures": [{"ReadingCelsius": reading}], "Voltages": reading,
                "Members": [{"Id": reading, "Message": power}], "ReadingType": "Temperature", "Reading": reading});
            let _a = system_status(&v, "/PowerState", Some("/BootProgress/LastState"), "/Status/HealthRollup");
            let _b = legacy_thermal(&v);
            let _c = legacy_power(&v);
            let _d = sensor(&v);
            let _e = log_entries(&v);
        }
    }
}
