//! Integer fields of JSON bodies that also take whole numbers written with a
//! fraction or an exponent (`2.0`, `1e3`).
//!
//! JSON Schema (and so the OpenAPI documents) defines an `integer` as any
//! number with a zero fractional part: `2.0` is the integer 2, and a client
//! or generator may write it that way. serde's integers accept only `2`.
//! These deserializers accept both, exactly: a value is taken only when the
//! number it spells is whole and within the target type, anything else
//! (`19.99`, `"2"`, `1e300`) is rejected with serde's usual message, e.g.
//! `invalid type: floating point `19.99`, expected i64`. No float is ever
//! rounded: every whole number up to 2^53 has an exact `f64`, and larger
//! floats are refused rather than guessed.
//!
//! ```ignore
//! #[derive(Deserialize)]
//! struct Line {
//!     #[serde(deserialize_with = "orderflow_web::integer::i64")]
//!     price: i64,
//! }
//! ```

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{Error, Unexpected, Visitor};

/// Largest magnitude below which every whole `f64` is one exact integer.
const EXACT_F64: f64 = 9_007_199_254_740_992.0; // 2^53

/// Deserializes an `i64` from an integer or a whole number (`2`, `2.0`).
pub fn i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    deserializer.deserialize_any(Whole::<i64>(PhantomData))
}

/// Deserializes an `i32` from an integer or a whole number (`2`, `2.0`).
pub fn i32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    deserializer.deserialize_any(Whole::<i32>(PhantomData))
}

/// The target types, named as serde names them in its messages.
trait Target: TryFrom<i64> + TryFrom<u64> {
    const NAME: &'static str;
}

impl Target for i64 {
    const NAME: &'static str = "i64";
}

impl Target for i32 {
    const NAME: &'static str = "i32";
}

struct Whole<T>(PhantomData<T>);

impl<'de, T: Target> Visitor<'de> for Whole<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::NAME)
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
        if v.fract() != 0.0 || !v.is_finite() {
            return Err(E::invalid_type(Unexpected::Float(v), &self));
        }
        if v.abs() > EXACT_F64 {
            return Err(E::invalid_value(Unexpected::Float(v), &self));
        }
        // Whole and within ±2^53: the cast is exact.
        let whole = v as i64;
        T::try_from(whole).map_err(|_| E::invalid_value(Unexpected::Float(v), &self))
    }
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
        assert!(err.starts_with("invalid type: floating point `19.99`, expected i64"), "{err}");
        let err = parse(r#"{"price": 1, "quantity": 2147483648}"#).unwrap_err();
        assert!(err.starts_with("invalid value: integer `2147483648`, expected i32"), "{err}");
        let err = parse(r#"{"price": 1, "quantity": 3e9}"#).unwrap_err();
        assert!(err.starts_with("invalid value: floating point `3000000000.0`, expected i32"), "{err}");
        let err = parse(r#"{"price": 1e300, "quantity": 1}"#).unwrap_err();
        assert!(err.contains("expected i64"), "{err}");
        let err = parse(r#"{"price": "2", "quantity": 1}"#).unwrap_err();
        assert!(err.starts_with("invalid type: string \"2\", expected i64"), "{err}");
        assert!(parse(r#"{"price": null, "quantity": 1}"#).is_err());
    }
}
