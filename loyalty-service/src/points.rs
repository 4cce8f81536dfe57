//! The consumer: points granted on `order.confirmed`, revoked on
//! `order.cancelled`.
//!
//! The runtime (`orderflow-consumer`) opens the transaction, records the
//! message in the inbox (a duplicate never reaches [`Points::handle`]),
//! calls the handler, commits, then acks and wakes the relay. Everything the
//! handler writes, the account, the grant and the outgoing event in the
//! outbox, commits with that inbox row or not at all. So a message has its
//! effect once, however often the broker delivers it.
//!
//! The handler must also be right when messages come late or out of order
//! (a retried confirmation after its cancellation): the `grants` row per
//! order decides, see [`confirm`] and [`cancel`].

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_contracts::events::{OrderCancelled, OrderConfirmed};
use orderflow_db::Conn;
use orderflow_envelope::Metadata;

use crate::events::{Input, PointsGranted, PointsRevoked};

/// The consumer's name: its queue (`<prefix>.loyalty`) and its inbox rows.
pub const CONSUMER: &str = "loyalty";

/// Points per confirmed order: one per whole unit of money (12.99 earns 12).
pub fn points_for(order: &OrderConfirmed) -> i64 {
    order.total_amount.minor().max(0) / 100
}

/// The loyalty consumer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Points;

impl Handler for Points {
    type Event = Input;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Input>) -> Result<(), HandlerError> {
        let meta = msg.meta();
        match msg.event {
            Input::Confirmed(order) => confirm(conn, order, &meta).await?,
            Input::Cancelled(order) => cancel(conn, order, &meta).await?,
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Account {
    #[diesel(sql_type = BigInt)]
    balance: i64,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct Revoked {
    /// The row was inserted (a tombstone), not an existing grant revoked.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    tombstone: bool,
    #[diesel(sql_type = Text)]
    customer_id: String,
    #[diesel(sql_type = BigInt)]
    points: i64,
}

/// Grants an order's points, unless the order already has a grant (granted
/// before, or cancelled first: then the late confirmation earns nothing).
pub async fn confirm(conn: &mut Conn, order: &OrderConfirmed, meta: &Metadata) -> diesel::QueryResult<()> {
    let points = points_for(order);
    let inserted = diesel::sql_query(
        "INSERT INTO grants (order_id, customer_id, points) VALUES ($1, $2, $3) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind::<Text, _>(&order.order_id)
    .bind::<Text, _>(&order.customer_id)
    .bind::<BigInt, _>(points)
    .execute(conn)
    .await?;
    if inserted == 0 {
        tracing::debug!(order_id = %order.order_id, "order already has a grant (or was cancelled first): no points");
        return Ok(());
    }
    let account = change_balance(conn, &order.customer_id, points).await?;
    let granted = PointsGranted {
        customer_id: order.customer_id.clone(),
        order_id: order.order_id.clone(),
        points,
        balance: account.balance,
    };
    // In the same transaction: published by the relay after the commit.
    orderflow_outbox::emit(conn, &granted, account.version, meta).await?;
    metrics::counter!("loyalty_points_granted_total").increment(points.unsigned_abs());
    Ok(())
}

/// Takes a cancelled order's points back. A cancellation that comes first
/// leaves a revoked grant of 0 points, so its confirmation grants nothing.
///
/// One statement decides both: a cancellation and the confirmation of the
/// same order can run side by side (two batches), and a look-then-insert
/// lost the cancellation when the confirmation's grant was inserted but not
/// yet committed (the look saw nothing, the insert then found the grant and
/// did nothing). The upsert waits for such a grant and revokes it.
pub async fn cancel(conn: &mut Conn, order: &OrderCancelled, meta: &Metadata) -> diesel::QueryResult<()> {
    let outcome: Option<Revoked> = diesel::sql_query(
        "INSERT INTO grants (order_id, customer_id, points, revoked_at) VALUES ($1, $2, 0, now()) \
         ON CONFLICT (order_id) DO UPDATE SET revoked_at = now() WHERE grants.revoked_at IS NULL \
         RETURNING (xmax = 0) AS tombstone, customer_id, points",
    )
    .bind::<Text, _>(&order.order_id)
    .bind::<Text, _>(&order.customer_id)
    .get_result(conn)
    .await
    .map(Some)
    .or_else(|e| if e == diesel::result::Error::NotFound { Ok(None) } else { Err(e) })?;
    // Nothing back: revoked before. A new row (xmax 0): the tombstone.
    let Some(revoked) = outcome.filter(|r| !r.tombstone) else {
        return Ok(());
    };
    let account = change_balance(conn, &revoked.customer_id, -revoked.points).await?;
    let event = PointsRevoked {
        customer_id: revoked.customer_id,
        order_id: order.order_id.clone(),
        points: revoked.points,
        balance: account.balance,
    };
    orderflow_outbox::emit(conn, &event, account.version, meta).await?;
    Ok(())
}

/// Adds `delta` to the customer's balance (creating the account), and
/// returns the new balance and version (the events' aggregate version).
async fn change_balance(conn: &mut Conn, customer_id: &str, delta: i64) -> diesel::QueryResult<Account> {
    diesel::sql_query(
        "INSERT INTO accounts (customer_id, balance, version) VALUES ($1, $2, 1) \
         ON CONFLICT (customer_id) DO UPDATE \
         SET balance = accounts.balance + EXCLUDED.balance, version = accounts.version + 1 \
         RETURNING balance, version",
    )
    .bind::<Text, _>(customer_id)
    .bind::<BigInt, _>(delta)
    .get_result(conn)
    .await
}
