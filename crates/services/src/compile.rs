//! The pure half of the proxy: (services, endpoint slices, this node's facts) → the variable part
//! of Weft's nft table. No I/O; `render` turns a [`Ruleset`] into nft commands.
//!
//! Shape (see docs/services.md):
//! - `service-ips` maps `daddr . l4proto . dport` of every ClusterIP, external IP and load-balancer
//!   IP to a verdict, `service-nodeports` maps `l4proto . dport` on the node's own addresses; one
//!   lookup per packet whatever the number of services.
//! - Per service port: `svc/ID` (IP frontends) and `np/ID` (its NodePort) pick among all usable
//!   endpoints, `local/ID` and `np-local/ID` among this node's, and with externalTrafficPolicy
//!   Local `ext/ID` and `ext-np/ID` send external clients to the local chains (pods and the node
//!   itself still get every endpoint).
//! - The pick is shared: those chains end in `goto pick/MAP/PROTO/N`, whose one rule DNATs to
//!   `frontend . numgen random mod N` looked up in one of four endpoint maps (keyed by the frontend,
//!   so one lookup serves every service). An endpoint change is a few map elements, and there is
//!   no set or anonymous map per service, which keeps a 10,000-service load linear for the kernel.
//!   With ClientIP affinity each endpoint gets a chain and a timeout set instead
//!   (`ep/ID/IP/PORT`, `aff/ID/IP/PORT/TIMEOUT`).
//! - Service ports without usable endpoints go into `no-endpoint-ips` / `no-endpoint-nodeports`,
//!   which the filter hooks look up: reject when the service has no endpoint at all, drop when a
//!   Local policy leaves none on this node (as kube-proxy does).

use crate::model::{Endpoint, Objects, Proto, Service, ServicePort, Slice};
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
/// Endpoint maps, one per (frontend kind, endpoint set, protocol): frontend . index → endpoint
/// address . port. (One map per protocol: nft 1.0.6 cannot reload a map typed by `th dport`.)
pub const EP_MAPS: [&str; 12] = [
    "ep-ips-tcp",
    "ep-ips-udp",
    "ep-ips-sctp",
    "ep-ips-local-tcp",
    "ep-ips-local-udp",
    "ep-ips-local-sctp",
    "ep-np-tcp",
    "ep-np-udp",
    "ep-np-sctp",
    "ep-np-local-tcp",
    "ep-np-local-udp",
    "ep-np-local-sctp",
];

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

/// The fixed maps and sets: (name, "map" or "set", declaration). The endpoint maps ([`EP_MAPS`])
/// come with [`ep_map_decl`].
pub const ELEMENT_TABLES: [(&str, &str, &str); 5] = [
    (
        SERVICE_IPS,
        "map",
        "type ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        SERVICE_NODEPORTS,
        "map",
        "type inet_proto . inet_service : verdict",
    ),
    (
        NO_ENDPOINT_IPS,
        "map",
        "type ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        NO_ENDPOINT_NODEPORTS,
        "map",
        "type inet_proto . inet_service : verdict",
    ),
    (HAIRPIN, "set", "type ipv4_addr . ipv4_addr"),
];

/// The declaration of an endpoint map, from its name.
pub fn ep_map_decl(name: &str) -> String {
    let proto = name.rsplit('-').next().unwrap_or("tcp");
    let key = if name.starts_with("ep-np") {
        format!("{proto} dport")
    } else {
        format!("ip daddr . {proto} dport")
    };
    format!("typeof {key} . numgen random mod 1 : ip daddr . {proto} dport")
}

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

fn dnat_to(proto: Proto, (ip, port): (Ipv4Addr, u16)) -> String {
    format!("meta l4proto {proto} dnat ip to {ip}:{port}")
}

fn ep_chain(id: &str, (ip, port): (Ipv4Addr, u16)) -> String {
    format!("ep/{id}/{ip}/{port}")
}

fn aff_set(id: &str, (ip, port): (Ipv4Addr, u16), timeout: u32) -> String {
    format!("aff/{id}/{ip}/{port}/{timeout}")
}

/// Which kind of frontend a chain serves, and from which endpoint set: that names the endpoint map.
#[derive(Clone, Copy)]
enum Pick {
    Ips,
    IpsLocal,
    NodePort,
    NodePortLocal,
}

impl Pick {
    fn map(self, proto: Proto) -> &'static str {
        let kind = match self {
            Pick::Ips => 0,
            Pick::IpsLocal => 3,
            Pick::NodePort => 6,
            Pick::NodePortLocal => 9,
        };
        let p = match proto {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Sctp => 2,
        };
        EP_MAPS[kind + p]
    }

    fn key(self, proto: Proto) -> String {
        match self {
            Pick::Ips | Pick::IpsLocal => format!("ip daddr . {proto} dport"),
            Pick::NodePort | Pick::NodePortLocal => format!("{proto} dport"),
        }
    }
}

/// One chain to build: its name, the rules before the pick, the endpoints, the endpoint map and
/// the frontend keys (as in the map) it serves.
struct ChainSpec<'a> {
    name: String,
    rules: Vec<String>,
    targets: &'a [(Ipv4Addr, u16)],
    pick: Pick,
    keys: Vec<String>,
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

    /// Builds `spec.name`: its rules, then a jump to one of its targets — through the shared pick
    /// chain and endpoint map (whose elements for the chain's frontends it adds), or with affinity
    /// through per-endpoint chains.
    fn chain(&mut self, id: &str, proto: Proto, affinity: Option<u32>, spec: ChainSpec) {
        let ChainSpec {
            name,
            mut rules,
            targets,
            pick,
            keys,
        } = spec;
        match affinity {
            None => {
                let n = targets.len();
                let map = pick.map(proto);
                let pick_chain = format!("pick/{map}/{n}");
                let key = pick.key(proto);
                self.rs.chains.entry(pick_chain.clone()).or_insert_with(|| {
                    vec![format!(
                        "dnat ip addr . port to {key} . numgen random mod {n} map @{map}"
                    )]
                });
                for k in &keys {
                    for (i, (ip, port)) in targets.iter().enumerate() {
                        self.element(map, format!("{k} . {i}"), format!("{ip} . {port}"));
                    }
                }
                rules.push(format!("goto {pick_chain}"));
            }
            Some(timeout) => {
                for &t in targets {
                    let set = aff_set(id, t, timeout);
                    rules.push(format!("ip saddr @{set} goto {}", ep_chain(id, t)));
                    self.rs.sets.insert(set.clone(), timeout);
                    self.rs.chains.insert(
                        ep_chain(id, t),
                        vec![format!("update @{set} {{ ip saddr }}"), dnat_to(proto, t)],
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

    fn claim_nodeport(&mut self, svc: &str, np: u16, proto: Proto) -> bool {
        match self.claimed_nodeports.get(&(proto, np)) {
            Some(other) => {
                self.rs.problems.push(format!(
                    "service {svc}: nodePort {np}/{proto} is already service {other}'s; left out"
                ));
                false
            }
            None => {
                self.claimed_nodeports.insert((proto, np), svc.to_string());
                true
            }
        }
    }

    fn service(&mut self, svc: &Service, slices: &[&Slice]) {
        let sid = svc.id();
        let mut local_ips = BTreeSet::new();
        for p in &svc.ports {
            let id = format!("{sid}/{}/{}", p.proto, p.port);
            // Endpoints from every slice of this service that has this port; an address listed
            // twice (slices overlap during updates) counts once.
            let mut seen = BTreeSet::new();
            let mut cands: Vec<Candidate> = Vec::new();
            for s in slices {
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
            let node_port = p
                .node_port
                .filter(|&np| self.claim_nodeport(&sid, np, p.proto));
            let mut frontends: Vec<Frontend> = internal
                .iter()
                .chain(&external)
                .map(|&ip| Frontend::Ip(ip, p.port))
                .collect();
            frontends.extend(node_port.map(Frontend::NodePort));
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
            let proto = p.proto;
            // Keys of the verdict maps (with the protocol) and of the endpoint maps (per protocol).
            let ip_key = |ip: Ipv4Addr| format!("{ip} . {proto} . {}", p.port);
            let np_key = |np: u16| format!("{proto} . {np}");
            let ip_ep_key = |ip: Ipv4Addr| format!("{ip} . {}", p.port);
            let np_ep_key = |np: u16| np.to_string();

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
            let counter_name = format!("count/{id}");
            self.rs.counters.insert(counter_name.clone());
            let counter = format!("counter name \"{counter_name}\"");
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
            let (svc_chain, local_chain) = (format!("svc/{id}"), format!("local/{id}"));
            let (np_chain, np_local_chain) = (format!("np/{id}"), format!("np-local/{id}"));
            let internal_local = svc.internal_local && !internal.is_empty();
            let external_local = svc.external_local;

            // IP frontends served from every endpoint: the ClusterIP (policy Cluster) and the
            // external IPs (policy Cluster, or pods and the node under policy Local).
            let mut cluster_keys: Vec<String> = external.iter().map(|&ip| ip_ep_key(ip)).collect();
            if !internal_local {
                cluster_keys.extend(internal.iter().map(|&ip| ip_ep_key(ip)));
            }
            if !cluster_keys.is_empty() {
                self.chain(
                    &id,
                    proto,
                    svc.affinity,
                    ChainSpec {
                        name: svc_chain.clone(),
                        rules: vec![counter.clone(), masq.clone()],
                        targets: &cluster,
                        pick: Pick::Ips,
                        keys: cluster_keys,
                    },
                );
            }
            let mut local_keys: Vec<String> = Vec::new();
            if internal_local {
                local_keys.extend(internal.iter().map(|&ip| ip_ep_key(ip)));
            }
            if external_local {
                local_keys.extend(external.iter().map(|&ip| ip_ep_key(ip)));
            }
            if !local_keys.is_empty() && !local.is_empty() {
                self.chain(
                    &id,
                    proto,
                    svc.affinity,
                    ChainSpec {
                        name: local_chain.clone(),
                        rules: vec![counter.clone()],
                        targets: &local,
                        pick: Pick::IpsLocal,
                        keys: local_keys,
                    },
                );
            }
            if let Some(np) = node_port {
                self.chain(
                    &id,
                    proto,
                    svc.affinity,
                    ChainSpec {
                        name: np_chain.clone(),
                        rules: vec![counter.clone(), masq.clone()],
                        targets: &cluster,
                        pick: Pick::NodePort,
                        keys: vec![np_ep_key(np)],
                    },
                );
                if external_local && !local.is_empty() {
                    self.chain(
                        &id,
                        proto,
                        svc.affinity,
                        ChainSpec {
                            name: np_local_chain.clone(),
                            rules: vec![counter.clone()],
                            targets: &local,
                            pick: Pick::NodePortLocal,
                            keys: vec![np_ep_key(np)],
                        },
                    );
                }
            }

            for &ip in &internal {
                match (internal_local, local.is_empty()) {
                    (true, true) => self.element(NO_ENDPOINT_IPS, ip_key(ip), "drop".into()),
                    (true, false) => {
                        self.element(SERVICE_IPS, ip_key(ip), format!("goto {local_chain}"))
                    }
                    (false, _) => {
                        self.element(SERVICE_IPS, ip_key(ip), format!("goto {svc_chain}"))
                    }
                }
            }
            // Under externalTrafficPolicy Local: pods and the node itself are not external, they
            // get every endpoint; external clients get this node's, or are dropped.
            let ext_chain = |b: &mut Self, name: String, all: &str, local_chain: &str| {
                let mut rules = vec![
                    format!("ip saddr {} goto {all}", b.facts.cluster_cidr),
                    format!("fib saddr type local goto {all}"),
                ];
                if local.is_empty() {
                    rules.push(counter.clone());
                    rules.push("drop".into());
                } else {
                    rules.push(format!("goto {local_chain}"));
                }
                b.rs.chains.insert(name.clone(), rules);
                name
            };
            if !external.is_empty() {
                let target = if external_local {
                    ext_chain(self, format!("ext/{id}"), &svc_chain, &local_chain)
                } else {
                    svc_chain.clone()
                };
                for &ip in &external {
                    self.element(SERVICE_IPS, ip_key(ip), format!("goto {target}"));
                }
            }
            if let Some(np) = node_port {
                let target = if external_local {
                    ext_chain(self, format!("ext-np/{id}"), &np_chain, &np_local_chain)
                } else {
                    np_chain.clone()
                };
                self.element(SERVICE_NODEPORTS, np_key(np), format!("goto {target}"));
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
    // Slices by (namespace, service), once: a scan per service port is quadratic at 10k services.
    let mut slices: BTreeMap<(&str, &str), Vec<&Slice>> = BTreeMap::new();
    for s in &objects.slices {
        slices
            .entry((s.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by_key(|s| (s.namespace.as_str(), s.name.as_str()));
    for s in services {
        let mine = slices
            .get(&(s.namespace.as_str(), s.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        b.service(s, mine);
    }
    b.rs
}
