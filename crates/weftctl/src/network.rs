//! `weftctl network show|set|reset`: the cluster's network settings (`/weft/config/network`, see
//! weft-agent's network.rs). `set` writes them, or else the first agent to start records its own;
//! agents take from there every setting they are not given.

use clap::{Args, Subcommand};
use ipnet::Ipv4Net;
use weft_agent::backend::BackendKind;
use weft_agent::config::{overlap, DEFAULT_SERVICE_CIDR};
use weft_agent::lease::{VxlanSettings, LEASE_PREFIX};
use weft_agent::network::{NetworkConfig, NETWORK_KEY};
use weft_store::Store;

#[derive(Args)]
pub struct NetworkArgs {
    /// The cluster store, as weftd's --store.
    #[arg(long, default_value = weft_agent::config::DEFAULT_STORE, global = true)]
    store: String,
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Print the recorded settings (JSON).
    Show,
    /// Write the cluster's settings: the ones given replace the recorded ones (or the defaults,
    /// before any agent has started). Agents take the settings they are not given when they
    /// next start: restart the nodes it names after a change.
    Set(SetArgs),
    /// Forget them: the next agent to start records its own (given or default).
    Reset,
}

#[derive(Args)]
struct SetArgs {
    /// The pod CIDR, cut into node subnets.
    #[arg(long)]
    cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of a node's subnet.
    #[arg(long)]
    subnet_len: Option<u8>,
    /// host-gw, vxlan or directrouting.
    #[arg(long)]
    backend: Option<String>,
    /// UDP port of the VXLAN tunnel.
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// VXLAN network identifier.
    #[arg(long)]
    vxlan_vni: Option<u32>,
    /// The agents' --service-cidr, which the cluster CIDR must not overlap (not recorded).
    #[arg(long, default_value = DEFAULT_SERVICE_CIDR)]
    service_cidr: Ipv4Net,
}

pub fn run(a: NetworkArgs) -> i32 {
    match network(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weftctl network: {e}");
            1
        }
    }
}

/// `base` with what `a` gives; errors name the flag and value.
fn with(base: &NetworkConfig, a: &SetArgs) -> Result<NetworkConfig, String> {
    let backend = match &a.backend {
        Some(b) => BackendKind::parse(b)?,
        None => base.backend,
    };
    let vxlan = base.vxlan.unwrap_or_default();
    let vxlan = VxlanSettings {
        vni: a.vxlan_vni.unwrap_or(vxlan.vni),
        port: a.vxlan_port.unwrap_or(vxlan.port),
    };
    if !backend.uses_vxlan() {
        let given: Vec<String> = [
            a.vxlan_port.map(|p| format!("--vxlan-port {p}")),
            a.vxlan_vni.map(|v| format!("--vxlan-vni {v}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !given.is_empty() {
            return Err(format!(
                "{}: the backend {} does not use VXLAN",
                given.join(", "),
                backend.as_str()
            ));
        }
    }
    let c = NetworkConfig {
        cluster_cidr: a
            .cluster_cidr
            .map(|c| c.trunc())
            .unwrap_or(base.cluster_cidr),
        subnet_len: a.subnet_len.unwrap_or(base.subnet_len),
        backend,
        vxlan: backend.uses_vxlan().then_some(vxlan),
    };
    let mut p = c.problems();
    if overlap(c.cluster_cidr, a.service_cidr.trunc()) {
        p.push(format!(
            "--cluster-cidr {} overlaps --service-cidr {} (the agents' Service CIDR; give theirs \
             if it is not the default)",
            c.cluster_cidr, a.service_cidr
        ));
    }
    if p.is_empty() {
        Ok(c)
    } else {
        Err(p.join(", "))
    }
}

fn network(a: NetworkArgs) -> Result<(), String> {
    crate::with_store(&a.store, async |store| {
        match a.command {
            NetworkCommand::Show => {
                let kv = store
                    .get(NETWORK_KEY)
                    .await
                    .map_err(|e| format!("reading {NETWORK_KEY}: {e}"))?
                    .ok_or_else(|| {
                        format!(
                            "no {NETWORK_KEY} in {}: no agent has recorded its settings and \
                             none were set (or they were reset)",
                            a.store
                        )
                    })?;
                println!("{}", String::from_utf8_lossy(&kv.value));
            }
            NetworkCommand::Set(set) => {
                let current = store
                    .get(NETWORK_KEY)
                    .await
                    .map_err(|e| format!("reading {NETWORK_KEY}: {e}"))?;
                let (base, revision) = match &current {
                    Some(kv) => {
                        let c: NetworkConfig = serde_json::from_slice(&kv.value).map_err(|e| {
                            format!("{NETWORK_KEY} is not a NetworkConfig ({e}); `reset` it first")
                        })?;
                        (Some(c), kv.mod_revision)
                    }
                    None => (None, 0),
                };
                let old = base.clone().unwrap_or_else(NetworkConfig::defaults);
                let new = with(&old, &set)?;
                let json = serde_json::to_vec(&new).expect("serializable");
                // Against the revision read: an agent recording its own meanwhile is not
                // overwritten unseen.
                store
                    .cas(NETWORK_KEY, revision, &json, None)
                    .await
                    .map_err(|e| format!("writing {NETWORK_KEY}: {e}"))?
                    .ok_or_else(|| format!("{NETWORK_KEY} changed while it was read; try again"))?;
                println!("{}", String::from_utf8_lossy(&json));
                // Who still runs other settings: they need a restart (and, if they were given
                // the old settings, new flags). A lease does not carry the CIDR, so a new CIDR or
                // subnet length (or a first record: the nodes ran on their own) puts every node
                // behind.
                let everyone = base.is_none_or(|b| {
                    b.cluster_cidr != new.cluster_cidr || b.subnet_len != new.subnet_len
                });
                let behind: Vec<String> = weft_agent::lease::leases(store)
                    .await
                    .map_err(|e| format!("listing {LEASE_PREFIX}: {e}"))?
                    .into_iter()
                    .filter(|(_, l)| everyone || !new.differences_from_lease(l).is_empty())
                    .map(|(_, l)| l.node)
                    .collect();
                if !behind.is_empty() {
                    println!(
                        "restart these nodes to take the new settings: {}",
                        behind.join(" ")
                    );
                }
            }
            NetworkCommand::Reset => {
                let gone = store
                    .delete(NETWORK_KEY)
                    .await
                    .map_err(|e| format!("deleting {NETWORK_KEY}: {e}"))?;
                println!(
                    "{}",
                    if gone {
                        "forgot the cluster's network settings: the next agent to start records its own"
                    } else {
                        "no network settings were recorded"
                    }
                );
            }
        }
        Ok(())
    })
}
