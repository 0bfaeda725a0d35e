//! Real replica sets and `redis-sentinel` sets: discovery, quorum, and failover after a crash.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ha_testkit::redis::info_field;
use ha_testkit::{RedisReplicaSet, RespValue, SentinelOptions, SentinelSet};

fn bulk(text: &str) -> RespValue {
    RespValue::Bulk(Some(text.as_bytes().to_vec()))
}

#[tokio::test]
async fn replica_set_replicates_master_writes() {
    let set = RedisReplicaSet::start(2).await.unwrap();
    assert_eq!(set.master_name(), "mymaster");
    assert_eq!(set.replicas().len(), 2);
    assert_eq!(set.nodes().len(), 3);
    assert_eq!(set.master().role().await.unwrap(), "master");
    for replica in set.replicas() {
        assert_eq!(replica.role().await.unwrap(), "slave");
        let info = info_text(replica.command(&["INFO", "replication"]).await.unwrap());
        assert_eq!(
            info_field(&info, "master_port"),
            Some(set.master().port().to_string().as_str())
        );
    }
    // WAIT counts acknowledgements of writes made on its own connection.
    let mut master = set.master().connect().await.unwrap();
    assert_eq!(
        master.request(&["SET", "k", "v"]).await.unwrap(),
        RespValue::Simple("OK".to_owned())
    );
    let acked = master.request(&["WAIT", "2", "5000"]).await.unwrap();
    assert_eq!(acked.as_int(), Some(2));
    for replica in set.replicas() {
        assert_eq!(replica.command(&["GET", "k"]).await.unwrap(), bulk("v"));
    }
}

fn info_text(reply: RespValue) -> String {
    reply.as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn sentinel_set_reports_the_master_and_quorum() {
    let set = RedisReplicaSet::start(1).await.unwrap();
    let mut sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    assert_eq!(sentinels.sentinels().len(), 3);
    let addrs = sentinels.addrs();
    assert!(addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2]);
    assert_eq!(sentinels.master_addr().await.unwrap(), set.master().addr());
    for sentinel in sentinels.sentinels() {
        assert_eq!(sentinel.role().await.unwrap(), "sentinel");
    }
    let quorum = sentinels.ckquorum().await.unwrap();
    assert!(quorum.starts_with("OK 3 usable Sentinels"), "{quorum}");

    // A paused sentinel is skipped: the others still answer at once.
    sentinels.sentinels_mut()[0].pause().unwrap();
    let asked = Instant::now();
    assert_eq!(sentinels.master_addr().await.unwrap(), set.master().addr());
    assert!(
        asked.elapsed() < Duration::from_millis(400),
        "{:?}",
        asked.elapsed()
    );
    sentinels.sentinels_mut()[0].resume().unwrap();
}

#[tokio::test]
async fn killing_the_master_fails_over_to_a_replica_that_accepts_writes() {
    let mut set = RedisReplicaSet::start(2).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    let old_master = set.master().addr();
    let replica_addrs: Vec<SocketAddr> = set.replicas().iter().map(|r| r.addr()).collect();

    set.master_mut().kill().unwrap();
    let new_master = sentinels
        .wait_for_failover(old_master, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        replica_addrs.contains(&new_master),
        "{new_master} is one of {replica_addrs:?}"
    );
    assert_eq!(sentinels.master_addr().await.unwrap(), new_master);

    let promoted = set.node(new_master).unwrap();
    assert_eq!(promoted.role().await.unwrap(), "master");
    assert_eq!(
        promoted
            .command(&["SET", "after", "failover"])
            .await
            .unwrap(),
        RespValue::Simple("OK".to_owned())
    );

    // Sentinel points the other replica at the new master; poll until it has the write.
    let other = set
        .replicas()
        .iter()
        .find(|r| r.addr() != new_master)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = other.command(&["GET", "after"]).await.unwrap();
        if value == bulk("failover") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "other replica never replicated from {new_master}: GET answered {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
