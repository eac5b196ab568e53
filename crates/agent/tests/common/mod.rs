//! Shared by the agent's integration tests.

use ipnet::Ipv4Net;
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
