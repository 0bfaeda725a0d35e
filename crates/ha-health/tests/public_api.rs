//! Compiles against every public path of `ha-health`, so a rename or a lost re-export breaks
//! this test before it breaks a user.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_core::Validate;
use ha_health::anomaly::{self, Anomaly, Rule};
use ha_health::baseline::{Baseline, BaselineConfig, Observation};
use ha_health::error::Error;
use ha_health::phi::{self, PhiAccrualDetector, PhiConfig, Suspicion};
use ha_health::threshold::{Outcome, ThresholdConfig, ThresholdState, Transition};
use ha_health::{check, checker, checks, config, graph, report, rollup};
use tokio::time::Instant;

#[test]
fn every_checker_path_is_reachable() {
    let _: Option<&dyn check::HealthCheck> = None;
    let _: check::CheckResult = ha_health::CheckResult::healthy("ok");
    let _: fn() -> checker::HealthCheckerBuilder = ha_health::HealthChecker::builder;
    let _: Option<checker::HealthChecker> = None;
    let _: fn(checker::HealthCheckerBuilder) -> Result<ha_health::HealthChecker, Error> =
        checker::HealthCheckerBuilder::build;
    // The checker is a component the node starts with its context.
    let _: Option<std::sync::Arc<dyn ha_core::Component>> =
        None::<std::sync::Arc<ha_health::HealthChecker>>.map(|c| c as _);
    let _: config::CheckConfig = ha_health::CheckConfig::default();
    let _: config::CheckerConfig = ha_health::CheckerConfig::default();
    let _: Option<graph::DependencyGraph> = None::<ha_health::DependencyGraph>;
    let _: Option<graph::Resolved> = None;
    let _: Option<report::HealthReport> = None::<ha_health::HealthReport>;
    let _: Option<report::CheckReport> = None::<ha_health::CheckReport>;
    let _: Option<report::LatencySummary> = None;
    let _: Option<report::Timestamp> = None;
    let _ = rollup::rollup([]);
    let _ = rollup::contribution(ha_core::Criticality::Low, ha_core::Status::Unhealthy);
    #[cfg(feature = "redis")]
    let _: Option<checks::RedisCheck> = None::<ha_health::RedisCheck>;
    #[cfg(feature = "postgres")]
    let _: Option<checks::PostgresCheck> = None::<ha_health::PostgresCheck>;
    let _: Option<checks::TcpCheck> = None::<ha_health::TcpCheck>;
    #[cfg(feature = "http")]
    let _: Option<checks::HttpCheck> = None::<ha_health::HttpCheck>;
    let _: Option<checks::CommandCheck> = None::<ha_health::CommandCheck>;
    let _: Option<checks::DiskCheck> = None::<ha_health::DiskCheck>;
    #[cfg(feature = "system")]
    let _: Option<checks::MemoryCheck> = None::<ha_health::MemoryCheck>;
    #[cfg(feature = "system")]
    let _: Option<checks::CpuCheck> = None::<ha_health::CpuCheck>;
    #[cfg(feature = "redis")]
    let _: Option<checks::RedisRole> = None::<ha_health::RedisRole>;
    let _: Option<checks::UsageThresholds> = None::<ha_health::UsageThresholds>;
    let f = checks::FnCheck::new("f", || async { ha_health::CheckResult::healthy("ok") });
    let _: &dyn ha_health::HealthCheck = &f;
}

#[test]
fn every_public_path_is_reachable() {
    // Root re-exports name the same types as the module paths.
    let _: fn(PhiConfig) -> Result<ha_health::PhiAccrualDetector, ha_health::Error> =
        PhiAccrualDetector::new;
    let _: fn(BaselineConfig) -> Result<ha_health::Baseline, Error> = Baseline::new;
    let _: fn(ThresholdConfig) -> Result<ha_health::ThresholdState, Error> = ThresholdState::new;
    let _: Option<ha_health::Transition> = None::<Transition>;
    let _: Option<ha_health::Anomaly> = None::<Anomaly>;
    let _: ha_health::Outcome = Outcome::Degraded;
    let _: ha_health::Suspicion = Suspicion::Suspected;
    let _: ha_health::Observation = Observation::failure(Duration::ZERO);
    let _: Vec<ha_health::Rule> = Rule::defaults();

    // Every config validates by default, through the shared `Validate` trait.
    assert!(PhiConfig::default().validate().is_ok());
    assert!(BaselineConfig::default().validate().is_ok());
    assert!(ThresholdConfig::default().validate().is_ok());
    assert!(Rule::defaults().iter().all(|r| r.validate().is_ok()));

    let now = Instant::now();
    let baseline = Baseline::new(BaselineConfig::default()).unwrap();
    assert!(
        anomaly::check(
            &Rule::defaults(),
            &baseline,
            now,
            &Observation::success(Duration::ZERO)
        )
        .is_empty()
    );
    assert!((phi::phi(1000.0, 1000.0, 100.0) - std::f64::consts::LOG10_2).abs() < 1e-12);
}

#[test]
fn errors_carry_the_config_and_field() {
    let err = ThresholdState::new(ThresholdConfig {
        failure_threshold: 0,
        success_threshold: 1,
    })
    .unwrap_err();
    match &err {
        Error::Config { what, source } => {
            assert_eq!(*what, "threshold");
            assert_eq!(source.field, "failure_threshold");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!err.is_retryable());
}
