//! The payment stage: charges reserved orders by deterministic rules (at
//! most once per order), refunds cancelled ones.

use std::collections::HashSet;

use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_contracts::Money;
use orderflow_contracts::events::{Event, InventoryReserved, PaymentAuthorized, PaymentDeclined, PaymentRefunded};
use orderflow_db::Conn;
use orderflow_envelope::Metadata;
use orderflow_outbox::emit;
use sha2::{Digest, Sha256};

use crate::store::{self, PaymentStatus};

/// Consumer (and inbox) name.
pub const CONSUMER: &str = "payment";
/// Events it consumes.
pub const BINDINGS: &[&str] = &["inventory.reserved", "order.cancelled"];

/// The rules that decide a payment, checked in this order.
#[derive(Debug, Clone)]
pub struct PaymentRules {
    /// Orders containing any of these SKUs are declined.
    pub blocked_skus: HashSet<String>,
    /// Orders above this amount are declined.
    pub amount_limit: Money,
    /// Share of other orders declined at random, 0.0 to 1.0.
    pub decline_rate: f64,
    /// Seed of the random declines: the same seed and order id always give
    /// the same decision, whatever the processing order.
    pub decline_seed: u64,
}

impl PaymentRules {
    /// Authorizes (`Ok`) or declines with the reason.
    pub fn decide(&self, order: &InventoryReserved) -> Result<(), String> {
        if order.force_fail {
            return Err("payment declined: force_fail was requested".into());
        }
        if let Some(item) = order.items.iter().find(|i| self.blocked_skus.contains(&i.sku)) {
            return Err(format!("payment declined: SKU {} is blocked", item.sku));
        }
        if order.total_amount > self.amount_limit {
            return Err(format!(
                "payment declined: amount {} exceeds the limit of {}",
                order.total_amount, self.amount_limit
            ));
        }
        if self.decline_rate > 0.0 && unit_draw(self.decline_seed, &order.order_id) < self.decline_rate {
            return Err("payment declined: card declined by issuer".into());
        }
        Ok(())
    }
}

/// A number in [0, 1) fixed by the seed and the order id.
fn unit_draw(seed: u64, order_id: &str) -> f64 {
    let digest = Sha256::new().chain_update(seed.to_be_bytes()).chain_update(order_id.as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The payment stage.
#[derive(Debug, Clone)]
pub struct Payments {
    /// Decision rules.
    pub rules: PaymentRules,
}

impl Handler for Payments {
    type Event = Event;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Event>) -> Result<(), HandlerError> {
        let meta = msg.meta();
        match msg.event {
            Event::InventoryReserved(e) => self.charge(conn, e, &meta).await,
            Event::OrderCancelled(e) => refund(conn, &e.order_id, &meta).await,
            other => Err(HandlerError::Permanent(format!("payment does not consume {}", other.event_type()))),
        }
    }
}

impl Payments {
    async fn charge(&self, conn: &mut Conn, e: &InventoryReserved, meta: &Metadata) -> Result<(), HandlerError> {
        if e.total_amount < Money::ZERO {
            return Err(HandlerError::Permanent(format!("negative amount {}", e.total_amount)));
        }
        // Decided before the row goes in, and the row goes in decided: one
        // statement, and the first row for the order wins (a charge, or a
        // cancellation's tombstone), so it is never charged twice.
        let decision = self.rules.decide(e);
        let (status, reason) = match &decision {
            Ok(()) => (PaymentStatus::Authorized, None),
            Err(reason) => (PaymentStatus::Declined, Some(reason.as_str())),
        };
        let Some(payment) = store::insert_payment(conn, &e.order_id, status, e.total_amount.minor(), reason).await?
        else {
            // Charged (or declined) before, or cancelled first: never twice.
            let status = store::find_payment(conn, &e.order_id).await?.map(|p| p.status);
            tracing::info!(order_id = %e.order_id, ?status, "payment already decided");
            return Ok(());
        };
        match decision {
            Ok(()) => {
                let event = PaymentAuthorized {
                    order_id: e.order_id.clone(),
                    payment_id: payment.payment_id,
                    amount: e.total_amount,
                    customer_id: Some(e.customer_id.clone()),
                };
                emit(conn, &event, 1, meta).await?;
                metrics::counter!("payments_total", "outcome" => "authorized").increment(1);
            }
            Err(reason) => {
                emit(conn, &PaymentDeclined { order_id: e.order_id.clone(), reason }, 1, meta).await?;
                metrics::counter!("payments_total", "outcome" => "declined").increment(1);
            }
        }
        Ok(())
    }
}

/// Refunds an authorized payment of a cancelled order; before any payment,
/// leaves a tombstone so the order is never charged.
async fn refund(conn: &mut Conn, order_id: &str, meta: &Metadata) -> Result<(), HandlerError> {
    let (payment, created) = store::claim_payment(conn, order_id, PaymentStatus::Cancelled, 0).await?;
    if created || payment.status != PaymentStatus::Authorized {
        return Ok(());
    }
    store::set_payment(conn, order_id, PaymentStatus::Refunded, Some("order cancelled")).await?;
    let event = PaymentRefunded {
        order_id: order_id.to_owned(),
        payment_id: payment.payment_id,
        amount: Money::from_minor(payment.amount),
    };
    emit(conn, &event, 2, meta).await?;
    metrics::counter!("payments_total", "outcome" => "refunded").increment(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_contracts::events::LineItem;
    use uuid::Uuid;

    fn rules() -> PaymentRules {
        PaymentRules {
            blocked_skus: ["BAD".to_owned()].into(),
            amount_limit: Money::from_minor(10_000),
            decline_rate: 0.0,
            decline_seed: 7,
        }
    }

    fn order(sku: &str, total: i64, force_fail: bool) -> InventoryReserved {
        InventoryReserved {
            order_id: Uuid::now_v7().to_string(),
            customer_id: "c".into(),
            items: vec![LineItem { sku: sku.into(), quantity: 1, unit_price: Money::from_minor(total) }],
            total_amount: Money::from_minor(total),
            force_fail,
        }
    }

    #[test]
    fn rules_decline_for_each_reason() {
        let r = rules();
        assert!(r.decide(&order("OK", 100, false)).is_ok());
        assert!(r.decide(&order("OK", 100, true)).unwrap_err().contains("force_fail"));
        assert!(r.decide(&order("BAD", 100, false)).unwrap_err().contains("BAD is blocked"));
        assert!(r.decide(&order("OK", 10_001, false)).unwrap_err().contains("exceeds the limit"));
        assert!(r.decide(&order("OK", 10_000, false)).is_ok(), "the limit itself is allowed");
    }

    #[test]
    fn random_declines_are_seeded_and_near_the_rate() {
        let r = PaymentRules { decline_rate: 0.3, ..rules() };
        let orders: Vec<_> = (0..2000).map(|_| order("OK", 1, false)).collect();
        let declined = orders.iter().filter(|o| r.decide(o).is_err()).count();
        assert!((450..750).contains(&declined), "{declined} of 2000 at rate 0.3");
        for o in &orders[..50] {
            assert_eq!(r.decide(o).is_err(), r.decide(o).is_err(), "same seed, same decision");
        }
    }
}
