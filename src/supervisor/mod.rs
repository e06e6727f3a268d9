//! The supervisor: the per-node state machines and the rack's gate. Pure: state, input and time
//! in; next state and actions out. The runtime that drives them is `daemon::run`.
//!
//! Key types: [`fsm::Node`], [`fsm::Rack`], [`fsm::Action`].

pub mod fsm;
