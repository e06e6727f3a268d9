//! Real Redfish captures, loaded into memory to seed a simulated BMC.
//!
//! Overview: a mockup is a folder tree where each `index.json` is the body of a GET on the URI its
//! folder names (see `shared/lab-data/SOURCES.md`). "Tall" captures keep the `redfish/v1` prefix;
//! "short" ones are rooted at `/redfish/v1`. [`Mockup::load`] reads every resource into a map keyed
//! by its URI, without a trailing slash (iLO 5 v2.70 writes every `@odata.id` with one; clients
//! must not care, and neither does the lab).
//!
//! Scope: reading captures. The BMC overlays its live state on top (`redfish.rs`); nothing here
//! changes a resource.
//!
//! Key types: [`Mockup`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a mockup could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MockupError {
    /// The folder is not a Redfish capture.
    #[error("{0} is not a Redfish mockup (no index.json at its root or under redfish/v1)")]
    NotAMockup(PathBuf),
    /// A resource could not be read.
    #[error("mockup resource {path} cannot be read")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A resource is not JSON.
    #[error("mockup resource {path} is not JSON")]
    NotJson {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The shared lab data folder: `$VIGIL_LAB_DATA`, else `../shared/lab-data` beside the repository.
pub fn lab_data_dir() -> PathBuf {
    std::env::var_os("VIGIL_LAB_DATA").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/lab-data"),
        PathBuf::from,
    )
}

/// A captured Redfish service.
#[derive(Debug, Clone)]
pub struct Mockup {
    /// Its name (the folder's).
    pub name: String,
    /// Every resource by URI (no trailing slash).
    pub resources: BTreeMap<String, Value>,
    /// Lower-cased URI to URI, for a capture from firmware that serves URIs whatever their case
    /// (see [`Mockup::load`]); `None` for the others, whose URIs are exact.
    folded: Option<BTreeMap<String, String>>,
}

/// Every `@odata.id` link in `v`.
fn links<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("@odata.id", Value::String(s)) => out.push(s),
                    _ => links(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| links(x, out)),
        _ => {}
    }
}

/// `uri` without a trailing slash, query or fragment.
pub fn normalize(uri: &str) -> &str {
    let uri = uri.split(['?', '#']).next().unwrap_or(uri);
    let t = uri.trim_end_matches('/');
    if t.is_empty() { "/" } else { t }
}

impl Mockup {
    /// Loads the mockup named `name` from the lab data.
    pub fn named(name: &str) -> Result<Self, MockupError> {
        Self::load(&lab_data_dir().join("redfish-mockups").join(name))
    }

    /// Loads a mockup folder.
    pub fn load(dir: &Path) -> Result<Self, MockupError> {
        let root = if dir.join("redfish/v1/index.json").is_file() {
            dir.join("redfish/v1")
        } else if dir.join("index.json").is_file() {
            dir.to_path_buf()
        } else {
            return Err(MockupError::NotAMockup(dir.to_path_buf()));
        };
        let mut resources = BTreeMap::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|source| MockupError::Unreadable {
                path: d.clone(),
                source,
            })?;
            for e in entries {
                let e = e.map_err(|source| MockupError::Unreadable {
                    path: d.clone(),
                    source,
                })?;
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().is_some_and(|n| n == "index.json") {
                    let text =
                        std::fs::read_to_string(&p).map_err(|source| MockupError::Unreadable {
                            path: p.clone(),
                            source,
                        })?;
                    let v: Value =
                        serde_json::from_str(&text).map_err(|source| MockupError::NotJson {
                            path: p.clone(),
                            source,
                        })?;
                    let rel = d
                        .strip_prefix(&root)
                        .unwrap_or(Path::new(""))
                        .to_string_lossy()
                        .to_string();
                    let uri = if rel.is_empty() {
                        "/redfish/v1".to_string()
                    } else {
                        format!("/redfish/v1/{rel}")
                    };
                    resources.insert(uri, v);
                }
            }
        }
        // A collection member captured only inline (Supermicro's LogEntry collections carry
        // whole entries in Members, and the capture tool did not fetch them one by one) is
        // served at its own URI too, as the firmware does.
        let mut inline = Vec::new();
        for v in resources.values() {
            for m in v["Members"].as_array().into_iter().flatten() {
                if let (Some(id), Some(o)) = (m["@odata.id"].as_str(), m.as_object())
                    && o.len() > 1
                    && !resources.contains_key(normalize(id))
                {
                    inline.push((normalize(id).to_string(), m.clone()));
                }
            }
        }
        resources.extend(inline);
        // A capture whose own links name its resources in another case (iLO 5 links
        // `/redfish/v1/systems/1/bios` from `Systems/1`) comes from firmware that serves URIs
        // whatever their case: so does the lab, for that capture only.
        let mut all = Vec::new();
        resources.values().for_each(|v| links(v, &mut all));
        let lower: BTreeMap<String, String> = resources
            .keys()
            .map(|k| (k.to_lowercase(), k.clone()))
            .collect();
        let case_blind = all.iter().any(|l| {
            let l = normalize(l);
            !resources.contains_key(l) && lower.contains_key(&l.to_lowercase())
        });
        Ok(Self {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            resources,
            folded: case_blind.then_some(lower),
        })
    }

    /// The resource at `uri`.
    pub fn get(&self, uri: &str) -> Option<&Value> {
        let uri = normalize(uri);
        self.resources.get(uri).or_else(|| {
            let folded = self.folded.as_ref()?.get(&uri.to_lowercase())?;
            self.resources.get(folded)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tall_and_short_captures_load_under_the_same_uris() {
        let tall = Mockup::named("dell-poweredge-r750").unwrap();
        assert!(tall.get("/redfish/v1").is_some());
        assert!(tall.get("/redfish/v1/Systems/System.Embedded.1/").is_some());
        let short = Mockup::named("dmtf-public-rackmount1").unwrap();
        assert_eq!(
            short.get("/redfish/v1/Systems/437XR1138R2").unwrap()["Id"],
            "437XR1138R2"
        );
    }

    #[test]
    fn inline_members_are_served_and_case_is_folded_only_where_the_firmware_does() {
        // Supermicro: LogEntry members captured inline only.
        let smc = Mockup::named("supermicro-sys-821ge-tnhr").unwrap();
        let e = smc
            .get("/redfish/v1/Systems/1/LogServices/Log1/Entries/12")
            .expect("an inline-only member");
        assert_eq!(
            e["@odata.id"],
            "/redfish/v1/Systems/1/LogServices/Log1/Entries/12"
        );
        assert!(smc.get("/redfish/v1/systems/1").is_none(), "exact URIs");
        // iLO 5 links its Bios in lower case.
        let ilo = Mockup::named("hpe-proliant-dl385-gen10plus-v2").unwrap();
        assert_eq!(
            ilo.get("/redfish/v1/systems/1/bios").unwrap()["@odata.id"],
            ilo.get("/redfish/v1/Systems/1/Bios").unwrap()["@odata.id"]
        );
        let dmtf = Mockup::named("dmtf-public-rackmount1").unwrap();
        assert!(dmtf.get("/redfish/v1/systems/437XR1138R2").is_none());
    }

    #[test]
    fn a_folder_that_is_not_a_capture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Mockup::load(dir.path()),
            Err(MockupError::NotAMockup(_))
        ));
    }
}
