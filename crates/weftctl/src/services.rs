//! `weftctl services`: the services this node programs — frontends, endpoints, and the
//! connections each service port has taken (the per-element counters of Weft's service maps).

use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use weft_agent::services::{SERVICES_PREFIX, SLICES_PREFIX};
use weft_plugin::config::SUBNET_FILE;
use weft_plugin::subnet_env::SubnetEnv;
use weft_store::Store;

#[derive(Args)]
pub struct ServicesArgs {
    /// The cluster store, as weftd's --store.
    #[arg(long, default_value = weft_agent::config::DEFAULT_STORE)]
    store: String,
    /// This node's name, as endpoints' nodeName spells it (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// weftd's --run-dir (its subnet.env says which endpoints are local).
    #[arg(long, default_value = "/run/weft")]
    run_dir: PathBuf,
    /// weftd's --service-cidr.
    #[arg(long, default_value = weft_agent::config::DEFAULT_SERVICE_CIDR)]
    service_cidr: ipnet::Ipv4Net,
    /// weftd's --cluster-cidr (default: the one in its subnet.env, else the cluster's from the
    /// store, else 10.244.0.0/16).
    #[arg(long)]
    cluster_cidr: Option<ipnet::Ipv4Net>,
}

/// Connections per frontend, from the per-element counters of `service-ips` and
/// `service-nodeports`: (address or None for a NodePort, protocol, port) → connections.
type Counts = BTreeMap<(Option<String>, String, u64), u64>;

fn counters() -> Option<Counts> {
    let mut out = Counts::new();
    for map in ["service-ips", "service-nodeports"] {
        let text = weft_services::nft::run("", &["-j", "list", "map", "ip", "weft", map]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        for o in v["nftables"].as_array()? {
            for e in o["map"]["elem"].as_array().into_iter().flatten() {
                let elem = &e[0]["elem"];
                let parts = elem["val"]["concat"].as_array()?;
                let packets = elem["counter"]["packets"].as_u64().unwrap_or(0);
                let key = match parts.as_slice() {
                    [ip, proto, port] => (
                        ip.as_str().map(String::from),
                        proto.as_str()?.to_string(),
                        port.as_u64()?,
                    ),
                    [proto, port] => (None, proto.as_str()?.to_string(), port.as_u64()?),
                    _ => continue,
                };
                out.insert(key, packets);
            }
        }
    }
    Some(out)
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
    let (services, slices, recorded) = crate::with_store(&a.store, async |store| {
        // Only a fallback: a store that cannot say leaves it to the default.
        let recorded = store
            .get(weft_agent::network::NETWORK_KEY)
            .await
            .ok()
            .flatten()
            .and_then(|kv| {
                serde_json::from_slice::<weft_agent::network::NetworkConfig>(&kv.value).ok()
            });
        let (s, _) = store
            .list(SERVICES_PREFIX)
            .await
            .map_err(|e| e.to_string())?;
        let (e, _) = store.list(SLICES_PREFIX).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((s, e, recorded))
    })?;
    // As weftd names its node, so that endpoints' nodeName match.
    let node = a
        .node
        .or_else(|| weft_agent::config::hostname_node_name().ok())
        .unwrap_or_default();
    // Without subnet.env (no agent here) no endpoint counts as local.
    let env = SubnetEnv::read(&a.run_dir.join(SUBNET_FILE))?;
    let local_subnet = env
        .as_ref()
        .and_then(|env| env.subnet)
        .unwrap_or("0.0.0.0/32".parse().expect("literal"));
    // What this node's agent runs with comes first: the record may have changed since it started.
    let cluster_cidr = a
        .cluster_cidr
        .or(env.and_then(|env| env.network))
        .or(recorded.map(|r| r.cluster_cidr.trunc()))
        .unwrap_or_else(|| weft_agent::network::NetworkConfig::defaults().cluster_cidr);
    let to_map = |kvs: Vec<weft_store::KeyValue>| -> BTreeMap<String, Vec<u8>> {
        kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    };
    let objects = weft_services::parse_all(&to_map(services), &to_map(slices), a.service_cidr);
    let facts = weft_services::NodeFacts {
        node,
        cluster_cidr,
        local_subnet,
    };
    let rs = weft_services::compile(&facts, &objects);
    let counts = counters();
    println!(
        "{:<32} {:<14} {:<40} {:<44} CONNECTIONS",
        "SERVICE PORT", "NAME", "FRONTENDS", "ENDPOINTS"
    );
    for (id, p) in rs.ports() {
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
            Some(c) => p
                .frontends
                .iter()
                .map(|f| {
                    let key = match f {
                        weft_services::compile::Frontend::Ip(ip, port) => {
                            (Some(ip.to_string()), p.proto.to_string(), *port as u64)
                        }
                        weft_services::compile::Frontend::NodePort(np) => {
                            (None, p.proto.to_string(), *np as u64)
                        }
                    };
                    c.get(&key).copied().unwrap_or(0)
                })
                .sum::<u64>()
                .to_string(),
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
