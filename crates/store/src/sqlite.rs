//! The store on one SQLite file, after k3s's kine: every change appends a row to a log whose
//! row id is the revision, so the log is at once the current state (a key's latest row) and the
//! watch history (rows after a revision). Several processes share the file: WAL lets readers run
//! beside the one writer, and every write is a `BEGIN IMMEDIATE` transaction, so revisions are
//! handed out one at a time and become visible in order. Watches poll the log.
//!
//! Leases live in their own table with an absolute expiry time. Nothing runs in the background:
//! whichever client touches the file next (a write, a read, a watch poll) deletes the keys of
//! expired leases, as ordinary delete revisions. rusqlite is blocking, so every database call runs
//! on tokio's blocking pool.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};

use crate::{prefix_end, Error, Event, KeyValue, LeaseId, Result, Revision, Store, WatchStream};

/// `PRAGMA user_version` of the schema below; a file with a newer one is refused.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE log (
    id              INTEGER PRIMARY KEY,  -- the revision of this change
    key             BLOB NOT NULL,        -- UTF-8, compared bytewise like etcd's keys
    value           BLOB NOT NULL,        -- empty for a deletion
    create_revision INTEGER NOT NULL,
    prev_revision   INTEGER NOT NULL,     -- the key's previous row, 0 if none
    lease           INTEGER,              -- NULL: no lease
    deleted         INTEGER NOT NULL      -- 1: the key was deleted at this revision
);
CREATE INDEX log_key_id ON log (key, id);
CREATE INDEX log_lease ON log (lease) WHERE lease IS NOT NULL;
-- AUTOINCREMENT so that a revoked lease's id is never handed out again: a late keepalive
-- from its old holder must fail, not extend someone else's lease.
CREATE TABLE leases (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms        INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL        -- Unix time in ms: shared by all processes and reboots
);
CREATE INDEX leases_expiry ON leases (expires_at_ms);
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('compact_revision', 0);
";

/// Rows fetched by one watch poll; a watch far behind catches up in several.
const WATCH_BATCH: usize = 512;
/// Automatic compaction runs when the revision crosses a multiple of this.
const AUTO_COMPACT_EVERY: i64 = 1000;
/// Idle reader connections kept per handle.
const READER_POOL: usize = 4;

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How often a watch looks for new rows: the latency of a watch event.
    pub poll_interval: Duration,
    /// How long an operation waits for another process's write to finish before it fails with
    /// [`Error::Unavailable`].
    pub busy_timeout: Duration,
    /// History kept by automatic compaction, in revisions; 0 keeps everything (compact with
    /// [`Store::compact`]). A watch further behind than this gets [`Error::Compacted`].
    pub retain_revisions: i64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            poll_interval: Duration::from_millis(50),
            busy_timeout: Duration::from_secs(5),
            retain_revisions: 10_000,
        }
    }
}

/// A handle on a store file. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    /// One writer per handle: writes of one process queue here rather than in SQLite's busy
    /// handler, which sleeps and retries.
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens the store file at `path`, creating it (not its directory) if needed.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let what = format!("opening sqlite store {}", path.display());
        tokio::task::spawn_blocking(move || Inner::open(path, options))
            .await
            .map_err(join_err)?
            .map(|inner| SqliteStore {
                inner: Arc::new(inner),
            })
            .map_err(|e| e.context(what))
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn run<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(join_err)?
            .map_err(|e| e.context(format!("{what} ({})", self.inner.path.display())))
    }
}

impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let k = key.to_owned();
        self.run(format!("get {key}"), move |db| {
            db.read(|tx| {
                Ok(latest(tx, &k)?
                    .filter(|r| !r.deleted)
                    .map(|r| r.into_kv(k.clone())))
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let p = prefix.to_owned();
        self.run(format!("list {prefix}"), move |db| {
            db.read(|tx| list(tx, &p))
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        let (k, v) = (key.to_owned(), value.to_vec());
        self.run(format!("put {key}"), move |db| {
            db.write(|tx, _| {
                let prev = latest(tx, &k)?;
                check_lease(tx, lease)?;
                append_put(tx, &k, &v, prev.as_ref(), lease)
            })
        })
        .await
    }

    async fn cas(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<Revision>> {
        let (k, v) = (key.to_owned(), value.to_vec());
        self.run(format!("compare-and-swap {key}"), move |db| {
            db.write(|tx, _| {
                let prev = latest(tx, &k)?;
                let current = prev.as_ref().filter(|r| !r.deleted).map_or(0, |r| r.id);
                if current != expected {
                    return Ok(None);
                }
                check_lease(tx, lease)?;
                append_put(tx, &k, &v, prev.as_ref(), lease).map(Some)
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let k = key.to_owned();
        self.run(format!("delete {key}"), move |db| {
            db.write(|tx, _| match latest(tx, &k)? {
                Some(prev) if !prev.deleted => append_delete(tx, k.as_bytes(), &prev).map(|_| true),
                _ => Ok(false),
            })
        })
        .await
    }

    async fn cad(&self, key: &str, expected: Revision) -> Result<bool> {
        let k = key.to_owned();
        self.run(format!("compare-and-delete {key}"), move |db| {
            db.write(|tx, _| match latest(tx, &k)? {
                Some(prev) if !prev.deleted && prev.id == expected => {
                    append_delete(tx, k.as_bytes(), &prev).map(|_| true)
                }
                _ => Ok(false),
            })
        })
        .await
    }

    fn watch(&self, prefix: &str, after: Revision) -> WatchStream {
        let watch = Watch {
            inner: self.inner.clone(),
            range: Arc::new((prefix.as_bytes().to_vec(), prefix_end(prefix))),
            prefix: prefix.to_owned(),
            after: after.max(0),
            pending: VecDeque::new(),
            done: false,
        };
        futures::stream::unfold(watch, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        })
        .boxed()
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        self.run("granting a lease".into(), move |db| {
            db.write(|tx, now| {
                tx.execute(
                    "INSERT INTO leases (ttl_ms, expires_at_ms) VALUES (?1, ?2)",
                    params![ttl_ms, now.saturating_add(ttl_ms)],
                )
                .map_err(sql_err)?;
                Ok(tx.last_insert_rowid())
            })
        })
        .await
    }

    async fn keepalive(&self, lease: LeaseId) -> Result<()> {
        self.run(format!("keepalive of lease {lease:#x}"), move |db| {
            // The write's sweep has already ended the lease if it expired.
            db.write(|tx, now| {
                let n = tx
                    .execute(
                        "UPDATE leases SET expires_at_ms = ?2 + ttl_ms WHERE id = ?1",
                        params![lease, now],
                    )
                    .map_err(sql_err)?;
                if n == 0 {
                    return Err(Error::LeaseNotFound(lease));
                }
                Ok(())
            })
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.run(format!("revoking lease {lease:#x}"), move |db| {
            db.write(|tx, _| revoke(tx, lease).map(|_| ()))
        })
        .await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.run(format!("compacting to revision {revision}"), move |db| {
            db.write(|tx, _| compact(tx, revision))
        })
        .await
    }
}

impl Inner {
    /// Opening a new file races with the other processes that open it at the same moment: one
    /// switches it to WAL, one creates the schema. SQLite answers some of those lock conflicts
    /// (two connections each upgrading a lock) with SQLITE_BUSY at once, without waiting in its
    /// busy handler, so the whole open is tried again, for at most the busy timeout.
    fn open(path: PathBuf, options: SqliteOptions) -> Result<Self> {
        let deadline = std::time::Instant::now() + options.busy_timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            match Self::open_once(path.clone(), options.clone()) {
                Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                done => return done,
            }
        }
    }

    fn open_once(path: PathBuf, options: SqliteOptions) -> Result<Self> {
        let writer = connect(&path, &options)?;
        // WAL is a property of the file: the first process to open it switches it, and all
        // later connections use it.
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Other(format!(
                "the file does not support WAL mode (journal mode stays {mode:?})"
            )));
        }
        let inner = Inner {
            path,
            options,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
        };
        // Several agents may start at once on a new file: IMMEDIATE makes one of them create
        // the schema and the others see it.
        {
            let mut conn = lock(&inner.writer);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err)?;
            let version: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sql_err)?;
            match version {
                0 => {
                    tx.execute_batch(SCHEMA).map_err(sql_err)?;
                    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                        .map_err(sql_err)?;
                }
                SCHEMA_VERSION => {}
                v => {
                    return Err(Error::Other(format!(
                        "schema version {v} is newer than this Weft's ({SCHEMA_VERSION})"
                    )))
                }
            }
            tx.commit().map_err(sql_err)?;
        }
        Ok(inner)
    }

    /// Runs `f` in a write transaction, after deleting the keys of expired leases. `f` gets the
    /// time (Unix ms) that the sweep used.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>, i64) -> Result<T>) -> Result<T> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        let now = now_ms();
        let before = current_revision(&tx)?;
        sweep(&tx, now)?;
        let out = match f(&tx, now) {
            // `f` fails this way before writing anything: keep the sweep that ended the lease.
            Err(e @ Error::LeaseNotFound(_)) => {
                tx.commit().map_err(sql_err)?;
                return Err(e);
            }
            r => r?,
        };
        let after = current_revision(&tx)?;
        let retain = self.options.retain_revisions;
        if retain > 0 && after / AUTO_COMPACT_EVERY > before / AUTO_COMPACT_EVERY {
            compact(&tx, after - retain)?;
        }
        tx.commit().map_err(sql_err)?;
        Ok(out)
    }

    /// Runs `f` in a read transaction: one consistent snapshot, beside any writer.
    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.reader()?;
        let out = (|| {
            if lease_expired(&conn)? {
                // A read must not return a key whose lease has run out: end the lease first.
                self.write(|_, _| Ok(()))?;
            }
            let tx = conn.transaction().map_err(sql_err)?;
            f(&tx)
        })();
        let mut pool = lock(&self.readers);
        if pool.len() < READER_POOL {
            pool.push(conn);
        }
        out
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(conn) = lock(&self.readers).pop() {
            return Ok(conn);
        }
        connect(&self.path, &self.options)
    }

    /// The events under the watch's prefix after `after`, and the revision the next poll starts
    /// after.
    fn poll(
        &self,
        lo: &[u8],
        hi: Option<&[u8]>,
        after: Revision,
    ) -> Result<(Vec<Event>, Revision)> {
        self.read(|tx| {
            let compacted = compact_revision(tx)?;
            if after < compacted - 1 {
                return Err(Error::Compacted {
                    requested: after,
                    compacted,
                });
            }
            let current = current_revision(tx)?;
            let sql = match hi {
                Some(_) => {
                    "SELECT id, key, value, create_revision, lease, deleted FROM log
                     WHERE id > ?1 AND id <= ?2 AND key >= ?3 AND key < ?4 ORDER BY id LIMIT ?5"
                }
                None => {
                    "SELECT id, key, value, create_revision, lease, deleted FROM log
                     WHERE id > ?1 AND id <= ?2 AND key >= ?3 ORDER BY id LIMIT ?5"
                }
            };
            let mut stmt = tx.prepare(sql).map_err(sql_err)?;
            let rows = stmt
                .query_map(
                    params![
                        after,
                        current,
                        lo,
                        hi.unwrap_or_default(),
                        WATCH_BATCH as i64
                    ],
                    |r| Ok((r.get::<_, Vec<u8>>(1)?, Row::from_sql(r)?)),
                )
                .map_err(sql_err)?;
            let mut events = Vec::new();
            let mut last = after;
            for row in rows {
                let (key, row) = row.map_err(sql_err)?;
                let key = utf8(key)?;
                last = row.id;
                events.push(if row.deleted {
                    Event::Delete {
                        key,
                        mod_revision: row.id,
                    }
                } else {
                    Event::Put(row.into_kv(key))
                });
            }
            // A short batch has seen every row up to `current`, matching or not.
            let next = if events.len() < WATCH_BATCH {
                current
            } else {
                last
            };
            Ok((events, next))
        })
    }
}

struct Watch {
    inner: Arc<Inner>,
    /// The prefix and its end, shared with every poll's blocking task.
    range: Arc<(Vec<u8>, Option<Vec<u8>>)>,
    prefix: String,
    after: Revision,
    pending: VecDeque<Event>,
    done: bool,
}

impl Watch {
    async fn next(&mut self) -> Option<Result<Event>> {
        let poll_interval = self.inner.options.poll_interval;
        let mut backoff = poll_interval;
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let (inner, range, after) = (self.inner.clone(), self.range.clone(), self.after);
            let polled = tokio::task::spawn_blocking(move || {
                inner.poll(&range.0, range.1.as_deref(), after)
            })
            .await
            .map_err(join_err)
            .and_then(|r| r);
            match polled {
                Ok((events, next)) => {
                    self.after = next;
                    backoff = poll_interval;
                    if events.is_empty() {
                        tokio::time::sleep(poll_interval).await;
                    }
                    self.pending.extend(events);
                }
                // A busy or unreadable file may recover (another process holding a lock, a full
                // disk being cleaned): keep trying, slower.
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    self.done = true;
                    let what = format!("watching {} ({})", self.prefix, self.inner.path.display());
                    return Some(Err(e.context(what)));
                }
            }
        }
    }
}

/// A key's row in the log.
struct Row {
    id: Revision,
    value: Vec<u8>,
    create_revision: Revision,
    lease: Option<LeaseId>,
    deleted: bool,
}

impl Row {
    /// From the columns `id, _, value, create_revision, lease, deleted`.
    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Row {
            id: r.get(0)?,
            value: r.get(2)?,
            create_revision: r.get(3)?,
            lease: r.get(4)?,
            deleted: r.get(5)?,
        })
    }

    fn into_kv(self, key: String) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.id,
            lease: self.lease,
        }
    }
}

fn latest(tx: &Transaction<'_>, key: &str) -> Result<Option<Row>> {
    tx.prepare_cached(
        "SELECT id, key, value, create_revision, lease, deleted FROM log
         WHERE key = ?1 ORDER BY id DESC LIMIT 1",
    )
    .and_then(|mut s| s.query_row([key.as_bytes()], Row::from_sql).optional())
    .map_err(sql_err)
}

fn list(tx: &Transaction<'_>, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
    let revision = current_revision(tx)?;
    let end = prefix_end(prefix);
    // With one max() in a GROUP BY query, SQLite takes the other columns from the row holding
    // the maximum: each key's latest row.
    let sql = match end {
        Some(_) => {
            "SELECT max(id), key, value, create_revision, lease, deleted FROM log
             WHERE key >= ?1 AND key < ?2 GROUP BY key ORDER BY key"
        }
        None => {
            "SELECT max(id), key, value, create_revision, lease, deleted FROM log
             WHERE key >= ?1 GROUP BY key ORDER BY key"
        }
    };
    let mut stmt = tx.prepare_cached(sql).map_err(sql_err)?;
    let lo = prefix.as_bytes();
    let rows = match &end {
        Some(hi) => stmt.query(params![lo, hi]),
        None => stmt.query(params![lo]),
    };
    let mut rows = rows.map_err(sql_err)?;
    let mut kvs = Vec::new();
    while let Some(r) = rows.next().map_err(sql_err)? {
        let row = Row::from_sql(r).map_err(sql_err)?;
        if !row.deleted {
            let key = utf8(r.get(1).map_err(sql_err)?)?;
            kvs.push(row.into_kv(key));
        }
    }
    Ok((kvs, revision))
}

fn current_revision(tx: &Transaction<'_>) -> Result<Revision> {
    // Compaction never removes the newest row, so max(id) is the revision even after it.
    tx.query_row("SELECT coalesce(max(id), 0) FROM log", [], |r| r.get(0))
        .map_err(sql_err)
}

fn compact_revision(tx: &Transaction<'_>) -> Result<Revision> {
    tx.query_row(
        "SELECT value FROM meta WHERE name = 'compact_revision'",
        [],
        |r| r.get(0),
    )
    .map_err(sql_err)
}

fn check_lease(tx: &Transaction<'_>, lease: Option<LeaseId>) -> Result<()> {
    let Some(id) = lease else { return Ok(()) };
    let found = tx
        .query_row("SELECT 1 FROM leases WHERE id = ?1", [id], |_| Ok(()))
        .optional()
        .map_err(sql_err)?;
    found.ok_or(Error::LeaseNotFound(id))
}

fn append_put(
    tx: &Transaction<'_>,
    key: &str,
    value: &[u8],
    prev: Option<&Row>,
    lease: Option<LeaseId>,
) -> Result<Revision> {
    let revision = current_revision(tx)? + 1;
    let live = prev.filter(|r| !r.deleted);
    tx.prepare_cached(
        "INSERT INTO log (id, key, value, create_revision, prev_revision, lease, deleted)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
    )
    .and_then(|mut s| {
        s.execute(params![
            revision,
            key.as_bytes(),
            value,
            live.map_or(revision, |r| r.create_revision),
            prev.map_or(0, |r| r.id),
            lease,
        ])
    })
    .map_err(sql_err)?;
    Ok(revision)
}

fn append_delete(tx: &Transaction<'_>, key: &[u8], prev: &Row) -> Result<Revision> {
    let revision = current_revision(tx)? + 1;
    tx.prepare_cached(
        "INSERT INTO log (id, key, value, create_revision, prev_revision, lease, deleted)
         VALUES (?1, ?2, x'', ?3, ?4, NULL, 1)",
    )
    .and_then(|mut s| s.execute(params![revision, key, prev.create_revision, prev.id]))
    .map_err(sql_err)?;
    Ok(revision)
}

/// Ends the lease and deletes its keys; `false` if there was no such lease.
fn revoke(tx: &Transaction<'_>, lease: LeaseId) -> Result<bool> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT l.id, l.key, l.value, l.create_revision, l.lease, l.deleted FROM log AS l
             WHERE l.lease = ?1 AND l.deleted = 0
               AND l.id = (SELECT max(id) FROM log WHERE key = l.key)
             ORDER BY l.key",
        )
        .map_err(sql_err)?;
    let keys = stmt
        .query_map([lease], |r| {
            Ok((r.get::<_, Vec<u8>>(1)?, Row::from_sql(r)?))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(sql_err)?;
    for (key, row) in &keys {
        append_delete(tx, key, row)?;
    }
    let n = tx
        .execute("DELETE FROM leases WHERE id = ?1", [lease])
        .map_err(sql_err)?;
    Ok(n > 0)
}

/// Ends every lease whose expiry time has passed.
fn sweep(tx: &Transaction<'_>, now: i64) -> Result<()> {
    let expired = tx
        .prepare_cached("SELECT id FROM leases WHERE expires_at_ms <= ?1 ORDER BY id")
        .and_then(|mut s| {
            s.query_map([now], |r| r.get::<_, LeaseId>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_err)?;
    for lease in expired {
        revoke(tx, lease)?;
    }
    Ok(())
}

fn lease_expired(conn: &Connection) -> Result<bool> {
    let next: Option<i64> = conn
        .query_row("SELECT min(expires_at_ms) FROM leases", [], |r| r.get(0))
        .map_err(sql_err)?;
    Ok(next.is_some_and(|t| t <= now_ms()))
}

/// Deletes the rows that no current value or watch after `revision - 1` needs: rows before
/// `revision` that a later row of the same key supersedes, and deletions before `revision`.
fn compact(tx: &Transaction<'_>, revision: Revision) -> Result<()> {
    let current = current_revision(tx)?;
    if revision > current {
        return Err(Error::Other(format!(
            "revision {revision} is in the future (the store is at {current})"
        )));
    }
    if revision <= compact_revision(tx)? {
        return Ok(());
    }
    tx.execute(
        "DELETE FROM log WHERE id < ?1 AND (deleted = 1 OR EXISTS (
             SELECT 1 FROM log AS newer WHERE newer.key = log.key AND newer.id > log.id))",
        [revision],
    )
    .map_err(sql_err)?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE name = 'compact_revision'",
        [revision],
    )
    .map_err(sql_err)?;
    Ok(())
}

fn connect(path: &Path, options: &SqliteOptions) -> Result<Connection> {
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.busy_timeout(options.busy_timeout).map_err(sql_err)?;
    // In WAL mode NORMAL loses no committed transaction when a process dies, only possibly the
    // last ones on a power cut; the agents rebuild their leases from their keepalives.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql_err)?;
    Ok(conn)
}

fn utf8(key: Vec<u8>) -> Result<String> {
    String::from_utf8(key).map_err(|e| Error::Other(format!("a key is not UTF-8: {e}")))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves at worst an open transaction, which the next
    // `transaction_with_behavior` fails on loudly rather than corrupting anything.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sql_err(e: rusqlite::Error) -> Error {
    let retryable = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::SystemIoFailure)
    );
    if retryable {
        Error::Unavailable(e.to_string())
    } else {
        Error::Other(e.to_string())
    }
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Other(format!("sqlite task failed: {e}"))
}
