//! Reconciling a backend `Plan` with the kernel: read what is there, change only the difference.
//! Never flushes: a restarted agent finds its routes, neighbours and FDB entries in place and
//! leaves them alone, so established traffic is not disturbed.

use super::{Plan, Underlay, Via, VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI};
use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use weft_net::{Error, Netlink, RouteSpec, VxlanSpec, PEER_ROUTE_PROTOCOL};

/// Applies `plan`; returns how many kernel objects it changed (0 when all was in place).
pub async fn reconcile(nl: &Netlink, plan: &Plan, underlay: &Underlay) -> Result<usize, Error> {
    let mut changes = 0;
    let vxlan_index = match &plan.vxlan {
        Some(v) => {
            let existing = nl.link(VXLAN_DEVICE).await?;
            let stale = existing.as_ref().is_some_and(|l| {
                l.kind.as_deref() != Some("vxlan") || l.mac != Some(v.mac) || l.mtu != v.mtu
            });
            if stale {
                nl.del_link(VXLAN_DEVICE).await?;
                changes += 1;
            }
            let link = match existing.filter(|_| !stale) {
                Some(l) => l,
                None => {
                    nl.add_vxlan(&VxlanSpec {
                        name: VXLAN_DEVICE.into(),
                        vni: VXLAN_VNI,
                        port: VXLAN_PORT,
                        local: underlay.ip,
                        dev: underlay.index,
                        mac: v.mac,
                        mtu: v.mtu,
                    })
                    .await?;
                    changes += 1;
                    nl.link(VXLAN_DEVICE).await?.ok_or_else(|| Error::Io {
                        op: format!("looking up {VXLAN_DEVICE}"),
                        source: std::io::Error::other("created but not found"),
                    })?
                }
            };
            if !link.up {
                nl.set_up(link.index, VXLAN_DEVICE).await?;
                changes += 1;
            }
            if nl
                .add_address(link.index, VXLAN_DEVICE, v.address.into())
                .await?
            {
                changes += 1;
            }
            Some(link.index)
        }
        None => {
            if nl.del_link(VXLAN_DEVICE).await? {
                changes += 1;
            }
            None
        }
    };

    let desired: BTreeSet<(Ipv4Net, Ipv4Addr, u32, bool)> = plan
        .routes
        .iter()
        .filter_map(|r| match r.via {
            Via::Underlay => Some((r.dst, r.gateway, underlay.index, false)),
            Via::Vxlan => vxlan_index.map(|i| (r.dst, r.gateway, i, true)),
        })
        .collect();
    let actual: Vec<RouteSpec> = nl
        .routes()
        .await?
        .into_iter()
        .filter(|r| r.protocol == PEER_ROUTE_PROTOCOL)
        .collect();
    let key = |r: &RouteSpec| {
        (
            r.dst,
            r.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
            r.oif.unwrap_or(0),
        )
    };
    for r in &actual {
        if !desired.iter().any(|d| (d.0, d.1, d.2) == key(r)) {
            nl.del_route(r).await?;
            changes += 1;
        }
    }
    for (dst, gw, oif, onlink) in &desired {
        if !actual.iter().any(|r| key(r) == (*dst, *gw, *oif)) {
            nl.replace_route(&RouteSpec {
                dst: *dst,
                gateway: Some(*gw),
                oif: Some(*oif),
                scope_link: false,
                onlink: *onlink,
                protocol: PEER_ROUTE_PROTOCOL,
            })
            .await?;
            changes += 1;
        }
    }

    if let Some(index) = vxlan_index {
        let neigh = nl.permanent_neighbours(index).await?;
        for (ip, mac) in &neigh {
            let IpAddr::V4(v4) = ip else { continue };
            if !plan.neighbours.contains(&(*v4, *mac)) {
                nl.del_neighbour(index, *v4).await?;
                changes += 1;
            }
        }
        for (ip, mac) in &plan.neighbours {
            if !neigh.contains(&(IpAddr::V4(*ip), *mac)) {
                nl.replace_neighbour(index, IpAddr::V4(*ip), *mac).await?;
                changes += 1;
            }
        }
        let fdb = nl.fdb_entries(index).await?;
        for (mac, dst) in &fdb {
            if !plan.fdb.contains(&(*mac, *dst)) {
                nl.del_fdb(index, *mac, *dst).await?;
                changes += 1;
            }
        }
        for (mac, dst) in &plan.fdb {
            if !fdb.contains(&(*mac, *dst)) {
                nl.replace_fdb(index, *mac, *dst).await?;
                changes += 1;
            }
        }
    }
    Ok(changes)
}
