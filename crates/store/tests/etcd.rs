//! The conformance suite on a real etcd (Debian's etcd-server, started by each test on free
//! loopback ports with a data directory of its own), and etcd's own failure cases.

mod conformance;

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conformance::{next_event, Backend, ScratchDir, WAIT};
use weft_store::{AnyStore, EtcdStore, Store};

/// One etcd member, killed (by its pid) when dropped.
struct EtcdServer {
    child: Option<Child>,
    dir: ScratchDir,
    client_port: u16,
    peer_port: u16,
}

fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_ETCD") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no etcd binary (not in PATH nor /usr/bin, WEFT_ETCD unset): the etcd store tests \
                 need a real etcd; install Debian's etcd-server (apt-get install etcd-server)"
            )
        })
}

impl EtcdServer {
    async fn start() -> Self {
        // Both ports are taken at once so they differ; etcd binds them a moment later.
        let (a, b) = (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let mut server = EtcdServer {
            child: None,
            dir: ScratchDir::new("etcd"),
            client_port: a.local_addr().unwrap().port(),
            peer_port: b.local_addr().unwrap().port(),
        };
        drop((a, b));
        server.run().await;
        server
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn socket(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("localhost:{}", self.client_port))
    }

    /// Starts etcd on this server's ports and data directory, and waits until it answers.
    async fn run(&mut self) {
        assert!(self.child.is_none());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        // etcd names a unix socket after the URL's host, relative to its working directory;
        // a killed etcd leaves its socket file behind, and a new one cannot bind over it.
        let _ = std::fs::remove_file(self.socket());
        let listen = format!("{client},unix://localhost:{}", self.client_port);
        let child = Command::new(etcd_binary())
            .current_dir(self.dir.path())
            .args(["--name", "weft-test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("weft-test={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", etcd_binary().display()));
        self.child = Some(child);

        let store = EtcdStore::connect(&[self.endpoint()]).await.unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("etcd exited ({status}) at start:\n{}", self.log());
            }
            if store.get("/ready").await.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!("etcd not ready within {WAIT:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend for EtcdServer {
    type S = EtcdStore;
    const TTL: Duration = Duration::from_secs(2);

    async fn start() -> Self {
        EtcdServer::start().await
    }

    async fn open(&self) -> EtcdStore {
        EtcdStore::connect(&[self.endpoint()]).await.unwrap()
    }
}

conformance::suite!(EtcdServer);

#[tokio::test]
async fn any_store_opens_by_url() {
    let server = EtcdServer::start().await;
    let s = AnyStore::open(&format!("etcd://{}", server.endpoint()))
        .await
        .unwrap();
    assert!(matches!(s, AnyStore::Etcd(_)));
    assert_eq!(
        s.put("/k", b"v", None).await.unwrap(),
        2,
        "an empty etcd is at revision 1"
    );
}

#[tokio::test]
async fn unreachable_etcd_is_unavailable() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = EtcdStore::connect(&[format!("127.0.0.1:{port}")])
        .await
        .unwrap();
    let started = Instant::now();
    let err = s.put("/k", b"v", None).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < WAIT);
}

/// etcd killed and restarted on the same data directory: one client handle carries on, and its
/// watches resume after the last revision they delivered, without repeating it.
#[tokio::test]
async fn watch_resumes_after_restart() {
    let mut server = EtcdServer::start().await;
    let s = server.open().await;
    let (_, r0) = s.list("/r/").await.unwrap();
    let mut w = s.watch("/r/", r0);
    let r1 = s.put("/r/1", b"before", None).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), r1);

    server.kill();
    let err = s.put("/r/lost", b"x", None).await.unwrap_err();
    assert!(err.is_retryable(), "a write to a dead etcd: {err}");
    let mut opened_while_down = s.watch("/r/", r0);
    // Let the watches notice the broken connection and start retrying.
    tokio::time::sleep(Duration::from_millis(500)).await;

    server.run().await;
    let deadline = Instant::now() + WAIT;
    let r2 = loop {
        match s.put("/r/2", b"after", None).await {
            Ok(r) => break r,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("writing after the restart: {e}"),
        }
    };
    let e = next_event(&mut w).await;
    assert_eq!(
        (e.key(), e.revision()),
        ("/r/2", r2),
        "resumed after r1, not before"
    );
    assert_eq!(next_event(&mut opened_while_down).await.revision(), r1);
    assert_eq!(next_event(&mut opened_while_down).await.revision(), r2);
    assert!(s.get("/r/lost").await.unwrap().is_none());
}

#[tokio::test]
async fn unix_socket() {
    let server = EtcdServer::start().await;
    let url = format!("etcd+unix://{}", server.socket().display());
    let s = AnyStore::open(&url).await.unwrap();
    let (_, r0) = s.list("/u/").await.unwrap();
    let mut w = s.watch("/u/", r0);
    let lease = s.grant(Duration::from_secs(5)).await.unwrap();
    let r = s.put("/u/k", b"v", Some(lease)).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), r);
    s.keepalive(lease).await.unwrap();
    s.revoke(lease).await.unwrap();
    assert_eq!(next_event(&mut w).await.key(), "/u/k");
    assert!(s.get("/u/k").await.unwrap().is_none());

    let tcp = server.open().await;
    assert_eq!(
        tcp.list("").await.unwrap().1,
        s.list("").await.unwrap().1,
        "one store"
    );
}
