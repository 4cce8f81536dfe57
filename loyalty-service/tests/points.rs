//! loyalty-service end to end on real PostgreSQL and RabbitMQ: the
//! pipeline's events in through the broker, delivered more than once and out
//! of order; its own events out through the outbox and a relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use loyalty_service::events::{Input, PointsGranted, PointsRevoked};
use loyalty_service::points::CONSUMER;
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::options::BasicGetOptions;
use orderflow_broker::lapin::{Channel, options::BasicAckOptions};
use orderflow_contracts::Money;
use orderflow_contracts::events::{OrderCancelled, OrderConfirmed};
use orderflow_envelope::{DomainEvent, Envelope, Metadata};
use orderflow_outbox::relay::RelayConfig;
use orderflow_testkit::{TestBroker, TestDb, count, eventually, eventually_some};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

fn confirmed(order_id: &str, customer: &str, cents: i64) -> Envelope {
    let event = OrderConfirmed {
        order_id: order_id.into(),
        customer_id: customer.into(),
        total_amount: Money::from_minor(cents),
        tracking_number: Some("TRK-1".into()),
    };
    Envelope::new(&event, 3, &Metadata::default()).unwrap()
}

fn cancelled(order_id: &str, customer: &str) -> Envelope {
    let event = OrderCancelled { order_id: order_id.into(), customer_id: customer.into(), reason: None };
    Envelope::new(&event, 4, &Metadata::default()).unwrap()
}

/// The next message on the probe queue, decoded as envelope.
async fn next(channel: &Channel, queue: &str) -> Envelope {
    eventually_some("a points event is published", DEADLINE, || async {
        let got = channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap()?;
        got.delivery.ack(BasicAckOptions::default()).await.unwrap();
        Some(Envelope::from_slice(&got.delivery.data).unwrap())
    })
    .await
}

async fn balance(base: &str, customer: &str) -> Option<serde_json::Value> {
    let r = reqwest::get(format!("{base}/customers/{customer}/points")).await.ok()?;
    r.status().is_success().then_some(())?;
    r.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_are_granted_once_under_duplicate_delivery_and_revoked_on_cancel() {
    let db = TestDb::new(Some(loyalty_service::MIGRATIONS)).await;
    let broker = TestBroker::new().await;
    broker.track(&QueueSpec {
        consumer: CONSUMER.into(),
        bindings: Input::BINDINGS.iter().map(|b| (*b).to_owned()).collect(),
        // The tiers the service declares (`--retry-delays` below), so that
        // the test's cleanup deletes every one of them.
        retry_delays: [100, 200, 300].map(Duration::from_millis).to_vec(),
        delivery_limit: 20,
    });
    // A probe queue for what the service publishes.
    let probe = QueueSpec {
        consumer: "probe".into(),
        bindings: vec!["points.#".into()],
        retry_delays: vec![],
        delivery_limit: 5,
    };
    broker.track(&probe);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &probe).await.unwrap();
    let probe_queue = broker.topology.queue("probe");

    let cfg = loyalty_service::Config::try_parse_from([
        "loyalty-service",
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
        "--retry-delays",
        "100ms,200ms,300ms",
    ])
    .unwrap();
    let shutdown = CancellationToken::new();
    let service = loyalty_service::build(cfg, shutdown.clone()).await.unwrap();
    let base = format!("http://127.0.0.1:{}", service.port());
    let running = tokio::spawn(service.run_until_stopped());
    // The relay beside it, as `make run` starts one.
    let mut relay = RelayConfig::new(db.url.clone(), broker.amqp_url.clone(), broker.topology.clone());
    relay.poll_interval = Duration::from_millis(200);
    let relay = tokio::spawn(orderflow_outbox::relay::run(relay, shutdown.child_token()));
    eventually("loyalty-service is ready and consuming", DEADLINE, || async {
        let Ok(r) = reqwest::get(format!("{base}/ready")).await else { return false };
        r.status().is_success() && r.json::<serde_json::Value>().await.is_ok_and(|b| b["broker"] == true)
    })
    .await;

    // The broker delivers one confirmation three times; the pipeline also
    // re-confirms the order under a new message id (a replay).
    let customer = format!("c-{}", Uuid::now_v7());
    let order = format!("ord-{}", Uuid::now_v7());
    let first = confirmed(&order, &customer, 12_599);
    for env in [&first, &first, &first, &confirmed(&order, &customer, 12_599)] {
        broker.publish(&channel, env).await;
    }
    // A cancellation that overtakes its confirmation (a retried message):
    // handled first (its tombstone is in), then the confirmation arrives.
    // (The two racing each other: tests/race.rs.)
    let overtaken = format!("ord-{}", Uuid::now_v7());
    broker.publish(&channel, &cancelled(&overtaken, &customer)).await;
    let tombstone = format!("SELECT count(*) AS n FROM grants WHERE order_id = '{overtaken}'");
    eventually("the cancellation is handled", DEADLINE, || async { count(&db.pool, &tombstone).await == 1 }).await;
    // A last order, after the others.
    let fence = format!("ord-{}", Uuid::now_v7());
    broker.publish(&channel, &confirmed(&overtaken, &customer, 50_000)).await;
    broker.publish(&channel, &confirmed(&fence, &customer, 100)).await;

    // Batches run side by side, so the fence may commit before the others:
    // wait until every order has its grant row (each written in the same
    // transaction as its balance change).
    let account = eventually_some("every order's grant is recorded", DEADLINE, || async {
        let b = balance(&base, &customer).await?;
        let grants = b["grants"].as_array()?;
        let has = |id: &str| grants.iter().any(|g| g["order_id"] == id);
        (has(&order) && has(&overtaken) && has(&fence)).then_some(b)
    })
    .await;
    assert_eq!(
        account["balance"],
        125 + 1,
        "125.99 earns 125 once, the overtaken order nothing, the fence 1: {account}"
    );
    let grants = account["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 3, "{account}");
    let of = |id: &str| grants.iter().find(|g| g["order_id"] == id).unwrap().clone();
    assert_eq!((of(&order)["points"].as_i64(), of(&order)["revoked_at"].is_null()), (Some(125), true));
    assert_eq!((of(&overtaken)["points"].as_i64(), of(&overtaken)["revoked_at"].is_null()), (Some(0), false));
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM inbox").await, 5, "four distinct messages and the fence");

    // Published through the outbox and the relay: one grant per order.
    let mut granted = Vec::new();
    for _ in 0..2 {
        let env = next(&channel, &probe_queue).await;
        assert_eq!(env.event_type, PointsGranted::EVENT_TYPE);
        granted.push(env.decode::<PointsGranted>().unwrap());
    }
    // In the order written for the customer: whichever of the two batches
    // committed first (they run side by side) is published first, and each
    // event carries the balance after it.
    let seen: Vec<_> = granted.iter().map(|g| (g.order_id.as_str(), g.points, g.balance)).collect();
    let in_order = [(order.as_str(), 125, 125), (fence.as_str(), 1, 126)];
    let fence_first = [(fence.as_str(), 1, 1), (order.as_str(), 125, 126)];
    assert!(seen == in_order || seen == fence_first, "in the order written for the customer: {seen:?}");

    // Cancelled, twice: revoked once.
    let cancel = cancelled(&order, &customer);
    broker.publish(&channel, &cancel).await;
    broker.publish(&channel, &cancel).await;
    let revoked = next(&channel, &probe_queue).await.decode::<PointsRevoked>().unwrap();
    assert_eq!((revoked.order_id.as_str(), revoked.points, revoked.balance), (order.as_str(), 125, 1));
    eventually("the balance is back to the fence's point", DEADLINE, || async {
        balance(&base, &customer).await.is_some_and(|b| b["balance"] == 1)
    })
    .await;
    // Nothing else was published: every row the service wrote is gone (published).
    eventually("the outbox is drained", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox").await == 0
    })
    .await;
    assert!(channel.basic_get(probe_queue.as_str().into(), BasicGetOptions::default()).await.unwrap().is_none());

    // An unknown customer is a problem+json 404.
    let r = reqwest::get(format!("{base}/customers/nobody/points")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    shutdown.cancel();
    running.await.unwrap().unwrap();
    relay.await.unwrap();
}
