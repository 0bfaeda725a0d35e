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

impl ComponentContext {
    /// A context for `node` that publishes on `bus` and asks `leadership` before leader-only
    /// work, with a fresh shutdown token.
    ///
    /// This is how a component runs on its own, outside an `ha-orchestrator` node: the node
    /// builds one context and hands a clone to every component it starts.
    pub fn new(node: NodeId, bus: EventBus, leadership: Arc<dyn LeadershipGate>) -> Self {
        Self {
            node,
            bus,
            leadership,
            shutdown: CancellationToken::new(),
        }
    }

    /// A context for a single node that always leads (token 0) on a new default bus: the
    /// shortest way to run one component alone.
    pub fn standalone(node: impl Into<NodeId>) -> Self {
        Self::new(
            node.into(),
            EventBus::default(),
            Arc::new(crate::leadership::AlwaysLeader::default()),
        )
    }

    /// The same context with another leadership gate (e.g. the node's elector).
    #[must_use]
    pub fn with_leadership(mut self, leadership: Arc<dyn LeadershipGate>) -> Self {
        self.leadership = leadership;
        self
    }

    /// The same context publishing on another bus.
    #[must_use]
    pub fn with_bus(mut self, bus: EventBus) -> Self {
        self.bus = bus;
        self
    }
}

/// The error a component returns when [`Component::start`] is called on a component that
/// already runs.
pub fn already_started(component: &str) -> Error {
    Error::Component {
        component: component.to_owned(),
        action: "start",
        source: "already started".into(),
        retryable: false,
    }
}

/// The background tasks of a started component and the token that stops them: the one way a
/// component implements "start once" and "stop, then wait for the tasks to end".
///
/// ```
/// use ha_core::component::{ComponentContext, ComponentTasks};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ha_core::Error> {
/// let tasks = ComponentTasks::default();
/// let ctx = ComponentContext::standalone("n1");
/// let stop = tasks.begin("ticker", &ctx)?;
/// tasks.spawn(async move { stop.cancelled().await });
/// assert!(tasks.begin("ticker", &ctx).is_err(), "a second start is refused");
/// tasks.stop().await; // cancels and waits
/// assert!(!tasks.is_running());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct ComponentTasks {
    running: std::sync::Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl ComponentTasks {
    /// Marks the component started and returns the token its tasks select on: a child of
    /// `ctx.shutdown`, so the node's shutdown and [`stop`](Self::stop) both end them.
    /// [`already_started`] if it runs already.
    pub fn begin(
        &self,
        component: &str,
        ctx: &ComponentContext,
    ) -> Result<CancellationToken, Error> {
        let mut running = crate::sync::lock(&self.running);
        if running.is_some() {
            return Err(already_started(component));
        }
        let stop = ctx.shutdown.child_token();
        *running = Some(Running {
            stop: stop.clone(),
            handles: Vec::new(),
        });
        Ok(stop)
    }

    /// Spawns `task` on the current runtime as one of this component's tasks. A task spawned
    /// while the component is not running is cancelled at once: it is aborted.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        match crate::sync::lock(&self.running).as_mut() {
            Some(running) => running.handles.push(handle),
            None => handle.abort(),
        }
    }

    /// Whether [`begin`](Self::begin) was called and [`stop`](Self::stop) was not.
    pub fn is_running(&self) -> bool {
        crate::sync::lock(&self.running).is_some()
    }

    /// Cancels the tasks' token without waiting (for `Drop` impls): the tasks end on their
    /// own; [`stop`](Self::stop) still waits for them.
    pub fn cancel(&self) {
        if let Some(running) = crate::sync::lock(&self.running).as_ref() {
            running.stop.cancel();
        }
    }

    /// Cancels the tasks' token and waits for every task to end. Idempotent.
    pub async fn stop(&self) {
        let running = crate::sync::lock(&self.running).take();
        if let Some(running) = running {
            running.stop.cancel();
            for handle in running.handles {
                // A task that panicked has ended too; its panic was already reported.
                let _ = handle.await;
            }
        }
    }
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
