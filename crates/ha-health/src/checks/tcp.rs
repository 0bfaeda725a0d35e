//! [`TcpCheck`]: whether a TCP port accepts connections.

use std::time::Instant;

use async_trait::async_trait;
use ha_core::ConfigError;
use tokio::net::TcpStream;

use crate::{CheckResult, Error, HealthCheck};

/// Whether `host:port` accepts a TCP connection. The connection is closed at once; nothing
/// is sent.
///
/// The target is resolved on every run (so a DNS change is followed) and its addresses are
/// tried in order until one accepts. The measured latency is the successful connect alone,
/// without name resolution.
///
/// ```
/// use ha_health::checks::TcpCheck;
///
/// let check = TcpCheck::new("db-port", "db.internal:5432")?;
/// assert!(TcpCheck::new("bad", "db.internal").is_err()); // no port
/// # Ok::<(), ha_health::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TcpCheck {
    name: String,
    target: String,
}

impl TcpCheck {
    /// A check of `target`, written `host:port` (`[::1]:80` for an IPv6 address). Fails with
    /// [`Error::Config`] on field `target` if it has no host or no valid port.
    pub fn new(name: impl Into<String>, target: impl Into<String>) -> Result<Self, Error> {
        let target = target.into();
        let valid = target
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            let rule = format!("must be `host:port`, got {target:?}");
            return Err(Error::config("tcp check", ConfigError::new("target", rule)));
        }
        Ok(Self {
            name: name.into(),
            target,
        })
    }

    /// The `host:port` checked.
    pub fn target(&self) -> &str {
        &self.target
    }
}

#[async_trait]
impl HealthCheck for TcpCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let addrs = match tokio::net::lookup_host(self.target.as_str()).await {
            Ok(addrs) => addrs,
            Err(e) => {
                return CheckResult::unhealthy(format!("cannot resolve {}: {e}", self.target));
            }
        };
        let mut last_error = format!("{} resolved to no address", self.target);
        for addr in addrs {
            let started = Instant::now();
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let latency = started.elapsed();
                    drop(stream);
                    return CheckResult::healthy(format!("connected to {addr}"))
                        .with_latency(latency);
                }
                Err(e) => last_error = format!("connect to {addr}: {e}"),
            }
        }
        CheckResult::unhealthy(last_error)
    }
}
