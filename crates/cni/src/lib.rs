//! The CNI specification layer: what a plugin reads (environment, network configuration), what it
//! writes (results per spec version, errors), and the runtime side that executes plugins.
//!
//! Spec references are to containernetworking/cni SPEC.md, version 1.1.0.

pub mod conf;
pub mod env;
pub mod error;
pub mod exec;
pub mod result;
pub mod version;

pub use conf::{parse_conf, Attachment, NetConf, RuntimeConfig};
pub use env::{Command, Env};
pub use error::{code, CniError};
pub use exec::{ConfList, Invoker, RuntimeConf};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{LATEST_VERSION, SUPPORTED_VERSIONS};
