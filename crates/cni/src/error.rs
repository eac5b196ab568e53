//! The CNI error result (SPEC §5 "Error") and every error code Weft emits, assigned here only.

use std::fmt;

use serde_json::{json, Value};

/// Error codes. 0–99 are reserved by the spec ("Well-known error codes"); 100+ are Weft's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// The message must contain the key and value of the unsupported field.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Implies the runtime need not call DEL for this container.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// The message must name the invalid variables.
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: cannot service ADD.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: cannot service ADD, and existing containers may have limited connectivity.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED: u32 = 51;

    pub const IPAM_EXHAUSTED: u32 = 100;
    pub const ADDRESS_IN_USE: u32 = 101;
    pub const KERNEL: u32 = 102;
    pub const CHECK_FAILED: u32 = 103;
    pub const INTERNAL: u32 = 110;
}

#[derive(Debug, Clone, PartialEq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON a plugin prints on stdout before exiting non-zero.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::from(self.details.as_str());
        }
        v
    }

    /// Reads a plugin's error output; `None` if `v` is not a CNI error object.
    pub fn from_json(v: &Value) -> Option<CniError> {
        let code = u32::try_from(v.get("code")?.as_u64()?).ok()?;
        let text = |k| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Some(CniError {
            code,
            msg: text("msg"),
            details: text("details"),
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}: {}", self.msg, self.details)
        }
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_omits_empty_details() {
        let e = CniError::new(code::INVALID_CONFIG, "bad subnet");
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion": "1.1.0", "code": 7, "msg": "bad subnet"})
        );
        let e = e.with_details("10.0.0.0/31 is too small");
        assert_eq!(e.to_json("0.4.0")["details"], "10.0.0.0/31 is too small");
        assert_eq!(e.to_string(), "bad subnet: 10.0.0.0/31 is too small");
    }

    #[test]
    fn json_round_trip() {
        let e = CniError::new(code::IPAM_EXHAUSTED, "no free address").with_details("10.1.0.0/24");
        assert_eq!(CniError::from_json(&e.to_json("1.0.0")), Some(e));
        assert_eq!(CniError::from_json(&json!({"msg": "no code"})), None);
        assert_eq!(CniError::from_json(&json!({"code": -1})), None);
    }
}
