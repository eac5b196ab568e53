//! The contract every [`Store`] keeps, as one suite run against each implementation. A backend
//! provides fresh, empty stores; `suite!(Backend)` makes one `#[tokio::test]` per case.

#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use weft_store::{Error, Event, KeyValue, Revision, Store, WatchStream};

mod scratch;
pub use scratch::ScratchDir;

/// Where the stores under test come from: `start` makes a new empty store (a file, a server),
/// `open` a new independent handle on it, as another agent process would have.
pub trait Backend: Send + Sync + Sized + 'static {
    type S: Store + Clone;
    /// The lease TTL the tests use: etcd's minimum is 2 s with its default timing.
    const TTL: Duration;
    fn start() -> impl Future<Output = Self> + Send;
    fn open(&self) -> impl Future<Output = Self::S> + Send;
}

/// Every wait in the suite ends by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub async fn next_event(w: &mut WatchStream) -> Event {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

pub async fn no_event(w: &mut WatchStream, d: Duration) {
    if let Ok(item) = tokio::time::timeout(d, w.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

fn put_event(e: &Event) -> &KeyValue {
    match e {
        Event::Put(kv) => kv,
        other => panic!("expected a put, got {other:?}"),
    }
}

fn assert_delete(e: &Event, key: &str) -> Revision {
    match e {
        Event::Delete {
            key: k,
            mod_revision,
        } if k == key => *mod_revision,
        other => panic!("expected the deletion of {key}, got {other:?}"),
    }
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

pub async fn put_get_list_delete<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    assert_eq!(s.get("/a/x").await.unwrap(), None);

    let r1 = s.put("/a/x", b"1", None).await.unwrap();
    let kv = s.get("/a/x").await.unwrap().unwrap();
    assert_eq!(
        kv,
        KeyValue {
            key: "/a/x".into(),
            value: b"1".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            lease: None
        }
    );
    let r2 = s.put("/a/x", b"2", None).await.unwrap();
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let kv = s.get("/a/x").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"2"[..], r1, r2)
    );

    let mut last = r2;
    for key in ["/ab", "/a/c", "/a", "/a/", "/a/b/deep", "/b"] {
        let r = s.put(key, key.as_bytes(), None).await.unwrap();
        assert!(r > last);
        last = r;
    }
    let (kvs, rev) = s.list("/a/").await.unwrap();
    assert_eq!(
        keys(&kvs),
        ["/a/", "/a/b/deep", "/a/c", "/a/x"],
        "sorted, and /ab and /a excluded"
    );
    assert_eq!(rev, last, "a list is taken at the store's revision");
    assert_eq!(kvs[3].value, b"2");
    let (all, _) = s.list("").await.unwrap();
    assert_eq!(
        keys(&all),
        ["/a", "/a/", "/a/b/deep", "/a/c", "/a/x", "/ab", "/b"]
    );
    assert!(s.list("/nothing/").await.unwrap().0.is_empty());

    assert!(s.delete("/a/x").await.unwrap());
    assert!(
        !s.delete("/a/x").await.unwrap(),
        "a second delete finds nothing"
    );
    assert_eq!(s.get("/a/x").await.unwrap(), None);
    let (kvs, rev) = s.list("/a/").await.unwrap();
    assert_eq!(keys(&kvs), ["/a/", "/a/b/deep", "/a/c"]);
    assert!(rev > last, "a delete is a revision");

    let r3 = s.put("/a/x", b"again", None).await.unwrap();
    let kv = s.get("/a/x").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r3, r3),
        "a re-created key is new"
    );
}

pub async fn compare_and_swap<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    let k = "/weft/leases/10.244.1.0-24";
    let r1 = s
        .cas(k, 0, b"node-a", None)
        .await
        .unwrap()
        .expect("create-only on an absent key");
    assert_eq!(
        s.cas(k, 0, b"node-b", None).await.unwrap(),
        None,
        "create-only on a present key"
    );
    let r2 = s
        .cas(k, r1, b"node-a2", None)
        .await
        .unwrap()
        .expect("swap at the current revision");
    assert!(r2 > r1);
    assert_eq!(
        s.cas(k, r1, b"stale", None).await.unwrap(),
        None,
        "swap at a stale revision"
    );
    let kv = s.get(k).await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.create_revision),
        (&b"node-a2"[..], r2, r1)
    );

    assert!(!s.cad(k, r1).await.unwrap(), "delete at a stale revision");
    assert!(!s.cad(k, 0).await.unwrap(), "0 never matches a present key");
    assert!(s.get(k).await.unwrap().is_some());
    assert!(s.cad(k, r2).await.unwrap());
    assert_eq!(s.get(k).await.unwrap(), None);
    assert!(!s.cad(k, r2).await.unwrap(), "nothing left to delete");
    assert_eq!(
        s.cas(k, r2, b"x", None).await.unwrap(),
        None,
        "a deleted key is absent, not at r2"
    );
    assert!(s.cas(k, 0, b"node-c", None).await.unwrap().is_some());
}

pub async fn watch_from_revision<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    let (_, r0) = s.list("/w/").await.unwrap();
    let ra = s.put("/w/a", b"1", None).await.unwrap();
    let rb = s.put("/w/b", b"2", None).await.unwrap();
    s.put("/wx", b"outside", None).await.unwrap();
    s.put("/other", b"outside", None).await.unwrap();
    assert!(s.delete("/w/a").await.unwrap());
    let rc = s.put("/w/c", b"3", None).await.unwrap();

    // Everything after r0 that happened before the watch, in order, then what comes next.
    let mut w = s.watch("/w/", r0);
    let e = next_event(&mut w).await;
    let kv = put_event(&e);
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
        ("/w/a", &b"1"[..], ra)
    );
    assert_eq!(kv.create_revision, ra);
    assert_eq!(put_event(&next_event(&mut w).await).mod_revision, rb);
    let rd = assert_delete(&next_event(&mut w).await, "/w/a");
    assert!(rb < rd && rd < rc);
    assert_eq!(put_event(&next_event(&mut w).await).mod_revision, rc);
    no_event(&mut w, Duration::from_millis(300)).await;
    let re = s.put("/w/b", b"4", None).await.unwrap();
    let e = next_event(&mut w).await;
    let kv = put_event(&e);
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
        ("/w/b", &b"4"[..], re)
    );
    assert_eq!(kv.create_revision, rb);

    // From the middle of the history: strictly after `after`.
    let mut w2 = s.watch("/w/", rb);
    assert_delete(&next_event(&mut w2).await, "/w/a");
    assert_eq!(put_event(&next_event(&mut w2).await).mod_revision, rc);
    assert_eq!(put_event(&next_event(&mut w2).await).mod_revision, re);

    // From now: only new changes; an empty prefix sees every key.
    let (_, now) = s.list("").await.unwrap();
    let mut w3 = s.watch("", now);
    s.put("/zz", b"5", None).await.unwrap();
    assert_eq!(next_event(&mut w3).await.key(), "/zz");
}

pub async fn watch_catches_up_in_order<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    let (_, r0) = s.list("/many/").await.unwrap();
    // More than one poll batch of the SQLite store.
    let n = 700;
    for i in 0..n {
        s.put(&format!("/many/{i:04}"), b"v", None).await.unwrap();
    }
    let mut w = s.watch("/many/", r0);
    let mut last = r0;
    for i in 0..n {
        let e = next_event(&mut w).await;
        assert_eq!(e.key(), format!("/many/{i:04}"));
        assert!(e.revision() > last);
        last = e.revision();
    }
    no_event(&mut w, Duration::from_millis(200)).await;
}

pub async fn watch_after_compaction<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    for i in 0..3 {
        s.put("/c/k", format!("{i}").as_bytes(), None)
            .await
            .unwrap();
    }
    let r = s.put("/c/other", b"x", None).await.unwrap();
    s.compact(r).await.unwrap();
    s.compact(r).await.unwrap();
    assert!(s.compact(r + 100).await.is_err(), "compacting the future");

    let mut w = s.watch("/c/", 0);
    match tokio::time::timeout(WAIT, w.next()).await.expect("bounded") {
        Some(Err(Error::Compacted {
            requested,
            compacted,
        })) => {
            assert_eq!((requested, compacted), (0, r));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, w.next())
            .await
            .expect("bounded")
            .is_none(),
        "then it ends"
    );

    // Current values survive; the relist-and-watch path works.
    let (kvs, rev) = s.list("/c/").await.unwrap();
    assert_eq!(keys(&kvs), ["/c/k", "/c/other"]);
    assert_eq!(kvs[0].value, b"2");
    let mut w = s.watch("/c/", rev);
    let rn = s.put("/c/k", b"3", None).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), rn);
    // A watch from just before the compaction point still has all it needs.
    let mut w = s.watch("/c/", r - 1);
    assert_eq!(next_event(&mut w).await.revision(), r);
}

pub async fn lease_expires<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    let started = Instant::now();
    let lease = s.grant(B::TTL).await.unwrap();
    let (_, r0) = s.list("/l/").await.unwrap();
    s.put("/l/a", b"a", Some(lease)).await.unwrap();
    s.put("/l/b", b"b", Some(lease)).await.unwrap();
    s.put("/l/keep", b"k", None).await.unwrap();
    assert_eq!(s.get("/l/a").await.unwrap().unwrap().lease, Some(lease));
    assert_eq!(s.get("/l/keep").await.unwrap().unwrap().lease, None);

    let mut w = s.watch("/l/", r0);
    for key in ["/l/a", "/l/b", "/l/keep"] {
        assert_eq!(next_event(&mut w).await.key(), key);
    }
    // Both leased keys vanish as delete events, after the TTL and without anyone writing.
    let mut gone = vec![];
    for _ in 0..2 {
        match next_event(&mut w).await {
            Event::Delete { key, .. } => gone.push(key),
            other => panic!("expected a deletion, got {other:?}"),
        }
    }
    gone.sort();
    assert_eq!(gone, ["/l/a", "/l/b"]);
    assert!(
        started.elapsed() >= B::TTL / 2,
        "deleted before its TTL: {:?}",
        started.elapsed()
    );
    assert_eq!(s.get("/l/a").await.unwrap(), None);
    assert_eq!(keys(&s.list("/l/").await.unwrap().0), ["/l/keep"]);

    assert_eq!(s.keepalive(lease).await, Err(Error::LeaseNotFound(lease)));
    assert_eq!(
        s.put("/l/c", b"c", Some(lease)).await,
        Err(Error::LeaseNotFound(lease))
    );
    assert_eq!(
        s.cas("/l/c", 0, b"c", Some(lease)).await,
        Err(Error::LeaseNotFound(lease))
    );
    assert_eq!(s.get("/l/c").await.unwrap(), None);
    s.revoke(lease)
        .await
        .expect("revoking a gone lease succeeds");
}

pub async fn lease_keepalive_and_revoke<B: Backend>() {
    let b = B::start().await;
    let s = b.open().await;
    let lease = s.grant(B::TTL).await.unwrap();
    s.put("/l/a", b"a", Some(lease)).await.unwrap();
    // Re-put without a lease: detached, so it outlives the lease.
    s.put("/l/detached", b"d", Some(lease)).await.unwrap();
    s.put("/l/detached", b"d", None).await.unwrap();

    let until = Instant::now() + B::TTL * 3;
    while Instant::now() < until {
        s.keepalive(lease).await.unwrap();
        assert!(
            s.get("/l/a").await.unwrap().is_some(),
            "kept alive, it stays"
        );
        tokio::time::sleep(B::TTL / 4).await;
    }

    let (_, rev) = s.list("/l/").await.unwrap();
    let mut w = s.watch("/l/", rev);
    s.revoke(lease).await.unwrap();
    assert_delete(&next_event(&mut w).await, "/l/a");
    assert_eq!(s.get("/l/a").await.unwrap(), None);
    assert!(s.get("/l/detached").await.unwrap().is_some());
    assert_eq!(s.keepalive(lease).await, Err(Error::LeaseNotFound(lease)));
    s.revoke(lease).await.unwrap();
    no_event(&mut w, Duration::from_millis(300)).await;

    let other = s.grant(B::TTL).await.unwrap();
    assert_ne!(other, lease, "a lease id is not reused");
}

pub async fn two_handles<B: Backend>() {
    let b = B::start().await;
    let (a, c) = (b.open().await, b.open().await);
    let (_, r0) = c.list("/two/").await.unwrap();
    let mut wc = c.watch("/two/", r0);
    let mut wa = a.watch("/two/", r0);

    let r1 = a.put("/two/x", b"from a", None).await.unwrap();
    assert_eq!(c.get("/two/x").await.unwrap().unwrap().mod_revision, r1);
    assert_eq!(next_event(&mut wc).await.revision(), r1);
    let r2 = c.cas("/two/x", r1, b"from c", None).await.unwrap().unwrap();
    assert_eq!(a.get("/two/x").await.unwrap().unwrap().value, b"from c");
    assert_eq!(next_event(&mut wa).await.revision(), r1);
    assert_eq!(next_event(&mut wa).await.revision(), r2);
    assert_eq!(next_event(&mut wc).await.revision(), r2);

    // Leases are the store's, not the handle's.
    let lease = a.grant(B::TTL).await.unwrap();
    a.put("/two/leased", b"l", Some(lease)).await.unwrap();
    c.keepalive(lease).await.unwrap();
    c.revoke(lease).await.unwrap();
    assert_eq!(next_event(&mut wa).await.key(), "/two/leased");
    assert_delete(&next_event(&mut wa).await, "/two/leased");
    assert_eq!(a.get("/two/leased").await.unwrap(), None);
    assert_eq!(a.keepalive(lease).await, Err(Error::LeaseNotFound(lease)));
}

pub async fn cas_race<B: Backend>() {
    let b = B::start().await;
    let mut handles = Vec::new();
    for _ in 0..20 {
        handles.push(b.open().await);
    }
    let key = "/weft/leases/10.244.7.0-24";
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(handles.len()));
    let tasks: Vec<_> = handles
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let won = s
                    .cas(key, 0, format!("node-{i}").as_bytes(), None)
                    .await
                    .unwrap();
                (i, won)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (i, won) = tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .unwrap();
        if let Some(rev) = won {
            winners.push((i, rev));
        }
    }
    assert_eq!(winners.len(), 1, "exactly one wins: {winners:?}");
    let s = b.open().await;
    let kv = s.get(key).await.unwrap().unwrap();
    assert_eq!(kv.value, format!("node-{}", winners[0].0).as_bytes());
    assert_eq!(kv.mod_revision, winners[0].1);
}

/// One `#[tokio::test]` per case of the suite, for the backend type given.
macro_rules! suite {
    ($backend:ty) => {
        conformance::suite!($backend:
            put_get_list_delete compare_and_swap watch_from_revision watch_catches_up_in_order
            watch_after_compaction lease_expires lease_keepalive_and_revoke two_handles cas_race);
    };
    ($backend:ty: $($case:ident)+) => {
        $(
            #[tokio::test]
            async fn $case() {
                let run = conformance::$case::<$backend>();
                tokio::time::timeout(std::time::Duration::from_secs(120), run)
                    .await
                    .expect(concat!(stringify!($case), " did not finish within 120 s"));
            }
        )+
    };
}
pub(crate) use suite;
