//! A build without a backend feature refuses a config that names that backend with
//! `Error::Unsupported` naming the feature (checked by `cargo test --no-default-features`).

#![allow(clippy::unwrap_used)]

use ha_orchestrator::{Error, HaConfig};

/// The error `into_builder` gives for `text`, as `(what, why)` of `Unsupported`.
#[allow(dead_code)] // unused with every feature on
async fn unsupported(text: &str) -> (String, String) {
    let config = HaConfig::from_toml_str(text, "test.toml").unwrap();
    match config.into_builder().await {
        Err(Error::Unsupported { what, why }) => (what, why),
        Err(other) => panic!("expected Unsupported, got {other}"),
        Ok(_) => panic!("built a node whose backend is compiled out"),
    }
}

#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn a_redis_store_needs_the_redis_feature() {
    let (what, why) =
        unsupported("node_id = \"a\"\n[redundancy]\nstore = \"redis://127.0.0.1:1\"\n").await;
    assert!(what.contains("redundancy.store"), "{what}");
    assert!(why.contains("`redis`"), "{why}");
}

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn an_etcd_store_needs_the_etcd_feature() {
    let (what, why) =
        unsupported("node_id = \"a\"\n[redundancy]\nstore = \"etcd://127.0.0.1:1\"\n").await;
    assert!(what.contains("redundancy.store"), "{what}");
    assert!(why.contains("`etcd`"), "{why}");
}

#[cfg(not(feature = "system"))]
#[tokio::test]
async fn a_memory_check_needs_the_system_feature() {
    let (what, why) = unsupported(
        "node_id = \"a\"\n[redundancy]\nsingle_node = true\n[[checks]]\nname = \"m\"\nkind = \"memory\"\n",
    )
    .await;
    assert!(what.contains("checks[0]"), "{what}");
    assert!(why.contains("`system`"), "{why}");
}

#[cfg(not(feature = "sentinel"))]
#[tokio::test]
async fn a_sentinel_section_needs_the_sentinel_feature() {
    let (what, why) = unsupported(
        "node_id = \"a\"\n[redundancy]\nsingle_node = true\n[replication.sentinel]\nmaster = \"m\"\nsentinels = [\"127.0.0.1:1\"]\n",
    )
    .await;
    assert_eq!(what, "replication.sentinel");
    assert!(why.contains("`sentinel`"), "{why}");
}
