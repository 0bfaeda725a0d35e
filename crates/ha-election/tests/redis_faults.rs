//! Real faults of the store itself, on a real redis-server, while two electors run: the lease
//! record is deleted (data loss: a restart without persistence, a flush, an eviction) or its
//! expiry is cut short from outside (an honest stand-in for a clock step on the server, which
//! libfaketime cannot do to redis-server here). Nobody steps the leader down by hand. A
//! checker outside both electors samples `is_leader()` of each every couple of milliseconds:
//! never two valid leaders, and the next term's token is greater.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ha_core::{Component, ComponentContext, FencingToken};
use ha_election::redis::record_key;
use ha_election::testing::unique_key;
use ha_election::{Elector, ElectorConfig, LeaseStore, RedisLeaseStore};
use ha_testkit::RedisServer;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(100);

/// What the checker saw: every term (index, token) in order, and any instant with two leaders.
#[derive(Default, Debug)]
struct Seen {
    terms: Vec<(usize, FencingToken)>,
    split: Vec<Vec<(usize, FencingToken)>>,
}

fn spawn_checker(
    electors: Arc<Vec<Elector>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        while !stop.load(Ordering::SeqCst) {
            let leaders: Vec<(usize, FencingToken)> = electors
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.is_leader().map(|l| (i, l.token)))
                .collect();
            if leaders.len() > 1 {
                seen.split.push(leaders.clone());
            }
            if let Some(&term) = leaders.first()
                && seen.terms.last() != Some(&term)
            {
                seen.terms.push(term);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen
    })
}

/// The index and token of the node leading now, if any.
fn leader(electors: &[Elector]) -> Option<(usize, FencingToken)> {
    electors
        .iter()
        .enumerate()
        .find_map(|(i, e)| e.is_leader().map(|l| (i, l.token)))
}

/// Polls (with a deadline) until `done` holds for the current leader.
async fn wait_for(
    electors: &[Elector],
    within: Duration,
    what: &str,
    done: impl Fn(Option<(usize, FencingToken)>) -> bool,
) {
    let deadline = Instant::now() + within;
    while !done(leader(electors)) {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs two electors on `server`, lets one lead, applies `fault` to the lease record from
/// outside, and checks that no second valid leader appears while the first one's deadline
/// runs, and that the next term (after the followers waited a TTL) has a greater token.
async fn fault_while_leading(server: &RedisServer, fault: &[&str]) {
    let key = unique_key("redis-fault");
    let mut electors = Vec::new();
    for name in ["a", "b"] {
        let store: Arc<dyn LeaseStore> = Arc::new(
            RedisLeaseStore::connect(&server.url())
                .await
                .expect("connect"),
        );
        let elector = Elector::builder(store)
            .config(ElectorConfig::with_ttl(key.clone(), TTL, RETRY))
            .build()
            .expect("valid config");
        elector
            .start(ComponentContext::standalone(name))
            .await
            .expect("starts");
        electors.push(elector);
    }
    let electors = Arc::new(electors);
    let stop = Arc::new(AtomicBool::new(false));
    let checker = spawn_checker(Arc::clone(&electors), Arc::clone(&stop));

    wait_for(&electors, TTL * 5, "a first leader", |l| l.is_some()).await;
    let (first, first_token) = leader(&electors).expect("a leader");
    // Let the follower watch a few renewals, so it has a current observation to lose.
    tokio::time::sleep(TTL / 2).await;

    let args: Vec<String> = fault
        .iter()
        .map(|a| a.replace("{record}", &record_key(&key)))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    server.command(&args).await.expect("inject the fault");
    let fault_at = Instant::now();

    wait_for(&electors, TTL * 6, "a new term after the fault", |l| {
        l.is_some_and(|(_, token)| token != first_token)
    })
    .await;
    let took = fault_at.elapsed();
    let (_, second_token) = leader(&electors).expect("a leader");
    stop.store(true, Ordering::SeqCst);
    let seen = checker.await.expect("checker");

    assert!(
        seen.split.is_empty(),
        "two valid leaders at once after `{}`: {:?} (terms {:?})",
        fault.join(" "),
        seen.split,
        seen.terms
    );
    assert!(
        second_token > first_token,
        "{second_token} after {first_token}"
    );
    // Every follower saw the record vanish and waited a full TTL from then.
    assert!(
        took >= TTL,
        "a new term {took:?} after the fault: sooner than a TTL"
    );
    assert!(
        seen.terms
            .first()
            .is_some_and(|t| *t == (first, first_token)),
        "{:?}",
        seen.terms
    );
    for elector in electors.iter() {
        elector.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_record_is_not_granted_while_its_term_runs() {
    let server = RedisServer::start().await.expect("start redis-server");
    fault_while_leading(&server, &["DEL", "{record}"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_record_whose_expiry_was_cut_short_is_not_granted_while_its_term_runs() {
    let server = RedisServer::start().await.expect("start redis-server");
    fault_while_leading(&server, &["PEXPIRE", "{record}", "1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_server_does_not_grant_a_running_term() {
    let server = RedisServer::start().await.expect("start redis-server");
    fault_while_leading(&server, &["FLUSHALL"]).await;
}
