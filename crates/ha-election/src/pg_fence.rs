//! `PgFence`: fencing for writes to PostgreSQL, checked inside the writer's own transaction.

use ha_core::FencingToken;
use sqlx::PgConnection;

use crate::error::{Error, Result};

const STORE: &str = "postgres";

/// Rejects writes from deposed leaders at the database, inside the writer's transaction.
///
/// Call [`admit`](Self::admit) first in the transaction that makes the leader's write. It
/// records the token for the resource if it is at least the greatest one seen, and locks that
/// resource's fence row until the transaction ends, so fenced writers of one resource commit in
/// token order. A smaller token gets [`Error::StaleToken`]; drop (roll back) the transaction.
///
/// The process-pause story: leader A (token 7) checks it leads, begins a transaction and is
/// paused. Its lease expires; B leads with token 8 and commits a fenced write. A wakes and
/// continues: its `admit(…, 7)` finds 8 and fails, so its write never lands. If A had admitted
/// before pausing, B's `admit(…, 8)` waits for A's transaction to end — A's write is then
/// ordered before B's, never after it.
///
/// ```no_run
/// # async fn write(pool: sqlx::PgPool, token: ha_core::FencingToken) -> Result<(), Box<dyn std::error::Error>> {
/// use ha_election::PgFence;
///
/// let fence = PgFence::new();
/// fence.migrate(&mut *pool.acquire().await?).await?;
/// let mut tx = pool.begin().await?;
/// fence.admit(&mut tx, "orders", token).await?; // StaleToken for a deposed leader
/// sqlx::query("UPDATE orders SET state = 'shipped' WHERE id = 1").execute(&mut *tx).await?;
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct PgFence {
    _private: (),
}

impl PgFence {
    /// A fence on the table `ha_fences`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the fence table if it does not exist.
    pub async fn migrate(&self, conn: &mut PgConnection) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS ha_fences (resource text PRIMARY KEY, token bigint NOT NULL)",
        )
        .execute(conn)
        .await
        .map_err(|e| store_error("migrate", "ha_fences", e))?;
        Ok(())
    }

    /// Admits a write to `resource` under `token` in the transaction `conn` is in; see the
    /// type's docs. Equal tokens pass: a leader makes many writes in one term.
    pub async fn admit(
        &self,
        conn: &mut PgConnection,
        resource: &str,
        token: FencingToken,
    ) -> Result<()> {
        let value = i64::try_from(token.get()).map_err(|_| Error::Corrupt {
            store: STORE,
            key: resource.to_owned(),
            detail: format!("token {token} does not fit a bigint"),
        })?;
        // Decide on whether *this* statement wrote the row: a fallback read inside the same
        // statement would use its snapshot, which predates a concurrent first admit that
        // created the row (the conflict update then refuses us, and the old snapshot finds no
        // row at all).
        let admitted: bool = sqlx::query_scalar(
            "WITH up AS (
                 INSERT INTO ha_fences (resource, token) VALUES ($1, $2)
                 ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token
                 WHERE ha_fences.token <= EXCLUDED.token
                 RETURNING token)
             SELECT EXISTS (SELECT 1 FROM up)",
        )
        .bind(resource)
        .bind(value)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| store_error("admit", resource, e))?;
        if admitted {
            return Ok(());
        }
        // Refused: a new statement (a new snapshot under READ COMMITTED; under REPEATABLE READ
        // the conflict already failed with a serialization error) reports the latest token.
        let highest: Option<i64> =
            sqlx::query_scalar("SELECT token FROM ha_fences WHERE resource = $1")
                .bind(resource)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| store_error("admit", resource, e))?;
        let highest = FencingToken(
            highest
                .and_then(|h| u64::try_from(h).ok())
                .unwrap_or(token.get()),
        );
        tracing::warn!(resource, %token, %highest, "stale fencing token rejected");
        Err(Error::StaleToken {
            resource: resource.to_owned(),
            token,
            highest,
        })
    }
}

fn store_error(op: &'static str, key: &str, error: sqlx::Error) -> Error {
    Error::Store {
        store: STORE,
        op,
        key: key.to_owned(),
        source: Box::new(error),
    }
}
