//! Twenty real `weftd` processes, each in a namespace of its own, start together on one SQLite
//! file: SQLite's locking between processes (not just between handles of one process) keeps
//! every subnet to one node, and each agent finds its underlay by the default route.

mod common;

use common::{colliding_names, ip};
use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weft_agent::lease::Lease;
use weft_net::ScratchNetns;
use weft_store::SqliteStore;

const PREFIX: &str = "wtest-procs-";
const AGENTS: u8 = 20;

/// The agents, killed and reaped however the test ends; then their namespaces and files go.
struct Agents {
    children: Vec<Child>,
    namespaces: Vec<ScratchNetns>,
    dir: PathBuf,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.namespaces.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The settings the twenty agents are given.
const CLUSTER: &[&str] = &["--backend", "host-gw", "--cluster-cidr", "10.244.0.0/19"];

#[test]
fn twenty_agent_processes_share_one_sqlite_file() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: creates network namespaces"
    );
    ScratchNetns::sweep(PREFIX);
    let dir = std::env::temp_dir().join(format!("weft-procs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut agents = Agents {
        children: Vec::new(),
        namespaces: Vec::new(),
        dir: dir.clone(),
    };
    let db = dir.join("store.db");
    // Names whose first-choice subnets collide (two first choices for all twenty), so that the
    // processes race for the same keys.
    let names = colliding_names("10.244.0.0/19".parse().unwrap(), AGENTS as usize);
    // Two namespaces more than agents: for latecomers.
    for i in 0..AGENTS + 2 {
        let ns = ScratchNetns::new(PREFIX, &format!("n{i}")).unwrap();
        ip(&ns, &["link", "set", "lo", "up"]);
        ip(
            &ns,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
            ],
        );
        ip(
            &ns,
            &[
                "addr",
                "add",
                &format!("10.100.0.{}/24", 10 + i),
                "dev",
                "eth0",
            ],
        );
        ip(&ns, &["link", "set", "eth0", "up"]);
        ip(&ns, &["link", "set", "eth1", "up"]);
        ip(&ns, &["route", "add", "default", "via", "10.100.0.1"]);
        agents.namespaces.push(ns);
    }
    // All namespaces first, then every agent as fast as processes start, without --iface.
    // `network`: the cluster-wide settings given to it.
    let spawn = |i: usize, name: &str, network: &[&str]| -> Child {
        let node = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&node).unwrap();
        let log = std::fs::File::create(node.join("weftd.log")).unwrap();
        let file = std::fs::File::open(agents.namespaces[i].path()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weftd"));
        cmd.args(["--node-name", name])
            .args(network)
            .arg("--store")
            .arg(format!("sqlite://{}", db.display()))
            .args(["--lease-ttl", "10"])
            .arg("--run-dir")
            .arg(node.join("run"))
            .arg("--state-dir")
            .arg(node.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: setns(2) only, in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        cmd.spawn().unwrap()
    };
    let started: Vec<Child> = (0..AGENTS as usize)
        .map(|i| spawn(i, &names[i], CLUSTER))
        .collect();
    agents.children.extend(started);
    let logs = |agents: &Agents| {
        (0..AGENTS)
            .map(|i| {
                let p = agents.dir.join(format!("node{i}/weftd.log"));
                format!(
                    "--- node{i}\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    // subnet.env, then the state files (pod-mtu is written just after subnet.env).
    let written = |i: u8| {
        ["run/subnet.env", "state/subnet", "state/pod-mtu"]
            .iter()
            .all(|f| dir.join(format!("node{i}/{f}")).exists())
    };
    while (0..AGENTS).any(|i| !written(i)) {
        assert!(
            Instant::now() < deadline,
            "not every agent wrote subnet.env and its state files within 30 s\n{}",
            logs(&agents)
        );
        for c in &mut agents.children {
            assert!(
                c.try_wait().unwrap().is_none(),
                "an agent exited\n{}",
                logs(&agents)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Every lease record, read as the agents read them.
    let records = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let store = SqliteStore::open(&db).await.unwrap();
            weft_agent::lease::leases(&store).await.unwrap()
        })
    };
    let leases: Vec<Lease> = records(&rt).into_iter().map(|(_, l)| l).collect();
    assert_eq!(leases.len(), AGENTS as usize, "{leases:?}");
    let subnets: HashSet<_> = leases.iter().map(|l| l.subnet).collect();
    assert_eq!(
        subnets.len(),
        AGENTS as usize,
        "a subnet given twice: {leases:?}"
    );
    for i in 0..AGENTS {
        let l = leases
            .iter()
            .find(|l| l.node == names[i as usize])
            .unwrap_or_else(|| panic!("{} holds no lease: {leases:?}", names[i as usize]));
        assert_eq!(
            l.underlay_ip.to_string(),
            format!("10.100.0.{}", 10 + i),
            "node{i} found its underlay by the default route"
        );
        let env = std::fs::read_to_string(dir.join(format!("node{i}/run/subnet.env"))).unwrap();
        assert!(env.contains(&format!("WEFT_SUBNET={}", l.subnet)), "{env}");
        // What a restart asks for again, and the MTU the node's pods are at.
        let state = |f: &str| std::fs::read_to_string(dir.join(format!("node{i}/state/{f}")));
        assert_eq!(state("subnet").unwrap().trim(), l.subnet.to_string());
        let mtu = env
            .lines()
            .find_map(|l| l.strip_prefix("WEFT_MTU="))
            .unwrap();
        assert_eq!(state("pod-mtu").unwrap().trim(), mtu);
    }
    // No agent hit an error on the way (a busy database, a lost race it could not recover from).
    let all = logs(&agents);
    assert!(!all.contains("ERROR"), "{all}");

    // The first agent recorded the cluster's settings; a latecomer on another backend is refused
    // at start, with both values named, and leases nothing.
    let late = AGENTS as usize;
    agents.children.push(spawn(
        late,
        "late",
        &["--backend", "vxlan", "--cluster-cidr", "10.244.0.0/19"],
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = agents.children.last_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the latecomer did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(dir.join(format!("node{late}/weftd.log"))).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--backend vxlan (the cluster's: host-gw)"),
        "{log}"
    );
    assert!(!dir.join(format!("node{late}/run/subnet.env")).exists());

    // A node given no network settings at all takes the cluster's (its own defaults would be
    // vxlan in 10.244.0.0/16).
    let bare = late + 1;
    agents.children.push(spawn(bare, "bare", &[]));
    let env_path = dir.join(format!("node{bare}/run/subnet.env"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env_path.exists() {
        assert!(
            Instant::now() < deadline,
            "the bare agent did not lease\n{}",
            std::fs::read_to_string(dir.join(format!("node{bare}/weftd.log"))).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, l) = records(&rt)
        .into_iter()
        .find(|(_, l)| l.node == "bare")
        .unwrap();
    assert_eq!(l.backend, weft_agent::backend::BackendKind::HostGw, "{l:?}");
    let cluster: ipnet::Ipv4Net = "10.244.0.0/19".parse().unwrap();
    assert!(cluster.contains(&l.subnet), "{l:?}");
    let log = std::fs::read_to_string(dir.join(format!("node{bare}/weftd.log"))).unwrap();
    assert!(
        log.contains("--cluster-cidr 10.244.0.0/19, --backend host-gw"),
        "{log}"
    );
    // What the plugin is told follows too: the cluster's CIDR, and host-gw's MTU (the underlay's
    // 1500; vxlan, the default, would give 1450).
    let env = std::fs::read_to_string(&env_path).unwrap();
    assert!(
        env.contains("WEFT_NETWORK=10.244.0.0/19") && env.contains("WEFT_MTU=1500"),
        "{env}"
    );

    // A second node under the first one's name takes its record at start (a restart looks the
    // same). The first agent says so, and does not take it back: no write war in the store.
    agents.children.push(spawn(late, &names[0], CLUSTER));
    let first_log = dir.join("node0/weftd.log");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&first_log)
        .unwrap()
        .contains("two nodes share the name")
    {
        assert!(
            Instant::now() < deadline,
            "node0 did not report the name clash\n{}",
            logs(&agents)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let record = |rt: &tokio::runtime::Runtime| {
        records(rt)
            .into_iter()
            .find(|(_, l)| l.node == names[0])
            .unwrap()
    };
    let (taken, l) = record(&rt);
    assert_eq!(l.underlay_ip.to_string(), format!("10.100.0.{}", 10 + late));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        record(&rt).0.mod_revision,
        taken.mod_revision,
        "nobody rewrote it"
    );
}
