//! Leader election with fencing tokens.
//!
//! This crate will hold the `LeaseStore` trait (acquire / renew / release / read, each a
//! compare-and-set on holder and fencing token, timed by the store's clock), its Redis (`fred`),
//! PostgreSQL (`sqlx`) and in-memory implementations with a conformance suite every store runs,
//! and the `Elector`, which campaigns, renews, steps down at a local deadline computed from when
//! a request was *sent*, and implements [`ha_core::LeadershipGate`].
//!
//! Status: not built yet (issue 3). The crate exists so that the workspace layout is final.
