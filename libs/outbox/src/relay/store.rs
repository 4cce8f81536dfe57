use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Double, SmallInt, Text};
use diesel_async::RunQueryDsl;
use orderflow_db::CachedDsl;
use orderflow_db::Conn;

use super::RelayConfig;
use super::publisher::Outcome;
use crate::PendingRow;

/// The relay's claim of due rows: `$1` the lanes (`smallint[]`), `$2` the
/// most rows; only each aggregate's first unpublished event, in id order,
/// locked, skipping rows locked by others. Run with [`WORKER_SETTINGS`] on
/// the connection. Public for the tests that check its plan.
pub const CLAIM_SQL: &str = "SELECT o.id, o.message_id, o.event_type, o.schema_version, o.aggregate_type, \
                o.aggregate_id, o.aggregate_version, o.payload, o.headers, o.occurred_at, \
                o.created_at, o.attempts \
         FROM outbox o \
         WHERE o.published_at IS NULL AND o.dead_at IS NULL \
           AND o.lane = ANY($1) AND o.next_attempt_at <= now() \
           AND NOT EXISTS ( \
               SELECT 1 FROM outbox e \
               WHERE e.aggregate_id = o.aggregate_id AND e.id < o.id AND e.published_at IS NULL \
               OFFSET 0) \
         ORDER BY o.id \
         LIMIT $2 \
         FOR UPDATE OF o SKIP LOCKED";

/// Claims up to `limit` due rows of `lanes`, in id order, locking them.
///
/// Only the head of each aggregate's queue is claimable: a row waits while
/// an earlier event of its aggregate is unpublished (in flight in another
/// batch, backing off, or dead). So a batch never holds two events of one
/// aggregate, two batches in flight at once cannot reorder an aggregate, and
/// a stuck aggregate stops only itself. Rows locked by someone else (another
/// batch, an operator's replay) are skipped, never waited for.
///
/// A prepared statement, planned once per connection: the worker
/// connections turn sequential scans and sorts off (see `connect`), and the
/// head check is a subquery of its own (`OFFSET 0` keeps the planner from
/// turning it into a join), so the one plan there is walks the unpublished
/// rows in id order and looks up each candidate's aggregate by index,
/// whatever the table's size or statistics when it was planned. (Left to
/// the planner, a plan made on an empty or unanalyzed outbox scanned every
/// unpublished row for every candidate: quadratic in the backlog.)
///
/// Takes the connection shared, so that the relay can send it in one round
/// trip with the `BEGIN` before it (see `Db::start`).
pub(crate) async fn claim(conn: &Conn, lanes: &[i16], limit: i64) -> diesel::QueryResult<Vec<PendingRow>> {
    let mut shared = conn;
    diesel::sql_query(CLAIM_SQL)
        .bind::<Array<SmallInt>, _>(lanes)
        .bind::<BigInt, _>(limit)
        .cached()
        .load(&mut shared)
        .await
}

/// Session settings of the relay's connections that claim and mark: with them the
/// claim's one plan is the index walk whatever the statistics say, and it
/// and the marks (`id = ANY($1)`, which PostgreSQL would otherwise plan
/// afresh for every array) are planned once per connection.
pub const WORKER_SETTINGS: &str =
    "SET enable_seqscan = off; SET enable_sort = off; SET plan_cache_mode = force_generic_plan";

/// Whether a published row had a later event of its aggregate waiting.
#[derive(QueryableByName)]
struct Marked {
    #[diesel(sql_type = Bool)]
    has_next: bool,
}

/// Records the outcomes of a batch in the claim transaction. A row without
/// an outcome was not sent (its batch stopped before it): it stays as it was.
///
/// Returns whether a published row has a later event of its aggregate
/// waiting behind it (written before the batch or while it was in flight,
/// and left by every claim since, since only an aggregate's first
/// unpublished event is claimable): it can be claimed as soon as this
/// commits. Otherwise nothing the batch held back is waiting, and the relay
/// need not claim again until a wake-up or its poll.
///
/// Takes the connection shared, so that the relay can send the `COMMIT`
/// right behind it (see `Db::mark`). With only published rows it sends one
/// statement, at its first poll once that statement is prepared on the
/// connection; failed rows take a second one, sent after the first answer.
pub(crate) async fn mark(
    conn: &Conn,
    rows: &[PendingRow],
    outcomes: &[Option<Outcome>],
    cfg: &RelayConfig,
) -> diesel::QueryResult<bool> {
    let mut has_next = false;
    let published: Vec<i64> =
        rows.iter().zip(outcomes).filter(|(_, o)| **o == Some(Outcome::Published)).map(|(r, _)| r.id).collect();
    if !published.is_empty() {
        // Zero retention: nothing to keep, one write instead of two.
        let sql = if cfg.retention.published.is_zero() {
            "DELETE FROM outbox o WHERE o.id = ANY($1) RETURNING EXISTS ( \
                 SELECT 1 FROM outbox n \
                 WHERE n.aggregate_id = o.aggregate_id AND n.id > o.id AND n.published_at IS NULL) AS has_next"
        } else {
            "UPDATE outbox o SET published_at = clock_timestamp() WHERE o.id = ANY($1) RETURNING EXISTS ( \
                 SELECT 1 FROM outbox n \
                 WHERE n.aggregate_id = o.aggregate_id AND n.id > o.id AND n.published_at IS NULL) AS has_next"
        };
        let marked: Vec<Marked> =
            diesel::sql_query(sql).bind::<Array<BigInt>, _>(&published).cached().load(&mut { conn }).await?;
        has_next = marked.iter().any(|m| m.has_next);
    }
    // Failed rows: one statement for all of them, not a round trip each.
    let (mut ids, mut errors, mut delays, mut deads) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (row, outcome) in rows.iter().zip(outcomes) {
        let (error, max_attempts) = match outcome {
            Some(Outcome::Failed(e)) => (e, cfg.max_attempts),
            // Retrying cannot fix the row: dead on this attempt.
            Some(Outcome::Invalid(e)) => (e, 0),
            Some(Outcome::Published) | None => continue,
        };
        let delay = backoff(row.attempts, cfg);
        let dead = row.attempts + 1 >= max_attempts;
        if dead {
            tracing::error!(id = row.id, message_id = %row.message_id, event_type = %row.event_type,
                attempts = row.attempts + 1, error = %error, "outbox row is dead; later events of its aggregate wait");
            metrics::counter!("outbox_dead_total", "event_type" => row.event_type.clone()).increment(1);
        } else {
            tracing::warn!(id = row.id, event_type = %row.event_type, attempts = row.attempts + 1,
                retry_in = ?delay, error = %error, "publish failed, backing off");
        }
        ids.push(row.id);
        errors.push(error.as_str());
        delays.push(delay.as_secs_f64());
        deads.push(dead);
    }
    if !ids.is_empty() {
        diesel::sql_query(
            "UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error, \
                 next_attempt_at = clock_timestamp() + make_interval(secs => f.delay), \
                 dead_at = CASE WHEN f.dead THEN clock_timestamp() END \
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[]) AS f(id, error, delay, dead) \
             WHERE o.id = f.id",
        )
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Text>, _>(&errors)
        .bind::<Array<Double>, _>(&delays)
        .bind::<Array<diesel::sql_types::Bool>, _>(&deads)
        .cached()
        .execute(&mut { conn })
        .await?;
    }
    Ok(has_next)
}

/// Whether [`mark`] will send a single statement: only published rows
/// (or none), no failed ones.
pub(crate) fn marks_in_one(outcomes: &[Option<Outcome>]) -> bool {
    outcomes.iter().all(|o| matches!(o, Some(Outcome::Published) | None))
}

/// Backoff of a row after its `attempts`-th failure: base × 2^attempts,
/// capped, with jitter.
fn backoff(attempts: i32, cfg: &RelayConfig) -> std::time::Duration {
    crate::backoff::nth(attempts.max(0).unsigned_abs(), cfg.retry_base, cfg.retry_max)
}
