//! One elector as a process, printing one JSON line per role event: the demo of
//! `ha-election` (run three in three terminals) and the subject of external fault tests.
//!
//! ```text
//! cargo run --release --example election-node -- --store memory --key K --node-id a --ttl 2s --retry 200ms
//! ```
//!
//! `--store` is `memory` (a store private to this process, for trying it out), a `redis://`
//! URL, a `postgres://` URL or (built with `--features etcd`) `etcd://host:port[,host:port…]`;
//! three nodes on one Redis, PostgreSQL or etcd cluster elect one leader. Each line is
//! `{"event":"acquired"|"renewed"|"lost"|"released","node":ID,"token":N,"mono_ns":T,
//! "valid_until_mono_ns":D,"reason":R}` where the `*_mono_ns` fields are CLOCK_MONOTONIC
//! nanoseconds (comparable across processes on one machine) and `valid_until_mono_ns` is this
//! node's own leadership deadline. SIGTERM or Ctrl-C releases the lease and exits.
#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is what this program is for

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{Component, ComponentContext, LossReason};
use ha_election::{
    Elector, ElectorConfig, ElectorEvent, LeaseStore, MemoryLeaseStore, PostgresLeaseStore,
    RedisLeaseStore,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

struct Args {
    store: String,
    key: String,
    node: String,
    ttl: Duration,
    retry: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        store: "memory".into(),
        key: "ha/leader".into(),
        node: format!("node-{}", std::process::id()),
        ttl: Duration::from_secs(2),
        retry: Duration::from_millis(200),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--store" => args.store = value()?,
            "--key" => args.key = value()?,
            "--node-id" => args.node = value()?,
            "--ttl" => args.ttl = parse_duration("--ttl", &value()?)?,
            "--retry" => args.retry = parse_duration("--retry", &value()?)?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn parse_duration(flag: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{flag}: {e}"))
}

async fn connect(url: &str) -> Result<Arc<dyn LeaseStore>, String> {
    let failed = |e: ha_election::Error| format!("--store: {e}");
    match url.split("://").next().unwrap_or_default() {
        "memory" => Ok(Arc::new(MemoryLeaseStore::new())),
        "redis" => Ok(Arc::new(
            RedisLeaseStore::connect(url).await.map_err(failed)?,
        )),
        "postgres" | "postgresql" => Ok(Arc::new(
            PostgresLeaseStore::connect(url).await.map_err(failed)?,
        )),
        #[cfg(feature = "etcd")]
        "etcd" => Ok(Arc::new(
            ha_election::EtcdLeaseStore::connect_url(url)
                .await
                .map_err(failed)?,
        )),
        #[cfg(not(feature = "etcd"))]
        "etcd" => Err(
            "--store: this build lacks the examples' `etcd` feature (it needs protoc): \
             cargo run --features etcd --example election-node -- …"
                .to_owned(),
        ),
        scheme => Err(format!(
            "--store: unsupported store `{scheme}` (use memory, redis://…, postgres://… or etcd://host:port[,host:port…])"
        )),
    }
}

/// Maps tokio instants to CLOCK_MONOTONIC nanoseconds. std's `Instant` is CLOCK_MONOTONIC on
/// Linux; one reading of both pins the offset.
struct MonoClock {
    base: Instant,
    base_ns: i128,
}

impl MonoClock {
    fn new() -> Self {
        let base = Instant::now();
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or_default();
        Self { base, base_ns: ts }
    }

    fn ns(&self, at: Instant) -> i128 {
        let delta = if at >= self.base {
            i128::try_from((at - self.base).as_nanos()).unwrap_or(i128::MAX)
        } else {
            -i128::try_from((self.base - at).as_nanos()).unwrap_or(i128::MAX)
        };
        self.base_ns + delta
    }
}

fn line(clock: &MonoClock, node: &str, event: &ElectorEvent) -> serde_json::Value {
    let now = clock.ns(Instant::now());
    match event {
        ElectorEvent::Acquired { token, valid_until }
        | ElectorEvent::Renewed { token, valid_until } => {
            let name = if matches!(event, ElectorEvent::Acquired { .. }) {
                "acquired"
            } else {
                "renewed"
            };
            serde_json::json!({
                "event": name, "node": node, "token": token.get(), "mono_ns": now,
                "valid_until_mono_ns": clock.ns(*valid_until), "reason": null,
            })
        }
        ElectorEvent::Lost { token, reason } => {
            let name = if *reason == LossReason::SteppedDown {
                "released"
            } else {
                "lost"
            };
            serde_json::json!({
                "event": name, "node": node, "token": token.get(), "mono_ns": now,
                "valid_until_mono_ns": null, "reason": reason.as_str(),
            })
        }
        other => serde_json::json!({ "event": format!("{other:?}"), "node": node, "mono_ns": now }),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    ha_examples::init_tracing();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("election-node: {e}");
            return ExitCode::from(2);
        }
    };
    let store = match connect(&args.store).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("election-node: {e}");
            return ExitCode::from(2);
        }
    };
    let config = ElectorConfig::with_ttl(args.key, args.ttl, args.retry);
    let elector = match Elector::builder(store).config(config).build() {
        Ok(elector) => elector,
        Err(e) => {
            eprintln!("election-node: {e}");
            return ExitCode::from(2);
        }
    };
    let clock = MonoClock::new();
    let mut events = elector.events();
    if let Err(e) = elector
        .start(ComponentContext::standalone(args.node.as_str()))
        .await
    {
        eprintln!("election-node: {e}");
        return ExitCode::from(1);
    }
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("election-node: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => println!("{}", line(&clock, &args.node, &event)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("election-node: missed {n} events");
                }
                Err(_) => break,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    elector.shutdown().await;
    while let Ok(event) = events.try_recv() {
        println!("{}", line(&clock, &args.node, &event));
    }
    ExitCode::SUCCESS
}
