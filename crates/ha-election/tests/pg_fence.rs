//! `PgFence` against a real PostgreSQL: a deposed leader's write is refused inside its own
//! transaction and leaves nothing behind; concurrent fenced writers commit in token order.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use ha_core::FencingToken;
use ha_election::{Error, PgFence};
use ha_testkit::PostgresServer;
use sqlx::{Connection, PgConnection};

async fn setup(pg: &PostgresServer) -> PgConnection {
    let mut conn = PgConnection::connect(&pg.url()).await.unwrap();
    PgFence::new().migrate(&mut conn).await.unwrap();
    sqlx::query("CREATE TABLE orders (id int PRIMARY KEY, writer text NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

async fn fenced_insert(
    conn: &mut PgConnection,
    id: i32,
    writer: &str,
    token: u64,
) -> Result<(), Error> {
    let mut tx = conn.begin().await.unwrap();
    PgFence::new()
        .admit(&mut tx, "orders", FencingToken(token))
        .await?;
    sqlx::query("INSERT INTO orders VALUES ($1, $2)")
        .bind(id)
        .bind(writer)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn a_deposed_leaders_write_is_refused_and_leaves_nothing() {
    let pg = PostgresServer::start().await.unwrap();
    let mut conn = setup(&pg).await;
    fenced_insert(&mut conn, 1, "a", 7).await.unwrap();
    fenced_insert(&mut conn, 2, "a", 7).await.unwrap(); // same term, many writes
    fenced_insert(&mut conn, 3, "b", 8).await.unwrap(); // new leader
    let err = fenced_insert(&mut conn, 4, "a", 7).await.unwrap_err(); // old leader wakes up
    assert!(
        matches!(
            err,
            Error::StaleToken {
                token: FencingToken(7),
                highest: FencingToken(8),
                ..
            }
        ),
        "{err}"
    );
    let rows: Vec<(i32, String)> = sqlx::query_as("SELECT id, writer FROM orders ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, [(1, "a".into()), (2, "a".into()), (3, "b".into())]);
}

#[tokio::test]
async fn a_newer_writer_waits_for_an_older_admitted_transaction() {
    let pg = PostgresServer::start().await.unwrap();
    let mut setup_conn = setup(&pg).await;
    let mut old = PgConnection::connect(&pg.url()).await.unwrap();
    let mut old_tx = old.begin().await.unwrap();
    PgFence::new()
        .admit(&mut old_tx, "orders", FencingToken(7))
        .await
        .unwrap();

    // The new leader's admit blocks on the fence row while the old transaction is open.
    let url = pg.url();
    let newer = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        fenced_insert(&mut conn, 2, "b", 8).await
    });
    let blocked = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            .fetch_one(&mut setup_conn)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        blocked.is_ok(),
        "the newer writer must wait on the fence row lock"
    );
    sqlx::query("INSERT INTO orders VALUES (1, 'a')")
        .execute(&mut *old_tx)
        .await
        .unwrap();
    old_tx.commit().await.unwrap();
    newer.await.unwrap().unwrap();
    let rows: Vec<(i32, String)> = sqlx::query_as("SELECT id, writer FROM orders ORDER BY id")
        .fetch_all(&mut setup_conn)
        .await
        .unwrap();
    assert_eq!(
        rows,
        [(1, "a".into()), (2, "b".into())],
        "old write first, then the new one"
    );
    assert!(fenced_insert(&mut setup_conn, 3, "a", 7).await.is_err());
}

#[tokio::test]
async fn of_two_concurrent_first_admits_the_stale_one_is_refused() {
    // Two writers admit to a resource that has no fence row yet. The newer one (8) inserts the
    // row and holds it; the older one (7) blocks on the conflict, and once 8 commits it must be
    // refused and told 8 — not admitted because its statement's snapshot saw no row.
    let pg = PostgresServer::start().await.unwrap();
    let mut watcher = setup(&pg).await;
    let mut newer = PgConnection::connect(&pg.url()).await.unwrap();
    let mut newer_tx = newer.begin().await.unwrap();
    PgFence::new()
        .admit(&mut newer_tx, "orders", FencingToken(8))
        .await
        .unwrap();
    let url = pg.url();
    let older = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        fenced_insert(&mut conn, 1, "old", 7).await
    });
    // Wait (polling, with a deadline) until the older admit is blocked on the row lock, so
    // the interleaving is exactly the racy one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the older admit never blocked on the fence row"
        );
        tokio::task::yield_now().await;
    }
    sqlx::query("INSERT INTO orders VALUES (2, 'new')")
        .execute(&mut *newer_tx)
        .await
        .unwrap();
    newer_tx.commit().await.unwrap();
    let err = older.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::StaleToken {
                token: FencingToken(7),
                highest: FencingToken(8),
                ..
            }
        ),
        "{err}"
    );
    let rows: Vec<(i32, String)> = sqlx::query_as("SELECT id, writer FROM orders ORDER BY id")
        .fetch_all(&mut watcher)
        .await
        .unwrap();
    assert_eq!(rows, [(2, "new".into())], "the stale write never landed");
}
