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
use tokio::time::Instant;

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
