//! What can never become an AMQP message, refused when it is written rather
//! than found out by the relay, where it could only be parked dead.

use orderflow_envelope::Envelope;

/// AMQP sends the routing key (the event type) and the `type` property as
/// short strings: at most 255 bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 255;

/// Default bound of a message body (the encoded envelope): 16 MiB, the
/// default `max_message_size` of RabbitMQ 4 (3.x allows 128 MiB). An event
/// anywhere near it is almost certainly a bug.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The content header (properties and headers) must fit one AMQP frame;
/// RabbitMQ's default `frame_max` is 128 KiB. The envelope's own fields
/// (ids, type, timestamps) take about 300 bytes; the rest is what the writer
/// controls: aggregate type and id, and the trace context.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Size limits of outbox rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message body in bytes (see [`DEFAULT_MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES }
    }
}

/// Why an event can never be published. [`crate::append`] returns it inside
/// `diesel::result::Error::SerializationError`; [`Unpublishable::find`]
/// gets it back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpublishable {
    /// The event type does not fit an AMQP short string.
    #[error("event type is {len} bytes long; AMQP routing keys hold at most {MAX_EVENT_TYPE_BYTES}")]
    EventTypeTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The encoded envelope is larger than the configured limit.
    #[error("message is {bytes} bytes, above the limit of {max} bytes")]
    MessageTooLarge {
        /// Size of the encoded envelope.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Aggregate type, aggregate id and trace context would not fit the
    /// message's content header frame.
    #[error(
        "aggregate type, aggregate id and traceparent take {bytes} bytes; at most {MAX_HEADER_BYTES} fit the AMQP header frame"
    )]
    HeadersTooLarge {
        /// Their size.
        bytes: usize,
    },
}

impl Unpublishable {
    /// The refusal inside an error returned by [`crate::append`] or
    /// [`crate::emit`], if that is what it is.
    pub fn find(error: &diesel::result::Error) -> Option<&Self> {
        match error {
            diesel::result::Error::SerializationError(e) => e.downcast_ref::<Self>(),
            _ => None,
        }
    }
}

impl Limits {
    /// Checks what the relay checks before sending: the routing key and the
    /// body size. Returns the encoded body.
    pub fn sendable(&self, env: &Envelope) -> Result<Vec<u8>, Unpublishable> {
        if env.event_type.len() > MAX_EVENT_TYPE_BYTES {
            return Err(Unpublishable::EventTypeTooLong { len: env.event_type.len() });
        }
        let body = env.to_vec();
        if body.len() > self.max_message_bytes {
            return Err(Unpublishable::MessageTooLarge { bytes: body.len(), max: self.max_message_bytes });
        }
        Ok(body)
    }

    /// Checks everything a writer can get wrong, the header size included
    /// (the relay leaves that one to the broker, whose frame size it is, and
    /// charges its refusal to the row).
    pub fn check(&self, env: &Envelope) -> Result<(), Unpublishable> {
        let header =
            env.aggregate_type.len() + env.aggregate_id.len() + env.traceparent.as_ref().map_or(0, String::len);
        if header > MAX_HEADER_BYTES {
            return Err(Unpublishable::HeadersTooLarge { bytes: header });
        }
        self.sendable(env).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use orderflow_envelope::Metadata;
    use orderflow_testkit::events::Noted;
    use uuid::Uuid;

    use super::*;

    fn event() -> Envelope {
        Envelope::new(&Noted { key: Uuid::now_v7().to_string(), note: "r".into() }, 1, &Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn refuses_what_amqp_cannot_carry() {
        let limits = Limits::default();
        assert_eq!(limits.check(&event()), Ok(()));
        let mut e = event();
        e.event_type = "x".repeat(256);
        assert_eq!(limits.check(&e), Err(Unpublishable::EventTypeTooLong { len: 256 }));
        e.event_type = "x".repeat(255);
        assert_eq!(limits.check(&e), Ok(()));
        let mut e = event();
        e.payload = serde_json::json!({ "blob": "y".repeat(DEFAULT_MAX_MESSAGE_BYTES) });
        assert!(matches!(limits.check(&e), Err(Unpublishable::MessageTooLarge { max: DEFAULT_MAX_MESSAGE_BYTES, .. })));
        let mut e = event();
        e.aggregate_id = "z".repeat(MAX_HEADER_BYTES + 1);
        assert!(matches!(limits.check(&e), Err(Unpublishable::HeadersTooLarge { .. })));
    }
}
