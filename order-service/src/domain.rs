//! The order aggregate: statuses, validation of new orders, money.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use orderflow_contracts::Money;
use orderflow_contracts::events::LineItem;
use orderflow_web::FieldError;
use orderflow_web::schema::valid_id;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

/// Where an order is. `pending` until the pipeline decides; the other three
/// are final.
///
/// Read from the database as itself: a stored status this build does not
/// know is an error (the column has a CHECK), never taken for another.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    diesel::expression::AsExpression,
    diesel::deserialize::FromSqlRow,
)]
#[diesel(sql_type = diesel::sql_types::Text)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Accepted, moving through stock, payment and shipping.
    Pending,
    /// Paid and shipped.
    Confirmed,
    /// Rejected by inventory or payment; see `fail_reason`.
    Failed,
    /// Cancelled by the customer; stock and payment were given back.
    Cancelled,
}

impl OrderStatus {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl diesel::deserialize::FromSql<diesel::sql_types::Text, diesel::pg::Pg> for OrderStatus {
    fn from_sql(bytes: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
        let text = <String as diesel::deserialize::FromSql<diesel::sql_types::Text, diesel::pg::Pg>>::from_sql(bytes)?;
        Ok(text.parse::<Self>()?)
    }
}

impl diesel::serialize::ToSql<diesel::sql_types::Text, diesel::pg::Pg> for OrderStatus {
    fn to_sql<'b>(&'b self, out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>) -> diesel::serialize::Result {
        <str as diesel::serialize::ToSql<diesel::sql_types::Text, diesel::pg::Pg>>::to_sql(
            self.as_str(),
            &mut out.reborrow(),
        )
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Self::Pending),
            "confirmed" => Ok(Self::Confirmed),
            "failed" => Ok(Self::Failed),
            "cancelled" => Ok(Self::Cancelled),
            other => Err(format!("unknown status {other:?}; one of pending, confirmed, failed, cancelled")),
        }
    }
}

/// Bounds on what one order may contain.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Lines per order.
    pub max_items: usize,
    /// Units per line.
    pub max_quantity: i64,
    /// Price of one unit.
    pub max_unit_price: Money,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_items: 100, max_quantity: 10_000, max_unit_price: Money::from_minor(100_000_000) }
    }
}

/// `POST /orders` body, the shape the clients of the service this one
/// replaced already send: `order_id` is the client's own string, money is a
/// decimal amount in major units (`"price": 1200.0` is 1,200.00; `19.99`,
/// `5` and `"19.99"` are fine, `19.999` is an error). Unknown fields are
/// rejected, so a typo such as `forcefail` is an error rather than silently
/// ignored.
///
/// The schema states every rule [`validate`] enforces except that no SKU
/// may appear twice, so that a body the schema admits is accepted and one it
/// refuses is rejected.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    /// Client-chosen id: 1 to 64 of `A-Z a-z 0-9 . _ : -` (`ord-001`, `123`,
    /// a UUID). Repeating a POST with the same id and body returns the stored
    /// order instead of creating another one. Absent: the server makes a
    /// UUIDv7.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub order_id: Option<String>,
    /// Who orders: 1 to 128 characters once leading and trailing white space
    /// is trimmed, without control characters.
    // The pattern is that rule spelled out: white space (Rust's
    // `char::is_whitespace`, listed because `\s` differs between regex
    // dialects) around 1 to 128 characters that start and end with neither
    // white space nor a control character and contain no control character.
    #[schema(
        pattern = r"^[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]{0,126}[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"
    )]
    pub customer_id: String,
    /// What is ordered: 1 to `ORDER_MAX_ITEMS` lines (100 by default), each
    /// SKU on one line only.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<CreateItem>,
    /// Ask payment to decline this order (demos and tests).
    #[serde(default)]
    pub force_fail: bool,
}

/// One line of [`CreateOrder`].
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateItem {
    /// Product SKU: 1 to 64 letters, digits, `.`, `_` or `-`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub sku: String,
    /// Units, 1 to 10000.
    #[serde(deserialize_with = "orderflow_web::integer::i64")]
    #[schema(minimum = 1, maximum = 10_000)]
    pub quantity: i64,
    /// Price of one unit as the customer saw it, in major units (`19.99`).
    /// Inventory checks it against the catalog; a different price fails the
    /// order.
    #[schema(schema_with = orderflow_web::schema::money_input)]
    pub price: Money,
}

/// A validated new order, ready to store.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// Id (client's or a new UUIDv7).
    pub id: String,
    /// Trimmed customer id.
    pub customer_id: String,
    /// Lines.
    pub items: Vec<LineItem>,
    /// Sum of the lines.
    pub total_amount: Money,
    /// See [`CreateOrder::force_fail`].
    pub force_fail: bool,
    /// Fingerprint of the request body (without the id).
    pub request_hash: String,
}

/// Validates a request, naming every field at fault.
pub fn validate(req: CreateOrder, limits: &Limits) -> Result<NewOrder, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut fault = |field: String, message: String| errors.push(FieldError { field, message });

    if req.order_id.as_deref().is_some_and(|id| !valid_id(id)) {
        fault("order_id".into(), "must be 1 to 64 characters of letters, digits, '.', '_', ':' or '-'".into());
    }

    let customer_id = req.customer_id.trim().to_owned();
    if customer_id.is_empty() {
        fault("customer_id".into(), "must not be empty".into());
    } else if customer_id.chars().count() > 128 {
        fault("customer_id".into(), "must be at most 128 characters".into());
    } else if customer_id.chars().any(char::is_control) {
        fault("customer_id".into(), "must not contain control characters".into());
    }

    if req.items.is_empty() {
        fault("items".into(), "must contain at least one item".into());
    } else if req.items.len() > limits.max_items {
        fault("items".into(), format!("must contain at most {} items", limits.max_items));
    }

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut total = Money::ZERO;
    let mut items = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.iter().enumerate() {
        let at = |f: &str| format!("items[{i}].{f}");
        let sku_ok = !item.sku.is_empty()
            && item.sku.len() <= 64
            && item.sku.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !sku_ok {
            fault(at("sku"), "must be 1 to 64 characters of letters, digits, '.', '_' or '-'".into());
        } else if let Some(first) = seen.insert(item.sku.as_str(), i) {
            fault(at("sku"), format!("duplicate of items[{first}].sku; put the total quantity on one line"));
        }
        if !(1..=limits.max_quantity).contains(&item.quantity) {
            fault(at("quantity"), format!("must be between 1 and {}", limits.max_quantity));
        }
        if !(Money::ZERO..=limits.max_unit_price).contains(&item.price) {
            fault(
                at("price"),
                format!("must be between 0 and {} (a decimal amount, e.g. 19.99)", limits.max_unit_price),
            );
        }
        // Bounded above, so neither the product nor the sum can overflow.
        let line =
            item.price.clamp(Money::ZERO, limits.max_unit_price).minor() * item.quantity.clamp(0, limits.max_quantity);
        total = total.checked_add(Money::from_minor(line)).unwrap_or(total);
        items.push(LineItem {
            sku: item.sku.clone(),
            quantity: i32::try_from(item.quantity).unwrap_or(0),
            unit_price: item.price,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let request_hash = fingerprint(&customer_id, &items, req.force_fail);
    Ok(NewOrder {
        id: req.order_id.unwrap_or_else(|| Uuid::now_v7().to_string()),
        customer_id,
        items,
        total_amount: total,
        force_fail: req.force_fail,
        request_hash,
    })
}

/// SHA-256 over the canonical JSON of what defines an order.
fn fingerprint(customer_id: &str, items: &[LineItem], force_fail: bool) -> String {
    let canonical = serde_json::json!({ "customer_id": customer_id, "items": items, "force_fail": force_fail });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(items: Vec<(&str, i64, i64)>) -> CreateOrder {
        CreateOrder {
            order_id: None,
            customer_id: "c-1".into(),
            items: items
                .into_iter()
                .map(|(sku, quantity, price)| CreateItem { sku: sku.into(), quantity, price: Money::from_minor(price) })
                .collect(),
            force_fail: false,
        }
    }

    #[test]
    fn totals_are_exact_in_minor_units() {
        let order = validate(req(vec![("A", 3, 1999), ("B", 1, 1)]), &Limits::default()).unwrap();
        assert_eq!(order.total_amount, Money::from_minor(3 * 1999 + 1));
        let order = validate(req(vec![("A", 1, 10), ("B", 1, 20)]), &Limits::default()).unwrap();
        assert_eq!(order.total_amount.to_string(), "0.30");
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut r = req(vec![("", 0, -1), ("A", 1, 1), ("A", 1, 1)]);
        r.customer_id = "  ".into();
        let errors = validate(r, &Limits::default()).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["customer_id", "items[0].sku", "items[0].quantity", "items[0].price", "items[2].sku"]);
        let mut r = req(vec![("A", 1, 1)]);
        r.order_id = Some("ord 001".into());
        assert_eq!(validate(r, &Limits::default()).unwrap_err()[0].field, "order_id");
    }

    #[test]
    fn item_count_is_bounded() {
        let limits = Limits { max_items: 2, ..Limits::default() };
        let errors = validate(req(vec![("A", 1, 1), ("B", 1, 1), ("C", 1, 1)]), &limits).unwrap_err();
        assert_eq!(errors[0].field, "items");
        assert!(validate(req(vec![]), &limits).is_err());
    }

    #[test]
    fn same_content_same_fingerprint_whatever_the_id() {
        let a = validate(req(vec![("A", 1, 5)]), &Limits::default()).unwrap();
        let b = validate(req(vec![("A", 1, 5)]), &Limits::default()).unwrap();
        let c = validate(req(vec![("A", 2, 5)]), &Limits::default()).unwrap();
        assert_eq!(a.request_hash, b.request_hash);
        assert_ne!(a.request_hash, c.request_hash);
        assert_ne!(a.id, b.id);
    }
}
