//! A cancellation handled while its order's confirmation is still
//! uncommitted (two batches side by side) revokes the grant: it waits for
//! the confirmation's row instead of finding nothing and then doing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use diesel_async::{AsyncConnection, SimpleAsyncConnection};
use loyalty_service::points;
use orderflow_contracts::Money;
use orderflow_contracts::events::{OrderCancelled, OrderConfirmed};
use orderflow_db::Conn;
use orderflow_envelope::Metadata;
use orderflow_testkit::{TestDb, count, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_its_uncommitted_confirmation_revokes_the_grant() {
    let db = TestDb::new(Some(loyalty_service::MIGRATIONS)).await;
    let confirmed = OrderConfirmed {
        order_id: "ord-race".into(),
        customer_id: "c-race".into(),
        total_amount: Money::from_minor(50_000),
        tracking_number: None,
    };
    let cancelled = OrderCancelled { order_id: "ord-race".into(), customer_id: "c-race".into(), reason: None };

    // The confirmation's transaction: grant inserted, not committed yet.
    let mut first = db.pool.get().await.unwrap();
    first.batch_execute("BEGIN").await.unwrap();
    points::confirm(&mut first, &confirmed, &Metadata::default()).await.unwrap();

    // The cancellation meanwhile, in a transaction of its own.
    let pool = db.pool.clone();
    let cancelling = tokio::spawn(async move {
        let mut pooled = pool.get().await.unwrap();
        let conn: &mut Conn = &mut pooled;
        conn.transaction::<_, diesel::result::Error, _>(async |tx| {
            points::cancel(tx, &cancelled, &Metadata::default()).await
        })
        .await
    });
    // It waits on the confirmation's row (the fixed statement does; the old
    // look-then-insert also waited, in its insert, then did nothing).
    eventually("the cancellation waits on the grant", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await >= 1
    })
    .await;
    first.batch_execute("COMMIT").await.unwrap();
    cancelling.await.unwrap().unwrap();

    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM grants WHERE order_id = 'ord-race' AND revoked_at IS NOT NULL")
            .await,
        1,
        "the grant is revoked"
    );
    assert_eq!(count(&db.pool, "SELECT balance AS n FROM accounts WHERE customer_id = 'c-race'").await, 0);
    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE event_type = 'points.revoked'").await,
        1,
        "the revocation is published"
    );
}
