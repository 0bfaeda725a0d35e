//! Redis replica sets (one master, N replicas) and the Redis Sentinel sets that watch them.
//!
//! Sentinels are [`RedisServer`]s running `redis-sentinel` with a `sentinel.conf`, so they
//! pause, resume, crash and restart exactly like the servers they watch.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Result, TestkitError};
use crate::redis::{RedisServer, RespValue, command_named, common_config, info_field};

/// The master name sentinels monitor unless told otherwise.
pub const DEFAULT_MASTER_NAME: &str = "mymaster";

/// How long a replica set or sentinel set may take to become ready. Sentinels find each other
/// through hello messages sent every 2 s, so this is longer than a single server's start-up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-query timeout while probing; short, so one paused node does not stall a poll.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest pause between two polls of [`SentinelSet::wait_for_failover`].
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A master and its replicas, each a [`RedisServer`] replicating with `replicaof`.
///
/// The set does not follow failovers: [`master`](Self::master) stays the node started as
/// master. After a failover, ask the sentinels for the new master's address
/// ([`SentinelSet::wait_for_failover`], [`SentinelSet::master_addr`]) and look the node up
/// with [`node`](Self::node) or [`node_mut`](Self::node_mut).
#[derive(Debug)]
pub struct RedisReplicaSet {
    /// The node started as master first, then the replicas.
    nodes: Vec<RedisServer>,
    master_name: String,
}

impl RedisReplicaSet {
    /// Starts a master and `replicas` replicas, named [`DEFAULT_MASTER_NAME`] for sentinels.
    ///
    /// Ready when every replica reports `master_link_status:up` and the master lists them all
    /// (Sentinel discovers replicas from the master's `INFO`).
    pub async fn start(replicas: usize) -> Result<Self> {
        Self::start_named(DEFAULT_MASTER_NAME, replicas).await
    }

    /// Like [`start`](Self::start), with the name sentinels will monitor the master under.
    pub async fn start_named(master_name: &str, replicas: usize) -> Result<Self> {
        let master = RedisServer::start().await?;
        let master_addr = master.addr();
        let mut nodes = vec![master];
        for _ in 0..replicas {
            nodes.push(
                RedisServer::builder()
                    .replica_of(master_addr)
                    .start()
                    .await?,
            );
        }
        let name = nodes[0].name();
        nodes[0]
            .wait_until(READY_TIMEOUT, move || async move {
                let info =
                    command_named(name, master_addr, &["INFO", "replication"], QUERY_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string())?;
                let connected = info
                    .as_str()
                    .and_then(|text| info_field(text, "connected_slaves"))
                    .and_then(|value| value.parse::<usize>().ok());
                if connected == Some(replicas) {
                    Ok(())
                } else {
                    Err(format!(
                        "master lists {connected:?} connected replicas, want {replicas}"
                    ))
                }
            })
            .await?;
        Ok(Self {
            nodes,
            master_name: master_name.to_owned(),
        })
    }

    /// The name sentinels monitor this set's master under.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The node started as master (not necessarily the master after a failover).
    pub fn master(&self) -> &RedisServer {
        &self.nodes[0]
    }

    /// The node started as master, mutably (to kill, pause or restart it).
    pub fn master_mut(&mut self) -> &mut RedisServer {
        &mut self.nodes[0]
    }

    /// The nodes started as replicas.
    pub fn replicas(&self) -> &[RedisServer] {
        &self.nodes[1..]
    }

    /// The nodes started as replicas, mutably.
    pub fn replicas_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes[1..]
    }

    /// Every node: the one started as master first, then the replicas.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node listening on `addr`, e.g. the master a failover promoted.
    pub fn node(&self, addr: SocketAddr) -> Option<&RedisServer> {
        self.nodes.iter().find(|node| node.addr() == addr)
    }

    /// The node listening on `addr`, mutably.
    pub fn node_mut(&mut self, addr: SocketAddr) -> Option<&mut RedisServer> {
        self.nodes.iter_mut().find(|node| node.addr() == addr)
    }
}

/// How a [`SentinelSet`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelOptions {
    /// How many sentinels to start (default 3).
    pub count: usize,
    /// How many sentinels must agree the master is down before a failover (default 2).
    pub quorum: usize,
    /// How long the master must not answer before a sentinel deems it down (default 1 s).
    pub down_after: Duration,
    /// Sentinel's `failover-timeout` (default 3 s). Sentinels also wait twice this long before
    /// retrying a failover whose leader election failed, so a short value keeps tests short.
    pub failover_timeout: Duration,
}

impl Default for SentinelOptions {
    fn default() -> Self {
        Self {
            count: 3,
            quorum: 2,
            down_after: Duration::from_millis(1000),
            failover_timeout: Duration::from_secs(3),
        }
    }
}

/// What a sentinel's first `sentinel.conf` says.
#[derive(Debug, Clone)]
pub(crate) struct SentinelConfig {
    master_name: String,
    master: SocketAddr,
    quorum: usize,
    down_after: Duration,
    failover_timeout: Duration,
}

impl SentinelConfig {
    /// The configuration file; Sentinel rewrites it as it learns, so it must stay writable.
    pub(crate) fn render(&self, port: u16, dir: &Path) -> String {
        let name = &self.master_name;
        let mut conf = common_config(port, dir);
        conf.push_str(&format!(
            "# Peers and clients must see the loopback address sentinels are reached at.\n\
             sentinel announce-ip 127.0.0.1\n\
             sentinel monitor {name} {} {} {}\n\
             sentinel down-after-milliseconds {name} {}\n\
             sentinel failover-timeout {name} {}\n\
             sentinel parallel-syncs {name} 1\n",
            self.master.ip(),
            self.master.port(),
            self.quorum,
            self.down_after.as_millis(),
            self.failover_timeout.as_millis(),
        ));
        conf
    }
}

/// What every sentinel must report before the set is ready.
#[derive(Debug, Clone, Copy)]
struct Expected {
    master: SocketAddr,
    other_sentinels: usize,
    replicas: usize,
}

/// Real `redis-sentinel` processes monitoring a [`RedisReplicaSet`]'s master.
#[derive(Debug)]
pub struct SentinelSet {
    sentinels: Vec<RedisServer>,
    master_name: String,
}

impl SentinelSet {
    /// Starts `options.count` sentinels monitoring `replica_set`'s master.
    ///
    /// Ready when every sentinel names that master, sees all other sentinels and all replicas;
    /// this takes a few seconds, since sentinels discover each other through hello messages.
    ///
    /// # Panics
    ///
    /// If `count` is 0 or `quorum` is not between 1 and `count`: that is a broken test.
    pub async fn start(replica_set: &RedisReplicaSet, options: SentinelOptions) -> Result<Self> {
        assert!(
            options.count >= 1,
            "a sentinel set needs at least one sentinel"
        );
        assert!(
            (1..=options.count).contains(&options.quorum),
            "quorum {} must be between 1 and the sentinel count {}",
            options.quorum,
            options.count
        );
        let config = SentinelConfig {
            master_name: replica_set.master_name().to_owned(),
            master: replica_set.master().addr(),
            quorum: options.quorum,
            down_after: options.down_after,
            failover_timeout: options.failover_timeout,
        };
        let mut sentinels = Vec::with_capacity(options.count);
        for _ in 0..options.count {
            sentinels.push(RedisServer::start_sentinel(config.clone()).await?);
        }
        let expected = Expected {
            master: config.master,
            other_sentinels: options.count - 1,
            replicas: replica_set.replicas().len(),
        };
        let started = Instant::now();
        let master_name = config.master_name.as_str();
        for sentinel in &mut sentinels {
            let addr = sentinel.addr();
            let remaining = READY_TIMEOUT.saturating_sub(started.elapsed());
            sentinel
                .wait_until(remaining, move || async move {
                    probe_sentinel(addr, master_name, expected).await
                })
                .await?;
        }
        Ok(Self {
            sentinels,
            master_name: config.master_name,
        })
    }

    /// The name the sentinels monitor the master under.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The sentinels, to pause, kill or restart them like any [`RedisServer`].
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// The sentinels, mutably.
    pub fn sentinels_mut(&mut self) -> &mut [RedisServer] {
        &mut self.sentinels
    }

    /// The sentinels' addresses, e.g. to configure a Sentinel-aware client.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(RedisServer::addr).collect()
    }

    /// The master's address according to the first live sentinel that answers.
    pub async fn master_addr(&self) -> Result<SocketAddr> {
        let mut failures = Vec::new();
        for sentinel in self.live() {
            match ask_master(sentinel.addr(), &self.master_name).await {
                Ok(addr) => return Ok(addr),
                Err(e) => failures.push(format!("port {}: {e}", sentinel.port())),
            }
        }
        Err(self.error(format!(
            "no live sentinel named the master {:?} ({})",
            self.master_name,
            failures.join("; ")
        )))
    }

    /// Polls until every live sentinel names the same master other than `old_master`, and
    /// that node reports role `master`; returns its address.
    ///
    /// Paused and stopped sentinels are not asked. The deadline is on the real clock.
    pub async fn wait_for_failover(
        &self,
        old_master: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr> {
        let started = Instant::now();
        let mut interval = Duration::from_millis(20);
        loop {
            let last = match self.agreed_master().await {
                Ok(addr) if addr == old_master => format!("sentinels still name {addr}"),
                Ok(addr) => match node_role(addr).await {
                    Ok(role) if role == "master" => return Ok(addr),
                    Ok(role) => format!("sentinels name {addr}, which reports role {role}"),
                    Err(e) => format!("sentinels name {addr}, which does not answer ROLE: {e}"),
                },
                Err(detail) => detail,
            };
            if started.elapsed() >= timeout {
                return Err(TestkitError::NotReady {
                    server: "redis-sentinel".to_owned(),
                    port: self.sentinels[0].port(),
                    waited: started.elapsed(),
                    detail: format!("no failover away from {old_master}: {last}"),
                    log_tail: self.log_tails(8),
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(MAX_POLL_INTERVAL);
        }
    }

    /// `SENTINEL CKQUORUM` on the first live sentinel that answers: the text of its `OK` reply,
    /// or an error quoting why the quorum or a failover majority cannot be reached.
    pub async fn ckquorum(&self) -> Result<String> {
        let mut failures = Vec::new();
        for sentinel in self.live() {
            let args = ["SENTINEL", "CKQUORUM", self.master_name.as_str()];
            match command_named(sentinel.name(), sentinel.addr(), &args, QUERY_TIMEOUT).await {
                Ok(RespValue::Simple(text)) => return Ok(text),
                Ok(other) => {
                    return Err(TestkitError::Query {
                        server: sentinel.name().to_owned(),
                        port: sentinel.port(),
                        detail: format!("SENTINEL CKQUORUM {}: {other}", self.master_name),
                    });
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(self.error(format!(
            "no live sentinel answered CKQUORUM ({})",
            failures.join("; ")
        )))
    }

    /// Sentinels that should answer: running and not paused.
    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.sentinels
            .iter()
            .filter(|sentinel| sentinel.pid().is_some() && !sentinel.is_paused())
    }

    /// The master every live sentinel names, or why there is none.
    async fn agreed_master(&self) -> std::result::Result<SocketAddr, String> {
        let mut answers = Vec::new();
        for sentinel in self.live() {
            let answer = ask_master(sentinel.addr(), &self.master_name)
                .await
                .map_err(|e| format!("sentinel {}: {e}", sentinel.port()))?;
            answers.push((sentinel.port(), answer));
        }
        match answers.first() {
            None => Err("no sentinel is running".to_owned()),
            Some(&(_, first)) if answers.iter().all(|&(_, addr)| addr == first) => Ok(first),
            Some(_) => Err(format!(
                "sentinels disagree: {}",
                answers
                    .iter()
                    .map(|(port, addr)| format!("sentinel {port} names {addr}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn error(&self, detail: String) -> TestkitError {
        TestkitError::Query {
            server: "redis-sentinel".to_owned(),
            port: self.sentinels[0].port(),
            detail,
        }
    }

    fn log_tails(&self, lines: usize) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("--- sentinel {} ---\n{}", s.port(), s.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One readiness probe of one sentinel.
async fn probe_sentinel(
    addr: SocketAddr,
    master_name: &str,
    expected: Expected,
) -> std::result::Result<(), String> {
    let master = ask_master(addr, master_name).await?;
    if master != expected.master {
        return Err(format!("names master {master}, want {}", expected.master));
    }
    let reply = command_named(
        "redis-sentinel",
        addr,
        &["SENTINEL", "MASTER", master_name],
        QUERY_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    let count = |field: &str| reply.field(field).and_then(RespValue::as_int);
    let (others, replicas) = (count("num-other-sentinels"), count("num-slaves"));
    let want = |n: usize| i64::try_from(n).ok();
    if others == want(expected.other_sentinels) && replicas == want(expected.replicas) {
        Ok(())
    } else {
        Err(format!(
            "sees {others:?} other sentinels and {replicas:?} replicas, want {} and {}",
            expected.other_sentinels, expected.replicas
        ))
    }
}

/// `SENTINEL get-master-addr-by-name` on one sentinel.
async fn ask_master(
    sentinel: SocketAddr,
    master_name: &str,
) -> std::result::Result<SocketAddr, String> {
    let reply = command_named(
        "redis-sentinel",
        sentinel,
        &["SENTINEL", "get-master-addr-by-name", master_name],
        QUERY_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    let addr = match reply.as_array() {
        Some([ip, port]) => ip
            .as_str()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .zip(port.as_int().and_then(|p| u16::try_from(p).ok()))
            .map(SocketAddr::from),
        _ => None,
    };
    addr.ok_or_else(|| format!("get-master-addr-by-name {master_name} answered {reply}"))
}

/// The role a node reports in `ROLE`.
async fn node_role(addr: SocketAddr) -> Result<String> {
    let reply = command_named("redis-server", addr, &["ROLE"], QUERY_TIMEOUT).await?;
    reply
        .as_array()
        .and_then(|items| items.first())
        .and_then(RespValue::as_str)
        .map(str::to_owned)
        .ok_or_else(|| TestkitError::Query {
            server: "redis-server".to_owned(),
            port: addr.port(),
            detail: format!("ROLE answered {reply}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_config_monitors_the_master_by_name() {
        let config = SentinelConfig {
            master_name: "mymaster".to_owned(),
            master: "127.0.0.1:7001".parse().unwrap(),
            quorum: 2,
            down_after: Duration::from_millis(750),
            failover_timeout: Duration::from_secs(3),
        };
        let conf = config.render(26379, Path::new("/tmp/s"));
        assert!(conf.starts_with("port 26379\nbind 127.0.0.1\n"), "{conf}");
        assert!(conf.contains("sentinel monitor mymaster 127.0.0.1 7001 2\n"));
        assert!(conf.contains("sentinel down-after-milliseconds mymaster 750\n"));
        assert!(conf.contains("sentinel failover-timeout mymaster 3000\n"));
        assert!(conf.contains("sentinel parallel-syncs mymaster 1\n"));
        // `monitor` must come before the per-master settings that refer to it.
        let monitor = conf.find("sentinel monitor").unwrap();
        assert!(monitor < conf.find("down-after").unwrap());
    }
}
