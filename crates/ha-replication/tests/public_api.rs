//! Compiles against every public path of the PostgreSQL and Sentinel parts of
//! `ha-replication`, so a rename or a lost re-export breaks this test before it breaks a user.
#![allow(clippy::unwrap_used)]

use ha_core::Validate;
use ha_replication::lsn::{Lsn, ParseLsnError};
use ha_replication::pg::{
    AgentAction, AgentStatus, CommandFence, DemoteMode, Ineligible, LagConfig, Link, NoFence,
    PgAgent, PgAgentConfig, PgMember, PgReplicationMonitor, PgRole, PrimaryFence, PrimaryStatus,
    PromoteConfig, Promoter, PromotionReport, Refusal, ReplicaLag, ReplicaStatus, RepointOutcome,
    Sample, SqlShutdownFence, StandbyStatus, WalReceiver,
};
use ha_replication::pg::{RejoinConfig, RejoinError, RejoinVia, rejoin};
use ha_replication::pg::{WatchdogConfig, candidate, watchdog};
use ha_replication::sentinel::{
    Instance, MasterInfo, MasterView, Quorum, SentinelMonitor, WATCHED_CHANNELS, parse_announcement,
};
use ha_replication::{Error, pg::monitor, pg::promote, pg::status};

#[tokio::test]
async fn every_public_path_is_reachable() {
    let _: Result<Lsn, ParseLsnError> = "0/1".parse::<ha_replication::Lsn>();
    assert!(LagConfig::default().validate().is_ok());
    assert!(PromoteConfig::default().validate().is_ok());
    assert!(PgAgentConfig::default().validate().is_ok());
    let _: Option<(PgAgent, AgentStatus, AgentAction, DemoteMode, PgRole)> = None;
    let _: Option<ha_replication::PgAgent> = None;
    // Rejoin.
    assert!(RejoinConfig::default().validate().is_ok());
    let _: Option<(RejoinError, RejoinVia, rejoin::RejoinConfig)> = None;
    // The watchdog and the candidate rule.
    assert!(WatchdogConfig::default().validate().is_ok());
    let _: Option<(
        ha_replication::pg::MemberReport,
        ha_replication::pg::PeerSource,
        watchdog::WatchdogState,
        watchdog::Message,
        watchdog::Decision,
    )> = None;
    let _: fn(&candidate::MemberReport, &[candidate::MemberReport], std::time::Duration) -> _ =
        candidate::defer_to;
    let _ = (
        watchdog::WATCHDOG_BINARY,
        watchdog::boottime,
        candidate::META_ROLE,
    );
    let _: Option<(
        PgReplicationMonitor,
        Promoter,
        ha_replication::SentinelMonitor,
    )> = None;
    let _: Option<(
        Sample,
        ReplicaLag,
        Link,
        PrimaryStatus,
        StandbyStatus,
        ReplicaStatus,
    )> = None;
    let _: Option<(
        WalReceiver,
        PromotionReport,
        RepointOutcome,
        Ineligible,
        Refusal,
    )> = None;
    let _: Option<(Instance, MasterInfo, MasterView, Quorum, SentinelMonitor)> = None;
    fn component<C: ha_core::Component>() {}
    component::<PgReplicationMonitor>();
    component::<SentinelMonitor>();
    let fences: Vec<Box<dyn PrimaryFence>> = vec![
        Box::new(NoFence),
        Box::new(SqlShutdownFence),
        Box::new(CommandFence::new("true", Vec::<String>::new())),
    ];
    assert_eq!(fences.len(), 3);
    let _ = (monitor::estimate, monitor::over_bound, parse_announcement);
    let _: Option<status::PrimaryStatus> = None;
    let _: Option<promote::Refusal> = None;
    assert_eq!(WATCHED_CHANNELS.len(), 5);
    let member = PgMember::new("m", "postgres://u@127.0.0.1:1/db").unwrap();
    assert_eq!(
        member.conninfo("r"),
        "host=127.0.0.1 port=1 user=u application_name=r"
    );
    assert!(!Error::Unsupported("x".into()).is_retryable());
}
