//! The compiler and renderer, without a kernel: golden output for one of each kind of service,
//! refusals of bad objects, endpoint choice, incremental diffs and UDP conntrack cleanup.

mod common;

use common::*;
use serde_json::json;
use std::net::Ipv4Addr;
use weft_services::compile::{
    Frontend, HAIRPIN, NO_ENDPOINT_IPS, NO_ENDPOINT_NODEPORTS, SERVICE_IPS, SERVICE_NODEPORTS,
};
use weft_services::conntrack::{stale_udp, Delete};
use weft_services::render;

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (WEFT_BLESS=1 writes it)", path.display()));
    assert!(
        want == actual,
        "{name} differs from the golden file (review, then WEFT_BLESS=1 to accept):\n{actual}"
    );
}

#[test]
fn golden_full_table() {
    let full = sample().compile();
    assert!(full.problems.is_empty(), "{:?}", full.problems);
    golden("full.nft", &render::full(&facts(), &full));
}

#[test]
fn no_endpoints_reject_and_local_policy_without_local_endpoints_drops() {
    let full = sample().compile();
    let rs = full.flat();
    let no = &rs.elements[NO_ENDPOINT_IPS];
    assert_eq!(no["10.96.0.53 . udp . 53"], "goto reject-service");
    assert_eq!(no["10.96.0.40 . tcp . 80"], "drop");
    assert!(!rs.elements[SERVICE_IPS].contains_key("10.96.0.53 . udp . 53"));
    // A NodePort's entry matches on the port alone; the chain it goes to then checks that the
    // packet is for this node, so other traffic is never route-looked-up per packet.
    assert_eq!(
        rs.elements[NO_ENDPOINT_NODEPORTS]["tcp . 30099"],
        "goto reject-nodeport"
    );
    assert!(!rs.elements[SERVICE_NODEPORTS].contains_key("tcp . 30099"));
}

#[test]
fn external_traffic_policy_local_keeps_pods_and_node_on_all_endpoints() {
    let full = sample().compile();
    let rs = full.flat();
    for (ext, all, local) in [
        (
            "ext/ep-ips-tcp/2/ep-ips-local-tcp/1",
            "pick/ep-ips-tcp/2",
            "pick/ep-ips-local-tcp/1",
        ),
        (
            "ext/ep-np-tcp/2/ep-np-local-tcp/1",
            "pick/ep-np-tcp/2",
            "pick/ep-np-local-tcp/1",
        ),
    ] {
        let chain = &rs.chains[ext];
        assert_eq!(chain[0], format!("ip saddr 10.244.0.0/16 goto {all}"));
        assert_eq!(chain[1], format!("fib saddr type local goto {all}"));
        assert_eq!(chain[2], format!("goto {local}"));
        // Only the cluster-wide pick marks for masquerade: external clients of the local pick
        // keep their address.
        assert!(
            rs.chains[all][0].contains("meta mark set"),
            "{:?}",
            rs.chains[all]
        );
        assert_eq!(rs.chains[local].len(), 1);
        assert!(rs.chains[local][0].starts_with("dnat ip addr . port to"));
    }
    for ip in ["192.0.2.20", "198.51.100.20"] {
        assert_eq!(
            rs.elements[SERVICE_IPS][&format!("{ip} . tcp . 443")],
            "goto ext/ep-ips-tcp/2/ep-ips-local-tcp/1"
        );
        assert_eq!(
            rs.elements["ep-ips-local-tcp"][&format!("{ip} . 443 . 0")],
            "10.244.1.6 . 8443"
        );
        // Pods and the node reaching the external IP get both endpoints.
        assert_eq!(
            rs.elements["ep-ips-tcp"][&format!("{ip} . 443 . 1")],
            "10.244.2.6 . 8443"
        );
    }
    assert_eq!(
        rs.elements[SERVICE_NODEPORTS]["tcp . 30443"],
        "goto ext/ep-np-tcp/2/ep-np-local-tcp/1"
    );
    assert_eq!(rs.elements["ep-np-local-tcp"].len(), 1);
    assert_eq!(
        rs.elements["ep-np-local-tcp"]["30443 . 0"],
        "10.244.1.6 . 8443"
    );
    // The ClusterIP stays cluster-wide.
    assert_eq!(
        rs.elements[SERVICE_IPS]["10.96.0.20 . tcp . 443"],
        "goto pick/ep-ips-tcp/2"
    );
    assert_eq!(full.health[&31000], ("default/lb".to_string(), 1));
}

#[test]
fn terminating_endpoints_only_when_none_is_ready() {
    let endpoints = |rs: &weft_services::Ruleset| -> Vec<String> {
        rs.flat().elements["ep-ips-tcp"]
            .iter()
            .filter(|(k, _)| k.starts_with("10.96.0.50 . 80 . "))
            .map(|(_, v)| v.clone())
            .collect()
    };
    // Only terminating endpoints: the serving one is used, the other not.
    assert_eq!(endpoints(&sample().compile()), ["10.244.2.9 . 80"]);
    // With a ready endpoint beside them, the terminating ones are not used.
    let mut o = sample();
    o.slice(slice(
        "rolling-2",
        "rolling",
        "",
        "TCP",
        80,
        &[ready("10.244.3.10", "node3")],
    ));
    assert_eq!(endpoints(&o.compile()), ["10.244.3.10 . 80"]);
}

#[test]
fn hairpin_only_for_local_endpoints() {
    let full = sample().compile();
    let rs = full.flat();
    let h: Vec<&String> = rs.elements[HAIRPIN].keys().collect();
    assert_eq!(h, ["10.244.1.5 . 10.244.1.5", "10.244.1.6 . 10.244.1.6"]);
}

#[test]
fn bad_services_are_named_and_the_rest_is_programmed() {
    let mut o = sample();
    o.svc(service(
        "bad-ip",
        json!({"clusterIP": "10.96.0.999", "ports": [{"port": 80}]}),
    ));
    o.svc(service(
        "outside",
        json!({"clusterIP": "192.168.0.1", "ports": [{"port": 80}]}),
    ));
    o.svc(service(
        "dup",
        json!({"clusterIP": "10.96.1.1",
        "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
    ));
    o.svc(service(
        "range",
        json!({"clusterIP": "10.96.1.2", "ports": [{"port": 70000}]}),
    ));
    o.svc(service(
        "proto",
        json!({"clusterIP": "10.96.1.3", "ports": [{"port": 80, "protocol": "ICMP"}]}),
    ));
    o.services.insert(
        "/registry/services/specs/default/junk".into(),
        b"{not json".to_vec(),
    );
    // Same ClusterIP and port as web: the first (by name) keeps it.
    o.svc(service(
        "zz-clash",
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
    ));
    let full = o.compile();
    let rs = full.flat();
    let p = full.problems.join("\n");
    for want in [
        "default/bad-ip: spec.clusterIP \"10.96.0.999\" is not an IP address",
        "default/outside: spec.clusterIP 192.168.0.1 is outside the service CIDR 10.96.0.0/12",
        "default/dup: spec.ports[1]: duplicate port 80/TCP (also spec.ports[0])",
        "default/range: spec.ports[0].port 70000 is outside 1-65535",
        "default/proto: spec.ports[0].protocol \"ICMP\" is not TCP, UDP or SCTP",
        "default/junk: not a v1 Service",
        "service default/zz-clash: 10.96.0.10:80/tcp is already service default/web's",
    ] {
        assert!(p.contains(want), "missing {want:?} in:\n{p}");
    }
    assert_eq!(full.problems.len(), 7, "{p}");
    // Everything else is exactly as without them.
    let good = sample().compile().flat();
    assert_eq!(rs.chains, good.chains);
    assert_eq!(rs.elements, good.elements);
}

#[test]
fn one_endpoint_change_is_two_map_elements() {
    let before = sample().compile();
    // One endpoint replaced: the same number of endpoints, so no chain changes at all.
    let mut o = sample();
    o.slice(web_slice(&[
        ready("10.244.1.5", "node1"),
        ready("10.244.2.5", "node2"),
        ready("10.244.3.6", "node3"),
    ]));
    let d = render::diff(&before, &o.compile());
    assert_eq!(
        d,
        "delete element ip weft ep-ips-tcp { 10.96.0.10 . 80 . 2 }\n\
         add element ip weft ep-ips-tcp { 10.96.0.10 . 80 . 2 : 10.244.3.6 . 8080 }\n\
         delete element ip weft ep-np-tcp { 30080 . 2 }\n\
         add element ip weft ep-np-tcp { 30080 . 2 : 10.244.3.6 . 8080 }\n"
    );
    // One endpoint fewer: the service's chains move to the 2-endpoint pick, the third element
    // goes, and the 3-endpoint pick chains nothing uses any more are deleted.
    let mut o = sample();
    o.slice(web_slice(&[
        ready("10.244.1.5", "node1"),
        ready("10.244.2.5", "node2"),
    ]));
    let after = o.compile();
    let d = render::diff(&before, &after);
    for want in [
        "add element ip weft service-ips { 10.96.0.10 . tcp . 80 : goto pick/ep-ips-tcp/2 }\n",
        "add element ip weft service-nodeports { tcp . 30080 : goto pick/ep-np-tcp/2 }\n",
        "delete element ip weft ep-ips-tcp { 10.96.0.10 . 80 . 2 }\n",
        "delete chain ip weft pick/ep-ips-tcp/3\n",
    ] {
        assert!(d.contains(want), "{want:?} missing from:\n{d}");
    }
    // Elements before the chains they pointed to go.
    assert!(d.find("goto pick/ep-ips-tcp/2").unwrap() < d.find("delete chain").unwrap());
    assert_eq!(d.lines().count(), 10, "{d}");
    assert_eq!(render::diff(&after, &after), "");
}

#[test]
fn scaled_to_zero_and_back() {
    let before = sample().compile();
    let mut o = sample();
    o.slice(web_slice(&[]));
    let zero = o.compile();
    let d = render::diff(&before, &zero);
    assert!(
        d.contains("delete element ip weft service-ips { 10.96.0.10 . tcp . 80 }"),
        "{d}"
    );
    assert!(
        d.contains(
            "add element ip weft no-endpoint-ips { 10.96.0.10 . tcp . 80 : goto reject-service }"
        ),
        "{d}"
    );
    assert!(
        d.contains("delete element ip weft service-nodeports { tcp . 30080 }"),
        "{d}"
    );
    // web was the only service with 3 endpoints: its pick chains go.
    assert!(d.contains("delete chain ip weft pick/ep-ips-tcp/3"), "{d}");
    assert!(d.contains("delete chain ip weft pick/ep-np-tcp/3"), "{d}");
    assert!(d.contains("delete element ip weft ep-ips-tcp { 10.96.0.10 . 80 . 0, 10.96.0.10 . 80 . 1, 10.96.0.10 . 80 . 2 }"), "{d}");
    // Deletions of elements come before the chain they pointed to is deleted.
    assert!(
        d.find("delete element ip weft service-ips").unwrap() < d.find("delete chain").unwrap()
    );
    let back = render::diff(&zero, &before);
    assert!(
        back.contains("add chain ip weft pick/ep-ips-tcp/3"),
        "{back}"
    );
    assert!(
        back.find("add chain").unwrap() < back.find("add element ip weft service-ips").unwrap()
    );
}

#[test]
fn udp_endpoint_removal_deletes_its_flows() {
    let mut o = sample();
    o.slice(slice(
        "dns-1",
        "dns",
        "dns",
        "UDP",
        53,
        &[ready("10.244.1.53", "node1"), ready("10.244.2.53", "node2")],
    ));
    let two = o.compile();
    // From no endpoint to two: every flow to the service address goes (they hit the reject).
    let first = stale_udp(&sample().compile(), &two);
    let vip: Ipv4Addr = "10.96.0.53".parse().unwrap();
    assert_eq!(
        first,
        vec![Delete {
            dst: Some(vip),
            dport: 53,
            endpoint: None
        }]
    );
    o.slice(slice(
        "dns-1",
        "dns",
        "dns",
        "UDP",
        53,
        &[ready("10.244.1.53", "node1")],
    ));
    let one = o.compile();
    assert_eq!(
        stale_udp(&two, &one),
        vec![Delete {
            dst: Some(vip),
            dport: 53,
            endpoint: Some("10.244.2.53".parse().unwrap())
        }]
    );
    assert_eq!(stale_udp(&one, &one), vec![]);
    // TCP endpoints leaving need nothing: their connections end by themselves.
    let mut t = sample();
    t.slice(web_slice(&[]));
    assert_eq!(stale_udp(&sample().compile(), &t.compile()), vec![]);
    assert_eq!(
        one.flat().ports["default/dns/udp/53"].frontends,
        vec![Frontend::Ip(vip, 53)]
    );
}

#[test]
fn affinity_uses_per_endpoint_chains_and_timeout_sets() {
    let full = sample().compile();
    let rs = full.flat();
    let id = "default/sticky/tcp/80";
    let chain = &rs.chains[&format!("svc/{id}")];
    assert_eq!(
        chain[1],
        format!("ip saddr @aff/{id}/10.244.2.7/80/600 goto ep/{id}/10.244.2.7/80")
    );
    assert_eq!(
        chain.last().unwrap(),
        &format!("numgen random mod 2 vmap {{ 0 : goto ep/{id}/10.244.2.7/80, 1 : goto ep/{id}/10.244.3.7/80 }}")
    );
    assert_eq!(rs.sets[&format!("aff/{id}/10.244.3.7/80/600")], 600);
    assert_eq!(
        rs.chains[&format!("ep/{id}/10.244.3.7/80")][0],
        format!("update @aff/{id}/10.244.3.7/80/600 {{ ip saddr }}")
    );
}

#[test]
fn the_compiler_rebuilds_only_what_changed() {
    let cidr = "10.96.0.0/12".parse().unwrap();
    let mut cache = weft_services::Cache::default();
    let mut compiler = weft_services::Compiler::new();
    let o = sample();
    let first = compiler.compile(&facts(), &cache.update(&o.services, &o.slices, cidr));
    let mut o2 = sample();
    o2.slice(web_slice(&[ready("10.244.1.5", "node1")]));
    let second = compiler.compile(&facts(), &cache.update(&o2.services, &o2.slices, cidr));
    let shared: Vec<&String> = first
        .services
        .iter()
        .filter(|(id, f)| std::sync::Arc::ptr_eq(f, &second.services[*id]))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(shared.len(), first.services.len() - 1, "{shared:?}");
    assert!(!shared.iter().any(|id| *id == "default/web"));
    assert_eq!(
        second.changed(&first).into_iter().collect::<Vec<_>>(),
        ["default/web"]
    );
    // The same result as compiling from scratch, and the same diff.
    assert_eq!(second.flat(), o2.compile().flat());
    assert_eq!(
        render::diff(&first, &second),
        render::diff(&sample().compile(), &o2.compile())
    );
    // Then a Service changes (a new port) beside a slice of a service that does not exist: the
    // full path again, with the same result as from scratch; and back.
    let dns2 = || {
        service(
            "dns",
            json!({"clusterIP": "10.96.0.53",
                   "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "tcp", "port": 53}]}),
        )
    };
    let ghost = || {
        slice(
            "ghost-1",
            "ghost",
            "",
            "TCP",
            80,
            &[ready("10.244.1.9", "node1")],
        )
    };
    let mut o3 = sample();
    o3.svc(dns2()).slice(ghost());
    let third = compiler.compile(&facts(), &cache.update(&o3.services, &o3.slices, cidr));
    assert_eq!(third.flat(), o3.compile().flat());
    assert_eq!(third.problems, o3.compile().problems);
    let mut o4 = sample();
    o4.svc(dns2()).slice(ghost());
    o4.slice(web_slice(&[ready("10.244.2.5", "node2")]));
    let fourth = compiler.compile(&facts(), &cache.update(&o4.services, &o4.slices, cidr));
    assert_eq!(fourth.flat(), o4.compile().flat());
    assert_eq!(
        fourth.changed(&third).into_iter().collect::<Vec<_>>(),
        ["default/web"]
    );
}
