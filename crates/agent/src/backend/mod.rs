//! Backends: how this node reaches the pod subnets of its peers, computed as data from the leases
//! (`plan`), then reconciled into the kernel (`reconcile`).
//!
//! - host-gw: a route to each peer subnet via the peer's underlay IP (L2-adjacent peers only).
//! - vxlan: one device `weft.vxlan`; per peer an onlink route via the peer's VTEP address, a
//!   permanent neighbour (VTEP IP → VTEP MAC) and a permanent FDB entry (VTEP MAC → underlay IP).
//! - directrouting: host-gw for peers on the underlay subnet, vxlan for the rest.

pub mod reconcile;

use crate::lease::{Lease, VxlanSettings};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

pub const VXLAN_DEVICE: &str = "weft.vxlan";
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[serde(rename = "host-gw")]
    HostGw,
    Vxlan,
    #[serde(rename = "directrouting")]
    DirectRouting,
}

impl BackendKind {
    /// The value of a `--backend` flag; the error names the flag and the value.
    pub fn parse(s: &str) -> Result<BackendKind, String> {
        match s {
            "host-gw" => Ok(BackendKind::HostGw),
            "vxlan" => Ok(BackendKind::Vxlan),
            "directrouting" => Ok(BackendKind::DirectRouting),
            _ => Err(format!(
                "--backend: {s:?} is not one of host-gw, vxlan, directrouting"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::HostGw => "host-gw",
            BackendKind::Vxlan => "vxlan",
            BackendKind::DirectRouting => "directrouting",
        }
    }

    pub fn uses_vxlan(self) -> bool {
        self != BackendKind::HostGw
    }

    /// The pod MTU for an underlay MTU: encapsulating backends lose the VXLAN overhead (direct
    /// routing too, since some of its peers are reached through VXLAN).
    pub fn pod_mtu(self, underlay_mtu: u32) -> u32 {
        if self.uses_vxlan() {
            underlay_mtu - VXLAN_OVERHEAD
        } else {
            underlay_mtu
        }
    }
}

/// The node's underlay: the interface its peers reach it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The connected subnet of `ip` on the interface: peers inside it are L2-adjacent.
    pub net: Ipv4Net,
    pub mtu: u32,
}

/// A node's VTEP: the subnet's network address (as /32 on `weft.vxlan`) and a MAC derived
/// from it, so a restarted agent keeps the same MAC and peers' FDB entries stay right.
pub fn vtep_ip(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

pub fn vtep_mac(subnet: Ipv4Net) -> [u8; 6] {
    let o = vtep_ip(subnet).octets();
    // Locally administered unicast (0x0a), the prefix the plugin uses for pod MACs; no pod ever
    // has the subnet's network address, so this cannot collide with one.
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// Directly over the underlay, to the peer's underlay IP.
    Underlay,
    /// Through `weft.vxlan`, to the peer's VTEP address (onlink).
    Vxlan,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerRoute {
    /// The peer node whose pods the route reaches.
    pub peer: String,
    pub dst: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub via: Via,
}

/// Everything the backend wants in the kernel, for the current peer set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub routes: Vec<PeerRoute>,
    /// Present when some peer (or the backend itself) needs VXLAN.
    pub vxlan: Option<VxlanPlan>,
    /// Permanent neighbours on the VXLAN device: VTEP IP → VTEP MAC.
    pub neighbours: Vec<(Ipv4Addr, [u8; 6])>,
    /// Permanent FDB entries on the VXLAN device: VTEP MAC → peer underlay IP.
    pub fdb: Vec<([u8; 6], Ipv4Addr)>,
    /// Peers that cannot be reached with this backend: logged, counted and published as events.
    pub problems: Vec<Problem>,
}

/// Why a peer's pods are not reachable from this node. Published as a Kubernetes Warning event
/// (events.rs) while it lasts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The peer node it concerns.
    pub peer: String,
    pub reason: Reason,
    /// The whole story, for an operator: what, why, and what to do.
    pub message: String,
}

/// A problem's kind, as a Kubernetes event reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// host-gw, and the peer is not on the underlay subnet.
    PeerNotOnLink,
    /// The peer's lease is outside the cluster CIDR or overlaps this node's subnet.
    PeerSubnetMismatch,
    /// The peer runs another backend.
    PeerBackendMismatch,
    /// The peer tunnels with another VNI or port.
    PeerVxlanMismatch,
    /// A route that is not Weft's holds the peer subnet's destination.
    RouteConflict,
    /// Another agent holds this node's lease record under the same node name.
    NodeNameTaken,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PeerNotOnLink => "PeerNotOnLink",
            Reason::PeerSubnetMismatch => "PeerSubnetMismatch",
            Reason::PeerBackendMismatch => "PeerBackendMismatch",
            Reason::PeerVxlanMismatch => "PeerVxlanMismatch",
            Reason::RouteConflict => "RouteConflict",
            Reason::NodeNameTaken => "NodeNameTaken",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPlan {
    pub mac: [u8; 6],
    pub address: Ipv4Net,
    pub mtu: u32,
    /// VNI and UDP port: the local lease's, else `VXLAN_VNI` and `VXLAN_PORT`. Every node of a
    /// cluster must use the same.
    pub vni: u32,
    pub port: u16,
}

/// How a peer's lease differs from this node's backend and tunnel settings, each as a reason and
/// "node N runs backend B (this node: C)". The plan reports these per peer; the cluster check
/// (network.rs) refuses to start on them before the cluster has a settings record.
pub fn setting_differences(
    backend: BackendKind,
    vxlan: Option<VxlanSettings>,
    peer: &Lease,
) -> Vec<(Reason, String)> {
    let mut d = Vec::new();
    if peer.backend != backend {
        d.push((
            Reason::PeerBackendMismatch,
            format!(
                "node {} runs backend {} (this node: {})",
                peer.node,
                peer.backend.as_str(),
                backend.as_str()
            ),
        ));
    }
    if let (Some(ours), Some(theirs)) = (vxlan, peer.vxlan) {
        if ours != theirs {
            d.push((
                Reason::PeerVxlanMismatch,
                format!(
                    "node {} tunnels with VNI {} on UDP {} (this node: VNI {} on UDP {})",
                    peer.node, theirs.vni, theirs.port, ours.vni, ours.port
                ),
            ));
        }
    }
    d
}

/// The desired datapath for `local` given its peers. Pure: tested without a kernel.
pub fn plan(
    kind: BackendKind,
    cluster: Ipv4Net,
    local: &Lease,
    underlay: &Underlay,
    peers: &[Lease],
) -> Plan {
    let mut p = Plan::default();
    if kind.uses_vxlan() {
        p.vxlan = Some(VxlanPlan {
            mac: vtep_mac(local.subnet),
            address: Ipv4Net::new(vtep_ip(local.subnet), 32).expect("/32"),
            mtu: underlay.mtu - VXLAN_OVERHEAD,
            vni: local.vxlan.unwrap_or_default().vni,
            port: local.vxlan.unwrap_or_default().port,
        });
    }
    let mut reachable: Vec<&Lease> = Vec::new();
    for l in peers.iter().filter(|l| l.node != local.node) {
        // A lease outside the cluster CIDR, or overlapping this node's subnet, is a configuration
        // mismatch: routing it would fight the node's own pods (or never be cleaned up, since the
        // reconciler owns only routes inside the cluster CIDR).
        if !cluster.contains(&l.subnet)
            || l.subnet.contains(&local.subnet)
            || local.subnet.contains(&l.subnet)
        {
            p.problems.push(Problem {
                peer: l.node.clone(),
                reason: Reason::PeerSubnetMismatch,
                message: format!(
                    "peer {} leases {}, which is outside the cluster CIDR {cluster} or overlaps \
                     this node's {}: ignored",
                    l.node, l.subnet, local.subnet
                ),
            });
            continue;
        }
        reachable.push(l);
    }
    let mut peers = reachable;
    peers.sort_by_key(|l| l.subnet);
    for peer in peers {
        // Programmed all the same (the routes are right for this node's side), but said: the
        // peer's side is not what this node expects.
        for (reason, what) in setting_differences(local.backend, local.vxlan, peer) {
            p.problems.push(Problem {
                peer: peer.node.clone(),
                reason,
                message: format!(
                    "{what}: traffic between them can be lost; every node of a cluster needs \
                     the same --backend, --vxlan-vni and --vxlan-port"
                ),
            });
        }
        let adjacent = underlay.net.contains(&peer.underlay_ip);
        let via = match kind {
            BackendKind::HostGw if adjacent => Via::Underlay,
            BackendKind::HostGw => {
                p.problems.push(Problem {
                    peer: peer.node.clone(),
                    reason: Reason::PeerNotOnLink,
                    message: format!(
                        "peer {} ({}) is not on the underlay subnet {} of {}: host-gw cannot \
                         reach its pods {}; use the vxlan or directrouting backend",
                        peer.node, peer.underlay_ip, underlay.net, underlay.name, peer.subnet
                    ),
                });
                continue;
            }
            BackendKind::DirectRouting if adjacent => Via::Underlay,
            BackendKind::Vxlan | BackendKind::DirectRouting => Via::Vxlan,
        };
        match via {
            Via::Underlay => p.routes.push(PeerRoute {
                peer: peer.node.clone(),
                dst: peer.subnet,
                gateway: peer.underlay_ip,
                via,
            }),
            Via::Vxlan => {
                let mac = vtep_mac(peer.subnet);
                p.routes.push(PeerRoute {
                    peer: peer.node.clone(),
                    dst: peer.subnet,
                    gateway: vtep_ip(peer.subnet),
                    via,
                });
                p.neighbours.push((vtep_ip(peer.subnet), mac));
                p.fdb.push((mac, peer.underlay_ip));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, subnet: &str, ip: &str) -> Lease {
        Lease {
            node: node.into(),
            subnet: subnet.parse().unwrap(),
            underlay_ip: ip.parse().unwrap(),
            backend: BackendKind::Vxlan,
            vtep_mac: None,
            vxlan: None,
        }
    }

    fn cidr() -> Ipv4Net {
        "10.244.0.0/16".parse().unwrap()
    }

    #[test]
    fn leases_outside_the_cluster_or_overlapping_are_ignored() {
        let local = lease("node1", "10.244.1.0/24", "10.100.0.1");
        let peers = vec![
            lease("stray", "10.9.0.0/24", "10.100.0.5"),
            lease("overlap", "10.244.1.0/25", "10.100.0.6"),
            lease("node2", "10.244.2.0/24", "10.100.0.2"),
        ];
        let p = plan(BackendKind::HostGw, cidr(), &local, &underlay(), &peers);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
        assert_eq!(
            (p.problems[0].peer.as_str(), p.problems[0].reason),
            ("stray", Reason::PeerSubnetMismatch)
        );
        assert!(p.problems[1].message.contains("overlap"));
    }

    fn underlay() -> Underlay {
        Underlay {
            index: 2,
            name: "eth0".into(),
            ip: "10.100.0.1".parse().unwrap(),
            net: "10.100.0.0/24".parse().unwrap(),
            mtu: 1500,
        }
    }

    fn peers() -> Vec<Lease> {
        vec![
            lease("node1", "10.244.1.0/24", "10.100.0.1"),
            lease("node3", "10.244.3.0/24", "10.101.0.3"),
            lease("node2", "10.244.2.0/24", "10.100.0.2"),
        ]
    }

    #[test]
    fn host_gw_routes_adjacent_peers_and_names_the_rest() {
        let local = lease("node1", "10.244.1.0/24", "10.100.0.1");
        let p = plan(BackendKind::HostGw, cidr(), &local, &underlay(), &peers());
        assert_eq!(
            p.routes,
            vec![PeerRoute {
                peer: "node2".into(),
                dst: "10.244.2.0/24".parse().unwrap(),
                gateway: "10.100.0.2".parse().unwrap(),
                via: Via::Underlay
            }]
        );
        assert!(p.vxlan.is_none() && p.fdb.is_empty());
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].reason, Reason::PeerNotOnLink);
        assert!(
            p.problems[0].message.contains("node3") && p.problems[0].message.contains("10.101.0.3")
        );
    }

    #[test]
    fn vxlan_programs_route_neighbour_and_fdb_per_peer() {
        let local = lease("node1", "10.244.1.0/24", "10.100.0.1");
        let p = plan(BackendKind::Vxlan, cidr(), &local, &underlay(), &peers());
        let v = p.vxlan.as_ref().unwrap();
        assert_eq!(v.address.to_string(), "10.244.1.0/32");
        assert_eq!(v.mtu, 1450);
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[0].gateway.to_string(), "10.244.2.0");
        assert_eq!(p.routes[0].via, Via::Vxlan);
        assert_eq!(
            p.neighbours[0],
            ("10.244.2.0".parse().unwrap(), [0x0a, 0x58, 10, 244, 2, 0])
        );
        assert_eq!(
            p.fdb[1],
            ([0x0a, 0x58, 10, 244, 3, 0], "10.101.0.3".parse().unwrap())
        );
        assert!(p.problems.is_empty());
    }

    #[test]
    fn peers_on_another_backend_or_tunnel_are_reported_and_still_routed() {
        let mut local = lease("node1", "10.244.1.0/24", "10.100.0.1");
        local.vxlan = Some(crate::lease::VxlanSettings { vni: 1, port: 4789 });
        let mut hostgw = lease("node2", "10.244.2.0/24", "10.100.0.2");
        hostgw.backend = BackendKind::HostGw;
        let mut other_port = lease("node3", "10.244.3.0/24", "10.100.0.3");
        other_port.vxlan = Some(crate::lease::VxlanSettings { vni: 1, port: 8472 });
        let same = {
            let mut l = lease("node4", "10.244.4.0/24", "10.100.0.4");
            l.vxlan = local.vxlan;
            l
        };
        let peers = [local.clone(), hostgw, other_port, same];
        let p = plan(BackendKind::Vxlan, cidr(), &local, &underlay(), &peers);
        assert_eq!(p.routes.len(), 3);
        let reasons: Vec<_> = p
            .problems
            .iter()
            .map(|p| (p.peer.as_str(), p.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("node2", Reason::PeerBackendMismatch),
                ("node3", Reason::PeerVxlanMismatch)
            ]
        );
        assert!(p.problems[1].message.contains("8472"), "{}", p.problems[1]);
    }

    #[test]
    fn directrouting_mixes() {
        let local = lease("node1", "10.244.1.0/24", "10.100.0.1");
        let p = plan(
            BackendKind::DirectRouting,
            cidr(),
            &local,
            &underlay(),
            &peers(),
        );
        let vias: Vec<_> = p
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.via))
            .collect();
        assert_eq!(
            vias,
            vec![
                ("10.244.2.0/24".into(), Via::Underlay),
                ("10.244.3.0/24".into(), Via::Vxlan)
            ]
        );
        assert_eq!(p.fdb.len(), 1);
    }
}
