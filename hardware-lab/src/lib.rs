//! vigil's hardware lab: a simulated rack on one machine, for the demo, the tests and the
//! benchmarks. The appliance never links this crate; `vigil demo` runs the `vigil-lab` binary.
//!
//! # Layout
//!
//! - [`rack`]: a rack from a topology file; `endpoints.json` and a `vigil.toml` for it.
//! - [`server`]: one simulated server: power model, faults, SEL, the BMC's sessions and moods.
//! - [`power`]: the pure power and boot model (PoweringOff before Off, POST stages).
//! - [`redfish`]: the Redfish BMC (HTTPS, sessions, reset with the firmware's quirks).
//! - [`scale`]: scale mode: thousands of BMCs and heartbeat senders in one process.
//! - [`scenario`]: scenario files (timeline of faults, expected verdicts and outcome).
//! - [`conformance`]: corrections of the DMTF mockups' own authoring errors.
//! - [`mockup`]: real Redfish captures the BMCs are seeded from.
//! - [`os`]: the simulated OS: the real `vigil agent`, a heartbeat relay, the watchdog channel.
//! - [`ipmi`]: one real `ipmi_sim` per server, mirrored from the server; `ipmi-chassis`.
//! - [`ipmi_host`]: the host side of each `ipmi_sim`'s system interface (the in-band watchdog).
//! - [`faults`]: the faults the lab injects, one per row of the evidence matrix, and BMC moods.
//! - [`control`]: the control API and its client.
//! - [`tls`]: the lab CA and the BMCs' certificates.
//! - [`clock`]: the lab clock.

pub mod clock;
pub mod conformance;
pub mod control;
pub mod faults;
pub mod ipmi;
pub mod ipmi_host;
pub mod mockup;
pub mod os;
pub mod power;
pub mod rack;
pub mod redfish;
pub mod scale;
pub mod scenario;
pub mod server;
pub mod tls;
