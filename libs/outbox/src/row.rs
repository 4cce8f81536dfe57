use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use orderflow_db::schema::outbox;
use orderflow_envelope::Envelope;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The `headers` column: the envelope's causality and trace context.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutboxHeaders {
    /// Shared by every event of one request.
    pub correlation_id: Option<Uuid>,
    /// The message that caused this one.
    #[serde(default)]
    pub causation_id: Option<Uuid>,
    /// W3C trace context.
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl OutboxHeaders {
    /// The headers of `env`.
    pub fn of(env: &Envelope) -> Self {
        Self {
            correlation_id: Some(env.correlation_id),
            causation_id: env.causation_id,
            traceparent: env.traceparent.clone(),
        }
    }

    /// As a JSON object for the `headers` column.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// An unpublished outbox row claimed by the relay.
#[derive(Debug, Clone, QueryableByName)]
#[diesel(table_name = outbox)]
pub struct PendingRow {
    /// Row id (write order).
    pub id: i64,
    /// Dedupe key.
    pub message_id: Uuid,
    /// Routing key.
    pub event_type: String,
    /// `major.minor`.
    pub schema_version: String,
    /// Aggregate kind.
    pub aggregate_type: String,
    /// Aggregate id (ordering key).
    pub aggregate_id: String,
    /// Aggregate version.
    pub aggregate_version: i64,
    /// The event.
    pub payload: serde_json::Value,
    /// See [`OutboxHeaders`].
    pub headers: serde_json::Value,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
    /// When the row was written (transaction start of the writer).
    pub created_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: i32,
}

impl PendingRow {
    /// Rebuilds the envelope to send. A row that cannot be turned into an
    /// envelope (hand-edited, corrupted) is a permanent failure of that row.
    pub fn envelope(&self) -> Result<Envelope, String> {
        let headers: OutboxHeaders =
            OutboxHeaders::deserialize(&self.headers).map_err(|e| format!("bad headers column: {e}"))?;
        Ok(Envelope {
            message_id: self.message_id,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version.parse().map_err(|e| format!("{e}"))?,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            aggregate_version: self.aggregate_version,
            occurred_at: self.occurred_at,
            correlation_id: headers.correlation_id.unwrap_or(self.message_id),
            causation_id: headers.causation_id,
            traceparent: headers.traceparent,
            payload: self.payload.clone(),
        })
    }
}
