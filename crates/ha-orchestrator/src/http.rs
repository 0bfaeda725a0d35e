//! The node's HTTP API (axum, one port, JSON).
//!
//! | route | answers |
//! | --- | --- |
//! | `GET /health` | 200 while the node's loops run (liveness; no dependency checks) |
//! | `GET /ready` | 200 when started and every critical check is healthy, else 503 |
//! | `GET /leader` | 200 only on the node that leads now, else 503 (for load balancers) |
//! | `GET /primary` | 200 only where the node leads now and its PostgreSQL agent's database is a writable primary (at the agent's last loop), else 503 with the reason |
//! | `GET /replica` | 200 only where the agent's database is a replica streaming from a primary (`pg_stat_wal_receiver`), else 503 with the reason |
//! | `GET /read-only` | 200 where reads see the cluster's data: `/primary` or `/replica` would answer 200, else 503 with both reasons |
//! | `GET /status` | [`NodeStatus`](crate::NodeStatus) |
//! | `GET /metrics` | Prometheus text, when the binary installed a recorder |
//! | `POST /switchover[?to=NODE]` | admin: the leader steps down (to `NODE`: the others hold off) |
//! | `POST /pause`, `POST /resume` | admin: no automatic failover or promotion while paused |
//! | `POST /backup?source=NAME` | admin: one backup of a source now (leader only) |
//! | `POST /hold?ms=N` | admin: keep this node out of elections for N ms (≤ 60 s) |
//!
//! Admin routes need `Authorization: Bearer <token>` when the node has an admin token; a
//! node without one (allowed only on a loopback address) serves them to local callers.
//! A refused call answers 401 and changes nothing. Every body the API renders is scrubbed of
//! the node's secrets.

use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::node::HaNode;

/// The longest `POST /hold` honoured.
const MAX_HOLD: Duration = Duration::from_secs(60);

/// The API's routes over `node` (to mount beside an application's own routes).
pub fn router(node: HaNode) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/leader", get(leader))
        .route("/primary", get(primary))
        .route("/replica", get(replica))
        .route("/read-only", get(read_only))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/switchover", post(switchover))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/backup", post(backup))
        .route("/hold", post(hold))
        .with_state(node)
}

/// Serves the API until `stop` is cancelled (then finishes the requests in flight).
pub(crate) async fn serve(
    node: HaNode,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    let app = router(node);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "HTTP API stopped");
    }
}

/// A JSON body, scrubbed of the node's secrets.
fn reply(node: &HaNode, code: StatusCode, body: serde_json::Value) -> Response {
    let text = node.inner.redactor.redact(&body.to_string());
    (code, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// `None` if the caller may use admin routes, else the 401 to answer.
fn refuse_unless_admin(node: &HaNode, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &node.inner.admin_token else {
        // Only possible on a loopback address (the builder refuses others).
        return None;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| token.matches(p)) {
        None
    } else {
        tracing::warn!("admin call refused: missing or wrong bearer token");
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                r#"{"error":"admin calls need Authorization: Bearer <token>"}"#,
            )
                .into_response(),
        )
    }
}

async fn health(State(node): State<HaNode>) -> Response {
    let live = node.is_live();
    let code = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(&node, code, json!({ "live": live, "phase": node.phase() }))
}

async fn ready(State(node): State<HaNode>) -> Response {
    let ready = node.is_ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(
        &node,
        code,
        json!({ "ready": ready, "phase": node.phase() }),
    )
}

async fn leader(State(node): State<HaNode>) -> Response {
    match node.is_leader() {
        Some(lead) => reply(
            &node,
            StatusCode::OK,
            json!({ "leader": node.node_id().as_str(), "token": lead.token.get() }),
        ),
        None => {
            let seen = node.elector().and_then(|e| e.leader());
            reply(
                &node,
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "leader": seen.as_ref().map(|l| l.node.to_string()),
                    "token": seen.map(|l| l.token.get()),
                }),
            )
        }
    }
}

/// A load-balancer check's answer (`/primary`, `/replica`): 200 when `reason` is `None`,
/// else 503 saying why; `body` adds what the check knows.
fn role_check(
    node: &HaNode,
    check: &str,
    reason: Option<&str>,
    mut body: serde_json::Value,
) -> Response {
    let code = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    body[check] = json!(reason.is_none());
    body["reason"] = json!(reason);
    reply(node, code, body)
}

/// What a role check answers on a node without a PostgreSQL agent.
#[cfg(feature = "postgres")]
fn no_agent(node: &HaNode, check: &str) -> Response {
    role_check(
        node,
        check,
        Some("no postgres agent on this node"),
        json!({}),
    )
}

/// `GET /primary`: Patroni's load-balancer check for the writable primary.
#[cfg(feature = "postgres")]
async fn primary(State(node): State<HaNode>) -> Response {
    let Some(agent) = node.inner.parts.pg_agent.as_ref() else {
        return no_agent(&node, "primary");
    };
    let report = agent.agent_status();
    let reason = not_primary(&node, agent, &report);
    let body = json!({ "role": report.role, "member": report.member });
    role_check(&node, "primary", reason, body)
}

/// Why this node's database is not the led writable primary (`None`: it is).
#[cfg(feature = "postgres")]
fn not_primary(
    node: &HaNode,
    agent: &ha_replication::PgAgent,
    report: &ha_replication::pg::AgentStatus,
) -> Option<&'static str> {
    use ha_replication::pg::PgRole;
    if node.is_leader().is_none() {
        Some("this node does not lead")
    } else if !agent.is_writable_primary() {
        Some(match report.role {
            Some(PgRole::Primary) if report.demoted => "primary demoted",
            Some(PgRole::Primary) => "primary is read-only or not led yet",
            Some(PgRole::Replica) => "database is a replica",
            Some(PgRole::Unreachable) => "database does not answer",
            None => "agent has not looked yet",
        })
    } else {
        None
    }
}

/// Why this node's database is not a streaming replica (`None`: it is).
#[cfg(feature = "postgres")]
fn not_replica(report: &ha_replication::pg::AgentStatus) -> Option<&'static str> {
    use ha_replication::pg::PgRole;
    match (report.role, &report.streaming_from) {
        (Some(PgRole::Replica), Some(_)) => None,
        (Some(PgRole::Replica), None) => Some("replica is not streaming"),
        (Some(PgRole::Primary), _) => Some("database is a primary"),
        (Some(PgRole::Unreachable), _) => Some("database does not answer"),
        (None, _) => Some("agent has not looked yet"),
    }
}

/// `GET /replica`: 200 on a replica that streams.
#[cfg(feature = "postgres")]
async fn replica(State(node): State<HaNode>) -> Response {
    let Some(agent) = node.inner.parts.pg_agent.as_ref() else {
        return no_agent(&node, "replica");
    };
    let report = agent.agent_status();
    let reason = not_replica(&report);
    let body = json!({
        "role": report.role,
        "member": report.member,
        "streaming_from": report.streaming_from.map(|u| u.to_string()),
    });
    role_check(&node, "replica", reason, body)
}

/// `GET /read-only`: 200 where either `/primary` or `/replica` would answer 200 (Patroni's
/// check for a read pool that includes the leader).
#[cfg(feature = "postgres")]
async fn read_only(State(node): State<HaNode>) -> Response {
    let Some(agent) = node.inner.parts.pg_agent.as_ref() else {
        return no_agent(&node, "read_only");
    };
    let report = agent.agent_status();
    let reason = (not_primary(&node, agent, &report).is_some() && not_replica(&report).is_some())
        .then_some("neither the led writable primary nor a streaming replica");
    role_check(&node, "read_only", reason, json!({ "role": report.role }))
}

/// `GET /read-only` in a build without PostgreSQL: never.
#[cfg(not(feature = "postgres"))]
async fn read_only(State(node): State<HaNode>) -> Response {
    let reason = Some("built without the `postgres` feature");
    role_check(&node, "read_only", reason, json!({}))
}

async fn status(State(node): State<HaNode>) -> Response {
    let status = node.status().await;
    let body = serde_json::to_value(&status).unwrap_or_default();
    reply(&node, StatusCode::OK, body)
}

async fn metrics(State(node): State<HaNode>) -> Response {
    match &node.inner.metrics {
        Some(render) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            node.inner.redactor.redact(&render()),
        )
            .into_response(),
        None => reply(
            &node,
            StatusCode::NOT_FOUND,
            json!({ "error": "no metrics recorder in this process: the embedding application serves its own metrics" }),
        ),
    }
}

/// A caller allowed to use admin routes, with the token it presented (a switchover passes it
/// on to the members it holds off). Extracted first in every admin handler, so an
/// unauthenticated call is answered 401 before anything else of it is read.
struct Admin {
    token: Option<String>,
}

impl FromRequestParts<HaNode> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        node: &HaNode,
    ) -> Result<Self, Response> {
        match refuse_unless_admin(node, &parts.headers) {
            Some(refused) => Err(refused),
            None => Ok(Admin {
                token: presented_token(&parts.headers),
            }),
        }
    }
}

/// An admin query string, or the JSON 400 to answer.
struct AdminQuery<T>(T);

impl<T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<HaNode>
    for AdminQuery<T>
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        node: &HaNode,
    ) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, node).await {
            Ok(Query(query)) => Ok(AdminQuery(query)),
            Err(rejection) => Err(reply(
                node,
                StatusCode::BAD_REQUEST,
                json!({ "error": rejection.body_text() }),
            )),
        }
    }
}

/// The answer of an admin operation.
fn outcome(node: &HaNode, result: Result<serde_json::Value, crate::admin::Refusal>) -> Response {
    match result {
        Ok(body) => reply(node, StatusCode::OK, body),
        Err((code, message)) => reply(node, code, json!({ "error": message })),
    }
}

fn presented_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

#[derive(Deserialize)]
struct SwitchoverQuery {
    to: Option<String>,
}

async fn switchover(
    admin: Admin,
    State(node): State<HaNode>,
    AdminQuery(query): AdminQuery<SwitchoverQuery>,
) -> Response {
    let result = crate::admin::switchover(&node, query.to.as_deref(), admin.token).await;
    outcome(&node, result)
}

async fn pause(_: Admin, State(node): State<HaNode>) -> Response {
    node.pause();
    reply(&node, StatusCode::OK, json!({ "paused": true }))
}

async fn resume(_: Admin, State(node): State<HaNode>) -> Response {
    node.resume();
    reply(&node, StatusCode::OK, json!({ "paused": false }))
}

#[derive(Deserialize)]
struct BackupQuery {
    source: Option<String>,
}

async fn backup(
    _: Admin,
    State(node): State<HaNode>,
    AdminQuery(query): AdminQuery<BackupQuery>,
) -> Response {
    let result = crate::admin::backup(&node, query.source.as_deref()).await;
    outcome(&node, result)
}

#[derive(Deserialize)]
struct HoldQuery {
    ms: u64,
}

async fn hold(
    _: Admin,
    State(node): State<HaNode>,
    AdminQuery(query): AdminQuery<HoldQuery>,
) -> Response {
    let duration = Duration::from_millis(query.ms).min(MAX_HOLD);
    node.hold(duration);
    reply(
        &node,
        StatusCode::OK,
        json!({ "held_ms": duration.as_millis() as u64 }),
    )
}

/// `GET /primary` in a build without PostgreSQL: never a primary.
#[cfg(not(feature = "postgres"))]
async fn primary(State(node): State<HaNode>) -> Response {
    let reason = Some("built without the `postgres` feature");
    role_check(&node, "primary", reason, json!({}))
}

/// `GET /replica` in a build without PostgreSQL: never a replica.
#[cfg(not(feature = "postgres"))]
async fn replica(State(node): State<HaNode>) -> Response {
    let reason = Some("built without the `postgres` feature");
    role_check(&node, "replica", reason, json!({}))
}
