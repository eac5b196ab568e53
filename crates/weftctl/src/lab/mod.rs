//! `weftctl lab`: a Weft cluster made of network namespaces on this machine, for demos, tests and
//! benchmarks. Only namespaces the lab creates are configured; the root namespace is never touched.
//!
//! ```text
//!   outside (203.0.113.1) ── router (etcd) ─┬─ fabric br1: 10.100.0.0/24 ── node1, node3, …
//!                                            └─ fabric br2: 10.101.0.0/24 ── node2, node4, … (--subnets 2)
//! ```
//! The fabric is the switch (L2 only, no addresses); the router is the nodes' gateway, joins the
//! underlay subnets and leads to the outside.
//! Every node namespace runs a real `weftd` (its own run, state and IPAM directories under the lab
//! directory, one shared store) and its pods are namespaces wired by the real `weft` plugin. Each
//! pod and the outside run a responder that answers with their name on TCP and UDP 80 and 81.

mod objects;
mod responder;
mod state;

use clap::{Args, Subcommand};
use serde_json::json;
use state::{LabState, NodeState, PodState};
use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weft_cni::exec::{ConfList, Invoker, RuntimeConf};
use weft_net::{NamedNetns, Netns};

#[derive(Args)]
pub struct LabArgs {
    /// Lab name: several labs can run side by side (lowercase letters and digits, ≤ 12).
    #[arg(long, default_value = "weft", global = true)]
    name: String,
    /// Where labs keep their state (per-node directories, the store, logs).
    #[arg(long, default_value = "/run/weft-lab", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab: fabric, nodes running weftd, and pods wired by the weft CNI plugin.
    Up(UpArgs),
    /// Remove everything the lab made.
    Down,
    /// Nodes (underlay IP, subnet, backend, agent pid) and pods (node, IP).
    Status,
    /// A pod × pod (and pod → outside) connectivity matrix over real TCP; non-zero exit on a failure.
    Check,
    /// Add or remove a pod.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Restart a node's agent, or make the node leave the cluster.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Stop or start the lab's etcd (`--store etcd`), to see the datapath ride out an outage.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Write Service, EndpointSlice, Pod and Namespace manifests (YAML, several documents per
    /// file) to the lab's store. A Pod that is not in the lab yet is created (on spec.nodeName,
    /// or the node with the fewest pods). Services with a selector get EndpointSlices from the
    /// matching pods.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects a manifest names (a Pod's lab pod too).
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// `weftctl services` on a node: services, endpoints, connection counters.
    Services {
        #[arg(default_value = "node1")]
        node: String,
    },
    /// Run a command inside a pod's, node's, `fabric`, `router` or `outside` network namespace.
    Exec {
        target: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// (internal) The responder of pods and the outside.
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

#[derive(Args)]
struct UpArgs {
    /// Nodes to create.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pods: u32,
    /// host-gw, vxlan or directrouting.
    #[arg(long, default_value = "vxlan")]
    backend: String,
    /// sqlite (a file the agents share) or etcd (Debian's etcd-server, run on the router).
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Underlay subnets: 2 puts every other node behind a router (direct routing then has both
    /// kinds of peer).
    #[arg(long, default_value_t = 1)]
    subnets: u8,
    /// How pods are wired: bridge or routed.
    #[arg(long, default_value = "bridge")]
    mode: String,
    /// The cluster's pod CIDR.
    #[arg(long, default_value = weft_agent::config::DEFAULT_CLUSTER_CIDR)]
    cluster_cidr: ipnet::Ipv4Net,
    /// MTU of the underlay (every link of the fabric), e.g. 9000 for jumbo frames; weftd gives
    /// pods this minus the backend's overhead.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Where the weft and weftd binaries are (default: beside weftctl).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PodCommand {
    /// Add pod NAME on NODE.
    Add {
        node: String,
        pod: String,
        /// A label for the pod's Pod object, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    Del {
        pod: String,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    Stop,
    Start,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Stop the node's agent (SIGTERM, or SIGKILL with --kill) and start it again.
    Restart {
        node: String,
        #[arg(long)]
        kill: bool,
    },
    /// Stop the agent and run `weftd --leave`: the subnet is released, peers drop their routes.
    Leave { node: String },
}

const NETNS_PREFIX: &str = "weftlab-";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

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
    // A command that changed Services, EndpointSlices or pods returns once every agent has them.
    let programmed = |r: Result<i32>| {
        let code = r?;
        lab.await_programmed(&lab.load()?)?;
        Ok(code)
    };
    let outcome = match args.command {
        LabCommand::Up(up) => lab.up(up),
        LabCommand::Down => lab.down(),
        LabCommand::Status => lab.status(),
        LabCommand::Check => lab.check(),
        LabCommand::Pod(PodCommand::Add { node, pod, labels }) => programmed(lab.with_state(|s| {
            lab.add_pod(s, &node, &pod, labels.into_iter().collect())?;
            lab.publish_pods(s, &[pod.as_str()], &BTreeMap::new())
        })),
        LabCommand::Pod(PodCommand::Del { pod }) => programmed(lab.with_state(|s| {
            lab.del_pod(s, &pod)?;
            objects::session(s, |db| {
                db.delete(&format!("/registry/pods/default/{pod}"))?;
                objects::sync_endpoints(db).map(drop)
            })
        })),
        LabCommand::Apply { file } => programmed(lab.with_state(|s| lab.apply(s, &file, false))),
        LabCommand::Delete { file } => programmed(lab.with_state(|s| lab.apply(s, &file, true))),
        LabCommand::Services { node } => lab.services(&node),
        LabCommand::Node(NodeCommand::Restart { node, kill }) => {
            lab.with_state(|s| lab.restart_agent(s, &node, kill))
        }
        LabCommand::Node(NodeCommand::Leave { node }) => lab.with_state(|s| lab.leave(s, &node)),
        LabCommand::Store(cmd) => lab.with_state(|s| {
            if s.store != "etcd" {
                return Err(
                    "the lab's store is a SQLite file: there is no server to stop or start".into(),
                );
            }
            match cmd {
                StoreCommand::Stop => {
                    lab.stop_and_wait(s.etcd_pid.take(), nix::sys::signal::Signal::SIGTERM);
                    Ok(())
                }
                StoreCommand::Start if s.etcd_pid.is_some_and(alive) => {
                    Err("etcd is running already".into())
                }
                StoreCommand::Start => {
                    let pid = lab.start_etcd(s.router())?;
                    s.etcd_pid = Some(pid);
                    Ok(())
                }
            }
        }),
        LabCommand::Exec { target, command } => lab.exec(&target, &command),
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

fn progress(what: &str) {
    eprintln!("· {what}");
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

    fn save(&self, s: &LabState) -> Result<()> {
        s.save(&self.state_file())
            .map_err(|e| format!("saving {}: {e}", self.state_file().display()))
    }

    fn with_state(&self, f: impl FnOnce(&mut LabState) -> Result<()>) -> Result<i32> {
        let mut s = self.load()?;
        let r = f(&mut s);
        self.save(&s)?;
        r.map(|()| 0)
    }

    fn up(&self, a: UpArgs) -> Result<i32> {
        if self.state_file().exists() {
            return Err(format!(
                "lab {:?} is already up (weftctl lab status; weftctl lab down)",
                self.name
            ));
        }
        weft_agent::backend::BackendKind::parse(&a.backend)?;
        if a.store != "sqlite" && a.store != "etcd" {
            return Err(format!("--store: {:?} is not one of sqlite, etcd", a.store));
        }
        if a.mode != "bridge" && a.mode != "routed" {
            return Err(format!("--mode: {:?} is not one of bridge, routed", a.mode));
        }
        if !(1..=20).contains(&a.nodes) {
            return Err(format!("--nodes: {} is not in 1..20", a.nodes));
        }
        if a.pods > 50 {
            return Err(format!("--pods: {} is more than 50 per node", a.pods));
        }
        if !(1..=2).contains(&a.subnets) {
            return Err(format!("--subnets: {} is not 1 or 2", a.subnets));
        }
        if !(1280..=9216).contains(&a.mtu) {
            return Err(format!("--mtu: {} is not in 1280..9216", a.mtu));
        }
        let bin_dir = find_bin_dir(a.bin_dir.clone())?;
        if a.store == "etcd" && !Path::new("/usr/bin/etcd").exists() {
            return Err(
                "--store etcd: /usr/bin/etcd is missing (apt-get install etcd-server)".into(),
            );
        }
        let mut s = LabState {
            backend: a.backend.clone(),
            store: a.store.clone(),
            mode: a.mode.clone(),
            subnets: a.subnets,
            cluster_cidr: Some(a.cluster_cidr.to_string()),
            fabric_netns: self.netns_name("x", "fabric"),
            router_netns: self.netns_name("x", "router"),
            outside_netns: self.netns_name("x", "outside"),
            nodes: Vec::new(),
            pods: Vec::new(),
            cni_bin_dir: bin_dir.clone(),
            weftd: bin_dir.join("weftd"),
            store_url: String::new(),
            etcd_pid: None,
            outside_responder_pid: None,
        };
        let built = self.build(&mut s, &a);
        if let Err(e) = built {
            let _ = self.save(&s);
            eprintln!("weftctl lab: up failed ({e}); removing what was made");
            let _ = self.teardown(true);
            return Err(e);
        }
        eprintln!(
            "lab {:?} is up: `weftctl lab status`, `weftctl lab check`, `weftctl lab down`",
            self.name
        );
        Ok(0)
    }

    fn build(&self, s: &mut LabState, a: &UpArgs) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        progress("fabric: underlay bridges, router, outside");
        make_netns(&s.fabric_netns)?;
        make_netns(&s.router_netns)?;
        self.save(s)?;
        let fab = s.fabric_netns.clone();
        let router = s.router_netns.clone();
        let mtu = a.mtu.to_string();
        for k in 1..=a.subnets {
            // The switch, and the router's leg into it (ethK, the subnet's .1).
            let br = format!("br{k}");
            run_ip(&fab, &["link", "add", &br, "mtu", &mtu, "type", "bridge"])?;
            run_ip(&fab, &["link", "set", &br, "up"])?;
            let port = format!("router{k}");
            let leg = format!("eth{k}");
            run_ip(
                &fab,
                &[
                    "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", &leg, "mtu",
                    &mtu, "netns", &router,
                ],
            )?;
            run_ip(&fab, &["link", "set", &port, "master", &br, "up"])?;
            run_ip(
                &router,
                &["addr", "add", &format!("10.{}.0.1/24", 99 + k), "dev", &leg],
            )?;
            run_ip(&router, &["link", "set", &leg, "up"])?;
        }
        let out = s.outside_netns.clone();
        make_netns(&out)?;
        run_ip(
            &router,
            &[
                "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
                &mtu, "netns", &out,
            ],
        )?;
        run_ip(&router, &["addr", "add", "10.102.0.1/30", "dev", "eth0"])?;
        run_ip(&router, &["link", "set", "eth0", "up"])?;
        run_ip(
            &router,
            &["route", "add", "203.0.113.0/24", "via", "10.102.0.2"],
        )?;
        run_ip(&out, &["addr", "add", "10.102.0.2/30", "dev", "eth0"])?;
        run_ip(&out, &["link", "set", "eth0", "up"])?;
        run_ip(
            &out,
            &["addr", "add", &format!("{OUTSIDE_IP}/32"), "dev", "lo"],
        )?;
        run_ip(&out, &["route", "add", "default", "via", "10.102.0.1"])?;
        in_netns(&router, || {
            weft_net::sysctl::set("net.ipv4.ip_forward", "1")
        })?;
        // The fabric stands in for a physical switch, which runs no netfilter: where br_netfilter
        // is loaded, bridged underlay frames would otherwise go through conntrack (a quarter of
        // the bare underlay's throughput here). The sysctls exist only with br_netfilter.
        let _ = in_netns(&fab, || {
            for k in ["iptables", "ip6tables", "arptables"] {
                weft_net::sysctl::set(&format!("net.bridge.bridge-nf-call-{k}"), "0")?;
            }
            Ok(())
        });
        s.outside_responder_pid = Some(spawn_responder(&NamedNetns::path(&out), "outside")?);

        s.store_url = if a.store == "etcd" {
            progress("store: etcd on the router at 10.100.0.1:2379");
            s.etcd_pid = Some(self.start_etcd(&router)?);
            "etcd://10.100.0.1:2379".into()
        } else {
            format!("sqlite://{}", self.dir.join("store.db").display())
        };
        self.save(s)?;
        // The cluster's settings go into the store before any agent starts, and the agents are
        // given none: each takes them from there, as nodes joining a real cluster would.
        progress(&format!(
            "network: recording {}, backend {} in the store",
            a.cluster_cidr, a.backend
        ));
        let set = crate::network::SetArgs {
            cluster_cidr: Some(a.cluster_cidr),
            backend: Some(a.backend.clone()),
            ..crate::network::SetArgs::none()
        };
        objects::session(s, |db| {
            db.run(async |store| {
                crate::network::Plan::read(store, &set)
                    .await?
                    .write(store)
                    .await
            })
        })
        .map_err(|e| format!("recording the network settings: {e}"))?;

        for i in 1..=a.nodes {
            let name = format!("node{i}");
            let k = ((i - 1) % a.subnets as u32) as u8 + 1;
            let underlay_ip = Ipv4Addr::new(10, 99 + k, 0, 10 + i as u8);
            let gateway = Ipv4Addr::new(10, 99 + k, 0, 1);
            progress(&format!("node {name}: {underlay_ip} on br{k}"));
            let netns = self.netns_name("n", &name);
            make_netns(&netns)?;
            let port = name.clone();
            run_ip(
                &fab,
                &[
                    "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
                    "mtu", &mtu, "netns", &netns,
                ],
            )?;
            run_ip(
                &fab,
                &["link", "set", &port, "master", &format!("br{k}"), "up"],
            )?;
            run_ip(
                &netns,
                &["addr", "add", &format!("{underlay_ip}/24"), "dev", "eth0"],
            )?;
            run_ip(&netns, &["link", "set", "eth0", "up"])?;
            run_ip(
                &netns,
                &["route", "add", "default", "via", &gateway.to_string()],
            )?;
            let dir = self.dir.join(&name);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let conf = json!({
                "cniVersion": "1.1.0",
                "name": "weft",
                "plugins": [{ "type": "weft", "dataDir": dir.join("ipam"), "runDir": dir.join("run") }]
            });
            std::fs::write(
                dir.join("weft.conflist"),
                serde_json::to_vec_pretty(&conf).unwrap(),
            )
            .map_err(|e| e.to_string())?;
            let mut node = NodeState {
                name: name.clone(),
                netns: netns.clone(),
                underlay_ip,
                gateway,
                dir,
                agent_pid: None,
                responder_pid: None,
            };
            // Recorded before anything is started for it, so that `down` after a failure stops
            // whatever did start.
            let agent = self.start_agent(s, &node, false);
            node.agent_pid = agent.as_ref().ok().copied();
            s.nodes.push(node);
            agent?;
            let responder = spawn_responder(&NamedNetns::path(&netns), &name)?;
            if let Some(n) = s.nodes.last_mut() {
                n.responder_pid = Some(responder);
            }
            self.save(s)?;
        }
        progress("waiting for every agent to lease a subnet");
        for node in s.nodes.clone() {
            wait_subnet(&node)?;
        }
        for node in s.nodes.clone() {
            for j in 1..=a.pods {
                let pod = format!("{}p{j}", node.name.replace("node", "n"));
                let labels = BTreeMap::from([("app".to_string(), "lab".to_string())]);
                self.add_pod(s, &node.name, &pod, labels)?;
                self.publish_pods(s, &[pod.as_str()], &BTreeMap::new())?;
                let ip = s.pods.last().map(|p| p.ip.to_string()).unwrap_or_default();
                progress(&format!("pod {pod} on {}: {ip}", node.name));
                self.save(s)?;
            }
        }
        Ok(())
    }

    fn start_etcd(&self, router: &str) -> Result<u32> {
        let data = self.dir.join("etcd");
        let log = log_file(&self.dir.join("etcd.log"))?;
        let mut cmd = Command::new("/usr/bin/etcd");
        cmd.args(["--name", "lab", "--data-dir"]).arg(&data).args([
            "--listen-client-urls",
            "http://10.100.0.1:2379",
            "--advertise-client-urls",
            "http://10.100.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "lab=http://127.0.0.1:2380",
        ]);
        let pid = spawn_in(router, &mut cmd, log)?;
        let fail = |e: String| {
            self.stop_and_wait(Some(pid), nix::sys::signal::Signal::SIGKILL);
            e
        };
        progress("waiting for etcd to answer");
        // Ready when the client port answers (bounded).
        let deadline = Instant::now() + Duration::from_secs(15);
        let ns = Netns::open(NamedNetns::path(router)).map_err(|e| fail(e.to_string()))?;
        let addr = SocketAddr::from(([10, 100, 0, 1], 2379));
        while ns
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
            .map_err(|e| fail(e.to_string()))?
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "etcd did not come up; see {}",
                    self.dir.join("etcd.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pid)
    }

    fn agent_command(&self, s: &LabState, node: &NodeState) -> Command {
        let mut cmd = Command::new(&s.weftd);
        cmd.args(["--node-name", &node.name, "--iface", "eth0"])
            .args([
                "--store",
                &s.store_url,
                "--lease-ttl",
                "10",
                "--resync",
                "5",
                "--services-repair",
                "5",
            ])
            .args(["--mode", &s.mode, "--listen", &AGENT_LISTEN.to_string()])
            .arg("--run-dir")
            .arg(node.dir.join("run"))
            .arg("--state-dir")
            .arg(node.dir.join("state"));
        cmd
    }

    fn start_agent(&self, s: &LabState, node: &NodeState, append: bool) -> Result<u32> {
        let path = node.dir.join("weftd.log");
        let log = if append {
            log_file(&path)?
        } else {
            std::fs::File::create(&path).map_err(|e| e.to_string())?
        };
        spawn_in(&node.netns, &mut self.agent_command(s, node), log)
    }

    fn restart_agent(&self, s: &mut LabState, name: &str, kill: bool) -> Result<()> {
        let node = s.node(name)?.clone();
        let signal = if kill {
            nix::sys::signal::Signal::SIGKILL
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        self.stop_and_wait(node.agent_pid, signal);
        let pid = self.start_agent(s, &node, true)?;
        if let Some(n) = s.nodes.iter_mut().find(|n| n.name == name) {
            n.agent_pid = Some(pid);
        }
        Ok(())
    }

    fn leave(&self, s: &mut LabState, name: &str) -> Result<()> {
        let node = s.node(name)?.clone();
        self.stop_and_wait(node.agent_pid, nix::sys::signal::Signal::SIGTERM);
        let mut cmd = self.agent_command(s, &node);
        cmd.arg("--leave");
        let log = log_file(&node.dir.join("weftd.log"))?;
        let pid = spawn_in(&node.netns, &mut cmd, log)?;
        // Bounded: a leave that cannot reach the store must not hang the lab.
        let child = nix::unistd::Pid::from_raw(pid as i32);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    self.stop_and_wait(Some(pid), nix::sys::signal::Signal::SIGKILL);
                    return Err(format!(
                        "weftd --leave on {name} did not finish within 30 s"
                    ));
                }
                Ok(st) => break st,
                Err(e) => return Err(format!("waiting for weftd --leave: {e}")),
            }
        };
        if let Some(n) = s.nodes.iter_mut().find(|n| n.name == name) {
            n.agent_pid = None;
        }
        match status {
            nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
            other => Err(format!(
                "weftd --leave on {name}: {other:?}; see {}",
                node.dir.join("weftd.log").display()
            )),
        }
    }

    fn invoker(&self, s: &LabState, node: &NodeState) -> Invoker {
        Invoker {
            plugin_dirs: vec![s.cni_bin_dir.clone()],
            host_netns: Some(NamedNetns::path(&node.netns)),
            env: Vec::new(),
        }
    }

    fn conflist(node: &NodeState) -> Result<ConfList> {
        let path = node.dir.join("weft.conflist");
        let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        ConfList::parse(&text).map_err(|e| e.to_string())
    }

    fn add_pod(
        &self,
        s: &mut LabState,
        node: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        if !valid_name(name, 20) {
            return Err(format!(
                "pod name {name:?} must be 1-20 lowercase letters or digits"
            ));
        }
        if s.pods.iter().any(|p| p.name == name) {
            return Err(format!("pod {name} exists already"));
        }
        let node = s.node(node)?.clone();
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
        let result = match self
            .invoker(s, &node)
            .add_list(&Self::conflist(&node)?, &rt)
        {
            Ok(r) => r,
            Err(e) => {
                let _ = NamedNetns::delete(&netns);
                return Err(format!("CNI ADD for pod {name} on {}: {e}", node.name));
            }
        };
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next()?.parse().ok())
            .ok_or_else(|| format!("CNI ADD for pod {name}: no address in {result}"))?;
        let pid = spawn_responder(ns.path(), name)?;
        s.pods.push(PodState {
            name: name.into(),
            node: node.name.clone(),
            netns,
            ip,
            container_id: rt.container_id,
            responder_pid: Some(pid),
            labels,
            result,
        });
        Ok(())
    }

    fn del_pod(&self, s: &mut LabState, name: &str) -> Result<()> {
        let i = s
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| format!("no pod {name} in lab {:?}", self.name))?;
        let pod = s.pods.remove(i);
        self.stop(pod.responder_pid);
        let rt = RuntimeConf {
            container_id: pod.container_id.clone(),
            netns: NamedNetns::path(&pod.netns),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let del = s.node(&pod.node).cloned().and_then(|node| {
            Self::conflist(&node).and_then(|l| {
                self.invoker(s, &node)
                    .del_list(&l, &rt, Some(&pod.result))
                    .map_err(|e| e.to_string())
            })
        });
        let _ = NamedNetns::delete(&pod.netns);
        del.map_err(|e| format!("CNI DEL for pod {name}: {e}"))
    }

    /// Whether `pid` is still a process of this lab: its command line names the lab's directory or
    /// its namespaces. A pid from the state file may have been reused by something else.
    pub(super) fn owns(&self, pid: u32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        cmdline.contains(&format!("{}/", self.dir.display()))
            || cmdline.contains(&format!("{NETNS_PREFIX}{}-", self.name))
    }

    fn stop(&self, pid: Option<u32>) {
        if let Some(pid) = pid.filter(|p| self.owns(*p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Signals `pid` and waits (bounded, 5 s) for it to be gone, reaping it if it is our child.
    fn stop_and_wait(&self, pid: Option<u32>, signal: nix::sys::signal::Signal) {
        let Some(pid) = pid.filter(|p| self.owns(*p)) else {
            return;
        };
        let p = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::kill(p, signal).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if nix::sys::signal::kill(p, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    }

    fn down(&self) -> Result<i32> {
        self.teardown(false)
    }

    /// Stops and removes everything; with `keep_logs` (a failed `up`), the lab directory is moved
    /// to `<lab>.failed` instead of removed, so the logs an error points to are still there.
    fn teardown(&self, keep_logs: bool) -> Result<i32> {
        let mut errors = Vec::new();
        if let Ok(mut s) = self.load() {
            if !s.pods.is_empty() {
                progress(&format!("pods: CNI DEL of {}", s.pods.len()));
            }
            for name in s.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>() {
                if let Err(e) = self.del_pod(&mut s, &name) {
                    errors.push(e);
                }
            }
            progress("stopping agents, responders and the store");
            for n in &s.nodes {
                self.stop_and_wait(n.agent_pid, nix::sys::signal::Signal::SIGTERM);
                self.stop(n.responder_pid);
            }
            self.stop(s.outside_responder_pid);
            self.stop_and_wait(s.etcd_pid, nix::sys::signal::Signal::SIGTERM);
        }
        progress("removing namespaces");
        // Whatever is left of this lab (a crashed `up`, a lost state file).
        for ns in NamedNetns::list(&format!("{NETNS_PREFIX}{}-", self.name)) {
            let _ = NamedNetns::delete(&ns);
        }
        let failed = self.dir.with_extension("failed");
        let _ = std::fs::remove_dir_all(&failed);
        if keep_logs {
            let _ = std::fs::rename(&self.dir, &failed);
            eprintln!("logs kept in {}", failed.display());
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
        // One read of the store: the cluster's settings as recorded now (`weftctl network set`
        // may have changed them since `up`), the leases (each node's backend: one not yet
        // restarted runs the old one), and the agents' events.
        let read = objects::session(&s, |db| {
            db.run(async |store| {
                use weft_store::Store;
                let record = store.get(weft_agent::network::NETWORK_KEY).await?;
                let leases = weft_agent::lease::leases(store).await?;
                let (events, _) = store.list(weft_agent::events::EVENT_PREFIX).await?;
                Ok((record, leases, events))
            })
            .map_err(|e: weft_store::Error| e.to_string())
        });
        let (record, leases, events) = match read {
            Ok((r, l, e)) => (r, l, Ok(e)),
            Err(e) => (None, Vec::new(), Err(e)),
        };
        let recorded = record.and_then(|kv| {
            serde_json::from_slice::<weft_agent::network::NetworkConfig>(&kv.value).ok()
        });
        let (backend, cidr) = match &recorded {
            Some(c) => (c.backend.as_str().to_string(), c.cluster_cidr.to_string()),
            None => (
                s.backend.clone(),
                s.cluster_cidr.clone().unwrap_or_default(),
            ),
        };
        println!(
            "lab {}: backend {backend}, cluster CIDR {cidr}, store {} ({}), pods wired in {} mode",
            self.name, s.store, s.store_url, s.mode
        );
        println!();
        // `-`: no lease.
        println!("NODE     UNDERLAY-IP    SUBNET           BACKEND        AGENT-PID");
        for n in &s.nodes {
            let subnet = weft_plugin_subnet(&n.dir).unwrap_or_else(|| "-".into());
            let backend = leases
                .iter()
                .find(|(_, l)| l.node == n.name)
                .map_or("-", |(_, l)| l.backend.as_str());
            println!(
                "{:<8} {:<14} {:<16} {:<14} {}",
                n.name,
                n.underlay_ip.to_string(),
                subnet,
                backend,
                pid_text(n.agent_pid)
            );
        }
        println!();
        println!("{:<10} {:<8} {:<14}", "POD", "NODE", "IP");
        for p in &s.pods {
            println!("{:<10} {:<8} {:<14}", p.name, p.node, p.ip.to_string());
        }
        // What the agents report as keeping a peer out of reach (events.rs in weftd).
        println!();
        match events {
            Ok(events) => {
                let warnings: Vec<k8s_openapi::api::core::v1::Event> = events
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                    .filter(|e: &k8s_openapi::api::core::v1::Event| {
                        e.source.as_ref().and_then(|s| s.component.as_deref())
                            == Some(weft_agent::events::COMPONENT)
                    })
                    .collect();
                if warnings.is_empty() {
                    println!("no warnings from the agents");
                }
                for e in warnings {
                    let text = |t: Option<String>| t.unwrap_or_else(|| "-".into());
                    println!(
                        "WARNING {} {}: {}",
                        text(e.involved_object.name),
                        text(e.reason),
                        text(e.message)
                    );
                }
            }
            Err(e) => println!("agents' events not read: {e}"),
        }
        Ok(0)
    }

    fn check(&self) -> Result<i32> {
        let s = self.load()?;
        let mut targets: Vec<(String, Ipv4Addr)> =
            s.pods.iter().map(|p| (p.name.clone(), p.ip)).collect();
        targets.push(("outside".into(), OUTSIDE_IP));
        let width = targets.iter().map(|t| t.0.len()).max().unwrap_or(4).max(7) + 2;
        print!("{:<width$}", "from\\to");
        for (t, _) in &targets {
            print!("{t:>width$}");
        }
        println!();
        let (mut passed, mut failed) = (0, 0);
        for p in &s.pods {
            let ns = Netns::open(NamedNetns::path(&p.netns)).map_err(|e| e.to_string())?;
            print!("{:<width$}", p.name);
            for (t, ip) in &targets {
                if *t == p.name {
                    print!("{:>width$}", "-");
                    continue;
                }
                let cell = match probe(&ns, SocketAddr::from((*ip, 80))) {
                    Ok(answer) if answer == *t => {
                        passed += 1;
                        "ok".to_string()
                    }
                    Ok(answer) => {
                        failed += 1;
                        format!("WRONG:{answer}")
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{} -> {t} ({ip}:80): {e}", p.name);
                        "FAIL".to_string()
                    }
                };
                print!("{cell:>width$}");
            }
            println!();
        }
        // The datapath does not need the store; a store outage only means Services are not checked.
        let (sp, sf, retried) = self.check_services(&s).unwrap_or_else(|e| {
            println!("services not checked: {e}");
            (0, 0, 0)
        });
        let (passed, failed) = (passed + sp, failed + sf);
        if retried > 0 {
            println!("{passed} passed, {failed} failed; {retried} passed only after retries");
        } else {
            println!("{passed} passed, {failed} failed");
        }
        Ok(if failed == 0 { 0 } else { 1 })
    }

    fn exec(&self, target: &str, command: &[String]) -> Result<i32> {
        let s = self.load()?;
        let netns = match target {
            "fabric" => s.fabric_netns.clone(),
            "router" => s.router().to_string(),
            "outside" => s.outside_netns.clone(),
            t => s
                .nodes
                .iter()
                .find(|n| n.name == t)
                .map(|n| n.netns.clone())
                .or_else(|| s.pods.iter().find(|p| p.name == t).map(|p| p.netns.clone()))
                .ok_or_else(|| format!("no pod or node {t} in lab {:?}", self.name))?,
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

/// The node's subnet as its agent wrote it to subnet.env.
fn weft_plugin_subnet(dir: &Path) -> Option<String> {
    let path = dir.join("run").join(weft_plugin::config::SUBNET_FILE);
    let env = weft_plugin::subnet_env::SubnetEnv::read(&path).ok()??;
    env.subnet.map(|s| s.to_string())
}

/// Waits (bounded) for the node's agent to lease a subnet and write subnet.env.
fn wait_subnet(node: &NodeState) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while weft_plugin_subnet(&node.dir).is_none() {
        if Instant::now() > deadline {
            return Err(format!(
                "weftd on {} wrote no subnet.env within 20 s; see {}",
                node.name,
                node.dir.join("weftd.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Where each node's agent serves /healthz, /readyz and /metrics, inside the node's namespace.
const AGENT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9967);

/// One value from the /metrics of the agent in `ns`, a node's namespace (None: no agent answering within `timeout`, or no
/// such metric).
fn agent_metric(ns: &Netns, name: &str, timeout: Duration) -> Option<String> {
    let timeout = timeout.max(Duration::from_millis(10));
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&AGENT_LISTEN, timeout))
        .ok()?
        .ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nHost: weftd\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_string)
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

fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce() -> std::result::Result<T, weft_net::Error> + Send,
) -> Result<T> {
    let ns = Netns::open(NamedNetns::path(netns)).map_err(|e| e.to_string())?;
    ns.run(f)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
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

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Starts `cmd` detached inside `netns`, with stdout and stderr to `log`; returns its pid.
fn spawn_in(netns: &str, cmd: &mut Command, log: std::fs::File) -> Result<u32> {
    let file = std::fs::File::open(NamedNetns::path(netns))
        .map_err(|e| format!("opening {netns}: {e}"))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    // SAFETY: setns(2) only, in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    Ok(child.id())
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

/// Whether `pid` runs: it exists and is not a zombie waiting for its parent to reap it.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn pid_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) if alive(p) => p.to_string(),
        Some(p) => format!("{p} (gone)"),
        None => "-".into(),
    }
}

/// The directory holding the `weft` and `weftd` binaries: the given one, else beside this binary.
fn find_bin_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => d,
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .ok_or("cannot find weftctl's own directory; give --bin-dir")?,
    };
    for bin in ["weft", "weftd"] {
        if !dir.join(bin).is_file() {
            return Err(format!(
                "no {bin} binary in {} (build it: cargo build --release; or give --bin-dir)",
                dir.display()
            ));
        }
    }
    Ok(dir)
}
