//! Firmware profiles: what vigil knows about a family of BMC firmware.
//!
//! Overview: a [`FirmwareProfile`] says where a system's power state, boot progress, health,
//! temperatures, voltages and PSUs are, which reset types the firmware takes, how long it takes to
//! reflect a power change, and its known quirks. The files live in `firmware-profiles/` (schema in
//! its README); all of them are embedded in the binary, and an operator may add a folder of their
//! own. They are read with the same span-keeping reader as the configuration, so a broken profile
//! gets the same file:line:column errors.
//!
//! Scope: loading and validating profiles. Acting on quirks is the BMC drivers' and fencing's job.
//!
//! Key types: [`FirmwareProfile`], [`Quirk`], [`ProfileSet`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::diag::{Diagnostics, Severity, Source};
use super::reader::{Table, parse_document};

/// The profiles shipped with vigil, embedded at build time: (name, file text).
const BUILTIN: &[(&str, &str)] = &[
    (
        "dmtf-generic",
        include_str!("../../firmware-profiles/dmtf-generic.toml"),
    ),
    (
        "openbmc",
        include_str!("../../firmware-profiles/openbmc.toml"),
    ),
    (
        "idrac9",
        include_str!("../../firmware-profiles/idrac9.toml"),
    ),
    ("ilo5", include_str!("../../firmware-profiles/ilo5.toml")),
    ("xcc", include_str!("../../firmware-profiles/xcc.toml")),
    (
        "supermicro",
        include_str!("../../firmware-profiles/supermicro.toml"),
    ),
];

/// How vigil authenticates to the BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// SessionService, X-Auth-Token reused across requests.
    Session,
    /// HTTP Basic on every request.
    Basic,
}

/// Where things are on this firmware's Redfish service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedfishLayout {
    /// Session or Basic.
    pub auth: AuthMode,
    /// Sessions the BMC allows at once.
    pub max_sessions: u32,
    /// Member of /redfish/v1/Systems that is the host.
    pub system_id: String,
    /// Chassis carrying the host's thermal and power.
    pub chassis_id: String,
    /// The BMC's own manager.
    pub manager_id: String,
    /// JSON pointer to PowerState in the System.
    pub power_state: String,
    /// JSON pointer to the boot progress in the System, when the firmware has one.
    pub boot_progress: Option<String>,
    /// JSON pointer to the health rollup in the System.
    pub health: String,
    /// Reset types the firmware accepts.
    pub reset_types: Vec<String>,
    /// Reset type used to fence.
    pub power_off: String,
    /// Reset type used to power on.
    pub power_on: String,
    /// Reset type used to power-cycle, when there is one.
    pub power_cycle: Option<String>,
    /// Chassis links with temperatures and fans, preferred first.
    pub thermal: Vec<String>,
    /// Chassis links with PSUs and voltages, preferred first.
    pub power: Vec<String>,
    /// Whether the chassis has a Sensors collection.
    pub sensors: bool,
    /// The LogService holding the SEL, when there is one.
    pub sel: Option<String>,
}

/// How the firmware behaves in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timing {
    /// ForceOff until PowerState reads Off.
    pub power_off_reflect: Duration,
    /// On until PowerState reads On.
    pub power_on_reflect: Duration,
    /// Power-on until the OS takes over.
    pub post: Duration,
}

/// A known misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Quirk {
    /// ForceOff on an off host answers this HTTP status.
    AlreadyOffError {
        /// The status.
        status: u16,
    },
    /// On within `window` of an Off answers `status`.
    OnAfterOffConflict {
        /// The status (409).
        status: u16,
        /// How long after the Off.
        window: Duration,
    },
    /// A reset during POST answers `status`.
    ResetDuringPost {
        /// The status (400).
        status: u16,
    },
    /// PowerState may be absent.
    PowerStateMissing,
    /// PowerState may lag a change by up to this long.
    StalePowerState {
        /// How long.
        lag: Duration,
    },
}

/// A quirk with what it is and where that is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuirkEntry {
    /// The quirk.
    #[serde(flatten)]
    pub quirk: Quirk,
    /// What the firmware does.
    pub note: String,
    /// Where that is shown.
    pub source: String,
}

/// One firmware family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirmwareProfile {
    /// Name, as nodes refer to it.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Service root Vendor (or manager Manufacturer).
    pub vendor: String,
    /// Real captures it fits.
    pub mockups: Vec<String>,
    /// Where things are.
    pub redfish: RedfishLayout,
    /// How it behaves in time.
    pub timing: Timing,
    /// Known misbehaviours.
    pub quirks: Vec<QuirkEntry>,
}

impl FirmwareProfile {
    /// The first quirk matching `pred`.
    pub fn quirk<T>(&self, pred: impl Fn(&Quirk) -> Option<T>) -> Option<T> {
        self.quirks.iter().find_map(|q| pred(&q.quirk))
    }
}

const THERMAL_LINKS: &[&str] = &["ThermalSubsystem", "Thermal"];
const POWER_LINKS: &[&str] = &["PowerSubsystem", "Power"];
const QUIRK_KINDS: &[&str] = &[
    "already-off-error",
    "on-after-off-conflict",
    "reset-during-post",
    "power-state-missing",
    "stale-power-state",
];

fn http_status(t: &Table<'_, '_>, d: &mut Diagnostics) -> Option<u16> {
    let present = t.span_of("status").is_some();
    let s = t
        .integer(d, "status", 400..=599)
        .map(|s| *s.get_ref() as u16);
    if !present {
        t.report(
            d,
            Severity::Error,
            None,
            "status",
            "this quirk needs the HTTP `status` the firmware answers",
            Some("add `status = 409` (or the status the firmware sends)".into()),
        );
    }
    s
}

fn req_duration(t: &Table<'_, '_>, d: &mut Diagnostics, key: &'static str) -> Option<Duration> {
    let present = t.span_of(key).is_some();
    let v = t.duration(d, key).map(|v| *v.get_ref());
    if !present {
        t.report(
            d,
            Severity::Error,
            None,
            key,
            format!("missing key `{key}` in [{}]", t.path()),
            Some(format!("add `{key} = \"5s\"`")),
        );
    }
    v
}

fn pointer(
    t: &Table<'_, '_>,
    d: &mut Diagnostics,
    key: &'static str,
    required: bool,
) -> Option<String> {
    let v = if required {
        t.req_string(d, key)
    } else {
        t.string(d, key)
    }?;
    if !v.get_ref().starts_with('/') {
        t.report(
            d,
            Severity::Error,
            Some(v.span()),
            key,
            format!("`{}` must be a JSON pointer starting with `/`", v.get_ref()),
            Some(format!("write it as \"/{}\"", v.get_ref())),
        );
        return None;
    }
    Some(v.into_inner())
}

fn links(
    t: &Table<'_, '_>,
    d: &mut Diagnostics,
    key: &'static str,
    allowed: &[&str],
) -> Option<Vec<String>> {
    let present = t.span_of(key).is_some();
    let v = t.strings(d, key);
    if !present {
        t.report(
            d,
            Severity::Error,
            None,
            key,
            format!("missing key `{key}`"),
            None,
        );
        return None;
    }
    let v = v?;
    let mut ok = true;
    for s in &v {
        if !allowed.contains(&s.get_ref().as_str()) {
            ok = false;
            t.report(
                d,
                Severity::Error,
                Some(s.span()),
                key,
                format!("`{}` is not a chassis link vigil reads here", s.get_ref()),
                Some(format!("use {}", allowed.join(" or "))),
            );
        }
    }
    if v.is_empty() {
        // Legal (some emulators and small BMCs have no such chassis resource), but worth saying.
        t.report(
            d,
            Severity::Warning,
            t.span_of(key),
            key,
            format!("`{key}` is empty: vigil reads nothing through this link on this firmware"),
            None,
        );
    }
    ok.then(|| v.into_iter().map(|s| s.into_inner()).collect())
}

/// Reads one profile file. `None` (with diagnostics) when it is not usable.
pub fn parse_profile(
    source: &Source,
    expected_name: &str,
    d: &mut Diagnostics,
) -> Option<FirmwareProfile> {
    let before = d.error_count();
    let doc = parse_document(source, d)?;
    let root = Table::root(source, &doc);
    let name = root.req_string(d, "name");
    if let Some(n) = &name
        && n.get_ref() != expected_name
    {
        root.report(
            d,
            Severity::Error,
            Some(n.span()),
            "name",
            format!(
                "profile is named \"{}\" but its file is {expected_name}.toml",
                n.get_ref()
            ),
            Some(format!("name it \"{expected_name}\" or rename the file")),
        );
    }
    let description = root.req_string(d, "description");
    let vendor = root.req_string(d, "vendor");
    let mockups = root.strings(d, "mockups").unwrap_or_default();
    if mockups.is_empty() {
        // A warning: an operator's own profile may be written from a live BMC, not a capture
        // (vigil's own profiles must all name one: their test allows no diagnostic at all).
        root.report(
            d,
            Severity::Warning,
            root.span_of("mockups"),
            "mockups",
            "the profile names no capture it was checked against",
            Some("add `mockups = [\"<dir under shared/lab-data/redfish-mockups>\"]` when there is one; the lab needs one to simulate this firmware".into()),
        );
    }

    let redfish = match root.table(d, "redfish") {
        Some(t) => {
            let auth = t.choice(d, "auth", &["session", "basic"]);
            if t.span_of("auth").is_none() {
                t.report(
                    d,
                    Severity::Error,
                    None,
                    "auth",
                    "missing key `auth` in [redfish]",
                    Some("add `auth = \"session\"`".into()),
                );
            }
            let max_sessions = t.integer(d, "max_sessions", 1..=1024);
            if t.span_of("max_sessions").is_none() {
                t.report(
                    d,
                    Severity::Error,
                    None,
                    "max_sessions",
                    "missing key `max_sessions` in [redfish]",
                    Some("add `max_sessions = 4`".into()),
                );
            }
            let system_id = t.req_string(d, "system_id");
            let chassis_id = t.req_string(d, "chassis_id");
            let manager_id = t.req_string(d, "manager_id");
            let power_state = pointer(&t, d, "power_state", true);
            let boot_progress = pointer(&t, d, "boot_progress", false);
            let health = pointer(&t, d, "health", true);
            let reset_types = t.strings(d, "reset_types").unwrap_or_default();
            if reset_types.is_empty() {
                t.report(
                    d,
                    Severity::Error,
                    t.span_of("reset_types"),
                    "reset_types",
                    "`reset_types` must list the reset types the firmware accepts",
                    None,
                );
            }
            let known: Vec<&str> = reset_types.iter().map(|s| s.get_ref().as_str()).collect();
            let mut reset = |key: &'static str, required: bool| {
                let v = if required {
                    t.req_string(d, key)
                } else {
                    t.string(d, key)
                }?;
                if !known.is_empty() && !known.contains(&v.get_ref().as_str()) {
                    t.report(
                        d,
                        Severity::Error,
                        Some(v.span()),
                        key,
                        format!("reset type \"{}\" is not in `reset_types`", v.get_ref()),
                        Some(format!("use one of: {}", known.join(", "))),
                    );
                    return None;
                }
                Some(v.into_inner())
            };
            let power_off = reset("power_off", true);
            let power_on = reset("power_on", true);
            let power_cycle = reset("power_cycle", false);
            let thermal = links(&t, d, "thermal", THERMAL_LINKS);
            let power = links(&t, d, "power", POWER_LINKS);
            let sensors = t.boolean(d, "sensors");
            if t.span_of("sensors").is_none() {
                t.report(
                    d,
                    Severity::Error,
                    None,
                    "sensors",
                    "missing key `sensors` in [redfish]",
                    Some("add `sensors = true` or `false`".into()),
                );
            }
            let sel = t.string(d, "sel").map(|s| s.into_inner());
            t.finish(d);
            match (
                auth,
                max_sessions,
                system_id,
                chassis_id,
                manager_id,
                power_state,
                health,
                power_off,
                power_on,
                thermal,
                power,
                sensors,
            ) {
                (
                    Some(auth),
                    Some(max_sessions),
                    Some(system_id),
                    Some(chassis_id),
                    Some(manager_id),
                    Some(power_state),
                    Some(health),
                    Some(power_off),
                    Some(power_on),
                    Some(thermal),
                    Some(power),
                    Some(sensors),
                ) => Some(RedfishLayout {
                    auth: if *auth.get_ref() == "basic" {
                        AuthMode::Basic
                    } else {
                        AuthMode::Session
                    },
                    max_sessions: *max_sessions.get_ref() as u32,
                    system_id: system_id.into_inner(),
                    chassis_id: chassis_id.into_inner(),
                    manager_id: manager_id.into_inner(),
                    power_state,
                    boot_progress,
                    health,
                    reset_types: reset_types.into_iter().map(|s| s.into_inner()).collect(),
                    power_off,
                    power_on,
                    power_cycle,
                    thermal,
                    power,
                    sensors: *sensors.get_ref(),
                    sel,
                }),
                _ => None,
            }
        }
        None => {
            root.report(
                d,
                Severity::Error,
                None,
                "redfish",
                "missing table [redfish]",
                Some("see firmware-profiles/README.md for its keys".into()),
            );
            None
        }
    };

    let timing = match root.table(d, "timing") {
        Some(t) => {
            let off = req_duration(&t, d, "power_off_reflect");
            let on = req_duration(&t, d, "power_on_reflect");
            let post = req_duration(&t, d, "post");
            t.finish(d);
            match (off, on, post) {
                (Some(power_off_reflect), Some(power_on_reflect), Some(post)) => Some(Timing {
                    power_off_reflect,
                    power_on_reflect,
                    post,
                }),
                _ => None,
            }
        }
        None => {
            root.report(
                d,
                Severity::Error,
                None,
                "timing",
                "missing table [timing]",
                Some("add [timing] with power_off_reflect, power_on_reflect and post".into()),
            );
            None
        }
    };

    let mut quirks = Vec::new();
    for q in root.tables(d, "quirk") {
        let kind = q.choice(d, "kind", QUIRK_KINDS);
        if q.span_of("kind").is_none() {
            q.report(
                d,
                Severity::Error,
                None,
                "kind",
                "a quirk needs a `kind`",
                Some(format!("one of: {}", QUIRK_KINDS.join(", "))),
            );
        }
        let note = q.req_string(d, "note");
        let source_ = q.req_string(d, "source");
        let quirk = match kind.as_ref().map(|k| *k.get_ref()) {
            Some("already-off-error") => {
                http_status(&q, d).map(|status| Quirk::AlreadyOffError { status })
            }
            Some("on-after-off-conflict") => {
                let status = http_status(&q, d);
                let window = req_duration(&q, d, "window");
                status
                    .zip(window)
                    .map(|(status, window)| Quirk::OnAfterOffConflict { status, window })
            }
            Some("reset-during-post") => {
                http_status(&q, d).map(|status| Quirk::ResetDuringPost { status })
            }
            Some("power-state-missing") => Some(Quirk::PowerStateMissing),
            Some("stale-power-state") => {
                req_duration(&q, d, "for").map(|lag| Quirk::StalePowerState { lag })
            }
            _ => None,
        };
        q.finish(d);
        if let (Some(quirk), Some(note), Some(source_)) = (quirk, note, source_) {
            quirks.push(QuirkEntry {
                quirk,
                note: note.into_inner(),
                source: source_.into_inner(),
            });
        }
    }
    root.finish(d);
    if d.error_count() > before {
        return None;
    }
    Some(FirmwareProfile {
        name: name?.into_inner(),
        description: description?.into_inner(),
        vendor: vendor?.into_inner(),
        mockups: mockups.into_iter().map(|s| s.into_inner()).collect(),
        redfish: redfish?,
        timing: timing?,
        quirks,
    })
}

/// All the profiles known to this appliance, by name.
#[derive(Debug, Clone, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, FirmwareProfile>,
}

impl ProfileSet {
    /// The profiles shipped with vigil. A broken built-in profile is a build defect, caught by the
    /// test suite; here it is reported like any other file.
    pub fn builtin(d: &mut Diagnostics) -> Self {
        let mut set = Self::default();
        for (name, text) in BUILTIN {
            let src = Source::new(format!("firmware-profiles/{name}.toml"), *text);
            if let Some(p) = parse_profile(&src, name, d) {
                set.profiles.insert(p.name.clone(), p);
            }
        }
        set
    }

    /// Adds every `*.toml` in `dir`; a profile there replaces a built-in one of the same name.
    pub fn load_dir(&mut self, dir: &Path, d: &mut Diagnostics) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                d.file(
                    Severity::Error,
                    dir,
                    format!("firmware profile folder cannot be read: {}", e.kind()),
                );
                return;
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let Some(stem) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let src = Source::new(&path, text);
                    if let Some(p) = parse_profile(&src, &stem, d) {
                        self.profiles.insert(p.name.clone(), p);
                    }
                }
                Err(e) => d.file(
                    Severity::Error,
                    &path,
                    format!("firmware profile cannot be read: {}", e.kind()),
                ),
            }
        }
    }

    /// The profile named `name`.
    pub fn get(&self, name: &str) -> Option<&FirmwareProfile> {
        self.profiles.get(name)
    }

    /// All names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// All profiles, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &FirmwareProfile> {
        self.profiles.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_loads_without_a_problem() {
        let mut d = Diagnostics::new();
        let set = ProfileSet::builtin(&mut d);
        assert!(d.is_empty(), "{d}");
        let names: Vec<_> = set.names().collect();
        assert_eq!(
            names,
            [
                "dmtf-generic",
                "idrac9",
                "ilo5",
                "openbmc",
                "supermicro",
                "xcc"
            ]
        );
    }

    #[test]
    fn a_broken_profile_gets_every_error_with_its_position() {
        let text = BUILTIN[0]
            .1
            .replace("power_off = \"ForceOff\"", "power_off = \"ForceOf\"")
            .replacen("[timing]", "[timing]\npost_time = \"1s\"", 1);
        let src = Source::new("dmtf-generic.toml", text);
        let mut d = Diagnostics::new();
        assert!(parse_profile(&src, "dmtf-generic", &mut d).is_none());
        let msgs: Vec<String> = d.sorted().iter().map(|x| x.message.clone()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("\"ForceOf\" is not in `reset_types`")),
            "{d}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("unknown key `post_time`")),
            "{d}"
        );
        assert!(d.sorted().iter().all(|x| x.line > 0), "{d}");
    }

    #[test]
    fn unknown_quirk_kinds_are_refused_with_a_suggestion() {
        let text = format!(
            "{}\n[[quirk]]\nkind = \"already-of-error\"\nstatus = 409\nnote = \"n\"\nsource = \"s\"\n",
            BUILTIN[0].1
        );
        let src = Source::new("dmtf-generic.toml", text);
        let mut d = Diagnostics::new();
        assert!(parse_profile(&src, "dmtf-generic", &mut d).is_none());
        let e = d.sorted()[0].clone();
        assert!(
            e.help
                .unwrap_or_default()
                .contains("did you mean \"already-off-error\"")
        );
    }
}
