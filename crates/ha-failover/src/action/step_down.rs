//! [`StepDownAction`]: a forced re-election, through [`ha_core::StepDown`].

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use ha_core::StepDown;

use super::{ActionContext, ActionError, FailoverAction};

/// Gives up this node's leadership so that another node is elected — e.g. for a component
/// that is this node itself, when it is unhealthy but still holds the lease.
///
/// - `failover`: [`StepDown::step_down`] (ha-election's `Elector` implements it). Fails if this
///   node did not lead.
/// - `verify`: the gate no longer grants the leadership the failover started under (it says
///   this node does not lead, or leads in a newer term).
/// - `rollback`: [`ActionError::Unsupported`]: leadership given up cannot be taken back; the
///   election decides who leads next.
///
/// Stepping down ends this node's leadership, so the manager starts no further failover on
/// it until it leads again.
pub struct StepDownAction {
    target: Arc<dyn StepDown>,
}

impl StepDownAction {
    /// The action over `target` (usually the node's elector).
    pub fn new(target: Arc<dyn StepDown>) -> Self {
        Self { target }
    }
}

impl fmt::Debug for StepDownAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDownAction")
            .field("target", &self.target)
            .finish()
    }
}

#[async_trait]
impl FailoverAction for StepDownAction {
    async fn failover(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        self.target.step_down().await.map_err(|e| {
            ActionError::with_source(format!("node `{}` could not step down", ctx.node()), e)
        })
    }

    async fn rollback(&self, _ctx: &ActionContext) -> Result<(), ActionError> {
        Err(ActionError::unsupported(
            "leadership given up cannot be taken back; the election decides the next leader",
        ))
    }

    /// Leadership given up cannot be taken back.
    fn can_roll_back(&self) -> bool {
        false
    }

    async fn verify(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        match ctx.current_leadership() {
            Some(now) if now.token == ctx.token() => Err(ActionError::failed(format!(
                "node `{}` still leads with fencing token {} after stepping down",
                ctx.node(),
                now.token
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use ha_core::{FencingToken, Leadership, LeadershipGate, NodeId};
    use tokio::time::Instant;

    use super::*;

    /// An elector stand-in: leads until it steps down.
    #[derive(Debug)]
    struct Node(Mutex<Option<Leadership>>);

    impl LeadershipGate for Node {
        fn is_leader(&self) -> Option<Leadership> {
            *self.0.lock().unwrap()
        }
    }

    #[async_trait]
    impl StepDown for Node {
        async fn step_down(&self) -> Result<(), ha_core::Error> {
            match self.0.lock().unwrap().take() {
                Some(_) => Ok(()),
                None => Err(ha_core::Error::NotLeader {
                    node: NodeId::new("a"),
                    operation: "step down".into(),
                }),
            }
        }
    }

    #[tokio::test]
    async fn steps_down_verifies_and_cannot_roll_back() {
        let lead = Leadership {
            token: FencingToken(3),
            valid_until: Instant::now() + Duration::from_secs(60),
        };
        let node = Arc::new(Node(Mutex::new(Some(lead))));
        let ctx = ActionContext::new("self", NodeId::new("a"), 1, lead, node.clone());
        let action = StepDownAction::new(node.clone());
        assert!(action.verify(&ctx).await.is_err(), "still leading");
        action.failover(&ctx).await.unwrap();
        assert_eq!(node.is_leader(), None);
        action.verify(&ctx).await.unwrap();
        assert!(action.rollback(&ctx).await.unwrap_err().is_unsupported());
        let again = action.failover(&ctx).await.unwrap_err();
        assert_eq!(
            again.chain(),
            "node `a` could not step down: step down refused: node `a` is not the leader"
        );
    }
}
