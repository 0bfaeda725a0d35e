//! [`SentinelMonitor`]: what a set of Redis Sentinels says about one monitored master, and
//! what they announce.
//!
//! Every query goes to the sentinels in order and falls through to the next when one does
//! not answer (Redis's Sentinel client guidelines). Replies are parsed by field name, never by
//! position. The master Sentinel names is confirmed with `ROLE` on the master itself: a
//! sentinel that has not yet noticed a failover can name a server that is now a replica.
//!
//! The monitor is a [`Component`] named `redis-sentinel`: once started with the node's
//! [`ComponentContext`], it subscribes to `+switch-master`, `+sdown`, `-sdown`, `+odown` and
//! `-odown` on one sentinel at a time and publishes them as `HaEvent`s on the context's bus
//! as the context's node, until the context's shutdown or [`stop`](Component::stop); when
//! that sentinel goes away it moves on to the next. Pub/sub is fire-and-forget: an announcement made while
//! no sentinel connection is up is lost, so after every (re)subscription the watcher also
//! publishes a `RedisMasterSwitched` if the master changed meanwhile.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime};

use fred::clients::SubscriberClient;
use fred::prelude::{
    Client, ClientLike, Config, ConnectionConfig, EventInterface, PubsubInterface, ReconnectPolicy,
    ServerConfig, TcpConfig,
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

/// The current master, as Sentinel names it and as it confirms itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterInfo {
    /// `ip:port`.
    pub addr: String,
    /// The sentinel that answered.
    pub sentinel: String,
    /// What `ROLE` on the master answered (`master` once confirmed).
    pub role: String,
}

/// The answer to `SENTINEL CKQUORUM`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quorum {
    /// Whether enough sentinels are reachable to authorize a failover.
    pub ok: bool,
    /// Sentinel's message.
    pub message: String,
}

/// Queries and watches a set of sentinels about one master: a [`Component`] named
/// `redis-sentinel` (see the [module docs](self)); the queries work whether it is started or
/// not.
pub struct SentinelMonitor {
    inner: Arc<Inner>,
    tasks: ComponentTasks,
}

/// The name of the monitor as a [`Component`].
const COMPONENT: &str = "redis-sentinel";

struct Inner {
    master: String,
    sentinels: Vec<SentinelNode>,
    timeout: Duration,
    /// The watcher's view, as a [`Status::badness`] (Unknown until it first tried).
    status: AtomicU8,
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
            .finish_non_exhaustive()
    }
}

fn connection_config(timeout: Duration) -> ConnectionConfig {
    ConnectionConfig {
        connection_timeout: timeout,
        internal_command_timeout: timeout,
        max_command_attempts: 1,
        tcp: TcpConfig {
            nodelay: Some(true),
            ..TcpConfig::default()
        },
        ..ConnectionConfig::default()
    }
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

    /// A monitor of `master` through the sentinels at `sentinels` (`host:port`). Connections
    /// are opened in the background and re-opened when lost; a sentinel that is down now is
    /// simply skipped by queries.
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
                    Some(ReconnectPolicy::new_exponential(0, 100, 2_000, 2)),
                );
                drop(client.connect());
                Ok(SentinelNode { addr, client })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                master,
                sentinels: nodes,
                timeout,
                status: AtomicU8::new(Status::Unknown.badness()),
            }),
            tasks: ComponentTasks::default(),
        })
    }

    /// The monitored master's name.
    pub fn master_name(&self) -> &str {
        &self.inner.master
    }

    /// The master's `ip:port` as the first answering sentinel names it, unconfirmed, and the
    /// sentinel that answered.
    pub async fn master_addr(&self) -> Result<(String, String), Error> {
        self.inner.master_addr().await
    }

    /// The current master, confirmed with `ROLE` on it.
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

    /// Whether the sentinels can authorize a failover (`SENTINEL CKQUORUM`). A quorum that
    /// cannot be reached is `ok: false` with Sentinel's reason, not an error.
    pub async fn ckquorum(&self) -> Result<Quorum, Error> {
        self.inner.ckquorum().await
    }

    /// Asks Sentinel for a failover of the master now (`SENTINEL FAILOVER`), without waiting
    /// for agreement that it is down. Returns once a sentinel accepted; watch for
    /// `RedisMasterSwitched` to learn when it is done.
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
        self.tasks
            .spawn(async move { inner.watch(ctx.node, ctx.bus, stop).await });
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

impl Inner {
    fn set_status(&self, status: Status) {
        self.status.store(status.badness(), Ordering::Relaxed);
    }

    /// Runs `SENTINEL <args>` on the first sentinel that answers.
    async fn sentinel(&self, args: Vec<&str>) -> Result<(String, Value), Error> {
        let mut failures = Vec::new();
        for node in &self.sentinels {
            let cmd = CustomCommand::new_static("SENTINEL", ClusterHash::FirstKey, false);
            let call = node.client.custom::<Value, &str>(cmd, args.clone());
            match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(value)) => return Ok((node.addr.clone(), value)),
                Ok(Err(e)) => failures.push(format!("{}: {e}", node.addr)),
                Err(_) => {
                    failures.push(format!("{}: timed out after {:?}", node.addr, self.timeout))
                }
            }
        }
        Err(Error::Sentinel {
            master: self.master.clone(),
            detail: format!(
                "SENTINEL {} failed on every sentinel ({})",
                args.join(" "),
                failures.join("; ")
            ),
        })
    }

    /// The master's `ip:port` as the first answering sentinel names it, unconfirmed.
    async fn master_addr(&self) -> Result<(String, String), Error> {
        let (sentinel, reply) = self
            .sentinel(vec!["get-master-addr-by-name", &self.master])
            .await?;
        let parts = strings(&reply);
        match parts.as_slice() {
            [ip, port] => Ok((format!("{ip}:{port}"), sentinel)),
            _ => Err(Error::Sentinel {
                master: self.master.clone(),
                detail: format!("{sentinel} does not know the master (reply {reply:?})"),
            }),
        }
    }

    /// The current master, confirmed with `ROLE` on it.
    async fn master(&self) -> Result<MasterInfo, Error> {
        let (addr, sentinel) = self.master_addr().await?;
        let (host, port) = split_addr(&addr).map_err(|detail| Error::Sentinel {
            master: self.master.clone(),
            detail,
        })?;
        let role = confirm_role(&host, port, self.timeout)
            .await
            .map_err(|detail| Error::Sentinel {
                master: self.master.clone(),
                detail: format!("{addr} named by {sentinel}: {detail}"),
            })?;
        if role != "master" {
            return Err(Error::Sentinel {
                master: self.master.clone(),
                detail: format!("{sentinel} names {addr}, but ROLE there says {role}"),
            });
        }
        Ok(MasterInfo {
            addr,
            sentinel,
            role,
        })
    }

    /// The master's replicas with their flags (`SENTINEL REPLICAS`).
    async fn replicas(&self) -> Result<Vec<Instance>, Error> {
        let (_, reply) = self.sentinel(vec!["replicas", &self.master]).await?;
        Ok(instances(&reply))
    }

    /// The other sentinels watching the master (`SENTINEL SENTINELS`).
    async fn sentinels(&self) -> Result<Vec<Instance>, Error> {
        let (_, reply) = self.sentinel(vec!["sentinels", &self.master]).await?;
        Ok(instances(&reply))
    }

    /// Whether the sentinels can authorize a failover (`SENTINEL CKQUORUM`). A quorum that
    /// cannot be reached is `ok: false` with Sentinel's reason, not an error.
    async fn ckquorum(&self) -> Result<Quorum, Error> {
        match self.sentinel(vec!["ckquorum", &self.master]).await {
            Ok((_, reply)) => Ok(Quorum {
                ok: true,
                message: strings(&reply).join(" "),
            }),
            Err(Error::Sentinel { detail, .. }) if detail.contains("NOQUORUM") => Ok(Quorum {
                ok: false,
                message: detail,
            }),
            Err(e) => Err(e),
        }
    }

    /// Asks Sentinel for a failover of the master now (`SENTINEL FAILOVER`), without waiting
    /// for agreement that it is down. Returns once a sentinel accepted; watch for
    /// `RedisMasterSwitched` to learn when it is done.
    async fn failover(&self) -> Result<(), Error> {
        self.sentinel(vec!["failover", &self.master])
            .await
            .map(drop)
    }

    /// Publishes Sentinel's announcements about this master on `bus` as `node` until `cancel`
    /// fires. See the [module docs](self).
    async fn watch(&self, node: NodeId, bus: EventBus, cancel: CancellationToken) {
        let mut known_master = self.master_addr().await.ok().map(|(addr, _)| addr);
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
            if let Ok((addr, _)) = self.master_addr().await {
                if let Some(old) = known_master.as_ref().filter(|old| **old != addr) {
                    bus.publish(HaEvent::RedisMasterSwitched {
                        at: SystemTime::now(),
                        node: node.clone(),
                        master: self.master.clone(),
                        from: old.clone(),
                        to: addr.clone(),
                    });
                }
                known_master = Some(addr);
            }
            let mut messages = subscriber.message_rx();
            let mut errors = subscriber.error_rx();
            loop {
                tokio::select! {
                    () = cancel.cancelled() => {
                        let _ = subscriber.quit().await;
                        handle.abort();
                        return;
                    }
                    _ = errors.recv() => break,
                    message = messages.recv() => {
                        let Ok(message) = message else { break };
                        let channel = message.channel.to_string();
                        let Some(text) = message.value.as_string() else { continue };
                        if let Some(event) = parse_announcement(&channel, &text, &self.master, &node) {
                            if let HaEvent::RedisMasterSwitched { to, .. } = &event {
                                known_master = Some(to.clone());
                            }
                            tracing::info!(%channel, %text, "sentinel announcement");
                            bus.publish(event);
                        }
                    }
                }
            }
            self.set_status(Status::Degraded);
            tracing::warn!(sentinel = %sentinel.addr, "sentinel subscription lost; moving to the next sentinel");
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

/// A list of instances, each a flat `[name, value, name, value, …]` array (RESP2) or a map
/// (RESP3), parsed by field name.
fn instances(value: &Value) -> Vec<Instance> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let fields: HashMap<String, String> = match item {
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
            };
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
