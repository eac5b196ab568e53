//! Service and EndpointSlice JSON for the tests, as `kubectl get -o json` would print them.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::BTreeMap;
use weft_services::{compile, parse_all, NodeFacts, Ruleset};

pub fn facts() -> NodeFacts {
    NodeFacts {
        node: "node1".into(),
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        local_subnet: "10.244.1.0/24".parse().unwrap(),
    }
}

pub fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

/// A slice for `service` with one port (`port_name`, `proto`, `port`); endpoints are
/// (ip, node, ready, serving, terminating).
pub fn slice(
    name: &str,
    service: &str,
    port_name: &str,
    proto: &str,
    port: u16,
    eps: &[(&str, &str, bool, bool, bool)],
) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, node, ready, serving, terminating)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": port_name, "protocol": proto, "port": port}],
           "endpoints": endpoints})
}

/// The sample's `web` slice (port `http`, TCP 8080) with these endpoints.
pub fn web_slice(eps: &[(&str, &str, bool, bool, bool)]) -> Value {
    slice("web-1", "web", "http", "TCP", 8080, eps)
}

pub fn ready(
    ip: &'static str,
    node: &'static str,
) -> (&'static str, &'static str, bool, bool, bool) {
    (ip, node, true, true, false)
}

pub struct Objects {
    pub services: BTreeMap<String, Vec<u8>>,
    pub slices: BTreeMap<String, Vec<u8>>,
}

impl Objects {
    pub fn new() -> Objects {
        Objects {
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
        }
    }

    pub fn svc(&mut self, v: Value) -> &mut Self {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        self.services.insert(
            format!("/registry/services/specs/default/{name}"),
            serde_json::to_vec(&v).unwrap(),
        );
        self
    }

    pub fn slice(&mut self, v: Value) -> &mut Self {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        self.slices.insert(
            format!("/registry/endpointslices/default/{name}"),
            serde_json::to_vec(&v).unwrap(),
        );
        self
    }

    pub fn compile(&self) -> Ruleset {
        let o = parse_all(
            &self.services,
            &self.slices,
            "10.96.0.0/12".parse().unwrap(),
        );
        compile(&facts(), &o)
    }
}

/// The objects of the golden test: one of each kind of service the proxy handles.
pub fn sample() -> Objects {
    let mut o = Objects::new();
    // ClusterIP + NodePort, three endpoints, one of them on this node.
    o.svc(service(
        "web",
        json!({"type": "NodePort", "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}),
    ));
    o.slice(web_slice(&[
        ready("10.244.1.5", "node1"),
        ready("10.244.2.5", "node2"),
        ready("10.244.3.5", "node3"),
    ]));
    // UDP without endpoints: rejected.
    o.svc(service(
        "dns",
        json!({"clusterIP": "10.96.0.53",
        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}),
    ));
    // A NodePort without endpoints: rejected too.
    o.svc(service(
        "nobody",
        json!({"type": "NodePort", "clusterIP": "10.96.0.99",
        "ports": [{"port": 80, "nodePort": 30099}]}),
    ));
    // LoadBalancer, externalTrafficPolicy Local, an external IP and a health check port.
    o.svc(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lb", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
                 "healthCheckNodePort": 31000, "externalIPs": ["192.0.2.20"],
                 "ports": [{"port": 443, "nodePort": 30443}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}}));
    o.slice(slice(
        "lb-1",
        "lb",
        "",
        "TCP",
        8443,
        &[ready("10.244.1.6", "node1"), ready("10.244.2.6", "node2")],
    ));
    // ClientIP affinity.
    o.svc(service(
        "sticky",
        json!({"clusterIP": "10.96.0.30", "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "ports": [{"port": 80}]}),
    ));
    o.slice(slice(
        "sticky-1",
        "sticky",
        "",
        "TCP",
        80,
        &[ready("10.244.2.7", "node2"), ready("10.244.3.7", "node3")],
    ));
    // internalTrafficPolicy Local with no endpoint on this node: dropped here.
    o.svc(service(
        "node-local",
        json!({"clusterIP": "10.96.0.40", "internalTrafficPolicy": "Local",
        "ports": [{"port": 80}]}),
    ));
    o.slice(slice(
        "node-local-1",
        "node-local",
        "",
        "TCP",
        80,
        &[ready("10.244.2.8", "node2")],
    ));
    // Only terminating endpoints: the serving one is used, the non-serving one is not.
    o.svc(service(
        "rolling",
        json!({"clusterIP": "10.96.0.50", "ports": [{"port": 80}]}),
    ));
    o.slice(slice(
        "rolling-1",
        "rolling",
        "",
        "TCP",
        80,
        &[
            ("10.244.2.9", "node2", false, true, true),
            ("10.244.3.9", "node3", false, false, true),
        ],
    ));
    // Headless: left alone.
    o.svc(service(
        "headless",
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
    ));
    o
}
