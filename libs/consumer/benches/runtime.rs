//! Consumer runtime throughput: messages handled per second by a trivial
//! handler that writes a row and appends an outbox row (one event caused by
//! each message), on this machine's PostgreSQL and RabbitMQ.
//!
//! A backlog of BENCH_MESSAGES (10000) is published to the consumer's queue
//! first; then the consumer starts and the clock runs until every message is
//! in the inbox (and therefore acked or about to be). Each configuration in
//! BENCH_BATCH_SIZES (`1,8,32,64`) gets a fresh database and queue;
//! concurrency is BENCH_CONCURRENCY (8, the default). Run:
//! `cargo bench -p orderflow-consumer --bench runtime`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, missing_docs)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::RunQueryDsl;
use orderflow_broker::QueueSpec;
use orderflow_consumer::{ConsumerConfig, Handler, HandlerError, Incoming, run};
use orderflow_db::Conn;
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::events::Noted;
use orderflow_testkit::{TestBroker, TestDb, count};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct RowAndOutbox;

impl Handler for RowAndOutbox {
    type Event = Noted;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Noted>) -> Result<(), HandlerError> {
        diesel::sql_query("INSERT INTO bench_rows (message_id) VALUES ($1)")
            .bind::<SqlUuid, _>(msg.envelope.message_id)
            .execute(conn)
            .await?;
        let caused = Noted { key: Uuid::now_v7().to_string(), note: "bench".into() };
        orderflow_outbox::emit(conn, &caused, 1, &msg.meta()).await?;
        Ok(())
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn measure(messages: usize, concurrency: usize, batch_size: usize) -> f64 {
    let db = TestDb::new(None).await;
    let mut conn = db.pool.get().await.unwrap();
    diesel::sql_query("CREATE TABLE bench_rows (id BIGSERIAL PRIMARY KEY, message_id UUID NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let broker = TestBroker::new().await;
    let spec = QueueSpec {
        consumer: "bench".into(),
        bindings: vec!["test.noted".into()],
        retry_delays: vec![Duration::from_secs(1)],
        delivery_limit: 20,
    };
    broker.track(&spec);
    let (_c, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    for _ in 0..messages {
        let e = Noted { key: Uuid::now_v7().to_string(), note: "payment declined".into() };
        broker.publish(&channel, &Envelope::new(&e, 1, &Metadata::default()).unwrap()).await;
    }

    let shutdown = CancellationToken::new();
    let mut cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), spec);
    cfg.concurrency = concurrency;
    cfg.batch_size = batch_size; // BATCH
    cfg.waker = orderflow_outbox::Waker::start(&db.url, shutdown.clone());
    let connected = cfg.connected.clone();
    let started = Instant::now();
    let task = tokio::spawn(run(cfg, db.pool.clone(), RowAndOutbox, shutdown.clone()));
    while !std::sync::atomic::AtomicBool::load(&connected, Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let target = messages as i64;
    while count(&db.pool, "SELECT count(*) AS n FROM inbox").await < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM outbox").await, target);
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM bench_rows").await, target);
    shutdown.cancel();
    task.await.unwrap();
    messages as f64 / took.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let messages: usize = env_or("BENCH_MESSAGES", "10000").parse().unwrap();
    let concurrency: usize = env_or("BENCH_CONCURRENCY", "8").parse().unwrap();
    let sizes: Vec<usize> =
        env_or("BENCH_BATCH_SIZES", "1,8,32,64").split(',').map(|s| s.trim().parse().unwrap()).collect();
    println!("consumer runtime: {messages} messages, concurrency {concurrency}, handler = 1 row + 1 outbox row");
    println!("{:>10} {:>14}", "batch", "messages/s");
    for batch in sizes {
        let rate = measure(messages, concurrency, batch).await;
        println!("{batch:>10} {rate:>14.0}");
    }
}
