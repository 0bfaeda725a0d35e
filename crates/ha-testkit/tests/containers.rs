//! The Docker backend (feature `containers`). Needs a running Docker engine: without one these
//! tests fail with an error saying so — they are not part of the default suite or CI, which use
//! local processes.
#![cfg(feature = "containers")]

use std::time::Duration;

use ha_testkit::containers::ContainerServer;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn ping(addr: std::net::SocketAddr, within: Duration) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(within, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ))
        })
}

#[tokio::test]
async fn redis_container_answers_and_pauses() {
    let redis = ContainerServer::redis().await.unwrap();
    let addr = redis.addr().await.unwrap();
    assert_eq!(
        ping(addr, Duration::from_secs(5)).await.unwrap(),
        "+PONG\r\n"
    );
    redis.pause().await.unwrap();
    assert!(ping(addr, Duration::from_millis(300)).await.is_err());
    redis.resume().await.unwrap();
    assert_eq!(
        ping(addr, Duration::from_secs(5)).await.unwrap(),
        "+PONG\r\n"
    );
}

#[tokio::test]
async fn postgres_container_answers_queries() {
    let pg = ContainerServer::postgres().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&pg.url().await.unwrap())
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
}
