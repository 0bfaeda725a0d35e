//! The fault proxy in front of a real redis-server: each mode as a client sees it.

use std::time::Duration;

use ha_testkit::redis::command;
use ha_testkit::{FaultProxy, ProxyMode, RedisServer, RespValue};

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

#[tokio::test]
async fn redis_through_the_proxy_sees_each_mode() {
    let redis = RedisServer::start().await.unwrap();
    let proxy = FaultProxy::start(redis.addr()).unwrap();
    let pong = RespValue::Simple("PONG".into());

    assert_eq!(command(proxy.addr(), &["PING"], LONG).await.unwrap(), pong);

    proxy.set_mode(ProxyMode::Blackhole);
    let started = std::time::Instant::now();
    let err = command(proxy.addr(), &["PING"], SHORT).await.unwrap_err();
    assert!(
        err.to_string().contains("timed out"),
        "a partition is silence: {err}"
    );
    assert!(started.elapsed() >= SHORT);
    // The server itself is fine: only the path through the proxy is cut.
    assert_eq!(command(redis.addr(), &["PING"], LONG).await.unwrap(), pong);

    proxy.set_mode(ProxyMode::DropNew);
    assert!(command(proxy.addr(), &["PING"], LONG).await.is_err());

    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(150)));
    let started = std::time::Instant::now();
    assert_eq!(command(proxy.addr(), &["PING"], LONG).await.unwrap(), pong);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    proxy.set_mode(ProxyMode::Pass);
    assert_eq!(command(proxy.addr(), &["PING"], LONG).await.unwrap(), pong);
}

#[tokio::test]
async fn cut_ends_a_live_redis_connection() {
    let redis = RedisServer::start().await.unwrap();
    let proxy = FaultProxy::start(redis.addr()).unwrap();
    let mut conn = ha_testkit::RespConnection::connect(proxy.addr(), LONG)
        .await
        .unwrap();
    assert_eq!(
        conn.request(&["PING"]).await.unwrap(),
        RespValue::Simple("PONG".into())
    );
    proxy.cut_connections();
    assert!(
        conn.request(&["PING"]).await.is_err(),
        "a cut connection must fail"
    );
    let mut fresh = ha_testkit::RespConnection::connect(proxy.addr(), LONG)
        .await
        .unwrap();
    assert_eq!(
        fresh.request(&["PING"]).await.unwrap(),
        RespValue::Simple("PONG".into())
    );
}
