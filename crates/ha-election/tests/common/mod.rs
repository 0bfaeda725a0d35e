//! Test support: a per-node fault wrapper around a shared lease store, and an invariant checker.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{FencingToken, NodeId};
use ha_election::{
    Acquire, Elector, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, Result, with_timeout,
};

/// One node's view of a shared store, with that node's faults: a partition (requests never
/// answer) and delays before the request reaches the store or before the answer comes back.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn LeaseStore>,
    partitioned: AtomicBool,
    request_delay_ms: AtomicU64,
    response_delay_ms: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn LeaseStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            partitioned: AtomicBool::new(false),
            request_delay_ms: AtomicU64::new(0),
            response_delay_ms: AtomicU64::new(0),
        })
    }

    pub fn partition(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }

    pub fn set_delays(&self, request: Duration, response: Duration) {
        self.request_delay_ms
            .store(request.as_millis() as u64, Ordering::SeqCst);
        self.response_delay_ms
            .store(response.as_millis() as u64, Ordering::SeqCst);
    }

    async fn around<T>(
        &self,
        op: &'static str,
        key: &str,
        timeout: Duration,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        with_timeout("faulty", op, key, timeout, async {
            if self.partitioned.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(
                self.request_delay_ms.load(Ordering::SeqCst),
            ))
            .await;
            let outcome = call.await;
            tokio::time::sleep(Duration::from_millis(
                self.response_delay_ms.load(Ordering::SeqCst),
            ))
            .await;
            if self.partitioned.load(Ordering::SeqCst) {
                // The answer is lost on the way back.
                std::future::pending::<()>().await;
            }
            outcome
        })
        .await
    }
}

/// A generous inner timeout: the wrapper's own timeout is the one that matters.
const INNER: Duration = Duration::from_secs(3600);

#[async_trait]
impl LeaseStore for FaultyStore {
    fn kind(&self) -> &'static str {
        "faulty"
    }

    async fn acquire(
        &self,
        key: &str,
        holder: &NodeId,
        ttl: Duration,
        expected: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<Acquire> {
        self.around(
            "acquire",
            key,
            timeout,
            self.inner.acquire(key, holder, ttl, expected, INNER),
        )
        .await
    }

    async fn renew(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<bool> {
        self.around(
            "renew",
            key,
            timeout,
            self.inner.renew(key, holder, token, ttl, INNER),
        )
        .await
    }

    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool> {
        self.around(
            "release",
            key,
            timeout,
            self.inner.release(key, holder, token, INNER),
        )
        .await
    }

    async fn read(&self, key: &str, timeout: Duration) -> Result<Option<LeaseInfo>> {
        self.around("read", key, timeout, self.inner.read(key, INNER))
            .await
    }

    async fn watch(&self, key: &str) -> Result<Option<LeaseWatch>> {
        self.inner.watch(key).await
    }

    async fn heartbeat(
        &self,
        group: &str,
        node: &NodeId,
        meta: &BTreeMap<String, String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<()> {
        self.around(
            "heartbeat",
            group,
            timeout,
            self.inner.heartbeat(group, node, meta, ttl, INNER),
        )
        .await
    }

    async fn members(&self, group: &str, timeout: Duration) -> Result<Vec<Member>> {
        self.around("members", group, timeout, self.inner.members(group, INNER))
            .await
    }
}

/// Records every leadership observed across checks and fails on two valid leaders at once or
/// a token that does not grow from one term to the next.
#[derive(Default)]
pub struct Invariants {
    last_token: Option<FencingToken>,
    terms: Vec<(usize, FencingToken)>,
}

impl Invariants {
    pub fn check(&mut self, electors: &[&Elector]) -> Option<usize> {
        let leaders: Vec<(usize, FencingToken)> = electors
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.is_leader().map(|l| (i, l.token)))
            .collect();
        assert!(leaders.len() <= 1, "split brain: {leaders:?}");
        let (index, token) = *leaders.first()?;
        if self.terms.last() != Some(&(index, token)) {
            if let Some(last) = self.last_token {
                assert!(
                    token > last,
                    "token {token} of a new term is not above {last}"
                );
            }
            self.last_token = Some(token);
            self.terms.push((index, token));
        }
        Some(index)
    }

    pub fn terms(&self) -> &[(usize, FencingToken)] {
        &self.terms
    }
}
