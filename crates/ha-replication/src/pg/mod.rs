//! PostgreSQL streaming replication: members, status queries, the lag monitor, safe
//! promotion, and the agent that runs beside each database.

pub mod agent;
pub mod candidate;
pub mod member;
pub mod monitor;
pub mod promote;
pub mod rejoin;
pub mod status;
pub mod sync;
pub mod watchdog;

pub use agent::{
    AgentAction, AgentStatus, DemoteMode, LeaderSource, PeerSource, PgAgent, PgAgentConfig, PgRole,
    Upstream,
};
pub use candidate::MemberReport;
pub use member::PgMember;
pub use monitor::{LagConfig, Link, PgReplicationMonitor, ReplicaLag, Sample};
pub use promote::{
    CommandFence, Ineligible, NoFence, PrimaryFence, PromoteConfig, Promoter, PromotionReport,
    Refusal, RepointOutcome, SqlShutdownFence,
};
pub use rejoin::{RejoinConfig, RejoinError, RejoinVia};
pub use status::{PrimaryStatus, ReplicaStatus, StandbyStatus, WalReceiver};
pub use sync::{MemorySyncStateStore, SyncMode, SyncState, SyncStateStore};
pub use watchdog::WatchdogConfig;
