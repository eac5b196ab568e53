//! Weft's cluster store: one revisioned key-value contract with prefix watches and TTL leases
//! (etcd's semantics), implemented on an embedded SQLite file ([`SqliteStore`]) and on etcd
//! ([`EtcdStore`]). [`AnyStore`] picks one from a URL at run time.
//!
//! The contract, in short (docs/store.md has it in full):
//! - Every change (put, delete, a key vanishing with its lease) gets a store-wide
//!   [`Revision`], strictly increasing. A key's `mod_revision` is the revision of its last change,
//!   its `create_revision` that of the put that created it.
//! - Compare-and-swap and compare-and-delete compare a key's `mod_revision`; `0` stands for
//!   "absent".
//! - [`Store::watch`] streams the changes under a prefix after a revision, in revision order,
//!   including changes made before the watch was opened. It reconnects and resumes by itself. If
//!   the history it needs was compacted it ends with [`Error::Compacted`]: list again, then watch
//!   from the list's revision.
//! - Leases have a TTL; a key written with a lease is deleted (a normal delete event) when the
//!   lease expires or is revoked.

mod any;
mod error;
mod etcd;
mod sqlite;

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;

pub use any::AnyStore;
pub use error::{Error, Result};
pub use etcd::{EtcdOptions, EtcdStore};
pub use sqlite::{SqliteOptions, SqliteStore};

/// A store-wide logical clock: every change gets the next one. An empty SQLite store is at 0
/// (its first write is revision 1); an empty etcd is at 1 (its first write is 2).
pub type Revision = i64;

/// A lease's id, as handed out by [`Store::grant`].
pub type LeaseId = i64;

/// A key's current value and its change history in brief.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the put that created the key (after its latest absence).
    pub create_revision: Revision,
    /// The revision of the key's latest change: what [`Store::cas`] and [`Store::cad`] compare.
    pub mod_revision: Revision,
    /// The lease the key is attached to: the key goes when the lease does.
    pub lease: Option<LeaseId>,
}

/// One change to one key, as a watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or its value replaced; `mod_revision` is the revision of the change.
    Put(KeyValue),
    /// The key was deleted, explicitly or because its lease expired or was revoked.
    Delete { key: String, mod_revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change. Several events may share one: etcd deletes all the keys of an
    /// expired lease in one revision.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// The changes under a prefix, in revision order. An `Err` is always the last item: either
/// [`Error::Compacted`] (list again and watch from the list's revision) or an error that retrying
/// cannot fix. Dropping the stream stops the watch.
pub type WatchStream = BoxStream<'static, Result<Event>>;

/// A revisioned key-value store with prefix watches and TTL leases, with etcd's semantics.
///
/// Keys are UTF-8 strings compared bytewise. A prefix `"/a/"` matches `"/a/x"` but not `"/ab"`;
/// the empty prefix matches every key. An [`Error::Unavailable`] from a write means its outcome
/// is unknown: read the key again before retrying a compare-and-swap.
pub trait Store: Send + Sync + 'static {
    /// The key's current value, or `None` if it does not exist.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;

    /// All keys under `prefix`, sorted by key, and the store revision they were read at (the
    /// revision to watch from to see every later change).
    fn list(&self, prefix: &str) -> impl Future<Output = Result<(Vec<KeyValue>, Revision)>> + Send;

    /// Creates or replaces the key; returns the revision of the change. With `lease`, the key is
    /// attached to that lease ([`Error::LeaseNotFound`] if it has expired); without, it is
    /// detached from any lease it had.
    fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision>> + Send;

    /// Compare-and-swap: writes the key only if its current `mod_revision` is `expected`
    /// (`0`: only if the key is absent). `Ok(Some(revision))` if written, `Ok(None)` if the
    /// comparison failed.
    fn cas(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Option<Revision>>> + Send;

    /// Deletes the key; `false` if it did not exist.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Compare-and-delete: deletes the key only if its current `mod_revision` is `expected`;
    /// `false` if it did not (absent, or changed since).
    fn cad(&self, key: &str, expected: Revision) -> impl Future<Output = Result<bool>> + Send;

    /// Changes to keys under `prefix` with a revision greater than `after`, in revision order:
    /// first those already in the history, then new ones as they happen. Survives disconnects and
    /// restarts of the server, resuming after the last revision it delivered.
    fn watch(&self, prefix: &str, after: Revision) -> WatchStream;

    /// A new lease that expires `ttl` after its grant or latest keepalive. etcd rounds `ttl` up
    /// to whole seconds and to its minimum TTL (2 s with its default timing).
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;

    /// Restarts the lease's TTL; [`Error::LeaseNotFound`] once it has expired or been revoked.
    fn keepalive(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;

    /// Ends the lease now and deletes its keys. Revoking a lease that is already gone succeeds.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;

    /// Discards the history before `revision`: a watch from `after < revision - 1` then fails
    /// with [`Error::Compacted`]. Current values are kept. Compacting to a revision that is
    /// already compacted succeeds; to one in the future is an error.
    fn compact(&self, revision: Revision) -> impl Future<Output = Result<()>> + Send;
}

/// The first key after every key that starts with `prefix`, or `None` if no such key exists
/// (the prefix is empty). Keys are UTF-8, which never contains the byte 0xFF, so incrementing the
/// last byte never overflows.
pub(crate) fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    let last = end.last_mut()?;
    *last += 1;
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end("/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(""), None);
        let end = prefix_end("/a/").unwrap();
        assert!(b"/a/zzz".as_slice() < end.as_slice());
        assert!(b"/ab".as_slice() > end.as_slice());
    }
}
