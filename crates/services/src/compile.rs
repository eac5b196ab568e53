//! The pure half of the proxy: (services, endpoint slices, this node's facts) → the variable part
//! of Weft's nft table. No I/O; `render` turns a [`Ruleset`] into nft commands.
//!
//! Shape (see docs/services.md):
//! - `service-ips` maps `daddr . l4proto . dport` of every ClusterIP, external IP and load-balancer
//!   IP to a verdict, `service-nodeports` maps `l4proto . dport` on the node's own addresses; one
//!   lookup per packet whatever the number of services.
//! - Per service port: `svc/ID` picks among all usable endpoints, `local/ID` among this node's,
//!   and with externalTrafficPolicy Local `ext/ID` sends external clients to `local/ID` (pods
//!   and the node itself still get every endpoint). Picking is one rule: `dnat` to a
//!   `numgen random mod N` map of addresses. With ClientIP affinity each endpoint gets a chain
//!   and a timeout set instead (`ep/ID/IP/PORT`, `aff/ID/IP/PORT/TIMEOUT`).
//! - Service ports without usable endpoints go into `no-endpoint-ips` / `no-endpoint-nodeports`,
//!   which the filter hooks look up: reject when the service has no endpoint at all, drop when a
//!   Local policy leaves none on this node (as kube-proxy does).

use crate::model::{Endpoint, Objects, Proto, Service, ServicePort};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The packet mark bit that asks postrouting to masquerade a service connection whose endpoint
/// is not on this node (set for clients outside the cluster and the node).
pub const MASQ_MARK: u32 = 0x4000;

pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_IPS: &str = "no-endpoint-ips";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
/// Set of `endpoint . endpoint`: a pod that reaches itself through its service is masqueraded,
/// or it would drop its own packets as martians.
pub const HAIRPIN: &str = "hairpin";
/// The chain a no-endpoint entry jumps to.
pub const REJECT_CHAIN: &str = "reject-service";

/// What the proxy needs to know about the node it runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFacts {
    /// The node's name, as endpoints' `nodeName` spells it.
    pub node: String,
    pub cluster_cidr: Ipv4Net,
    /// This node's pod subnet: endpoints in it are local.
    pub local_subnet: Ipv4Net,
}

/// Where clients reach a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frontend {
    Ip(Ipv4Addr, u16),
    NodePort(u16),
}

/// One service port as programmed: for conntrack cleanup, health checks and `weftctl services`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    pub service: String,
    pub port_name: String,
    pub proto: Proto,
    pub frontends: Vec<Frontend>,
    /// The endpoints traffic can go to (any policy), as `ip:port`.
    pub endpoints: BTreeSet<(Ipv4Addr, u16)>,
}

/// The variable part of the table. `elements` holds, per map or set, key → verdict ("" in a set).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets: name → timeout in seconds.
    pub sets: BTreeMap<String, u32>,
    /// Named counters, `count/ID`: connections (first packets) per service port.
    pub counters: BTreeSet<String>,
    pub elements: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// Service port id (`ns/name/proto/port`) → what it serves.
    pub ports: BTreeMap<String, PortState>,
    /// healthCheckNodePort → (service, number of local endpoints).
    pub health: BTreeMap<u16, (String, usize)>,
    /// One line per object or frontend left out, naming it and why.
    pub problems: Vec<String>,
}

/// The maps and sets `elements` may name, with their nft type.
pub const ELEMENT_TABLES: [(&str, &str, bool); 5] = [
    (
        SERVICE_IPS,
        "ipv4_addr . inet_proto . inet_service : verdict",
        true,
    ),
    (
        SERVICE_NODEPORTS,
        "inet_proto . inet_service : verdict",
        true,
    ),
    (
        NO_ENDPOINT_IPS,
        "ipv4_addr . inet_proto . inet_service : verdict",
        true,
    ),
    (
        NO_ENDPOINT_NODEPORTS,
        "inet_proto . inet_service : verdict",
        true,
    ),
    (HAIRPIN, "ipv4_addr . ipv4_addr", false),
];

struct Candidate<'a> {
    ip: Ipv4Addr,
    port: u16,
    ep: &'a Endpoint,
    local: bool,
}

/// Ready endpoints; if there are none, the serving-but-terminating ones (so that a rolling
/// update never leaves a gap).
fn usable<'a>(c: impl Iterator<Item = &'a Candidate<'a>> + Clone) -> Vec<(Ipv4Addr, u16)> {
    let ready: Vec<_> = c
        .clone()
        .filter(|c| c.ep.ready && !c.ep.terminating)
        .map(|c| (c.ip, c.port))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    c.filter(|c| c.ep.serving && c.ep.terminating)
        .map(|c| (c.ip, c.port))
        .collect()
}

fn dnat(proto: Proto, targets: &[(Ipv4Addr, u16)]) -> String {
    let p = proto.as_str();
    if let [(ip, port)] = targets {
        return format!("meta l4proto {p} dnat ip to {ip}:{port}");
    }
    let map: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| format!("{i} : {ip} . {port}"))
        .collect();
    format!(
        "meta l4proto {p} dnat ip addr . port to numgen random mod {} map {{ {} }}",
        targets.len(),
        map.join(", ")
    )
}

fn ep_chain(id: &str, (ip, port): (Ipv4Addr, u16)) -> String {
    format!("ep/{id}/{ip}/{port}")
}

fn aff_set(id: &str, (ip, port): (Ipv4Addr, u16), timeout: u32) -> String {
    format!("aff/{id}/{ip}/{port}/{timeout}")
}

struct Builder<'a> {
    facts: &'a NodeFacts,
    rs: Ruleset,
    claimed_ips: BTreeMap<(Ipv4Addr, Proto, u16), String>,
    claimed_nodeports: BTreeMap<(Proto, u16), String>,
}

impl Builder<'_> {
    fn element(&mut self, table: &'static str, key: String, value: String) {
        self.rs
            .elements
            .entry(table)
            .or_default()
            .insert(key, value);
    }

    /// The rules that send a connection to one of `targets`, after `prefix` rules.
    fn pick_chain(
        &mut self,
        name: String,
        id: &str,
        mut rules: Vec<String>,
        proto: Proto,
        targets: &[(Ipv4Addr, u16)],
        affinity: Option<u32>,
    ) {
        match affinity {
            None => rules.push(dnat(proto, targets)),
            Some(timeout) => {
                for &t in targets {
                    let set = aff_set(id, t, timeout);
                    rules.push(format!("ip saddr @{set} goto {}", ep_chain(id, t)));
                    self.rs.sets.insert(set.clone(), timeout);
                    self.rs.chains.insert(
                        ep_chain(id, t),
                        vec![format!("update @{set} {{ ip saddr }}"), dnat(proto, &[t])],
                    );
                }
                let vmap: Vec<String> = targets
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| format!("{i} : goto {}", ep_chain(id, t)))
                    .collect();
                rules.push(format!(
                    "numgen random mod {} vmap {{ {} }}",
                    targets.len(),
                    vmap.join(", ")
                ));
            }
        }
        self.rs.chains.insert(name, rules);
    }

    fn claim_ip(&mut self, svc: &str, ip: Ipv4Addr, p: &ServicePort) -> bool {
        match self.claimed_ips.get(&(ip, p.proto, p.port)) {
            Some(other) => {
                self.rs.problems.push(format!(
                    "service {svc}: {ip}:{}/{} is already service {other}'s; left out",
                    p.port, p.proto
                ));
                false
            }
            None => {
                self.claimed_ips
                    .insert((ip, p.proto, p.port), svc.to_string());
                true
            }
        }
    }

    fn service(&mut self, svc: &Service, objects: &Objects) {
        let sid = svc.id();
        let mut local_ips = BTreeSet::new();
        for p in &svc.ports {
            let id = format!("{sid}/{}/{}", p.proto, p.port);
            // Endpoints from every slice of this service that has this port; an address listed
            // twice (slices overlap during updates) counts once.
            let mut seen = BTreeSet::new();
            let mut cands: Vec<Candidate> = Vec::new();
            for s in objects
                .slices
                .iter()
                .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
            {
                let Some(&(_, _, port)) = s
                    .ports
                    .iter()
                    .find(|(name, proto, _)| *name == p.name && *proto == p.proto)
                else {
                    continue;
                };
                for ep in &s.endpoints {
                    if seen.insert(ep.ip) {
                        let local = match &ep.node {
                            Some(n) => *n == self.facts.node,
                            None => self.facts.local_subnet.contains(&ep.ip),
                        };
                        cands.push(Candidate {
                            ip: ep.ip,
                            port,
                            ep,
                            local,
                        });
                    }
                }
            }
            cands.sort_by_key(|c| (c.ip, c.port));
            let cluster = usable(cands.iter());
            let local = usable(cands.iter().filter(|c| c.local));
            local_ips.extend(local.iter().map(|(ip, _)| *ip));

            let mut frontends = Vec::new();
            let internal: Vec<Ipv4Addr> = svc
                .cluster_ip
                .into_iter()
                .filter(|&ip| self.claim_ip(&sid, ip, p))
                .collect();
            let external: Vec<Ipv4Addr> = svc
                .external_ips
                .iter()
                .copied()
                .filter(|&ip| self.claim_ip(&sid, ip, p))
                .collect();
            let node_port = p.node_port.filter(|&np| {
                match self.claimed_nodeports.get(&(p.proto, np)) {
                    Some(other) => {
                        self.rs.problems.push(format!(
                            "service {sid}: nodePort {np}/{} is already service {other}'s; left out",
                            p.proto
                        ));
                        false
                    }
                    None => {
                        self.claimed_nodeports.insert((p.proto, np), sid.clone());
                        true
                    }
                }
            });
            frontends.extend(internal.iter().map(|&ip| Frontend::Ip(ip, p.port)));
            frontends.extend(external.iter().map(|&ip| Frontend::Ip(ip, p.port)));
            frontends.extend(node_port.map(Frontend::NodePort));
            let proto = p.proto.as_str();
            let ip_key = |ip: Ipv4Addr| format!("{ip} . {proto} . {}", p.port);
            let np_key = |np: u16| format!("{proto} . {np}");
            self.rs.ports.insert(
                id.clone(),
                PortState {
                    service: sid.clone(),
                    port_name: p.name.clone(),
                    proto: p.proto,
                    frontends,
                    endpoints: cluster.iter().copied().collect(),
                },
            );

            if cluster.is_empty() {
                let reject = format!("goto {REJECT_CHAIN}");
                for &ip in internal.iter().chain(&external) {
                    self.element(NO_ENDPOINT_IPS, ip_key(ip), reject.clone());
                }
                if let Some(np) = node_port {
                    self.element(NO_ENDPOINT_NODEPORTS, np_key(np), reject.clone());
                }
                continue;
            }
            self.rs.counters.insert(format!("count/{id}"));
            let counter = format!("counter name \"count/{id}\"");
            for &(ip, _) in cluster.iter() {
                if self.facts.local_subnet.contains(&ip) {
                    self.element(HAIRPIN, format!("{ip} . {ip}"), String::new());
                }
            }
            // Clients outside the cluster and the node: masquerade if the endpoint is elsewhere
            // (postrouting checks), or the reply would bypass this node's conntrack.
            let masq = format!(
                "ip saddr != {} fib saddr type != local meta mark set meta mark | {MASQ_MARK:#x}",
                self.facts.cluster_cidr
            );
            let svc_chain = format!("svc/{id}");
            self.pick_chain(
                svc_chain.clone(),
                &id,
                vec![counter.clone(), masq],
                p.proto,
                &cluster,
                svc.affinity,
            );
            let local_chain = format!("local/{id}");
            let wants_local = (svc.internal_local && !internal.is_empty())
                || (svc.external_local && (!external.is_empty() || node_port.is_some()));
            if wants_local && !local.is_empty() {
                self.pick_chain(
                    local_chain.clone(),
                    &id,
                    vec![counter.clone()],
                    p.proto,
                    &local,
                    svc.affinity,
                );
            }
            for &ip in &internal {
                match (svc.internal_local, local.is_empty()) {
                    (true, true) => self.element(NO_ENDPOINT_IPS, ip_key(ip), "drop".into()),
                    (true, false) => {
                        self.element(SERVICE_IPS, ip_key(ip), format!("goto {local_chain}"))
                    }
                    (false, _) => {
                        self.element(SERVICE_IPS, ip_key(ip), format!("goto {svc_chain}"))
                    }
                }
            }
            let external_target = if svc.external_local {
                let ext = format!("ext/{id}");
                let mut rules = vec![
                    // Pods and the node itself are not external: they get every endpoint.
                    format!("ip saddr {} goto {svc_chain}", self.facts.cluster_cidr),
                    format!("fib saddr type local goto {svc_chain}"),
                ];
                if local.is_empty() {
                    rules.push(counter.clone());
                    rules.push("drop".into());
                } else {
                    rules.push(format!("goto {local_chain}"));
                }
                self.rs.chains.insert(ext.clone(), rules);
                ext
            } else {
                svc_chain.clone()
            };
            for &ip in &external {
                self.element(SERVICE_IPS, ip_key(ip), format!("goto {external_target}"));
            }
            if let Some(np) = node_port {
                self.element(
                    SERVICE_NODEPORTS,
                    np_key(np),
                    format!("goto {external_target}"),
                );
            }
        }
        if let (true, Some(hc)) = (svc.external_local, svc.health_check_node_port) {
            self.rs.health.insert(hc, (sid.clone(), local_ips.len()));
        }
    }
}

/// Compiles the parsed objects for one node. Services are taken in id order, so when two claim
/// the same frontend the first keeps it (and the other is named in `problems`).
pub fn compile(facts: &NodeFacts, objects: &Objects) -> Ruleset {
    let mut b = Builder {
        facts,
        rs: Ruleset {
            problems: objects.problems.clone(),
            ..Ruleset::default()
        },
        claimed_ips: BTreeMap::new(),
        claimed_nodeports: BTreeMap::new(),
    };
    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by_key(|s| (s.namespace.as_str(), s.name.as_str()));
    for s in services {
        b.service(s, objects);
    }
    b.rs
}
