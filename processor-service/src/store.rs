//! Stock, reservations, payments and shipments.
// Row structs mirror the columns documented in `migrations/`.
#![allow(missing_docs)]

use orderflow_db::CachedDsl;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orderflow_contracts::events::LineItem;
use orderflow_db::Conn;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::schema::{payments, products, reservations, shipments};

/// A product and its stock buckets.
#[derive(Debug, Clone, Queryable, Selectable, Serialize, ToSchema)]
#[diesel(table_name = products)]
pub struct Product {
    /// SKU.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Unit price, major units with 2 decimals (stored in cents).
    #[serde(serialize_with = "orderflow_contracts::money::serialize_minor")]
    #[schema(schema_with = orderflow_web::schema::money_output)]
    pub price: i64,
    /// Units available to reserve.
    pub on_hand: i32,
    /// Units held for pending orders.
    pub reserved: i32,
    /// Units shipped.
    pub shipped: i32,
    /// Units ever received; always on_hand + reserved + shipped.
    pub received: i64,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A move of units between stock buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// on hand -> reserved.
    Reserve,
    /// reserved -> on hand (compensation).
    Release,
    /// reserved -> shipped.
    Ship,
    /// shipped -> on hand (a voided shipment).
    Return,
}

/// Locks the products of `skus` in SKU order (a global order, so two
/// transactions never wait on each other in a cycle) and returns them.
pub async fn lock_products(conn: &mut Conn, skus: &[&str]) -> QueryResult<HashMap<String, Product>> {
    let mut skus: Vec<&str> = skus.to_vec();
    skus.sort_unstable();
    let rows: Vec<Product> = products::table
        .filter(products::sku.eq_any(&skus))
        .order(products::sku)
        .for_update()
        .select(Product::as_select())
        .cached()
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|p| (p.sku.clone(), p)).collect())
}

/// Products a batch of messages needs, as [`try_lock_products`] found them.
#[derive(Debug, Default)]
pub struct Taken {
    /// SKUs that exist but another transaction holds.
    pub busy: HashSet<String>,
    /// The reserved SKUs of each order asked about (orders without a
    /// reservation are absent).
    pub reserved: HashMap<String, Vec<String>>,
}

impl Taken {
    /// Whether every one of `skus` is held by this transaction (or does not
    /// exist, which its handler reports).
    pub fn has_all<'a>(&self, mut skus: impl Iterator<Item = &'a str>) -> bool {
        skus.all(|sku| !self.busy.contains(sku))
    }

    /// Whether the products reserved for `order_id` are all held.
    pub fn has_reserved(&self, order_id: &str) -> bool {
        self.reserved.get(order_id).is_none_or(|skus| self.has_all(skus.iter().map(String::as_str)))
    }
}

#[derive(QueryableByName)]
struct SkuTaken {
    #[diesel(sql_type = diesel::sql_types::Text)]
    sku: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    got: bool,
}

#[derive(QueryableByName)]
struct ReservedSku {
    #[diesel(sql_type = diesel::sql_types::Text)]
    order_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    sku: String,
}

/// Locks, without waiting for any, the products of `skus` and those
/// reserved for `orders`: what a batch of messages will move (see
/// `orderflow_consumer::Handler::prepare`). Says which were busy, so the
/// messages that need them wait for a later transaction instead of this one
/// waiting while it holds the others.
pub async fn try_lock_products(conn: &mut Conn, skus: &[&str], orders: &[&str]) -> QueryResult<Taken> {
    use diesel::sql_types::{Array, Text};
    let mut taken = Taken::default();
    let mut wanted: Vec<String> = skus.iter().map(|s| (*s).to_owned()).collect();
    if !orders.is_empty() {
        let lines: Vec<ReservedSku> = diesel::sql_query(
            "SELECT order_id, line->>'sku' AS sku FROM reservations, jsonb_array_elements(items) AS line \
             WHERE order_id = ANY($1)",
        )
        .bind::<Array<Text>, _>(orders)
        .cached()
        .load(conn)
        .await?;
        for line in lines {
            wanted.push(line.sku.clone());
            taken.reserved.entry(line.order_id).or_default().push(line.sku);
        }
    }
    if wanted.is_empty() {
        return Ok(taken);
    }
    let rows: Vec<SkuTaken> = diesel::sql_query(
        "SELECT p.sku, l.sku IS NOT NULL AS got FROM products p \
         LEFT JOIN (SELECT sku FROM products WHERE sku = ANY($1) ORDER BY sku FOR UPDATE SKIP LOCKED) l USING (sku) \
         WHERE p.sku = ANY($1)",
    )
    .bind::<Array<Text>, _>(&wanted)
    .cached()
    .load(conn)
    .await?;
    taken.busy = rows.into_iter().filter(|r| !r.got).map(|r| r.sku).collect();
    Ok(taken)
}

/// Moves the units of `items`, each guarded by a conditional update so no
/// bucket can go negative. Returns the SKU whose source bucket was short,
/// if any (the caller rolls back).
pub async fn move_stock(conn: &mut Conn, items: &[LineItem], mv: Move) -> QueryResult<Option<String>> {
    let mut sorted: Vec<&LineItem> = items.iter().collect();
    sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
    for item in sorted {
        let q = item.quantity;
        let target = products::table.filter(products::sku.eq(&item.sku));
        let n = match mv {
            Move::Reserve => {
                diesel::update(target.filter(products::on_hand.ge(q)))
                    .set((
                        products::on_hand.eq(products::on_hand - q),
                        products::reserved.eq(products::reserved + q),
                        products::updated_at.eq(diesel::dsl::now),
                    ))
                    .cached()
                    .execute(conn)
                    .await?
            }
            Move::Release => {
                diesel::update(target.filter(products::reserved.ge(q)))
                    .set((
                        products::reserved.eq(products::reserved - q),
                        products::on_hand.eq(products::on_hand + q),
                        products::updated_at.eq(diesel::dsl::now),
                    ))
                    .cached()
                    .execute(conn)
                    .await?
            }
            Move::Ship => {
                diesel::update(target.filter(products::reserved.ge(q)))
                    .set((
                        products::reserved.eq(products::reserved - q),
                        products::shipped.eq(products::shipped + q),
                        products::updated_at.eq(diesel::dsl::now),
                    ))
                    .cached()
                    .execute(conn)
                    .await?
            }
            Move::Return => {
                diesel::update(target.filter(products::shipped.ge(q)))
                    .set((
                        products::shipped.eq(products::shipped - q),
                        products::on_hand.eq(products::on_hand + q),
                        products::updated_at.eq(diesel::dsl::now),
                    ))
                    .cached()
                    .execute(conn)
                    .await?
            }
        };
        if n != 1 {
            return Ok(Some(item.sku.clone()));
        }
    }
    Ok(None)
}

/// Declares a status column's enum: its values as the column stores them,
/// and reading it back, where a value the code does not know is an error
/// (the row fails to load), never a silent default.
macro_rules! status_column {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// The value as the column stores it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownStatus;

            fn try_from(text: String) -> Result<Self, UnknownStatus> {
                match text.as_str() {
                    $($text => Ok(Self::$variant),)*
                    _ => Err(UnknownStatus { column: stringify!($name), value: text }),
                }
            }
        }
    };
}

/// A status column held a value this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown {column} {value:?} in the database (written by a newer version?)")]
pub struct UnknownStatus {
    /// The enum read.
    pub column: &'static str,
    /// The value found.
    pub value: String,
}

status_column! {
    /// Where an order's stock stands (`reservations.status`).
    ReservationStatus {
        /// Claimed, not decided yet.
        Pending => "pending",
        /// Stock held for every line.
        Reserved => "reserved",
        /// Not enough stock (or a bad line): nothing held.
        Rejected => "rejected",
        /// Held stock went back on hand.
        Released => "released",
        /// Stock left with the shipment.
        Shipped => "shipped",
        /// Cancelled before inventory decided: a tombstone.
        Cancelled => "cancelled",
    }
}

status_column! {
    /// Where an order's payment stands (`payments.status`).
    PaymentStatus {
        /// Claimed, not decided yet.
        Pending => "pending",
        /// Charged.
        Authorized => "authorized",
        /// Not charged.
        Declined => "declined",
        /// Charged, then given back.
        Refunded => "refunded",
        /// Cancelled before payment decided: a tombstone.
        Cancelled => "cancelled",
    }
}

status_column! {
    /// A shipment's state (`shipments.status`).
    ShipmentStatus {
        /// Shipped.
        Created => "created",
        /// Voided by a cancellation after shipping.
        Voided => "voided",
    }
}

/// A reservation row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = reservations)]
pub struct Reservation {
    pub order_id: String,
    #[diesel(deserialize_as = String)]
    pub status: ReservationStatus,
    pub items: serde_json::Value,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Reservation {
    /// The reserved lines; a column that does not hold lines is an error,
    /// never an empty reservation.
    pub fn lines(&self) -> Result<Vec<LineItem>, serde_json::Error> {
        Vec::<LineItem>::deserialize(&self.items)
    }
}

/// Takes the order's reservation row, creating it with `status` if there is
/// none, and locks it. Returns the row and whether it was created now.
///
/// Whoever comes first (the order or its cancellation) creates the row;
/// the other waits on the lock and then sees what the first decided.
pub async fn claim_reservation(
    conn: &mut Conn,
    order_id: &str,
    status: ReservationStatus,
) -> QueryResult<(Reservation, bool)> {
    if let Some(row) = insert_reservation(conn, order_id, status, None, None).await? {
        return Ok((row, true));
    }
    let row = reservations::table.find(order_id).for_update().select(Reservation::as_select()).first(conn).await?;
    Ok((row, false))
}

/// Inserts the order's reservation as decided (`items` and `reason` when
/// given), unless it has one; returns it if inserted (and so locked by this
/// transaction). The row that was there first wins: a tombstone of a
/// cancellation, or an earlier decision.
pub async fn insert_reservation(
    conn: &mut Conn,
    order_id: &str,
    status: ReservationStatus,
    items: Option<&[LineItem]>,
    reason: Option<&str>,
) -> QueryResult<Option<Reservation>> {
    let items = items.map(|i| serde_json::to_value(i).unwrap_or_default()).unwrap_or_else(|| serde_json::json!([]));
    diesel::insert_into(reservations::table)
        .values((
            reservations::order_id.eq(order_id),
            reservations::status.eq(status.as_str()),
            reservations::items.eq(items),
            reservations::reason.eq(reason),
        ))
        .on_conflict_do_nothing()
        .returning(Reservation::as_returning())
        .cached()
        .get_result(conn)
        .await
        .optional()
}

/// Locks the order's reservation row, if any.
pub async fn lock_reservation(conn: &mut Conn, order_id: &str) -> QueryResult<Option<Reservation>> {
    reservations::table.find(order_id).for_update().select(Reservation::as_select()).first(conn).await.optional()
}

/// Sets a reservation's status (and lines and reason when given).
pub async fn set_reservation(
    conn: &mut Conn,
    order_id: &str,
    status: ReservationStatus,
    items: Option<&[LineItem]>,
    reason: Option<&str>,
) -> QueryResult<()> {
    let items = items.map(|i| serde_json::to_value(i).unwrap_or_default());
    diesel::update(reservations::table.find(order_id))
        .set((
            reservations::status.eq(status.as_str()),
            items.map(|i| reservations::items.eq(i)),
            reason.map(|r| reservations::reason.eq(r.to_owned())),
            reservations::updated_at.eq(diesel::dsl::now),
        ))
        .cached()
        .execute(conn)
        .await?;
    Ok(())
}

/// A payment row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = payments)]
pub struct Payment {
    pub order_id: String,
    pub payment_id: Uuid,
    pub amount: i64,
    #[diesel(deserialize_as = String)]
    pub status: PaymentStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// As [`claim_reservation`], for the order's payment.
pub async fn claim_payment(
    conn: &mut Conn,
    order_id: &str,
    status: PaymentStatus,
    amount: i64,
) -> QueryResult<(Payment, bool)> {
    if let Some(row) = insert_payment(conn, order_id, status, amount, None).await? {
        return Ok((row, true));
    }
    let row = payments::table.find(order_id).for_update().select(Payment::as_select()).first(conn).await?;
    Ok((row, false))
}

/// Inserts the order's payment as decided (with `reason` when given),
/// unless it has one; returns it if inserted. As [`insert_reservation`]:
/// the row that was there first wins.
pub async fn insert_payment(
    conn: &mut Conn,
    order_id: &str,
    status: PaymentStatus,
    amount: i64,
    reason: Option<&str>,
) -> QueryResult<Option<Payment>> {
    diesel::insert_into(payments::table)
        .values((
            payments::order_id.eq(order_id),
            payments::payment_id.eq(Uuid::now_v7()),
            payments::amount.eq(amount),
            payments::status.eq(status.as_str()),
            payments::reason.eq(reason),
        ))
        .on_conflict_do_nothing()
        .returning(Payment::as_returning())
        .cached()
        .get_result(conn)
        .await
        .optional()
}

/// The order's payment, unlocked (for a log line), if any.
pub async fn find_payment(conn: &mut Conn, order_id: &str) -> QueryResult<Option<Payment>> {
    payments::table.find(order_id).select(Payment::as_select()).first(conn).await.optional()
}

/// Locks the order's reservation and payment rows in one statement, if it
/// has both (in that order, as [`lock_reservation`] then [`lock_payment`]).
pub async fn lock_reservation_and_payment(
    conn: &mut Conn,
    order_id: &str,
) -> QueryResult<Option<(Reservation, Payment)>> {
    reservations::table
        .inner_join(payments::table.on(payments::order_id.eq(reservations::order_id)))
        .filter(reservations::order_id.eq(order_id))
        .for_update()
        .select((Reservation::as_select(), Payment::as_select()))
        .first(conn)
        .await
        .optional()
}

/// Locks the order's payment row, if any.
pub async fn lock_payment(conn: &mut Conn, order_id: &str) -> QueryResult<Option<Payment>> {
    payments::table.find(order_id).for_update().select(Payment::as_select()).first(conn).await.optional()
}

/// Sets a payment's status (and reason when given).
pub async fn set_payment(
    conn: &mut Conn,
    order_id: &str,
    status: PaymentStatus,
    reason: Option<&str>,
) -> QueryResult<()> {
    diesel::update(payments::table.find(order_id))
        .set((
            payments::status.eq(status.as_str()),
            reason.map(|r| payments::reason.eq(r.to_owned())),
            payments::updated_at.eq(diesel::dsl::now),
        ))
        .cached()
        .execute(conn)
        .await?;
    Ok(())
}

/// A shipment row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = shipments)]
pub struct Shipment {
    pub order_id: String,
    pub shipment_id: Uuid,
    pub tracking_number: String,
    #[diesel(deserialize_as = String)]
    pub status: ShipmentStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Creates the order's shipment unless it has one; returns it if created.
pub async fn create_shipment(conn: &mut Conn, order_id: &str) -> QueryResult<Option<Shipment>> {
    let shipment_id = Uuid::now_v7();
    let tracking = tracking_number(shipment_id);
    diesel::insert_into(shipments::table)
        .values((
            shipments::order_id.eq(order_id),
            shipments::shipment_id.eq(shipment_id),
            shipments::tracking_number.eq(&tracking),
            shipments::status.eq(ShipmentStatus::Created.as_str()),
        ))
        .on_conflict_do_nothing()
        .returning(Shipment::as_returning())
        .cached()
        .get_result(conn)
        .await
        .optional()
}

/// Voids the order's shipment; true if there was a live one.
pub async fn void_shipment(conn: &mut Conn, order_id: &str) -> QueryResult<bool> {
    let n =
        diesel::update(shipments::table.find(order_id).filter(shipments::status.eq(ShipmentStatus::Created.as_str())))
            .set((shipments::status.eq(ShipmentStatus::Voided.as_str()), shipments::updated_at.eq(diesel::dsl::now)))
            .cached()
            .execute(conn)
            .await?;
    Ok(n == 1)
}

/// A carrier-style tracking number derived from the shipment id.
fn tracking_number(shipment_id: Uuid) -> String {
    // The low bits of a UUIDv7 are random; the high ones are a timestamp.
    let hex = shipment_id.simple().to_string().to_uppercase();
    format!("OF{}", &hex[hex.len() - 14..])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn statuses_read_back_what_they_write_and_refuse_the_unknown() {
        for s in [ReservationStatus::Pending, ReservationStatus::Shipped, ReservationStatus::Cancelled] {
            assert_eq!(ReservationStatus::try_from(s.as_str().to_owned()).unwrap(), s);
        }
        assert_eq!(PaymentStatus::try_from("refunded".to_owned()).unwrap(), PaymentStatus::Refunded);
        let err = PaymentStatus::try_from("chargeback".to_owned()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown PaymentStatus \"chargeback\" in the database (written by a newer version?)"
        );
        assert!(ShipmentStatus::try_from("lost".to_owned()).is_err());
    }

    /// Every value the migrations' CHECK constraints allow is one the code
    /// knows: a row never fails to load on a value this version wrote.
    #[test]
    fn the_enums_cover_the_check_constraints() {
        let sql = include_str!("../migrations/2026-11-21-000001_processor/up.sql");
        let allowed = |column_start: &str| -> Vec<String> {
            let list = &sql[sql.find(column_start).unwrap()..];
            let close = list.find(')').unwrap();
            list[..close].split(',').map(|v| v.trim().trim_matches('\'').to_owned()).collect()
        };
        for v in allowed("'pending', 'reserved'") {
            assert!(ReservationStatus::try_from(v.clone()).is_ok(), "reservation status {v}");
        }
        for v in allowed("'pending', 'authorized'") {
            assert!(PaymentStatus::try_from(v.clone()).is_ok(), "payment status {v}");
        }
        for v in allowed("'created', 'voided'") {
            assert!(ShipmentStatus::try_from(v.clone()).is_ok(), "shipment status {v}");
        }
    }
}
