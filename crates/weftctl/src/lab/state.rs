//! What a lab made, kept in `<state-dir>/<lab>/state.json` so later commands (and `down` after
//! a crash) know it.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
pub struct LabState {
    pub backend: String,
    pub store: String,
    pub mode: String,
    pub subnets: u8,
    /// The cluster's pod CIDR the agents are given.
    #[serde(default)]
    pub cluster_cidr: Option<String>,
    /// The switch: one bridge per underlay subnet, no addresses.
    pub fabric_netns: String,
    /// The nodes' gateway, between the underlay subnets and to the outside; etcd runs here.
    /// Empty in a lab made before the router had a namespace of its own: see [`LabState::router`].
    #[serde(default)]
    pub router_netns: String,
    pub outside_netns: String,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub cni_bin_dir: PathBuf,
    pub weftd: PathBuf,
    /// The store URL the agents use.
    pub store_url: String,
    pub etcd_pid: Option<u32>,
    pub outside_responder_pid: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// The node's own directory: run/ (subnet.env), state/, ipam/, weft.conflist, weftd.log.
    pub dir: PathBuf,
    pub agent_pid: Option<u32>,
    pub responder_pid: Option<u32>,
}

#[derive(Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub responder_pid: Option<u32>,
    /// The pod's labels (its Pod object in the store carries them; Service selectors match them).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The CNI result of ADD, handed back as prevResult on DEL.
    pub result: serde_json::Value,
}

impl LabState {
    /// The router's namespace; the fabric's in a lab whose fabric was also the router.
    pub fn router(&self) -> &str {
        if self.router_netns.is_empty() {
            &self.fabric_netns
        } else {
            &self.router_netns
        }
    }

    pub fn load(path: &Path) -> Result<LabState, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Written whole, then renamed over the old file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable"))?;
        std::fs::rename(&tmp, path)
    }

    pub fn node(&self, name: &str) -> Result<&NodeState, String> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| format!("no node {name} in this lab"))
    }
}
