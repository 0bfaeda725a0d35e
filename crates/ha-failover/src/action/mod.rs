//! [`FailoverAction`]: what a failover of one component does, undoes and checks — and the
//! built-in actions that do real work.
//!
//! - [`CommandAction`] runs a program (no shell) and checks its exit status;
//! - [`HttpAction`] calls an HTTP endpoint and wants a 2xx answer;
//! - [`RouterSwitch`] swaps the target a [`Router`] hands out from primary to secondary;
//! - [`StepDownAction`] gives up this node's leadership (a forced re-election) through
//!   [`ha_core::StepDown`].
//!
//! An action that cannot do what is asked returns [`ActionError::Unsupported`] (e.g. a
//! command action without a rollback command, or the rollback of a step-down); none reports
//! success for work it did not do.

#[cfg(feature = "command")]
mod command;
#[cfg(feature = "http")]
mod http;
mod router;
mod step_down;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{BoxError, FencingToken, Leadership, LeadershipGate, NodeId};

#[cfg(feature = "command")]
pub use self::command::CommandAction;
#[cfg(feature = "http")]
pub use self::http::{HttpAction, HttpMethod};
pub use self::router::{Router, RouterSwitch, Target};
pub use self::step_down::StepDownAction;

/// What a failover of one component does.
///
/// The manager calls [`failover`](Self::failover), then [`verify`](Self::verify); if either
/// fails or times out, it calls [`rollback`](Self::rollback). Each call runs under the
/// component's timeout, and at the timeout its future is dropped: that is how the manager
/// cancels an action, so an action must leave nothing running behind a dropped future (spawn
/// child processes with `kill_on_drop`, keep no detached tasks).
///
/// To ensure correctness, an implementation must:
/// - return `Ok` from `failover` only once the change is made, and never for work it did not
///   do: return [`ActionError::Unsupported`] for what it cannot do;
/// - pass [`ActionContext::token`] to every system it changes that can fence (reject a token
///   older than one it has seen), so that a deposed leader's late write is refused, and call
///   [`ActionContext::ensure_leader`] between the steps of a long action;
/// - make `rollback` undo what *this attempt's* `failover` did ([`ActionContext::attempt`]
///   tells attempts apart), and succeed without changing anything if that was nothing (the
///   failover failed before its change, or was cancelled first);
/// - make `verify` check the effect (the new primary answers, the route points where it
///   should), not repeat the action.
#[async_trait]
pub trait FailoverAction: Send + Sync + 'static {
    /// Makes the change: promote the standby, switch the route, give up leadership.
    async fn failover(&self, ctx: &ActionContext) -> Result<(), ActionError>;

    /// Undoes what this attempt's [`failover`](Self::failover) changed, after it failed, timed
    /// out, or did not pass [`verify`](Self::verify).
    async fn rollback(&self, ctx: &ActionContext) -> Result<(), ActionError>;

    /// Checks that the failover had its effect. The default checks nothing.
    async fn verify(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        let _ = ctx;
        Ok(())
    }

    /// Whether [`rollback`](Self::rollback) can undo what `failover` does (default `true`).
    /// An action whose effect cannot be undone (leadership given up, a one-way promotion, a
    /// command without a rollback command) says `false`: the manager then never calls
    /// `rollback` and records the failed failover as
    /// [`Outcome::Irreversible`](crate::Outcome::Irreversible), never as rolled back.
    fn can_roll_back(&self) -> bool {
        true
    }

    /// The shortest step timeout this action needs to finish its work (default `None`: no
    /// need stated). [`FailoverManagerBuilder::build`](crate::FailoverManagerBuilder::build)
    /// refuses a component whose `timeout` is shorter, because a step cut off midway is
    /// recorded as "effect unknown", not as done or undone.
    fn required_timeout(&self) -> Option<Duration> {
        None
    }
}

/// What an action knows about the failover it is part of.
#[derive(Clone)]
pub struct ActionContext {
    component: Arc<str>,
    node: NodeId,
    attempt: u64,
    leadership: Leadership,
    gate: Arc<dyn LeadershipGate>,
}

impl ActionContext {
    /// A context for attempt `attempt` at failing over `component`, run by `node` under
    /// `leadership` as `gate` granted it. The manager makes these; build one yourself to run
    /// an action by hand or in a test.
    pub fn new(
        component: impl Into<Arc<str>>,
        node: NodeId,
        attempt: u64,
        leadership: Leadership,
        gate: Arc<dyn LeadershipGate>,
    ) -> Self {
        Self {
            component: component.into(),
            node,
            attempt,
            leadership,
            gate,
        }
    }

    /// The component being failed over.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The node running the failover.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The attempt's number: unique per manager, and the id of its history record.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// The fencing token of the leadership under which the failover started. Pass it to every
    /// write that can be fenced.
    pub fn token(&self) -> FencingToken {
        self.leadership.token
    }

    /// The leadership under which the failover started (its token and local deadline).
    pub fn leadership(&self) -> Leadership {
        self.leadership
    }

    /// The leadership now, as the gate answers at call time (`None`: this node does not lead).
    pub fn current_leadership(&self) -> Option<Leadership> {
        self.gate.is_leader()
    }

    /// `Ok` if this node still leads under the token the failover started with; else
    /// [`ActionError::NotLeader`]. Call it before each step of a long action.
    pub fn ensure_leader(&self) -> Result<(), ActionError> {
        match self.gate.is_leader() {
            Some(now) if now.token == self.leadership.token => Ok(()),
            _ => Err(ActionError::NotLeader {
                node: self.node.clone(),
                token: self.leadership.token,
            }),
        }
    }
}

impl fmt::Debug for ActionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActionContext")
            .field("component", &self.component)
            .field("node", &self.node)
            .field("attempt", &self.attempt)
            .field("token", &self.leadership.token)
            .finish_non_exhaustive()
    }
}

/// Why an action did not do its job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// The action cannot do this at all (e.g. no rollback command was configured, or
    /// leadership given up cannot be taken back). Nothing was changed.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not possible, and why.
        what: String,
    },
    /// This node no longer leads under the token the failover started with; the action
    /// stopped rather than act as a deposed leader.
    #[error("node `{node}` no longer leads with fencing token {token}")]
    NotLeader {
        /// This node.
        node: NodeId,
        /// The token the failover started with.
        token: FencingToken,
    },
    /// The action tried and failed.
    #[error("{message}")]
    Failed {
        /// What failed, e.g. "`pg_ctl promote` exited with status 1: ...".
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl ActionError {
    /// An [`ActionError::Unsupported`].
    pub fn unsupported(what: impl Into<String>) -> Self {
        ActionError::Unsupported { what: what.into() }
    }

    /// An [`ActionError::Failed`] without an underlying error.
    pub fn failed(message: impl Into<String>) -> Self {
        ActionError::Failed {
            message: message.into(),
            source: None,
        }
    }

    /// An [`ActionError::Failed`] caused by `source`.
    pub fn with_source(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        ActionError::Failed {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether the action said it cannot do this at all.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, ActionError::Unsupported { .. })
    }

    /// The error and every source under it, joined with `": "`, for logs and history.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ha_core::AlwaysLeader;
    use tokio::time::Instant;

    use super::*;

    /// A gate whose answer the test sets.
    #[derive(Debug)]
    struct Fixed(std::sync::Mutex<Option<Leadership>>);

    impl LeadershipGate for Fixed {
        fn is_leader(&self) -> Option<Leadership> {
            *self.0.lock().unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ensure_leader_wants_the_same_token() {
        let lead = |t| Leadership {
            token: FencingToken(t),
            valid_until: Instant::now() + Duration::from_secs(10),
        };
        let gate = Arc::new(Fixed(std::sync::Mutex::new(Some(lead(4)))));
        let ctx = ActionContext::new("db", NodeId::new("a"), 1, lead(4), gate.clone());
        assert!(ctx.ensure_leader().is_ok());
        *gate.0.lock().unwrap() = Some(lead(5));
        let err = ctx.ensure_leader().unwrap_err();
        assert_eq!(
            err.to_string(),
            "node `a` no longer leads with fencing token 4"
        );
        *gate.0.lock().unwrap() = None;
        assert!(ctx.ensure_leader().is_err());
        assert_eq!(ctx.current_leadership(), None);
        assert_eq!((ctx.component(), ctx.attempt()), ("db", 1));
        assert_eq!(ctx.token(), FencingToken(4));
        let always = ActionContext::new(
            "db",
            NodeId::new("a"),
            2,
            AlwaysLeader::new(FencingToken(0)).is_leader().unwrap(),
            Arc::new(AlwaysLeader::new(FencingToken(0))),
        );
        assert!(always.ensure_leader().is_ok());
    }

    #[test]
    fn chain_names_every_source() {
        let err = ActionError::with_source("promote failed", std::io::Error::other("refused"));
        assert_eq!(err.chain(), "promote failed: refused");
        assert!(ActionError::unsupported("no rollback").is_unsupported());
        assert_eq!(
            ActionError::unsupported("no rollback").to_string(),
            "unsupported: no rollback"
        );
    }
}
