//! The lab test harness: a lab with a unique name that `down`s itself on drop, and helpers that
//! act inside its namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use weft_net::{NamedNetns, Netns};

pub struct Lab {
    pub name: String,
    pub state_dir: PathBuf,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the lab creates network namespaces and needs root (CI runs as root)"
        );
        // Labs of earlier test runs that crashed before their Drop.
        for ns in NamedNetns::list("weftlab-t") {
            let pid = ns["weftlab-t".len()..]
                .split(['-', 'x'])
                .next()
                .unwrap_or("");
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                let _ = NamedNetns::delete(&ns);
            }
        }
        let name = format!("t{}x{tag}", std::process::id());
        let state_dir = std::env::temp_dir().join(format!("weftctl-test-{name}"));
        Lab { name, state_dir }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_weftctl")).parent().unwrap();
        for bin in ["weft", "weftd"] {
            assert!(
                bin_dir.join(bin).exists(),
                "{bin} is missing beside weftctl: `cargo test --workspace` builds it"
            );
        }
        Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .arg("lab")
            .args(["--name", &self.name, "--state-dir"])
            .arg(&self.state_dir)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "weftctl lab {}: {}{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The agents' logs, for failure messages.
    /// Where a node's agent logs.
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.state_dir.join(&self.name).join(node).join("weftd.log")
    }

    /// A node's agent's log so far.
    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.log_path(node)).unwrap()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for i in 1..=4 {
            if let Ok(t) = std::fs::read_to_string(self.log_path(&format!("node{i}"))) {
                s.push_str(&format!("--- node{i} weftd.log\n{t}"));
            }
        }
        s
    }

    pub fn namespaces(&self) -> Vec<String> {
        NamedNetns::list(&format!("weftlab-{}-", self.name))
    }

    pub fn netns(&self, kind: &str, name: &str) -> Netns {
        Netns::open(NamedNetns::path(&format!(
            "weftlab-{}-{kind}-{name}",
            self.name
        )))
        .unwrap()
    }

    pub fn ip(&self, node: &str, args: &[&str]) -> String {
        let mut a = vec!["exec", node, "--", "ip"];
        a.extend_from_slice(args);
        self.ok(&a)
    }

    /// `weftctl ARGS` (not `weftctl lab`), e.g. `node leave` against the lab's store.
    pub fn weftctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .args(args)
            .output()
            .unwrap()
    }

    /// The lab's store, as its agents' --store (a SQLite lab).
    pub fn store_url(&self) -> String {
        format!(
            "sqlite://{}",
            self.state_dir.join(&self.name).join("store.db").display()
        )
    }

    /// The node's agent pid as `lab status` shows it, if that process is alive.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let status = self.ok(&["status"]);
        let line = status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(node))?;
        line.split_whitespace()
            .nth(4)?
            .parse()
            .ok()
            .filter(|_| !line.contains("(gone)"))
    }

    /// kill -9 the node's agent, which must be running; it is not started again.
    pub fn kill_agent(&self, node: &str) {
        let pid = self
            .agent_pid(node)
            .unwrap_or_else(|| panic!("{node}'s agent runs"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    pub fn subnet(&self, node: &str) -> String {
        let env = std::fs::read_to_string(
            self.state_dir
                .join(&self.name)
                .join(format!("{node}/run/subnet.env")),
        )
        .unwrap();
        env.lines()
            .find_map(|l| l.strip_prefix("WEFT_SUBNET="))
            .unwrap()
            .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        for ns in self.namespaces() {
            let _ = NamedNetns::delete(&ns);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// A one-connection echo server on `ip`:7000 inside pod `pod`, run by a thread of this process.
pub fn echo_server(lab: &Lab, pod: &str, ip: std::net::Ipv4Addr) {
    let listener = lab
        .netns("p", pod)
        .run(|| TcpListener::bind((ip, 7000)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
        }
    });
}

/// A closure that sends a byte on `s` and expects it back.
pub fn echo(mut s: TcpStream) -> impl FnMut() -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    move || {
        let mut b = [0u8; 1];
        s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"x"
    }
}

/// An echo stream from pod `from` to pod `to`, made by this test process inside the pods'
/// namespaces: returns a closure that sends a byte and expects it back.
pub fn echo_stream(
    lab: &Lab,
    from: &str,
    to: &str,
    to_ip: std::net::Ipv4Addr,
) -> impl FnMut() -> bool {
    echo_server(lab, to, to_ip);
    let dst = SocketAddr::from((to_ip, 7000));
    let s = lab
        .netns("p", from)
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    echo(s)
}

/// `GET path` over HTTP/1.1 from inside a lab namespace; the whole answer (connection closed by the
/// server or after 2 s).
pub fn http_get(lab: &Lab, kind: &str, name: &str, addr: SocketAddr, path: &str) -> String {
    try_http_get(lab, kind, name, addr, path).unwrap()
}

/// `http_get`, for a server that may not be listening yet.
pub fn try_http_get(
    lab: &Lab,
    kind: &str,
    name: &str,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<String> {
    let mut c = lab
        .netns(kind, name)
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap()?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    Ok(out)
}

pub fn pod_ip(lab: &Lab, pod: &str) -> std::net::Ipv4Addr {
    let out = lab.ip(pod, &["-4", "-o", "addr", "show", "eth0"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Connects over TCP from inside a lab namespace and returns the responder's answer (its name).
pub fn ask(lab: &Lab, kind: &str, from: &str, addr: SocketAddr) -> std::io::Result<String> {
    let mut s = lab
        .netns(kind, from)
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        .unwrap()?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// Sends a datagram from inside pod `from` and returns the answer; up to 3 tries of 500 ms, since
/// UDP may lose one.
pub fn ask_udp(lab: &Lab, from: &str, addr: SocketAddr) -> std::io::Result<String> {
    let s = lab
        .netns("p", from)
        .run(|| std::net::UdpSocket::bind(("0.0.0.0", 0)))
        .unwrap()?;
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut last = std::io::Error::other("no answer");
    for _ in 0..3 {
        s.send(b"?")?;
        let mut b = [0u8; 256];
        match s.recv(&mut b) {
            Ok(n) => return Ok(String::from_utf8_lossy(&b[..n]).trim().to_string()),
            Err(e) => last = e,
        }
    }
    Err(last)
}
