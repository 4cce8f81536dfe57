//! The event envelope that travels through the outbox, the broker and the
//! inbox, and the traits a service's typed events implement.
//!
//! The envelope is the one wire contract between services: it carries the
//! dedupe key (`message_id`), the routing key (`event_type`), the schema
//! version, the aggregate the event belongs to (for ordering and lanes), the
//! correlation/causation ids and the W3C `traceparent`, plus the JSON payload.
//! On the wire the whole envelope is the AMQP message body (JSON); its headers
//! are mirrored into AMQP properties for operators and tools.

//!
//! The platform knows no service's events. A service declares its own, each
//! a [`DomainEvent`] (routing key, aggregate, schema version), and a consumer
//! names the events it decodes with an [`EventSet`]: one event type, or a
//! catalog's sum type of several. Errors follow the platform's error policy
//! (`orderflow_db::error`, libs/db/src/error.rs).
//!
//! ```
//! use orderflow_envelope::{DomainEvent, Envelope, EventSet, Metadata, SchemaVersion};
//! use serde::{Deserialize, Serialize};
//!
//! /// `points.granted`: a customer earned points.
//! #[derive(Debug, Serialize, Deserialize)]
//! struct PointsGranted {
//!     customer_id: String,
//!     points: i64,
//! }
//!
//! impl DomainEvent for PointsGranted {
//!     const EVENT_TYPE: &'static str = "points.granted";
//!     const AGGREGATE_TYPE: &'static str = "customer";
//!     const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
//!     fn aggregate_id(&self) -> String {
//!         self.customer_id.clone()
//!     }
//! }
//!
//! let env = Envelope::new(&PointsGranted { customer_id: "c-1".into(), points: 5 }, 1, &Metadata::default())?;
//! assert_eq!(env.event_type, "points.granted");
//! // One event type is an EventSet of its own: other types are refused.
//! assert_eq!(PointsGranted::from_envelope(&Envelope::from_slice(&env.to_vec())?)?.points, 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod envelope;

pub use envelope::{DecodeError, DomainEvent, Envelope, EventSet, LANE_COUNT, Metadata, SchemaVersion, lane_for};
