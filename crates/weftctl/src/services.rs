//! `weftctl services`: the services this node programs — frontends, endpoints, and the
//! connections each service port has taken (nft's named counters in Weft's table).

use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use weft_store::{AnyStore, Store};

#[derive(Args)]
pub struct ServicesArgs {
    /// The cluster store, as weftd's --store.
    #[arg(long, default_value = "sqlite:///var/lib/weft/store.db")]
    store: String,
    /// This node's name, as endpoints' nodeName spells it (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// weftd's --run-dir (its subnet.env says which endpoints are local).
    #[arg(long, default_value = "/run/weft")]
    run_dir: PathBuf,
    /// weftd's --service-cidr.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: ipnet::Ipv4Net,
    /// weftd's --cluster-cidr.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
}

/// Connections per counter name, from `nft -j list counters table ip weft`.
fn counters() -> Option<BTreeMap<String, u64>> {
    let text =
        weft_services::nft::run("", &["-j", "list", "counters", "table", "ip", "weft"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v["nftables"]
            .as_array()?
            .iter()
            .filter_map(|o| {
                let c = &o["counter"];
                Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
            })
            .collect(),
    )
}

pub fn run(a: ServicesArgs) -> i32 {
    match list(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weftctl services: {e}");
            1
        }
    }
}

fn list(a: ServicesArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (services, slices) = rt.block_on(async {
        let store = AnyStore::open(&a.store)
            .await
            .map_err(|e| format!("--store {}: {e}", a.store))?;
        let (s, _) = store
            .list("/registry/services/specs/")
            .await
            .map_err(|e| e.to_string())?;
        let (e, _) = store
            .list("/registry/endpointslices/")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((s, e))
    })?;
    let node = match a.node {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let subnet_env = a.run_dir.join("subnet.env");
    let local_subnet = std::fs::read_to_string(&subnet_env)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("WEFT_SUBNET="))
                .and_then(|s| s.trim().parse().ok())
        })
        .unwrap_or("0.0.0.0/32".parse().expect("literal"));
    let to_map = |kvs: Vec<weft_store::KeyValue>| -> BTreeMap<String, Vec<u8>> {
        kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    };
    let objects = weft_services::parse_all(&to_map(services), &to_map(slices), a.service_cidr);
    let facts = weft_services::NodeFacts {
        node,
        cluster_cidr: a.cluster_cidr,
        local_subnet,
    };
    let rs = weft_services::compile(&facts, &objects);
    let counts = counters();
    println!(
        "{:<32} {:<14} {:<40} {:<44} CONNECTIONS",
        "SERVICE PORT", "NAME", "FRONTENDS", "ENDPOINTS"
    );
    for (id, p) in &rs.ports {
        let fronts: Vec<String> = p
            .frontends
            .iter()
            .map(|f| match f {
                weft_services::compile::Frontend::Ip(ip, port) => format!("{ip}:{port}"),
                weft_services::compile::Frontend::NodePort(np) => format!("nodePort:{np}"),
            })
            .collect();
        let eps: Vec<String> = p
            .endpoints
            .iter()
            .map(|(ip, port)| format!("{ip}:{port}"))
            .collect();
        let conns = match &counts {
            None => "-".to_string(),
            Some(c) => c
                .get(&format!("count/{id}"))
                .map(|n| n.to_string())
                .unwrap_or_else(|| "0".into()),
        };
        println!(
            "{id:<32} {:<14} {:<40} {:<44} {conns}",
            if p.port_name.is_empty() {
                "-"
            } else {
                &p.port_name
            },
            fronts.join(","),
            if eps.is_empty() {
                "(none: rejected)".into()
            } else {
                eps.join(",")
            },
        );
    }
    for problem in &rs.problems {
        println!("problem: {problem}");
    }
    if counts.is_none() {
        eprintln!("(no table ip weft in this network namespace: connection counts unknown)");
    }
    Ok(())
}
