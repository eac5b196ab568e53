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

use crate::model::{Endpoint, Objects, Proto, Service, Slice};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

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
/// The chain a no-endpoint NodePort entry jumps to: it checks that the packet is for this node
/// only after the port matched, so the filter hooks do no route lookup for other traffic.
pub const NODEPORT_REJECT_CHAIN: &str = "reject-nodeport";
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

/// What one service compiles to. A fragment is immutable and shared between successive
/// rulesets while its inputs stay the same, so an unchanged service costs a pointer comparison
/// in a diff: one change among 10,000 services is compiled and diffed as one service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fragment {
    /// (map, key, value): keys belong to this service alone (its frontends are claimed).
    pub elements: Vec<(&'static str, String, String)>,
    /// Chains only this service uses (ClientIP affinity).
    pub chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets: name → timeout in seconds.
    pub sets: BTreeMap<String, u32>,
    /// Shared chains it jumps to (picks, ext), with their rules.
    pub shared: BTreeMap<String, Vec<String>>,
    /// Its endpoints on this node, for the hairpin set.
    pub hairpin: BTreeSet<Ipv4Addr>,
    /// Service port id (`ns/name/proto/port`) → what it serves.
    pub ports: BTreeMap<String, PortState>,
    /// healthCheckNodePort and the number of local endpoints.
    pub health: Option<(u16, usize)>,
}

/// The variable part of the table, per service. Connections are counted per element of
/// `service-ips` and `service-nodeports`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ruleset {
    /// Service id (`ns/name`) → its fragment.
    pub services: BTreeMap<String, Arc<Fragment>>,
    /// The shared chains every fragment uses.
    pub shared: BTreeMap<String, Vec<String>>,
    pub hairpin: BTreeSet<Ipv4Addr>,
    /// healthCheckNodePort → (service, number of local endpoints).
    pub health: BTreeMap<u16, (String, usize)>,
    /// One line per object or frontend left out, naming it and why.
    pub problems: Vec<String>,
}

/// A ruleset (or part of one) laid out as the table holds it. `elements` holds, per map or set,
/// key → value ("" in a set).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flat {
    pub chains: BTreeMap<String, Vec<String>>,
    pub sets: BTreeMap<String, u32>,
    pub elements: BTreeMap<&'static str, BTreeMap<String, String>>,
    pub ports: BTreeMap<String, PortState>,
}

impl Ruleset {
    /// The whole table's variable part.
    pub fn flat(&self) -> Flat {
        self.view(|_| true)
    }

    /// The part made by the services `only` selects, plus everything shared (which is small).
    pub fn view(&self, only: impl Fn(&str) -> bool) -> Flat {
        let mut f = Flat {
            chains: self.shared.clone(),
            ..Flat::default()
        };
        for (_, frag) in self.services.iter().filter(|(id, _)| only(id)) {
            f.chains
                .extend(frag.chains.iter().map(|(k, v)| (k.clone(), v.clone())));
            f.sets
                .extend(frag.sets.iter().map(|(k, v)| (k.clone(), *v)));
            for (table, k, v) in &frag.elements {
                f.elements
                    .entry(table)
                    .or_default()
                    .insert(k.clone(), v.clone());
            }
            f.ports
                .extend(frag.ports.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if !self.hairpin.is_empty() {
            f.elements.insert(
                HAIRPIN,
                self.hairpin
                    .iter()
                    .map(|ip| (format!("{ip} . {ip}"), String::new()))
                    .collect(),
            );
        }
        f
    }

    /// The parts of `self` and `new` that differ, as two views: the services whose fragments
    /// changed, plus what is shared. A diff or a cleanup between the views equals one between
    /// the whole rulesets (an element key or a port belongs to one service).
    pub fn changed_views(&self, new: &Ruleset) -> (Flat, Flat) {
        let changed = self.changed(new);
        (
            self.view(|id| changed.contains(id)),
            new.view(|id| changed.contains(id)),
        )
    }

    /// Every service port, in service order.
    pub fn ports(&self) -> impl Iterator<Item = (&String, &PortState)> {
        self.services.values().flat_map(|f| f.ports.iter())
    }

    /// The ids of the services whose fragments differ between `self` and `other` (one merged
    /// walk over both; unchanged services share their fragment, so most cost a pointer compare).
    pub fn changed<'a>(&'a self, other: &'a Ruleset) -> BTreeSet<&'a str> {
        let mut out = BTreeSet::new();
        let mut a = self.services.iter().peekable();
        let mut b = other.services.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((ka, fa)), Some((kb, fb))) if ka == kb => {
                    if !Arc::ptr_eq(fa, fb) && fa != fb {
                        out.insert(ka.as_str());
                    }
                    a.next();
                    b.next();
                }
                (Some((ka, _)), Some((kb, _))) if ka < kb => {
                    out.insert(ka.as_str());
                    a.next();
                }
                (Some((ka, _)), None) => {
                    out.insert(ka.as_str());
                    a.next();
                }
                (_, Some((kb, _))) => {
                    out.insert(kb.as_str());
                    b.next();
                }
            }
        }
        out
    }
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

/// Which of a service's frontends it may program (the first service, in id order, to claim an
/// address and port or a NodePort keeps it): per port, the ClusterIP, each external IP, the
/// NodePort.
#[derive(Clone, Debug, PartialEq)]
struct Claims(Vec<(bool, Vec<bool>, bool)>);

/// Claims `key` for service `sid` unless an earlier service holds it; a refusal is a problem
/// line naming the frontend (`what`) and its holder.
fn claim<K: Ord>(
    held: &mut BTreeMap<K, String>,
    key: K,
    sid: &str,
    what: impl FnOnce() -> String,
    problems: &mut Vec<String>,
) -> bool {
    match held.get(&key) {
        Some(other) => {
            problems.push(format!(
                "service {sid}: {} is already service {other}'s; left out",
                what()
            ));
            false
        }
        None => {
            held.insert(key, sid.to_string());
            true
        }
    }
}

fn claim_all(services: &[&Arc<Service>], problems: &mut Vec<String>) -> Vec<Claims> {
    let mut ips: BTreeMap<(Ipv4Addr, Proto, u16), String> = BTreeMap::new();
    let mut nodeports: BTreeMap<(Proto, u16), String> = BTreeMap::new();
    let mut out = Vec::with_capacity(services.len());
    for svc in services {
        let sid = svc.id();
        let mut ports = Vec::with_capacity(svc.ports.len());
        for p in &svc.ports {
            let mut claim_ip = |ip: Ipv4Addr, problems: &mut Vec<String>| {
                let what = || format!("{ip}:{}/{}", p.port, p.proto);
                claim(&mut ips, (ip, p.proto, p.port), &sid, what, problems)
            };
            let internal = svc.cluster_ip.is_some_and(|ip| claim_ip(ip, problems));
            let external = svc
                .external_ips
                .iter()
                .map(|&ip| claim_ip(ip, problems))
                .collect();
            let np = p.node_port.is_some_and(|np| {
                let what = || format!("nodePort {np}/{}", p.proto);
                claim(&mut nodeports, (p.proto, np), &sid, what, problems)
            });
            ports.push((internal, external, np));
        }
        out.push(Claims(ports));
    }
    out
}

/// Builds one service's fragment.
struct Builder<'a> {
    facts: &'a NodeFacts,
    frag: Fragment,
}

impl Builder<'_> {
    fn element(&mut self, table: &'static str, key: String, value: String) {
        self.frag.elements.push((table, key, value));
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
        if !self.frag.shared.contains_key(&name) {
            let mut rules = Vec::new();
            if matches!(pick, Pick::Ips | Pick::NodePort) {
                rules.push(self.masq_rule());
            }
            rules.push(format!(
                "dnat ip addr . port to {} . numgen random mod {n} map @{map}",
                pick.key(proto)
            ));
            self.frag.shared.insert(name.clone(), rules);
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
        if self.frag.chains.contains_key(&name) {
            return name;
        }
        let mut rules = Vec::new();
        if !local {
            rules.push(self.masq_rule());
        }
        for &t in targets {
            let set = aff_set(id, t, timeout);
            rules.push(format!("ip saddr @{set} goto {}", ep_chain(id, t)));
            self.frag.sets.insert(set.clone(), timeout);
            self.frag.chains.insert(
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
        self.frag.chains.insert(name.clone(), rules);
        name
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
        let (none, reject) = if matches!(pick, Pick::Ips) {
            (NO_ENDPOINT_IPS, REJECT_CHAIN)
        } else {
            (NO_ENDPOINT_NODEPORTS, NODEPORT_REJECT_CHAIN)
        };
        if cluster.is_empty() {
            self.element(none, key, format!("goto {reject}"));
            return;
        }
        if !policy_local {
            let c = self.route(id, proto, svc.affinity, pick, ep_key, cluster);
            self.element(table, key, format!("goto {c}"));
            return;
        }
        if !external {
            // internalTrafficPolicy Local: this node's endpoints, or nothing.
            // Only service addresses have an internal policy: NodePorts are always external.
            if local.is_empty() {
                self.element(NO_ENDPOINT_IPS, key, "drop".into());
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
        // Without affinity it only refers to shared picks, so services share it.
        if svc.affinity.is_none() {
            self.frag.shared.insert(name.clone(), rules);
        } else {
            self.frag.chains.insert(name.clone(), rules);
        }
        self.element(table, key, format!("goto {name}"));
    }

    fn service(mut self, svc: &Service, slices: &[Arc<Slice>], claims: &Claims) -> Fragment {
        let sid = svc.id();
        let mut local_ips = BTreeSet::new();
        for (p, (claimed_internal, claimed_external, claimed_np)) in svc.ports.iter().zip(&claims.0)
        {
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
                    self.frag.hairpin.insert(ip);
                }
            }
            let internal: Vec<Ipv4Addr> = svc
                .cluster_ip
                .filter(|_| *claimed_internal)
                .into_iter()
                .collect();
            let external: Vec<Ipv4Addr> = svc
                .external_ips
                .iter()
                .zip(claimed_external)
                .filter(|(_, ok)| **ok)
                .map(|(ip, _)| *ip)
                .collect();
            let node_port = p.node_port.filter(|_| *claimed_np);
            let mut frontends: Vec<Frontend> = internal
                .iter()
                .chain(&external)
                .map(|&ip| Frontend::Ip(ip, p.port))
                .collect();
            frontends.extend(node_port.map(Frontend::NodePort));
            self.frag.ports.insert(
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
            self.frag.health = Some((hc, local_ips.len()));
        }
        self.frag
    }
}

/// What a fragment was built from; the same inputs give the same fragment.
struct Inputs {
    facts: NodeFacts,
    service: Arc<Service>,
    slices: Vec<Arc<Slice>>,
    claims: Claims,
    fragment: Arc<Fragment>,
}

/// Compiles rulesets, rebuilding only the fragments of services whose inputs changed since the
/// last call (the service, its slices, its claims, the node's facts — compared by pointer for
/// the parsed objects, which the parse [`Cache`](crate::model::Cache) keeps while unchanged).
#[derive(Default)]
pub struct Compiler {
    cache: BTreeMap<String, Inputs>,
    /// The last result, its facts and the claim problems: the base of the fast path.
    last: Option<(NodeFacts, Ruleset, Vec<String>)>,
}

/// Fills the shared chains, the hairpin set and the health check ports from the fragments.
fn aggregate(rs: &mut Ruleset) {
    rs.shared.clear();
    rs.hairpin.clear();
    rs.health.clear();
    for (id, f) in &rs.services {
        for (k, v) in &f.shared {
            if !rs.shared.contains_key(k) {
                rs.shared.insert(k.clone(), v.clone());
            }
        }
        rs.hairpin.extend(f.hairpin.iter().copied());
        if let Some((hc, n)) = f.health {
            rs.health.insert(hc, (id.clone(), n));
        }
    }
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// Compiles the parsed objects for one node. Services are taken in id order, so when two
    /// claim the same frontend the first keeps it (and the other is named in `problems`).
    pub fn compile(&mut self, facts: &NodeFacts, objects: &Objects) -> Ruleset {
        if let Some(rs) = self.endpoints_only(facts, objects) {
            return rs;
        }
        let mut rs = Ruleset {
            problems: objects.problems.clone(),
            ..Ruleset::default()
        };
        // Slices by (namespace, service), once.
        let mut slices: BTreeMap<(&str, &str), Vec<Arc<Slice>>> = BTreeMap::new();
        for s in &objects.slices {
            slices
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s.clone());
        }
        let mut services: Vec<&Arc<Service>> = objects.services.iter().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let before = rs.problems.len();
        let claims = claim_all(&services, &mut rs.problems);
        let claim_problems = rs.problems[before..].to_vec();
        let mut fragments = Vec::with_capacity(services.len());
        let mut seen = BTreeSet::new();
        for (svc, claims) in services.into_iter().zip(claims) {
            let id = svc.id();
            let mine = slices
                .remove(&(svc.namespace.as_str(), svc.name.as_str()))
                .unwrap_or_default();
            let reuse = self.cache.get(&id).filter(|old| {
                Arc::ptr_eq(&old.service, svc)
                    && old.slices.len() == mine.len()
                    && old.slices.iter().zip(&mine).all(|(a, b)| Arc::ptr_eq(a, b))
                    && old.claims == claims
                    && old.facts == *facts
            });
            let fragment = match reuse {
                Some(old) => old.fragment.clone(),
                None => {
                    let fragment = Arc::new(
                        Builder {
                            facts,
                            frag: Fragment::default(),
                        }
                        .service(svc, &mine, &claims),
                    );
                    self.cache.insert(
                        id.clone(),
                        Inputs {
                            facts: facts.clone(),
                            service: svc.clone(),
                            slices: mine,
                            claims,
                            fragment: fragment.clone(),
                        },
                    );
                    fragment
                }
            };
            seen.insert(id.clone());
            fragments.push((id, fragment));
        }
        if self.cache.len() != seen.len() {
            self.cache.retain(|id, _| seen.contains(id));
        }
        // Bulk-built from sorted pairs (faster than one insert at a time).
        fragments.sort_by(|a, b| a.0.cmp(&b.0));
        rs.services = fragments.into_iter().collect();
        aggregate(&mut rs);
        self.last = Some((facts.clone(), rs.clone(), claim_problems));
        rs
    }

    /// The fast path when only endpoints changed (no Service object, same node facts): the last
    /// ruleset with the fragments of the services whose slices changed rebuilt. Claims cannot
    /// have moved, so nothing else can differ.
    fn endpoints_only(&mut self, facts: &NodeFacts, objects: &Objects) -> Option<Ruleset> {
        let dirty = objects.changed_endpoints.as_ref()?;
        let (last_facts, last, claim_problems) = self.last.as_ref()?;
        if last_facts != facts {
            return None;
        }
        let mut rs = Ruleset {
            services: last.services.clone(),
            problems: objects.problems.clone(),
            ..Ruleset::default()
        };
        rs.problems.extend(claim_problems.iter().cloned());
        for id in dirty {
            // A slice of a service that does not exist changes nothing.
            let Some(inputs) = self.cache.get_mut(id) else {
                continue;
            };
            let (ns, name) = id.split_once('/').unwrap_or((id, ""));
            let mine: Vec<Arc<Slice>> = objects
                .slices
                .iter()
                .filter(|s| s.namespace == ns && s.service == name)
                .cloned()
                .collect();
            let fragment = Arc::new(
                Builder {
                    facts,
                    frag: Fragment::default(),
                }
                .service(&inputs.service, &mine, &inputs.claims),
            );
            inputs.slices = mine;
            inputs.fragment = fragment.clone();
            rs.services.insert(id.clone(), fragment);
        }
        aggregate(&mut rs);
        let claim_problems = claim_problems.clone();
        self.last = Some((facts.clone(), rs.clone(), claim_problems));
        Some(rs)
    }
}

/// Compiles from scratch (a [`Compiler`] with nothing cached).
pub fn compile(facts: &NodeFacts, objects: &Objects) -> Ruleset {
    Compiler::new().compile(facts, objects)
}
