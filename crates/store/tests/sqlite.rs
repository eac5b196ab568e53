//! The conformance suite on SQLite, and what only the SQLite store has.

mod conformance;

use std::time::Duration;

use conformance::{next_event, Backend, ScratchDir};
use futures::StreamExt;
use weft_store::{AnyStore, Error, SqliteOptions, SqliteStore, Store};

/// One store file; every `open` is another handle on it, as another agent process would open.
struct Sqlite {
    dir: ScratchDir,
}

impl Sqlite {
    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("store.db")
    }
}

impl Backend for Sqlite {
    type S = SqliteStore;
    const TTL: Duration = Duration::from_secs(1);

    async fn start() -> Self {
        Sqlite {
            dir: ScratchDir::new("sqlite"),
        }
    }

    async fn open(&self) -> SqliteStore {
        SqliteStore::open(self.file()).await.unwrap()
    }
}

conformance::suite!(Sqlite);

#[tokio::test]
async fn any_store_opens_by_url() {
    let dir = ScratchDir::new("url");
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let s = AnyStore::open(&url).await.unwrap();
    assert!(matches!(s, AnyStore::Sqlite(_)));
    let r = s.put("/k", b"v", None).await.unwrap();
    assert_eq!(r, 1, "an empty SQLite store's first write is revision 1");

    for bad in [
        "mysql://x",
        "sqlite://",
        "etcd://",
        "etcd://host:1/path",
        "/var/lib/weft/store.db",
    ] {
        match AnyStore::open(bad).await {
            Err(Error::Other(m)) => assert!(m.contains(bad), "{m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let missing = format!("sqlite://{}", dir.path().join("no/such/dir/s.db").display());
    let err = AnyStore::open(&missing).await.unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = ScratchDir::new("reopen");
    let file = dir.path().join("s.db");
    let s = SqliteStore::open(&file).await.unwrap();
    let r = s.put("/k", b"v", None).await.unwrap();
    let lease = s.grant(Duration::from_secs(60)).await.unwrap();
    drop(s);
    let s = SqliteStore::open(&file).await.unwrap();
    assert_eq!(s.get("/k").await.unwrap().unwrap().mod_revision, r);
    s.keepalive(lease).await.unwrap();
    assert!(s.put("/k2", b"v", None).await.unwrap() > r);
}

#[tokio::test]
async fn history_is_compacted_automatically() {
    let dir = ScratchDir::new("autocompact");
    let options = SqliteOptions {
        retain_revisions: 100,
        ..SqliteOptions::default()
    };
    let s = SqliteStore::open_with(dir.path().join("s.db"), options)
        .await
        .unwrap();
    for i in 0..1000 {
        s.put(&format!("/k/{}", i % 10), b"v", None).await.unwrap();
    }
    let mut w = s.watch("/k/", 0);
    match tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
    {
        Some(Err(Error::Compacted { compacted, .. })) => assert_eq!(compacted, 900),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let (kvs, rev) = s.list("/k/").await.unwrap();
    assert_eq!((kvs.len(), rev), (10, 1000));
    let mut w = s.watch("/k/", 950);
    assert_eq!(next_event(&mut w).await.revision(), 951);
}

#[tokio::test]
async fn agents_starting_together_share_a_new_file() {
    let dir = ScratchDir::new("together");
    let file = dir.path().join("s.db");
    let opens = (0..8).map(|_| SqliteStore::open(&file));
    let stores: Vec<SqliteStore> = futures::future::try_join_all(opens).await.unwrap();
    let r = stores[3].put("/k", b"v", None).await.unwrap();
    for s in &stores {
        assert_eq!(s.get("/k").await.unwrap().unwrap().mod_revision, r);
    }
}
