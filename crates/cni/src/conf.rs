//! The plugin configuration a plugin receives on stdin (SPEC §1 "Plugin configuration objects",
//! as derived by the runtime in SPEC §3 "Deriving request configuration").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::env::is_identifier;
use crate::error::{code, CniError};
use crate::result::Dns;
use crate::version::check_supported;

/// The key under which GC receives the attachments that are still valid (SPEC §2 "GC").
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub capabilities: BTreeMap<String, bool>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: RuntimeConfig,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub dns: Dns,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Plugin-specific fields (`ipam`, `mtu`, ...), to be decoded by the plugin.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Capability arguments the runtime passed for the capabilities this plugin declared
/// (CONVENTIONS.md lists the well-known ones).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuntimeConfig {
    /// "ips" capability: requested addresses, each a CIDR or a bare IP.
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(rename = "portMappings", default)]
    pub port_mappings: Vec<Value>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A network configuration (conf or conflist) as a JSON object; anything else is code 6.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Value, CniError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!("network configuration is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(CniError::new(
            code::DECODE,
            "network configuration must be a JSON object",
        ));
    }
    Ok(value)
}

/// Parses and validates the configuration a plugin reads from stdin.
///
/// Malformed JSON and values of the wrong type are code 6; missing or invalid required fields
/// are code 7; an unsupported `cniVersion` is code 1.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value = parse_object(stdin)?;
    let obj = value.as_object().expect("parse_object checked");

    check_supported(required_str(obj, "cniVersion")?)?;
    validate_name(required_str(obj, "name")?)?;
    validate_type("type", required_str(obj, "type")?)?;

    NetConf::deserialize(&value).map_err(|e| {
        let msg = locate(obj).unwrap_or_else(|| e.to_string());
        CniError::new(code::DECODE, format!("network configuration: {msg}"))
    })
}

pub(crate) fn required_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str, CniError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("missing required field {key:?}"),
        )),
        Some(other) => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("field {key:?} must be a string, got {other}"),
        )),
    }
}

/// SPEC §1: the network name must match [A-Za-z0-9][A-Za-z0-9_.-]*. Plugins use it in state
/// paths, so this also keeps "../x" out of them.
pub(crate) fn validate_name(name: &str) -> Result<(), CniError> {
    if is_identifier(name) {
        return Ok(());
    }
    let why = if name.is_empty() {
        "must not be empty"
    } else {
        "must match [A-Za-z0-9][A-Za-z0-9_.-]*"
    };
    Err(CniError::new(
        code::INVALID_CONFIG,
        format!("network name {name:?} is invalid: {why}"),
    ))
}

/// SPEC §1: `type` names a binary and must not contain characters disallowed in file paths.
pub(crate) fn validate_type(field: &str, t: &str) -> Result<(), CniError> {
    if t.is_empty() || t == "." || t == ".." || t.contains(['/', '\\', '\0']) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("{field} {t:?} is invalid: must be a plugin file name"),
        ));
    }
    Ok(())
}

/// Names the top-level field whose value failed to decode; serde's own message lacks the path.
fn locate(obj: &Map<String, Value>) -> Option<String> {
    type Probe = fn(&Value) -> Result<(), serde_json::Error>;
    let probes: [(&str, Probe); 4] = [
        ("capabilities", |v| {
            BTreeMap::<String, bool>::deserialize(v).map(drop)
        }),
        ("runtimeConfig", |v| RuntimeConfig::deserialize(v).map(drop)),
        ("dns", |v| Dns::deserialize(v).map(drop)),
        (VALID_ATTACHMENTS, |v| {
            Option::<Vec<Attachment>>::deserialize(v).map(drop)
        }),
    ];
    probes
        .iter()
        .find_map(|(key, probe)| Some(format!("{key}: {}", probe(obj.get(*key)?).err()?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        parse_conf(v.to_string().as_bytes())
    }

    #[test]
    fn full_conf() {
        let c = parse(json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft",
            "mtu": 1450,
            "ipam": {"type": "weft-ipam", "subnet": "10.244.1.0/24"},
            "capabilities": {"ips": true, "portMappings": false},
            "runtimeConfig": {"ips": ["10.244.1.9/24", "fd00::9"], "portMappings": [{"hostPort": 8080}], "bandwidth": {"ingressRate": 1}},
            "dns": {"nameservers": ["10.96.0.10"]},
            "prevResult": {"cniVersion": "1.1.0", "ips": []},
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]
        }))
        .unwrap();
        assert_eq!(
            (
                c.cni_version.as_str(),
                c.name.as_str(),
                c.plugin_type.as_str()
            ),
            ("1.1.0", "weft", "weft")
        );
        assert_eq!(
            c.capabilities,
            BTreeMap::from([("ips".into(), true), ("portMappings".into(), false)])
        );
        assert_eq!(c.runtime_config.ips, ["10.244.1.9/24", "fd00::9"]);
        assert_eq!(c.runtime_config.port_mappings, [json!({"hostPort": 8080})]);
        assert_eq!(
            c.runtime_config.rest["bandwidth"],
            json!({"ingressRate": 1})
        );
        assert_eq!(c.dns.nameservers, ["10.96.0.10"]);
        assert!(c.prev_result.is_some());
        assert_eq!(
            c.valid_attachments.unwrap(),
            [Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
        let mut extra: Vec<_> = c.extra.keys().collect();
        extra.sort();
        assert_eq!(extra, ["ipam", "mtu"]);
    }

    #[test]
    fn minimal_conf() {
        let c = parse(json!({"cniVersion": "0.3.1", "name": "n", "type": "weft"})).unwrap();
        assert_eq!(c.runtime_config, RuntimeConfig::default());
        assert!(c.capabilities.is_empty() && c.dns.is_empty() && c.extra.is_empty());
        assert_eq!((c.prev_result, c.valid_attachments), (None, None));
    }

    #[test]
    fn malformed_json_is_decode_error_with_position() {
        let e = parse_conf(b"{\n  \"cniVersion\": \"1.1.0\",\n  \"name\": }").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert!(e.msg.contains("line 3 column"), "{e}");
        assert_eq!(parse_conf(b"[1]").unwrap_err().code, code::DECODE);
    }

    #[test]
    fn required_fields() {
        let cases = [
            (
                json!({"name": "n", "type": "t"}),
                code::INVALID_CONFIG,
                r#"missing required field "cniVersion""#,
            ),
            (
                json!({"cniVersion": "1.1.0", "type": "t"}),
                code::INVALID_CONFIG,
                r#"missing required field "name""#,
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "n"}),
                code::INVALID_CONFIG,
                r#"missing required field "type""#,
            ),
            (
                json!({"cniVersion": "1.1.0", "name": 5, "type": "t"}),
                code::INVALID_CONFIG,
                r#"field "name" must be a string, got 5"#,
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "", "type": "t"}),
                code::INVALID_CONFIG,
                r#"network name "" is invalid: must not be empty"#,
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "../etc", "type": "t"}),
                code::INVALID_CONFIG,
                r#"network name "../etc" is invalid"#,
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "n", "type": "../sh"}),
                code::INVALID_CONFIG,
                r#"type "../sh" is invalid"#,
            ),
            (
                json!({"cniVersion": "9.9.9", "name": "n", "type": "t"}),
                code::INCOMPATIBLE_VERSION,
                r#"cniVersion "9.9.9" is not supported"#,
            ),
        ];
        for (v, code, msg) in cases {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!(e.code, code, "{v}: {e}");
            assert!(e.msg.starts_with(msg), "{v}: {e}");
        }
    }

    #[test]
    fn nested_type_errors_name_the_field() {
        let base = json!({"cniVersion": "1.1.0", "name": "n", "type": "t"});
        let cases = [
            ("capabilities", json!({"ips": "yes"})),
            ("runtimeConfig", json!({"ips": [5]})),
            ("dns", json!({"nameservers": "8.8.8.8"})),
            (VALID_ATTACHMENTS, json!([{"ifname": "eth0"}])),
        ];
        for (key, bad) in cases {
            let mut v = base.clone();
            v[key] = bad;
            let e = parse(v).unwrap_err();
            assert_eq!(e.code, code::DECODE, "{e}");
            assert!(
                e.msg
                    .starts_with(&format!("network configuration: {key}: ")),
                "{e}"
            );
        }
    }
}
