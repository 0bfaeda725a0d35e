//! `ha-node` processes (the orchestrator's binary) on free loopback ports, each with its own
//! config file, and a small blocking HTTP client for their API: for cross-process tests and
//! benchmarks of a whole cluster.
//!
//! The testkit does not build the binary: a caller in the `ha-orchestrator` package passes
//! `env!("CARGO_BIN_EXE_ha-node")`; others find it beside their own executable with
//! [`built_binary`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::{Result, TestkitError};
use crate::process::{ServerProcess, free_port};

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What every node of a cluster shares.
#[derive(Clone, Debug)]
pub struct HaNodeOptions {
    /// The cluster's name.
    pub cluster: String,
    /// Lease time to live.
    pub ttl: Duration,
    /// How often the leader renews.
    pub heartbeat: Duration,
    /// How often followers try.
    pub retry: Duration,
    /// The admin bearer token (at least 16 characters).
    pub admin_token: String,
    /// TOML appended to every node's file (checks, failover, ...); `{node}` becomes the node's
    /// id.
    pub extra_toml: String,
}

impl Default for HaNodeOptions {
    fn default() -> Self {
        Self {
            cluster: "e2e".into(),
            ttl: Duration::from_secs(2),
            heartbeat: Duration::from_millis(500),
            retry: Duration::from_millis(200),
            admin_token: "e2e-admin-token-0123456789".into(),
            extra_toml: String::new(),
        }
    }
}

/// One `ha-node` process with its config file; SIGTERMed (then SIGKILLed) on drop.
#[derive(Debug)]
pub struct HaNodeProcess {
    id: String,
    addr: SocketAddr,
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    process: Option<ServerProcess>,
}

impl HaNodeProcess {
    /// Writes `dir/<id>.toml` (API on a free loopback port, the lease store at `store_url`)
    /// and starts the node; returns once its API answers `GET /health`.
    pub fn start(
        binary: &Path,
        dir: &Path,
        id: &str,
        store_url: &str,
        options: &HaNodeOptions,
    ) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join(format!("{id}.toml"));
        let text = format!(
            "node_id = \"{id}\"\ncluster = \"{cluster}\"\n\n[http]\nlisten = \"{addr}\"\n\
             admin_token = \"{token}\"\n\n[redundancy]\nstore = \"{store_url}\"\nttl = \"{ttl}ms\"\n\
             heartbeat = \"{heartbeat}ms\"\nretry = \"{retry}ms\"\n\n{extra}\n",
            cluster = options.cluster,
            token = options.admin_token,
            ttl = options.ttl.as_millis(),
            heartbeat = options.heartbeat.as_millis(),
            retry = options.retry.as_millis(),
            extra = options.extra_toml.replace("{node}", id),
        );
        std::fs::write(&config, text).map_err(|e| TestkitError::file(&config, e))?;
        let mut node = Self {
            id: id.to_owned(),
            addr,
            binary: binary.to_path_buf(),
            config,
            log: dir.join(format!("{id}.log")),
            process: None,
        };
        node.restart()?;
        Ok(node)
    }

    /// Starts the process again (after [`kill`](Self::kill)) with the same file and port;
    /// returns once its API answers.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut old) = self.process.take() {
            old.stop();
        }
        let mut command = Command::new(&self.binary);
        command.arg("--config").arg(&self.config);
        // The node reads HA_* overrides from its environment: none may leak in from ours.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HA_") {
                command.env_remove(key);
            }
        }
        command.env("RUST_LOG", "info");
        let mut process = ServerProcess::spawn(
            &format!("ha-node {}", self.id),
            self.addr.port(),
            command,
            &self.log,
            Signal::SIGTERM,
        )?;
        let started = Instant::now();
        let timeout = Duration::from_secs(15);
        loop {
            if let Some(status) = process.exit_status() {
                return Err(TestkitError::Exited {
                    server: process.name().to_owned(),
                    port: self.addr.port(),
                    status,
                    log_tail: process.log_tail(30),
                });
            }
            let last = match http(self.addr, "GET", "/health", None) {
                Ok((200, _)) => break,
                Ok((code, body)) => format!("GET /health: {code} {body}"),
                Err(e) => format!("GET /health: {e}"),
            };
            if started.elapsed() >= timeout {
                return Err(TestkitError::NotReady {
                    server: process.name().to_owned(),
                    port: self.addr.port(),
                    waited: started.elapsed(),
                    detail: last,
                    log_tail: process.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.process = Some(process);
        Ok(())
    }

    /// The node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its API URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().and_then(ServerProcess::pid)
    }

    /// Whether it runs (was started and not killed).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log, lines)
    }

    /// SIGKILLs it: a crash, no lease released.
    pub fn kill(&mut self) -> Result<()> {
        match self.process.take() {
            Some(mut process) => process.kill(),
            None => Ok(()),
        }
    }

    /// SIGSTOPs its process group: a hung node (a stalled VM, a long pause) that keeps its
    /// sockets and children.
    pub fn pause(&self) -> Result<()> {
        match &self.process {
            Some(process) => process.pause(),
            None => Ok(()),
        }
    }

    /// SIGCONTs a paused node.
    pub fn resume(&self) -> Result<()> {
        match &self.process {
            Some(process) => process.resume(),
            None => Ok(()),
        }
    }

    /// Stops it gracefully (SIGTERM, SIGKILL after a grace period) and waits until it exited.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Whether it leads now: `GET /leader` answers 200.
    pub fn leads(&self) -> bool {
        self.is_running() && matches!(http(self.addr, "GET", "/leader", None), Ok((200, _)))
    }

    /// `GET path`: the status code and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http(self.addr, "GET", path, None)
            .map_err(|e| TestkitError::io(format!("GET {}{path}", self.url()), e))
    }

    /// `POST path` with the bearer `token`: the status code and the body.
    pub fn post(&self, path: &str, token: Option<&str>) -> Result<(u16, String)> {
        http(self.addr, "POST", path, token)
            .map_err(|e| TestkitError::io(format!("POST {}{path}", self.url()), e))
    }
}

/// A few `ha-node` processes electing their leader on one store; all stopped on drop.
#[derive(Debug)]
pub struct HaNodeCluster {
    nodes: Vec<HaNodeProcess>,
    dir: tempfile::TempDir,
}

impl HaNodeCluster {
    /// Starts one node per id (see [`HaNodeProcess::start`]), each with its own file in a
    /// fresh temporary directory.
    pub fn start(
        binary: &Path,
        store_url: &str,
        ids: &[&str],
        options: &HaNodeOptions,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ha-nodes-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a directory for node configs", e))?;
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            nodes.push(HaNodeProcess::start(
                binary,
                dir.path(),
                id,
                store_url,
                options,
            )?);
        }
        Ok(Self { nodes, dir })
    }

    /// The directory holding the nodes' files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every node, in start order.
    pub fn nodes(&self) -> &[HaNodeProcess] {
        &self.nodes
    }

    /// The node named `id`.
    ///
    /// # Panics
    /// If there is none (a test's mistake).
    pub fn node(&self, id: &str) -> &HaNodeProcess {
        let found = self.nodes.iter().find(|n| n.id == id);
        found.unwrap_or_else(|| panic!("no node {id} in the cluster"))
    }

    /// The node named `id`, to kill or restart.
    ///
    /// # Panics
    /// If there is none.
    pub fn node_mut(&mut self, id: &str) -> &mut HaNodeProcess {
        let found = self.nodes.iter_mut().find(|n| n.id == id);
        found.unwrap_or_else(|| panic!("no node {id} in the cluster"))
    }

    /// The ids of the running nodes whose `GET /leader` answers 200 now.
    pub fn leaders(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.leads())
            .map(|n| n.id.clone())
            .collect()
    }

    /// Polls every running node's `GET /leader` (about every millisecond) until one other
    /// than `except` answers 200; returns its id and when that answer arrived.
    pub fn wait_leader(
        &self,
        except: Option<&str>,
        timeout: Duration,
    ) -> Result<(String, Instant)> {
        let started = Instant::now();
        loop {
            for node in &self.nodes {
                if Some(node.id.as_str()) != except && node.leads() {
                    return Ok((node.id.clone(), Instant::now()));
                }
            }
            if started.elapsed() >= timeout {
                let tails: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {} ---\n{}", n.id, n.log_tail(15)))
                    .collect();
                return Err(TestkitError::NotReady {
                    server: "ha-node cluster".into(),
                    port: 0,
                    waited: started.elapsed(),
                    detail: format!("no node other than {} leads", except.unwrap_or("(none)")),
                    log_tail: tails.join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`): the status code and the
/// body. Enough for the node's API, whose bodies carry a `Content-Length`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let auth = bearer
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n{auth}\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not HTTP: {text:?}"),
        )
    };
    let code = text
        .strip_prefix("HTTP/1.1 ")
        // Python's http.server (Patroni's REST API) answers in HTTP/1.0.
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The binary `name` of this workspace, built into the same profile directory as the running
/// test executable (`target/debug/deps/<test>` → `target/debug/<name>`).
///
/// A test in another package cannot make Cargo build it, and a nested `cargo build` would wait
/// on the lock of the `cargo test` that runs the test; so a missing binary — or one older
/// than a source file Cargo's dep-info (`<name>.d`) lists for it — is an error that says how
/// to build it.
pub fn built_binary(name: &str, build_hint: &str) -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| TestkitError::io("find the test executable", e))?;
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = profile.join(name);
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(|_| TestkitError::MissingBinary {
            binary: name.to_owned(),
            looked_in: profile.display().to_string(),
            install_hint: build_hint.to_owned(),
        })?;
    let dep_info = std::fs::read_to_string(profile.join(format!("{name}.d"))).unwrap_or_default();
    let changed = dep_info_sources(&dep_info).into_iter().find(|source| {
        std::fs::metadata(source)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified > built)
    });
    if let Some(source_file) = changed {
        return Err(TestkitError::StaleBinary {
            binary: path,
            source_file,
            build_hint: build_hint.to_owned(),
        });
    }
    Ok(path)
}

/// The sources of the first rule of a Makefile-style dep-info file (`target: a.rs b\ c.rs`).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let Some(line) = text.lines().next() else {
        return Vec::new();
    };
    let Some((_, sources)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = sources.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ' ' => {
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(PathBuf::from(current));
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = built_binary("ha-no-such-node", "cargo build -p nothing").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ha-no-such-node"), "{text}");
        assert!(text.contains("cargo build -p nothing"), "{text}");
    }

    #[test]
    fn dep_info_lists_the_first_rule_with_escaped_spaces() {
        let text = "/t/debug/ha-node: /w/src/main.rs /w/my\\ dir/lib.rs\n\n/w/src/main.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            [
                PathBuf::from("/w/src/main.rs"),
                PathBuf::from("/w/my dir/lib.rs")
            ]
        );
        assert!(dep_info_sources("").is_empty());
    }

    #[test]
    fn http_reads_status_and_body() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
            request
        });
        let (code, body) = http(addr, "POST", "/x", Some("secret-token")).unwrap();
        assert_eq!((code, body.as_str()), (503, "{}"));
        let request = server.join().unwrap();
        assert!(request.starts_with("POST /x HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("Authorization: Bearer secret-token\r\n"),
            "{request}"
        );
    }
}
