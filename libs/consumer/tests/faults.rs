//! The consumer runtime meeting real faults (issue 11): unroutable forwards,
//! rows locked past the handler timeout, repeated broker cuts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{DEADLINE, Scripted, create_products, declined, drain};
use diesel_async::RunQueryDsl;
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::options::QueueDeleteOptions;
use orderflow_consumer::{ConsumerConfig, run};
use orderflow_testkit::{FaultProxy, TestBroker, TestDb, count, eventually};
use tokio_util::sync::CancellationToken;

fn spec(retry_delays: &[u64], delivery_limit: u32) -> QueueSpec {
    QueueSpec {
        consumer: "faulty".into(),
        bindings: vec!["test.noted".into()],
        retry_delays: retry_delays.iter().map(|ms| Duration::from_millis(*ms)).collect(),
        delivery_limit,
    }
}

/// Issue 11 #1: with many forwards in flight, the broker merges confirms and
/// the client pairs returns with whichever confirm completes first. A dead
/// letter whose queue is missing must be requeued (never acked as if it had
/// been parked), and a retry that was routed must not be requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_forwards_are_matched_to_their_own_messages() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let spec = spec(&[50], 100_000);
    broker.track(&spec);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();

    let handler = Scripted::default();
    let shutdown = CancellationToken::new();
    let mut cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), spec.clone());
    cfg.concurrency = 128;
    let connected = cfg.connected.clone();
    let task = tokio::spawn(run(cfg, db.pool.clone(), handler.clone(), shutdown.clone()));
    eventually("consuming", DEADLINE, || async { AtomicBool::load(&connected, Ordering::Relaxed) }).await;
    // The dead-letter queue disappears under the running consumer: every
    // dead letter is unroutable.
    let dlq = broker.topology.dead_letter_queue(&spec.consumer);
    channel.queue_delete(dlq.as_str().into(), QueueDeleteOptions::default()).await.unwrap();

    let mut dead = HashSet::new();
    let mut retried = Vec::new();
    // Fewer dead letters than the prefetch: requeued, they come straight
    // back, so they loop while the retries flow past them.
    for i in 0..1100 {
        let env = declined(if i % 11 == 0 { "permanent" } else { "transient:1" });
        if i % 11 == 0 {
            dead.insert(env.message_id.to_string());
        } else {
            retried.push(env.message_id);
        }
        broker.publish(&channel, &env).await;
    }
    // Every retry is handled while every dead letter meets the missing
    // queue again and again: many forwards in flight, routed and returned.
    // A dead letter acked as if parked is never delivered again: it would
    // stay below three tries.
    eventually(
        "every retry handled, every dead letter tried thrice (none acked while unroutable)",
        DEADLINE,
        || async {
            let n = count(&db.pool, "SELECT count(*) AS n FROM inbox").await;
            let few = dead.iter().filter(|id| handler.calls(id.parse().unwrap()) < 3).count();
            n == retried.len() as i64 && few == 0
        },
    )
    .await;
    // The queue comes back (declaring the consumer again recreates it).
    let (_conn2, channel2) = broker.channel().await;
    broker.topology.declare_consumer(&channel2, &spec).await.unwrap();
    let parked = RefCell::new(HashSet::new());
    eventually("every dead letter parked, every retry handled", DEADLINE, || async {
        let more = drain(&channel2, &dlq).await;
        parked.borrow_mut().extend(more);
        count(&db.pool, "SELECT count(*) AS n FROM inbox").await == retried.len() as i64
            && parked.borrow().len() >= dead.len()
    })
    .await;
    assert_eq!(parked.into_inner(), dead, "exactly the dead letters are parked, none lost");
    shutdown.cancel();
    task.await.unwrap();
}

/// Issue 11 #5: a row held locked by another session makes the handler wait
/// past its timeout. The wait is bounded on the server (no session is left
/// behind waiting for the lock), the timeout counts as a transient failure,
/// and after the retry tiers the message is parked with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocked_by_a_lock_times_out_on_the_server_and_is_parked() {
    let db = TestDb::new(None).await;
    create_products(&db.pool).await;
    let broker = TestBroker::new().await;
    let spec = spec(&[100, 200], 100);
    broker.track(&spec);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();

    // Another session holds the row for the whole test.
    let mut locker = orderflow_db::establish(&db.url).await.unwrap();
    diesel::sql_query("BEGIN").execute(&mut locker).await.unwrap();
    diesel::sql_query("SELECT * FROM products WHERE sku = 'hot' FOR UPDATE").execute(&mut locker).await.unwrap();

    let concurrency = 2;
    let handler = Scripted::default();
    let shutdown = CancellationToken::new();
    let mut cfg = ConsumerConfig::new(broker.amqp_url.clone(), broker.topology.clone(), spec.clone());
    cfg.concurrency = concurrency;
    cfg.handler_timeout = Duration::from_secs(1);
    let task = tokio::spawn(run(cfg, db.pool.clone(), handler.clone(), shutdown.clone()));

    let blocked: Vec<_> = (0..3).map(|_| declined("lock")).collect();
    for env in &blocked {
        broker.publish(&channel, env).await;
    }
    let waiting = format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        db.name
    );
    let dlq = broker.topology.dead_letter_queue(&spec.consumer);
    let parked = RefCell::new(Vec::new());
    let most_waiting = Cell::new(0);
    eventually("the blocked messages parked in the DLQ", DEADLINE, || async {
        let now = count(&db.pool, &waiting).await;
        most_waiting.set(most_waiting.get().max(now));
        assert!(
            now <= concurrency as i64,
            "{now} sessions wait for the lock, more than the consumer's concurrency {concurrency}"
        );
        let more = drain(&channel, &dlq).await;
        parked.borrow_mut().extend(more);
        parked.borrow().len() >= blocked.len()
    })
    .await;
    for env in &blocked {
        assert_eq!(handler.calls(env.message_id), 3, "initial try plus two retry tiers");
    }
    assert!(most_waiting.get() >= 1, "the test met the lock");
    // Nothing is left waiting once the messages are parked.
    eventually("no session left waiting for the lock", DEADLINE, || async { count(&db.pool, &waiting).await == 0 })
        .await;
    drop(locker);
    shutdown.cancel();
    task.await.unwrap();
}

/// Issue 11 #6: after a few broker blips the reconnect backoff has grown;
/// once the consumer has been healthy for a while, the next blip costs a
/// short wait again, not the grown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_backoff_resets_after_a_healthy_period() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let spec = spec(&[100], 100);
    broker.track(&spec);
    let proxy = FaultProxy::for_url(&broker.amqp_url).await;
    let shutdown = CancellationToken::new();
    let mut cfg = ConsumerConfig::new(proxy.url_through(&broker.amqp_url), broker.topology.clone(), spec.clone());
    cfg.reconnect_max = Duration::from_secs(60);
    cfg.reconnect_reset_after = Duration::from_secs(1);
    let connected = cfg.connected.clone();
    let task = tokio::spawn(run(cfg, db.pool.clone(), Scripted::default(), shutdown.clone()));
    let is_up = || async { AtomicBool::load(&connected, Ordering::Relaxed) };
    let is_down = || async { !AtomicBool::load(&connected, Ordering::Relaxed) };

    eventually("connected", DEADLINE, is_up).await;
    // Six quick blips: the backoff grows (100 ms doubling: 6.4 s next).
    for _ in 0..6 {
        proxy.cut();
        eventually("the cut noticed", DEADLINE, is_down).await;
        proxy.restore();
        eventually("reconnected", DEADLINE, is_up).await;
    }
    // A healthy period longer than the reset threshold (the fault's own
    // duration, not a wait for a condition).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.cut();
    eventually("the cut noticed", DEADLINE, is_down).await;
    proxy.restore();
    let started = Instant::now();
    // Un-reset, the wait would be at least 3.2 s (6.4 s, jittered by half).
    eventually("reconnected soon after a healthy period", Duration::from_millis(2500), is_up).await;
    tracing::info!(took = ?started.elapsed(), "reconnected");
    shutdown.cancel();
    task.await.unwrap();
}
