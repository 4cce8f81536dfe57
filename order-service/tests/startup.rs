//! Start-up refuses a configuration the broker cannot apply, with one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use orderflow_testkit::{TestBroker, TestDb};
use tokio_util::sync::CancellationToken;

fn config(db: &TestDb, broker: &TestBroker, delivery_limit: &str) -> order_service::Config {
    order_service::Config::try_parse_from([
        "order-service",
        "--http-addr",
        "127.0.0.1:0",
        "--database-url",
        &db.url,
        "--create-database",
        "false",
        "--amqp-url",
        &broker.amqp_url,
        "--topology-prefix",
        broker.topology.prefix(),
        "--delivery-limit",
        delivery_limit,
    ])
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_delivery_limit_stops_the_service_with_one_line_saying_how_to_migrate() {
    let db = TestDb::new(Some(order_service::MIGRATIONS)).await;
    let broker = TestBroker::new().await;
    let first = config(&db, &broker, "20");
    broker.track(&first.consumer.config(order_service::outcomes::CONSUMER, order_service::outcomes::BINDINGS).spec);
    let shutdown = CancellationToken::new();
    let service = order_service::build(first, shutdown.clone()).await.expect("first start declares the queues");
    let running = tokio::spawn(service.run_until_stopped());
    shutdown.cancel();
    let _ = running.await;

    let err = match order_service::build(config(&db, &broker, "7"), CancellationToken::new()).await {
        Ok(_) => panic!("a changed delivery limit must stop the service at start"),
        Err(e) => e.to_string(),
    };
    assert!(!err.contains('\n'), "one line: {err}");
    let queue = broker.topology.queue(order_service::outcomes::CONSUMER);
    assert!(err.contains(&queue) && err.contains("migrat"), "names the queue and how to migrate: {err}");
}
