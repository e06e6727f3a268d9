//! Scenarios: a topology, a timeline of injections and repairs, and what must follow (verdicts
//! and outcome), in `hardware-lab/scenarios/*.toml`. They are data for end-to-end tests (vigil's
//! `tests/scenarios.rs` plays each one against `vigil run`) and for people (`vigil-lab scenarios`
//! checks and lists them; each file's comment says what it shows).
//!
//! A file:
//!
//! ```toml
//! name = "thermal-trip"                 # the file's stem
//! description = "the CPU overheats; the board cuts power"
//! topology = "rack4.toml"               # under hardware-lab/topologies/
//!
//! [[timeline]]
//! at = "0s"                             # after the rack is healthy
//! server = "batch1"
//! inject = { kind = "thermal-trip" }    # a fault as the control API takes it
//! # or: repair = true
//!
//! [[expect]]
//! node = "batch1"
//! verdict = "hardware-fault:thermal"    # as vigil names it; "healthy": no verdict change needed
//! within = "6s"                         # from the injection
//! outcome = "failover"                  # or "none": no fence and no failover for `hold`
//! hold = "5s"                           # (outcome none) how long nothing may happen
//! ```
//!
//! Key types: [`Scenario`], [`Step`], [`Expect`], [`Outcome`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::faults::Fault;
use crate::rack::Topology;

/// What must follow a scenario's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The node is fenced and its twin heartbeats (then the test fails it back).
    Failover,
    /// Neither a fence nor a failover.
    None,
}

/// One step of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When, from the start (a humantime duration: "0s", "1500ms").
    pub at: String,
    /// The server.
    pub server: String,
    /// A fault to inject.
    #[serde(default)]
    pub inject: Option<Fault>,
    /// End every fault of the server.
    #[serde(default)]
    pub repair: bool,
}

/// One expectation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The node.
    pub node: String,
    /// The verdict, as vigil names it (`hardware-fault:thermal`, `software-hang`, `degraded`,
    /// `bmc-lost`, ...); `healthy` when none is expected.
    pub verdict: String,
    /// How long the verdict may take, from the first injection.
    pub within: String,
    /// What follows.
    pub outcome: Outcome,
    /// (outcome none) how long after the verdict nothing may happen.
    #[serde(default)]
    pub hold: Option<String>,
}

/// A scenario file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (the file's stem).
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The topology file, under `hardware-lab/topologies/`.
    pub topology: String,
    /// The injections and repairs.
    pub timeline: Vec<Step>,
    /// What must follow.
    pub expect: Vec<Expect>,
}

fn duration(s: &str, what: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s).with_context(|| format!("{what}: \"{s}\" is not a duration"))
}

impl Step {
    /// `at` as a duration.
    pub fn at(&self) -> anyhow::Result<Duration> {
        duration(&self.at, "at")
    }
}

impl Expect {
    /// `within` as a duration.
    pub fn within(&self) -> anyhow::Result<Duration> {
        duration(&self.within, "within")
    }

    /// `hold` as a duration (zero when absent).
    pub fn hold(&self) -> anyhow::Result<Duration> {
        self.hold
            .as_deref()
            .map_or(Ok(Duration::ZERO), |h| duration(h, "hold"))
    }
}

/// The folder of the lab's scenarios.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

impl Scenario {
    /// Reads and checks a scenario file: its name, its topology, its servers and durations.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{} cannot be read", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if s.name != stem {
            bail!(
                "{}: name \"{}\" is not the file's stem",
                path.display(),
                s.name
            );
        }
        let topo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("topologies")
            .join(&s.topology);
        let t = Topology::load(&topo)
            .with_context(|| format!("{}: topology {}", path.display(), s.topology))?;
        let known = |n: &str| t.servers.iter().any(|x| x.name == n);
        if s.timeline.is_empty() || s.expect.is_empty() {
            bail!(
                "{}: a scenario needs a timeline and an expectation",
                path.display()
            );
        }
        for st in &s.timeline {
            st.at().with_context(|| path.display().to_string())?;
            if !known(&st.server) {
                bail!(
                    "{}: no server {} in {}",
                    path.display(),
                    st.server,
                    s.topology
                );
            }
            if st.inject.is_some() == st.repair {
                bail!(
                    "{}: a step either injects a fault or repairs (at {})",
                    path.display(),
                    st.at
                );
            }
        }
        for e in &s.expect {
            e.within().with_context(|| path.display().to_string())?;
            e.hold().with_context(|| path.display().to_string())?;
            if !known(&e.node) {
                bail!("{}: no server {} in {}", path.display(), e.node, s.topology);
            }
            if e.outcome == Outcome::None && e.hold.is_none() {
                bail!(
                    "{}: outcome none needs a hold (how long nothing may happen)",
                    path.display()
                );
            }
        }
        Ok(s)
    }

    /// Every scenario in [`dir`], sorted by name.
    pub fn all() -> anyhow::Result<Vec<Scenario>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Scenario::load(p)).collect()
    }

    /// The servers it touches.
    pub fn servers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .timeline
            .iter()
            .map(|s| s.server.clone())
            .chain(self.expect.iter().map(|e| e.node.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
