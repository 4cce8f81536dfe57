//! Money: exact decimal amounts in major units on the wire (`19.99`,
//! `1200.0`, `"5"`), integer minor units (cents) inside.
//!
//! Amounts are never a binary float. A JSON number is read from its own
//! text: the workspace builds serde_json with `arbitrary_precision`, so a
//! number keeps the digits the sender wrote (`1200.0` stays `1200.0`), and
//! [`Money::parse`] turns that text into cents with decimal arithmetic
//! (`rust_decimal`). An amount with more than two decimal places, or beyond
//! ±92 233 720 368 547 758.07, is an error rather than a rounding. Written
//! out, an amount is a JSON number with exactly two decimals (`1250.00`).

use std::fmt;
use std::iter::Sum;
use std::str::FromStr;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount of money, exact to the cent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Why a text is not an amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not a decimal number.
    #[error("must be a decimal amount such as 19.99, got {0:?}")]
    Syntax(String),
    /// More than two decimal places.
    #[error("must have at most 2 decimal places, got {0}")]
    TooPrecise(String),
    /// Too large to hold exactly.
    #[error("is out of range: {0}")]
    OutOfRange(String),
}

impl Money {
    /// Nothing.
    pub const ZERO: Money = Money(0);

    /// The amount of `minor` units (cents): `from_minor(1999)` is 19.99.
    pub const fn from_minor(minor: i64) -> Self {
        Self(minor)
    }

    /// The amount in minor units (cents), as it is stored.
    pub const fn minor(self) -> i64 {
        self.0
    }

    /// Parses a decimal amount in major units exactly: `19.99`, `1200.0`,
    /// `5`, `1.5e3`, `-0.10`. Trailing zeros do not count as decimals
    /// (`19.990` is 19.99); a third significant decimal is an error.
    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        let number_like = text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
            && text.bytes().any(|b| b.is_ascii_digit())
            && !text.starts_with('+');
        if !number_like {
            return Err(MoneyError::Syntax(text.to_owned()));
        }
        let decimal =
            if text.contains(['e', 'E']) { Decimal::from_scientific(text) } else { Decimal::from_str_exact(text) }
                .map_err(|e| match e {
                    rust_decimal::Error::ScaleExceedsMaximumPrecision(_)
                    | rust_decimal::Error::ExceedsMaximumPossibleValue
                    | rust_decimal::Error::LessThanMinimumPossibleValue
                    | rust_decimal::Error::Underflow => MoneyError::OutOfRange(text.to_owned()),
                    _ => MoneyError::Syntax(text.to_owned()),
                })?
                .normalize();
        if decimal.scale() > 2 {
            return Err(MoneyError::TooPrecise(text.to_owned()));
        }
        let minor = decimal
            .checked_mul(Decimal::ONE_HUNDRED)
            .and_then(|cents| cents.to_i64())
            .ok_or_else(|| MoneyError::OutOfRange(text.to_owned()))?;
        Ok(Self(minor))
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    /// `self × quantity`, or `None` on overflow.
    pub fn checked_mul(self, quantity: i64) -> Option<Money> {
        self.0.checked_mul(quantity).map(Money)
    }
}

impl fmt::Display for Money {
    /// Major units with exactly two decimals: `1250.00`, `-0.05`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Sum for Money {
    /// Saturating: callers bound amounts and quantities so sums cannot
    /// overflow; saturating keeps a bug from wrapping to a small amount.
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        Money(iter.fold(0i64, |acc, m| acc.saturating_add(m.0)))
    }
}

impl Serialize for Money {
    /// A JSON number with two decimals, written digit for digit.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.to_string();
        match serde_json::Number::from_str(&text) {
            Ok(number) => number.serialize(serializer),
            // Unreachable for the text Display writes; a string is still exact.
            Err(_) => serializer.serialize_str(&text),
        }
    }
}

impl<'de> Deserialize<'de> for Money {
    /// A JSON number or a string holding one, from its exact text.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `Value` holds a number's own text (arbitrary_precision); from a
        // `Value` tree, serde_json hands over an `f64` only when it prints
        // back to exactly the original text, so the text is recovered either
        // way.
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Number(n) => Money::parse(&n.to_string()).map_err(serde::de::Error::custom),
            serde_json::Value::String(s) => {
                if !plain_decimal(&s) {
                    return Err(serde::de::Error::custom(MoneyError::Syntax(s)));
                }
                // A string is the amount as written: `"19.990"` has three
                // decimal places, even if the third is a zero.
                if s.split_once('.').is_some_and(|(_, fraction)| fraction.len() > 2) {
                    return Err(serde::de::Error::custom(MoneyError::TooPrecise(s)));
                }
                Money::parse(&s).map_err(serde::de::Error::custom)
            }
            other => Err(serde::de::Error::invalid_type(unexpected(&other), &"a decimal amount such as 19.99")),
        }
    }
}

/// `-?[0-9]+(\.[0-9]+)?`: the form a string amount must have.
fn plain_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    all_digits(whole) && all_digits(fraction)
}

/// Serializes an amount stored in minor units (an `i64` column) as money:
/// `#[serde(serialize_with = "orderflow_envelope::money::serialize_minor")]`.
pub fn serialize_minor<S: Serializer>(minor: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    Money::from_minor(*minor).serialize(serializer)
}

fn unexpected(v: &serde_json::Value) -> serde::de::Unexpected<'_> {
    use serde::de::Unexpected;
    match v {
        serde_json::Value::Null => Unexpected::Unit,
        serde_json::Value::Bool(b) => Unexpected::Bool(*b),
        serde_json::Value::Array(_) => Unexpected::Seq,
        serde_json::Value::Object(_) => Unexpected::Map,
        serde_json::Value::Number(_) | serde_json::Value::String(_) => Unexpected::Other("value"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Line {
        price: Money,
    }

    fn read(json: &str) -> Result<Money, String> {
        serde_json::from_str::<Line>(json).map(|l| l.price).map_err(|e| e.to_string())
    }

    #[test]
    fn numbers_and_strings_are_read_exactly() {
        assert_eq!(read(r#"{"price": 1200.0}"#), Ok(Money::from_minor(120_000)));
        assert_eq!(read(r#"{"price": 19.99}"#), Ok(Money::from_minor(1999)));
        assert_eq!(read(r#"{"price": 5}"#), Ok(Money::from_minor(500)));
        assert_eq!(read(r#"{"price": "19.99"}"#), Ok(Money::from_minor(1999)));
        assert_eq!(read(r#"{"price": 1.5e3}"#), Ok(Money::from_minor(150_000)));
        assert_eq!(read(r#"{"price": 19.990}"#), Ok(Money::from_minor(1999)));
        assert_eq!(read(r#"{"price": 0.1}"#), Ok(Money::from_minor(10)));
        // 92233720368547758.07 is the largest; one more cent does not fit.
        assert_eq!(read(r#"{"price": 92233720368547758.07}"#), Ok(Money::from_minor(i64::MAX)));
        assert!(read(r#"{"price": 92233720368547758.08}"#).unwrap_err().contains("out of range"));
    }

    #[test]
    fn more_than_two_decimals_and_non_numbers_are_errors() {
        assert!(read(r#"{"price": 19.999}"#).unwrap_err().contains("at most 2 decimal places"));
        assert!(read(r#"{"price": "19.999"}"#).unwrap_err().contains("at most 2 decimal places"));
        assert!(read(r#"{"price": 1e-3}"#).unwrap_err().contains("at most 2 decimal places"));
        for bad in [r#""""#, r#""abc""#, r#"" 5""#, r#""+5""#, r#""1e3""#, "null", "true", "[1]", r#""5.""#] {
            assert!(read(&format!(r#"{{"price": {bad}}}"#)).is_err(), "{bad}");
        }
    }

    #[test]
    fn sums_are_exact_and_written_with_two_decimals() {
        let total: Money = [Money::parse("0.1").unwrap(), Money::parse("0.2").unwrap()].into_iter().sum();
        assert_eq!(total, Money::from_minor(30));
        assert_eq!(serde_json::to_string(&Line { price: total }).unwrap(), r#"{"price":0.30}"#);
        assert_eq!(serde_json::to_string(&Line { price: Money::from_minor(125_000) }).unwrap(), r#"{"price":1250.00}"#);
        assert_eq!(Money::from_minor(-5).to_string(), "-0.05");
        // Through a `Value` tree (how event payloads travel) nothing changes.
        let value = serde_json::to_value(Line { price: Money::from_minor(1999) }).unwrap();
        assert_eq!(value.to_string(), r#"{"price":19.99}"#);
        assert_eq!(serde_json::from_value::<Line>(value).unwrap().price, Money::from_minor(1999));
        let value = serde_json::to_value(Line { price: Money::from_minor(120_000) }).unwrap();
        assert_eq!(value.to_string(), r#"{"price":1200.00}"#);
        assert_eq!(serde_json::from_value::<Line>(value).unwrap().price, Money::from_minor(120_000));
    }
}
