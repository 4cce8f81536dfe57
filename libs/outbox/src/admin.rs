//! What operators see and repair: the outbox's status and replays of dead
//! or stuck rows (used by `outbox-relay status` and `replay`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use orderflow_db::Conn;
use orderflow_db::schema::{outbox, outbox_replays};
use serde::Serialize;
use uuid::Uuid;

use crate::lanes::{LANE_LOCK_CLASS, MEMBER_LOCK_CLASS};
use crate::writer::NOTIFY_CHANNEL;

/// The outbox at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Rows not published and not dead.
    pub backlog: i64,
    /// Of those, rows backing off after a failed publish.
    pub backing_off: i64,
    /// Age of the oldest unpublished, not dead row, in seconds.
    pub oldest_unpublished_age_seconds: Option<f64>,
    /// Dead rows per event type.
    pub dead_by_type: Vec<TypeCount>,
    /// Published rows still kept (until retention removes them).
    pub published_retained: i64,
    /// Relays connected to this database and their lanes.
    pub relays: Vec<RelayInfo>,
    /// Lanes no relay owns right now.
    pub unowned_lanes: Vec<i32>,
}

/// A count per event type.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct TypeCount {
    /// Event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Rows.
    #[diesel(sql_type = BigInt)]
    pub count: i64,
}

/// A relay session and the lanes it owns.
#[derive(Debug, Clone, Serialize)]
pub struct RelayInfo {
    /// `application_name` of its session (`outbox-relay:<relay id>`).
    pub name: String,
    /// Backend pid of its session.
    pub pid: i32,
    /// Lanes it owns.
    pub lanes: Vec<i32>,
}

#[derive(QueryableByName)]
struct Totals {
    #[diesel(sql_type = BigInt)]
    backlog: i64,
    #[diesel(sql_type = BigInt)]
    backing_off: i64,
    #[diesel(sql_type = Nullable<Double>)]
    oldest: Option<f64>,
    #[diesel(sql_type = BigInt)]
    published: i64,
}

#[derive(QueryableByName)]
struct Lock {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    class: i64,
    #[diesel(sql_type = Integer)]
    objid: i32,
}

/// Reads the status of the outbox and its relays.
pub async fn status(conn: &mut Conn) -> QueryResult<Status> {
    let totals: Totals = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS backlog, \
                count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL AND attempts > 0) AS backing_off, \
                extract(epoch FROM now() - min(created_at) FILTER (WHERE published_at IS NULL AND dead_at IS NULL))::float8 AS oldest, \
                count(*) FILTER (WHERE published_at IS NOT NULL) AS published \
         FROM outbox",
    )
    .get_result(conn)
    .await?;
    let dead_by_type: Vec<TypeCount> = diesel::sql_query(
        "SELECT event_type, count(*) AS count FROM outbox WHERE dead_at IS NOT NULL GROUP BY event_type ORDER BY event_type",
    )
    .load(conn)
    .await?;
    let locks: Vec<Lock> = diesel::sql_query(
        "SELECT l.pid, coalesce(a.application_name, '') AS name, l.classid::bigint AS class, l.objid::int AS objid \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint IN ($1, $2) \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         ORDER BY l.pid, l.objid",
    )
    .bind::<BigInt, _>(i64::from(MEMBER_LOCK_CLASS))
    .bind::<BigInt, _>(i64::from(LANE_LOCK_CLASS))
    .load(conn)
    .await?;
    let mut relays: Vec<RelayInfo> = locks
        .iter()
        .filter(|l| l.class == i64::from(MEMBER_LOCK_CLASS))
        .map(|l| RelayInfo { name: l.name.clone(), pid: l.pid, lanes: Vec::new() })
        .collect();
    let mut owned = std::collections::BTreeSet::new();
    for lock in locks.iter().filter(|l| l.class == i64::from(LANE_LOCK_CLASS)) {
        owned.insert(lock.objid);
        if let Some(relay) = relays.iter_mut().find(|r| r.pid == lock.pid) {
            relay.lanes.push(lock.objid);
        }
    }
    let unowned_lanes = (0..i32::from(orderflow_envelope::LANE_COUNT)).filter(|l| !owned.contains(l)).collect();
    Ok(Status {
        backlog: totals.backlog,
        backing_off: totals.backing_off,
        oldest_unpublished_age_seconds: totals.oldest,
        dead_by_type,
        published_retained: totals.published,
        relays,
        unowned_lanes,
    })
}

/// Which rows a replay is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Rows marked dead.
    Dead,
    /// Unpublished rows backing off after failed publishes.
    Stuck,
    /// Both.
    DeadOrStuck,
    /// Rows already published (to send them again; consumers dedupe by
    /// message id within their inbox horizon).
    Published,
}

/// A replay's selection. Every given criterion must hold.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Selector {
    /// Row ids.
    pub ids: Vec<i64>,
    /// Aggregate (order) id.
    pub aggregate_id: Option<String>,
    /// Event type.
    pub event_type: Option<String>,
    /// Written at or after.
    pub since: Option<DateTime<Utc>>,
    /// Written before.
    pub until: Option<DateTime<Utc>>,
}

impl Selector {
    /// True when nothing narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.aggregate_id.is_none()
            && self.event_type.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }
}

/// A row a replay would touch.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = outbox)]
pub struct Candidate {
    /// Row id.
    pub id: i64,
    /// Message id.
    pub message_id: Uuid,
    /// Event type.
    pub event_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Failed attempts.
    pub attempts: i32,
    /// Last publish error.
    pub last_error: Option<String>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When it died, if dead.
    pub dead_at: Option<DateTime<Utc>>,
    /// When it was published, if it was.
    pub published_at: Option<DateTime<Utc>>,
}

fn selected(scope: Scope, sel: &Selector) -> outbox::BoxedQuery<'static, diesel::pg::Pg> {
    let mut q = outbox::table.into_boxed();
    q = match scope {
        Scope::Dead => q.filter(outbox::dead_at.is_not_null()),
        Scope::Stuck => {
            q.filter(outbox::published_at.is_null().and(outbox::dead_at.is_null()).and(outbox::attempts.gt(0)))
        }
        Scope::DeadOrStuck => {
            q.filter(outbox::dead_at.is_not_null().or(outbox::published_at.is_null().and(outbox::attempts.gt(0))))
        }
        Scope::Published => q.filter(outbox::published_at.is_not_null()),
    };
    if !sel.ids.is_empty() {
        q = q.filter(outbox::id.eq_any(sel.ids.clone()));
    }
    if let Some(a) = &sel.aggregate_id {
        q = q.filter(outbox::aggregate_id.eq(a.clone()));
    }
    if let Some(t) = &sel.event_type {
        q = q.filter(outbox::event_type.eq(t.clone()));
    }
    if let Some(s) = sel.since {
        q = q.filter(outbox::created_at.ge(s));
    }
    if let Some(u) = sel.until {
        q = q.filter(outbox::created_at.lt(u));
    }
    q.order(outbox::id)
}

/// The rows a replay of `scope` and `sel` would touch.
pub async fn replay_candidates(conn: &mut Conn, scope: Scope, sel: &Selector) -> QueryResult<Vec<Candidate>> {
    selected(scope, sel).select(Candidate::as_select()).load(conn).await
}

/// Makes the selected rows due again (not dead, no failed attempts, not
/// published) and records the replay, in one transaction; the relay picks
/// them up at once. Returns the rows replayed.
pub async fn replay(
    conn: &mut Conn,
    scope: Scope,
    sel: &Selector,
    operator: &str,
    reason: Option<&str>,
) -> QueryResult<Vec<Candidate>> {
    replay_with_progress(conn, scope, sel, operator, reason, |_, _| {}).await
}

/// Rows reset per statement of a replay: progress is reported between them.
pub const REPLAY_CHUNK: usize = 1000;

/// Like [`replay`], calling `progress(done, total)` once the selection is
/// known (`done` 0) and after each [`REPLAY_CHUNK`] rows are reset. It is
/// still one transaction: all or nothing, one record.
pub async fn replay_with_progress(
    conn: &mut Conn,
    scope: Scope,
    sel: &Selector,
    operator: &str,
    reason: Option<&str>,
    mut progress: impl FnMut(usize, usize) + Send,
) -> QueryResult<Vec<Candidate>> {
    conn.transaction(async |tx| {
        let seen: Vec<i64> = selected(scope, sel).select(outbox::id).load(tx).await?;
        if seen.is_empty() {
            return Ok(Vec::new());
        }
        progress(0, seen.len());
        let mut rows: Vec<Candidate> = Vec::with_capacity(seen.len());
        let mut looked = 0;
        // In chunks, so a large selection reports progress; each update
        // locks its rows and re-checks them: a row the relay publishes
        // while we wait for its lock is left alone.
        for chunk in seen.chunks(REPLAY_CHUNK) {
            let target = outbox::table.filter(outbox::id.eq_any(chunk));
            let reset = (
                outbox::dead_at.eq(None::<DateTime<Utc>>),
                outbox::published_at.eq(None::<DateTime<Utc>>),
                outbox::attempts.eq(0),
                outbox::next_attempt_at.eq(diesel::dsl::now),
            );
            let done: Vec<Candidate> = if scope == Scope::Published {
                diesel::update(target.filter(outbox::published_at.is_not_null()))
                    .set(reset)
                    .returning(Candidate::as_returning())
                    .get_results(tx)
                    .await?
            } else {
                diesel::update(target.filter(outbox::published_at.is_null()))
                    .set(reset)
                    .returning(Candidate::as_returning())
                    .get_results(tx)
                    .await?
            };
            rows.extend(done);
            looked += chunk.len();
            progress(looked, seen.len());
        }
        rows.sort_by_key(|r| r.id);
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let selector = serde_json::json!({ "scope": scope, "selector": sel });
        record(tx, "outbox", operator, reason, &selector, &serde_json::json!(ids), ids.len()).await?;
        diesel::sql_query(format!("NOTIFY {NOTIFY_CHANNEL}")).execute(tx).await?;
        Ok(rows)
    })
    .await
}

/// Records a replay or requeue.
pub async fn record(
    conn: &mut Conn,
    kind: &str,
    operator: &str,
    reason: Option<&str>,
    selector: &serde_json::Value,
    items: &serde_json::Value,
    count: usize,
) -> QueryResult<()> {
    diesel::insert_into(outbox_replays::table)
        .values((
            outbox_replays::operator.eq(operator),
            outbox_replays::reason.eq(reason),
            outbox_replays::kind.eq(kind),
            outbox_replays::selector.eq(selector),
            outbox_replays::items.eq(items),
            outbox_replays::item_count.eq(i32::try_from(count).unwrap_or(i32::MAX)),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// A recorded replay.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = outbox_replays)]
pub struct ReplayRecord {
    /// Id.
    pub id: i64,
    /// When.
    pub replayed_at: DateTime<Utc>,
    /// Who.
    pub operator: String,
    /// Why.
    pub reason: Option<String>,
    /// `outbox` or `dlq`.
    pub kind: String,
    /// What was selected.
    pub selector: serde_json::Value,
    /// Row ids or message ids.
    pub items: serde_json::Value,
    /// How many.
    pub item_count: i32,
}

/// The latest replays, newest first.
pub async fn replays(conn: &mut Conn, limit: i64) -> QueryResult<Vec<ReplayRecord>> {
    outbox_replays::table
        .order(outbox_replays::id.desc())
        .limit(limit)
        .select(ReplayRecord::as_select())
        .load(conn)
        .await
}

/// Dead rows sharing one event type and last error.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct ReasonCount {
    /// Event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// The last publish error (`(none)` if none was recorded).
    #[diesel(sql_type = Text)]
    pub reason: String,
    /// Rows.
    #[diesel(sql_type = BigInt)]
    pub count: i64,
}

/// Dead rows grouped by event type and last error, largest groups first
/// (at most `limit` groups).
pub async fn dead_by_reason(conn: &mut Conn, limit: i64) -> QueryResult<Vec<ReasonCount>> {
    diesel::sql_query(
        "SELECT event_type, coalesce(last_error, '(none)') AS reason, count(*) AS count \
         FROM outbox WHERE dead_at IS NOT NULL \
         GROUP BY 1, 2 ORDER BY count DESC, event_type, reason LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await
}

/// The outbox rows about one aggregate, oldest first: rows whose aggregate
/// id is `id`, or whose payload's `payload_field` (e.g. `order_id`) is `id`.
/// Published rows are only there while retention keeps them.
pub async fn rows_naming(conn: &mut Conn, id: &str, payload_field: &str, limit: i64) -> QueryResult<Vec<Candidate>> {
    use diesel::dsl::sql;
    use diesel::sql_types::Bool;
    // The payload test scans the outbox; it holds little besides the
    // backlog and the rows retention keeps.
    let in_payload =
        sql::<Bool>("payload ->> ").bind::<Text, _>(payload_field.to_owned()).sql(" = ").bind::<Text, _>(id.to_owned());
    outbox::table
        .filter(outbox::aggregate_id.eq(id.to_owned()).or(in_payload))
        .order(outbox::id)
        .limit(limit)
        .select(Candidate::as_select())
        .load(conn)
        .await
}

/// An inbox entry: a message a consumer of this database handled.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct InboxEntry {
    /// Consumer that handled it.
    #[diesel(sql_type = Text)]
    pub consumer: String,
    /// Message id.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub message_id: Uuid,
    /// Event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// When it was handled.
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub received_at: DateTime<Utc>,
}

/// Inbox entries linked to the outbox rows of one aggregate (see
/// [`rows_naming`]): the messages that caused them (their causation ids)
/// and those rows' own messages where this database consumes them too.
/// The inbox keeps no payload, so only these links name the aggregate.
/// `None` when the database has no inbox table.
pub async fn inbox_naming(
    conn: &mut Conn,
    id: &str,
    payload_field: &str,
    limit: i64,
) -> QueryResult<Option<Vec<InboxEntry>>> {
    #[derive(QueryableByName)]
    struct Present {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        present: bool,
    }
    let found: Present =
        diesel::sql_query("SELECT to_regclass('inbox') IS NOT NULL AS present").get_result(conn).await?;
    if !found.present {
        return Ok(None);
    }
    let entries = diesel::sql_query(
        "WITH rows AS ( \
             SELECT message_id, headers FROM outbox WHERE aggregate_id = $1 OR payload ->> $2 = $1 \
         ), linked AS ( \
             SELECT message_id FROM rows \
             UNION SELECT (headers ->> 'causation_id')::uuid FROM rows WHERE headers ->> 'causation_id' IS NOT NULL \
         ) \
         SELECT i.consumer, i.message_id, i.event_type, i.received_at \
         FROM inbox i JOIN linked l ON l.message_id = i.message_id \
         ORDER BY i.received_at, i.consumer LIMIT $3",
    )
    .bind::<Text, _>(id)
    .bind::<Text, _>(payload_field)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(Some(entries))
}
