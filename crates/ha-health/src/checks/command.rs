//! [`CommandCheck`]: a program's exit code, Nagios-plugin style.

use std::process::{ExitStatus, Stdio};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::threshold::Outcome;
use crate::{CheckResult, HealthCheck};

/// Bytes of stdout and of stderr kept per run; the rest is read and discarded so the child
/// never blocks on a full pipe.
const OUTPUT_CAP: u64 = 4096;

/// Characters of output shown in a result's detail.
const DETAIL_CAP: usize = 200;

/// Runs a program with arguments (no shell) and judges its exit code: 0 is `Healthy`, the
/// [`degraded_exit_code`](Self::degraded_exit_code) if set is `Degraded`, anything else — a
/// signal, a program that cannot start — is `Unhealthy`.
///
/// The detail holds the exit code and the first non-empty line of output (stdout first when
/// the exit code is 0, stderr first otherwise), cut at 200 characters. Stdin is closed.
///
/// The child is started with `kill_on_drop`: when the scheduler drops a run at its timeout,
/// the child gets SIGKILL. Only the child: grandchildren that it started are not killed, and
/// one that keeps the child's stdout or stderr open keeps the run waiting (until the timeout).
///
/// What the program does is up to it; a health check should give it one that only reads.
///
/// ```no_run
/// use ha_health::HealthCheck;
/// use ha_health::checks::CommandCheck;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // A Nagios plugin: 0 OK, 1 WARNING, 2 CRITICAL.
/// let check = CommandCheck::new("ntp", "/usr/lib/nagios/plugins/check_ntp_time", ["-H", "pool.ntp.org"])
///     .degraded_exit_code(1);
/// println!("{}", check.check().await); // e.g. "healthy: exit code 0: NTP OK: Offset 0.001 secs"
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CommandCheck {
    name: String,
    program: String,
    args: Vec<String>,
    degraded_exit_code: Option<i32>,
}

impl CommandCheck {
    /// A check that runs `program` (looked up in `PATH` unless it is a path) with `args`.
    pub fn new<I, S>(name: impl Into<String>, program: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            name: name.into(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            degraded_exit_code: None,
        }
    }

    /// Makes exit code `code` a `Degraded` result (Nagios plugins use 1 for WARNING).
    /// Setting it to 0 has no effect: 0 is always `Healthy`.
    #[must_use]
    pub fn degraded_exit_code(mut self, code: i32) -> Self {
        self.degraded_exit_code = Some(code);
        self
    }

    fn outcome(&self, status: ExitStatus) -> Outcome {
        match status.code() {
            Some(0) => Outcome::Healthy,
            code if code.is_some() && code == self.degraded_exit_code => Outcome::Degraded,
            _ => Outcome::Unhealthy,
        }
    }
}

/// Reads up to [`OUTPUT_CAP`] bytes of `pipe`, then drains the rest.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut kept = Vec::new();
    if let Some(mut pipe) = pipe {
        // Errors just end the output: the exit code is what counts.
        let _ = (&mut pipe).take(OUTPUT_CAP).read_to_end(&mut kept).await;
        let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
    }
    kept
}

/// The first non-empty line of `first`, else of `second`, cut at [`DETAIL_CAP`] characters.
fn first_line(first: &[u8], second: &[u8]) -> Option<String> {
    [first, second].into_iter().find_map(|bytes| {
        let text = String::from_utf8_lossy(bytes);
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        Some(match line.char_indices().nth(DETAIL_CAP) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line.to_owned(),
        })
    })
}

#[cfg(unix)]
fn signal(status: ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&status)
}

#[cfg(not(unix))]
fn signal(_: ExitStatus) -> Option<i32> {
    None
}

#[async_trait]
impl HealthCheck for CommandCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let spawned = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return CheckResult::unhealthy(format!("cannot run {}: {e}", self.program)),
        };
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (status, out, err) =
            tokio::join!(child.wait(), read_capped(stdout), read_capped(stderr));
        let status = match status {
            Ok(status) => status,
            Err(e) => return CheckResult::unhealthy(format!("waiting for {}: {e}", self.program)),
        };
        let outcome = self.outcome(status);
        let mut detail = match (status.code(), signal(status)) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => format!("ended with {status}"),
        };
        let line = if status.success() {
            first_line(&out, &err)
        } else {
            first_line(&err, &out)
        };
        if let Some(line) = line {
            detail.push_str(": ");
            detail.push_str(&line);
        }
        CheckResult::new(outcome, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_skips_blank_lines_and_is_capped() {
        assert_eq!(
            first_line(b"\n  \nfirst\nsecond", b"other").as_deref(),
            Some("first")
        );
        assert_eq!(
            first_line(b"", b"from stderr\n").as_deref(),
            Some("from stderr")
        );
        assert_eq!(first_line(b"", b" \n"), None);
        let long = "é".repeat(DETAIL_CAP + 10);
        let cut = first_line(long.as_bytes(), b"").unwrap();
        assert_eq!(cut.chars().count(), DETAIL_CAP + 1);
        assert!(cut.ends_with('…'));
    }
}
