//! order-service's own metrics, described and registered at zero at start,
//! so dashboards and alerts (`OrdersStuckPending`) see series from the
//! first scrape and count the first order.

use metrics::{counter, describe_counter};

/// The final statuses of `orders_finalized_total`.
pub const FINAL_STATUSES: &[&str] = &["confirmed", "failed", "cancelled"];

/// Describes order-service's metrics and registers them at zero.
/// Idempotent: it adds 0, never resets.
pub fn describe_and_register() {
    orderflow_telemetry::metrics();
    describe_counter!("orders_created_total", "Orders accepted (201)");
    describe_counter!("orders_finalized_total", "Orders that reached a final status, by status");
    counter!("orders_created_total").increment(0);
    for status in FINAL_STATUSES {
        counter!("orders_finalized_total", "status" => *status).increment(0);
    }
}
