//! The stages against real PostgreSQL and RabbitMQ, fed directly through
//! the broker (no relay: what they publish stays in the outbox).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use orderflow_broker::QueueSpec;
use orderflow_contracts::Money;
use orderflow_contracts::events::{LineItem, OrderCreated};
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::{TestBroker, TestDb, eventually};
use processor_service::{Config, inventory, notification, payment, shipping};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(QueryableByName)]
struct Stock {
    #[diesel(sql_type = BigInt)]
    on_hand: i64,
    #[diesel(sql_type = BigInt)]
    reserved: i64,
}

#[derive(QueryableByName)]
struct Status {
    #[diesel(sql_type = Text)]
    status: String,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn created(sku: &str, quantity: i32) -> Envelope {
    let event = OrderCreated {
        order_id: Uuid::now_v7().to_string(),
        customer_id: "c".into(),
        items: vec![LineItem { sku: sku.into(), quantity, unit_price: Money::from_minor(100) }],
        total_amount: Money::from_minor(i64::from(quantity) * 100),
        force_fail: false,
    };
    Envelope::new(&event, 1, &Metadata::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_delivered_twice_changes_stock_once() {
    let db = TestDb::new(Some(processor_service::MIGRATIONS)).await;
    let broker = TestBroker::new().await;
    // The tracked specs name the same retry tiers the service declares, so
    // that the test's cleanup deletes every one of them.
    let delays_ms = [100u64, 200, 300];
    let delays = delays_ms.map(|d| format!("{d}ms")).join(",");
    for (consumer, bindings) in [
        (inventory::CONSUMER, inventory::BINDINGS),
        (payment::CONSUMER, payment::BINDINGS),
        (shipping::CONSUMER, shipping::BINDINGS),
        (notification::CONSUMER, notification::BINDINGS),
    ] {
        broker.track(&QueueSpec {
            consumer: consumer.into(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            retry_delays: delays_ms.iter().map(|d| Duration::from_millis(*d)).collect(),
            delivery_limit: 20,
        });
    }
    // One message at a time, in queue order: when the fence is handled, the
    // two copies before it have been too.
    let cfg = Config::try_parse_from([
        "processor-service",
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
        "--consumer-concurrency",
        "1",
        "--retry-delays",
        &delays,
        "--catalog",
        r#"[{"sku": "SKU-1", "name": "Beans", "price": 1.00, "on_hand": 100}]"#,
    ])
    .unwrap();
    let shutdown = CancellationToken::new();
    let service = processor_service::build(cfg, shutdown.clone()).await.unwrap();
    let ready = format!("http://127.0.0.1:{}/ready", service.port());
    let running = tokio::spawn(service.run_until_stopped());
    // Ready (the database answers) and every consumer subscribed, so its
    // queue is bound before anything is published.
    eventually("processor-service is ready and consuming", Duration::from_secs(30), || async {
        let Ok(r) = reqwest::get(&ready).await else { return false };
        r.status().is_success() && r.json::<serde_json::Value>().await.is_ok_and(|b| b["broker"] == true)
    })
    .await;

    let (_conn, channel) = broker.channel().await;
    let twice = created("SKU-1", 10);
    let fence = created("NOPE", 1);
    for env in [&twice, &twice, &fence] {
        broker.publish(&channel, env).await;
    }

    let fence_sql = format!("SELECT status FROM reservations WHERE order_id = '{}'", fence.aggregate_id);
    eventually("the fence order is handled", Duration::from_secs(30), || async {
        let mut conn = db.pool.get().await.unwrap();
        matches!(diesel::sql_query(&fence_sql).get_result::<Status>(&mut conn).await, Ok(s) if s.status == "rejected")
    })
    .await;
    let mut conn = db.pool.get().await.unwrap();
    let stock: Stock = diesel::sql_query(
        "SELECT on_hand::bigint AS on_hand, reserved::bigint AS reserved FROM products WHERE sku = 'SKU-1'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!((stock.on_hand, stock.reserved), (90, 10), "reserved once");
    let inbox: N = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM inbox WHERE consumer = 'inventory' AND message_id = '{}'",
        twice.message_id
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(inbox.n, 1);
    let reserved_events: N =
        diesel::sql_query("SELECT count(*) AS n FROM outbox WHERE event_type = 'inventory.reserved'")
            .get_result(&mut conn)
            .await
            .unwrap();
    assert_eq!(reserved_events.n, 1, "one inventory.reserved for the order");
    drop(conn);

    shutdown.cancel();
    running.await.unwrap().unwrap();
}
