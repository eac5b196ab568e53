//! Backends on a real kernel: two node namespaces on one underlay link, each with an address of
//! its pod subnet on loopback standing in for a pod. The reconciled datapath carries real TCP;
//! a second pass changes nothing; a route deleted by hand comes back; a gone peer is cleaned up.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;
use weft_agent::backend::reconcile::{reconcile, Reconciled};
use weft_agent::backend::{self, BackendKind, Underlay};
use weft_agent::lease::Lease;
use weft_net::{Netlink, Netns, ScratchNetns};

mod common;

use common::ip;

const PREFIX: &str = "wtest-agent-";

struct Node {
    ns: ScratchNetns,
    lease: Lease,
    underlay: Underlay,
}

fn two_nodes(kind: BackendKind) -> (Node, Node) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: creates network namespaces"
    );
    ScratchNetns::sweep(PREFIX);
    let a = ScratchNetns::new(PREFIX, "n1").unwrap();
    let b = ScratchNetns::new(PREFIX, "n2").unwrap();
    ip(
        &a,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ],
    );
    let mut nodes = Vec::new();
    for (i, ns) in [a, b].into_iter().enumerate() {
        let n = i + 1;
        ip(&ns, &["link", "set", "lo", "up"]);
        ip(
            &ns,
            &["addr", "add", &format!("10.100.0.{n}/24"), "dev", "eth0"],
        );
        ip(&ns, &["link", "set", "eth0", "up"]);
        ip(
            &ns,
            &["addr", "add", &format!("10.244.{n}.1/32"), "dev", "lo"],
        );
        let index: u32 = ip(&ns, &["-o", "link", "show", "eth0"])
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        nodes.push(Node {
            lease: Lease {
                node: format!("node{n}"),
                subnet: format!("10.244.{n}.0/24").parse().unwrap(),
                underlay_ip: format!("10.100.0.{n}").parse().unwrap(),
                backend: kind,
                vtep_mac: None,
                vxlan: None,
            },
            underlay: Underlay {
                index,
                name: "eth0".into(),
                ip: format!("10.100.0.{n}").parse().unwrap(),
                net: "10.100.0.0/24".parse().unwrap(),
                mtu: 1500,
            },
            ns,
        });
    }
    let b = nodes.pop().unwrap();
    (nodes.pop().unwrap(), b)
}

fn apply(kind: BackendKind, node: &Node, peers: &[Lease]) -> usize {
    let done = reconcile_in(kind, node, peers);
    assert_eq!(done.conflicts, vec![], "no foreign routes here");
    done.changes
}

fn reconcile_in(kind: BackendKind, node: &Node, peers: &[Lease]) -> Reconciled {
    reconcile_plan(node, &plan_for(kind, node, peers))
}

fn plan_for(kind: BackendKind, node: &Node, peers: &[Lease]) -> backend::Plan {
    backend::plan(
        kind,
        "10.244.0.0/16".parse().unwrap(),
        &node.lease,
        &node.underlay,
        peers,
    )
}

fn reconcile_plan(node: &Node, plan: &backend::Plan) -> Reconciled {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let netns = Netns::open(node.ns.path()).unwrap();
    rt.block_on(async {
        let nl = Netlink::connect_in(&netns).unwrap();
        reconcile(&nl, plan, &node.underlay).await.unwrap()
    })
}

fn tcp(from: &ScratchNetns, to: &ScratchNetns, addr: Ipv4Addr) -> std::io::Result<String> {
    let listener = to.netns.run(|| TcpListener::bind((addr, 0))).unwrap()?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).ok();
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.write_all(b"pong");
        }
    });
    let dst = SocketAddr::from((addr, port));
    let got = from
        .netns
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
        .unwrap()
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
    if got.is_err() {
        // Unblock the server thread.
        let _ = to
            .netns
            .run(|| TcpStream::connect_timeout(&dst, Duration::from_millis(200)));
    }
    let _ = server.join();
    got
}

fn backend_round_trip(kind: BackendKind) {
    let (n1, n2) = two_nodes(kind);
    let leases = vec![n1.lease.clone(), n2.lease.clone()];
    assert!(apply(kind, &n1, &leases) > 0);
    assert!(apply(kind, &n2, &leases) > 0);
    assert_eq!(
        tcp(&n1.ns, &n2.ns, "10.244.2.1".parse().unwrap()).unwrap(),
        "pong"
    );
    assert_eq!(
        tcp(&n2.ns, &n1.ns, "10.244.1.1".parse().unwrap()).unwrap(),
        "pong"
    );
    // Level-triggered and idempotent: nothing to do the second time.
    assert_eq!(apply(kind, &n1, &leases), 0);
    // A route deleted by hand is restored.
    ip(&n1.ns, &["route", "del", "10.244.2.0/24"]);
    assert_eq!(apply(kind, &n1, &leases), 1);
    assert_eq!(
        tcp(&n1.ns, &n2.ns, "10.244.2.1".parse().unwrap()).unwrap(),
        "pong"
    );
    if kind == BackendKind::Vxlan {
        let fdb = Command::new("bridge")
            .args(["-n", &n1.ns.name, "fdb", "show", "dev", "weft.vxlan"])
            .output()
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        assert!(
            fdb.contains("0a:58:0a:f4:02:00 dst 10.100.0.2 self permanent"),
            "{fdb}"
        );
        let neigh = ip(&n1.ns, &["neigh", "show", "dev", "weft.vxlan"]);
        assert!(
            neigh.contains("10.244.2.0 lladdr 0a:58:0a:f4:02:00 PERMANENT"),
            "{neigh}"
        );
        let d = ip(&n1.ns, &["-d", "link", "show", "weft.vxlan"]);
        assert!(
            d.contains("vxlan id 1") && d.contains("dstport 4789") && d.contains("nolearning"),
            "{d}"
        );
        assert!(d.contains("mtu 1450"), "{d}");
    }
    // The peer leaves: its route (and FDB, neighbour) go; the pod route of the node stays.
    let changed = apply(kind, &n1, &leases[..1]);
    assert!(changed >= 1);
    assert_eq!(ip(&n1.ns, &["route", "show", "proto", "202"]).trim(), "");
    if kind == BackendKind::Vxlan {
        assert_eq!(
            ip(&n1.ns, &["neigh", "show", "dev", "weft.vxlan"]).trim(),
            ""
        );
    }
    assert!(tcp(&n1.ns, &n2.ns, "10.244.2.1".parse().unwrap()).is_err());
}

#[test]
fn host_gw() {
    backend_round_trip(BackendKind::HostGw);
}

#[test]
fn vxlan() {
    backend_round_trip(BackendKind::Vxlan);
}

#[test]
fn directrouting_on_one_segment_uses_routes_only() {
    let (n1, n2) = two_nodes(BackendKind::DirectRouting);
    let leases = vec![n1.lease.clone(), n2.lease.clone()];
    apply(BackendKind::DirectRouting, &n1, &leases);
    apply(BackendKind::DirectRouting, &n2, &leases);
    let r = ip(&n1.ns, &["route", "show", "10.244.2.0/24"]);
    assert!(r.contains("via 10.100.0.2 dev eth0"), "{r}");
    assert_eq!(
        tcp(&n1.ns, &n2.ns, "10.244.2.1".parse().unwrap()).unwrap(),
        "pong"
    );
}

/// Someone else's route to node2's pod subnet, e.g. a static route an operator added.
const FOREIGN_ROUTE: &[&str] = &[
    "route",
    "add",
    "10.244.2.0/24",
    "via",
    "10.100.0.2",
    "proto",
    "static",
    "metric",
    "50",
];

#[test]
fn a_foreign_route_to_a_peer_subnet_is_left_alone_and_reported() {
    let (n1, n2) = two_nodes(BackendKind::HostGw);
    let leases = vec![n1.lease.clone(), n2.lease.clone()];
    ip(&n1.ns, FOREIGN_ROUTE);
    let done = reconcile_in(BackendKind::HostGw, &n1, &leases);
    assert_eq!(done.changes, 0);
    assert_eq!(done.conflicts.len(), 1, "{:?}", done.conflicts);
    let c = &done.conflicts[0];
    assert_eq!(
        (c.peer.as_str(), c.reason),
        ("node2", backend::Reason::RouteConflict)
    );
    assert!(c.message.contains("10.244.2.0/24"), "{}", c.message);
    let routes = ip(&n1.ns, &["route", "show", "10.244.2.0/24"]);
    assert!(
        routes.contains("proto static") && routes.contains("metric 50"),
        "the foreign route is untouched: {routes}"
    );
    assert_eq!(ip(&n1.ns, &["route", "show", "proto", "202"]).trim(), "");
    // Once its owner removes it, Weft's route goes in.
    ip(
        &n1.ns,
        &["route", "del", "10.244.2.0/24", "proto", "static"],
    );
    let done = reconcile_in(BackendKind::HostGw, &n1, &leases);
    assert_eq!(
        done,
        Reconciled {
            changes: 1,
            conflicts: vec![]
        }
    );
    let ours = ip(&n1.ns, &["route", "show", "proto", "202"]);
    assert!(ours.contains("10.244.2.0/24 via 10.100.0.2"), "{ours}");
    // A foreign route added later makes Weft step aside rather than compete with it.
    ip(&n1.ns, FOREIGN_ROUTE);
    let done = reconcile_in(BackendKind::HostGw, &n1, &leases);
    assert_eq!((done.changes, done.conflicts.len()), (1, 1));
    assert_eq!(ip(&n1.ns, &["route", "show", "proto", "202"]).trim(), "");
}

#[test]
fn vxlan_device_settings_drift_is_repaired() {
    let (n1, n2) = two_nodes(BackendKind::Vxlan);
    let leases = vec![n1.lease.clone(), n2.lease.clone()];
    apply(BackendKind::Vxlan, &n1, &leases);
    apply(BackendKind::Vxlan, &n2, &leases);
    let details = || ip(&n1.ns, &["-d", "link", "show", "weft.vxlan"]);
    // Learning switched on by hand: the device is made again as Weft makes it.
    ip(
        &n1.ns,
        &["link", "set", "weft.vxlan", "type", "vxlan", "learning"],
    );
    assert!(!details().contains("nolearning"), "{}", details());
    assert!(apply(BackendKind::Vxlan, &n1, &leases) > 0);
    assert!(details().contains("nolearning"), "{}", details());
    // Another MTU (set by hand here; in life the underlay's changed): set back in place, the same
    // device with its routes, neighbours and FDB entries, nothing else changed.
    let index = || {
        let line = ip(&n1.ns, &["-o", "link", "show", "weft.vxlan"]);
        line.split(':').next().unwrap().to_string()
    };
    let made = index();
    ip(&n1.ns, &["link", "set", "weft.vxlan", "mtu", "1400"]);
    assert_eq!(apply(BackendKind::Vxlan, &n1, &leases), 1);
    assert!(details().contains("mtu 1450"), "{}", details());
    assert_eq!(index(), made);
    // A device of the same name on another port (the kernel's default, 8472), made by hand.
    ip(&n1.ns, &["link", "del", "weft.vxlan"]);
    ip(
        &n1.ns,
        &[
            "link",
            "add",
            "weft.vxlan",
            "address",
            "0a:58:0a:f4:01:00",
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "local",
            "10.100.0.1",
            "dev",
            "eth0",
            "nolearning",
        ],
    );
    assert!(apply(BackendKind::Vxlan, &n1, &leases) > 0);
    assert!(details().contains("dstport 4789"), "{}", details());
    assert_eq!(apply(BackendKind::Vxlan, &n1, &leases), 0);
    assert_eq!(
        tcp(&n1.ns, &n2.ns, "10.244.2.1".parse().unwrap()).unwrap(),
        "pong"
    );
}

#[test]
fn vxlan_on_another_port_and_vni() {
    let (mut n1, mut n2) = two_nodes(BackendKind::Vxlan);
    for n in [&mut n1, &mut n2] {
        n.lease.vxlan = Some(weft_agent::lease::VxlanSettings {
            vni: 4242,
            port: 8472,
        });
    }
    let leases = vec![n1.lease.clone(), n2.lease.clone()];
    for node in [&n1, &n2] {
        let plan = plan_for(BackendKind::Vxlan, node, &leases);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert!(reconcile_plan(node, &plan).changes > 0);
        assert_eq!(reconcile_plan(node, &plan).changes, 0);
    }
    let d = ip(&n1.ns, &["-d", "link", "show", "weft.vxlan"]);
    assert!(
        d.contains("vxlan id 4242") && d.contains("dstport 8472"),
        "{d}"
    );
    assert_eq!(
        tcp(&n1.ns, &n2.ns, "10.244.2.1".parse().unwrap()).unwrap(),
        "pong"
    );
}
