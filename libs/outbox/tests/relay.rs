//! The relay core against real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions};
use orderflow_broker::lapin::{Channel, Connection};
use orderflow_db::{Conn, Pool};
use orderflow_envelope::{Envelope, Metadata};
use orderflow_outbox::relay::{self, RelayConfig};
use orderflow_testkit::events::{Noted, Tallied};
use orderflow_testkit::{TestBroker, TestDb, count, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

async fn write(pool: &Pool, events: Vec<Envelope>) {
    let mut conn = pool.get().await.unwrap();
    let conn: &mut Conn = &mut conn;
    conn.transaction::<_, diesel::result::Error, _>(async |tx| orderflow_outbox::append(tx, &events).await)
        .await
        .unwrap();
    orderflow_outbox::notify(conn).await.unwrap();
}

fn declined(order: Uuid, version: i64) -> Envelope {
    Envelope::new(&Noted { key: order.to_string(), note: format!("v{version}") }, version, &Metadata::default())
        .unwrap()
}

async fn drain(channel: &Channel, queue: &str) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Some(msg) = channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap() {
        out.push(Envelope::from_slice(&msg.delivery.data).unwrap());
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// Declares queue `probe` bound to `bindings` (deleted when the test ends)
/// and returns a channel to read it with.
async fn probe(broker: &TestBroker, bindings: &[&str]) -> (Connection, Channel) {
    let spec = QueueSpec {
        consumer: "probe".into(),
        bindings: bindings.iter().map(|s| s.to_string()).collect(),
        retry_delays: vec![],
        delivery_limit: 5,
    };
    broker.track(&spec);
    let (conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    (conn, channel)
}

fn fast(db: &TestDb, broker: &TestBroker) -> RelayConfig {
    let mut cfg = RelayConfig::new(db.url.clone(), broker.amqp_url.clone(), broker.topology.clone());
    cfg.poll_interval = Duration::from_millis(100);
    cfg.retry_base = Duration::from_millis(50);
    cfg.retry_max = Duration::from_millis(200);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_every_row_once_in_written_order_per_aggregate() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = probe(&broker, &["#"]).await;

    let orders: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    // Interleaved writes, several per transaction, and a batch size smaller
    // than the backlog so more than one claim is needed.
    for version in 1..=8 {
        write(&db.pool, orders.iter().map(|o| declined(*o, version)).collect()).await;
    }
    let mut cfg = fast(&db, &broker);
    cfg.batch_size = 7;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(cfg, shutdown.clone()));

    eventually("all 40 rows marked published", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await == 0
    })
    .await;
    let queue = broker.topology.queue("probe");
    let got = std::cell::RefCell::new(Vec::new());
    eventually("40 messages in the queue", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new);
        got.borrow().len() >= 40
    })
    .await;
    let got = got.into_inner();
    assert_eq!(got.len(), 40, "each row exactly once");
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for env in &got {
        versions.entry(env.aggregate_id.clone()).or_default().push(env.aggregate_version);
    }
    for (agg, v) in versions {
        assert_eq!(v, (1..=8).collect::<Vec<_>>(), "order of aggregate {agg}");
    }
    shutdown.cancel();
    relay.await.unwrap();
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    attempts: i64,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = BigInt)]
    dead: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_backs_off_then_dies_and_holds_only_its_aggregate() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    // Only test.noted is routed: test.tallied comes back unroutable.
    let (_conn, channel) = probe(&broker, &["test.noted"]).await;

    let (stuck, fine) = (Uuid::now_v7(), Uuid::now_v7());
    let refused = Envelope::new(&Tallied { key: stuck.to_string(), amount: 1 }, 1, &Metadata::default()).unwrap();
    write(&db.pool, vec![refused, declined(stuck, 2), declined(fine, 1), declined(fine, 2)]).await;

    let mut cfg = fast(&db, &broker);
    cfg.max_attempts = 3;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(cfg, shutdown.clone()));

    eventually("the refused row is dead after 3 attempts", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL AND attempts = 3").await == 1
    })
    .await;
    let mut conn = db.pool.get().await.unwrap();
    let row: Row = diesel::sql_query(
        "SELECT attempts::bigint AS attempts, last_error, (dead_at IS NOT NULL)::int::bigint AS dead \
         FROM outbox WHERE event_type = 'test.tallied'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!((row.attempts, row.dead), (3, 1));
    assert!(row.last_error.unwrap().contains("NO_ROUTE"));

    // The other aggregate flowed; the stuck one's later event waits behind
    // its dead predecessor.
    let got = drain(&channel, &broker.topology.queue("probe")).await;
    let fine_versions: Vec<i64> =
        got.iter().filter(|e| e.aggregate_id == fine.to_string()).map(|e| e.aggregate_version).collect();
    assert_eq!(fine_versions, vec![1, 2]);
    assert!(got.iter().all(|e| e.aggregate_id != stuck.to_string()), "nothing of the stuck aggregate");
    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL").await,
        1,
        "the stuck aggregate's second event is still waiting"
    );
    shutdown.cancel();
    relay.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_what_it_should() {
    use orderflow_outbox::relay::retention::{Retention, Swept, sweep};
    let db = TestDb::new(None).await;
    let (a, b, c, d) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    write(&db.pool, vec![declined(a, 1), declined(b, 1), declined(c, 1), declined(d, 1)]).await;
    let mut conn = db.pool.get().await.unwrap();
    for sql in [
        // a: published two hours ago -> goes; b: published a minute ago -> stays
        format!("UPDATE outbox SET published_at = now() - interval '2 hours' WHERE aggregate_id = '{a}'"),
        format!("UPDATE outbox SET published_at = now() - interval '1 minute' WHERE aggregate_id = '{b}'"),
        // c: dead for two hours -> stays (parked until replayed); d: unpublished -> stays
        format!(
            "UPDATE outbox SET dead_at = now() - interval '2 hours', created_at = now() - interval '3 hours' WHERE aggregate_id = '{c}'"
        ),
        format!("UPDATE outbox SET created_at = now() - interval '3 hours' WHERE aggregate_id = '{d}'"),
    ] {
        diesel::sql_query(sql).execute(&mut conn).await.unwrap();
    }
    // Inbox: 2 rows past the 7-day horizon, 1 inside it.
    for (i, age) in ["8 days", "30 days", "6 days"].iter().enumerate() {
        diesel::sql_query(format!(
            "INSERT INTO inbox (consumer, message_id, event_type, received_at) \
             VALUES ('c{i}', '{}', 'x', now() - interval '{age}')",
            Uuid::now_v7()
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // A batch of 1 forces several statements.
    let retention = Retention { published: Duration::from_secs(3600), batch: 1, ..Retention::default() };
    let swept = sweep(&mut conn, &retention).await.unwrap();
    assert_eq!(swept, Swept { outbox: 1, inbox: 2 });
    let left: Vec<String> = {
        #[derive(QueryableByName)]
        struct A {
            #[diesel(sql_type = Text)]
            aggregate_id: String,
        }
        diesel::sql_query("SELECT aggregate_id FROM outbox ORDER BY id")
            .load::<A>(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.aggregate_id)
            .collect()
    };
    assert_eq!(left, [b.to_string(), c.to_string(), d.to_string()]);
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM inbox").await, 1);
    assert_eq!(sweep(&mut conn, &retention).await.unwrap(), Swept::default(), "nothing more to do");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_retention_deletes_rows_as_they_are_published() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = probe(&broker, &["#"]).await;
    write(&db.pool, (1..=5).map(|v| declined(Uuid::now_v7(), v)).collect()).await;
    let mut cfg = fast(&db, &broker);
    cfg.retention.published = Duration::ZERO;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(cfg, shutdown.clone()));
    eventually("the outbox is empty", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox").await == 0
    })
    .await;
    let got = std::cell::RefCell::new(Vec::new());
    let queue = broker.topology.queue("probe");
    eventually("5 messages delivered", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new);
        got.borrow().len() == 5
    })
    .await;
    shutdown.cancel();
    relay.await.unwrap();
}

#[derive(QueryableByName)]
struct Tally {
    #[diesel(sql_type = BigInt)]
    published: i64,
    #[diesel(sql_type = BigInt)]
    charged: i64,
}

/// Issue 11, defect 1: with many publishes in flight the broker merges acks
/// (`multiple`), and the client library hands a `basic.return` to whichever
/// confirm completes first. Returns must be matched to rows by message id:
/// an unroutable row is never marked published, a delivered one never
/// charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_credited_to_the_returned_row_even_when_acks_are_merged() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    // test.noted is routed; test.tallied comes back unroutable.
    let (_conn, _channel) = probe(&broker, &["test.noted"]).await;
    let mut cfg = fast(&db, &broker);
    // Keep published rows, so that a wrongly published one stays visible;
    // try each unroutable row once within the test.
    cfg.retention.published = Duration::from_secs(3600);
    cfg.retry_base = Duration::from_secs(600);
    cfg.retry_max = Duration::from_secs(600);
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(cfg, shutdown.clone()));

    // 10 rounds of 500 rows, alternating a bound and an unbound event type,
    // each on an aggregate of its own.
    for _ in 0..10 {
        let events = (0..500)
            .map(|i| {
                let order = Uuid::now_v7();
                if i % 2 == 0 {
                    declined(order, 1)
                } else {
                    Envelope::new(&Tallied { key: order.to_string(), amount: 1 }, 1, &Metadata::default()).unwrap()
                }
            })
            .collect();
        write(&db.pool, events).await;
    }
    let tally = || async {
        let mut conn = db.pool.get().await.unwrap();
        diesel::sql_query(
            "SELECT count(*) FILTER (WHERE event_type = 'test.tallied' AND published_at IS NOT NULL) AS published, \
                    count(*) FILTER (WHERE event_type = 'test.noted' AND attempts > 0) AS charged \
             FROM outbox",
        )
        .get_result::<Tally>(&mut conn)
        .await
        .unwrap()
    };
    eventually("every row published or charged once", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND attempts = 0").await == 0
    })
    .await;
    let t = tally().await;
    shutdown.cancel();
    relay.await.unwrap();
    assert_eq!(t.published, 0, "unroutable rows marked published (lost)");
    assert_eq!(t.charged, 0, "delivered rows charged a failed attempt (duplicates)");
}

/// Issue 11, defect 3: what can never be published is refused when it is
/// written, with a typed error; nothing is written and the caller's
/// transaction goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_refuses_what_can_never_be_published_and_the_transaction_goes_on() {
    use orderflow_outbox::{Limits, Unpublishable};
    let db = TestDb::new(None).await;
    let fine = declined(Uuid::now_v7(), 1);
    let mut long_type = declined(Uuid::now_v7(), 1);
    long_type.event_type = "x".repeat(256);
    let mut too_big = declined(Uuid::now_v7(), 1);
    too_big.payload = serde_json::json!({ "blob": "y".repeat(70_000) });
    let mut conn = db.pool.get().await.unwrap();
    let conn: &mut Conn = &mut conn;
    conn.transaction::<_, diesel::result::Error, _>(async |tx| {
        let e = orderflow_outbox::append(tx, &[fine.clone(), long_type.clone()]).await.unwrap_err();
        assert_eq!(Unpublishable::find(&e), Some(&Unpublishable::EventTypeTooLong { len: 256 }), "{e}");
        let limits = Limits { max_message_bytes: 64 * 1024 };
        let e = orderflow_outbox::append_with(tx, std::slice::from_ref(&too_big), &limits).await.unwrap_err();
        assert!(matches!(Unpublishable::find(&e), Some(Unpublishable::MessageTooLarge { max: 65536, .. })), "{e}");
        // Still usable: the refusals wrote nothing and raised no SQL error.
        orderflow_outbox::append(tx, std::slice::from_ref(&fine)).await
    })
    .await
    .unwrap();
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM outbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_held_back_by_their_aggregate_go_as_soon_as_the_one_before_is_marked() {
    // No poll to fall back on: one wake-up for eight events of one order
    // written together. Only the first is claimable at first; each later
    // one must be claimed as soon as the one before it is marked, not at
    // the next poll (the relay no longer claims after every batch).
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = probe(&broker, &["#"]).await;
    let order = Uuid::now_v7();
    write(&db.pool, (1..=8).map(|v| declined(order, v)).collect()).await;

    let mut cfg = fast(&db, &broker);
    cfg.poll_interval = Duration::from_secs(3600);
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(cfg, shutdown.clone()));
    let queue = broker.topology.queue("probe");
    let got = std::cell::RefCell::new(Vec::new());
    eventually("all 8 events published without a poll", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new);
        got.borrow().len() >= 8
    })
    .await;
    let versions: Vec<i64> = got.into_inner().iter().map(|e| e.aggregate_version).collect();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    shutdown.cancel();
    relay.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_is_planned_once_as_an_index_walk_even_on_an_empty_analyzed_outbox() {
    // The relay's workers prepare the claim once per connection, usually
    // when the outbox is empty. PostgreSQL's plan for an empty, analyzed
    // table is a sequential scan with a sequential scan per candidate,
    // quadratic once a backlog builds up. With the workers' settings the
    // one plan is the walk of the unpublished rows by index, each
    // candidate's aggregate looked up by index.
    let db = TestDb::new(None).await;
    let mut conn = db.pool.get().await.unwrap();
    let conn: &mut Conn = &mut conn;
    diesel_async::SimpleAsyncConnection::batch_execute(conn, relay::WORKER_SETTINGS).await.unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(conn, "ANALYZE outbox").await.unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(
        conn,
        &format!("PREPARE claim(smallint[], bigint) AS {}", relay::CLAIM_SQL),
    )
    .await
    .unwrap();
    // Its one plan is made at its first run, on the empty outbox.
    diesel_async::SimpleAsyncConnection::batch_execute(conn, "EXECUTE claim('{0}', 100)").await.unwrap();
    // A backlog the plan was not made for.
    let orders: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    for version in 1..=20 {
        let mut conn = db.pool.get().await.unwrap();
        let conn: &mut Conn = &mut conn;
        let events: Vec<Envelope> = orders.iter().map(|o| declined(*o, version)).collect();
        conn.transaction::<_, diesel::result::Error, _>(async |tx| orderflow_outbox::append(tx, &events).await)
            .await
            .unwrap();
    }
    #[derive(QueryableByName)]
    struct Plan {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let lanes: Vec<String> = (0..32).map(|l| l.to_string()).collect();
    let plan: Vec<String> =
        diesel::sql_query(format!("EXPLAIN (ANALYZE, COSTS OFF) EXECUTE claim('{{{}}}', 100)", lanes.join(",")))
            .load::<Plan>(conn)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.line)
            .collect();
    let text = plan.join("\n");
    assert!(!text.contains("Seq Scan") && !text.contains("Sort"), "the claim scans or sorts the outbox:\n{text}");
    assert!(text.contains("Index Scan using outbox_unpublished_id on outbox o"), "not walked by index:\n{text}");
    assert!(
        text.contains("Index Cond: ((aggregate_id = o.aggregate_id) AND (id < o.id))"),
        "the aggregate's earlier rows are not looked up by index:\n{text}"
    );
    assert!(text.contains("rows=50 loops=1"), "one row per order claimed:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_appends_tells_a_consumer_whether_to_wake_the_relays() {
    let db = TestDb::new(None).await;
    let mut conn = db.pool.get().await.unwrap();
    let conn: &mut Conn = &mut conn;
    let event = declined(Uuid::now_v7(), 1);
    let (result, appended) =
        orderflow_outbox::watch_appends(conn.transaction::<_, diesel::result::Error, _>(async |tx| {
            orderflow_outbox::append(tx, std::slice::from_ref(&event)).await
        }))
        .await;
    result.unwrap();
    assert!(appended, "an append was not seen");
    let (result, appended) = orderflow_outbox::watch_appends(
        conn.transaction::<_, diesel::result::Error, _>(async |tx| orderflow_outbox::append(tx, &[]).await),
    )
    .await;
    result.unwrap();
    assert!(!appended, "nothing was appended, yet the relays would be woken");
}

/// The relay sends a batch's mark and its COMMIT in one round trip once the
/// mark is prepared on the connection. A mark that fails must still leave
/// its rows unpublished (the COMMIT behind it only rolls the aborted
/// transaction back), so they go again: duplicates, never a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_that_fails_leaves_its_rows_to_be_published_again() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = probe(&broker, &["#"]).await;
    {
        let mut conn = db.pool.get().await.unwrap();
        // The first mark of the poisoned row fails; a sequence counts
        // outside the transaction that the failure rolls back.
        use diesel_async::SimpleAsyncConnection;
        conn.batch_execute(
            "CREATE SEQUENCE mark_failures; \
             CREATE FUNCTION fail_first_mark() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF nextval('mark_failures') = 1 THEN RAISE EXCEPTION 'injected mark failure'; END IF; \
               RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END; \
             END $$; \
             CREATE TRIGGER fail_first_mark BEFORE UPDATE OR DELETE ON outbox FOR EACH ROW \
               WHEN (OLD.aggregate_id = 'poison') EXECUTE FUNCTION fail_first_mark()",
        )
        .await
        .unwrap();
    }
    let mut cfg = fast(&db, &broker);
    cfg.retention.published = Duration::ZERO;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(cfg, shutdown.clone()));
    let queue = broker.topology.queue("probe");
    let got = std::cell::RefCell::new(Vec::new());
    // First a batch that prepares the mark on the relay's connection, so
    // the poisoned one is marked in the same round trip as its COMMIT.
    write(&db.pool, vec![declined(Uuid::now_v7(), 1)]).await;
    eventually("the first row is published", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new);
        count(&db.pool, "SELECT count(*) AS n FROM outbox").await == 0
    })
    .await;
    let poison = Envelope::new(&Noted { key: "poison".into(), note: "v1".into() }, 1, &Metadata::default()).unwrap();
    let after = declined(Uuid::now_v7(), 1);
    write(&db.pool, vec![poison.clone()]).await;
    eventually("the poisoned row's mark failed once", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM mark_failures WHERE last_value >= 1 AND is_called").await == 1
    })
    .await;
    write(&db.pool, vec![after.clone()]).await;
    eventually("every row published and the outbox empty", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new);
        let ids: Vec<Uuid> = got.borrow().iter().map(|e| e.message_id).collect();
        ids.contains(&poison.message_id)
            && ids.contains(&after.message_id)
            && count(&db.pool, "SELECT count(*) AS n FROM outbox").await == 0
    })
    .await;
    let copies = got.borrow().iter().filter(|e| e.message_id == poison.message_id).count();
    assert!(copies >= 1, "the poisoned row was published");
    shutdown.cancel();
    relay.await.unwrap();
}
