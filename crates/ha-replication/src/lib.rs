//! Replication monitoring and safe promotion.
//!
//! This crate will hold the PostgreSQL streaming-replication monitor (lag in bytes and time,
//! with the idle-primary caveat handled) and safe promotion of the most advanced eligible
//! replica after fencing the old primary, the Redis Sentinel monitor, and hash-verified
//! file/directory replication (temp file, fsync, rename).
//!
//! Status: not built yet (issue 6). The crate exists so that the workspace layout is final.
