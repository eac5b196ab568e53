//! Cost of one ADD/DEL as the plugin pays it (open the store, allocate or release), against a
//! baseline of creating, writing and removing one file per address.
//! Run with `cargo bench -p weft-ipam`.

use std::fs;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use weft_ipam::{Attachment, Pool, Request, Store};

const ROUNDS: usize = 20;

fn main() {
    let dir = std::env::temp_dir().join(format!("weft-ipam-bench-{}", std::process::id()));
    let pool = Pool::new("10.244.1.0/24".parse().unwrap(), None).unwrap();
    let atts: Vec<Attachment> = (0..pool.capacity())
        .map(|i| Attachment {
            container_id: format!("{i:064x}"),
            ifname: "eth0".to_owned(),
        })
        .collect();
    let ops = ROUNDS * atts.len();

    // The floor for any layout with a file per address (host-local's too): create and remove
    // as many distinct files, the same way round.
    let scratch = dir.join("baseline");
    fs::create_dir_all(&scratch).unwrap();
    let start = Instant::now();
    for _ in 0..ROUNDS {
        for i in 0..atts.len() {
            let mut f = fs::File::create_new(scratch.join(format!("10.244.1.{i}"))).unwrap();
            f.write_all(b"{\"ip\":\"10.244.1.2\"}\n").unwrap();
        }
        for i in 0..atts.len() {
            fs::remove_file(scratch.join(format!("10.244.1.{i}"))).unwrap();
        }
    }
    let baseline = start.elapsed();

    let (mut add, mut full, mut del) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for a in &atts {
            let store = Store::open(&dir, "pods").unwrap();
            black_box(store.allocate(&pool, &request(a)).unwrap());
        }
        add += start.elapsed();
        // Worst case: the one free address is the one just before the cursor, so the search
        // tries every other address first.
        let last = atts.last().unwrap();
        Store::open(&dir, "pods").unwrap().release(last).unwrap();
        let start = Instant::now();
        let store = Store::open(&dir, "pods").unwrap();
        black_box(store.allocate(&pool, &request(last)).unwrap());
        full += start.elapsed();
        let start = Instant::now();
        for a in &atts {
            black_box(Store::open(&dir, "pods").unwrap().release(a).unwrap());
        }
        del += start.elapsed();
    }
    fs::remove_dir_all(&dir).unwrap();

    let per_op = |d: Duration| d / ops as u32;
    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    println!("baseline, create+remove a file: {:?}/op", per_op(baseline));
    let add_line = format!("{:?}/op, {:.1}x baseline", per_op(add), ratio(add));
    println!("open+allocate, filling a /24:   {add_line}");
    println!(
        "open+allocate, one free left:   {:?}/op",
        full / ROUNDS as u32
    );
    let del_line = format!("{:?}/op, {:.1}x baseline", per_op(del), ratio(del));
    println!("open+release:                   {del_line}");
}

fn request(a: &Attachment) -> Request<'_> {
    Request {
        attachment: a,
        fixed: None,
        pod_namespace: Some("default"),
        pod_name: Some("web"),
    }
}
