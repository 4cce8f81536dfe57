//! The order pipeline's contract: the events order-service and
//! processor-service exchange (schema 2.0) and the money form they carry.
//!
//! This crate is the pipeline's, not the platform's: the platform crates
//! (`libs/`) know envelopes and [`orderflow_envelope::DomainEvent`]s but no
//! event of this catalog. A consumer of the pipeline names [`events::Event`]
//! as the events its handler decodes:
//!
//! ```
//! use orderflow_contracts::events::{Event, PaymentDeclined};
//! use orderflow_envelope::{Envelope, EventSet, Metadata};
//!
//! let declined = PaymentDeclined { order_id: "ord-1".into(), reason: "limit".into() };
//! let env = Envelope::new(&declined, 3, &Metadata::default()).unwrap();
//! assert!(matches!(Event::from_envelope(&env), Ok(Event::PaymentDeclined(_))));
//! ```

pub mod events;
pub mod money;

pub use money::{Money, MoneyError};
