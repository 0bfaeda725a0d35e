//! Promotion benchmark on real PostgreSQL: a primary with one streaming replica; the primary
//! is SIGKILLed and `Promoter::promote_best` replaces it. Prints `name value unit` lines:
//! `promote_ms` (median of the trials, from the call to the first accepted write on the new
//! primary) and `promote_ms_max` with the replica's default settings, then the same with
//! `wal_retrieve_retry_interval = 500ms` on the replica (`promote_ms_retry500`,
//! `promote_ms_retry500_max`): how long the startup process sleeps between reconnect attempts
//! bounds how late it may notice the promotion request.
//!
//! `cargo bench -p ha-replication --bench promote` (`HA_BENCH_TRIALS`, default 5).
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::sync::Arc;

use ha_core::{AlwaysLeader, FencingToken};
use ha_replication::pg::{NoFence, PgMember, PgReplicationMonitor, PromoteConfig, Promoter};
use ha_testkit::PostgresServer;

fn main() {
    let trials: usize = std::env::var("HA_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("promote_trials {trials} trials");
    for (suffix, retry) in [("", None), ("_retry500", Some("500ms"))] {
        let mut times = runtime.block_on(trial_times(trials, retry));
        times.sort_by(f64::total_cmp);
        println!("promote_ms{suffix} {:.1} ms", times[times.len() / 2]);
        println!("promote_ms{suffix}_max {:.1} ms", times[times.len() - 1]);
    }
}

async fn trial_times(trials: usize, retry_interval: Option<&str>) -> Vec<f64> {
    let mut times = Vec::with_capacity(trials);
    for _ in 0..trials {
        let mut primary = PostgresServer::start().await.unwrap();
        let replica = primary.start_replica().await.unwrap();
        if let Some(interval) = retry_interval {
            replica
                .execute(&format!(
                    "ALTER SYSTEM SET wal_retrieve_retry_interval = '{interval}'"
                ))
                .await
                .unwrap();
            replica.execute("SELECT pg_reload_conf()").await.unwrap();
        }
        let old = PgMember::new("primary", &primary.url()).unwrap();
        let candidates = vec![PgMember::new("replica", &replica.url()).unwrap()];
        let monitor =
            PgReplicationMonitor::new(old.clone(), candidates.clone(), Default::default()).unwrap();
        let last = monitor.sample().await.unwrap();
        primary.kill().unwrap();
        // The primary was SIGKILLed by the bench itself: known down.
        let promoter = Promoter::new(
            PromoteConfig {
                assume_unreachable_is_down: true,
                ..PromoteConfig::default()
            },
            Arc::new(AlwaysLeader::new(FencingToken(1))),
            Arc::new(NoFence),
        )
        .unwrap();
        let report = promoter
            .promote_best(&old, &candidates, Some(&last.primary))
            .await
            .unwrap();
        times.push(report.promote_time.as_secs_f64() * 1000.0);
    }
    times
}
