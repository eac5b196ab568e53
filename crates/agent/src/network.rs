//! The cluster's network settings, kept once in the store (`/weft/config/network`): the pod CIDR,
//! the node subnet length, the backend and its VXLAN settings. `weftctl network set` writes them,
//! or else the first agent to start writes its own. An agent takes the cluster's for every
//! setting it was not given (so a node joins with no network flags at all); what it was given
//! must agree, or it refuses to start and names both sides. A node on other settings would lease
//! from another range or tunnel to nobody.

use crate::backend::BackendKind;
use crate::config::{Config, Given};
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
    /// A node's settings when it is given none and the store has none.
    pub fn defaults() -> NetworkConfig {
        NetworkConfig {
            cluster_cidr: crate::config::DEFAULT_CLUSTER_CIDR
                .parse()
                .expect("literal"),
            subnet_len: crate::config::DEFAULT_SUBNET_LEN,
            backend: crate::config::DEFAULT_BACKEND,
            vxlan: crate::config::DEFAULT_BACKEND
                .uses_vxlan()
                .then(VxlanSettings::default),
        }
    }

    pub fn of(cfg: &Config) -> NetworkConfig {
        NetworkConfig {
            cluster_cidr: cfg.cluster_cidr,
            subnet_len: cfg.subnet_len,
            backend: cfg.backend,
            vxlan: cfg.vxlan(),
        }
    }

    /// What makes these settings unusable, whoever wrote them: a subnet length the CIDR cannot
    /// hold, a VNI over 24 bits, port 0. Each names the setting as its flag, with the value.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let least = self.cluster_cidr.prefix_len();
        if self.subnet_len < least || self.subnet_len > 30 {
            p.push(format!(
                "--subnet-len {} is not between --cluster-cidr {}'s /{least} and /30",
                self.subnet_len, self.cluster_cidr
            ));
        }
        p.extend(self.vxlan.iter().flat_map(VxlanSettings::problems));
        p
    }

    /// Each setting in which `self` and `other` differ: (flag, ours, theirs). The VXLAN settings
    /// are compared where both have them.
    fn diff(&self, other: &NetworkConfig) -> Vec<(&'static str, String, String)> {
        let mut d = Vec::new();
        let mut field = |flag, ours: String, theirs: String| {
            if ours != theirs {
                d.push((flag, ours, theirs));
            }
        };
        field(
            "--cluster-cidr",
            self.cluster_cidr.to_string(),
            other.cluster_cidr.to_string(),
        );
        field(
            "--subnet-len",
            self.subnet_len.to_string(),
            other.subnet_len.to_string(),
        );
        field(
            "--backend",
            self.backend.as_str().into(),
            other.backend.as_str().into(),
        );
        if let (Some(ours), Some(theirs)) = (self.vxlan, other.vxlan) {
            field("--vxlan-vni", ours.vni.to_string(), theirs.vni.to_string());
            field(
                "--vxlan-port",
                ours.port.to_string(),
                theirs.port.to_string(),
            );
        }
        d
    }

    /// What differs in a peer's lease: its backend, VXLAN settings, or a subnet that is not one of
    /// ours. Used before the cluster has a record (an upgrade from an agent that wrote none).
    pub fn differences_from_lease(&self, l: &Lease) -> Vec<String> {
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

/// `cfg` with the cluster's settings wherever it was not given one, all then counted as given:
/// the node is committed to them, and a later check (leasing again) only compares.
fn adopt(cfg: &Config, cluster: &NetworkConfig) -> Config {
    let mut c = cfg.clone();
    let g = cfg.given;
    if !g.cluster_cidr {
        c.cluster_cidr = cluster.cluster_cidr;
    }
    if !g.subnet_len {
        c.subnet_len = cluster.subnet_len;
    }
    if !g.backend {
        c.backend = cluster.backend;
    }
    if let Some(v) = cluster.vxlan {
        if !g.vxlan_port {
            c.vxlan_port = v.port;
        }
        if !g.vxlan_vni {
            c.vxlan_vni = v.vni;
        }
    }
    c.given = Given::ALL;
    c
}

/// What makes the settings a node ends up with unusable: see [`NetworkConfig::problems`]
/// (a record written by hand, or flags given with defaults for the rest), and a cluster CIDR
/// over this node's Service CIDR.
fn unusable(c: &Config) -> Vec<String> {
    let mut p = NetworkConfig::of(c).problems();
    if crate::config::overlap(c.cluster_cidr, c.service_cidr) {
        p.push(format!(
            "the cluster CIDR {} overlaps --service-cidr {}",
            c.cluster_cidr, c.service_cidr
        ));
    }
    p
}

/// Warns of VXLAN flags that `cfg` was given where the backend the node runs (`backend`,
/// perhaps the cluster's) does not use them.
pub fn warn_unused(cfg: &Config, backend: BackendKind) {
    if !backend.uses_vxlan() && (cfg.given.vxlan_port || cfg.given.vxlan_vni) {
        tracing::warn!(
            "--vxlan-port and --vxlan-vni are not used: the backend is {}",
            backend.as_str()
        );
    }
}

/// The settings this node runs with. If the store has none yet, this agent's become the
/// cluster's (compare-and-swap against absence, so of agents starting together one writes and
/// the others compare). Before that first write, the leases already in the store (a cluster of
/// agents that kept no record) must agree, so that an odd node upgraded first cannot impose its
/// settings on the others. If the store has them, the node takes each one it was not given,
/// and must agree on the ones it was.
pub async fn check<S: Store>(store: &S, cfg: &Config) -> Result<Config, Refused> {
    let ours = NetworkConfig::of(cfg);
    for _ in 0..3 {
        let stored = store
            .get(NETWORK_KEY)
            .await
            .map_err(|e| store_error(format!("reading {NETWORK_KEY}"), e))?;
        let Some(kv) = stored else {
            let leases = crate::lease::leases(store)
                .await
                .map_err(|e| store_error(format!("listing {LEASE_PREFIX}"), e))?;
            let d: Vec<String> = leases
                .iter()
                .filter(|(_, l)| l.node != cfg.node_name)
                .flat_map(|(_, l)| ours.differences_from_lease(l))
                .collect();
            if !d.is_empty() {
                return Err(Refused::Fatal(format!(
                    "the cluster has no {NETWORK_KEY} yet, and its leases disagree with this \
                     node's settings: {}; start a node with the settings the others run first, \
                     or write them with `weftctl network set`",
                    d.join(", ")
                )));
            }
            let p = unusable(cfg);
            if !p.is_empty() {
                return Err(Refused::Fatal(format!(
                    "this node's network settings (the defaults where none was given) cannot be \
                     used: {}",
                    p.join(", ")
                )));
            }
            let json = serde_json::to_vec(&ours).expect("serializable");
            match store.cas(NETWORK_KEY, 0, &json, None).await {
                Ok(Some(_)) => {
                    tracing::info!("recorded this node's network settings as the cluster's");
                    let mut c = cfg.clone();
                    c.given = Given::ALL;
                    return Ok(c);
                }
                Ok(None) => continue,
                Err(e) => return Err(store_error(format!("writing {NETWORK_KEY}"), e)),
            }
        };
        let mut cluster: NetworkConfig = serde_json::from_slice(&kv.value).map_err(|e| {
            Refused::Fatal(format!(
                "{NETWORK_KEY} in the store is not a NetworkConfig ({e}); fix it, or reset it \
                 with `weftctl network reset`"
            ))
        })?;
        // A record written by hand may carry host bits, or leave out the VXLAN settings of a
        // backend that has them (the defaults, then).
        cluster.cluster_cidr = cluster.cluster_cidr.trunc();
        if cluster.backend.uses_vxlan() {
            cluster.vxlan = Some(cluster.vxlan.unwrap_or_default());
        }
        let adopted = adopt(cfg, &cluster);
        let d: Vec<String> = NetworkConfig::of(&adopted)
            .diff(&cluster)
            .into_iter()
            .map(|(flag, ours, theirs)| format!("{flag} {ours} (the cluster's: {theirs})"))
            .collect();
        if !d.is_empty() {
            return Err(Refused::Fatal(format!(
                "this node's network settings are not the cluster's ({NETWORK_KEY}): {}; leave \
                 them out to take the cluster's, or change the cluster's with `weftctl network \
                 set` and then restart every node",
                d.join(", ")
            )));
        }
        let p = unusable(&adopted);
        if !p.is_empty() {
            return Err(Refused::Fatal(format!(
                "the cluster's network settings ({NETWORK_KEY}) cannot be used here: {}",
                p.join(", ")
            )));
        }
        // What the node's own defaults would have set otherwise.
        let t: Vec<String> = NetworkConfig::of(cfg)
            .diff(&NetworkConfig::of(&adopted))
            .into_iter()
            .map(|(flag, _, taken)| format!("{flag} {taken}"))
            .collect();
        if !t.is_empty() {
            tracing::info!(
                "from the cluster's settings ({NETWORK_KEY}): {}",
                t.join(", ")
            );
        }
        return Ok(adopted);
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
    fn what_is_not_given_comes_from_the_cluster() {
        crate::testing::with_store("netconf-adopt", async |store| {
            let first = check(
                store,
                &cfg(&[
                    "--backend",
                    "directrouting",
                    "--cluster-cidr",
                    "10.50.0.0/16",
                    "--subnet-len",
                    "26",
                    "--vxlan-port",
                    "8472",
                    "--vxlan-vni",
                    "7",
                ]),
            )
            .await
            .unwrap();
            assert_eq!(first.given, Given::ALL);
            // A node given nothing takes every setting from the record, not its defaults.
            let bare = cfg(&[]);
            assert_eq!(bare.given, Given::default());
            let joined = check(store, &bare).await.unwrap();
            assert_eq!(
                NetworkConfig::of(&joined),
                NetworkConfig::of(&first),
                "{joined:?}"
            );
            assert_eq!(joined.given, Given::ALL);
            // A node given some takes the rest; what it was given must agree.
            let some = check(store, &cfg(&["--backend", "directrouting"]))
                .await
                .unwrap();
            assert_eq!((some.subnet_len, some.vxlan_vni), (26, 7));
            let e = check(store, &cfg(&["--vxlan-vni", "1"])).await.unwrap_err();
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("--vxlan-vni 1 (the cluster's: 7)")),
                "{e:?}"
            );
            // The file counts as given, like a flag.
            let dir = std::env::temp_dir().join(format!("weft-netconf-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("weftd.json");
            std::fs::write(&file, br#"{"backend": "host-gw"}"#).unwrap();
            let e = check(store, &cfg(&["--config", file.to_str().unwrap()]))
                .await
                .unwrap_err();
            let _ = std::fs::remove_dir_all(&dir);
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("--backend host-gw (the cluster's: directrouting)")),
                "{e:?}"
            );
            // The cluster's CIDR is checked against this node's Service CIDR.
            let e = check(store, &cfg(&["--service-cidr", "10.50.128.0/17"]))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("the cluster CIDR 10.50.0.0/16 overlaps --service-cidr 10.50.128.0/17")),
                "{e:?}"
            );
        });
    }

    #[test]
    fn unusable_settings_are_refused() {
        crate::testing::with_store("netconf-bad", async |store| {
            // On an empty store, a subnet length given alone is checked against the default CIDR
            // before it is recorded.
            let e = check(store, &cfg(&["--subnet-len", "8"]))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("(the defaults where none was given) cannot be used: --subnet-len 8 is not between --cluster-cidr 10.244.0.0/16's /16 and /30")),
                "{e:?}"
            );
            assert!(store.get(NETWORK_KEY).await.unwrap().is_none());
            // A record written by hand: a subnet length the CIDR cannot hold, a 25-bit VNI,
            // port 0, host bits in the CIDR. Each problem is named; nothing is adopted.
            let hand = br#"{"clusterCidr": "10.60.1.0/16", "subnetLen": 12, "backend": "vxlan",
                "vxlan": {"vni": 16777216, "port": 0}}"#;
            store.put(NETWORK_KEY, hand, None).await.unwrap();
            let e = check(store, &cfg(&[])).await.unwrap_err();
            let Refused::Fatal(m) = &e else {
                panic!("{e:?}")
            };
            for part in [
                "cannot be used here",
                "--subnet-len 12 is not between --cluster-cidr 10.60.0.0/16's /16 and /30",
                "--vxlan-vni 16777216 is not in 1..16777215",
                "--vxlan-port 0 is not a port",
            ] {
                assert!(m.contains(part), "{m} lacks {part}");
            }
            // Host bits are dropped, and a host-gw record leaves VXLAN flags given alone.
            let hand = br#"{"clusterCidr": "10.60.1.0/16", "subnetLen": 24, "backend": "host-gw"}"#;
            store.put(NETWORK_KEY, hand, None).await.unwrap();
            let c = check(store, &cfg(&["--vxlan-port", "8472"])).await.unwrap();
            assert_eq!(c.cluster_cidr.to_string(), "10.60.0.0/16");
            assert_eq!((c.backend, c.vxlan()), (BackendKind::HostGw, None));
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

    /// A real store on which, just before this node's first compare-and-swap of the record,
    /// someone else (`weftctl network set`, another agent) writes `theirs`.
    struct Racing {
        inner: weft_store::SqliteStore,
        theirs: std::sync::Mutex<Option<&'static [u8]>>,
    }

    impl Store for Racing {
        async fn get(&self, key: &str) -> weft_store::Result<Option<weft_store::KeyValue>> {
            self.inner.get(key).await
        }
        async fn list(
            &self,
            prefix: &str,
        ) -> weft_store::Result<(Vec<weft_store::KeyValue>, weft_store::Revision)> {
            self.inner.list(prefix).await
        }
        async fn put(
            &self,
            key: &str,
            value: &[u8],
            lease: Option<weft_store::LeaseId>,
        ) -> weft_store::Result<weft_store::Revision> {
            self.inner.put(key, value, lease).await
        }
        async fn cas(
            &self,
            key: &str,
            expected: weft_store::Revision,
            value: &[u8],
            lease: Option<weft_store::LeaseId>,
        ) -> weft_store::Result<Option<weft_store::Revision>> {
            let theirs = match key {
                NETWORK_KEY => self.theirs.lock().unwrap().take(),
                _ => None,
            };
            if let Some(theirs) = theirs {
                self.inner.put(key, theirs, None).await?;
            }
            self.inner.cas(key, expected, value, lease).await
        }
        async fn delete(&self, key: &str) -> weft_store::Result<bool> {
            self.inner.delete(key).await
        }
        async fn cad(&self, key: &str, expected: weft_store::Revision) -> weft_store::Result<bool> {
            self.inner.cad(key, expected).await
        }
        fn watch(&self, prefix: &str, after: weft_store::Revision) -> weft_store::WatchStream {
            self.inner.watch(prefix, after)
        }
        async fn grant(&self, ttl: std::time::Duration) -> weft_store::Result<weft_store::LeaseId> {
            self.inner.grant(ttl).await
        }
        async fn keepalive(&self, lease: weft_store::LeaseId) -> weft_store::Result<()> {
            self.inner.keepalive(lease).await
        }
        async fn revoke(&self, lease: weft_store::LeaseId) -> weft_store::Result<()> {
            self.inner.revoke(lease).await
        }
        async fn compact(&self, revision: weft_store::Revision) -> weft_store::Result<()> {
            self.inner.compact(revision).await
        }
    }

    #[test]
    fn a_record_written_between_read_and_write_is_taken_or_refused_not_overwritten() {
        crate::testing::with_store("netconf-race", async |store| {
            const THEIRS: &[u8] =
                br#"{"clusterCidr": "10.60.0.0/16", "subnetLen": 26, "backend": "host-gw"}"#;
            // A node given nothing finds no record, and loses the race to record its defaults:
            // it reads again and takes theirs.
            let racing = Racing {
                inner: store.clone(),
                theirs: Some(THEIRS).into(),
            };
            let c = check(&racing, &cfg(&[])).await.unwrap();
            assert_eq!(
                (c.cluster_cidr.to_string(), c.subnet_len, c.backend),
                ("10.60.0.0/16".into(), 26, BackendKind::HostGw)
            );
            assert!(racing.theirs.lock().unwrap().is_none(), "the race was run");
            assert_eq!(store.get(NETWORK_KEY).await.unwrap().unwrap().value, THEIRS);
            // A node given another backend loses the same race, and is refused by the record it
            // lost to, instead of overwriting it.
            store.delete(NETWORK_KEY).await.unwrap();
            let racing = Racing {
                inner: store.clone(),
                theirs: Some(THEIRS).into(),
            };
            let e = check(&racing, &cfg(&["--backend", "vxlan"]))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Refused::Fatal(m) if m.contains("--backend vxlan (the cluster's: host-gw)")),
                "{e:?}"
            );
            assert_eq!(store.get(NETWORK_KEY).await.unwrap().unwrap().value, THEIRS);
        });
    }
}
