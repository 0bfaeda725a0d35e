//! The HTTP API of real nodes, called with reqwest.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::{TOKEN, client, eventually, fast, ok_check, switch_check};
use ha_core::{Criticality, HaEvent};
use ha_election::{ElectorConfig, MemoryLeaseStore};
use ha_failover::{ComponentConfig, Router, RouterSwitch};
use ha_health::{CheckConfig, CheckResult, FnCheck};
use ha_orchestrator::{HaNode, HaNodeBuilder, NodeStatus};
use ha_replication::{FileReplicator, FileSync, FileSyncConfig};
use reqwest::StatusCode;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn elected(store: &Arc<MemoryLeaseStore>, id: &str) -> HaNodeBuilder {
    HaNode::builder()
        .node_id(id)
        .cluster("orders")
        .election_with(
            store.clone(),
            ElectorConfig::with_ttl(
                "ignored",
                Duration::from_secs(2),
                Duration::from_millis(200),
            ),
        )
        .http(loopback())
        .admin_token(TOKEN)
}

fn url(node: &HaNode, path: &str) -> String {
    format!(
        "http://{}{path}",
        node.http_addr().expect("the API listens")
    )
}

async fn get(node: &HaNode, path: &str) -> (StatusCode, String) {
    let response = client().get(url(node, path)).send().await.expect("GET");
    let code = response.status();
    (code, response.text().await.expect("body"))
}

async fn get_json(node: &HaNode, path: &str) -> (StatusCode, Value) {
    let (code, body) = get(node, path).await;
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

async fn post(node: &HaNode, path: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut request = client().post(url(node, path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST");
    let code = response.status();
    (code, response.text().await.expect("body"))
}

/// Starts `nodes` in order and waits until the first leads and every one sees every other as
/// a live member.
async fn start_cluster(nodes: &[&HaNode]) {
    nodes[0].start().await.expect("start");
    eventually("the first node leads", WAIT, || async {
        nodes[0].is_leader().map(|_| ())
    })
    .await;
    for node in &nodes[1..] {
        node.start().await.expect("start");
    }
    for node in nodes {
        eventually("every member is known", WAIT, || async {
            (node.members().await.len() == nodes.len()).then_some(())
        })
        .await;
    }
}

/// The node that leads now, if exactly one does.
fn leader_of<'a>(nodes: &[&'a HaNode]) -> Option<&'a HaNode> {
    let leading: Vec<_> = nodes.iter().filter(|n| n.is_leader().is_some()).collect();
    (leading.len() == 1).then(|| *leading[0])
}

#[tokio::test]
async fn health_is_liveness_and_ready_waits_for_the_first_result() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let check = FnCheck::new("api", move || {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            CheckResult::healthy("ok")
        }
    });
    let node = HaNode::builder()
        .node_id("a")
        .single_node()
        .check(
            check,
            CheckConfig::default()
                .interval(Duration::from_secs(60))
                .timeout(Duration::from_secs(60)),
        )
        .http(loopback())
        .admin_token(TOKEN)
        .build()
        .expect("build");
    node.start().await.expect("start");

    let (code, body) = get_json(&node, "/health").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["live"], true);
    let (code, body) = get_json(&node, "/ready").await;
    assert_eq!(
        code,
        StatusCode::SERVICE_UNAVAILABLE,
        "no result yet: {body}"
    );
    assert_eq!(body["ready"], false);

    open.send_replace(true);
    eventually("ready after the first result", WAIT, || async {
        (get(&node, "/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn ready_follows_the_critical_checks() {
    let critical = Arc::new(AtomicBool::new(true));
    let minor = Arc::new(AtomicBool::new(false));
    let node = HaNode::builder()
        .node_id("a")
        .single_node()
        .check(switch_check("db", &critical), fast())
        .check(
            switch_check("cache", &minor),
            fast().criticality(Criticality::Low),
        )
        .http(loopback())
        .build()
        .expect("build");
    node.start().await.expect("start");
    let ready = |want: StatusCode| {
        let node = node.clone();
        async move {
            eventually(&format!("/ready {want}"), WAIT, || async {
                (get(&node, "/ready").await.0 == want).then_some(())
            })
            .await;
        }
    };
    ready(StatusCode::OK).await; // a low check down does not matter
    critical.store(false, Ordering::SeqCst);
    ready(StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(!node.is_ready());
    critical.store(true, Ordering::SeqCst);
    ready(StatusCode::OK).await;
    node.shutdown().await;
}

#[tokio::test]
async fn leader_answers_200_only_on_the_leader() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elected(&store, "a").build().expect("build");
    let b = elected(&store, "b").build().expect("build");
    start_cluster(&[&a, &b]).await;

    let (code, body) = get_json(&a, "/leader").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["leader"], "a");
    assert!(body["token"].as_u64().expect("token") > 0);
    let seen = eventually("b sees a lead", WAIT, || async {
        let (code, body) = get_json(&b, "/leader").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        (body["leader"] == "a").then_some(body)
    })
    .await;
    assert_eq!(seen["token"], body["token"]);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn status_has_its_shape_and_deserializes() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elected(&store, "a")
        .check(ok_check("api"), fast())
        .member_meta("zone", "eu-1")
        .build()
        .expect("build");
    let b = elected(&store, "b").build().expect("build");
    start_cluster(&[&a, &b]).await;
    eventually("a check result", WAIT, || async {
        a.is_ready().then_some(())
    })
    .await;

    let (code, body) = get_json(&a, "/status").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["node"], "a");
    assert_eq!(body["cluster"], "orders");
    assert_eq!(body["phase"], "running");
    assert_eq!(body["ready"], true);
    assert_eq!(body["paused"], false);
    assert_eq!(body["role"], "leader");
    assert!(body["token"].as_u64().expect("token") > 0);
    assert_eq!(body["leader"]["node"], "a");
    assert_eq!(body["leader"]["token"], body["token"]);
    let members = body["members"].as_array().expect("members");
    assert_eq!(members.len(), 2, "{members:?}");
    for member in members {
        let id = member["node"].as_str().expect("node");
        let node = if id == "a" { &a } else { &b };
        assert_eq!(
            member["api"],
            format!("http://{}", node.http_addr().expect("addr"))
        );
        assert_eq!(
            member["role"],
            if id == "a" { "leader" } else { "follower" }
        );
    }
    let a_member = members.iter().find(|m| m["node"] == "a").expect("a");
    assert_eq!(a_member["meta"]["zone"], "eu-1");
    assert_eq!(body["level"]["level"], "basic");
    assert_eq!(body["level"]["summary"], "basic");
    assert!(body["level"]["target_percent"].is_number());
    let checks = body["health"]["checks"].as_array().expect("checks");
    assert_eq!(checks[0]["name"], "api");
    assert_eq!(checks[0]["status"], "healthy");
    assert!(body["kpis"].is_object());
    assert!(
        body["kpis"]["health_check_success_rate"]
            .as_f64()
            .expect("rate")
            > 0.0
    );
    assert!(
        body["recent_events"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    );

    let status: NodeStatus = serde_json::from_value(body).expect("a NodeStatus");
    assert_eq!(status.node, "a");
    assert_eq!(status.role, "leader");
    assert_eq!(status.members.len(), 2);

    let (_, follower) = get_json(&b, "/status").await;
    assert_eq!(follower["role"], "follower");
    assert_eq!(follower["token"], Value::Null);
    assert_eq!(follower["health"], Value::Null);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_single_node_reports_itself_as_leader() {
    let node = HaNode::builder()
        .node_id("solo")
        .single_node()
        .http(loopback())
        .build()
        .expect("build");
    node.start().await.expect("start");
    let (code, body) = get_json(&node, "/leader").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["leader"], "solo");
    let (_, status) = get_json(&node, "/status").await;
    assert_eq!(status["role"], "single");
    assert_eq!(status["leader"]["node"], "solo");
    assert_eq!(status["members"], serde_json::json!([]));
    let (code, body) = post(&node, "/switchover", None).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn metrics_are_served_only_with_a_renderer() {
    let without = HaNode::builder()
        .node_id("a")
        .http(loopback())
        .build()
        .expect("build");
    without.start().await.expect("start");
    assert_eq!(get(&without, "/metrics").await.0, StatusCode::NOT_FOUND);
    without.shutdown().await;

    let with = HaNode::builder()
        .node_id("a")
        .http(loopback())
        .metrics(|| "x 1\n".into())
        .build()
        .expect("build");
    with.start().await.expect("start");
    let (code, body) = get(&with, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, "x 1\n");
    with.shutdown().await;
}

#[tokio::test]
async fn admin_routes_refuse_a_missing_or_wrong_token_and_change_nothing() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elected(&store, "a").build().expect("build");
    let b = elected(&store, "b").build().expect("build");
    start_cluster(&[&a, &b]).await;
    let term = a.is_leader().expect("a leads").token;

    let routes = [
        "/pause",
        "/resume",
        "/switchover",
        "/switchover?to=b",
        "/backup",
        "/backup?source=db",
        "/hold?ms=60000",
        "/hold",
    ];
    let wrong = [
        None,
        Some("wrong-token-of-16+chars"),
        Some(""),
        Some("a-token-of-16+char"),
    ];
    for route in routes {
        for token in wrong {
            for node in [&a, &b] {
                let (code, body) = post(node, route, token).await;
                assert_eq!(
                    code,
                    StatusCode::UNAUTHORIZED,
                    "POST {route} with {token:?}: {body}"
                );
                assert!(!body.contains(TOKEN), "{body}");
            }
        }
    }
    // A token in another scheme is no bearer token either.
    let response = client()
        .post(url(&a, "/pause"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    assert!(!a.is_paused() && !b.is_paused());
    assert_eq!(
        a.is_leader().map(|l| l.token),
        Some(term),
        "a still leads, same term"
    );
    assert!(b.is_leader().is_none());

    // With the token, pause works, and an unauthorised resume does not undo it.
    let (code, body) = post(&a, "/pause", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(a.is_paused());
    assert_eq!(post(&a, "/resume", None).await.0, StatusCode::UNAUTHORIZED);
    assert!(a.is_paused());
    assert_eq!(post(&a, "/resume", Some(TOKEN)).await.0, StatusCode::OK);
    assert!(!a.is_paused());

    // b was never held off: when a leaves, b takes over.
    a.shutdown().await;
    eventually("b leads", WAIT, || async { b.is_leader().map(|_| ()) }).await;
    b.shutdown().await;
}

/// A node at the standard level: checks, failover over a router, and a file sync.
fn standard(id: &str, source: &std::path::Path, target: &std::path::Path) -> HaNodeBuilder {
    let replicator =
        FileReplicator::local(source, target, FileSyncConfig::default()).expect("replicator");
    let sync = FileSync::new(replicator, Duration::from_millis(200)).expect("file sync");
    HaNode::builder()
        .node_id(id)
        .single_node()
        .check(ok_check("api"), fast())
        .failover(
            "api",
            RouterSwitch::new(Router::new("primary", "secondary")),
            ComponentConfig::default(),
        )
        .file_sync(sync)
        .http(loopback())
        .admin_token(TOKEN)
}

#[tokio::test]
async fn pause_shows_in_status_and_lowers_the_level() {
    let source = tempfile::tempdir().expect("tempdir");
    let target = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("app.toml"), "x = 1\n").expect("write");
    let node = standard("a", source.path(), target.path())
        .build()
        .expect("build");
    node.start().await.expect("start");
    eventually("level standard", WAIT, || async {
        let (_, body) = get_json(&node, "/status").await;
        (body["level"]["level"] == "standard").then_some(())
    })
    .await;

    let (code, body) = post(&node, "/pause", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(node.is_paused());
    let (_, status) = get_json(&node, "/status").await;
    assert_eq!(status["paused"], true);
    assert_eq!(status["failover"]["paused"], true);
    assert_eq!(status["level"]["level"], "basic");
    let reasons = status["level"]["reasons"].as_array().expect("reasons");
    assert!(
        reasons.contains(&Value::from("automatic failover is paused")),
        "{reasons:?}"
    );
    assert_eq!(
        status["level"]["summary"],
        "basic: automatic failover is paused"
    );

    assert_eq!(post(&node, "/resume", Some(TOKEN)).await.0, StatusCode::OK);
    let (_, status) = get_json(&node, "/status").await;
    assert_eq!(status["paused"], false);
    assert_eq!(status["level"]["level"], "standard");
    node.shutdown().await;
}

#[tokio::test]
async fn hold_and_backup_answer_with_the_token() {
    let node = HaNode::builder()
        .node_id("a")
        .single_node()
        .http(loopback())
        .admin_token(TOKEN)
        .build()
        .expect("build");
    node.start().await.expect("start");
    let (code, body) = post(&node, "/hold?ms=120000", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["held_ms"], 60_000, "a hold is capped at 60 s");
    let (code, body) = post(&node, "/hold", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    let (code, body) = post(&node, "/backup", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "no backups configured: {body}");
    node.shutdown().await;
}

#[tokio::test]
async fn switchover_moves_leadership_to_the_other_node() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elected(&store, "a").build().expect("build");
    let b = elected(&store, "b").build().expect("build");
    start_cluster(&[&a, &b]).await;

    let (code, body) = post(&b, "/switchover", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::CONFLICT, "a follower refuses: {body}");
    assert!(a.is_leader().is_some());

    let (code, body) = post(&a, "/switchover", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let nodes = [&a, &b];
    let leader = eventually("a new leader", WAIT, || async { leader_of(&nodes) }).await;
    assert_eq!(leader.node_id().as_str(), "b");
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn switchover_to_a_named_node_moves_leadership_there() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elected(&store, "a").build().expect("build");
    let b = elected(&store, "b").build().expect("build");
    let c = elected(&store, "c").build().expect("build");
    start_cluster(&[&a, &b, &c]).await;

    let (code, body) = post(&a, "/switchover?to=nobody", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    let (code, body) = post(&a, "/switchover?to=a", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert!(a.is_leader().is_some());

    let (code, body) = post(&a, "/switchover?to=c", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let nodes = [&a, &b, &c];
    let leader = eventually("a new leader", WAIT, || async {
        leader_of(&nodes).filter(|n| n.node_id().as_str() != "a")
    })
    .await;
    assert_eq!(leader.node_id().as_str(), "c");

    // And back to a, from c.
    let (code, body) = post(&c, "/switchover?to=a", Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let leader = eventually("a new leader", WAIT, || async {
        leader_of(&nodes).filter(|n| n.node_id().as_str() != "c")
    })
    .await;
    assert_eq!(leader.node_id().as_str(), "a");
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn secrets_never_appear_in_status_or_metrics() {
    let store = Arc::new(MemoryLeaseStore::new());
    let leaky = FnCheck::new("auth", || async {
        CheckResult::unhealthy("login with password hunter2 refused")
    });
    let node = elected(&store, "a")
        .secret("hunter2")
        .member_meta("store", "redis://ha:s3cret-pw@10.0.0.1:6379/0")
        .member_meta("note", "the password is hunter2")
        .check(leaky, fast().criticality(Criticality::Low))
        .metrics(|| format!("leak hunter2 {TOKEN}\n"))
        .build()
        .expect("build");
    start_cluster(&[&node]).await;
    node.bus().publish(HaEvent::AnomalyDetected {
        at: SystemTime::now(),
        node: node.node_id().clone(),
        component: "auth".into(),
        rule: "manual".into(),
        detail: format!("hunter2 and {TOKEN} and postgres://u:pgpass@db/x"),
    });
    eventually("the event and the check result", WAIT, || async {
        let (_, body) = get(&node, "/status").await;
        (body.contains("manual") && body.contains("refused")).then_some(())
    })
    .await;

    let (_, status) = get(&node, "/status").await;
    for secret in ["hunter2", TOKEN, "s3cret-pw", "pgpass"] {
        assert!(
            !status.contains(secret),
            "/status shows {secret:?}: {status}"
        );
    }
    assert!(
        status.contains("redis://ha:***@10.0.0.1:6379/0"),
        "{status}"
    );
    assert!(status.contains("the password is ***"), "{status}");
    let (code, metrics) = get(&node, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(metrics, "leak *** ***\n");
    let (_, leader) = get(&node, "/leader").await;
    assert!(!leader.contains("hunter2"));
    node.shutdown().await;
}
