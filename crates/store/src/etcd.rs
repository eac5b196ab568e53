//! The store on etcd's v3 API, mapped one to one: compare-and-swap and compare-and-delete are
//! transactions comparing `mod_revision`, watches are etcd watches from `after + 1`, leases are
//! etcd leases. The gRPC channel reconnects by itself; a watch whose stream breaks opens a new
//! one from the revision after the last one it delivered.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Channel, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tonic::transport::Endpoint;
use tonic::Code;

use crate::{prefix_end, Error, Event, KeyValue, LeaseId, Result, Revision, Store, WatchStream};

/// Keys per page of a list: etcd-client refuses responses over its 4 MiB message limit.
const LIST_PAGE: i64 = 500;
/// Largest watch response accepted: all the events of one revision come in one response, and a
/// lease expiring with many keys makes a large one.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Deadline of each request; a request past it fails with [`Error::Unavailable`].
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 pings on open streams, so that a watch notices a server that stopped answering
    /// (hung, or its host gone) rather than waiting forever. etcd refuses pings more often than
    /// every 5 s (`--grpc-keepalive-min-time`).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(6),
            keepalive_timeout: Duration::from_secs(3),
        }
    }
}

/// A client of an etcd cluster. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    endpoints: String,
    options: EtcdOptions,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

impl EtcdStore {
    /// A client of the etcd members at `endpoints` (`host:port` or `http://host:port`). It does
    /// not wait for them: requests fail with [`Error::Unavailable`] until one answers.
    pub async fn connect<E: AsRef<str>>(endpoints: &[E]) -> Result<Self> {
        Self::connect_with(endpoints, EtcdOptions::default()).await
    }

    pub async fn connect_with<E: AsRef<str>>(
        endpoints: &[E],
        options: EtcdOptions,
    ) -> Result<Self> {
        let names: Vec<&str> = endpoints.iter().map(AsRef::as_ref).collect();
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keepalive_interval, options.keepalive_timeout);
        let client = Client::connect(&names, Some(connect)).await.map_err(|e| {
            map_err(e, None).context(format!("connecting to etcd {}", names.join(",")))
        })?;
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                client,
                endpoints: names.join(","),
                options,
            }),
        })
    }

    /// A client of the etcd member listening on the unix socket at `path`.
    pub async fn connect_unix(path: impl AsRef<Path>, options: EtcdOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = format!("unix://{}", path.display());
        // etcd-client only dials TCP; tonic dials unix sockets itself, and reconnects the same.
        let channel = Endpoint::from_shared(name.clone())
            .map_err(|e| Error::Other(format!("etcd socket {}: {e}", path.display())))?
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(options.keepalive_interval)
            .keep_alive_timeout(options.keepalive_timeout)
            .connect_lazy();
        let client = Client::from_channel(Channel::Tonic(channel), None)
            .await
            .map_err(|e| map_err(e, None).context(format!("connecting to etcd {name}")))?;
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                client,
                endpoints: name,
                options,
            }),
        })
    }

    /// Runs one request under the request deadline, with context on failure.
    /// `lease` is the lease the request names, if any: etcd's "not found" is about it.
    async fn call<T>(
        &self,
        what: impl FnOnce() -> String,
        lease: Option<LeaseId>,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let out = match tokio::time::timeout(self.inner.options.request_timeout, request).await {
            Ok(r) => r.map_err(|e| map_err(e, lease)),
            Err(_) => Err(Error::Unavailable(format!(
                "no answer within {:?}",
                self.inner.options.request_timeout
            ))),
        };
        out.map_err(|e| e.context(format!("{} (etcd {})", what(), self.inner.endpoints)))
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.inner.client.kv_client();
        let resp = self
            .call(|| format!("get {key}"), None, kv.get(key, None))
            .await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        // etcd's empty key is invalid: "\0" is the smallest key, and range end "\0" means "to
        // the last key".
        let first = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut start = first.clone();
        let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let mut kv = self
            .inner
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let mut out = Vec::new();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision != 0 {
                // Later pages read the snapshot of the first one.
                opts = opts.with_revision(revision);
            }
            let resp = match self
                .call(
                    || format!("list {prefix}"),
                    None,
                    kv.get(start.clone(), Some(opts)),
                )
                .await
            {
                Ok(resp) => resp,
                // Compacted past the first page's snapshot while paging: start again.
                Err(Error::Other(m)) if revision != 0 && m.contains("compacted") => {
                    (start, revision) = (first.clone(), 0);
                    out.clear();
                    continue;
                }
                Err(e) => return Err(e),
            };
            if revision == 0 {
                revision = header_revision(resp.header());
            }
            for kv in resp.kvs() {
                out.push(convert_kv(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        let mut kv = self.inner.client.kv_client();
        let opts = lease.map(|id| PutOptions::new().with_lease(id));
        let resp = self
            .call(|| format!("put {key}"), lease, kv.put(key, value, opts))
            .await?;
        Ok(header_revision(resp.header()))
    }

    async fn cas(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<Revision>> {
        let mut kv = self.inner.client.kv_client();
        // etcd compares a missing key as if its revisions were 0, so `expected = 0` is
        // create-only.
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(
                key,
                value,
                lease.map(|id| PutOptions::new().with_lease(id)),
            )]);
        let resp = self
            .call(|| format!("compare-and-swap {key}"), lease, kv.txn(txn))
            .await?;
        Ok(resp.succeeded().then(|| header_revision(resp.header())))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut kv = self.inner.client.kv_client();
        let resp = self
            .call(|| format!("delete {key}"), None, kv.delete(key, None))
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn cad(&self, key: &str, expected: Revision) -> Result<bool> {
        if expected <= 0 {
            return Ok(false);
        }
        let mut kv = self.inner.client.kv_client();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self
            .call(|| format!("compare-and-delete {key}"), None, kv.txn(txn))
            .await?;
        let deleted = resp.op_responses().iter().any(|op| match op {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        Ok(resp.succeeded() && deleted)
    }

    fn watch(&self, prefix: &str, after: Revision) -> WatchStream {
        let watch = Watch {
            store: self.clone(),
            prefix: prefix.to_owned(),
            after: after.max(0),
            stream: None,
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
        let mut lease = self.inner.client.lease_client();
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
            .max(1);
        let resp = self
            .call(
                || format!("granting a lease of {secs} s"),
                None,
                lease.grant(secs, None),
            )
            .await?;
        if !resp.error().is_empty() {
            return Err(Error::Other(format!("granting a lease: {}", resp.error())));
        }
        Ok(resp.id())
    }

    async fn keepalive(&self, lease: LeaseId) -> Result<()> {
        let mut client = self.inner.client.lease_client();
        // One request on a keepalive stream, which closes when dropped: the agent renews
        // seldom (a fraction of the TTL), so a stream per renewal costs little and carries no
        // state across reconnects.
        self.call(
            || format!("keepalive of lease {lease:#x}"),
            Some(lease),
            client.keep_alive(lease),
        )
        .await
        .map(|_| ())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut client = self.inner.client.lease_client();
        match self
            .call(
                || format!("revoking lease {lease:#x}"),
                Some(lease),
                client.revoke(lease),
            )
            .await
        {
            Ok(_) | Err(Error::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let mut kv = self.inner.client.kv_client();
        match self
            .call(
                || format!("compacting to revision {revision}"),
                None,
                kv.compact(revision, None),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Other(m)) if m.contains("required revision has been compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

struct Watch {
    store: EtcdStore,
    prefix: String,
    /// The last revision delivered (or known, from a progress notification, to have nothing
    /// under the prefix after it): a new stream starts after it.
    after: Revision,
    stream: Option<etcd_client::WatchStream>,
    pending: VecDeque<Event>,
    done: bool,
}

impl Watch {
    async fn next(&mut self) -> Option<Result<Event>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) if !e.is_retryable() => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
                continue;
            };
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                // The connection broke or the server went away: reopen from `after`. A
                // response is all the events of its revisions, so nothing is half delivered.
                Ok(None) | Err(_) => {
                    self.stream = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if resp.compact_revision() > 0 {
                self.done = true;
                return Some(Err(Error::Compacted {
                    requested: self.after,
                    compacted: resp.compact_revision(),
                }));
            }
            if resp.canceled() {
                self.done = true;
                return Some(Err(Error::Other(format!(
                    "watching {} (etcd {}): canceled by the server: {}",
                    self.prefix,
                    self.store.inner.endpoints,
                    resp.cancel_reason()
                ))));
            }
            if resp.events().is_empty() {
                // etcd sends progress notifications only to a watcher that has caught up, so
                // everything under the prefix up to the header's revision has been delivered.
                if !resp.created() {
                    self.after = self.after.max(header_revision(resp.header()));
                }
                continue;
            }
            for event in resp.events() {
                match convert_event(event) {
                    Ok(event) => {
                        self.after = self.after.max(event.revision());
                        self.pending.push_back(event);
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    async fn open(&mut self) -> Result<etcd_client::WatchStream> {
        let end = prefix_end(&self.prefix).unwrap_or_else(|| vec![0]);
        let key = if self.prefix.is_empty() {
            vec![0]
        } else {
            self.prefix.as_bytes().to_vec()
        };
        let opts = WatchOptions::new()
            .with_range(end)
            .with_start_revision(self.after + 1)
            .with_progress_notify();
        let mut client = self
            .store
            .inner
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let prefix = self.prefix.clone();
        self.store
            .call(
                || format!("watching {prefix}"),
                None,
                client.watch(key, Some(opts)),
            )
            .await
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: key_string(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn convert_event(event: &etcd_client::Event) -> Result<Event> {
    let kv = event
        .kv()
        .ok_or_else(|| Error::Other("etcd sent a watch event without a key".into()))?;
    Ok(match event.event_type() {
        EventType::Put => Event::Put(convert_kv(kv)?),
        EventType::Delete => Event::Delete {
            key: key_string(kv.key())?,
            mod_revision: kv.mod_revision(),
        },
    })
}

fn key_string(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| {
        Error::Other(format!(
            "a key is not UTF-8: {}",
            String::from_utf8_lossy(key)
        ))
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision())
}

fn map_err(e: etcd_client::Error, lease: Option<LeaseId>) -> Error {
    use etcd_client::Error as E;
    match (e, lease) {
        (E::GRpcStatus(s), lease) => match (s.code(), lease) {
            (
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Unknown,
                _,
            ) => Error::Unavailable(s.message().to_owned()),
            // etcd's only NotFound is "requested lease not found".
            (Code::NotFound, Some(id)) => Error::LeaseNotFound(id),
            _ => Error::Other(s.message().to_owned()),
        },
        // How etcd-client reports a keepalive answered with TTL 0: etcd's "no such lease".
        (E::LeaseKeepAliveError(m), Some(id)) if m == "lease not found" => Error::LeaseNotFound(id),
        (E::TransportError(e), _) => Error::Unavailable(e.to_string()),
        (E::IoError(e), _) => Error::Unavailable(e.to_string()),
        (e, _) => Error::Other(e.to_string()),
    }
}
