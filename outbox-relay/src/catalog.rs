//! The orderflow pipeline's consumers and the event types their queues are
//! bound to, as order-service and processor-service declare them.
//!
//! The relay cannot import the services, and RabbitMQ does not report a
//! queue's bindings over AMQP (only its management API does, which may be
//! off), so `describe` shows the bindings from this table and says so. The
//! table is checked against the services' own constants by a test in
//! `tests/` (`the_relay_catalog_matches_the_services`), so it cannot drift.

/// A consumer of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumer {
    /// Consumer (queue and inbox) name, e.g. `inventory`.
    pub name: &'static str,
    /// The service that runs it.
    pub service: &'static str,
    /// Event types (routing keys) bound to its queue.
    pub bindings: &'static [&'static str],
}

/// Every consumer of the pipeline, in the order events flow.
pub const CONSUMERS: &[Consumer] = &[
    Consumer {
        name: "orders",
        service: "order-service",
        bindings: &[
            "inventory.reserved",
            "inventory.rejected",
            "inventory.released",
            "payment.authorized",
            "payment.declined",
            "payment.refunded",
            "shipment.created",
        ],
    },
    Consumer {
        name: "inventory",
        service: "processor-service",
        bindings: &["order.created", "payment.declined", "order.cancelled"],
    },
    Consumer { name: "payment", service: "processor-service", bindings: &["inventory.reserved", "order.cancelled"] },
    Consumer { name: "shipping", service: "processor-service", bindings: &["payment.authorized"] },
    Consumer {
        name: "notification",
        service: "processor-service",
        bindings: &["shipment.created", "order.confirmed", "order.failed", "order.cancelled"],
    },
];

/// The names of [`CONSUMERS`], comma-separated: the default of `--consumer`.
pub const CONSUMER_NAMES: &str = "orders,inventory,payment,shipping,notification";

/// The catalog entry of `name`, if it is a pipeline consumer.
pub fn consumer(name: &str) -> Option<&'static Consumer> {
    CONSUMERS.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_names_are_the_catalog() {
        let names: Vec<&str> = CONSUMERS.iter().map(|c| c.name).collect();
        assert_eq!(names.join(","), CONSUMER_NAMES);
    }
}
