//! The inventory stage: reserves stock for new orders, releases it when the
//! payment is declined or the order is cancelled.

use std::collections::HashMap;

use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_contracts::Money;
use orderflow_contracts::events::{Event, InventoryRejected, InventoryReleased, InventoryReserved, OrderCreated};
use orderflow_db::Conn;
use orderflow_envelope::Metadata;
use orderflow_outbox::emit;

use crate::store::{self, Move, ReservationStatus};

/// Consumer (and inbox) name.
pub const CONSUMER: &str = "inventory";
/// Events it consumes.
pub const BINDINGS: &[&str] = &["order.created", "payment.declined", "order.cancelled"];

/// The inventory stage.
#[derive(Debug, Clone, Default)]
pub struct Inventory;

impl Handler for Inventory {
    type Event = Event;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Event>) -> Result<(), HandlerError> {
        let meta = msg.meta();
        match msg.event {
            Event::OrderCreated(e) => reserve(conn, e, &meta).await,
            Event::PaymentDeclined(e) => {
                release(conn, &e.order_id, &format!("payment declined: {}", e.reason), &meta).await
            }
            Event::OrderCancelled(e) => cancel(conn, &e.order_id, &meta).await,
            other => Err(HandlerError::Permanent(format!("inventory does not consume {}", other.event_type()))),
        }
    }

    /// Takes, without waiting, the products the batch reserves or gives
    /// back; a message whose products another batch holds waits for a later
    /// transaction.
    async fn prepare(&self, conn: &mut Conn, batch: &[&Event]) -> diesel::QueryResult<Vec<bool>> {
        let mut skus = Vec::new();
        let mut orders = Vec::new();
        for event in batch {
            match event {
                Event::OrderCreated(e) => skus.extend(e.items.iter().map(|i| i.sku.as_str())),
                Event::PaymentDeclined(e) => orders.push(e.order_id.as_str()),
                Event::OrderCancelled(e) => orders.push(e.order_id.as_str()),
                _ => {}
            }
        }
        let taken = store::try_lock_products(conn, &skus, &orders).await?;
        Ok(batch
            .iter()
            .map(|event| match event {
                Event::OrderCreated(e) => taken.has_all(e.items.iter().map(|i| i.sku.as_str())),
                Event::PaymentDeclined(e) => taken.has_reserved(&e.order_id),
                Event::OrderCancelled(e) => taken.has_reserved(&e.order_id),
                _ => true,
            })
            .collect())
    }
}

async fn reserve(conn: &mut Conn, e: &OrderCreated, meta: &Metadata) -> Result<(), HandlerError> {
    if e.items.is_empty() || e.items.iter().any(|i| i.quantity <= 0) {
        return Err(HandlerError::Permanent(format!("order {} has no items or a non-positive quantity", e.order_id)));
    }
    // Products first (`prepare` took them for the batch), then the
    // reservation: the lock order of every stage. The reservation goes in
    // decided, with one statement; if the order has one already (decided
    // before, or a cancellation's tombstone), that one stands.
    let skus: Vec<&str> = e.items.iter().map(|i| i.sku.as_str()).collect();
    let products = store::lock_products(conn, &skus).await?;
    match decide(e, &products) {
        Err(Decision::Broken(error)) => Err(error),
        Err(Decision::Rejected { reason, outcome }) => {
            let rejected = store::insert_reservation(
                conn,
                &e.order_id,
                ReservationStatus::Rejected,
                Some(&e.items),
                Some(&reason),
            )
            .await?;
            if rejected.is_none() {
                return seen_before(conn, &e.order_id).await;
            }
            emit(conn, &InventoryRejected { order_id: e.order_id.clone(), reason }, 1, meta).await?;
            metrics::counter!("inventory_reservations_total", "outcome" => outcome).increment(1);
            Ok(())
        }
        Ok(total_amount) => {
            let reserved =
                store::insert_reservation(conn, &e.order_id, ReservationStatus::Reserved, Some(&e.items), None).await?;
            if reserved.is_none() {
                return seen_before(conn, &e.order_id).await;
            }
            if let Some(sku) = store::move_stock(conn, &e.items, Move::Reserve).await? {
                // The rows are locked and were checked: a miss means a bug, not a race.
                return Err(HandlerError::Permanent(format!("stock of {sku} changed under a lock while reserving")));
            }
            let reserved = InventoryReserved {
                order_id: e.order_id.clone(),
                customer_id: e.customer_id.clone(),
                items: e.items.clone(),
                total_amount,
                force_fail: e.force_fail,
            };
            emit(conn, &reserved, 1, meta).await?;
            metrics::counter!("inventory_reservations_total", "outcome" => "reserved").increment(1);
            Ok(())
        }
    }
}

/// Why an order cannot be reserved.
enum Decision {
    /// Refused for a reason the customer sees (`outcome` labels the metric).
    Rejected { reason: String, outcome: &'static str },
    /// The message itself cannot be handled.
    Broken(HandlerError),
}

/// Checks the order against the locked `products`: the total the catalog
/// prices it at, or why it cannot be reserved.
fn decide(e: &OrderCreated, products: &HashMap<String, store::Product>) -> Result<Money, Decision> {
    // The catalog prices the order: the price on each line is what the
    // customer saw, and it must still be the product's price. A line priced
    // otherwise (tampered with, or the price changed since) fails the order
    // before anything is reserved or charged.
    let refusal = e.items.iter().find_map(|i| match products.get(&i.sku) {
        None => Some(format!("unknown SKU {}", i.sku)),
        Some(p) if Money::from_minor(p.price) != i.unit_price => Some(format!(
            "price mismatch for {}: order says {}, catalog says {}",
            i.sku,
            i.unit_price,
            Money::from_minor(p.price)
        )),
        Some(p) if p.on_hand < i.quantity => {
            Some(format!("insufficient stock for {}: requested {}, available {}", i.sku, i.quantity, p.on_hand))
        }
        Some(_) => None,
    });
    if let Some(reason) = refusal {
        let outcome = if reason.starts_with("price mismatch") { "price_mismatch" } else { "rejected" };
        return Err(Decision::Rejected { reason, outcome });
    }
    // What payment charges: the catalog's prices, never the caller's total.
    let verified: Option<Money> = e.items.iter().try_fold(Money::ZERO, |sum, i| {
        let price = Money::from_minor(products.get(&i.sku)?.price);
        sum.checked_add(price.checked_mul(i64::from(i.quantity))?)
    });
    let Some(total_amount) = verified else {
        return Err(Decision::Broken(HandlerError::Permanent(format!("order {}: total out of range", e.order_id))));
    };
    if total_amount != e.total_amount {
        // Every line matched the catalog, so only the stated total is off.
        let reason = format!("total mismatch: order says {}, its lines sum to {}", e.total_amount, total_amount);
        return Err(Decision::Rejected { reason, outcome: "rejected" });
    }
    Ok(total_amount)
}

/// The order has a reservation row already: decided before, or cancelled
/// before it arrived (a tombstone). Nothing to do.
async fn seen_before(conn: &mut Conn, order_id: &str) -> Result<(), HandlerError> {
    let status = store::lock_reservation(conn, order_id).await?.map(|r| r.status);
    tracing::info!(%order_id, ?status, "order already seen by inventory");
    Ok(())
}

/// Gives reserved stock back (payment declined).
async fn release(conn: &mut Conn, order_id: &str, reason: &str, meta: &Metadata) -> Result<(), HandlerError> {
    let Some(reservation) = store::lock_reservation(conn, order_id).await? else {
        tracing::warn!(%order_id, "nothing reserved for this order, nothing to release");
        return Ok(());
    };
    if reservation.status != ReservationStatus::Reserved {
        return Ok(());
    }
    let lines = reservation.lines()?;
    if let Some(sku) = store::move_stock(conn, &lines, Move::Release).await? {
        return Err(HandlerError::Permanent(format!("bookkeeping: reserved units of {sku} are missing")));
    }
    store::set_reservation(conn, order_id, ReservationStatus::Released, None, Some(reason)).await?;
    let event = InventoryReleased { order_id: order_id.to_owned(), items: lines, reason: reason.to_owned() };
    emit(conn, &event, 2, meta).await?;
    metrics::counter!("inventory_releases_total").increment(1);
    Ok(())
}

/// Compensates a cancelled order: releases reserved stock, or takes back
/// shipped stock and voids the shipment; before the order arrived, leaves a
/// tombstone so it reserves nothing later.
async fn cancel(conn: &mut Conn, order_id: &str, meta: &Metadata) -> Result<(), HandlerError> {
    let (reservation, created) = store::claim_reservation(conn, order_id, ReservationStatus::Cancelled).await?;
    if created {
        tracing::info!(%order_id, "cancelled before inventory saw the order");
        return Ok(());
    }
    match reservation.status {
        ReservationStatus::Reserved => release(conn, order_id, "order cancelled", meta).await,
        ReservationStatus::Shipped => {
            let lines = reservation.lines()?;
            store::void_shipment(conn, order_id).await?;
            if let Some(sku) = store::move_stock(conn, &lines, Move::Return).await? {
                return Err(HandlerError::Permanent(format!("bookkeeping: shipped units of {sku} are missing")));
            }
            let reason = "order cancelled after shipping; shipment voided";
            store::set_reservation(conn, order_id, ReservationStatus::Released, None, Some(reason)).await?;
            let event = InventoryReleased { order_id: order_id.to_owned(), items: lines, reason: reason.to_owned() };
            emit(conn, &event, 2, meta).await?;
            metrics::counter!("inventory_releases_total").increment(1);
            Ok(())
        }
        // Rejected, released or already cancelled: nothing is held.
        _ => Ok(()),
    }
}
