//! The thin composition layer.
//!
//! This crate will hold the builder that composes election, health, failover, replication and
//! DR into one service, starts their [`ha_core::Component`]s in dependency order and stops them
//! in reverse, computes the overall HA level, and serves `/health`, `/ready`, `/status` and
//! `/metrics`. It owns no algorithm of its own.
//!
//! Status: not built yet. The crate exists so that the workspace layout is final.
