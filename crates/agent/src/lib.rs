//! weftd, the node agent: leases the node's pod subnet, connects the node to its peers with a
//! backend, masquerades pod traffic that leaves the cluster, and programs Services (kube-proxy's
//! job) into Weft's nft table.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod events;
mod http;
pub mod lease;
pub mod network;
mod services;
mod underlay;
