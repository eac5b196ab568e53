//! Shared by the agent's integration tests.
#![allow(dead_code)]

use ipnet::Ipv4Net;
use std::process::Command;
use weft_agent::lease::candidates;

/// `n` node names whose first-choice subnets in `cluster` (/24s) are one of only two, so that
/// agents starting together race for the same keys.
pub fn colliding_names(cluster: Ipv4Net, n: usize) -> Vec<String> {
    let first = |name: &str| candidates(cluster, 24, name, None)[0];
    let (a, b) = (first("node0"), first("node1"));
    let names: Vec<String> = (0..100_000)
        .map(|k| format!("node{k}"))
        .filter(|name| first(name) == a || first(name) == b)
        .take(n)
        .collect();
    assert_eq!(names.len(), n, "not enough colliding names");
    names
}

/// `ip -n NS ARGS`, which must succeed; its output.
pub fn ip(ns: &weft_net::ScratchNetns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(&ns.name)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
