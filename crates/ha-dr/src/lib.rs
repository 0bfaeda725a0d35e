//! Disaster recovery: encrypted, compressed, verified backups.
//!
//! This crate will hold the backup format (zstd, then AES-256-GCM segments in the STREAM
//! construction with an authenticated header and manifest), sources (PostgreSQL via `pg_dump`,
//! directory trees, config), the `BackupStore` trait with a local-directory store, verify,
//! restore, calendar-bucket retention, leader-only schedules and RPO/RTO tracking.
//!
//! Status: not built yet (issue 5). The crate exists so that the workspace layout is final.
