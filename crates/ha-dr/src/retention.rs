//! Retention: which backups to keep, with restic's calendar-bucket semantics.
//!
//! Backups are taken newest first. Each rule `keep_<period> = n` walks them and keeps the
//! newest backup of each of the last `n` periods (UTC hours, days, ISO weeks, months, years)
//! that *contain* a backup — periods without backups do not count. `keep_last = n` keeps the
//! `n` newest. Rules are ORed, each kept backup says which rules keep it, and the newest backup
//! is always kept. An empty policy keeps everything (nothing is deleted by accident).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use ha_dr::{BackupId, RetentionPolicy, retention};
//!
//! let day = Duration::from_secs(86_400);
//! let start = SystemTime::UNIX_EPOCH + 20_000 * day;
//! // Two backups a day for ten days.
//! let backups: Vec<(BackupId, SystemTime)> = (0..20u32)
//!     .map(|i| (BackupId::parse(&format!("b{i:02}")).unwrap(), start + day / 2 * i))
//!     .collect();
//! let policy = RetentionPolicy { keep_daily: 7, ..RetentionPolicy::default() };
//! let decisions = retention::apply(&policy, &backups);
//! let kept: Vec<_> = decisions.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
//! assert_eq!(kept, ["b19", "b17", "b15", "b13", "b11", "b09", "b07"]);
//! assert_eq!(decisions[0].reasons, ["newest", "daily"]);
//! ```

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::format::BackupId;

/// How many backups to keep, per rule (0: the rule is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    /// The n newest backups.
    pub keep_last: u32,
    /// The newest backup in each of the last n hours that have backups.
    pub keep_hourly: u32,
    /// … days …
    pub keep_daily: u32,
    /// … ISO weeks …
    pub keep_weekly: u32,
    /// … months …
    pub keep_monthly: u32,
    /// … years.
    pub keep_yearly: u32,
}

impl RetentionPolicy {
    /// Whether every rule is off.
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, n)| *n == 0)
    }

    fn rules(&self) -> [(Rule, u32); 6] {
        [
            (Rule::Last, self.keep_last),
            (Rule::Hourly, self.keep_hourly),
            (Rule::Daily, self.keep_daily),
            (Rule::Weekly, self.keep_weekly),
            (Rule::Monthly, self.keep_monthly),
            (Rule::Yearly, self.keep_yearly),
        ]
    }
}

impl ha_core::config::Validate for RetentionPolicy {
    fn validate(&self) -> Result<(), ha_core::ConfigError> {
        ha_core::config::ensure(!self.is_empty(), "keep_*", || {
            "at least one keep rule must be greater than zero".into()
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    const fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// The period `at` falls in, as a number that grows with time. `index` is the backup's
    /// position (newest first), its own bucket for `keep_last`.
    fn bucket(self, at: SystemTime, index: usize) -> i64 {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let t = time::OffsetDateTime::from_unix_timestamp(secs)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let (y, m, d, h) = (
            i64::from(t.year()),
            i64::from(u8::from(t.month())),
            i64::from(t.day()),
            i64::from(t.hour()),
        );
        match self {
            Rule::Last => -(i64::try_from(index).unwrap_or(i64::MAX)),
            Rule::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Rule::Daily => (y * 100 + m) * 100 + d,
            Rule::Weekly => {
                let (iso_year, week, _) = t.to_iso_week_date();
                i64::from(iso_year) * 100 + i64::from(week)
            }
            Rule::Monthly => y * 100 + m,
            Rule::Yearly => y,
        }
    }
}

/// What retention decided about one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The backup.
    pub id: BackupId,
    /// When it was made.
    #[serde(with = "humantime_serde")]
    pub created: SystemTime,
    /// Whether it stays.
    pub keep: bool,
    /// Why it stays: `newest`, `last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`, or
    /// `no policy`. Empty for backups to remove.
    pub reasons: Vec<&'static str>,
}

/// Applies `policy` to `backups` (one group: one source); returns a decision per backup,
/// newest first (ties broken by id, greater first).
pub fn apply(policy: &RetentionPolicy, backups: &[(BackupId, SystemTime)]) -> Vec<Decision> {
    let mut sorted: Vec<&(BackupId, SystemTime)> = backups.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let rules = policy.rules();
    let mut remaining: Vec<u32> = rules.iter().map(|(_, n)| *n).collect();
    let mut last: Vec<Option<i64>> = vec![None; rules.len()];
    let empty = policy.is_empty();
    sorted
        .into_iter()
        .enumerate()
        .map(|(index, (id, created))| {
            let mut reasons = Vec::new();
            if empty {
                reasons.push("no policy");
            }
            if index == 0 {
                reasons.push("newest");
            }
            for (slot, (rule, _)) in rules.iter().enumerate() {
                if remaining[slot] == 0 {
                    continue;
                }
                let bucket = rule.bucket(*created, index);
                if last[slot] != Some(bucket) {
                    last[slot] = Some(bucket);
                    remaining[slot] -= 1;
                    reasons.push(rule.name());
                }
            }
            Decision {
                id: id.clone(),
                created: *created,
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    /// The rules as the issue states them, computed differently: for each rule, group the
    /// backups by period, take the `n` newest periods that hold backups, keep the newest
    /// backup of each.
    fn reference(
        policy: &RetentionPolicy,
        backups: &[(BackupId, SystemTime)],
    ) -> BTreeMap<BackupId, BTreeSet<&'static str>> {
        let mut sorted = backups.to_vec();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let mut kept: BTreeMap<BackupId, BTreeSet<&'static str>> = BTreeMap::new();
        if policy.is_empty() {
            for (id, _) in &sorted {
                kept.entry(id.clone()).or_default().insert("no policy");
            }
        }
        if let Some((id, _)) = sorted.first() {
            kept.entry(id.clone()).or_default().insert("newest");
        }
        for (rule, n) in policy.rules() {
            // period -> newest backup in it; periods ordered newest first.
            let mut periods: Vec<(i64, &BackupId)> = Vec::new();
            for (index, (id, at)) in sorted.iter().enumerate() {
                let period = rule.bucket(*at, index);
                if !periods.iter().any(|(p, _)| *p == period) {
                    periods.push((period, id));
                }
            }
            for (_, id) in periods.into_iter().take(n as usize) {
                kept.entry(id.clone()).or_default().insert(rule.name());
            }
        }
        kept
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn apply_matches_the_reference(
            // Up to 60 backups over about three years, clustered so that buckets repeat.
            gaps in proptest::collection::vec(
                prop_oneof![0u64..3_600, 3_600u64..200_000, 200_000u64..5_000_000],
                0..60,
            ),
            keep_last in 0u32..4,
            keep_hourly in 0u32..4,
            keep_daily in 0u32..8,
            keep_weekly in 0u32..5,
            keep_monthly in 0u32..13,
            keep_yearly in 0u32..3,
        ) {
            let policy = RetentionPolicy {
                keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
            };
            let mut at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
            let backups: Vec<(BackupId, SystemTime)> = gaps
                .iter()
                .enumerate()
                .map(|(i, gap)| {
                    at += Duration::from_secs(*gap);
                    (BackupId::parse(&format!("b{i:03}")).unwrap(), at)
                })
                .collect();
            let decisions = apply(&policy, &backups);
            prop_assert_eq!(decisions.len(), backups.len());
            let got: BTreeMap<BackupId, BTreeSet<&'static str>> = decisions
                .iter()
                .filter(|d| d.keep)
                .map(|d| (d.id.clone(), d.reasons.iter().copied().collect()))
                .collect();
            prop_assert_eq!(got, reference(&policy, &backups));
            if let Some(first) = decisions.first() {
                prop_assert!(first.keep, "the newest is always kept");
            }
        }
    }

    #[test]
    fn empty_weeks_do_not_use_up_the_weekly_count() {
        let day = Duration::from_secs(86_400);
        // 2024-01-01 is a Monday. Backups in ISO weeks 1, 2 and then 10.
        let monday = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200);
        let backups = [
            (BackupId::parse("w01").unwrap(), monday + day),
            (BackupId::parse("w02").unwrap(), monday + 8 * day),
            (BackupId::parse("w10").unwrap(), monday + 64 * day),
        ];
        let policy = RetentionPolicy {
            keep_weekly: 3,
            ..RetentionPolicy::default()
        };
        assert!(apply(&policy, &backups).iter().all(|d| d.keep));
        let policy = RetentionPolicy {
            keep_weekly: 2,
            ..RetentionPolicy::default()
        };
        let kept: Vec<_> = apply(&policy, &backups)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(kept, ["w10", "w02"]);
    }
}
