//! `hactl`: the operator's CLI for `ha-node`s (like `patronictl`).
//!
//! `hactl --url http://127.0.0.1:8008 list` shows every member of the cluster (found through
//! the members' announced API addresses); `switchover`, `pause`, `resume` and `backup` are
//! admin calls that need the token (`--token` or `HA_ADMIN_TOKEN`). `pause`/`resume` reach
//! every member, so the whole cluster stops (or resumes) automatic failover.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ha_orchestrator::NodeStatus;

/// Talks to ha-node HTTP APIs.
#[derive(Parser, Debug)]
#[command(name = "hactl", version, about)]
struct Args {
    /// One or more node API URLs, comma-separated; the first that answers is asked about
    /// the cluster.
    #[arg(
        long,
        env = "HACTL_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8008"
    )]
    url: Vec<String>,
    /// Admin bearer token (or HA_ADMIN_TOKEN).
    #[arg(long, env = "HA_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Request timeout in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A table of members: name, role, token, database role/state, timeline and lag, health,
    /// level, lag.
    List,
    /// One node's full status (JSON).
    Status,
    /// The leader steps down (to NODE, if given).
    Switchover {
        /// The member that should lead next.
        #[arg(long)]
        to: Option<String>,
    },
    /// Pause automatic failover on every member.
    Pause,
    /// Resume automatic failover on every member.
    Resume,
    /// The failover history of the leader.
    History,
    /// Take a backup now on the leader.
    Backup {
        /// The source (optional when there is only one).
        #[arg(long)]
        source: Option<String>,
    },
}

struct Cli {
    client: reqwest::Client,
    token: Option<String>,
    urls: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hactl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(text) => {
            print(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hactl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
fn print(text: &str) {
    println!("{text}");
}

async fn run(args: Args) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(args.timeout_ms))
        .build()
        .map_err(|e| e.to_string())?;
    let cli = Cli {
        client,
        token: args.token,
        urls: args
            .url
            .iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect(),
    };
    match args.command {
        Command::List => cli.list().await,
        Command::Status => {
            let (_, status) = cli.first_status().await?;
            serde_json::to_string_pretty(&status).map_err(|e| e.to_string())
        }
        Command::Switchover { to } => {
            let leader = cli.leader_url().await?;
            let path = match &to {
                Some(to) => format!("/switchover?to={to}"),
                None => "/switchover".to_owned(),
            };
            cli.post(&leader, &path).await
        }
        Command::Pause => cli.post_all("/pause").await,
        Command::Resume => cli.post_all("/resume").await,
        Command::History => cli.history().await,
        Command::Backup { source } => {
            let leader = cli.leader_url().await?;
            let path = match &source {
                Some(source) => format!("/backup?source={source}"),
                None => "/backup".to_owned(),
            };
            cli.post(&leader, &path).await
        }
    }
}

impl Cli {
    async fn status(&self, url: &str) -> Result<NodeStatus, String> {
        let response = self
            .client
            .get(format!("{url}/status"))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let body = response.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not a node status: {e}"))
    }

    async fn first_status(&self) -> Result<(String, NodeStatus), String> {
        let mut errors = Vec::new();
        for url in &self.urls {
            match self.status(url).await {
                Ok(status) => return Ok((url.clone(), status)),
                Err(e) => errors.push(e),
            }
        }
        Err(format!("no node answered: {}", errors.join("; ")))
    }

    /// Every member's API URL (the given URLs included).
    async fn member_urls(&self) -> Result<Vec<String>, String> {
        let (url, status) = self.first_status().await?;
        let mut urls: Vec<String> = status
            .members
            .iter()
            .filter_map(|m| m.api.clone())
            .collect();
        if !urls.contains(&url) {
            urls.push(url);
        }
        for given in &self.urls {
            if !urls.contains(given) {
                urls.push(given.clone());
            }
        }
        urls.sort();
        Ok(urls)
    }

    async fn leader_url(&self) -> Result<String, String> {
        for url in self.member_urls().await? {
            if let Ok(status) = self.status(&url).await
                && matches!(status.role.as_str(), "leader" | "single")
            {
                return Ok(url);
            }
        }
        Err("no member leads right now".into())
    }

    async fn post(&self, url: &str, path: &str) -> Result<String, String> {
        let mut request = self.client.post(format!("{url}{path}"));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
        let code = response.status();
        let body = response.text().await.unwrap_or_default();
        if code.is_success() {
            Ok(body)
        } else {
            Err(format!("{url}{path}: HTTP {code}: {body}"))
        }
    }

    async fn post_all(&self, path: &str) -> Result<String, String> {
        let mut lines = Vec::new();
        let mut failed = false;
        for url in self.member_urls().await? {
            match self.post(&url, path).await {
                Ok(body) => lines.push(format!("{url}: {body}")),
                Err(e) => {
                    failed = true;
                    lines.push(e);
                }
            }
        }
        if failed {
            Err(lines.join("\n"))
        } else {
            Ok(lines.join("\n"))
        }
    }

    async fn list(&self) -> Result<String, String> {
        let mut rows = vec![[
            "NODE".to_owned(),
            "ROLE".to_owned(),
            "TOKEN".to_owned(),
            "DB".to_owned(),
            "TL".to_owned(),
            "DB LAG".to_owned(),
            "HEALTH".to_owned(),
            "LEVEL".to_owned(),
            "MAX LAG".to_owned(),
            "API".to_owned(),
        ]];
        let mut seen = BTreeMap::new();
        let mut statuses = Vec::new();
        for url in self.member_urls().await? {
            let status = self.status(&url).await;
            statuses.push((url, status));
        }
        // What the members published about their databases, as the first answering node
        // read it from the store (one consistent view).
        let meta: BTreeMap<String, BTreeMap<String, String>> = statuses
            .iter()
            .find_map(|(_, s)| s.as_ref().ok())
            .map(|s| {
                s.members
                    .iter()
                    .map(|m| (m.node.clone(), m.meta.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (url, status) in statuses {
            match status {
                Ok(status) => {
                    let [db, timeline, db_lag] = database_columns(&meta, &status.node);
                    let health = status
                        .health
                        .as_ref()
                        .and_then(|h| h.get("status"))
                        .and_then(|s| s.as_str())
                        .unwrap_or("-")
                        .to_owned();
                    let lag = status
                        .kpis
                        .max_replication_lag_bytes
                        .map_or("-".to_owned(), |b| format!("{b} B"));
                    seen.insert(
                        status.node.clone(),
                        [
                            status.node.clone(),
                            status.role.clone(),
                            status.token.map_or("-".to_owned(), |t| t.to_string()),
                            db,
                            timeline,
                            db_lag,
                            health,
                            status.level.summary.clone(),
                            lag,
                            url.clone(),
                        ],
                    );
                }
                Err(e) => {
                    seen.insert(
                        url.clone(),
                        [
                            url.clone(),
                            "unreachable".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            e,
                        ],
                    );
                }
            }
        }
        rows.extend(seen.into_values());
        Ok(table(&rows))
    }

    async fn history(&self) -> Result<String, String> {
        let leader = self.leader_url().await?;
        let status = self.status(&leader).await?;
        let history = status
            .failover
            .as_ref()
            .and_then(|f| f.get("history"))
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default();
        let mut rows = vec![["ID", "COMPONENT", "OUTCOME", "TOKEN"].map(str::to_owned)];
        for record in history {
            let field = |name: &str| {
                record.get(name).map_or("-".to_owned(), |v| {
                    v.to_string().trim_matches('"').to_owned()
                })
            };
            let outcome = record
                .get("outcome")
                .and_then(|o| o.get("outcome"))
                .map_or("-".to_owned(), |v| {
                    v.to_string().trim_matches('"').to_owned()
                });
            rows.push([field("id"), field("component"), outcome, field("token")]);
        }
        Ok(table(&rows))
    }
}

/// DB (`role/state`), TL (timeline) and DB LAG (bytes the member's replayed position is
/// behind the freshest primary position any member published) from the members' `pg_*`
/// metadata; `-` where a member publishes none.
fn database_columns(meta: &BTreeMap<String, BTreeMap<String, String>>, node: &str) -> [String; 3] {
    let dash = || "-".to_owned();
    let Some(own) = meta.get(node).filter(|m| m.contains_key("pg_role")) else {
        return [dash(), dash(), dash()];
    };
    let lsn = |m: &BTreeMap<String, String>, key: &str| {
        m.get(key)
            .and_then(|v| v.parse::<ha_replication::Lsn>().ok())
    };
    let primary_at = meta
        .values()
        .filter(|m| m.get("pg_role").is_some_and(|r| r == "primary"))
        .filter_map(|m| lsn(m, "pg_wal_lsn"))
        .max();
    let role = own.get("pg_role").map_or("-", String::as_str);
    let mut db = match own.get("pg_state") {
        Some(state) if !state.is_empty() => format!("{role}/{state}"),
        _ => role.to_owned(),
    };
    if own.get("pg_sync_standby").is_some_and(|v| v == "true") {
        db.push_str(" (sync)");
    }
    let lag = match (role, primary_at, lsn(own, "pg_replayed_lsn")) {
        ("primary", _, _) => "0".to_owned(),
        (_, Some(primary), Some(replayed)) => format!("{}", primary.bytes_since(replayed)),
        _ => dash(),
    };
    [
        db,
        own.get("pg_timeline").cloned().unwrap_or_else(dash),
        lag,
    ]
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_columns_come_from_the_members_reports() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let meta: BTreeMap<String, BTreeMap<String, String>> = [
            (
                "a".to_owned(),
                m(&[
                    ("pg_role", "primary"),
                    ("pg_state", "writable"),
                    ("pg_timeline", "2"),
                    ("pg_wal_lsn", "0/3000100"),
                ]),
            ),
            (
                "b".to_owned(),
                m(&[
                    ("pg_role", "replica"),
                    ("pg_state", "streaming"),
                    ("pg_timeline", "2"),
                    ("pg_replayed_lsn", "0/3000000"),
                    ("pg_sync_standby", "true"),
                ]),
            ),
            ("c".to_owned(), m(&[("api", "http://x")])),
        ]
        .into();
        assert_eq!(database_columns(&meta, "a"), ["primary/writable", "2", "0"]);
        assert_eq!(
            database_columns(&meta, "b"),
            ["replica/streaming (sync)", "2", "256"]
        );
        assert_eq!(database_columns(&meta, "c"), ["-", "-", "-"]);
    }
}
