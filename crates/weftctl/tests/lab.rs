//! `weftctl lab` end to end, with real agents and the real plugin: every backend connects all
//! pods; a broken pod is caught; agents restarted with kill -9 keep established streams; a route
//! deleted by hand comes back; a node that leaves is dropped by its peers within seconds; down
//! leaves no namespace behind.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

fn all_connect(backend: &str, extra: &[&str], tag: &str) {
    let lab = Lab::new(tag);
    let mut args = vec!["up", "--nodes", "3", "--pods", "2", "--backend", backend];
    args.extend_from_slice(extra);
    lab.ok(&args);
    let status = lab.ok(&["status"]);
    assert!(
        status.contains("node3") && status.contains("n3p2") && status.contains(backend),
        "{status}"
    );
    let matrix = lab.ok(&["check"]);
    assert!(
        matrix.contains("36 passed, 0 failed"),
        "6 pods × (5 pods + outside):\n{matrix}"
    );

    // A pod without its default route answers no one: check says so and fails.
    lab.ip("n1p1", &["route", "del", "default"]);
    let out = lab.run(&["check"]);
    assert!(!out.status.success(), "check must fail with a broken pod");
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));

    lab.ok(&["pod", "del", "n1p1"]);
    lab.ok(&["pod", "add", "node1", "fresh"]);
    let matrix = lab.ok(&["check"]);
    assert!(matrix.contains("36 passed, 0 failed"), "{matrix}");
    lab.ok(&["down"]);
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    lab.ok(&["down"]);
    let out = lab.run(&["status"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not up"));
}

#[test]
fn vxlan_bridge() {
    all_connect("vxlan", &["--mode", "bridge"], "vx");
}

#[test]
fn host_gw_routed() {
    all_connect("host-gw", &["--mode", "routed"], "hg");
}

#[test]
fn directrouting_across_two_subnets() {
    all_connect("directrouting", &["--subnets", "2"], "dr");
}

/// A jumbo-frame underlay: weftd gives VXLAN pods the underlay MTU less the tunnel's 50 bytes, and
/// the largest packet that fits crosses the tunnel unfragmented.
#[test]
fn jumbo_underlay_vxlan() {
    let lab = Lab::new("mtu");
    let out = lab.run(&["up", "--nodes", "1", "--mtu", "70000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--mtu: 70000 is not in 1280..9216"),
        "{err}"
    );
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    lab.ok(&[
        "up",
        "--nodes",
        "2",
        "--pods",
        "1",
        "--backend",
        "vxlan",
        "--mtu",
        "9000",
    ]);
    let link = lab.ip("n1p1", &["-o", "link", "show", "eth0"]);
    assert!(link.contains(" mtu 8950 "), "{link}");
    let vxlan = lab.ip("node1", &["-o", "link", "show", "weft.vxlan"]);
    assert!(vxlan.contains(" mtu 8950 "), "{vxlan}");
    let peer = pod_ip(&lab, "n2p1").to_string();
    let ping = |size: &str| {
        lab.run(&[
            "exec", "n1p1", "--", "ping", "-n", "-q", "-M", "do", "-c", "1", "-W", "3", "-s", size,
            &peer,
        ])
    };
    // 8950 − 20 (IP) − 8 (ICMP): the largest that fits; one more is refused at the pod.
    let fits = ping("8922");
    assert!(
        fits.status.success(),
        "{}",
        String::from_utf8_lossy(&fits.stdout)
    );
    let too_big = ping("8923");
    assert!(!too_big.status.success());
    let matrix = lab.ok(&["check"]);
    assert!(matrix.contains("4 passed, 0 failed"), "{matrix}");
}

#[test]
fn host_gw_names_peers_it_cannot_reach() {
    let lab = Lab::new("hg2");
    lab.ok(&[
        "up",
        "--nodes",
        "2",
        "--pods",
        "1",
        "--backend",
        "host-gw",
        "--subnets",
        "2",
    ]);
    // node1 and node2 sit on different underlay subnets: no route is made (no black hole) and
    // the agent says why.
    // (node1's agent learns of node2 through its watch, so give it a moment.)
    let log_path = lab.state_dir.join(&lab.name).join("node1/weftd.log");
    let names_it = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains("node2") && log.contains("not on the underlay subnet")
    };
    wait_for(
        "node1's agent to name the unreachable peer",
        Duration::from_secs(10),
        names_it,
    );
    assert_eq!(
        lab.ip("node1", &["route", "show", "proto", "202"]).trim(),
        ""
    );
}

#[test]
fn restart_drift_and_leave() {
    let lab = Lab::new("ops");
    lab.ok(&["up", "--nodes", "3", "--pods", "1", "--backend", "vxlan"]);
    // The agent's health and metrics endpoints, inside node1.
    let get = |path: &str| {
        http_get(
            &lab,
            "n",
            "node1",
            SocketAddr::from(([127, 0, 0, 1], 9967)),
            path,
        )
    };
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics");
    assert!(metrics.contains("weft_peers 2"), "{metrics}");
    assert!(
        metrics.contains("weft_reconcile_duration_seconds_count"),
        "{metrics}"
    );
    assert!(get("/nope").starts_with("HTTP/1.1 404"));

    let n2 = pod_ip(&lab, "n2p1");
    let mut stream = echo_stream(&lab, "n1p1", "n2p1", n2);
    assert!(stream(), "stream works before the restarts");
    let routes_before = lab.ip("node1", &["route", "show", "proto", "202"]);

    // kill -9 both ends' agents and start them again while the stream runs.
    lab.ok(&["node", "restart", "node1", "--kill"]);
    lab.ok(&["node", "restart", "node2", "--kill"]);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert!(stream(), "the stream must survive agent restarts");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lab.ip("node1", &["route", "show", "proto", "202"]),
        routes_before,
        "nothing was flushed"
    );
    assert!(
        lab.ok(&["check"]).contains("9 passed, 0 failed"),
        "3 pods × (2 pods + outside)"
    );

    // A route deleted by hand is put back by the drift check (resync 5 s in the lab).
    let s2 = lab.subnet("node2");
    lab.ip("node1", &["route", "del", &s2]);
    let took = wait_for(
        "the drift check to restore the route",
        Duration::from_secs(12),
        || {
            lab.ip("node1", &["route", "show", &s2])
                .contains("weft.vxlan")
        },
    );
    eprintln!("route restored after {took:?}");

    // node3 leaves: its subnet, route, neighbour and FDB entry vanish on the others within 5 s.
    let s3 = lab.subnet("node3");
    let vtep3 = s3.split('/').next().unwrap().to_string();
    assert!(lab
        .ip("node1", &["route", "show", &s3])
        .contains("weft.vxlan"));
    let start = Instant::now();
    lab.ok(&["node", "leave", "node3"]);
    for node in ["node1", "node2"] {
        wait_for(
            &format!("{node} to drop node3"),
            Duration::from_secs(5)
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(100)),
            || {
                lab.ip(node, &["route", "show", &s3]).trim().is_empty()
                    && !lab
                        .ip(node, &["neigh", "show", "dev", "weft.vxlan"])
                        .contains(&vtep3)
            },
        );
    }
    eprintln!(
        "peers dropped node3 {:?} after leave started",
        start.elapsed()
    );
    assert!(stream(), "the other nodes' stream is untouched");
    assert_eq!(
        lab.ip("node3", &["route", "show", "proto", "202"]).trim(),
        "",
        "node3 removed its own routes"
    );
}

#[test]
fn etcd_outage_keeps_the_datapath_and_the_agents_catch_up() {
    assert!(
        Path::new("/usr/bin/etcd").exists(),
        "/usr/bin/etcd is missing: scripts/install-deps.sh installs etcd-server"
    );
    let lab = Lab::new("etcd");
    lab.ok(&[
        "up",
        "--nodes",
        "3",
        "--pods",
        "1",
        "--backend",
        "vxlan",
        "--store",
        "etcd",
    ]);
    assert!(lab.ok(&["check"]).contains("9 passed, 0 failed"));
    let n2 = pod_ip(&lab, "n2p1");
    let mut stream = echo_stream(&lab, "n1p1", "n2p1", n2);

    lab.ok(&["store", "stop"]);
    // 30 s without the store: established streams and new connections keep working.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        assert!(
            stream(),
            "stream broke {:?} into the outage",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        lab.ok(&["check"]).contains("9 passed, 0 failed"),
        "new connections during the outage"
    );
    lab.ok(&["store", "start"]);

    // The agents catch up: a node leaving after the outage is dropped by its peers.
    let s3 = lab.subnet("node3");
    lab.ok(&["node", "leave", "node3"]);
    for node in ["node1", "node2"] {
        wait_for(
            &format!("{node} to drop node3 after the outage"),
            Duration::from_secs(15),
            || lab.ip(node, &["route", "show", &s3]).trim().is_empty(),
        );
    }
    assert!(stream(), "the stream outlived the outage");
    // The survivors' leases outlived it too (etcd restores leases on restart).
    assert!(!lab.subnet("node1").is_empty());
    let log =
        std::fs::read_to_string(lab.state_dir.join(&lab.name).join("node1/weftd.log")).unwrap();
    assert!(!log.contains("this node's subnet changed"), "{log}");
}
