//! Notifications: recorded once per order and outcome, delivered to the
//! webhook once it is up, without hammering it while it is down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use orderflow_db::Pool;
use orderflow_e2e::{DEADLINE, Db, Options, System, WebhookSink, count, eventually, order_body, timeline};
use orderflow_envelope::Envelope;
use serde_json::Value;
use uuid::Uuid;

async fn notifications(sys: &System, order_id: &str) -> Vec<Value> {
    sys.get_json(&sys.processor_url(&format!("/notifications?order_id={order_id}"))).await.as_array().unwrap().clone()
}

/// The envelope of an event written to an outbox, rebuilt from its row.
async fn outbox_envelope(pool: &Pool, event_type: &str, aggregate_id: &str) -> Envelope {
    use diesel_async::RunQueryDsl;
    let mut conn = pool.get().await.unwrap();
    let rows: Vec<orderflow_outbox::PendingRow> = diesel::sql_query(format!(
        "SELECT id, message_id, event_type, schema_version, aggregate_type, aggregate_id, aggregate_version, \
         payload, headers, occurred_at, created_at, attempts FROM outbox \
         WHERE event_type = '{event_type}' AND aggregate_id = '{aggregate_id}'"
    ))
    .load(&mut conn)
    .await
    .unwrap();
    rows[0].envelope().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_order_confirmed_deliveries_give_one_notification() {
    // One message at a time per consumer, so the last copy sent is handled last.
    let sys = System::start(Options { consumer_concurrency: 1, keep_published: true, ..Options::default() }).await;
    let id = sys.place(&order_body("gina", &[("SKU-1", 1, 2499)])).await;
    assert_eq!(sys.wait_final(&id).await["status"], "confirmed");
    let confirmed_notes =
        |notes: Vec<Value>| notes.into_iter().filter(|n| n["kind"] == "order_confirmed").collect::<Vec<_>>();
    eventually("the notification is recorded", DEADLINE, || async {
        confirmed_notes(notifications(&sys, &id).await).len() == 1
    })
    .await;

    // The same message twice more, then the same outcome under a new id.
    let confirmed = outbox_envelope(sys.pool(Db::Orders), "order.confirmed", &id).await;
    let mut copy = confirmed.clone();
    copy.message_id = Uuid::now_v7();
    let (_conn, channel) = sys.broker.channel().await;
    for env in [&confirmed, &confirmed, &copy] {
        sys.broker.publish(&channel, env).await;
    }
    let processor = sys.pool(Db::Processor);
    eventually("the copy under a new id is handled", DEADLINE, || async {
        count(processor, &format!("SELECT count(*) AS n FROM inbox WHERE message_id = '{}'", copy.message_id)).await
            == 1
    })
    .await;
    let all = notifications(&sys, &id).await;
    let kinds: Vec<&str> = all.iter().map(|n| n["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "order_confirmed").count(), 1, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "order_shipped").count(), 1, "{kinds:?}");
    let recorded = confirmed_notes(all);
    assert!(recorded[0]["text"].as_str().unwrap().contains("24.99 charged"), "{}", recorded[0]["text"]);
    assert_eq!(
        count(processor, &format!("SELECT count(*) AS n FROM inbox WHERE message_id = '{}'", confirmed.message_id))
            .await,
        1,
        "the redelivered message was dropped by the inbox"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_down_then_back_gets_each_notification_once_and_the_breaker_spares_it() {
    const ORDERS: usize = 20;
    let sink = WebhookSink::start(false).await;
    let flags = [
        "--notify-webhook-url",
        &sink.url,
        "--notify-breaker-threshold",
        "3",
        "--notify-breaker-cooldown",
        "2s",
        "--notify-quick-retries",
        "1",
        "--notify-retry-base",
        "200ms",
        "--notify-retry-max",
        "1s",
        "--notify-poll-interval",
        "200ms",
    ];
    let sys =
        System::start(Options { processor_extra: flags.iter().map(|s| s.to_string()).collect(), ..Options::default() })
            .await;
    let bodies: Vec<Value> = (0..ORDERS).map(|i| order_body(&format!("h{i}"), &[("SKU-2", 1, 1299)])).collect();
    let ids = join_all(bodies.iter().map(|b| sys.place(b))).await;
    for id in &ids {
        sys.wait_final(id).await;
    }
    let status_url = sys.processor_url("/notifications/webhook");
    // Each confirmed order gets two: shipped, then confirmed.
    let expected = 2 * ORDERS;
    eventually("all recorded, none delivered, breaker open", DEADLINE, || async {
        let s = sys.get_json(&status_url).await;
        s["undelivered"] == expected && s["breaker"] == "open"
    })
    .await;
    let calls_while_down = sink.refused();
    eprintln!("{calls_while_down} webhook calls while it was down, for {expected} notifications");
    assert!(
        calls_while_down < ORDERS,
        "{calls_while_down} calls for {expected} notifications: the breaker should stop calls while the webhook is down"
    );

    sink.set_up(true);
    eventually("every notification delivered", DEADLINE, || async {
        sys.get_json(&status_url).await["undelivered"] == 0
    })
    .await;
    let accepted = sink.accepted();
    assert_eq!(accepted.len(), expected, "one delivery per notification");
    assert!(accepted.values().all(|n| *n == 1), "each delivered once: {accepted:?}");
    assert_eq!(sys.get_json(&status_url).await["breaker"], "closed");
    for id in &ids {
        let n = notifications(&sys, id).await;
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(n.iter().all(|n| n["status"] == "delivered"), "{n:?}");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timelines_of_a_confirmed_and_a_failed_order() {
    let sys = System::start(Options::default()).await;
    let confirmed = sys.place(&order_body("ivan", &[("SKU-1", 1, 2499)])).await;
    let failed = sys.place(&order_body("ivan", &[("NOPE", 1, 10)])).await;
    sys.wait_final(&confirmed).await;
    sys.wait_final(&failed).await;
    assert_eq!(
        timeline(&sys, &confirmed).await,
        ["order.created", "inventory.reserved", "payment.authorized", "shipment.created", "order.confirmed"]
    );
    assert_eq!(timeline(&sys, &failed).await, ["order.created", "inventory.rejected", "order.failed"]);
    let events = sys.get_json(&sys.order_url(&format!("/orders/{confirmed}/events"))).await;
    let shipped = &events[3];
    assert!(shipped["details"]["tracking_number"].as_str().unwrap().starts_with("OF"), "{shipped}");
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        events.as_array().unwrap().iter().map(|e| e["occurred_at"].as_str().unwrap().parse().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "in order: {times:?}");
    let reason = &sys.get_json(&sys.order_url(&format!("/orders/{failed}/events"))).await[1]["details"]["reason"];
    assert_eq!(reason, "unknown SKU NOPE");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_a_slow_webhook_deliver_each_notification_once() {
    // Each call takes 2 s; one attempt's lease is then 3 s + 5 s, shorter
    // than a round of 20 notifications called one after another.
    let sink = WebhookSink::start(true).await;
    sink.set_delay(std::time::Duration::from_secs(2));
    let flags = [
        "--notify-webhook-url",
        &sink.url,
        "--notify-webhook-timeout",
        "3s",
        "--notify-quick-retries",
        "0",
        "--notify-poll-interval",
        "200ms",
    ];
    let sys =
        System::start(Options { processor_extra: flags.iter().map(|s| s.to_string()).collect(), ..Options::default() })
            .await;
    let replica = sys.processor_replica(&[]).await;
    const ORDERS: usize = 12;
    let bodies: Vec<Value> = (0..ORDERS).map(|i| order_body(&format!("r{i}"), &[("SKU-2", 1, 1299)])).collect();
    let ids = join_all(bodies.iter().map(|b| sys.place(b))).await;
    for id in &ids {
        assert_eq!(sys.wait_final(id).await["status"], "confirmed");
    }
    let status_url = sys.processor_url("/notifications/webhook");
    let expected = 2 * ORDERS;
    eventually("every notification delivered", DEADLINE, || async {
        let s = sys.get_json(&status_url).await;
        s["undelivered"] == 0 && sink.accepted().len() == expected
    })
    .await;
    let accepted = sink.accepted();
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once by the two replicas: {twice:?}");
    // Before the system: a replica still running when the test topology is
    // deleted declares its queues again, and they stay on the broker.
    replica.stop().await;
    sys.stop().await;
}
