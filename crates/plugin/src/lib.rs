//! The Weft CNI plugin: gives a pod an address from the node's subnet and wires it to the node,
//! in bridge or routed mode. The binary `weft` is a thin shell around `commands::run`.

pub mod commands;
pub mod config;
pub mod names;
pub mod reap;
pub mod subnet_env;
pub mod wiring;
