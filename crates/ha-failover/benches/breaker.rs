//! Circuit breaker benchmark: the cost of a call through a closed breaker and of a rejection by
//! an open one, beside failsafe-rs's breaker in the same run. Prints `name value unit` lines:
//!
//! - `breaker_closed_call_ns`: one thread, `try_acquire()` then `record_success()` on the
//!   permit — the whole bookkeeping of one successful call, with nothing to await;
//! - `breaker_closed_call_future_ns`: the same through `call(ready future)`, polled once with
//!   a no-op waker (no runtime);
//! - `breaker_closed_call_ns_contended`: two threads calling one shared breaker at once, as in
//!   the first line; the figure is each thread's wall time divided by its own calls (what one
//!   call costs a caller while the other thread competes);
//! - `breaker_open_reject_ns`: `try_acquire()` on an open breaker (reads the clock);
//! - `failsafe_closed_call_ns`, `failsafe_closed_call_ns_contended`: failsafe-rs 1.x,
//!   `CircuitBreaker::call` of a closure returning `Ok`, measured the same two ways;
//! - `closed_vs_failsafe`, `closed_vs_failsafe_contended`: failsafe's time ÷ ours (×).
//!
//! Both breakers run with their default configs (ours: 3 consecutive failures or a 50 %
//! failure rate over the last 100 calls; failsafe's: 5 consecutive failures or a success rate
//! under 50 % over 30 s). No metrics recorder is installed: the metric handles are no-ops.
//! Each figure is the fastest of 25 rounds of 1 million calls (`HA_BENCH_CALLS` to change):
//! the machine is shared, and interference only adds time.
//!
//! `cargo bench -p ha-failover --bench breaker`
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ha_core::CircuitState;
use ha_failover::{BreakerConfig, CircuitBreaker};

const ROUNDS: usize = 25;

fn calls() -> u64 {
    std::env::var("HA_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The fastest over `ROUNDS` of the nanoseconds per call of `round(n)`, which makes `n` calls
/// and returns how long they took. The fastest round, not the median: this machine runs other
/// builds at the same time, and interference only ever adds time.
fn best_ns(n: u64, mut round: impl FnMut(u64) -> Duration) -> f64 {
    round(n / 10); // warm up caches and branch predictors
    (0..ROUNDS)
        .map(|_| round(n).as_nanos() as f64 / n as f64)
        .fold(f64::INFINITY, f64::min)
}

/// Like [`best_ns`], with `threads` threads each making `n` calls at the same time; a round
/// lasts as long as its slowest thread.
fn best_ns_contended<S: Sync>(threads: usize, n: u64, shared: &S, call: impl Fn(&S) + Sync) -> f64 {
    let round = |n: u64| {
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let t = Instant::now();
                        for _ in 0..n {
                            call(shared);
                        }
                        t.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .max()
                .unwrap()
        })
    };
    best_ns(n, round)
}

fn ours_closed(b: &CircuitBreaker) {
    let permit = black_box(b).try_acquire().unwrap();
    permit.record_success();
}

fn failsafe_closed<B: failsafe::CircuitBreaker>(b: &B) {
    black_box(b.call(|| Ok::<_, ()>(black_box(1)))).unwrap();
}

fn main() {
    let n = calls();
    let ours = CircuitBreaker::builder("bench").build().unwrap();
    let theirs = failsafe::Config::new().build();

    let closed = best_ns(n, |n| {
        let t = Instant::now();
        for _ in 0..n {
            ours_closed(&ours);
        }
        t.elapsed()
    });
    assert_eq!(ours.state(), CircuitState::Closed);

    let mut cx = Context::from_waker(Waker::noop());
    let future = best_ns(n, |n| {
        let t = Instant::now();
        for _ in 0..n {
            let call = pin!(black_box(&ours).call(async { Ok::<_, ()>(black_box(1)) }));
            match call.poll(&mut cx) {
                Poll::Ready(r) => {
                    black_box(r).unwrap();
                }
                Poll::Pending => unreachable!("a ready future completes at the first poll"),
            }
        }
        t.elapsed()
    });

    let fs_closed = best_ns(n, |n| {
        let t = Instant::now();
        for _ in 0..n {
            failsafe_closed(&theirs);
        }
        t.elapsed()
    });

    let contended = best_ns_contended(2, n, &ours, ours_closed);
    let fs_contended = best_ns_contended(2, n, &theirs, failsafe_closed);

    let open = CircuitBreaker::builder("bench-open")
        .config(BreakerConfig {
            failure_threshold: Some(1),
            wait_duration: Duration::from_secs(3600),
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    open.try_acquire().unwrap().record_failure();
    assert_eq!(open.state(), CircuitState::Open);
    let reject = best_ns(n, |n| {
        let t = Instant::now();
        for _ in 0..n {
            black_box(black_box(&open).try_acquire()).unwrap_err();
        }
        t.elapsed()
    });

    println!("breaker_closed_call_ns {closed:.1} ns");
    println!("breaker_closed_call_future_ns {future:.1} ns");
    println!("breaker_closed_call_ns_contended {contended:.1} ns");
    println!("breaker_open_reject_ns {reject:.1} ns");
    println!("failsafe_closed_call_ns {fs_closed:.1} ns");
    println!("failsafe_closed_call_ns_contended {fs_contended:.1} ns");
    println!("closed_vs_failsafe {:.2} x", fs_closed / closed);
    println!(
        "closed_vs_failsafe_contended {:.2} x",
        fs_contended / contended
    );
}
