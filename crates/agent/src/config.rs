//! weftd's configuration: flags, or a JSON file whose keys are the flags' long names in
//! camelCase (`clusterCidr`, `subnetLen`, …). A flag given on the command line wins over the file.

use crate::backend::BackendKind;
use clap::Parser;
use ipnet::Ipv4Net;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug, Default, Deserialize)]
#[command(name = "weftd", version, about = "Weft node agent")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Flags {
    /// JSON config file (keys: the long flag names in camelCase).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// The cluster's pod CIDR, cut into node subnets (default: the cluster's recorded one, or
    /// 10.244.0.0/16 for the first node).
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of a node's subnet (default: the cluster's, or 24).
    #[arg(long)]
    pub subnet_len: Option<u8>,
    /// host-gw, vxlan or directrouting (default: the cluster's, or vxlan).
    #[arg(long)]
    pub backend: Option<String>,
    /// The underlay interface (default: the one holding the default route).
    #[arg(long)]
    pub iface: Option<String>,
    /// The cluster store: sqlite:///path/file.db or etcd://host:port (default sqlite:///var/lib/weft/store.db).
    #[arg(long)]
    pub store: Option<String>,
    /// Lease TTL in seconds (default 30); renewed every third of it.
    #[arg(long)]
    pub lease_ttl: Option<u64>,
    /// Where subnet.env is written for the CNI plugin (default /run/weft).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Where the agent keeps its own state (default /var/lib/weft).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Health and metrics listen address (default 127.0.0.1:9967).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Pod wiring written to subnet.env for the plugin: bridge or routed (default bridge).
    #[arg(long)]
    pub mode: Option<String>,
    /// The CNI network name written to subnet.env (default weft).
    #[arg(long)]
    pub network_name: Option<String>,
    /// Seconds between full drift checks (default 10).
    #[arg(long)]
    pub resync: Option<u64>,
    /// The Service CIDR: ClusterIPs outside it are refused (default 10.96.0.0/12).
    #[arg(long)]
    pub service_cidr: Option<Ipv4Net>,
    /// Seconds between rewrites of the whole Services table, which undo changes made by hand
    /// (default 60; updates in between are incremental).
    #[arg(long)]
    pub services_repair: Option<u64>,
    /// UDP port of the VXLAN tunnel, the same on every node (default: the cluster's, or 4789, the
    /// IANA port; the Linux kernel's own default, and flannel's, is 8472).
    #[arg(long)]
    pub vxlan_port: Option<u16>,
    /// VXLAN network identifier, the same on every node (default: the cluster's, or 1).
    #[arg(long)]
    pub vxlan_vni: Option<u32>,
    /// Release this node's lease, remove what the agent made, and exit.
    #[arg(long)]
    #[serde(skip)]
    pub leave: bool,
}

/// Which of the cluster-wide settings this node was given, by flag or file. For the others it
/// takes the cluster's from the store once there are any (network.rs), and the defaults before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Given {
    pub cluster_cidr: bool,
    pub subnet_len: bool,
    pub backend: bool,
    pub vxlan_port: bool,
    pub vxlan_vni: bool,
}

impl Given {
    pub const ALL: Given = Given {
        cluster_cidr: true,
        subnet_len: true,
        backend: true,
        vxlan_port: true,
        vxlan_vni: true,
    };
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub cluster_cidr: Ipv4Net,
    pub subnet_len: u8,
    pub backend: BackendKind,
    pub iface: Option<String>,
    pub store: String,
    pub lease_ttl: Duration,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub mode: String,
    pub network_name: String,
    pub resync: Duration,
    pub service_cidr: Ipv4Net,
    pub services_repair: Duration,
    pub vxlan_port: u16,
    pub vxlan_vni: u32,
    pub given: Given,
    pub leave: bool,
}

/// The config file's flags. Each key is checked alone first, so that an error names the key and
/// its value (serde's own message for a whole object gives only a line and column).
fn parse_file(text: &[u8]) -> Result<Flags, String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(text).map_err(|e| format!("not a JSON object: {e}"))?;
    for (key, value) in &map {
        let one = serde_json::Value::Object([(key.clone(), value.clone())].into_iter().collect());
        if let Err(e) = serde_json::from_value::<Flags>(one) {
            return Err(format!("{key}: {value}: {e}"));
        }
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

/// A Kubernetes node name: a DNS subdomain (lowercase letters, digits, '-' and '.', at most
/// 253). Store keys and event names are made from it.
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// Defaults shared with weftctl: the cluster-wide settings' (for the first node; later ones take
/// the cluster's), and the Service CIDR's.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const DEFAULT_SUBNET_LEN: u8 = 24;
pub const DEFAULT_BACKEND: BackendKind = BackendKind::Vxlan;
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_STORE: &str = "sqlite:///var/lib/weft/store.db";

/// The node's name when none is given: the hostname, lowercased, as kubelet names its Node.
pub fn hostname_node_name() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_ascii_lowercase())
}

/// Whether two CIDRs share an address.
pub fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl Config {
    /// The tunnel settings this node's lease carries: for backends that use VXLAN.
    pub fn vxlan(&self) -> Option<crate::lease::VxlanSettings> {
        self.backend
            .uses_vxlan()
            .then_some(crate::lease::VxlanSettings {
                vni: self.vxlan_vni,
                port: self.vxlan_port,
            })
    }
}

impl Flags {
    /// Fills what the command line left out from the file, then from the defaults, and checks
    /// the result. Errors name the flag and the value.
    pub fn resolve(mut self) -> Result<Config, String> {
        if let Some(path) = &self.config {
            let text =
                std::fs::read(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
            let file =
                parse_file(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
            macro_rules! fill {
                ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
            }
            fill!(
                node_name,
                cluster_cidr,
                subnet_len,
                backend,
                iface,
                store,
                lease_ttl,
                run_dir,
                state_dir,
                listen,
                mode,
                network_name,
                resync,
                service_cidr,
                services_repair,
                vxlan_port,
                vxlan_vni
            );
        }
        let given = Given {
            cluster_cidr: self.cluster_cidr.is_some(),
            subnet_len: self.subnet_len.is_some(),
            backend: self.backend.is_some(),
            vxlan_port: self.vxlan_port.is_some(),
            vxlan_vni: self.vxlan_vni.is_some(),
        };
        let node_name = match self.node_name {
            Some(n) => n,
            None => hostname_node_name().map_err(|e| {
                format!("--node-name not given and the hostname is unreadable: {e}")
            })?,
        };
        if !valid_node_name(&node_name) {
            return Err(format!(
                "--node-name: {node_name:?} is not a node name (a DNS subdomain: lowercase \
                 letters, digits, '-' and '.')"
            ));
        }
        let cluster_cidr = self
            .cluster_cidr
            .unwrap_or(DEFAULT_CLUSTER_CIDR.parse().expect("literal"))
            .trunc();
        let subnet_len = self.subnet_len.unwrap_or(DEFAULT_SUBNET_LEN);
        // Against the cluster CIDR only where that was given too: otherwise the cluster's
        // recorded one decides (network.rs checks the pair the node ends up with).
        let least = if given.cluster_cidr {
            cluster_cidr.prefix_len()
        } else {
            1
        };
        if subnet_len < least || subnet_len > 30 {
            return Err(if given.cluster_cidr {
                format!(
                    "--subnet-len: /{subnet_len} must be between the cluster CIDR's /{least} and /30"
                )
            } else {
                format!("--subnet-len: /{subnet_len} is not in /1../30")
            });
        }
        let backend = self.backend.as_deref().unwrap_or(DEFAULT_BACKEND.as_str());
        let backend = BackendKind::parse(backend)?;
        let mode = self.mode.unwrap_or_else(|| "bridge".into());
        if mode != "bridge" && mode != "routed" {
            return Err(format!("--mode: {mode:?} is not one of bridge, routed"));
        }
        let store = self.store.unwrap_or_else(|| DEFAULT_STORE.into());
        if !(store.starts_with("sqlite://")
            || store.starts_with("etcd://")
            || store.starts_with("etcd+unix://"))
        {
            return Err(format!(
                "--store: {store:?} is not a sqlite:// or etcd:// URL"
            ));
        }
        let lease_ttl = self.lease_ttl.unwrap_or(30);
        if !(3..=3600).contains(&lease_ttl) {
            return Err(format!(
                "--lease-ttl: {lease_ttl} is not in 3..3600 seconds"
            ));
        }
        let resync = self.resync.unwrap_or(10);
        if !(1..=3600).contains(&resync) {
            return Err(format!("--resync: {resync} is not in 1..3600 seconds"));
        }
        let asked = self
            .service_cidr
            .unwrap_or(DEFAULT_SERVICE_CIDR.parse().expect("literal"));
        let service_cidr = asked.trunc();
        if given.cluster_cidr && overlap(service_cidr, cluster_cidr) {
            let network = if asked == service_cidr {
                String::new()
            } else {
                format!(" (network {service_cidr})")
            };
            return Err(format!(
                "--service-cidr: {asked}{network} overlaps the cluster CIDR {cluster_cidr}"
            ));
        }
        let services_repair = self.services_repair.unwrap_or(60);
        if !(1..=3600).contains(&services_repair) {
            return Err(format!(
                "--services-repair: {services_repair} is not in 1..3600 seconds"
            ));
        }
        let default = crate::lease::VxlanSettings::default();
        let vxlan = crate::lease::VxlanSettings {
            vni: self.vxlan_vni.unwrap_or(default.vni),
            port: self.vxlan_port.unwrap_or(default.port),
        };
        let problems = vxlan.problems();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let (vxlan_vni, vxlan_port) = (vxlan.vni, vxlan.port);
        Ok(Config {
            node_name,
            cluster_cidr,
            subnet_len,
            backend,
            iface: self.iface,
            store,
            lease_ttl: Duration::from_secs(lease_ttl),
            run_dir: self.run_dir.unwrap_or_else(|| "/run/weft".into()),
            state_dir: self.state_dir.unwrap_or_else(|| "/var/lib/weft".into()),
            listen: self
                .listen
                .unwrap_or_else(|| "127.0.0.1:9967".parse().expect("literal")),
            mode,
            network_name: self.network_name.unwrap_or_else(|| "weft".into()),
            resync: Duration::from_secs(resync),
            service_cidr,
            services_repair: Duration::from_secs(services_repair),
            vxlan_port,
            vxlan_vni,
            given,
            leave: self.leave,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("weftd").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = flags(&["--node-name", "n1"]).resolve().unwrap();
        assert_eq!(c.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.backend, BackendKind::Vxlan);
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
    }

    #[test]
    fn errors_name_flag_and_value() {
        for args in [
            ["--backend", "ipsec"],
            ["--subnet-len", "31"],
            ["--mode", "tunnel"],
            ["--store", "mysql://x"],
            ["--lease-ttl", "1"],
            ["--services-repair", "0"],
            ["--vxlan-port", "0"],
            ["--vxlan-vni", "16777216"],
        ] {
            let mut a = vec!["--node-name", "n1"];
            a.extend(args);
            let e = flags(&a).resolve().unwrap_err();
            assert!(e.contains(args[0]) && e.contains(args[1]), "{e}");
        }
    }

    #[test]
    fn cluster_cidr_checks_only_when_given() {
        // Given together, the pair is checked at once.
        for (args, needle) in [
            (
                ["--subnet-len", "8"],
                "--subnet-len: /8 must be between the cluster CIDR's /16",
            ),
            (
                ["--service-cidr", "10.244.0.0/12"],
                "--service-cidr: 10.244.0.0/12 (network 10.240.0.0/12) overlaps the cluster CIDR",
            ),
        ] {
            let mut a = vec!["--node-name", "n1", "--cluster-cidr", "10.244.0.0/16"];
            a.extend(args);
            let e = flags(&a).resolve().unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        // Alone, they wait for the cluster's CIDR (which may be a /8 elsewhere).
        for args in [["--subnet-len", "8"], ["--service-cidr", "10.244.0.0/12"]] {
            let mut a = vec!["--node-name", "n1"];
            a.extend(args);
            assert!(flags(&a).resolve().is_ok(), "{a:?}");
        }
    }

    #[test]
    fn file_fills_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("weftd-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("weftd.json");
        std::fs::write(
            &f,
            r#"{"nodeName": "from-file", "backend": "host-gw", "subnetLen": 26}"#,
        )
        .unwrap();
        let c = flags(&["--config", f.to_str().unwrap(), "--subnet-len", "25"])
            .resolve()
            .unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.backend, c.subnet_len),
            ("from-file", BackendKind::HostGw, 25)
        );
        for (text, needles) in [
            (
                r#"{"nodeNmae": "typo"}"#,
                &["nodeNmae", "unknown field"][..],
            ),
            (r#"{"subnetLen": "24"}"#, &["subnetLen", "\"24\""]),
            (
                r#"{"clusterCidr": "10.244.0.0"}"#,
                &["clusterCidr", "10.244.0.0"],
            ),
            (r#"{"leaseTtl": -5}"#, &["leaseTtl", "-5"]),
            (r#"["vxlan"]"#, &["not a JSON object"]),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = flags(&["--config", f.to_str().unwrap()])
                .resolve()
                .unwrap_err();
            assert!(e.contains("--config"), "{e}");
            for n in needles {
                assert!(e.contains(n), "{text}: {e} lacks {n}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
