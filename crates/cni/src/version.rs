//! Spec versions Weft speaks and the VERSION result (SPEC §5 "VERSION Success").

use std::cmp::Ordering;

use serde_json::{json, Value};

use crate::error::{code, CniError};

/// 0.1.0 and 0.2.0 used a different result shape ("ip4"/"ip6") and are not supported.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

pub fn is_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

pub fn check_supported(v: &str) -> Result<(), CniError> {
    if is_supported(v) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "cniVersion {v:?} is not supported (supported: {})",
            SUPPORTED_VERSIONS.join(", ")
        ),
    ))
}

pub fn version_info(cni_version: &str) -> Value {
    json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Compares dotted numeric versions component by component; a missing or non-numeric component
/// counts as 0, so "1.0" == "1.0.0". Enough for the spec's "x.y.z" strings.
pub fn cmp_versions(a: &str, b: &str) -> Ordering {
    let parse = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    let (a, b) = (parse(a), parse(b));
    (0..a.len().max(b.len()))
        .map(|i| a.get(i).unwrap_or(&0).cmp(b.get(i).unwrap_or(&0)))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// `v` is at least `min`.
pub(crate) fn at_least(v: &str, min: &str) -> bool {
    cmp_versions(v, min).is_ge()
}

/// The highest version we support among `candidates` (SPEC §1 "Version considerations":
/// runtimes must select the highest supported of `cniVersion` and `cniVersions`).
pub(crate) fn highest_supported<'a>(
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|v| is_supported(v))
        .max_by(|a, b| cmp_versions(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_version_names_field_and_value() {
        assert!(check_supported("0.3.1").is_ok());
        let e = check_supported("9.9.9").unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(
            e.msg,
            r#"cniVersion "9.9.9" is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)"#
        );
    }

    #[test]
    fn version_info_lists_supported() {
        assert_eq!(
            version_info("1.0.0"),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }

    #[test]
    fn compare() {
        assert_eq!(cmp_versions("0.3.1", "0.4.0"), Ordering::Less);
        assert_eq!(cmp_versions("1.10.0", "1.9.0"), Ordering::Greater);
        assert_eq!(cmp_versions("1.0", "1.0.0"), Ordering::Equal);
        assert!(at_least("1.1.0", "1.0.0") && !at_least("0.4.0", "1.0.0"));
    }

    #[test]
    fn highest() {
        assert_eq!(
            highest_supported(["0.4.0", "1.1.0", "1.0.0", "2.0.0"]),
            Some("1.1.0")
        );
        assert_eq!(highest_supported(["0.2.0"]), None);
    }
}
