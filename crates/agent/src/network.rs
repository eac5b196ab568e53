//! The cluster's network settings, kept once in the store (`/weft/config/network`): the pod CIDR,
//! the node subnet length, the backend and its VXLAN settings. The first agent to start writes its
//! own; every later agent must agree, or it refuses to start and names both sides. A node on other
//! settings would lease from another range or tunnel to nobody.

use crate::backend::BackendKind;
use crate::config::Config;
use crate::lease::VxlanSettings;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use weft_store::Store;

pub const NETWORK_KEY: &str = "/weft/config/network";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    pub cluster_cidr: Ipv4Net,
    pub subnet_len: u8,
    pub backend: BackendKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanSettings>,
}

impl NetworkConfig {
    pub fn of(cfg: &Config) -> NetworkConfig {
        NetworkConfig {
            cluster_cidr: cfg.cluster_cidr,
            subnet_len: cfg.subnet_len,
            backend: cfg.backend,
            vxlan: cfg.backend.uses_vxlan().then_some(VxlanSettings {
                vni: cfg.vxlan_vni,
                port: cfg.vxlan_port,
            }),
        }
    }

    /// What differs from `cluster`, each as "--flag ours (the cluster's: theirs)".
    fn differences(&self, cluster: &NetworkConfig) -> Vec<String> {
        let mut d = Vec::new();
        if self.cluster_cidr != cluster.cluster_cidr {
            d.push(format!(
                "--cluster-cidr {} (the cluster's: {})",
                self.cluster_cidr, cluster.cluster_cidr
            ));
        }
        if self.subnet_len != cluster.subnet_len {
            d.push(format!(
                "--subnet-len {} (the cluster's: {})",
                self.subnet_len, cluster.subnet_len
            ));
        }
        if self.backend != cluster.backend {
            d.push(format!(
                "--backend {} (the cluster's: {})",
                self.backend.as_str(),
                cluster.backend.as_str()
            ));
        }
        if let (Some(ours), Some(theirs)) = (self.vxlan, cluster.vxlan) {
            if ours.vni != theirs.vni {
                d.push(format!(
                    "--vxlan-vni {} (the cluster's: {})",
                    ours.vni, theirs.vni
                ));
            }
            if ours.port != theirs.port {
                d.push(format!(
                    "--vxlan-port {} (the cluster's: {})",
                    ours.port, theirs.port
                ));
            }
        }
        d
    }
}

/// Why the check did not pass.
#[derive(Debug)]
pub enum Refused {
    /// This agent's settings are not the cluster's: it must not start.
    Mismatch(String),
    /// The store could not be asked; try again.
    Store(String),
}

/// Writes this agent's settings as the cluster's if none are stored yet (compare-and-swap
/// against absence, so of agents starting together one writes and the others compare), else
/// compares with them.
pub async fn check<S: Store>(store: &S, cfg: &Config) -> Result<(), Refused> {
    let ours = NetworkConfig::of(cfg);
    for _ in 0..3 {
        let stored = store
            .get(NETWORK_KEY)
            .await
            .map_err(|e| Refused::Store(format!("reading {NETWORK_KEY}: {e}")))?;
        let Some(kv) = stored else {
            let json = serde_json::to_vec(&ours).expect("serializable");
            match store.cas(NETWORK_KEY, 0, &json, None).await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => continue,
                Err(e) => return Err(Refused::Store(format!("writing {NETWORK_KEY}: {e}"))),
            }
        };
        let cluster: NetworkConfig = serde_json::from_slice(&kv.value).map_err(|e| {
            Refused::Mismatch(format!(
                "{NETWORK_KEY} in the store is not a NetworkConfig ({e}); fix or delete it"
            ))
        })?;
        let d = ours.differences(&cluster);
        return if d.is_empty() {
            Ok(())
        } else {
            Err(Refused::Mismatch(format!(
                "this node's network settings are not the cluster's ({NETWORK_KEY}): {}; give the \
                 cluster's, or change the cluster's by deleting the key once every node agrees",
                d.join(", ")
            )))
        };
    }
    Err(Refused::Store(format!(
        "{NETWORK_KEY} kept changing while it was read"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Config {
        crate::config::Flags::parse_from(["weftd", "--node-name", "n1"].iter().chain(args.iter()))
            .resolve()
            .unwrap()
    }

    #[test]
    fn first_writes_the_rest_must_agree() {
        let dir = std::env::temp_dir().join(format!("weft-netconf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = weft_store::SqliteStore::open(dir.join("s.db")).await.unwrap();
            check(&store, &cfg(&[])).await.unwrap();
            let stored: serde_json::Value = serde_json::from_slice(
                &store.get(NETWORK_KEY).await.unwrap().unwrap().value,
            )
            .unwrap();
            assert_eq!(stored["clusterCidr"], "10.244.0.0/16");
            assert_eq!(stored["backend"], "vxlan");
            assert_eq!(stored["vxlan"]["port"], 4789);
            // The same settings pass.
            check(&store, &cfg(&[])).await.unwrap();
            // Other settings are refused, every difference named with both values.
            let e = check(
                &store,
                &cfg(&["--backend", "directrouting", "--vxlan-port", "8472", "--subnet-len", "26"]),
            )
            .await
            .unwrap_err();
            let Refused::Mismatch(m) = e else {
                panic!("{e:?}")
            };
            for part in [
                "--subnet-len 26 (the cluster's: 24)",
                "--backend directrouting (the cluster's: vxlan)",
                "--vxlan-port 8472 (the cluster's: 4789)",
            ] {
                assert!(m.contains(part), "{m} lacks {part}");
            }
            let e = check(&store, &cfg(&["--cluster-cidr", "10.50.0.0/16"]))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Refused::Mismatch(m) if m.contains("--cluster-cidr 10.50.0.0/16 (the cluster's: 10.244.0.0/16)")),
                "{e:?}"
            );
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
