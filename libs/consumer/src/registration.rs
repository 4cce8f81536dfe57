//! The consumer runtime's metrics, described and registered at zero when a
//! consumer starts: an idle consumer's series exist before its first
//! message, so dashboards show 0 rather than "no data", and `rate()` /
//! `increase()` see the first increment (a series that appears at 1 has
//! no increase to measure, so the first dead letter would raise no alert).

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

/// The outcomes of `consumer_messages_total`.
pub const OUTCOMES: &[&str] = &["handled", "duplicate", "retried", "dead_lettered"];

/// Describes the consumer metrics and registers `consumer`'s series at zero.
/// Idempotent, and safe after messages were counted: it adds 0 and never
/// resets a value.
pub fn describe_and_register(consumer: &str) {
    // Consumers start before the HTTP server that would install the
    // recorder: registered into none, the series would be lost.
    orderflow_telemetry::metrics();
    describe_counter!(
        "consumer_messages_total",
        "Messages a consumer finished with, by outcome: handled, duplicate (dropped by the inbox), retried, dead_lettered"
    );
    describe_counter!("consumer_reconnects_total", "Times a consumer reconnected to the broker");
    describe_counter!(
        "consumer_misconfigured_total",
        "Times a consumer stopped because its queue exists with other settings"
    );
    describe_histogram!("consumer_handle_seconds", Unit::Seconds, "Time from a batch's start to a message's ack");
    describe_histogram!("consumer_batch_size", "Messages handled in one transaction");
    for outcome in OUTCOMES {
        counter!("consumer_messages_total", "consumer" => consumer.to_owned(), "outcome" => *outcome).increment(0);
    }
    counter!("consumer_reconnects_total", "consumer" => consumer.to_owned()).increment(0);
    counter!("consumer_misconfigured_total", "consumer" => consumer.to_owned()).increment(0);
    // Registering a histogram is enough for it to be rendered (empty).
    let _ = histogram!("consumer_handle_seconds", "consumer" => consumer.to_owned());
    let _ = histogram!("consumer_batch_size", "consumer" => consumer.to_owned());
}
