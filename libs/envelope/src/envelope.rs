use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Number of relay lanes. Outbox rows are split into lanes by aggregate id so
/// that each lane (and therefore each aggregate) is published by one relay at
/// a time. Changing it re-maps aggregates to lanes, so it is a platform
/// constant rather than configuration.
pub const LANE_COUNT: i16 = 32;

/// The lane of an aggregate: a stable hash (CRC-32) of its id modulo
/// [`LANE_COUNT`]. Stable across processes, versions and platforms, unlike
/// `std`'s randomly seeded hasher.
pub fn lane_for(aggregate_id: &str) -> i16 {
    let lanes = LANE_COUNT as u32;
    // The remainder is < LANE_COUNT, which fits an i16.
    (crc32fast::hash(aggregate_id.as_bytes()) % lanes) as i16
}

/// `major.minor` schema version of an event payload.
///
/// A consumer accepts any minor version of a major it knows (added fields are
/// ignored) and dead-letters an unknown major version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchemaVersion {
    /// Incompatible changes bump the major version.
    pub major: u16,
    /// Backward-compatible additions bump the minor version.
    pub minor: u16,
}

impl SchemaVersion {
    /// Builds a version.
    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for SchemaVersion {
    type Err = DecodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DecodeError::BadSchemaVersion(s.to_owned());
        let (major, minor) = s.split_once('.').unwrap_or((s, "0"));
        Ok(Self { major: major.parse().map_err(|_| bad())?, minor: minor.parse().map_err(|_| bad())? })
    }
}

impl Serialize for SchemaVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Tracing and causality metadata carried from a request or an incoming
/// event into the events it causes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Shared by every event caused, directly or not, by one request.
    pub correlation_id: Option<Uuid>,
    /// The message that caused this one (None for events caused by a request).
    pub causation_id: Option<Uuid>,
    /// W3C trace context of the span that wrote the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Metadata {
    /// Metadata for events caused by `cause`: same correlation and trace,
    /// causation = the cause's message id.
    pub fn caused_by(cause: &Envelope) -> Self {
        Self {
            correlation_id: Some(cause.correlation_id),
            causation_id: Some(cause.message_id),
            traceparent: cause.traceparent.clone(),
        }
    }
}

/// A typed event: its routing key, aggregate and version.
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// Routing key and catalog name, e.g. `points.granted`.
    const EVENT_TYPE: &'static str;
    /// Aggregate kind, e.g. `order`.
    const AGGREGATE_TYPE: &'static str;
    /// Version of this payload's schema.
    const SCHEMA_VERSION: SchemaVersion;
    /// Id of the aggregate the event is about (the ordering and lane key).
    fn aggregate_id(&self) -> String;
}

/// The events a consumer decodes from envelopes: one [`DomainEvent`] type
/// (every one is an `EventSet` of itself), or a catalog's sum type of
/// several (an enum whose `from_envelope` dispatches on the event type).
///
/// An envelope of a type the set does not hold is a
/// [`DecodeError::UnknownEventType`]; a consumer dead-letters it.
pub trait EventSet: Sized + Send + Sync + 'static {
    /// Decodes the envelope's payload into the event its `event_type` names.
    fn from_envelope(env: &Envelope) -> Result<Self, DecodeError>;
}

impl<E: DomainEvent + Send + Sync + 'static> EventSet for E {
    fn from_envelope(env: &Envelope) -> Result<Self, DecodeError> {
        env.decode::<E>()
    }
}

/// The envelope of one event, as stored in the outbox and sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id: the dedupe key of every inbox.
    pub message_id: Uuid,
    /// Routing key, e.g. `points.granted`.
    pub event_type: String,
    /// Schema version of `payload`.
    pub schema_version: SchemaVersion,
    /// Aggregate kind, e.g. `order`.
    pub aggregate_type: String,
    /// Aggregate id: events of one aggregate are published in written order.
    pub aggregate_id: String,
    /// Version of the aggregate after the change that produced the event.
    pub aggregate_version: i64,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
    /// Shared by every event caused by one request.
    pub correlation_id: Uuid,
    /// The message that caused this one, if any.
    #[serde(default)]
    pub causation_id: Option<Uuid>,
    /// W3C trace context of the writer's span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The event itself.
    pub payload: serde_json::Value,
}

/// Why a message could not be turned into an envelope or a typed event.
/// Every variant is permanent: retrying cannot fix the bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is not a JSON envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The schema version is not `major.minor`.
    #[error("bad schema version {0:?}")]
    BadSchemaVersion(String),
    /// The major version is not one this consumer understands.
    #[error("unsupported schema version {found} of {event_type} (this consumer reads major {supported})")]
    UnsupportedVersion {
        /// Event type of the message.
        event_type: String,
        /// Version found in the message.
        found: SchemaVersion,
        /// Major version understood here.
        supported: u16,
    },
    /// The event type is not one the decoder knows.
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    /// The payload does not match the event type's schema.
    #[error("invalid {event_type} payload: {reason}")]
    InvalidPayload {
        /// Event type of the message.
        event_type: String,
        /// What serde said.
        reason: String,
    },
}

impl Envelope {
    /// Wraps a typed event. `aggregate_version` is the aggregate's version
    /// after the change; `meta` links it to its request or cause.
    pub fn new<E: DomainEvent>(event: &E, aggregate_version: i64, meta: &Metadata) -> Result<Self, serde_json::Error> {
        let message_id = Uuid::now_v7();
        Ok(Self {
            message_id,
            event_type: E::EVENT_TYPE.to_owned(),
            schema_version: E::SCHEMA_VERSION,
            aggregate_type: E::AGGREGATE_TYPE.to_owned(),
            aggregate_id: event.aggregate_id(),
            aggregate_version,
            occurred_at: Utc::now(),
            correlation_id: meta.correlation_id.unwrap_or(message_id),
            causation_id: meta.causation_id,
            traceparent: meta.traceparent.clone(),
            payload: serde_json::to_value(event)?,
        })
    }

    /// Decodes the wire form.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
    }

    /// Encodes the wire form.
    pub fn to_vec(&self) -> Vec<u8> {
        // Serializing a struct of strings, ids and a `Value` cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The lane of this envelope's aggregate.
    pub fn lane(&self) -> i16 {
        lane_for(&self.aggregate_id)
    }

    /// Decodes the payload as `E`, checking the type and the major version.
    /// Unknown fields are ignored, so newer minor versions are accepted.
    pub fn decode<E: DomainEvent>(&self) -> Result<E, DecodeError> {
        if self.event_type != E::EVENT_TYPE {
            return Err(DecodeError::UnknownEventType(self.event_type.clone()));
        }
        if self.schema_version.major != E::SCHEMA_VERSION.major {
            return Err(DecodeError::UnsupportedVersion {
                event_type: self.event_type.clone(),
                found: self.schema_version,
                supported: E::SCHEMA_VERSION.major,
            });
        }
        // Deserialized from the borrowed tree: no copy of the payload.
        E::deserialize(&self.payload)
            .map_err(|e| DecodeError::InvalidPayload { event_type: self.event_type.clone(), reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Ping {
        id: String,
    }

    impl DomainEvent for Ping {
        const EVENT_TYPE: &'static str = "ping.sent";
        const AGGREGATE_TYPE: &'static str = "ping";
        const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
        fn aggregate_id(&self) -> String {
            self.id.clone()
        }
    }

    #[test]
    fn round_trips_and_keeps_causality() {
        let first = Envelope::new(&Ping { id: "a".into() }, 1, &Metadata::default()).unwrap();
        assert_eq!(first.correlation_id, first.message_id);
        let second = Envelope::new(&Ping { id: "a".into() }, 2, &Metadata::caused_by(&first)).unwrap();
        assert_eq!(second.correlation_id, first.message_id);
        assert_eq!(second.causation_id, Some(first.message_id));
        let back = Envelope::from_slice(&second.to_vec()).unwrap();
        assert_eq!(back, second);
        assert_eq!(back.decode::<Ping>().unwrap(), Ping { id: "a".into() });
    }

    #[test]
    fn newer_minor_with_added_fields_is_accepted() {
        let mut env = Envelope::new(&Ping { id: "a".into() }, 1, &Metadata::default()).unwrap();
        env.schema_version = SchemaVersion::new(1, 7);
        env.payload["added_later"] = serde_json::json!(true);
        assert_eq!(env.decode::<Ping>().unwrap().id, "a");
    }

    #[test]
    fn unknown_major_is_rejected() {
        let mut env = Envelope::new(&Ping { id: "a".into() }, 1, &Metadata::default()).unwrap();
        env.schema_version = SchemaVersion::new(2, 0);
        let err = env.decode::<Ping>().unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedVersion { .. }), "{err}");
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(Envelope::from_slice(b"{nope"), Err(DecodeError::Malformed(_))));
        assert!(matches!(Envelope::from_slice(br#"{"message_id": 5}"#), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn lanes_are_stable_and_in_range() {
        assert_eq!(lane_for("order-1"), lane_for("order-1"));
        for i in 0..1000 {
            let lane = lane_for(&format!("agg-{i}"));
            assert!((0..LANE_COUNT).contains(&lane));
        }
    }
}
