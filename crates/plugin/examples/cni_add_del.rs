//! Benchmark driver for `bench/cni-add-del`: N sequential ADD+DEL pairs of `weft` and of the
//! reference `bridge` + `host-local`, interleaved in the same run and the same host namespace, so
//! both see the same machine noise. Prints median and p99 per operation and the ratio.
//!
//! Usage: cni_add_del [N] (as root; plugins from target/release and /usr/lib/cni).

use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weft_cni::exec::{ConfList, Invoker, RuntimeConf};
use weft_net::ScratchNetns;

struct Namespace(ScratchNetns);

impl Namespace {
    fn new(tag: &str) -> Namespace {
        Namespace(ScratchNetns::new("wbench-", tag).expect("creating a benchmark namespace"))
    }
    fn path(&self) -> PathBuf {
        self.0.path()
    }
}

fn stats(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = ms(samples[samples.len() / 2]);
    let p99 = ms(samples[((samples.len() * 99).div_ceil(100)).min(samples.len()) - 1]);
    (median, p99)
}

/// Whether `name` exists in `ns` (a netlink query from inside it).
fn link_exists(ns: &weft_net::Netns, name: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let nl = weft_net::Netlink::connect_in(ns).unwrap();
        nl.link(name).await.unwrap().is_some()
    })
}

/// Whether a `weft reap-link` process is still running (its kernel work outlasts the link's
/// disappearance from listings: the RCU barrier comes after the unlink).
fn reaper_running() -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0).nth(1) == Some(weft_plugin::reap::ARG.as_bytes())
            })
        })
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    // Stale namespaces of an earlier, crashed run.
    ScratchNetns::sweep("wbench-");
    let host = Namespace::new("host");
    let host_ns = weft_net::Netns::open(host.path()).unwrap();
    let state = std::env::temp_dir().join(format!("wbench-{}", std::process::id()));
    let weft_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let invoker = Invoker {
        plugin_dirs: vec![weft_dir, PathBuf::from("/usr/lib/cni")],
        host_netns: Some(host.path()),
        env: Vec::new(),
    };
    let weft = ConfList::parse(
        json!({"cniVersion": "1.0.0", "name": "bench-weft", "plugins": [{
            "type": "weft", "mode": "bridge", "subnet": "10.250.0.0/24",
            "dataDir": state.join("weft"), "runDir": state.join("run"),
        }]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let reference = ConfList::parse(
        json!({"cniVersion": "1.0.0", "name": "bench-ref", "plugins": [{
            "type": "bridge", "bridge": "cni-bench0", "isGateway": true,
            "ipam": {"type": "host-local", "subnet": "10.251.0.0/24", "dataDir": state.join("host-local")},
        }]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    // As on a real node, every pod is a new sandbox: its own container id and namespace, made
    // and removed outside the timed part.
    let sandbox = |i: usize, k: usize| {
        let ns = Namespace::new(&format!("pod{i}-{k}"));
        let rt = RuntimeConf {
            container_id: format!("bench{i}-{k}"),
            netns: ns.path(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        (ns, rt)
    };
    // One warm-up pair each: creates the bridges and pages the binaries in.
    for (k, list) in [&weft, &reference].into_iter().enumerate() {
        let (_ns, rt) = sandbox(usize::MAX, k);
        let r = invoker.add_list(list, &rt).expect("warm-up ADD");
        invoker.del_list(list, &rt, Some(&r)).expect("warm-up DEL");
    }
    // A sandbox is made before the clock starts and removed after it stops, with a pause for the
    // kernel worker that tears a namespace down (it takes the locks the measured calls need).
    // Few namespaces are alive at once: each live namespace makes every device creation dearer
    // (uevents are broadcast to all of them), for both plugins alike.
    let mut t = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for i in 0..n {
        for (k, list) in [&weft, &reference].into_iter().enumerate() {
            let (ns, rt) = sandbox(i, k);
            let rt = &rt;
            let start = Instant::now();
            let r = invoker.add_list(list, rt).expect("ADD");
            t[k][0].push(start.elapsed());
            let start = Instant::now();
            invoker.del_list(list, rt, Some(&r)).expect("DEL");
            t[k][1].push(start.elapsed());
            // weft's DEL leaves the veth's deletion to a reaper; let it finish (untimed) so that
            // its kernel work does not land in the next measurement (the reference's).
            if k == 0 {
                let veth = r["interfaces"][0]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline
                    && (link_exists(&host_ns, &veth) || reaper_running())
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            drop(ns);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir_all(&state);
    println!("cni-add-del: N={n} sequential ADD+DEL pairs per plugin, interleaved, same host netns, a new sandbox each");
    println!("{:<28} {:>10} {:>10}", "", "median ms", "p99 ms");
    let mut med = [[0.0; 2]; 2];
    for (k, name) in ["weft", "bridge+host-local"].into_iter().enumerate() {
        for (o, op) in ["ADD", "DEL"].into_iter().enumerate() {
            let (m, p) = stats(&mut t[k][o]);
            med[k][o] = m;
            println!("{:<28} {m:>10.2} {p:>10.2}", format!("{name} {op}"));
        }
    }
    println!(
        "ratio weft/reference (median): ADD {:.2}  DEL {:.2}   (target <= 0.50)",
        med[0][0] / med[1][0],
        med[0][1] / med[1][1]
    );
}
