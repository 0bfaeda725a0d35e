//! The admin operations behind the API's POST routes: switchover (to a chosen member) and an
//! on-demand backup.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::node::HaNode;

/// A refusal: the status code and the message.
pub(crate) type Refusal = (StatusCode, String);

/// How long a hold-off request to another member may take.
const HOLD_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The leader steps down. With `to`, every other live member is first asked (with the
/// caller's admin token) to stay out of the election for one ttl, and `to` to end any hold it
/// is under (an earlier switchover to another member held it off), so `to` wins it.
pub(crate) async fn switchover(
    node: &HaNode,
    to: Option<&str>,
    token: Option<String>,
) -> Result<Value, Refusal> {
    let Some(elector) = node.elector() else {
        return Err((
            StatusCode::CONFLICT,
            "switchover needs an election: this is a single node".into(),
        ));
    };
    if node.is_leader().is_none() {
        let leader = elector
            .leader()
            .map_or_else(|| "unknown".to_owned(), |l| l.node.to_string());
        return Err((
            StatusCode::CONFLICT,
            format!("this node does not lead (the leader is {leader}): send the switchover there"),
        ));
    }
    if let Some(target) = to {
        if target == node.node_id().as_str() {
            return Err((StatusCode::BAD_REQUEST, format!("{target} already leads")));
        }
        let members = node.members().await;
        if !members.iter().any(|m| m.node.as_str() == target) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("{target} is not a live member of the election"),
            ));
        }
        let hold_ms = elector.config().ttl.as_millis() as u64;
        let client = reqwest::Client::builder()
            .timeout(HOLD_REQUEST_TIMEOUT)
            .build()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let others = members.iter().filter(|m| m.node != *node.node_id());
        let mut holds = Vec::new();
        for member in others {
            // `hold?ms=0` ends the target's hold, if any.
            let hold_ms = if member.node.as_str() == target {
                0
            } else {
                hold_ms
            };
            let Some(api) = member.meta.get("api") else {
                return Err((
                    StatusCode::CONFLICT,
                    format!(
                        "member {} announced no API address: it cannot be held off",
                        member.node
                    ),
                ));
            };
            let mut request = client.post(format!("{api}/hold?ms={hold_ms}"));
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            let name = member.node.to_string();
            holds.push(async move { (name, request.send().await) });
        }
        for (name, answer) in futures_util::future::join_all(holds).await {
            match answer {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "member {name} refused to hold off: HTTP {}",
                            response.status()
                        ),
                    ));
                }
                Err(e) => {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        format!("member {name} could not be held off: {e}"),
                    ));
                }
            }
        }
    }
    // A database beside this node stops taking writes first, while the lease still keeps
    // every other member from promoting; then the lease goes.
    if let Err(e) = node.hand_over_database(to).await {
        node.abort_hand_over();
        return Err((
            StatusCode::CONFLICT,
            format!("the database could not be demoted before the step-down: {e}"),
        ));
    }
    let stepped = elector.step_down().await;
    if !stepped {
        node.abort_hand_over();
        return Err((
            StatusCode::CONFLICT,
            "this node stopped leading before it could step down".into(),
        ));
    }
    tracing::warn!(to = to.unwrap_or("any"), "switchover: stepped down");
    Ok(json!({ "from": node.node_id().as_str(), "to": to, "stepped_down": true }))
}

/// One backup of `source` now (leader only); without a name, the only source.
pub(crate) async fn backup(node: &HaNode, source: Option<&str>) -> Result<Value, Refusal> {
    let Some(backups) = node.backups() else {
        return Err((
            StatusCode::NOT_FOUND,
            "no backups are configured on this node".into(),
        ));
    };
    let names: Vec<String> = backups.statuses().into_iter().map(|s| s.name).collect();
    let source = match source {
        Some(name) => name.to_owned(),
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("name a source (?source=NAME): one of {}", names.join(", ")),
            ));
        }
    };
    if !names.contains(&source) {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "no backup source named {source:?}: one of {}",
                names.join(", ")
            ),
        ));
    }
    match backups.backup_now(&source).await {
        Ok(outcome) => Ok(
            json!({ "source": source, "backup": serde_json::to_value(&outcome).unwrap_or_default() }),
        ),
        Err(e) => {
            let code = if matches!(e, ha_dr::Error::NotRun { .. }) {
                StatusCode::CONFLICT
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            Err((code, e.to_string()))
        }
    }
}
