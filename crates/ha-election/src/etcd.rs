//! `EtcdLeaseStore`: leases in etcd v3, each term on an etcd lease, compare-and-set by
//! transaction, fencing tokens from etcd revisions, changes pushed by an etcd watch.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use ha_core::{Backoff, BackoffConfig, FencingToken, NodeId};
use tokio::sync::{OnceCell, broadcast};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::store::{
    Acquire, LeaseChange, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, with_timeout,
};

const KIND: &str = "etcd";

/// Capacity of each watched key's change channel; a slow watcher is told it lagged.
const WATCH_CAPACITY: usize = 64;

/// Bounds `connect` as a whole (the first request that proves a member answers).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// How long a watch that broke waits before it reopens (jittered), at first and at most.
fn watch_retry() -> Backoff {
    Backoff::new(BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(1),
        ..BackoffConfig::default()
    })
}

/// How many times the etcd lease of a term outlives the term's `ttl` (whole seconds, rounded
/// up): the term lapses (by etcd's clock) after one `ttl`, its record is kept two more.
const LEASE_TTL_FACTOR: i64 = 3;

/// Options of an [`EtcdLeaseStore`].
///
/// ```
/// use std::time::Duration;
/// let options = ha_election::etcd::EtcdLeaseStoreOptions::new()
///     .prefix("orders/")
///     .request_timeout(Duration::from_secs(2));
/// assert_eq!(options.lease_prefix(), "orders/lease/");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct EtcdLeaseStoreOptions {
    prefix: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    keep_alive: (Duration, Duration),
}

impl Default for EtcdLeaseStoreOptions {
    fn default() -> Self {
        Self {
            prefix: "ha/".to_owned(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            keep_alive: (Duration::from_secs(1), Duration::from_secs(2)),
        }
    }
}

impl EtcdLeaseStoreOptions {
    /// The defaults: keys under `ha/`, 3 s to connect to a member, 5 s at most per request,
    /// HTTP/2 pings every second (a connection unanswered for 2 s more is closed).
    pub fn new() -> Self {
        Self::default()
    }

    /// Prefix of every key the store writes (default `ha/`): lease records under
    /// `<prefix>lease/`, members under `<prefix>members/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long connecting to one member may take (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The gRPC timeout of every request of the client (default 5 s): a backstop under each
    /// operation's own `timeout`, which is shorter in practice.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval`, the connection closed if one is unanswered
    /// for `timeout` (default 1 s and 2 s), so a partitioned member's connection is dropped
    /// and the client's balancer moves to the others.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = (interval, timeout);
        self
    }

    /// Where lease records live.
    pub fn lease_prefix(&self) -> String {
        format!("{}lease/", self.prefix)
    }

    /// Where membership keys live.
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }
}

/// Leases in etcd v3 (3.4 or newer), through [etcd-client](https://docs.rs/etcd-client).
///
/// # How it meets the [`LeaseStore`] rules
///
/// - **One etcd lease per term.** acquire grants an etcd lease of `3 × ttl` (whole seconds,
///   rounded up; etcd may raise it to its minimum) and writes the record key
///   `<prefix>lease/<key>` attached to it, in one transaction conditional on the observed
///   record. renew keeps that lease alive (one `LeaseKeepAlive` exchange, answered with
///   TTL ≤ 0 = the lease is gone, so is the record: not renewed) and, in the same round trip,
///   rewrites the record with one more renewal by a transaction conditional on the record's
///   `mod_revision`. The record therefore outlives the term's last renewal by at least two
///   TTLs, as the trait requires, and then vanishes with its lease. release replaces the record
///   by a tombstone (same lease, kept alive once more) if it is still the caller's term. The
///   keep-alive is one request and one answer under the operation's `timeout`, never a
///   background stream: a keep-alive that stalls fails the renewal, and the elector's
///   deadline (counted from when the renewal was sent) ends leadership on time.
/// - **The store's clock decides nothing.** Followers judge expiry on their own clocks (see
///   [`Elector`](crate::Elector)); etcd's lease clock only bounds how long an abandoned record
///   lingers. An etcd leader change resets every lease to its full TTL (etcd 3.4 does not
///   checkpoint remaining TTLs): records are kept longer, never shorter, and
///   [`LeaseInfo::remaining`] (the lease's remaining TTL less two thirds of its granted TTL,
///   whole seconds) is only an estimate.
/// - **Compare-and-set.** A record is `<token> <renewals>[ released]\n<holder>`, except a term
///   fresh from acquire, which is `- 0\n<holder>`: its token is the revision of the write that
///   granted it, i.e. the key's `mod_revision`. acquire compares the value (and for a fresh
///   term also the `mod_revision`) with the expected record, or the key's `version` with 0
///   when it expects none; renew and release compare the `mod_revision` of the record they
///   read (or last wrote) and check holder, token and released flag.
/// - **Tokens are etcd revisions.** A term's token is the header revision of the transaction
///   that granted it (the record's `mod_revision` then; its `create_revision` when the key was
///   free). etcd's revision is one counter for the whole cluster, raised by every write and
///   agreed by a quorum through raft, persisted with the data and never reused (compaction
///   keeps it); each grant is a write after every earlier grant of the key, so its revision is
///   strictly greater than every token handed out before — across member failures, leader
///   changes and restarts of the whole cluster, as long as the data survives on a quorum (or
///   the cluster is restored with `etcdctl snapshot restore`, which keeps revisions). A
///   cluster rebuilt *empty* restarts revisions at 1: then fences must be reset too.
/// - **Timeouts.** Every operation is bounded by its `timeout` ([`Error::Timeout`]) and every
///   gRPC request by the client's own timeout ([`EtcdLeaseStoreOptions::request_timeout`]).
///   An operation that times out is dropped with its requests (their HTTP/2 streams are
///   reset), so nothing is sent for it afterwards; a request that had already reached etcd
///   may still apply, which the compare-and-set confines to the exact record it compared (and
///   the elector adopts its own record).
/// - **One member at a time.** The store keeps one gRPC client per endpoint and sends every
///   operation to one member; after an operation fails or times out it moves to the next
///   member (in the order given). Every request asks for `require_leader`, so a member cut off
///   from its peers fails at once instead of answering from a stale raft state; reads are
///   linearizable.
/// - **Membership.** `heartbeat` puts `<prefix>members/<group>/<node>` (the meta as JSON)
///   on an etcd lease of the member's `ttl` (whole seconds, rounded up), kept alive by the next
///   heartbeat; a member that stops beating vanishes with its lease.
///
/// # Watching
///
/// [`watch`](LeaseStore::watch) starts one etcd watch on `<prefix>lease/` (on the first call)
/// and pushes a [`LeaseChange`] for every grant, release and deletion (lease expiry), not for
/// renewals. If the watch breaks (a member down, a partition, no leader: the client asks for
/// `require_leader`), it is reopened from the next revision, so nothing is missed, and every
/// watcher is told to re-check at once.
#[derive(Clone)]
pub struct EtcdLeaseStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// One client per endpoint (no balancer): the store uses one member at a time, like
    /// etcd's own Go client, and moves to the next after a failed operation.
    clients: Vec<Client>,
    /// The index in `clients` of the member in use.
    current: AtomicUsize,
    target: String,
    options: EtcdLeaseStoreOptions,
    /// The terms this store granted or renewed, by key: what renew and release compare.
    terms: Mutex<HashMap<String, Term>>,
    /// Membership leases by (group, node): kept alive by each heartbeat.
    members: Mutex<HashMap<(String, String), i64>>,
    watcher: OnceCell<Watcher>,
}

/// A term as this store last wrote it.
#[derive(Clone, Debug)]
struct Term {
    holder: NodeId,
    token: FencingToken,
    renewals: u64,
    lease: i64,
    mod_revision: i64,
}

type Senders = Arc<Mutex<HashMap<String, broadcast::Sender<LeaseChange>>>>;

struct Watcher {
    senders: Senders,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.get() {
            watcher.task.abort();
        }
    }
}

impl fmt::Debug for EtcdLeaseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLeaseStore")
            .field("target", &self.inner.target)
            .field("prefix", &self.inner.options.prefix)
            .field("watching", &self.inner.watcher.initialized())
            .finish()
    }
}

/// A decoded record value (without the token of a fresh term, which is its `mod_revision`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Value {
    token: Option<u64>,
    renewals: u64,
    released: bool,
    holder: String,
}

impl Value {
    fn encode(&self) -> Vec<u8> {
        let token = self
            .token
            .map_or_else(|| "-".to_owned(), |token| token.to_string());
        format!(
            "{token} {}{}\n{}",
            self.renewals,
            if self.released { " released" } else { "" },
            self.holder
        )
        .into_bytes()
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| corrupt(key, format!("record {bytes:?} is not UTF-8")))?;
        let Some((head, holder)) = text.split_once('\n') else {
            return Err(corrupt(
                key,
                format!("record {text:?} is not `<token> <renewals>\\n<holder>`"),
            ));
        };
        let fields: Vec<&str> = head.split(' ').collect();
        let (token, renewals, released) = match fields.as_slice() {
            [token, renewals] => (*token, *renewals, false),
            [token, renewals, "released"] => (*token, *renewals, true),
            _ => return Err(corrupt(key, format!("record head {head:?} is malformed"))),
        };
        let token = match token {
            "-" => None,
            token => Some(
                token
                    .parse()
                    .map_err(|_| corrupt(key, format!("token {token:?} is not a number")))?,
            ),
        };
        let renewals = renewals
            .parse()
            .map_err(|_| corrupt(key, format!("renewals {renewals:?} is not a number")))?;
        if token.is_none() && (renewals != 0 || released) {
            return Err(corrupt(
                key,
                format!("record {text:?} has no token but is not fresh"),
            ));
        }
        Ok(Self {
            token,
            renewals,
            released,
            holder: holder.to_owned(),
        })
    }

    /// The record, given the key's `mod_revision` (the token of a fresh term).
    fn record(&self, mod_revision: i64) -> LeaseRecord {
        LeaseRecord {
            holder: NodeId::new(self.holder.clone()),
            token: FencingToken(
                self.token
                    .unwrap_or_else(|| u64::try_from(mod_revision).unwrap_or(0)),
            ),
            renewals: self.renewals,
            released: self.released,
        }
    }

    /// The value a record was written as (fresh terms carry no token).
    fn of(record: &LeaseRecord) -> Self {
        let fresh = record.renewals == 0 && !record.released;
        Self {
            token: (!fresh).then_some(record.token.get()),
            renewals: record.renewals,
            released: record.released,
            holder: record.holder.as_str().to_owned(),
        }
    }
}

/// The etcd lease TTL for a term of `ttl`: `3 × ttl` in whole seconds, rounded up.
fn lease_ttl(ttl: Duration) -> i64 {
    member_ttl(ttl).saturating_mul(LEASE_TTL_FACTOR)
}

/// An etcd lease TTL for a member beating every so often with `ttl`: whole seconds, rounded up.
fn member_ttl(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1)
}

fn corrupt(key: &str, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        store: KIND,
        key: key.to_owned(),
        detail: detail.into(),
    }
}

fn store_error(op: &'static str, key: &str, error: etcd_client::Error) -> Error {
    Error::Store {
        store: KIND,
        op,
        key: key.to_owned(),
        source: Box::new(error),
    }
}

/// Whether etcd answered that the lease is gone (expired or revoked): the record went with it.
fn lease_gone(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::LeaseKeepAliveError(_) => true,
        // etcd's `ErrGRPCLeaseNotFound` (code NotFound): "etcdserver: requested lease not found".
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        _ => false,
    }
}

/// The revision a response was served at.
fn header_revision(response: &TxnResponse) -> i64 {
    response
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision)
}

/// The first key-value a transaction's `get` returned, if any.
fn got(response: &TxnResponse) -> Option<KeyValue> {
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
        _ => None,
    })
}

impl EtcdLeaseStore {
    /// Connects to the etcd cluster at `endpoints` (`host:port` or `http://host:port`; the
    /// client balances over all of them) and checks that it answers.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), ha_election::Error> {
    /// let store = ha_election::EtcdLeaseStore::connect(&["127.0.0.1:2379"]).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect<E: AsRef<str>>(endpoints: &[E]) -> Result<Self> {
        Self::connect_with(endpoints, EtcdLeaseStoreOptions::default()).await
    }

    /// Connects to `etcd://host:port[,host:port...]` (or a bare endpoint list).
    pub async fn connect_url(url: &str) -> Result<Self> {
        let endpoints = parse_url(url)?;
        Self::connect(&endpoints).await
    }

    /// [`connect`](Self::connect) with `options`.
    pub async fn connect_with<E: AsRef<str>>(
        endpoints: &[E],
        options: EtcdLeaseStoreOptions,
    ) -> Result<Self> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| {
                let e = e.as_ref();
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let target = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(Error::Config(ha_core::ConfigError::new(
                "endpoints",
                "must name at least one etcd member",
            )));
        }
        with_timeout(KIND, "connect", &target, CONNECT_DEADLINE, async {
            let connect = ConnectOptions::new()
                .with_connect_timeout(options.connect_timeout)
                .with_timeout(options.request_timeout)
                .with_keep_alive(options.keep_alive.0, options.keep_alive.1)
                .with_keep_alive_while_idle(true)
                .with_require_leader(true);
            let mut clients = Vec::with_capacity(endpoints.len());
            for endpoint in &endpoints {
                let client = Client::connect([endpoint.as_str()], Some(connect.clone()))
                    .await
                    .map_err(|e| store_error("connect", endpoint, e))?;
                clients.push(client);
            }
            // The first member with a leader that answers a linearizable read is the one used.
            let mut last = None;
            let mut current = None;
            for (index, client) in clients.iter().enumerate() {
                let mut client = client.clone();
                let probe = client.get(
                    options.lease_prefix(),
                    Some(GetOptions::new().with_count_only()),
                );
                match tokio::time::timeout(options.connect_timeout, probe).await {
                    Ok(Ok(_)) => {
                        current = Some(index);
                        break;
                    }
                    Ok(Err(e)) => last = Some(store_error("connect", &endpoints[index], e)),
                    Err(_) => {
                        last = Some(Error::Timeout {
                            store: KIND,
                            op: "connect",
                            key: endpoints[index].clone(),
                            after: options.connect_timeout,
                        });
                    }
                }
            }
            let Some(current) = current else {
                return Err(last.unwrap_or_else(|| Error::Unsupported {
                    store: KIND,
                    op: "connect",
                    key: target.clone(),
                }));
            };
            tracing::debug!(store = KIND, %target, member = %endpoints[current], "connected");
            Ok(Self {
                inner: Arc::new(Inner {
                    clients,
                    current: AtomicUsize::new(current),
                    target: target.clone(),
                    options,
                    terms: Mutex::default(),
                    members: Mutex::default(),
                    watcher: OnceCell::new(),
                }),
            })
        })
        .await
    }

    /// The etcd key of lease `key`'s record.
    pub fn record_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.options.lease_prefix())
    }

    fn member_prefix(&self, group: &str) -> String {
        format!("{}{group}/", self.inner.options.members_prefix())
    }

    /// The client of the member in use.
    fn client(&self) -> Client {
        self.inner.clients[self.member()].clone()
    }

    /// The index of the member in use.
    fn member(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed) % self.inner.clients.len()
    }

    /// Runs one operation under `timeout` on the member in use; if it failed in a way another
    /// member may not (a timeout, a refused connection, a member without a leader), the next
    /// operation goes to the next member.
    async fn run<T>(
        &self,
        op: &'static str,
        key: &str,
        timeout: Duration,
        operation: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let member = self.member();
        let outcome = with_timeout(KIND, op, key, timeout, operation).await;
        if let Err(e) = &outcome
            && e.is_retryable()
            && self.inner.clients.len() > 1
        {
            let next = (member + 1) % self.inner.clients.len();
            if self
                .inner
                .current
                .compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::debug!(store = KIND, op, key, error = %e, from = member, to = next, "moving to the next etcd member");
            }
        }
        outcome
    }

    fn terms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Term>> {
        self.inner
            .terms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Grants an etcd lease of `seconds`.
    async fn grant(&self, op: &'static str, key: &str, seconds: i64) -> Result<i64> {
        let granted = self
            .client()
            .lease_grant(seconds, None)
            .await
            .map_err(|e| store_error(op, key, e))?;
        Ok(granted.id())
    }

    /// Revokes a lease nobody uses, in the background (it would expire on its own anyway).
    fn revoke_later(&self, lease: i64) {
        let mut client = self.client();
        let timeout = self.inner.options.request_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, client.lease_revoke(lease)).await;
        });
    }

    /// The store's estimate of the term's remaining life from its lease: the lease's remaining
    /// TTL less two thirds of its granted TTL (the retention after the term lapses).
    async fn remaining(&self, op: &'static str, key: &str, lease: i64) -> Result<Duration> {
        if lease == 0 {
            return Ok(Duration::ZERO);
        }
        let ttl = self
            .client()
            .lease_time_to_live(lease, None)
            .await
            .map_err(|e| store_error(op, key, e))?;
        if ttl.ttl() <= 0 {
            return Ok(Duration::ZERO);
        }
        let retention = ttl.granted_ttl() - ttl.granted_ttl() / LEASE_TTL_FACTOR;
        let left = u64::try_from(ttl.ttl().saturating_sub(retention)).unwrap_or(0);
        Ok(Duration::from_secs(left))
    }

    /// The info of a record key-value.
    async fn info(&self, op: &'static str, key: &str, kv: &KeyValue) -> Result<LeaseInfo> {
        let value = Value::decode(key, kv.value())?;
        let record = value.record(kv.mod_revision());
        let remaining = if record.released {
            Duration::ZERO
        } else {
            self.remaining(op, key, kv.lease()).await?
        };
        Ok(LeaseInfo {
            holder: record.holder,
            token: record.token,
            renewals: record.renewals,
            released: record.released,
            remaining,
        })
    }

    /// The term `(holder, token)` of `key` as last written: from this store's memory, or read
    /// (a term granted through another store, e.g. before a restart). `None`: not that term.
    async fn current_term(
        &self,
        op: &'static str,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        fresh: bool,
    ) -> Result<Option<Term>> {
        if !fresh
            && let Some(term) = self.terms().get(key)
            && term.holder == *holder
            && term.token == token
        {
            return Ok(Some(term.clone()));
        }
        let response = self
            .client()
            .get(self.record_key(key), None)
            .await
            .map_err(|e| store_error(op, key, e))?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let value = Value::decode(key, kv.value())?;
        let record = value.record(kv.mod_revision());
        if record.holder != *holder || record.token != token || record.released {
            return Ok(None);
        }
        Ok(Some(Term {
            holder: record.holder,
            token,
            renewals: record.renewals,
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Rewrites the term's record as `next` if its `mod_revision` is still the one in `term`.
    /// `Ok(None)`: the record changed (the answer holds what it is now).
    async fn rewrite(
        &self,
        op: &'static str,
        key: &str,
        term: &Term,
        next: &Value,
    ) -> Result<std::result::Result<i64, Option<KeyValue>>> {
        let record_key = self.record_key(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                record_key.clone(),
                CompareOp::Equal,
                term.mod_revision,
            )])
            .and_then([TxnOp::put(
                record_key.clone(),
                next.encode(),
                Some(PutOptions::new().with_lease(term.lease)),
            )])
            .or_else([TxnOp::get(record_key, None)]);
        match self.client().txn(txn).await {
            Ok(response) if response.succeeded() => Ok(Ok(header_revision(&response))),
            Ok(response) => Ok(Err(got(&response))),
            Err(e) if lease_gone(&e) => Ok(Err(None)),
            Err(e) => Err(store_error(op, key, e)),
        }
    }

    /// Rewrites the term `(holder, token)` of `key` as `next(term)` together with a one-off
    /// keep-alive of its lease (one round trip), at most twice: from memory, then from a
    /// fresh read if memory was stale. `None`: not that term (any more). Otherwise the term
    /// as it was, the new record's revision and the keep-alive's answer.
    async fn rewrite_term(
        &self,
        op: &'static str,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        next: impl Fn(&Term) -> Value,
    ) -> Result<Option<(Term, i64, std::result::Result<(), etcd_client::Error>)>> {
        let mut fresh = false;
        for _ in 0..2 {
            let Some(term) = self.current_term(op, key, holder, token, fresh).await? else {
                return Ok(None);
            };
            let value = next(&term);
            let mut lease_client = self.client();
            let keep_alive = async { lease_client.lease_keep_alive(term.lease).await };
            let (kept, rewritten) = tokio::join!(keep_alive, self.rewrite(op, key, &term, &value));
            match rewritten? {
                Ok(revision) => return Ok(Some((term, revision, kept.map(drop)))),
                Err(_) if !fresh => fresh = true,
                Err(_) => break,
            }
        }
        Ok(None)
    }

    async fn watcher(&self) -> Result<&Watcher> {
        self.inner
            .watcher
            .get_or_try_init(|| async {
                let senders = Senders::default();
                let prefix = self.inner.options.lease_prefix();
                // The revision to watch from: now (changes before the first watch are moot).
                let start = with_timeout(
                    KIND,
                    "watch",
                    &prefix,
                    self.inner.options.request_timeout,
                    async {
                        let response = self
                            .client()
                            .get(prefix.clone(), Some(GetOptions::new().with_count_only()))
                            .await
                            .map_err(|e| store_error("watch", &prefix, e))?;
                        Ok(response
                            .header()
                            .map_or(0, etcd_client::ResponseHeader::revision)
                            + 1)
                    },
                )
                .await?;
                let task = tokio::spawn(watch_loop(
                    self.inner.clients.clone(),
                    self.member(),
                    prefix,
                    start,
                    Arc::clone(&senders),
                ));
                Ok(Watcher { senders, task })
            })
            .await
    }
}

/// The endpoints of `etcd://host:port[,host:port...]` (or of a bare comma-separated list).
pub fn parse_url(url: &str) -> Result<Vec<String>> {
    let list = url.strip_prefix("etcd://").unwrap_or(url);
    let list = list.trim_end_matches('/');
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if endpoints.is_empty() || endpoints.iter().any(|e| !e.contains(':')) {
        return Err(Error::Config(ha_core::ConfigError::new(
            "url",
            format!("`{url}` is not `etcd://host:port[,host:port...]`"),
        )));
    }
    Ok(endpoints)
}

/// Follows every change under `prefix` from revision `start`, pushing grants, releases and
/// deletions to the watchers of each key; reopens a broken watch from the next revision, on
/// the next member.
async fn watch_loop(
    clients: Vec<Client>,
    mut member: usize,
    prefix: String,
    mut start: i64,
    senders: Senders,
) {
    let mut backoff = watch_retry();
    loop {
        let client = &clients[member % clients.len()];
        member = member.wrapping_add(1);
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let opened = client.clone().watch(prefix.clone(), Some(options)).await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(store = KIND, error = %e, "lease watch failed to open; retrying on the next member");
                tokio::time::sleep(backoff.next().unwrap_or_default()).await;
                continue;
            }
        };
        // Until the stream ends or fails (a member down, a partition, no leader).
        while let Ok(Some(response)) = stream.message().await {
            backoff.reset();
            if response.compact_revision() > 0 {
                // History from `start` is gone: re-check everything, watch from now.
                start = response.compact_revision();
                notify(&senders, None);
                break;
            }
            if response.canceled() {
                tracing::debug!(
                    store = KIND,
                    reason = response.cancel_reason(),
                    "lease watch cancelled"
                );
                break;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                // Resume after the last event delivered (a header's revision may run ahead of
                // the events a catching-up watcher has been sent).
                start = start.max(kv.mod_revision() + 1);
                let Some(key) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                else {
                    continue;
                };
                let pushed = match event.event_type() {
                    EventType::Delete => true,
                    EventType::Put => Value::decode(key, kv.value())
                        .map_or(true, |v| v.token.is_none() || v.released),
                };
                if pushed {
                    notify(&senders, Some(key));
                }
            }
        }
        // Changes may have been missed while the watch was down (they are replayed from
        // `start`, but only once it reopens): tell every watcher to look now.
        tracing::debug!(store = KIND, "lease watch broke; reopening");
        notify(&senders, None);
        tokio::time::sleep(backoff.next().unwrap_or_default()).await;
    }
}

/// Tells the watchers of `key` (all watchers for `None`) that it may have changed.
fn notify(senders: &Senders, key: Option<&str>) {
    let mut senders = senders.lock().unwrap_or_else(PoisonError::into_inner);
    senders.retain(|_, sender| sender.receiver_count() > 0);
    for (watched, sender) in senders.iter() {
        if key.is_none_or(|k| k == watched) {
            let _ = sender.send(LeaseChange {
                key: watched.clone(),
            });
        }
    }
}

#[async_trait]
impl LeaseStore for EtcdLeaseStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn acquire(
        &self,
        key: &str,
        holder: &NodeId,
        ttl: Duration,
        expected: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<Acquire> {
        self.run(
            "acquire",
            key,
            timeout,
            Box::pin(async {
                let record_key = self.record_key(key);
                let lease = self.grant("acquire", key, lease_ttl(ttl)).await?;
                let compares = match expected {
                    None => vec![Compare::version(record_key.clone(), CompareOp::Equal, 0)],
                    Some(record) => {
                        let value = Value::of(record);
                        let mut compares = vec![Compare::value(
                            record_key.clone(),
                            CompareOp::Equal,
                            value.encode(),
                        )];
                        if value.token.is_none() {
                            let revision = i64::try_from(record.token.get()).unwrap_or(i64::MAX);
                            compares.push(Compare::mod_revision(
                                record_key.clone(),
                                CompareOp::Equal,
                                revision,
                            ));
                        }
                        compares
                    }
                };
                let fresh = Value {
                    token: None,
                    renewals: 0,
                    released: false,
                    holder: holder.as_str().to_owned(),
                };
                let txn = Txn::new()
                    .when(compares)
                    .and_then([TxnOp::put(
                        record_key.clone(),
                        fresh.encode(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(record_key, None)]);
                let response = match self.client().txn(txn).await {
                    Ok(response) => response,
                    Err(e) => {
                        self.revoke_later(lease);
                        return Err(store_error("acquire", key, e));
                    }
                };
                let outcome = if response.succeeded() {
                    let revision = header_revision(&response);
                    let token = FencingToken(u64::try_from(revision).unwrap_or(0));
                    self.terms().insert(
                        key.to_owned(),
                        Term {
                            holder: holder.clone(),
                            token,
                            renewals: 0,
                            lease,
                            mod_revision: revision,
                        },
                    );
                    Acquire::Acquired(token)
                } else {
                    self.revoke_later(lease);
                    match got(&response) {
                        Some(kv) => Acquire::Held(self.info("acquire", key, &kv).await?),
                        None => Acquire::Vacant,
                    }
                };
                tracing::debug!(store = KIND, key, %holder, ?outcome, "acquire");
                Ok(outcome)
            }),
        )
        .await
    }

    async fn renew(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<bool> {
        let _ = ttl; // the term's etcd lease keeps the TTL it was granted with
        self.run(
            "renew",
            key,
            timeout,
            Box::pin(async {
                let next = |term: &Term| Value {
                    token: Some(token.get()),
                    renewals: term.renewals + 1,
                    released: false,
                    holder: holder.as_str().to_owned(),
                };
                let Some((term, revision, kept)) =
                    self.rewrite_term("renew", key, holder, token, next).await?
                else {
                    self.terms().remove(key);
                    tracing::debug!(store = KIND, key, %holder, %token, "not renewed: not that term");
                    return Ok(false);
                };
                match kept {
                    Ok(()) => {}
                    Err(e) if lease_gone(&e) => {
                        // Answered with TTL <= 0: the lease, and the record, are gone.
                        self.terms().remove(key);
                        return Ok(false);
                    }
                    Err(e) => return Err(store_error("renew", key, e)),
                }
                self.terms().insert(
                    key.to_owned(),
                    Term {
                        renewals: term.renewals + 1,
                        mod_revision: revision,
                        ..term
                    },
                );
                tracing::debug!(store = KIND, key, %holder, %token, "renewed");
                Ok(true)
            }),
        )
        .await
    }

    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool> {
        self.run(
            "release",
            key,
            timeout,
            Box::pin(async {
                // The lease is kept alive too, so the tombstone stays for the full retention
                // even if the term had lapsed by etcd's clock (a failed keep-alive changes
                // nothing: the rewrite decides).
                let tombstone = |term: &Term| Value {
                    token: Some(token.get()),
                    renewals: term.renewals,
                    released: true,
                    holder: holder.as_str().to_owned(),
                };
                let released = self
                    .rewrite_term("release", key, holder, token, tombstone)
                    .await?
                    .is_some();
                self.terms().remove(key);
                if released {
                    tracing::debug!(store = KIND, key, %holder, %token, "released");
                }
                Ok(released)
            }),
        )
        .await
    }

    async fn read(&self, key: &str, timeout: Duration) -> Result<Option<LeaseInfo>> {
        self.run(
            "read",
            key,
            timeout,
            Box::pin(async {
                let response = self
                    .client()
                    .get(self.record_key(key), None)
                    .await
                    .map_err(|e| store_error("read", key, e))?;
                let info = match response.kvs().first() {
                    Some(kv) => Some(self.info("read", key, kv).await?),
                    None => None,
                };
                tracing::debug!(store = KIND, key, ?info, "read");
                Ok(info)
            }),
        )
        .await
    }

    async fn watch(&self, key: &str) -> Result<Option<LeaseWatch>> {
        let watcher = self.watcher().await?;
        let mut senders = watcher
            .senders
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let watch = senders
            .entry(key.to_owned())
            .or_insert_with(|| broadcast::channel(WATCH_CAPACITY).0)
            .subscribe();
        tracing::debug!(store = KIND, key, "watching");
        Ok(Some(watch))
    }

    async fn heartbeat(
        &self,
        group: &str,
        node: &NodeId,
        meta: &BTreeMap<String, String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<()> {
        self.run(
            "heartbeat",
            group,
            timeout,
            Box::pin(async {
                let meta = serde_json::to_string(meta)
                    .map_err(|e| corrupt(group, format!("meta: {e}")))?;
                let member_key = format!("{}{}", self.member_prefix(group), node.as_str());
                let slot = (group.to_owned(), node.as_str().to_owned());
                let seconds = member_ttl(ttl);
                let cached = self
                    .inner
                    .members
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&slot)
                    .copied();
                if let Some(lease) = cached {
                    let mut lease_client = self.client();
                    let mut kv_client = self.client();
                    let (kept, put) = tokio::join!(
                        lease_client.lease_keep_alive(lease),
                        kv_client.put(
                            member_key.clone(),
                            meta.clone(),
                            Some(PutOptions::new().with_lease(lease))
                        )
                    );
                    match (kept, put) {
                        (Ok(_), Ok(_)) => return Ok(()),
                        (Err(e), _) | (_, Err(e)) if !lease_gone(&e) => {
                            return Err(store_error("heartbeat", group, e));
                        }
                        // The lease is gone: grant a new one below.
                        _ => {}
                    }
                }
                let lease = self.grant("heartbeat", group, seconds).await?;
                self.client()
                    .put(member_key, meta, Some(PutOptions::new().with_lease(lease)))
                    .await
                    .map_err(|e| store_error("heartbeat", group, e))?;
                let previous = self
                    .inner
                    .members
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(slot, lease);
                if let Some(previous) = previous {
                    self.revoke_later(previous);
                }
                tracing::debug!(store = KIND, group, %node, "member heartbeat");
                Ok(())
            }),
        )
        .await
    }

    async fn members(&self, group: &str, timeout: Duration) -> Result<Vec<Member>> {
        self.run(
            "members",
            group,
            timeout,
            Box::pin(async {
                let prefix = self.member_prefix(group);
                let response = self
                    .client()
                    .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| store_error("members", group, e))?;
                let mut members = Vec::new();
                for kv in response.kvs() {
                    let Some(node) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                        continue;
                    };
                    if node.contains('/') {
                        continue; // a deeper group's member
                    }
                    let meta: BTreeMap<String, String> = serde_json::from_slice(kv.value())
                        .map_err(|e| corrupt(group, format!("member {node} meta: {e}")))?;
                    let remaining = if kv.lease() == 0 {
                        Duration::ZERO
                    } else {
                        let ttl = self
                            .client()
                            .lease_time_to_live(kv.lease(), None)
                            .await
                            .map_err(|e| store_error("members", group, e))?;
                        if ttl.ttl() <= 0 {
                            continue; // expired just now
                        }
                        Duration::from_secs(u64::try_from(ttl.ttl()).unwrap_or(0))
                    };
                    members.push(Member {
                        node: NodeId::new(node),
                        meta,
                        remaining,
                    });
                }
                members.sort_by(|a, b| a.node.as_str().cmp(b.node.as_str()));
                Ok(members)
            }),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_fresh_terms_take_their_revision() {
        let fresh = Value {
            token: None,
            renewals: 0,
            released: false,
            holder: "node\nwith newline".to_owned(),
        };
        assert_eq!(fresh.encode(), b"- 0\nnode\nwith newline");
        assert_eq!(Value::decode("k", &fresh.encode()).unwrap(), fresh);
        let record = fresh.record(42);
        assert_eq!(record.token, FencingToken(42));
        assert_eq!(Value::of(&record), fresh);
        let tomb = Value {
            token: Some(42),
            renewals: 3,
            released: true,
            holder: "n".to_owned(),
        };
        assert_eq!(tomb.encode(), b"42 3 released\nn");
        assert_eq!(Value::of(&tomb.record(99)), tomb);
    }

    #[test]
    fn unreadable_values_are_corrupt() {
        for bad in [
            "",
            "x 0\nn",
            "- 1\nn",
            "- 0 released\nn",
            "5 0 gone\nn",
            "5\nn",
        ] {
            let err = Value::decode("k", bad.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn lease_ttls_round_up_to_seconds() {
        assert_eq!(lease_ttl(Duration::from_millis(300)), 3);
        assert_eq!(lease_ttl(Duration::from_millis(1500)), 6);
        assert_eq!(member_ttl(Duration::from_millis(300)), 1);
        assert_eq!(member_ttl(Duration::from_secs(60)), 60);
    }

    #[test]
    fn urls_list_endpoints() {
        assert_eq!(
            parse_url("etcd://a:1,b:2/").unwrap(),
            vec!["a:1".to_owned(), "b:2".to_owned()]
        );
        assert!(parse_url("etcd://").is_err());
        assert!(parse_url("etcd://host-without-port").is_err());
    }
}
