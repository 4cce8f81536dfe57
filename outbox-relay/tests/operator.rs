//! The operator commands against a real database and broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use orderflow_broker::lapin::options::BasicGetOptions;
use orderflow_broker::{header_i64, header_str};
use orderflow_contracts::Money;
use orderflow_contracts::events::PaymentRefunded;
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::{TestBroker, TestDb, eventually};
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_dies_then_replay_brings_it_back_once_the_cause_is_fixed() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    // Nobody consumes payment.refunded yet: the broker returns it.
    let queue = probe(&broker, &channel, "probe", &["payment.declined"]).await;
    let (stuck, fine) = (Uuid::now_v7(), Uuid::now_v7());
    let refund = Envelope::new(
        &PaymentRefunded { order_id: stuck.to_string(), payment_id: Uuid::now_v7(), amount: Money::from_minor(5) },
        1,
        &Metadata::default(),
    )
    .unwrap();
    write(&db.pool, vec![refund.clone(), declined(stuck, 2), declined(fine, 1)]).await;
    let prefix = broker.topology.prefix().to_owned();
    let _relay = run_relay(&db, &broker.amqp_url, &prefix, "r1", &["--max-attempts", "3"]);

    eventually("the refund row is dead", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL").await == 1
    })
    .await;
    let (ok, out, err) = command(&["status", "--database-url", &db.url, "--json"]).await;
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["dead_by_type"][0]["event_type"], "payment.refunded");
    assert_eq!(status["dead_by_type"][0]["count"], 1);
    assert_eq!(status["backlog"], 1, "the stuck order's next event waits");
    assert_eq!(status["relays"][0]["name"], "outbox-relay:r1");
    assert_eq!(status["relays"][0]["lanes"].as_array().unwrap().len(), 32);
    let (ok, text, _) = command(&["status", "--database-url", &db.url]).await;
    assert!(ok && text.contains("payment.refunded") && text.contains("outbox-relay:r1"), "{text}");

    // The cause is fixed: a consumer of payment.refunded now exists.
    probe(&broker, &channel, "refunds", &["payment.refunded"]).await;
    let (ok, dry, err) =
        command(&["replay", "--database-url", &db.url, "--aggregate", &stuck.to_string(), "--dry-run"]).await;
    assert!(ok, "{err}");
    assert!(dry.contains("would replay 1 rows") && dry.contains("NO_ROUTE"), "{dry}");
    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL").await,
        1,
        "dry run changes nothing"
    );

    let (ok, _, err) = command(&["replay", "--database-url", &db.url]).await;
    assert!(!ok && err.contains("--all"), "a replay without filter is refused: {err}");
    let (ok, done, err) = command(&[
        "replay",
        "--database-url",
        &db.url,
        "--aggregate",
        &stuck.to_string(),
        "--operator",
        "alice",
        "--reason",
        "bound refunds",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(done.contains("replayed 1 rows"), "{done}");
    eventually("everything published", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await == 0
    })
    .await;
    let refunds = drain(&channel, &broker.topology.queue("refunds")).await;
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].message_id, refund.message_id);
    let declines: Vec<(String, i64)> =
        drain(&channel, &queue).await.into_iter().map(|e| (e.aggregate_id, e.aggregate_version)).collect();
    assert!(declines.contains(&(fine.to_string(), 1)) && declines.contains(&(stuck.to_string(), 2)), "{declines:?}");

    let (ok, log, err) = command(&["replays", "--database-url", &db.url]).await;
    assert!(ok, "{err}");
    assert!(log.contains("outbox") && log.contains("alice") && log.contains("bound refunds"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_requeued_with_a_record() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let work = probe(&broker, &channel, "inventory", &["order.created"]).await;
    let dlq = broker.topology.dead_letter_queue("inventory");
    let (first, second) = (declined(Uuid::now_v7(), 1), declined(Uuid::now_v7(), 1));
    dead_letter(&channel, &dlq, &first, "database said no").await;
    dead_letter(&channel, &dlq, &second, "still no").await;
    let amqp = broker.amqp_url.clone();
    let prefix = broker.topology.prefix().to_owned();
    let base = ["--amqp-url", &amqp, "--topology-prefix", &prefix];

    let mut args = vec!["dlq", "list", "--consumer", "inventory,nobody"];
    args.extend(base);
    let (ok, out, err) = command(&args).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("inventory") && l.contains(" 2 ")), "{out}");
    assert!(out.contains("not declared"), "{out}");

    let mut args = vec!["dlq", "show", "--consumer", "inventory"];
    args.extend(base);
    let (ok, out, err) = command(&args).await;
    assert!(ok, "{err}");
    assert!(out.contains("database said no") && out.contains(&first.message_id.to_string()), "{out}");

    let first_id = first.message_id.to_string();
    let mut args =
        vec!["dlq", "requeue", "--consumer", "inventory", "--database-url", &db.url, "--message-id", &first_id];
    args.extend(base);
    let mut dry = args.clone();
    dry.push("--dry-run");
    let (ok, out, err) = command(&dry).await;
    assert!(ok && out.contains("would requeue"), "{out}{err}");
    let (ok, out, err) = command(&args).await;
    assert!(ok, "{err}");
    assert!(out.contains("requeued 1 dead letters"), "{out}");

    let back =
        channel.basic_get(work.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("requeued message");
    assert_eq!(back.delivery.properties.message_id().as_ref().unwrap().as_str(), first_id);
    assert_eq!(header_i64(&back.delivery.properties, "x-orderflow-attempt"), None, "fresh retries");
    assert_eq!(header_str(&back.delivery.properties, "x-orderflow-last-error").as_deref(), Some("database said no"));
    let left =
        channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("the other stays");
    assert_eq!(left.delivery.properties.message_id().as_ref().unwrap().as_str(), second.message_id.to_string());

    let (ok, log, _) = command(&["replays", "--database-url", &db.url]).await;
    assert!(ok && log.contains("dlq") && log.contains("1 items"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_timeout_shorter_than_two_lease_intervals_fails_at_start_with_one_line() {
    let (ok, _, err) = command(&[
        "run",
        "--database-url",
        "postgres://postgres@127.0.0.1:5432/postgres",
        "--session-timeout",
        "1s",
        "--lease-interval",
        "1s",
        "--metrics-addr",
        "off",
    ])
    .await;
    assert!(!ok);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("RELAY_SESSION_TIMEOUT") && lines[0].contains("RELAY_LEASE_INTERVAL"), "{err}");
}
