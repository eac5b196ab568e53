//! `weftctl lab` end to end, with real agents and the real plugin: every backend connects all
//! pods; a broken pod is caught; agents restarted with kill -9 keep established streams; a route
//! deleted by hand comes back; a node that leaves is dropped by its peers within seconds; down
//! leaves no namespace behind.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use weft_store::Store;

fn all_connect(backend: &str, extra: &[&str], tag: &str) {
    all_connect_then(backend, extra, tag, |_| {})
}

/// [`all_connect`], with `also` run on the lab once the matrix has passed.
fn all_connect_then(backend: &str, extra: &[&str], tag: &str, also: impl Fn(&Lab)) {
    let lab = Lab::new(tag);
    let mut args = vec!["up", "--nodes", "3", "--pods", "2", "--backend", backend];
    args.extend_from_slice(extra);
    lab.ok(&args);
    let status = lab.ok(&["status"]);
    assert!(
        status.contains("n3p2") && status.contains("no warnings from the agents"),
        "{status}"
    );
    let pids: Vec<u32> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| lab.agent_pid(n).expect("a live agent"))
        .collect();
    for (i, node) in ["node1", "node2", "node3"].iter().enumerate() {
        let line = status.lines().find(|l| l.starts_with(node)).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        let subnet = lab.subnet(node);
        let underlay = cols[1];
        assert!(
            underlay.starts_with("10.10") && underlay.ends_with(&format!(".{}", 11 + i)),
            "{line}"
        );
        assert_eq!(
            (cols[2], cols[3], cols[4]),
            (subnet.as_str(), backend, pids[i].to_string().as_str()),
            "{line}"
        );
    }
    let matrix = lab.ok(&["check"]);
    assert!(
        matrix.contains("36 passed, 0 failed"),
        "6 pods × (5 pods + outside):\n{matrix}"
    );
    also(&lab);
    // The responders answer on TCP and UDP, ports 80 and 81, across nodes.
    let far = pod_ip(&lab, "n3p2");
    for port in [80, 81] {
        let addr = SocketAddr::from((far, port));
        assert_eq!(ask(&lab, "p", "n1p1", addr).unwrap(), "n3p2", "TCP {port}");
        assert_eq!(ask_udp(&lab, "n1p1", addr).unwrap(), "n3p2", "UDP {port}");
    }

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
    for pid in pids {
        assert!(
            !Path::new("/proc").join(pid.to_string()).exists(),
            "agent {pid} outlived down"
        );
    }
    assert!(
        !lab.state_dir.join(&lab.name).exists(),
        "the lab's directory is gone"
    );
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
    all_connect_then("host-gw", &["--mode", "routed"], "hg", |lab| {
        // The mode reached the plugin through subnet.env: a /32 per pod, no bridge.
        let addr = lab.ip("n1p1", &["-4", "-o", "addr", "show", "eth0"]);
        assert!(addr.contains("/32 "), "{addr}");
        let bridge = lab.run(&["exec", "node1", "--", "ip", "link", "show", "weft0"]);
        assert!(!bridge.status.success(), "{bridge:?}");
    });
}

#[test]
fn directrouting_across_two_subnets() {
    all_connect_then("directrouting", &["--subnets", "2"], "dr", |lab| {
        // The fabric only switches: it holds no IPv4 address besides loopback.
        let fabric = lab.ok(&["exec", "fabric", "--", "ip", "-4", "-o", "addr", "show"]);
        assert_eq!(fabric.lines().count(), 1, "{fabric}");
        assert!(fabric.contains("lo "), "{fabric}");
        // node1 (br1) reaches node2 (br2) through the router: a packet with TTL 1 dies there.
        let out = lab.run(&[
            "exec",
            "node1",
            "--",
            "ping",
            "-n",
            "-c",
            "1",
            "-W",
            "2",
            "-t",
            "1",
            "10.101.0.12",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("From 10.100.0.1") && text.contains("Time to live exceeded"),
            "{text}"
        );
        // Both kinds of peer: node3 shares node1's subnet (a route via its underlay IP), node2
        // does not (a route over the tunnel).
        let routes = lab.ip("node1", &["route", "show", "proto", "202"]);
        let to = |node: &str| {
            let subnet = lab.subnet(node);
            routes
                .lines()
                .find(|l| l.starts_with(&subnet))
                .unwrap_or_else(|| panic!("no route to {node}'s {subnet}:\n{routes}"))
                .to_string()
        };
        assert!(to("node3").contains("via 10.100.0.13 dev eth0"), "{routes}");
        assert!(to("node2").contains("dev weft.vxlan"), "{routes}");
    });
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
    // A ping with don't-fragment set, from one pod to another.
    let ping_between = |from: &str, to: &str, size: &str| {
        let to = pod_ip(&lab, to).to_string();
        lab.run(&[
            "exec", from, "--", "ping", "-n", "-q", "-M", "do", "-c", "1", "-W", "3", "-s", size,
            &to,
        ])
        .status
        .success()
    };
    // 8950 − 20 (IP) − 8 (ICMP): the largest that fits; one more is refused at the pod.
    assert!(ping_between("n1p1", "n2p1", "8922"));
    assert!(!ping_between("n1p1", "n2p1", "8923"));
    let matrix = lab.ok(&["check"]);
    assert!(matrix.contains("4 passed, 0 failed"), "{matrix}");

    // node1's underlay MTU drops to 1500 under running pods. Within a resync its agent gives new
    // pods 1450 and moves the running ones there, both ends of their veth, and the tunnel too,
    // in place. A pod whose MTU is another (given by its CNI conf; set by hand here) keeps it.
    lab.ok(&["pod", "add", "node1", "pinned"]);
    let mtu = |line: &str| {
        let w: Vec<&str> = line.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "mtu").unwrap();
        w[i + 1].to_string()
    };
    // A pod's host end, as `ip -o link` prints it on the node: `eth0@ifN` names its index.
    let host_end = |pod: &str, node: &str| {
        let line = lab.ip(pod, &["-o", "link", "show", "eth0"]);
        let peer = line.split("@if").nth(1).unwrap().split(':').next().unwrap();
        let links = lab.ip(node, &["-o", "link", "show"]);
        links
            .lines()
            .find(|l| l.starts_with(&format!("{peer}: ")))
            .unwrap_or_else(|| panic!("no #{peer} on {node}: {links}"))
            .to_string()
    };
    // The MTU of a pod's eth0 and of its host end.
    let mtus = |pod: &str, node: &str| {
        (
            mtu(&lab.ip(pod, &["-o", "link", "show", "eth0"])),
            mtu(&host_end(pod, node)),
        )
    };
    let vxlan_mtu = |node: &str| mtu(&lab.ip(node, &["-o", "link", "show", "weft.vxlan"]));
    let pinned_host = host_end("pinned", "node1");
    let pinned_host = pinned_host
        .split(": ")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap();
    lab.ip("pinned", &["link", "set", "eth0", "mtu", "4000"]);
    lab.ip("node1", &["link", "set", pinned_host, "mtu", "4000"]);
    let vxlan_index = |node: &str| {
        let line = lab.ip(node, &["-o", "link", "show", "weft.vxlan"]);
        line.split(':').next().unwrap().to_string()
    };
    let tunnel = vxlan_index("node1");
    lab.ip("node1", &["link", "set", "eth0", "mtu", "1500"]);
    let env = lab.state_dir.join(&lab.name).join("node1/run/subnet.env");
    wait_for(
        "node1's pods and tunnel to move to MTU 1450",
        Duration::from_secs(12),
        // (The tunnel is set by the reconcile after the pods' move.)
        || mtus("n1p1", "node1") == ("1450".into(), "1450".into()) && vxlan_mtu("node1") == "1450",
    );
    assert!(std::fs::read_to_string(&env)
        .unwrap()
        .contains("WEFT_MTU=1450"));
    assert_eq!(
        vxlan_index("node1"),
        tunnel,
        "the tunnel was not made again"
    );
    assert_eq!(mtus("pinned", "node1"), ("4000".into(), "4000".into()));
    let logged = |want: &str| {
        let log = lab.log("node1");
        assert!(log.contains(want), "node1's log lacks {want:?}:\n{log}");
    };
    logged("moved 1 pods from MTU 8950 to the node's new 1450");
    // node2 and its pod keep theirs.
    assert_eq!(mtus("n2p1", "node2"), ("8950".into(), "8950".into()));
    // The largest packet that fits now crosses, both ways; one more is refused (at n1p1 itself,
    // or where node1 routes into weft0, whose MTU follows its ports).
    let weft0_mtu = || mtu(&lab.ip("node1", &["-o", "link", "show", "weft0"]));
    assert_eq!(weft0_mtu(), "1450");
    for (from, to) in [("n1p1", "n2p1"), ("n2p1", "n1p1")] {
        assert!(ping_between(from, to, "1422"), "{from} → {to}");
        assert!(!ping_between(from, to, "1423"), "{from} → {to}");
    }
    let matrix = lab.ok(&["check"]);
    assert!(matrix.contains(" 0 failed"), "{matrix}");

    // Back to 9000 while node1's agent is stopped (SIGSTOP, so it cannot see it), and subnet.env
    // already says 8950, as if an agent had died between writing it and moving the pods: the next
    // agent goes by the MTU the pods were last moved to (state dir), and moves them at start.
    let pid = lab.agent_pid("node1").expect("node1's agent");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    lab.ip("node1", &["link", "set", "eth0", "mtu", "9000"]);
    let said = std::fs::read_to_string(&env).unwrap();
    std::fs::write(&env, said.replace("WEFT_MTU=1450", "WEFT_MTU=8950")).unwrap();
    lab.ok(&["node", "restart", "node1", "--kill"]);
    wait_for(
        "the restarted agent to move node1's pods and tunnel to MTU 8950",
        Duration::from_secs(12),
        || mtus("n1p1", "node1") == ("8950".into(), "8950".into()) && vxlan_mtu("node1") == "8950",
    );
    logged("moved 1 pods from MTU 1450 to the node's new 8950");
    assert_eq!(mtus("pinned", "node1"), ("4000".into(), "4000".into()));
    // weft0 takes its smallest port's MTU: the pinned pod's 4000 caps what node1 routes to its
    // pods. Without it, 8922 bytes cross both ways again.
    assert_eq!(weft0_mtu(), "4000");
    lab.ok(&["pod", "del", "pinned"]);
    assert_eq!(weft0_mtu(), "8950");
    // n2p1 learned a path MTU of 1450 to n1p1 from node1's ICMP above; it would keep it 10 min.
    lab.ip("n2p1", &["route", "flush", "cache"]);
    for (from, to) in [("n1p1", "n2p1"), ("n2p1", "n1p1")] {
        assert!(ping_between(from, to, "8922"), "{from} → {to}");
        assert!(!ping_between(from, to, "8923"), "{from} → {to}");
    }
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
        "--cluster-cidr",
        "10.50.0.0/16",
    ]);
    // The lab's --cluster-cidr reaches the agents.
    for node in ["node1", "node2"] {
        let subnet = lab.subnet(node);
        assert!(subnet.starts_with("10.50."), "{node}: {subnet}");
    }
    // node1 and node2 sit on different underlay subnets: no route is made (no black hole) and
    // the agent says why.
    // (node1's agent learns of node2 through its watch, so give it a moment.)
    let log_path = lab.log_path("node1");
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
    // …counts it, and publishes a Warning event that `lab status` shows.
    let metrics = http_get(
        &lab,
        "n",
        "node1",
        SocketAddr::from(([127, 0, 0, 1], 9967)),
        "/metrics",
    );
    assert!(metrics.contains("weft_peer_problems 1"), "{metrics}");
    wait_for(
        "both agents' events in lab status",
        Duration::from_secs(10),
        || {
            let status = lab.ok(&["status"]);
            status.contains("WARNING node1 PeerNotOnLink: peer node2")
                && status.contains("WARNING node2 PeerNotOnLink: peer node1")
        },
    );
}

/// `f` on the lab's store, from this (the root) namespace: SQLite labs only.
fn on_store<T>(url: &str, f: impl AsyncFnOnce(&weft_store::AnyStore) -> T) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let db = weft_store::AnyStore::open(url).await.unwrap();
            f(&db).await
        })
}

/// `weftctl node leave`: a running agent leaves when asked (releases its lease, removes its routes
/// and table, exits); for a node whose agent is dead, weftctl releases the lease itself. A node
/// whose agent dies without leaving is dropped by its peers when its lease expires.
#[test]
fn node_leave_and_lease_expiry() {
    let lab = Lab::new("lv");
    lab.ok(&["up", "--nodes", "4", "--pods", "0", "--backend", "host-gw"]);
    let store = lab.store_url();
    let leave = |node: &str, timeout: &str| {
        let out = lab.weftctl(&[
            "node",
            "leave",
            node,
            "--store",
            &store,
            "--timeout",
            timeout,
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let dropped_by = |peers: &[&str], subnet: &str, limit: Duration, what: &str| {
        for node in peers {
            wait_for(&format!("{node} to drop {what}"), limit, || {
                lab.ip(node, &["route", "show", subnet]).trim().is_empty()
            });
        }
    };
    let (s1, s2, s3, s4) = (
        lab.subnet("node1"),
        lab.subnet("node2"),
        lab.subnet("node3"),
        lab.subnet("node4"),
    );
    assert!(lab
        .ip("node1", &["route", "show", &s3])
        .contains("proto 202"));
    let lease_record = |subnet: &str| weft_agent::lease::lease_key(subnet.parse().unwrap());
    let store_key = |key: &str, delete: bool| {
        on_store(&store, async |db| {
            if delete {
                assert!(db.delete(key).await.unwrap(), "{key} was there");
            }
            db.get(key).await.unwrap().is_some()
        })
    };

    // The lab recorded the cluster's network settings and gave the agents none. Reset forgets
    // them; the next agent to start would record its own defaults (vxlan), but the others' leases
    // say host-gw, so it refuses to start. Once they are set again it starts.
    let network = |cmd: &str| {
        let out = lab.weftctl(&["network", cmd, "--store", &store]);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, shown) = network("show");
    assert!(
        ok && shown.contains(r#""backend":"host-gw""#) && shown.contains("10.244.0.0/16"),
        "{shown}"
    );
    assert!(network("reset")
        .1
        .contains("forgot the cluster's network settings"));
    let (ok, shown) = network("show");
    assert!(!ok && shown.contains("no /weft/config/network"), "{shown}");
    lab.ok(&["node", "restart", "node1"]);
    let log1 = lab.log_path("node1");
    wait_for(
        "node1's agent to refuse its defaults",
        Duration::from_secs(10),
        || {
            lab.agent_pid("node1").is_none()
                && std::fs::read_to_string(&log1)
                    .unwrap()
                    .contains("node node2 runs backend host-gw (this node: vxlan)")
        },
    );
    assert!(!network("show").0, "nothing was recorded");
    let out = lab.weftctl(&["network", "set", "--backend", "host-gw", "--store", &store]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("restart these nodes to take the new settings: node"),
        "{out:?}"
    );
    // Its first start (at `up`) logged the same: it was given no backend either.
    let took = "from the cluster's settings (/weft/config/network): --backend host-gw";
    assert_eq!(
        std::fs::read_to_string(&log1)
            .unwrap()
            .matches(took)
            .count(),
        1
    );
    lab.ok(&["node", "restart", "node1"]);
    wait_for(
        "node1's agent to start on the settings set",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log1)
                .unwrap()
                .matches(took)
                .count()
                == 2
        },
    );

    // The cluster's settings changed under the running agents (`network set`), then node2's
    // store lease is lost: its agent leases again on the settings it runs, and says to restart
    // it, instead of leaving its pods without a lease and their subnet free.
    let set = |args: &[&str]| {
        let mut a = vec!["network", "set", "--store", &store];
        a.extend(args);
        let out = lab.weftctl(&a);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = set(&["--backend", "vxlan"]);
    assert!(
        out.contains("restart these nodes to take the new settings: node"),
        "{out}"
    );
    // lab status tells the cluster's settings from what each node runs.
    let status = lab.ok(&["status"]);
    assert!(
        status.contains(": backend vxlan, cluster CIDR 10.244.0.0/16,"),
        "{status}"
    );
    let node1 = status.lines().find(|l| l.starts_with("node1 ")).unwrap();
    assert_eq!(node1.split_whitespace().nth(3), Some("host-gw"), "{status}");
    let record2 = lease_record(&s2);
    on_store(&store, async |db| {
        let kv = db.get(&record2).await.unwrap().expect("node2's record");
        db.revoke(kv.lease.expect("on a store lease"))
            .await
            .unwrap();
        assert!(db.get(&record2).await.unwrap().is_none(), "gone with it");
    });
    let log2 = lab.log_path("node2");
    wait_for(
        "node2 to lease its subnet again on its own settings",
        Duration::from_secs(15),
        || {
            store_key(&record2, false)
                && std::fs::read_to_string(&log2)
                    .unwrap()
                    .contains("restart this agent to take the cluster's settings")
                && lab
                    .ip("node1", &["route", "show", &s2])
                    .contains("proto 202")
        },
    );
    assert_eq!(lab.subnet("node2"), s2);
    set(&["--backend", "host-gw"]);

    // node1's lease record deleted by hand: its agent puts it back, and the peers route to it again.
    let record1 = lease_record(&s1);
    store_key(&record1, true);
    wait_for(
        "node1's lease record to be back",
        Duration::from_secs(12),
        || {
            store_key(&record1, false)
                && lab
                    .ip("node2", &["route", "show", &s1])
                    .contains("proto 202")
        },
    );
    let log = lab.log("node1");
    assert!(log.contains("was gone; put it back"), "{log}");

    // A live agent, asked to leave.
    let (ok, text) = leave("node3", "15");
    assert!(
        ok && text.contains("node node3 left"),
        "{text}\n{}",
        lab.logs()
    );
    dropped_by(
        &["node1", "node2", "node4"],
        &s3,
        Duration::from_secs(5),
        "node3",
    );
    wait_for("node3's agent to exit", Duration::from_secs(5), || {
        lab.agent_pid("node3").is_none()
    });
    assert_eq!(
        lab.ip("node3", &["route", "show", "proto", "202"]).trim(),
        ""
    );
    let table = lab.run(&["exec", "node3", "--", "nft", "list", "table", "ip", "weft"]);
    assert!(!table.status.success(), "node3's nft table is gone");
    let env = lab.state_dir.join(&lab.name).join("node3/run/subnet.env");
    assert!(!env.exists(), "node3's subnet.env is gone");
    let (ok, text) = leave("node3", "2");
    assert!(!ok && text.contains("node3 holds no lease"), "{text}");

    // A dead agent: weftctl releases its lease after the timeout.
    lab.kill_agent("node4");
    let (ok, text) = leave("node4", "2");
    assert!(
        ok && text.contains("no agent on node4 answered") && text.contains(&s4),
        "{text}"
    );
    dropped_by(&["node1", "node2"], &s4, Duration::from_secs(5), "node4");
    // The request waits for node4's agent: started again, it leaves at once and says so.
    assert!(store_key("/weft/leave/node4", false));
    lab.ok(&["node", "restart", "node4"]);
    wait_for(
        "node4's agent to leave and exit",
        Duration::from_secs(10),
        || lab.agent_pid("node4").is_none() && !store_key("/weft/leave/node4", false),
    );
    let table = lab.run(&["exec", "node4", "--", "nft", "list", "table", "ip", "weft"]);
    assert!(!table.status.success(), "node4's nft table is gone");
    assert_eq!(
        lab.ip("node4", &["route", "show", "proto", "202"]).trim(),
        ""
    );
    assert!(lab.ip("node1", &["route", "show", &s4]).trim().is_empty());

    // An agent that dies and never comes back: its lease expires (TTL 10 s in the lab) and the
    // peers drop it.
    let killed = Instant::now();
    lab.kill_agent("node2");
    dropped_by(
        &["node1"],
        &s2,
        Duration::from_secs(20),
        "node2's expired lease",
    );
    eprintln!(
        "node1 dropped node2 {:?} after its agent died",
        killed.elapsed()
    );
    let routed_to = |subnet: &str| {
        lab.ip("node1", &["route", "show", subnet])
            .contains("proto 202")
    };
    // Started again, it rejoins with the subnet its state file remembers.
    lab.ok(&["node", "restart", "node2"]);
    wait_for("node2 to rejoin", Duration::from_secs(10), || {
        routed_to(&s2)
    });
    assert_eq!(lab.subnet("node2"), s2);

    // A request waiting for a dead agent can be dropped: the agent then joins as usual.
    lab.kill_agent("node2");
    let (ok, text) = leave("node2", "1");
    assert!(ok && text.contains("no agent on node2 answered"), "{text}");
    let cancel = |node: &str| {
        let out = lab.weftctl(&["node", "leave", node, "--store", &store, "--cancel"]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(cancel("node2").contains("dropped the leave request for node2"));
    assert!(cancel("node2").contains("no leave request for node2"));
    lab.ok(&["node", "restart", "node2"]);
    wait_for("node2 to join again", Duration::from_secs(10), || {
        routed_to(&s2)
    });
    assert!(lab.agent_pid("node2").is_some(), "node2's agent stays");
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
    let held = format!("weft_lease{{subnet=\"{}\"}} 1", lab.subnet("node1"));
    assert!(metrics.contains(&held), "{held}: {metrics}");
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
    let old_pid = lab.agent_pid("node1");
    lab.ok(&["node", "restart", "node1", "--kill"]);
    lab.ok(&["node", "restart", "node2", "--kill"]);
    assert_ne!(lab.agent_pid("node1"), old_pid);
    // The new agents are ready (their first reconcile is done) and found nothing to change.
    for node in ["node1", "node2"] {
        let get = |path: &str| {
            try_http_get(
                &lab,
                "n",
                node,
                SocketAddr::from(([127, 0, 0, 1], 9967)),
                path,
            )
            .unwrap_or_default()
        };
        wait_for(
            &format!("{node}'s new agent to be ready"),
            Duration::from_secs(10),
            || {
                assert!(stream(), "the stream must survive agent restarts");
                get("/readyz").starts_with("HTTP/1.1 200")
            },
        );
        let metrics = get("/metrics");
        assert!(
            metrics.contains("weft_reconciles_total")
                && metrics.contains("weft_reconcile_changes_total 0"),
            "{node}'s restarted agent changed nothing: {metrics}"
        );
    }
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
    // So are the neighbour and FDB entry of a peer's VTEP.
    let vtep2 = s2.split('/').next().unwrap().to_string();
    lab.ip("node1", &["neigh", "del", &vtep2, "dev", "weft.vxlan"]);
    let fdb = |node: &str| {
        lab.ok(&[
            "exec",
            node,
            "--",
            "bridge",
            "fdb",
            "show",
            "dev",
            "weft.vxlan",
        ])
    };
    let mac2 = fdb("node1")
        .lines()
        .find(|l| l.contains("dst 10.100.0.12"))
        .and_then(|l| l.split_whitespace().next())
        .expect("node2's FDB entry on node1")
        .to_string();
    lab.ok(&[
        "exec",
        "node1",
        "--",
        "bridge",
        "fdb",
        "del",
        &mac2,
        "dev",
        "weft.vxlan",
        "dst",
        "10.100.0.12",
    ]);
    wait_for(
        "the drift check to restore the neighbour and FDB entry",
        Duration::from_secs(12),
        || {
            // As Weft makes them: VTEP IP → VTEP MAC, permanent (not a FAILED or learned one).
            lab.ip("node1", &["neigh", "show", "dev", "weft.vxlan"])
                .lines()
                .any(|l| l.starts_with(&format!("{vtep2} lladdr {mac2} PERMANENT")))
                && fdb("node1").lines().any(|l| {
                    l.starts_with(&mac2) && l.contains("dst 10.100.0.12") && l.contains("permanent")
                })
        },
    );
    // node3's agent, never restarted, renews its lease (every third of the lab's 10 s TTL) well
    // within a TTL.
    let renewals = || -> u64 {
        let m = http_get(
            &lab,
            "n",
            "node3",
            SocketAddr::from(([127, 0, 0, 1], 9967)),
            "/metrics",
        );
        m.lines()
            .find_map(|l| l.strip_prefix("weft_lease_renewals_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no weft_lease_renewals_total in {m}"))
    };
    let before = renewals();
    wait_for("a lease renewal", Duration::from_secs(10), || {
        renewals() > before
    });

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
                    && !fdb(node).contains("dst 10.100.0.13")
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
    let links = lab.ip("node3", &["-o", "link", "show"]);
    assert!(!links.contains("weft.vxlan"), "{links}");
    let table = lab.run(&["exec", "node3", "--", "nft", "list", "table", "ip", "weft"]);
    assert!(!table.status.success(), "node3's nft table is gone");

    // node2's underlay address changes (a new DHCP lease, say): its agent notices on its next
    // check and republishes its lease; node1's FDB entry follows, and the pods talk again.
    lab.ip("node2", &["addr", "del", "10.100.0.12/24", "dev", "eth0"]);
    lab.ip("node2", &["addr", "add", "10.100.0.22/24", "dev", "eth0"]);
    lab.ip("node2", &["route", "add", "default", "via", "10.100.0.1"]);
    let moved = Instant::now();
    wait_for(
        "node1's FDB entry to follow node2's new address",
        Duration::from_secs(15),
        || fdb("node1").contains(&format!("{mac2} dst 10.100.0.22")),
    );
    wait_for("the stream to flow again", Duration::from_secs(10), || {
        stream()
    });
    eprintln!(
        "node1 followed node2's new address {:?} later",
        moved.elapsed()
    );
    let d = lab.ip("node2", &["-d", "link", "show", "weft.vxlan"]);
    assert!(d.contains("local 10.100.0.22"), "{d}");
    let addr = SocketAddr::from((n2, 80));
    assert_eq!(ask(&lab, "p", "n1p1", addr).unwrap(), "n2p1");
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

    let s2 = lab.subnet("node2");
    lab.ok(&["store", "stop"]);
    // 30 s without the store: established streams and new connections keep working.
    let start = Instant::now();
    let readyz = |node: &str| {
        try_http_get(
            &lab,
            "n",
            node,
            SocketAddr::from(([127, 0, 0, 1], 9967)),
            "/readyz",
        )
        .unwrap_or_default()
    };
    let mut restarted = false;
    while start.elapsed() < Duration::from_secs(30) {
        assert!(
            stream(),
            "stream broke {:?} into the outage",
            start.elapsed()
        );
        if !restarted && start.elapsed() > Duration::from_secs(3) {
            // An agent that starts while the store is away waits for it, not ready, without
            // exiting and without touching the datapath.
            lab.ok(&["node", "restart", "node2"]);
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        lab.agent_pid("node2").is_some(),
        "node2's agent waits\n{}",
        lab.logs()
    );
    assert!(
        readyz("node2").starts_with("HTTP/1.1 503"),
        "{}",
        readyz("node2")
    );
    assert!(
        lab.ok(&["check"]).contains("9 passed, 0 failed"),
        "new connections during the outage"
    );
    lab.ok(&["store", "start"]);
    wait_for(
        "node2's agent to get ready",
        Duration::from_secs(30),
        || readyz("node2").starts_with("HTTP/1.1 200"),
    );
    assert_eq!(lab.subnet("node2"), s2, "node2 kept its subnet");
    // Services written after the outage, through etcd: apply returns once every agent, node2's
    // restarted one too, has programmed them (their digests equal etcd's), so a check right after
    // needs no retry.
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/lab-services.yaml"
    );
    lab.ok(&["apply", "-f", manifest]);
    let check = lab.ok(&["check"]);
    assert!(
        check.contains(" 0 failed")
            && !check.contains("after retries")
            && check.contains("default/web/tcp/80: 9/9 ok"),
        "{check}"
    );

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
    // The survivors' leases outlived it too (etcd renews leases when it starts again).
    let log = lab.log("node1");
    assert!(
        !log.contains("the store lost lease") && !log.contains("this node's subnet changed"),
        "{log}"
    );
}
