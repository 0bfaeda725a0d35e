//! A real etcd cluster (Debian's `etcd-server`, 3.4 or newer) of local `etcd` processes on free
//! loopback ports, each member in its own data directory, each client port behind a
//! [`FaultProxy`].
//!
//! The testkit speaks to etcd only through its HTTP endpoints (`/health`, `/metrics`) with a
//! few lines of HTTP/1.0, so it needs no etcd client crate (and no `protoc`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::binaries;
use crate::error::{Result, TestkitError};
use crate::process::{ServerProcess, free_ports};
use crate::proxy::FaultProxy;

/// How long a cluster (or a restarted member) may take to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-probe timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Raft heartbeat and election timeout of the test cluster, in milliseconds: short, so leader
/// changes take about half a second.
pub const HEARTBEAT_MS: u64 = 50;
/// See [`HEARTBEAT_MS`].
pub const ELECTION_TIMEOUT_MS: u64 = 500;

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    process: Option<ServerProcess>,
    proxy: FaultProxy,
}

impl EtcdMember {
    /// The member's name (`m0`, `m1`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The member's own client address (not proxied).
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The proxy in front of the member's client port: what clients should use.
    pub fn proxy(&self) -> &FaultProxy {
        &self.proxy
    }

    /// The member's data directory (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The last `lines` lines of the member's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log_path, lines)
    }

    /// Whether the member's process runs (not killed).
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(process) => process.exit_status().is_none(),
            None => false,
        }
    }

    fn process(&self) -> Result<&ServerProcess> {
        self.process.as_ref().ok_or_else(|| TestkitError::Query {
            server: format!("etcd {}", self.name),
            port: self.client_port,
            detail: "the member is not running".to_owned(),
        })
    }
}

/// A running etcd cluster of local processes; stopped and removed on drop.
///
/// ```no_run
/// # async fn example() -> ha_testkit::Result<()> {
/// let mut cluster = ha_testkit::EtcdCluster::start().await?;
/// let endpoints = cluster.endpoints(); // through each member's fault proxy
/// let leader = cluster.leader().await?.expect("a leader");
/// cluster.kill(leader)?;               // SIGKILL: the others elect a new leader
/// cluster.restart(leader).await?;      // same data directory
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<EtcdMember>,
    initial_cluster: String,
    token: String,
    // Last: removed after every member stopped.
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts a 3-member cluster and waits until every member reports healthy.
    pub async fn start() -> Result<Self> {
        Self::start_with(3).await
    }

    /// Starts a cluster of `size` members and waits until every member reports healthy.
    /// A member that could not bind its port (another process took it between the choice
    /// and the start) makes it start over on fresh ports, a few times.
    pub async fn start_with(size: usize) -> Result<Self> {
        const ATTEMPTS: usize = 5;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(size).await {
                Err(TestkitError::Exited { log_tail, .. })
                    if attempt < ATTEMPTS && log_tail.contains("address already in use") =>
                {
                    tracing::debug!(attempt, "an etcd member could not bind its port; retrying");
                }
                other => return other,
            }
        }
    }

    async fn try_start(size: usize) -> Result<Self> {
        let binary = binaries::find("etcd", &[], "etcd-server")?;
        let dir = tempfile::Builder::new()
            .prefix("ha-etcd-")
            .tempdir()
            .map_err(|e| TestkitError::io("create the etcd cluster's directory", e))?;
        // Client and peer ports of every member, all distinct.
        let all = free_ports(2 * size)?;
        let ports: Vec<(u16, u16)> = all.chunks(2).map(|p| (p[0], p[1])).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("ha-etcd-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (client_port, peer_port)) in ports.into_iter().enumerate() {
            let data_dir = dir.path().join(format!("m{i}.etcd"));
            let log_path = dir.path().join(format!("m{i}.log"));
            let proxy = FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, client_port)))?;
            members.push(EtcdMember {
                name: format!("m{i}"),
                client_port,
                peer_port,
                data_dir,
                log_path,
                process: None,
                proxy,
            });
        }
        let mut cluster = Self {
            binary,
            members,
            initial_cluster,
            token,
            _dir: dir,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_TIMEOUT_MS.to_string()]);
        // etcd 3.4 refuses to start on anything but amd64 (and s390x/ppc64le) unless told.
        if !cfg!(target_arch = "x86_64") {
            let arch = match std::env::consts::ARCH {
                "aarch64" => "arm64",
                other => other,
            };
            command.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        let process = ServerProcess::spawn(
            &format!("etcd {}", member.name),
            member.client_port,
            command,
            &member.log_path,
            Signal::SIGTERM,
        )?;
        self.members[i].process = Some(process);
        Ok(())
    }

    /// Waits until member `i` reports healthy (it has a leader).
    pub async fn wait_healthy(&mut self, i: usize) -> Result<()> {
        let addr = self.members[i].client_addr();
        let member = &mut self.members[i];
        let process = member.process.as_mut().ok_or_else(|| TestkitError::Query {
            server: format!("etcd {}", member.name),
            port: member.client_port,
            detail: "the member is not running".to_owned(),
        })?;
        process
            .wait_ready(START_TIMEOUT, || async move {
                let body = http_get(addr, "/health").await?;
                if body.contains("\"health\":\"true\"") {
                    Ok(())
                } else {
                    Err(format!("/health answered {body}"))
                }
            })
            .await
    }

    /// The members.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// Member `i`.
    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// The proxy in front of member `i`'s client port.
    pub fn proxy(&self, i: usize) -> &FaultProxy {
        &self.members[i].proxy
    }

    /// Every member's client endpoint through its proxy (`127.0.0.1:port`).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.proxy.addr().to_string())
            .collect()
    }

    /// `etcd://` URL of every member through its proxy.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// The index of the member that leads the raft group now, if a running member says it
    /// does (from its `/metrics`: `etcd_server_is_leader 1`).
    pub async fn leader(&mut self) -> Result<Option<usize>> {
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                continue;
            }
            let Ok(metrics) = http_get(self.members[i].client_addr(), "/metrics").await else {
                continue;
            };
            if metrics
                .lines()
                .any(|line| line.trim() == "etcd_server_is_leader 1")
            {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Waits (up to 20 s) until some member leads, and returns it.
    pub async fn wait_for_leader(&mut self) -> Result<usize> {
        let started = std::time::Instant::now();
        loop {
            if let Some(leader) = self.leader().await? {
                return Ok(leader);
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(TestkitError::Query {
                    server: "etcd cluster".to_owned(),
                    port: self.members[0].client_port,
                    detail: format!("no leader after {START_TIMEOUT:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs member `i` (a crash); its data directory stays.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let member = &mut self.members[i];
        match member.process.take() {
            Some(mut process) => process.kill(),
            None => Ok(()),
        }
    }

    /// Freezes member `i` (SIGSTOP).
    pub fn pause(&self, i: usize) -> Result<()> {
        self.members[i].process()?.pause()
    }

    /// Thaws member `i` (SIGCONT).
    pub fn resume(&self, i: usize) -> Result<()> {
        self.members[i].process()?.resume()
    }

    /// Restarts member `i` on its data directory (killing it first if it runs) and waits until
    /// it is healthy.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        self.spawn(i)?;
        self.wait_healthy(i).await
    }

    /// SIGKILLs every member, then starts them all again on their data directories and waits
    /// until every member is healthy.
    pub async fn restart_all(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            self.kill(i)?;
        }
        self.start_all().await
    }

    /// Starts every member that is not running, and waits until every member is healthy.
    pub async fn start_all(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                self.members[i].process = None;
                self.spawn(i)?;
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await?;
        }
        Ok(())
    }
}

/// `GET path` over HTTP/1.0 (so the body is never chunked) to `addr`; the body, or why not.
async fn http_get(addr: SocketAddr, path: &str) -> std::result::Result<String, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write to {addr}: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&response).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.split(' ').nth(1) == Some("200") => Ok(body.to_owned()),
            Some((head, body)) => Err(format!(
                "{}: {body}",
                head.lines().next().unwrap_or_default()
            )),
            None => Err(format!("no HTTP response: {text:?}")),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {addr} within {PROBE_TIMEOUT:?}")))
}
