//! The ADD success result (SPEC §5 "ADD Success"), rendered in the shape of the requested version.
//!
//! Differences between supported versions:
//! - before 1.0.0, every `ips[]` entry carries `"version": "4"|"6"`;
//! - 1.1.0 adds `interfaces[].mtu` and `routes[].mtu`/`scope` (also `advmss`, `priority`, `table`,
//!   `socketPath`, `pciID`, which Weft neither produces nor keeps).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{code, CniError};
use crate::version::at_least;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    /// 1.1.0 only.
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; `None` for host interfaces.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct IpConfig {
    /// Address with the subnet's prefix length, e.g. 10.244.1.5/24.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`; absent in IPAM results.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    /// 1.1.0 only.
    pub mtu: Option<u32>,
    /// 1.1.0 only: 0 global, 253 link, 254 host.
    pub scope: Option<u8>,
}

/// DNS settings, both in the network configuration and in results. Empty fields are omitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dns {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// Renders the result for `cni_version`, which must be the version the plugin was given
    /// (SPEC §5: "The same version supplied on input"). Empty lists are omitted, as IPAM results
    /// omit `interfaces`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let v1_1 = at_least(cni_version, "1.1.0");
        let pre_1_0 = !at_least(cni_version, "1.0.0");
        let mut out = Map::new();
        out.insert("cniVersion".into(), cni_version.into());

        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), i.name.as_str().into());
                put(&mut o, "mac", i.mac.as_deref());
                put(&mut o, "mtu", i.mtu.filter(|_| v1_1));
                put(&mut o, "sandbox", i.sandbox.as_deref());
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if pre_1_0 {
                    let family = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    o.insert("version".into(), family.into());
                }
                o.insert("address".into(), ip.address.to_string().into());
                put(&mut o, "gateway", ip.gateway.map(|g| g.to_string()));
                put(&mut o, "interface", ip.interface);
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("dst".into(), r.dst.to_string().into());
                put(&mut o, "gw", r.gw.map(|g| g.to_string()));
                put(&mut o, "mtu", r.mtu.filter(|_| v1_1));
                put(&mut o, "scope", r.scope.filter(|_| v1_1));
                Value::Object(o)
            })
            .collect();

        for (key, list) in [("interfaces", interfaces), ("ips", ips), ("routes", routes)] {
            if !list.is_empty() {
                out.insert(key.into(), Value::Array(list));
            }
        }
        if !self.dns.is_empty() {
            out.insert("dns".into(), json!(self.dns));
        }
        Value::Object(out)
    }

    /// Parses a result of any supported version, e.g. the `prevResult` given to CHECK and DEL.
    /// Type errors are code 6 and name the element; inconsistent content is code 7.
    pub fn from_json(v: &Value) -> Result<CniResult, CniError> {
        let obj = v
            .as_object()
            .ok_or_else(|| CniError::new(code::DECODE, "result: expected a JSON object"))?;
        let result = CniResult {
            interfaces: list(obj, "interfaces")?,
            ips: list(obj, "ips")?,
            routes: list(obj, "routes")?,
            dns: match obj.get("dns") {
                None | Some(Value::Null) => Dns::default(),
                Some(d) => Dns::deserialize(d).map_err(|e| decode_error("dns", e))?,
            },
        };

        let raw_ips = obj
            .get("ips")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, (ip, raw)) in result.ips.iter().zip(raw_ips).enumerate() {
            if let Some(idx) = ip.interface.filter(|&idx| idx >= result.interfaces.len()) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "ips[{i}].interface {idx} is out of range ({} interfaces)",
                        result.interfaces.len()
                    ),
                ));
            }
            // Pre-1.0 results carry the family explicitly; a mismatch means a broken producer.
            if let Some(family) = raw.get("version") {
                let expected = if ip.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                };
                if family.as_str() != Some(expected) {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        format!(
                            "ips[{i}].version {family} does not match address {}",
                            ip.address
                        ),
                    ));
                }
            }
        }
        Ok(result)
    }
}

fn put(o: &mut Map<String, Value>, key: &str, v: Option<impl Into<Value>>) {
    if let Some(v) = v {
        o.insert(key.into(), v.into());
    }
}

fn decode_error(path: &str, e: serde_json::Error) -> CniError {
    CniError::new(code::DECODE, format!("{path}: {e}"))
}

/// Decodes the array `obj[key]` element by element so that an error names the element.
fn list<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Vec<T>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                T::deserialize(item).map_err(|e| decode_error(&format!("{key}[{i}]"), e))
            })
            .collect(),
        Some(other) => Err(CniError::new(
            code::DECODE,
            format!("{key}: expected an array, got {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "veth1a2b3c4d".into(),
                    mac: Some("8e:1f:00:00:00:01".into()),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:f4:01:05".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/pod1".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:10:244:1::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some("10.244.1.1".parse().unwrap()),
                    mtu: Some(1400),
                    scope: None,
                },
                Route {
                    dst: "10.96.0.0/12".parse().unwrap(),
                    gw: None,
                    mtu: None,
                    scope: Some(253),
                },
            ],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                search: vec!["svc.cluster.local".into()],
                ..Dns::default()
            },
        }
    }

    /// What survives rendering at a version without the 1.1.0 fields.
    fn without_1_1_fields(mut r: CniResult) -> CniResult {
        r.interfaces.iter_mut().for_each(|i| i.mtu = None);
        r.routes
            .iter_mut()
            .for_each(|r| (r.mtu, r.scope) = (None, None));
        r
    }

    #[test]
    fn render_0_3_1() {
        assert_eq!(
            sample().to_json("0.3.1"),
            json!({
                "cniVersion": "0.3.1",
                "interfaces": [
                    {"name": "veth1a2b3c4d", "mac": "8e:1f:00:00:00:01"},
                    {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/run/netns/pod1"}
                ],
                "ips": [
                    {"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                    {"version": "6", "address": "fd00:10:244:1::5/64", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.96.0.0/12"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
    }

    #[test]
    fn render_0_4_0_same_shape_as_0_3() {
        let mut expected = sample().to_json("0.3.1");
        expected["cniVersion"] = "0.4.0".into();
        assert_eq!(sample().to_json("0.4.0"), expected);
    }

    #[test]
    fn render_1_0_0() {
        assert_eq!(
            sample().to_json("1.0.0"),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "veth1a2b3c4d", "mac": "8e:1f:00:00:00:01"},
                    {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/run/netns/pod1"}
                ],
                "ips": [
                    {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                    {"address": "fd00:10:244:1::5/64", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.96.0.0/12"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
    }

    #[test]
    fn render_1_1_0() {
        assert_eq!(
            sample().to_json("1.1.0"),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "veth1a2b3c4d", "mac": "8e:1f:00:00:00:01", "mtu": 1450},
                    {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "mtu": 1450, "sandbox": "/run/netns/pod1"}
                ],
                "ips": [
                    {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                    {"address": "fd00:10:244:1::5/64", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400}, {"dst": "10.96.0.0/12", "scope": 253}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
    }

    #[test]
    fn render_empty_ipam_style() {
        let r = CniResult {
            ips: vec![IpConfig {
                address: "10.0.0.2/8".parse().unwrap(),
                gateway: None,
                interface: None,
            }],
            ..CniResult::default()
        };
        assert_eq!(
            r.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8"}]})
        );
    }

    #[test]
    fn round_trip_every_version() {
        for v in crate::SUPPORTED_VERSIONS {
            let expected = if *v == "1.1.0" {
                sample()
            } else {
                without_1_1_fields(sample())
            };
            assert_eq!(
                CniResult::from_json(&sample().to_json(v)).unwrap(),
                expected,
                "version {v}"
            );
        }
    }

    #[test]
    fn from_json_ignores_unknown_fields() {
        let v = json!({"cniVersion": "1.1.0", "routes": [{"dst": "0.0.0.0/0", "table": 100, "advmss": 1360}],
                       "interfaces": [{"name": "eth0", "socketPath": "/run/x.sock"}]});
        let r = CniResult::from_json(&v).unwrap();
        assert_eq!(r.routes[0].dst, "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(r.interfaces[0].name, "eth0");
    }

    #[test]
    fn from_json_garbage() {
        let cases = [
            (
                json!("nope"),
                code::DECODE,
                "result: expected a JSON object",
            ),
            (json!({"ips": {}}), code::DECODE, "ips: expected an array"),
            (
                json!({"ips": [{"address": "10.0.0.1/8"}, {"address": "bogus"}]}),
                code::DECODE,
                "ips[1]: ",
            ),
            (
                json!({"interfaces": [{"mac": "x"}]}),
                code::DECODE,
                "interfaces[0]: missing field `name`",
            ),
            (
                json!({"routes": [{"dst": "0.0.0.0/0", "mtu": -1}]}),
                code::DECODE,
                "routes[0]: ",
            ),
            (
                json!({"dns": {"nameservers": "8.8.8.8"}}),
                code::DECODE,
                "dns: ",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/8", "interface": 0}]}),
                code::INVALID_CONFIG,
                "ips[0].interface 0 is out of range",
            ),
            (
                json!({"ips": [{"version": "6", "address": "10.0.0.1/8"}]}),
                code::INVALID_CONFIG,
                "ips[0].version \"6\" does not match",
            ),
        ];
        for (v, code, msg) in cases {
            let e = CniResult::from_json(&v).unwrap_err();
            assert_eq!(e.code, code, "{v}: {e}");
            assert!(e.msg.starts_with(msg), "{v}: {e}");
        }
    }
}
