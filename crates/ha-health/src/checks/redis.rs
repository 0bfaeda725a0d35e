//! [`RedisCheck`]: `PING` and `ROLE` on a Redis server, through fred.

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::{Client, ClientLike, Config};
use fred::types::config::Options;
use fred::types::{ClusterHash, ConnectHandle, CustomCommand, Value};
use ha_core::ConfigError;

use crate::threshold::Outcome;
use crate::{CheckResult, Error, HealthCheck};

/// Bounds the TCP connect of every (re)connection of a client built by
/// [`RedisCheck::connect`], and the first connection as a whole.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// URL schemes [`RedisCheck::connect`] accepts: a standalone server, or the master behind
/// Sentinels (fred's `redis-sentinel://` form). Not a cluster: `ROLE` is a per-node question.
const SCHEMES: [&str; 4] = ["redis", "valkey", "redis-sentinel", "valkey-sentinel"];

/// The replication role a [`RedisCheck`] can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RedisRole {
    /// `ROLE` answers `master`.
    Master,
    /// `ROLE` answers `slave` (a replica).
    Replica,
}

impl RedisRole {
    /// The word `ROLE` answers for this role.
    fn reply(self) -> &'static str {
        match self {
            RedisRole::Master => "master",
            RedisRole::Replica => "slave",
        }
    }
}

/// `PING`, then `ROLE`, on a Redis server: is it up, and is it what we think it is.
///
/// Results:
/// - `Healthy` with `role=master replicas=2`, or for a replica
///   `role=slave master=10.0.0.5:6379 link=connected`;
/// - `Degraded` for a replica whose link to its master is not `connected` (it serves stale
///   data, or none while it syncs);
/// - `Unhealthy` if a command fails or times out, or if [`expect_role`](Self::expect_role)
///   was set and the role differs (a master demoted by a failover).
///
/// The measured latency is `PING`'s round trip.
///
/// Every command is sent with fred's per-command options `fail_fast` (fail at once while the
/// client is disconnected or reconnecting, instead of queueing until it is back), one write
/// attempt, and a timeout ([`Self::DEFAULT_COMMAND_TIMEOUT`], 2 s). So once the client knows
/// the server is gone, a run fails in microseconds; a run whose command was already sent when
/// the connection broke (fred keeps such commands for after a reconnect) or that waits on a
/// frozen server fails at the timeout. The check sends only `PING` and `ROLE`: it writes
/// nothing.
///
/// ```no_run
/// use ha_health::HealthCheck;
/// use ha_health::checks::{RedisCheck, RedisRole};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ha_health::Error> {
/// let check = RedisCheck::connect("cache", "redis://127.0.0.1:6379")
///     .await?
///     .expect_role(RedisRole::Master);
/// println!("{}", check.check().await); // "healthy: role=master replicas=0"
/// # Ok(())
/// # }
/// ```
pub struct RedisCheck {
    name: String,
    client: Client,
    options: Options,
    expected: Option<RedisRole>,
    /// The connection task of a client this check built; stopped when the check is dropped.
    connection: Option<ConnectHandle>,
}

impl fmt::Debug for RedisCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCheck")
            .field("name", &self.name)
            .field("client", &self.client.id())
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisCheck {
    fn drop(&mut self) {
        if let Some(connection) = &self.connection {
            connection.abort();
        }
    }
}

impl RedisCheck {
    /// Bounds each command of a run (`PING`, `ROLE`) unless set with
    /// [`command_timeout`](Self::command_timeout). Short, because it is also what bounds a run
    /// during which the server dies (see the type's docs).
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

    /// A check using `client`, a fred client the application already has (connected, or
    /// connecting: until it is connected, runs are `Unhealthy`). Its connection, reconnect
    /// policy and lifetime stay the caller's.
    pub fn new(name: impl Into<String>, client: Client) -> Self {
        Self {
            name: name.into(),
            client,
            options: Options {
                fail_fast: true,
                max_attempts: Some(1),
                timeout: Some(Self::DEFAULT_COMMAND_TIMEOUT),
                ..Options::default()
            },
            expected: None,
            connection: None,
        }
    }

    /// Builds a client for `url` (`redis://[user:password@]host:port[/db]`, or fred's
    /// `redis-sentinel://host:port?sentinelServiceName=<master>` form) and waits for its first
    /// connection, for at most 3 s.
    ///
    /// Fails with [`Error::Config`] (field `url`) if the URL is not a Redis URL, and with
    /// [`Error::Connect`] if the server does not answer in time. Later, the client reconnects
    /// by itself (backing off from 50 ms to 2 s, forever) and drops a connection whose command
    /// stays unanswered for 5 s; runs while it is down are `Unhealthy`. The client stops when
    /// the check is dropped.
    pub async fn connect(name: impl Into<String>, url: &str) -> Result<Self, Error> {
        let name = name.into();
        let url_error = |rule: String| Error::config("redis check", ConfigError::new("url", rule));
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        if !SCHEMES.contains(&scheme) {
            return Err(url_error(format!(
                "must start with one of {}:// (no TLS support), got {scheme:?}",
                SCHEMES.join("://, ")
            )));
        }
        let config = Config::from_url(url)
            .map_err(|e| url_error(format!("is not a Redis URL: {}", e.details())))?;
        let target = config
            .server
            .hosts()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let connection =
            ha_clients::redis::connection(CONNECT_TIMEOUT, Some(Duration::from_secs(5)));
        let reconnect = ha_clients::redis::reconnect();
        let config = Config {
            // Report a first connection that fails instead of retrying it silently.
            fail_fast: true,
            ..config
        };
        let client = Client::new(config, None, Some(connection), Some(reconnect));
        let handle = client.connect();
        let first = tokio::time::timeout(CONNECT_TIMEOUT, client.wait_for_connect()).await;
        // `is_connected` covers a connection made just before `wait_for_connect` subscribed.
        if !client.is_connected() {
            handle.abort();
            let detail = match first {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no connection within {CONNECT_TIMEOUT:?}"),
            };
            return Err(Error::Connect {
                check: name,
                target,
                detail,
            });
        }
        let mut check = Self::new(name, client);
        check.connection = Some(handle);
        Ok(check)
    }

    /// Makes a run `Unhealthy` unless the server has `role`.
    #[must_use]
    pub fn expect_role(mut self, role: RedisRole) -> Self {
        self.expected = Some(role);
        self
    }

    /// Bounds each command of a run (default [`Self::DEFAULT_COMMAND_TIMEOUT`]).
    #[must_use]
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Judges a `ROLE` reply.
    fn judge(&self, reply: &Value) -> CheckResult {
        let items = match reply {
            Value::Array(items) => items.as_slice(),
            other => return CheckResult::unhealthy(format!("unexpected ROLE reply: {other:?}")),
        };
        let text = |i: usize| items.get(i).and_then(Value::as_string).unwrap_or_default();
        let role = text(0);
        let (outcome, detail) = match role.as_str() {
            "master" => {
                let replicas = match items.get(2) {
                    Some(Value::Array(replicas)) => replicas.len(),
                    _ => 0,
                };
                (Outcome::Healthy, format!("role=master replicas={replicas}"))
            }
            "slave" => {
                let link = text(3);
                let outcome = if link == "connected" {
                    Outcome::Healthy
                } else {
                    Outcome::Degraded
                };
                let detail = format!("role=slave master={}:{} link={link}", text(1), text(2));
                (outcome, detail)
            }
            "" => return CheckResult::unhealthy(format!("unexpected ROLE reply: {reply:?}")),
            other => (Outcome::Healthy, format!("role={other}")),
        };
        match self.expected {
            Some(expected) if expected.reply() != role => {
                CheckResult::unhealthy(format!("{detail}, expected role={}", expected.reply()))
            }
            _ => CheckResult::new(outcome, detail),
        }
    }
}

#[async_trait]
impl HealthCheck for RedisCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let client = self.client.with_options(&self.options);
        let started = Instant::now();
        if let Err(e) = client.ping::<Value>(None).await {
            return CheckResult::unhealthy(format!("PING failed: {e}"));
        }
        let latency = started.elapsed();
        let role = CustomCommand::new_static("ROLE", ClusterHash::Random, false);
        match client.custom::<Value, Value>(role, Vec::new()).await {
            Ok(reply) => self.judge(&reply).with_latency(latency),
            Err(e) => CheckResult::unhealthy(format!("ROLE failed: {e}")).with_latency(latency),
        }
    }
}
