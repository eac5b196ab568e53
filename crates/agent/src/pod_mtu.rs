//! Running pods follow the node's pod MTU when it changes (the underlay's MTU, or the backend):
//! both ends of their veth, not only the pods made from then on. See agent.md.

use crate::config::Config;
use crate::daemon::{read_state, write_state};
use std::collections::HashSet;
use tracing::{info, warn};
use weft_net::{Link, Netlink, Netns};

/// `<state-dir>/pod-mtu`: the MTU the node's pods were last made with or moved to. Kept apart
/// from subnet.env, which says the new MTU before the pods have moved: an agent that dies in
/// between moves them at its next start.
const FILE: &str = "pod-mtu";

/// What the agent's loop keeps between passes.
#[derive(Default)]
pub struct Follower {
    /// The record (FILE), read at the first pass and kept here as it is written.
    at: Option<Option<u32>>,
    /// A move done at the last pass, (old, new), to look over once more.
    straggler: Option<(u32, u32)>,
    /// The new MTU for which the veths without an alias were named: once per change.
    unmarked_warned: u32,
}

impl Follower {
    /// Brings the running pods to `now`, the MTU that subnet.env gives new pods, if they were
    /// left at another. Runs at start and at every resync; cheap when nothing changed. `before`
    /// is what subnet.env said before this start, for a state dir without the record (a node
    /// upgraded to this build, say). A fresh node has neither and nothing to move.
    pub async fn settle(&mut self, nl: &Netlink, cfg: &Config, now: u32, before: Option<u32>) {
        // An ADD that read subnet.env's old MTU just before it was rewritten can make its veth
        // after the move listed the links: one more pass, at the next resync, moves it.
        if let Some((old, new)) = self.straggler.take().filter(|(_, new)| *new == now) {
            self.follow(nl, &cfg.network_name, old, new).await;
        }
        let at = *self.at.get_or_insert_with(|| read_state(cfg, FILE));
        match at.or(before) {
            Some(old) if old == now => {}
            Some(old) => {
                if let Some(moved) = self.follow(nl, &cfg.network_name, old, now).await {
                    self.record(cfg, now);
                    self.straggler = (moved > 0).then_some((old, now));
                }
            }
            None => self.record(cfg, now),
        }
    }

    fn record(&mut self, cfg: &Config, mtu: u32) {
        self.at = Some(Some(mtu));
        if let Err(e) = write_state(cfg, FILE, mtu) {
            warn!("{e}");
        }
    }

    /// Moves the pods of `network` whose veth has MTU `old` to `new`, both ends. A pod with
    /// another MTU was given its own by its CNI conf, and keeps it. Returns how many moved if
    /// every pod was settled (moved, or left for good), None if one is to be tried again; errors
    /// are logged per pod.
    async fn follow(&mut self, nl: &Netlink, network: &str, old: u32, new: u32) -> Option<usize> {
        let links = match nl.links().await {
            Ok(l) => l,
            Err(e) => {
                warn!("listing the pods' veths to move them to MTU {new}: {e}");
                return None;
            }
        };
        // Made by a build that did not set the alias (see cni.md): not known to be this network's.
        let unmarked = links
            .iter()
            .filter(|l| {
                l.mtu == old
                    && l.alias.is_none()
                    && l.kind.as_deref() == Some("veth")
                    && l.name.starts_with(weft_plugin::names::VETH_PREFIX)
            })
            .count();
        if unmarked > 0 && std::mem::replace(&mut self.unmarked_warned, new) != new {
            warn!(
            "{unmarked} veths named {}… at MTU {old} carry no alias (made by an earlier build); \
             they keep MTU {old} until their pods are made again",
            weft_plugin::names::VETH_PREFIX
        );
        }
        // Host ends of this network's pods at the old MTU, with their pod end: (index, namespace id).
        let pods: Vec<(Link, u32, i32)> = links
            .into_iter()
            .filter(|l| {
                l.mtu == old && weft_plugin::names::is_network_veth(l.alias.as_deref(), network)
            })
            .filter_map(|l| match l.peer {
                Some((peer, Some(id))) => Some((l, peer, id)),
                _ => None,
            })
            .collect();
        let ids: HashSet<i32> = pods.iter().map(|(_, _, id)| *id).collect();
        let namespaces = match nl.netns_by_ids(&ids).await {
            Ok(n) => n,
            Err(e) => {
                warn!("finding the pods' namespaces to move them to MTU {new}: {e}");
                return None;
            }
        };
        let home = match Netns::current() {
            Ok(h) => h,
            Err(e) => {
                warn!("{e}");
                return None;
            }
        };
        let (mut moved, mut settled) = (0, true);
        for (host, peer, id) in pods {
            let outcome = match namespaces.get(&id) {
                None => {
                    warn!(
                        "{}: its pod's namespace (id {id}) is neither in /run/netns nor any \
                     process's; it keeps MTU {old}",
                        host.name
                    );
                    Outcome::Skipped
                }
                Some(ns) => move_pod(nl, &home, ns, &host, peer, old, new).await,
            };
            match outcome {
                Outcome::Moved => moved += 1,
                Outcome::Skipped => {}
                Outcome::Failed => settled = false,
            }
        }
        if moved > 0 {
            info!("moved {moved} pods from MTU {old} to the node's new {new}");
        }
        settled.then_some(moved)
    }
}

/// What became of one pod.
enum Outcome {
    Moved,
    /// Not to be tried again: its namespace is gone, or its veth is not what it seemed.
    Skipped,
    /// To be tried again at the next resync.
    Failed,
}

/// Both ends of one pod's veth to `new`: the pod's end first, then the host's. If the host's
/// fails, the pod's goes back to `old`, so the two ends never stay apart.
async fn move_pod(
    nl: &Netlink,
    home: &Netns,
    ns: &Netns,
    host: &Link,
    peer: u32,
    old: u32,
    new: u32,
) -> Outcome {
    let pod = match Netlink::connect_in(ns) {
        Ok(p) => p,
        Err(e) => {
            warn!("{e}");
            return Outcome::Failed;
        }
    };
    // The link at that index there must be this veth's other end: its peer is the host end, in
    // this namespace.
    let pod_end = match pod.link_by_index(peer).await {
        Ok(l) => l,
        Err(e) => {
            warn!("{e}");
            return Outcome::Failed;
        }
    };
    let here = pod.netns_id(home).await.ok().flatten();
    let Some(end) = pod_end.filter(|p| p.peer.is_some_and(|(i, n)| i == host.index && n == here))
    else {
        warn!(
            "{}: #{peer} in {} is not its pod end; it keeps MTU {old}",
            host.name,
            ns.path().display()
        );
        return Outcome::Skipped;
    };
    let what = format!("{} in {}", end.name, ns.path().display());
    if let Err(e) = pod.set_mtu(peer, &what, new).await {
        warn!("{e}");
        return Outcome::Failed;
    }
    if let Err(e) = nl.set_mtu(host.index, &host.name, new).await {
        warn!("{e}");
        if let Err(e) = pod.set_mtu(peer, &what, old).await {
            warn!("{e}");
        }
        return Outcome::Failed;
    }
    Outcome::Moved
}
