//! Imports every public path of the built crates: a rename or a lost re-export fails here,
//! at compile time, before a user finds it.

#![allow(unused_imports)]

use ha_core::backoff::{Backoff as _, BackoffConfig as _};
use ha_core::bus::{
    DEFAULT_CAPACITY, EventBus as _, EventSubscriber as _, RecvError as _, TryRecvError as _,
};
use ha_core::component::{
    Component as _, ComponentContext as _, ComponentTasks as _, already_started,
};
use ha_core::config::{
    ConfigError as _, Validate as _, at_least, duration, ensure, non_empty, parse_duration,
    positive, strictly_increasing,
};
use ha_core::error::{BoxError as _, Error as _};
use ha_core::event::{HaEvent as _, HaLevel as _, LossReason as _, Severity as _};
use ha_core::id::{FencingToken as _, NodeId as _};
use ha_core::leadership::{AlwaysLeader as _, Leadership as _, LeadershipGate as _};
use ha_core::status::{CircuitState as _, Criticality as _, Status as _};
use ha_core::{
    AlwaysLeader, Backoff, BackoffConfig, BoxError, CancellationToken, CircuitState, Component,
    ComponentContext, ConfigError, Criticality, Error, EventBus, EventSubscriber, FencingToken,
    HaEvent, Leadership, LeadershipGate, LossReason, NodeId, RecvError, Status, TryRecvError,
    Validate, async_trait, metric,
};
use ha_core::{ComponentTasks, HaLevel, Severity};
use ha_orchestrator::config::{
    ActionEntry as _, CheckEntry as _, CheckKind as _, DrConfig as _, DrSourceConfig as _,
    DrSourceKind as _, EnableConfig as _, FailoverEntry as _, FailoverSection as _,
    FilesConfig as _, HttpConfig as _, LogFormat as _, PgConfig as _, PgMemberConfig as _,
    RedundancyConfig as _, ReplicationConfig as _, SentinelConfig as _,
};
use ha_orchestrator::level::{LevelFacts as _, LevelReport as _, compute};
use ha_orchestrator::{
    Error as _, EventHook as _, HaConfig as _, HaNode as _, HaNodeBuilder as _, Kpis as _,
    LeaderView as _, LevelView as _, MemberView as _, MetricsRender as _, NodeGate as _,
    NodeStatus as _, Phase as _, Redactor as _, Secret as _, http, wait_for_signal,
};
use ha_testkit::ha_node::{built_binary, http as node_http};
use ha_testkit::{
    FaultProxy, HaNodeCluster, HaNodeOptions, HaNodeProcess, ProxyMode, Result, ServerProcess,
    TestkitError, binaries, free_port, ha_node,
};

#[test]
fn metric_list_is_public_and_complete() {
    assert!(metric::ALL.contains(&metric::ELECTION_IS_LEADER));
    assert!(metric::ALL.contains(&metric::HA_LEVEL));
    assert_eq!(HaLevel::Standard.availability_target_percent(), 99.9);
    assert_eq!(Severity::Critical.as_str(), "critical");
    let _ = ComponentTasks::default();
    const { assert!(DEFAULT_CAPACITY > 0) };
    let bus = EventBus::default();
    let _subscriber: EventSubscriber = bus.subscribe();
    assert_eq!(bus.subscriber_count(), 1);
}
