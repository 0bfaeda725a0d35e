//! Start and stop order, graceful shutdown and start failures, on paused time.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use common::ok_check;
use ha_core::{Component, ComponentContext, Status};
use ha_election::{ElectorConfig, LeaseStore, MemoryLeaseStore, Role};
use ha_failover::{ComponentConfig, Router, RouterSwitch};
use ha_health::CheckConfig;
use ha_orchestrator::{Error, HaNode, Phase};

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, line: impl Into<String>) {
    log.lock().expect("log").push(line.into());
}

fn lines(log: &Log) -> Vec<String> {
    log.lock().expect("log").clone()
}

/// A component of the application's own that writes down what it sees when it starts and
/// stops.
struct Probe {
    name: String,
    log: Log,
    node: Arc<OnceLock<HaNode>>,
    store: Option<Arc<MemoryLeaseStore>>,
    fail_start: bool,
    hang_on_stop: bool,
}

impl Probe {
    fn new(name: &str, log: &Log, node: &Arc<OnceLock<HaNode>>) -> Self {
        Self {
            name: name.to_owned(),
            log: Arc::clone(log),
            node: Arc::clone(node),
            store: None,
            fail_start: false,
            hang_on_stop: false,
        }
    }

    fn node(&self) -> &HaNode {
        self.node.get().expect("the node is set before start")
    }
}

#[async_trait]
impl Component for Probe {
    fn name(&self) -> &str {
        &self.name
    }

    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let node = self.node();
        push(&self.log, format!("start {}", self.name));
        assert_eq!(node.phase(), Phase::Starting, "{}", self.name);
        assert_eq!(ctx.node.as_str(), node.node_id().as_str());
        // Everything built in started before the application's components.
        if let Some(elector) = node.elector() {
            assert_eq!(elector.status(), Status::Healthy, "the elector runs");
            // The elector campaigns already: this node wins the empty store.
            let won = tokio::time::timeout(Duration::from_secs(5), async {
                while ctx.leadership.is_leader().is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            assert!(
                won.is_ok(),
                "the elector campaigned before {} started",
                self.name
            );
        }
        if let Some(health) = node.health() {
            assert!(
                !health.report().node.is_empty(),
                "the health checker started"
            );
        }
        if let Some(failover) = node.failover() {
            assert_eq!(
                failover.status(),
                Status::Healthy,
                "the failover manager runs"
            );
        }
        if self.fail_start {
            return Err(ha_core::Error::Component {
                component: self.name.clone(),
                action: "start",
                source: "refused on purpose".into(),
                retryable: false,
            });
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), ha_core::Error> {
        let node = self.node();
        push(
            &self.log,
            format!(
                "stop {} phase={:?} ready={} leader={}",
                self.name,
                node.phase(),
                node.is_ready(),
                node.is_leader().is_some()
            ),
        );
        if let Some(elector) = node.elector() {
            assert_eq!(*elector.subscribe().borrow(), Role::Follower);
        }
        if let Some(store) = &self.store {
            let lease = store
                .read("orders/leader", Duration::from_secs(1))
                .await
                .expect("read the lease");
            assert!(
                lease.as_ref().is_none_or(|l| l.released),
                "the lease is released (a tombstone) before {} stops: {lease:?}",
                self.name
            );
        }
        if let Some(failover) = node.failover() {
            // Reverse order: the failover manager stops after the application's components.
            assert_eq!(failover.status(), Status::Healthy, "failover still runs");
        }
        if self.hang_on_stop {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn status(&self) -> Status {
        Status::Healthy
    }
}

fn elected() -> ElectorConfig {
    ElectorConfig::with_ttl(
        "ignored",
        Duration::from_secs(2),
        Duration::from_millis(200),
    )
}

#[tokio::test(start_paused = true)]
async fn components_start_in_order_and_stop_in_reverse_after_leadership_is_released() {
    let log: Log = Arc::default();
    let slot = Arc::new(OnceLock::new());
    let store = Arc::new(MemoryLeaseStore::new());
    let mut first = Probe::new("first", &log, &slot);
    first.store = Some(Arc::clone(&store));
    let second = Probe::new("second", &log, &slot);
    let node = HaNode::builder()
        .node_id("a")
        .cluster("orders")
        .election_with(store.clone(), elected())
        .check(ok_check("api"), CheckConfig::default())
        .failover(
            "api",
            RouterSwitch::new(Router::new(1, 2)),
            ComponentConfig::default(),
        )
        .component(Arc::new(first))
        .component(Arc::new(second))
        .build()
        .expect("build");
    slot.set(node.clone()).expect("set once");

    node.start().await.expect("start");
    assert_eq!(node.phase(), Phase::Running);
    assert!(node.is_live());
    assert!(node.is_leader().is_some());
    assert_eq!(lines(&log), ["start first", "start second"]);

    let err = node.start().await.expect_err("a node starts once");
    assert!(matches!(err, Error::Lifecycle(_)), "{err:?}");
    assert_eq!(
        node.phase(),
        Phase::Running,
        "a refused start changes nothing"
    );

    let mut phases = node.watch_phase();
    let watcher = tokio::spawn(async move {
        phases
            .wait_for(|p| *p == Phase::Stopping)
            .await
            .map(|p| *p)
            .expect("phase")
    });
    node.shutdown().await;
    assert_eq!(watcher.await.expect("watcher"), Phase::Stopping);
    assert_eq!(node.phase(), Phase::Stopped);
    assert_eq!(
        lines(&log),
        [
            "start first",
            "start second",
            "stop second phase=Stopping ready=false leader=false",
            "stop first phase=Stopping ready=false leader=false",
        ]
    );
    assert!(!node.is_live());
    assert!(!node.is_ready());
    assert_eq!(node.elector().expect("elector").status(), Status::Unknown);
    assert_eq!(node.failover().expect("failover").status(), Status::Unknown);

    node.shutdown().await; // idempotent
    assert_eq!(
        lines(&log).len(),
        4,
        "a second shutdown stops nothing again"
    );
    let err = node
        .start()
        .await
        .expect_err("a stopped node does not start again");
    assert!(matches!(err, Error::Lifecycle(_)), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_follower_takes_over_when_the_leader_shuts_down() {
    let store = Arc::new(MemoryLeaseStore::new());
    let build = |id: &str| {
        HaNode::builder()
            .node_id(id)
            .cluster("orders")
            .election_with(store.clone(), elected())
            .build()
            .expect("build")
    };
    let (a, b) = (build("a"), build("b"));
    a.start().await.expect("start a");
    common::eventually("a leads", Duration::from_secs(5), || async {
        a.is_leader().map(|_| ())
    })
    .await;
    b.start().await.expect("start b");
    let before = tokio::time::Instant::now();
    a.shutdown().await;
    let lead = common::eventually("b leads", Duration::from_secs(5), || async {
        b.is_leader()
    })
    .await;
    // Released, not expired: b takes over well inside the 2 s ttl.
    assert!(
        before.elapsed() < Duration::from_secs(1),
        "{:?}",
        before.elapsed()
    );
    assert!(lead.token.get() > 0);
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_stops_what_had_started_and_returns_the_error() {
    let log: Log = Arc::default();
    let slot = Arc::new(OnceLock::new());
    let store = Arc::new(MemoryLeaseStore::new());
    let mut broken = Probe::new("broken", &log, &slot);
    broken.fail_start = true;
    let node = HaNode::builder()
        .node_id("a")
        .cluster("orders")
        .election_with(store.clone(), elected())
        .check(ok_check("api"), CheckConfig::default())
        .component(Arc::new(Probe::new("first", &log, &slot)))
        .component(Arc::new(broken))
        .component(Arc::new(Probe::new("never", &log, &slot)))
        .build()
        .expect("build");
    slot.set(node.clone()).expect("set once");

    let err = node
        .start()
        .await
        .expect_err("the broken component fails the start");
    assert!(matches!(err, Error::Component(_)), "{err:?}");
    assert!(err.to_string().contains("refused on purpose"), "{err}");
    assert_eq!(node.phase(), Phase::Stopped);
    let log = lines(&log);
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[..2], ["start first", "start broken"]);
    assert!(log[2].starts_with("stop first"), "{log:?}");
    assert!(!log.iter().any(|l| l.contains("never")), "{log:?}");
    assert!(node.is_leader().is_none(), "leadership is given up");
    assert_eq!(node.elector().expect("elector").status(), Status::Unknown);
    let lease = store
        .read("orders/leader", Duration::from_secs(1))
        .await
        .expect("read");
    assert!(
        lease.as_ref().is_none_or(|l| l.released),
        "the lease is released (a tombstone): {lease:?}"
    );
    assert!(
        node.start().await.is_err(),
        "a failed node does not start again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_start_fails_when_the_api_address_is_taken() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = taken.local_addr().expect("addr");
    let node = HaNode::builder()
        .node_id("a")
        .http(addr)
        .build()
        .expect("build");
    let err = node.start().await.expect_err("the port is taken");
    assert!(matches!(err, Error::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert_eq!(node.phase(), Phase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_hung_component_does_not_hold_the_shutdown_past_its_timeout() {
    let log: Log = Arc::default();
    let slot = Arc::new(OnceLock::new());
    let mut hung = Probe::new("hung", &log, &slot);
    hung.hang_on_stop = true;
    let node = HaNode::builder()
        .node_id("a")
        .single_node()
        .shutdown_timeout(Duration::from_secs(3))
        .component(Arc::new(hung))
        .build()
        .expect("build");
    slot.set(node.clone()).expect("set once");
    node.start().await.expect("start");
    let began = tokio::time::Instant::now();
    node.shutdown().await;
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "shutdown took {took:?}"
    );
    assert_eq!(node.phase(), Phase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_single_node_leads_with_token_zero_until_it_shuts_down() {
    let log: Log = Arc::default();
    let slot = Arc::new(OnceLock::new());
    let node = HaNode::builder()
        .node_id("solo")
        .single_node()
        .component(Arc::new(Probe::new("app", &log, &slot)))
        .build()
        .expect("build");
    slot.set(node.clone()).expect("set once");
    let lead = node.is_leader().expect("a single node always leads");
    assert_eq!(lead.token.get(), 0);
    assert!(node.step_down().await.is_err(), "no election to hand over");
    node.start().await.expect("start");
    assert!(node.is_ready());
    assert!(node.leadership().is_leader().is_some());
    node.shutdown().await;
    // Like an elected node, it stops leading before its components stop.
    assert_eq!(
        lines(&log),
        [
            "start app",
            "stop app phase=Stopping ready=false leader=false"
        ]
    );
    assert!(node.is_leader().is_none());
}
