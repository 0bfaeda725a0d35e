//! Real `redis-server` processes on free ports, and the small RESP2 client used to talk to them.
//!
//! The client is hand-written (a few hundred lines) so that the testkit needs no Redis crate:
//! it must keep working while the crates under test pin, upgrade or replace theirs, and it has to
//! expose exactly what fault tests look at — per-call timeouts and raw replies.

use std::fmt;
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
use crate::process::{ServerProcess, free_port, log_tail};
use crate::sentinel::SentinelConfig;

/// How long [`RedisServer::command`] waits for a connection and a reply.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may take to answer `PING` (and, for a replica, to finish its first sync).
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-probe timeout during start-up; short so a slow probe does not eat the whole deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How many free ports a first start tries before giving up on "Address already in use".
const PORT_ATTEMPTS: usize = 5;

/// The log line Redis prints when its port was taken between `free_port` and its bind.
const PORT_CLASH: &str = "Address already in use";

// ---------------------------------------------------------------------------------------------
// RESP2 values and parsing
// ---------------------------------------------------------------------------------------------

/// One RESP2 reply.
///
/// An error reply (`-ERR ...`) is a value like any other, not an `Err`: tests often want to
/// assert that a server refused something (`READONLY`, `LOADING`, `NOAUTH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    /// A simple string, e.g. `OK` or `PONG`.
    Simple(String),
    /// An error reply, e.g. `ERR unknown command`.
    Error(String),
    /// An integer reply.
    Integer(i64),
    /// A bulk string; `None` is the null bulk string (`$-1`), e.g. `GET` of a missing key.
    Bulk(Option<Vec<u8>>),
    /// An array; `None` is the null array (`*-1`).
    Array(Option<Vec<RespValue>>),
}

impl RespValue {
    /// The text of a simple string or of a UTF-8 bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Simple(s) => Some(s),
            Self::Bulk(Some(bytes)) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// The bytes of a simple or bulk string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Simple(s) => Some(s.as_bytes()),
            Self::Bulk(Some(bytes)) => Some(bytes),
            _ => None,
        }
    }

    /// An integer reply, or a string that holds one.
    ///
    /// Redis answers many numbers as strings (`SENTINEL master` fields, `CONFIG GET` values),
    /// so both forms are accepted.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Integer(i) => Some(*i),
            _ => self.as_str()?.parse().ok(),
        }
    }

    /// The elements of a non-null array.
    pub fn as_array(&self) -> Option<&[RespValue]> {
        match self {
            Self::Array(Some(items)) => Some(items),
            _ => None,
        }
    }

    /// The message of an error reply.
    pub fn as_error(&self) -> Option<&str> {
        match self {
            Self::Error(message) => Some(message),
            _ => None,
        }
    }

    /// Whether this is the null bulk string or the null array.
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Bulk(None) | Self::Array(None))
    }

    /// The value of field `name` in a flat field/value array such as `SENTINEL master`'s
    /// `[name, value, name, value, ...]`.
    ///
    /// Looking fields up by name, never by position, keeps callers working when a Redis
    /// version adds, removes or reorders fields.
    pub fn field(&self, name: &str) -> Option<&RespValue> {
        self.as_array()?
            .chunks_exact(2)
            .find(|pair| pair[0].as_str() == Some(name))
            .map(|pair| &pair[1])
    }

    /// Parses one value from the front of `buf`.
    ///
    /// Returns the value and how many bytes it took, `Ok(None)` if `buf` holds only the start
    /// of a value (read more and call again), or an error describing malformed input.
    pub fn parse(buf: &[u8]) -> std::result::Result<Option<(RespValue, usize)>, String> {
        let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[1..line_end];
        let after = line_end + 2;
        let value = match buf[0] {
            b'+' => Self::Simple(utf8(line)?),
            b'-' => Self::Error(utf8(line)?),
            b':' => Self::Integer(integer(line)?),
            b'$' => {
                let len = integer(line)?;
                if len == -1 {
                    return Ok(Some((Self::Bulk(None), after)));
                }
                let len = usize::try_from(len).map_err(|_| format!("bad bulk length {len}"))?;
                let end = after + len;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(format!("bulk string of length {len} not followed by CRLF"));
                }
                return Ok(Some((Self::Bulk(Some(buf[after..end].to_vec())), end + 2)));
            }
            b'*' => {
                let len = integer(line)?;
                if len == -1 {
                    return Ok(Some((Self::Array(None), after)));
                }
                let len = usize::try_from(len).map_err(|_| format!("bad array length {len}"))?;
                // The length comes from the wire: do not let a corrupt one allocate gigabytes.
                let mut items = Vec::with_capacity(len.min(1024));
                let mut pos = after;
                for _ in 0..len {
                    match Self::parse(&buf[pos..])? {
                        Some((item, used)) => {
                            items.push(item);
                            pos += used;
                        }
                        None => return Ok(None),
                    }
                }
                return Ok(Some((Self::Array(Some(items)), pos)));
            }
            other => {
                return Err(format!("unexpected RESP type byte {:?}", char::from(other)));
            }
        };
        Ok(Some((value, after)))
    }
}

impl fmt::Display for RespValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Simple(s) => write!(f, "{s}"),
            Self::Error(e) => write!(f, "(error) {e}"),
            Self::Integer(i) => write!(f, "(integer) {i}"),
            Self::Bulk(None) | Self::Array(None) => write!(f, "(nil)"),
            Self::Bulk(Some(bytes)) => write!(f, "{:?}", String::from_utf8_lossy(bytes)),
            Self::Array(Some(items)) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
        }
    }
}

fn utf8(bytes: &[u8]) -> std::result::Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| format!("reply line is not UTF-8: {e}"))
}

fn integer(bytes: &[u8]) -> std::result::Result<i64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad integer {:?}", String::from_utf8_lossy(bytes)))
}

/// Encodes a command as a RESP array of bulk strings, the form servers accept from clients.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The value of `field` in `INFO` output (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')
            .map(str::trim_end)
    })
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// One client connection speaking RESP2, for several commands or for pub/sub.
///
/// Every operation (connect, each send, each reply) runs under the connection's timeout, so a
/// paused server makes a call fail instead of hanging the test.
#[derive(Debug)]
pub struct RespConnection {
    stream: TcpStream,
    buf: Vec<u8>,
    server: String,
    addr: SocketAddr,
    timeout: Duration,
}

impl RespConnection {
    /// Connects to the server at `addr`; `timeout` bounds the connect and every later call.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        Self::connect_named("redis", addr, timeout).await
    }

    /// Like [`connect`](Self::connect), naming the server in errors.
    pub(crate) async fn connect_named(
        server: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let fail = |detail: String| query_error(server, addr, detail);
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(fail(format!("connect to {addr}: {e}"))),
            Err(_) => {
                return Err(fail(format!(
                    "connect to {addr} timed out after {timeout:?}"
                )));
            }
        };
        // Commands are tiny; without NODELAY, Nagle can hold one back behind an unacked one.
        stream
            .set_nodelay(true)
            .map_err(|e| fail(format!("set TCP_NODELAY: {e}")))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            server: server.to_owned(),
            addr,
            timeout,
        })
    }

    /// The address this connection talks to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the timeout of later calls.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one command without waiting for its reply (pipelining, `SUBSCRIBE`).
    pub async fn send(&mut self, args: &[&str]) -> Result<()> {
        let bytes = encode(args);
        match tokio::time::timeout(self.timeout, self.stream.write_all(&bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.error(format!("send {}: {e}", command_name(args)))),
            Err(_) => Err(self.error(format!(
                "send {} timed out after {:?}",
                command_name(args),
                self.timeout
            ))),
        }
    }

    /// Reads the next reply (or pushed pub/sub message).
    pub async fn read_reply(&mut self) -> Result<RespValue> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.read_value()).await {
            Ok(result) => result,
            Err(_) => Err(self.error(format!("reply timed out after {timeout:?}"))),
        }
    }

    /// Sends one command and reads its reply.
    pub async fn request(&mut self, args: &[&str]) -> Result<RespValue> {
        self.send(args).await?;
        self.read_reply().await.map_err(|e| match e {
            TestkitError::Query {
                server,
                port,
                detail,
            } => TestkitError::Query {
                server,
                port,
                detail: format!("{}: {detail}", command_name(args)),
            },
            other => other,
        })
    }

    async fn read_value(&mut self) -> Result<RespValue> {
        loop {
            match RespValue::parse(&self.buf) {
                Ok(Some((value, used))) => {
                    self.buf.drain(..used);
                    return Ok(value);
                }
                Ok(None) => {}
                Err(detail) => return Err(self.error(format!("malformed reply: {detail}"))),
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| self.error(format!("read: {e}")))?;
            if n == 0 {
                return Err(self.error("connection closed by the server".to_owned()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn error(&self, detail: String) -> TestkitError {
        query_error(&self.server, self.addr, detail)
    }
}

fn query_error(server: &str, addr: SocketAddr, detail: String) -> TestkitError {
    TestkitError::Query {
        server: server.to_owned(),
        port: addr.port(),
        detail,
    }
}

fn command_name(args: &[&str]) -> String {
    match args {
        [] => "(empty command)".to_owned(),
        [name] => name.to_string(),
        [name, sub, ..] if name.eq_ignore_ascii_case("SENTINEL") => format!("{name} {sub}"),
        [name, ..] => name.to_string(),
    }
}

/// Connects to `addr`, sends one command and reads its reply, all within `timeout`.
pub async fn command(addr: SocketAddr, args: &[&str], timeout: Duration) -> Result<RespValue> {
    command_named("redis", addr, args, timeout).await
}

/// [`command`], naming the server in errors.
pub(crate) async fn command_named(
    server: &str,
    addr: SocketAddr,
    args: &[&str],
    timeout: Duration,
) -> Result<RespValue> {
    let exchange = async {
        let mut connection = RespConnection::connect_named(server, addr, timeout).await?;
        connection.request(args).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(query_error(
            server,
            addr,
            format!("{} timed out after {timeout:?}", command_name(args)),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// What a [`RedisServer`] process is, and how its configuration file is written.
#[derive(Debug, Clone)]
enum Role {
    Server(ServerConfig),
    Sentinel(SentinelConfig),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Self::Server(_) => "redis-server",
            Self::Sentinel(_) => "redis-sentinel",
        }
    }

    fn file_stem(&self) -> &'static str {
        match self {
            Self::Server(_) => "redis",
            Self::Sentinel(_) => "sentinel",
        }
    }
}

/// The options of a plain `redis-server`.
#[derive(Debug, Clone, Default)]
struct ServerConfig {
    persistence: bool,
    replica_of: Option<SocketAddr>,
    extra: Vec<(String, String)>,
}

impl ServerConfig {
    fn render(&self, port: u16, dir: &Path) -> String {
        let mut conf = common_config(port, dir);
        conf.push_str(concat!(
            "enable-debug-command yes\n",
            // Replicas register under the address tests and sentinels use.
            "replica-announce-ip 127.0.0.1\n",
            // Diskless full syncs start at once instead of after the default 5 s batching delay.
            "repl-diskless-sync-delay 0\n",
            // A graceful stop gives lagging replicas a moment, but a paused replica must not
            // stall a test for the default 10 s.
            "shutdown-timeout 1\n",
            "save \"\"\n",
        ));
        if self.persistence {
            // Every write is on disk before it is acknowledged, so data survives even SIGKILL.
            conf.push_str("appendonly yes\nappendfsync always\n");
        } else {
            // A replica's full sync would otherwise leave a dump.rdb that a restart loads.
            conf.push_str("appendonly no\nrdb-del-sync-files yes\n");
        }
        if let Some(master) = self.replica_of {
            conf.push_str(&format!("replicaof {} {}\n", master.ip(), master.port()));
        }
        for (key, value) in &self.extra {
            conf.push_str(&format!("{key} {value}\n"));
        }
        conf
    }
}

/// Configuration lines shared by servers and sentinels.
pub(crate) fn common_config(port: u16, dir: &Path) -> String {
    format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
         # Log to stdout, which the testkit sends to the log file next to this one.\n\
         logfile \"\"\ndir {}\n",
        quote(&dir.display().to_string())
    )
}

/// Quotes a value for a Redis configuration file.
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A real `redis-server` (or, inside a [`SentinelSet`](crate::SentinelSet), `redis-sentinel`)
/// process on a free loopback port, in its own temporary directory.
///
/// The process is configured from a `redis.conf` written into that directory (a file rather
/// than arguments, so that `CONFIG REWRITE`, which Sentinel sends after reconfiguring a node,
/// works). It logs to `redis.log` there. Dropping the server stops the process and removes the
/// directory.
#[derive(Debug)]
pub struct RedisServer {
    // Declared first so it is dropped (stopped) before the directory is removed.
    process: Option<ServerProcess>,
    paused: bool,
    port: u16,
    role: Role,
    binary: PathBuf,
    dir: TempDir,
}

/// Options for a [`RedisServer`]; start one with [`start`](Self::start).
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    config: ServerConfig,
}

impl RedisServerBuilder {
    /// Whether data survives [`RedisServer::restart`] (default `false`).
    ///
    /// Off: no RDB snapshots, no AOF — a restarted server is empty, like one that lost its
    /// disk. On: `appendonly yes` with `appendfsync always` in the server's directory, so every
    /// acknowledged write survives a restart, even after [`RedisServer::kill`].
    #[must_use]
    pub fn persistence(mut self, on: bool) -> Self {
        self.config.persistence = on;
        self
    }

    /// Makes the server a replica of `master` (`replicaof`). Start-up then also waits for the
    /// first sync to finish (`master_link_status:up`).
    #[must_use]
    pub fn replica_of(mut self, master: SocketAddr) -> Self {
        self.config.replica_of = Some(master);
        self
    }

    /// Adds a line `key value` to the server's `redis.conf`, after the testkit's own lines so
    /// it overrides them. `value` is written verbatim: several words are several arguments.
    #[must_use]
    pub fn extra_arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.extra.push((key.into(), value.into()));
        self
    }

    /// Starts the server and waits until it is ready.
    pub async fn start(self) -> Result<RedisServer> {
        let binary = binaries::find("redis-server", &[], "redis-server")?;
        RedisServer::launch(Role::Server(self.config), binary).await
    }
}

impl RedisServer {
    /// Starts a server with the default options: no persistence, not a replica.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// Options for a server.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// Starts a `redis-sentinel` with the given configuration.
    pub(crate) async fn start_sentinel(config: SentinelConfig) -> Result<Self> {
        let binary = binaries::find("redis-sentinel", &[], "redis-sentinel")?;
        Self::launch(Role::Sentinel(config), binary).await
    }

    async fn launch(role: Role, binary: PathBuf) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ha-{}-", role.file_stem()))
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory for redis", e))?;
        let mut server = Self {
            process: None,
            paused: false,
            port: 0,
            role,
            binary,
            dir,
        };
        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            // A fresh log per attempt, so an earlier attempt's port clash is not mistaken for
            // this one's.
            let _ = std::fs::remove_file(server.log_path());
            match server.boot(true).await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < PORT_ATTEMPTS && is_port_clash(&e) => {
                    tracing::debug!(
                        server = server.name(),
                        port = server.port,
                        "port taken; retrying on another"
                    );
                    server.process = None;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the configuration, spawns the process and waits for readiness.
    ///
    /// `first` is false on restarts: a sentinel then keeps the configuration it rewrote (its
    /// id, epoch, known peers), as a real restarted sentinel would, and a replica is not
    /// waited on to sync, since its master may be down or have moved.
    async fn boot(&mut self, first: bool) -> Result<()> {
        let dir = self.dir.path().to_path_buf();
        let conf_path = dir.join(format!("{}.conf", self.role.file_stem()));
        let conf = match &self.role {
            Role::Server(config) => {
                if !config.persistence {
                    remove_data(&dir)?;
                }
                Some(config.render(self.port, &dir))
            }
            Role::Sentinel(config) if first => Some(config.render(self.port, &dir)),
            Role::Sentinel(_) => None,
        };
        if let Some(conf) = conf {
            std::fs::write(&conf_path, conf).map_err(|e| TestkitError::file(&conf_path, e))?;
        }
        let mut command = Command::new(&self.binary);
        command.arg(&conf_path).current_dir(&dir);
        let process = ServerProcess::spawn(
            self.name(),
            self.port,
            command,
            &self.log_path(),
            Signal::SIGTERM,
        )?;
        self.process = Some(process);
        self.paused = false;
        let wait_for_link = first
            && matches!(
                &self.role,
                Role::Server(ServerConfig {
                    replica_of: Some(_),
                    ..
                })
            );
        let (name, addr) = (self.name(), self.addr());
        self.wait_until(START_TIMEOUT, move || async move {
            probe_ready(name, addr, wait_for_link).await
        })
        .await
    }

    /// Polls `probe` until it succeeds, the process exits, or `timeout` passes (real clock).
    pub(crate) async fn wait_until<T, F, Fut>(&mut self, timeout: Duration, probe: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, String>>,
    {
        let (name, port) = (self.name(), self.port);
        match self.process.as_mut() {
            Some(process) => process.wait_ready(timeout, probe).await,
            None => Err(TestkitError::NotReady {
                server: name.to_owned(),
                port,
                waited: Duration::ZERO,
                detail: "the server is not running".to_owned(),
                log_tail: self.log_tail(30),
            }),
        }
    }

    /// Waits until this replica reports `master_link_status:up`, e.g. after a
    /// [`restart`](Self::restart) or after Sentinel pointed it at a new master.
    pub async fn wait_for_master_link(&mut self, timeout: Duration) -> Result<()> {
        let (name, addr) = (self.name(), self.addr());
        self.wait_until(timeout, move || async move {
            probe_ready(name, addr, true).await
        })
        .await
    }

    /// The binary's name, as used in messages: `redis-server` or `redis-sentinel`.
    pub fn name(&self) -> &'static str {
        self.role.name()
    }

    /// The port the server listens on; it keeps it across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's directory: configuration, log, and data files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log file the server writes to (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.role.file_stem()))
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// The process id, while the process runs (or is paused).
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().and_then(ServerProcess::pid)
    }

    /// Whether the process is alive (running or paused); reaps it if it exited.
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(process) => process.pid().is_some() && process.exit_status().is_none(),
            None => false,
        }
    }

    /// Whether the server was paused with [`pause`](Self::pause) and not resumed since.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&mut self) -> Result<()> {
        self.running("SIGSTOP")?.pause()?;
        self.paused = true;
        Ok(())
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&mut self) -> Result<()> {
        self.running("SIGCONT")?.resume()?;
        self.paused = false;
        Ok(())
    }

    /// Crashes the server (SIGKILL): no shutdown, no final fsync, connections reset.
    pub fn kill(&mut self) -> Result<()> {
        let result = match self.process.as_mut() {
            Some(process) => process.kill(),
            None => self.running("SIGKILL").map(|_| ()),
        };
        self.process = None;
        self.paused = false;
        result
    }

    /// Stops the server gracefully (SIGTERM; SIGKILL after a grace period). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
        self.paused = false;
    }

    /// Stops the server if it runs (or was killed) and starts it again on the same port, in
    /// the same directory, with the same options.
    ///
    /// Without persistence the data is gone; with it, every acknowledged write is back. A
    /// replica is not waited on to resync (see [`wait_for_master_link`](Self::wait_for_master_link)).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.boot(false).await
    }

    /// Runs one command on a new connection, with [`COMMAND_TIMEOUT`].
    pub async fn command(&self, args: &[&str]) -> Result<RespValue> {
        self.command_with_timeout(args, COMMAND_TIMEOUT).await
    }

    /// Runs one command on a new connection; connecting and the reply must fit in `timeout`.
    pub async fn command_with_timeout(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<RespValue> {
        command_named(self.name(), self.addr(), args, timeout).await
    }

    /// Opens a connection for several commands or pub/sub, with [`COMMAND_TIMEOUT`] per call.
    pub async fn connect(&self) -> Result<RespConnection> {
        RespConnection::connect_named(self.name(), self.addr(), COMMAND_TIMEOUT).await
    }

    /// The role the server reports in `ROLE`: `master`, `slave` or `sentinel`.
    pub async fn role(&self) -> Result<String> {
        let reply = self.command(&["ROLE"]).await?;
        reply
            .as_array()
            .and_then(|items| items.first())
            .and_then(RespValue::as_str)
            .map(str::to_owned)
            .ok_or_else(|| query_error(self.name(), self.addr(), format!("ROLE answered {reply}")))
    }

    fn running(&self, signal: &'static str) -> Result<&ServerProcess> {
        self.process.as_ref().ok_or(TestkitError::Signal {
            server: self.name().to_owned(),
            pid: 0,
            signal,
            source: nix::errno::Errno::ESRCH,
        })
    }
}

/// One readiness probe: `PING` answered `PONG`, and for a replica a finished first sync.
async fn probe_ready(
    name: &str,
    addr: SocketAddr,
    wait_for_link: bool,
) -> std::result::Result<(), String> {
    let pong = command_named(name, addr, &["PING"], PROBE_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    if pong.as_str() != Some("PONG") {
        return Err(format!("PING answered {pong}"));
    }
    if wait_for_link {
        let info = command_named(name, addr, &["INFO", "replication"], PROBE_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let text = info.as_str().unwrap_or_default();
        match info_field(text, "master_link_status") {
            Some("up") => {}
            status => return Err(format!("replication link not up yet ({status:?})")),
        }
    }
    Ok(())
}

/// Removes what a non-persistent server could load on start, so it always starts empty.
fn remove_data(dir: &Path) -> Result<()> {
    let rdb = dir.join("dump.rdb");
    match std::fs::remove_file(&rdb) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(TestkitError::file(rdb, e));
        }
        _ => {}
    }
    let aof = dir.join("appendonlydir");
    match std::fs::remove_dir_all(&aof) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TestkitError::file(aof, e)),
        _ => Ok(()),
    }
}

fn is_port_clash(error: &TestkitError) -> bool {
    match error {
        TestkitError::Exited { log_tail, .. } | TestkitError::NotReady { log_tail, .. } => {
            log_tail.contains(PORT_CLASH)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> RespValue {
        let (value, used) = RespValue::parse(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "parsed {value:?} from part of {bytes:?}");
        value
    }

    #[test]
    fn parses_scalars() {
        assert_eq!(parse_all(b"+OK\r\n"), RespValue::Simple("OK".into()));
        assert_eq!(
            parse_all(b"-ERR unknown command\r\n"),
            RespValue::Error("ERR unknown command".into())
        );
        assert_eq!(parse_all(b":-42\r\n"), RespValue::Integer(-42));
        assert_eq!(
            parse_all(b"$5\r\nhe\r\no\r\n"),
            RespValue::Bulk(Some(b"he\r\no".to_vec())),
            "a bulk string may contain CRLF"
        );
        assert_eq!(parse_all(b"$0\r\n\r\n"), RespValue::Bulk(Some(Vec::new())));
    }

    #[test]
    fn parses_nulls() {
        let null_bulk = parse_all(b"$-1\r\n");
        assert_eq!(null_bulk, RespValue::Bulk(None));
        assert!(null_bulk.is_null());
        assert!(parse_all(b"*-1\r\n").is_null());
        assert!(!parse_all(b"*0\r\n").is_null());
    }

    #[test]
    fn parses_nested_arrays() {
        let value = parse_all(b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n*0\r\n");
        assert_eq!(
            value,
            RespValue::Array(Some(vec![
                RespValue::Integer(1),
                RespValue::Array(Some(vec![
                    RespValue::Bulk(Some(b"a".to_vec())),
                    RespValue::Bulk(None),
                ])),
                RespValue::Array(Some(vec![])),
            ]))
        );
    }

    #[test]
    fn every_strict_prefix_is_incomplete_and_trailing_bytes_are_left() {
        let whole: &[u8] = b"*2\r\n$3\r\nfoo\r\n*1\r\n+bar\r\n";
        for cut in 0..whole.len() {
            assert_eq!(
                RespValue::parse(&whole[..cut]),
                Ok(None),
                "prefix of {cut} bytes"
            );
        }
        let mut two = whole.to_vec();
        two.extend_from_slice(b":7\r\n");
        let (_, used) = RespValue::parse(&two).unwrap().unwrap();
        assert_eq!(used, whole.len());
        assert_eq!(
            RespValue::parse(&two[used..]),
            Ok(Some((RespValue::Integer(7), 4)))
        );
    }

    #[test]
    fn rejects_malformed_input() {
        assert!(RespValue::parse(b"?x\r\n").is_err());
        assert!(RespValue::parse(b":12a\r\n").is_err());
        assert!(RespValue::parse(b"$3\r\nabcd\r\n").is_err());
        assert!(RespValue::parse(b"$-2\r\n").is_err());
        assert!(RespValue::parse(b"*-5\r\n").is_err());
    }

    #[test]
    fn helpers_read_values_and_fields_by_name() {
        let reply = parse_all(
            b"*6\r\n$4\r\nname\r\n$8\r\nmymaster\r\n$10\r\nnum-slaves\r\n$1\r\n2\r\n$4\r\nport\r\n:6379\r\n",
        );
        assert_eq!(
            reply.field("name").and_then(RespValue::as_str),
            Some("mymaster")
        );
        assert_eq!(
            reply.field("num-slaves").and_then(RespValue::as_int),
            Some(2)
        );
        assert_eq!(reply.field("port").and_then(RespValue::as_int), Some(6379));
        assert_eq!(reply.field("mymaster"), None, "values are not names");
        assert_eq!(reply.field("flags"), None);
        assert_eq!(
            RespValue::Error("READONLY".into()).as_error(),
            Some("READONLY")
        );
        assert_eq!(RespValue::Simple("OK".into()).as_bytes(), Some(&b"OK"[..]));
        assert_eq!(RespValue::Bulk(None).as_str(), None);
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        assert_eq!(
            encode(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
        // What we send is what a server parses back.
        let value = parse_all(&encode(&["GET", "ключ"]));
        assert_eq!(value.as_array().map(<[_]>::len), Some(2));
        assert_eq!(value.as_array().unwrap()[1].as_str(), Some("ключ"));
    }

    #[test]
    fn info_field_finds_whole_names_only() {
        let info =
            "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nmaster_link_status_x:down\r\n";
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "role"), Some("slave"));
        assert_eq!(info_field(info, "master_link"), None);
    }

    #[test]
    fn server_config_follows_options() {
        let dir = Path::new("/tmp/x");
        let plain = ServerConfig::default().render(7000, dir);
        assert!(plain.contains("port 7000\n") && plain.contains("appendonly no\n"));
        assert!(!plain.contains("replicaof"));
        let replica = ServerConfig {
            persistence: true,
            replica_of: Some("127.0.0.1:7001".parse().unwrap()),
            extra: vec![("maxmemory".into(), "10mb".into())],
        }
        .render(7000, dir);
        assert!(replica.contains("appendonly yes\nappendfsync always\n"));
        assert!(replica.contains("replicaof 127.0.0.1 7001\n"));
        assert!(replica.ends_with("maxmemory 10mb\n"));
    }
}
