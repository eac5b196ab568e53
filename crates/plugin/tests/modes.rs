//! Bridge and routed mode on a real kernel: ADD wires pods that reach their gateway and each other
//! with real TCP, CHECK passes and then catches a route deleted by hand, DEL leaves nothing.

mod common;
use common::*;
use std::net::Ipv4Addr;
use weft_cni::error::code;

fn wire_three_and_talk(mode: &str) {
    let node = Node::new(&format!("{mode}-host"));
    let conf = node.conf(mode, "10.244.1.0/24");
    let pods: Vec<Ns> = (0..3).map(|i| Ns::new(&format!("{mode}-pod{i}"))).collect();
    let mut results = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let r = node
            .add(&conf, pod, &format!("c{i}"))
            .unwrap_or_else(|e| panic!("ADD pod{i}: {e}"));
        results.push(r);
    }
    let ips: Vec<Ipv4Addr> = results.iter().map(result_ip).collect();
    let distinct: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 3, "distinct addresses: {ips:?}");
    for ip in &ips {
        assert!(
            "10.244.1.0/24"
                .parse::<ipnet::Ipv4Net>()
                .unwrap()
                .contains(ip),
            "{ip} in subnet"
        );
        assert_ne!(
            *ip,
            Ipv4Addr::new(10, 244, 1, 1),
            "gateway is never given out"
        );
    }

    // Every pod answers on port 80 with its name; every pod reaches every other pod.
    let responders: Vec<Responder> = pods
        .iter()
        .zip(&ips)
        .enumerate()
        .map(|(i, (p, ip))| Responder::start(p, *ip, 80, &format!("pod{i}")))
        .collect();
    for (i, from) in pods.iter().enumerate() {
        for (j, r) in responders.iter().enumerate() {
            if i != j {
                let got = tcp_probe(from, r.addr)
                    .unwrap_or_else(|e| panic!("{mode}: pod{i} -> pod{j} ({}): {e}", r.addr));
                assert_eq!(got, format!("pod{j}"));
            }
        }
    }

    // The pods reach the node: in bridge mode through the gateway address on weft0; in routed
    // mode through a node address (the host's loopback-side address stands in for the node IP).
    let node_ip = if mode == "bridge" {
        Ipv4Addr::new(10, 244, 1, 1)
    } else {
        node.host.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"]);
        Ipv4Addr::new(192, 0, 2, 10)
    };
    let host_resp = Responder::start(&node.host, node_ip, 8080, "node");
    for (i, pod) in pods.iter().enumerate() {
        let got = tcp_probe(pod, host_resp.addr).unwrap_or_else(|e| panic!("pod{i} -> node: {e}"));
        assert_eq!(got, "node");
    }

    // CHECK passes on a healthy pod, then fails once its default route is deleted by hand.
    for (i, (pod, r)) in pods.iter().zip(&results).enumerate() {
        let mut c = conf.clone();
        c["prevResult"] = r.clone();
        node.exec("CHECK", Some(&rt(pod, &format!("c{i}"))), &c)
            .unwrap_or_else(|e| panic!("CHECK pod{i}: {e}"));
    }
    pods[0].ip(&["route", "del", "default"]);
    let mut c = conf.clone();
    c["prevResult"] = results[0].clone();
    let e = node
        .exec("CHECK", Some(&rt(&pods[0], "c0")), &c)
        .expect_err("CHECK must fail without the default route");
    assert_eq!(e.code, code::CHECK_FAILED, "{e}");
    assert!(e.msg.contains("0.0.0.0/0"), "names the route: {e}");

    // DEL everything: no weft veths, no IPAM records; a second DEL is still success.
    drop(responders);
    for (i, pod) in pods.iter().enumerate() {
        node.del(&conf, pod, &format!("c{i}")).unwrap();
        node.del(&conf, pod, &format!("c{i}")).unwrap();
    }
    node.wait_no_veths();
    assert_eq!(node.ipam_records(), Vec::<String>::new());
    for pod in &pods {
        assert!(
            !pod.links().contains(&"eth0".to_string()),
            "pod eth0 gone with its veth"
        );
    }
    if mode == "routed" {
        let routes = node.host.ip(&["route", "show", "proto", "201"]);
        assert_eq!(routes.trim(), "", "no weft host routes left");
    }
}

#[test]
fn bridge_mode_pods_talk_and_clean_up() {
    wire_three_and_talk("bridge");
}

#[test]
fn routed_mode_pods_talk_and_clean_up() {
    wire_three_and_talk("routed");
}

#[test]
fn bridge_mode_shape() {
    let node = Node::new("shape-host");
    let conf = node.conf("bridge", "10.244.2.0/24");
    let pod = Ns::new("shape-pod");
    let r = node.add(&conf, &pod, "shape").unwrap();
    // The bridge holds the gateway with a stable MAC derived from it.
    let br = node.host.ip(&["-o", "addr", "show", "dev", "weft0"]);
    assert!(br.contains("10.244.2.1/24"), "{br}");
    let link = node.host.ip(&["link", "show", "weft0"]);
    assert!(link.contains("0a:58:0a:f4:02:01"), "{link}");
    // Pod: IP/24, MAC from the IP, default via the gateway; result in 1.1.0 shape.
    let ip = result_ip(&r);
    let eth0 = pod.ip(&["addr", "show", "eth0"]);
    assert!(eth0.contains(&format!("{ip}/24")), "{eth0}");
    let o = ip.octets();
    let mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    assert!(eth0.contains(&mac), "{eth0}");
    assert_eq!(r["interfaces"][1]["mac"], mac.as_str());
    assert!(pod
        .ip(&["route", "show", "default"])
        .contains("via 10.244.2.1"));
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["ips"][0]["gateway"], "10.244.2.1");
    assert!(
        r["ips"][0].get("version").is_none(),
        "no ips[].version after 0.4.0"
    );
    // The host veth is a hairpin port of weft0.
    let hv = r["interfaces"][0]["name"].as_str().unwrap();
    let d = node.host.ip(&["-d", "link", "show", hv]);
    assert!(
        d.contains("master weft0") && d.contains("hairpin on"),
        "{d}"
    );
    // A repeated ADD keeps the address.
    let again = node.add(&conf, &pod, "shape").unwrap();
    assert_eq!(result_ip(&again), ip);
    node.del(&conf, &pod, "shape").unwrap();
}

#[test]
fn routed_mode_shape() {
    let node = Node::new("rshape-host");
    let conf = node.conf("routed", "10.244.3.0/24");
    let pod = Ns::new("rshape-pod");
    let r = node.add(&conf, &pod, "rshape").unwrap();
    let ip = result_ip(&r);
    let hv = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert!(
        !node.host.links().contains(&"weft0".to_string()),
        "no bridge when routed"
    );
    let eth0 = pod.ip(&["addr", "show", "eth0"]);
    assert!(eth0.contains(&format!("{ip}/32")), "{eth0}");
    let def = pod.ip(&["route", "show", "default"]);
    assert!(
        def.contains("via 169.254.1.1") && def.contains("onlink"),
        "{def}"
    );
    let neigh = pod.ip(&["neigh", "show", "169.254.1.1"]);
    assert!(
        neigh.contains("ee:ee:ee:ee:ee:ee") && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    let host_route = node.host.ip(&["route", "show", &format!("{ip}/32")]);
    assert!(
        host_route.contains(&hv) && host_route.contains("scope link"),
        "{host_route}"
    );
    let proxy_arp = node
        .host
        .run(|| weft_net::sysctl::get_ipv4_conf(&hv, "proxy_arp"));
    assert_eq!(proxy_arp.unwrap(), "1");
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    node.del(&conf, &pod, "rshape").unwrap();
    assert_eq!(
        node.host.ip(&["route", "show", &format!("{ip}/32")]).trim(),
        ""
    );
}
