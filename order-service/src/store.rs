//! Database access of order-service. Every write that produces an event
//! appends it to the outbox and to the order's timeline in the same
//! transaction.
// Row structs mirror the columns documented in `migrations/`.
#![allow(missing_docs)]

use orderflow_db::CachedDsl;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orderflow_db::Conn;
use orderflow_envelope::{DomainEvent, Envelope, Metadata};
use uuid::Uuid;

use crate::domain::{NewOrder, OrderStatus};
use crate::schema::{order_items, order_timeline, orders};

/// A stored order.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = orders)]
pub struct OrderRow {
    pub id: String,
    pub customer_id: String,
    pub status: OrderStatus,
    pub total_amount: i64,
    pub force_fail: bool,
    pub fail_reason: Option<String>,
    pub cancel_reason: Option<String>,
    pub tracking_number: Option<String>,
    pub version: i64,
    pub request_hash: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A stored line.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = order_items)]
pub struct ItemRow {
    pub order_id: String,
    pub line_no: i32,
    pub sku: String,
    pub quantity: i32,
    pub unit_price: i64,
}

/// A timeline entry.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = order_timeline)]
pub struct TimelineRow {
    pub id: i64,
    pub order_id: String,
    pub event_type: String,
    pub message_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub details: serde_json::Value,
}

/// An order with its lines.
#[derive(Debug, Clone)]
pub struct Order {
    pub row: OrderRow,
    pub items: Vec<ItemRow>,
}

/// Result of [`create_many`], per order.
#[derive(Debug)]
pub enum Created {
    /// A new order was stored and `order.created` written.
    New(Order),
    /// The same order was posted before: nothing written.
    Existing(Order),
    /// The id is taken by a different order.
    Conflict(Order),
}

/// Stores new orders, their lines, their timeline entries and their
/// `order.created` events, in the caller's transaction, with one statement
/// per table whatever the number of orders (the intake writes a whole
/// batch of requests this way: see [`crate::intake`]). Returns one
/// [`Created`] per order, in the order given.
///
/// An id posted before (or earlier in the same batch) is not written again:
/// the stored order comes back as [`Created::Existing`] when the body is the
/// same, [`Created::Conflict`] when it differs. A concurrent POST with the
/// same id waits on the primary key and then finds the stored order.
pub async fn create_many(conn: &mut Conn, new: &[(&NewOrder, &Metadata)]) -> QueryResult<Vec<Created>> {
    // One row per id (the first posted); later copies are answered from it.
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, (order, _)) in new.iter().enumerate() {
        first.entry(order.id.as_str()).or_insert(i);
    }
    // Ids in one order in every batch: two batches that share ids wait for
    // each other instead of deadlocking.
    let mut unique: Vec<&NewOrder> = first.values().map(|i| new[*i].0).collect();
    unique.sort_by(|a, b| a.id.cmp(&b.id));
    let rows: Vec<_> = unique
        .iter()
        .map(|o| {
            (
                orders::id.eq(&o.id),
                orders::customer_id.eq(&o.customer_id),
                orders::status.eq(OrderStatus::Pending.as_str()),
                orders::total_amount.eq(o.total_amount.minor()),
                orders::force_fail.eq(o.force_fail),
                orders::request_hash.eq(&o.request_hash),
            )
        })
        .collect();
    // RETURNING: the stored rows come back with the insert, no second read.
    let inserted: Vec<OrderRow> = diesel::insert_into(orders::table)
        .values(&rows)
        .on_conflict(orders::id)
        .do_nothing()
        .returning(OrderRow::as_returning())
        .cached()
        .get_results(conn)
        .await?;
    let mut stored: HashMap<String, OrderRow> = inserted.into_iter().map(|r| (r.id.clone(), r)).collect();
    let fresh: Vec<usize> = (0..new.len())
        .filter(|i| first.get(new[*i].0.id.as_str()) == Some(i) && stored.contains_key(&new[*i].0.id))
        .collect();

    let lines: Vec<_> = fresh
        .iter()
        .flat_map(|i| {
            let order = new[*i].0;
            order.items.iter().enumerate().map(move |(n, item)| {
                (
                    order_items::order_id.eq(&order.id),
                    order_items::line_no.eq(n as i32),
                    order_items::sku.eq(&item.sku),
                    order_items::quantity.eq(item.quantity),
                    order_items::unit_price.eq(item.unit_price.minor()),
                )
            })
        })
        .collect();
    if !lines.is_empty() {
        diesel::insert_into(order_items::table).values(&lines).cached().execute(conn).await?;
    }
    let mut events = Vec::with_capacity(fresh.len());
    for i in &fresh {
        let (order, meta) = new[*i];
        let event = orderflow_contracts::events::OrderCreated {
            order_id: order.id.clone(),
            customer_id: order.customer_id.clone(),
            items: order.items.clone(),
            total_amount: order.total_amount,
            force_fail: order.force_fail,
        };
        events
            .push(Envelope::new(&event, 1, meta).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?);
    }
    orderflow_outbox::append(conn, &events).await?;
    record_all(conn, &events).await?;
    metrics::counter!("orders_created_total").increment(fresh.len() as u64);

    let mut out = Vec::with_capacity(new.len());
    for (i, (order, _)) in new.iter().enumerate() {
        if fresh.contains(&i) {
            let row = stored.get(&order.id).cloned().ok_or(diesel::result::Error::NotFound)?;
            out.push(Created::New(Order { row, items: item_rows(order) }));
            continue;
        }
        // Posted before, or earlier in this batch.
        let existing = match stored.get(&order.id) {
            Some(row) => Order { row: row.clone(), items: item_rows(new[first[order.id.as_str()]].0) },
            None => {
                let found = get(conn, &order.id).await?.ok_or(diesel::result::Error::NotFound)?;
                stored.insert(order.id.clone(), found.row.clone());
                found
            }
        };
        out.push(if existing.row.request_hash == order.request_hash {
            Created::Existing(existing)
        } else {
            Created::Conflict(existing)
        });
    }
    Ok(out)
}

/// The stored lines of a new order, as written.
fn item_rows(order: &NewOrder) -> Vec<ItemRow> {
    order
        .items
        .iter()
        .enumerate()
        .map(|(i, item)| ItemRow {
            order_id: order.id.clone(),
            line_no: i as i32,
            sku: item.sku.clone(),
            quantity: item.quantity,
            unit_price: item.unit_price.minor(),
        })
        .collect()
}

/// Appends `event` (about the order at `version`) to the outbox and to the
/// order's timeline.
pub async fn emit<E: DomainEvent>(conn: &mut Conn, event: &E, version: i64, meta: &Metadata) -> QueryResult<Envelope> {
    let env = orderflow_outbox::emit(conn, event, version, meta).await?;
    record(conn, &env).await?;
    Ok(env)
}

/// Adds an event to its order's timeline (once per message id).
pub async fn record(conn: &mut Conn, env: &Envelope) -> QueryResult<()> {
    record_all(conn, std::slice::from_ref(env)).await
}

/// Adds events to their orders' timelines (each once per message id), in
/// one statement; in a consumer's batch, with the batch's other entries
/// just before the commit (see `orderflow_db::held`). An entry for an
/// order that does not exist fails on the foreign key, then or there.
pub async fn record_all(conn: &mut Conn, events: &[Envelope]) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    match orderflow_db::held::hold(events.iter().cloned().map(TimelineEntry).collect()) {
        Ok(()) => Ok(()),
        Err(_) => insert_timeline(conn, events, true).await,
    }
}

/// A timeline entry held for the batch's statement.
struct TimelineEntry(Envelope);

impl orderflow_db::held::HeldRows for TimelineEntry {
    async fn write(conn: &mut Conn, rows: Vec<Self>) -> QueryResult<()> {
        let events: Vec<Envelope> = rows.into_iter().map(|TimelineEntry(e)| e).collect();
        // A flush comes in any size: cached only when it is one row.
        let cache = events.len() == 1;
        insert_timeline(conn, &events, cache).await
    }
}

/// One `INSERT` of timeline entries, its statement cached if `cache`.
async fn insert_timeline(conn: &mut Conn, events: &[Envelope], cache: bool) -> QueryResult<()> {
    let rows: Vec<_> = events
        .iter()
        .map(|env| {
            let mut details = env.payload.clone();
            if let Some(obj) = details.as_object_mut() {
                obj.remove("order_id");
            }
            (
                order_timeline::order_id.eq(env.aggregate_id.as_str()),
                order_timeline::event_type.eq(env.event_type.as_str()),
                order_timeline::message_id.eq(env.message_id),
                order_timeline::occurred_at.eq(env.occurred_at),
                order_timeline::details.eq(details),
            )
        })
        .collect();
    diesel::insert_into(order_timeline::table)
        .values(&rows)
        .on_conflict(order_timeline::message_id)
        .do_nothing()
        .cached_if(cache)
        .execute(conn)
        .await?;
    Ok(())
}

/// Loads an order without its lines.
pub async fn get_row(conn: &mut Conn, id: &str) -> QueryResult<Option<OrderRow>> {
    orders::table.find(id).select(OrderRow::as_select()).first(conn).await.optional()
}

/// Loads an order and its lines (one statement: every poll reads it).
pub async fn get(conn: &mut Conn, id: &str) -> QueryResult<Option<Order>> {
    let rows: Vec<(OrderRow, Option<ItemRow>)> = orders::table
        .left_join(order_items::table)
        .filter(orders::id.eq(id))
        .order(order_items::line_no)
        .select((OrderRow::as_select(), Option::<ItemRow>::as_select()))
        .cached()
        .load(conn)
        .await?;
    let mut rows = rows.into_iter();
    let Some((row, first)) = rows.next() else {
        return Ok(None);
    };
    let items = first.into_iter().chain(rows.filter_map(|(_, item)| item)).collect();
    Ok(Some(Order { row, items }))
}

/// A change of status, applied only if the order is still at `expected`
/// version (optimistic concurrency).
#[derive(Debug, Default)]
pub struct Change {
    pub status: Option<OrderStatus>,
    pub fail_reason: Option<String>,
    pub cancel_reason: Option<String>,
    pub tracking_number: Option<String>,
}

/// Applies `change` if the order is still at version `expected`; returns
/// false when someone else changed it first (the caller retries).
pub async fn update(conn: &mut Conn, id: &str, expected: i64, change: Change) -> QueryResult<bool> {
    let target = orders::table.filter(orders::id.eq(id)).filter(orders::version.eq(expected));
    let Change { status, fail_reason, cancel_reason, tracking_number } = change;
    let n = diesel::update(target)
        .set((
            status.map(|s| orders::status.eq(s.as_str())),
            fail_reason.map(|r| orders::fail_reason.eq(r)),
            cancel_reason.map(|r| orders::cancel_reason.eq(r)),
            tracking_number.map(|t| orders::tracking_number.eq(t)),
            orders::version.eq(expected + 1),
            orders::updated_at.eq(diesel::dsl::now),
        ))
        .cached()
        .execute(conn)
        .await?;
    Ok(n == 1)
}

/// Result of [`cancel`].
#[derive(Debug)]
pub enum Cancelled {
    /// No such order.
    NotFound,
    /// Cancelled now; `order.cancelled` written.
    Now(Order),
    /// It was cancelled before: nothing written.
    Already(Order),
    /// Final in another state (confirmed = shipped, or failed).
    Refused(Order),
    /// The order changed between reading and writing: try again.
    Raced,
}

/// Cancels a pending order with an optimistic version check, writing
/// `order.cancelled` in the same transaction.
pub async fn cancel(conn: &mut Conn, id: &str, reason: Option<&str>, meta: &Metadata) -> QueryResult<Cancelled> {
    let Some(order) = get(conn, id).await? else {
        return Ok(Cancelled::NotFound);
    };
    match order.row.status {
        OrderStatus::Cancelled => return Ok(Cancelled::Already(order)),
        OrderStatus::Confirmed | OrderStatus::Failed => return Ok(Cancelled::Refused(order)),
        OrderStatus::Pending => {}
    }
    let change =
        Change { status: Some(OrderStatus::Cancelled), cancel_reason: reason.map(str::to_owned), ..Change::default() };
    if !update(conn, id, order.row.version, change).await? {
        return Ok(Cancelled::Raced);
    }
    let event = orderflow_contracts::events::OrderCancelled {
        order_id: id.to_owned(),
        customer_id: order.row.customer_id.clone(),
        reason: reason.map(str::to_owned),
    };
    emit(conn, &event, order.row.version + 1, meta).await?;
    metrics::counter!("orders_finalized_total", "status" => "cancelled").increment(1);
    let order = get(conn, id).await?.ok_or(diesel::result::Error::NotFound)?;
    Ok(Cancelled::Now(order))
}

/// Filters and position of a listing page.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub status: Option<OrderStatus>,
    pub customer_id: Option<String>,
    /// Keyset cursor: strictly older than this (created_at, id).
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

/// Orders newest first, with their lines.
pub async fn list(conn: &mut Conn, q: &ListQuery) -> QueryResult<Vec<Order>> {
    let mut query = orders::table.select(OrderRow::as_select()).into_boxed();
    if let Some(status) = q.status {
        query = query.filter(orders::status.eq(status.as_str()));
    }
    if let Some(customer) = &q.customer_id {
        query = query.filter(orders::customer_id.eq(customer.clone()));
    }
    if let Some((ts, id)) = &q.after {
        let (ts, id) = (*ts, id.clone());
        query = query.filter(orders::created_at.lt(ts).or(orders::created_at.eq(ts).and(orders::id.lt(id))));
    }
    let rows: Vec<OrderRow> =
        query.order((orders::created_at.desc(), orders::id.desc())).limit(q.limit).load(conn).await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let items: Vec<ItemRow> = order_items::table
        .filter(order_items::order_id.eq_any(&ids))
        .order((order_items::order_id, order_items::line_no))
        .select(ItemRow::as_select())
        .load(conn)
        .await?;
    let mut by_order: HashMap<String, Vec<ItemRow>> = HashMap::new();
    for item in items {
        by_order.entry(item.order_id.clone()).or_default().push(item);
    }
    Ok(rows.into_iter().map(|row| Order { items: by_order.remove(&row.id).unwrap_or_default(), row }).collect())
}

/// The order's timeline, in the order things happened.
pub async fn timeline(conn: &mut Conn, id: &str) -> QueryResult<Vec<TimelineRow>> {
    order_timeline::table
        .filter(order_timeline::order_id.eq(id))
        .order((order_timeline::occurred_at, order_timeline::id))
        .select(TimelineRow::as_select())
        .load(conn)
        .await
}
