//! What each member's agent publishes about its database, and the candidate rule: only the
//! most advanced eligible member campaigns.
//!
//! # The report
//!
//! Every agent publishes a [`MemberReport`] in its election member metadata (the keys
//! below, refreshed at every membership heartbeat): role, state, timeline, received and
//! replayed WAL positions (a replica), the current WAL position (a primary), whether it may
//! lead on its own merits (`pg_eligible`: reachable; a primary with no pending rejoin, or a
//! replica with replay not paused and within the lag bound), the `nofailover` and `nosync`
//! tags, and how old the agent's last look at its database was.
//!
//! # The rule ([`defer_to`])
//!
//! A replica campaigns only if no *live, fresh, eligible* member outranks it:
//!
//! - an eligible primary outranks every replica (a healthy primary is kept, not replaced);
//! - among replicas, the later timeline, then the higher **replayed** position wins (replay
//!   backlog counts, because a replica promoted before it replayed what it received would
//!   serve reads and take writes on older data); ties go to the smaller member name.
//!
//! Members that are not eligible, tagged `nofailover`, without a position, or whose report is
//! older than `stale_after` are ignored (a member whose heartbeats stopped is not listed at
//! all). A member tagged `nofailover` never campaigns itself.
//!
//! The lag bound (`max_lag_on_failover`) is judged against the freshest primary position
//! known: the maximum of what the agent observed itself (the WAL receiver's
//! `latest_end_lsn`), the primary positions members published (`pg_wal_lsn`), and every
//! position another member received — a replica that received `X` proves the primary reached
//! `X`. It is never "no bound": with nothing else known, the replica's own received position
//! is the reference, so its own replay backlog counts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::Lsn;
use crate::pg::agent::PgRole;

/// Member metadata key: `primary`, `replica` or `unreachable`.
pub const META_ROLE: &str = "pg_role";
/// Member metadata key: a short state (`writable`, `read_only`, `demoted`, `streaming`,
/// `not_streaming`, `replay_paused`, `unreachable`).
pub const META_STATE: &str = "pg_state";
/// Member metadata key: the timeline.
pub const META_TIMELINE: &str = "pg_timeline";
/// Member metadata key: a replica's last received (flushed) WAL position.
pub const META_RECEIVED: &str = "pg_received_lsn";
/// Member metadata key: a replica's last replayed WAL position.
pub const META_REPLAYED: &str = "pg_replayed_lsn";
/// Member metadata key: a primary's current WAL position.
pub const META_WAL: &str = "pg_wal_lsn";
/// Member metadata key: `true` when the member may lead on its own merits.
pub const META_ELIGIBLE: &str = "pg_eligible";
/// Member metadata key: `true` for a member that must never be promoted.
pub const META_NOFAILOVER: &str = "pg_nofailover";
/// Member metadata key: `true` for a member that must never be a synchronous standby.
pub const META_NOSYNC: &str = "pg_nosync";
/// Member metadata key: `true` for a replica the latest synchronous-replication record names
/// as a synchronous standby (informational: `hactl list` shows it).
pub const META_SYNC_STANDBY: &str = "pg_sync_standby";
/// Member metadata key: milliseconds since the agent last looked at its database.
pub const META_AGE: &str = "pg_report_age_ms";

/// One member's published view of its database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberReport {
    /// The member (its node id): the tie-break.
    pub member: String,
    /// Its database's role.
    pub role: PgRole,
    /// A short state word (see [`META_STATE`]).
    pub state: String,
    /// The timeline.
    pub timeline: Option<u32>,
    /// Received WAL position (a replica).
    pub received: Option<Lsn>,
    /// Replayed WAL position (a replica).
    pub replayed: Option<Lsn>,
    /// Current WAL position (a primary).
    pub wal: Option<Lsn>,
    /// May lead on its own merits.
    pub eligible: bool,
    /// Tagged never to be promoted.
    pub nofailover: bool,
    /// Tagged never to be chosen as a synchronous standby.
    pub nosync: bool,
    /// Named a synchronous standby by the latest sync record it read.
    pub sync_standby: bool,
    /// Age of the agent's last look at its database when published.
    pub age: Duration,
}

impl MemberReport {
    /// The metadata entries for this report (`member` is the member's own name, not
    /// published).
    pub fn to_meta(&self) -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        let role = match self.role {
            PgRole::Primary => "primary",
            PgRole::Replica => "replica",
            PgRole::Unreachable => "unreachable",
        };
        meta.insert(META_ROLE.into(), role.into());
        meta.insert(META_STATE.into(), self.state.clone());
        let mut put = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                meta.insert(key.into(), value);
            }
        };
        put(META_TIMELINE, self.timeline.map(|t| t.to_string()));
        put(META_RECEIVED, self.received.map(|l| l.to_string()));
        put(META_REPLAYED, self.replayed.map(|l| l.to_string()));
        put(META_WAL, self.wal.map(|l| l.to_string()));
        meta.insert(META_ELIGIBLE.into(), self.eligible.to_string());
        meta.insert(META_NOFAILOVER.into(), self.nofailover.to_string());
        meta.insert(META_NOSYNC.into(), self.nosync.to_string());
        if self.sync_standby {
            meta.insert(META_SYNC_STANDBY.into(), "true".into());
        }
        meta.insert(META_AGE.into(), self.age.as_millis().to_string());
        meta
    }

    /// The report `member` published; `None` if it published none (no agent) or its role
    /// does not parse. Unparseable positions read as absent.
    pub fn from_meta(member: &str, meta: &BTreeMap<String, String>) -> Option<Self> {
        let role = match meta.get(META_ROLE)?.as_str() {
            "primary" => PgRole::Primary,
            "replica" => PgRole::Replica,
            "unreachable" => PgRole::Unreachable,
            _ => return None,
        };
        let lsn = |key: &str| meta.get(key).and_then(|v| v.parse::<Lsn>().ok());
        let flag = |key: &str| meta.get(key).is_some_and(|v| v == "true");
        Some(Self {
            member: member.to_owned(),
            role,
            state: meta.get(META_STATE).cloned().unwrap_or_default(),
            timeline: meta.get(META_TIMELINE).and_then(|t| t.parse().ok()),
            received: lsn(META_RECEIVED),
            replayed: lsn(META_REPLAYED),
            wal: lsn(META_WAL),
            eligible: flag(META_ELIGIBLE),
            nofailover: flag(META_NOFAILOVER),
            nosync: flag(META_NOSYNC),
            sync_standby: flag(META_SYNC_STANDBY),
            // A missing age reads as stale.
            age: meta
                .get(META_AGE)
                .and_then(|a| a.parse().ok())
                .map_or(Duration::MAX, Duration::from_millis),
        })
    }

    /// Whether this report takes part in the ranking: eligible, not `nofailover`, fresh,
    /// and a primary or a replica with a replayed position.
    pub fn counts(&self, stale_after: Duration) -> bool {
        self.eligible
            && !self.nofailover
            && self.age <= stale_after
            && match self.role {
                PgRole::Primary => true,
                PgRole::Replica => self.replayed.is_some(),
                PgRole::Unreachable => false,
            }
    }

    /// Whether this report outranks `other` (both counting).
    fn outranks(&self, other: &Self) -> bool {
        match (self.role, other.role) {
            (PgRole::Primary, PgRole::Replica) => true,
            (PgRole::Replica, PgRole::Primary) => false,
            _ => {
                // A later timeline first: positions on an abandoned history do not compare.
                let a = (self.timeline, self.replayed.or(self.wal));
                let b = (other.timeline, other.replayed.or(other.wal));
                a > b || (a == b && self.member < other.member)
            }
        }
    }

    /// The highest primary position this report proves: a primary's current position, or
    /// what a replica received (the primary had written it).
    pub fn proves_primary_at(&self) -> Option<Lsn> {
        self.wal.max(self.received).max(self.replayed)
    }
}

/// Why the replica `me` must not campaign, given the other members' reports; `None` when it
/// is the most advanced eligible member (see the [module docs](self)). `me` must itself
/// count (eligible, fresh, with a position) for `None`.
pub fn defer_to(
    me: &MemberReport,
    peers: &[MemberReport],
    stale_after: Duration,
) -> Option<String> {
    if me.nofailover {
        return Some("tagged nofailover".into());
    }
    if !me.counts(stale_after) {
        return Some("not eligible on its own".into());
    }
    let better: Vec<&MemberReport> = peers
        .iter()
        .filter(|p| p.member != me.member && p.counts(stale_after) && p.outranks(me))
        .collect();
    if better.is_empty() {
        return None;
    }
    // Name every eligible primary, and the best of the replicas ahead.
    let mut reasons: Vec<String> = better
        .iter()
        .filter(|p| p.role == PgRole::Primary)
        .map(|p| format!("{} is an eligible primary", p.member))
        .collect();
    let best_replica = better
        .iter()
        .filter(|p| p.role == PgRole::Replica)
        .copied()
        .reduce(|a, b| if b.outranks(a) { b } else { a });
    if let Some(best) = best_replica {
        let show = |l: Option<Lsn>| l.map_or_else(|| "?".into(), |l| l.to_string());
        reasons.push(format!(
            "{} replayed {} (this one {})",
            best.member,
            show(best.replayed),
            show(me.replayed)
        ));
    }
    Some(format!("deferring: {}", reasons.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STALE: Duration = Duration::from_secs(5);

    fn replica(name: &str, replayed: u64) -> MemberReport {
        MemberReport {
            member: name.into(),
            role: PgRole::Replica,
            state: "streaming".into(),
            timeline: Some(1),
            received: Some(Lsn(replayed + 10)),
            replayed: Some(Lsn(replayed)),
            wal: None,
            eligible: true,
            nofailover: false,
            nosync: false,
            sync_standby: false,
            age: Duration::from_millis(100),
        }
    }

    #[test]
    fn the_report_round_trips_through_member_metadata() {
        let mut r = replica("b", 4096);
        assert_eq!(MemberReport::from_meta("b", &r.to_meta()), Some(r.clone()));
        r.role = PgRole::Primary;
        r.wal = Some(Lsn(9000));
        r.received = None;
        r.replayed = None;
        r.nofailover = true;
        assert_eq!(MemberReport::from_meta("b", &r.to_meta()), Some(r));
        assert_eq!(MemberReport::from_meta("x", &BTreeMap::new()), None);
    }

    #[test]
    fn a_more_advanced_replica_an_eligible_primary_and_a_tie_break_defer() {
        let me = replica("c", 100);
        assert_eq!(defer_to(&me, &[], STALE), None);
        assert!(defer_to(&me, &[replica("b", 200)], STALE).is_some());
        assert_eq!(defer_to(&me, &[replica("b", 50)], STALE), None);
        // Same position: the smaller name wins.
        assert!(defer_to(&me, &[replica("b", 100)], STALE).is_some());
        assert_eq!(defer_to(&me, &[replica("d", 100)], STALE), None);
        let mut primary = replica("a", 0);
        primary.role = PgRole::Primary;
        primary.wal = Some(Lsn(10));
        assert!(defer_to(&me, &[primary.clone()], STALE).is_some());
        primary.eligible = false;
        assert_eq!(defer_to(&me, &[primary], STALE), None);
        // A replica already on the new timeline outranks one further along the old one.
        let mut followed = replica("d", 50);
        followed.timeline = Some(2);
        assert!(defer_to(&me, &[followed], STALE).is_some());
        // Stale, nofailover or ineligible peers are ignored.
        let mut stale = replica("b", 900);
        stale.age = Duration::from_secs(6);
        let mut tagged = replica("b", 900);
        tagged.nofailover = true;
        let mut paused = replica("b", 900);
        paused.eligible = false;
        assert_eq!(defer_to(&me, &[stale, tagged, paused], STALE), None);
        let mut me_tagged = me;
        me_tagged.nofailover = true;
        assert!(defer_to(&me_tagged, &[], STALE).is_some());
    }

    fn arb_report(i: usize) -> impl Strategy<Value = MemberReport> {
        (
            0u64..4,
            any::<bool>(),
            any::<bool>(),
            0u64..8,
            prop_oneof![Just(None), (0u64..5).prop_map(Some)],
        )
            .prop_map(move |(replayed, eligible, nofailover, age_s, received)| {
                MemberReport {
                    member: format!("m{i}"),
                    role: PgRole::Replica,
                    state: "streaming".into(),
                    timeline: Some(1),
                    received: received.map(Lsn),
                    replayed: Some(Lsn(replayed)),
                    wal: None,
                    eligible,
                    nofailover,
                    nosync: false,
                    sync_standby: false,
                    age: Duration::from_secs(age_s),
                }
            })
    }

    proptest! {
        /// Among any set of replica reports, exactly the most advanced eligible, fresh,
        /// untagged one (ties: smallest name) is a candidate — or none if none counts.
        #[test]
        fn exactly_the_most_advanced_eligible_member_is_a_candidate(
            reports in (1usize..7).prop_flat_map(|n| {
                (0..n).map(arb_report).collect::<Vec<_>>()
            })
        ) {
            let candidates: Vec<&str> = reports
                .iter()
                .filter(|me| defer_to(me, &reports, STALE).is_none())
                .map(|r| r.member.as_str())
                .collect();
            let best = reports
                .iter()
                .filter(|r| r.eligible && !r.nofailover && r.age <= STALE)
                .max_by(|a, b| a.replayed.cmp(&b.replayed).then(b.member.cmp(&a.member)));
            match best {
                Some(best) => prop_assert_eq!(candidates, vec![best.member.as_str()]),
                None => prop_assert!(candidates.is_empty()),
            }
        }
    }
}
