//! `HaNodeBuilder::build` validates the whole node: every refusal names the dotted path and
//! the rule it broke.

mod common;

use std::sync::Arc;

use common::{TOKEN, ok_check};
use ha_dr::{BackupScheduler, KeyRing, LocalStore, MasterKey, Repository, Source};
use ha_election::MemoryLeaseStore;
use ha_failover::{ComponentConfig, Router, RouterSwitch};
use ha_health::CheckConfig;
use ha_orchestrator::{Error, HaNode, HaNodeBuilder};

fn switch() -> RouterSwitch<&'static str> {
    RouterSwitch::new(Router::new("primary", "secondary"))
}

/// The error `build` returns, with its text.
fn refused(builder: HaNodeBuilder) -> (Error, String) {
    let err = builder.build().expect_err("build must refuse this node");
    let text = err.to_string();
    (err, text)
}

fn assert_names(text: &str, path: &str, rule: &str) {
    assert!(text.contains(path), "{text:?} does not name {path:?}");
    assert!(
        text.contains(rule),
        "{text:?} does not state the rule {rule:?}"
    );
}

#[test]
fn a_node_needs_an_id() {
    let (err, text) = refused(HaNode::builder().single_node());
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.is_config());
    assert!(!err.is_retryable());
    assert_names(&text, "`node_id`", "must be set");
}

#[test]
fn the_smallest_node_builds() {
    let node = HaNode::builder()
        .node_id("a")
        .build()
        .expect("a bare node builds");
    assert_eq!(node.node_id().as_str(), "a");
    assert_eq!(node.cluster(), "ha");
    assert_eq!(node.phase(), ha_orchestrator::Phase::Built);
}

#[test]
fn a_failover_component_needs_a_check_of_its_name() {
    let builder = HaNode::builder()
        .node_id("a")
        .single_node()
        .check(ok_check("api"), CheckConfig::default())
        .failover("api", switch(), ComponentConfig::default())
        .failover("cache", switch(), ComponentConfig::default());
    let (_, text) = refused(builder);
    assert_names(
        &text,
        "failover.components[1]",
        "no health check of that name",
    );
    assert!(text.contains("\"cache\""), "{text}");
}

#[test]
fn a_check_cannot_depend_on_an_unknown_check() {
    let builder = HaNode::builder()
        .node_id("a")
        .check(ok_check("db"), CheckConfig::default())
        .check(ok_check("api"), CheckConfig::default().depends_on("cache"));
    let (_, text) = refused(builder);
    assert_names(&text, "checks[1].depends_on", "unknown check \"cache\"");
}

#[test]
fn failover_is_leader_only_work() {
    let builder = || {
        HaNode::builder()
            .node_id("a")
            .check(ok_check("api"), CheckConfig::default())
            .failover("api", switch(), ComponentConfig::default())
    };
    let (_, text) = refused(builder());
    assert_names(&text, "`election`", "failover is leader-only work");
    builder()
        .single_node()
        .build()
        .expect("a single node may fail over");
    builder()
        .election(Arc::new(MemoryLeaseStore::new()))
        .build()
        .expect("an elected node may fail over");
}

#[test]
fn backups_are_leader_only_work() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let scheduler = || {
        let repo = Repository::new(
            LocalStore::open(repo_dir.path()).expect("repository"),
            KeyRing::new(MasterKey::generate().expect("key")),
        );
        BackupScheduler::builder(repo)
            .source("docs", Source::dir(data.path()))
            .build()
            .expect("scheduler")
    };
    let (_, text) = refused(HaNode::builder().node_id("a").backups(scheduler()));
    assert_names(&text, "`election`", "scheduled backups");
    assert!(text.contains("leader-only"), "{text}");
    HaNode::builder()
        .node_id("a")
        .single_node()
        .backups(scheduler())
        .build()
        .expect("a single node may take backups");
}

#[test]
fn a_public_api_needs_an_admin_token() {
    let open = "0.0.0.0:8008".parse().expect("addr");
    let (_, text) = refused(HaNode::builder().node_id("a").http(open));
    assert_names(&text, "http.admin_token", "non-loopback");
    HaNode::builder()
        .node_id("a")
        .http(open)
        .admin_token(TOKEN)
        .build()
        .expect("a public API with a token builds");
    HaNode::builder()
        .node_id("a")
        .http("127.0.0.1:0".parse().expect("addr"))
        .build()
        .expect("a loopback API without a token builds");
    HaNode::builder()
        .node_id("a")
        .http("[::1]:0".parse().expect("addr"))
        .build()
        .expect("an IPv6 loopback API without a token builds");
}

#[test]
fn an_admin_token_has_at_least_16_characters() {
    let (_, text) = refused(HaNode::builder().node_id("a").admin_token("short-token"));
    assert_names(&text, "http.admin_token", "at least 16 characters");
    assert!(
        !text.contains("short-token"),
        "the error shows the token: {text}"
    );
    HaNode::builder()
        .node_id("a")
        .admin_token("exactly-16-chars")
        .build()
        .expect("16 characters are enough");
}

#[test]
fn duplicate_check_names_surface_from_ha_health() {
    let builder = HaNode::builder()
        .node_id("a")
        .check(ok_check("api"), CheckConfig::default())
        .check(ok_check("api"), CheckConfig::default());
    let (err, text) = refused(builder);
    assert!(
        matches!(err, Error::Setup { ref path, .. } if path == "checks"),
        "{err:?}"
    );
    assert_names(&text, "checks", "two checks are named `api`");
}

#[test]
fn a_dependency_cycle_surfaces_from_ha_health() {
    let builder = HaNode::builder()
        .node_id("a")
        .check(ok_check("a"), CheckConfig::default().depends_on("b"))
        .check(ok_check("b"), CheckConfig::default().depends_on("a"));
    let (_, text) = refused(builder);
    assert_names(&text, "checks", "cycle");
}

#[test]
fn a_cluster_name_is_one_word() {
    let (_, text) = refused(HaNode::builder().node_id("a").cluster("my cluster"));
    assert_names(&text, "`cluster`", "whitespace");
    let (_, text) = refused(HaNode::builder().node_id("a").cluster(""));
    assert!(text.contains("`cluster`"), "{text}");
}

#[test]
fn a_shutdown_needs_time() {
    let (_, text) = refused(
        HaNode::builder()
            .node_id("a")
            .shutdown_timeout(std::time::Duration::ZERO),
    );
    assert_names(&text, "`shutdown_timeout`", "greater than zero");
}

#[test]
fn the_election_timing_is_validated_under_election() {
    let store = Arc::new(MemoryLeaseStore::new());
    let mut config = ha_election::ElectorConfig::with_ttl(
        "ignored",
        std::time::Duration::from_secs(2),
        std::time::Duration::from_millis(200),
    );
    config.renew_interval = std::time::Duration::from_secs(5);
    let (_, text) = refused(HaNode::builder().node_id("a").election_with(store, config));
    assert!(text.contains("`election."), "{text}");
}
