//! Benchmark driver for `bench/services` (issue 4): Weft's Services table against an anchor shaped
//! like kube-proxy's iptables mode (written in nft), measured in the same run on the same machine.
//!
//! - Sync: N services × 10 endpoints, N = 1, 1000, 10000. A full sync (parse, compile, render,
//!   `nft -f`) into an empty namespace, then one endpoint change (the agent's path: parse and
//!   compile everything, send the difference). The anchor: loading its linear ruleset, and
//!   rewriting one endpoint chain.
//! - First-packet connect latency to the last service (in id order, and the last rule of the
//!   anchor's linear chain) at N = 1 and N = 10000: TCP connect() from a client namespace whose
//!   nat output hook does the DNAT, to a listener in a server namespace across a veth.
//! - Throughput: one iperf3 stream through the service at N = 10000, and through the anchor
//!   with and without a per-packet linear filter chain.
//!
//! Usage: services_bench [--reps 5] [--connects 2000] [--sizes 1,1000,10000] [--iperf-t 3]
//! [--iperf-reps 3] [--no-iperf] [--budget 100] [--dump DIR] (as root; needs nft, ip, iperf3).
//! `--budget` bounds the time per size (no repetition starts after it); `--dump` writes the
//! nft input of each size to DIR instead of measuring, to reproduce a load by hand.

use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_net::{Netns, ScratchNetns};
use weft_services::{compile, nft, parse_all, render, Cache, Compiler, NodeFacts, Proxy, SyncKind};

const PREFIX: &str = "wbench-svc-";
const ENDPOINTS: usize = 10;
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// The anchor's table.
const LINEAR: &str = "linear";
/// The per-packet filter variant's table.
const PER_PACKET: &str = "perpacket";

fn facts() -> NodeFacts {
    NodeFacts {
        node: "bench-node".into(),
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        local_subnet: "10.244.1.0/24".parse().unwrap(),
    }
}

fn service_cidr() -> ipnet::Ipv4Net {
    "10.96.0.0/12".parse().unwrap()
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// The server namespace's addresses: the measured service's endpoints.
fn server_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 255, k as u8 + 1)
}

/// Endpoint `k` of service `i` of `n`. The last service (the measured one) has the server's
/// addresses; the others have addresses in 10.244.0-249.x (which repeat past 63500 endpoints).
fn endpoint(n: usize, i: usize, k: usize) -> Ipv4Addr {
    if i == n - 1 {
        return server_ip(k);
    }
    let j = i * ENDPOINTS + k;
    Ipv4Addr::new(10, 244, ((j / 254) % 250) as u8, (j % 254 + 1) as u8)
}

fn name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// The store's two prefixes, as the agent mirrors them.
#[derive(Clone)]
struct Store {
    services: BTreeMap<String, Vec<u8>>,
    slices: BTreeMap<String, Vec<u8>>,
}

fn slice_key(i: usize) -> String {
    format!("/registry/endpointslices/default/{}-1", name(i))
}

fn slice_json(i: usize, eps: &[Ipv4Addr]) -> Vec<u8> {
    let endpoints: Vec<_> = eps
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            json!({"addresses": [ip.to_string()], "nodeName": format!("node-{}", (i + k) % 100),
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-1", name(i)), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name(i)}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
        "endpoints": endpoints}))
    .unwrap()
}

fn store(n: usize) -> Store {
    let mut s = Store {
        services: BTreeMap::new(),
        slices: BTreeMap::new(),
    };
    for i in 0..n {
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name(i), "namespace": "default"},
            "spec": {"clusterIP": vip(i).to_string(),
                     "ports": [{"name": "http", "protocol": "TCP", "port": SERVICE_PORT,
                                "targetPort": TARGET_PORT}]}});
        s.services.insert(
            format!("/registry/services/specs/default/{}", name(i)),
            serde_json::to_vec(&svc).unwrap(),
        );
        let eps: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|k| endpoint(n, i, k)).collect();
        s.slices.insert(slice_key(i), slice_json(i, &eps));
    }
    s
}

/// The service and endpoint that change number `rep` rewrites, and the endpoint's new address.
/// The measured service is left alone unless it is the only one.
fn change(n: usize, rep: usize) -> (usize, usize, Ipv4Addr) {
    let i = if n == 1 { 0 } else { (n / 2 + rep) % (n - 1) };
    (
        i,
        rep % ENDPOINTS,
        Ipv4Addr::new(10, 244, 253, rep as u8 + 1),
    )
}

/// The anchor: kube-proxy's iptables mode in nft. One linear chain with a rule per service port,
/// a chain per service that picks an endpoint chain as iptables' `statistic --mode random
/// --probability 1/(10-k)` cascade does, and a chain per endpoint that DNATs. (A `numgen random
/// mod 10 vmap { … }` per service instead took 184 s to load at 10000 services here: the kernel
/// handles many anonymous sets in one transaction in quadratic time; see docs/benchmarks.md.)
fn linear_ruleset(n: usize) -> String {
    let t = LINEAR;
    let mut out = String::with_capacity(n * 1500);
    writeln!(out, "add table ip {t}").unwrap();
    writeln!(
        out,
        "add chain ip {t} nat-output {{ type nat hook output priority -100; policy accept; }}"
    )
    .unwrap();
    writeln!(
        out,
        "add chain ip {t} nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"
    )
    .unwrap();
    writeln!(out, "add chain ip {t} services").unwrap();
    for i in 0..n {
        writeln!(out, "add chain ip {t} svc-{i}").unwrap();
        for k in 0..ENDPOINTS {
            writeln!(out, "add chain ip {t} sep-{i}-{k}").unwrap();
        }
    }
    writeln!(out, "add rule ip {t} nat-output jump services").unwrap();
    writeln!(out, "add rule ip {t} nat-prerouting jump services").unwrap();
    for i in 0..n {
        writeln!(
            out,
            "add rule ip {t} services ip daddr {} tcp dport {SERVICE_PORT} jump svc-{i}",
            vip(i)
        )
        .unwrap();
    }
    for i in 0..n {
        for k in 0..ENDPOINTS {
            let pick = if k + 1 < ENDPOINTS {
                format!("numgen random mod {} 0 ", ENDPOINTS - k)
            } else {
                String::new()
            };
            writeln!(out, "add rule ip {t} svc-{i} {pick}jump sep-{i}-{k}").unwrap();
            writeln!(out, "{}", linear_endpoint_rule(i, k, endpoint(n, i, k))).unwrap();
        }
    }
    out
}

fn linear_endpoint_rule(i: usize, k: usize, ip: Ipv4Addr) -> String {
    format!("add rule ip {LINEAR} sep-{i}-{k} meta l4proto tcp dnat to {ip}:{TARGET_PORT}")
}

/// `n` filter rules that match nothing, in an output hook: every packet walks all of them (the
/// per-packet cost of a linear ruleset, as in kernel-baselines' nft10k scenario).
fn per_packet_filter(n: usize) -> String {
    let t = PER_PACKET;
    let mut out = format!(
        "add table ip {t}\nadd chain ip {t} output {{ type filter hook output priority 0; policy accept; }}\n"
    );
    for i in 0..n {
        writeln!(
            out,
            "add rule ip {t} output ip daddr 10.200.{}.{} tcp dport {} drop",
            i / 250,
            i % 250 + 1,
            80 + i % 3
        )
        .unwrap();
    }
    out
}

fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    ns.run(f).expect("entering a benchmark namespace")
}

fn apply_in(ns: &Netns, text: &str) -> Duration {
    in_ns(ns, || {
        let start = Instant::now();
        nft::apply(text).expect("nft -f");
        start.elapsed()
    })
}

fn delete_table(ns: &Netns, table: &str) {
    in_ns(ns, || {
        let _ = nft::run("", &["delete", "table", "ip", table]);
    });
}

/// One timed sync. `render` is timed only for full syncs (to split their sync time in two).
#[derive(Default)]
struct Sample {
    parse: Duration,
    compile: Duration,
    render: Duration,
    sync: Duration,
    bytes: usize,
}

impl Sample {
    fn total(&self) -> Duration {
        self.parse + self.compile + self.sync
    }
}

/// The agent's path for the store `st`: parse what changed, compile everything, sync.
/// `SyncKind::Full` starts from a new proxy cache and parse cache (left primed in `cache`, as the
/// agent's is after its first sync) into `ns`, whose table must be absent; otherwise the sync must be
/// incremental.
fn timed_sync(
    ns: &Netns,
    proxy: &mut Proxy,
    cache: &mut (Cache, Compiler),
    st: &Store,
    kind: SyncKind,
) -> Sample {
    let facts = facts();
    let start = Instant::now();
    if kind == SyncKind::Full {
        *cache = (Cache::default(), Compiler::new());
    }
    let objects = cache.0.update(&st.services, &st.slices, service_cidr());
    let parse = start.elapsed();
    let start = Instant::now();
    let rs = cache.1.compile(&facts, &objects);
    let compile = start.elapsed();
    assert!(rs.problems.is_empty(), "{:?}", &rs.problems[..1]);
    let mut render = Duration::ZERO;
    if kind == SyncKind::Full {
        // Rendering is part of the sync; timed once more on its own.
        let start = Instant::now();
        drop(render::full(&facts, &rs));
        render = start.elapsed();
    }
    let (report, sync) = in_ns(ns, || {
        let start = Instant::now();
        let r = proxy.sync(&facts, rs).expect("sync");
        (r, start.elapsed())
    });
    assert_eq!(report.kind, kind, "{:?}", report.recovered_from);
    Sample {
        parse,
        compile,
        render,
        sync,
        bytes: report.bytes,
    }
}

struct SizeResult {
    n: usize,
    full: Vec<Sample>,
    change: Vec<Sample>,
    linear_load: Vec<Duration>,
    linear_change: Vec<Duration>,
    linear_bytes: usize,
}

/// Every measurement of one size, weft and the anchor taking turns in each repetition. Both
/// tables are left loaded (unchanged from `store(n)`) for the traffic tests.
/// Stops repeating once `budget` is spent (after at least one run): at 10000 services one run of
/// weft's full sync takes tens of seconds on this kernel.
fn measure_size(
    n: usize,
    reps: usize,
    budget: Duration,
    weft_ns: &Netns,
    linear_ns: &Netns,
) -> SizeResult {
    let started = Instant::now();
    let mut proxy = Proxy::new();
    let proxy = &mut proxy;
    let mut cache = (Cache::default(), Compiler::new());
    let cache = &mut cache;
    let base = store(n);
    let linear = linear_ruleset(n);
    let mut r = SizeResult {
        n,
        full: Vec::new(),
        change: Vec::new(),
        linear_load: Vec::new(),
        linear_change: Vec::new(),
        linear_bytes: linear.len(),
    };
    for rep in 0..reps {
        if rep > 0 && started.elapsed() > budget {
            eprintln!("  N={n}: {rep} runs fill the {} s budget", budget.as_secs());
            break;
        }
        delete_table(weft_ns, render::TABLE);
        *proxy = Proxy::new();
        r.full
            .push(timed_sync(weft_ns, proxy, cache, &base, SyncKind::Full));
        let (i, k, ip) = change(n, rep);
        let mut changed = base.clone();
        let mut eps: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|k| endpoint(n, i, k)).collect();
        eps[k] = ip;
        changed.slices.insert(slice_key(i), slice_json(i, &eps));
        r.change.push(timed_sync(
            weft_ns,
            proxy,
            cache,
            &changed,
            SyncKind::Incremental,
        ));

        delete_table(linear_ns, LINEAR);
        r.linear_load.push(apply_in(linear_ns, &linear));
        let rewrite = format!(
            "flush chain ip {LINEAR} sep-{i}-{k}\n{}\n",
            linear_endpoint_rule(i, k, ip)
        );
        r.linear_change.push(apply_in(linear_ns, &rewrite));
        eprintln!(
            "  N={n} rep {}: weft full {:.0} ms, change {:.1} ms; linear load {:.0} ms, change {:.1} ms",
            rep + 1,
            ms(r.full.last().unwrap().total()),
            ms(r.change.last().unwrap().total()),
            ms(*r.linear_load.last().unwrap()),
            ms(*r.linear_change.last().unwrap()),
        );
    }
    // Back to the base objects for the traffic tests (untimed).
    timed_sync(weft_ns, proxy, cache, &base, SyncKind::Incremental);
    let (i, k, _) = change(n, r.full.len() - 1);
    apply_in(
        linear_ns,
        &format!(
            "flush chain ip {LINEAR} sep-{i}-{k}\n{}\n",
            linear_endpoint_rule(i, k, endpoint(n, i, k))
        ),
    );
    r
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let h = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[h - 1] + v[h]) / 2
    } else {
        v[h]
    }
}

/// `median (min–max)` in ms.
fn mmm(v: Vec<Duration>) -> String {
    let min = *v.iter().min().unwrap();
    let max = *v.iter().max().unwrap();
    let m = median(v);
    let f = |d: Duration| {
        let x = ms(d);
        if x >= 100.0 {
            format!("{x:.0}")
        } else if x >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    format!("{} ({}–{})", f(m), f(min), f(max))
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A server namespace holding the endpoints' addresses, and client namespaces joined to it by a
/// veth each (client k: 10.244.(250+k).1/24, default route via the server's .2).
struct Topology {
    server: ScratchNetns,
    clients: Vec<ScratchNetns>,
}

fn topology(tags: &[&str]) -> Topology {
    let server = ScratchNetns::new(PREFIX, "server").expect("creating a namespace");
    ip(&["-n", &server.name, "link", "set", "lo", "up"]);
    for k in 0..ENDPOINTS {
        let a = format!("{}/32", server_ip(k));
        ip(&["-n", &server.name, "addr", "add", &a, "dev", "lo"]);
    }
    let mut clients = Vec::new();
    for (k, tag) in tags.iter().enumerate() {
        let c = ScratchNetns::new(PREFIX, tag).expect("creating a namespace");
        let peer = format!("c{k}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &c.name,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &server.name,
        ]);
        let net = 250 + k;
        ip(&["-n", &c.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &c.name,
            "addr",
            "add",
            &format!("10.244.{net}.1/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &c.name, "link", "set", "eth0", "up"]);
        let gw = format!("10.244.{net}.2");
        ip(&["-n", &c.name, "route", "add", "default", "via", &gw]);
        let a = format!("{gw}/24");
        ip(&["-n", &server.name, "addr", "add", &a, "dev", &peer]);
        ip(&["-n", &server.name, "link", "set", &peer, "up"]);
        clients.push(c);
    }
    Topology { server, clients }
}

/// TCP connects from `from` to `to`; each connection is closed at once.
fn connects(from: &Netns, to: SocketAddrV4, count: usize, out: &mut Vec<Duration>) {
    in_ns(from, || {
        for _ in 0..count {
            let start = Instant::now();
            let s = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
            out.push(start.elapsed());
            drop(s);
        }
    });
}

/// Median and p99 in µs.
fn latency(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p99 = ((samples.len() * 99).div_ceil(100)).min(samples.len()) - 1;
    (us(samples[samples.len() / 2]), us(samples[p99]))
}

/// One iperf3 stream (client CPU0, server CPU1, as bench/datapath); Gbit/s received.
fn iperf(client: &ScratchNetns, to: Ipv4Addr, port: u16, secs: u32) -> f64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "iperf3",
            "-c",
            &to.to_string(),
        ])
        .args(["-p", &port.to_string(), "-t", &secs.to_string()])
        .args(["-C", "cubic", "-A", "0,1", "-J"])
        .output()
        .expect("running iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
    bps.unwrap_or_else(|| {
        panic!(
            "iperf3 to {to}:{port} from {}: {} {}",
            client.name,
            v["error"],
            String::from_utf8_lossy(&out.stderr)
        )
    }) / 1e9
}

struct Args {
    reps: usize,
    connects: usize,
    sizes: Vec<usize>,
    iperf_t: u32,
    iperf_reps: usize,
    iperf: bool,
    /// Time per size after which no further repetition starts.
    budget: Duration,
    /// Write each size's nft input here instead of measuring (to reproduce a load by hand).
    dump: Option<std::path::PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        reps: 5,
        connects: 2000,
        sizes: vec![1, 1000, 10000],
        iperf_t: 3,
        iperf_reps: 3,
        iperf: true,
        budget: Duration::from_secs(100),
        dump: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => a.reps = value().parse().expect("--reps N"),
            "--connects" => a.connects = value().parse().expect("--connects N"),
            "--sizes" => {
                a.sizes = value()
                    .split(',')
                    .map(|s| s.parse().expect("--sizes 1,1000,10000"))
                    .collect()
            }
            "--iperf-t" => a.iperf_t = value().parse().expect("--iperf-t SECONDS"),
            "--iperf-reps" => a.iperf_reps = value().parse().expect("--iperf-reps N"),
            "--no-iperf" => a.iperf = false,
            "--budget" => {
                a.budget = Duration::from_secs(value().parse().expect("--budget SECONDS"))
            }
            "--dump" => a.dump = Some(value().into()),
            other => panic!(
                "unknown argument {other}; usage: services_bench [--reps 5] [--connects 2000] \
                 [--sizes 1,1000,10000] [--iperf-t 3] [--iperf-reps 3] [--no-iperf] [--budget 100] [--dump DIR]"
            ),
        }
    }
    assert!(a.reps > 0 && a.connects > 0 && !a.sizes.is_empty() && a.sizes.iter().all(|&n| n > 0));
    a
}

fn main() {
    let a = args();
    if let Some(dir) = &a.dump {
        dump(&a.sizes, dir);
        return;
    }
    let started = Instant::now();
    // Stale namespaces of an earlier, crashed run.
    ScratchNetns::sweep(PREFIX);
    let small = *a.sizes.iter().min().unwrap();
    let large = *a.sizes.iter().max().unwrap();
    // Clients: weft and the anchor at the smallest and largest size, and the anchor with a
    // per-packet filter chain (throughput only).
    let topo = topology(&[
        "weft-small",
        "weft-large",
        "linear-small",
        "linear-large",
        "perpacket",
    ]);
    let [weft_small, weft_large, linear_small, linear_large, per_packet] = &topo.clients[..] else {
        unreachable!()
    };
    let mut sizes = a.sizes.clone();
    sizes.sort();
    sizes.dedup();
    let mut results = Vec::new();
    for &n in &sizes {
        eprintln!("services: N={n} ({} repetitions)", a.reps);
        let spare;
        let (w, l): (&Netns, &Netns) = if n == small {
            (&weft_small.netns, &linear_small.netns)
        } else if n == large {
            (&weft_large.netns, &linear_large.netns)
        } else {
            spare = [
                ScratchNetns::new(PREFIX, &format!("weft-{n}")).expect("creating a namespace"),
                ScratchNetns::new(PREFIX, &format!("linear-{n}")).expect("creating a namespace"),
            ];
            (&spare[0].netns, &spare[1].netns)
        };
        results.push(measure_size(n, a.reps, a.budget, w, l));
    }

    if small == large {
        eprintln!("services: one size only; connect latency and iperf3 need two (skipped)");
        report(&a, &results, &[], &[], &[]);
        return;
    }
    // Connect latency, the four setups taking turns in batches so that they share the noise.
    let setups = [
        ("weft", small, weft_small),
        ("weft", large, weft_large),
        ("linear", small, linear_small),
        ("linear", large, linear_large),
    ];
    let listener = in_ns(&topo.server.netns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, TARGET_PORT))
    })
    .expect("listening in the server namespace");
    let stop = AtomicBool::new(false);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); setups.len()];
    let batch = 100.min(a.connects);
    let deadline = Instant::now() + Duration::from_secs(90);
    std::thread::scope(|s| {
        s.spawn(|| {
            for c in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(c);
            }
        });
        eprintln!("connect latency: {} connects per setup", a.connects);
        for &(_, n, c) in &setups {
            let mut warm = Vec::new();
            connects(
                &c.netns,
                SocketAddrV4::new(vip(n - 1), SERVICE_PORT),
                50,
                &mut warm,
            );
        }
        // The order rotates every round, so that no setup always follows the same one.
        let mut round = 0;
        while samples[0].len() < a.connects && Instant::now() < deadline {
            for j in 0..setups.len() {
                let k = (round + j) % setups.len();
                let (_, n, c) = setups[k];
                let out = &mut samples[k];
                let count = batch.min(a.connects - out.len());
                connects(
                    &c.netns,
                    SocketAddrV4::new(vip(n - 1), SERVICE_PORT),
                    count,
                    out,
                );
            }
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop.
        let _ = in_ns(&topo.server.netns, || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, TARGET_PORT))
        });
    });
    drop(listener);
    let lat: Vec<(f64, f64)> = samples.iter_mut().map(|s| latency(s)).collect();

    // Throughput through the service at the largest size.
    let mut gbits: Vec<(&str, Vec<f64>)> = Vec::new();
    if a.iperf {
        eprintln!("iperf3: loading the per-packet variant");
        apply_in(&per_packet.netns, &linear_ruleset(large));
        apply_in(&per_packet.netns, &per_packet_filter(large));
        let mut server = Command::new("ip")
            .args(["netns", "exec", &topo.server.name, "iperf3", "-s", "-p"])
            .arg(TARGET_PORT.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting iperf3 -s");
        std::thread::sleep(Duration::from_millis(500));
        let runs = [
            (
                "direct to an endpoint, no service",
                weft_small,
                server_ip(0),
                TARGET_PORT,
            ),
            ("weft", weft_large, vip(large - 1), SERVICE_PORT),
            ("linear nat", linear_large, vip(large - 1), SERVICE_PORT),
            (
                "linear nat + per-packet filter",
                per_packet,
                vip(large - 1),
                SERVICE_PORT,
            ),
        ];
        gbits = runs.iter().map(|r| (r.0, Vec::new())).collect();
        for rep in 0..a.iperf_reps {
            for (&(label, c, to, port), out) in runs.iter().zip(gbits.iter_mut()) {
                let g = iperf(c, to, port, a.iperf_t);
                eprintln!("  iperf3 rep {}: {label}: {g:.2} Gbit/s", rep + 1);
                out.1.push(g);
            }
        }
        let _ = server.kill();
        let _ = server.wait();
    }

    report(&a, &results, &setups.map(|(w, n, _)| (w, n)), &lat, &gbits);
    eprintln!("services: {:.0} s in all", started.elapsed().as_secs_f64());
}

/// Writes weft's full sync, its one-change update and the anchor for each size as nft input.
fn dump(sizes: &[usize], dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("creating the dump directory");
    let facts = facts();
    for &n in sizes {
        let base = store(n);
        let rs = compile(
            &facts,
            &parse_all(&base.services, &base.slices, service_cidr()),
        );
        let (i, k, ip) = change(n, 0);
        let mut changed = base.clone();
        let mut eps: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|k| endpoint(n, i, k)).collect();
        eps[k] = ip;
        changed.slices.insert(slice_key(i), slice_json(i, &eps));
        let rs2 = compile(
            &facts,
            &parse_all(&changed.services, &changed.slices, service_cidr()),
        );
        let files = [
            (format!("weft-full-{n}.nft"), render::full(&facts, &rs)),
            (format!("weft-change-{n}.nft"), render::diff(&rs, &rs2)),
            (format!("linear-{n}.nft"), linear_ruleset(n)),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("writing a dump");
            println!("{}", path.display());
        }
    }
}

fn report(
    a: &Args,
    results: &[SizeResult],
    setups: &[(&str, usize)],
    lat: &[(f64, f64)],
    gbits: &[(&str, Vec<f64>)],
) {
    println!(
        "services: N services x {ENDPOINTS} endpoints; median (min–max) in ms of up to {} runs \
         ({} s budget per size)",
        a.reps,
        a.budget.as_secs()
    );
    println!(
        "{:<9} {:<5} {:<24} {:<24} {:<24} {:<24}",
        "services", "runs", "weft-full-sync", "weft-one-change", "linear-load", "linear-one-change"
    );
    for r in results {
        println!(
            "{:<9} {:<5} {:<24} {:<24} {:<24} {:<24}",
            r.n,
            r.full.len(),
            mmm(r.full.iter().map(Sample::total).collect()),
            mmm(r.change.iter().map(Sample::total).collect()),
            mmm(r.linear_load.clone()),
            mmm(r.linear_change.clone()),
        );
    }
    println!();
    println!("weft phases (medians, ms; sync = render + nft -f, render also timed alone):");
    println!(
        "{:<9} {:>9} {:>9} {:>9} {:>9} {:>11} | {:>9} {:>9} {:>9} {:>9}",
        "services",
        "parse",
        "compile",
        "render",
        "sync",
        "nft bytes",
        "parse",
        "compile",
        "sync",
        "nft bytes"
    );
    for r in results {
        let f = |g: fn(&Sample) -> Duration| ms(median(r.full.iter().map(g).collect()));
        let c = |g: fn(&Sample) -> Duration| ms(median(r.change.iter().map(g).collect()));
        println!(
            "{:<9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>11} | {:>9.2} {:>9.2} {:>9.2} {:>9}",
            r.n,
            f(|s| s.parse),
            f(|s| s.compile),
            f(|s| s.render),
            f(|s| s.sync),
            r.full[0].bytes,
            c(|s| s.parse),
            c(|s| s.compile),
            c(|s| s.sync),
            r.change[0].bytes,
        );
    }
    println!(
        "linear ruleset bytes: {}",
        results
            .iter()
            .map(|r| format!("N={} {}", r.n, r.linear_bytes))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    let ratio = |i: usize, j: usize| lat[j].0 / lat[i].0;
    if !lat.is_empty() {
        println!("first-packet connect latency to the last service (median / p99, µs):");
        for (&(who, n), &(m, p)) in setups.iter().zip(lat) {
            println!("  {who:<7} N={n:<6} {m:>8.1} / {p:>8.1}");
        }
        println!(
            "  ratio N={}/N={}: weft {:.3}, linear {:.3}",
            setups[1].1,
            setups[0].1,
            ratio(0, 1),
            ratio(2, 3)
        );
    }
    if !gbits.is_empty() {
        println!();
        println!(
            "iperf3 -C cubic -t {} through the service at N={} (median of {}, Gbit/s):",
            a.iperf_t, setups[1].1, a.iperf_reps
        );
        for (label, g) in gbits {
            let mut g = g.clone();
            g.sort_by(f64::total_cmp);
            let h = g.len() / 2;
            let m = if g.len().is_multiple_of(2) {
                (g[h - 1] + g[h]) / 2.0
            } else {
                g[h]
            };
            let runs: Vec<String> = g.iter().map(|x| format!("{x:.2}")).collect();
            println!("  {label:<36} {m:>7.2}  (runs: {})", runs.join(", "));
        }
    }
    println!();
    let last = results.last().unwrap();
    let full = ms(median(last.full.iter().map(Sample::total).collect()));
    let change = ms(median(last.change.iter().map(Sample::total).collect()));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("targets at N={}:", last.n);
    println!(
        "  full sync {full:.0} ms <= 2000 ms: {} (x{:.2} of target)",
        verdict(full <= 2000.0),
        full / 2000.0
    );
    println!(
        "  one change {change:.1} ms <= 50 ms: {} (x{:.2} of target)",
        verdict(change <= 50.0),
        change / 50.0
    );
    if !lat.is_empty() {
        let r = ratio(0, 1);
        println!(
            "  connect latency N={} within 10 % of N={}: ratio {r:.3}: {}",
            setups[1].1,
            setups[0].1,
            verdict(r <= 1.10)
        );
    }
    let vs_linear = format!(
        "  vs linear at N={}: full sync / load {:.2}, one change {:.2}",
        last.n,
        full / ms(median(last.linear_load.clone())),
        change / ms(median(last.linear_change.clone())),
    );
    match lat.get(3) {
        Some(l) => println!("{vs_linear}, connect latency {:.3}", lat[1].0 / l.0),
        None => println!("{vs_linear}"),
    }
}
