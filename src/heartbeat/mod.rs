//! Heartbeats: the in-band path. Each node's agent sends a signed UDP heartbeat every interval;
//! the appliance verifies it and tracks, per node, when it last heard from it, how many were lost,
//! their jitter, and reboots (a new incarnation).
//!
//! Overview: [`wire`] is the packet (pure), [`agent`] the sender (`vigil agent`), [`tracker`]
//! the per-node replay, reboot, loss and jitter state (pure), [`listener`] the appliance's socket.
//!
//! Scope: the in-band path only; what a missing heartbeat *means* is diagnosis's job, together
//! with the BMC's view.
//!
//! Key types: [`wire::Heartbeat`], [`agent::AgentConfig`].

pub mod agent;
pub mod listener;
pub mod tracker;
pub mod wire;
