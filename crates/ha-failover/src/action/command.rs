//! [`CommandAction`]: runs a program, without a shell, and wants exit status 0.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{ActionContext, ActionError, FailoverAction};

/// How much of a failed command's standard error is kept for the error message: the last
/// bytes, which usually say what went wrong.
const STDERR_TAIL: usize = 2048;

/// How long standard error is still read after the program exited.
const STDERR_GRACE: Duration = Duration::from_millis(100);

/// One program and its arguments.
#[derive(Clone, Debug)]
struct Program {
    program: OsString,
    args: Vec<OsString>,
}

impl Program {
    fn new<A: Into<OsString>>(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// `prog arg1 arg2`, for messages.
    fn display(&self) -> String {
        let mut text = self.program.to_string_lossy().into_owned();
        for arg in &self.args {
            text.push(' ');
            text.push_str(&arg.to_string_lossy());
        }
        text
    }
}

/// Runs a program for the failover, and optionally others for the rollback and the
/// verification.
///
/// The program is started directly (no shell: arguments are passed as they are, nothing is
/// expanded), with standard input and output closed, and these environment variables added:
/// `HA_COMPONENT`, `HA_NODE`, `HA_FENCING_TOKEN`, `HA_ATTEMPT`, and `HA_STEP` (`failover`,
/// `rollback` or `verify`). Exit status 0 is success; anything else — another status, death
/// by a signal, a program that cannot be started — is a failure whose message ends with the
/// last 2 KiB of the program's standard error.
///
/// On Unix each program runs in a process group of its own, and when its future is dropped
/// before it exited — the manager's timeout cancels the step — the whole group is killed
/// (`SIGKILL`): the program and every process it started that stayed in its group. A process
/// that moved to another group or session (a daemon that calls `setsid`) is out of reach;
/// one started by a program that *exited* is left alone (`pg_ctl start` may leave a server
/// running on purpose). Elsewhere only the program itself is killed.
///
/// [`can_roll_back`](FailoverAction::can_roll_back) is `false` without a rollback command.
/// [`with_required_timeout`](Self::with_required_timeout) states the step timeout the
/// programs need, which the manager's builder checks against the component's.
///
/// Without a rollback program, `rollback` returns [`ActionError::Unsupported`]; without a
/// verify program, `verify` checks nothing.
///
/// ```no_run
/// use ha_failover::CommandAction;
///
/// let promote = CommandAction::new("pg_ctl", ["promote", "-D", "/var/lib/postgresql/15/main"])
///     .rollback_command("/usr/local/bin/demote-replica", ["--wait"])
///     .verify_command("psql", ["-tAc", "select not pg_is_in_recovery()"]);
/// # drop(promote);
/// ```
#[derive(Clone, Debug)]
pub struct CommandAction {
    failover: Program,
    rollback: Option<Program>,
    verify: Option<Program>,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    required_timeout: Option<Duration>,
}

impl CommandAction {
    /// Runs `program` with `args` for the failover.
    pub fn new<A: Into<OsString>>(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        Self {
            failover: Program::new(program, args),
            rollback: None,
            verify: None,
            env: Vec::new(),
            current_dir: None,
            required_timeout: None,
        }
    }

    /// Runs `program` with `args` for the rollback.
    #[must_use]
    pub fn rollback_command<A: Into<OsString>>(
        mut self,
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        self.rollback = Some(Program::new(program, args));
        self
    }

    /// Runs `program` with `args` to verify the failover.
    #[must_use]
    pub fn verify_command<A: Into<OsString>>(
        mut self,
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        self.verify = Some(Program::new(program, args));
        self
    }

    /// Sets an environment variable for every program.
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs every program in `dir`.
    #[must_use]
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// States the step timeout the programs need (a slow promotion); the manager's builder
    /// refuses a component timeout shorter than this.
    #[must_use]
    pub fn with_required_timeout(mut self, timeout: Duration) -> Self {
        self.required_timeout = Some(timeout);
        self
    }

    async fn run(
        &self,
        program: &Program,
        step: &'static str,
        ctx: &ActionContext,
    ) -> Result<(), ActionError> {
        let mut command = Command::new(&program.program);
        command
            .args(&program.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HA_COMPONENT", ctx.component())
            .env("HA_NODE", ctx.node().as_str())
            .env("HA_FENCING_TOKEN", ctx.token().to_string())
            .env("HA_ATTEMPT", ctx.attempt().to_string())
            .env("HA_STEP", step)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        #[cfg(unix)]
        command.process_group(0);
        let mut child = command.spawn().map_err(|e| {
            ActionError::with_source(format!("could not start `{}`", program.display()), e)
        })?;
        // Until the program is reaped its pid is not reused, so its group id names its group.
        #[cfg(unix)]
        let mut group = GroupKill(child.id());
        let mut tail = Vec::new();
        let status = match child.stderr.take() {
            Some(stderr) => {
                let reading = read_tail(stderr, &mut tail);
                tokio::pin!(reading);
                let mut read_all = false;
                let status = tokio::select! {
                    status = child.wait() => status,
                    () = &mut reading => {
                        read_all = true;
                        child.wait().await
                    }
                };
                if !read_all {
                    // A process the program started may hold its standard error open: the
                    // exit status decides, not the end of that stream.
                    let _ = tokio::time::timeout(STDERR_GRACE, reading).await;
                }
                status
            }
            None => child.wait().await,
        }
        .map_err(|e| {
            ActionError::with_source(format!("could not wait for `{}`", program.display()), e)
        })?;
        // It exited: what it left running was meant to run.
        #[cfg(unix)]
        group.disarm();
        check(status, program, &tail)
    }
}

/// Kills a process group when dropped, unless disarmed: the cancellation of a program that
/// has not exited.
#[cfg(unix)]
struct GroupKill(Option<u32>);

#[cfg(unix)]
impl GroupKill {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

#[cfg(unix)]
impl Drop for GroupKill {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        if let Some(pgid) = self.0.and_then(|id| i32::try_from(id).ok()) {
            // ESRCH: the group is gone already; nothing else can be done in a drop.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Reads `from` to its end, keeping the last [`STDERR_TAIL`] bytes in `tail`. A read error
/// ends the reading: the tail is only for the message.
async fn read_tail(mut from: impl AsyncRead + Unpin, tail: &mut Vec<u8>) {
    let mut buf = [0u8; 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
    }
}

fn check(status: ExitStatus, program: &Program, tail: &[u8]) -> Result<(), ActionError> {
    if status.success() {
        return Ok(());
    }
    let tail = &tail[tail.len().saturating_sub(STDERR_TAIL)..];
    let stderr = String::from_utf8_lossy(tail);
    let stderr = stderr.trim();
    let mut message = format!("`{}` exited with {status}", program.display());
    if !stderr.is_empty() {
        message.push_str(": ");
        message.push_str(stderr);
    }
    Err(ActionError::failed(message))
}

#[async_trait]
impl FailoverAction for CommandAction {
    async fn failover(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        self.run(&self.failover, "failover", ctx).await
    }

    async fn rollback(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        match &self.rollback {
            Some(program) => self.run(program, "rollback", ctx).await,
            None => Err(ActionError::unsupported(format!(
                "no rollback command was configured for `{}`",
                self.failover.display()
            ))),
        }
    }

    async fn verify(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        match &self.verify {
            Some(program) => self.run(program, "verify", ctx).await,
            None => Ok(()),
        }
    }

    fn can_roll_back(&self) -> bool {
        self.rollback.is_some()
    }

    fn required_timeout(&self) -> Option<Duration> {
        self.required_timeout
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ha_core::{AlwaysLeader, FencingToken, LeadershipGate, NodeId};

    use super::*;

    fn ctx() -> ActionContext {
        let gate = Arc::new(AlwaysLeader::new(FencingToken(42)));
        ActionContext::new("db", NodeId::new("n1"), 7, gate.is_leader().unwrap(), gate)
    }

    #[tokio::test]
    async fn exit_status_decides_and_the_context_is_in_the_environment() {
        let dir = std::env::temp_dir().join(format!("ha-failover-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("env");
        let script = format!(
            "echo \"$HA_COMPONENT $HA_NODE $HA_FENCING_TOKEN $HA_ATTEMPT $HA_STEP $EXTRA\" > {}",
            out.display()
        );
        let action = CommandAction::new("sh", ["-c", script.as_str()])
            .env("EXTRA", "x")
            .verify_command("sh", ["-c", "echo 'not promoted' >&2; exit 3"]);
        action.failover(&ctx()).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "db n1 42 7 failover x"
        );
        let err = action.verify(&ctx()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "`sh -c echo 'not promoted' >&2; exit 3` exited with exit status: 3: not promoted"
        );
        let err = action.rollback(&ctx()).await.unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_program_is_a_failure_with_its_cause() {
        let err = CommandAction::new("/nonexistent/ha-promote", Vec::<String>::new())
            .failover(&ctx())
            .await
            .unwrap_err();
        assert!(
            err.chain()
                .starts_with("could not start `/nonexistent/ha-promote`: "),
            "{}",
            err.chain()
        );
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_child() {
        let dir = std::env::temp_dir().join(format!("ha-failover-kill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("pid");
        let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
        let action = CommandAction::new("sh", ["-c", script.as_str()]);
        let ctx = ctx();
        let run = tokio::time::timeout(Duration::from_millis(300), action.failover(&ctx)).await;
        assert!(run.is_err(), "sleep 30 cannot finish in 300 ms");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
        // Killed and reaped (tokio reaps orphaned children in the background).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while proc_dir.exists()
            && !std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| s.contains(") Z "))
        {
            assert!(tokio::time::Instant::now() < deadline, "child still alive");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whether `pid` is gone (or a zombie: dead, waiting for its reaper).
    fn gone(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = std::env::temp_dir().join(format!("ha-failover-pgrp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pids = dir.join("pids");
        // The shell starts a grandchild and waits for it; the grandchild's pid is written
        // once it runs.
        let script = format!("sleep 30 & echo \"$$ $!\" > {}; wait", pids.display());
        let action = CommandAction::new("sh", ["-c", script.as_str()])
            .with_required_timeout(Duration::from_secs(60));
        assert_eq!(action.required_timeout(), Some(Duration::from_secs(60)));
        assert!(!action.can_roll_back(), "no rollback command");
        let ctx = ctx();
        // Boxed, so that dropping it drops the future itself.
        let mut run = Box::pin(action.failover(&ctx));
        // Run it until the grandchild is there, then cancel it by dropping its future.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&pids).map_or(true, |p| p.split_whitespace().count() < 2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the script never ran"
            );
            let _ = tokio::time::timeout(Duration::from_millis(10), &mut run).await;
        }
        let text = std::fs::read_to_string(&pids).unwrap();
        let (shell, grandchild) = text.trim().split_once(' ').unwrap();
        assert!(
            !gone(shell) && !gone(grandchild),
            "both run before the cancellation"
        );
        drop(run);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(gone(shell) && gone(grandchild)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still alive: shell {} grandchild {}",
                !gone(shell),
                !gone(grandchild)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
