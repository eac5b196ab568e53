//! The pure half of the proxy: (services, endpoint slices, this node's facts) → the variable part
//! of Weft's nft table. No I/O; `render` turns a [`Ruleset`] into nft commands.
//!
//! Shape (see docs/services.md):
//! - `service-ips` maps `daddr . l4proto . dport` of every ClusterIP, external IP and load-balancer
//!   IP to a verdict, `service-nodeports` maps `l4proto . dport` on the node's own addresses; one
//!   lookup per packet whatever the number of services. Each element counts its connections.
//! - A verdict jumps to a pick chain shared by every service with the same number of endpoints:
//!   `pick/MAP/N` DNATs to `frontend . numgen random mod N` looked up in an endpoint map (one per
//!   frontend kind, endpoint set and protocol). So a service is map elements, not chains: an
//!   endpoint change is a few elements, and the table has a few dozen chains whatever the number
//!   of services (nft reads every chain before each transaction; 20,000 chains cost 40 ms each
//!   time). Cluster-wide picks also set the masquerade mark for clients outside the cluster.
//! - externalTrafficPolicy Local: `ext/MAP/N/L` (shared too) sends pods and the node to the
//!   cluster-wide pick and external clients to the local one (or drops them).
//! - ClientIP affinity needs per-service state: `svc/ID` checks a timeout set per endpoint
//!   (`aff/ID/IP/PORT/TIMEOUT`) and jumps to `ep/ID/IP/PORT`, which refreshes it and DNATs.
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

/// The variable part of the table. `elements` holds, per map or set, key → value ("" in a set).
/// Connections are counted per element of `service-ips` and `service-nodeports`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets: name → timeout in seconds.
    pub sets: BTreeMap<String, u32>,
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
        "type ipv4_addr . inet_proto . inet_service : verdict; counter",
    ),
    (
        SERVICE_NODEPORTS,
        "map",
        "type inet_proto . inet_service : verdict; counter",
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

fn ep_chain(id: &str, (ip, port): (Ipv4Addr, u16)) -> String {
    format!("ep/{id}/{ip}/{port}")
}

fn aff_set(id: &str, (ip, port): (Ipv4Addr, u16), timeout: u32) -> String {
    format!("aff/{id}/{ip}/{port}/{timeout}")
}

/// Which kind of frontend, and which endpoint set: that names the endpoint map.
#[derive(Clone, Copy, PartialEq)]
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

    fn local(self) -> Pick {
        match self {
            Pick::Ips | Pick::IpsLocal => Pick::IpsLocal,
            Pick::NodePort | Pick::NodePortLocal => Pick::NodePortLocal,
        }
    }
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

    /// Clients outside the cluster and the node get the masquerade mark: postrouting
    /// masquerades them if the endpoint is on another node, or its reply would bypass this
    /// node's conntrack.
    fn masq_rule(&self) -> String {
        format!(
            "ip saddr != {} fib saddr type != local meta mark set meta mark | {MASQ_MARK:#x}",
            self.facts.cluster_cidr
        )
    }

    /// The shared chain that picks one of `n` endpoints from `pick`'s map; returns its name.
    fn pick_chain(&mut self, pick: Pick, proto: Proto, n: usize) -> String {
        let map = pick.map(proto);
        let name = format!("pick/{map}/{n}");
        if !self.rs.chains.contains_key(&name) {
            let mut rules = Vec::new();
            if matches!(pick, Pick::Ips | Pick::NodePort) {
                rules.push(self.masq_rule());
            }
            rules.push(format!(
                "dnat ip addr . port to {} . numgen random mod {n} map @{map}",
                pick.key(proto)
            ));
            self.rs.chains.insert(name.clone(), rules);
        }
        name
    }

    /// Where a frontend's connections go: to the shared pick of `targets` (adding the frontend's
    /// elements to the endpoint map), or with affinity to the service's own chain.
    fn route(
        &mut self,
        id: &str,
        proto: Proto,
        affinity: Option<u32>,
        pick: Pick,
        key: &str,
        targets: &[(Ipv4Addr, u16)],
    ) -> String {
        if let Some(timeout) = affinity {
            return self.affinity_chain(id, proto, timeout, pick, targets);
        }
        let map = pick.map(proto);
        for (i, (ip, port)) in targets.iter().enumerate() {
            self.element(map, format!("{key} . {i}"), format!("{ip} . {port}"));
        }
        self.pick_chain(pick, proto, targets.len())
    }

    /// ClientIP affinity: a timeout set and a chain per endpoint; a client seen within the
    /// timeout goes back to its endpoint, others pick at random. Returns the chain's name.
    fn affinity_chain(
        &mut self,
        id: &str,
        proto: Proto,
        timeout: u32,
        pick: Pick,
        targets: &[(Ipv4Addr, u16)],
    ) -> String {
        let local = matches!(pick, Pick::IpsLocal | Pick::NodePortLocal);
        let name = format!("{}/{id}", if local { "local" } else { "svc" });
        if self.rs.chains.contains_key(&name) {
            return name;
        }
        let mut rules = Vec::new();
        if !local {
            rules.push(self.masq_rule());
        }
        for &t in targets {
            let set = aff_set(id, t, timeout);
            rules.push(format!("ip saddr @{set} goto {}", ep_chain(id, t)));
            self.rs.sets.insert(set.clone(), timeout);
            self.rs.chains.insert(
                ep_chain(id, t),
                vec![
                    format!("update @{set} {{ ip saddr }}"),
                    format!("meta l4proto {proto} dnat ip to {}:{}", t.0, t.1),
                ],
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
        self.rs.chains.insert(name.clone(), rules);
        name
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

    /// One frontend of a service port: its verdict (or its no-endpoint entry).
    #[allow(clippy::too_many_arguments)]
    fn frontend(
        &mut self,
        svc: &Service,
        id: &str,
        proto: Proto,
        pick: Pick,
        ep_key: &str,
        verdict: (&'static str, String),
        policy_local: bool,
        external: bool,
        cluster: &[(Ipv4Addr, u16)],
        local: &[(Ipv4Addr, u16)],
    ) {
        let (table, key) = verdict;
        let none = if matches!(pick, Pick::Ips) {
            NO_ENDPOINT_IPS
        } else {
            NO_ENDPOINT_NODEPORTS
        };
        if cluster.is_empty() {
            self.element(none, key, format!("goto {REJECT_CHAIN}"));
            return;
        }
        if !policy_local {
            let c = self.route(id, proto, svc.affinity, pick, ep_key, cluster);
            self.element(table, key, format!("goto {c}"));
            return;
        }
        if !external {
            // internalTrafficPolicy Local: this node's endpoints, or nothing.
            if local.is_empty() {
                self.element(none, key, "drop".into());
            } else {
                let c = self.route(id, proto, svc.affinity, pick.local(), ep_key, local);
                self.element(table, key, format!("goto {c}"));
            }
            return;
        }
        // externalTrafficPolicy Local: pods and the node itself are not external, they get every
        // endpoint; external clients get this node's, or are dropped.
        let all = self.route(id, proto, svc.affinity, pick, ep_key, cluster);
        let (name, last) = if local.is_empty() {
            (
                format!("ext/{}/none", all.trim_start_matches("pick/")),
                "drop".to_string(),
            )
        } else {
            let l = self.route(id, proto, svc.affinity, pick.local(), ep_key, local);
            let name = format!(
                "ext/{}/{}",
                all.trim_start_matches("pick/"),
                l.trim_start_matches("pick/")
            );
            (name, format!("goto {l}"))
        };
        let rules = vec![
            format!("ip saddr {} goto {all}", self.facts.cluster_cidr),
            format!("fib saddr type local goto {all}"),
            last,
        ];
        self.rs.chains.insert(name.clone(), rules);
        self.element(table, key, format!("goto {name}"));
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
            for &(ip, _) in &cluster {
                if self.facts.local_subnet.contains(&ip) {
                    self.element(HAIRPIN, format!("{ip} . {ip}"), String::new());
                }
            }

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
            for (ip, is_external) in internal
                .iter()
                .map(|&ip| (ip, false))
                .chain(external.iter().map(|&ip| (ip, true)))
            {
                let policy_local = if is_external {
                    svc.external_local
                } else {
                    svc.internal_local
                };
                self.frontend(
                    svc,
                    &id,
                    proto,
                    Pick::Ips,
                    &format!("{ip} . {}", p.port),
                    (SERVICE_IPS, format!("{ip} . {proto} . {}", p.port)),
                    policy_local,
                    is_external,
                    &cluster,
                    &local,
                );
            }
            if let Some(np) = node_port {
                self.frontend(
                    svc,
                    &id,
                    proto,
                    Pick::NodePort,
                    &np.to_string(),
                    (SERVICE_NODEPORTS, format!("{proto} . {np}")),
                    svc.external_local,
                    true,
                    &cluster,
                    &local,
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
