//! Retention: published outbox rows are deleted after `published_retention`
//! (zero: at once, by the relay when it marks them), inbox rows after the
//! dedupe horizon. Deletes run in small batches, each its own short
//! statement, so they never hold locks writers wait for: writers only insert
//! new rows, and a batch skips rows someone else has locked.

use orderflow_db::CachedDsl;
use std::time::Duration;

use diesel::sql_types::{BigInt, Double};
use diesel_async::RunQueryDsl;
use orderflow_db::Conn;
use tokio_util::sync::CancellationToken;

/// Retention settings.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Keep published outbox rows this long (zero: delete when published).
    pub published: Duration,
    /// Keep inbox rows this long: a duplicate arriving later than this is
    /// no longer recognized.
    pub inbox: Duration,
    /// How often to sweep.
    pub interval: Duration,
    /// Rows per delete statement.
    pub batch: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            // Marking a row published rewrites it (a new tuple version with
            // its payload); deleting it is ~8x cheaper and is what lets the
            // relay keep up with the broker. Keep published rows only when
            // you want them for audits or replays of published events.
            published: Duration::ZERO,
            inbox: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(30),
            batch: 1000,
        }
    }
}

/// Rows removed by one sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Published outbox rows.
    pub outbox: u64,
    /// Inbox rows.
    pub inbox: u64,
}

/// Deletes what retention allows, batch by batch.
pub async fn sweep(conn: &mut Conn, retention: &Retention) -> diesel::QueryResult<Swept> {
    Ok(Swept {
        outbox: delete_in_batches(
            conn,
            "DELETE FROM outbox WHERE id IN ( \
                 SELECT id FROM outbox \
                 WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1) \
                 ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            retention.published,
            retention.batch,
        )
        .await?,
        inbox: delete_in_batches(
            conn,
            "DELETE FROM inbox WHERE ctid IN ( \
                 SELECT ctid FROM inbox WHERE received_at < now() - make_interval(secs => $1) \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            retention.inbox,
            retention.batch,
        )
        .await?,
    })
}

/// Runs `delete` (`$1`: age in seconds, `$2`: batch size) until a batch comes
/// back short, so no statement holds many row locks or a long transaction.
async fn delete_in_batches(conn: &mut Conn, delete: &str, age: Duration, batch: i64) -> diesel::QueryResult<u64> {
    let mut deleted = 0;
    loop {
        let n = diesel::sql_query(delete)
            .bind::<Double, _>(age.as_secs_f64())
            .bind::<BigInt, _>(batch)
            .cached()
            .execute(conn)
            .await?;
        deleted += n as u64;
        if (n as i64) < batch {
            return Ok(deleted);
        }
        tokio::task::yield_now().await;
    }
}

/// Housekeeping on its own connection, so the relay's claims never wait
/// for it: every 5 s the outbox gauges (backlog, oldest unpublished age, dead
/// rows by event type), every `retention.interval` a retention sweep.
pub(crate) async fn run(database_url: String, retention: Retention, shutdown: CancellationToken) {
    let gauges_every = Duration::from_secs(5).min(retention.interval);
    let mut conn: Option<Conn> = None;
    let mut last_sweep = tokio::time::Instant::now();
    let mut dead_types = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(gauges_every) => {}
            _ = shutdown.cancelled() => return,
        }
        if conn.is_none() {
            conn = orderflow_db::establish(&database_url).await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut ok = gauges(c, &mut dead_types).await.is_ok();
        if ok && last_sweep.elapsed() >= retention.interval {
            last_sweep = tokio::time::Instant::now();
            match sweep(c, &retention).await {
                Ok(s) => {
                    if s != Swept::default() {
                        tracing::info!(outbox = s.outbox, inbox = s.inbox, "retention removed rows");
                    }
                    metrics::counter!("outbox_retention_deleted_total", "table" => "outbox").increment(s.outbox);
                    metrics::counter!("outbox_retention_deleted_total", "table" => "inbox").increment(s.inbox);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention sweep failed");
                    ok = false;
                }
            }
        }
        if !ok {
            conn = None;
        }
    }
}

/// Sets the outbox gauges from the status query. `dead_types` remembers the
/// event types reported dead before, so their gauge drops to 0 once replayed.
async fn gauges(conn: &mut Conn, dead_types: &mut std::collections::HashSet<String>) -> diesel::QueryResult<()> {
    let status = crate::admin::status(conn).await?;
    metrics::gauge!("outbox_backlog").set(status.backlog as f64);
    metrics::gauge!("outbox_backing_off").set(status.backing_off as f64);
    metrics::gauge!("outbox_oldest_unpublished_age_seconds").set(status.oldest_unpublished_age_seconds.unwrap_or(0.0));
    metrics::gauge!("outbox_relays").set(status.relays.len() as f64);
    metrics::gauge!("outbox_unowned_lanes").set(status.unowned_lanes.len() as f64);
    for t in &status.dead_by_type {
        dead_types.insert(t.event_type.clone());
    }
    for event_type in dead_types.iter() {
        let dead = status.dead_by_type.iter().find(|t| &t.event_type == event_type).map_or(0, |t| t.count);
        metrics::gauge!("outbox_dead_rows", "event_type" => event_type.clone()).set(dead as f64);
    }
    Ok(())
}
