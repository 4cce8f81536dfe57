//! The HTTP API of order-service.

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;
use orderflow_contracts::Money;
use orderflow_db::{Conn, Pool};
use orderflow_envelope::Metadata;
use orderflow_web::{ApiError, Problem, json_body};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::domain::{CreateOrder, Limits, OrderStatus, validate};
use crate::store::{self, Cancelled, Created, ListQuery, Order, TimelineRow};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// Database pool.
    pub pool: Pool,
    /// Wakes the relay after an order's events are committed.
    pub waker: orderflow_outbox::Waker,
    /// Writes new orders, many per transaction under load.
    pub intake: crate::intake::Intake,
    /// Bounds on orders.
    pub limits: Limits,
    /// Maximum request body size, bytes.
    pub max_body_bytes: usize,
    /// Requests waiting for an order to leave `pending` (`?wait=`).
    pub waiters: std::sync::Arc<crate::waiters::Waiters>,
}

/// One line of an order.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemView {
    /// Product SKU.
    pub sku: String,
    /// Units.
    pub quantity: i32,
    /// Price of one unit, major units with 2 decimals.
    #[schema(schema_with = orderflow_web::schema::money_output)]
    pub price: Money,
}

/// An order as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderView {
    /// The order's id (the client's string, or the UUIDv7 the server made).
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// pending, confirmed, failed or cancelled.
    pub status: OrderStatus,
    /// Sum of the lines, major units with 2 decimals (`1250.00`).
    #[schema(schema_with = orderflow_web::schema::money_output)]
    pub total_amount: Money,
    /// Optimistic concurrency version; grows by one per change.
    pub version: i64,
    /// Why the order failed.
    pub fail_reason: Option<String>,
    /// Why it was cancelled, if a reason was given.
    pub cancel_reason: Option<String>,
    /// Carrier tracking number once shipped.
    pub tracking_number: Option<String>,
    /// Payment was asked to decline.
    pub force_fail: bool,
    /// The lines.
    pub items: Vec<ItemView>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        let status = o.row.status;
        Self {
            order_id: o.row.id,
            customer_id: o.row.customer_id,
            status,
            total_amount: Money::from_minor(o.row.total_amount),
            version: o.row.version,
            fail_reason: o.row.fail_reason,
            cancel_reason: o.row.cancel_reason,
            tracking_number: o.row.tracking_number,
            force_fail: o.row.force_fail,
            items: o
                .items
                .into_iter()
                .map(|i| ItemView { sku: i.sku, quantity: i.quantity, price: Money::from_minor(i.unit_price) })
                .collect(),
            created_at: o.row.created_at,
            updated_at: o.row.updated_at,
        }
    }
}

/// The `{id}` of a path, if it can be an order id at all.
fn order_id(id: web::Path<String>) -> Result<String, Problem> {
    let id = id.into_inner();
    if orderflow_web::schema::valid_id(&id) {
        Ok(id)
    } else {
        Err(Problem::invalid("id", "an order id is 1 to 64 characters of letters, digits, '.', '_', ':' or '-'"))
    }
}

fn correlation(req: &HttpRequest) -> Metadata {
    let correlation_id =
        req.headers().get("x-correlation-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<Uuid>().ok());
    // The request span continues the caller's trace (if any); the events
    // written for this request carry it on to the consumers.
    Metadata { correlation_id, causation_id: None, traceparent: orderflow_telemetry::current_traceparent() }
}

/// Accept an order.
///
/// The order is stored with its `order.created` event in one transaction;
/// the pipeline runs afterwards and the order's status moves from `pending`
/// to `confirmed` or `failed`. Posting again with the same `order_id` and
/// body returns the stored order and writes nothing.
#[utoipa::path(
    tag = "orders",
    request_body(content = CreateOrder, content_type = "application/json"),
    responses(
        (status = 201, description = "Accepted (or the same order posted again)", body = OrderView,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_id` is taken by a different order", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
// The name declares the method to `orderflow_web::not_found_fallback` (405s).
#[post("/orders", name = "POST /orders")]
pub async fn create_order(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body: CreateOrder = json_body(&req, payload, state.max_body_bytes).await?;
    let new = validate(body, &state.limits).map_err(Problem::validation)?;
    let meta = correlation(&req);
    // Answered after the commit (the intake wakes the relay and logs it).
    let order = match state.intake.create(new, meta).await? {
        Created::New(o) | Created::Existing(o) => o,
        Created::Conflict(o) => {
            return Err(Problem::conflict(format!(
                "order {} already exists with a different body; use a new order_id",
                o.row.id
            ))
            .into());
        }
    };
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/orders/{}", order.row.id)))
        .json(OrderView::from(order)))
}

/// Longest `?wait=` of `GET /orders/{id}`, seconds.
pub const MAX_WAIT_SECONDS: u64 = 30;

/// Options of `GET /orders/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// Long poll: if the order is `pending`, answer once it is not (or after
    /// this many seconds, 0 to 30, with the order as it then is) instead of
    /// at once. Saves a client that follows an order to its end from
    /// asking again and again.
    #[param(minimum = 0, maximum = 30)]
    pub wait: Option<u64>,
}

/// Get an order.
#[utoipa::path(
    tag = "orders",
    params(("id" = String, Path, description = "Order id: 1 to 64 of `A-Z a-z 0-9 . _ : -`", pattern = r"^[A-Za-z0-9._:-]{1,64}$"), GetParams),
    responses(
        (status = 200, description = "The order (with `wait`: once it is no longer pending, or as it is when the wait is over)", body = OrderView),
        (status = 400, description = "Not an order id, or `wait` out of range", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/orders/{id}", name = "GET /orders/{id}")]
pub async fn get_order(
    id: web::Path<String>,
    params: web::Query<GetParams>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(id)?;
    let wait = params.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECONDS {
        return Err(Problem::invalid("query.wait", format!("must be between 0 and {MAX_WAIT_SECONDS} seconds")).into());
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    // Watching before the first read: a change committed between the read
    // and the wait still wakes it.
    let watch = (wait > 0).then(|| state.waiters.watch(&id));
    let mut recheck = crate::waiters::RECHECK;
    loop {
        let woken = watch.as_ref().map(|w| w.notify().notified());
        tokio::pin!(woken);
        if let Some(w) = woken.as_mut().as_pin_mut() {
            w.enable();
        }
        // No connection is held while waiting.
        let order = {
            let mut conn = state.pool.get().await?;
            store::get(&mut conn, &id).await?.ok_or_else(|| Problem::not_found(format!("no order {id}")))?
        };
        let now = tokio::time::Instant::now();
        if order.row.status != OrderStatus::Pending || now >= deadline {
            return Ok(HttpResponse::Ok().json(OrderView::from(order)));
        }
        if let Some(w) = woken.as_pin_mut()
            && tokio::time::timeout_at(deadline.min(now + recheck), w).await.is_err()
        {
            recheck = (recheck * 2).min(crate::waiters::RECHECK_MAX);
        }
    }
}

/// Filters of `GET /orders`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only orders in this status.
    pub status: Option<OrderStatus>,
    /// Only this customer's orders (no control characters: no customer id
    /// has any).
    #[param(pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    pub customer_id: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page: where the previous page ended.
    #[param(pattern = r"^[0-9]{1,16}_[A-Za-z0-9._:-]{1,64}$")]
    pub cursor: Option<String>,
}

/// A page of orders, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderPage {
    /// The orders.
    pub items: Vec<OrderView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A cursor is the position of the last order of a page: its creation time
/// in microseconds since the epoch and its id, `<micros>_<uuid>`. Any
/// position is a valid place to continue from, so the documented pattern
/// says exactly which cursors are accepted.
fn encode_cursor(ts: DateTime<Utc>, id: &str) -> String {
    format!("{}_{id}", ts.timestamp_micros())
}

/// The position a cursor names; `None` unless it has exactly the form
/// [`encode_cursor`] writes (and the parameter's pattern states).
fn decode_cursor(s: &str) -> Option<(DateTime<Utc>, String)> {
    // The time has no `_`; the id may.
    let (micros, id) = s.split_once('_')?;
    if micros.is_empty() || micros.len() > 16 || !micros.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !orderflow_web::schema::valid_id(id) {
        return None;
    }
    Some((DateTime::from_timestamp_micros(micros.parse().ok()?)?, id.to_owned()))
}

/// List orders, newest first, with cursor pagination.
#[utoipa::path(
    tag = "orders",
    params(ListParams),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "Invalid filter, limit or cursor; `errors` names it", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/orders", name = "GET /orders")]
pub async fn list_orders(params: web::Query<ListParams>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let params = params.into_inner();
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(Problem::invalid("query.limit", "must be between 1 and 100").into());
    }
    // PostgreSQL cannot even compare a text holding NUL, and no stored
    // customer id has a control character (they are refused at creation).
    if params.customer_id.as_deref().is_some_and(|c| c.chars().any(char::is_control)) {
        return Err(Problem::invalid("query.customer_id", "must not contain control characters").into());
    }
    let after = match params.cursor.as_deref() {
        None => None,
        Some(c) => {
            Some(decode_cursor(c).ok_or_else(|| Problem::invalid("query.cursor", "not a cursor from this API"))?)
        }
    };
    let query = ListQuery { status: params.status, customer_id: params.customer_id, after, limit: limit + 1 };
    let mut conn = state.pool.get().await?;
    let mut orders = store::list(&mut conn, &query).await?;
    let next_cursor = if orders.len() as i64 > limit {
        orders.truncate(limit as usize);
        orders.last().map(|o| encode_cursor(o.row.created_at, &o.row.id))
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(OrderPage { items: orders.into_iter().map(OrderView::from).collect(), next_cursor }))
}

/// One step of an order's timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineEntry {
    /// What happened, e.g. `inventory.reserved`.
    pub event_type: String,
    /// When it happened at its source.
    pub occurred_at: DateTime<Utc>,
    /// When order-service recorded it.
    pub recorded_at: DateTime<Utc>,
    /// The event's id.
    pub message_id: Uuid,
    /// The event's payload (reason, amounts, tracking number...).
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl From<TimelineRow> for TimelineEntry {
    fn from(r: TimelineRow) -> Self {
        Self {
            event_type: r.event_type,
            occurred_at: r.occurred_at,
            recorded_at: r.recorded_at,
            message_id: r.message_id,
            details: r.details,
        }
    }
}

/// The order's timeline: every step, in order.
#[utoipa::path(
    tag = "orders",
    params(("id" = String, Path, description = "Order id: 1 to 64 of `A-Z a-z 0-9 . _ : -`", pattern = r"^[A-Za-z0-9._:-]{1,64}$")),
    responses(
        (status = 200, description = "The timeline, oldest step first", body = Vec<TimelineEntry>),
        (status = 400, description = "Not an order id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/orders/{id}/events", name = "GET /orders/{id}/events")]
pub async fn order_events(id: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let id = order_id(id)?;
    let mut conn = state.pool.get().await?;
    if store::get(&mut conn, &id).await?.is_none() {
        return Err(Problem::not_found(format!("no order {id}")).into());
    }
    let entries: Vec<TimelineEntry> = store::timeline(&mut conn, &id).await?.into_iter().map(Into::into).collect();
    Ok(HttpResponse::Ok().json(entries))
}

/// `POST /orders/{id}/cancel` body (optional; `null` is the same as none).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelOrder {
    /// Why the customer cancels: at most 500 characters once leading and
    /// trailing white space is trimmed, without NUL characters. Blank is the
    /// same as no reason.
    // The pattern is that rule spelled out: white space (Rust's
    // `char::is_whitespace`, listed because `\s` differs between regex
    // dialects) around nothing, or 1 to 500 characters that start and end
    // with no white space and contain no NUL.
    #[schema(
        pattern = r"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000]{0,498}[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?)?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"
    )]
    pub reason: Option<String>,
}

/// Cancel an order.
///
/// Allowed while the order is `pending` (not yet shipped). Stock and an
/// authorized payment are given back by the pipeline afterwards
/// (`inventory.released`, `payment.refunded` in the timeline). Cancelling a
/// cancelled order returns it unchanged. A cancel racing the pipeline is
/// decided by the order's version: either it wins and everything is
/// compensated, or the order was confirmed first and the cancel is refused.
#[utoipa::path(
    tag = "orders",
    params(("id" = String, Path, description = "Order id: 1 to 64 of `A-Z a-z 0-9 . _ : -`", pattern = r"^[A-Za-z0-9._:-]{1,64}$")),
    request_body(content = Option<CancelOrder>, content_type = "application/json"),
    responses(
        (status = 200, description = "Cancelled (now or before)", body = OrderView),
        (status = 400, description = "Not an order id, or an invalid body; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already shipped (confirmed) or failed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "A body that is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable, or the order keeps changing; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/orders/{id}/cancel", name = "POST /orders/{id}/cancel")]
pub async fn cancel_order(
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(id)?;
    let has_body = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "0")
        || req.headers().contains_key(actix_web::http::header::TRANSFER_ENCODING);
    // The body is documented as optional (`Option<CancelOrder>`), which
    // OpenAPI spells as "absent or null": both mean no reason.
    let body: Option<CancelOrder> = if has_body { json_body(&req, payload, state.max_body_bytes).await? } else { None };
    let reason = body.unwrap_or_default().reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    if reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
        return Err(Problem::invalid("reason", "must be at most 500 characters").into());
    }
    // PostgreSQL's text cannot hold NUL.
    if reason.as_ref().is_some_and(|r| r.contains('\0')) {
        return Err(Problem::invalid("reason", "must not contain NUL characters").into());
    }
    let meta = correlation(&req);
    let mut pooled = state.pool.get().await?;
    let conn: &mut Conn = &mut pooled;
    // A lost version race means the pipeline changed the order meanwhile:
    // look again, the answer may now be different (e.g. confirmed).
    for _ in 0..5 {
        let outcome = conn
            .transaction::<_, diesel::result::Error, _>(async |tx| {
                store::cancel(tx, &id, reason.as_deref(), &meta).await
            })
            .await?;
        let order = match outcome {
            Cancelled::NotFound => return Err(Problem::not_found(format!("no order {id}")).into()),
            Cancelled::Raced => continue,
            Cancelled::Now(o) => {
                state.waker.wake();
                state.waiters.wake([id.as_str()]);
                tracing::info!(order_id = %id, "order cancelled");
                o
            }
            Cancelled::Already(o) => o,
            Cancelled::Refused(o) => {
                let detail = match o.row.status {
                    OrderStatus::Confirmed => format!(
                        "order {id} is already shipped (tracking {}); it can no longer be cancelled",
                        o.row.tracking_number.as_deref().unwrap_or("?")
                    ),
                    _ => format!(
                        "order {id} already failed ({}); there is nothing to cancel",
                        o.row.fail_reason.as_deref().unwrap_or("no reason")
                    ),
                };
                return Err(Problem::conflict(detail).into());
            }
        };
        return Ok(HttpResponse::Ok().json(OrderView::from(order)));
    }
    Err(Problem::unavailable("the order keeps changing; retry the cancel").into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let ts = DateTime::from_timestamp_micros(1_763_700_000_123_456).unwrap();
        for id in [Uuid::now_v7().to_string(), "ord_001".to_owned(), "a:b.c-d".to_owned()] {
            assert_eq!(decode_cursor(&encode_cursor(ts, &id)), Some((ts, id.clone())));
        }
        assert_eq!(
            decode_cursor("0001_ord-1"),
            Some((DateTime::from_timestamp_micros(1).unwrap(), "ord-1".to_owned()))
        );
        let id = "ord-1";
        for garbage in [
            "nope",
            "zzz",
            "",
            "_",
            &format!("_{id}"),
            &format!("12345678901234567_{id}"),
            &format!("-1_{id}"),
            &format!("+1_{id}"),
            "1_a b",
            "1_{braced}",
            &format!("1_{id}\n"),
        ] {
            assert_eq!(decode_cursor(garbage), None, "{garbage:?}");
        }
    }
}
