//! The rendered transactions against the real nft and kernel, in a scratch namespace: the full
//! table loads, incremental updates apply and match a fresh full load, a hand-made deletion is
//! repaired, and a failed update falls back to a full sync.

mod common;

use common::*;
use serde_json::json;
use weft_net::ScratchNetns;
use weft_services::{nft, Proxy, SyncKind};

const PREFIX: &str = "wtest-svc-";

fn scratch(tag: &str) -> ScratchNetns {
    assert!(
        nix_is_root(),
        "these tests program nftables in a network namespace and need root (CI runs as root)"
    );
    ScratchNetns::sweep(PREFIX);
    ScratchNetns::new(PREFIX, tag).unwrap()
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn listing(ns: &ScratchNetns) -> String {
    ns.netns
        .run(|| nft::run("", &["list", "table", "ip", "weft"]))
        .unwrap()
        .unwrap()
}

/// The listing without counter values, its top-level blocks (chains, maps, sets) sorted: a chain
/// added by an update is listed after the others, which is not a difference.
fn structure(ns: &ScratchNetns) -> String {
    let text = listing(ns);
    let mut blocks: Vec<String> = Vec::new();
    let inner = text
        .lines()
        .filter(|l| l.starts_with('\t'))
        .filter(|l| !l.trim_start().starts_with("packets "));
    for line in inner {
        let top = line.starts_with('\t') && !line.starts_with("\t\t") && line != "\t}";
        if top || blocks.is_empty() {
            blocks.push(String::new());
        }
        let b = blocks.last_mut().expect("pushed");
        b.push_str(line);
        b.push('\n');
    }
    blocks.sort();
    blocks.concat()
}

#[test]
fn full_incremental_and_repair_agree_with_the_kernel() {
    let ns = scratch("sync");
    let fresh = scratch("fresh");
    let mut proxy = Proxy::new();
    let mut o = sample();
    // SCTP goes through the same maps (the kernel here has SCTP conntrack and NAT).
    o.svc(service(
        "sctp",
        json!({"clusterIP": "10.96.0.60", "ports": [{"port": 9999, "protocol": "SCTP"}]}),
    ));
    o.slice(slice(
        "sctp-1",
        "sctp",
        "",
        "SCTP",
        9999,
        &[ready("10.244.2.60", "node2")],
    ));
    let rs = o.compile();
    let r = ns
        .netns
        .run(|| proxy.sync(&facts(), rs.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(r.kind, SyncKind::Full);
    let l = listing(&ns);
    assert!(
        l.contains("10.96.0.10 . tcp . 80 counter packets 0 bytes 0 : goto pick/ep-ips-tcp/3"),
        "{l}"
    );
    assert!(l.contains("chain pick/ep-ips-tcp/3"), "{l}");
    assert!(l.contains("10.96.0.10 . 80 . 2 : 10.244.3.5 . 8080"), "{l}");
    assert!(
        l.contains("10.96.0.60 . sctp . 9999 counter packets 0 bytes 0 : goto pick/ep-ips-sctp/1"),
        "{l}"
    );
    assert!(
        l.contains("10.96.0.60 . 9999 . 0 : 10.244.2.60 . 9999"),
        "{l}"
    );
    assert!(l.contains("chain pick/ep-ips-sctp/1"), "{l}");

    // Scale web to one endpoint and drop the LB service: an incremental update.
    let mut o = sample();
    o.slice(web_slice(&[ready("10.244.2.5", "node2")]));
    o.services.remove("/registry/services/specs/default/lb");
    let rs2 = o.compile();
    let r = ns
        .netns
        .run(|| proxy.sync(&facts(), rs2.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(r.kind, SyncKind::Incremental, "{:?}", r.recovered_from);
    let again = ns
        .netns
        .run(|| proxy.sync(&facts(), rs2.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(again.kind, SyncKind::Unchanged);
    // The same table as loading the new ruleset from scratch.
    let mut p2 = Proxy::new();
    fresh
        .netns
        .run(|| p2.sync(&facts(), rs2.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(structure(&ns), structure(&fresh));
    assert!(!listing(&ns).contains("default/lb"));

    // Drift: an element and a chain's rules deleted by hand come back on repair.
    ns.netns
        .run(|| {
            nft::apply(
                "delete element ip weft service-ips { 10.96.0.10 . tcp . 80 }\n\
                 flush chain ip weft svc/default/sticky/tcp/80\n",
            )
        })
        .unwrap()
        .unwrap();
    assert_ne!(structure(&ns), structure(&fresh));
    let r = ns.netns.run(|| proxy.repair()).unwrap().unwrap();
    assert_eq!(r.kind, SyncKind::Repair);
    assert_eq!(structure(&ns), structure(&fresh));

    // An update the kernel refuses (web scaled to zero deletes its NodePort element, which was
    // removed by hand) falls back to a full sync, which leaves the right table.
    ns.netns
        .run(|| nft::apply("delete element ip weft service-nodeports { tcp . 30080 }\n"))
        .unwrap()
        .unwrap();
    let mut o = sample();
    o.slice(web_slice(&[]));
    let rs3 = o.compile();
    let r = ns
        .netns
        .run(|| proxy.sync(&facts(), rs3.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(r.kind, SyncKind::Full);
    assert!(r.recovered_from.is_some());
    let mut p3 = Proxy::new();
    fresh.netns.run(|| p3.sync(&facts(), rs3)).unwrap().unwrap();
    assert_eq!(structure(&ns), structure(&fresh));
}
