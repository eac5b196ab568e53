//! Finding the node's underlay interface, its IPv4 address and MTU.

use crate::backend::Underlay;
use ipnet::{IpNet, Ipv4Net};
use weft_net::Netlink;

/// The underlay again, for a running agent: the current interface and address while the
/// interface still holds the address (with its MTU as it is now), so that a default route moving
/// to a backup link or a second address on the link does not move the node; else detected anew.
pub async fn detect_again(
    nl: &Netlink,
    iface: Option<&str>,
    current: &Underlay,
) -> Result<Underlay, String> {
    if let Some(link) = nl.link(&current.name).await.map_err(|e| e.to_string())? {
        let addresses = nl.addresses(link.index).await.map_err(|e| e.to_string())?;
        let still = addresses.iter().find_map(|a| match a {
            IpNet::V4(v4) if v4.addr() == current.ip => Some(*v4),
            _ => None,
        });
        if let Some(net) = still {
            return Ok(underlay_of(link, net));
        }
    }
    detect(nl, iface).await
}

pub async fn detect(nl: &Netlink, iface: Option<&str>) -> Result<Underlay, String> {
    let link = match iface {
        Some(name) => nl
            .link(name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("--iface: no interface {name:?} on this node"))?,
        None => {
            let routes = nl.routes().await.map_err(|e| e.to_string())?;
            let oif = routes
                .iter()
                .find(|r| r.dst.prefix_len() == 0 && r.oif.is_some())
                .and_then(|r| r.oif)
                .ok_or("no default route to find the underlay interface by; give --iface")?;
            let links = nl.links().await.map_err(|e| e.to_string())?;
            links
                .into_iter()
                .find(|l| l.index == oif)
                .ok_or_else(|| format!("the default route's interface #{oif} vanished"))?
        }
    };
    let net = nl
        .addresses(link.index)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find_map(|a| match a {
            IpNet::V4(v4) => Some(v4),
            IpNet::V6(_) => None,
        })
        .ok_or_else(|| format!("interface {} has no IPv4 address", link.name))?;
    Ok(underlay_of(link, net))
}

/// `link` with its address `net` (an address with its prefix length) as the underlay.
fn underlay_of(link: weft_net::Link, net: Ipv4Net) -> Underlay {
    Underlay {
        index: link.index,
        name: link.name,
        ip: net.addr(),
        net: Ipv4Net::new(net.network(), net.prefix_len()).expect("valid"),
        mtu: link.mtu,
    }
}
