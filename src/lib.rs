//! vigil: an out-of-band failover appliance for bare-metal clusters.
//!
//! A dedicated management box watches every server through its BMC (Redfish and IPMI) and a
//! heartbeat from its OS, tells a hardware fault from a software hang or a network isolation,
//! power-fences the dead node through its BMC and confirms it is off, then boots a matching
//! virtual node for it on a failover server. See README.md for the whole picture.
//!
//! # Layout
//!
//! - [`api`]: the status API, metrics and the operator page.
//! - [`model`]: shared domain types (BMC snapshots, hardware profiles).
//! - [`bmc`]: the BMC trait and the Redfish driver.
//! - [`diagnosis`]: pure: evidence and time in, verdict out.
//! - [`monitor`]: both paths to every machine, polled, listened to and judged.
//! - [`fencing`]: confirmed power-off with fallback methods, logged before every action.
//! - [`journal`]: the fencing log, append-only and hash-chained.
//! - [`config`]: the inventory and policy file, firmware profiles, secret references.
//! - [`heartbeat`]: the heartbeat packet and the node agent that sends it.
//! - [`placement`]: pure: which failover or backup server takes which failed node (N+m).
//! - [`virt`]: virtual nodes: the VM spec from a hardware profile, and the QEMU driver.
//! - [`supervisor`]: the per-node state machines and the rack's gate (pure).
//! - [`daemon`]: the I/O half: fence executor, failover and failback jobs, `vigil run`.
//! - [`telemetry`]: logging (stderr text or JSON, journald under systemd).
//! - [`cli`]: the command line.
//!
//! The modules still to come (BMC drivers, heartbeats, diagnosis, fencing, placement, virt,
//! journal, supervisor, api) are mapped in the README and built on these.

pub mod api;
pub mod bmc;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod diagnosis;
pub mod fencing;
pub mod heartbeat;
pub mod journal;
pub mod model;
pub mod monitor;
pub mod placement;
pub mod supervisor;
pub mod telemetry;
pub mod virt;
