//! weftd, the node agent: leases the node's pod subnet, connects the node to its peers with a
//! backend, and masquerades pod traffic that leaves the cluster.

pub mod backend;
pub mod config;
pub mod daemon;
mod http;
pub mod lease;
pub mod masq;
mod underlay;
