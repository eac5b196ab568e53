//! The `weft` network configuration: the plugin's own fields of the CNI conf, and where a missing
//! subnet, MTU or mode comes from (the agent's subnet.env).

use crate::subnet_env::SubnetEnv;
use ipnet::Ipv4Net;
use serde_json::{Map, Value};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use weft_cni::error::{code, CniError};

pub const DEFAULT_BRIDGE: &str = "weft0";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft/ipam";
pub const DEFAULT_RUN_DIR: &str = "/run/weft";
pub const SUBNET_FILE: &str = "subnet.env";
pub const DEFAULT_MTU: u32 = 1500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// veth into the `weft0` bridge, which holds the gateway address (flannel's cni0).
    Bridge,
    /// No bridge: a /32 host route per pod and a link-local gateway (Calico's model).
    Routed,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "bridge" => Some(Mode::Bridge),
            "routed" => Some(Mode::Routed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge",
            Mode::Routed => "routed",
        }
    }
}

/// The conf fields that `weft` reads, as given (before subnet.env fills the gaps).
#[derive(Debug, Clone, PartialEq)]
pub struct WeftConf {
    pub name: String,
    pub mode: Option<Mode>,
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: Option<u32>,
    pub bridge: String,
    pub hairpin: bool,
    /// DEL leaves the veth's deletion to a detached reaper (see `reap`).
    pub async_delete: bool,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
}

/// Everything an ADD needs to know about the node's pod network.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub mode: Mode,
    pub subnet: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
}

fn invalid(msg: String) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn string_field<'a>(extra: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match extra.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(format!("{key}: expected a string, got {v}"))),
    }
}

impl WeftConf {
    pub fn from_extra(name: &str, extra: &Map<String, Value>) -> Result<WeftConf, CniError> {
        if let Some(ipam) = extra.get("ipam") {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!(
                    "ipam: {ipam} given, but weft has built-in IPAM and does not delegate; remove \
                     the ipam section (set subnet and dataDir on the weft conf instead)"
                ),
            ));
        }
        let mode = match string_field(extra, "mode")? {
            None => None,
            Some(m) => Some(Mode::parse(m).ok_or_else(|| {
                invalid(format!("mode: {m:?} is not one of \"bridge\", \"routed\""))
            })?),
        };
        let subnet = match string_field(extra, "subnet")? {
            None => None,
            Some(s) => Some(
                s.parse::<Ipv4Net>()
                    .map_err(|_| invalid(format!("subnet: {s:?} is not an IPv4 CIDR")))?,
            ),
        };
        let gateway = match string_field(extra, "gateway")? {
            None => None,
            Some(g) => Some(
                g.parse::<Ipv4Addr>()
                    .map_err(|_| invalid(format!("gateway: {g:?} is not an IPv4 address")))?,
            ),
        };
        let mtu = match extra.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|m| (68..=65535).contains(m))
                    .map(|m| m as u32)
                    .ok_or_else(|| invalid(format!("mtu: {v} is not an MTU in 68..65535")))?,
            ),
        };
        let bridge = string_field(extra, "bridge")?.unwrap_or(DEFAULT_BRIDGE);
        if bridge.is_empty() || bridge.len() > 15 || bridge.contains(['/', ':', ' ']) {
            return Err(invalid(format!(
                "bridge: {bridge:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            )));
        }
        let flag = |key: &str| -> Result<bool, CniError> {
            match extra.get(key) {
                None | Some(Value::Null) => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(invalid(format!("{key}: expected true or false, got {v}"))),
            }
        };
        let hairpin = flag("hairpinMode")?;
        let async_delete = flag("asyncDelete")?;
        let dir = |key: &str, default: &str| -> Result<PathBuf, CniError> {
            let d = string_field(extra, key)?.unwrap_or(default);
            if !d.starts_with('/') {
                return Err(invalid(format!("{key}: {d:?} must be an absolute path")));
            }
            Ok(PathBuf::from(d))
        };
        Ok(WeftConf {
            name: name.to_string(),
            mode,
            subnet,
            gateway,
            mtu,
            bridge: bridge.to_string(),
            hairpin,
            async_delete,
            data_dir: dir("dataDir", DEFAULT_DATA_DIR)?,
            run_dir: dir("runDir", DEFAULT_RUN_DIR)?,
        })
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.run_dir.join(SUBNET_FILE)
    }

    /// The MTU an ADD would give a pod now, by the same rule as [`WeftConf::network`] (the conf's,
    /// else subnet.env's), if either says one; an unreadable subnet.env says none.
    pub fn current_mtu(&self) -> Option<u32> {
        self.mtu
            .or_else(|| SubnetEnv::read(&self.subnet_file()).ok().flatten()?.mtu)
    }

    /// The node's network: the conf's own fields first, subnet.env for what they leave out. No
    /// subnet anywhere means the agent has not leased one yet: "try again later" (code 11).
    pub fn network(&self) -> Result<Network, CniError> {
        let path = self.subnet_file();
        let env = SubnetEnv::read(&path).map_err(invalid)?;
        if let Some(env) = &env {
            if let (Some(theirs), None) = (&env.network_name, self.subnet) {
                if *theirs != self.name {
                    return Err(invalid(format!(
                        "name: the conf is for network {:?} but {} is for network {theirs:?}",
                        self.name,
                        path.display()
                    )));
                }
            }
        }
        let env = env.unwrap_or_default();
        let subnet = self.subnet.or(env.subnet).ok_or_else(|| {
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "no pod subnet: the conf has no subnet and {} does not exist or has no \
                     WEFT_SUBNET (is weftd running on this node?)",
                    path.display()
                ),
            )
        })?;
        Ok(Network {
            mode: self.mode.or(env.mode).unwrap_or(Mode::Bridge),
            subnet: subnet.trunc(),
            gateway: self.gateway,
            mtu: self.mtu.or(env.mtu).unwrap_or(DEFAULT_MTU),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: Value) -> Result<WeftConf, CniError> {
        WeftConf::from_extra("weft", v.as_object().unwrap())
    }

    #[test]
    fn defaults() {
        let c = conf(json!({})).unwrap();
        assert_eq!(c.bridge, "weft0");
        assert!(c.hairpin);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/weft/ipam"));
        assert_eq!(c.subnet_file(), PathBuf::from("/run/weft/subnet.env"));
    }

    #[test]
    fn bad_fields_are_named() {
        for (v, field, value) in [
            (json!({"mode": "tunnel"}), "mode", "tunnel"),
            (json!({"subnet": "10.0.0.0/33"}), "subnet", "10.0.0.0/33"),
            (json!({"subnet": 7}), "subnet", "7"),
            (json!({"gateway": "x"}), "gateway", "x"),
            (json!({"mtu": 20}), "mtu", "20"),
            (
                json!({"bridge": "a-very-long-bridge-name"}),
                "bridge",
                "a-very-long",
            ),
            (json!({"hairpinMode": "yes"}), "hairpinMode", "yes"),
            (json!({"asyncDelete": 1}), "asyncDelete", "1"),
            (
                json!({"dataDir": "relative/dir"}),
                "dataDir",
                "relative/dir",
            ),
        ] {
            let e = conf(v).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{e:?}");
            assert!(e.msg.starts_with(field) && e.msg.contains(value), "{e:?}");
        }
        let e = conf(json!({"ipam": {"type": "host-local"}})).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-conf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn missing_subnet_is_try_again_later() {
        let d = tmp("missing");
        let c = conf(json!({"runDir": d.to_str().unwrap()})).unwrap();
        assert_eq!(c.network().unwrap_err().code, code::TRY_AGAIN_LATER);
    }

    #[test]
    fn subnet_env_fills_gaps_and_conf_wins() {
        let d = tmp("env");
        SubnetEnv {
            subnet: Some("10.244.7.0/24".parse().unwrap()),
            mtu: Some(1450),
            mode: Some(Mode::Routed),
            network_name: Some("weft".into()),
            ..Default::default()
        }
        .write(&d.join(SUBNET_FILE))
        .unwrap();
        let rd = d.to_str().unwrap();
        let n = conf(json!({"runDir": rd})).unwrap().network().unwrap();
        assert_eq!(
            (n.subnet.to_string(), n.mtu, n.mode),
            ("10.244.7.0/24".into(), 1450, Mode::Routed)
        );
        let n = conf(json!({"runDir": rd, "mtu": 9000, "mode": "bridge"}))
            .unwrap()
            .network()
            .unwrap();
        assert_eq!((n.mtu, n.mode), (9000, Mode::Bridge));
        let other =
            WeftConf::from_extra("other", json!({"runDir": rd}).as_object().unwrap()).unwrap();
        let e = other.network().unwrap_err();
        assert!(
            e.msg.contains("\"other\"") && e.msg.contains("\"weft\""),
            "{e:?}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
