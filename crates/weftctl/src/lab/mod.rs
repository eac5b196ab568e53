//! `weftctl lab`: a Weft cluster made of network namespaces on this machine, for demos, tests and
//! benchmarks. Only namespaces the lab creates are configured; the root namespace is never touched.
//!
//! Today a lab is one node (a namespace where the real `weft` plugin runs, as a kubelet would run
//! it) and its pods (namespaces wired by that plugin), each pod running a responder that answers
//! with its name. The lab writes the node's subnet.env itself, as the agent will once it exists;
//! multi-node labs come with the agent.

mod responder;
mod state;

use clap::{Args, Subcommand};
use serde_json::json;
use state::{LabState, PodState};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use weft_cni::exec::{ConfList, Invoker, RuntimeConf};
use weft_net::{NamedNetns, Netns};

#[derive(Args)]
pub struct LabArgs {
    /// Lab name: several labs can run side by side (lowercase letters and digits, ≤ 12).
    #[arg(long, default_value = "weft", global = true)]
    name: String,
    /// Where labs keep their state (per-node IPAM and run directories, the CNI conf).
    #[arg(long, default_value = "/run/weft-lab", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab: a node and its pods, wired by the real weft CNI plugin.
    Up {
        /// Pods to create.
        #[arg(long, default_value_t = 3)]
        pods: u32,
        /// How pods are wired: bridge or routed.
        #[arg(long, default_value = "bridge")]
        mode: String,
        /// The node's pod subnet.
        #[arg(long, default_value = "10.244.1.0/24")]
        subnet: ipnet::Ipv4Net,
        /// Where the `weft` plugin binary is (default: beside weftctl, then /opt/cni/bin).
        #[arg(long)]
        cni_bin_dir: Option<PathBuf>,
    },
    /// Remove everything the lab made.
    Down,
    /// Nodes and pods of the lab.
    Status,
    /// A pod × pod (and pod → node) connectivity matrix over real TCP; non-zero exit on a failure.
    Check,
    /// Add or remove a pod.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Run a command inside a pod's (or the node's) network namespace.
    Exec {
        pod: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// (internal) The pods' responder.
    #[command(hide = true)]
    Responder {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        pod: String,
        #[arg(long, value_delimiter = ',', default_value = "80,81")]
        ports: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    Add { pod: String },
    Del { pod: String },
}

const NETNS_PREFIX: &str = "weftlab-";
/// The node's own address, on its loopback: what pods reach the node at in both modes.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

pub fn run(args: LabArgs) -> i32 {
    if let LabCommand::Responder { netns, pod, ports } = &args.command {
        return responder::serve(netns, pod, ports);
    }
    if !valid_name(&args.name, 12) {
        eprintln!(
            "--name: {:?} must be 1-12 lowercase letters or digits",
            args.name
        );
        return 2;
    }
    let lab = Lab {
        dir: args.state_dir.join(&args.name),
        name: args.name.clone(),
    };
    let outcome = match args.command {
        LabCommand::Up {
            pods,
            mode,
            subnet,
            cni_bin_dir,
        } => lab.up(pods, &mode, subnet, cni_bin_dir),
        LabCommand::Down => lab.down(),
        LabCommand::Status => lab.status(),
        LabCommand::Check => lab.check(),
        LabCommand::Pod(PodCommand::Add { pod }) => lab.load().and_then(|mut s| {
            let r = lab.add_pod(&mut s, &pod);
            lab.save(&s)?;
            r
        }),
        LabCommand::Pod(PodCommand::Del { pod }) => lab.load().and_then(|mut s| {
            let r = lab.del_pod(&mut s, &pod);
            lab.save(&s)?;
            r
        }),
        LabCommand::Exec { pod, command } => lab.exec(&pod, &command),
        LabCommand::Responder { .. } => unreachable!("handled above"),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl lab: {e}");
            1
        }
    }
}

type Result<T> = std::result::Result<T, String>;

struct Lab {
    name: String,
    dir: PathBuf,
}

fn progress(step: usize, total: usize, what: &str) {
    eprintln!("[{step}/{total}] {what}");
}

impl Lab {
    fn netns_name(&self, kind: &str, name: &str) -> String {
        format!("{NETNS_PREFIX}{}-{kind}-{name}", self.name)
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn load(&self) -> Result<LabState> {
        LabState::load(&self.state_file()).map_err(|e| {
            format!(
                "lab {:?} is not up ({e}); start it with `weftctl lab up`",
                self.name
            )
        })
    }

    fn save(&self, s: &LabState) -> Result<i32> {
        s.save(&self.state_file())
            .map(|()| 0)
            .map_err(|e| format!("saving {}: {e}", self.state_file().display()))
    }

    fn invoker(&self, s: &LabState) -> Invoker {
        Invoker {
            plugin_dirs: vec![s.cni_bin_dir.clone()],
            host_netns: Some(NamedNetns::path(&s.node.netns)),
            env: Vec::new(),
        }
    }

    fn conflist(&self, s: &LabState) -> Result<ConfList> {
        let text = std::fs::read(&s.conflist)
            .map_err(|e| format!("reading {}: {e}", s.conflist.display()))?;
        ConfList::parse(&text).map_err(|e| e.to_string())
    }

    fn up(
        &self,
        pods: u32,
        mode: &str,
        subnet: ipnet::Ipv4Net,
        cni_bin_dir: Option<PathBuf>,
    ) -> Result<i32> {
        if self.state_file().exists() {
            return Err(format!(
                "lab {:?} is already up (weftctl lab status; weftctl lab down)",
                self.name
            ));
        }
        if mode != "bridge" && mode != "routed" {
            return Err(format!("--mode: {mode:?} is not one of bridge, routed"));
        }
        if !(1..=200).contains(&pods) {
            return Err(format!("--pods: {pods} is not in 1..200"));
        }
        let cni_bin_dir = find_plugin_dir(cni_bin_dir)?;
        let total = pods as usize + 1;
        progress(1, total, "node node1");
        let node_dir = self.dir.join("node1");
        let node = state::NodeState {
            name: "node1".into(),
            netns: self.netns_name("n", "node1"),
            ip: NODE_IP,
            subnet,
            mode: mode.into(),
            responder_pid: None,
        };
        let conflist = node_dir.join("weft.conflist");
        let mut s = LabState {
            node,
            pods: Vec::new(),
            cni_bin_dir,
            conflist: conflist.clone(),
        };
        let built = (|| -> Result<()> {
            std::fs::create_dir_all(node_dir.join("run")).map_err(|e| e.to_string())?;
            // What the agent will write once it exists (see the plugin's subnet_env module).
            std::fs::write(
                node_dir.join("run/subnet.env"),
                format!(
                    "WEFT_SUBNET={subnet}\nWEFT_MTU=1500\nWEFT_MODE={mode}\nWEFT_NETWORK_NAME=weft\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let conf = json!({
                "cniVersion": "1.1.0",
                "name": "weft",
                "plugins": [{
                    "type": "weft",
                    "dataDir": node_dir.join("ipam"),
                    "runDir": node_dir.join("run"),
                }]
            });
            std::fs::write(&conflist, serde_json::to_vec_pretty(&conf).unwrap())
                .map_err(|e| e.to_string())?;
            let ns = make_netns(&s.node.netns)?;
            run_ip(
                &s.node.netns,
                &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
            )?;
            s.node.responder_pid = Some(spawn_responder(ns.path(), &s.node.name)?);
            self.save(&s)?;
            for i in 1..=pods {
                let name = format!("pod{i}");
                self.add_pod(&mut s, &name)?;
                let ip = s.pods.last().map(|p| p.ip.to_string()).unwrap_or_default();
                progress(i as usize + 1, total, &format!("pod {name}: {ip}"));
                self.save(&s)?;
            }
            Ok(())
        })();
        if let Err(e) = built {
            let _ = self.save(&s);
            eprintln!("weftctl lab: up failed, removing what was made");
            let _ = self.down();
            return Err(e);
        }
        eprintln!(
            "lab {:?} is up: `weftctl lab status`, `weftctl lab check`, `weftctl lab down`",
            self.name
        );
        Ok(0)
    }

    fn add_pod(&self, s: &mut LabState, name: &str) -> Result<i32> {
        if !valid_name(name, 20) {
            return Err(format!(
                "pod name {name:?} must be 1-20 lowercase letters or digits"
            ));
        }
        if s.pods.iter().any(|p| p.name == name) {
            return Err(format!("pod {name} exists already"));
        }
        let netns = self.netns_name("p", name);
        let ns = make_netns(&netns)?;
        let rt = RuntimeConf {
            container_id: format!("lab-{}-{name}", self.name),
            netns: ns.path().to_path_buf(),
            ifname: "eth0".into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), name.into()),
            ],
            ..Default::default()
        };
        let result = match self.invoker(s).add_list(&self.conflist(s)?, &rt) {
            Ok(r) => r,
            Err(e) => {
                let _ = NamedNetns::delete(&netns);
                return Err(format!("CNI ADD for pod {name}: {e}"));
            }
        };
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next()?.parse().ok())
            .ok_or_else(|| format!("CNI ADD for pod {name}: no address in {result}"))?;
        let pid = spawn_responder(ns.path(), name)?;
        s.pods.push(PodState {
            name: name.into(),
            node: s.node.name.clone(),
            netns,
            ip,
            container_id: rt.container_id,
            responder_pid: Some(pid),
            result,
        });
        Ok(0)
    }

    fn del_pod(&self, s: &mut LabState, name: &str) -> Result<i32> {
        let i = s
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| format!("no pod {name} in lab {:?}", self.name))?;
        let pod = s.pods.remove(i);
        stop(pod.responder_pid);
        let rt = RuntimeConf {
            container_id: pod.container_id.clone(),
            netns: NamedNetns::path(&pod.netns),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let del = self.conflist(s).and_then(|l| {
            self.invoker(s)
                .del_list(&l, &rt, Some(&pod.result))
                .map_err(|e| e.to_string())
        });
        let _ = NamedNetns::delete(&pod.netns);
        del.map(|()| 0)
            .map_err(|e| format!("CNI DEL for pod {name}: {e}"))
    }

    fn down(&self) -> Result<i32> {
        let mut errors = Vec::new();
        if let Ok(mut s) = self.load() {
            for name in s.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>() {
                if let Err(e) = self.del_pod(&mut s, &name) {
                    errors.push(e);
                }
            }
            stop(s.node.responder_pid);
        }
        // Whatever is left of this lab (a crashed `up`, a lost state file).
        for ns in NamedNetns::list(&format!("{NETNS_PREFIX}{}-", self.name)) {
            let _ = NamedNetns::delete(&ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if errors.is_empty() {
            eprintln!("lab {:?} is down", self.name);
            Ok(0)
        } else {
            Err(errors.join("; "))
        }
    }

    fn status(&self) -> Result<i32> {
        let s = self.load()?;
        println!("lab {}", self.name);
        println!("NODE     NODE-IP        SUBNET           MODE     RESPONDER-PID");
        println!(
            "{:<8} {:<14} {:<16} {:<8} {}",
            s.node.name,
            s.node.ip.to_string(),
            s.node.subnet.to_string(),
            s.node.mode,
            pid_text(s.node.responder_pid)
        );
        println!();
        println!("POD      NODE     IP             RESPONDER-PID");
        for p in &s.pods {
            println!(
                "{:<8} {:<8} {:<14} {}",
                p.name,
                p.node,
                p.ip.to_string(),
                pid_text(p.responder_pid)
            );
        }
        Ok(0)
    }

    fn check(&self) -> Result<i32> {
        let s = self.load()?;
        let mut targets: Vec<(String, Ipv4Addr)> =
            s.pods.iter().map(|p| (p.name.clone(), p.ip)).collect();
        targets.push((s.node.name.clone(), s.node.ip));
        let width = targets.iter().map(|t| t.0.len()).max().unwrap_or(4).max(6) + 2;
        print!("{:<width$}", "from\\to");
        for (t, _) in &targets {
            print!("{t:>width$}");
        }
        println!();
        let mut failures = 0;
        for p in &s.pods {
            let ns = Netns::open(NamedNetns::path(&p.netns)).map_err(|e| e.to_string())?;
            print!("{:<width$}", p.name);
            for (t, ip) in &targets {
                if *t == p.name {
                    print!("{:>width$}", "-");
                    continue;
                }
                let cell = match probe(&ns, SocketAddr::from((*ip, 80))) {
                    Ok(answer) if answer == *t => "ok".to_string(),
                    Ok(answer) => {
                        failures += 1;
                        format!("WRONG:{answer}")
                    }
                    Err(e) => {
                        failures += 1;
                        eprintln!("{} -> {t} ({ip}:80): {e}", p.name);
                        "FAIL".to_string()
                    }
                };
                print!("{cell:>width$}");
            }
            println!();
        }
        let total = s.pods.len() * targets.len() - s.pods.len();
        println!("{} passed, {failures} failed", total - failures);
        Ok(if failures == 0 { 0 } else { 1 })
    }

    fn exec(&self, target: &str, command: &[String]) -> Result<i32> {
        let s = self.load()?;
        let netns = if target == s.node.name {
            s.node.netns.clone()
        } else {
            s.pods
                .iter()
                .find(|p| p.name == target)
                .map(|p| p.netns.clone())
                .ok_or_else(|| format!("no pod or node {target} in lab {:?}", self.name))?
        };
        let file = std::fs::File::open(NamedNetns::path(&netns))
            .map_err(|e| format!("opening {netns}: {e}"))?;
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..]);
        // SAFETY: setns(2) only, in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let status = cmd
            .status()
            .map_err(|e| format!("running {}: {e}", command[0]))?;
        Ok(status.code().unwrap_or(1))
    }
}

/// Connects from inside `ns` and reads the responder's answer (bounded by timeouts).
fn probe(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .map_err(std::io::Error::other)??;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut s = String::new();
    stream.read_to_string(&mut s)?;
    Ok(s.trim().to_string())
}

fn make_netns(name: &str) -> Result<Netns> {
    let ns = NamedNetns::create(name).map_err(|e| e.to_string())?;
    run_ip(name, &["link", "set", "lo", "up"])?;
    Ok(ns)
}

fn run_ip(netns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(netns)
        .args(args)
        .output()
        .map_err(|e| format!("running ip (is iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip -n {netns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn spawn_responder(netns: &Path, pod: &str) -> Result<u32> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["lab", "responder", "--netns"])
        .arg(netns)
        .args(["--pod", pod])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the responder of {pod}: {e}"))?;
    Ok(child.id())
}

fn stop(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

fn pid_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) if Path::new("/proc").join(p.to_string()).exists() => p.to_string(),
        Some(p) => format!("{p} (gone)"),
        None => "-".into(),
    }
}

/// The directory holding the `weft` plugin: the given one, else beside this binary, else the
/// usual CNI directories.
fn find_plugin_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let candidates: Vec<PathBuf> = match given {
        Some(d) => vec![d],
        None => beside
            .into_iter()
            .chain([PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")])
            .collect(),
    };
    candidates
        .iter()
        .find(|d| d.join("weft").is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no weft plugin binary in {} (build it: cargo build --release)",
                candidates
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
