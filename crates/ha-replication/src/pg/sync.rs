//! Synchronous replication, managed by the leader's agent: which standbys PostgreSQL waits
//! for (`synchronous_standby_names`), and the record that says which members may be
//! promoted without losing an acknowledged commit.
//!
//! # The record
//!
//! A [`SyncState`] names a primary and its synchronous standbys, under the fencing token of
//! the term that wrote it. Its meaning: *every commit any primary of the cluster acknowledged
//! is on every member it names.* Only the leading agent writes it (in a
//! [`SyncStateStore`], which `ha-orchestrator` keeps in the election's lease store); readers
//! take the record with the greatest token. In synchronous mode a replica is eligible, and
//! promotes, only if the record names it; a primary that the record does not name stays
//! read-only (it may lack commits another primary acknowledged).
//!
//! # Keeping the record true (Patroni's order)
//!
//! The leader's agent waits for exactly the set it configures (`FIRST n (a, b, …)` with `n`
//! the size of the set, so every one of them has each commit before it is acknowledged), and
//! changes the two in an order that never lets the record name a member that might miss a
//! commit ([`next_step`]):
//!
//! - **shrink first:** a member leaves the record *before* PostgreSQL stops waiting for it;
//! - **grow last:** a member joins the record only once PostgreSQL has waited for it since a
//!   settle time after the change and it has flushed everything written up to then
//!   ([`PendingChange`]);
//! - **before a promotion:** the new leader writes a record naming only itself (its token is
//!   greater than every earlier record's) before `pg_promote`, so a deposed leader's late
//!   record cannot name members of the old primary any more.
//!
//! With no standby to wait for, `on` stops waiting (commits continue, no replica may be
//! promoted until one is synchronous again, as Patroni's `synchronous_mode`), `strict` waits
//! for any standby (`*`: commits block until one connects; Patroni's
//! `synchronous_mode_strict`). Members tagged `nosync` are never chosen.
//!
//! A store that lost the record (a Redis restart without persistence) makes every replica
//! ineligible until the leader writes it again: the cluster stops failing over rather than
//! risk a lost commit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{Error, Lsn};

/// Whether and how the leader's agent runs synchronous replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Asynchronous replication: `synchronous_standby_names` is left alone (default).
    #[default]
    Off,
    /// Wait for the chosen synchronous standbys; with none available, stop waiting (no
    /// replica may then be promoted).
    On,
    /// As `on`, but with no standby available wait for any (`*`): commits block rather than
    /// be acknowledged by the primary alone.
    Strict,
}

/// Member metadata key of the record: the writing term's token.
pub const META_SYNC_TOKEN: &str = "sync_token";
/// Member metadata key of the record: the primary.
pub const META_SYNC_PRIMARY: &str = "sync_primary";
/// Member metadata key of the record: the synchronous standbys, a JSON array of names.
pub const META_SYNC_STANDBYS: &str = "sync_standbys";

/// Which members hold every acknowledged commit: the primary and its synchronous standbys,
/// written by the term with this token (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    /// The fencing token of the term that wrote it; the greatest wins.
    pub token: u64,
    /// The primary (a member name: its node id).
    pub primary: String,
    /// The synchronous standbys.
    pub standbys: BTreeSet<String>,
}

impl SyncState {
    /// Whether `member` holds every acknowledged commit: it may be promoted, or stay primary.
    pub fn names(&self, member: &str) -> bool {
        self.primary == member || self.standbys.contains(member)
    }

    /// The record as string metadata (a lease store's member entry).
    pub fn to_meta(&self) -> BTreeMap<String, String> {
        let standbys: Vec<&String> = self.standbys.iter().collect();
        BTreeMap::from([
            (META_SYNC_TOKEN.to_owned(), self.token.to_string()),
            (META_SYNC_PRIMARY.to_owned(), self.primary.clone()),
            (
                META_SYNC_STANDBYS.to_owned(),
                serde_json::to_string(&standbys).unwrap_or_else(|_| "[]".into()),
            ),
        ])
    }

    /// The record in `meta`; `None` when a key is missing or does not parse (a record that
    /// cannot be read names nobody).
    pub fn from_meta(meta: &BTreeMap<String, String>) -> Option<Self> {
        Some(Self {
            token: meta.get(META_SYNC_TOKEN)?.parse().ok()?,
            primary: meta.get(META_SYNC_PRIMARY)?.clone(),
            standbys: serde_json::from_str(meta.get(META_SYNC_STANDBYS)?).ok()?,
        })
    }
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token {}: primary {}, standbys [",
            self.token, self.primary
        )?;
        for (i, s) in self.standbys.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(s)?;
        }
        f.write_str("]")
    }
}

/// Where the [`SyncState`] record lives. `ha-orchestrator` keeps it in the election's lease
/// store (one entry per writing node; readers take the greatest token), so it is as durable
/// and as available as the leases themselves.
#[ha_core::async_trait]
pub trait SyncStateStore: Send + Sync + fmt::Debug {
    /// The record with the greatest token, if the store holds one.
    async fn read(&self) -> Result<Option<SyncState>, Error>;

    /// Writes `state`; `Ok` only once the store holds it. A record with a smaller token than
    /// one already held never becomes the answer of [`read`](Self::read).
    async fn write(&self, state: &SyncState) -> Result<(), Error>;
}

/// A [`SyncStateStore`] in memory, for agents in one process (tests, the in-memory lease
/// store).
#[derive(Debug, Default)]
pub struct MemorySyncStateStore {
    record: Mutex<Option<SyncState>>,
}

#[ha_core::async_trait]
impl SyncStateStore for MemorySyncStateStore {
    async fn read(&self) -> Result<Option<SyncState>, Error> {
        Ok(ha_core::sync::lock(&self.record).clone())
    }

    async fn write(&self, state: &SyncState) -> Result<(), Error> {
        let mut record = ha_core::sync::lock(&self.record);
        if record.as_ref().is_none_or(|r| r.token <= state.token) {
            *record = Some(state.clone());
        }
        Ok(())
    }
}

/// What PostgreSQL is told to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waits {
    /// Exactly these standbys, all of them (`FIRST n (…)`, `n` the count; empty: no wait).
    For(BTreeSet<String>),
    /// Any one standby (`*`): no particular member is known to hold each commit.
    Any,
}

impl Waits {
    /// The members PostgreSQL waits for by name (none for [`Waits::Any`]).
    pub fn members(&self) -> BTreeSet<String> {
        match self {
            Waits::For(set) => set.clone(),
            Waits::Any => BTreeSet::new(),
        }
    }

    /// The `synchronous_standby_names` value.
    pub fn setting(&self) -> String {
        match self {
            Waits::Any => "*".into(),
            Waits::For(set) if set.is_empty() => String::new(),
            Waits::For(set) => {
                let names: Vec<String> = set
                    .iter()
                    .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
                    .collect();
                format!("FIRST {} ({})", set.len(), names.join(", "))
            }
        }
    }

    /// Reads a `synchronous_standby_names` value written by [`setting`](Self::setting);
    /// `None` for anything else (an operator's own value: the agent replaces it).
    pub fn parse(setting: &str) -> Option<Self> {
        let text = setting.trim();
        if text.is_empty() {
            return Some(Waits::For(BTreeSet::new()));
        }
        if text == "*" {
            return Some(Waits::Any);
        }
        let rest = text.strip_prefix("FIRST ")?;
        let (count, rest) = rest.split_once(' ')?;
        let count: usize = count.parse().ok()?;
        let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
        let mut names = BTreeSet::new();
        let mut chars = inner.chars().peekable();
        loop {
            while chars.next_if(|c| *c == ' ').is_some() {}
            if chars.next()? != '"' {
                return None;
            }
            let mut name = String::new();
            loop {
                match chars.next()? {
                    '"' if chars.next_if_eq(&'"').is_some() => name.push('"'),
                    '"' => break,
                    c => name.push(c),
                }
            }
            names.insert(name);
            while chars.next_if(|c| *c == ' ').is_some() {}
            match chars.next() {
                None => break,
                Some(',') => {}
                Some(_) => return None,
            }
        }
        (names.len() == count).then_some(Waits::For(names))
    }
}

/// The next change that brings the record and PostgreSQL's setting towards `desired`
/// without ever letting the record name a member PostgreSQL did not wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    /// Nothing to change.
    Keep,
    /// Write the record with these standbys (a shrink, or members confirmed synchronous).
    Record(BTreeSet<String>),
    /// Make PostgreSQL wait for this (only once the record names no member it drops).
    Configure(Waits),
}

/// The next step from the `recorded` standbys, what PostgreSQL waits for now (`configured`),
/// what it should wait for (`desired`) and the members `confirmed` synchronous since the
/// last change (see the [module docs](self)). The invariant it keeps: `recorded` ⊆ what
/// PostgreSQL waits for by name, and a member only joins `recorded` once confirmed.
pub fn next_step(
    recorded: &BTreeSet<String>,
    configured: &Waits,
    desired: &Waits,
    confirmed: &BTreeSet<String>,
) -> SyncStep {
    let waited = configured.members();
    if !recorded.is_subset(&waited) {
        return SyncStep::Record(recorded.intersection(&waited).cloned().collect());
    }
    if configured != desired {
        let wanted = desired.members();
        if !recorded.is_subset(&wanted) {
            return SyncStep::Record(recorded.intersection(&wanted).cloned().collect());
        }
        return SyncStep::Configure(desired.clone());
    }
    let joining: BTreeSet<String> = waited
        .difference(recorded)
        .filter(|m| confirmed.contains(*m))
        .cloned()
        .collect();
    if joining.is_empty() {
        SyncStep::Keep
    } else {
        SyncStep::Record(recorded.union(&joining).cloned().collect())
    }
}

/// A standby as the primary's `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walsender {
    /// Its `application_name` (the agent makes it the member's name).
    pub name: String,
    /// `state = 'streaming'`.
    pub streaming: bool,
    /// `sync_state` is `sync` or `quorum`.
    pub synchronous: bool,
    /// Its flushed position.
    pub flush: Option<Lsn>,
}

/// The standbys to wait for: up to `count` of the `eligible` members streaming now, those
/// already waited for first (no churn), then the most advanced; with none, [`Waits::Any`]
/// in strict mode and no wait otherwise.
pub fn choose(
    mode: SyncMode,
    count: usize,
    configured: &Waits,
    walsenders: &[Walsender],
    eligible: &BTreeSet<String>,
) -> Waits {
    let current = configured.members();
    let mut streaming: Vec<&Walsender> = walsenders
        .iter()
        .filter(|w| w.streaming && eligible.contains(&w.name))
        .collect();
    streaming.sort_by(|a, b| {
        current
            .contains(&b.name)
            .cmp(&current.contains(&a.name))
            .then(b.flush.cmp(&a.flush))
            .then(a.name.cmp(&b.name))
    });
    let chosen: BTreeSet<String> = streaming
        .into_iter()
        .map(|w| w.name.clone())
        .take(count)
        .collect();
    if chosen.is_empty() && mode == SyncMode::Strict {
        Waits::Any
    } else {
        Waits::For(chosen)
    }
}

/// A configuration change not yet confirmed: members join the record once PostgreSQL has
/// had `SETTLE` to apply it everywhere (every walsender reloads) and they flushed past the
/// WAL position read after that (`mark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingChange {
    /// When the new setting was reloaded.
    pub at: Instant,
    /// The primary's WAL position read after the settle time.
    pub mark: Option<Lsn>,
}

/// How long after a reload every process of the primary runs with the new setting.
pub const SETTLE: Duration = Duration::from_millis(200);

impl PendingChange {
    /// A change reloaded now.
    pub fn now() -> Self {
        Self {
            at: Instant::now(),
            mark: None,
        }
    }

    /// Takes the mark once the settle time has passed (`wal`: the primary's position now).
    pub fn observe(&mut self, wal: Option<Lsn>) {
        if self.mark.is_none() && self.at.elapsed() >= SETTLE {
            self.mark = wal;
        }
    }

    /// The walsenders confirmed synchronous: `sync` state and flushed past the mark.
    pub fn confirmed(&self, walsenders: &[Walsender]) -> BTreeSet<String> {
        let Some(mark) = self.mark else {
            return BTreeSet::new();
        };
        walsenders
            .iter()
            .filter(|w| w.synchronous && w.flush.is_some_and(|f| f >= mark))
            .map(|w| w.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_standby_leaves_the_record_before_postgres_stops_waiting_for_it() {
        let step = next_step(
            &set(&["a"]),
            &Waits::For(set(&["a"])),
            &Waits::For(set(&["b"])),
            &set(&["a", "b"]),
        );
        assert_eq!(step, SyncStep::Record(set(&[])));
        let step = next_step(
            &set(&[]),
            &Waits::For(set(&["a"])),
            &Waits::For(set(&["b"])),
            &set(&[]),
        );
        assert_eq!(step, SyncStep::Configure(Waits::For(set(&["b"]))));
        // Not confirmed yet: nothing joins.
        let step = next_step(
            &set(&[]),
            &Waits::For(set(&["b"])),
            &Waits::For(set(&["b"])),
            &set(&[]),
        );
        assert_eq!(step, SyncStep::Keep);
        let step = next_step(
            &set(&[]),
            &Waits::For(set(&["b"])),
            &Waits::For(set(&["b"])),
            &set(&["b"]),
        );
        assert_eq!(step, SyncStep::Record(set(&["b"])));
    }

    #[test]
    fn any_standby_names_nobody() {
        let step = next_step(&set(&["a"]), &Waits::Any, &Waits::Any, &set(&["a"]));
        assert_eq!(step, SyncStep::Record(set(&[])));
        assert_eq!(
            next_step(&set(&[]), &Waits::Any, &Waits::Any, &set(&["a"])),
            SyncStep::Keep
        );
    }

    #[test]
    fn the_setting_round_trips_and_foreign_values_do_not_parse() {
        let waits = Waits::For(set(&["node-1", "we\"ird"]));
        assert_eq!(waits.setting(), "FIRST 2 (\"node-1\", \"we\"\"ird\")");
        assert_eq!(Waits::parse(&waits.setting()), Some(waits));
        assert_eq!(Waits::parse(""), Some(Waits::For(set(&[]))));
        assert_eq!(Waits::parse("*"), Some(Waits::Any));
        assert_eq!(Waits::parse("ANY 1 (a, b)"), None);
        assert_eq!(Waits::parse("FIRST 1 (\"a\", \"b\")"), None);
        assert_eq!(Waits::parse("a, b"), None);
    }

    #[test]
    fn choose_keeps_current_standbys_then_prefers_the_most_advanced() {
        let w = |name: &str, flush: u64, streaming: bool| Walsender {
            name: name.into(),
            streaming,
            synchronous: false,
            flush: Some(Lsn(flush)),
        };
        let senders = [
            w("a", 10, true),
            w("b", 30, true),
            w("c", 20, true),
            w("d", 99, false),
        ];
        let eligible = set(&["a", "b", "c", "d"]);
        let none = Waits::For(set(&[]));
        assert_eq!(
            choose(SyncMode::On, 1, &none, &senders, &eligible),
            Waits::For(set(&["b"]))
        );
        assert_eq!(
            choose(
                SyncMode::On,
                1,
                &Waits::For(set(&["a"])),
                &senders,
                &eligible
            ),
            Waits::For(set(&["a"]))
        );
        assert_eq!(
            choose(SyncMode::On, 2, &none, &senders, &set(&["a", "c"])),
            Waits::For(set(&["a", "c"]))
        );
        assert_eq!(choose(SyncMode::On, 1, &none, &[], &eligible), none);
        assert_eq!(
            choose(SyncMode::Strict, 1, &none, &[], &eligible),
            Waits::Any
        );
    }

    #[test]
    fn the_record_round_trips_through_metadata() {
        let state = SyncState {
            token: 7,
            primary: "p".into(),
            standbys: set(&["a", "b,c"]),
        };
        assert_eq!(SyncState::from_meta(&state.to_meta()), Some(state.clone()));
        assert!(state.names("p") && state.names("b,c") && !state.names("b"));
        let mut broken = state.to_meta();
        broken.insert(META_SYNC_STANDBYS.into(), "not json".into());
        assert_eq!(SyncState::from_meta(&broken), None);
    }

    fn waits() -> impl Strategy<Value = Waits> {
        prop_oneof![
            1 => Just(Waits::Any),
            4 => proptest::collection::btree_set("[abcd]", 0..4).prop_map(Waits::For),
        ]
    }

    proptest! {
        /// The state machine, driven by any sequence of wishes and confirmations: the record
        /// only ever names members PostgreSQL waits for, a member joins only when confirmed
        /// under the current setting, and a stable wish with every member confirmed is
        /// reached in at most three steps.
        #[test]
        fn the_record_never_names_a_member_postgres_did_not_wait_for(
            script in proptest::collection::vec(
                (waits(), proptest::collection::btree_set("[abcd]", 0..4)),
                1..30,
            )
        ) {
            let mut recorded = BTreeSet::new();
            let mut configured = Waits::For(BTreeSet::new());
            // Confirmed since the last configuration change (a change resets it).
            let mut confirmed_since_change: BTreeSet<String> = BTreeSet::new();
            for (desired, confirming) in &script {
                confirmed_since_change.extend(
                    confirming.intersection(&configured.members()).cloned(),
                );
                match next_step(&recorded, &configured, desired, &confirmed_since_change) {
                    SyncStep::Keep => {}
                    SyncStep::Record(next) => {
                        for joined in next.difference(&recorded) {
                            prop_assert!(confirmed_since_change.contains(joined));
                        }
                        recorded = next;
                    }
                    SyncStep::Configure(next) => {
                        prop_assert!(recorded.is_subset(&next.members()));
                        configured = next;
                        confirmed_since_change.clear();
                    }
                }
                prop_assert!(recorded.is_subset(&configured.members()));
            }
            // Liveness: hold the last wish, confirm everyone.
            let desired = script.last().map(|(d, _)| d.clone()).unwrap_or(Waits::Any);
            for _ in 0..3 {
                let all = configured.members();
                match next_step(&recorded, &configured, &desired, &all) {
                    SyncStep::Keep => {}
                    SyncStep::Record(next) => recorded = next,
                    SyncStep::Configure(next) => configured = next,
                }
            }
            prop_assert_eq!(&configured, &desired);
            prop_assert_eq!(recorded, desired.members());
        }

        #[test]
        fn any_set_of_names_round_trips_through_the_setting(
            names in proptest::collection::btree_set("[a-z\"' ,()-]{1,12}", 0..5)
        ) {
            let waits = Waits::For(names);
            prop_assert_eq!(Waits::parse(&waits.setting()), Some(waits));
        }
    }
}
