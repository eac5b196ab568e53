use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Barrier;

use weft_ipam::{Allocation, Attachment, Error, Pool, Request, Store};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("weft-ipam-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn pool(subnet: &str) -> Pool {
    Pool::new(subnet.parse().unwrap(), None).unwrap()
}

fn att(id: &str) -> Attachment {
    Attachment {
        container_id: id.to_owned(),
        ifname: "eth0".to_owned(),
    }
}

fn req(a: &Attachment) -> Request<'_> {
    Request {
        attachment: a,
        fixed: None,
        pod_namespace: None,
        pod_name: None,
    }
}

fn fixed(a: &Attachment, ip: Ipv4Addr) -> Request<'_> {
    Request {
        fixed: Some(ip),
        ..req(a)
    }
}

fn alloc(store: &Store, pool: &Pool, id: &str) -> Ipv4Addr {
    let a = att(id);
    let got = store.allocate(pool, &req(&a)).unwrap();
    assert!(!got.reused);
    got.ip
}

/// Names in the store directory and its index, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .chain(fs::read_dir(dir.join("by-attachment")).unwrap())
        .map(|e| {
            let e = e.unwrap();
            let parent = e.path().parent().unwrap().file_name().unwrap().to_owned();
            let name = e.file_name().into_string().unwrap();
            if parent == "by-attachment" {
                format!("by-attachment/{name}")
            } else {
                name
            }
        })
        .collect();
    names.sort();
    names
}

/// The index entry of `<id>/eth0` is a hard link to the record of `ip`.
fn assert_linked(dir: &Path, id: &str, ip: &str) {
    let index = fs::metadata(dir.join(format!("by-attachment/{id}=eth0"))).unwrap();
    let record = fs::metadata(dir.join(ip)).unwrap();
    assert_eq!((index.dev(), index.ino()), (record.dev(), record.ino()));
    assert_eq!(record.nlink(), 2);
}

const EMPTY: [&str; 3] = ["by-attachment", "last_reserved", "lock"];

#[test]
fn open_rejects_unsafe_network_names() {
    let tmp = TempDir::new();
    for name in ["", ".", "..", "a/b", "/abs"] {
        let err = Store::open(&tmp.0, name).unwrap_err();
        assert!(
            matches!(err, Error::InvalidNetworkName { .. }),
            "{name}: {err}"
        );
    }
    let store = Store::open(&tmp.0, "pods").unwrap();
    assert_eq!(store.dir(), tmp.0.join("pods"));
    assert_eq!(files(store.dir()), ["by-attachment"]);
}

#[test]
fn allocates_in_order_and_stores_the_pod() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    let a = att("abc");
    let got = store
        .allocate(
            &pool,
            &Request {
                pod_namespace: Some("default"),
                pod_name: Some("web-0"),
                ..req(&a)
            },
        )
        .unwrap();
    assert_eq!(
        got,
        Allocation {
            ip: ip("10.244.1.2"),
            reused: false
        }
    );
    assert_eq!(alloc(&store, &pool, "def"), ip("10.244.1.3"));

    let record = store.get(&a).unwrap().unwrap();
    assert_eq!(record.ip, ip("10.244.1.2"));
    assert_eq!(record.attachment(), a);
    assert_eq!(record.pod_namespace.as_deref(), Some("default"));
    assert_eq!(record.pod_name.as_deref(), Some("web-0"));
    assert_eq!(store.get(&att("nope")).unwrap(), None);

    let on_disk = fs::read_to_string(store.dir().join("10.244.1.2")).unwrap();
    assert_eq!(
        on_disk,
        r#"{"ip":"10.244.1.2","container_id":"abc","ifname":"eth0","pod_namespace":"default","pod_name":"web-0"}"#
            .to_owned()
            + "\n"
    );
    assert_linked(store.dir(), "abc", "10.244.1.2");
    let last = fs::read_to_string(store.dir().join("last_reserved")).unwrap();
    assert_eq!(last, "10.244.1.3\n");
}

#[test]
fn repeated_allocate_returns_the_held_address() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    let a = att("abc");
    let first = store.allocate(&pool, &req(&a)).unwrap();
    let again = store.allocate(&pool, &req(&a)).unwrap();
    assert_eq!(
        again,
        Allocation {
            ip: first.ip,
            reused: true
        }
    );
    assert_eq!(store.allocate(&pool, &fixed(&a, first.ip)).unwrap(), again);

    let err = store
        .allocate(&pool, &fixed(&a, ip("10.244.1.9")))
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyHolds { .. }));
    assert_eq!(
        err.to_string(),
        "container abc/eth0 already holds 10.244.1.2; release it before requesting 10.244.1.9"
    );

    let other_if = Attachment {
        ifname: "net1".to_owned(),
        ..a.clone()
    };
    assert_ne!(store.allocate(&pool, &req(&other_if)).unwrap().ip, first.ip);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn exhaustion_names_the_subnet() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.0.0.0/29");
    let ips: Vec<_> = (0..5)
        .map(|i| alloc(&store, &pool, &format!("c{i}")))
        .collect();
    assert_eq!(
        ips,
        ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip)
    );
    let err = store.allocate(&pool, &req(&att("c5"))).unwrap_err();
    assert!(matches!(err, Error::Exhausted { capacity: 5, .. }));
    assert_eq!(
        err.to_string(),
        "no free address in 10.0.0.0/29 (5 usable, all allocated)"
    );

    let big = Store::open(&tmp.0, "big").unwrap();
    let pool = self::pool("10.244.1.0/24");
    for i in 0..253 {
        alloc(&big, &pool, &format!("y{i}"));
    }
    let err = big.allocate(&pool, &req(&att("z"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no free address in 10.244.1.0/24 (253 usable, all allocated)"
    );
    // The cursor is at the end; the search wraps around, past many taken addresses.
    big.release(&att("y98")).unwrap();
    big.release(&att("y198")).unwrap();
    assert_eq!(alloc(&big, &pool, "z"), ip("10.244.1.100"));
    assert_eq!(alloc(&big, &pool, "z2"), ip("10.244.1.200"));
}

#[test]
fn released_address_is_reused_only_after_wrapping() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.0.0.0/29");
    for id in ["a", "b", "c"] {
        alloc(&store, &pool, id);
    }
    assert_eq!(store.release(&att("b")).unwrap(), Some(ip("10.0.0.3")));
    assert_eq!(alloc(&store, &pool, "d"), ip("10.0.0.5"));
    assert_eq!(alloc(&store, &pool, "e"), ip("10.0.0.6"));
    // Wrapped: .2 is taken, .3 is the first free one.
    assert_eq!(alloc(&store, &pool, "f"), ip("10.0.0.3"));
}

#[test]
fn fixed_addresses() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    let a = att("abc");
    let got = store.allocate(&pool, &fixed(&a, ip("10.244.1.7"))).unwrap();
    assert_eq!(
        got,
        Allocation {
            ip: ip("10.244.1.7"),
            reused: false
        }
    );
    // A fixed allocation does not move the dynamic cursor.
    assert_eq!(alloc(&store, &pool, "dyn"), ip("10.244.1.2"));

    let b = att("def");
    let err = store
        .allocate(&pool, &fixed(&b, ip("10.244.1.7")))
        .unwrap_err();
    assert!(matches!(err, Error::AddressInUse { ref owner, .. } if *owner == a));
    assert_eq!(
        err.to_string(),
        "10.244.1.7 is already allocated to container abc/eth0"
    );

    let err = store
        .allocate(&pool, &fixed(&b, ip("10.9.0.5")))
        .unwrap_err();
    assert!(matches!(err, Error::OutsideSubnet { .. }));
    assert_eq!(
        err.to_string(),
        "10.9.0.5 is outside the subnet 10.244.1.0/24"
    );

    for (addr, what) in [
        ("10.244.1.0", "network address"),
        ("10.244.1.1", "gateway"),
        ("10.244.1.255", "broadcast address"),
    ] {
        let err = store.allocate(&pool, &fixed(&b, ip(addr))).unwrap_err();
        assert!(
            matches!(err, Error::ReservedAddress { what: w, .. } if w == what),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("{addr} is the {what} of 10.244.1.0/24 and cannot be allocated")
        );
    }
    assert_eq!(store.get(&b).unwrap(), None);
}

#[test]
fn release_is_idempotent_and_leaves_no_allocation_files() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    alloc(&store, &pool, "abc");
    assert_eq!(store.release(&att("abc")).unwrap(), Some(ip("10.244.1.2")));
    assert_eq!(store.release(&att("abc")).unwrap(), None);
    assert_eq!(store.release(&att("never")).unwrap(), None);
    assert_eq!(store.release(&att("not/a=name")).unwrap(), None);
    assert_eq!(files(store.dir()), EMPTY);
}

#[test]
fn invalid_attachment_is_rejected_on_allocate() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    for id in ["", "a/b", "a=b", &"x".repeat(300)] {
        let err = store
            .allocate(&pool("10.244.1.0/24"), &req(&att(id)))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidAttachment { .. }), "{err}");
    }
}

#[test]
fn list_is_sorted_by_address() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    let fixed_ips = ["10.244.1.100", "10.244.1.20", "10.244.1.3"];
    for (i, addr) in fixed_ips.iter().enumerate() {
        let a = att(&format!("f{i}"));
        store.allocate(&pool, &fixed(&a, ip(addr))).unwrap();
    }
    alloc(&store, &pool, "dyn");
    let listed: Vec<_> = store.list().unwrap().into_iter().map(|r| r.ip).collect();
    assert_eq!(
        listed,
        ["10.244.1.2", "10.244.1.3", "10.244.1.20", "10.244.1.100"].map(ip)
    );
}

#[test]
fn gc_releases_exactly_the_invalid() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    for id in ["a", "b", "c", "d"] {
        alloc(&store, &pool, id);
    }
    let released = store.gc(&[att("b"), att("d"), att("gone")]).unwrap();
    let released: Vec<_> = released
        .iter()
        .map(|r| (r.ip, r.container_id.as_str()))
        .collect();
    assert_eq!(released, [(ip("10.244.1.2"), "a"), (ip("10.244.1.4"), "c")]);
    let kept: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|r| r.container_id)
        .collect();
    assert_eq!(kept, ["b", "d"]);
    assert_eq!(store.get(&att("a")).unwrap(), None);
    assert!(store.get(&att("b")).unwrap().is_some());
    assert!(store.gc(&[att("b"), att("d")]).unwrap().is_empty());
    assert_eq!(store.gc(&[]).unwrap().len(), 2);
    assert_eq!(files(store.dir()), EMPTY);
}

#[test]
fn corrupt_record_is_reported_with_its_path() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    alloc(&store, &pool, "abc");
    let record = store.dir().join("10.244.1.2");
    fs::write(&record, "{\"ip\":\"10.2").unwrap();

    let index = store.dir().join("by-attachment/abc=eth0");
    for (err, path) in [
        (store.list().unwrap_err(), &record),
        // Found through the index entry, a hard link to the same file.
        (store.get(&att("abc")).unwrap_err(), &index),
        (
            store.allocate(&pool, &req(&att("abc"))).unwrap_err(),
            &index,
        ),
    ] {
        assert!(
            matches!(err, Error::Corrupt { path: ref p, .. } if p == path),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("corrupt IPAM file {}: ", path.display())),
            "{err}"
        );
    }
    // The damaged file still reserves its address.
    assert_eq!(alloc(&store, &pool, "def"), ip("10.244.1.3"));

    // DEL gets through; gc then removes the record nobody links to any more.
    assert_eq!(store.release(&att("abc")).unwrap(), None);
    assert!(store.gc(&[att("def")]).unwrap().is_empty());
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(!record.exists());

    // A record filed under the wrong address is corrupt too.
    let misfiled = store.dir().join("10.244.1.9");
    fs::write(&misfiled, fs::read(store.dir().join("10.244.1.3")).unwrap()).unwrap();
    assert!(matches!(store.list().unwrap_err(), Error::Corrupt { path, .. } if path == misfiled));
}

#[test]
fn gc_removes_unreadable_records_nobody_claims() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    fs::write(store.dir().join("10.244.1.50"), "").unwrap();
    fs::write(store.dir().join("by-attachment/x=eth0"), "garbage").unwrap();
    assert!(store.gc(&[att("x")]).unwrap().is_empty());
    assert_eq!(files(store.dir()), ["by-attachment", "lock"]);
}

#[test]
fn missing_index_entry_is_repaired() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    for id in ["a", "b"] {
        alloc(&store, &pool, id);
    }
    let index = |id: &str| store.dir().join(format!("by-attachment/{id}=eth0"));
    fs::remove_file(index("a")).unwrap();
    fs::remove_file(index("b")).unwrap();

    // The unindexed records keep their addresses.
    assert_eq!(alloc(&store, &pool, "c"), ip("10.244.1.4"));
    assert_eq!(store.list().unwrap().len(), 3);
    // A fixed request for one's own address restores the entry.
    let a = att("a");
    let got = store.allocate(&pool, &fixed(&a, ip("10.244.1.2"))).unwrap();
    assert_eq!(
        got,
        Allocation {
            ip: ip("10.244.1.2"),
            reused: true
        }
    );
    assert_linked(store.dir(), "a", "10.244.1.2");
    // gc restores it for a valid attachment.
    assert!(store
        .gc(&[att("a"), att("b"), att("c")])
        .unwrap()
        .is_empty());
    assert_linked(store.dir(), "b", "10.244.1.3");
    assert_eq!(store.release(&att("b")).unwrap(), Some(ip("10.244.1.3")));
}

#[test]
fn dangling_or_stale_index_entry_is_repaired() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    let pool = pool("10.244.1.0/24");
    alloc(&store, &pool, "a");
    let a_index = store.dir().join("by-attachment/a=eth0");

    // Points at a record that is gone: as if a release was interrupted.
    fs::remove_file(store.dir().join("10.244.1.2")).unwrap();
    assert_eq!(store.get(&att("a")).unwrap(), None);
    assert_eq!(store.release(&att("a")).unwrap(), None);
    assert!(!a_index.exists());

    // Points at someone else's record: the entry is dropped, the other's record left alone.
    alloc(&store, &pool, "b");
    fs::hard_link(store.dir().join("10.244.1.3"), &a_index).unwrap();
    assert_eq!(store.get(&att("a")).unwrap(), None);
    assert_eq!(alloc(&store, &pool, "a"), ip("10.244.1.4"));
    assert_eq!(store.release(&att("a")).unwrap(), Some(ip("10.244.1.4")));
    assert_eq!(store.get(&att("b")).unwrap().unwrap().ip, ip("10.244.1.3"));
}

#[test]
fn check_writable_leaves_nothing_behind() {
    let tmp = TempDir::new();
    let store = Store::open(&tmp.0, "pods").unwrap();
    store.check_writable().unwrap();
    assert_eq!(files(store.dir()), ["by-attachment", "lock"]);
}

#[test]
fn concurrent_allocate_and_release() {
    const N: usize = 64;
    let tmp = TempDir::new();
    let pool = pool("10.244.1.0/24");
    let barrier = Barrier::new(N);
    let run = |f: &(dyn Fn(&Store, Attachment) -> Option<Ipv4Addr> + Sync)| -> Vec<Ipv4Addr> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..N)
                .map(|i| {
                    let barrier = &barrier;
                    let dir = &tmp.0;
                    s.spawn(move || {
                        let store = Store::open(dir, "pods").unwrap();
                        barrier.wait();
                        f(&store, att(&format!("c{i}")))
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        })
    };

    let mut ips = run(&|store, a| Some(store.allocate(&pool, &req(&a)).unwrap().ip));
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), N);

    let released = run(&|store, a| store.release(&a).unwrap());
    assert_eq!(released.len(), N);
    let store = Store::open(&tmp.0, "pods").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_eq!(files(store.dir()), EMPTY);
}
