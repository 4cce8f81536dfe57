//! Metrics on every process and one trace per order across every service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions};
use orderflow_e2e::{DEADLINE, Options, PROBE, System, WebhookSink, eventually, order_body};
use orderflow_envelope::Envelope;
use uuid::Uuid;

async fn scrape(sys: &System, port: u16) -> String {
    sys.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap()
}

fn has(metrics: &str, name: &str, labels: &[&str]) -> bool {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_prometheus_metrics() {
    let sys = System::start(Options {
        services_as_processes: true,
        relays_as_processes: true,
        relay_metrics: true,
        ..Options::default()
    })
    .await;
    let id = sys.place(&order_body("metrics", &[("SKU-1", 1, 2499)])).await;
    assert_eq!(sys.wait_final(&id).await["status"], "confirmed");
    let bad = sys.http.post(sys.order_url("/orders")).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(bad.status(), 400);

    let orders = scrape(&sys, sys.order_port).await;
    for (name, labels) in [
        ("http_requests_total", &[r#"route="/orders""#, r#"status="201""#][..]),
        ("http_requests_total", &[r#"route="/orders""#, r#"status="400""#]),
        ("http_request_duration_seconds_bucket", &[r#"route="/orders/{id}""#]),
        ("consumer_messages_total", &[r#"consumer="orders""#, r#"outcome="handled""#]),
        ("consumer_handle_seconds_bucket", &[r#"consumer="orders""#]),
        ("orders_finalized_total", &[r#"status="confirmed""#]),
        ("orders_created_total", &[]),
    ] {
        assert!(has(&orders, name, labels), "order-service lacks {name} {labels:?}:\n{orders}");
    }
    let processor = scrape(&sys, sys.processor_port).await;
    for (name, labels) in [
        ("consumer_messages_total", &[r#"consumer="inventory""#, r#"outcome="handled""#][..]),
        ("consumer_messages_total", &[r#"consumer="payment""#]),
        ("consumer_messages_total", &[r#"consumer="shipping""#]),
        ("inventory_reservations_total", &[r#"outcome="reserved""#]),
        ("payments_total", &[r#"outcome="authorized""#]),
        ("shipments_total", &[]),
    ] {
        assert!(has(&processor, name, labels), "processor-service lacks {name} {labels:?}:\n{processor}");
    }
    for relay in &sys.relays {
        let port = relay.metrics_port.unwrap();
        eventually(&format!("relay {} reports its outbox", relay.id), DEADLINE, || async {
            let m = scrape(&sys, port).await;
            [
                "outbox_published_total",
                "outbox_publish_batch_size_bucket",
                "outbox_confirm_latency_seconds_bucket",
                "outbox_backlog",
                "outbox_oldest_unpublished_age_seconds",
                "outbox_relay_lanes_owned",
            ]
            .iter()
            .all(|name| has(&m, name, &[]))
        })
        .await;
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_order_from_the_request_to_the_last_consumer() {
    let sink = WebhookSink::start(true).await;
    let sys = System::start(Options {
        services_as_processes: true,
        relays_as_processes: true,
        probe: true,
        processor_extra: vec!["--notify-webhook-url".into(), sink.url.clone()],
        ..Options::default()
    })
    .await;
    let trace_id = Uuid::new_v4().simple().to_string();
    let client_span = "00f067aa0ba902b7";
    let response = sys
        .http
        .post(sys.order_url("/orders"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&order_body("traced", &[("SKU-1", 1, 2499)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let id = response.json::<serde_json::Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned();
    assert_eq!(sys.wait_final(&id).await["status"], "confirmed");
    eventually("the webhook got the notification", DEADLINE, || async { !sink.traceparents().is_empty() }).await;

    // Every event about the order, whichever service wrote it, is in the
    // request's trace, each written from a span of its own.
    let (_conn, channel) = sys.broker.channel().await;
    let queue = sys.relay_topology().queue(PROBE);
    let mut events = Vec::new();
    while let Some(msg) = channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap() {
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        let env = Envelope::from_slice(&msg.delivery.data).unwrap();
        if env.aggregate_id == id {
            events.push(env);
        }
    }
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    for expected in ["order.created", "inventory.reserved", "payment.authorized", "shipment.created", "order.confirmed"]
    {
        assert!(types.contains(&expected), "{expected} in {types:?}");
    }
    let mut spans = HashSet::from([client_span.to_owned()]);
    for env in &events {
        let tp = env.traceparent.as_deref().unwrap_or_else(|| panic!("{} has no traceparent", env.event_type));
        assert_eq!(
            orderflow_telemetry::trace_id(tp),
            Some(trace_id.as_str()),
            "{} is in another trace: {tp}",
            env.event_type
        );
        let span = tp.split('-').nth(2).unwrap().to_owned();
        assert!(spans.insert(span), "{} reuses a span id: {tp}", env.event_type);
    }
    // The last consumer, the notification's webhook call, too.
    let webhook = sink.traceparents();
    assert_eq!(orderflow_telemetry::trace_id(&webhook[0]), Some(trace_id.as_str()), "{webhook:?}");
    sys.stop().await;
}
