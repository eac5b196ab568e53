//! [`Ruleset`]s as `nft -f` input: the whole table (start-up and recovery), a drift repair that
//! rewrites every chain and map in place, and the incremental update between two rulesets.
//! Each is one nft transaction: it applies whole or not at all.

use crate::compile::*;
use std::fmt::Write;

/// Weft's table. It also holds the pod egress masquerade.
pub const TABLE: &str = "weft";

fn fixed_chains(facts: &NodeFacts) -> Vec<(&'static str, Option<&'static str>, Vec<String>)> {
    let cluster = facts.cluster_cidr;
    let local = facts.local_subnet;
    let lookup_ips = "ip daddr . meta l4proto . th dport vmap @";
    let for_node = "fib daddr type local ip daddr != 127.0.0.0/8";
    let lookup_nodeports = format!("{for_node} meta l4proto . th dport vmap @");
    vec![
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority dstnat; policy accept;"),
            vec!["jump services".into()],
        ),
        (
            "nat-output",
            Some("type nat hook output priority -100; policy accept;"),
            vec!["jump services".into()],
        ),
        (
            "services",
            None,
            vec![
                format!("{lookup_ips}{SERVICE_IPS}"),
                format!("{lookup_nodeports}{SERVICE_NODEPORTS}"),
            ],
        ),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            vec![
                format!("ct status dnat ip saddr . ip daddr @{HAIRPIN} masquerade"),
                format!(
                    "meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} ip daddr != {local} \
                     meta mark set meta mark & {:#x} masquerade",
                    !MASQ_MARK
                ),
                // Pod egress: traffic from pods to pods (any node) and to multicast keeps its
                // source address; everything else from the cluster CIDR leaves as the node.
                format!("ip saddr {cluster} ip daddr {cluster} return"),
                format!("ip saddr {cluster} ip daddr 224.0.0.0/4 return"),
                format!("ip saddr {cluster} masquerade fully-random"),
            ],
        ),
        (
            "filter-input",
            Some("type filter hook input priority -5; policy accept;"),
            vec!["ct state new jump endpoints-check".into()],
        ),
        (
            "filter-forward",
            Some("type filter hook forward priority -5; policy accept;"),
            vec!["ct state new jump endpoints-check".into()],
        ),
        (
            "filter-output",
            Some("type filter hook output priority -5; policy accept;"),
            vec!["ct state new jump endpoints-check".into()],
        ),
        // `ct state new` holds for every packet of a UDP flow that has had no reply, such as the
        // VXLAN tunnel's: so this chain looks up ports first and leaves the route lookup
        // (`fib daddr type local`) to the few packets whose port is a NodePort's.
        (
            "endpoints-check",
            None,
            vec![
                format!("{lookup_ips}{NO_ENDPOINT_IPS}"),
                format!("meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"),
            ],
        ),
        (
            NODEPORT_REJECT_CHAIN,
            None,
            vec![format!("{for_node} goto {REJECT_CHAIN}")],
        ),
        (
            REJECT_CHAIN,
            None,
            vec![
                "meta l4proto tcp reject with tcp reset".into(),
                "reject".into(),
            ],
        ),
    ]
}

/// Every map and set that holds elements: (name, "map" or "set", declaration).
fn element_tables() -> Vec<(&'static str, &'static str, String)> {
    ELEMENT_TABLES
        .iter()
        .map(|(n, k, d)| (*n, *k, d.to_string()))
        .chain(EP_MAPS.iter().map(|n| (*n, "map", ep_map_decl(n))))
        .collect()
}

fn add_set(out: &mut String, name: &str, timeout: u32) {
    writeln!(
        out,
        "add set ip {TABLE} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
    )
    .unwrap();
}

fn fill_chain(out: &mut String, name: &str, rules: &[String], flush: bool) {
    if flush {
        writeln!(out, "flush chain ip {TABLE} {name}").unwrap();
    }
    for r in rules {
        writeln!(out, "add rule ip {TABLE} {name} {r}").unwrap();
    }
}

fn add_elements<'a>(
    out: &mut String,
    table: &str,
    elems: impl Iterator<Item = (&'a String, &'a String)>,
) {
    let items: Vec<String> = elems
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k} : {v}")
            }
        })
        .collect();
    // Bounded command lines: nft reads them whole, and huge ones are slow to parse.
    for chunk in items.chunks(2000) {
        writeln!(
            out,
            "add element ip {TABLE} {table} {{ {} }}",
            chunk.join(", ")
        )
        .unwrap();
    }
}

fn delete_elements<'a>(out: &mut String, table: &str, keys: impl Iterator<Item = &'a String>) {
    let keys: Vec<&String> = keys.collect();
    for chunk in keys.chunks(2000) {
        let list: Vec<&str> = chunk.iter().map(|k| k.as_str()).collect();
        writeln!(
            out,
            "delete element ip {TABLE} {table} {{ {} }}",
            list.join(", ")
        )
        .unwrap();
    }
}

/// Every declaration and rule, with `flush` before each chain and map when rewriting in place.
fn everything(facts: &NodeFacts, rs: &Flat, in_place: bool) -> String {
    let mut out = String::with_capacity(256 + rs.chains.len() * 160);
    writeln!(out, "add table ip {TABLE}").unwrap();
    for (name, kind, decl) in element_tables() {
        writeln!(out, "add {kind} ip {TABLE} {name} {{ {decl}; }}").unwrap();
    }
    for (name, timeout) in &rs.sets {
        add_set(&mut out, name, *timeout);
    }
    let fixed = fixed_chains(facts);
    for (name, base, _) in &fixed {
        match base {
            Some(b) => writeln!(out, "add chain ip {TABLE} {name} {{ {b} }}").unwrap(),
            None => writeln!(out, "add chain ip {TABLE} {name}").unwrap(),
        }
    }
    for name in rs.chains.keys() {
        writeln!(out, "add chain ip {TABLE} {name}").unwrap();
    }
    for (name, _, rules) in &fixed {
        fill_chain(&mut out, name, rules, in_place);
    }
    for (name, rules) in &rs.chains {
        fill_chain(&mut out, name, rules, in_place);
    }
    // Maps and sets are not flushed in place: that would zero the per-element connection
    // counters. Adding every element restores deleted ones; an element changed by hand makes the
    // transaction fail, and the caller then replaces the table.
    for (name, _, _) in element_tables() {
        if let Some(e) = rs.elements.get(name) {
            add_elements(&mut out, name, e.iter());
        }
    }
    out
}

/// The whole table, replacing whatever is there (in one transaction: no packet sees it half
/// made). Affinity sets and counters start empty.
pub fn full(facts: &NodeFacts, rs: &Ruleset) -> String {
    full_flat(facts, &rs.flat())
}

/// [`full`] from the ruleset's flat view.
pub fn full_flat(facts: &NodeFacts, flat: &Flat) -> String {
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\n{}",
        everything(facts, flat, false)
    )
}

/// Rewrites every chain of the table in place and adds every map element: restores anything
/// deleted by hand and rules changed by hand, keeps affinity sets and connection counters.
/// Leftovers (a chain or element added by hand) stay until the next full sync.
pub fn repair(facts: &NodeFacts, rs: &Ruleset) -> String {
    everything(facts, &rs.flat(), true)
}

/// The commands that turn the table from `old` into `new` (same node facts): only chains whose
/// rules differ are rewritten, only changed map elements are touched.
pub fn diff(old: &Ruleset, new: &Ruleset) -> String {
    let (old, new) = old.changed_views(new);
    diff_views(&old, &new)
}

/// [`diff`] between two views from [`Ruleset::changed_views`]: only the services whose
/// fragments changed, and what is shared.
pub fn diff_views(old: &Flat, new: &Flat) -> String {
    let mut out = String::new();
    for (name, timeout) in &new.sets {
        if !old.sets.contains_key(name) {
            add_set(&mut out, name, *timeout);
        }
    }
    // New chains exist (empty) before any rule or element refers to them.
    for name in new.chains.keys().filter(|n| !old.chains.contains_key(*n)) {
        writeln!(out, "add chain ip {TABLE} {name}").unwrap();
    }
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            Some(r) if r == rules => {}
            Some(_) => fill_chain(&mut out, name, rules, true),
            None => fill_chain(&mut out, name, rules, false),
        }
    }
    let empty = Default::default();
    for (table, _, _) in element_tables() {
        let o = old.elements.get(table).unwrap_or(&empty);
        let n = new.elements.get(table).unwrap_or(&empty);
        let gone = o
            .iter()
            .filter(|(k, v)| n.get(*k) != Some(v))
            .map(|(k, _)| k);
        delete_elements(&mut out, table, gone);
        add_elements(
            &mut out,
            table,
            n.iter().filter(|(k, v)| o.get(*k) != Some(v)),
        );
    }
    // Chains go last, once no element or rule refers to them: flush all, then delete all (one
    // removed chain may jump to another).
    let removed: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &removed {
        writeln!(out, "flush chain ip {TABLE} {name}").unwrap();
    }
    for name in &removed {
        writeln!(out, "delete chain ip {TABLE} {name}").unwrap();
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        writeln!(out, "delete set ip {TABLE} {name}").unwrap();
    }
    out
}
