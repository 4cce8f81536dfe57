//! Integer fields of JSON bodies that also take whole numbers written with a
//! fraction or an exponent (`2.0`, `1e3`).
//!
//! JSON Schema (and so the OpenAPI documents) defines an `integer` as any
//! number with a zero fractional part: `2.0` is the integer 2, and a client
//! or generator may write it that way. serde's integers accept only `2`.
//! These deserializers accept both, exactly: a value is taken only when the
//! number it spells is whole and within the target type, anything else
//! (`19.99`, `"2"`, `1e300`) is rejected with serde's usual message, e.g.
//! `invalid type: number `19.99`, expected i64`. No float is ever involved:
//! the number's own text is read as a decimal.
//!
//! ```ignore
//! #[derive(Deserialize)]
//! struct Line {
//!     #[serde(deserialize_with = "orderflow_web::integer::i64")]
//!     price: i64,
//! }
//! ```

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::de::{Error, Unexpected};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Deserializes an `i64` from an integer or a whole number (`2`, `2.0`).
pub fn i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    whole(deserializer, "i64")
}

/// Deserializes an `i32` from an integer or a whole number (`2`, `2.0`).
pub fn i32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    whole(deserializer, "i32")
}

/// The number's own text (serde_json keeps it: `arbitrary_precision`) read
/// as a decimal, then taken only if it is whole and fits `T`.
fn whole<'de, T, D>(deserializer: D, name: &'static str) -> Result<T, D::Error>
where
    T: TryFrom<i64>,
    D: Deserializer<'de>,
{
    let number = match Value::deserialize(deserializer)? {
        Value::Number(n) => n.to_string(),
        Value::String(s) => return Err(D::Error::invalid_type(Unexpected::Str(&s), &name)),
        Value::Null => return Err(D::Error::invalid_type(Unexpected::Unit, &name)),
        Value::Bool(b) => return Err(D::Error::invalid_type(Unexpected::Bool(b), &name)),
        Value::Array(_) => return Err(D::Error::invalid_type(Unexpected::Seq, &name)),
        Value::Object(_) => return Err(D::Error::invalid_type(Unexpected::Map, &name)),
    };
    let what = format!("number `{number}`");
    let decimal =
        if number.contains(['e', 'E']) { Decimal::from_scientific(&number) } else { Decimal::from_str_exact(&number) };
    let Ok(decimal) = decimal.map(|d| d.normalize()) else {
        return Err(D::Error::invalid_value(Unexpected::Other(&what), &name));
    };
    if decimal.scale() > 0 {
        return Err(D::Error::invalid_type(Unexpected::Other(&what), &name));
    }
    decimal
        .to_i64()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| D::Error::invalid_value(Unexpected::Other(&what), &name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Line {
        #[serde(deserialize_with = "super::i64")]
        price: i64,
        #[serde(deserialize_with = "super::i32")]
        quantity: i32,
    }

    fn parse(json: &str) -> Result<Line, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn whole_numbers_in_any_spelling_are_integers() {
        let line = parse(r#"{"price": 2499.0, "quantity": 3}"#).unwrap();
        assert_eq!((line.price, line.quantity), (2499, 3));
        let line = parse(r#"{"price": 1e3, "quantity": -2.0}"#).unwrap();
        assert_eq!((line.price, line.quantity), (1000, -2));
        assert_eq!(parse(r#"{"price": 9223372036854775807, "quantity": 0}"#).unwrap().price, i64::MAX);
    }

    #[test]
    fn anything_else_is_refused_with_serdes_message() {
        let err = parse(r#"{"price": 19.99, "quantity": 1}"#).unwrap_err();
        assert!(err.starts_with("invalid type: number `19.99`, expected i64"), "{err}");
        let err = parse(r#"{"price": 1, "quantity": 2147483648}"#).unwrap_err();
        assert!(err.starts_with("invalid value: number `2147483648`, expected i32"), "{err}");
        let err = parse(r#"{"price": 1, "quantity": 3e9}"#).unwrap_err();
        assert!(err.starts_with("invalid value: number `3e") && err.contains("expected i32"), "{err}");
        let err = parse(r#"{"price": 1e300, "quantity": 1}"#).unwrap_err();
        assert!(err.contains("expected i64"), "{err}");
        let err = parse(r#"{"price": "2", "quantity": 1}"#).unwrap_err();
        assert!(err.starts_with("invalid type: string \"2\", expected i64"), "{err}");
        assert!(parse(r#"{"price": null, "quantity": 1}"#).is_err());
    }
}
