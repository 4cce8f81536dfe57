//! Batches: several deliveries in one transaction, one savepoint each, one
//! commit, acks after it (issue 10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{DEADLINE, declined, drain, exec};
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use orderflow_broker::QueueSpec;
use orderflow_broker::header_str;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_consumer::{ConsumerConfig, Handler, HandlerError, Incoming, headers, run};
use orderflow_db::Conn;
use orderflow_envelope::Envelope;
use orderflow_testkit::events::Noted;
use orderflow_testkit::{FaultProxy, TestBroker, TestDb, count, eventually, eventually_some};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Writes one `effects` row per call (with the id of the transaction that
/// wrote it), then behaves as the reason says: `permanent` fails for good,
/// `gate` waits for the test's go-ahead, `v<n>` applies version n of its
/// aggregate (order id) only after version n-1, anything else succeeds.
#[derive(Clone)]
struct Recorder {
    calls: Arc<Mutex<HashMap<Uuid, u32>>>,
    entered: Arc<Notify>,
    release: Arc<Semaphore>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self { calls: Arc::default(), entered: Arc::default(), release: Arc::new(Semaphore::new(0)) }
    }
}

impl Recorder {
    fn calls(&self, id: Uuid) -> u32 {
        self.calls.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
}

impl Handler for Recorder {
    type Event = Noted;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Noted>) -> Result<(), HandlerError> {
        let ev = msg.event;
        *self.calls.lock().unwrap().entry(msg.envelope.message_id).or_default() += 1;
        diesel::sql_query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind::<SqlUuid, _>(msg.envelope.message_id)
            .execute(conn)
            .await?;
        if ev.note == "permanent" {
            return Err(HandlerError::Permanent("poisoned".into()));
        }
        if let Some(ms) = ev.note.strip_prefix("sleep:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        if ev.note.starts_with("flaky") && self.calls(msg.envelope.message_id) == 1 {
            return Err(HandlerError::Transient("flaky the first time".into()));
        }
        if ev.note == "gate" {
            self.entered.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        if let Some(rows) = ev.note.strip_prefix("rows:") {
            // Updates the rows in the order given, pausing after the first
            // so that a transaction taking them the other way round meets
            // this one in a deadlock.
            for (k, row) in rows.split(',').enumerate() {
                diesel::sql_query("UPDATE counters SET n = n + 1 WHERE id = $1")
                    .bind::<Text, _>(row)
                    .execute(conn)
                    .await?;
                if k == 0 {
                    diesel::sql_query("SELECT pg_sleep(0.3)").execute(conn).await?;
                }
            }
        }
        if let Some(version) = ev.note.strip_prefix('v') {
            let version: i64 = version.parse().unwrap();
            let agg = ev.key.to_string();
            let moved = diesel::sql_query("UPDATE aggs SET version = $2 WHERE id = $1 AND version = $2 - 1")
                .bind::<Text, _>(&agg)
                .bind::<BigInt, _>(version)
                .execute(conn)
                .await?;
            if moved == 1 {
                diesel::sql_query("INSERT INTO applied (agg, version) VALUES ($1, $2)")
                    .bind::<Text, _>(&agg)
                    .bind::<BigInt, _>(version)
                    .execute(conn)
                    .await?;
            } else {
                #[derive(diesel::QueryableByName)]
                struct V {
                    #[diesel(sql_type = BigInt)]
                    version: i64,
                }
                let current: V = diesel::sql_query("SELECT version FROM aggs WHERE id = $1")
                    .bind::<Text, _>(&agg)
                    .get_result(conn)
                    .await?;
                if current.version < version {
                    return Err(HandlerError::Conflict(format!("{agg} is at {}, {version} is early", current.version)));
                }
            }
        }
        Ok(())
    }

    /// Leaves out every `busy` message, as a handler does whose rows another
    /// transaction holds.
    async fn prepare(&self, _conn: &mut Conn, batch: &[&Noted]) -> diesel::QueryResult<Vec<bool>> {
        Ok(batch.iter().map(|e| e.note != "busy").collect())
    }
}

struct Setup {
    db: TestDb,
    broker: TestBroker,
    spec: QueueSpec,
    channel: orderflow_broker::lapin::Channel,
    _conn: orderflow_broker::lapin::Connection,
}

async fn setup(retry_delays: &[u64]) -> Setup {
    let db = TestDb::new(None).await;
    exec(&db.pool, "CREATE TABLE effects (id BIGSERIAL PRIMARY KEY, message_id UUID NOT NULL, tx BIGINT NOT NULL DEFAULT txid_current())").await;
    let broker = TestBroker::new().await;
    let spec = QueueSpec {
        consumer: "batched".into(),
        bindings: vec!["test.noted".into()],
        retry_delays: retry_delays.iter().map(|ms| Duration::from_millis(*ms)).collect(),
        delivery_limit: 100,
    };
    broker.track(&spec);
    let (conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    Setup { db, broker, spec, channel, _conn: conn }
}

impl Setup {
    /// A consumer that gathers up to 16 deliveries for up to 300 ms, so that
    /// messages published before it starts form one batch.
    fn config(&self, amqp_url: &str) -> ConsumerConfig {
        let mut cfg = ConsumerConfig::new(amqp_url.to_owned(), self.broker.topology.clone(), self.spec.clone());
        cfg.concurrency = 1;
        cfg.batch_size = 16;
        cfg.batch_linger = Duration::from_millis(300);
        cfg
    }

    async fn ready_in_queue(&self) -> u32 {
        let queue = self.broker.topology.queue(&self.spec.consumer);
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        self.channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.unwrap().message_count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_message_in_a_batch_is_dead_lettered_alone_and_the_rest_commit_once() {
    let s = setup(&[100]).await;
    let good: Vec<_> = (0..9).map(|_| declined("ok")).collect();
    let poisoned = declined("permanent");
    for env in &good[..4] {
        s.broker.publish(&s.channel, env).await;
    }
    s.broker.publish(&s.channel, &poisoned).await;
    for env in &good[4..] {
        s.broker.publish(&s.channel, env).await;
    }
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(s.config(&s.broker.amqp_url), s.db.pool.clone(), handler.clone(), shutdown.clone()));

    let dlq = s.broker.topology.dead_letter_queue(&s.spec.consumer);
    let parked = eventually_some("the poisoned message in the DLQ", DEADLINE, || async {
        let msg = s.channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap()?;
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        Some(msg.delivery.properties.clone())
    })
    .await;
    assert_eq!(parked.message_id().as_ref().map(|m| m.to_string()), Some(poisoned.message_id.to_string()));
    assert!(header_str(&parked, headers::ERROR).unwrap().contains("poisoned"), "{parked:?}");
    eventually("the others handled and acked", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 9 && s.ready_in_queue().await == 0
    })
    .await;
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM effects").await, 9, "the poisoned write rolled back");
    assert_eq!(count(&s.db.pool, "SELECT count(DISTINCT tx) AS n FROM effects").await, 1, "one commit for the batch");
    // The batch ran without savepoints first: the poisoned message rolled it
    // back, and the good ones before it ran once more (their first run was
    // undone); the poisoned one ran once, as it would have in a savepoint.
    for env in &good {
        let calls = handler.calls(env.message_id);
        assert!((1..=2).contains(&calls), "{calls} runs of a good message");
    }
    assert_eq!(handler.calls(poisoned.message_id), 1, "a permanent failure is not retried");
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_inside_one_batch_are_handled_once() {
    let s = setup(&[100]).await;
    let twice = declined("ok");
    let other = declined("ok");
    for env in [&twice, &other, &twice, &twice] {
        s.broker.publish(&s.channel, env).await;
    }
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(s.config(&s.broker.amqp_url), s.db.pool.clone(), handler.clone(), shutdown.clone()));
    eventually("all four deliveries acked", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 2 && s.ready_in_queue().await == 0
    })
    .await;
    assert_eq!(handler.calls(twice.message_id), 1, "duplicates never reach the handler");
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM effects").await, 2);
    assert_eq!(count(&s.db.pool, "SELECT count(DISTINCT tx) AS n FROM effects").await, 1, "one batch");
    shutdown.cancel();
    task.await.unwrap();
}

/// The broker connection dies after the handlers ran but before the batch
/// is acked; its transaction commits anyway. The broker redelivers the whole
/// batch to the reconnected consumer, and the inbox turns every delivery
/// into a duplicate: nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_committed_but_never_acked_is_redelivered_and_deduplicated() {
    let s = setup(&[100]).await;
    let gated = declined("gate");
    let rest: Vec<_> = (0..4).map(|_| declined("ok")).collect();
    s.broker.publish(&s.channel, &gated).await;
    for env in &rest {
        s.broker.publish(&s.channel, env).await;
    }
    let proxy = FaultProxy::for_url(&s.broker.amqp_url).await;
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let cfg = s.config(&proxy.url_through(&s.broker.amqp_url));
    let connected = cfg.connected.clone();
    let task = tokio::spawn(run(cfg, s.db.pool.clone(), handler.clone(), shutdown.clone()));

    // The batch is in its transaction; the broker connection goes.
    tokio::time::timeout(DEADLINE, handler.entered.notified()).await.unwrap();
    proxy.cut();
    eventually("the broker connection closed", DEADLINE, || async { proxy.open_connections() == 0 }).await;
    // Now the batch commits; its acks cannot reach the broker.
    handler.release.add_permits(100);
    eventually("the batch committed", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 5
    })
    .await;
    proxy.restore();
    eventually("redelivered and acked as duplicates", DEADLINE, || async {
        AtomicBool::load(&connected, Ordering::Relaxed) && s.ready_in_queue().await == 0 && {
            let (_c, probe) = s.broker.channel().await;
            // Nothing unacked either: a fresh consumer would get nothing.
            probe
                .basic_get(s.broker.topology.queue(&s.spec.consumer).as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
                .is_none()
        }
    })
    .await;
    for env in std::iter::once(&gated).chain(&rest) {
        assert_eq!(handler.calls(env.message_id), 1, "applied once");
    }
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM effects").await, 5);
    shutdown.cancel();
    task.await.unwrap();
}

/// Acks are merged (one `multiple` ack for the settled deliveries that lead
/// the unsettled ones). Batches of one channel that finish out of order,
/// with messages forwarded to a retry tier in between, must still settle
/// every delivery once: none acked before it is handled (it would be lost),
/// none left unacked (it would come back when the consumer stops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_finishing_out_of_order_settle_every_delivery_once() {
    let s = setup(&[50]).await;
    let sent: Vec<Envelope> = (0..48u64)
        .map(|k| if k % 8 == 5 { declined("flaky") } else { declined(&format!("sleep:{}", (k * 37) % 40)) })
        .collect();
    for env in &sent {
        s.broker.publish(&s.channel, env).await;
    }
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let mut cfg = s.config(&s.broker.amqp_url);
    cfg.concurrency = 4;
    cfg.batch_size = 3;
    cfg.batch_linger = Duration::ZERO;
    // An ack the broker refuses (a tag acked twice) closes the channel: the
    // consumer would reconnect, and the redeliveries hide it otherwise.
    let connected = cfg.connected.clone();
    let dropped = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (connected, dropped) = (connected.clone(), dropped.clone());
        tokio::spawn(async move {
            let mut was = false;
            loop {
                let now = AtomicBool::load(&connected, Ordering::Relaxed);
                if was && !now {
                    dropped.store(true, Ordering::Relaxed);
                }
                was = now;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let task = tokio::spawn(run(cfg, s.db.pool.clone(), handler.clone(), shutdown.clone()));
    eventually("every message handled", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 48
    })
    .await;
    eventually("every delivery settled", DEADLINE, || async { s.ready_in_queue().await == 0 }).await;
    watcher.abort();
    assert!(
        !AtomicBool::load(&dropped, Ordering::Relaxed),
        "the channel closed under the consumer (an ack it refused)"
    );
    // Stopping closes the channel: anything left unacked goes back to the queue.
    shutdown.cancel();
    task.await.unwrap();
    let (_c, probe) = s.broker.channel().await;
    let queue = s.broker.topology.queue(&s.spec.consumer);
    let left = probe.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap();
    assert!(left.is_none(), "a delivery was never acked");
    assert_eq!(s.ready_in_queue().await, 0);
    // A flaky message rolls its batch back (no savepoints at first): the
    // others in it run again, but only one run of each is committed.
    for (k, env) in sent.iter().enumerate() {
        let calls = handler.calls(env.message_id);
        assert!((1..=3).contains(&calls), "message {k}: {calls} runs");
    }
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM effects").await, 48, "each applied once");
}

/// Versions of each aggregate arrive in order but are handled by
/// concurrent batches; a version that comes early conflicts and goes again.
/// Every aggregate ends at its last version with each version applied
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_aggregate_order_holds_for_a_version_checking_handler() {
    let s = setup(&[50, 100, 200, 400]).await;
    exec(&s.db.pool, "CREATE TABLE aggs (id TEXT PRIMARY KEY, version BIGINT NOT NULL)").await;
    exec(
        &s.db.pool,
        "CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, agg TEXT NOT NULL, version BIGINT NOT NULL, UNIQUE (agg, version))",
    )
    .await;
    let aggregates: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for agg in &aggregates {
        exec(&s.db.pool, &format!("INSERT INTO aggs VALUES ('{agg}', 0)")).await;
    }
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let mut cfg = s.config(&s.broker.amqp_url);
    cfg.concurrency = 4;
    cfg.batch_size = 8;
    cfg.batch_linger = Duration::ZERO;
    let task = tokio::spawn(run(cfg, s.db.pool.clone(), handler.clone(), shutdown.clone()));
    for version in 1..=10 {
        for (k, agg) in aggregates.iter().enumerate() {
            let mut env = declined(&format!("v{version}"));
            env.payload["key"] = serde_json::json!(agg);
            s.broker.publish(&s.channel, &env).await;
            if (k + version) % 7 == 0 {
                // A duplicate delivery now and then.
                s.broker.publish(&s.channel, &env).await;
            }
        }
    }
    eventually("every aggregate at version 10", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM aggs WHERE version = 10").await == 20
    })
    .await;
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM applied").await, 200, "each version applied once");
    let out_of_order = count(
        &s.db.pool,
        "SELECT count(*) AS n FROM (SELECT version, lag(version) OVER (PARTITION BY agg ORDER BY seq) AS before \
         FROM applied) v WHERE before IS NOT NULL AND version <> before + 1",
    )
    .await;
    assert_eq!(out_of_order, 0, "versions applied in order");
    let dlq = s.broker.topology.dead_letter_queue(&s.spec.consumer);
    assert!(drain(&s.channel, &dlq).await.is_empty(), "nothing dead-lettered");
    shutdown.cancel();
    task.await.unwrap();
}

/// Two concurrent batches take the same rows in opposite orders: PostgreSQL
/// breaks the deadlock by failing one statement; that message is rolled
/// back to its savepoint and goes again once the other batch committed.
/// Each message is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_between_batches_is_retried_and_applied_once() {
    let s = setup(&[100, 200]).await;
    exec(&s.db.pool, "CREATE TABLE counters (id TEXT PRIMARY KEY, n INT NOT NULL)").await;
    exec(&s.db.pool, "INSERT INTO counters VALUES ('a', 0), ('b', 0)").await;
    let deadlocks = format!("SELECT deadlocks AS n FROM pg_stat_database WHERE datname = '{}'", s.db.name);
    let before = count(&s.db.pool, &deadlocks).await;
    let forward = declined("rows:a,b");
    let backward = declined("rows:b,a");
    s.broker.publish(&s.channel, &forward).await;
    s.broker.publish(&s.channel, &backward).await;
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let mut cfg = s.config(&s.broker.amqp_url);
    // One message per batch, two batches at once.
    cfg.concurrency = 2;
    cfg.batch_size = 1;
    cfg.batch_linger = Duration::ZERO;
    let task = tokio::spawn(run(cfg, s.db.pool.clone(), handler.clone(), shutdown.clone()));
    eventually("both handled", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 2 && s.ready_in_queue().await == 0
    })
    .await;
    assert_eq!(count(&s.db.pool, "SELECT sum(n)::bigint AS n FROM counters").await, 4, "each message applied once");
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM counters WHERE n = 2").await, 2);
    // The statistics collector reports with a delay.
    eventually("the deadlock was met", DEADLINE, || async { count(&s.db.pool, &deadlocks).await > before }).await;
    assert!(handler.calls(forward.message_id) + handler.calls(backward.message_id) >= 3, "one of them went again");
    let dlq = s.broker.topology.dead_letter_queue(&s.spec.consumer);
    assert!(drain(&s.channel, &dlq).await.is_empty(), "nothing dead-lettered");
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_prepare_leaves_out_goes_later_and_alone_the_rest_commit_at_once() {
    let s = setup(&[100]).await;
    let good: Vec<_> = (0..5).map(|_| declined("ok")).collect();
    let busy = declined("busy");
    s.broker.publish(&s.channel, &good[0]).await;
    s.broker.publish(&s.channel, &busy).await;
    for env in &good[1..] {
        s.broker.publish(&s.channel, env).await;
    }
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(s.config(&s.broker.amqp_url), s.db.pool.clone(), handler.clone(), shutdown.clone()));

    eventually("every message handled and acked", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 6 && s.ready_in_queue().await == 0
    })
    .await;
    // The five others in one commit; the left-out one in a later one of its
    // own, once prepare had passed it over DEFER_LIMIT times.
    assert_eq!(count(&s.db.pool, "SELECT count(DISTINCT tx) AS n FROM effects").await, 2);
    let busy_tx = format!("SELECT count(*) AS n FROM effects WHERE message_id = '{}'", busy.message_id);
    assert_eq!(count(&s.db.pool, &busy_tx).await, 1);
    for env in good.iter().chain([&busy]) {
        assert_eq!(handler.calls(env.message_id), 1, "handled once, never rolled back");
    }
    let dlq = s.broker.topology.dead_letter_queue(&s.spec.consumer);
    assert!(s.channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap().is_none());
    shutdown.cancel();
    task.await.unwrap();
}

/// Below saturation one transaction per consumer is in flight: what arrives
/// while a batch runs waits for it and goes in the next one together,
/// instead of a small transaction of its own beside it (which contends with
/// it for rows, connections and CPU). With concurrency 4, three messages
/// published one after another while a gated batch is in flight are not
/// handled beside it, and go in one transaction after it. (The broker counts
/// a message as delivered a moment before the consumer has it, so a round
/// whose last message reached the consumer only after the gated batch ended
/// is run again; the old runtime started a batch per arrival, never one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_arrives_while_a_batch_runs_waits_for_it_and_goes_in_one_transaction() {
    let s = setup(&[]).await;
    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let mut cfg = s.config(&s.broker.amqp_url);
    cfg.concurrency = 4;
    cfg.batch_linger = Duration::ZERO;
    // Far longer than the test: only the gated batch's end may start the next.
    cfg.batch_busy_wait = Duration::from_secs(120);
    let task = tokio::spawn(run(cfg, s.db.pool.clone(), handler.clone(), shutdown.clone()));
    let mut handled = 0;
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let gate = declined("gate");
        let entered = handler.entered.notified();
        s.broker.publish(&s.channel, &gate).await;
        tokio::time::timeout(DEADLINE, entered).await.expect("the gated message is handled");
        let later: Vec<Envelope> = (0..3).map(|_| declined("later")).collect();
        for env in &later {
            s.broker.publish(&s.channel, env).await;
        }
        eventually("the later messages delivered", DEADLINE, || async { s.ready_in_queue().await == 0 }).await;
        for env in &later {
            assert_eq!(handler.calls(env.message_id), 0, "handled while the gated batch was in flight");
        }
        handler.release.add_permits(1);
        handled += 4;
        eventually("every message handled", DEADLINE, || async {
            count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == handled
        })
        .await;
        let ids = later.iter().map(|e| format!("'{}'", e.message_id)).collect::<Vec<_>>().join(",");
        let txs =
            count(&s.db.pool, &format!("SELECT count(DISTINCT tx) AS n FROM effects WHERE message_id IN ({ids})"))
                .await;
        rounds.push(txs);
        if txs == 1 {
            break;
        }
    }
    assert_eq!(rounds.last(), Some(&1), "transactions of the later messages, per round: {rounds:?}");
    shutdown.cancel();
    task.await.unwrap();
}

/// Every message needs the one hot row: `prepare` takes it without waiting
/// (or leaves the whole batch for later), the handler moves it and holds it
/// a moment, as inventory and shipping do with the stock of a few hot
/// products.
#[derive(Clone, Default)]
struct HotRow;

impl Handler for HotRow {
    type Event = Noted;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Noted>) -> Result<(), HandlerError> {
        diesel::sql_query("UPDATE hot SET n = n + 1 WHERE id = 1").execute(conn).await?;
        diesel::sql_query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind::<SqlUuid, _>(msg.envelope.message_id)
            .execute(conn)
            .await?;
        diesel::sql_query("SELECT pg_sleep(0.002)").execute(conn).await?;
        Ok(())
    }

    async fn prepare(&self, conn: &mut Conn, batch: &[&Noted]) -> diesel::QueryResult<Vec<bool>> {
        #[derive(diesel::QueryableByName)]
        struct Got {
            #[diesel(sql_type = BigInt)]
            #[allow(dead_code)]
            id: i64,
        }
        let got: Vec<Got> =
            diesel::sql_query("SELECT id FROM hot WHERE id = 1 FOR UPDATE SKIP LOCKED").load(conn).await?;
        Ok(vec![!got.is_empty(); batch.len()])
    }
}

/// A backlog on one hot row, handled by 8 batches at a time: every batch
/// but the row's holder is passed over again and again. The old runtime let
/// each such message go alone after `DEFER_LIMIT` passes, a transaction per
/// message waiting for the row (on 3 hot products the pipeline completed
/// 0.41 of the spread case, with twice the transactions per order). Now,
/// once messages starve, the consumer's batches take turns and go whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_meeting_on_a_hot_row_take_turns_instead_of_going_a_message_at_a_time() {
    let s = setup(&[]).await;
    exec(&s.db.pool, "CREATE TABLE hot (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)").await;
    exec(&s.db.pool, "INSERT INTO hot VALUES (1, 0)").await;
    const N: i64 = 600;
    for _ in 0..N {
        s.broker.publish(&s.channel, &declined("hot")).await;
    }
    let shutdown = CancellationToken::new();
    let mut cfg = s.config(&s.broker.amqp_url);
    cfg.concurrency = 8;
    cfg.batch_size = 16;
    cfg.batch_linger = Duration::ZERO;
    let task = tokio::spawn(run(cfg, s.db.pool.clone(), HotRow, shutdown.clone()));
    eventually("every message handled and acked", Duration::from_secs(180), || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == N && s.ready_in_queue().await == 0
    })
    .await;
    assert_eq!(count(&s.db.pool, "SELECT count(DISTINCT message_id) AS n FROM effects").await, N);
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM effects").await, N, "each applied once");
    assert_eq!(count(&s.db.pool, "SELECT n FROM hot").await, N);
    let alone =
        count(&s.db.pool, "SELECT count(*) AS n FROM (SELECT tx FROM effects GROUP BY tx HAVING count(*) = 1) t").await;
    let txs = count(&s.db.pool, "SELECT count(DISTINCT tx) AS n FROM effects").await;
    eprintln!("{alone} of {N} messages went alone; {txs} transactions");
    // Going alone is what shows the contention (10 within a second): a few
    // dozen at most, where the old runtime sent most of the backlog alone.
    assert!(alone <= N / 10, "{alone} of {N} messages went alone ({txs} transactions)");
    shutdown.cancel();
    task.await.unwrap();
}
