//! Reconciling a backend `Plan` with the kernel: read what is there, change only the difference.
//! Never flushes: a restarted agent finds its routes, neighbours and FDB entries in place and
//! leaves them alone, so established traffic is not disturbed. Never touches a route that is not
//! Weft's (protocol `PEER_ROUTE_PROTOCOL`): a foreign route to a peer's subnet is reported as a
//! conflict and left in place.

use super::{Plan, Problem, Reason, Underlay, Via, VXLAN_DEVICE};
use ipnet::Ipv4Net;
use std::net::{IpAddr, Ipv4Addr};
use weft_net::{Error, Netlink, RouteSpec, VxlanSpec, PEER_ROUTE_PROTOCOL};

/// What a reconcile pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Kernel objects changed (0 when all was in place).
    pub changes: usize,
    /// Peers whose route was not installed because a route that is not Weft's holds the same
    /// destination in the main table.
    pub conflicts: Vec<Problem>,
}

/// Applies `plan`.
pub async fn reconcile(
    nl: &Netlink,
    plan: &Plan,
    underlay: &Underlay,
) -> Result<Reconciled, Error> {
    let mut changes = 0;
    let mut conflicts = Vec::new();
    let vxlan_index = match &plan.vxlan {
        Some(v) => {
            let spec = VxlanSpec {
                name: VXLAN_DEVICE.into(),
                vni: v.vni,
                port: v.port,
                local: underlay.ip,
                dev: underlay.index,
                mac: v.mac,
                mtu: v.mtu,
            };
            let existing = nl.link(VXLAN_DEVICE).await?;
            // A device that differs in anything Weft sets but the MTU (learning switched on by
            // hand, another port, an underlay address that changed) is made again. A new MTU
            // (the underlay's changed) is set in place, below.
            let stale = existing.as_ref().is_some_and(|l| !spec.matches(l));
            if stale {
                nl.del_link(VXLAN_DEVICE).await?;
                changes += 1;
            }
            let link = match existing.filter(|_| !stale) {
                Some(l) => l,
                None => {
                    nl.add_vxlan(&spec).await?;
                    changes += 1;
                    nl.link(VXLAN_DEVICE).await?.ok_or_else(|| Error::Io {
                        op: format!("looking up {VXLAN_DEVICE}"),
                        source: std::io::Error::other("created but not found"),
                    })?
                }
            };
            if link.mtu != spec.mtu {
                nl.set_mtu(link.index, VXLAN_DEVICE, spec.mtu).await?;
                changes += 1;
            }
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

    let (actual, foreign): (Vec<RouteSpec>, Vec<RouteSpec>) = nl
        .routes()
        .await?
        .into_iter()
        .partition(|r| r.protocol == PEER_ROUTE_PROTOCOL);
    // Looked up once per peer route on every pass: by destination, not by a scan of the table.
    let foreign: std::collections::HashMap<Ipv4Net, &RouteSpec> =
        foreign.iter().map(|f| (f.dst, f)).collect();
    // (destination, gateway, interface, onlink) of every route to install.
    let mut desired: Vec<(Ipv4Net, Ipv4Addr, u32, bool)> = Vec::new();
    for r in &plan.routes {
        let want = match r.via {
            Via::Underlay => (r.dst, r.gateway, underlay.index, false),
            Via::Vxlan => match vxlan_index {
                Some(i) => (r.dst, r.gateway, i, true),
                None => continue,
            },
        };
        if let Some(f) = foreign.get(&r.dst) {
            conflicts.push(Problem {
                peer: r.peer.clone(),
                reason: Reason::RouteConflict,
                message: format!(
                    "a route to {} that is not Weft's (protocol {}{}) is in the main table: \
                     left alone, so peer {}'s pods are not reached through Weft until it is \
                     removed",
                    r.dst,
                    f.protocol,
                    f.gateway.map(|g| format!(", via {g}")).unwrap_or_default(),
                    r.peer
                ),
            });
            continue;
        }
        desired.push(want);
    }
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
    Ok(Reconciled { changes, conflicts })
}
