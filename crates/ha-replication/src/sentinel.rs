//! [`SentinelMonitor`]: what a set of Redis Sentinels says about one monitored master, and
//! what they announce.
//!
//! **Who is master** is asked of every sentinel at once (`SENTINEL MASTER`), and the answer is
//! the view — address and `config-epoch` — held by a quorum of the configured sentinels
//! (a majority unless [`view_quorum`](SentinelMonitor::view_quorum) says otherwise), the
//! highest epoch among such views. A sentinel cut off in a minority partition with the old
//! master, or one that forgot the master (nil or error reply), is outvoted, not believed
//! because it answered first. The master so named is then confirmed with `ROLE` on itself.
//! Other queries (`REPLICAS`, `SENTINELS`) take the first sentinel that answers and knows the
//! master; `CKQUORUM` asks every sentinel and reports each answer.
//!
//! **`failover()` is one request:** it goes to the first connected sentinel only. A refusal
//! (`INPROG`, `NOGOODSLAVE`, …) is returned as is; a timeout or a connection lost after the
//! request was sent is [`Error::FailoverOutcomeUnknown`] — the failover may be running — and
//! never retried on another sentinel, which would start a second one.
//!
//! The monitor is a [`Component`] named `redis-sentinel`: once started with the node's
//! [`ComponentContext`], it subscribes to `+switch-master`, `+sdown`, `-sdown`, `+odown` and
//! `-odown` on one sentinel at a time and publishes them as `HaEvent`s on the context's bus
//! as the context's node, until the context's shutdown or [`stop`](Component::stop). A
//! subscription is kept honest by a `PING` every [`keepalive`](SentinelMonitor::keepalive)
//! that must be answered within the command timeout: a half-open connection (a partition, a
//! paused sentinel) is noticed within `keepalive + timeout`, and the watcher moves on to the
//! next sentinel. Pub/sub is fire-and-forget, so after every (re)subscription, and every
//! [`reconcile`](SentinelMonitor::reconcile) interval, the watcher compares the quorum view
//! with the master it last announced and publishes the `RedisMasterSwitched` it missed — only
//! for a view with a newer config epoch, so a stale view never announces a switch back.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fred::clients::SubscriberClient;
use fred::error::ErrorKind;
use fred::prelude::{
    Client, ClientLike, Config, ConnectionConfig, EventInterface, PubsubInterface, ServerConfig,
};
use fred::types::{ClusterHash, CustomCommand, Value};
use ha_core::{Component, ComponentContext, ComponentTasks, EventBus, HaEvent, NodeId, Status};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// The channels a started [`SentinelMonitor`] listens to.
pub const WATCHED_CHANNELS: [&str; 5] = ["+switch-master", "+sdown", "-sdown", "+odown", "-odown"];

/// A Redis server or sentinel as Sentinel describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// `ip:port`.
    pub addr: String,
    /// Sentinel's flags, e.g. `slave`, `s_down`, `o_down`, `disconnected`.
    pub flags: Vec<String>,
    /// Every field of the reply, by name.
    pub fields: HashMap<String, String>,
}

impl Instance {
    /// Whether Sentinel flags it down, subjectively or objectively.
    pub fn is_down(&self) -> bool {
        self.flags.iter().any(|f| f == "s_down" || f == "o_down")
    }

    /// A field of the reply, e.g. `master-link-status` or `slave-repl-offset`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The current master, as a quorum of sentinels names it and as it confirms itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterInfo {
    /// `ip:port`.
    pub addr: String,
    /// The first of the sentinels that hold this view.
    pub sentinel: String,
    /// What `ROLE` on the master answered (`master` once confirmed).
    pub role: String,
    /// The configuration epoch of the view (`config-epoch`), raised by every failover.
    pub config_epoch: u64,
}

/// The master a quorum of sentinels agrees on: see [`SentinelMonitor::view`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterView {
    /// `ip:port`.
    pub addr: String,
    /// The configuration epoch the sentinels hold this view at.
    pub config_epoch: u64,
    /// The sentinels that hold it (at least the view quorum).
    pub held_by: Vec<String>,
    /// What each sentinel asked answered, by sentinel: `addr@epoch`, or why not.
    pub answers: Vec<(String, Result<String, String>)>,
}

/// The answer to `SENTINEL CKQUORUM`, asked of every sentinel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quorum {
    /// Whether at least the view quorum of sentinels (a majority by default) answered `OK`:
    /// enough of them see enough peers to authorize a failover.
    pub ok: bool,
    /// A summary: how many said OK, and the first answer.
    pub message: String,
    /// Each sentinel's answer: `Ok(text)` for `OK`, `Err(reason)` for `NOQUORUM`, an error or
    /// no answer.
    pub answers: Vec<(String, Result<String, String>)>,
}

/// Queries and watches a set of sentinels about one master: a [`Component`] named
/// `redis-sentinel` (see the [module docs](self)); the queries work whether it is started or
/// not.
pub struct SentinelMonitor {
    inner: Arc<Inner>,
    watch: WatchSettings,
    tasks: ComponentTasks,
}

/// How the watcher keeps its subscription honest.
#[derive(Debug, Clone, Copy)]
struct WatchSettings {
    keepalive: Duration,
    reconcile: Duration,
}

/// The name of the monitor as a [`Component`].
const COMPONENT: &str = "redis-sentinel";

struct Inner {
    master: String,
    sentinels: Vec<SentinelNode>,
    timeout: Duration,
    /// How many sentinels must hold a view for it to be believed.
    quorum: usize,
    /// The watcher's view, as a [`Status::badness`] (Unknown until it first tried).
    status: AtomicU8,
    /// Subscriptions given up because the sentinel stopped answering or went away.
    lost_subscriptions: AtomicU64,
}

struct SentinelNode {
    addr: String,
    client: Client,
}

impl fmt::Debug for SentinelMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelMonitor")
            .field("master", &self.inner.master)
            .field(
                "sentinels",
                &self
                    .inner
                    .sentinels
                    .iter()
                    .map(|s| &s.addr)
                    .collect::<Vec<_>>(),
            )
            .field("quorum", &self.inner.quorum)
            .finish_non_exhaustive()
    }
}

/// The shared settings; no unresponsive timer: the watcher's own keepalive `PING`s judge a
/// silent subscription, and every command carries its own timeout.
fn connection_config(timeout: Duration) -> ConnectionConfig {
    ha_clients::redis::connection(timeout, None)
}

fn centralized(host: &str, port: u16) -> Config {
    Config {
        server: ServerConfig::new_centralized(host, port),
        fail_fast: true,
        ..Config::default()
    }
}

fn split_addr(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("`{addr}` is not host:port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("`{addr}` has no valid port"))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

impl SentinelMonitor {
    /// The default limit on each sentinel command (1 s).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The default interval between keepalive `PING`s on the subscription (1 s).
    pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(1);
    /// The default interval between comparisons of the quorum view with the last announced
    /// master while subscribed (10 s).
    pub const DEFAULT_RECONCILE: Duration = Duration::from_secs(10);

    /// A monitor of `master` through the sentinels at `sentinels` (`host:port`). Connections
    /// are opened in the background and re-opened when lost; a sentinel that is down now is
    /// outvoted or skipped by queries. The view quorum is a majority of `sentinels`.
    pub fn new(master: impl Into<String>, sentinels: &[impl AsRef<str>]) -> Result<Self, Error> {
        let master = master.into();
        if sentinels.is_empty() {
            return Err(Error::Unsupported(format!(
                "sentinel monitor of `{master}` needs at least one sentinel"
            )));
        }
        let timeout = Self::DEFAULT_TIMEOUT;
        let nodes = sentinels
            .iter()
            .map(|addr| {
                let addr = addr.as_ref().to_owned();
                let (host, port) = split_addr(&addr).map_err(|detail| Error::Sentinel {
                    master: master.clone(),
                    detail,
                })?;
                let client = Client::new(
                    centralized(&host, port),
                    None,
                    Some(connection_config(timeout)),
                    Some(ha_clients::redis::reconnect()),
                );
                drop(client.connect());
                Ok(SentinelNode { addr, client })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let quorum = nodes.len() / 2 + 1;
        Ok(Self {
            inner: Arc::new(Inner {
                master,
                sentinels: nodes,
                timeout,
                quorum,
                status: AtomicU8::new(Status::Unknown.badness()),
                lost_subscriptions: AtomicU64::new(0),
            }),
            watch: WatchSettings {
                keepalive: Self::DEFAULT_KEEPALIVE,
                reconcile: Self::DEFAULT_RECONCILE,
            },
            tasks: ComponentTasks::default(),
        })
    }

    /// How many sentinels must hold a view of the master for it to be believed (default: a
    /// majority of the configured sentinels). Refused unless between 1 and the number of
    /// sentinels; below a majority, two partitions can each hold a "quorum" view.
    pub fn view_quorum(mut self, quorum: usize) -> Result<Self, Error> {
        let n = self.inner.sentinels.len();
        if !(1..=n).contains(&quorum) {
            return Err(Error::Config {
                what: "sentinel monitor",
                source: ha_core::ConfigError::new(
                    "view_quorum",
                    format!("must be between 1 and the {n} sentinels, got {quorum}"),
                ),
            });
        }
        let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| {
            Error::Unsupported("view_quorum must be set before the monitor is shared".into())
        })?;
        inner.quorum = quorum;
        Ok(self)
    }

    /// The interval between `PING`s on the subscription; an unanswered one (within the
    /// command timeout) ends it, so a half-open subscription is noticed within
    /// `keepalive + timeout`. Takes effect at the next [`start`](Component::start).
    #[must_use]
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.watch.keepalive = interval.max(Duration::from_millis(10));
        self
    }

    /// The interval between comparisons of the quorum view with the last announced master
    /// while subscribed, catching a switch announced on a sentinel the watcher does not
    /// listen to. Takes effect at the next [`start`](Component::start).
    #[must_use]
    pub fn reconcile(mut self, interval: Duration) -> Self {
        self.watch.reconcile = interval.max(Duration::from_millis(10));
        self
    }

    /// The monitored master's name.
    pub fn master_name(&self) -> &str {
        &self.inner.master
    }

    /// How many subscriptions the watcher gave up because the sentinel stopped answering its
    /// keepalive or the connection failed.
    pub fn lost_subscriptions(&self) -> u64 {
        self.inner.lost_subscriptions.load(Ordering::Relaxed)
    }

    /// The master's `ip:port` as the quorum view names it, unconfirmed, and the first
    /// sentinel holding that view.
    pub async fn master_addr(&self) -> Result<(String, String), Error> {
        let view = self.inner.view().await?;
        let first = view.held_by.first().cloned().unwrap_or_default();
        Ok((view.addr, first))
    }

    /// Asks every sentinel `SENTINEL MASTER` at once and returns the view (address and config
    /// epoch) held by at least the view quorum, the newest such view if several are; an error
    /// listing every answer when none is.
    pub async fn view(&self) -> Result<MasterView, Error> {
        self.inner.view().await
    }

    /// The current master: the quorum view, confirmed with `ROLE` on it.
    pub async fn master(&self) -> Result<MasterInfo, Error> {
        self.inner.master().await
    }

    /// The master's replicas with their flags (`SENTINEL REPLICAS`).
    pub async fn replicas(&self) -> Result<Vec<Instance>, Error> {
        self.inner.replicas().await
    }

    /// The other sentinels watching the master (`SENTINEL SENTINELS`).
    pub async fn sentinels(&self) -> Result<Vec<Instance>, Error> {
        self.inner.sentinels().await
    }

    /// Whether the sentinels can authorize a failover: `SENTINEL CKQUORUM` on every sentinel,
    /// `ok` when at least the view quorum says OK. A quorum that cannot be reached is
    /// `ok: false` with each sentinel's reason, not an error.
    pub async fn ckquorum(&self) -> Result<Quorum, Error> {
        self.inner.ckquorum().await
    }

    /// Asks Sentinel for a failover of the master now (`SENTINEL FAILOVER`), without waiting
    /// for agreement that it is down: one request to the first connected sentinel, so at
    /// most one failover. A refusal is [`Error::Sentinel`]; a timeout or a connection lost
    /// after sending is [`Error::FailoverOutcomeUnknown`] (it may be running: watch for
    /// `RedisMasterSwitched` rather than asking again).
    pub async fn failover(&self) -> Result<(), Error> {
        self.inner.failover().await
    }
}

#[ha_core::async_trait]
impl Component for SentinelMonitor {
    fn name(&self) -> &str {
        COMPONENT
    }

    /// Watches Sentinel's announcements about the master, publishing them on `ctx.bus` as
    /// `ctx.node`, until `ctx.shutdown` or [`stop`](Component::stop).
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.tasks.begin(COMPONENT, &ctx)?;
        let inner = Arc::clone(&self.inner);
        let settings = self.watch;
        self.tasks
            .spawn(async move { inner.watch(ctx.node, ctx.bus, stop, settings).await });
        Ok(())
    }

    /// Unsubscribes and waits for the watcher to end. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.tasks.stop().await;
        Ok(())
    }

    /// Unknown before the watcher first tried to subscribe; Healthy while subscribed;
    /// Degraded while it looks for a sentinel to subscribe to; Unhealthy once every sentinel
    /// in turn refused.
    fn status(&self) -> Status {
        let badness = self.inner.status.load(Ordering::Relaxed);
        Status::ALL
            .into_iter()
            .find(|s| s.badness() == badness)
            .unwrap_or(Status::Unknown)
    }
}

/// One sentinel's view of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SentinelAnswer {
    sentinel: String,
    addr: String,
    epoch: u64,
}

/// The newest view held by at least `quorum` of `answers`, with the sentinels holding it.
fn quorum_view(answers: &[SentinelAnswer], quorum: usize) -> Option<(String, u64, Vec<String>)> {
    let mut views: Vec<(String, u64, Vec<String>)> = Vec::new();
    for a in answers {
        match views
            .iter_mut()
            .find(|(addr, epoch, _)| *addr == a.addr && *epoch == a.epoch)
        {
            Some((_, _, held_by)) => held_by.push(a.sentinel.clone()),
            None => views.push((a.addr.clone(), a.epoch, vec![a.sentinel.clone()])),
        }
    }
    views
        .into_iter()
        .filter(|(_, _, held_by)| held_by.len() >= quorum)
        .max_by_key(|(_, epoch, _)| *epoch)
}

/// What the watcher does with a quorum view, given the master it last announced and the
/// epoch it knows that at: `(what it knows now, the switch to announce from, if any)`.
/// A view at an older epoch than the known one is ignored, so a switch is never announced
/// backwards; a different master at a newer epoch is a missed switch.
fn reconcile_view(
    known: Option<&(String, u64)>,
    addr: &str,
    epoch: u64,
) -> (Option<(String, u64)>, Option<String>) {
    match known {
        None => (Some((addr.to_owned(), epoch)), None),
        Some((old, known_epoch)) if epoch > *known_epoch && old != addr => {
            (Some((addr.to_owned(), epoch)), Some(old.clone()))
        }
        Some((old, known_epoch)) if epoch >= *known_epoch && old == addr => {
            (Some((addr.to_owned(), epoch)), None)
        }
        Some(kept) => (Some(kept.clone()), None),
    }
}

impl Inner {
    fn set_status(&self, status: Status) {
        self.status.store(status.badness(), Ordering::Relaxed);
    }

    fn error(&self, detail: String) -> Error {
        Error::Sentinel {
            master: self.master.clone(),
            detail,
        }
    }

    /// Runs `SENTINEL <args>` on every sentinel at once; each answer or why not, in order.
    async fn ask_all(&self, args: &[&str]) -> Vec<(String, Result<Value, String>)> {
        let calls = self.sentinels.iter().map(|node| async move {
            let cmd = CustomCommand::new_static("SENTINEL", ClusterHash::FirstKey, false);
            let call = node.client.custom::<Value, &str>(cmd, args.to_vec());
            let result = match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {:?}", self.timeout)),
            };
            (node.addr.clone(), result)
        });
        futures_util::future::join_all(calls).await
    }

    /// Runs `SENTINEL <args>` on the first sentinel whose answer `accept` takes; one that
    /// fails, does not answer or answers nil (it forgot the master) is passed over.
    async fn first_answer(&self, args: &[&str]) -> Result<(String, Value), Error> {
        let mut failures = Vec::new();
        for node in &self.sentinels {
            let cmd = CustomCommand::new_static("SENTINEL", ClusterHash::FirstKey, false);
            let call = node.client.custom::<Value, &str>(cmd, args.to_vec());
            match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(Value::Null)) => failures.push(format!("{}: nil", node.addr)),
                Ok(Ok(value)) => return Ok((node.addr.clone(), value)),
                Ok(Err(e)) => failures.push(format!("{}: {e}", node.addr)),
                Err(_) => {
                    failures.push(format!("{}: timed out after {:?}", node.addr, self.timeout))
                }
            }
        }
        Err(self.error(format!(
            "SENTINEL {} failed on every sentinel ({})",
            args.join(" "),
            failures.join("; ")
        )))
    }

    async fn view(&self) -> Result<MasterView, Error> {
        let replies = self.ask_all(&["master", &self.master]).await;
        let mut answers = Vec::new();
        let mut report = Vec::new();
        for (sentinel, reply) in replies {
            let parsed = reply.and_then(|value| {
                let fields = fields(&value);
                let ip = fields.get("ip");
                let port = fields.get("port");
                let epoch = fields
                    .get("config-epoch")
                    .and_then(|e| e.parse::<u64>().ok());
                match (ip, port, epoch) {
                    (Some(ip), Some(port), Some(epoch)) => Ok((format!("{ip}:{port}"), epoch)),
                    _ => Err(format!("does not know the master (reply {value:?})")),
                }
            });
            match parsed {
                Ok((addr, epoch)) => {
                    report.push((sentinel.clone(), Ok(format!("{addr}@{epoch}"))));
                    answers.push(SentinelAnswer {
                        sentinel,
                        addr,
                        epoch,
                    });
                }
                Err(why) => report.push((sentinel, Err(why))),
            }
        }
        match quorum_view(&answers, self.quorum) {
            Some((addr, config_epoch, held_by)) => Ok(MasterView {
                addr,
                config_epoch,
                held_by,
                answers: report,
            }),
            None => Err(self.error(format!(
                "no view of the master is held by {} of {} sentinels ({})",
                self.quorum,
                self.sentinels.len(),
                report
                    .iter()
                    .map(|(s, r)| match r {
                        Ok(view) => format!("{s}: {view}"),
                        Err(why) => format!("{s}: {why}"),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }

    async fn master(&self) -> Result<MasterInfo, Error> {
        let view = self.view().await?;
        let sentinel = view.held_by.first().cloned().unwrap_or_default();
        let (host, port) = split_addr(&view.addr).map_err(|detail| self.error(detail))?;
        let role = confirm_role(&host, port, self.timeout)
            .await
            .map_err(|detail| self.error(format!("{} named by {sentinel}: {detail}", view.addr)))?;
        if role != "master" {
            return Err(self.error(format!(
                "the sentinels name {}, but ROLE there says {role}",
                view.addr
            )));
        }
        Ok(MasterInfo {
            addr: view.addr,
            sentinel,
            role,
            config_epoch: view.config_epoch,
        })
    }

    async fn replicas(&self) -> Result<Vec<Instance>, Error> {
        let (_, reply) = self.first_answer(&["replicas", &self.master]).await?;
        Ok(instances(&reply))
    }

    async fn sentinels(&self) -> Result<Vec<Instance>, Error> {
        let (_, reply) = self.first_answer(&["sentinels", &self.master]).await?;
        Ok(instances(&reply))
    }

    async fn ckquorum(&self) -> Result<Quorum, Error> {
        let replies = self.ask_all(&["ckquorum", &self.master]).await;
        let answers: Vec<(String, Result<String, String>)> = replies
            .into_iter()
            .map(|(sentinel, reply)| {
                let answer = reply.map(|value| strings(&value).join(" "));
                (sentinel, answer)
            })
            .collect();
        let oks = answers.iter().filter(|(_, a)| a.is_ok()).count();
        if answers
            .iter()
            .all(|(_, a)| a.as_ref().is_err_and(|why| !why.contains("NOQUORUM")))
        {
            return Err(self.error(format!(
                "SENTINEL CKQUORUM failed on every sentinel ({})",
                answers
                    .iter()
                    .map(|(s, a)| format!("{s}: {}", a.as_ref().err().map_or("", String::as_str)))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        let first = answers
            .iter()
            .find_map(|(s, a)| Some(format!("{s}: {}", a.as_ref().ok()?)))
            .or_else(|| {
                answers
                    .iter()
                    .find_map(|(s, a)| Some(format!("{s}: {}", a.as_ref().err()?)))
            })
            .unwrap_or_default();
        Ok(Quorum {
            ok: oks >= self.quorum,
            message: format!(
                "{oks} of {} sentinels say OK (need {}); {first}",
                answers.len(),
                self.quorum
            ),
            answers,
        })
    }

    async fn failover(&self) -> Result<(), Error> {
        let mut skipped = Vec::new();
        for node in &self.sentinels {
            // Only a sentinel that cannot have received the request is passed over; once it
            // is sent, any doubt is reported, never resolved by asking another sentinel.
            if !node.client.is_connected() {
                skipped.push(format!("{}: not connected", node.addr));
                continue;
            }
            let cmd = CustomCommand::new_static("SENTINEL", ClusterHash::FirstKey, false);
            let call = node
                .client
                .custom::<Value, &str>(cmd, vec!["failover", &self.master]);
            return match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Timeout
                    ) =>
                {
                    Err(Error::FailoverOutcomeUnknown {
                        master: self.master.clone(),
                        sentinel: node.addr.clone(),
                        detail: e.to_string(),
                    })
                }
                Ok(Err(e)) => {
                    Err(self.error(format!("{} refused SENTINEL FAILOVER: {e}", node.addr)))
                }
                Err(_) => Err(Error::FailoverOutcomeUnknown {
                    master: self.master.clone(),
                    sentinel: node.addr.clone(),
                    detail: format!("no answer within {:?}", self.timeout),
                }),
            };
        }
        Err(self.error(format!(
            "SENTINEL FAILOVER not sent: no sentinel is connected ({})",
            skipped.join("; ")
        )))
    }

    /// Compares the quorum view with what the watcher knows and announces a missed switch.
    async fn catch_up(&self, known: &mut Option<(String, u64)>, node: &NodeId, bus: &EventBus) {
        let view = match self.view().await {
            Ok(view) => view,
            Err(e) => {
                tracing::debug!(error = %e, "no quorum view to catch up with");
                return;
            }
        };
        let (now, switched_from) = reconcile_view(known.as_ref(), &view.addr, view.config_epoch);
        if now.as_ref() == known.as_ref() && switched_from.is_none() {
            if known.as_ref().is_some_and(|(addr, _)| *addr != view.addr) {
                tracing::warn!(view = %view.addr, epoch = view.config_epoch, known = ?known, "ignoring a view older than the master already announced");
            }
            return;
        }
        if let Some(from) = switched_from {
            tracing::info!(%from, to = %view.addr, epoch = view.config_epoch, "catching up on a missed master switch");
            bus.publish(HaEvent::RedisMasterSwitched {
                at: SystemTime::now(),
                node: node.clone(),
                master: self.master.clone(),
                from,
                to: view.addr.clone(),
            });
        }
        *known = now;
    }

    /// Publishes Sentinel's announcements about this master on `bus` as `node` until `cancel`
    /// fires. See the [module docs](self).
    async fn watch(
        &self,
        node: NodeId,
        bus: EventBus,
        cancel: CancellationToken,
        settings: WatchSettings,
    ) {
        let mut known: Option<(String, u64)> = None;
        self.catch_up(&mut known, &node, &bus).await;
        let mut next = 0;
        // Sentinels that refused a subscription since the last one that took it.
        let mut refused = 0;
        while !cancel.is_cancelled() {
            let sentinel = &self.sentinels[next % self.sentinels.len()];
            next += 1;
            let Ok((host, port)) = split_addr(&sentinel.addr) else {
                continue;
            };
            let subscriber = SubscriberClient::new(
                centralized(&host, port),
                None,
                Some(connection_config(self.timeout)),
                None,
            );
            let handle = subscriber.connect();
            let subscribed = async {
                subscriber.wait_for_connect().await?;
                subscriber.subscribe(WATCHED_CHANNELS.to_vec()).await
            };
            match tokio::time::timeout(self.timeout * 2, subscribed).await {
                Ok(Ok(())) => {}
                _ => {
                    handle.abort();
                    refused += 1;
                    self.set_status(if refused >= self.sentinels.len() {
                        Status::Unhealthy
                    } else {
                        Status::Degraded
                    });
                    tracing::debug!(sentinel = %sentinel.addr, "cannot subscribe; trying the next sentinel");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            }
            refused = 0;
            self.set_status(Status::Healthy);
            tracing::info!(sentinel = %sentinel.addr, master = %self.master, "watching sentinel announcements");
            // Catch up on a switch announced while nobody listened.
            self.catch_up(&mut known, &node, &bus).await;
            let mut messages = subscriber.message_rx();
            let mut errors = subscriber.error_rx();
            let mut keepalive = tokio::time::interval(settings.keepalive);
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            keepalive.reset();
            let mut reconcile = tokio::time::interval(settings.reconcile);
            reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            reconcile.reset();
            let why = loop {
                tokio::select! {
                    () = cancel.cancelled() => {
                        let _ = tokio::time::timeout(self.timeout, subscriber.quit()).await;
                        handle.abort();
                        return;
                    }
                    _ = errors.recv() => break "connection error",
                    _ = keepalive.tick() => {
                        let ping = subscriber.ping::<Value>(None);
                        match tokio::time::timeout(self.timeout, ping).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => break "keepalive PING failed",
                            Err(_) => break "keepalive PING unanswered",
                        }
                    }
                    _ = reconcile.tick() => self.catch_up(&mut known, &node, &bus).await,
                    message = messages.recv() => {
                        let Ok(message) = message else { break "subscription closed" };
                        let channel = message.channel.to_string();
                        let Some(text) = message.value.as_string() else { continue };
                        if let Some(event) = parse_announcement(&channel, &text, &self.master, &node) {
                            if let HaEvent::RedisMasterSwitched { to, .. } = &event {
                                // A switch raises the config epoch by at least one; a view
                                // older than that must never announce a switch back.
                                let epoch = known.as_ref().map_or(0, |(_, e)| e + 1);
                                known = Some((to.clone(), epoch));
                            }
                            tracing::info!(%channel, %text, "sentinel announcement");
                            bus.publish(event);
                        }
                    }
                }
            };
            self.lost_subscriptions.fetch_add(1, Ordering::Relaxed);
            self.set_status(Status::Degraded);
            tracing::warn!(sentinel = %sentinel.addr, reason = why, "sentinel subscription lost; moving to the next sentinel");
            handle.abort();
        }
    }
}

/// Asks `ROLE` at `host:port` over a short-lived connection. Only called to confirm a master
/// Sentinel just named; the address changes on failover, so no connection is kept.
async fn confirm_role(host: &str, port: u16, timeout: Duration) -> Result<String, String> {
    let client = Client::new(
        centralized(host, port),
        None,
        Some(connection_config(timeout)),
        None,
    );
    let handle = client.connect();
    let ask = async {
        client.wait_for_connect().await?;
        let cmd = CustomCommand::new_static("ROLE", ClusterHash::FirstKey, false);
        client.custom::<Value, Value>(cmd, Vec::new()).await
    };
    let result = tokio::time::timeout(timeout * 2, ask).await;
    let _ = client.quit().await;
    handle.abort();
    match result {
        Ok(Ok(reply)) => strings(&reply)
            .into_iter()
            .next()
            .ok_or_else(|| format!("unexpected ROLE reply {reply:?}")),
        Ok(Err(e)) => Err(format!("ROLE failed: {e}")),
        Err(_) => Err(format!("ROLE timed out after {:?}", timeout * 2)),
    }
}

/// The string items of an array reply (non-strings skipped).
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().filter_map(Value::as_string).collect(),
        other => other.as_string().into_iter().collect(),
    }
}

/// The fields of one instance reply: a flat `[name, value, name, value, …]` array (RESP2) or
/// a map (RESP3).
fn fields(item: &Value) -> HashMap<String, String> {
    match item {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.as_string()?, kv.get(1)?.as_string()?)))
            .collect(),
        Value::Map(map) => map
            .clone()
            .inner()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_string()?)))
            .collect(),
        _ => HashMap::new(),
    }
}

/// A list of instances, each parsed by field name.
fn instances(value: &Value) -> Vec<Instance> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let fields = fields(item);
            let addr = format!(
                "{}:{}",
                fields.get("ip").map_or("?", String::as_str),
                fields.get("port").map_or("?", String::as_str)
            );
            let flags = fields
                .get("flags")
                .map(|f| f.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
            Instance {
                addr,
                flags,
                fields,
            }
        })
        .collect()
}

/// The new master's `ip:port` when `event` is a switch of `master` (`RedisMasterSwitched`),
/// for a process to follow what its own monitor observes: every process moves its own
/// clients, leader or not (see `HaNodeBuilder::follow_redis_master` in ha-orchestrator).
///
/// ```
/// # use std::time::SystemTime;
/// use ha_core::{HaEvent, NodeId};
/// use ha_replication::sentinel::switched_to;
///
/// let event = HaEvent::RedisMasterSwitched {
///     at: SystemTime::now(),
///     node: NodeId::new("n1"),
///     master: "cache".into(),
///     from: "10.0.0.1:6379".into(),
///     to: "10.0.0.2:6379".into(),
/// };
/// assert_eq!(switched_to(&event, "cache"), Some("10.0.0.2:6379"));
/// assert_eq!(switched_to(&event, "other"), None);
/// ```
pub fn switched_to<'a>(event: &'a HaEvent, master: &str) -> Option<&'a str> {
    match event {
        HaEvent::RedisMasterSwitched { master: m, to, .. } if m == master => Some(to),
        _ => None,
    }
}

/// Turns one announcement into an event, if it is about `master`.
///
/// `+switch-master`: `<master> <old ip> <old port> <new ip> <new port>`.
/// `±sdown`/`±odown`: `<kind> <name> <ip> <port> [@ <master> <ip> <port>]` (no `@` part when
/// the instance is the master itself; `+odown` may end with `#quorum n/m`).
pub fn parse_announcement(
    channel: &str,
    text: &str,
    master: &str,
    node: &NodeId,
) -> Option<HaEvent> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = SystemTime::now();
    if channel == "+switch-master" {
        let [name, old_ip, old_port, new_ip, new_port, ..] = words.as_slice() else {
            return None;
        };
        return (*name == master).then(|| HaEvent::RedisMasterSwitched {
            at,
            node: node.clone(),
            master: master.to_owned(),
            from: format!("{old_ip}:{old_port}"),
            to: format!("{new_ip}:{new_port}"),
        });
    }
    let (down, objective) = match channel {
        "+sdown" => (true, false),
        "-sdown" => (false, false),
        "+odown" => (true, true),
        "-odown" => (false, true),
        _ => return None,
    };
    let [kind, name, ip, port, rest @ ..] = words.as_slice() else {
        return None;
    };
    let about = match rest {
        ["@", m, ..] => *m,
        _ if *kind == "master" => *name,
        _ => return None,
    };
    (about == master).then(|| HaEvent::RedisInstanceStatus {
        at,
        node: node.clone(),
        master: master.to_owned(),
        instance: format!("{ip}:{port}"),
        kind: (*kind).to_owned(),
        down,
        objective,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_parsed_by_shape_and_filtered_by_master() {
        let node = NodeId::new("n");
        let e = parse_announcement(
            "+switch-master",
            "mymaster 127.0.0.1 6379 127.0.0.1 6380",
            "mymaster",
            &node,
        );
        assert!(
            matches!(e, Some(HaEvent::RedisMasterSwitched { ref from, ref to, .. }) if from == "127.0.0.1:6379" && to == "127.0.0.1:6380")
        );
        assert!(parse_announcement("+switch-master", "other 1 2 3 4", "mymaster", &node).is_none());
        let e = parse_announcement(
            "+odown",
            "master mymaster 127.0.0.1 6379 #quorum 2/2",
            "mymaster",
            &node,
        );
        assert!(
            matches!(e, Some(HaEvent::RedisInstanceStatus { down: true, objective: true, ref kind, .. }) if kind == "master")
        );
        let e = parse_announcement(
            "-sdown",
            "slave 127.0.0.1:6380 127.0.0.1 6380 @ mymaster 127.0.0.1 6379",
            "mymaster",
            &node,
        );
        assert!(
            matches!(e, Some(HaEvent::RedisInstanceStatus { down: false, objective: false, ref instance, .. }) if instance == "127.0.0.1:6380")
        );
        assert!(
            parse_announcement("+sdown", "slave x 1 2 @ other 1 2", "mymaster", &node).is_none()
        );
        assert!(parse_announcement("+sdown", "garbage", "mymaster", &node).is_none());
    }

    fn answer(sentinel: &str, addr: &str, epoch: u64) -> SentinelAnswer {
        SentinelAnswer {
            sentinel: sentinel.into(),
            addr: addr.into(),
            epoch,
        }
    }

    #[test]
    fn the_view_is_the_newest_held_by_a_quorum() {
        // A minority with the old master is outvoted, even when it answers first.
        let answers = [
            answer("s1", "old:1", 0),
            answer("s2", "new:1", 1),
            answer("s3", "new:1", 1),
        ];
        let (addr, epoch, held_by) = quorum_view(&answers, 2).unwrap();
        assert_eq!((addr.as_str(), epoch), ("new:1", 1));
        assert_eq!(held_by, ["s2", "s3"]);
        // A newer view held by a minority is not believed either.
        let answers = [
            answer("s1", "newer:1", 5),
            answer("s2", "new:1", 1),
            answer("s3", "new:1", 1),
        ];
        assert_eq!(quorum_view(&answers, 2).unwrap().0, "new:1");
        // Two quorum views (a low quorum): the newest epoch wins.
        let answers = [answer("s1", "a:1", 1), answer("s2", "b:1", 2)];
        assert_eq!(quorum_view(&answers, 1).unwrap().0, "b:1");
        // Disagreement without a quorum: no view.
        let answers = [answer("s1", "a:1", 1), answer("s2", "b:1", 2)];
        assert!(quorum_view(&answers, 2).is_none());
        assert!(quorum_view(&[], 1).is_none());
    }

    #[test]
    fn reconciling_never_switches_back_to_an_older_epoch() {
        let known = ("new:1".to_owned(), 3);
        // An older view naming the old master: kept, nothing announced.
        assert_eq!(
            reconcile_view(Some(&known), "old:1", 2),
            (Some(known.clone()), None)
        );
        // Same epoch, other address: not newer, nothing announced.
        assert_eq!(
            reconcile_view(Some(&known), "old:1", 3),
            (Some(known.clone()), None)
        );
        // A newer epoch naming another master: a missed switch.
        assert_eq!(
            reconcile_view(Some(&known), "newest:1", 4),
            (Some(("newest:1".to_owned(), 4)), Some("new:1".to_owned()))
        );
        // The same master at a newer epoch: learnt, nothing announced.
        assert_eq!(
            reconcile_view(Some(&known), "new:1", 4),
            (Some(("new:1".to_owned(), 4)), None)
        );
        // Nothing known yet: learnt, nothing announced.
        assert_eq!(
            reconcile_view(None, "a:1", 0),
            (Some(("a:1".to_owned(), 0)), None)
        );
    }

    #[test]
    fn instances_are_read_by_field_name() {
        let reply = Value::Array(vec![Value::Array(
            [
                "name",
                "127.0.0.1:6380",
                "ip",
                "127.0.0.1",
                "port",
                "6380",
                "flags",
                "slave,s_down",
                "master-link-status",
                "err",
            ]
            .into_iter()
            .map(|s| Value::String(s.into()))
            .collect(),
        )]);
        let parsed = instances(&reply);
        assert_eq!(parsed[0].addr, "127.0.0.1:6380");
        assert!(parsed[0].is_down());
        assert_eq!(parsed[0].field("master-link-status"), Some("err"));
    }
}
