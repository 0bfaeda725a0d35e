//! Compiles against every public path of `ha-failover`, so a rename or a lost re-export breaks
//! this test before it breaks a user.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_core::{CircuitState, Validate};
#[cfg(feature = "command")]
use ha_failover::action::CommandAction;
use ha_failover::action::{
    ActionContext, ActionError, FailoverAction, Router, RouterSwitch, StepDownAction, Target,
};
#[cfg(feature = "http")]
use ha_failover::action::{HttpAction, HttpMethod};
use ha_failover::breaker::config::{MAX_COUNT_WINDOW, MAX_PERMITTED_IN_HALF_OPEN, MAX_TIME_WINDOW};
use ha_failover::breaker::{
    AllErrors, BreakerConfig, BreakerSnapshot, CallError, CircuitBreaker, CircuitBreakerBuilder,
    CircuitBreakerLayer, CircuitBreakerService, FailurePredicate, OwnedPermit, Permit, Rejected,
    ResponseFuture, SlidingWindow, WaitBackoff,
};
use ha_failover::error::Error;
use ha_failover::manager::config::{ComponentConfig, FailoverConfig, HealthEvents};
use ha_failover::manager::history::{
    FailoverRecord, FailureKind, Outcome, SkipReason, Step, StepFailure, Trigger, TriggerSource,
};
use ha_failover::manager::{ComponentState, FailoverManager, FailoverManagerBuilder, Phase};

#[test]
fn every_public_path_is_reachable() {
    // Root re-exports name the same types as the module paths.
    let builder: CircuitBreakerBuilder = CircuitBreaker::builder("api");
    let breaker: ha_failover::CircuitBreaker<AllErrors> = builder.build().unwrap();
    let _: &ha_failover::BreakerConfig = breaker.config() as &BreakerConfig;
    let _: ha_failover::SlidingWindow = SlidingWindow::Count(1);
    let _: Option<ha_failover::Rejected> = None::<Rejected>;
    let _: Option<ha_failover::CallError<()>> = None::<CallError<()>>;
    let _: Option<ha_failover::Error> = None::<Error>;
    let _: Option<ha_failover::OwnedPermit> = None::<OwnedPermit>;
    let _: Option<ha_failover::Permit<'_>> = None::<Permit<'_>>;
    let _: ha_failover::BreakerSnapshot = breaker.snapshot() as BreakerSnapshot;
    let _: ha_failover::CircuitBreakerLayer = CircuitBreakerLayer::new(breaker.clone());
    let _: CircuitBreakerService<(), AllErrors> = CircuitBreakerService::new((), breaker.clone());
    let _: Option<ResponseFuture<std::future::Ready<Result<(), ()>>, AllErrors>> = None;
    let _ = WaitBackoff::default();

    assert!(BreakerConfig::default().validate().is_ok());
    let _: (u32, u32, Duration) = (
        MAX_COUNT_WINDOW,
        MAX_PERMITTED_IN_HALF_OPEN,
        MAX_TIME_WINDOW,
    );
    assert!(FailurePredicate::<std::io::Error>::is_failure(
        &AllErrors,
        &std::io::Error::other("x")
    ));
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.name(), "api");
}

#[test]
fn every_failover_path_is_reachable() {
    // Root re-exports name the same types as the module paths.
    let _: Option<ha_failover::FailoverManager> = None::<FailoverManager>;
    let _: Option<ha_failover::FailoverManagerBuilder> = None::<FailoverManagerBuilder>;
    let _: ha_failover::FailoverConfig = FailoverConfig::default();
    let _: ha_failover::ComponentConfig = ComponentConfig::default();
    let _: ha_failover::HealthEvents = HealthEvents::Transitions;
    let _: Option<ha_failover::FailoverRecord> = None::<FailoverRecord>;
    let _: Option<ha_failover::Trigger> = None::<Trigger>;
    let _: ha_failover::TriggerSource = TriggerSource::Report;
    let _: ha_failover::Outcome = Outcome::Skipped {
        reason: SkipReason::Cooldown,
    };
    let _: ha_failover::SkipReason = SkipReason::NotLeader;
    let _: ha_failover::StepFailure = StepFailure {
        step: Step::Verify,
        kind: FailureKind::TimedOut(Duration::from_secs(1)),
    };
    let _: ha_failover::Step = Step::Rollback;
    let _: ha_failover::FailureKind = FailureKind::Error(String::new());
    let _: ha_failover::Phase = Phase::Idle;
    let _: Option<ha_failover::ComponentState> = None::<ComponentState>;
    let _: Option<ha_failover::ActionContext> = None::<ActionContext>;
    let _: ha_failover::ActionError = ActionError::unsupported("x");
    #[cfg(feature = "command")]
    let _: ha_failover::CommandAction = CommandAction::new("true", Vec::<String>::new());
    #[cfg(feature = "http")]
    let _: ha_failover::HttpAction = HttpAction::new(HttpMethod::Get, "http://127.0.0.1/").unwrap();
    #[cfg(feature = "http")]
    let _: ha_failover::HttpMethod = HttpMethod::Post;
    let router: ha_failover::Router<u8> = Router::new(1, 2);
    let _: ha_failover::RouterSwitch<u8> = RouterSwitch::new(router);
    let _: ha_failover::Target = Target::Primary;
    let _: Option<ha_failover::StepDownAction> = None::<StepDownAction>;
    // The action trait is object safe.
    let _: Option<std::sync::Arc<dyn FailoverAction>> = None;
    let _: Option<Box<dyn ha_failover::FailoverAction>> = None;
    // The manager is a component the node starts with its context.
    let _: Option<std::sync::Arc<dyn ha_core::Component>> =
        None::<std::sync::Arc<FailoverManager>>.map(|m| m as _);
}

fn send_sync_static<T: Send + Sync + 'static>() {}
fn send<T: Send>(_: &T) {}

#[test]
fn handles_and_futures_cross_threads() {
    send_sync_static::<CircuitBreaker>();
    send_sync_static::<CircuitBreaker<fn(&std::io::Error) -> bool>>();
    send_sync_static::<OwnedPermit>();
    send_sync_static::<Rejected>();
    send_sync_static::<Error>();
    send_sync_static::<FailoverManager>();
    send_sync_static::<ActionContext>();
    send_sync_static::<ActionError>();
    send_sync_static::<FailoverRecord>();
    send_sync_static::<Router<String>>();
    send_sync_static::<RouterSwitch<String>>();
    #[cfg(feature = "command")]
    send_sync_static::<CommandAction>();
    #[cfg(feature = "http")]
    send_sync_static::<HttpAction>();
    send_sync_static::<StepDownAction>();
    let breaker = CircuitBreaker::builder("api").build().unwrap();
    let call = breaker.call(async { Ok::<_, std::io::Error>(()) });
    send(&call);
    let permit = breaker.try_acquire().unwrap();
    send(&permit);
    permit.record_success();
}

#[test]
fn errors_carry_the_config_and_field() {
    let err = CircuitBreaker::builder("api")
        .config(BreakerConfig {
            minimum_calls: 0,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap_err();
    match &err {
        Error::Config { what, source } => {
            assert_eq!(*what, "circuit breaker");
            assert_eq!(source.field, "minimum_calls");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!err.is_retryable());
}
