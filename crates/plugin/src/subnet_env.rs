//! `/run/weft/subnet.env`: the node's pod subnet, written by the agent and read by the plugin.
//!
//! The format is `KEY=VALUE` lines (blank lines and `#` comments allowed), so a shell can source it:
//!
//! ```text
//! WEFT_NETWORK=10.244.0.0/16      # the cluster CIDR (optional)
//! WEFT_SUBNET=10.244.1.0/24       # this node's pod subnet (required)
//! WEFT_MTU=1450                   # pod interface MTU (optional)
//! WEFT_MODE=bridge                # bridge | routed (optional)
//! WEFT_NETWORK_NAME=weft          # the CNI network name the subnet belongs to (optional)
//! ```
//!
//! The agent writes it with write-then-rename, so a reader sees the old file or the new one whole.
//! Unknown keys are ignored (a newer agent may add some); a malformed value is an error that names it.

use ipnet::Ipv4Net;
use std::fmt::Write as _;
use std::path::Path;

use crate::config::Mode;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub mtu: Option<u32>,
    pub mode: Option<Mode>,
    pub network_name: Option<String>,
}

impl SubnetEnv {
    pub fn parse(text: &str, origin: &str) -> Result<SubnetEnv, String> {
        let mut env = SubnetEnv::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!(
                    "{origin}:{}: expected KEY=VALUE, got {raw:?}",
                    n + 1
                ));
            };
            let (key, value) = (key.trim(), value.trim().trim_matches('"'));
            let bad = |what: &str| format!("{origin}:{}: {key}={value:?} is not {what}", n + 1);
            match key {
                "WEFT_NETWORK" => env.network = Some(value.parse().map_err(|_| bad("a CIDR"))?),
                "WEFT_SUBNET" => env.subnet = Some(value.parse().map_err(|_| bad("a CIDR"))?),
                "WEFT_MTU" => {
                    env.mtu = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|m| (68..=65535).contains(m))
                            .ok_or_else(|| bad("an MTU in 68..65535"))?,
                    )
                }
                "WEFT_MODE" => {
                    env.mode = Some(Mode::parse(value).ok_or_else(|| bad("bridge or routed"))?)
                }
                "WEFT_NETWORK_NAME" => env.network_name = Some(value.to_string()),
                _ => {}
            }
        }
        Ok(env)
    }

    /// Reads the file; Ok(None) if it does not exist (yet).
    pub fn read(path: &Path) -> Result<Option<SubnetEnv>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => SubnetEnv::parse(&text, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::from("# Written by weftd; read by the weft CNI plugin.\n");
        if let Some(n) = self.network {
            let _ = writeln!(s, "WEFT_NETWORK={n}");
        }
        if let Some(n) = self.subnet {
            let _ = writeln!(s, "WEFT_SUBNET={n}");
        }
        if let Some(m) = self.mtu {
            let _ = writeln!(s, "WEFT_MTU={m}");
        }
        if let Some(m) = self.mode {
            let _ = writeln!(s, "WEFT_MODE={}", m.as_str());
        }
        if let Some(n) = &self.network_name {
            let _ = writeln!(s, "WEFT_NETWORK_NAME={n}");
        }
        s
    }

    /// Writes the file atomically: a temporary file in the same directory, then rename.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("subnet.env"),
            std::process::id()
        ));
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_renders() {
        let env = SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.3.0/24".parse().unwrap()),
            mtu: Some(1450),
            mode: Some(Mode::Routed),
            network_name: Some("weft".into()),
        };
        assert_eq!(SubnetEnv::parse(&env.render(), "t").unwrap(), env);
    }

    #[test]
    fn tolerates_comments_quotes_and_unknown_keys() {
        let env = SubnetEnv::parse(
            "# hi\n\nWEFT_SUBNET=\"10.1.2.0/24\"  # mine\nWEFT_FUTURE=1\n",
            "t",
        )
        .unwrap();
        assert_eq!(env.subnet, Some("10.1.2.0/24".parse().unwrap()));
        assert_eq!(env.mtu, None);
    }

    #[test]
    fn names_the_bad_value() {
        let e = SubnetEnv::parse("WEFT_SUBNET=10.1.2.0/33\n", "/run/weft/subnet.env").unwrap_err();
        assert!(
            e.contains("/run/weft/subnet.env:1") && e.contains("10.1.2.0/33"),
            "{e}"
        );
        let e = SubnetEnv::parse("WEFT_MTU=9\n", "f").unwrap_err();
        assert!(e.contains("WEFT_MTU"), "{e}");
        let e = SubnetEnv::parse("WEFT_MODE=tunnel\n", "f").unwrap_err();
        assert!(e.contains("tunnel"), "{e}");
        assert!(SubnetEnv::parse("garbage\n", "f").is_err());
    }

    #[test]
    fn write_is_atomic_rename() {
        let dir = std::env::temp_dir().join(format!("weft-subnetenv-{}", std::process::id()));
        let path = dir.join("subnet.env");
        let env = SubnetEnv {
            subnet: Some("10.9.0.0/24".parse().unwrap()),
            ..Default::default()
        };
        env.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(env.clone()));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        // A reader that has the old file open keeps reading the old, whole file: the new one is
        // another inode, put in place by rename, never the old one truncated and rewritten.
        use std::os::unix::fs::MetadataExt;
        let mut old = std::fs::File::open(&path).unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        let newer = SubnetEnv {
            subnet: Some("10.9.1.0/24".parse().unwrap()),
            ..Default::default()
        };
        newer.write(&path).unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut old, &mut text).unwrap();
        assert_eq!(text, env.render());
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(newer));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), None);
    }
}
