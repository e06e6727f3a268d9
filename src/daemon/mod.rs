//! The daemon's I/O half: the fence executor, the failover and failback jobs, and `vigil run`
//! (the runtime that wires the monitor, the state machines, the jobs and the API together).
//!
//! Overview: everything here reads clocks, sockets and processes; the decisions it carries out
//! come from the pure modules (`diagnosis`, `fencing`'s rules, `placement`, `supervisor::fsm`).
//!
//! Key types: [`run::run`], [`jobs::failover`], [`jobs::failback`], [`fence::fence`].

pub mod fence;
pub mod jobs;
pub mod run;
