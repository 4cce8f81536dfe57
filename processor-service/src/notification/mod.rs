//! The notification stage: one notification per order and outcome (and one
//! when it ships), recorded exactly once, delivered to a webhook at least once.

mod breaker;
mod dispatcher;

pub use breaker::{BreakerState, CircuitBreaker};
pub use dispatcher::{Dispatcher, WebhookConfig};

use orderflow_db::CachedDsl;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_contracts::events::Event;
use orderflow_db::Conn;
use orderflow_db::held::HeldRows;
use serde::Serialize;
use tokio::sync::Notify;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::schema::notifications;

/// Consumer (and inbox) name.
pub const CONSUMER: &str = "notification";
/// Events it consumes.
pub const BINDINGS: &[&str] = &["shipment.created", "order.confirmed", "order.failed", "order.cancelled"];

/// A recorded notification.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable, Serialize, ToSchema)]
#[diesel(table_name = notifications)]
pub struct Notification {
    /// Id, also the webhook's `Idempotency-Key`.
    pub id: Uuid,
    /// The order.
    pub order_id: String,
    /// Who to tell.
    pub customer_id: String,
    /// `order_shipped`, `order_confirmed`, `order_failed` or `order_cancelled`.
    pub kind: String,
    /// The message.
    pub text: String,
    /// `pending` (not delivered yet), `delivered`, or `failed` (many
    /// attempts failed; still retried, less often).
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// When the next attempt is due.
    pub next_attempt_at: DateTime<Utc>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When the webhook accepted it.
    pub delivered_at: Option<DateTime<Utc>>,
    /// W3C trace context of the order's trace, sent with the webhook call.
    pub traceparent: Option<String>,
}

/// What to tell whom about `event`: its shipment, or its final outcome.
fn compose(event: &Event) -> Option<(&str, &str, &'static str, String)> {
    match event {
        Event::ShipmentCreated(e) => Some((
            &e.order_id,
            // A 1.0 message does not say who ordered; the order id still does.
            e.customer_id.as_deref().unwrap_or("unknown"),
            "order_shipped",
            format!("Your order {} has shipped: tracking number {}.", e.order_id, e.tracking_number),
        )),
        Event::OrderConfirmed(e) => Some((
            &e.order_id,
            &e.customer_id,
            "order_confirmed",
            format!(
                "Your order {} is confirmed: {} charged, shipped with tracking number {}.",
                e.order_id,
                e.total_amount,
                e.tracking_number.as_deref().unwrap_or("(pending)")
            ),
        )),
        Event::OrderFailed(e) => Some((
            &e.order_id,
            &e.customer_id,
            "order_failed",
            format!("Your order {} could not be completed: {}.", e.order_id, e.reason),
        )),
        Event::OrderCancelled(e) => Some((
            &e.order_id,
            &e.customer_id,
            "order_cancelled",
            format!("Your order {} is cancelled; any payment is refunded.", e.order_id),
        )),
        _ => None,
    }
}

/// Records notifications; the [`Dispatcher`] delivers them.
#[derive(Debug, Clone, Default)]
pub struct Notifications {
    recorded: Arc<Notify>,
}

impl Notifications {
    /// Notifications that wake `recorded` (the [`Dispatcher`] of this
    /// process) once they are committed.
    pub fn new(recorded: Arc<Notify>) -> Self {
        Self { recorded }
    }
}

impl Handler for Notifications {
    type Event = Event;

    fn committed(&self, _events: &[&Event]) {
        // In-process, after the commit: a NOTIFY in the transaction would
        // serialize its commit with every other NOTIFYing commit on the
        // server. Dispatchers elsewhere find the rows at their next poll.
        self.recorded.notify_one();
    }

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Event>) -> Result<(), HandlerError> {
        let Some((order_id, customer_id, kind, text)) = compose(msg.event) else {
            return Err(HandlerError::Permanent(format!("notification does not consume {}", msg.event.event_type())));
        };
        let row = Recorded {
            order_id: order_id.to_owned(),
            customer_id: customer_id.to_owned(),
            kind,
            text,
            traceparent: msg.meta().traceparent,
        };
        // In a batch, with the batch's other notifications: one statement.
        if let Err(rows) = orderflow_db::held::hold(vec![row]) {
            Recorded::write(conn, rows).await?;
        }
        Ok(())
    }
}

/// A notification to record.
struct Recorded {
    order_id: String,
    customer_id: String,
    kind: &'static str,
    text: String,
    traceparent: Option<String>,
}

impl HeldRows for Recorded {
    async fn write(conn: &mut Conn, rows: Vec<Self>) -> QueryResult<()> {
        let values: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    notifications::id.eq(Uuid::now_v7()),
                    notifications::order_id.eq(&r.order_id),
                    notifications::customer_id.eq(&r.customer_id),
                    notifications::kind.eq(r.kind),
                    notifications::text.eq(&r.text),
                    notifications::traceparent.eq(r.traceparent.as_deref()),
                )
            })
            .collect();
        // The inbox drops a redelivered message; the unique (order, kind)
        // also drops the same outcome sent again under a new message id.
        let kinds: Vec<&'static str> = diesel::insert_into(notifications::table)
            .values(&values)
            .on_conflict((notifications::order_id, notifications::kind))
            .do_nothing()
            .returning(notifications::kind)
            .cached_if(values.len() == 1)
            .get_results::<String>(conn)
            .await?
            .into_iter()
            .filter_map(|k| rows.iter().find(|r| r.kind == k).map(|r| r.kind))
            .collect();
        for kind in kinds {
            metrics::counter!("notifications_recorded_total", "kind" => kind).increment(1);
        }
        Ok(())
    }
}

/// Notifications, newest first, optionally of one order.
pub async fn list(conn: &mut Conn, order_id: Option<&str>, limit: i64) -> QueryResult<Vec<Notification>> {
    let mut query = notifications::table.select(Notification::as_select()).into_boxed();
    if let Some(order_id) = order_id {
        query = query.filter(notifications::order_id.eq(order_id));
    }
    query.order((notifications::created_at.desc(), notifications::id.desc())).limit(limit).load(conn).await
}
