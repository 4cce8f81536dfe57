//! The products orders are made of: prices must equal the catalog's
//! (inventory fails an order whose line price differs).

use orderflow_contracts::Money;
use serde_json::Value;

/// A product orders can name, with its price as the API writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    /// SKU.
    pub sku: String,
    /// Unit price.
    pub price: Money,
}

/// Why a catalog could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Not JSON.
    #[error("the catalog is not JSON")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an array of {sku, price}.
    #[error("the catalog must be a JSON array of {{sku, price, ...}} (entry {index} is not)")]
    Shape {
        /// The entry at fault.
        index: usize,
    },
    /// A price that is not a decimal amount.
    #[error("entry {index} of the catalog has a bad price")]
    Price {
        /// The entry at fault.
        index: usize,
        /// What was wrong with it.
        #[source]
        source: orderflow_contracts::money::MoneyError,
    },
    /// No products.
    #[error("the catalog has no products")]
    Empty,
}

/// Reads a catalog as processor-service takes it (`PRODUCT_CATALOG`) or
/// answers it (`GET /products`): a JSON array of objects with `sku` and
/// `price` (a decimal number or string, major units).
pub fn parse_catalog(text: &[u8]) -> Result<Vec<CatalogItem>, CatalogError> {
    let value: Value = serde_json::from_slice(text)?;
    let entries = value.as_array().ok_or(CatalogError::Shape { index: 0 })?;
    let mut items = Vec::with_capacity(entries.len());
    for (index, e) in entries.iter().enumerate() {
        let sku = e.get("sku").and_then(Value::as_str).ok_or(CatalogError::Shape { index })?;
        let price = match e.get("price") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(CatalogError::Shape { index }),
        };
        let price = Money::parse(&price).map_err(|source| CatalogError::Price { index, source })?;
        items.push(CatalogItem { sku: sku.to_owned(), price });
    }
    if items.is_empty() {
        return Err(CatalogError::Empty);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_and_strings_exactly() {
        let items = parse_catalog(br#"[{"sku":"A","price":24.99,"on_hand":1},{"sku":"B","price":"0.10"}]"#).unwrap();
        assert_eq!(items[0].price.minor(), 2499);
        assert_eq!(items[1].price.to_string(), "0.10");
        assert!(matches!(parse_catalog(b"[]"), Err(CatalogError::Empty)));
        assert!(matches!(parse_catalog(br#"[{"sku":"A"}]"#), Err(CatalogError::Shape { index: 0 })));
    }
}
