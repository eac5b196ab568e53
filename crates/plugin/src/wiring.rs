//! How a pod is wired to its node, as data first (`PodPlan`), then applied to the kernel or
//! verified against it. Both modes share one plan shape; they differ only in its contents.

use crate::config::Mode;
use crate::names;
use ipnet::Ipv4Net;
use std::net::{IpAddr, Ipv4Addr};
use weft_net::{sysctl, Netlink, Netns, RouteSpec, VethSpec, ROUTE_PROTOCOL};

#[derive(Debug, Clone, PartialEq)]
pub struct BridgePlan {
    pub name: String,
    pub mac: [u8; 6],
    /// The gateway address with the subnet's prefix (its connected route reaches the pods).
    pub address: Ipv4Net,
    pub hairpin: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    pub host_veth: String,
    pub host_mac: Option<[u8; 6]>,
    pub alias: String,
    pub ifname: String,
    pub pod_mac: [u8; 6],
    pub mtu: u32,
    pub bridge: Option<BridgePlan>,
    /// The pod's address: IP/prefix on a bridge, IP/32 when routed.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Routes inside the pod (oif filled in with the pod interface when applied).
    pub pod_routes: Vec<RouteSpec>,
    pub pod_neighbours: Vec<(Ipv4Addr, [u8; 6])>,
    /// Routes on the host through the host veth (oif filled in when applied).
    pub host_routes: Vec<RouteSpec>,
    /// Per-interface IPv4 sysctls on the host veth.
    pub host_veth_conf: Vec<(&'static str, &'static str)>,
}

pub struct PodIdentity<'a> {
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
}

/// The bridge's MAC, derived from the gateway address like the pods' MACs.
fn bridge_mac(gateway: Ipv4Addr) -> [u8; 6] {
    names::pod_mac(gateway)
}

fn default_route(gateway: Ipv4Addr, onlink: bool) -> RouteSpec {
    RouteSpec {
        dst: Ipv4Net::default(),
        gateway: Some(gateway),
        oif: None,
        scope_link: false,
        onlink,
        protocol: ROUTE_PROTOCOL,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn plan(
    id: &PodIdentity,
    mode: Mode,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    ip: Ipv4Addr,
    mtu: u32,
    bridge_name: &str,
    hairpin: bool,
) -> PodPlan {
    let base = PodPlan {
        host_veth: names::host_veth(id.container_id, id.ifname),
        host_mac: None,
        alias: names::veth_alias(id.network, id.container_id, id.ifname),
        ifname: id.ifname.to_string(),
        pod_mac: names::pod_mac(ip),
        mtu,
        bridge: None,
        address: Ipv4Net::new(ip, subnet.prefix_len()).expect("prefix from a valid subnet"),
        gateway,
        pod_routes: vec![default_route(gateway, false)],
        pod_neighbours: Vec::new(),
        host_routes: Vec::new(),
        host_veth_conf: Vec::new(),
    };
    match mode {
        Mode::Bridge => PodPlan {
            bridge: Some(BridgePlan {
                name: bridge_name.to_string(),
                mac: bridge_mac(gateway),
                address: Ipv4Net::new(gateway, subnet.prefix_len()).expect("valid prefix"),
                hairpin,
            }),
            ..base
        },
        Mode::Routed => PodPlan {
            host_mac: Some(names::ROUTED_HOST_MAC),
            address: Ipv4Net::new(ip, 32).expect("/32"),
            gateway: names::ROUTED_GATEWAY,
            pod_routes: vec![default_route(names::ROUTED_GATEWAY, true)],
            pod_neighbours: vec![(names::ROUTED_GATEWAY, names::ROUTED_HOST_MAC)],
            host_routes: vec![RouteSpec {
                dst: Ipv4Net::new(ip, 32).expect("/32"),
                gateway: None,
                oif: None,
                scope_link: true,
                onlink: false,
                protocol: ROUTE_PROTOCOL,
            }],
            // proxy_arp answers the pod's ARP for anything (the neighbour entry already covers
            // the gateway); forwarding lets the host route what the pod sends.
            host_veth_conf: vec![("proxy_arp", "1"), ("forwarding", "1")],
            ..base
        },
    }
}

pub type Result<T> = std::result::Result<T, weft_net::Error>;

/// Creates (or finds) the bridge with its gateway address, and returns its index.
async fn ensure_bridge(host: &Netlink, b: &BridgePlan) -> Result<u32> {
    host.add_bridge(&b.name, b.mac).await?;
    let link = host
        .link(&b.name)
        .await?
        .ok_or_else(|| weft_net::Error::Io {
            op: format!("looking up bridge {}", b.name),
            source: std::io::Error::other("it vanished right after creation"),
        })?;
    if link.kind.as_deref() != Some("bridge") {
        return Err(weft_net::Error::Io {
            op: format!("bridge: using {:?} as the pod bridge", b.name),
            source: std::io::Error::other(format!(
                "it exists but is a {} device, not a bridge",
                link.kind.as_deref().unwrap_or("physical")
            )),
        });
    }
    if !link.up {
        host.set_up(link.index, &b.name).await?;
    }
    // Services between pods of this bridge (a bridge made by an earlier build lacks it).
    if link.bridge_nf_call_iptables == Some(false) {
        host.set_bridge_nf_call_iptables(&b.name, true).await?;
    }
    host.add_address(link.index, &b.name, b.address.into())
        .await?;
    // Pods' traffic to other nodes and the outside is routed by the host from this bridge.
    sysctl::set_ipv4_conf(&b.name, "forwarding", "1")?;
    Ok(link.index)
}

/// Wires the pod. On error the caller deletes the host veth, which takes everything else with it.
pub async fn apply(p: &PodPlan, host: &Netlink, pod: &Netlink, pod_ns: &Netns) -> Result<Applied> {
    // IPv4 forwards by the *input* device's setting, and replies to pods come in on the node's
    // uplink: a pod network needs forwarding on everywhere, as the reference bridge plugin's
    // isGateway sets it (and as every Kubernetes node has it).
    sysctl::set("net.ipv4.ip_forward", "1")?;
    let controller = match &p.bridge {
        Some(b) => Some(ensure_bridge(host, b).await?),
        None => None,
    };
    // A veth left by an earlier ADD of the same attachment is replaced, not reused: its pod end
    // may be in a namespace that no longer exists.
    host.del_link(&p.host_veth).await?;
    host.add_veth(&VethSpec {
        name: &p.host_veth,
        mac: p.host_mac,
        alias: Some(&p.alias),
        controller,
        peer_name: &p.ifname,
        peer_mac: Some(p.pod_mac),
        peer_netns: pod_ns,
        mtu: Some(p.mtu),
    })
    .await?;
    fault_point("after-veth")?;
    let hv = host
        .link(&p.host_veth)
        .await?
        .ok_or_else(|| weft_net::Error::Io {
            op: format!("looking up {}", p.host_veth),
            source: std::io::Error::other("created but not found"),
        })?;
    if let Some(b) = &p.bridge {
        if b.hairpin {
            host.set_hairpin(hv.index, &p.host_veth, true).await?;
        }
    }
    for (key, value) in &p.host_veth_conf {
        sysctl::set_ipv4_conf(&p.host_veth, key, value)?;
    }
    for r in &p.host_routes {
        host.replace_route(&RouteSpec {
            oif: Some(hv.index),
            ..r.clone()
        })
        .await?;
    }

    let pl = pod
        .link(&p.ifname)
        .await?
        .ok_or_else(|| weft_net::Error::Io {
            op: format!("looking up {} in {}", p.ifname, pod_ns.path().display()),
            source: std::io::Error::other("created but not found"),
        })?;
    pod.add_address(pl.index, &p.ifname, p.address.into())
        .await?;
    pod.set_up(pl.index, &p.ifname).await?;
    fault_point("after-pod-address")?;
    for (ip, mac) in &p.pod_neighbours {
        pod.replace_neighbour(pl.index, IpAddr::V4(*ip), *mac)
            .await?;
    }
    // A default route the pod already has (another attachment's) is left alone, and then not
    // reported in the result either.
    let mut installed = Vec::new();
    for r in &p.pod_routes {
        let with_oif = RouteSpec {
            oif: Some(pl.index),
            ..r.clone()
        };
        if pod.add_route(&with_oif).await? {
            installed.push(r.clone());
        }
    }
    Ok(Applied {
        host_mac: hv.mac,
        pod_routes: installed,
    })
}

/// What `apply` made that the result reports.
pub struct Applied {
    pub host_mac: Option<[u8; 6]>,
    pub pod_routes: Vec<RouteSpec>,
}

/// Test builds fail here on request (`WEFT_FAULT=<point>`), so the tests can prove that a
/// failure half way through ADD leaves nothing behind. Release builds have no such hook.
fn fault_point(point: &str) -> Result<()> {
    if cfg!(debug_assertions) && std::env::var("WEFT_FAULT").is_ok_and(|f| f == point) {
        return Err(weft_net::Error::Io {
            op: format!("fault injected at {point}"),
            source: std::io::Error::other("WEFT_FAULT"),
        });
    }
    Ok(())
}

/// What CHECK found wrong, in words an operator can act on; empty means the pod is wired as
/// planned. The MTU is checked when the previous result recorded one: `mtu` is (the recorded
/// one, the node's current one), and either will do, the same on both ends.
pub async fn verify(
    p: &PodPlan,
    host: &Netlink,
    pod: &Netlink,
    mtu: Option<(u32, Option<u32>)>,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let Some(hv) = host.link(&p.host_veth).await? else {
        problems.push(format!("host veth {} is missing", p.host_veth));
        return Ok(problems);
    };
    if !hv.up {
        problems.push(format!("host veth {} is down", p.host_veth));
    }
    // The alias is what GC and the agent know the veth by.
    if hv.alias.as_deref() != Some(p.alias.as_str()) {
        problems.push(format!(
            "host veth {} has alias {:?} instead of {:?}",
            p.host_veth,
            hv.alias.as_deref().unwrap_or(""),
            p.alias
        ));
    }
    if let Some(b) = &p.bridge {
        match host.link(&b.name).await? {
            None => problems.push(format!("bridge {} is missing", b.name)),
            Some(bl) => {
                if hv.controller != Some(bl.index) {
                    problems.push(format!(
                        "host veth {} is not a port of {}",
                        p.host_veth, b.name
                    ));
                }
                if !host.addresses(bl.index).await?.contains(&b.address.into()) {
                    problems.push(format!(
                        "bridge {} lacks gateway address {}",
                        b.name, b.address
                    ));
                }
            }
        }
    }
    if !p.host_routes.is_empty() {
        let routes = host.routes().await?;
        for r in &p.host_routes {
            if !routes
                .iter()
                .any(|x| x.dst == r.dst && x.oif == Some(hv.index))
            {
                problems.push(format!(
                    "host route {} dev {} is missing",
                    r.dst, p.host_veth
                ));
            }
        }
    }
    let Some(pl) = pod.link(&p.ifname).await? else {
        problems.push(format!("pod interface {} is missing", p.ifname));
        return Ok(problems);
    };
    if !pl.up {
        problems.push(format!("pod interface {} is down", p.ifname));
    }
    if pl.mac != Some(p.pod_mac) {
        problems.push(format!(
            "pod interface {} has MAC {} instead of {}",
            p.ifname,
            pl.mac.map(|m| weft_net::format_mac(&m)).unwrap_or_default(),
            weft_net::format_mac(&p.pod_mac)
        ));
    }
    if let Some((recorded, node)) = mtu {
        let wanted = match node.filter(|n| *n != recorded) {
            Some(n) => format!("{recorded} (or the node's current {n})"),
            None => recorded.to_string(),
        };
        for (what, link) in [("pod interface", &pl), ("host veth", &hv)] {
            if link.mtu != recorded && Some(link.mtu) != node {
                problems.push(format!(
                    "{what} {} has MTU {} instead of {wanted}",
                    link.name, link.mtu
                ));
            }
        }
        if pl.mtu != hv.mtu {
            problems.push(format!(
                "pod interface {} has MTU {}, its host end {} {}",
                pl.name, pl.mtu, hv.name, hv.mtu
            ));
        }
    }
    for (key, value) in &p.host_veth_conf {
        let now = sysctl::get_ipv4_conf(&p.host_veth, key)?;
        if now != *value {
            problems.push(format!(
                "net.ipv4.conf.{}.{key} is {now}, not {value}",
                p.host_veth
            ));
        }
    }
    if !pod.addresses(pl.index).await?.contains(&p.address.into()) {
        problems.push(format!(
            "pod interface {} lacks address {}",
            p.ifname, p.address
        ));
    }
    let routes = pod.routes().await?;
    for r in &p.pod_routes {
        if !routes
            .iter()
            .any(|x| x.dst == r.dst && x.gateway == r.gateway && x.oif == Some(pl.index))
        {
            let gw = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            problems.push(format!(
                "pod route {}{gw} dev {} is missing",
                r.dst, p.ifname
            ));
        }
    }
    if !p.pod_neighbours.is_empty() {
        let neigh = pod.permanent_neighbours(pl.index).await?;
        for (ip, mac) in &p.pod_neighbours {
            if !neigh.contains(&(IpAddr::V4(*ip), *mac)) {
                problems.push(format!(
                    "pod neighbour {ip} lladdr {} is missing",
                    weft_net::format_mac(mac)
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PodIdentity<'static> {
        PodIdentity {
            network: "weft",
            container_id: "c1",
            ifname: "eth0",
        }
    }

    #[test]
    fn bridge_plan() {
        let p = plan(
            &id(),
            Mode::Bridge,
            "10.244.1.0/24".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
            "10.244.1.5".parse().unwrap(),
            1450,
            "weft0",
            true,
        );
        assert_eq!(p.address.to_string(), "10.244.1.5/24");
        let b = p.bridge.as_ref().unwrap();
        assert_eq!(b.address.to_string(), "10.244.1.1/24");
        assert_eq!(p.pod_routes.len(), 1);
        assert_eq!(p.pod_routes[0].gateway, Some("10.244.1.1".parse().unwrap()));
        assert!(!p.pod_routes[0].onlink);
        assert!(p.host_routes.is_empty() && p.pod_neighbours.is_empty());
        assert_eq!(p.alias, "weft/weft/c1/eth0");
    }

    #[test]
    fn routed_plan() {
        let p = plan(
            &id(),
            Mode::Routed,
            "10.244.1.0/24".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
            "10.244.1.5".parse().unwrap(),
            1500,
            "weft0",
            true,
        );
        assert!(p.bridge.is_none());
        assert_eq!(p.address.to_string(), "10.244.1.5/32");
        assert_eq!(p.gateway.to_string(), "169.254.1.1");
        assert!(p.pod_routes[0].onlink);
        assert_eq!(p.pod_neighbours, vec![(names::ROUTED_GATEWAY, [0xee; 6])]);
        assert_eq!(p.host_routes[0].dst.to_string(), "10.244.1.5/32");
        assert!(p.host_routes[0].scope_link);
        assert_eq!(p.host_mac, Some([0xee; 6]));
        assert!(p.host_veth_conf.contains(&("proxy_arp", "1")));
    }
}
