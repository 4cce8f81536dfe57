//! Group commit of `POST /orders`: requests that wait while a write is in
//! progress are written together in one transaction, each gets its own
//! answer, and one bad order does not take its batch down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use order_service::domain::{CreateOrder, Limits, NewOrder, validate};
use order_service::intake::Intake;
use order_service::store::Created;
use orderflow_envelope::Metadata;
use orderflow_testkit::{TestDb, count, eventually};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

fn order(id: &str, customer: &str) -> NewOrder {
    let body: CreateOrder = serde_json::from_value(json!({
        "order_id": id,
        "customer_id": customer,
        "items": [{"sku": "SKU-1", "quantity": 2, "price": 24.99}, {"sku": "SKU-2", "quantity": 1, "price": 5.0}],
    }))
    .unwrap();
    validate(body, &Limits::default()).unwrap()
}

fn kind(created: &Created) -> &'static str {
    match created {
        Created::New(_) => "new",
        Created::Existing(_) => "existing",
        Created::Conflict(_) => "conflict",
    }
}

#[derive(QueryableByName)]
struct Txn {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    txn: String,
}

/// Sends `order` to the intake and waits until it is queued (so the queue
/// order is the order of the calls).
async fn enqueue(intake: &Intake, order: NewOrder) -> JoinHandle<Result<Created, String>> {
    let before = intake.queued();
    let i = intake.clone();
    let handle = tokio::spawn(async move { i.create(order, Metadata::default()).await.map_err(|e| e.to_string()) });
    eventually("the request is queued", DEADLINE, || async { intake.queued() > before }).await;
    handle
}

/// Holds the intake's one writer: its first order ("first") waits on a row
/// this test is inserting with the same id and has not committed. Roll the
/// returned connection back to let it go.
async fn hold_the_writer(
    db: &TestDb,
    intake: &Intake,
) -> (orderflow_db::PooledConn, JoinHandle<Result<Created, String>>) {
    let mut blocker = db.pool.get().await.unwrap();
    blocker
        .batch_execute(
            "BEGIN; INSERT INTO orders (id, customer_id, status, total_amount, force_fail, request_hash) \
             VALUES ('first', 'someone', 'pending', 1, false, 'x')",
        )
        .await
        .unwrap();
    let first = {
        let i = intake.clone();
        tokio::spawn(
            async move { i.create(order("first", "alice"), Metadata::default()).await.map_err(|e| e.to_string()) },
        )
    };
    eventually("the writer waits on the uncommitted row", DEADLINE, || async {
        count(
            &db.pool,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    (blocker, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_wait_share_one_commit_and_each_gets_its_own_answer() {
    let db = TestDb::new(Some(order_service::MIGRATIONS)).await;
    let waker = orderflow_outbox::Waker::start(&db.url, CancellationToken::new());
    let intake = Intake::start(db.pool.clone(), waker, 1, 64);

    let (mut blocker, first) = hold_the_writer(&db, &intake).await;

    // Meanwhile: ten new orders, the same POST again, and a different body
    // under a taken id, all queued behind the writer.
    let mut waiting = Vec::new();
    for k in 0..10 {
        waiting.push(enqueue(&intake, order(&format!("b-{k}"), "bob")).await);
    }
    waiting.push(enqueue(&intake, order("b-0", "bob")).await);
    waiting.push(enqueue(&intake, order("b-1", "mallory")).await);
    assert_eq!(intake.queued(), 12);

    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(kind(&first.await.unwrap().unwrap()), "new");
    let mut answers = Vec::new();
    for handle in waiting {
        answers.push(kind(&handle.await.unwrap().unwrap()));
    }
    let mut expected = vec!["new"; 10];
    expected.extend(["existing", "conflict"]);
    assert_eq!(answers, expected);

    // The twelve requests were one transaction: one commit for ten orders.
    let mut conn = db.pool.get().await.unwrap();
    let txns: Vec<Txn> = diesel::sql_query("SELECT id, xmin::text AS txn FROM orders WHERE id LIKE 'b-%'")
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(txns.len(), 10);
    assert!(
        txns.iter().all(|t| t.txn == txns[0].txn),
        "not one transaction: {:?}",
        txns.iter().map(|t| (&t.id, &t.txn)).collect::<Vec<_>>()
    );
    // Everything of an order once: its lines, its event, its timeline entry.
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM order_items").await, 22);
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE event_type = 'order.created'").await, 11);
    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM order_timeline WHERE event_type = 'order.created'").await,
        11
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM orders WHERE id = 'b-1' AND customer_id = 'bob'").await,
        1,
        "the first body posted under an id is the one stored"
    );
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_the_database_refuses_fails_alone_and_its_batch_is_written() {
    let db = TestDb::new(Some(order_service::MIGRATIONS)).await;
    let waker = orderflow_outbox::Waker::start(&db.url, CancellationToken::new());
    let intake = Intake::start(db.pool.clone(), waker, 1, 64);

    let (mut blocker, first) = hold_the_writer(&db, &intake).await;
    // An id the table's CHECK refuses (validation would have: this order
    // stands for anything the database refuses that validation let through).
    let mut bad = order("ok-1", "carol");
    bad.id = "not an id!".into();
    let mut waiting = vec![enqueue(&intake, order("ok-0", "carol")).await];
    waiting.push(enqueue(&intake, bad).await);
    waiting.push(enqueue(&intake, order("ok-2", "carol")).await);
    blocker.batch_execute("ROLLBACK").await.unwrap();
    first.await.unwrap().unwrap();

    let answers: Vec<Result<&str, String>> = {
        let mut out = Vec::new();
        for handle in waiting {
            out.push(handle.await.unwrap().map(|c| kind(&c)));
        }
        out
    };
    assert_eq!(answers[0], Ok("new"));
    assert!(answers[1].as_ref().is_err_and(|e| e.contains("orders_id_check") || e.contains("check")), "{answers:?}");
    assert_eq!(answers[2], Ok("new"));
    let mut conn = db.pool.get().await.unwrap();
    let n: N =
        diesel::sql_query("SELECT count(*) AS n FROM orders WHERE id LIKE 'ok-%'").get_result(&mut conn).await.unwrap();
    assert_eq!(n.n, 2);
}
