//! What a lab made, kept in `<state-dir>/<lab>/state.json` so later commands (and `down` after
//! a crash) know it.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
pub struct LabState {
    pub node: NodeState,
    pub pods: Vec<PodState>,
    pub cni_bin_dir: PathBuf,
    pub conflist: PathBuf,
}

#[derive(Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub subnet: ipnet::Ipv4Net,
    pub mode: String,
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
    /// The CNI result of ADD, handed back as prevResult on DEL.
    pub result: serde_json::Value,
}

impl LabState {
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
}
