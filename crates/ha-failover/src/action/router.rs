//! [`Router`]: a primary and a secondary target that application code reads on every request,
//! and [`RouterSwitch`], the action that moves it from one to the other.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use async_trait::async_trait;

use super::{ActionContext, ActionError, FailoverAction};

/// Which of a router's two targets.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Target {
    /// The target in use while all is well.
    Primary,
    /// The standby, in use after a failover.
    Secondary,
}

impl Target {
    /// A stable lower-case name, for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Secondary => "secondary",
        }
    }

    /// The other target.
    pub const fn other(self) -> Target {
        match self {
            Target::Primary => Target::Secondary,
            Target::Secondary => Target::Primary,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Two targets (addresses, connection pools, clients…) and which one is in use. Cheap to
/// clone: clones share the choice.
///
/// Readers call [`current`](Self::current) (an `Arc` clone) or [`with`](Self::with) (no
/// reference count touched) on every request: both are lock-free ([`arc_swap::ArcSwap`]), so
/// a switch never blocks a reader and a reader never sees a half-made switch.
///
/// ```
/// use ha_failover::{Router, Target};
///
/// let router = Router::new("10.0.0.1:6379".to_owned(), "10.0.0.2:6379".to_owned());
/// assert_eq!(*router.current(), "10.0.0.1:6379");
/// assert!(router.switch(Target::Primary, Target::Secondary));
/// assert_eq!(router.with(|addr| addr.clone()), "10.0.0.2:6379");
/// assert_eq!(router.active(), Target::Secondary);
/// ```
pub struct Router<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    current: ArcSwap<T>,
    primary: Arc<T>,
    secondary: Arc<T>,
}

impl<T> Router<T> {
    /// A router using `primary`.
    pub fn new(primary: T, secondary: T) -> Self {
        let primary = Arc::new(primary);
        Self {
            inner: Arc::new(Inner {
                current: ArcSwap::new(Arc::clone(&primary)),
                primary,
                secondary: Arc::new(secondary),
            }),
        }
    }

    /// The target in use.
    pub fn current(&self) -> Arc<T> {
        self.inner.current.load_full()
    }

    /// Calls `f` with the target in use, without touching its reference count.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.inner.current.load())
    }

    /// Which target is in use.
    pub fn active(&self) -> Target {
        if Arc::ptr_eq(&self.inner.current.load(), &self.inner.primary) {
            Target::Primary
        } else {
            Target::Secondary
        }
    }

    /// One of the two targets, in use or not.
    pub fn target(&self, which: Target) -> &Arc<T> {
        match which {
            Target::Primary => &self.inner.primary,
            Target::Secondary => &self.inner.secondary,
        }
    }

    /// Moves to `to` if `from` is in use now (compare-and-swap); returns whether it moved.
    /// `from == to` moves nothing and says whether that target is in use.
    pub fn switch(&self, from: Target, to: Target) -> bool {
        let expected = self.target(from);
        let previous = self
            .inner
            .current
            .compare_and_swap(expected, Arc::clone(self.target(to)));
        Arc::ptr_eq(&previous, expected)
    }
}

impl<T> Clone for Router<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Router<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("active", &self.active())
            .field("current", &*self.current())
            .finish()
    }
}

/// The action that moves a [`Router`] from its primary to its secondary.
///
/// - `failover`: checks that this node still leads ([`ActionContext::ensure_leader`]), then
///   switches primary → secondary. Fails if the router already uses its secondary: there is
///   no standby left to switch to, and switching back to a primary that was failed away from
///   is not a failover.
/// - `verify`: the router uses its secondary.
/// - `rollback`: if this attempt made the switch, switches back to the primary — unless
///   something else has moved the router since, which it reports as a failure rather than
///   overwrite. If this attempt switched nothing, there is nothing to undo.
pub struct RouterSwitch<T> {
    router: Router<T>,
    /// The attempt whose failover made the switch that is still in place.
    switched_by: Mutex<Option<u64>>,
}

impl<T> RouterSwitch<T> {
    /// The action over `router` (a clone of the handle the application reads).
    pub fn new(router: Router<T>) -> Self {
        Self {
            router,
            switched_by: Mutex::new(None),
        }
    }

    /// The router.
    pub fn router(&self) -> &Router<T> {
        &self.router
    }

    fn switched_by(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        // Only an `Option<u64>` is behind it; a panic elsewhere cannot leave it half-written.
        self.switched_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> fmt::Debug for RouterSwitch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterSwitch")
            .field("active", &self.router.active())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<T: Send + Sync + 'static> FailoverAction for RouterSwitch<T> {
    async fn failover(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        ctx.ensure_leader()?;
        let mut switched_by = self.switched_by();
        if self.router.switch(Target::Primary, Target::Secondary) {
            *switched_by = Some(ctx.attempt());
            tracing::info!(
                component = ctx.component(),
                "router switched to the secondary"
            );
            Ok(())
        } else {
            Err(ActionError::failed(format!(
                "the router of `{}` already uses its secondary: no standby left to switch to",
                ctx.component()
            )))
        }
    }

    async fn rollback(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        let mut switched_by = self.switched_by();
        if *switched_by != Some(ctx.attempt()) {
            // This attempt changed nothing.
            return Ok(());
        }
        if self.router.switch(Target::Secondary, Target::Primary) {
            *switched_by = None;
            tracing::info!(
                component = ctx.component(),
                "router switched back to the primary"
            );
            Ok(())
        } else {
            Err(ActionError::failed(format!(
                "the router of `{}` was moved by someone else since this failover; not \
                 switching it back",
                ctx.component()
            )))
        }
    }

    async fn verify(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        match self.router.active() {
            Target::Secondary => Ok(()),
            other => Err(ActionError::failed(format!(
                "the router of `{}` uses its {other} after the switch",
                ctx.component()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use ha_core::{AlwaysLeader, FencingToken, LeadershipGate, NodeId};

    use super::*;

    fn ctx(attempt: u64) -> ActionContext {
        let gate = Arc::new(AlwaysLeader::new(FencingToken(1)));
        ActionContext::new(
            "cache",
            NodeId::new("a"),
            attempt,
            gate.is_leader().unwrap(),
            gate,
        )
    }

    #[tokio::test]
    async fn switches_verifies_and_rolls_back_only_its_own_switch() {
        let router = Router::new(1, 2);
        let action = RouterSwitch::new(router.clone());
        action.failover(&ctx(1)).await.unwrap();
        action.verify(&ctx(1)).await.unwrap();
        assert_eq!((*router.current(), router.active()), (2, Target::Secondary));

        // A second failover has nowhere to go, and its rollback must not undo the first.
        let err = action.failover(&ctx(2)).await.unwrap_err();
        assert!(
            err.to_string().contains("already uses its secondary"),
            "{err}"
        );
        action.rollback(&ctx(2)).await.unwrap();
        assert_eq!(*router.current(), 2);

        action.rollback(&ctx(1)).await.unwrap();
        assert_eq!((*router.current(), router.active()), (1, Target::Primary));
        assert!(action.verify(&ctx(1)).await.is_err());
    }

    #[tokio::test]
    async fn rollback_does_not_overwrite_someone_elses_switch() {
        let router = Router::new("a", "b");
        let action = RouterSwitch::new(router.clone());
        action.failover(&ctx(1)).await.unwrap();
        assert!(router.switch(Target::Secondary, Target::Primary));
        assert!(action.rollback(&ctx(1)).await.is_err());
        assert_eq!(router.active(), Target::Primary);
        assert!(!router.switch(Target::Secondary, Target::Primary));
        assert!(router.switch(Target::Primary, Target::Primary));
        assert_eq!(Target::Primary.other(), Target::Secondary);
    }
}
