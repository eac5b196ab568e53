//! `weftctl network show|set|reset`: the cluster's network settings (`/weft/config/network`, see
//! weft-agent's network.rs). `set` writes them, or else the first agent to start records its own;
//! agents take from there every setting they are not given.

use clap::{Args, Subcommand};
use ipnet::Ipv4Net;
use weft_agent::backend::BackendKind;
use weft_agent::config::{overlap, DEFAULT_SERVICE_CIDR};
use weft_agent::lease::{VxlanSettings, LEASE_PREFIX};
use weft_agent::network::{NetworkConfig, NETWORK_KEY};
use weft_store::{Revision, Store};

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
pub struct SetArgs {
    /// The pod CIDR, cut into node subnets.
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of a node's subnet.
    #[arg(long)]
    pub subnet_len: Option<u8>,
    /// host-gw, vxlan or directrouting.
    #[arg(long)]
    pub backend: Option<String>,
    /// UDP port of the VXLAN tunnel.
    #[arg(long)]
    pub vxlan_port: Option<u16>,
    /// VXLAN network identifier.
    #[arg(long)]
    pub vxlan_vni: Option<u32>,
    /// The agents' --service-cidr, which the cluster CIDR must not overlap (not recorded).
    #[arg(long, default_value = DEFAULT_SERVICE_CIDR)]
    pub service_cidr: Ipv4Net,
}

impl SetArgs {
    /// Nothing given, and the agents' default Service CIDR.
    pub fn none() -> SetArgs {
        SetArgs {
            cluster_cidr: None,
            subnet_len: None,
            backend: None,
            vxlan_port: None,
            vxlan_vni: None,
            service_cidr: DEFAULT_SERVICE_CIDR.parse().expect("a CIDR"),
        }
    }
}

/// A `set` read and checked, not yet written.
pub struct Plan {
    /// The record read, if any, and its revision (0: none).
    base: Option<NetworkConfig>,
    revision: Revision,
    pub new: NetworkConfig,
}

impl Plan {
    /// Reads the record (or the defaults) and applies what `a` gives.
    pub async fn read(store: &impl Store, a: &SetArgs) -> Result<Plan, String> {
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
        let new = with(base.as_ref().unwrap_or(&NetworkConfig::defaults()), a)?;
        Ok(Plan {
            base,
            revision,
            new,
        })
    }

    /// Writes the new settings against the revision read, so that an agent recording its own
    /// meanwhile is not overwritten unseen.
    pub async fn write(&self, store: &impl Store) -> Result<(), String> {
        let json = serde_json::to_vec(&self.new).expect("serializable");
        store
            .cas(NETWORK_KEY, self.revision, &json, None)
            .await
            .map_err(|e| format!("writing {NETWORK_KEY}: {e}"))?
            .ok_or_else(|| format!("{NETWORK_KEY} changed while it was read; try again"))?;
        Ok(())
    }

    /// The nodes that still run other settings than the new ones.
    pub async fn behind(&self, store: &impl Store) -> Result<Vec<String>, String> {
        // They need a restart (and, if they were given the old settings, new flags). A lease
        // does not carry the CIDR, so a new CIDR or subnet length (or a first record: the nodes
        // ran on their own) puts every node behind.
        let everyone = self.base.as_ref().is_none_or(|b| {
            b.cluster_cidr != self.new.cluster_cidr || b.subnet_len != self.new.subnet_len
        });
        Ok(weft_agent::lease::leases(store)
            .await
            .map_err(|e| format!("listing {LEASE_PREFIX}: {e}"))?
            .into_iter()
            .filter(|(_, l)| everyone || !self.new.differences_from_lease(l).is_empty())
            .map(|(_, l)| l.node)
            .collect())
    }
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
                let plan = Plan::read(store, &set).await?;
                plan.write(store).await?;
                println!(
                    "{}",
                    serde_json::to_string(&plan.new).expect("serializable")
                );
                let behind = plan.behind(store).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A store of its own, removed afterwards.
    fn with_db(tag: &str, f: impl AsyncFnOnce(&weft_store::SqliteStore)) {
        let dir = std::env::temp_dir().join(format!("weftctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let store = weft_store::SqliteStore::open(dir.join("s.db"))
                    .await
                    .unwrap();
                f(&store).await
            });
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn agent(args: &[&str]) -> weft_agent::config::Config {
        weft_agent::config::Flags::parse_from(["weftd", "--node-name", "n1"].iter().chain(args))
            .resolve()
            .unwrap()
    }

    fn recorded(kv: Option<weft_store::KeyValue>) -> NetworkConfig {
        serde_json::from_slice(&kv.expect("a record").value).unwrap()
    }

    #[test]
    fn an_agent_recording_between_read_and_write_is_not_overwritten() {
        with_db("netcas", async |store| {
            let set = SetArgs {
                backend: Some("host-gw".into()),
                ..SetArgs::none()
            };
            let plan = Plan::read(store, &set).await.unwrap();
            assert_eq!(plan.new.backend, BackendKind::HostGw);
            // Meanwhile the first agent starts with its defaults and records them.
            weft_agent::network::check(store, &agent(&[]))
                .await
                .unwrap();
            let e = plan.write(store).await.unwrap_err();
            assert!(e.contains("changed while it was read; try again"), "{e}");
            assert_eq!(
                recorded(store.get(NETWORK_KEY).await.unwrap()).backend,
                BackendKind::Vxlan,
                "the agent's record stands"
            );
            // Tried again, it starts from the agent's record.
            let plan = Plan::read(store, &set).await.unwrap();
            plan.write(store).await.unwrap();
            let now = recorded(store.get(NETWORK_KEY).await.unwrap());
            assert_eq!(now.backend, BackendKind::HostGw);
            assert_eq!(now.cluster_cidr.to_string(), "10.244.0.0/16");
        })
    }

    #[test]
    fn a_set_between_two_reads_of_the_same_revision_lets_one_win() {
        with_db("netcas2", async |store| {
            let a = Plan::read(
                store,
                &SetArgs {
                    subnet_len: Some(26),
                    ..SetArgs::none()
                },
            )
            .await
            .unwrap();
            let b = Plan::read(
                store,
                &SetArgs {
                    backend: Some("directrouting".into()),
                    ..SetArgs::none()
                },
            )
            .await
            .unwrap();
            a.write(store).await.unwrap();
            assert!(b.write(store).await.is_err());
            let now = recorded(store.get(NETWORK_KEY).await.unwrap());
            assert_eq!((now.subnet_len, now.backend), (26, BackendKind::Vxlan));
        })
    }
}
