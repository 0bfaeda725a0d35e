//! `EtcdCluster`: three real etcd members elect a raft leader, survive the loss of one, and come
//! back on their data directories.

#![allow(clippy::unwrap_used)]

use ha_testkit::{EtcdCluster, ProxyMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_elects_replaces_a_killed_leader_and_restarts_it() {
    let mut cluster = EtcdCluster::start().await.unwrap();
    assert_eq!(cluster.members().len(), 3);
    assert!(cluster.url().starts_with("etcd://127.0.0.1:"));
    let first = cluster.wait_for_leader().await.unwrap();
    cluster.kill(first).unwrap();
    let second = cluster.wait_for_leader().await.unwrap();
    assert_ne!(first, second, "a killed member cannot lead");
    cluster.restart(first).await.unwrap();
    assert!(cluster.members().iter().all(|m| m.data_dir().exists()));
    // Freeze and thaw a member; the proxies pass and blackhole.
    cluster.pause(first).unwrap();
    cluster.resume(first).unwrap();
    cluster.proxy(first).set_mode(ProxyMode::Blackhole);
    cluster.proxy(first).set_mode(ProxyMode::Pass);
    cluster.restart_all().await.unwrap();
    cluster.wait_for_leader().await.unwrap();
}
