//! Subnet leases: the record a node keeps in the store while it owns a pod subnet.

use crate::backend::BackendKind;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Stored as JSON under `/weft/leases/<subnet with '/' as '-'>` (docs/store.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub node: String,
    pub subnet: Ipv4Net,
    pub underlay_ip: Ipv4Addr,
    pub backend: BackendKind,
    /// Informational: VTEP MACs are derived from the subnet (`backend::vtep_mac`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// The node's tunnel settings, for backends that use VXLAN: a peer on other settings is
    /// reported, since the two cannot reach each other through the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanSettings {
    pub vni: u32,
    pub port: u16,
}

impl Default for VxlanSettings {
    /// VNI 1 on UDP 4789 (`backend::VXLAN_VNI`, `backend::VXLAN_PORT`).
    fn default() -> VxlanSettings {
        VxlanSettings {
            vni: crate::backend::VXLAN_VNI,
            port: crate::backend::VXLAN_PORT,
        }
    }
}

impl VxlanSettings {
    /// What makes these unusable, each named as its flag with the value: a VNI over 24 bits
    /// (or 0), port 0.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=0xff_ffff).contains(&self.vni) {
            p.push(format!("--vxlan-vni {} is not in 1..16777215", self.vni));
        }
        if self.port == 0 {
            p.push("--vxlan-port 0 is not a port".into());
        }
        p
    }
}

pub const LEASE_PREFIX: &str = "/weft/leases/";

pub fn lease_key(subnet: Ipv4Net) -> String {
    format!("{LEASE_PREFIX}{}-{}", subnet.network(), subnet.prefix_len())
}

/// Every lease record in the store, with its key and revision; records that do not parse are
/// left out.
pub async fn leases<S: weft_store::Store>(
    store: &S,
) -> Result<Vec<(weft_store::KeyValue, Lease)>, weft_store::Error> {
    let (kvs, _) = store.list(LEASE_PREFIX).await?;
    Ok(kvs
        .into_iter()
        .filter_map(|kv| {
            let l = serde_json::from_slice(&kv.value).ok()?;
            Some((kv, l))
        })
        .collect())
}

/// The node subnets of `cluster`, in order. A node's own previous subnet is tried first (it gets
/// it back after a restart); then the rest, starting at an offset from the node name so that
/// nodes starting together do not all race for the first one.
pub fn candidates(
    cluster: Ipv4Net,
    subnet_len: u8,
    node: &str,
    previous: Option<Ipv4Net>,
) -> Vec<Ipv4Net> {
    let all: Vec<Ipv4Net> = cluster
        .subnets(subnet_len)
        .map(|s| s.collect())
        .unwrap_or_default();
    if all.is_empty() {
        return all;
    }
    let offset = weft_plugin::names::fnv1a(node.bytes()) as usize % all.len();
    let mut out: Vec<Ipv4Net> = previous.filter(|p| all.contains(p)).into_iter().collect();
    out.extend(
        all[offset..]
            .iter()
            .chain(&all[..offset])
            .filter(|s| Some(**s) != previous),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_json() {
        let l = Lease {
            node: "n1".into(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            underlay_ip: "10.100.0.1".parse().unwrap(),
            backend: BackendKind::HostGw,
            vtep_mac: None,
            vxlan: None,
        };
        assert_eq!(lease_key(l.subnet), "/weft/leases/10.244.3.0-24");
        let j = serde_json::to_value(&l).unwrap();
        assert_eq!(j["backend"], "host-gw");
        assert_eq!(j["underlayIp"], "10.100.0.1");
        assert_eq!(serde_json::from_value::<Lease>(j).unwrap(), l);
    }

    #[test]
    fn candidates_prefer_previous_and_cover_all() {
        let cluster: Ipv4Net = "10.244.0.0/22".parse().unwrap();
        let prev: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let c = candidates(cluster, 24, "node-a", Some(prev));
        assert_eq!(c[0], prev);
        assert_eq!(c.len(), 4);
        let mut sorted = c.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
        // A previous subnet outside the cluster CIDR is ignored.
        let c = candidates(cluster, 24, "node-a", Some("10.9.0.0/24".parse().unwrap()));
        assert_eq!(c.len(), 4);
        assert!(
            candidates(cluster, 21, "x", None).is_empty(),
            "subnet longer than cluster"
        );
    }
}
