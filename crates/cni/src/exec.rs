//! The runtime side: executing plugins and network configuration lists the way a container
//! runtime does (SPEC §2 "Execution Protocol", §3 "Execution of Network Configurations").

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{self, Child, Stdio};
use std::thread;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use serde_json::{json, Map, Value};

use crate::conf::{required_str, validate_name, validate_type, Attachment, VALID_ATTACHMENTS};
use crate::env::Command;
use crate::error::{code, CniError};
use crate::version::{at_least, check_supported, highest_supported};

#[derive(Debug, Clone, Default)]
pub struct Invoker {
    pub plugin_dirs: Vec<PathBuf>,
    /// If set, plugins run in this network namespace instead of the caller's: SPEC §2 requires
    /// plugins to run in the runtime's networking domain, which for tests is a throwaway netns.
    pub host_netns: Option<PathBuf>,
    /// Extra variables for the plugin's environment, beyond CNI_* and PATH (e.g. a log level).
    pub env: Vec<(String, String)>,
}

/// Per-attachment parameters (SPEC §3 "Attachment Parameters").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeConf {
    pub container_id: String,
    /// May be empty for DEL when the namespace is gone; CNI_NETNS is then not set.
    pub netns: PathBuf,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    /// Capability arguments such as "portMappings" or "ips", passed only to plugins that
    /// declare the capability.
    pub capability_args: Map<String, Value>,
}

/// A network configuration (SPEC §1), normally a .conflist.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    /// The version selected for execution: the highest supported of `cniVersion` and `cniVersions`.
    pub cni_version: String,
    pub name: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<Value>,
}

impl ConfList {
    /// Parses a .conflist, or a single plugin .conf (an object with "type"), which becomes a list
    /// of one plugin.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let value = crate::conf::parse_object(bytes)?;
        let obj = value.as_object().expect("parse_object checked");
        let invalid = |msg: String| CniError::new(code::INVALID_CONFIG, msg);

        let plugins = match obj.get("plugins") {
            Some(Value::Array(plugins)) => plugins.clone(),
            Some(other) => {
                return Err(invalid(format!(
                    "field \"plugins\" must be an array, got {other}"
                )))
            }
            None if obj.contains_key("type") => vec![value.clone()],
            None => {
                return Err(invalid(
                    "expected \"plugins\" (a .conflist) or \"type\" (a single .conf)".into(),
                ))
            }
        };
        if plugins.is_empty() {
            return Err(invalid("field \"plugins\" is empty".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            let p = p
                .as_object()
                .ok_or_else(|| invalid(format!("plugins[{i}] must be an object")))?;
            let t =
                required_str(p, "type").map_err(|e| invalid(format!("plugins[{i}]: {}", e.msg)))?;
            validate_type(&format!("plugins[{i}].type"), t)?;
        }

        let name = required_str(obj, "name")?;
        validate_name(name)?;
        let declared = required_str(obj, "cniVersion")?;
        let mut versions = vec![declared];
        match obj.get("cniVersions") {
            None => {}
            Some(Value::Array(vs)) if vs.iter().all(Value::is_string) => {
                versions.extend(vs.iter().filter_map(Value::as_str))
            }
            Some(other) => {
                return Err(invalid(format!(
                    "field \"cniVersions\" must be a list of strings, got {other}"
                )))
            }
        }
        let Some(cni_version) = highest_supported(versions) else {
            return Err(check_supported(declared).unwrap_err());
        };

        let flag = |key: &str| match obj.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid(format!(
                "field {key:?} must be a boolean, got {other}"
            ))),
        };
        Ok(ConfList {
            cni_version: cni_version.to_string(),
            name: name.to_string(),
            disable_check: flag("disableCheck")?,
            disable_gc: flag("disableGC")?,
            plugins,
        })
    }
}

/// The configuration one plugin receives on stdin (SPEC §3 "Deriving request configuration from
/// plugin configuration"): the plugin object with `cniVersion` and `name` from the list,
/// `runtimeConfig` holding only the capability arguments the plugin declared, and `prevResult`.
/// `capabilities` and `cni.dev/*` keys are removed; `runtimeConfig` and `prevResult` are the
/// runtime's to generate, so configured ones are dropped.
pub(crate) fn plugin_request(
    list: &ConfList,
    plugin: &Value,
    rt: Option<&RuntimeConf>,
    prev_result: Option<&Value>,
) -> Value {
    let mut conf = plugin.as_object().cloned().unwrap_or_default();
    let capabilities = conf.remove("capabilities");
    conf.retain(|k, _| !k.starts_with("cni.dev/") && k != "runtimeConfig" && k != "prevResult");
    conf.insert("cniVersion".into(), list.cni_version.as_str().into());
    conf.insert("name".into(), list.name.as_str().into());

    if let Some(rt) = rt {
        let declared =
            |k: &str| capabilities.as_ref().and_then(|c| c.get(k)) == Some(&Value::Bool(true));
        let runtime_config: Map<String, Value> = rt
            .capability_args
            .iter()
            .filter(|(k, _)| declared(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime_config.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    Value::Object(conf)
}

fn plugin_type(plugin: &Value) -> Result<&str, CniError> {
    plugin.get("type").and_then(Value::as_str).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("plugin configuration has no \"type\": {plugin}"),
        )
    })
}

/// The first error, with any later ones appended to its details.
fn first_error(mut errors: Vec<CniError>) -> Result<(), CniError> {
    if errors.is_empty() {
        return Ok(());
    }
    let mut first = errors.remove(0);
    if !errors.is_empty() {
        let rest: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let also = format!("also: {}", rest.join("; "));
        first.details = if first.details.is_empty() {
            also
        } else {
            format!("{}; {also}", first.details)
        };
    }
    Err(first)
}

impl Invoker {
    /// The first executable regular file named `plugin_type` in `plugin_dirs`.
    pub fn find(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        validate_type("type", plugin_type)?;
        let executable = |p: &Path| {
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        self.plugin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| executable(p))
            .ok_or_else(|| {
                CniError::new(
                    code::IO,
                    format!("plugin {plugin_type:?} not found in {}", self.cni_path()),
                )
            })
    }

    /// Runs one plugin with `stdin` as its configuration. Only the CNI_* variables and PATH are
    /// passed. Returns the parsed stdout, `None` if it was empty; a failed plugin's CNI error
    /// is returned as is.
    pub fn exec(
        &self,
        plugin_type: &str,
        command: &str,
        rt: Option<&RuntimeConf>,
        stdin: &Value,
    ) -> Result<Option<Value>, CniError> {
        let path = self.find(plugin_type)?;
        let mut cmd = process::Command::new(&path);
        cmd.env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = std::env::var_os("PATH") {
            cmd.env("PATH", p);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", self.cni_path());
        if let Some(rt) = rt {
            cmd.env("CNI_CONTAINERID", &rt.container_id)
                .env("CNI_IFNAME", &rt.ifname);
            if !rt.netns.as_os_str().is_empty() {
                cmd.env("CNI_NETNS", &rt.netns);
            }
            if !rt.args.is_empty() {
                let args: Vec<String> = rt.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                cmd.env("CNI_ARGS", args.join(";"));
            }
        }
        if let Some(ns) = &self.host_netns {
            // Opened here because the child may only make async-signal-safe calls before exec.
            let ns_file = File::open(ns).map_err(|e| {
                CniError::new(
                    code::IO,
                    format!("opening network namespace {}: {e}", ns.display()),
                )
            })?;
            // SAFETY: runs in the forked child before exec; setns(2) is a plain syscall and
            // allocates nothing. The fd is O_CLOEXEC, so the plugin does not inherit it.
            unsafe {
                cmd.pre_exec(move || {
                    setns(&ns_file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
                });
            }
        }

        let mut child = spawn(&mut cmd, &path)?;
        let input = serde_json::to_vec(stdin).expect("a JSON value always serializes");
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let out = thread::scope(|s| {
            // Written from a thread so a plugin that prints before reading cannot deadlock us.
            // A write error (EPIPE from a plugin that never reads) is reflected in its exit status.
            s.spawn(move || drop(pipe.write_all(&input)));
            child.wait_with_output()
        })
        .map_err(|e| {
            CniError::new(
                code::IO,
                format!("waiting for plugin {}: {e}", path.display()),
            )
        })?;

        let stdout = String::from_utf8_lossy(&out.stdout);
        let stdout = stdout.trim();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            // SPEC §5 "Error": the error result is printed on stdout; tolerate plugins using stderr.
            let cni_error = [stdout, stderr].iter().find_map(|s| {
                serde_json::from_str::<Value>(s)
                    .ok()
                    .as_ref()
                    .and_then(CniError::from_json)
            });
            return Err(cni_error.unwrap_or_else(|| {
                CniError::new(
                    code::INTERNAL,
                    format!("plugin {plugin_type:?} {command} failed ({})", out.status),
                )
                .with_details(if stderr.is_empty() { stdout } else { stderr })
            }));
        }
        if stdout.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(stdout).map(Some).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("plugin {plugin_type:?} {command} printed invalid JSON: {e}"),
            )
        })
    }

    /// SPEC §3 "Adding an attachment": plugins run in order, each given the previous result;
    /// the first error stops the chain. Returns the final plugin's result.
    pub fn add_list(&self, list: &ConfList, rt: &RuntimeConf) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let t = plugin_type(plugin)?;
            let result = self.run(list, plugin, Command::Add, Some(rt), prev.as_ref())?;
            prev = Some(result.ok_or_else(|| {
                CniError::new(code::DECODE, format!("plugin {t:?} ADD printed no result"))
            })?);
        }
        prev.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("network {:?} has no plugins", list.name),
            )
        })
    }

    /// SPEC §3 "Deleting an attachment": plugins run in reverse order, all given the final ADD
    /// result. Unlike the spec's "halt", every plugin runs so that one failure does not leak the
    /// others' resources; the first error is returned.
    pub fn del_list(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        prev_result: Option<&Value>,
    ) -> Result<(), CniError> {
        // prevResult on DEL arrived in spec 0.4.0.
        let prev = prev_result.filter(|_| at_least(&list.cni_version, "0.4.0"));
        let errors = list
            .plugins
            .iter()
            .rev()
            .filter_map(|p| self.run(list, p, Command::Del, Some(rt), prev).err());
        first_error(errors.collect())
    }

    /// SPEC §3 "Checking an attachment". CHECK arrived in spec 0.4.0.
    pub fn check_list(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        prev_result: &Value,
    ) -> Result<(), CniError> {
        if list.disable_check {
            return Ok(());
        }
        if !at_least(&list.cni_version, "0.4.0") {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "CHECK needs cniVersion 0.4.0 or later; network {:?} uses {}",
                    list.name, list.cni_version
                ),
            ));
        }
        for plugin in &list.plugins {
            self.run(list, plugin, Command::Check, Some(rt), Some(prev_result))?;
        }
        Ok(())
    }

    /// SPEC §3 "Garbage-collecting a network": every plugin runs; errors are collected. GC arrived
    /// in spec 1.1.0, so older networks are left alone.
    pub fn gc_list(&self, list: &ConfList, valid: &[Attachment]) -> Result<(), CniError> {
        if list.disable_gc || !at_least(&list.cni_version, "1.1.0") {
            return Ok(());
        }
        let errors = list.plugins.iter().filter_map(|plugin| {
            let mut conf = plugin_request(list, plugin, None, None);
            conf[VALID_ATTACHMENTS] = json!(valid);
            plugin_type(plugin)
                .and_then(|t| self.exec(t, Command::Gc.as_str(), None, &conf))
                .err()
        });
        first_error(errors.collect())
    }

    /// SPEC §2 "STATUS": the network is ready when every plugin is. STATUS arrived in spec 1.1.0.
    pub fn status_list(&self, list: &ConfList) -> Result<(), CniError> {
        if !at_least(&list.cni_version, "1.1.0") {
            return Ok(());
        }
        for plugin in &list.plugins {
            self.run(list, plugin, Command::Status, None, None)?;
        }
        Ok(())
    }

    fn run(
        &self,
        list: &ConfList,
        plugin: &Value,
        command: Command,
        rt: Option<&RuntimeConf>,
        prev_result: Option<&Value>,
    ) -> Result<Option<Value>, CniError> {
        let conf = plugin_request(list, plugin, rt, prev_result);
        self.exec(plugin_type(plugin)?, command.as_str(), rt, &conf)
    }

    fn cni_path(&self) -> String {
        let dirs: Vec<_> = self
            .plugin_dirs
            .iter()
            .map(|d| d.to_string_lossy())
            .collect();
        dirs.join(":")
    }
}

fn spawn(cmd: &mut process::Command, path: &Path) -> Result<Child, CniError> {
    let mut attempt = 0;
    loop {
        match cmd.spawn() {
            // ETXTBSY: the binary is still open for writing somewhere, e.g. an install in
            // progress or a sibling fork that inherited the writer's fd; it clears quickly.
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempt < 5 => {
                attempt += 1;
                thread::sleep(Duration::from_millis(20 << attempt));
            }
            r => {
                return r.map_err(|e| {
                    CniError::new(code::IO, format!("executing {}: {e}", path.display()))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: Value) -> ConfList {
        ConfList::parse(v.to_string().as_bytes()).unwrap()
    }

    fn rt() -> RuntimeConf {
        RuntimeConf {
            container_id: "pod1".into(),
            netns: "/run/netns/pod1".into(),
            ifname: "eth0".into(),
            args: vec![
                ("K8S_POD_NAME".into(), "web-0".into()),
                ("IgnoreUnknown".into(), "1".into()),
            ],
            capability_args: json!({
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
                "ips": ["10.244.1.9/24"],
                "bandwidth": {"ingressRate": 1000}
            })
            .as_object()
            .cloned()
            .unwrap(),
        }
    }

    #[test]
    fn parse_conflist() {
        let l = list(json!({
            "cniVersion": "1.0.0",
            "cniVersions": ["0.4.0", "1.1.0", "2.0.0"],
            "name": "weft",
            "disableCheck": true,
            "plugins": [{"type": "weft"}, {"type": "portmap", "capabilities": {"portMappings": true}}]
        }));
        assert_eq!(
            l.cni_version, "1.1.0",
            "highest supported of cniVersion and cniVersions"
        );
        assert_eq!(l.name, "weft");
        assert!(l.disable_check && !l.disable_gc);
        assert_eq!(l.plugins.len(), 2);
    }

    #[test]
    fn parse_single_conf() {
        let conf = json!({"cniVersion": "0.3.1", "name": "weft", "type": "weft", "mtu": 1450});
        let l = list(conf.clone());
        assert_eq!((l.cni_version.as_str(), l.name.as_str()), ("0.3.1", "weft"));
        assert_eq!(l.plugins, [conf]);
    }

    #[test]
    fn parse_conflist_errors() {
        let cases = [
            (
                json!({"cniVersion": "1.1.0", "name": "n"}),
                code::INVALID_CONFIG,
                "expected \"plugins\"",
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "n", "plugins": []}),
                code::INVALID_CONFIG,
                "field \"plugins\" is empty",
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "a"}, {}]}),
                code::INVALID_CONFIG,
                "plugins[1]: missing required field \"type\"",
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "a/b"}]}),
                code::INVALID_CONFIG,
                "plugins[0].type \"a/b\" is invalid",
            ),
            (
                json!({"cniVersion": "1.1.0", "plugins": [{"type": "a"}]}),
                code::INVALID_CONFIG,
                "missing required field \"name\"",
            ),
            (
                json!({"cniVersion": "0.2.0", "name": "n", "type": "a"}),
                code::INCOMPATIBLE_VERSION,
                "cniVersion \"0.2.0\" is not supported",
            ),
            (
                json!({"cniVersion": "1.1.0", "name": "n", "type": "a", "disableGC": "yes"}),
                code::INVALID_CONFIG,
                "field \"disableGC\" must be a boolean",
            ),
        ];
        for (v, code, msg) in cases {
            let e = ConfList::parse(v.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.code, code, "{v}: {e}");
            assert!(e.msg.starts_with(msg), "{v}: {e}");
        }
        assert_eq!(ConfList::parse(b"{").unwrap_err().code, code::DECODE);
    }

    #[test]
    fn request_filters_runtime_config_by_capability() {
        let l = list(json!({"cniVersion": "1.1.0", "name": "weft", "plugins": [
            {"type": "weft", "mtu": 1450},
            {
                "type": "portmap",
                "cniVersion": "0.3.1",
                "capabilities": {"portMappings": true, "ips": false, "mac": true},
                "snat": true,
                "runtimeConfig": {"stale": 1},
                "cni.dev/internal": 1
            }
        ]}));
        let prev = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.244.1.9/24"}]});

        assert_eq!(
            plugin_request(&l, &l.plugins[0], Some(&rt()), None),
            json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft", "mtu": 1450})
        );
        assert_eq!(
            plugin_request(&l, &l.plugins[1], Some(&rt()), Some(&prev)),
            json!({
                "cniVersion": "1.1.0",
                "name": "weft",
                "type": "portmap",
                "snat": true,
                "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
                "prevResult": prev
            })
        );
        assert_eq!(
            plugin_request(&l, &l.plugins[1], None, None).get("runtimeConfig"),
            None
        );
    }

    #[test]
    fn errors_after_the_first_go_into_details() {
        assert_eq!(first_error(vec![]), Ok(()));
        let e = first_error(vec![
            CniError::new(code::KERNEL, "a").with_details("d"),
            CniError::new(code::IO, "b"),
            CniError::new(code::IO, "c"),
        ])
        .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (code::KERNEL, "a", "d; also: b; c")
        );
    }

    /// A plugin directory of shell scripts, removed on drop.
    struct Plugins(PathBuf);

    impl Plugins {
        fn new(test: &str) -> Plugins {
            let dir = std::env::temp_dir().join(format!("weft-cni-{test}-{}", process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Plugins(dir)
        }

        fn add(&self, name: &str, body: &str) -> &Self {
            let path = self.0.join(name);
            fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            self
        }

        fn invoker(&self) -> Invoker {
            Invoker {
                plugin_dirs: vec![self.0.join("missing"), self.0.clone()],
                host_netns: None,
                env: vec![("WEFT_TEST_EXTRA".into(), "passed".into())],
            }
        }

        fn log(&self) -> String {
            fs::read_to_string(self.0.join("log")).unwrap_or_default()
        }
    }

    impl Drop for Plugins {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Appends "<type> <command>" to the shared log, then runs `then`.
    fn logging(then: &str) -> String {
        format!("cat >/dev/null\necho \"$(basename \"$0\") $CNI_COMMAND\" >> \"$(dirname \"$0\")/log\"\n{then}")
    }

    #[test]
    fn exec_passes_spec_environment_and_stdin() {
        let p = Plugins::new("env");
        p.add(
            "echo",
            r#"input=$(cat)
printf '{"command":"%s","id":"%s","netns":"%s","ifname":"%s","args":"%s","path":"%s","home":"%s","extra":"%s","input":%s}' \
  "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" "$CNI_PATH" "${HOME-unset}" "$WEFT_TEST_EXTRA" "$input""#,
        );
        let inv = p.invoker();
        let out = inv
            .exec("echo", "ADD", Some(&rt()), &json!({"cniVersion": "1.1.0"}))
            .unwrap()
            .unwrap();
        assert_eq!(
            out,
            json!({
                "command": "ADD",
                "id": "pod1",
                "netns": "/run/netns/pod1",
                "ifname": "eth0",
                "args": "K8S_POD_NAME=web-0;IgnoreUnknown=1",
                "path": format!("{}/missing:{}", p.0.display(), p.0.display()),
                "home": "unset",
                "extra": "passed",
                "input": {"cniVersion": "1.1.0"}
            })
        );
        let out = inv
            .exec("echo", "VERSION", None, &json!({}))
            .unwrap()
            .unwrap();
        assert_eq!(
            (out["command"].as_str(), out["id"].as_str()),
            (Some("VERSION"), Some(""))
        );
    }

    #[test]
    fn exec_outcomes() {
        let p = Plugins::new("outcomes");
        p.add("quiet", "cat >/dev/null")
            .add("cnierr", r#"printf '{"cniVersion":"1.1.0","code":101,"msg":"address in use","details":"10.0.0.5"}'; exit 1"#)
            .add("crash", "echo boom >&2; exit 3")
            .add("garbage", "echo not json");
        let inv = p.invoker();
        let run = |t| inv.exec(t, "DEL", Some(&rt()), &json!({}));

        assert_eq!(run("quiet"), Ok(None));
        assert_eq!(
            run("cnierr"),
            Err(CniError::new(code::ADDRESS_IN_USE, "address in use").with_details("10.0.0.5"))
        );
        let e = run("crash").unwrap_err();
        assert_eq!((e.code, e.details.as_str()), (code::INTERNAL, "boom"));
        assert!(
            e.msg.contains("\"crash\" DEL failed (exit status: 3)"),
            "{e}"
        );
        assert_eq!(run("garbage").unwrap_err().code, code::DECODE);
        let e = run("absent").unwrap_err();
        assert_eq!(e.code, code::IO);
        assert!(e.msg.starts_with("plugin \"absent\" not found in "), "{e}");
        assert_eq!(run("../quiet").unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn add_list_chains_prev_result() {
        let p = Plugins::new("add");
        // Each plugin returns its request as its "result", exposing what it was given.
        p.add("first", "cat").add("second", "cat");
        let l = list(json!({"cniVersion": "1.1.0", "name": "weft", "plugins": [
            {"type": "first"},
            {"type": "second", "capabilities": {"ips": true}}
        ]}));
        let result = p.invoker().add_list(&l, &rt()).unwrap();
        assert_eq!(result["type"], "second");
        assert_eq!(result["runtimeConfig"], json!({"ips": ["10.244.1.9/24"]}));
        assert_eq!(
            result["prevResult"],
            json!({"cniVersion": "1.1.0", "name": "weft", "type": "first"})
        );
    }

    #[test]
    fn del_list_reverse_order_keeps_going() {
        let p = Plugins::new("del");
        p.add("a", &logging(""))
            .add("b", &logging("exit 1"))
            .add("c", &logging(""));
        let l = list(
            json!({"cniVersion": "1.1.0", "name": "weft", "plugins": [{"type": "a"}, {"type": "b"}, {"type": "c"}]}),
        );
        let e = p
            .invoker()
            .del_list(&l, &rt(), Some(&json!({})))
            .unwrap_err();
        assert!(e.msg.contains("\"b\" DEL failed"), "{e}");
        assert_eq!(p.log(), "c DEL\nb DEL\na DEL\n");
    }

    #[test]
    fn check_gc_status_respect_versions_and_flags() {
        let p = Plugins::new("cgs");
        p.add("a", &logging(""))
            .add("gcdump", r#"cat > "$(dirname "$0")/gc-input""#);
        let inv = p.invoker();
        let net = |v: &str, extra: Value| {
            let mut l = json!({"cniVersion": v, "name": "weft", "plugins": [{"type": "a"}]});
            l.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            list(l)
        };

        inv.check_list(&net("1.1.0", json!({})), &rt(), &json!({}))
            .unwrap();
        inv.check_list(
            &net("1.1.0", json!({"disableCheck": true})),
            &rt(),
            &json!({}),
        )
        .unwrap();
        let e = inv
            .check_list(&net("0.3.1", json!({})), &rt(), &json!({}))
            .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        inv.status_list(&net("1.1.0", json!({}))).unwrap();
        inv.status_list(&net("1.0.0", json!({}))).unwrap();
        inv.gc_list(&net("1.0.0", json!({})), &[]).unwrap();
        inv.gc_list(&net("1.1.0", json!({"disableGC": true})), &[])
            .unwrap();
        assert_eq!(p.log(), "a CHECK\na STATUS\n");

        let gc = list(
            json!({"cniVersion": "1.1.0", "name": "weft", "plugins": [{"type": "gcdump", "capabilities": {"ips": true}}]}),
        );
        let valid = [Attachment {
            container_id: "pod1".into(),
            ifname: "eth0".into(),
        }];
        inv.gc_list(&gc, &valid).unwrap();
        let input: Value =
            serde_json::from_slice(&fs::read(p.0.join("gc-input")).unwrap()).unwrap();
        assert_eq!(
            input,
            json!({"cniVersion": "1.1.0", "name": "weft", "type": "gcdump",
                   "cni.dev/valid-attachments": [{"containerID": "pod1", "ifname": "eth0"}]})
        );
    }
}
