//! Subnet leases on a real store (SQLite, one file, a separate handle per agent as separate
//! processes would have): racing agents never share a subnet; a restarted agent, or one whose
//! lease expired, gets its own subnet back.

mod common;

use clap::Parser;
use common::colliding_names;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use weft_agent::backend::Underlay;
use weft_agent::config::Flags;
use weft_agent::daemon::{acquire, remember_subnet};
use weft_agent::lease::{candidates, lease_key};
use weft_store::{SqliteStore, Store};

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("weft-leases-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn config(dir: &std::path::Path, node: &str) -> weft_agent::config::Config {
    Flags::parse_from([
        "weftd",
        "--node-name",
        node,
        "--cluster-cidr",
        "10.244.0.0/19",
        "--state-dir",
        dir.join(node).to_str().unwrap(),
        "--lease-ttl",
        "3",
    ])
    .resolve()
    .unwrap()
}

fn underlay(i: u8) -> Underlay {
    Underlay {
        index: 2,
        name: "eth0".into(),
        ip: std::net::Ipv4Addr::new(10, 100, 0, i),
        net: "10.100.0.0/24".parse().unwrap(),
        mtu: 1500,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_racing_agents_never_share_a_subnet() {
    let d = tmp("race");
    let db = d.0.join("store.db");
    let mut tasks = Vec::new();
    // All 20 ask at once, and all have one of two first choices in a /19 (32 subnets): most
    // compare-and-swaps lose, and those agents must move on to other subnets.
    let names = colliding_names("10.244.0.0/19".parse().unwrap(), 20);
    let start = Arc::new(tokio::sync::Barrier::new(20));
    for (i, name) in names.into_iter().enumerate() {
        let db = db.clone();
        let dir = d.0.clone();
        let start = start.clone();
        let i = i as u8;
        tasks.push(tokio::spawn(async move {
            let store = SqliteStore::open(&db).await.unwrap();
            let cfg = config(&dir, &name);
            let id = store.grant(Duration::from_secs(30)).await.unwrap();
            start.wait().await;
            acquire(&store, &cfg, &underlay(i + 10), id).await
        }));
    }
    let mut subnets = HashSet::new();
    for t in tasks {
        let lease = t.await.unwrap().expect("every agent gets a subnet");
        assert!(subnets.insert(lease.subnet), "{} given twice", lease.subnet);
    }
    assert_eq!(subnets.len(), 20);
    // The store agrees: 20 lease keys, 20 distinct owners.
    let store = SqliteStore::open(&db).await.unwrap();
    let (kvs, _) = store.list(weft_agent::lease::LEASE_PREFIX).await.unwrap();
    assert_eq!(kvs.len(), 20);
}

/// `acquire` with a fresh 30 s store lease, as an agent does at start.
async fn lease_30s(
    store: &SqliteStore,
    cfg: &weft_agent::config::Config,
    u: u8,
) -> weft_agent::lease::Lease {
    let id = store.grant(Duration::from_secs(30)).await.unwrap();
    acquire(store, cfg, &underlay(u), id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_gets_its_subnet_back() {
    let d = tmp("restart");
    let store = Arc::new(SqliteStore::open(d.0.join("store.db")).await.unwrap());
    let cfg = config(&d.0, "node-a");
    // Something holds node-a's first choice while node-a starts (a record that does not even
    // parse: it is skipped, not raced for), so node-a's subnet is not the one it would pick from
    // scratch: only the state file can bring it back later.
    let first_choice = candidates(cfg.cluster_cidr, cfg.subnet_len, "node-a", None)[0];
    let blocker = store
        .put(&lease_key(first_choice), b"{}", None)
        .await
        .unwrap();
    let first = lease_30s(&store, &cfg, 1).await;
    assert_ne!(first.subnet, first_choice);
    assert!(store.cad(&lease_key(first_choice), blocker).await.unwrap());
    // Another node takes a subnet meanwhile.
    let other = config(&d.0, "node-b");
    let b = lease_30s(&store, &other, 2).await;
    assert_ne!(b.subnet, first.subnet);
    // Restart (new store lease, old key still there): the same subnet, now on the new lease.
    let again = lease_30s(&store, &cfg, 1).await;
    assert_eq!(again.subnet, first.subnet);
    let (kvs, _) = store.list(weft_agent::lease::LEASE_PREFIX).await.unwrap();
    assert_eq!(kvs.len(), 2, "re-attached, not duplicated");

    // Its lease expires while it is away (key gone): the state file brings the subnet back.
    let short = store.grant(Duration::from_secs(1)).await.unwrap();
    let held = acquire(&*store, &cfg, &underlay(1), short).await.unwrap();
    assert_eq!(held.subnet, first.subnet);
    remember_subnet(&cfg, first.subnet).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (kvs, _) = store.list(weft_agent::lease::LEASE_PREFIX).await.unwrap();
        if kvs.len() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the expired lease's key never went"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = lease_30s(&store, &cfg, 1).await;
    assert_eq!(back.subnet, first.subnet);
    // Without the state file it would have taken its free first choice.
    let mut fresh = config(&d.0, "node-a-without-state");
    fresh.node_name = "node-a".into();
    store
        .cad(
            &lease_key(back.subnet),
            store
                .get(&lease_key(back.subnet))
                .await
                .unwrap()
                .unwrap()
                .mod_revision,
        )
        .await
        .unwrap();
    let scratch = lease_30s(&store, &fresh, 1).await;
    assert_eq!(scratch.subnet, first_choice);
}
