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

/// Every part as a process, each relay with its own /metrics port.
async fn processes_with_metrics() -> System {
    System::start(Options {
        services_as_processes: true,
        relays_as_processes: true,
        relay_metrics: true,
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_prometheus_metrics() {
    let sys = processes_with_metrics().await;
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
            // Registered at zero without labels at start; published rows add their event type.
            has(&m, "outbox_published_total", &["event_type="])
                && [
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

/// Every metric name the alerts (infra/prometheus/alerts.yml) and the
/// dashboard (infra/grafana/dashboards/orderflow.json) query, read from
/// those files so this test follows them; RabbitMQ's own and `up` left out.
fn queried_metric_names() -> std::collections::BTreeSet<String> {
    let infra = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra");
    let alerts = std::fs::read_to_string(format!("{infra}/prometheus/alerts.yml")).unwrap();
    let mut exprs: Vec<String> =
        alerts.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()).collect();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard = std::fs::read_to_string(format!("{infra}/grafana/dashboards/orderflow.json")).unwrap();
    walk(&serde_json::from_str(&dashboard).unwrap(), &mut exprs);
    assert!(exprs.len() > 10, "queries found: {exprs:?}");
    exprs.iter().flat_map(|e| promql_metric_names(e)).filter(|n| !n.starts_with("rabbitmq_") && n != "up").collect()
}

/// The metric names in a PromQL expression: identifiers outside label
/// matchers, ranges and grouping clauses that are not functions, keywords
/// or numbers.
fn promql_metric_names(expr: &str) -> Vec<String> {
    // Aggregations may be followed by their grouping (`sum by (x) (...)`), not a parenthesis.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    // String literals first (label values, which may hold `${prefix}`).
    let mut chars = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in expr.chars() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => quoted = !quoted,
            (false, _, c) => chars.push(c),
            (true, false, _) => {}
        }
    }
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            while i < chars.len() && chars[i] != close {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next] == ' ' {
                next += 1;
            }
            let called = next < chars.len() && chars[next] == '(';
            if GROUPING.contains(&word.as_str()) && called {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                continue;
            }
            // `$prefix`-style variables are not metrics.
            let variable = start > 0 && chars[start - 1] == '$';
            if !called && !variable && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        promql_metric_names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{a="b"}[5m]))) > 0.5 or vector(0)"#
        ),
        ["http_request_duration_seconds_bucket"]
    );
    assert_eq!(
        promql_metric_names(r#"absent(up{job="x"} == 1) or max by (service) (outbox_unowned_lanes) > 0"#),
        ["up", "outbox_unowned_lanes"]
    );
    assert_eq!(promql_metric_names("sum by (consumer) (increase(x_total[10m])) > 0"), ["x_total"]);
    assert_eq!(
        promql_metric_names(r#"sum by (queue) (rabbitmq_q{queue=~"${prefix}\\..*", queue!~".*\\.dlq"})"#),
        ["rabbitmq_q"]
    );
}

/// Whether `metrics` (Prometheus text) has a sample of `name`.
fn serves(metrics: &str, name: &str) -> bool {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_served_before_the_first_event() {
    let sys = processes_with_metrics().await;
    let names = queried_metric_names();
    assert!(names.contains("consumer_messages_total") && names.contains("outbox_backlog"), "{names:?}");
    let mut ports = vec![sys.order_port, sys.processor_port];
    ports.extend(sys.relays.iter().map(|r| r.metrics_port.unwrap()));
    // No order is placed: every process is idle. The relays register their
    // metrics as they start, just after their listener.
    eventually("every queried metric is served by some process", DEADLINE, || async {
        let mut all = String::new();
        for port in &ports {
            // A relay's listener may not be up yet.
            let Ok(response) = sys.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await else {
                return false;
            };
            all.push_str(&response.text().await.unwrap_or_default());
        }
        let missing: Vec<&String> = names.iter().filter(|n| !serves(&all, n)).collect();
        if !missing.is_empty() {
            eprintln!("not served yet: {missing:?}");
        }
        missing.is_empty()
    })
    .await;

    let processor = scrape(&sys, sys.processor_port).await;
    for consumer in ["inventory", "payment", "shipping", "notification"] {
        for outcome in orderflow_consumer::OUTCOMES {
            let labels = [format!(r#"consumer="{consumer}""#), format!(r#"outcome="{outcome}""#)];
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            assert!(
                has(&processor, "consumer_messages_total", &labels),
                "idle processor lacks {labels:?}:\n{processor}"
            );
        }
    }
    assert!(has(&processor, "notification_breaker_state 0", &[]), "{processor}");
    let orders = scrape(&sys, sys.order_port).await;
    assert!(has(&orders, "orders_created_total 0", &[]), "idle, and counted from zero:\n{orders}");
    assert!(has(&orders, "consumer_messages_total", &[r#"consumer="orders""#, r#"outcome="dead_lettered""#]));
    for relay in &sys.relays {
        let m = scrape(&sys, relay.metrics_port.unwrap()).await;
        for name in ["outbox_backlog", "outbox_dead_rows", "outbox_published_total", "outbox_relay_broker_up"] {
            assert!(serves(&m, name), "relay {} lacks {name}:\n{m}", relay.id);
        }
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
