//! The order-service consumer: moves orders to their final state as the
//! pipeline's outcomes arrive, and records every step in the timeline.

use std::sync::Arc;

use diesel::result::DatabaseErrorKind;
use diesel::result::Error::DatabaseError;
use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_contracts::Money;
use orderflow_contracts::events::{Event, OrderConfirmed, OrderFailed};
use orderflow_db::Conn;

use crate::domain::OrderStatus;
use crate::store::{self, Change};
use crate::waiters::Waiters;

/// Consumer (and inbox) name of order-service.
pub const CONSUMER: &str = "orders";

/// Events order-service consumes.
pub const BINDINGS: &[&str] = &[
    "inventory.reserved",
    "inventory.rejected",
    "inventory.released",
    "payment.authorized",
    "payment.declined",
    "payment.refunded",
    "shipment.created",
];

/// Applies pipeline outcomes to orders.
#[derive(Debug, Clone, Default)]
pub struct Outcomes {
    waiters: Arc<Waiters>,
}

impl Outcomes {
    /// Outcomes that wake the requests in `waiters` when an order they wait
    /// on may have become final.
    pub fn new(waiters: Arc<Waiters>) -> Self {
        Self { waiters }
    }
}

impl Handler for Outcomes {
    type Event = Event;

    fn committed(&self, events: &[&Event]) {
        // Only these can end an order; the waiters read it again.
        let finals = events.iter().filter(|e| {
            matches!(e, Event::InventoryRejected(_) | Event::PaymentDeclined(_) | Event::ShipmentCreated(_))
        });
        self.waiters.wake(finals.map(|e| e.order_id()));
    }

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Event>) -> Result<(), HandlerError> {
        let order_id = msg.event.order_id();
        if matches!(
            msg.event,
            Event::InventoryReserved(_)
                | Event::PaymentAuthorized(_)
                | Event::InventoryReleased(_)
                | Event::PaymentRefunded(_)
        ) {
            // Intermediate steps and compensations only go on the timeline:
            // one insert (in a batch, one for the batch), whose foreign key
            // is the check that the order exists. Held for the batch, a
            // violation fails the batch's statement; the batch then goes
            // again a message at a time, and this one fails here.
            return match store::record(conn, msg.envelope).await {
                Err(DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) => Err(unknown(order_id)),
                other => Ok(other?),
            };
        }
        let Some(row) = store::get_row(conn, order_id).await? else {
            return Err(unknown(order_id));
        };
        store::record(conn, msg.envelope).await?;
        let row = &row;
        let meta = msg.meta();
        let (change, final_event) = match msg.event {
            Event::InventoryRejected(e) => fail(row, &e.reason),
            Event::PaymentDeclined(e) => fail(row, &e.reason),
            Event::ShipmentCreated(e) => {
                let change = Change {
                    status: Some(OrderStatus::Confirmed),
                    tracking_number: Some(e.tracking_number.clone()),
                    ..Change::default()
                };
                let event = OrderConfirmed {
                    order_id: order_id.to_owned(),
                    customer_id: row.customer_id.clone(),
                    total_amount: Money::from_minor(row.total_amount),
                    tracking_number: Some(e.tracking_number.clone()),
                };
                (change, Final::Confirmed(event))
            }
            other => return Err(HandlerError::Permanent(format!("orders does not consume {}", other.event_type()))),
        };
        if row.status != OrderStatus::Pending {
            // Already final: a late, duplicate-by-content or raced outcome.
            // E.g. a shipment created after the customer cancelled; the
            // processor compensates when it gets `order.cancelled`.
            tracing::info!(%order_id, status = %row.status, event = msg.event.event_type(), "order already final, outcome ignored");
            return Ok(());
        }
        if !store::update(conn, order_id, row.version, change).await? {
            return Err(HandlerError::Conflict(format!("order {order_id} changed concurrently")));
        }
        let version = row.version + 1;
        metrics::counter!("orders_finalized_total", "status" => final_status(&final_event)).increment(1);
        match final_event {
            Final::Confirmed(e) => store::emit(conn, &e, version, &meta).await?,
            Final::Failed(e) => store::emit(conn, &e, version, &meta).await?,
        };
        Ok(())
    }
}

/// Only order-service creates orders, so an event about an order it does
/// not have is a bug or a stray message: park it for an operator.
fn unknown(order_id: &str) -> HandlerError {
    HandlerError::Permanent(format!("unknown order {order_id}"))
}

enum Final {
    Confirmed(OrderConfirmed),
    Failed(OrderFailed),
}

fn final_status(f: &Final) -> &'static str {
    match f {
        Final::Confirmed(_) => "confirmed",
        Final::Failed(_) => "failed",
    }
}

fn fail(row: &store::OrderRow, reason: &str) -> (Change, Final) {
    let change =
        Change { status: Some(OrderStatus::Failed), fail_reason: Some(reason.to_owned()), ..Change::default() };
    let event =
        OrderFailed { order_id: row.id.clone(), customer_id: row.customer_id.clone(), reason: reason.to_owned() };
    (change, Final::Failed(event))
}
