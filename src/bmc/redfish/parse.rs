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

/// The parts of a JSON document at `pointers` (RFC 6901), and nothing else, as a sparse
/// `Value` in which every pointer resolves as it would in the whole document.
///
/// Why: a status poll needs three properties of a ComputerSystem that is 4 KB or more of JSON,
/// and parsing all of it into a `Value` (a string and a map node per property) was most of the
/// appliance's allocations at 10,000 nodes. Everything else is skipped as it is read (still
/// checked: malformed JSON is an error as before).
pub fn project(body: &[u8], pointers: &[&str]) -> serde_json::Result<Value> {
    let mut root = Trie::default();
    for p in pointers {
        let mut t = &mut root;
        for seg in p.split('/').skip(1) {
            let seg = seg.replace("~1", "/").replace("~0", "~");
            let i = match t.children.iter().position(|(k, _)| *k == seg) {
                Some(i) => i,
                None => {
                    t.children.push((seg, Trie::default()));
                    t.children.len() - 1
                }
            };
            t = &mut t.children[i].1;
        }
        t.leaf = true;
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde::de::DeserializeSeed::deserialize(Select(&root), &mut de)?;
    de.end()?;
    Ok(v.unwrap_or(Value::Null))
}

#[derive(Debug, Default)]
struct Trie {
    children: Vec<(String, Trie)>,
    /// Keep the whole value here.
    leaf: bool,
}

struct Select<'a>(&'a Trie);

impl<'de> serde::de::DeserializeSeed<'de> for Select<'_> {
    type Value = Option<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        if self.0.leaf {
            return serde::Deserialize::deserialize(d).map(Some);
        }
        d.deserialize_any(self)
    }
}

/// Which child a key selects, without allocating the key.
struct Key<'a>(&'a Trie);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for Key<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Option<usize>, E> {
        Ok(self.0.children.iter().position(|(c, _)| c == k))
    }
}

impl<'de> serde::de::Visitor<'de> for Select<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Option<Value>, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = m.next_key_seed(Key(self.0))? {
            match k {
                Some(i) => {
                    let (name, child) = &self.0.children[i];
                    if let Some(v) = m.next_value_seed(Select(child))? {
                        out.insert(name.clone(), v);
                    }
                }
                None => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some(Value::Object(out)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Option<Value>, A::Error> {
        // Array elements are selected by index; the ones before a selected one are kept as
        // null so that indices still resolve.
        let mut out = Vec::new();
        let mut i = 0usize;
        loop {
            let child = self
                .0
                .children
                .iter()
                .find(|(k, _)| k.parse::<usize>().ok() == Some(i))
                .map(|(_, c)| c);
            let got = match child {
                Some(c) => match s.next_element_seed(Select(c))? {
                    Some(v) => Some(v.unwrap_or(Value::Null)),
                    None => break,
                },
                None => match s.next_element::<serde::de::IgnoredAny>()? {
                    Some(_) => None,
                    None => break,
                },
            };
            if let Some(v) = got {
                out.resize(i, Value::Null);
                out.push(v);
            }
            i += 1;
        }
        Ok(Some(Value::Array(out)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<Value>, E> {
        Ok(None)
    }
}

/// The pointers [`system_status`] reads, for [`project`].
pub fn system_pointers<'a>(
    power_pointer: &'a str,
    boot_pointer: Option<&'a str>,
    health_pointer: &'a str,
) -> Vec<&'a str> {
    let mut p = vec![
        power_pointer,
        health_pointer,
        "/Status/HealthRollup",
        "/Status/Health",
    ];
    p.extend(boot_pointer);
    p
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

    /// The projection answers every pointer as the whole document does, on every real system
    /// resource of the lab's captures.
    #[test]
    fn a_projection_reads_like_the_whole_document_on_real_captures() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/lab-data/redfish-mockups");
        let mut checked = 0;
        for m in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let systems = m.path().join("redfish/v1/Systems");
            for sys in std::fs::read_dir(&systems).into_iter().flatten().flatten() {
                let f = sys.path().join("index.json");
                let Ok(body) = std::fs::read(&f) else {
                    continue;
                };
                let Ok(whole) = serde_json::from_slice::<Value>(&body) else {
                    continue;
                };
                let ptrs = system_pointers(
                    "/PowerState",
                    Some("/BootProgress/LastState"),
                    "/Status/HealthRollup",
                );
                let part = project(&body, &ptrs).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                for p in &ptrs {
                    assert_eq!(part.pointer(p), whole.pointer(p), "{} {p}", f.display());
                }
                assert_eq!(
                    system_status(
                        &part,
                        "/PowerState",
                        Some("/BootProgress/LastState"),
                        "/Status/HealthRollup"
                    ),
                    system_status(
                        &whole,
                        "/PowerState",
                        Some("/BootProgress/LastState"),
                        "/Status/HealthRollup"
                    ),
                );
                assert!(
                    part.to_string().len() < whole.to_string().len() / 4,
                    "{}: not much smaller",
                    f.display()
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 6,
            "only {checked} system captures found under {}",
            root.display()
        );
    }

    #[test]
    fn a_projection_keeps_indices_escapes_and_rejects_broken_json() {
        let body = br#"{"a": [{"x": 1}, {"x": 2, "y": [true]}], "b~c/d": "e", "skip": {"deep": [1, 2, {"z": null}]}}"#;
        let v = project(body, &["/a/1/x", "/b~0c~1d", "/missing/x", "/a/1/y/0"]).unwrap();
        assert_eq!(v.pointer("/a/1/x"), Some(&json!(2)));
        assert_eq!(v.pointer("/a/1/y/0"), Some(&json!(true)));
        assert_eq!(v.pointer("/b~0c~1d"), Some(&json!("e")));
        assert_eq!(v.pointer("/missing/x"), None);
        assert!(v.get("skip").is_none());
        assert!(project(br#"{"a": [1, 2}"#, &["/a"]).is_err());
        assert!(project(br#"{"a": 1} trailing"#, &["/a"]).is_err());
        assert!(project(b"", &["/a"]).is_err());
    }

    proptest! {
        /// On arbitrary JSON the projection never panics and agrees with the whole document at
        /// every pointer asked.
        #[test]
        fn a_projection_agrees_with_the_document(s in "\\PC{0,200}", ptr in prop_oneof![Just("/PowerState"), Just("/a/0"), Just("/Status/Health"), Just("/x/y/z")]) {
            let whole = serde_json::from_str::<Value>(&s);
            let part = project(s.as_bytes(), &[ptr]);
            prop_assert_eq!(whole.is_ok(), part.is_ok());
            if let (Ok(w), Ok(p)) = (whole, part) {
                prop_assert_eq!(w.pointer(ptr), p.pointer(ptr));
            }
        }

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
