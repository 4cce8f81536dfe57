use std::cell::Cell;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orderflow_db::CachedDsl;
use orderflow_db::Conn;
use orderflow_db::schema::outbox;
use orderflow_envelope::{DomainEvent, Envelope, Metadata};
use uuid::Uuid;

use crate::limits::{Limits, Unpublishable};
use crate::row::OutboxHeaders;

/// The PostgreSQL channel on which writers wake relays.
pub const NOTIFY_CHANNEL: &str = "orderflow_outbox";

#[derive(Insertable)]
#[diesel(table_name = outbox)]
struct NewRow<'a> {
    message_id: Uuid,
    event_type: &'a str,
    schema_version: String,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    aggregate_version: i64,
    lane: i16,
    payload: &'a serde_json::Value,
    headers: serde_json::Value,
    occurred_at: DateTime<Utc>,
}

tokio::task_local! {
    /// Set by [`append_with`] while [`watch_appends`] runs.
    static APPENDED: Cell<bool>;
}

/// Runs `work` and tells whether it appended outbox rows (in this task), so
/// that a consumer wakes the relays only after a commit that gave them
/// something: most handlers write no events for most messages (a timeline
/// entry, a notification), and every wake-up costs a `NOTIFY` and a claim.
/// Rows appended from another task go unseen; they wait for the relay's
/// poll, as after a lost wake-up.
pub async fn watch_appends<F: Future>(work: F) -> (F::Output, bool) {
    APPENDED
        .scope(Cell::new(false), async {
            let out = work.await;
            (out, APPENDED.with(Cell::get))
        })
        .await
}

/// An event held (see [`orderflow_db::held`]) to be appended with the
/// batch's other events.
struct Held(Envelope);

impl orderflow_db::held::HeldRows for Held {
    async fn write(conn: &mut Conn, rows: Vec<Self>) -> QueryResult<()> {
        let events: Vec<Envelope> = rows.into_iter().map(|Held(e)| e).collect();
        // A flush comes in any size: cached only when it is one row.
        let cache = events.len() == 1;
        insert(conn, &events, cache).await
    }
}

/// Appends `events` to the outbox inside the caller's open transaction.
/// Nothing is published here: the rows become visible to the relay only if
/// the caller commits. After the commit, the caller wakes the relay with
/// [`crate::Waker::wake`] (no `NOTIFY` here: it would serialize every
/// writer's commit on PostgreSQL's server-wide notify lock).
///
/// An event that can never be published (see [`Limits::check`]: an event
/// type over 255 bytes, a message above [`Limits::max_message_bytes`]) is
/// refused before anything is written, with an
/// [`Unpublishable`] inside `diesel::result::Error::SerializationError`
/// (get it with [`Unpublishable::find`]); the transaction stays usable.
pub async fn append(conn: &mut Conn, events: &[Envelope]) -> QueryResult<()> {
    append_with(conn, events, &Limits::default()).await
}

/// [`append`] with size limits other than the defaults (e.g. a broker whose
/// `max_message_size` is lower).
pub async fn append_with(conn: &mut Conn, events: &[Envelope], limits: &Limits) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    for e in events {
        limits.check(e).map_err(|refused: Unpublishable| {
            metrics::counter!("outbox_append_refused_total").increment(1);
            diesel::result::Error::SerializationError(Box::new(refused))
        })?;
    }
    // In a consumer's batch the rows go in with the batch's other events,
    // one statement just before the commit (in the order appended: the
    // relay publishes an aggregate's events in that order).
    match orderflow_db::held::hold(events.iter().cloned().map(Held).collect()) {
        Ok(()) => {
            let _ = APPENDED.try_with(|a| a.set(true));
            Ok(())
        }
        Err(_) => insert(conn, events, true).await,
    }
}

/// One `INSERT` of `events` (checked already), its statement cached if
/// `cache` (see `orderflow_db::CachedDsl::cached_if`).
async fn insert(conn: &mut Conn, events: &[Envelope], cache: bool) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let rows = events
        .iter()
        .map(|e| NewRow {
            message_id: e.message_id,
            event_type: &e.event_type,
            schema_version: e.schema_version.to_string(),
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            aggregate_version: e.aggregate_version,
            lane: e.lane(),
            payload: &e.payload,
            headers: OutboxHeaders::of(e).to_json(),
            occurred_at: e.occurred_at,
        })
        .collect::<Vec<_>>();
    diesel::insert_into(outbox::table).values(&rows).cached_if(cache).execute(conn).await?;
    // Outside `watch_appends` there is no one to tell.
    let _ = APPENDED.try_with(|a| a.set(true));
    for e in events {
        metrics::counter!("outbox_appended_total", "event_type" => e.event_type.clone()).increment(1);
    }
    Ok(())
}

/// Wraps `event` (the aggregate at `version`, caused as `meta` says) in an
/// envelope and appends it; see [`append`].
pub async fn emit<E: DomainEvent>(conn: &mut Conn, event: &E, version: i64, meta: &Metadata) -> QueryResult<Envelope> {
    let env =
        Envelope::new(event, version, meta).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    append(conn, std::slice::from_ref(&env)).await?;
    Ok(env)
}
