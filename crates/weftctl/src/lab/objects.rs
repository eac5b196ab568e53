//! Kubernetes objects in the lab: `weftctl lab apply -f` / `delete -f` write ordinary Service,
//! EndpointSlice, Pod and Namespace manifests to the store, and a small endpoint controller
//! derives EndpointSlices from the lab's Pods for every Service with a selector, as
//! kube-controller-manager would.

use super::state::{LabState, PodState};
use super::Result;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weft_agent::services::{stored_objects_digest, SERVICES_PREFIX, SLICES_PREFIX};
use weft_net::{NamedNetns, Netns};
use weft_store::{AnyStore, Store};

pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER: &str = "weftctl-lab";

/// A synchronous handle on the lab's store, used from inside the router namespace (where the
/// lab's etcd listens).
pub struct Session {
    rt: tokio::runtime::Runtime,
    store: AnyStore,
}

impl Session {
    /// `f` on the lab's store, from the router's namespace.
    pub fn run<T>(&self, f: impl AsyncFnOnce(&AnyStore) -> T) -> T {
        self.rt.block_on(f(&self.store))
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let (kvs, _) = self
            .rt
            .block_on(self.store.list(prefix))
            .map_err(|e| format!("listing {prefix}: {e}"))?;
        Ok(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }

    pub fn put(&self, key: &str, value: &Value) -> Result<()> {
        let bytes = serde_json::to_vec(value).expect("serializable");
        self.rt
            .block_on(self.store.put(key, &bytes, None))
            .map(|_| ())
            .map_err(|e| format!("writing {key}: {e}"))
    }

    pub fn delete(&self, key: &str) -> Result<bool> {
        self.rt
            .block_on(self.store.delete(key))
            .map_err(|e| format!("deleting {key}: {e}"))
    }

    /// What an agent that has programmed the store's Services and EndpointSlices as they are
    /// now reports as `weft_service_objects_digest`.
    pub fn objects_digest(&self) -> Result<i64> {
        self.rt
            .block_on(stored_objects_digest(&self.store))
            .map_err(|e| format!("listing the Services and EndpointSlices: {e}"))
    }
}

/// Runs `f` with a store session opened from inside the router namespace.
pub fn session<T: Send>(s: &LabState, f: impl FnOnce(&Session) -> Result<T> + Send) -> Result<T> {
    let ns = Netns::open(NamedNetns::path(s.router())).map_err(|e| e.to_string())?;
    let url = s.store_url.clone();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let store = rt
            .block_on(AnyStore::open(&url))
            .map_err(|e| format!("opening the lab's store {url}: {e}"))?;
        f(&Session { rt, store })
    })
    .map_err(|e| e.to_string())?
}

/// One manifest document, checked and placed.
pub struct Manifest {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub key: String,
    pub value: Value,
}

fn key_for(kind: &str, namespace: &str, name: &str) -> Option<String> {
    Some(match kind {
        "Service" => format!("{SERVICES_PREFIX}{namespace}/{name}"),
        "EndpointSlice" => format!("{SLICES_PREFIX}{namespace}/{name}"),
        "Pod" => format!("/registry/pods/{namespace}/{name}"),
        "Namespace" => format!("/registry/namespaces/{name}"),
        _ => return None,
    })
}

/// Parses a multi-document YAML (or JSON) file. Each document is checked by deserializing it as
/// its kind's standard type; errors name the document and the field.
pub fn parse_manifests(text: &str, file: &str) -> Result<Vec<Manifest>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let where_ = format!("{file} document {}", i + 1);
        let v: Value = Value::deserialize(doc).map_err(|e| format!("{where_}: {e}"))?;
        if v.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let api = v["apiVersion"].as_str().unwrap_or_default();
        let expected = match kind.as_str() {
            "Service" | "Pod" | "Namespace" => "v1",
            "EndpointSlice" => "discovery.k8s.io/v1",
            "" => return Err(format!("{where_}: kind is missing")),
            k => {
                return Err(format!(
                    "{where_}: kind {k:?} is not one the lab takes (Service, EndpointSlice, Pod, Namespace)"
                ))
            }
        };
        if api != expected {
            return Err(format!(
                "{where_}: apiVersion {api:?} for a {kind} (expected {expected})"
            ));
        }
        let check = |r: std::result::Result<(), serde_json::Error>| {
            r.map_err(|e| format!("{where_} ({kind}): {e}"))
        };
        match kind.as_str() {
            "Service" => check(serde_json::from_value::<Service>(v.clone()).map(drop))?,
            "EndpointSlice" => check(serde_json::from_value::<EndpointSlice>(v.clone()).map(drop))?,
            "Pod" => check(serde_json::from_value::<Pod>(v.clone()).map(drop))?,
            _ => check(serde_json::from_value::<Namespace>(v.clone()).map(drop))?,
        }
        let name = v["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{where_}: metadata.name is missing"))?
            .to_string();
        let namespace = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let mut value = v;
        if kind != "Namespace" {
            value["metadata"]["namespace"] = json!(namespace);
        }
        let key = key_for(&kind, &namespace, &name).expect("kind checked above");
        out.push(Manifest {
            kind,
            namespace,
            name,
            key,
            value,
        });
    }
    Ok(out)
}

/// What kube-apiserver would fill in: a ClusterIP (from 10.96.2.0 up, the lower addresses are left
/// to manifests), NodePorts (30000-32767) for NodePort and LoadBalancer services, and a
/// healthCheckNodePort for a LoadBalancer with externalTrafficPolicy Local. A service applied again
/// keeps what it was given.
pub fn allocate(existing: &[(String, Vec<u8>)], key: &str, v: &mut Value) -> Result<()> {
    let kind = v["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_string();
    if kind == "ExternalName" {
        return Ok(());
    }
    let others: Vec<Value> = existing
        .iter()
        .filter(|(k, _)| k != key)
        .filter_map(|(_, b)| serde_json::from_slice(b).ok())
        .collect();
    let before: Option<Value> = existing
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, b)| serde_json::from_slice(b).ok());
    if v["spec"]["clusterIP"].as_str().unwrap_or("").is_empty() {
        let used: Vec<&str> = others
            .iter()
            .filter_map(|o| o["spec"]["clusterIP"].as_str())
            .collect();
        let ip = match before
            .as_ref()
            .and_then(|b| b["spec"]["clusterIP"].as_str())
        {
            Some(ip) if !ip.is_empty() && !used.contains(&ip) => ip.to_string(),
            _ => (u32::from(std::net::Ipv4Addr::new(10, 96, 2, 0))
                ..u32::from(std::net::Ipv4Addr::new(10, 111, 255, 255)))
                .map(|n| std::net::Ipv4Addr::from(n).to_string())
                .find(|ip| !used.contains(&ip.as_str()))
                .ok_or("no free ClusterIP in 10.96.0.0/12")?,
        };
        v["spec"]["clusterIP"] = json!(ip);
        v["spec"]["clusterIPs"] = json!([ip]);
    }
    if kind != "NodePort" && kind != "LoadBalancer" {
        return Ok(());
    }
    let mut used: Vec<i64> = others
        .iter()
        .flat_map(|o| {
            let ports = o["spec"]["ports"].as_array().cloned().unwrap_or_default();
            let hc = o["spec"]["healthCheckNodePort"].as_i64();
            ports
                .into_iter()
                .filter_map(|p| p["nodePort"].as_i64())
                .chain(hc)
                .collect::<Vec<_>>()
        })
        .collect();
    let next_free = |used: &mut Vec<i64>, keep: Option<i64>| -> Result<i64> {
        let n = match keep.filter(|k| !used.contains(k)) {
            Some(k) => k,
            None => (30000..=32767)
                .find(|n| !used.contains(n))
                .ok_or("no free NodePort in 30000-32767")?,
        };
        used.push(n);
        Ok(n)
    };
    let given: Vec<i64> = v["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["nodePort"].as_i64())
        .collect();
    used.extend(given);
    let old_ports = before
        .as_ref()
        .and_then(|b| b["spec"]["ports"].as_array().cloned())
        .unwrap_or_default();
    if let Some(ports) = v["spec"]["ports"].as_array_mut() {
        for p in ports.iter_mut().filter(|p| p["nodePort"].is_null()) {
            let keep = old_ports
                .iter()
                .find(|o| o["port"] == p["port"] && o["protocol"] == p["protocol"])
                .and_then(|o| o["nodePort"].as_i64());
            p["nodePort"] = json!(next_free(&mut used, keep)?);
        }
    }
    if kind == "LoadBalancer"
        && v["spec"]["externalTrafficPolicy"] == "Local"
        && v["spec"]["healthCheckNodePort"].is_null()
    {
        let keep = before.and_then(|b| b["spec"]["healthCheckNodePort"].as_i64());
        v["spec"]["healthCheckNodePort"] = json!(next_free(&mut used, keep)?);
    }
    Ok(())
}

/// The Pod object the lab stores for one of its pods: the manifest's metadata and spec if it
/// came from one, with the node, address and readiness the lab knows.
pub fn pod_object(p: &PodState, from: Option<&Value>) -> Value {
    let mut v = from.cloned().unwrap_or_else(|| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": p.name, "namespace": "default"},
               "spec": {"containers": [{"name": "responder", "image": "weft-lab/responder",
                   "ports": [{"name": "http", "containerPort": 80},
                             {"name": "alt", "containerPort": 81},
                             {"name": "dns", "containerPort": 80, "protocol": "UDP"}]}]}})
    });
    if !p.labels.is_empty() || v["metadata"]["labels"].is_null() {
        v["metadata"]["labels"] = json!(p.labels);
    }
    v["metadata"]["namespace"] = json!("default");
    v["spec"]["nodeName"] = json!(p.node);
    let ready = !v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "False");
    v["status"] = json!({
        "phase": "Running",
        "podIP": p.ip.to_string(),
        "podIPs": [{"ip": p.ip.to_string()}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    });
    v
}

fn matches(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The EndpointSlices the endpoint controller wants, from the stored Services and Pods.
pub fn desired_slices(
    services: &[(String, Vec<u8>)],
    pods: &[(String, Vec<u8>)],
) -> BTreeMap<String, Value> {
    let pods: Vec<Pod> = pods
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice(v).ok())
        .collect();
    let mut out = BTreeMap::new();
    for (_, v) in services {
        let Ok(svc) = serde_json::from_slice::<Service>(v) else {
            continue;
        };
        let (Some(name), Some(spec)) = (svc.metadata.name.clone(), svc.spec.as_ref()) else {
            continue;
        };
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let ports = spec.ports.clone().unwrap_or_default();
        // Pods grouped by how the service's ports resolve on them (a named targetPort may be a
        // different number on different pods): one slice per group.
        let mut groups: BTreeMap<Vec<(String, String, i32)>, Vec<Value>> = BTreeMap::new();
        let mut members: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == ns)
            .filter(|p| matches(selector, p.metadata.labels.as_ref()))
            .collect();
        members.sort_by_key(|p| p.metadata.name.clone());
        for pod in members {
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                continue;
            };
            let resolved: Vec<(String, String, i32)> = ports
                .iter()
                .filter_map(|sp| {
                    let proto = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
                    let number = match &sp.target_port {
                        None => Some(sp.port),
                        Some(IntOrString::Int(n)) => Some(*n),
                        Some(IntOrString::String(named)) => pod
                            .spec
                            .iter()
                            .flat_map(|s| &s.containers)
                            .flat_map(|c| c.ports.iter().flatten())
                            .find(|cp| cp.name.as_deref() == Some(named.as_str()))
                            .map(|cp| cp.container_port),
                    }?;
                    Some((sp.name.clone().unwrap_or_default(), proto, number))
                })
                .collect();
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let terminating = pod.metadata.deletion_timestamp.is_some();
            groups.entry(resolved).or_default().push(json!({
                "addresses": [ip],
                "nodeName": pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod.metadata.name},
                "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
            }));
        }
        if groups.is_empty() {
            // A service whose selector matches nothing still gets an (empty) slice.
            groups.insert(Vec::new(), Vec::new());
        }
        for (i, (ports, endpoints)) in groups.into_iter().enumerate() {
            let slice_name = format!("{name}-lab-{i}");
            let ports: Vec<Value> = ports
                .iter()
                .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port}))
                .collect();
            out.insert(
                format!("{SLICES_PREFIX}{ns}/{slice_name}"),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": slice_name, "namespace": ns,
                                    "labels": {"kubernetes.io/service-name": name, MANAGED_BY: CONTROLLER}},
                       "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
            );
        }
    }
    out
}

/// One pass of the endpoint controller: writes the slices that differ, deletes its own slices
/// that are no longer wanted. Returns the number of changes.
pub fn sync_endpoints(db: &Session) -> Result<usize> {
    let services = db.list(SERVICES_PREFIX)?;
    let pods = db.list("/registry/pods/")?;
    let want = desired_slices(&services, &pods);
    let have = db.list(SLICES_PREFIX)?;
    let mut changes = 0;
    for (key, v) in &have {
        let ours = serde_json::from_slice::<Value>(v)
            .is_ok_and(|v| v["metadata"]["labels"][MANAGED_BY] == CONTROLLER);
        if ours && !want.contains_key(key) {
            db.delete(key)?;
            changes += 1;
        }
    }
    for (key, v) in &want {
        let same = have
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, old)| serde_json::from_slice::<Value>(old).ok())
            .is_some_and(|old| old == *v);
        if !same {
            db.put(key, v)?;
            changes += 1;
        }
    }
    Ok(changes)
}

impl super::Lab {
    /// Stores the Pod objects of the named lab pods (`manifests`: pod name → the applied Pod
    /// manifest, if any) and runs the endpoint controller.
    pub(super) fn publish_pods(
        &self,
        s: &LabState,
        names: &[&str],
        manifests: &BTreeMap<String, Value>,
    ) -> Result<()> {
        let objects: Vec<(String, Value)> = names
            .iter()
            .filter_map(|n| s.pods.iter().find(|p| p.name == *n))
            .map(|p| {
                (
                    format!("/registry/pods/default/{}", p.name),
                    pod_object(p, manifests.get(&p.name)),
                )
            })
            .collect();
        session(s, |db| {
            for (k, v) in &objects {
                db.put(k, v)?;
            }
            sync_endpoints(db).map(drop)
        })
    }

    /// Waits until every running agent has programmed the Services and EndpointSlices that the
    /// store now holds, as `kubectl apply --wait` waits for its objects, so that a `lab check`
    /// right after probes what the nodes have, not what they are about to have. An agent reports
    /// what its table was last programmed from as a digest (services.md). At most 10 s.
    pub(super) fn await_programmed(&self, s: &LabState) -> Result<()> {
        const METRIC: &str = "weft_service_objects_digest";
        // The lab's own agents (a pid reused by another process is not waited for), each
        // node's namespace opened once.
        let agents: Vec<(&str, Netns)> = s
            .nodes
            .iter()
            .filter(|n| n.agent_pid.is_some_and(|p| self.owns(p)))
            .map(|n| {
                let ns = Netns::open(NamedNetns::path(&n.netns)).map_err(|e| e.to_string())?;
                Ok((n.name.as_str(), ns))
            })
            .collect::<Result<_>>()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        session(s, |db| loop {
            // Read again each time: another writer may have moved the store on since.
            let want = db.objects_digest()?.to_string();
            let behind: Vec<String> = agents
                .iter()
                .filter_map(|(name, ns)| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match super::agent_metric(ns, METRIC, left.min(Duration::from_secs(1))) {
                        Some(got) if got == want => None,
                        // The gauge's start: no Services sync yet (the agent is still leasing
                        // its subnet, say, or cannot reach the store).
                        Some(got) if got == "0" => Some(format!("{name} (not synced yet)")),
                        Some(got) => Some(format!("{name} (at {got})")),
                        None => Some(format!("{name} (no answer)")),
                    }
                })
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "stored, but not programmed within 10 s by {}: the store's {METRIC} is {want} \
                     (see their weftd.log)",
                    behind.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        })
    }

    /// `apply -f` (or `delete -f` with `delete`).
    pub(super) fn apply(
        &self,
        s: &mut LabState,
        file: &std::path::Path,
        delete: bool,
    ) -> Result<()> {
        let text =
            std::fs::read_to_string(file).map_err(|e| format!("-f {}: {e}", file.display()))?;
        let docs = parse_manifests(&text, &file.display().to_string())?;
        for d in docs.iter().filter(|d| d.kind == "Pod") {
            if d.namespace != "default" {
                return Err(format!(
                    "{}: pod {}/{}: lab pods live in namespace default",
                    file.display(),
                    d.namespace,
                    d.name
                ));
            }
        }
        let mut pod_manifests = BTreeMap::new();
        for d in &docs {
            if d.kind != "Pod" {
                continue;
            }
            let exists = s.pods.iter().any(|p| p.name == d.name);
            if delete {
                if exists {
                    self.del_pod(s, &d.name)?;
                }
                continue;
            }
            let labels: BTreeMap<String, String> =
                serde_json::from_value(d.value["metadata"]["labels"].clone()).unwrap_or_default();
            if exists {
                if let Some(p) = s.pods.iter_mut().find(|p| p.name == d.name) {
                    p.labels = labels;
                }
            } else {
                let node = match d.value["spec"]["nodeName"].as_str() {
                    Some(n) => n.to_string(),
                    None => s
                        .nodes
                        .iter()
                        .min_by_key(|n| s.pods.iter().filter(|p| p.node == n.name).count())
                        .map(|n| n.name.clone())
                        .ok_or("the lab has no nodes")?,
                };
                self.add_pod(s, &node, &d.name, labels)?;
            }
            pod_manifests.insert(d.name.clone(), d.value.clone());
        }
        let snapshot: Vec<(String, Option<Value>)> = docs
            .iter()
            .map(|d| {
                let value = match (delete, d.kind.as_str()) {
                    (true, _) => None,
                    (false, "Pod") => s
                        .pods
                        .iter()
                        .find(|p| p.name == d.name)
                        .map(|p| pod_object(p, pod_manifests.get(&d.name))),
                    (false, _) => Some(d.value.clone()),
                };
                (d.key.clone(), value)
            })
            .collect();
        let verb = if delete { "deleted" } else { "configured" };
        let mut snapshot = snapshot;
        session(s, |db| {
            let mut existing = db.list(SERVICES_PREFIX)?;
            for (key, value) in snapshot.iter_mut() {
                if let Some(v) = value.as_mut().filter(|v| v["kind"] == "Service") {
                    allocate(&existing, key, v)?;
                    existing.retain(|(k, _)| k != key);
                    existing.push((key.clone(), serde_json::to_vec(v).expect("serializable")));
                }
            }
            for (key, value) in &snapshot {
                match value {
                    Some(v) => db.put(key, v)?,
                    None => {
                        db.delete(key)?;
                    }
                }
            }
            sync_endpoints(db).map(drop)
        })?;
        for d in &docs {
            println!(
                "{}/{}/{} {verb}",
                d.kind.to_lowercase(),
                d.namespace,
                d.name
            );
        }
        Ok(())
    }

    /// `weftctl services` inside the node's namespace, pointed at the node's agent's store and
    /// directories.
    pub(super) fn services(&self, node: &str) -> Result<i32> {
        let s = self.load()?;
        let n = s.node(node)?;
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let cmd: Vec<String> = vec![
            me.display().to_string(),
            "services".into(),
            "--store".into(),
            s.store_url.clone(),
            "--node".into(),
            n.name.clone(),
            "--run-dir".into(),
            n.dir.join("run").display().to_string(),
        ];
        self.exec(node, &cmd)
    }

    /// The Services part of `check`: every TCP ClusterIP from every pod and node, every NodePort
    /// from the outside through every node; the answer must come from one of the service's
    /// endpoints (or be refused when it has none). Services with a Local traffic policy are
    /// skipped: their answer depends on where the client is.
    /// Probes every TCP Service from every client: (passed, failed, passed only after retries).
    pub(super) fn check_services(&self, s: &LabState) -> Result<(usize, usize, usize)> {
        let (services, slices) = session(s, |db| {
            Ok((db.list(SERVICES_PREFIX)?, db.list(SLICES_PREFIX)?))
        })?;
        if services.is_empty() {
            return Ok((0, 0, 0));
        }
        let objects = weft_services::parse_all(
            &services.into_iter().collect(),
            &slices.into_iter().collect(),
            weft_agent::config::DEFAULT_SERVICE_CIDR
                .parse()
                .expect("literal"),
        );
        let facts = weft_services::NodeFacts {
            node: String::new(),
            cluster_cidr: s
                .cluster_cidr
                .as_deref()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| weft_agent::network::NetworkConfig::defaults().cluster_cidr),
            local_subnet: "0.0.0.0/32".parse().expect("literal"),
        };
        let rs = weft_services::compile(&facts, &objects);
        let name_of = |ip: std::net::Ipv4Addr| {
            s.pods
                .iter()
                .find(|p| p.ip == ip)
                .map(|p| p.name.clone())
                .or_else(|| {
                    s.nodes
                        .iter()
                        .find(|n| n.underlay_ip == ip)
                        .map(|n| n.name.clone())
                })
        };
        let mut clients: Vec<(String, String)> = s
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.netns.clone()))
            .collect();
        clients.extend(s.nodes.iter().map(|n| (n.name.clone(), n.netns.clone())));
        let (mut passed, mut failed, mut retried) = (0, 0, 0);
        println!();
        println!(
            "services (ClusterIP from every pod and node; NodePort from outside via every node):"
        );
        for (id, port) in rs.ports() {
            let svc = objects
                .services
                .iter()
                .find(|x| x.id() == port.service)
                .expect("compiled from these");
            if port.proto != weft_services::model::Proto::Tcp {
                continue;
            }
            if svc.internal_local || svc.external_local {
                println!("  {id}: skipped (a Local traffic policy answers per node)");
                continue;
            }
            let expected: Vec<String> = port
                .endpoints
                .iter()
                .filter_map(|(ip, _)| name_of(*ip))
                .collect();
            let mut probes: Vec<(String, String, SocketAddr)> = Vec::new();
            for f in &port.frontends {
                match f {
                    weft_services::compile::Frontend::Ip(ip, p) if Some(*ip) == svc.cluster_ip => {
                        for (c, ns) in &clients {
                            probes.push((c.clone(), ns.clone(), SocketAddr::from((*ip, *p))));
                        }
                    }
                    weft_services::compile::Frontend::NodePort(np) => {
                        for n in &s.nodes {
                            probes.push((
                                format!("outside→{}", n.name),
                                s.outside_netns.clone(),
                                SocketAddr::from((n.underlay_ip, *np)),
                            ));
                        }
                    }
                    _ => {}
                }
            }
            let (mut bad, mut late) = (Vec::new(), Vec::new());
            let mut answers = BTreeMap::<String, usize>::new();
            for (client, ns, addr) in &probes {
                let ns = Netns::open(NamedNetns::path(ns)).map_err(|e| e.to_string())?;
                // The agents apply a change within milliseconds of the store; allow a moment. A
                // probe that passes only on a retry is named: in a settled lab it is a fault.
                let mut outcome = Err(String::new());
                let mut first_error = None;
                for tries in 1..=10 {
                    outcome = match super::probe(&ns, *addr) {
                        Ok(a) if expected.contains(&a) => Ok(a),
                        Ok(a) => Err(format!("answered by {a}")),
                        Err(e)
                            if expected.is_empty()
                                && e.kind() == std::io::ErrorKind::ConnectionRefused =>
                        {
                            Ok("refused".into())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match &outcome {
                        Ok(_) => {
                            if let Some(e) = first_error.take() {
                                late.push(format!(
                                    "{client} → {addr}: ok after {tries} tries (first: {e})"
                                ));
                            }
                            break;
                        }
                        Err(e) if first_error.is_none() => first_error = Some(e.clone()),
                        Err(_) => {}
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                match outcome {
                    Ok(a) => {
                        passed += 1;
                        *answers.entry(a).or_default() += 1;
                    }
                    Err(e) => {
                        failed += 1;
                        bad.push(format!("{client} → {addr}: {e}"));
                    }
                }
            }
            let spread: Vec<String> = answers.iter().map(|(a, n)| format!("{a}×{n}")).collect();
            println!(
                "  {id}: {}/{} ok, answered by {}",
                probes.len() - bad.len(),
                probes.len(),
                if spread.is_empty() {
                    "-".into()
                } else {
                    spread.join(" ")
                }
            );
            for b in bad {
                println!("    FAIL {b}");
            }
            for l in &late {
                println!("    RETRIED {l}");
            }
            retried += late.len();
        }
        Ok((passed, failed, retried))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, v: Value) -> (String, Vec<u8>) {
        (key.to_string(), serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn manifests_are_checked_and_placed() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: prod}\naddressType: IPv4\nendpoints: []\n---\n";
        let m = parse_manifests(text, "f.yaml").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].key, "/registry/services/specs/default/web");
        assert_eq!(m[0].value["metadata"]["namespace"], "default");
        assert_eq!(m[1].key, "/registry/endpointslices/prod/web-1");
        for (bad, want) in [
            ("kind: Deployment\napiVersion: apps/v1\n", "f.yaml document 1: kind \"Deployment\""),
            ("kind: Service\napiVersion: v2\n", "apiVersion \"v2\" for a Service"),
            ("kind: Service\napiVersion: v1\nmetadata: {}\n", "metadata.name is missing"),
            ("kind: Service\napiVersion: v1\nmetadata: {name: x}\nspec: {ports: [{port: web}]}\n", "f.yaml document 1 (Service)"),
            ("kind: [oops\n", "f.yaml document 1"),
        ] {
            let e = parse_manifests(bad, "f.yaml").err().unwrap_or_default();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn allocation_fills_what_the_apiserver_would_and_keeps_it() {
        let key = "/registry/services/specs/default/lb";
        let existing = vec![kv(
            "/registry/services/specs/default/other",
            json!({"spec": {"clusterIP": "10.96.2.0", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}}),
        )];
        let mut v = json!({"kind": "Service", "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "ports": [{"port": 80}, {"port": 443, "nodePort": 30001}]}});
        allocate(&existing, key, &mut v).unwrap();
        assert_eq!(v["spec"]["clusterIP"], "10.96.2.1");
        assert_eq!(v["spec"]["ports"][0]["nodePort"], 30002);
        assert_eq!(v["spec"]["healthCheckNodePort"], 30003);
        // Applied again without them: the same values.
        let mut again = json!({"kind": "Service", "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "ports": [{"port": 80}, {"port": 443, "nodePort": 30001}]}});
        let mut with_self = existing.clone();
        with_self.push(kv(key, v.clone()));
        allocate(&with_self, key, &mut again).unwrap();
        assert_eq!(again, v);
        // Headless and explicit addresses are left as they are.
        let mut h = json!({"kind": "Service", "spec": {"clusterIP": "None"}});
        allocate(&existing, key, &mut h).unwrap();
        assert_eq!(h["spec"]["clusterIP"], "None");
    }

    #[test]
    fn endpoint_controller_follows_selectors_and_named_ports() {
        let services = vec![kv(
            "/registry/services/specs/default/web",
            json!({"metadata": {"name": "web", "namespace": "default"},
                   "spec": {"selector": {"app": "web"},
                            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        )];
        let pod = |name: &str, ip: &str, app: &str, port: i32, ready: &str| {
            kv(
                &format!("/registry/pods/default/{name}"),
                json!({
                "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
                "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}),
            )
        };
        let pods = vec![
            pod("a", "10.244.1.2", "web", 8080, "True"),
            pod("b", "10.244.1.3", "web", 9090, "False"),
            pod("c", "10.244.1.4", "db", 8080, "True"),
        ];
        let want = desired_slices(&services, &pods);
        let slices: Vec<&Value> = want.values().collect();
        assert_eq!(slices.len(), 2, "two port mappings, two slices: {want:?}");
        let a = slices
            .iter()
            .find(|s| s["ports"][0]["port"] == 8080)
            .unwrap();
        assert_eq!(a["endpoints"][0]["addresses"][0], "10.244.1.2");
        assert_eq!(a["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(a["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        let b = slices
            .iter()
            .find(|s| s["ports"][0]["port"] == 9090)
            .unwrap();
        assert_eq!(b["endpoints"][0]["conditions"]["ready"], false);
        assert_eq!(b["endpoints"].as_array().unwrap().len(), 1);
    }
}
