//! The operator CLI's picture of the pipeline is the services' own: the
//! consumer catalog it is given (`contracts/consumers.json`, the consumers
//! and bindings `outbox-relay describe` shows), and the consumer settings it
//! assumes, cannot drift from what the services declare.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use outbox_relay::catalog;
use outbox_relay::cli::{Cli, Command};

#[test]
fn the_consumer_catalog_matches_the_services() {
    let services = [
        (order_service::outcomes::CONSUMER, order_service::outcomes::BINDINGS, "order-service"),
        (processor_service::inventory::CONSUMER, processor_service::inventory::BINDINGS, "processor-service"),
        (processor_service::payment::CONSUMER, processor_service::payment::BINDINGS, "processor-service"),
        (processor_service::shipping::CONSUMER, processor_service::shipping::BINDINGS, "processor-service"),
        (processor_service::notification::CONSUMER, processor_service::notification::BINDINGS, "processor-service"),
    ];
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/consumers.json");
    let consumers = catalog::load(&file).unwrap();
    assert_eq!(consumers.len(), services.len(), "a consumer missing from either side");
    for (name, bindings, service) in services {
        let entry = consumers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name} is not in {file:?}"));
        assert_eq!(entry.bindings.as_deref(), Some(&bindings.iter().map(|b| (*b).to_owned()).collect::<Vec<_>>()[..]));
        assert_eq!(entry.service.as_deref(), Some(service), "service of {name}");
    }
}

/// The services' consumer options, as their command lines take them.
#[derive(Parser)]
struct ServiceOptions {
    #[command(flatten)]
    consumer: orderflow_consumer::ConsumerArgs,
}

#[test]
fn describe_assumes_the_services_consumer_defaults() {
    let service = ServiceOptions::try_parse_from(["service"]).unwrap();
    let Command::Describe(describe) = Cli::try_parse_from(["outbox-relay", "describe"]).unwrap().command else {
        panic!("describe")
    };
    assert_eq!(describe.retry_delays, service.consumer.retry_delays);
    assert_eq!(describe.delivery_limit, service.consumer.delivery_limit);
}
