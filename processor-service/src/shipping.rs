//! The shipping stage: ships paid orders (at most once each).

use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_contracts::events::{Event, PaymentAuthorized, ShipmentCreated};
use orderflow_db::Conn;
use orderflow_envelope::Metadata;
use orderflow_outbox::emit;

use crate::store::{self, Move, PaymentStatus, ReservationStatus};

/// Consumer (and inbox) name.
pub const CONSUMER: &str = "shipping";
/// Events it consumes.
pub const BINDINGS: &[&str] = &["payment.authorized"];

/// The shipping stage.
#[derive(Debug, Clone, Default)]
pub struct Shipping;

impl Handler for Shipping {
    type Event = Event;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Event>) -> Result<(), HandlerError> {
        match msg.event {
            Event::PaymentAuthorized(e) => ship(conn, e, &msg.meta()).await,
            other => Err(HandlerError::Permanent(format!("shipping does not consume {}", other.event_type()))),
        }
    }

    /// Takes, without waiting, the products the batch ships; a message
    /// whose products another batch holds waits for a later transaction.
    async fn prepare(&self, conn: &mut Conn, batch: &[&Event]) -> diesel::QueryResult<Vec<bool>> {
        let orders: Vec<&str> = batch
            .iter()
            .filter_map(|e| match e {
                Event::PaymentAuthorized(e) => Some(e.order_id.as_str()),
                _ => None,
            })
            .collect();
        let taken = store::try_lock_products(conn, &[], &orders).await?;
        Ok(batch
            .iter()
            .map(|event| match event {
                Event::PaymentAuthorized(e) => taken.has_reserved(&e.order_id),
                _ => true,
            })
            .collect())
    }
}

async fn ship(conn: &mut Conn, e: &PaymentAuthorized, meta: &Metadata) -> Result<(), HandlerError> {
    // Lock order (products, taken for the batch by `prepare` without
    // waiting, then reservation, payment, shipment) is the same in every
    // stage, so a cancel racing this handler waits, never deadlocks.
    // Both rows with one statement as a rule; one at a time only to say
    // which is missing.
    let (reservation, payment) = match store::lock_reservation_and_payment(conn, &e.order_id).await? {
        Some((r, p)) => (r, Some(p)),
        None => {
            let Some(reservation) = store::lock_reservation(conn, &e.order_id).await? else {
                return Err(HandlerError::Permanent(format!("order {} was paid but never reserved", e.order_id)));
            };
            (reservation, store::lock_payment(conn, &e.order_id).await?)
        }
    };
    if reservation.status != ReservationStatus::Reserved {
        // Cancelled (released) meanwhile, or already shipped.
        tracing::info!(order_id = %e.order_id, status = %reservation.status, "not shipping");
        return Ok(());
    }
    match payment {
        Some(p) if p.status == PaymentStatus::Authorized => {}
        other => {
            tracing::info!(order_id = %e.order_id, payment = ?other.map(|p| p.status), "payment no longer authorized, not shipping");
            return Ok(());
        }
    }
    let Some(shipment) = store::create_shipment(conn, &e.order_id).await? else {
        return Ok(());
    };
    let lines = reservation.lines()?;
    if let Some(sku) = store::move_stock(conn, &lines, Move::Ship).await? {
        return Err(HandlerError::Permanent(format!("bookkeeping: reserved units of {sku} are missing")));
    }
    store::set_reservation(conn, &e.order_id, ReservationStatus::Shipped, None, None).await?;
    let event = ShipmentCreated {
        order_id: e.order_id.clone(),
        shipment_id: shipment.shipment_id,
        tracking_number: shipment.tracking_number,
        customer_id: e.customer_id.clone(),
    };
    emit(conn, &event, 1, meta).await?;
    metrics::counter!("shipments_total").increment(1);
    Ok(())
}
