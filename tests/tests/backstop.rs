//! A consumer that crashes on a message every time: the quorum queue's
//! delivery limit parks the message, and everything else keeps flowing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_broker::lapin::options::BasicGetOptions;
use orderflow_broker::lapin::types::AMQPValue;
use orderflow_contracts::Money;
use orderflow_contracts::events::{LineItem, OrderCreated};
use orderflow_e2e::{DEADLINE, Options, System, eventually_some, order_body};
use orderflow_envelope::{Envelope, Metadata};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_its_consumer_every_time_is_parked_by_the_delivery_limit() {
    let mut sys = System::start(Options {
        services_as_processes: true,
        processor_extra: vec!["--delivery-limit".into(), "3".into()],
        service_env: vec![("ORDERFLOW_FAILPOINTS".into(), "consumer-abort-on-marked-message".into())],
        ..Options::default()
    })
    .await;
    let mut poison = Envelope::new(
        &OrderCreated {
            order_id: Uuid::now_v7().to_string(),
            customer_id: "crash".into(),
            items: vec![LineItem { sku: "SKU-1".into(), quantity: 1, unit_price: Money::from_minor(1) }],
            total_amount: Money::from_minor(1),
            force_fail: false,
        },
        1,
        &Metadata::default(),
    )
    .unwrap();
    poison.payload["__abort"] = serde_json::json!(true);
    let (_conn, channel) = sys.broker.channel().await;
    sys.broker.publish(&channel, &poison).await;

    // processor-service dies on it; a supervisor brings it back each time.
    let dlq = sys.topology().dead_letter_queue("inventory");
    let started = std::time::Instant::now();
    let parked = loop {
        if let Some(msg) = channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap() {
            break msg;
        }
        assert!(started.elapsed() < DEADLINE, "the message was never parked");
        sys.revive().await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // It crashed on the last delivery too.
    sys.revive().await;
    let headers = parked.delivery.properties.headers().clone().unwrap_or_default();
    let reason = match headers.inner().get("x-first-death-reason") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(reason, "delivery_limit", "parked by the broker's delivery limit: {headers:?}");
    assert_eq!(parked.delivery.properties.message_id().as_ref().unwrap().as_str(), poison.message_id.to_string());

    // The queue behind it flows again.
    let id = sys.place(&order_body("after-the-crashes", &[("SKU-1", 1, 2499)])).await;
    let order = eventually_some("a normal order confirmed", DEADLINE, || async {
        let o = sys.order(&id).await;
        (o["status"] == "confirmed").then_some(o)
    })
    .await;
    assert_eq!(order["status"], "confirmed");
    sys.stop().await;
}
