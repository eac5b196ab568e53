use std::time::Duration;

use crate::{
    Error, EtcdOptions, EtcdStore, KeyValue, LeaseId, Result, Revision, SqliteStore, Store,
    WatchStream,
};

/// The store named by a URL, chosen at run time.
#[derive(Clone, Debug)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Etcd(EtcdStore),
}

impl AnyStore {
    /// Opens the store at `url`:
    /// - `sqlite:///var/lib/weft/store.db`: the SQLite file at that path (created if absent;
    ///   `sqlite://relative/path.db` is relative to the working directory);
    /// - `etcd://127.0.0.1:2379` or `etcd://10.0.0.1:2379,10.0.0.2:2379`: etcd members over
    ///   plain HTTP/2;
    /// - `etcd+unix:///run/weft/etcd.sock`: an etcd member on that unix socket.
    pub async fn open(url: &str) -> Result<Self> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad_url(url));
            }
            return SqliteStore::open(path).await.map(AnyStore::Sqlite);
        }
        if let Some(path) = url.strip_prefix("etcd+unix://") {
            if path.is_empty() {
                return Err(bad_url(url));
            }
            return EtcdStore::connect_unix(path, EtcdOptions::default())
                .await
                .map(AnyStore::Etcd);
        }
        if let Some(hosts) = url.strip_prefix("etcd://") {
            let endpoints: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
            if endpoints.is_empty() || endpoints.iter().any(|h| h.contains('/')) {
                return Err(bad_url(url));
            }
            return EtcdStore::connect(&endpoints).await.map(AnyStore::Etcd);
        }
        Err(bad_url(url))
    }
}

fn bad_url(url: &str) -> Error {
    Error::Other(format!(
        "store URL {url:?}: expected sqlite:///path/to/file.db, etcd://host:port[,host:port…] \
         or etcd+unix:///path/to/socket"
    ))
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call,
            AnyStore::Etcd($s) => $call,
        }
    };
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        dispatch!(self, s => s.get(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        dispatch!(self, s => s.list(prefix).await)
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        dispatch!(self, s => s.put(key, value, lease).await)
    }

    async fn cas(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<Revision>> {
        dispatch!(self, s => s.cas(key, expected, value, lease).await)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        dispatch!(self, s => s.delete(key).await)
    }

    async fn cad(&self, key: &str, expected: Revision) -> Result<bool> {
        dispatch!(self, s => s.cad(key, expected).await)
    }

    fn watch(&self, prefix: &str, after: Revision) -> WatchStream {
        dispatch!(self, s => s.watch(prefix, after))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        dispatch!(self, s => s.grant(ttl).await)
    }

    async fn keepalive(&self, lease: LeaseId) -> Result<()> {
        dispatch!(self, s => s.keepalive(lease).await)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        dispatch!(self, s => s.revoke(lease).await)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        dispatch!(self, s => s.compact(revision).await)
    }
}
