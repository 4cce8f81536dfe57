//! A stored status this build does not know is an error, never read as
//! another status (it used to be read as `pending`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel_async::SimpleAsyncConnection;
use order_service::domain::OrderStatus;
use order_service::store;
use orderflow_testkit::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_stored_status_is_an_error_not_pending() {
    let db = TestDb::new(Some(order_service::MIGRATIONS)).await;
    let mut conn = db.pool.get().await.unwrap();
    conn.batch_execute(
        "INSERT INTO orders (id, customer_id, status, total_amount, force_fail, request_hash) \
         VALUES ('known', 'c', 'confirmed', 1, false, 'x'), ('unknown', 'c', 'pending', 1, false, 'x')",
    )
    .await
    .unwrap();
    assert_eq!(store::get_row(&mut conn, "known").await.unwrap().unwrap().status, OrderStatus::Confirmed);

    // A newer version's status (the CHECK dropped, as a later migration might).
    conn.batch_execute(
        "ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check; \
         UPDATE orders SET status = 'archived' WHERE id = 'unknown'",
    )
    .await
    .unwrap();
    let err = store::get_row(&mut conn, "unknown").await.expect_err("an unknown status must not be read");
    let chain = format!("{err:?}");
    assert!(err.to_string().contains("status") && chain.contains("archived"), "{chain}");
}
