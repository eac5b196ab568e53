//! Services: mirror the store's Services and EndpointSlices, compile them for this node, and keep
//! Weft's nft table in step — incrementally on every change, rewritten in place on a timer (drift
//! repair), replaced whole at start and after a failed update. Also answers the
//! healthCheckNodePorts of externalTrafficPolicy Local services, as kube-proxy does.

use crate::config::Config;
use crate::daemon::{digest, mirror, Mirror};
use crate::http::{read_request, respond, Health};
use crate::lease::Lease;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{error, info, warn};
use weft_services::{Cache, Compiler, NodeFacts, Proxy, SyncKind};
use weft_store::{Revision, Store};

pub const SERVICES_PREFIX: &str = "/registry/services/specs/";
pub const SLICES_PREFIX: &str = "/registry/endpointslices/";

#[derive(Clone)]
pub struct Metrics {
    service_ports: Gauge,
    problems: Gauge,
    syncs: Counter,
    full_syncs: Counter,
    sync_errors: Counter,
    sync_seconds: Histogram,
    conntrack_deletes: Counter,
    objects_digest: Gauge,
}

impl Metrics {
    pub fn register(r: &mut Registry) -> Metrics {
        let m = Metrics {
            service_ports: Gauge::default(),
            problems: Gauge::default(),
            syncs: Counter::default(),
            full_syncs: Counter::default(),
            sync_errors: Counter::default(),
            sync_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0]),
            conntrack_deletes: Counter::default(),
            objects_digest: Gauge::default(),
        };
        r.register(
            "service_ports",
            "Service ports programmed",
            m.service_ports.clone(),
        );
        r.register(
            "service_problems",
            "Services, slices or frontends left out (see the log)",
            m.problems.clone(),
        );
        r.register(
            "service_syncs",
            "Services table syncs that changed it",
            m.syncs.clone(),
        );
        r.register(
            "service_full_syncs",
            "Syncs that replaced the whole Services table",
            m.full_syncs.clone(),
        );
        r.register(
            "service_sync_errors",
            "Services table syncs that failed",
            m.sync_errors.clone(),
        );
        r.register(
            "service_sync_duration_seconds",
            "Time per Services table sync (compile and nft)",
            m.sync_seconds.clone(),
        );
        r.register(
            "service_conntrack_deletes",
            "conntrack deletions for UDP flows of departed endpoints",
            m.conntrack_deletes.clone(),
        );
        r.register(
            "service_objects_digest",
            "Digest of the Service and EndpointSlice objects (keys and revisions) that the table \
             was last programmed from; the store's own once the node has caught up",
            m.objects_digest.clone(),
        );
        m
    }
}

/// What `weft_service_objects_digest` reports: the [`digest`] of the Service keys and then the
/// EndpointSlice keys (each in key order) with their revisions, cut to 53 bits so that a float,
/// Prometheus' number, holds it exactly. Whoever wrote to the store (`weftctl lab apply`, say)
/// computes the same from a list of both prefixes and so knows when a node has programmed it.
pub fn objects_digest<'a>(
    services: impl IntoIterator<Item = (&'a str, Revision)>,
    slices: impl IntoIterator<Item = (&'a str, Revision)>,
) -> i64 {
    (digest(services.into_iter().chain(slices)) & ((1 << 53) - 1)) as i64
}

/// [`objects_digest`] of what the store holds now: what an agent that has caught up reports.
pub async fn stored_objects_digest(store: &impl Store) -> weft_store::Result<i64> {
    // Lists come sorted by key (the Store contract), as the mirrors iterate.
    let (s, _) = store.list(SERVICES_PREFIX).await?;
    let (e, _) = store.list(SLICES_PREFIX).await?;
    Ok(objects_digest(
        s.iter().map(|kv| (kv.key.as_str(), kv.mod_revision)),
        e.iter().map(|kv| (kv.key.as_str(), kv.mod_revision)),
    ))
}

type HealthState = Arc<Mutex<BTreeMap<u16, (String, usize)>>>;

/// One listener per healthCheckNodePort: 200 with the local endpoint count while this node has
/// endpoints for the service, 503 when it has none (so a load balancer skips the node).
struct HealthPorts {
    state: HealthState,
    listeners: BTreeMap<u16, tokio::task::JoinHandle<()>>,
}

impl HealthPorts {
    async fn update(&mut self, want: &BTreeMap<u16, (String, usize)>) {
        *self.state.lock().expect("not poisoned") = want.clone();
        self.listeners.retain(|port, task| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for port in want.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            match tokio::net::TcpListener::bind(("0.0.0.0", *port)).await {
                Ok(l) => {
                    let state = self.state.clone();
                    let port = *port;
                    self.listeners
                        .insert(port, tokio::spawn(serve_health(l, port, state)));
                }
                Err(e) => warn!("healthCheckNodePort {port} ({}): {e}", want[port].0),
            }
        }
    }
}

async fn serve_health(listener: tokio::net::TcpListener, port: u16, state: HealthState) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin on it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if read_request(&mut conn).await.is_none() {
                return;
            }
            let entry = state.lock().expect("not poisoned").get(&port).cloned();
            let Some((service, local)) = entry else {
                return;
            };
            let (ns, name) = service.split_once('/').unwrap_or(("", &service));
            let body = serde_json::json!({
                "service": {"namespace": ns, "name": name},
                "localEndpoints": local,
                "serviceProxyHealthy": true,
            })
            .to_string();
            let status = if local > 0 {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            respond(&mut conn, status, "application/json", &body).await;
        });
    }
}

/// The Services loop. Waits for full lists of both prefixes first: syncing from a partial view
/// would drop services that are merely not read yet. Returns when `stop` turns true, never in the
/// middle of a sync, so that whoever stops it can then remove the table for good.
pub async fn run<S: Store>(
    store: Arc<S>,
    cfg: Config,
    mut lease: watch::Receiver<Lease>,
    m: Metrics,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let services = Mirror::default();
    let slices = Mirror::default();
    let changed = Arc::new(tokio::sync::Notify::new());
    let synced_services = Arc::new(tokio::sync::Notify::new());
    let synced_slices = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(mirror(
        store.clone(),
        SERVICES_PREFIX,
        services.clone(),
        changed.clone(),
        synced_services.clone(),
    ));
    tokio::spawn(mirror(
        store,
        SLICES_PREFIX,
        slices.clone(),
        changed.clone(),
        synced_slices.clone(),
    ));
    tokio::select! {
        _ = async {
            synced_services.notified().await;
            synced_slices.notified().await;
        } => {}
        _ = stop.wait_for(|s| *s) => return,
    }

    let mut proxy = Some(Proxy::new());
    let mut cache = Cache::default();
    let mut compiler = Compiler::new();
    let mut health_ports = HealthPorts {
        state: Arc::default(),
        listeners: BTreeMap::new(),
    };
    let mut last_problems: Vec<String> = Vec::new();
    let mut last_repair = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        let facts = NodeFacts {
            node: cfg.node_name.clone(),
            cluster_cidr: cfg.cluster_cidr,
            local_subnet: lease.borrow_and_update().subnet,
        };
        // What the table is about to be programmed from, and its digest, read together.
        let (objects, objects_digest_now) = {
            let s = services.lock().expect("not poisoned");
            let e = slices.lock().expect("not poisoned");
            (
                cache.update(&s.values, &e.values, cfg.service_cidr),
                objects_digest(s.keys(), e.keys()),
            )
        };
        let start = Instant::now();
        let rs = compiler.compile(&facts, &objects);
        if rs.problems != last_problems {
            for p in rs.problems.iter().filter(|p| !last_problems.contains(p)) {
                warn!("{p}");
            }
            last_problems = rs.problems.clone();
        }
        m.problems.set(rs.problems.len() as i64);
        let ports = rs.ports().count();
        m.service_ports.set(ports as i64);
        health_ports.update(&rs.health).await;
        let repair = last_repair.elapsed() >= cfg.services_repair;
        let mut p = proxy.take().expect("the proxy is put back after each sync");
        let (p, outcome, synced) = tokio::task::spawn_blocking(move || {
            let mut r = p.sync(&facts, rs);
            let synced = r.is_ok();
            if repair && synced {
                r = p.repair();
            }
            (p, r, synced)
        })
        .await
        .expect("the sync thread does not panic");
        if synced {
            // Programmed from that snapshot, even if the repair after it failed.
            m.objects_digest.set(objects_digest_now);
        }
        proxy = Some(p);
        if repair {
            last_repair = Instant::now();
        }
        m.sync_seconds.observe(start.elapsed().as_secs_f64());
        let failed = outcome.is_err();
        match outcome {
            Ok(r) => {
                health.services_ready.store(true, Ordering::Relaxed);
                m.conntrack_deletes.inc_by(r.conntrack_deletes as u64);
                if r.kind == SyncKind::Full {
                    m.full_syncs.inc();
                }
                if let Some(e) = &r.recovered_from {
                    warn!("services: an incremental update failed ({e}); replaced the table");
                }
                if matches!(r.kind, SyncKind::Full | SyncKind::Incremental) {
                    m.syncs.inc();
                    info!(
                        "services: {:?} sync, {} service port(s), {} bytes of nft, {:.1} ms, {} conntrack deletion(s)",
                        r.kind,
                        ports,
                        r.bytes,
                        r.seconds * 1e3,
                        r.conntrack_deletes
                    );
                }
            }
            Err(e) => {
                m.sync_errors.inc();
                error!("services: {e}");
            }
        }
        // After a failure, try again soon rather than at the next change.
        let wait = if failed {
            Duration::from_secs(1)
        } else {
            cfg.services_repair.saturating_sub(last_repair.elapsed())
        };
        tokio::select! {
            _ = changed.notified() => {
                // A burst of changes (a rollout touches many slices) becomes one sync.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r = lease.changed() => {
                if r.is_err() {
                    return;
                }
            }
            r = stop.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{objects_digest, stored_objects_digest, SERVICES_PREFIX, SLICES_PREFIX};
    use crate::daemon::{mirror, Mirror};
    use std::sync::Arc;
    use std::time::Duration;
    use weft_store::Store;

    async fn listed(store: &impl Store) -> i64 {
        stored_objects_digest(store).await.unwrap()
    }

    #[test]
    fn mirrors_of_the_store_have_the_digest_of_its_lists() {
        crate::testing::with_store("digest", async |store| {
            let put = async |key: &str, value: &str| {
                store.put(key, value.as_bytes(), None).await.unwrap();
            };
            let svc = format!("{SERVICES_PREFIX}default/web");
            let (s1, s2) = (
                format!("{SLICES_PREFIX}default/web-1"),
                format!("{SLICES_PREFIX}default/web-2"),
            );
            // Before the mirrors start (their list) and after (their watches): puts, a put of
            // the same value again, a delete.
            put(&svc, "{}").await;
            put(&s1, "{}").await;
            let (services, slices) = (Mirror::default(), Mirror::default());
            let store = Arc::new(store.clone());
            for (prefix, view) in [(SERVICES_PREFIX, &services), (SLICES_PREFIX, &slices)] {
                let n = Arc::new(tokio::sync::Notify::new());
                tokio::spawn(mirror(store.clone(), prefix, view.clone(), n.clone(), n));
            }
            let mirrored = || {
                let (s, e) = (services.lock().unwrap(), slices.lock().unwrap());
                objects_digest(s.keys(), e.keys())
            };
            let settles = async |want: i64| {
                for _ in 0..100 {
                    if mirrored() == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            };
            let first = listed(&*store).await;
            assert!(settles(first).await);
            store.put(&s2, b"{}", None).await.unwrap();
            store.put(&svc, b"{}", None).await.unwrap();
            store.delete(&s1).await.unwrap();
            let last = listed(&*store).await;
            assert_ne!(last, first);
            assert!(
                settles(last).await,
                "the mirrors never matched the store's lists"
            );
        });
    }

    #[test]
    fn objects_digest_tells_writes_apart_and_is_stable() {
        let svc = [("/registry/services/specs/default/web", 7)];
        let slices = [
            ("/registry/endpointslices/default/web-1", 8),
            ("/registry/endpointslices/default/web-2", 9),
        ];
        let d = objects_digest(svc, slices);
        // The same writes, the same digest; fits a float exactly.
        assert_eq!(d, objects_digest(svc, slices));
        assert!((0..1 << 53).contains(&d));
        // A write (a new revision), a delete, a slice missing: each another digest.
        assert_ne!(d, objects_digest([(svc[0].0, 10)], slices));
        assert_ne!(d, objects_digest([], slices));
        assert_ne!(d, objects_digest(svc, [slices[0]]));
        // Stable across builds and machines (FNV-1a over a fixed byte layout, as services.md has
        // it): weftctl and every agent must agree, whatever their versions.
        assert_eq!(objects_digest(svc, []), 7_719_148_105_390_292);
    }
}
