//! processor-service's own metrics (the stages' business outcomes and the
//! notification webhook), described and registered at zero at start, so
//! dashboards and alerts see series from the first scrape and count the
//! first event.

use metrics::{counter, describe_counter, describe_gauge, gauge};

/// Describes processor-service's metrics and registers them at zero.
/// Idempotent: it adds 0, never resets (the breaker's state is kept).
pub fn describe_and_register() {
    orderflow_telemetry::metrics();
    describe_counter!(
        "inventory_reservations_total",
        "Stock reservations by outcome: reserved, rejected, price_mismatch"
    );
    for outcome in ["reserved", "rejected", "price_mismatch"] {
        counter!("inventory_reservations_total", "outcome" => outcome).increment(0);
    }
    describe_counter!("inventory_releases_total", "Reservations released (payment declined, order cancelled)");
    counter!("inventory_releases_total").increment(0);
    describe_counter!("payments_total", "Payments by outcome: authorized, declined, refunded");
    for outcome in ["authorized", "declined", "refunded"] {
        counter!("payments_total", "outcome" => outcome).increment(0);
    }
    describe_counter!("shipments_total", "Shipments created");
    counter!("shipments_total").increment(0);
    for (name, help) in [
        ("notifications_delivered_total", "Notifications the webhook accepted"),
        ("notifications_failed_attempts_total", "Webhook calls that failed (retried later)"),
        ("notifications_lease_lost_total", "Notifications another dispatcher took over"),
        ("notification_webhook_calls_total", "Calls to the notification webhook"),
        ("notification_breaker_opened_total", "Times the webhook's circuit breaker opened"),
    ] {
        describe_counter!(name, help);
        counter!(name).increment(0);
    }
    describe_gauge!("notification_breaker_state", "The webhook's circuit breaker: 0 closed, 1 open");
    gauge!("notification_breaker_state").increment(0.0);
}
