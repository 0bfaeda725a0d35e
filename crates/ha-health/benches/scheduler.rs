//! Scheduler benchmark: 10,000 registered closure checks at a 1 s interval for 10 s on the
//! multi-threaded runtime, then one φ-accrual detector update. Prints `name value unit` lines:
//!
//! - `checks_per_s`: runs completed per second over the measured window;
//! - `tick_jitter_ms_p50/p99/max`: how far each run's start strayed from one interval after
//!   the previous start of the same check (first runs excluded: they all start at once by
//!   design, the spread begins with the second);
//! - `cpu_percent`: user + system CPU of the whole process over the window, in % of one core;
//! - `phi_update_ns`: one `PhiAccrualDetector::heartbeat`, and `phi_eval_ns`: one `phi(now)`.
//!
//! `cargo bench -p ha-health --bench scheduler` (`HA_BENCH_CHECKS`, `HA_BENCH_SECONDS` to
//! change the defaults 10000 and 10).
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{Component, ComponentContext};
use ha_health::{
    CheckConfig, CheckResult, CheckerConfig, HealthCheck, HealthChecker, PhiAccrualDetector,
    PhiConfig,
};
use nix::sys::resource::{UsageWho, getrusage};
use tokio::time::Instant;

/// A closure check that notes when it ran.
struct Noting {
    name: String,
    starts: Arc<Mutex<Vec<Instant>>>,
}

#[async_trait]
impl HealthCheck for Noting {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        self.starts.lock().unwrap().push(Instant::now());
        CheckResult::healthy("ok")
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cpu_time() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().unsigned_abs())
            + Duration::from_micros(t.tv_usec().unsigned_abs())
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let checks = env("HA_BENCH_CHECKS", 10_000) as usize;
    let seconds = env("HA_BENCH_SECONDS", 10);
    let interval = Duration::from_secs(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut builder = HealthChecker::builder().config(CheckerConfig {
            max_concurrent_checks: 64,
        });
        let mut starts = Vec::with_capacity(checks);
        for i in 0..checks {
            let noted = Arc::new(Mutex::new(Vec::with_capacity(seconds as usize + 2)));
            starts.push(noted.clone());
            builder = builder.check(
                Noting {
                    name: format!("check-{i}"),
                    starts: noted,
                },
                CheckConfig::default().interval(interval),
            );
        }
        let checker = builder.build().unwrap();
        checker
            .start(ComponentContext::standalone("bench"))
            .await
            .unwrap();
        // Let the first runs (all at once) pass, then measure a steady window.
        tokio::time::sleep(interval).await;
        let runs_before: usize = starts.iter().map(|s| s.lock().unwrap().len()).sum();
        let cpu_before = cpu_time();
        let wall = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let cpu = cpu_time() - cpu_before;
        let elapsed = wall.elapsed();
        let runs_after: usize = starts.iter().map(|s| s.lock().unwrap().len()).sum();
        checker.stop().await.unwrap();

        let mut jitter: Vec<f64> = starts
            .iter()
            .flat_map(|s| {
                let s = s.lock().unwrap().clone();
                s.windows(2)
                    .skip(1)
                    .map(|w| ((w[1] - w[0]).as_secs_f64() - interval.as_secs_f64()).abs() * 1e3)
                    .collect::<Vec<_>>()
            })
            .collect();
        jitter.sort_by(f64::total_cmp);
        println!("checks_registered {checks} checks");
        println!(
            "checks_per_s {:.0} runs/s",
            (runs_after - runs_before) as f64 / elapsed.as_secs_f64()
        );
        println!("tick_jitter_ms_p50 {:.3} ms", quantile(&jitter, 0.50));
        println!("tick_jitter_ms_p99 {:.3} ms", quantile(&jitter, 0.99));
        println!("tick_jitter_ms_max {:.3} ms", quantile(&jitter, 1.0));
        println!(
            "cpu_percent {:.1} %",
            cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0
        );
    });

    // One detector update: a heartbeat one second after the last.
    let mut detector = PhiAccrualDetector::new(PhiConfig::default()).unwrap();
    let start = Instant::now();
    let n = 1_000_000u32;
    let t0 = std::time::Instant::now();
    for i in 0..n {
        detector.heartbeat(black_box(
            start + Duration::from_millis(u64::from(i) * 1000),
        ));
    }
    println!(
        "phi_update_ns {:.1} ns",
        t0.elapsed().as_nanos() as f64 / f64::from(n)
    );
    let now = start + Duration::from_millis(u64::from(n) * 1000 + 500);
    let t0 = std::time::Instant::now();
    let mut sum = 0.0;
    for i in 0..n {
        sum += detector.phi(black_box(now + Duration::from_micros(u64::from(i % 1000))));
    }
    black_box(sum);
    println!(
        "phi_eval_ns {:.1} ns",
        t0.elapsed().as_nanos() as f64 / f64::from(n)
    );
}
