//! The events loyalty-service writes, and the ones it reads.

use orderflow_contracts::events::{OrderCancelled, OrderConfirmed};
use orderflow_envelope::{DecodeError, DomainEvent, Envelope, EventSet, SchemaVersion};
use serde::{Deserialize, Serialize};

/// `points.granted`: a confirmed order earned points. The aggregate is the
/// customer, so one customer's grants and revokes are published in the
/// order they were written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsGranted {
    /// The customer.
    pub customer_id: String,
    /// The order that earned them.
    pub order_id: String,
    /// Points earned.
    pub points: i64,
    /// The balance after the grant.
    pub balance: i64,
}

impl DomainEvent for PointsGranted {
    const EVENT_TYPE: &'static str = "points.granted";
    const AGGREGATE_TYPE: &'static str = "loyalty-account";
    const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
    fn aggregate_id(&self) -> String {
        self.customer_id.clone()
    }
}

/// `points.revoked`: a cancelled order's points were taken back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsRevoked {
    /// The customer.
    pub customer_id: String,
    /// The cancelled order.
    pub order_id: String,
    /// Points taken back.
    pub points: i64,
    /// The balance after the revoke.
    pub balance: i64,
}

impl DomainEvent for PointsRevoked {
    const EVENT_TYPE: &'static str = "points.revoked";
    const AGGREGATE_TYPE: &'static str = "loyalty-account";
    const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
    fn aggregate_id(&self) -> String {
        self.customer_id.clone()
    }
}

/// What the consumer reads: two events of the order pipeline's catalog.
/// Any other event type on its queue is dead-lettered by the runtime as
/// unknown, before the handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `order.confirmed`: grant points.
    Confirmed(OrderConfirmed),
    /// `order.cancelled`: revoke them.
    Cancelled(OrderCancelled),
}

impl Input {
    /// The routing keys the consumer's queue is bound to.
    pub const BINDINGS: &'static [&'static str] = &[OrderConfirmed::EVENT_TYPE, OrderCancelled::EVENT_TYPE];
}

impl EventSet for Input {
    fn from_envelope(env: &Envelope) -> Result<Self, DecodeError> {
        match env.event_type.as_str() {
            OrderConfirmed::EVENT_TYPE => env.decode().map(Self::Confirmed),
            OrderCancelled::EVENT_TYPE => env.decode().map(Self::Cancelled),
            other => Err(DecodeError::UnknownEventType(other.to_owned())),
        }
    }
}
