//! Services and EndpointSlices as the store holds them (standard Kubernetes JSON), reduced to
//! what the proxy needs. Parsing checks what kube-apiserver would have refused — Weft's store has
//! no admission step, so a bad object must be caught here, named, and kept out of the ruleset.

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice as KSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// Kubernetes spells protocols in capitals; `None` means TCP.
    pub fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// nft's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port's name; empty for the single unnamed port a service may have.
    pub name: String,
    pub proto: Proto,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    /// spec.externalIPs and status.loadBalancer.ingress[].ip, deduplicated.
    pub external_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub external_local: bool,
    pub internal_local: bool,
    /// sessionAffinity ClientIP: the timeout in seconds.
    pub affinity: Option<u32>,
    pub health_check_node_port: Option<u16>,
}

impl Service {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// The service this slice belongs to (its kubernetes.io/service-name label).
    pub service: String,
    /// (port name, protocol) → port number.
    pub ports: Vec<(String, Proto, u16)>,
    pub endpoints: Vec<Endpoint>,
}

/// What parsing a store value gave: a service to program, one to leave alone (headless,
/// ExternalName, or no IPv4 cluster IP), or a refusal naming the field.
#[derive(Debug)]
pub enum Parsed<T> {
    Use(T),
    Ignore(String),
}

fn port_number(v: i32, field: &str) -> Result<u16, String> {
    if (1..=65535).contains(&v) {
        Ok(v as u16)
    } else {
        Err(format!("{field} {v} is outside 1-65535"))
    }
}

/// Parses a v1 Service. `Err` is a refusal: the whole service stays out of the ruleset (as
/// kube-apiserver would have refused the whole object), and the message says why.
pub fn parse_service(json: &[u8], service_cidr: Ipv4Net) -> Result<Parsed<Service>, String> {
    let s: KService = serde_json::from_slice(json).map_err(|e| format!("not a v1 Service: {e}"))?;
    let meta = &s.metadata;
    let name = meta.name.clone().ok_or("metadata.name is missing")?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = s.spec.unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(Parsed::Ignore("type ExternalName".into()));
    }
    if !["ClusterIP", "NodePort", "LoadBalancer"].contains(&kind) {
        return Err(format!(
            "spec.type {kind:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"
        ));
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(Parsed::Ignore("headless (spec.clusterIP None)".into())),
        None | Some("") => None,
        Some(text) => match text.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) if service_cidr.contains(&ip) => Some(ip),
            Ok(std::net::IpAddr::V4(ip)) => {
                return Err(format!(
                    "spec.clusterIP {ip} is outside the service CIDR {service_cidr}"
                ))
            }
            Ok(std::net::IpAddr::V6(_)) => {
                return Ok(Parsed::Ignore(format!(
                    "spec.clusterIP {text} is IPv6; Weft programs IPv4 services"
                )))
            }
            Err(_) => return Err(format!("spec.clusterIP {text:?} is not an IP address")),
        },
    };
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let proto = Proto::parse(p.protocol.as_deref()).ok_or_else(|| {
            format!(
                "spec.ports[{i}].protocol {:?} is not TCP, UDP or SCTP",
                p.protocol.as_deref().unwrap_or_default()
            )
        })?;
        let port = port_number(p.port, &format!("spec.ports[{i}].port"))?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(n, &format!("spec.ports[{i}].nodePort"))?),
        };
        if let Some(j) = ports
            .iter()
            .position(|q| q.port == port && q.proto == proto)
        {
            return Err(format!(
                "spec.ports[{i}]: duplicate port {port}/{} (also spec.ports[{j}])",
                proto.as_str().to_uppercase()
            ));
        }
        let name = p.name.clone().unwrap_or_default();
        if let Some(j) = ports.iter().position(|q| q.name == name) {
            return Err(format!(
                "spec.ports[{i}]: duplicate port name {name:?} (also spec.ports[{j}])"
            ));
        }
        ports.push(ServicePort {
            name,
            proto,
            port,
            node_port,
        });
    }
    let mut external_ips = Vec::new();
    let lb_ips = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        // ipMode Proxy: the load balancer delivers to the node, not to the VIP.
        .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ing| {
            ing.ip
                .as_deref()
                .map(|ip| (ip, "status.loadBalancer.ingress[].ip"))
        });
    let ext = spec
        .external_ips
        .iter()
        .flatten()
        .map(|ip| (ip.as_str(), "spec.externalIPs[]"));
    for (text, field) in ext.chain(lb_ips) {
        match text.parse::<Ipv4Addr>() {
            Ok(ip) if !external_ips.contains(&ip) => external_ips.push(ip),
            Ok(_) => {}
            Err(_) => return Err(format!("{field} {text:?} is not an IPv4 address")),
        }
    }
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            if !(1..=86400).contains(&t) {
                return Err(format!(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1-86400"
                ));
            }
            Some(t as u32)
        }
        Some(other) => {
            return Err(format!(
                "spec.sessionAffinity {other:?} is not None or ClientIP"
            ))
        }
    };
    let policy = |v: Option<&str>, field: &str| match v {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!("{field} {other:?} is not Cluster or Local")),
    };
    let external_local = policy(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )?;
    let internal_local = policy(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )?;
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => Some(port_number(n, "spec.healthCheckNodePort")?),
    };
    Ok(Parsed::Use(Service {
        namespace,
        name,
        cluster_ip,
        external_ips,
        ports,
        external_local,
        internal_local,
        affinity,
        health_check_node_port,
    }))
}

/// Parses a discovery.k8s.io/v1 EndpointSlice. Only IPv4 slices are used; endpoints whose
/// addresses are not IPv4 are skipped.
pub fn parse_slice(json: &[u8]) -> Result<Parsed<Slice>, String> {
    let s: KSlice = serde_json::from_slice(json)
        .map_err(|e| format!("not a discovery.k8s.io/v1 EndpointSlice: {e}"))?;
    let meta = &s.metadata;
    let name = meta.name.clone().ok_or("metadata.name is missing")?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let Some(service) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        return Ok(Parsed::Ignore(format!("no {SERVICE_NAME_LABEL} label")));
    };
    if s.address_type != "IPv4" {
        return Ok(Parsed::Ignore(format!("addressType {}", s.address_type)));
    }
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let proto = Proto::parse(p.protocol.as_deref()).ok_or_else(|| {
            format!(
                "ports[{i}].protocol {:?} is not TCP, UDP or SCTP",
                p.protocol
            )
        })?;
        let Some(port) = p.port else { continue };
        ports.push((
            p.name.clone().unwrap_or_default(),
            proto,
            port_number(port, &format!("ports[{i}].port"))?,
        ));
    }
    let mut endpoints = Vec::new();
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        let Some(addr) = e.addresses.first() else {
            continue;
        };
        let ip: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("endpoints[{i}].addresses[0] {addr:?} is not an IPv4 address"))?;
        let c = e.conditions.clone().unwrap_or_default();
        // The API's defaults: ready unset means ready; serving unset follows ready.
        let ready = c.ready.unwrap_or(true);
        endpoints.push(Endpoint {
            ip,
            node: e.node_name.clone(),
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        });
    }
    Ok(Parsed::Use(Slice {
        namespace,
        name,
        service,
        ports,
        endpoints,
    }))
}

/// The parsed contents of the store's Service and EndpointSlice prefixes, with one problem line
/// for every object that was refused.
#[derive(Default, Debug)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<Slice>>,
    pub problems: Vec<String>,
    /// From a [`Cache`] that saw the previous contents: what changed since. `None` when unknown
    /// (a first parse) or when a Service itself changed (its frontends may move claims between
    /// services, so everything is compiled again).
    pub changed_endpoints: Option<BTreeSet<String>>,
}

/// Parses every value under the two prefixes (store key → JSON).
pub fn parse_all(
    services: &BTreeMap<String, Vec<u8>>,
    slices: &BTreeMap<String, Vec<u8>>,
    service_cidr: Ipv4Net,
) -> Objects {
    Cache::default().update(services, slices, service_cidr)
}

/// Parsed objects kept between syncs: a value is parsed again only when its bytes change, so a
/// change to one object among 20,000 costs one parse, not 20,000.
/// Store key → (its bytes, what parsing them gave).
type Entries<T> = BTreeMap<String, (Vec<u8>, Result<Parsed<Arc<T>>, String>)>;

#[derive(Default)]
pub struct Cache {
    services: Entries<Service>,
    slices: Entries<Slice>,
    /// Whether an update has run (so that changes can be told).
    primed: bool,
}

/// Makes `cache` hold exactly the keys of `now`, parsing only values that are new or changed;
/// unchanged entries are left in place (no copies). Calls `changed` with the old and new result
/// of every key that changed.
fn refresh<T>(
    cache: &mut Entries<T>,
    now: &BTreeMap<String, Vec<u8>>,
    parse: impl Fn(&[u8]) -> Result<Parsed<T>, String>,
    mut changed: impl FnMut(
        Option<&Result<Parsed<Arc<T>>, String>>,
        Option<&Result<Parsed<Arc<T>>, String>>,
    ),
) {
    let parse = |v: &[u8]| {
        parse(v).map(|p| match p {
            Parsed::Use(t) => Parsed::Use(Arc::new(t)),
            Parsed::Ignore(why) => Parsed::Ignore(why),
        })
    };
    if cache.len() == now.len() && cache.keys().eq(now.keys()) {
        // The usual case: the same keys, a few values changed. One walk, no lookups.
        for ((_, entry), (_, v)) in cache.iter_mut().zip(now) {
            if entry.0 != *v {
                let new = (v.clone(), parse(v));
                changed(Some(&entry.1), Some(&new.1));
                *entry = new;
            }
        }
        return;
    }
    cache.retain(|k, (_, old)| {
        let keep = now.contains_key(k);
        if !keep {
            changed(Some(old), None);
        }
        keep
    });
    for (k, v) in now {
        match cache.get_mut(k) {
            Some((bytes, _)) if bytes == v => {}
            Some(entry) => {
                let new = (v.clone(), parse(v));
                changed(Some(&entry.1), Some(&new.1));
                *entry = new;
            }
            None => {
                let new = (v.clone(), parse(v));
                changed(None, Some(&new.1));
                cache.insert(k.clone(), new);
            }
        }
    }
}

impl Cache {
    /// Brings the cache up to the given store contents and returns the objects, as
    /// [`parse_all`] would.
    pub fn update(
        &mut self,
        services: &BTreeMap<String, Vec<u8>>,
        slices: &BTreeMap<String, Vec<u8>>,
        service_cidr: Ipv4Net,
    ) -> Objects {
        let mut services_changed = !self.primed;
        refresh(
            &mut self.services,
            services,
            |v| parse_service(v, service_cidr),
            |_, _| services_changed = true,
        );
        let mut dirty = BTreeSet::new();
        let mut owner = |r: Option<&Result<Parsed<Arc<Slice>>, String>>| {
            if let Some(Ok(Parsed::Use(s))) = r {
                dirty.insert(format!("{}/{}", s.namespace, s.service));
            }
        };
        refresh(&mut self.slices, slices, parse_slice, |old, new| {
            owner(old);
            owner(new);
        });
        self.primed = true;
        let mut o = Objects {
            changed_endpoints: (!services_changed).then_some(dirty),
            ..Objects::default()
        };
        for (key, (_, r)) in &self.services {
            match r {
                Ok(Parsed::Use(s)) => o.services.push(s.clone()),
                Ok(Parsed::Ignore(_)) => {}
                Err(e) => o.problems.push(format!("{key}: {e}; not programmed")),
            }
        }
        for (key, (_, r)) in &self.slices {
            match r {
                Ok(Parsed::Use(s)) => o.slices.push(s.clone()),
                Ok(Parsed::Ignore(_)) => {}
                Err(e) => o.problems.push(format!("{key}: {e}; not used")),
            }
        }
        o
    }
}
