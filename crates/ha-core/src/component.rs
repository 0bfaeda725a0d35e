//! `Component`: what the orchestrator starts in dependency order and stops in reverse.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::bus::EventBus;
use crate::error::Error;
use crate::id::NodeId;
use crate::leadership::LeadershipGate;
use crate::status::Status;

/// What a component gets when it starts: who it runs as, where to report, whom to ask about
/// leadership, and when to stop.
#[derive(Clone, Debug)]
pub struct ComponentContext {
    /// This node.
    pub node: NodeId,
    /// Where to publish [`crate::HaEvent`]s.
    pub bus: EventBus,
    /// Whether this node leads (for leader-only work).
    pub leadership: Arc<dyn LeadershipGate>,
    /// Cancelled when the node shuts down; background tasks should select on it.
    pub shutdown: CancellationToken,
}

/// A long-running part of an HA service (elector, health checker, failover manager, …).
///
/// To ensure correctness:
/// - `start` returns once the component runs (it spawns its own tasks); it must not block
///   until shutdown;
/// - `stop` is idempotent and returns once the component's tasks have ended;
/// - `status` is cheap and never blocks (it reads state kept up to date by the tasks).
#[async_trait]
pub trait Component: Send + Sync {
    /// A stable name, unique within one service.
    fn name(&self) -> &str;

    /// Starts the component's work.
    async fn start(&self, ctx: ComponentContext) -> Result<(), Error>;

    /// Stops the component's work and waits for its tasks to end.
    async fn stop(&self) -> Result<(), Error>;

    /// The component's own view of its health.
    fn status(&self) -> Status;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::time::SystemTime;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::event::HaEvent;
    use crate::id::FencingToken;
    use crate::leadership::AlwaysLeader;

    /// Reports healthy once started, publishes one event, and ends its task on stop.
    #[derive(Default)]
    struct Ticker {
        status: AtomicU8,
        task: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    }

    #[async_trait]
    impl Component for Ticker {
        fn name(&self) -> &str {
            "ticker"
        }

        async fn start(&self, ctx: ComponentContext) -> Result<(), Error> {
            let stop = ctx.shutdown.child_token();
            let token = stop.clone();
            let handle = tokio::spawn(async move {
                let lead = ctx.leadership.is_leader().map(|l| l.token);
                ctx.bus.publish(HaEvent::FailoverStarted {
                    at: SystemTime::now(),
                    node: ctx.node.clone(),
                    component: "ticker".into(),
                    token: lead,
                });
                token.cancelled().await;
            });
            *self.task.lock().unwrap() = Some((stop, handle));
            self.status.store(1, Ordering::SeqCst);
            Ok(())
        }

        async fn stop(&self) -> Result<(), Error> {
            let task = self.task.lock().unwrap().take();
            if let Some((stop, handle)) = task {
                stop.cancel();
                handle.await.map_err(|e| Error::Component {
                    component: "ticker".into(),
                    action: "stop",
                    source: Box::new(e),
                    retryable: false,
                })?;
            }
            self.status.store(0, Ordering::SeqCst);
            Ok(())
        }

        fn status(&self) -> Status {
            if self.status.load(Ordering::SeqCst) == 1 {
                Status::Healthy
            } else {
                Status::Unknown
            }
        }
    }

    #[tokio::test]
    async fn a_dyn_component_starts_reports_and_stops() {
        let bus = EventBus::new(8);
        let mut events = bus.subscribe();
        let component: Arc<dyn Component> = Arc::new(Ticker::default());
        assert_eq!(component.status(), Status::Unknown);
        let ctx = ComponentContext {
            node: NodeId::new("n1"),
            bus,
            leadership: Arc::new(AlwaysLeader::new(FencingToken(3))),
            shutdown: CancellationToken::new(),
        };
        component.start(ctx).await.unwrap();
        assert_eq!(component.status(), Status::Healthy);
        match events.recv().await.unwrap() {
            HaEvent::FailoverStarted { token, node, .. } => {
                assert_eq!(token, Some(FencingToken(3)));
                assert_eq!(node.as_str(), "n1");
            }
            other => panic!("unexpected {other:?}"),
        }
        component.stop().await.unwrap();
        component.stop().await.unwrap();
        assert_eq!(component.status(), Status::Unknown);
    }
}
