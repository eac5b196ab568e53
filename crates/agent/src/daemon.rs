//! The agent's life: lease a subnet, write subnet.env, keep the lease alive, watch the peers'
//! leases, and reconcile the backend from them — on every change and on a timer. The Services
//! task (services.rs) keeps Weft's nft table, pod egress masquerade included.
//!
//! Restarts never disturb the datapath: nothing is flushed at start or exit; the first reconcile
//! waits for the full peer list, then changes only what differs.
//!
//! What keeps a peer out of reach is logged, counted (`weft_peer_problems`) and published as
//! Warning events (events.rs). `weftctl node leave` asks a running agent to leave by writing
//! `/weft/leave/<node>`: the agent releases its lease, removes what it made and exits.

use crate::backend::{self, reconcile::reconcile, Problem, Reason, Underlay};
use crate::config::Config;
use crate::http::{self, Health};
use crate::lease::{candidates, lease_key, Lease, LEASE_PREFIX};
use crate::network::{store_error, Refused};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};
use weft_net::Netlink;
use weft_plugin::config::Mode;
use weft_plugin::subnet_env::SubnetEnv;
use weft_store::{Error as StoreError, LeaseId, Revision, Store};

#[derive(Clone)]
struct Metrics {
    /// 1 for the subnet this node holds (label `subnet`).
    lease: Family<Vec<(&'static str, String)>, Gauge>,
    peers: Gauge,
    peer_problems: Gauge,
    lease_renewals: Counter,
    lease_renew_errors: Counter,
    reconciles: Counter,
    reconcile_errors: Counter,
    reconcile_changes: Counter,
    reconcile_seconds: Histogram,
}

impl Metrics {
    fn new() -> (Metrics, Registry) {
        let m = Metrics {
            lease: Family::default(),
            peers: Gauge::default(),
            peer_problems: Gauge::default(),
            lease_renewals: Counter::default(),
            lease_renew_errors: Counter::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_changes: Counter::default(),
            reconcile_seconds: Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
        };
        let mut r = Registry::with_prefix("weft");
        r.register(
            "lease",
            "The subnet this node holds (1 while held)",
            m.lease.clone(),
        );
        r.register("peers", "Peer nodes with a lease", m.peers.clone());
        r.register(
            "peer_problems",
            "Problems with peers now: unreachable, or on other settings (see the events)",
            m.peer_problems.clone(),
        );
        r.register(
            "lease_renewals",
            "Lease keepalives that succeeded",
            m.lease_renewals.clone(),
        );
        r.register(
            "lease_renew_errors",
            "Lease keepalives that failed",
            m.lease_renew_errors.clone(),
        );
        r.register("reconciles", "Reconcile passes", m.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconcile passes that failed",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_changes",
            "Kernel objects changed by reconciles",
            m.reconcile_changes.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time per reconcile pass",
            m.reconcile_seconds.clone(),
        );
        (m, r)
    }
}

/// A value the agent keeps in `<state-dir>/<name>` across restarts (None: absent or unreadable).
pub(crate) fn read_state<T: std::str::FromStr>(cfg: &Config, name: &str) -> Option<T> {
    std::fs::read_to_string(cfg.state_dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes `<state-dir>/<name>`, then renames it into place: a torn file would lose the value.
pub(crate) fn write_state(
    cfg: &Config,
    name: &str,
    value: impl std::fmt::Display,
) -> Result<(), String> {
    let (tmp, path) = (
        cfg.state_dir.join(format!(".{name}.tmp")),
        cfg.state_dir.join(name),
    );
    std::fs::create_dir_all(&cfg.state_dir)
        .and_then(|()| std::fs::write(&tmp, format!("{value}\n")))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `<state-dir>/subnet`: the subnet last held.
const SUBNET_STATE: &str = "subnet";

/// Leases a subnet for this node: its own lease if the store still has one (a restart), else its
/// previous subnet if free, else the first free candidate. Every write is a compare-and-swap, so
/// racing agents never share a subnet.
pub async fn acquire<S: Store>(
    store: &S,
    cfg: &Config,
    underlay: &Underlay,
    lease_id: LeaseId,
) -> Result<Lease, String> {
    let mine = |subnet| Lease {
        node: cfg.node_name.clone(),
        subnet,
        underlay_ip: underlay.ip,
        backend: cfg.backend,
        vtep_mac: cfg
            .backend
            .uses_vxlan()
            .then(|| weft_net::format_mac(&backend::vtep_mac(subnet))),
        vxlan: cfg.vxlan(),
    };
    for _attempt in 0..10 {
        let (kvs, _) = store.list(LEASE_PREFIX).await.map_err(|e| e.to_string())?;
        // Taken means a key exists, even one whose record does not parse: it cannot be created.
        let taken: std::collections::HashSet<String> =
            kvs.iter().map(|kv| kv.key.clone()).collect();
        let leases: Vec<(weft_store::KeyValue, Lease)> = kvs
            .into_iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok().map(|l| (kv, l)))
            .collect();
        if let Some((kv, own)) = leases.iter().find(|(_, l)| {
            l.node == cfg.node_name
                && cfg.cluster_cidr.contains(&l.subnet)
                && l.subnet.prefix_len() == cfg.subnet_len
        }) {
            let lease = mine(own.subnet);
            let json = serde_json::to_vec(&lease).expect("serializable");
            match store
                .cas(&kv.key, kv.mod_revision, &json, Some(lease_id))
                .await
            {
                Ok(Some(_)) => return Ok(lease),
                Ok(None) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut raced = false;
        for subnet in candidates(
            cfg.cluster_cidr,
            cfg.subnet_len,
            &cfg.node_name,
            read_state(cfg, SUBNET_STATE),
        ) {
            if taken.contains(&lease_key(subnet)) {
                continue;
            }
            let lease = mine(subnet);
            let json = serde_json::to_vec(&lease).expect("serializable");
            match store
                .cas(&lease_key(subnet), 0, &json, Some(lease_id))
                .await
            {
                Ok(Some(_)) => return Ok(lease),
                Ok(None) => {
                    raced = true;
                    break;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if !raced {
            let n = cfg
                .cluster_cidr
                .subnets(cfg.subnet_len)
                .map(|s| s.count())
                .unwrap_or(0);
            return Err(format!(
                "no free /{} subnet in the cluster CIDR {}: all {n} are leased",
                cfg.subnet_len, cfg.cluster_cidr
            ));
        }
    }
    Err("could not lease a subnet: every attempt lost a race to another node".into())
}

/// In bridge mode, pods of one node talk across their bridge at layer 2. A Service connection
/// from one pod to an endpoint on the same bridge then has its reply switched past the IP hooks,
/// so its DNAT is never undone (the client gets an answer from the endpoint's own address, and
/// resets), unless the bridge passes bridged IPv4 through them: its own `nf_call_iptables`, with
/// br_netfilter loaded. Kept on, like ip_forward, for every bridge that has this network's pods as
/// ports (its name is the CNI conf's); other bridges, and the namespace-wide sysctl, are left as
/// they are. Returns what to warn of.
async fn bridge_netfilter(nl: &Netlink, cfg: &Config) -> Option<String> {
    if cfg.mode != "bridge" {
        return None;
    }
    // Its sysctls are in every namespace since Linux 5.3, only in the host's before; the module's
    // directory is in every namespace's /sys (but absent when it is built in).
    let loaded = ["/proc/sys/net/bridge", "/sys/module/br_netfilter"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if !loaded {
        return Some(
            "br_netfilter is not loaded (no /proc/sys/net/bridge, no /sys/module/br_netfilter), so a pod cannot reach a \
             Service whose endpoint is on its own bridge; load it (modprobe br_netfilter, as \
             kubeadm asks) or wire pods in routed mode (--mode routed)"
                .into(),
        );
    }
    let links = match nl.links().await {
        Ok(l) => l,
        Err(e) => return Some(format!("listing links to find the pod bridges: {e}")),
    };
    let bridges: std::collections::HashSet<u32> = links
        .iter()
        .filter(|l| weft_plugin::names::is_network_veth(l.alias.as_deref(), &cfg.network_name))
        .filter_map(|l| l.controller)
        .collect();
    for b in links.iter().filter(|l| bridges.contains(&l.index)) {
        if b.bridge_nf_call_iptables == Some(false) {
            match nl.set_bridge_nf_call_iptables(&b.name, true).await {
                Ok(()) => info!(
                    "bridge {} passed bridged IPv4 past the IP hooks; turned nf_call_iptables \
                     on (Services between its pods need it)",
                    b.name
                ),
                Err(e) => return Some(e.to_string()),
            }
        }
    }
    None
}

fn subnet_env_path(cfg: &Config) -> std::path::PathBuf {
    cfg.run_dir.join(weft_plugin::config::SUBNET_FILE)
}

/// Writes subnet.env (an unreadable old file is written over).
fn write_subnet_env(cfg: &Config, lease: &Lease, underlay: &Underlay) -> Result<(), String> {
    let path = subnet_env_path(cfg);
    let env = SubnetEnv {
        network: Some(cfg.cluster_cidr),
        subnet: Some(lease.subnet),
        mtu: Some(cfg.backend.pod_mtu(underlay.mtu)),
        mode: Mode::parse(&cfg.mode),
        network_name: Some(cfg.network_name.clone()),
    };
    env.write(&path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    remember_subnet(cfg, lease.subnet)
}

/// Keeps the node's subnet in `<state-dir>/subnet`, to ask for it again if the lease expires
/// while the agent is away.
pub fn remember_subnet(cfg: &Config, subnet: ipnet::Ipv4Net) -> Result<(), String> {
    write_state(cfg, SUBNET_STATE, subnet)
}

/// A store prefix mirrored in memory.
pub type Mirror = Arc<Mutex<View>>;

/// What a mirror holds: each key's value, and the revision of its last change (which says
/// whether the view has a given write: see [`View::digest`]).
#[derive(Default)]
pub struct View {
    pub values: BTreeMap<String, Vec<u8>>,
    pub revisions: BTreeMap<String, Revision>,
}

impl View {
    fn clear(&mut self) {
        self.values.clear();
        self.revisions.clear();
    }

    fn insert(&mut self, kv: weft_store::KeyValue) {
        self.revisions.insert(kv.key.clone(), kv.mod_revision);
        self.values.insert(kv.key, kv.value);
    }

    fn remove(&mut self, key: &str) {
        self.values.remove(key);
        self.revisions.remove(key);
    }

    /// The keys in order, with the revisions of their last changes.
    pub fn keys(&self) -> impl Iterator<Item = (&str, Revision)> {
        self.revisions.iter().map(|(k, r)| (k.as_str(), *r))
    }
}

/// A digest of a set of store keys with the revisions of their last changes, given in key order:
/// equal for two views of a prefix exactly when they hold the same writes (every write gives its
/// key a new revision). FNV-1a, stable across builds and machines, over each key, 0xff (never in
/// UTF-8, so a key cannot run into its revision) and the revision's 8 bytes, little-endian.
pub fn digest<'a>(keys: impl IntoIterator<Item = (&'a str, Revision)>) -> u64 {
    weft_plugin::names::fnv1a(
        keys.into_iter()
            .flat_map(|(key, rev)| key.bytes().chain([0xff]).chain(rev.to_le_bytes())),
    )
}

/// Keeps `view` equal to the store under `prefix`: list, then watch from the list's revision;
/// list again after a compaction or when the watch gives up. `synced` fires after each full
/// list, `changed` after every change.
pub async fn mirror<S: Store>(
    store: Arc<S>,
    prefix: &'static str,
    view: Mirror,
    changed: Arc<Notify>,
    synced: Arc<Notify>,
) {
    loop {
        let rev = match store.list(prefix).await {
            Ok((kvs, rev)) => {
                let mut v = view.lock().expect("not poisoned");
                v.clear();
                for kv in kvs {
                    v.insert(kv);
                }
                drop(v);
                changed.notify_one();
                synced.notify_one();
                rev
            }
            Err(e) => {
                warn!("listing {prefix}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut events = store.watch(prefix, rev);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(weft_store::Event::Put(kv)) => {
                    view.lock().expect("not poisoned").insert(kv);
                    changed.notify_one();
                }
                Ok(weft_store::Event::Delete { key, .. }) => {
                    view.lock().expect("not poisoned").remove(&key);
                    changed.notify_one();
                }
                Err(StoreError::Compacted { .. }) => break,
                Err(e) => {
                    warn!("watching {prefix}: {e}; listing again");
                    break;
                }
            }
        }
        // The stream ended (compaction, an error, or a store that gave up): list again, without
        // spinning if the store keeps failing.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Grants a store lease and leases a subnet, trying again (1 s, doubling to 10 s) until both
/// succeed. A store that is away when the agent starts is waited for here, serving /healthz and a
/// 503 /readyz, rather than by exiting into a supervisor's growing restart back-off; whatever an
/// earlier run left in the kernel keeps working meanwhile. So is a full cluster CIDR (a node may
/// leave). Settings that are not the cluster's (network.rs), and a store that refuses the grant
/// for good (not a connection problem: permissions, a read-only file), are errors: waiting would
/// only hide them.
async fn lease_until_done<S: Store>(
    store: &S,
    cfg: &Config,
    underlay: &Underlay,
) -> Result<(LeaseId, Lease, Config), String> {
    let mut delay = Duration::from_secs(1);
    loop {
        match lease_once(store, cfg, underlay).await {
            Ok(done) => return Ok(done),
            Err(Refused::Fatal(e)) => return Err(e),
            Err(Refused::Again(e)) => {
                error!("{e}; trying again in {} s", delay.as_secs());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Checks (and completes) the network settings, then leases with them. Returns the settings too:
/// `cfg` with the cluster's wherever it gave none.
async fn lease_once<S: Store>(
    store: &S,
    cfg: &Config,
    underlay: &Underlay,
) -> Result<(LeaseId, Lease, Config), Refused> {
    let cfg = crate::network::check(store, cfg).await?;
    let (id, l) = grant_and_acquire(store, &cfg, underlay).await?;
    Ok((id, l, cfg))
}

/// A store lease, and the node's subnet on it (the store lease revoked again if no subnet could
/// be had).
async fn grant_and_acquire<S: Store>(
    store: &S,
    cfg: &Config,
    underlay: &Underlay,
) -> Result<(LeaseId, Lease), Refused> {
    let id = store.grant(cfg.lease_ttl).await.map_err(|e| {
        let what = format!(
            "granting a store lease of {} s in {}",
            cfg.lease_ttl.as_secs(),
            cfg.store
        );
        store_error(what, e)
    })?;
    match acquire(store, cfg, underlay, id).await {
        Ok(l) => Ok((id, l)),
        Err(e) => {
            let _ = store.revoke(id).await;
            Err(Refused::Again(e))
        }
    }
}

/// Where `weftctl node leave` asks a node's agent to leave.
pub const LEAVE_PREFIX: &str = "/weft/leave/";

pub fn leave_key(node: &str) -> String {
    format!("{LEAVE_PREFIX}{node}")
}

/// Renews the lease every third of its TTL. If the store lost it (expired while the store or
/// this agent was away), leases again, preferring the same subnet, and publishes the result.
/// `lease_id` always holds the store lease in use; `underlay` the underlay as last seen.
async fn keep_lease<S: Store>(
    store: Arc<S>,
    cfg: Config,
    underlay: Arc<Mutex<Underlay>>,
    lease_id: Arc<AtomicI64>,
    current: watch::Sender<Lease>,
    m: Metrics,
) {
    let every = cfg.lease_ttl / 3;
    // After a failed renewal, retry every second rather than every third of the TTL: a short store
    // hiccup must not cost the lease (and let another node take the subnet).
    let mut next = every;
    loop {
        tokio::time::sleep(next).await;
        next = every;
        let id = lease_id.load(Ordering::Relaxed);
        match store.keepalive(id).await {
            Ok(()) => {
                m.lease_renewals.inc();
            }
            Err(StoreError::LeaseNotFound(_)) => {
                m.lease_renew_errors.inc();
                warn!("the store lost lease {id}; leasing again");
                let underlay = underlay.lock().expect("not poisoned").clone();
                // With the settings this agent runs, even if the cluster's have changed since
                // (`weftctl network set`): dropping the subnet before a restart onto the new
                // ones would leave this node's pods without a lease, and their subnet free.
                if let Err(Refused::Fatal(e)) = crate::network::check(&*store, &cfg).await {
                    warn!("restart this agent to take the cluster's settings: {e}");
                }
                match grant_and_acquire(&*store, &cfg, &underlay).await {
                    Ok((id, l)) => {
                        // Stored with no await since the record was written, so the main loop
                        // (same thread) never sees the record before the id it was written with.
                        lease_id.store(id, Ordering::Relaxed);
                        if l.subnet != current.borrow().subnet {
                            error!(
                                "this node's subnet changed to {} (the old one was taken)",
                                l.subnet
                            );
                            if let Err(e) = write_subnet_env(&cfg, &l, &underlay) {
                                error!("{e}");
                            }
                        }
                        let _ = current.send(l);
                    }
                    Err(Refused::Again(e) | Refused::Fatal(e)) => error!("leasing again: {e}"),
                }
            }
            Err(e) => {
                // The store is away; the lease (and the datapath) stay as they are.
                m.lease_renew_errors.inc();
                next = Duration::from_secs(1).min(every);
                warn!("renewing lease {id}: {e}");
            }
        }
    }
}

pub async fn run<S: Store>(cfg: Config, store: Arc<S>) -> Result<(), String> {
    let nl = Netlink::connect().map_err(|e| e.to_string())?;
    let underlay = crate::underlay::detect(&nl, cfg.iface.as_deref()).await?;
    info!(
        "node {} underlay {} {} ({})",
        cfg.node_name, underlay.name, underlay.ip, underlay.net
    );
    if cfg.leave {
        return leave(&cfg, &*store, &nl, &underlay).await;
    }
    // A request that waited for this agent (it was down when `weftctl node leave` ran).
    match store.get(&leave_key(&cfg.node_name)).await {
        Ok(Some(_)) => return leave_on_request(&cfg, &*store, &nl, &underlay, None).await,
        Ok(None) => {}
        Err(e) => warn!("looking for a leave request: {e}"),
    }
    let (m, mut registry) = Metrics::new();
    let service_metrics = crate::services::Metrics::register(&mut registry);
    let health = Arc::new(Health {
        ready: false.into(),
        services_ready: false.into(),
        registry: Mutex::new(registry),
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", cfg.listen))?;
    tokio::spawn(http::serve(listener, health.clone()));

    // From here on the settings are the cluster's where this node was given none.
    let (lease_id, lease, settled) = lease_until_done(&*store, &cfg, &underlay).await?;
    crate::network::warn_unused(&cfg, settled.backend);
    let cfg = settled;
    info!(
        "leased {} (store lease {lease_id}), backend {}",
        lease.subnet,
        cfg.backend.as_str()
    );
    // What subnet.env said before this start: the pods' MTU, for a state dir without its record.
    let before = SubnetEnv::read(&subnet_env_path(&cfg))
        .ok()
        .flatten()
        .and_then(|e| e.mtu);
    write_subnet_env(&cfg, &lease, &underlay)?;
    // The underlay's MTU or the backend may have changed while the agent was away.
    let mut pod_mtu = crate::pod_mtu::Follower::default();
    pod_mtu
        .settle(&nl, &cfg, cfg.backend.pod_mtu(underlay.mtu), before)
        .await;
    weft_net::sysctl::set("net.ipv4.ip_forward", "1").map_err(|e| e.to_string())?;

    let (lease_tx, mut lease_rx) = watch::channel(lease);
    let lease_id = Arc::new(AtomicI64::new(lease_id));
    let mut underlay = underlay;
    let seen_underlay = Arc::new(Mutex::new(underlay.clone()));
    let keeper = tokio::spawn(keep_lease(
        store.clone(),
        cfg.clone(),
        seen_underlay.clone(),
        lease_id.clone(),
        lease_tx.clone(),
        m.clone(),
    ));
    let (stop_services, stop) = watch::channel(false);
    let services = tokio::spawn(crate::services::run(
        store.clone(),
        cfg.clone(),
        lease_rx.clone(),
        service_metrics,
        health.clone(),
        stop,
    ));
    let view = Mirror::default();
    let changed = Arc::new(Notify::new());
    let synced = Arc::new(Notify::new());
    tokio::spawn(mirror(
        store.clone(),
        LEASE_PREFIX,
        view.clone(),
        changed.clone(),
        synced.clone(),
    ));
    let leave_requests = Mirror::default();
    tokio::spawn(mirror(
        store.clone(),
        LEAVE_PREFIX,
        leave_requests.clone(),
        changed.clone(),
        Arc::new(Notify::new()),
    ));
    // The first reconcile waits for the full list: reconciling from a partial view would delete
    // routes to peers not yet seen.
    synced.notified().await;

    let mut last_problems: Vec<Problem> = Vec::new();
    // The store lease the published events are attached to (None: publish again).
    let mut published: Option<LeaseId> = None;
    let mut last_check = Instant::now() - cfg.resync;
    // Whether the br_netfilter warning was given (once, until it clears).
    let mut bridge_nf_warned = false;
    loop {
        if keeper.is_finished() {
            return Err(
                "the lease keeper stopped; exiting so that a supervisor restarts weftd".into(),
            );
        }
        if leave_requests
            .lock()
            .expect("not poisoned")
            .values
            .contains_key(&leave_key(&cfg.node_name))
        {
            health.ready.store(false, Ordering::Relaxed);
            // Nothing may renew the lease or rewrite the table behind the leave: the lease
            // keeper is cancelled, the Services task finishes a sync in flight and returns (an
            // nft run cannot be cut short, so this waits for it however long it takes).
            keeper.abort();
            let _ = keeper.await;
            let _ = stop_services.send(true);
            let mut services = services;
            while tokio::time::timeout(Duration::from_secs(10), &mut services)
                .await
                .is_err()
            {
                warn!("leaving: waiting for the Services task to finish its sync");
            }
            let id = lease_id.load(Ordering::Relaxed);
            return leave_on_request(&cfg, &*store, &nl, &underlay, Some(id)).await;
        }
        if last_check.elapsed() >= cfg.resync {
            last_check = Instant::now();
            // Forwarding is part of the datapath the drift check keeps, and so are bridged
            // packets through the IP hooks in bridge mode.
            if let Err(e) = weft_net::sysctl::set("net.ipv4.ip_forward", "1") {
                error!("{e}");
            }
            match bridge_netfilter(&nl, &cfg).await {
                Some(w) if !bridge_nf_warned => {
                    warn!("{w}");
                    bridge_nf_warned = true;
                }
                Some(_) => {}
                None => bridge_nf_warned = false,
            }
            // So is the underlay: a node whose address changed (DHCP, a re-plumbed NIC) tells
            // its peers through its lease (below), and remakes weft.vxlan on the new address.
            let held = lease_rx.borrow().clone();
            let now = follow_underlay(&nl, &cfg, &underlay, &held).await;
            if now != underlay {
                underlay = now;
                *seen_underlay.lock().expect("not poisoned") = underlay.clone();
            }
            // Pods follow a new MTU; a move that failed part way is tried again here.
            pod_mtu
                .settle(&nl, &cfg, cfg.backend.pod_mtu(underlay.mtu), None)
                .await;
        }
        // The lease says where peers reach this node. The lease keeper may have leased again
        // with the underlay it knew when it started, so this is checked on every pass.
        if lease_rx.borrow().underlay_ip != underlay.ip {
            lease_tx.send_modify(|l| l.underlay_ip = underlay.ip);
        }
        let local = lease_rx.borrow_and_update().clone();
        let held = vec![("subnet", local.subnet.to_string())];
        if m.lease.get(&held).is_none() {
            m.lease.clear();
        }
        m.lease.get_or_create(&held).set(1);
        let (peers, own): (Vec<Lease>, Option<Lease>) = {
            let v = &view.lock().expect("not poisoned").values;
            let peers = v
                .values()
                .filter_map(|v| serde_json::from_slice(v).ok())
                .collect();
            let own = v
                .get(&lease_key(local.subnet))
                .and_then(|v| serde_json::from_slice(v).ok());
            (peers, own)
        };
        let mut record_problem = None;
        if own.as_ref() != Some(&local) {
            // Deleted by hand (or expired, and the lease keeper is leasing again), or stale (the
            // underlay changed): the peers route by this record. Level-triggered, so fix it.
            record_problem =
                sync_lease_record(&*store, &local, lease_id.load(Ordering::Relaxed)).await;
        }
        let plan = backend::plan(cfg.backend, cfg.cluster_cidr, &local, &underlay, &peers);
        m.peers
            .set(peers.iter().filter(|l| l.node != local.node).count() as i64);
        let start = Instant::now();
        m.reconciles.inc();
        let mut problems = plan.problems.clone();
        problems.extend(record_problem);
        match reconcile(&nl, &plan, &underlay).await {
            Ok(done) => {
                m.reconcile_changes.inc_by(done.changes as u64);
                if done.changes > 0 {
                    info!(
                        "reconciled: {} change(s), {} peer route(s)",
                        done.changes,
                        plan.routes.len() - done.conflicts.len()
                    );
                }
                problems.extend(done.conflicts);
                health.ready.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                m.reconcile_errors.inc();
                error!("reconcile: {e}");
                // Conflicts are only known from a pass that read the routes: keep the last ones
                // rather than clear their events for one failed pass.
                problems.extend(
                    last_problems
                        .iter()
                        .filter(|p| p.reason == Reason::RouteConflict)
                        .cloned(),
                );
            }
        }
        m.reconcile_seconds.observe(start.elapsed().as_secs_f64());
        problems.sort();
        m.peer_problems.set(problems.len() as i64);
        if problems != last_problems {
            for p in problems.iter().filter(|p| !last_problems.contains(p)) {
                warn!("{p}");
            }
            last_problems = problems;
            published = None;
        }
        let id = lease_id.load(Ordering::Relaxed);
        if published != Some(id) {
            // Bounded: a store that is away must not hold up the drift check.
            let node = &cfg.node_name;
            let sent = tokio::time::timeout(
                Duration::from_secs(2),
                crate::events::publish(&*store, node, id, &last_problems),
            )
            .await;
            match sent {
                Ok(Ok(())) => published = Some(id),
                Ok(Err(e)) => warn!("publishing events: {e}"),
                Err(_) => warn!("publishing events: the store did not answer within 2 s"),
            }
        }
        // Woken by a change, or at the next drift check (which events do not put off).
        let next_check = cfg.resync.saturating_sub(last_check.elapsed());
        tokio::select! {
            _ = changed.notified() => {}
            _ = lease_rx.changed() => {}
            _ = tokio::time::sleep(next_check.max(Duration::from_millis(10))) => {}
        }
    }
}

/// The underlay as it is now (`underlay::detect_again`): on a change, logs the old and the new,
/// and on a new MTU rewrites subnet.env (the caller then moves the running pods, `pod_mtu`).
/// While detection fails, the old one stays.
async fn follow_underlay(
    nl: &Netlink,
    cfg: &Config,
    underlay: &Underlay,
    lease: &Lease,
) -> Underlay {
    let now = match crate::underlay::detect_again(nl, cfg.iface.as_deref(), underlay).await {
        Ok(now) => now,
        Err(e) => {
            warn!("checking the underlay (keeping {}): {e}", underlay.ip);
            return underlay.clone();
        }
    };
    if now != *underlay {
        warn!(
            "the underlay changed: {} {} ({}, MTU {}) is now {} {} ({}, MTU {})",
            underlay.name,
            underlay.ip,
            underlay.net,
            underlay.mtu,
            now.name,
            now.ip,
            now.net,
            now.mtu
        );
        if now.mtu != underlay.mtu {
            if let Err(e) = write_subnet_env(cfg, lease, &now) {
                error!("{e}");
            }
        }
    }
    now
}

/// Makes this node's lease record say `local` again: puts it back where it was deleted, or
/// rewrites its own stale record (one on this agent's store lease). Compare-and-swap throughout:
/// if another agent (or this one's lease keeper) wrote the key meanwhile, that write stands. A
/// record of another agent is never overwritten; one under this node's name is a problem to
/// report (two nodes with one name fight over it).
async fn sync_lease_record<S: Store>(
    store: &S,
    local: &Lease,
    lease_id: LeaseId,
) -> Option<Problem> {
    let key = lease_key(local.subnet);
    let json = serde_json::to_vec(local).expect("serializable");
    let expected = match store.get(&key).await {
        Ok(None) => 0,
        Ok(Some(kv)) => match serde_json::from_slice::<Lease>(&kv.value) {
            Ok(l) if l == *local => return None,
            Ok(_) if kv.lease == Some(lease_id) => kv.mod_revision,
            Ok(l) if l.node == local.node => {
                return Some(Problem {
                    peer: local.node.clone(),
                    reason: Reason::NodeNameTaken,
                    message: format!(
                        "another agent holds {key} under this node's name {} (underlay {}): \
                         two nodes share the name; give each its own --node-name",
                        l.node, l.underlay_ip
                    ),
                })
            }
            _ => return None,
        },
        Err(e) => {
            warn!("reading the lease record {key}: {e}");
            return None;
        }
    };
    match store.cas(&key, expected, &json, Some(lease_id)).await {
        Ok(Some(_)) if expected == 0 => {
            warn!("the lease record of {} was gone; put it back", local.subnet)
        }
        Ok(Some(_)) => info!(
            "updated the lease record of {} (underlay {})",
            local.subnet, local.underlay_ip
        ),
        Ok(None) => {}
        Err(e) => warn!("writing the lease record {key}: {e}"),
    }
    None
}

/// Carries out `weftctl node leave`: leaves, revokes the agent's store lease (`lease`; its
/// events go with it), and answers: deletes the request if all went well, else writes the error
/// into it (weftctl shows it, and the next start of the agent tries again).
async fn leave_on_request<S: Store>(
    cfg: &Config,
    store: &S,
    nl: &Netlink,
    underlay: &Underlay,
    lease: Option<LeaseId>,
) -> Result<(), String> {
    info!("leaving, as `weftctl node leave` asked");
    let outcome = leave(cfg, store, nl, underlay).await;
    if let Some(id) = lease {
        let _ = store.revoke(id).await;
    }
    let key = leave_key(&cfg.node_name);
    let answered = match &outcome {
        Ok(()) => store.delete(&key).await.map(drop),
        Err(e) => match store.get(&key).await {
            Ok(Some(kv)) => {
                let mut request: serde_json::Value = serde_json::from_slice(&kv.value)
                    .ok()
                    .filter(serde_json::Value::is_object)
                    .unwrap_or_else(|| serde_json::json!({}));
                request["error"] = e.clone().into();
                // Without a TTL: the request stands, and the next start of the agent retries.
                store
                    .put(&key, request.to_string().as_bytes(), None)
                    .await
                    .map(drop)
            }
            other => other.map(drop),
        },
    };
    if let Err(e) = answered {
        error!("answering the leave request {key}: {e}");
    }
    outcome
}

/// `weftd --leave`: give the subnet back and remove what the agent made on this node. A step that
/// fails does not stop the others; the error names every one that failed.
async fn leave<S: Store>(
    cfg: &Config,
    store: &S,
    nl: &Netlink,
    underlay: &Underlay,
) -> Result<(), String> {
    let mut errors = Vec::new();
    let mut released = None;
    match crate::lease::leases(store).await {
        Ok(all) => {
            for (kv, l) in all.into_iter().filter(|(_, l)| l.node == cfg.node_name) {
                match store.cad(&kv.key, kv.mod_revision).await {
                    Ok(true) => released = Some(l),
                    Ok(false) => {}
                    Err(e) => errors.push(format!("releasing {}: {e}", kv.key)),
                }
            }
        }
        Err(e) => errors.push(format!("listing {LEASE_PREFIX}: {e}")),
    }
    // The empty plan: no peer routes, no VXLAN device. It needs no subnet, so a retried leave
    // whose lease went in an earlier attempt still cleans up.
    if let Err(e) = reconcile(nl, &backend::Plan::default(), underlay).await {
        errors.push(format!(
            "removing the peer routes and {}: {e}",
            backend::VXLAN_DEVICE
        ));
    }
    if let Err(e) = weft_services::nft::remove_table() {
        errors.push(format!("removing table ip weft: {e}"));
    }
    for path in [subnet_env_path(cfg), cfg.state_dir.join(SUBNET_STATE)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                errors.push(format!("removing {}: {e}", path.display()))
            }
            _ => {}
        }
    }
    if !errors.is_empty() {
        return Err(format!("leaving: {}", errors.join("; ")));
    }
    match released {
        Some(l) => info!("left: released {}", l.subnet),
        None => info!("left: this node held no lease"),
    }
    Ok(())
}
