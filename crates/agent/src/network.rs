//! The cluster's network settings, kept once in the store (`/weft/config/network`): the pod CIDR,
//! the node subnet length, the backend and its VXLAN settings. The first agent to start writes its
//! own; every later agent must agree, or it refuses to start and names both sides. A node on other
//! settings would lease from another range or tunnel to nobody.

use crate::backend::BackendKind;
use crate::config::Config;
use crate::lease::{Lease, VxlanSettings, LEASE_PREFIX};
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
            vxlan: cfg.vxlan(),
        }
    }

    /// What differs from `cluster`, each as "--flag ours (the cluster's: theirs)". A cluster record
    /// without VXLAN settings (written by hand) means the defaults.
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
        let defaults = VxlanSettings {
            vni: crate::backend::VXLAN_VNI,
            port: crate::backend::VXLAN_PORT,
        };
        let theirs = cluster
            .vxlan
            .or(cluster.backend.uses_vxlan().then_some(defaults));
        if let (Some(ours), Some(theirs)) = (self.vxlan, theirs) {
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

    /// What differs in a peer's lease: its backend, VXLAN settings, or a subnet that is not one of
    /// ours. Used before the cluster has a record (an upgrade from an agent that wrote none).
    fn differences_from_lease(&self, l: &Lease) -> Vec<String> {
        let mut d: Vec<String> = crate::backend::setting_differences(self.backend, self.vxlan, l)
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        if !self.cluster_cidr.contains(&l.subnet) || l.subnet.prefix_len() != self.subnet_len {
            d.push(format!(
                "node {} leases {} (this node: /{} subnets of {})",
                l.node, l.subnet, self.subnet_len, self.cluster_cidr
            ));
        }
        d
    }
}

/// Why the check (or, in daemon.rs, a try at leasing) did not pass.
#[derive(Debug)]
pub enum Refused {
    /// Trying again cannot help: this agent's settings are not the cluster's, or the store
    /// refuses for good. The agent must not start.
    Fatal(String),
    /// The store could not be asked, or the try lost; try again.
    Again(String),
}

/// A store error as a `Refused`: `Again` if the store may answer later.
pub fn store_error(what: String, e: weft_store::Error) -> Refused {
    if e.is_retryable() {
        Refused::Again(format!("{what}: {e}"))
    } else {
        Refused::Fatal(format!("{what}: {e}"))
    }
}

/// Writes this agent's settings as the cluster's if none are stored yet (compare-and-swap
/// against absence, so of agents starting together one writes and the others compare), else
/// compares with them. Before the first write, the leases already in the store (a cluster of
/// agents that kept no record) must agree too, so that an odd node upgraded first cannot impose
/// its settings on the others.
pub async fn check<S: Store>(store: &S, cfg: &Config) -> Result<(), Refused> {
    let ours = NetworkConfig::of(cfg);
    for _ in 0..3 {
        let stored = store
            .get(NETWORK_KEY)
            .await
            .map_err(|e| store_error(format!("reading {NETWORK_KEY}"), e))?;
        let Some(kv) = stored else {
            let (leases, _) = store
                .list(LEASE_PREFIX)
                .await
                .map_err(|e| store_error(format!("listing {LEASE_PREFIX}"), e))?;
            let d: Vec<String> = leases
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Lease>(&kv.value).ok())
                .filter(|l| l.node != cfg.node_name)
                .flat_map(|l| ours.differences_from_lease(&l))
                .collect();
            if !d.is_empty() {
                return Err(Refused::Fatal(format!(
                    "the cluster has no {NETWORK_KEY} yet, and its leases disagree with this \
                     node's settings: {}; start a node with the settings the others run first",
                    d.join(", ")
                )));
            }
            let json = serde_json::to_vec(&ours).expect("serializable");
            match store.cas(NETWORK_KEY, 0, &json, None).await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => continue,
                Err(e) => return Err(store_error(format!("writing {NETWORK_KEY}"), e)),
            }
        };
        let cluster: NetworkConfig = serde_json::from_slice(&kv.value).map_err(|e| {
            Refused::Fatal(format!(
                "{NETWORK_KEY} in the store is not a NetworkConfig ({e}); fix it, or reset it \
                 with `weftctl network reset`"
            ))
        })?;
        let d = ours.differences(&cluster);
        return if d.is_empty() {
            Ok(())
        } else {
            Err(Refused::Fatal(format!(
                "this node's network settings are not the cluster's ({NETWORK_KEY}): {}; give the \
                 cluster's, or change the cluster's with `weftctl network reset` and then restart \
                 every node with the new settings",
                d.join(", ")
            )))
        };
    }
    Err(Refused::Again(format!(
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
        crate::testing::with_store("netconf", async |store| {
            check(store, &cfg(&[])).await.unwrap();
            let stored: serde_json::Value =
                serde_json::from_slice(&store.get(NETWORK_KEY).await.unwrap().unwrap().value)
                    .unwrap();
            assert_eq!(stored["clusterCidr"], "10.244.0.0/16");
            assert_eq!(stored["backend"], "vxlan");
            assert_eq!(stored["vxlan"]["port"], 4789);
            // The same settings pass.
            check(store, &cfg(&[])).await.unwrap();
            // Other settings are refused, every difference named with both values.
            let e = check(
                store,
                &cfg(&[
                    "--backend",
                    "directrouting",
                    "--vxlan-port",
                    "8472",
                    "--subnet-len",
                    "26",
                ]),
            )
            .await
            .unwrap_err();
            let Refused::Fatal(m) = e else {
                panic!("{e:?}")
            };
            for part in [
                "--subnet-len 26 (the cluster's: 24)",
                "--backend directrouting (the cluster's: vxlan)",
                "--vxlan-port 8472 (the cluster's: 4789)",
            ] {
                assert!(m.contains(part), "{m} lacks {part}");
            }
            let e = check(store, &cfg(&["--cluster-cidr", "10.50.0.0/16"]))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("--cluster-cidr 10.50.0.0/16 (the cluster's: 10.244.0.0/16)")),
                "{e:?}"
            );
        });
    }

    #[test]
    fn without_a_record_the_leases_must_agree() {
        crate::testing::with_store("netconf-up", async |store| {
            // A cluster of agents that kept no record: node2 runs host-gw.
            let other = Lease {
                node: "n2".into(),
                subnet: "10.244.7.0/24".parse().unwrap(),
                underlay_ip: "10.100.0.2".parse().unwrap(),
                backend: BackendKind::HostGw,
                vtep_mac: None,
                vxlan: None,
            };
            let key = crate::lease::lease_key(other.subnet);
            store
                .put(&key, &serde_json::to_vec(&other).unwrap(), None)
                .await
                .unwrap();
            let e = check(store, &cfg(&[])).await.unwrap_err();
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("node n2 runs backend host-gw (this node: vxlan)")),
                "{e:?}"
            );
            assert!(
                store.get(NETWORK_KEY).await.unwrap().is_none(),
                "nothing written"
            );
            // The node that agrees writes the record.
            check(store, &cfg(&["--backend", "host-gw"])).await.unwrap();
            assert!(store.get(NETWORK_KEY).await.unwrap().is_some());
        });
    }
}
