//! The shared vocabulary of the `ha` crates.
//!
//! `ha-core` holds the types and traits every other crate speaks, and nothing that talks to a
//! server: node ids and [`FencingToken`]s, [`Status`] (with a total "worse than" order) and
//! [`Criticality`], the [`HaEvent`]s every state change is reported as, the [`EventBus`] that
//! carries them, the [`Component`] lifecycle, the [`LeadershipGate`] that lets leader-only work
//! ask "do I lead now, with which token?" and the [`StepDown`] that gives leadership up, config
//! conventions ([`config`]), exponential [`backoff`] with full jitter, and the [`metric`] names.
//!
//! ```
//! use std::time::SystemTime;
//! use ha_core::{EventBus, HaEvent, NodeId, Status};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::default();
//! let mut events = bus.subscribe();
//! bus.publish(HaEvent::HealthChanged {
//!     at: SystemTime::now(),
//!     node: NodeId::new("node-a"),
//!     component: "postgres".into(),
//!     from: Status::Healthy,
//!     to: Status::Unhealthy,
//!     cause: Some("connection refused".into()),
//! });
//! let event = events.recv().await.unwrap();
//! assert_eq!(event.name(), "health_changed");
//! assert_eq!(event.node().as_str(), "node-a");
//! # }
//! ```

pub mod backoff;
pub mod bus;
pub mod clock;
pub mod component;
pub mod config;
pub mod error;
pub mod event;
pub mod id;
pub mod leadership;
pub mod metric;
pub mod status;
pub mod sync;

pub use async_trait::async_trait;
pub use backoff::{Backoff, BackoffConfig};
pub use bus::{EventBus, EventSubscriber, RecvError, TryRecvError};
pub use component::{Component, ComponentContext, ComponentTasks};
pub use config::{ConfigError, Validate};
pub use error::{BoxError, Error};
pub use event::{HaEvent, HaLevel, LossReason, Severity};
pub use id::{FencingToken, NodeId};
pub use leadership::{AlwaysLeader, Leadership, LeadershipGate, StepDown};
pub use status::{CircuitState, Criticality, Status};
pub use tokio_util::sync::CancellationToken;
