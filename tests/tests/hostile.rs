//! Malformed and hostile messages on every queue: each is dead-lettered with
//! a reason, and the consumers keep running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use orderflow_broker::lapin::{BasicProperties, Channel};
use orderflow_broker::{header_str, properties_for};
use orderflow_consumer::headers;
use orderflow_contracts::Money;
use orderflow_contracts::events::{InventoryReleased, InventoryReserved, LineItem, OrderCreated};
use orderflow_e2e::{DEADLINE, Options, System, eventually_some, order_body};
use orderflow_envelope::{Envelope, Metadata, SchemaVersion};
use serde_json::json;
use uuid::Uuid;

const CONSUMERS: [&str; 5] = ["orders", "inventory", "payment", "shipping", "notification"];

/// Hostile messages, each with what it is.
fn hostile() -> Vec<(&'static str, Vec<u8>, BasicProperties)> {
    let props = |env: &Envelope| properties_for(env);
    let created = Envelope::new(
        &OrderCreated {
            order_id: Uuid::now_v7().to_string(),
            customer_id: "x".into(),
            items: vec![LineItem { sku: "SKU-1".into(), quantity: 1, unit_price: Money::from_minor(1) }],
            total_amount: Money::from_minor(1),
            force_fail: false,
        },
        1,
        &Metadata::default(),
    )
    .unwrap();
    let mut wrong_types = created.clone();
    wrong_types.message_id = Uuid::now_v7();
    wrong_types.payload["items"][0]["quantity"] = json!("lots");
    let mut unknown_type = created.clone();
    unknown_type.message_id = Uuid::now_v7();
    unknown_type.event_type = "order.exploded".into();
    let mut future_major = created.clone();
    future_major.message_id = Uuid::now_v7();
    future_major.schema_version = SchemaVersion::new(7, 0);
    let mut huge = created.clone();
    huge.message_id = Uuid::now_v7();
    huge.payload["padding"] = json!("x".repeat(3 * 1024 * 1024));
    // Consumed by order-service only (and for an order it does not know).
    let stray = Envelope::new(
        &InventoryReleased { order_id: Uuid::now_v7().to_string(), items: vec![], reason: "x".into() },
        2,
        &Metadata::default(),
    )
    .unwrap();
    let orphan = Envelope::new(
        &InventoryReserved {
            order_id: Uuid::now_v7().to_string(),
            customer_id: "x".into(),
            items: vec![],
            total_amount: Money::from_minor(-5),
            force_fail: false,
        },
        1,
        &Metadata::default(),
    )
    .unwrap();
    vec![
        ("bad JSON", br#"{"message_id": "#.to_vec(), BasicProperties::default()),
        ("binary garbage", vec![0, 159, 146, 150, 255, 1, 2], BasicProperties::default()),
        ("empty body, no properties", vec![], BasicProperties::default()),
        ("a JSON array", b"[1, 2, 3]".to_vec(), BasicProperties::default()),
        ("wrong payload types", wrong_types.to_vec(), props(&wrong_types)),
        ("unknown event type", unknown_type.to_vec(), props(&unknown_type)),
        ("unknown major version", future_major.to_vec(), props(&future_major)),
        ("huge payload", huge.to_vec(), props(&huge)),
        ("an event this consumer does not take", stray.to_vec(), props(&stray)),
        ("nonsense about an unknown order", orphan.to_vec(), BasicProperties::default()),
    ]
}

async fn dead_letters(channel: &Channel, dlq: &str, n: usize) -> Vec<BasicProperties> {
    let mut got = Vec::new();
    while got.len() < n {
        let msg = eventually_some(&format!("{n} dead letters in {dlq} (have {})", got.len()), DEADLINE, || async {
            channel.basic_get(dlq.into(), BasicGetOptions::default()).await.unwrap()
        })
        .await;
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        got.push(msg.delivery.properties.clone());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_every_queue_are_dead_lettered_and_consumers_keep_going() {
    let sys = System::start(Options::default()).await;
    let (_conn, channel) = sys.broker.channel().await;
    let messages = hostile();
    for consumer in CONSUMERS {
        let queue = sys.topology().queue(consumer);
        for (_, body, props) in &messages {
            channel
                .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), body, props.clone())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    for consumer in CONSUMERS {
        let dlq = sys.topology().dead_letter_queue(consumer);
        let letters = dead_letters(&channel, &dlq, messages.len()).await;
        for props in &letters {
            let reason = header_str(props, headers::ERROR).unwrap_or_default();
            assert!(!reason.is_empty(), "{consumer}: a dead letter without a reason: {props:?}");
            assert_eq!(header_str(props, headers::CONSUMER).as_deref(), Some(consumer));
            assert!(header_str(props, headers::FAILED_AT).is_some());
        }
    }
    // Nothing was applied: no order, no stock moved.
    assert_eq!(orderflow_e2e::count(sys.pool(orderflow_e2e::Db::Orders), "SELECT count(*) AS n FROM orders").await, 0);
    assert_eq!(sys.product("SKU-1").await["on_hand"], 100);

    // The consumers are still there and working.
    let ready = sys.get_json(&sys.processor_url("/ready")).await;
    assert_eq!(ready["ready"], true, "{ready}");
    let id = sys.place(&order_body("after-the-storm", &[("SKU-1", 1, 2499)])).await;
    assert_eq!(sys.wait_final(&id).await["status"], "confirmed");
    sys.stop().await;
}
