//! Events of the platform's own tests: they belong to no service, so the
//! platform crates test the outbox, the relay and the consumer runtime
//! without knowing any service's catalog.

use orderflow_envelope::{DecodeError, DomainEvent, Envelope, EventSet, SchemaVersion};
use serde::{Deserialize, Serialize};

/// `test.noted`: a note about a key. Test handlers read scripts from `note`
/// (e.g. `permanent`, `transient:2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Noted {
    /// The aggregate (ordering and lane key).
    pub key: String,
    /// Free text.
    pub note: String,
}

impl DomainEvent for Noted {
    const EVENT_TYPE: &'static str = "test.noted";
    const AGGREGATE_TYPE: &'static str = "test";
    const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
    fn aggregate_id(&self) -> String {
        self.key.clone()
    }
}

/// `test.tallied`: an amount counted for a key (a second event type, e.g.
/// one that no queue is bound to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tallied {
    /// The aggregate (ordering and lane key).
    pub key: String,
    /// The amount.
    pub amount: i64,
}

impl DomainEvent for Tallied {
    const EVENT_TYPE: &'static str = "test.tallied";
    const AGGREGATE_TYPE: &'static str = "test";
    const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
    fn aggregate_id(&self) -> String {
        self.key.clone()
    }
}

/// Either test event: a catalog's sum type, as a service would write one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestEvent {
    /// `test.noted`
    Noted(Noted),
    /// `test.tallied`
    Tallied(Tallied),
}

impl EventSet for TestEvent {
    fn from_envelope(env: &Envelope) -> Result<Self, DecodeError> {
        match env.event_type.as_str() {
            Noted::EVENT_TYPE => env.decode().map(Self::Noted),
            Tallied::EVENT_TYPE => env.decode().map(Self::Tallied),
            other => Err(DecodeError::UnknownEventType(other.to_owned())),
        }
    }
}
