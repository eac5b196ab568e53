//! The CNI_* environment a plugin is invoked with (SPEC §2 "Parameters").

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{code, CniError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// ADD, DEL and CHECK act on one attachment; only they take CONTAINERID/NETNS/IFNAME/ARGS.
    fn is_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return Err(invalid("CNI_COMMAND", s, "unknown command")),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads and validates the environment through `get`. An empty variable counts as unset:
    /// runtimes pass `CNI_NETNS=` on DEL when the namespace is gone.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let command: Command = var("CNI_COMMAND")
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is required"))?
            .parse()?;
        let path = var("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        let mut env = Env {
            command,
            container_id: None,
            netns: None,
            ifname: None,
            args: Vec::new(),
            path,
        };
        // SPEC §2: VERSION, STATUS and GC have no attachment parameters, so stray values are ignored.
        if !command.is_attachment() {
            return Ok(env);
        }
        if let Some(id) = var("CNI_CONTAINERID") {
            validate_container_id(&id)?;
            env.container_id = Some(id);
        }
        if let Some(ifname) = var("CNI_IFNAME") {
            validate_ifname(&ifname)?;
            env.ifname = Some(ifname);
        }
        env.netns = var("CNI_NETNS").map(PathBuf::from);
        env.args = var("CNI_ARGS")
            .map(|a| parse_args(&a))
            .transpose()?
            .unwrap_or_default();

        // SPEC §2 "CNI operations": DEL does not require CNI_NETNS.
        env.container_id()?;
        env.ifname()?;
        if command != Command::Del {
            env.netns()?;
        }
        Ok(env)
    }

    pub fn from_process() -> Result<Env, CniError> {
        Env::from_vars(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    pub fn container_id(&self) -> Result<&str, CniError> {
        self.container_id
            .as_deref()
            .ok_or_else(|| self.missing("CNI_CONTAINERID"))
    }

    pub fn netns(&self) -> Result<&Path, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| self.missing("CNI_NETNS"))
    }

    pub fn ifname(&self) -> Result<&str, CniError> {
        self.ifname
            .as_deref()
            .ok_or_else(|| self.missing("CNI_IFNAME"))
    }

    /// The first CNI_ARGS value for `key` (keys are case-sensitive).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn missing(&self, var: &str) -> CniError {
        CniError::new(
            code::INVALID_ENV,
            format!("{var} is required for {}", self.command),
        )
    }
}

fn invalid(var: &str, value: &str, why: &str) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("{var} {value:?} is invalid: {why}"),
    )
}

/// SPEC §2: "Must start with an alphanumeric character, optionally followed by any combination of
/// one or more alphanumeric characters, underscore (_), dot (.) or hyphen (-)." The same rule applies
/// to network names (SPEC §1).
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    if is_identifier(id) {
        return Ok(());
    }
    Err(invalid(
        "CNI_CONTAINERID",
        id,
        "must match [A-Za-z0-9][A-Za-z0-9_.-]*",
    ))
}

/// SPEC 0.4.0 "Parameters" (dropped from the 1.x text, still enforced by libcni): must not be empty,
/// "." or "..", must fit IFNAMSIZ (16 including NUL), no "/", ":" or whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let why = if name.len() > 15 {
        "longer than 15 bytes"
    } else if name == "." || name == ".." {
        "must not be \".\" or \"..\""
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        "must not contain '/', ':' or whitespace"
    } else {
        return Ok(());
    };
    Err(invalid("CNI_IFNAME", name, why))
}

/// CNI_ARGS is "K=V;K2=V2". Empty segments (a trailing ';') are tolerated; a value may contain '='.
fn parse_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(invalid(
                "CNI_ARGS",
                s,
                &format!("pair {pair:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        Env::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee.1_a-b"),
        ("CNI_NETNS", "/run/netns/pod1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web-0;X=a=b;"),
    ];

    fn with(overrides: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = ADD
            .iter()
            .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend_from_slice(overrides);
        v
    }

    fn assert_invalid(vars: &[(&str, &str)], var: &str, value: &str) {
        let e = env(vars).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV, "{e}");
        assert!(e.msg.contains(var), "{e} should name {var}");
        assert!(
            e.msg.contains(&format!("{value:?}")),
            "{e} should name {value:?}"
        );
    }

    #[test]
    fn add_env() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id().unwrap(), "c0ffee.1_a-b");
        assert_eq!(e.netns().unwrap(), Path::new("/run/netns/pod1"));
        assert_eq!(e.ifname().unwrap(), "eth0");
        assert_eq!(
            e.path,
            [PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        assert_eq!(e.arg("IgnoreUnknown"), Some("1"));
        assert_eq!(e.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(e.arg("X"), Some("a=b"));
        assert_eq!(e.arg("k8s_pod_name"), None);
        assert_eq!(e.args.len(), 3);
    }

    #[test]
    fn bad_command() {
        assert_invalid(&with(&[("CNI_COMMAND", "ADDD")]), "CNI_COMMAND", "ADDD");
        let e = env(&[]).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (code::INVALID_ENV, "CNI_COMMAND is required")
        );
    }

    #[test]
    fn bad_container_id() {
        for id in ["-abc", "_abc", ".abc", "a b", "a/b", "ü"] {
            assert_invalid(&with(&[("CNI_CONTAINERID", id)]), "CNI_CONTAINERID", id);
        }
    }

    #[test]
    fn bad_ifname() {
        for name in [
            "eth0123456789012",
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "eth\t0",
        ] {
            assert_invalid(&with(&[("CNI_IFNAME", name)]), "CNI_IFNAME", name);
        }
        assert!(
            env(&with(&[("CNI_IFNAME", "eth012345678901")])).is_ok(),
            "15 bytes is allowed"
        );
    }

    #[test]
    fn bad_args() {
        assert_invalid(&with(&[("CNI_ARGS", "A=1;B")]), "CNI_ARGS", "A=1;B");
        assert_invalid(&with(&[("CNI_ARGS", "=1")]), "CNI_ARGS", "=1");
    }

    #[test]
    fn required_per_command() {
        let drop = |cmd: &'static str, var: &str| -> Vec<(&str, &str)> {
            with(&[("CNI_COMMAND", cmd)])
                .into_iter()
                .filter(|(k, _)| *k != var)
                .collect()
        };
        for cmd in ["ADD", "CHECK"] {
            for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
                let e = env(&drop(cmd, var)).unwrap_err();
                assert_eq!(e.code, code::INVALID_ENV);
                assert_eq!(e.msg, format!("{var} is required for {cmd}"));
            }
        }
        let del = env(&drop("DEL", "CNI_NETNS")).unwrap();
        assert!(del.netns.is_none());
        assert_eq!(
            del.netns().unwrap_err().msg,
            "CNI_NETNS is required for DEL"
        );
        assert_eq!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_NETNS", ""),
                ("CNI_IFNAME", "eth0")
            ])
            .unwrap()
            .netns,
            None
        );
        assert_eq!(
            env(&drop("DEL", "CNI_IFNAME")).unwrap_err().msg,
            "CNI_IFNAME is required for DEL"
        );
        for cmd in ["VERSION", "STATUS", "GC"] {
            let e = env(&[("CNI_COMMAND", cmd), ("CNI_IFNAME", "not/used")]).unwrap();
            assert_eq!((e.container_id, e.ifname), (None, None));
        }
    }
}
