//! Shared pieces of the plugin's privileged tests: throwaway namespaces (removed on drop, and
//! swept if an earlier run crashed), a host namespace to run plugins in, and real TCP probes.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use weft_cni::error::CniError;
use weft_cni::exec::{Invoker, RuntimeConf};
use weft_net::{NamedNetns, Netns, ScratchNetns};

/// Every namespace these tests make starts with this, followed by the test process's pid.
pub const PREFIX: &str = "wtest-";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root (CI runs it as root)"
    );
    for tool in ["/usr/sbin/ip", "/usr/sbin/nft"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run scripts/install-deps.sh"
        );
    }
    sweep_stale();
}

/// Deletes namespaces left by test processes that no longer run (a crash skips Drop).
fn sweep_stale() {
    ScratchNetns::sweep(PREFIX);
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A named namespace that is deleted when dropped.
pub struct Ns {
    pub name: String,
    pub netns: Netns,
    _scratch: ScratchNetns,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let scratch = ScratchNetns::new(PREFIX, tag)
            .unwrap_or_else(|e| panic!("creating a {tag} netns: {e}"));
        let ns = Ns {
            name: scratch.name.clone(),
            netns: Netns::open(scratch.path()).expect("opening the new netns"),
            _scratch: scratch,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        NamedNetns::path(&self.name)
    }

    /// Runs `ip -n NAME ARGS…` and returns stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` inside this namespace (sockets made there stay there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.netns.run(f).expect("entering namespace")
    }

    /// Names of links in this namespace.
    pub fn links(&self) -> Vec<String> {
        let out = self.ip(&["-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "weft-test-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The plugin binary under test.
pub fn weft_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weft"))
}

/// A node: a host namespace where plugins run, with its own IPAM and run directories.
pub struct Node {
    pub host: Ns,
    pub dir: TempDir,
    pub invoker: Invoker,
}

impl Node {
    pub fn new(tag: &str) -> Node {
        require_root();
        let host = Ns::new(tag);
        let dir = TempDir::new(tag);
        let invoker = Invoker {
            plugin_dirs: vec![
                weft_bin().parent().unwrap().to_path_buf(),
                PathBuf::from("/usr/lib/cni"),
            ],
            host_netns: Some(host.path()),
            env: Vec::new(),
        };
        Node { host, dir, invoker }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.0.join("ipam")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.0.join("run")
    }

    /// A weft conf for this node.
    pub fn conf(&self, mode: &str, subnet: &str) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft",
            "mode": mode,
            "subnet": subnet,
            "dataDir": self.data_dir(),
            "runDir": self.run_dir(),
        })
    }

    pub fn exec(
        &self,
        command: &str,
        rt: Option<&RuntimeConf>,
        conf: &Value,
    ) -> Result<Option<Value>, CniError> {
        self.invoker.exec("weft", command, rt, conf)
    }

    /// ADD with the conf, returning the result.
    pub fn add(&self, conf: &Value, pod: &Ns, cid: &str) -> Result<Value, CniError> {
        self.exec("ADD", Some(&rt(pod, cid)), conf)
            .map(|r| r.expect("ADD printed no result"))
    }

    pub fn del(&self, conf: &Value, pod: &Ns, cid: &str) -> Result<(), CniError> {
        self.exec("DEL", Some(&rt(pod, cid)), conf).map(|_| ())
    }

    /// Host-side veths the plugin made.
    pub fn weft_veths(&self) -> Vec<String> {
        self.host
            .links()
            .into_iter()
            .filter(|n| n.starts_with("weft") && n != "weft0")
            .collect()
    }

    /// Waits (at most 10 s) for the host veths to be gone: DEL leaves their deletion to the
    /// plugin's detached reaper, which finishes within milliseconds.
    pub fn wait_no_veths(&self) {
        wait_for("weft veths to be deleted", || self.weft_veths().is_empty());
    }

    /// Allocation record files left in the IPAM directory of network "weft".
    pub fn ipam_records(&self) -> Vec<String> {
        let dir = self.data_dir().join("weft");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<Ipv4Addr>().is_ok())
            .collect();
        if let Ok(rd) = std::fs::read_dir(dir.join("by-attachment")) {
            names.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        names
    }
}

pub fn rt(pod: &Ns, cid: &str) -> RuntimeConf {
    RuntimeConf {
        container_id: cid.to_string(),
        netns: pod.path(),
        ifname: "eth0".to_string(),
        args: Vec::new(),
        capability_args: Default::default(),
    }
}

/// The pod address from an ADD result.
pub fn result_ip(result: &Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    addr.split('/').next().unwrap().parse().unwrap()
}

/// A TCP responder inside `ns` on `ip:port` that answers every connection with `name`, for as
/// long as the returned guard lives (bounded: it serves at most `max` connections).
pub struct Responder {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    pub fn start(ns: &Ns, ip: Ipv4Addr, port: u16, name: &str) -> Responder {
        let listener = ns
            .run(|| TcpListener::bind((ip, port)))
            .unwrap_or_else(|e| panic!("binding {ip}:{port} in {}: {e}", ns.name));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Responder {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to `addr` and returns what the responder said.
pub fn tcp_probe(ns: &Ns, addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut s = String::new();
    stream.read_to_string(&mut s)?;
    Ok(s)
}

/// Polls `cond` every 10 ms for at most 10 s (64 reapers serialise on the kernel's rtnl lock);
/// panics naming `what` if it never holds.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
