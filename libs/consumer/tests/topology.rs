//! The consumer's broker topology over time: dead letters survive
//! inspection, and changed retry settings do not brick a consumer (issue 11
//! #10, #11).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{DEADLINE, Scripted, declined};
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use orderflow_broker::properties_for;
use orderflow_consumer::{ConsumerConfig, run};
use orderflow_testkit::{TestBroker, TestDb, count, eventually};
use tokio_util::sync::CancellationToken;

fn spec(retry_delays: &[u64], delivery_limit: u32) -> QueueSpec {
    QueueSpec {
        consumer: "topo".into(),
        bindings: vec!["test.noted".into()],
        retry_delays: retry_delays.iter().map(|ms| Duration::from_millis(*ms)).collect(),
        delivery_limit,
    }
}

/// Issue 11 #10: `dlq show` takes messages and gives them back. On RabbitMQ
/// 4.x a quorum queue without a delivery limit gets the default of 20 and
/// drops a message given back more often; the dead-letter queue is declared
/// with an explicit, practically unlimited one, so 50 inspections leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_survives_fifty_inspections() {
    let broker = TestBroker::new().await;
    let spec = spec(&[100], 5);
    broker.track(&spec);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    let dlq = broker.topology.dead_letter_queue(&spec.consumer);
    let env = declined("permanent");
    channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            BasicPublishOptions::default(),
            &env.to_vec(),
            properties_for(&env),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // The queue carries its own limit, whatever the broker's default: a
    // declaration with exactly these arguments is accepted only if it is
    // equivalent to the existing queue.
    let (_c2, probe) = broker.channel().await;
    orderflow_broker::Topology::declare_dead_letter_queue(&probe, &dlq).await.unwrap();

    for i in 0..50 {
        let got = eventually_get(&channel, &dlq).await;
        assert_eq!(
            got.delivery.properties.message_id().as_ref().map(|m| m.to_string()),
            Some(env.message_id.to_string()),
            "inspection {i}"
        );
        // Given back, as `dlq show` does.
        got.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    }
    let last = eventually_get(&channel, &dlq).await;
    assert_eq!(last.delivery.properties.message_id().as_ref().map(|m| m.to_string()), Some(env.message_id.to_string()));
}

async fn eventually_get(
    channel: &orderflow_broker::lapin::Channel,
    queue: &str,
) -> orderflow_broker::lapin::message::BasicGetMessage {
    orderflow_testkit::eventually_some("the dead letter", DEADLINE, || async {
        channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap()
    })
    .await
}

/// Issue 11 #11: retry delays changed between releases. The delay queues are
/// named by their delay, so the consumer starts on a broker that has the
/// old ones, and a retry goes through the new tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_retry_delays_need_no_migration() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let old = spec(&[100, 200], 5);
    let new = spec(&[300], 5);
    broker.track(&old);
    broker.track(&new);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &old).await.unwrap();

    let handler = Scripted::default();
    let shutdown = CancellationToken::new();
    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), new);
    let connected = cfg.connected.clone();
    let task = tokio::spawn(run(cfg, db.pool.clone(), handler.clone(), shutdown.clone()));
    eventually("consuming with the new retry delays", DEADLINE, || async {
        AtomicBool::load(&connected, Ordering::Relaxed)
    })
    .await;
    let env = declined("transient:1");
    broker.publish(&channel, &env).await;
    eventually("handled after one retry", DEADLINE, || async {
        handler.calls(env.message_id) == 2 && count(&db.pool, "SELECT count(*) AS n FROM inbox").await == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
}

/// Issue 11 #11: the delivery limit is an argument of the work queue, which
/// cannot change in place. The consumer stops (instead of retrying the
/// declaration forever) with one line naming the queue, the setting and how
/// to migrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_delivery_limit_fails_with_one_line_saying_how_to_migrate() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let old = spec(&[100], 5);
    let new = spec(&[100], 7);
    broker.track(&old);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &old).await.unwrap();

    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), new);
    let err = orderflow_consumer::prepare(&cfg).await.expect_err("a changed delivery limit is refused");
    let line = err.to_string();
    let queue = broker.topology.queue("topo");
    assert!(!line.contains('\n'), "one line: {line}");
    for part in [
        queue.as_str(),
        "x-delivery-limit = 5 ",
        "declares 7 ",
        "CONSUMER_DELIVERY_LIMIT=5",
        "rabbitmqctl delete_queue",
    ] {
        assert!(line.contains(part), "{part:?} missing from: {line}");
    }

    // `run` gives up too instead of retrying forever.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, db.pool.clone(), Scripted::default(), shutdown.clone()));
    tokio::time::timeout(DEADLINE, task).await.expect("the consumer stops on a configuration error").unwrap();
}

/// A dead-letter queue declared by an older version (a quorum queue without
/// an explicit delivery limit) is kept and used: upgrading does not stop the
/// consumer (it logs how to migrate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_from_an_older_version_is_kept() {
    use orderflow_broker::lapin::options::QueueDeclareOptions;
    use orderflow_broker::lapin::types::{AMQPValue, FieldTable, LongString};

    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let spec = spec(&[100], 5);
    broker.track(&spec);
    let (_conn, channel) = broker.channel().await;
    let dlq = broker.topology.dead_letter_queue(&spec.consumer);
    let mut old_args = FieldTable::default();
    old_args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    channel
        .queue_declare(dlq.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, old_args)
        .await
        .unwrap();

    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), spec);
    orderflow_consumer::prepare(&cfg).await.expect("an old dead-letter queue does not stop the consumer");
    let handler = Scripted::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, db.pool.clone(), handler.clone(), shutdown.clone()));
    let poisoned = declined("permanent");
    broker.publish(&channel, &poisoned).await;
    let parked = orderflow_testkit::eventually_some("the dead letter in the old DLQ", DEADLINE, || async {
        let msg = channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap()?;
        Some(msg.delivery.properties.message_id().as_ref().map(|m| m.to_string()))
    })
    .await;
    assert_eq!(parked, Some(poisoned.message_id.to_string()));
    shutdown.cancel();
    task.await.unwrap();
}

/// Issue 14: `AMQP_QUORUM_REPLICAS` sets the group size of new quorum
/// queues, an argument the broker compares on every declaration although it
/// only applies at creation. Queues created before it was set (or with
/// another value) are kept as they are; a strict declaration still sees
/// the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_quorum_group_size_keeps_existing_queues() {
    let broker = TestBroker::new().await;
    let spec = spec(&[100, 200], 5);
    broker.track(&spec);
    let (_conn, channel) = broker.channel().await;
    // Created by an older version: no group size.
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();

    let three = broker.topology.clone().with_quorum_replicas(Some(3));
    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), three.clone(), spec.clone());
    orderflow_consumer::prepare(&cfg).await.expect("queues without a group size are kept");
    // Twice: nothing was changed by the first.
    orderflow_consumer::prepare(&cfg).await.expect("and again");

    let (_c2, strict) = broker.channel().await;
    let err = three.declare_consumer(&strict, &spec).await.expect_err("a strict declaration sees the difference");
    assert_eq!(err.argument(), Some(orderflow_broker::QUORUM_GROUP_SIZE), "{err}");

    // New queues get the group size (a single node holds one replica
    // whatever is asked); an existing one with a group size is kept too.
    let other = QueueSpec { consumer: "topo2".into(), ..spec.clone() };
    broker.track(&other);
    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), three.clone(), other.clone());
    orderflow_consumer::prepare(&cfg).await.expect("new queues with a group size");
    let (_c3, strict) = broker.channel().await;
    three.declare_consumer(&strict, &other).await.expect("declared with group size 3");
    let two = broker.topology.clone().with_quorum_replicas(Some(2));
    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), two, other.clone());
    orderflow_consumer::prepare(&cfg).await.expect("a queue of group size 3 is kept under 2");
    let cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), other);
    orderflow_consumer::prepare(&cfg).await.expect("and without a group size");
}
