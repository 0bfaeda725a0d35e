//! PostgreSQL round trips on a real server (ha-testkit) with the real `pg_dump` and
//! `pg_restore` of the server's version.
#![allow(clippy::unwrap_used)]

mod common;

use ha_dr::{Details, Error, PgTools, RestoreTarget, ScratchPostgres, Source};
use ha_testkit::PostgresServer;
use sqlx::Connection;

fn tools() -> PgTools {
    let dir = ha_testkit::binaries::postgres_bin_dir().expect(
        "PostgreSQL binaries (pg_dump, pg_restore) are needed: apt-get install -y postgresql",
    );
    for program in ["pg_dump", "pg_restore"] {
        assert!(
            dir.join(program).exists(),
            "{program} missing in {} (apt-get install -y postgresql)",
            dir.display()
        );
    }
    PgTools::in_dir(dir)
}

/// A fingerprint of every row of every test table, in order.
async fn fingerprint(pg: &PostgresServer, db: &str) -> String {
    let mut conn = pg.connect_to(db).await.unwrap();
    let sql = "SELECT coalesce(md5(string_agg(i::text, ',' ORDER BY id)), '') FROM items i";
    let items: String = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
    let sql =
        "SELECT coalesce(md5(string_agg(n::text, ',' ORDER BY k)), '') FROM \"Odd \"\"Name\"\"\" n";
    let odd: String = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    format!("{items}/{odd}")
}

async fn databases(pg: &PostgresServer) -> Vec<String> {
    let mut conn = pg.connect().await.unwrap();
    let names: Vec<String> = sqlx::query_scalar("SELECT datname::text FROM pg_database ORDER BY 1")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_round_trip_restore_test_force_and_corruption() {
    let pg = PostgresServer::start().await.unwrap();
    pg.execute("CREATE DATABASE app").await.unwrap();
    let mut conn = pg.connect_to("app").await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text, data bytea, at timestamptz);
         INSERT INTO items SELECT g, 'item ' || g || E'\\n\\t''quoted''', \
             decode(md5(g::text), 'hex'), '2020-01-01'::timestamptz + g * interval '1 minute' \
             FROM generate_series(1, 20000) g;
         CREATE TABLE \"Odd \"\"Name\"\"\" (k int PRIMARY KEY, v jsonb);
         INSERT INTO \"Odd \"\"Name\"\"\" VALUES (1, '{\"a\": [1, 2]}'), (2, NULL);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let before = fingerprint(&pg, "app").await;

    let (repo, dir) = common::repo(5);
    let tools = tools();
    let m = repo
        .backup(&Source::postgres(pg.url_for("app"), tools.clone()), &[])
        .await
        .unwrap();
    match &m.details {
        Details::Postgres { table_rows } => {
            assert_eq!(table_rows.get("public.items"), Some(&20_000));
            assert_eq!(table_rows.get("public.Odd \"Name\""), Some(&2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.source, pg.url_for("app"));
    repo.verify(&m.id).await.unwrap();

    // Into a new database: row for row.
    let target = RestoreTarget::Postgres {
        url: pg.url_for("restored"),
        tools: tools.clone(),
    };
    repo.restore(&m.id, &target, false).await.unwrap();
    assert_eq!(fingerprint(&pg, "restored").await, before);

    // Over an existing one: refused, then done with force after a safety backup.
    let err = repo.restore(&m.id, &target, false).await.unwrap_err();
    assert!(matches!(err, Error::TargetNotEmpty { .. }), "{err}");
    pg.execute("CREATE DATABASE scribble").await.unwrap();
    let mut conn = pg.connect_to("restored").await.unwrap();
    sqlx::raw_sql("DELETE FROM items WHERE id > 10")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    repo.restore(&m.id, &target, true).await.unwrap();
    assert_eq!(fingerprint(&pg, "restored").await, before);
    let safety: Vec<_> = repo
        .list_authenticated()
        .await
        .unwrap()
        .0
        .into_iter()
        .filter(|b| b.tags == ["pre-restore-safety"])
        .collect();
    assert_eq!(
        safety.len(),
        1,
        "a safety backup of the overwritten database"
    );
    match &safety[0].details {
        Details::Postgres { table_rows } => assert_eq!(table_rows.get("public.items"), Some(&10)),
        other => panic!("{other:?}"),
    }

    // Restore test: scratch database, row counts compared, dropped again.
    let scratch = ScratchPostgres {
        url: pg.url(),
        tools: tools.clone(),
    };
    let checked = repo.restore_test(&m.id, Some(&scratch)).await.unwrap();
    assert_eq!(checked.detail, "2 tables, row counts match");
    assert!(
        !databases(&pg).await.iter().any(|d| d.contains("hadr")),
        "{:?}",
        databases(&pg).await
    );

    // A corrupt backup never produces a database.
    let data = dir.path().join("store").join(format!("{}.data", m.id));
    let mut bytes = std::fs::read(&data).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();
    let broken = RestoreTarget::Postgres {
        url: pg.url_for("broken"),
        tools,
    };
    let err = repo.restore(&m.id, &broken, false).await.unwrap_err();
    assert!(err.is_corruption(), "{err}");
    let dbs = databases(&pg).await;
    assert!(
        !dbs.iter()
            .any(|d| d.contains("broken") || d.contains("hadr")),
        "{dbs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pg_dump_is_a_failed_backup() {
    let pg = PostgresServer::start().await.unwrap();
    let (repo, _dir) = common::repo(5);
    let err = repo
        .backup(&Source::postgres(pg.url_for("no_such_db"), tools()), &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_db"), "{err}");
    assert!(repo.list().await.unwrap().is_empty());
    let missing = PgTools::in_dir("/nonexistent");
    pg.execute("CREATE DATABASE app").await.unwrap();
    let err = repo
        .backup(&Source::postgres(pg.url_for("app"), missing), &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pg_dump"), "{err}");
    assert!(repo.list().await.unwrap().is_empty());
}
