//! Virtual nodes: the failed node's twin, built from its hardware profile and run by a
//! hypervisor on a failover or backup server.
//!
//! Overview: [`spec`] turns a hardware profile into a VM spec with a fidelity report (pure);
//! [`Hypervisor`] is the one trait every driver implements (create, optionally paused so a
//! failover only has to resume it; start; status; graceful then forced stop; destroy; list);
//! [`qemu`] runs QEMU directly over QMP; [`libvirt`] renders the same spec as domain XML and
//! drives it through `virsh` with a connect URI per host.
//!
//! Scope: one VM at a time. Which host takes which node is `placement`; when, the supervisor's.
//!
//! Key types: [`Hypervisor`], [`VmState`], [`GuestIdentity`], [`VirtError`].

pub mod libvirt;
pub mod qemu;
pub mod qmp;
pub mod spec;

use std::time::Duration;

use serde::Serialize;

use crate::bmc::BoxFuture;
use crate::config::Secret;
use spec::VmSpec;

/// Writes the node's heartbeat key into a VM's folder, readable by its owner only: QEMU reads
/// it through fw_cfg (a file, so the key is never on a command line); the drivers remove it
/// once QEMU has.
pub(crate) fn write_key(dir: &std::path::Path, key: &Secret) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(dir.join("key"))?
        .write_all(key.expose().as_bytes())
}

/// A VM's state as the hypervisor reads it back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Running.
    Running,
    /// Created and paused (pre-created, or stopped by `stop` in QMP terms).
    Paused,
    /// Its process has exited.
    Stopped,
    /// Never created here, or destroyed.
    Absent,
    /// Something else QEMU reports (`shutdown`, `internal-error`, ...).
    Other(String),
}

/// What the guest must know to speak as the node: its name, the epoch, where the appliance
/// listens, and the node's heartbeat key (passed out of band, never on a command line).
#[derive(Debug, Clone)]
pub struct GuestIdentity {
    /// The appliance's heartbeat address as the guest reaches it.
    pub appliance: String,
    /// The node's heartbeat key.
    pub key: Secret,
}

/// Why a hypervisor action failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtError {
    /// A VM of that name already runs (never two twins for one node).
    #[error("virtual node {0} already exists and runs")]
    Exists(String),
    /// A file of the VM could not be written.
    #[error("virtual node {vm}: cannot {what}: {reason}")]
    Io {
        /// The VM.
        vm: String,
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// QEMU could not be started.
    #[error("virtual node {vm}: QEMU cannot be started: {reason}")]
    Spawn {
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// QEMU refused the spec.
    #[error("virtual node {vm}: {reason}")]
    Refused {
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// QMP failed.
    #[error("virtual node {vm}: {reason}")]
    Qmp {
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// It would not stop.
    #[error("virtual node {vm} did not stop (still {state})")]
    NotStopped {
        /// The VM.
        vm: String,
        /// Its state.
        state: String,
    },
}

/// A hypervisor on one host.
pub trait Hypervisor: Send + Sync {
    /// `qemu` or `libvirt`.
    fn kind(&self) -> &'static str;
    /// Creates (and starts, unless `paused`) a VM; returns its state read back.
    fn create(
        &self,
        spec: &VmSpec,
        id: &GuestIdentity,
        paused: bool,
    ) -> BoxFuture<'_, Result<VmState, VirtError>>;
    /// Resumes a paused VM; returns its state read back.
    fn start(&self, name: &str) -> BoxFuture<'_, Result<VmState, VirtError>>;
    /// Reads a VM's state.
    fn status(&self, name: &str) -> BoxFuture<'_, VmState>;
    /// Stops a VM: graceful (ACPI power button) for `grace`, then forced; confirmed stopped.
    fn stop(&self, name: &str, grace: Duration) -> BoxFuture<'_, Result<(), VirtError>>;
    /// Stops (forced if need be) and removes a VM.
    fn destroy(&self, name: &str) -> BoxFuture<'_, Result<(), VirtError>>;
    /// Every VM this driver knows, with its state.
    fn list(&self) -> BoxFuture<'_, Vec<(String, VmState)>>;
    /// The same, or an error when the hypervisor cannot be read at all (a remote host that
    /// does not answer): "no VMs" and "cannot tell" are not the same answer when a second twin
    /// would start on the strength of it.
    fn list_checked(&self) -> BoxFuture<'_, Result<Vec<(String, VmState)>, VirtError>> {
        Box::pin(async move { Ok(self.list().await) })
    }
    /// What the driver had to give up at create beyond the spec's fidelity report (libvirt:
    /// CPU features its CPU map requires that the host cannot give), for the fencing log.
    fn adjustments(&self, _name: &str) -> Vec<String> {
        Vec::new()
    }
}
