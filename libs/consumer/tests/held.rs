//! Held rows (`orderflow_db::held`): a batch writes its handlers' events
//! and held rows with one statement per kind, just before its commit; a
//! held row that fails there is charged to its own message (issue 10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{DEADLINE, exec};
use diesel::QueryResult;
use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use orderflow_broker::QueueSpec;
use orderflow_broker::header_str;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions};
use orderflow_consumer::{ConsumerConfig, Handler, HandlerError, Incoming, headers, run};
use orderflow_db::Conn;
use orderflow_db::held::HeldRows;
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::events::Noted;
use orderflow_testkit::{TestBroker, TestDb, count, eventually, eventually_some};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An `entries` row: the message and the key it names (a foreign key to
/// `keys`, so a message naming an unknown key fails when its row goes in).
struct Entry {
    key: String,
    message_id: Uuid,
}

impl HeldRows for Entry {
    async fn write(conn: &mut Conn, rows: Vec<Self>) -> QueryResult<()> {
        // One statement for the lot, as a service's own multi-row insert.
        let keys: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.message_id).collect();
        diesel::sql_query("INSERT INTO entries (key, message_id) SELECT * FROM unnest($1::text[], $2::uuid[])")
            .bind::<diesel::sql_types::Array<Text>, _>(keys)
            .bind::<diesel::sql_types::Array<SqlUuid>, _>(ids)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// For each message: appends an event to the outbox and an `entries` row,
/// both held when the runtime holds (written at once otherwise).
#[derive(Clone, Default)]
struct Holder;

impl Handler for Holder {
    type Event = Noted;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Noted>) -> Result<(), HandlerError> {
        let echo = Noted { key: msg.event.key.clone(), note: format!("echo of {}", msg.envelope.message_id) };
        orderflow_outbox::emit(conn, &echo, 1, &msg.meta()).await?;
        let entry = Entry { key: msg.event.key.clone(), message_id: msg.envelope.message_id };
        if let Err(rows) = orderflow_db::held::hold(vec![entry]) {
            Entry::write(conn, rows).await?;
        }
        Ok(())
    }
}

struct Setup {
    db: TestDb,
    broker: TestBroker,
    spec: QueueSpec,
    channel: orderflow_broker::lapin::Channel,
    _conn: orderflow_broker::lapin::Connection,
}

/// Keys `k0`..`k9` exist; every INSERT statement on `outbox` and `entries`
/// is counted in `statements` (a statement-level trigger).
async fn setup() -> Setup {
    let db = TestDb::new(None).await;
    for sql in [
        "CREATE TABLE keys (id TEXT PRIMARY KEY)",
        "INSERT INTO keys SELECT 'k' || n FROM generate_series(0, 9) n",
        "CREATE TABLE entries (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL REFERENCES keys (id), \
         message_id UUID NOT NULL, tx BIGINT NOT NULL DEFAULT txid_current())",
        "CREATE TABLE statements (tbl TEXT NOT NULL)",
        "CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO statements VALUES (TG_TABLE_NAME); RETURN NULL; END $$",
        "CREATE TRIGGER outbox_statements AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION count_statement()",
        "CREATE TRIGGER entries_statements AFTER INSERT ON entries FOR EACH STATEMENT EXECUTE FUNCTION count_statement()",
    ] {
        exec(&db.pool, sql).await;
    }
    let broker = TestBroker::new().await;
    let spec = QueueSpec {
        consumer: "holding".into(),
        bindings: vec!["test.noted".into()],
        retry_delays: vec![Duration::from_millis(100)],
        delivery_limit: 100,
    };
    broker.track(&spec);
    let (conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    Setup { db, broker, spec, channel, _conn: conn }
}

impl Setup {
    /// One consumer gathering up to 16 deliveries for up to 300 ms: what
    /// was published before it starts forms one batch.
    fn config(&self) -> ConsumerConfig {
        let mut cfg =
            ConsumerConfig::new(self.broker.amqp_url.clone(), self.broker.topology.clone(), self.spec.clone());
        cfg.concurrency = 1;
        cfg.batch_size = 16;
        cfg.batch_linger = Duration::from_millis(300);
        cfg
    }

    async fn statements(&self, table: &str) -> i64 {
        count(&self.db.pool, &format!("SELECT count(*) AS n FROM statements WHERE tbl = '{table}'")).await
    }
}

fn noted(key: &str) -> Envelope {
    Envelope::new(&Noted { key: key.into(), note: "hold".into() }, 1, &Metadata::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_writes_its_events_and_held_rows_with_one_statement_each() {
    let s = setup().await;
    let sent: Vec<Envelope> = (0..8).map(|k| noted(&format!("k{k}"))).collect();
    for env in &sent {
        s.broker.publish(&s.channel, env).await;
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(s.config(), s.db.pool.clone(), Holder, shutdown.clone()));
    eventually("the batch handled", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 8
    })
    .await;
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM entries").await, 8);
    assert_eq!(count(&s.db.pool, "SELECT count(DISTINCT tx) AS n FROM entries").await, 1, "one batch, one commit");
    // One INSERT per kind for the batch, where each handler's write was one.
    assert_eq!(s.statements("outbox").await, 1, "the batch's 8 events in one statement");
    assert_eq!(s.statements("entries").await, 1, "the batch's 8 held rows in one statement");
    // In the order the handlers appended them: the relay publishes an
    // aggregate's events in outbox order.
    let mut conn = s.db.pool.get().await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Payload {
        #[diesel(sql_type = Text)]
        note: String,
    }
    let notes: Vec<Payload> =
        diesel::sql_query("SELECT payload->>'note' AS note FROM outbox ORDER BY id").load(&mut conn).await.unwrap();
    let expected: Vec<String> = sent.iter().map(|e| format!("echo of {}", e.message_id)).collect();
    assert_eq!(notes.into_iter().map(|p| p.note).collect::<Vec<_>>(), expected);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_row_that_fails_at_the_flush_is_charged_to_its_own_message() {
    let s = setup().await;
    let good: Vec<Envelope> = (0..6).map(|k| noted(&format!("k{k}"))).collect();
    let orphan = noted("no-such-key");
    for env in good[..3].iter().chain([&orphan]).chain(&good[3..]) {
        s.broker.publish(&s.channel, env).await;
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(s.config(), s.db.pool.clone(), Holder, shutdown.clone()));

    let dlq = s.broker.topology.dead_letter_queue(&s.spec.consumer);
    let parked = eventually_some("the orphan in the DLQ", DEADLINE, || async {
        let msg = s.channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap()?;
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        Some(msg.delivery.properties.clone())
    })
    .await;
    assert_eq!(parked.message_id().as_ref().map(|m| m.to_string()), Some(orphan.message_id.to_string()));
    let error = header_str(&parked, headers::ERROR).unwrap();
    assert!(error.contains("foreign key"), "the reason is the row's: {error}");
    eventually("the others handled", DEADLINE, || async {
        count(&s.db.pool, "SELECT count(*) AS n FROM inbox").await == 6
    })
    .await;
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM entries").await, 6, "each good message's row, once");
    assert_eq!(count(&s.db.pool, "SELECT count(*) AS n FROM outbox").await, 6, "no event of the orphan's");
    let orphan_rows = format!("SELECT count(*) AS n FROM entries WHERE message_id = '{}'", orphan.message_id);
    assert_eq!(count(&s.db.pool, &orphan_rows).await, 0);
    shutdown.cancel();
    task.await.unwrap();
}
