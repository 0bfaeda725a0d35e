//! The HA level a node delivers: computed from what is configured AND what is true now.
//!
//! | level | needs (configured and working now) | availability target |
//! | --- | --- | --- |
//! | basic | health checks | 99.5 % |
//! | standard | health + automatic failover (not paused) + replication | 99.9 % |
//! | enterprise | all five: and an election with ≥ 2 live members, and DR with a verified backup inside its RPO | 99.99 % |

use ha_core::HaLevel;
use serde::Serialize;

/// What the level is computed from: one snapshot of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LevelFacts {
    /// Health checks configured.
    pub health_configured: bool,
    /// The health checker runs.
    pub health_running: bool,
    /// Automatic failover configured.
    pub failover_configured: bool,
    /// The failover manager runs.
    pub failover_running: bool,
    /// Automatic failover is paused for maintenance.
    pub paused: bool,
    /// Replication (PostgreSQL, Sentinel or file sync) configured.
    pub replication_configured: bool,
    /// Every configured replication part reports healthy or degraded (not down/unknown).
    pub replication_working: bool,
    /// An election is configured (not `single_node`).
    pub election_configured: bool,
    /// Live members of the election as last seen (`None`: not known yet).
    pub live_members: Option<usize>,
    /// Scheduled backups configured.
    pub dr_configured: bool,
    /// Every backup source has a verified backup inside its RPO.
    pub dr_within_rpo: bool,
}

/// The level a node delivers, the level its config asks for, and why they differ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LevelReport {
    /// What the node delivers now.
    pub level: HaLevel,
    /// What its configuration could deliver with everything working.
    pub configured: HaLevel,
    /// The availability the delivered level targets, in percent.
    pub target_percent: f64,
    /// Why the delivered level is below the configured one (empty when they agree), e.g.
    /// `only 1 live member`.
    pub reasons: Vec<String>,
}

impl LevelReport {
    /// `standard: only 1 live member` — the level and, if lower than configured, why.
    pub fn summary(&self) -> String {
        if self.reasons.is_empty() {
            self.level.to_string()
        } else {
            format!("{}: {}", self.level, self.reasons.join("; "))
        }
    }
}

/// Computes the level from `facts`.
pub fn compute(facts: &LevelFacts) -> LevelReport {
    let configured = configured_level(facts);
    let mut reasons = Vec::new();
    let basic = facts.health_configured && facts.health_running;
    if facts.health_configured && !facts.health_running {
        reasons.push("health checks are not running".to_owned());
    }
    let mut standard = basic && facts.failover_configured && facts.replication_configured;
    if configured >= HaLevel::Standard {
        if !facts.failover_running {
            reasons.push("the failover manager is not running".to_owned());
            standard = false;
        } else if facts.paused {
            reasons.push("automatic failover is paused".to_owned());
            standard = false;
        }
        if !facts.replication_working {
            reasons.push("replication is not working".to_owned());
            standard = false;
        }
    }
    let mut enterprise = standard && facts.election_configured && facts.dr_configured;
    if configured == HaLevel::Enterprise {
        match facts.live_members {
            Some(n) if n >= 2 => {}
            Some(n) => {
                reasons.push(format!(
                    "only {n} live member{}",
                    if n == 1 { "" } else { "s" }
                ));
                enterprise = false;
            }
            None => {
                reasons.push("election members not known yet".to_owned());
                enterprise = false;
            }
        }
        if !facts.dr_within_rpo {
            reasons.push("no verified backup inside the RPO".to_owned());
            enterprise = false;
        }
    }
    let level = if enterprise {
        HaLevel::Enterprise
    } else if standard {
        HaLevel::Standard
    } else if basic {
        HaLevel::Basic
    } else {
        HaLevel::None
    };
    LevelReport {
        level,
        configured,
        target_percent: level.availability_target_percent(),
        reasons,
    }
}

fn configured_level(facts: &LevelFacts) -> HaLevel {
    if !facts.health_configured {
        HaLevel::None
    } else if !(facts.failover_configured && facts.replication_configured) {
        HaLevel::Basic
    } else if !(facts.election_configured && facts.dr_configured) {
        HaLevel::Standard
    } else {
        HaLevel::Enterprise
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everything() -> LevelFacts {
        LevelFacts {
            health_configured: true,
            health_running: true,
            failover_configured: true,
            failover_running: true,
            paused: false,
            replication_configured: true,
            replication_working: true,
            election_configured: true,
            live_members: Some(3),
            dr_configured: true,
            dr_within_rpo: true,
        }
    }

    #[test]
    fn the_level_table() {
        let none = LevelFacts::default();
        assert_eq!(compute(&none).level, HaLevel::None);
        assert_eq!(compute(&none).target_percent, 0.0);

        let basic = LevelFacts {
            health_configured: true,
            health_running: true,
            ..LevelFacts::default()
        };
        let report = compute(&basic);
        assert_eq!(
            (report.level, report.configured),
            (HaLevel::Basic, HaLevel::Basic)
        );
        assert_eq!(report.target_percent, 99.5);
        assert!(report.reasons.is_empty());

        let standard = LevelFacts {
            election_configured: false,
            dr_configured: false,
            ..everything()
        };
        assert_eq!(compute(&standard).level, HaLevel::Standard);
        assert_eq!(compute(&standard).target_percent, 99.9);

        let report = compute(&everything());
        assert_eq!(report.level, HaLevel::Enterprise);
        assert_eq!(report.target_percent, 99.99);
        assert_eq!(report.summary(), "enterprise");
    }

    #[test]
    fn an_enterprise_config_reports_what_it_delivers_and_why() {
        let one_member = LevelFacts {
            live_members: Some(1),
            ..everything()
        };
        let report = compute(&one_member);
        assert_eq!(report.configured, HaLevel::Enterprise);
        assert_eq!(report.level, HaLevel::Standard);
        assert_eq!(report.summary(), "standard: only 1 live member");

        let stale_backup = LevelFacts {
            dr_within_rpo: false,
            ..everything()
        };
        assert_eq!(
            compute(&stale_backup).summary(),
            "standard: no verified backup inside the RPO"
        );

        let paused = LevelFacts {
            paused: true,
            ..everything()
        };
        let report = compute(&paused);
        assert_eq!(report.level, HaLevel::Basic);
        assert!(
            report
                .reasons
                .contains(&"automatic failover is paused".to_owned())
        );

        let broken = LevelFacts {
            replication_working: false,
            ..everything()
        };
        assert_eq!(compute(&broken).level, HaLevel::Basic);

        let checks_down = LevelFacts {
            health_running: false,
            ..everything()
        };
        assert_eq!(compute(&checks_down).level, HaLevel::None);
    }
}
