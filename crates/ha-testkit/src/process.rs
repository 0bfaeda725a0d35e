//! A server child process in its own process group: signals, readiness, cleanup on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::{Result, TestkitError};

/// How long a graceful stop may take before the process group is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running server process.
///
/// The child leads its own process group, so [`pause`](Self::pause), [`kill`](Self::kill) and
/// the stop on drop reach every process the server forked *that stays in that group*.
/// PostgreSQL's children leave it (each calls `setsid()`), so [`crate::PostgresServer`] also
/// signals them one by one.
/// Its stdout and stderr go to a log file whose tail is quoted in start-up errors.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    port: u16,
    child: Option<Child>,
    log_path: PathBuf,
    stop_signal: Signal,
}

impl ServerProcess {
    /// Spawns `command` in a new process group with output appended to `log_path`.
    ///
    /// `stop_signal` is what a graceful stop sends to the group leader (SIGTERM for Redis,
    /// SIGQUIT — immediate shutdown — for PostgreSQL, which then releases its shared memory).
    pub fn spawn(
        name: &str,
        port: u16,
        mut command: Command,
        log_path: &Path,
        stop_signal: Signal,
    ) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| TestkitError::file(log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::file(log_path, e))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let child = command
            .spawn()
            .map_err(|e| TestkitError::io(format!("spawn {name} on port {port}"), e))?;
        tracing::debug!(server = name, port, pid = child.id(), "spawned");
        Ok(Self {
            name: name.to_owned(),
            port,
            child: Some(child),
            log_path: log_path.to_path_buf(),
            stop_signal,
        })
    }

    /// The server's name as used in messages, e.g. `redis-server`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the group leader, if it still runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// The log file the server writes to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// Whether the process has exited; reaps it if so.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status),
            _ => None,
        }
    }

    /// Freezes every process of the server (SIGSTOP to the group): it keeps its sockets open
    /// but answers nothing, like a stalled VM or a long GC pause.
    pub fn pause(&self) -> Result<()> {
        self.signal_group(Signal::SIGSTOP)
    }

    /// Thaws a paused server (SIGCONT to the group).
    pub fn resume(&self) -> Result<()> {
        self.signal_group(Signal::SIGCONT)
    }

    /// SIGKILLs the whole group and reaps the leader: a crash, with no chance to clean up.
    pub fn kill(&mut self) -> Result<()> {
        let result = self.signal_group(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        result
    }

    /// Stops the server gracefully with its stop signal, SIGKILLing the group after a grace
    /// period. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Ok(pid) = i32::try_from(child.id()) else {
            return;
        };
        // A stopped process cannot act on the stop signal.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGCONT);
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), self.stop_signal);
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(server = %self.name, port = self.port, "graceful stop timed out; SIGKILL");
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // Children that outlived the leader (none should) go too.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }

    /// Polls `probe` until it returns `Ok`, the process exits, or `timeout` passes.
    ///
    /// The deadline is on the real clock, so a test that paused tokio's clock still gets a
    /// real wait.
    pub async fn wait_ready<T, F, Fut>(&mut self, timeout: Duration, mut probe: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, String>>,
    {
        let started = Instant::now();
        let mut interval = Duration::from_millis(5);
        loop {
            if let Some(status) = self.exit_status() {
                return Err(TestkitError::Exited {
                    server: self.name.clone(),
                    port: self.port,
                    status,
                    log_tail: self.log_tail(30),
                });
            }
            let last = match probe().await {
                Ok(value) => return Ok(value),
                Err(detail) => detail,
            };
            if started.elapsed() >= timeout {
                return Err(TestkitError::NotReady {
                    server: self.name.clone(),
                    port: self.port,
                    waited: started.elapsed(),
                    detail: last,
                    log_tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(100));
        }
    }

    fn signal_group(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().ok_or_else(|| TestkitError::Signal {
            server: self.name.clone(),
            pid: 0,
            signal: signal.as_str(),
            source: nix::errno::Errno::ESRCH,
        })?;
        killpg(Pid::from_raw(pid), signal).map_err(|source| TestkitError::Signal {
            server: self.name.clone(),
            pid,
            signal: signal.as_str(),
            source,
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a helper command to completion, failing with its output if it exits non-zero.
pub fn run_to_completion(mut command: Command) -> Result<String> {
    let line = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::io(format!("run {line}"), e))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        let tail: Vec<&str> = text.lines().collect();
        Err(TestkitError::CommandFailed {
            command: line,
            status: output.status,
            output: tail[tail.len().saturating_sub(30)..].join("\n"),
        })
    }
}

/// A free TCP port on 127.0.0.1, as the OS hands it out.
///
/// Another process could take it before the server binds it; servers that fail to bind are
/// restarted on a new port by their `start` functions.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| TestkitError::io("bind 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| TestkitError::io("read the free port", e))
}

/// `n` distinct free loopback ports: all are bound at once, then released, so no two are the
/// same (separate [`free_port`] calls may return one port twice). Another process may still
/// take one before the caller binds it; callers retry on "address already in use".
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| {
            std::net::TcpListener::bind(("127.0.0.1", 0))
                .map_err(|e| TestkitError::io("bind 127.0.0.1:0 to find a free port", e))
        })
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| TestkitError::io("read the free port", e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &Path) -> ServerProcess {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 60"]);
        ServerProcess::spawn("sleeper", 1, cmd, &dir.join("log"), Signal::SIGTERM).unwrap()
    }

    #[tokio::test]
    async fn kill_reaps_and_pause_resume_signal_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper(dir.path());
        let pid = p.pid().unwrap();
        p.pause().unwrap();
        wait_for_state(pid, |s| s == "T");
        p.resume().unwrap();
        wait_for_state(pid, |s| s != "T");
        p.kill().unwrap();
        assert!(p.pid().is_none());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    /// Signals are delivered asynchronously: poll the process state with a deadline.
    fn wait_for_state(pid: i32, want: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            if want(state) {
                return;
            }
            assert!(Instant::now() < deadline, "process state stuck: {stat}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[tokio::test]
    async fn exit_during_wait_is_reported_with_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom-marker; exit 3"]);
        let mut p =
            ServerProcess::spawn("failer", 2, cmd, &dir.path().join("log"), Signal::SIGTERM)
                .unwrap();
        let err = p
            .wait_ready(Duration::from_secs(5), || async {
                Err::<(), _>("no".to_owned())
            })
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exited early"), "{text}");
        assert!(text.contains("boom-marker"), "{text}");
    }

    #[tokio::test]
    async fn not_ready_names_server_and_last_probe_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper(dir.path());
        let err = p
            .wait_ready(Duration::from_millis(50), || async {
                Err::<(), _>("still booting".to_owned())
            })
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sleeper") && text.contains("still booting"),
            "{text}"
        );
    }

    #[test]
    fn drop_stops_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = sleeper(dir.path());
        let pid = p.pid().unwrap();
        drop(p);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
