//! The consumer runtime against real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use orderflow_broker::lapin::{BasicProperties, Channel};
use orderflow_broker::{QueueSpec, header_i64, header_str, properties_for};
use orderflow_consumer::{ConsumerConfig, headers, run};
use orderflow_envelope::Envelope;
use orderflow_testkit::{TestBroker, TestDb, eventually, eventually_some};
use tokio_util::sync::CancellationToken;

mod common;

use common::{DEADLINE, Scripted, declined};

struct Fixture {
    db: TestDb,
    broker: TestBroker,
    channel: Channel,
    _conn: orderflow_broker::lapin::Connection,
    handler: Scripted,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Fixture {
    async fn start() -> Self {
        let db = TestDb::new(None).await;
        let broker = TestBroker::new().await;
        let spec = QueueSpec {
            consumer: "scripted".into(),
            bindings: vec!["test.noted".into()],
            retry_delays: vec![Duration::from_millis(100), Duration::from_millis(200)],
            delivery_limit: 5,
        };
        broker.track(&spec);
        let (conn, channel) = broker.channel().await;
        broker.topology.declare_consumer(&channel, &spec).await.unwrap();
        let handler = Scripted::default();
        let shutdown = CancellationToken::new();
        let cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), spec);
        let task = tokio::spawn(run(cfg, db.pool.clone(), handler.clone(), shutdown.clone()));
        Self { db, broker, channel, _conn: conn, handler, shutdown, task }
    }

    async fn publish(&self, env: &Envelope) {
        self.publish_raw(&env.to_vec(), properties_for(env), &env.event_type).await;
    }

    async fn publish_raw(&self, body: &[u8], props: BasicProperties, key: &str) {
        self.channel
            .basic_publish(
                self.broker.topology.events_exchange().as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
    }

    async fn inbox_rows(&self) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.db.pool.get().await.unwrap();
        diesel_async::RunQueryDsl::get_result::<N>(diesel::sql_query("SELECT count(*) AS n FROM inbox"), &mut conn)
            .await
            .unwrap()
            .n
    }

    async fn next_dead_letter(&self) -> BasicProperties {
        let dlq = self.broker.topology.dead_letter_queue("scripted");
        eventually_some("a message in the DLQ", DEADLINE, || async {
            let msg = self.channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap()?;
            msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
            Some(msg.delivery.properties.clone())
        })
        .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_is_handled_once() {
    let f = Fixture::start().await;
    let env = declined("ok");
    f.publish(&env).await;
    f.publish(&env).await;
    let marker = declined("ok");
    f.publish(&marker).await;
    eventually("both copies and the marker consumed", DEADLINE, || async {
        f.handler.calls(marker.message_id) == 1 && f.inbox_rows().await == 2
    })
    .await;
    assert_eq!(f.handler.calls(env.message_id), 1, "the duplicate never reaches the handler");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_with_the_reason_and_the_rest_flows() {
    let f = Fixture::start().await;
    f.publish_raw(b"{not json", BasicProperties::default(), "test.noted").await;
    let props = f.next_dead_letter().await;
    let reason = header_str(&props, headers::ERROR).unwrap();
    assert!(reason.contains("malformed envelope"), "{reason}");
    assert_eq!(header_str(&props, headers::CONSUMER).as_deref(), Some("scripted"));
    assert_eq!(header_str(&props, headers::ORIGINAL_ROUTING_KEY).as_deref(), Some("test.noted"));

    let mut future = declined("ok");
    future.schema_version = orderflow_envelope::SchemaVersion::new(9, 0);
    f.publish(&future).await;
    let props = f.next_dead_letter().await;
    assert!(header_str(&props, headers::ERROR).unwrap().contains("unsupported schema version 9.0"));

    let good = declined("ok");
    f.publish(&good).await;
    eventually("the good message handled", DEADLINE, || async { f.handler.calls(good.message_id) == 1 }).await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_through_delay_queues_then_succeed_once() {
    let f = Fixture::start().await;
    let env = declined("transient:2");
    f.publish(&env).await;
    eventually("handled on the third attempt", DEADLINE, || async {
        f.handler.calls(env.message_id) == 3 && f.inbox_rows().await == 1
    })
    .await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_and_exhausted_failures_are_dead_lettered() {
    let f = Fixture::start().await;
    let permanent = declined("permanent");
    f.publish(&permanent).await;
    let props = f.next_dead_letter().await;
    assert!(header_str(&props, headers::ERROR).unwrap().contains("no way"));
    assert_eq!(f.handler.calls(permanent.message_id), 1, "a permanent error is not retried");

    let hopeless = declined("transient:99");
    f.publish(&hopeless).await;
    let props = f.next_dead_letter().await;
    let reason = header_str(&props, headers::ERROR).unwrap();
    assert!(reason.starts_with("gave up after 3 attempts"), "{reason}");
    assert_eq!(header_i64(&props, headers::ATTEMPT), Some(2));
    assert_eq!(f.handler.calls(hopeless.message_id), 3, "initial try plus two tiers");
    assert_eq!(f.inbox_rows().await, 0, "failed attempts leave no inbox row");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_messages_are_dead_lettered_and_newer_minor_versions_are_handled() {
    let f = Fixture::start().await;
    let mut huge = declined("ok");
    huge.payload["padding"] = serde_json::json!("x".repeat(2 * 1024 * 1024));
    f.publish(&huge).await;
    let props = f.next_dead_letter().await;
    let reason = header_str(&props, headers::ERROR).unwrap();
    assert!(reason.starts_with("message too large"), "{reason}");

    // A producer on a newer minor version added a field: still handled.
    let mut newer = declined("ok");
    newer.schema_version = orderflow_envelope::SchemaVersion::new(1, 4);
    newer.payload["issuer_code"] = serde_json::json!("05");
    f.publish(&newer).await;
    eventually("the newer minor version is handled", DEADLINE, || async { f.handler.calls(newer.message_id) == 1 })
        .await;
    assert_eq!(f.handler.calls(huge.message_id), 0);
    f.stop().await;
}
