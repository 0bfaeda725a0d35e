//! Real `redis-server` processes: start-up, the RESP client, restarts and faults.

use std::path::Path;
use std::time::Duration;

use ha_testkit::redis::{COMMAND_TIMEOUT, command};
use ha_testkit::{RedisServer, RespConnection, RespValue};

fn ok() -> RespValue {
    RespValue::Simple("OK".to_owned())
}

fn bulk(text: &str) -> RespValue {
    RespValue::Bulk(Some(text.as_bytes().to_vec()))
}

#[tokio::test]
async fn start_answers_ping_set_and_get() {
    let server = RedisServer::start().await.unwrap();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    assert_eq!(server.addr().port(), server.port());
    assert_eq!(
        server.command(&["PING"]).await.unwrap(),
        RespValue::Simple("PONG".to_owned())
    );
    assert_eq!(server.command(&["SET", "k", "v"]).await.unwrap(), ok());
    assert_eq!(server.command(&["GET", "k"]).await.unwrap(), bulk("v"));
    assert_eq!(
        server.command(&["GET", "missing"]).await.unwrap(),
        RespValue::Bulk(None)
    );
    // The free function reaches the same server.
    let reply = command(server.addr(), &["INCRBY", "n", "5"], COMMAND_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(reply.as_int(), Some(5));
    assert_eq!(server.role().await.unwrap(), "master");
}

#[tokio::test]
async fn error_replies_are_values_not_failures() {
    let server = RedisServer::start().await.unwrap();
    let reply = server.command(&["NO-SUCH-COMMAND"]).await.unwrap();
    let message = reply.as_error().unwrap_or_default();
    assert!(message.starts_with("ERR unknown command"), "{reply:?}");
}

#[tokio::test]
async fn extra_args_reach_the_server_config() {
    let server = RedisServer::builder()
        .extra_arg("maxmemory", "10mb")
        .start()
        .await
        .unwrap();
    let reply = server
        .command(&["CONFIG", "GET", "maxmemory"])
        .await
        .unwrap();
    assert_eq!(
        reply.field("maxmemory").and_then(RespValue::as_int),
        Some(10 * 1024 * 1024),
        "{reply}"
    );
}

#[tokio::test]
async fn restart_without_persistence_loses_data() {
    let mut server = RedisServer::start().await.unwrap();
    let port = server.port();
    assert_eq!(server.command(&["SET", "k", "v"]).await.unwrap(), ok());
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(
        server.command(&["GET", "k"]).await.unwrap(),
        RespValue::Bulk(None)
    );
}

#[tokio::test]
async fn restart_with_persistence_keeps_data_even_after_kill() {
    let mut server = RedisServer::builder()
        .persistence(true)
        .start()
        .await
        .unwrap();
    assert_eq!(server.command(&["SET", "k", "v1"]).await.unwrap(), ok());
    server.restart().await.unwrap();
    assert_eq!(server.command(&["GET", "k"]).await.unwrap(), bulk("v1"));

    // appendfsync always: an acknowledged write survives a crash too.
    assert_eq!(server.command(&["SET", "k", "v2"]).await.unwrap(), ok());
    server.kill().unwrap();
    server.restart().await.unwrap();
    assert_eq!(server.command(&["GET", "k"]).await.unwrap(), bulk("v2"));
}

#[tokio::test]
async fn kill_fails_commands_until_restart_on_the_same_port() {
    let mut server = RedisServer::start().await.unwrap();
    let port = server.port();
    let pid = server.pid().unwrap();
    assert!(server.is_running());

    server.kill().unwrap();
    assert!(!server.is_running());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let err = server.command(&["PING"]).await.unwrap_err().to_string();
    assert!(
        err.contains("redis-server") && err.contains(&port.to_string()),
        "error names server and port: {err}"
    );

    server.restart().await.unwrap();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(pid));
    assert_eq!(server.command(&["SET", "k", "v"]).await.unwrap(), ok());
}

#[tokio::test]
async fn pause_times_out_commands_and_resume_answers_them() {
    let mut server = RedisServer::start().await.unwrap();
    // A connection opened before the pause, to show it is not reset, only unanswered.
    let mut connection = server.connect().await.unwrap();

    server.pause().unwrap();
    assert!(server.is_paused() && server.is_running());
    let err = server
        .command_with_timeout(&["PING"], Duration::from_millis(200))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("timed out"), "{err}");
    connection.set_timeout(Duration::from_millis(200));
    let err = connection.request(&["PING"]).await.unwrap_err().to_string();
    assert!(err.contains("timed out"), "{err}");

    server.resume().unwrap();
    assert!(!server.is_paused());
    assert_eq!(
        server.command(&["PING"]).await.unwrap(),
        RespValue::Simple("PONG".to_owned())
    );
    // The PING sent while paused is answered on resume, before the next one.
    connection.set_timeout(COMMAND_TIMEOUT);
    assert_eq!(
        connection.read_reply().await.unwrap(),
        RespValue::Simple("PONG".to_owned())
    );
}

#[tokio::test]
async fn connection_carries_pipelines_and_pub_sub() {
    let server = RedisServer::start().await.unwrap();
    let mut subscriber = RespConnection::connect(server.addr(), COMMAND_TIMEOUT)
        .await
        .unwrap();
    let confirm = subscriber.request(&["SUBSCRIBE", "news"]).await.unwrap();
    assert_eq!(confirm.as_array().map(<[_]>::len), Some(3), "{confirm}");

    let mut publisher = server.connect().await.unwrap();
    publisher.send(&["PUBLISH", "news", "hello"]).await.unwrap();
    publisher.send(&["PUBLISH", "news", "world"]).await.unwrap();
    assert_eq!(publisher.read_reply().await.unwrap().as_int(), Some(1));
    assert_eq!(publisher.read_reply().await.unwrap().as_int(), Some(1));

    for expected in ["hello", "world"] {
        let message = subscriber.read_reply().await.unwrap();
        let items = message.as_array().unwrap_or_default();
        let texts: Vec<_> = items.iter().map(RespValue::as_str).collect();
        assert_eq!(texts, [Some("message"), Some("news"), Some(expected)]);
    }
}

#[tokio::test]
async fn replica_of_replicates_writes() {
    let master = RedisServer::start().await.unwrap();
    let replica = RedisServer::builder()
        .replica_of(master.addr())
        .start()
        .await
        .unwrap();
    assert_eq!(replica.role().await.unwrap(), "slave");
    // WAIT returns once the replica acknowledged this connection's writes, so no polling is
    // needed; it only counts writes made on the same connection.
    let mut connection = master.connect().await.unwrap();
    assert_eq!(connection.request(&["SET", "k", "v"]).await.unwrap(), ok());
    let acked = connection.request(&["WAIT", "1", "5000"]).await.unwrap();
    assert_eq!(acked.as_int(), Some(1));
    assert_eq!(replica.command(&["GET", "k"]).await.unwrap(), bulk("v"));
    let refused = replica.command(&["SET", "k", "w"]).await.unwrap();
    assert!(
        refused
            .as_error()
            .is_some_and(|e| e.starts_with("READONLY")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn concurrent_starts_get_different_ports() {
    let (a, b) = tokio::join!(RedisServer::start(), RedisServer::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    assert_eq!(a.command(&["SET", "k", "a"]).await.unwrap(), ok());
    assert_eq!(
        b.command(&["GET", "k"]).await.unwrap(),
        RespValue::Bulk(None)
    );
}

#[tokio::test]
async fn drop_kills_the_process_and_removes_its_directory() {
    let server = RedisServer::start().await.unwrap();
    let pid = server.pid().unwrap();
    let dir = server.dir().to_path_buf();
    let addr = server.addr();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
    assert!(
        command(addr, &["PING"], Duration::from_secs(1))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn start_up_failure_quotes_the_log() {
    let err = RedisServer::builder()
        .extra_arg("no-such-directive", "1")
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited early"), "{err}");
    assert!(
        err.contains("no-such-directive"),
        "log tail is quoted: {err}"
    );
}
