//! OpenAPI schemas of values the services share: money amounts and client
//! chosen ids. Each states exactly the rule the server enforces, so a body
//! the schema admits is accepted and one it refuses is rejected.

use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};

/// Client-chosen ids (order ids): 1 to 64 of `A-Z a-z 0-9 . _ : -`.
pub const ID_PATTERN: &str = r"^[A-Za-z0-9._:-]{1,64}$";

/// Whether `id` matches [`ID_PATTERN`].
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A string amount from 0 to 1000000.00: digits, at most two decimals.
const MONEY_STRING_PATTERN: &str = r"^(?:[0-9]{1,6}(?:\.[0-9]{1,2})?|1000000(?:\.0{1,2})?)$";

/// A money amount in a request: a JSON number (`19.99`, `1200.0`, `5`) or a
/// string holding one (`"19.99"`), from 0 to 1000000.00, with at most two
/// decimal places (a third is refused, never rounded).
pub fn money_input() -> Schema {
    let described = "Decimal amount in major units (e.g. 19.99), 0 to 1000000.00, at most 2 decimal places; \
                     a JSON number or a string holding one. Read exactly, never as a binary float.";
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(0))
                .maximum(Some(1_000_000))
                .examples([serde_json::json!(19.99)]),
        )
        .item(ObjectBuilder::new().schema_type(Type::String).pattern(Some(MONEY_STRING_PATTERN)))
        .description(Some(described))
        .build()
        .into()
}

/// A money amount in a response: a JSON number in major units with exactly
/// two decimals (`1250.00`).
pub fn money_output() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Number)
        .description(Some("Decimal amount in major units, written with 2 decimals (e.g. 1250.00)"))
        .examples([serde_json::json!(1250.0)])
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn ids_are_the_clients_strings() {
        for ok in ["ord-001", "123", "a:b.c_d-e", "0190f5c2-6e7b-7cc3-8f5e-1a2b3c4d5e6f", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", "a b", "ord/1", "ä", &"x".repeat(65), "a\n"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
