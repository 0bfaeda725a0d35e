//! The agent's watchdog: a small separate process that stops PostgreSQL when the agent dies
//! or hangs while its database may be a writable primary under a lease.
//!
//! # Why a separate process
//!
//! A [`PgAgent`](super::PgAgent) demotes its own primary before its leadership deadline —
//! but only while it runs. If the agent's process (the `ha-node`) is SIGKILLed, crashes or
//! hangs, nothing inside PostgreSQL stops taking commits, and once the lease expires another
//! member promotes its replica: two writable primaries. The watchdog closes that hole. It is
//! a child process that the agent starts in **its own process group**, so a signal to the
//! node's group (a supervisor's SIGKILL of the unit's main process group, a terminal's
//! Ctrl-C) does not reach it, and it holds the read end of a pipe whose write end only the
//! agent has.
//!
//! A process group is not a cgroup: a service manager that kills the whole unit (systemd's
//! default `KillMode=control-group` on a SIGKILL of the unit) kills the watchdog with the
//! node. Run `ha-node` with `KillMode=process` (or `mixed`, whose final SIGKILL comes only
//! after the node's clean stop disarmed and closed the watchdog) so the watchdog outlives a
//! killed node.
//!
//! PostgreSQL as the agent's child with a parent-death signal was not chosen: the agent does
//! not start PostgreSQL (the operator's service manager does), and `PR_SET_PDEATHSIG` needs
//! `unsafe` code between fork and exec, which this workspace forbids.
//!
//! # Protocol (one line per message on the watchdog's stdin)
//!
//! - `arm <ns>` — the database may be a writable primary; the agent's leadership deadline is
//!   `<ns>` nanoseconds of `CLOCK_BOOTTIME`. Sent by the agent's loop before every promotion
//!   or "make writable" step, and by its heartbeat task every `heartbeat` while armed and
//!   leading (the heartbeat only refreshes; it never arms a disarmed watchdog).
//! - `disarm` — the agent saw its database as a replica or demoted it (or the agent is
//!   paused: an operator who pauses owns safety, as in Patroni).
//!
//! The watchdog, while armed, **fences** the database (see below):
//!
//! - at once when its stdin ends (EOF: the agent exited or was killed) — the agent closes
//!   the pipe on a clean stop only after its final demotion, so a clean stop finds the
//!   watchdog disarmed and it just exits;
//! - at `deadline - fence_margin` if no later deadline arrived (the agent hangs, is
//!   SIGSTOPped, or cannot renew and failed to demote).
//!
//! # Why the deadline is on the same footing as the elector's
//!
//! The elector's deadline is `sent + renew_deadline` on the node's monotonic clock, and it
//! also refuses once `renew_deadline` passed on `CLOCK_BOOTTIME`. Monotonic clocks are
//! system-wide on one host, so the agent converts its deadline to `CLOCK_BOOTTIME`
//! (`boottime_now + (valid_until - now)`, read in that order, so the result can only be
//! early) and the watchdog compares it with the same clock; it waits in steps of at most
//! 50 ms, so a suspend (which `CLOCK_BOOTTIME` counts) is noticed as soon as the machine
//! runs again. Another member takes the lease only after the record stayed unchanged for a
//! whole `ttl` on its own clock, and `renew_deadline + drift_margin <= ttl`: a database
//! fenced before `deadline - fence_margin` is down before any other member can lead.
//!
//! # Fencing
//!
//! With `fence_command` (program and arguments, no shell) the watchdog runs it and waits for
//! it to succeed within `fence_timeout`. Otherwise it reads the postmaster's pid from
//! `<data_dir>/postmaster.pid` and sends SIGQUIT (PostgreSQL's immediate shutdown, what
//! `pg_ctl stop -m immediate` sends; every backend exits without acknowledging anything more),
//! then waits until the postmaster is gone, which it is only after all its backends are: the
//! postmaster exits last. No pid file means no running server: nothing to fence. The
//! watchdog must be allowed to signal the postmaster (same user, or root), else configure a
//! `fence_command`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

/// The name of the watchdog binary that [`WatchdogConfig::program`] defaults to (built by
/// `ha-orchestrator` beside `ha-node`).
pub const WATCHDOG_BINARY: &str = "ha-pg-watchdog";

/// The agent's watchdog (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchdogConfig {
    /// Start a watchdog (default false). While enabled, a member whose watchdog is not
    /// running is not eligible to lead.
    pub enabled: bool,
    /// The watchdog program and its leading arguments. Empty (the default):
    /// `ha-pg-watchdog` beside the running executable, else on `PATH`.
    pub program: Vec<String>,
    /// How often a leading agent tells the watchdog its current deadline (default 100 ms).
    /// Must leave room in the elector's renewal slack: `heartbeat + fence_margin` well
    /// under `renew_deadline - renew_interval`.
    #[serde(with = "config::duration")]
    pub heartbeat: Duration,
    /// The watchdog fences this long before the deadline it was last told (default
    /// 300 ms): the time a fence may take. Must be less than the agent's `demote_margin`
    /// (the agent's own demotion goes first).
    #[serde(with = "config::duration")]
    pub fence_margin: Duration,
    /// How long a fence may take before the watchdog reports it failed (default 5 s).
    #[serde(with = "config::duration")]
    pub fence_timeout: Duration,
    /// The data directory (for `postmaster.pid`). Default: what the database answers to
    /// `SHOW data_directory` when the watchdog is started.
    pub data_dir: Option<PathBuf>,
    /// Program and arguments (no shell) that stop PostgreSQL at once, e.g.
    /// `["pg_ctl", "stop", "-m", "immediate", "-D", "/var/lib/postgresql/15/main"]`. Empty
    /// (the default): SIGQUIT to the postmaster.
    pub fence_command: Vec<String>,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            program: Vec::new(),
            heartbeat: Duration::from_millis(100),
            fence_margin: Duration::from_millis(300),
            fence_timeout: Duration::from_secs(5),
            data_dir: None,
            fence_command: Vec::new(),
        }
    }
}

impl Validate for WatchdogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("heartbeat", self.heartbeat)?;
        config::positive("fence_margin", self.fence_margin)?;
        config::positive("fence_timeout", self.fence_timeout)?;
        config::ensure(
            self.program.first().is_none_or(|p| !p.is_empty()),
            "program",
            || "the program must not be empty".into(),
        )?;
        config::ensure(
            self.fence_command.first().is_none_or(|p| !p.is_empty()),
            "fence_command",
            || "the program must not be empty".into(),
        )
    }
}

pub use ha_core::clock::boottime;

/// One message from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// The database may be a writable primary; the leadership deadline on `CLOCK_BOOTTIME`.
    Arm(Duration),
    /// The database is not a writable primary (or the agent is paused).
    Disarm,
}

impl Message {
    /// The line sent for this message (without the newline).
    pub fn line(&self) -> String {
        match self {
            Self::Arm(deadline) => format!("arm {}", deadline.as_nanos()),
            Self::Disarm => "disarm".into(),
        }
    }

    /// Parses one line; `None` if it is not a message.
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let message = match words.next()? {
            "arm" => Self::Arm(Duration::from_nanos(words.next()?.parse().ok()?)),
            "disarm" => Self::Disarm,
            _ => return None,
        };
        words.next().is_none().then_some(message)
    }
}

/// What the watchdog must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing; look again after at most this long.
    Wait(Duration),
    /// Fence the database, then go on disarmed.
    Fence,
    /// Exit without fencing.
    Exit,
}

/// The watchdog's state machine, pure: time comes in as `now` (on `CLOCK_BOOTTIME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogState {
    /// The deadline while armed.
    pub armed: Option<Duration>,
    /// Fence this long before the deadline.
    pub fence_margin: Duration,
}

/// The longest single wait, so a suspend is noticed soon after the machine runs again.
const MAX_WAIT: Duration = Duration::from_millis(50);

impl WatchdogState {
    /// Disarmed, with this margin.
    pub fn new(fence_margin: Duration) -> Self {
        Self {
            armed: None,
            fence_margin,
        }
    }

    /// Applies a message.
    pub fn apply(&mut self, message: Message) {
        self.armed = match message {
            Message::Arm(deadline) => Some(deadline),
            Message::Disarm => None,
        };
    }

    /// What to do at `now`.
    pub fn decide(&self, now: Duration) -> Decision {
        match self.armed {
            None => Decision::Wait(MAX_WAIT),
            Some(deadline) => {
                let fence_at = deadline.saturating_sub(self.fence_margin);
                if now >= fence_at {
                    Decision::Fence
                } else {
                    Decision::Wait((fence_at - now).min(MAX_WAIT))
                }
            }
        }
    }

    /// What to do when the agent is gone (stdin ended).
    pub fn on_agent_gone(&self) -> Decision {
        if self.armed.is_some() {
            Decision::Fence
        } else {
            Decision::Exit
        }
    }

    /// After a fence: disarmed (the database is down; a later `arm` starts over).
    pub fn fenced(&mut self) {
        self.armed = None;
    }
}

/// How the watchdog process was told to fence.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    data_dir: Option<PathBuf>,
    fence_margin: Duration,
    fence_timeout: Duration,
    fence_command: Vec<String>,
}

/// The arguments the agent passes: `--data-dir D --fence-margin-ms M --fence-timeout-ms T
/// [-- fence command…]`.
pub(crate) fn command_args(config: &WatchdogConfig, data_dir: Option<&Path>) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(dir) = data_dir {
        args.push("--data-dir".to_owned());
        args.push(dir.display().to_string());
    }
    args.push("--fence-margin-ms".to_owned());
    args.push(config.fence_margin.as_millis().to_string());
    args.push("--fence-timeout-ms".to_owned());
    args.push(config.fence_timeout.as_millis().to_string());
    if !config.fence_command.is_empty() {
        args.push("--".to_owned());
        args.extend(config.fence_command.iter().cloned());
    }
    args
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        data_dir: None,
        fence_margin: WatchdogConfig::default().fence_margin,
        fence_timeout: WatchdogConfig::default().fence_timeout,
        fence_command: Vec::new(),
    };
    let mut args = args.into_iter();
    let millis = |flag: &str, value: Option<String>| -> Result<Duration, String> {
        value
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .ok_or_else(|| format!("{flag} needs a whole number of milliseconds"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--data-dir" => {
                parsed.data_dir = Some(args.next().ok_or("--data-dir needs a path")?.into());
            }
            "--fence-margin-ms" => parsed.fence_margin = millis(&arg, args.next())?,
            "--fence-timeout-ms" => parsed.fence_timeout = millis(&arg, args.next())?,
            "--" => {
                parsed.fence_command = args.by_ref().collect();
                break;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if parsed.data_dir.is_none() && parsed.fence_command.is_empty() {
        return Err("needs --data-dir or a fence command after --".into());
    }
    Ok(parsed)
}

/// The watchdog process's `main`: `ha-pg-watchdog --data-dir D [--fence-margin-ms M]
/// [--fence-timeout-ms T] [-- fence command…]`, messages on stdin (see the
/// [module docs](self)). Logs one line per event on stderr.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{WATCHDOG_BINARY}: {e}");
            return ExitCode::from(2);
        }
    };
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) => {
                    if tx.send(Some(line)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut state = WatchdogState::new(args.fence_margin);
    let log = |what: &str| eprintln!("{WATCHDOG_BINARY} [{}]: {what}", std::process::id());
    log("started");
    loop {
        let Some(now) = boottime() else {
            // No clock to judge the deadline: fence what may be a primary and stop.
            if state.armed.is_some() {
                fence_and_log(&args, "CLOCK_BOOTTIME unreadable", &log);
            }
            return ExitCode::from(1);
        };
        let wait = match state.decide(now) {
            Decision::Wait(wait) => wait,
            Decision::Fence => {
                fence_and_log(&args, "the agent's deadline passed", &log);
                state.fenced();
                continue;
            }
            Decision::Exit => return ExitCode::SUCCESS,
        };
        match rx.recv_timeout(wait) {
            Ok(Some(line)) => match Message::parse(&line) {
                Some(message) => state.apply(message),
                None => log(&format!("ignored {line:?}")),
            },
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if state.on_agent_gone() == Decision::Fence {
                    fence_and_log(&args, "the agent is gone while armed", &log);
                } else {
                    log("the agent is gone; disarmed: exiting");
                }
                return ExitCode::SUCCESS;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn fence_and_log(args: &Args, why: &str, log: &dyn Fn(&str)) {
    log(&format!("fencing PostgreSQL: {why}"));
    let started = std::time::Instant::now();
    match fence(args) {
        Ok(what) => log(&format!("fenced ({what}) in {:?}", started.elapsed())),
        Err(e) => log(&format!("FENCE FAILED after {:?}: {e}", started.elapsed())),
    }
}

fn fence(args: &Args) -> Result<String, String> {
    let deadline = std::time::Instant::now() + args.fence_timeout;
    if let Some((program, rest)) = args.fence_command.split_first() {
        let mut child = std::process::Command::new(program)
            .args(rest)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return if status.success() {
                    Ok(format!("{program} succeeded"))
                } else {
                    Err(format!("{program} exited with {status}"))
                };
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} took longer than {:?}",
                    args.fence_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let Some(dir) = &args.data_dir else {
        return Err("no data directory and no fence command".into());
    };
    let pid_file = dir.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok("no postmaster.pid: not running".into());
        }
        Err(e) => return Err(format!("cannot read {}: {e}", pid_file.display())),
    };
    let pid: i32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("{}: no pid on its first line", pid_file.display()))?;
    signal(pid, Some(nix::sys::signal::Signal::SIGQUIT))
        .map_err(|e| format!("SIGQUIT to the postmaster {pid}: {e}"))?;
    loop {
        if !alive(pid) {
            return Ok(format!("SIGQUIT to the postmaster {pid}; it exited"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "the postmaster {pid} still runs {:?} after SIGQUIT",
                args.fence_timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn signal(pid: i32, signal: Option<nix::sys::signal::Signal>) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
}

/// Whether `pid` runs: it exists and is not a zombie (a postmaster whose parent has not
/// reaped it yet has exited, with all its backends).
fn alive(pid: i32) -> bool {
    if signal(pid, None) == Err(nix::errno::Errno::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S …`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| !matches!(state, "Z" | "X")),
        Err(_) => signal(pid, None).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        for m in [Message::Arm(Duration::new(12, 345)), Message::Disarm] {
            assert_eq!(Message::parse(&m.line()), Some(m));
        }
        assert_eq!(Message::parse("arm"), None);
        assert_eq!(Message::parse("arm x"), None);
        assert_eq!(Message::parse("arm 1 2"), None);
        assert_eq!(Message::parse("fence"), None);
    }

    #[test]
    fn armed_fences_before_the_deadline_and_on_agent_death() {
        let mut s = WatchdogState::new(ms(300));
        assert_eq!(s.on_agent_gone(), Decision::Exit);
        assert!(matches!(s.decide(ms(10_000)), Decision::Wait(_)));
        s.apply(Message::Arm(ms(1000)));
        assert_eq!(s.decide(ms(600)), Decision::Wait(ms(50)));
        assert_eq!(s.decide(ms(690)), Decision::Wait(ms(10)));
        assert_eq!(s.decide(ms(700)), Decision::Fence);
        assert_eq!(s.on_agent_gone(), Decision::Fence);
        // A renewal moves the deadline; a disarm ends the watch.
        s.apply(Message::Arm(ms(2000)));
        assert!(matches!(s.decide(ms(700)), Decision::Wait(_)));
        s.apply(Message::Disarm);
        assert!(matches!(s.decide(ms(5000)), Decision::Wait(_)));
        assert_eq!(s.on_agent_gone(), Decision::Exit);
        s.apply(Message::Arm(ms(1)));
        assert_eq!(s.decide(ms(0)), Decision::Fence);
        s.fenced();
        assert_eq!(s.on_agent_gone(), Decision::Exit);
    }

    #[test]
    fn arguments_round_trip() {
        let config = WatchdogConfig {
            fence_command: vec!["pg_ctl".into(), "stop".into(), "--".into()],
            fence_margin: ms(250),
            ..WatchdogConfig::default()
        };
        let args = parse_args(command_args(&config, Some(Path::new("/d")))).unwrap();
        assert_eq!(args.data_dir.as_deref(), Some(Path::new("/d")));
        assert_eq!(args.fence_margin, ms(250));
        assert_eq!(args.fence_command, config.fence_command);
        assert!(parse_args(Vec::new()).is_err());
        assert!(parse_args(vec!["--bogus".to_owned()]).is_err());
    }

    #[test]
    fn config_rules_name_the_field() {
        WatchdogConfig::default().validate().unwrap();
        let c = WatchdogConfig {
            fence_command: vec![String::new()],
            ..WatchdogConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "fence_command");
    }
}
