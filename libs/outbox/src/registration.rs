//! The relay's metrics, described and registered at zero when a relay
//! starts, so its `/metrics` lists every series the dashboards and alerts
//! query before the first event, and `rate()`/`increase()` see the first
//! increment.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Describes the relay's metrics and registers them at zero. Families
/// labelled by event type start as one series without labels (the relay
/// learns event types from the rows it meets); the others get their known
/// label values. Idempotent: it adds 0 and never resets a value (a gauge
/// the relay has set keeps its value).
pub fn describe_and_register() {
    let gauges: &[(&str, &str)] = &[
        ("outbox_backlog", "Rows neither published nor dead"),
        ("outbox_backing_off", "Unpublished rows backing off after a failed publish"),
        ("outbox_oldest_unpublished_age_seconds", "Age of the oldest unpublished, not dead row"),
        ("outbox_relays", "Relay sessions connected to the database"),
        ("outbox_unowned_lanes", "Lanes no relay owns"),
        ("outbox_dead_rows", "Dead rows by event type"),
        ("outbox_relay_broker_up", "1 while this relay has a broker channel"),
        ("outbox_relay_database_up", "1 while this relay has a database session"),
        ("outbox_relay_lanes_owned", "Lanes this relay owns"),
    ];
    for (name, help) in gauges {
        describe_gauge!(*name, *help);
        gauge!(*name).increment(0.0);
    }
    let counters: &[(&str, &str)] = &[
        ("outbox_published_total", "Rows published (confirmed by the broker), by event type"),
        ("outbox_publish_failed_total", "Failed publishes (nack, return, timeout), by event type"),
        ("outbox_dead_total", "Rows marked dead, by event type"),
    ];
    for (name, help) in counters {
        describe_counter!(*name, *help);
        counter!(*name).increment(0);
    }
    describe_counter!("outbox_relay_reconnects_total", "Reconnects of the relay, by target (broker, database)");
    describe_counter!("outbox_relay_failures_total", "Failures that cost the relay its session, by target");
    for target in ["broker", "database"] {
        counter!("outbox_relay_reconnects_total", "target" => target).increment(0);
        counter!("outbox_relay_failures_total", "target" => target).increment(0);
    }
    describe_counter!("outbox_retention_deleted_total", "Rows deleted by retention, by table (outbox, inbox)");
    for table in ["outbox", "inbox"] {
        counter!("outbox_retention_deleted_total", "table" => table).increment(0);
    }
    for (name, help) in [
        ("outbox_claim_seconds", "Time to claim a batch"),
        ("outbox_confirm_latency_seconds", "Time from a batch's claim to the broker's last confirm"),
        ("outbox_mark_seconds", "Time from the last confirm to the commit marking the batch published"),
    ] {
        describe_histogram!(name, Unit::Seconds, help);
        let _ = histogram!(name);
    }
    describe_histogram!("outbox_publish_batch_size", "Rows published per batch");
    let _ = histogram!("outbox_publish_batch_size");
}
