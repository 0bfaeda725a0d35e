//! The audit history: one [`FailoverRecord`] per failover run or skipped, saying what really
//! happened.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime};

use ha_core::FencingToken;
use serde::Serialize;

/// Where the failures that asked for a failover were reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TriggerSource {
    /// [`FailoverManager::report_failure`](crate::FailoverManager::report_failure).
    Report,
    /// A `HaEvent::HealthChanged` event on the bus.
    HealthEvent,
}

/// What asked for a failover: the failure threshold crossed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Trigger {
    /// When the threshold was crossed.
    pub at: SystemTime,
    /// What reported the failure that crossed it.
    pub source: TriggerSource,
    /// The failures in a row counted then.
    pub consecutive_failures: u32,
    /// The health event's cause, when it gave one.
    pub cause: Option<String>,
}

/// A step of a failover.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// [`FailoverAction::failover`](crate::FailoverAction::failover).
    Failover,
    /// [`FailoverAction::verify`](crate::FailoverAction::verify).
    Verify,
    /// [`FailoverAction::rollback`](crate::FailoverAction::rollback).
    Rollback,
}

impl Step {
    /// A stable lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Step::Failover => "failover",
            Step::Verify => "verify",
            Step::Rollback => "rollback",
        }
    }
}

/// How a step went wrong.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The action returned an error (its text, with its sources).
    Error(String),
    /// The action said it cannot do this at all.
    Unsupported(String),
    /// The step ran out of time and was cancelled (its future dropped).
    TimedOut(Duration),
    /// The action panicked (the panic's message).
    Panicked(String),
}

/// A step that went wrong, and how.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct StepFailure {
    /// Which step.
    pub step: Step,
    /// How.
    pub kind: FailureKind,
}

impl StepFailure {
    /// Whether the step ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, FailureKind::TimedOut(_))
    }
}

impl fmt::Display for StepFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = self.step.as_str();
        match &self.kind {
            FailureKind::Error(e) => write!(f, "{step} failed: {e}"),
            FailureKind::Unsupported(e) => write!(f, "{step} unsupported: {e}"),
            FailureKind::TimedOut(after) => write!(
                f,
                "{step} timed out after {} and was cancelled",
                humantime::format_duration(*after)
            ),
            FailureKind::Panicked(e) => write!(f, "{step} panicked: {e}"),
        }
    }
}

/// Why a failover that was asked for did not run.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SkipReason {
    /// The leadership gate said this node does not lead. The request waits and is tried
    /// again while the component stays failed (one record per request).
    NotLeader,
    /// The component's cooldown had not ended. The request waits for its end.
    Cooldown,
    /// The waiting queue was full. The request waits outside it and asks again every
    /// `leadership_retry_interval` while the component stays down (one record per request).
    QueueFull,
    /// The manager shut down before the request's turn came.
    Shutdown,
    /// The request waited for this node to lead, and when it did, the component's latest
    /// report was no longer a failure: the outage it was asked for ended or was handled by
    /// the leader of the time. It is dropped instead of acting on a state that has gone; a
    /// new failure streak asks afresh.
    Stale,
}

impl SkipReason {
    /// A stable snake-case name, used as the `reason` metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotLeader => "not_leader",
            SkipReason::Cooldown => "cooldown",
            SkipReason::QueueFull => "queue_full",
            SkipReason::Shutdown => "shutdown",
            SkipReason::Stale => "stale",
        }
    }
}

/// How a failover ended.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The failover and its verification passed.
    Completed,
    /// The failover or its verification failed, and the rollback succeeded.
    RolledBack {
        /// What went wrong first.
        failure: StepFailure,
    },
    /// The failover or its verification failed, and the rollback failed or timed out: the
    /// component may be left half-switched.
    RollbackFailed {
        /// What went wrong first.
        failure: StepFailure,
        /// What went wrong with the rollback.
        rollback: StepFailure,
    },
    /// The failover or its verification failed, and the action cannot undo its effect: it
    /// declares so ([`FailoverAction::can_roll_back`](crate::FailoverAction::can_roll_back)
    /// is `false`, and no rollback was tried) or its rollback answered
    /// [`ActionError::Unsupported`](crate::ActionError::Unsupported). Whatever the failover
    /// changed stays changed.
    Irreversible {
        /// What went wrong first.
        failure: StepFailure,
        /// Why it cannot be undone (an unsupported rollback's answer).
        rollback: StepFailure,
    },
    /// The failover step timed out. Its future was dropped, but that does not stop an effect
    /// already under way elsewhere (an HTTP call already sent, a `pg_promote`, a process the
    /// program started): the change may have happened, or may still happen after this record
    /// was written. Never reported as rolled back.
    EffectUnknown {
        /// The timeout.
        failure: StepFailure,
        /// The rollback tried after it: `None` if it reported success (which cannot cover a
        /// change that lands later), else how it failed or that it is unsupported.
        rollback: Option<StepFailure>,
    },
    /// This node stopped leading under the failover's token before a step, so that step and
    /// everything after it were skipped: a deposed leader neither verifies nor undoes what
    /// the new leader may already be doing.
    StoppedLeading {
        /// The step that was skipped (the first not run).
        skipped: Step,
        /// What went wrong before, if anything (the failure a skipped rollback was for).
        failure: Option<StepFailure>,
    },
    /// The failover did not run.
    Skipped {
        /// Why.
        reason: SkipReason,
    },
}

impl Outcome {
    /// A stable snake-case name: `completed`, `rolled_back`, `rollback_failed`,
    /// `irreversible`, `effect_unknown`, `stopped_leading`, `skipped`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::RolledBack { .. } => "rolled_back",
            Outcome::RollbackFailed { .. } => "rollback_failed",
            Outcome::Irreversible { .. } => "irreversible",
            Outcome::EffectUnknown { .. } => "effect_unknown",
            Outcome::StoppedLeading { .. } => "stopped_leading",
            Outcome::Skipped { .. } => "skipped",
        }
    }

    /// What went wrong first, for a failover that ran and did not complete.
    pub fn failure(&self) -> Option<&StepFailure> {
        match self {
            Outcome::RolledBack { failure }
            | Outcome::RollbackFailed { failure, .. }
            | Outcome::Irreversible { failure, .. }
            | Outcome::EffectUnknown { failure, .. } => Some(failure),
            Outcome::StoppedLeading { failure, .. } => failure.as_ref(),
            Outcome::Completed | Outcome::Skipped { .. } => None,
        }
    }

    /// Whether the failover ran (completed or not), rather than was skipped.
    pub fn ran(&self) -> bool {
        !matches!(self, Outcome::Skipped { .. })
    }

    /// Whether the component may have been switched: everything but a clean rollback, a run
    /// stopped before its failover step, and a skip. The cooldown starts only after these.
    pub fn may_have_changed(&self) -> bool {
        !matches!(
            self,
            Outcome::RolledBack { .. }
                | Outcome::Skipped { .. }
                | Outcome::StoppedLeading {
                    skipped: Step::Failover,
                    ..
                }
        )
    }
}

/// One failover, run or skipped.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct FailoverRecord {
    /// The attempt's number (unique per manager; the action saw it as
    /// [`ActionContext::attempt`](crate::ActionContext::attempt)). Skipped requests have
    /// numbers too.
    pub id: u64,
    /// The component.
    pub component: String,
    /// What asked for it.
    pub trigger: Trigger,
    /// When it started; `None` if it did not run.
    pub started_at: Option<SystemTime>,
    /// When it ended (or was skipped).
    pub ended_at: SystemTime,
    /// How long it ran (monotonic clock), every step included; zero if it did not run.
    pub duration: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// The fencing token it ran under; `None` if it did not run.
    pub token: Option<FencingToken>,
    /// Which try at this outage it was (1 for the first; a failed try is retried while the
    /// component stays down, up to the component's `max_attempts`).
    pub try_number: u32,
    /// Whether this was the last try: it did not complete and no other will follow for this
    /// outage (`max_attempts` reached).
    pub gave_up: bool,
}

impl FailoverRecord {
    /// What went wrong, in words: the first failure and, if any, the rollback's.
    pub fn error(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Completed | Outcome::Skipped { .. } => None,
            Outcome::RolledBack { failure } => Some(format!("{failure}; rolled back")),
            Outcome::RollbackFailed { failure, rollback }
            | Outcome::Irreversible { failure, rollback } => {
                Some(format!("{failure}; not rolled back: {rollback}"))
            }
            Outcome::EffectUnknown { failure, rollback } => Some(match rollback {
                None => format!(
                    "{failure}: effect unknown (it may still land); rollback reported success"
                ),
                Some(rollback) => format!(
                    "{failure}: effect unknown (it may still land); not rolled back: {rollback}"
                ),
            }),
            Outcome::StoppedLeading { skipped, failure } => {
                let skipped = skipped.as_str();
                Some(match failure {
                    None => format!("this node stopped leading; {skipped} skipped"),
                    Some(failure) => {
                        format!("{failure}; this node stopped leading; {skipped} skipped")
                    }
                })
            }
        }
    }
}

/// A ring of the newest records.
#[derive(Debug)]
pub(crate) struct History {
    records: VecDeque<FailoverRecord>,
    capacity: usize,
}

impl History {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            records: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub(crate) fn push(&mut self, record: FailoverRecord) {
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    pub(crate) fn to_vec(&self) -> Vec<FailoverRecord> {
        self.records.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> FailoverRecord {
        FailoverRecord {
            id,
            component: "db".into(),
            trigger: Trigger {
                at: SystemTime::UNIX_EPOCH,
                source: TriggerSource::Report,
                consecutive_failures: 3,
                cause: None,
            },
            started_at: None,
            ended_at: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            outcome: Outcome::Skipped {
                reason: SkipReason::NotLeader,
            },
            token: None,
            try_number: 1,
            gave_up: false,
        }
    }

    #[test]
    fn keeps_the_newest() {
        let mut h = History::new(2);
        for id in 0..5 {
            h.push(record(id));
        }
        let ids: Vec<u64> = h.to_vec().iter().map(|r| r.id).collect();
        assert_eq!(ids, [3, 4]);
    }

    #[test]
    fn errors_read_as_what_happened() {
        let mut r = record(1);
        r.outcome = Outcome::RollbackFailed {
            failure: StepFailure {
                step: Step::Failover,
                kind: FailureKind::TimedOut(Duration::from_secs(30)),
            },
            rollback: StepFailure {
                step: Step::Rollback,
                kind: FailureKind::Unsupported("no rollback command".into()),
            },
        };
        assert_eq!(
            r.error().unwrap(),
            "failover timed out after 30s and was cancelled; not rolled back: rollback \
             unsupported: no rollback command"
        );
        assert!(r.outcome.failure().unwrap().is_timeout());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["outcome"]["outcome"], "rollback_failed");
        assert_eq!(json["outcome"]["rollback"]["kind"]["kind"], "unsupported");
    }
}
