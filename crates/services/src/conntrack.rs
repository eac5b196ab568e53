//! Stale UDP flows. UDP has no connection end, so conntrack keeps a flow to an endpoint that is
//! gone until the flow goes quiet, and every packet of it (a DNS client reusing its port, say)
//! keeps going to the dead endpoint. kube-proxy's long-standing bug; Weft deletes those entries
//! as soon as the endpoint leaves the service.

use crate::compile::{Flat, Frontend, Ruleset};
use crate::model::Proto;
use std::net::Ipv4Addr;
use std::process::Command;

/// One `conntrack -D -p udp` filter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delete {
    /// The service address the client sent to; `None` for a NodePort (any node address).
    pub dst: Option<Ipv4Addr>,
    pub dport: u16,
    /// Only flows answered by this endpoint; `None` for all flows to the frontend.
    pub endpoint: Option<Ipv4Addr>,
}

fn targets(frontends: &[Frontend], endpoint: Option<Ipv4Addr>, out: &mut Vec<Delete>) {
    for f in frontends {
        let (dst, dport) = match *f {
            Frontend::Ip(ip, port) => (Some(ip), port),
            Frontend::NodePort(port) => (None, port),
        };
        out.push(Delete {
            dst,
            dport,
            endpoint,
        });
    }
}

/// The deletions that going from `old` to `new` calls for: the flows of each UDP endpoint that
/// left its service port, and every flow to a UDP service port that had no endpoint before (such
/// flows were made while it rejected, or before it existed).
pub fn stale_udp(old: &Ruleset, new: &Ruleset) -> Vec<Delete> {
    let (old, new) = old.changed_views(new);
    stale_udp_views(&old, &new)
}

/// [`stale_udp`] between two views from [`Ruleset::changed_views`].
pub fn stale_udp_views(old: &Flat, new: &Flat) -> Vec<Delete> {
    let mut out = Vec::new();
    for (id, o) in old.ports.iter().filter(|(_, p)| p.proto == Proto::Udp) {
        let now = new.ports.get(id);
        for (ip, port) in &o.endpoints {
            let stays = now.is_some_and(|n| n.endpoints.iter().any(|e| e.0 == *ip && e.1 == *port));
            if !stays {
                targets(&o.frontends, Some(*ip), &mut out);
            }
        }
    }
    for (id, n) in new.ports.iter().filter(|(_, p)| p.proto == Proto::Udp) {
        let had = old.ports.get(id).is_some_and(|o| !o.endpoints.is_empty());
        if !had && !n.endpoints.is_empty() {
            targets(&n.frontends, None, &mut out);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Runs one deletion. No matching flow is not an error.
pub fn delete(d: &Delete) -> Result<(), String> {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-D", "-p", "udp"]);
    if let Some(dst) = d.dst {
        cmd.args(["--orig-dst", &dst.to_string()]);
    }
    cmd.args(["--orig-port-dst", &d.dport.to_string()]);
    if let Some(ep) = d.endpoint {
        cmd.args(["--reply-src", &ep.to_string()]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running conntrack (Debian package conntrack): {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("0 flow entries") {
        Ok(())
    } else {
        Err(format!(
            "conntrack {:?}: {}",
            cmd.get_args().collect::<Vec<_>>(),
            err.trim()
        ))
    }
}
