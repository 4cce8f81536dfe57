//! Products: the demo catalog seeded at start, and validation of new ones.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orderflow_contracts::Money;
use orderflow_db::Conn;
use orderflow_web::FieldError;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::schema::products;

/// The catalog seeded when `PRODUCT_CATALOG` is not set.
pub const DEMO_CATALOG: &str = r#"[
  {"sku": "SKU-1", "name": "Espresso beans 1kg", "price": 24.99, "on_hand": 100},
  {"sku": "SKU-2", "name": "Ceramic mug", "price": 12.99, "on_hand": 250},
  {"sku": "SKU-3", "name": "Pour-over kettle", "price": 59.99, "on_hand": 40},
  {"sku": "SKU-4", "name": "Paper filters x100", "price": 4.99, "on_hand": 500},
  {"sku": "laptop", "name": "Laptop", "price": 1200.00, "on_hand": 50},
  {"sku": "mouse", "name": "Mouse", "price": 25.00, "on_hand": 200}
]"#;

/// Highest unit price a product may have.
pub const MAX_PRICE: Money = Money::from_minor(100_000_000);

/// Whether `sku` is 1 to 64 letters, digits, `.`, `_` or `-` (the pattern
/// `^[A-Za-z0-9._-]{1,64}$` of the schemas).
pub fn valid_sku(sku: &str) -> bool {
    !sku.is_empty() && sku.len() <= 64 && sku.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A product to create (`POST /products`, or the seeded catalog).
///
/// The schema states every rule [`NewProduct::check`] enforces, so that a
/// body the schema admits is accepted and one it refuses is rejected.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// SKU: 1 to 64 letters, digits, `.`, `_` or `-`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub sku: String,
    /// Display name: 1 to 200 characters, not all white space, no NUL.
    // The pattern asks for one character that is neither white space (Rust's
    // `char::is_whitespace`, listed because `\s` differs between regex
    // dialects) nor NUL, and for no NUL anywhere.
    #[schema(
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub name: String,
    /// Unit price in major units (`24.99`), 0 to 1000000.00, at most 2
    /// decimal places.
    #[schema(schema_with = orderflow_web::schema::money_input)]
    pub price: Money,
    /// Units on hand at creation, 0 to 1000000000.
    #[serde(deserialize_with = "orderflow_web::integer::i32")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub on_hand: i32,
}

impl NewProduct {
    /// Every field at fault, prefixed by `at` (e.g. `[2].`).
    pub fn check(&self, at: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !valid_sku(&self.sku) {
            errors.push(FieldError {
                field: format!("{at}sku"),
                message: "must be 1 to 64 characters of letters, digits, '.', '_' or '-'".into(),
            });
        }
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            errors.push(FieldError { field: format!("{at}name"), message: "must be 1 to 200 characters".into() });
        } else if self.name.contains('\0') {
            // PostgreSQL's text cannot hold NUL.
            errors.push(FieldError { field: format!("{at}name"), message: "must not contain NUL characters".into() });
        }
        if !(Money::ZERO..=MAX_PRICE).contains(&self.price) {
            errors.push(FieldError {
                field: format!("{at}price"),
                message: format!("must be between 0 and {MAX_PRICE} (a decimal amount, e.g. 24.99)"),
            });
        }
        if !(0..=1_000_000_000).contains(&self.on_hand) {
            errors
                .push(FieldError { field: format!("{at}on_hand"), message: "must be between 0 and 1000000000".into() });
        }
        errors
    }
}

/// Parses a catalog: a JSON array of products, inline or `@path/to/file.json`.
pub fn parse_catalog(spec: &str) -> Result<Vec<NewProduct>, String> {
    let text = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read catalog file {path}: {e}"))?,
        None => spec.to_owned(),
    };
    let products: Vec<NewProduct> = serde_json::from_str(&text)
        .map_err(|e| format!("catalog is not a JSON array of {{sku, name, price, on_hand}}: {e}"))?;
    let errors: Vec<String> = products
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.check(&format!("[{i}].")))
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    if errors.is_empty() { Ok(products) } else { Err(format!("invalid catalog: {}", errors.join("; "))) }
}

/// Inserts a product; false if its SKU exists.
pub async fn insert(conn: &mut Conn, p: &NewProduct) -> QueryResult<bool> {
    let n = diesel::insert_into(products::table)
        .values((
            products::sku.eq(&p.sku),
            products::name.eq(p.name.trim()),
            products::price.eq(p.price.minor()),
            products::on_hand.eq(p.on_hand),
            products::received.eq(i64::from(p.on_hand)),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(n == 1)
}

/// Seeds the catalog: adds missing products, leaves existing ones (and
/// their stock) alone, so restarts do not reset stock.
pub async fn seed(conn: &mut Conn, catalog: &[NewProduct]) -> QueryResult<usize> {
    let mut added = 0;
    for p in catalog {
        if insert(conn, p).await? {
            added += 1;
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_bad_field_is_named_and_whole_numbers_are_integers() {
        let products = parse_catalog(r#"[{"sku": "A-1", "name": " Mug ", "price": 12.99, "on_hand": 5e1}]"#).unwrap();
        assert_eq!((products[0].price, products[0].on_hand), (Money::from_minor(1299), 50));
        let products = parse_catalog(r#"[{"sku": "A-1", "name": "Mug", "price": "1200.0", "on_hand": 1}]"#).unwrap();
        assert_eq!(products[0].price, Money::from_minor(120_000));
        let err = parse_catalog(r#"[{"sku": "a b", "name": "x\u0000", "price": -1, "on_hand": 1}]"#).unwrap_err();
        assert!(
            err.contains("[0].sku") && err.contains("[0].name: must not contain NUL") && err.contains("[0].price"),
            "{err}"
        );
        assert!(parse_catalog(r#"[{"sku": "A", "name": "x", "price": 19.999, "on_hand": 1}]"#).is_err());
        assert!(valid_sku("SKU-1.a_b") && !valid_sku("") && !valid_sku(&"x".repeat(65)) && !valid_sku("ä"));
    }
}
