//! `RedisLeaseStore`: leases in Redis (standalone or behind Sentinel), one Lua script call per
//! operation, fencing tokens floored by the server's clock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::{
    Client, ClientLike, Config, ConnectionConfig, EventInterface, LuaInterface, PerformanceConfig,
    PubsubInterface, ReconnectPolicy, ServerConfig,
};
use fred::types::config::Options;
use fred::types::{ConnectHandle, Value};
use ha_core::{FencingToken, NodeId};
use tokio::sync::{OnceCell, broadcast};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::{
    Acquire, LeaseChange, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, with_timeout,
};

const KIND: &str = "redis";

/// The lease script (see `lease.lua` next to this file for its contract).
const SCRIPT: &str = include_str!("lease.lua");

/// Where acquire and release announce a change; the payload is the lease key.
pub const CHANGE_CHANNEL: &str = "ha:lease-changes";

/// Prefix of every key this store writes: `ha:lease:{<key>}` holds the record and
/// `ha:lease:{<key>}:token` the last token. The braces keep both in one cluster hash slot.
pub const KEY_PREFIX: &str = "ha:lease:";

/// Bounds the TCP connect (and, for Sentinel, each sentinel query) of every (re)connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection with a command unanswered for this long is closed and reopened: it is most
/// likely half-open (a partition, a frozen server), and later commands must not queue behind it.
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(5);

/// Bounds `connect` as a whole: the first connection, `SCRIPT LOAD`, and for Sentinel the
/// master lookup.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// The longest a `WAIT` for a replica's acknowledgement may block the store's connection
/// (it stays well below [`UNRESPONSIVE_AFTER`]).
pub const MAX_REPLICA_WAIT: Duration = Duration::from_secs(2);

/// Capacity of each watched key's change channel; a slow watcher is told it lagged.
const WATCH_CAPACITY: usize = 64;

/// The record key of lease `key`.
pub fn record_key(key: &str) -> String {
    format!("{KEY_PREFIX}{{{key}}}")
}

/// The key holding the last token handed out for lease `key` (no expiry).
pub fn counter_key(key: &str) -> String {
    format!("{KEY_PREFIX}{{{key}}}:token")
}

/// The sorted set of members of `group`, scored by expiry (server milliseconds).
pub fn members_key(group: &str) -> String {
    format!("ha:members:{{{group}}}")
}

/// The hash of each member's meta in `group`.
pub fn members_meta_key(group: &str) -> String {
    format!("ha:members:{{{group}}}:meta")
}

/// Leases in Redis, through [fred](https://docs.rs/fred): a standalone server
/// ([`connect`](Self::connect)) or the master of a Sentinel-managed set
/// ([`connect_sentinel`](Self::connect_sentinel)).
///
/// # How it meets the [`LeaseStore`] rules
///
/// - **The store's clock decides nothing.** A lease is one string key `ha:lease:{<key>}` =
///   `<token> <renewals> <ttl ms>[ released]\n<holder>` with a `PX` of twice the TTL. Followers
///   judge expiry on their own clocks and take a record over by compare-and-set on exactly
///   what they observed; Redis's clock only bounds how long an abandoned record lingers (a
///   clock step on the server can make it vanish early, which followers treat as a change and
///   wait out). The TTL travels in whole milliseconds, rounded up.
/// - **Atomic, one round trip.** acquire, renew, release and read are each one `EVALSHA` of a
///   single Lua script (loaded with `SCRIPT LOAD` at connect). A script runs atomically, so
///   check-and-set cannot interleave with another client. If the server forgot the script (a
///   restart, a failover to a node that never loaded it, `SCRIPT FLUSH`) the `NOSCRIPT` reply
///   makes the store load it again and retry once: two extra round trips, only then.
/// - **Compare-and-set.** acquire compares the record with the expected one (holder, token,
///   renewals, released); renew and release compare holder and token of a term that was not
///   released. renew rewrites the record with one more renewal; release leaves a tombstone with
///   the record's remaining life (`KEEPTTL`).
/// - **Tokens only grow, even across data loss.** acquire takes
///   `token = max(last + 1, TIME in µs)`, where `last` is the per-key counter
///   `ha:lease:{<key>}:token` (no expiry) and `TIME` is the server's clock, then stores the token
///   as the new `last`. If the counter is lost (restart without persistence, a failover that
///   lost the write) the floor still exceeds every earlier token, provided that
///   1. the server's clock (after a failover: the new master's clock) is not behind the clock
///      that issued the earlier tokens — a clock step backwards, or a new master whose clock
///      lags the old one, by more than the outage breaks it; and
///   2. tokens did not run ahead of the clock by more than the outage lasted. They only run
///      ahead when one key is acquired more than once per microsecond on average; each
///      acquisition needs a release or an expiry and a round trip first, so in practice the
///      lead is zero and any outage (a restart takes milliseconds) suffices.
///
///   Tokens are microseconds since the Unix epoch (about 1.7 × 10^15), exact in the script's
///   Lua doubles below 2^53, i.e. until the year 2255.
/// - **Timeouts.** Every operation fails with [`Error::Timeout`] naming the operation and key
///   once its `timeout` passed (fred's per-command timeout, see below). A timed-out operation
///   may still have been applied by the server if it was already written.
///
/// fred's own settings: connect timeout [`CONNECT_TIMEOUT`]; a connection whose command stays
/// unanswered for [`UNRESPONSIVE_AFTER`] is dropped and reopened; reconnects back off
/// exponentially from 50 ms to 2 s with jitter and never give up; the operation's `timeout` is
/// fred's own per-command timeout (the outer [`with_timeout`] is only a backstop just after
/// it), so a command still queued inside fred when it expires (behind a reconnect) is
/// skipped, never written later (one already written cannot be recalled); and each command is written at most once — fred does
/// not resend a lease operation after a connection broke mid-flight (the caller, normally the
/// elector, decides whether to retry; a resent acquire would only ever see its own lease).
///
/// # Across a Sentinel failover
///
/// Redis replication is asynchronous, so a lease write the old master acknowledged may be
/// missing on the promoted replica, and fred asks the sentinels for the master only when it
/// reconnects. Behind Sentinel a grant or renewal therefore counts only once a replica
/// acknowledged it ([`RedisLeaseStoreOptions::require_replica_ack`], on by default for
/// [`connect_sentinel`](Self::connect_sentinel): `WAIT 1 <ms>` pipelined with the script, one
/// round trip). What that means:
///
/// - **Handled by the elector: a lost or older record.** If the promoted replica lacks the last
///   acquire or renewals, followers see the record vanish or change and wait a full TTL from
///   then on their own clocks (see [`Elector`](crate::Elector)); the old holder's renewals on
///   the new master fail the compare-and-set, so it stops at its local deadline.
/// - **Bounded by the replica acknowledgement: a leader cut off together with the old
///   master.** A leader that still reaches the old master (a partition that isolates both from
///   the sentinels and the other nodes) gets [`Error::NotReplicated`] for every renewal once
///   the old master reaches no replica, so it stops at the deadline of its last acknowledged
///   renewal (`renew_deadline`), before the followers' `ttl` wait lets another node lead. The
///   bound fails if the old master is cut off with one of its replicas (that replica still
///   acknowledges): give the set enough replicas that a partition minority holds none, or
///   require more with `min-replicas-to-write` on the servers. Without the acknowledgement
///   (opted out, or [`connect`](Self::connect)) the overlap lasts the whole partition.
/// - **Reconnect on `+switch-master`.** The store subscribes to `+switch-master` on every
///   sentinel (one extra connection each, made in the background) and makes fred reconnect,
///   which asks the sentinels for the master again, as soon as one announces a new master for
///   this name; otherwise fred would stay on the old master until that connection broke (a
///   hung old master: [`UNRESPONSIVE_AFTER`] after a command). Announcements are
///   fire-and-forget: one missed while this store is cut off from every sentinel is not
///   replayed, and then the replica acknowledgement above is what bounds the overlap.
/// - **Holds in practice: fencing.** The new holder's token comes from the new master's clock
///   floor (or its replicated counter + 1), so it is greater than the old holder's token as long
///   as the two masters' clocks are synchronised to within the failover time (seconds: Sentinel
///   first waits out `down-after-milliseconds`). Downstream writes checked with fencing tokens
///   therefore reject the old leader even during the overlap.
///
/// # Watching
///
/// [`watch`](LeaseStore::watch) opens one extra connection (a fred subscriber client, on the
/// first call) subscribed to [`CHANGE_CHANNEL`], where acquire and release publish the lease key
/// in the same script. Redis pub/sub is fire-and-forget: a notification published while that
/// connection is down (a reconnect, a failover) is lost. After every reconnect the store
/// resubscribes and then sends a [`LeaseChange`] for each watched key, so watchers re-check
/// instead of waiting for their next poll; followers must still poll, since an *expiry* is never
/// published at all.
#[derive(Clone)]
pub struct RedisLeaseStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The router task of `client`; aborted on drop so a dropped store stops reconnecting.
    connection: ConnectHandle,
    sha: String,
    /// Whether grants and renewals must reach a replica (`WAIT 1`) to count.
    replica_ack: bool,
    target: String,
    config: Settings,
    watcher: OnceCell<Watcher>,
    /// Behind Sentinel: the subscriptions to each sentinel's `+switch-master` and their tasks.
    switches: Mutex<Vec<(ConnectHandle, JoinHandle<()>)>>,
}

/// Everything needed to open another connection like the first one (for the subscriber).
#[derive(Clone)]
struct Settings {
    config: Config,
    performance: PerformanceConfig,
    connection: ConnectionConfig,
    reconnect: ReconnectPolicy,
}

type Senders = Arc<Mutex<HashMap<String, broadcast::Sender<LeaseChange>>>>;

struct Watcher {
    senders: Senders,
    tasks: Vec<JoinHandle<()>>,
    connection: ConnectHandle,
}

impl fmt::Debug for RedisLeaseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLeaseStore")
            .field("target", &self.inner.target)
            .field("script", &self.inner.sha)
            .field("watching", &self.inner.watcher.initialized())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.connection.abort();
        let switches = self
            .switches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (connection, task) in switches.drain(..) {
            connection.abort();
            task.abort();
        }
        if let Some(watcher) = self.watcher.get() {
            watcher.connection.abort();
            for task in &watcher.tasks {
                task.abort();
            }
        }
    }
}

impl Settings {
    fn new(server: ServerConfig) -> Self {
        let config = Config {
            server,
            // Report a first connection that fails instead of retrying silently.
            fail_fast: true,
            ..Config::default()
        };
        // Never writes a lease operation twice on the caller's behalf (the shared settings).
        Self {
            config,
            performance: PerformanceConfig::default(),
            connection: ha_clients::redis::connection(CONNECT_TIMEOUT, Some(UNRESPONSIVE_AFTER)),
            reconnect: ha_clients::redis::reconnect(),
        }
    }

    fn client(&self) -> Client {
        Client::new(
            self.config.clone(),
            Some(self.performance.clone()),
            Some(self.connection.clone()),
            Some(self.reconnect.clone()),
        )
    }

    fn subscriber(&self) -> SubscriberClient {
        SubscriberClient::new(
            self.config.clone(),
            Some(self.performance.clone()),
            Some(self.connection.clone()),
            Some(self.reconnect.clone()),
        )
    }
}

/// Options of a [`RedisLeaseStore`].
///
/// ```
/// let options = ha_election::redis::RedisLeaseStoreOptions::new()
///     .allow_eviction(false)
///     .require_replica_ack(true);
/// assert!(!options.allows_eviction());
/// assert_eq!(options.replica_ack(), Some(true));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RedisLeaseStoreOptions {
    allow_eviction: bool,
    replica_ack: Option<bool>,
}

impl RedisLeaseStoreOptions {
    /// The defaults: refuse a server whose `maxmemory-policy` can evict lease records; require
    /// a replica's acknowledgement behind Sentinel, not on a standalone server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count a grant or renewal only once a replica acknowledged it: a `WAIT 1 <ms>` is
    /// pipelined right after the script (same round trip), `<ms>` being half the operation's
    /// timeout (at most [`MAX_REPLICA_WAIT`]). A `WAIT` that answers 0 turns the grant or
    /// renewal into [`Error::NotReplicated`] (retryable), so a leader's deadline is not
    /// extended by a master that reaches no replica — in particular an old master partitioned
    /// away together with the leader while the sentinels promote another.
    ///
    /// On by default for [`connect_sentinel`](RedisLeaseStore::connect_sentinel) (a Sentinel
    /// set then needs at least one replica up for a leader to stay), off by default for
    /// [`connect`](RedisLeaseStore::connect). While the master waits, later commands on the
    /// store's connection (other keys, heartbeats) queue behind the `WAIT`.
    pub fn require_replica_ack(mut self, require: bool) -> Self {
        self.replica_ack = Some(require);
        self
    }

    /// Whether replica acknowledgements were required or refused explicitly (`None`: the
    /// connect function's default).
    pub fn replica_ack(&self) -> Option<bool> {
        self.replica_ack
    }

    /// Connect even if the server's `maxmemory-policy` can evict lease records (`allkeys-*`,
    /// `volatile-*`; records carry a `PX`, so `volatile-ttl` evicts them first). An evicted
    /// record is data loss: followers then wait a full TTL (see [`Elector`](crate::Elector)),
    /// and a term granted and evicted between two looks of a follower is not covered.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Whether eviction is allowed.
    pub fn allows_eviction(&self) -> bool {
        self.allow_eviction
    }
}

/// Whether a `maxmemory-policy` can evict lease records.
fn policy_evicts(policy: &str) -> bool {
    policy.starts_with("allkeys-") || policy.starts_with("volatile-")
}

/// The server's `maxmemory_policy` from `INFO memory` (available where `CONFIG` is renamed
/// away, as on managed services); `None` if the server does not say.
async fn eviction_policy(
    client: &Client,
) -> std::result::Result<Option<String>, fred::error::Error> {
    let info: String = client
        .custom(
            fred::types::CustomCommand::new_static(
                "INFO",
                fred::types::ClusterHash::FirstKey,
                false,
            ),
            vec!["memory"],
        )
        .await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(|policy| policy.trim().to_owned()))
}

impl RedisLeaseStore {
    /// Connects to a standalone server at `url` (`redis://[user:password@]host:port[/db]`) and
    /// loads the lease script.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), ha_election::Error> {
    /// let store = ha_election::RedisLeaseStore::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Refuses a server whose `maxmemory-policy` can evict lease records
    /// ([`Error::UnsafeSetting`]); see [`connect_with`](Self::connect_with) to opt out.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, RedisLeaseStoreOptions::default()).await
    }

    /// [`connect`](Self::connect) with `options`.
    pub async fn connect_with(url: &str, options: RedisLeaseStoreOptions) -> Result<Self> {
        let config = Config::from_url(url).map_err(|e| store_error("connect", &redact(url), e))?;
        let mut settings = Settings::new(config.server.clone());
        settings.config = Config {
            fail_fast: true,
            ..config
        };
        Self::start(settings, redact(url), options, false).await
    }

    /// Connects to the master that the Sentinels at `sentinels` know as `master_name`, and
    /// loads the lease script. After a failover fred asks the sentinels again and reconnects
    /// to the new master.
    ///
    /// Refuses a master whose `maxmemory-policy` can evict lease records, as
    /// [`connect`](Self::connect) does (checked at connect only, not after a failover).
    pub async fn connect_sentinel(sentinels: &[SocketAddr], master_name: &str) -> Result<Self> {
        Self::connect_sentinel_with(sentinels, master_name, RedisLeaseStoreOptions::default()).await
    }

    /// [`connect_sentinel`](Self::connect_sentinel) with `options`.
    pub async fn connect_sentinel_with(
        sentinels: &[SocketAddr],
        master_name: &str,
        options: RedisLeaseStoreOptions,
    ) -> Result<Self> {
        let hosts = sentinels
            .iter()
            .map(|addr| (addr.ip().to_string(), addr.port()))
            .collect();
        let server = ServerConfig::new_sentinel(hosts, master_name);
        let list: Vec<String> = sentinels.iter().map(ToString::to_string).collect();
        let target = format!("sentinel {master_name} via {}", list.join(","));
        let store = Self::start(Settings::new(server), target, options, true).await?;
        let switches = follow_switch_master(&store.inner.client, sentinels, master_name);
        *store
            .inner
            .switches
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = switches;
        Ok(store)
    }

    async fn start(
        settings: Settings,
        target: String,
        options: RedisLeaseStoreOptions,
        sentinel: bool,
    ) -> Result<Self> {
        let replica_ack = options.replica_ack.unwrap_or(sentinel);
        with_timeout(KIND, "connect", &target, CONNECT_DEADLINE, async {
            let client = settings.client();
            let connection = client
                .init()
                .await
                .map_err(|e| store_error("connect", &target, e))?;
            match eviction_policy(&client).await {
                Ok(Some(policy)) if policy_evicts(&policy) => {
                    if !options.allow_eviction {
                        connection.abort();
                        return Err(Error::UnsafeSetting {
                            store: KIND,
                            target: target.clone(),
                            setting: "maxmemory-policy",
                            value: policy,
                            why: "can evict lease records (a lease granted while its term runs); use `noeviction`",
                        });
                    }
                    tracing::warn!(store = KIND, %target, %policy, "maxmemory-policy can evict lease records; allowed by the store's options");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(store = KIND, %target, error = %e, "could not read maxmemory-policy; assuming it does not evict");
                }
            }
            let sha = match client.script_load::<String, _>(SCRIPT).await {
                Ok(sha) => sha,
                Err(e) => {
                    connection.abort();
                    return Err(store_error("connect", &target, e));
                }
            };
            tracing::debug!(store = KIND, %target, script = %sha, replica_ack, "connected; lease script loaded");
            Ok(Self {
                inner: Arc::new(Inner {
                    client,
                    connection,
                    sha,
                    replica_ack,
                    target: target.clone(),
                    config: settings,
                    watcher: OnceCell::new(),
                    switches: Mutex::default(),
                }),
            })
        })
        .await
    }

    /// Runs the lease script for `op` on `key`: one `EVALSHA`, plus `SCRIPT LOAD` and a second
    /// `EVALSHA` if the server answers `NOSCRIPT`. With `ack` (and the store's
    /// `require_replica_ack`) a `WAIT 1` follows each `EVALSHA` in the same round trip, and a
    /// write no replica acknowledged fails with [`Error::NotReplicated`] (see `acknowledged`).
    async fn run(
        &self,
        op: &'static str,
        key: &str,
        args: Vec<String>,
        timeout: Duration,
        ack: bool,
    ) -> Result<(Value, Option<Acked>)> {
        self.run_on(
            op,
            key,
            vec![record_key(key), counter_key(key)],
            args,
            timeout,
            ack,
        )
        .await
    }

    /// Runs the script for `op` with explicit `keys` (`key` names the subject in errors).
    ///
    /// Every command carries fred's own timeout, ending when the caller's `timeout` does:
    /// fred then marks it timed out and skips it if it is still queued (for example behind a
    /// reconnect), so an operation the caller gave up on is not written later. A command
    /// already written cannot be recalled.
    async fn run_on(
        &self,
        op: &'static str,
        key: &str,
        keys: Vec<String>,
        args: Vec<String>,
        timeout: Duration,
        ack: bool,
    ) -> Result<(Value, Option<Acked>)> {
        let deadline = command_deadline(timeout);
        let ack = ack && self.inner.replica_ack;
        // Boxed: fred's command futures are large, and every operation would carry them.
        let first = Box::pin(self.eval(keys.clone(), args.clone(), deadline, ack)).await;
        let (reply, acked) = match first {
            (Err(e), _) if e.details().starts_with("NOSCRIPT") => {
                tracing::debug!(
                    store = KIND,
                    op,
                    key,
                    "server lost the lease script; reloading"
                );
                Box::pin(
                    self.inner
                        .client
                        .with_options(&command_options(deadline))
                        .custom::<String, _>(command("SCRIPT"), vec!["LOAD", SCRIPT]),
                )
                .await
                .map_err(|e| self.error(op, key, e, timeout))?;
                Box::pin(self.eval(keys, args, deadline, ack)).await
            }
            other => other,
        };
        let reply = reply.map_err(|e| self.error(op, key, e, timeout))?;
        let acked = acked
            .map(|acked| acked.map_err(|e| self.error(op, key, e, timeout)))
            .transpose()?;
        Ok((reply, acked))
    }

    /// One `EVALSHA`, followed on the same connection by `WAIT 1 <ms>` if `ack`. Both are
    /// handed to fred's router before either is awaited (`join!` in `biased` order polls the
    /// script first), so fred's automatic pipelining writes them back to back: one round trip.
    /// (fred's `Pipeline` would also do, but it does not mark its commands timed out when the
    /// caller's timeout passes, so a queued pipeline would still be written after a reconnect.)
    async fn eval(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
        deadline: Instant,
        ack: bool,
    ) -> (
        std::result::Result<Value, fred::error::Error>,
        Option<std::result::Result<Acked, fred::error::Error>>,
    ) {
        let client = self.inner.client.with_options(&command_options(deadline));
        // `custom`, not `evalsha`: fred's `WithOptions` does not implement `LuaInterface`, so
        // `evalsha` on it would go to the plain client and drop the per-command timeout.
        let mut command_args = Vec::with_capacity(2 + keys.len() + args.len());
        command_args.push(self.inner.sha.clone());
        command_args.push(keys.len().to_string());
        command_args.extend(keys);
        command_args.extend(args);
        let script = client.custom::<Value, _>(command("EVALSHA"), command_args);
        if !ack {
            return (script.await, None);
        }
        let waited = replica_wait(deadline);
        let wait = async {
            let millis = i64::try_from(waited.as_millis()).unwrap_or(i64::MAX);
            client
                .custom::<i64, _>(command("WAIT"), vec![1, millis])
                .await
                .map(|replicas| Acked {
                    replicas: u64::try_from(replicas).unwrap_or(0),
                    waited,
                })
        };
        let (reply, acked) = tokio::join!(biased; script, wait);
        (reply, Some(acked))
    }

    fn error(
        &self,
        op: &'static str,
        key: &str,
        error: fred::error::Error,
        timeout: Duration,
    ) -> Error {
        if *error.kind() == fred::error::ErrorKind::Timeout {
            // fred's own per-command timeout (see `command_deadline`): the caller's timeout.
            return Error::Timeout {
                store: KIND,
                op,
                key: key.to_owned(),
                after: timeout,
            };
        }
        let details = error.details();
        if details.starts_with("CORRUPT") || details.starts_with("WRONGTYPE") {
            return Error::Corrupt {
                store: KIND,
                key: key.to_owned(),
                detail: details.to_owned(),
            };
        }
        store_error(op, key, error)
    }

    async fn watcher(&self) -> Result<&Watcher> {
        self.inner
            .watcher
            .get_or_try_init(|| Watcher::start(&self.inner.config, &self.inner.target))
            .await
    }
}

impl Watcher {
    async fn start(settings: &Settings, target: &str) -> Result<Self> {
        with_timeout(KIND, "watch", CHANGE_CHANNEL, CONNECT_DEADLINE, async {
            let subscriber = settings.subscriber();
            let connection = subscriber
                .init()
                .await
                .map_err(|e| store_error("watch", target, e))?;
            // Taken before subscribing, so no message published after SUBSCRIBE returns is missed.
            let mut messages = subscriber.message_rx();
            let mut reconnects = subscriber.reconnect_rx();
            // Processed by the server before `watch` returns: a change published after it is
            // never missed.
            if let Err(e) = subscribe_confirmed(&subscriber).await {
                connection.abort();
                return Err(store_error("watch", target, e));
            }
            let senders = Senders::default();
            let forward = tokio::spawn({
                let senders = senders.clone();
                async move {
                    loop {
                        match messages.recv().await {
                            Ok(message) => {
                                if let Some(key) = message.value.as_str() {
                                    notify(&senders, Some(&key));
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(missed)) => {
                                tracing::debug!(store = KIND, missed, "lease change feed lagged");
                                notify(&senders, None);
                            }
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                    }
                }
            });
            let resubscribe = tokio::spawn({
                let senders = senders.clone();
                let subscriber = subscriber.clone();
                async move {
                    loop {
                        match reconnects.recv().await {
                            Ok(server) => {
                                // Confirmed (as at the start) before watchers re-check.
                                let resubscribed = match subscriber.resubscribe_all().await {
                                    Ok(()) => subscriber.ping::<Value>(None).await.map(drop),
                                    Err(e) => Err(e),
                                };
                                if let Err(e) = resubscribed {
                                    tracing::warn!(store = KIND, %server, error = %e, "resubscribing to lease changes failed");
                                }
                                tracing::debug!(store = KIND, %server, "lease change feed reconnected; telling every watcher to re-check");
                                // Changes published while disconnected are lost: say "maybe".
                                notify(&senders, None);
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => notify(&senders, None),
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                    }
                }
            });
            Ok(Self {
                senders,
                tasks: vec![forward, resubscribe],
                connection,
            })
        })
        .await
    }

    fn subscribe(&self, key: &str) -> LeaseWatch {
        let mut senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        senders
            .entry(key.to_owned())
            .or_insert_with(|| broadcast::channel(WATCH_CAPACITY).0)
            .subscribe()
    }
}

/// Subscribes to `+switch-master` on every sentinel (one subscriber connection each, so one
/// sentinel down does not blind the store) and makes `client` reconnect, which asks the
/// sentinels for the master again, when one announces a new master for `master_name`. Without
/// this fred would stay on the old master until that connection broke. The subscriptions are
/// made in the background (a sentinel that is down does not hold up the store); the store
/// works without any of them, only without the early switch.
fn follow_switch_master(
    client: &Client,
    sentinels: &[SocketAddr],
    master_name: &str,
) -> Vec<(ConnectHandle, JoinHandle<()>)> {
    const CHANNEL: &str = "+switch-master";
    let mut switches = Vec::new();
    for sentinel in sentinels {
        let mut settings = Settings::new(ServerConfig::new_centralized(
            sentinel.ip().to_string(),
            sentinel.port(),
        ));
        // Keep retrying a sentinel that is down now instead of failing the store.
        settings.config.fail_fast = false;
        let subscriber = settings.subscriber();
        let mut messages = subscriber.message_rx();
        // Not awaited: connect_sentinel must not wait for a sentinel that is down.
        let connection = subscriber.connect();
        let client = client.clone();
        let master_name = master_name.to_owned();
        let sentinel = *sentinel;
        let task = tokio::spawn(async move {
            if let Err(e) = subscriber.wait_for_connect().await {
                tracing::warn!(store = KIND, %sentinel, error = %e, "cannot follow +switch-master on this sentinel");
                return;
            }
            // Resubscribes after every reconnect of this subscriber.
            let _manager = subscriber.manage_subscriptions();
            if let Err(e) = subscriber.subscribe(CHANNEL).await {
                tracing::warn!(store = KIND, %sentinel, error = %e, "subscribing to +switch-master failed");
                return;
            }
            loop {
                match messages.recv().await {
                    Ok(message) => {
                        let text = message.value.as_string().unwrap_or_default();
                        // `<name> <old ip> <old port> <new ip> <new port>`
                        if text.split_whitespace().next() != Some(master_name.as_str()) {
                            continue;
                        }
                        tracing::info!(store = KIND, %sentinel, switch = %text, "sentinel announced a new master; reconnecting");
                        if let Err(e) = client.force_reconnection().await {
                            tracing::warn!(store = KIND, error = %e, "reconnecting after +switch-master failed");
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        switches.push((connection, task));
    }
    switches
}

/// Tells the watchers of `key` (of every key if `None`) that it changed; forgets keys nobody
/// watches any more.
/// Subscribes `subscriber` to [`CHANGE_CHANNEL`] and waits until the server has processed it:
/// fred returns from SUBSCRIBE once it is written (the confirmation comes out of band), so a
/// round trip on the same connection is what proves it.
async fn subscribe_confirmed(subscriber: &SubscriberClient) -> fred::prelude::FredResult<()> {
    subscriber.subscribe(CHANGE_CHANNEL).await?;
    subscriber.ping::<Value>(None).await.map(drop)
}

fn notify(senders: &Senders, key: Option<&str>) {
    let mut senders = senders.lock().unwrap_or_else(PoisonError::into_inner);
    match key {
        Some(key) => {
            if let Some(sender) = senders.get(key) {
                let change = LeaseChange {
                    key: key.to_owned(),
                };
                if sender.send(change).is_err() {
                    senders.remove(key);
                }
            }
        }
        None => senders.retain(|key, sender| sender.send(LeaseChange { key: key.clone() }).is_ok()),
    }
}

fn store_error(op: &'static str, key: &str, error: fred::error::Error) -> Error {
    Error::Store {
        store: KIND,
        op,
        key: key.to_owned(),
        source: Box::new(error),
    }
}

/// The URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A command sent through `custom`, which (unlike the typed interfaces) honours
/// [`command_options`] on fred's `WithOptions`. Not blocking as fred counts it: a `WAIT` is
/// bounded by its own `<ms>`.
fn command(name: &'static str) -> fred::types::CustomCommand {
    fred::types::CustomCommand::new_static(name, fred::types::ClusterHash::Random, false)
}

/// What a `WAIT 1 <ms>` after a write answered.
#[derive(Debug, Clone, Copy)]
struct Acked {
    /// Replicas that acknowledged every write this connection made before the `WAIT`.
    replicas: u64,
    /// The `<ms>` it was given.
    waited: Duration,
}

/// Fails a write that counts only if a replica acknowledged it (`acked` is `None` when the
/// store does not require acknowledgements).
fn acknowledged(op: &'static str, key: &str, acked: Option<Acked>) -> Result<()> {
    match acked {
        Some(Acked {
            replicas: 0,
            waited,
        }) => Err(Error::NotReplicated {
            store: KIND,
            op,
            key: key.to_owned(),
            wanted: 1,
            acked: 0,
            waited,
        }),
        _ => Ok(()),
    }
}

/// When fred's own timeout of an operation's commands ends: the caller's `timeout` after the
/// operation started. fred then gives up on its own, marking a command still queued (behind a
/// reconnect) as not to be written, and the operation fails with [`Error::Timeout`].
fn command_deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

/// The outer [`with_timeout`] of an operation: only a backstop a little after fred's own
/// timeout, because a future dropped by the outer timer is not marked timed out inside fred,
/// so its command could still be written after a reconnect.
fn backstop(timeout: Duration) -> Duration {
    timeout + (timeout / 10).clamp(Duration::from_millis(5), Duration::from_millis(50))
}

/// fred's per-command options for a command due by `deadline`.
fn command_options(deadline: Instant) -> Options {
    // fred reads a zero timeout as "none": keep at least a millisecond.
    let left = deadline.saturating_duration_since(Instant::now());
    Options {
        timeout: Some(left.max(Duration::from_millis(1))),
        ..Options::default()
    }
}

/// How long a `WAIT` for a replica may block: half of what is left before `deadline` (the other
/// half is for the round trip and the script), whole milliseconds, at least 1 (`WAIT … 0` would
/// block for ever) and at most [`MAX_REPLICA_WAIT`].
fn replica_wait(deadline: Instant) -> Duration {
    let half = deadline.saturating_duration_since(Instant::now()) / 2;
    Duration::from_millis(u64::try_from(half.as_millis()).unwrap_or(u64::MAX))
        .clamp(Duration::from_millis(1), MAX_REPLICA_WAIT)
}

fn ttl_millis(ttl: Duration) -> String {
    // Whole milliseconds, rounded up (a lease never lasts less than asked); PX refuses 0.
    ttl.as_nanos()
        .div_ceil(1_000_000)
        .clamp(1, u128::from(u64::MAX))
        .to_string()
}

/// An expected record as the script compares it: `<token> <renewals>[ released]\n<holder>`.
fn expected_text(record: &LeaseRecord) -> String {
    format!(
        "{} {}{}\n{}",
        record.token.get(),
        record.renewals,
        if record.released { " released" } else { "" },
        record.holder.as_str()
    )
}

fn corrupt(key: &str, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        store: KIND,
        key: key.to_owned(),
        detail: detail.into(),
    }
}

fn text(key: &str, value: &Value, what: &str) -> Result<String> {
    value
        .as_str()
        .map(|s| s.into_owned())
        .ok_or_else(|| corrupt(key, format!("{what}: expected a string, got {value:?}")))
}

fn integer(key: &str, value: &Value, what: &str) -> Result<i64> {
    value
        .as_i64()
        .ok_or_else(|| corrupt(key, format!("{what}: expected an integer, got {value:?}")))
}

fn parse_token(key: &str, text: &str) -> Result<FencingToken> {
    text.parse()
        .map(FencingToken)
        .map_err(|_| corrupt(key, format!("token {text:?} is not an unsigned integer")))
}

/// Parses a lease record `<token> <renewals> <ttl ms>[ released]\n<holder>` (or the older
/// `<token>\n<holder>`) and its `PTTL`.
fn parse_info(key: &str, record: &Value, pttl: &Value) -> Result<LeaseInfo> {
    let record = text(key, record, "lease record")?;
    let Some((head, holder)) = record.split_once('\n') else {
        return Err(corrupt(
            key,
            format!("record {record:?} is not `<token> <renewals> <ttl>\\n<holder>`"),
        ));
    };
    let fields: Vec<&str> = head.split_whitespace().collect();
    let number = |i: usize, what: &str| -> Result<u64> {
        fields.get(i).map_or(Ok(0), |f| {
            f.parse()
                .map_err(|_| corrupt(key, format!("{what} {f:?} in {record:?} is not a number")))
        })
    };
    let token = parse_token(key, fields.first().copied().unwrap_or_default())?;
    let renewals = number(1, "renewals")?;
    let ttl_ms = number(2, "ttl")?;
    let released = match fields.get(3).copied() {
        None => false,
        Some("released") => true,
        Some(other) => return Err(corrupt(key, format!("record flag {other:?} is unknown"))),
    };
    let pttl = integer(key, pttl, "PTTL")?;
    let Ok(kept) = u64::try_from(pttl) else {
        return Err(corrupt(
            key,
            format!("the lease record has no expiry (PTTL {pttl})"),
        ));
    };
    // The record is kept for twice the term's ttl; the term itself lapses a ttl earlier.
    let remaining = if released {
        0
    } else if ttl_ms == 0 {
        kept
    } else {
        kept.saturating_sub(ttl_ms)
    };
    Ok(LeaseInfo {
        holder: NodeId::new(holder),
        token,
        renewals,
        released,
        remaining: Duration::from_millis(remaining),
    })
}

fn flag(key: &str, value: &Value) -> Result<bool> {
    match integer(key, value, "script reply")? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(corrupt(key, format!("script answered {other}, not 0 or 1"))),
    }
}

#[async_trait]
impl LeaseStore for RedisLeaseStore {
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
        with_timeout(KIND, "acquire", key, backstop(timeout), async {
            let args = vec![
                "acquire".to_owned(),
                holder.as_str().to_owned(),
                ttl_millis(ttl),
                CHANGE_CHANNEL.to_owned(),
                key.to_owned(),
                expected.map(expected_text).unwrap_or_default(),
            ];
            let (reply, acked) = self.run("acquire", key, args, timeout, true).await?;
            let items = match &reply {
                Value::Array(items) => items.as_slice(),
                _ => &[],
            };
            let outcome = match items {
                [granted, token] if integer(key, granted, "acquire flag")? == 1 => {
                    let token = parse_token(key, &text(key, token, "token")?)?;
                    // The grant is written but not known to survive a failover: not acquired.
                    // The record names this node; the elector adopts it by a renew later.
                    acknowledged("acquire", key, acked)?;
                    Acquire::Acquired(token)
                }
                [granted, record, pttl] if integer(key, granted, "acquire flag")? == 0 => {
                    Acquire::Held(parse_info(key, record, pttl)?)
                }
                [vacant] if integer(key, vacant, "acquire flag")? == 2 => Acquire::Vacant,
                _ => return Err(corrupt(key, format!("acquire answered {reply:?}"))),
            };
            tracing::debug!(store = KIND, key, %holder, ?outcome, "acquire");
            Ok(outcome)
        })
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
        with_timeout(KIND, "renew", key, backstop(timeout), async {
            let args = vec![
                "renew".to_owned(),
                holder.as_str().to_owned(),
                token.get().to_string(),
                ttl_millis(ttl),
            ];
            let (reply, acked) = self.run("renew", key, args, timeout, true).await?;
            let renewed = flag(key, &reply)?;
            if renewed {
                acknowledged("renew", key, acked)?;
            }
            tracing::debug!(store = KIND, key, %holder, %token, renewed, "renew");
            Ok(renewed)
        })
        .await
    }

    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool> {
        with_timeout(KIND, "release", key, backstop(timeout), async {
            let args = vec![
                "release".to_owned(),
                holder.as_str().to_owned(),
                token.get().to_string(),
                CHANGE_CHANNEL.to_owned(),
                key.to_owned(),
            ];
            let (reply, _) = self.run("release", key, args, timeout, false).await?;
            let released = flag(key, &reply)?;
            tracing::debug!(store = KIND, key, %holder, %token, released, "release");
            Ok(released)
        })
        .await
    }

    async fn read(&self, key: &str, timeout: Duration) -> Result<Option<LeaseInfo>> {
        with_timeout(KIND, "read", key, backstop(timeout), async {
            let (reply, _) = self
                .run("read", key, vec!["read".to_owned()], timeout, false)
                .await?;
            let info = match &reply {
                Value::Null => None,
                Value::Array(items) => match items.as_slice() {
                    [record, pttl] => Some(parse_info(key, record, pttl)?),
                    _ => return Err(corrupt(key, format!("read answered {reply:?}"))),
                },
                _ => return Err(corrupt(key, format!("read answered {reply:?}"))),
            };
            tracing::debug!(store = KIND, key, ?info, "read");
            Ok(info)
        })
        .await
    }

    async fn watch(&self, key: &str) -> Result<Option<LeaseWatch>> {
        let watch = self.watcher().await?.subscribe(key);
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
        with_timeout(KIND, "heartbeat", group, backstop(timeout), async {
            let meta =
                serde_json::to_string(meta).map_err(|e| corrupt(group, format!("meta: {e}")))?;
            let keys = vec![members_key(group), members_meta_key(group)];
            let args = vec![
                "heartbeat".to_owned(),
                node.to_string(),
                ttl_millis(ttl),
                meta,
            ];
            let (reply, _) = self
                .run_on("heartbeat", group, keys, args, timeout, false)
                .await?;
            flag(group, &reply)?;
            tracing::debug!(store = KIND, group, %node, "member heartbeat");
            Ok(())
        })
        .await
    }

    async fn members(&self, group: &str, timeout: Duration) -> Result<Vec<Member>> {
        with_timeout(KIND, "members", group, backstop(timeout), async {
            let keys = vec![members_key(group), members_meta_key(group)];
            let (reply, _) = self
                .run_on(
                    "members",
                    group,
                    keys,
                    vec!["members".to_owned()],
                    timeout,
                    false,
                )
                .await?;
            let Value::Array(items) = &reply else {
                return Err(corrupt(group, format!("members answered {reply:?}")));
            };
            items
                .chunks(3)
                .map(|row| {
                    let [node, meta, remaining] = row else {
                        return Err(corrupt(group, format!("members answered {reply:?}")));
                    };
                    let meta = text(group, meta, "member meta")?;
                    let meta: BTreeMap<String, String> = serde_json::from_str(&meta)
                        .map_err(|e| corrupt(group, format!("member meta {meta:?}: {e}")))?;
                    Ok(Member {
                        node: NodeId::new(text(group, node, "member")?),
                        meta,
                        remaining: Duration::from_millis(
                            u64::try_from(integer(group, remaining, "member ttl")?).unwrap_or(0),
                        ),
                    })
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_holders_may_contain_newlines() {
        let text = "1700000000000000 3 1000\nnode\nwith newline";
        let info = parse_info("k", &Value::String(text.into()), &Value::Integer(1500)).unwrap();
        assert_eq!(info.holder, NodeId::new("node\nwith newline"));
        assert_eq!(info.token, FencingToken(1_700_000_000_000_000));
        assert_eq!((info.renewals, info.released), (3, false));
        assert_eq!(info.remaining, Duration::from_millis(500), "kept 2 × ttl");
        assert_eq!(
            expected_text(&info.record()),
            "1700000000000000 3\nnode\nwith newline"
        );
        let tomb = "5 2 1000 released\nn";
        let info = parse_info("k", &Value::String(tomb.into()), &Value::Integer(900)).unwrap();
        assert!(info.released);
        assert_eq!(info.remaining, Duration::ZERO);
        assert_eq!(expected_text(&info.record()), "5 2 released\nn");
        // The older form reads as a live term with no renewals.
        let old = parse_info("k", &Value::String("7\nn".into()), &Value::Integer(40)).unwrap();
        assert_eq!(
            (old.token, old.renewals, old.remaining),
            (FencingToken(7), 0, Duration::from_millis(40))
        );
    }

    #[test]
    fn unreadable_records_are_corrupt() {
        for (record, pttl) in [
            ("no-newline", 10),
            ("abc\nnode", 10),
            ("-1\nnode", 10),
            ("5\nnode", -1),
            ("5 x 10\nnode", 10),
            ("5 1 10 gone\nnode", 10),
            ("\nnode", 10),
        ] {
            let err =
                parse_info("k", &Value::String(record.into()), &Value::Integer(pttl)).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { .. }),
                "{record:?}/{pttl}: {err}"
            );
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn keys_share_a_hash_slot_and_urls_hide_passwords() {
        assert_eq!(record_key("orders/leader"), "ha:lease:{orders/leader}");
        assert_eq!(
            counter_key("orders/leader"),
            "ha:lease:{orders/leader}:token"
        );
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(ttl_millis(Duration::from_micros(10)), "1");
        assert_eq!(ttl_millis(Duration::from_micros(1_500)), "2", "rounded up");
        assert_eq!(ttl_millis(Duration::from_millis(7)), "7");
    }
}
