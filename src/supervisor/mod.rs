//! The supervisor: the per-node state machines and the loop that drives them.
//!
//! Overview: [`fsm`] is the pure part (phases, inputs, actions, the rack's gate). The runtime
//! (`vigil run`) feeds it the monitor's verdicts and the jobs' progress, and runs the actions it
//! returns: failover and failback jobs, with bounded concurrency and never two jobs per node.
//!
//! Key types: [`fsm::Node`], [`fsm::Rack`], [`fsm::Action`].

pub mod fsm;
pub mod jobs;
pub mod run;
