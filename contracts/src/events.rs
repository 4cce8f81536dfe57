//! The events of the order pipeline (see DESIGN.md, "The order pipeline").
//!
//! Every event is about one order, and its aggregate id is the order id, so
//! that in each service's outbox all events of one order share a lane and are
//! published in the order they were written.
//!
//! Schema 2.0 of every event: order ids are the clients' own strings (1 to
//! 64 characters of `A-Z a-z 0-9 . _ : -`, or a UUIDv7 the service made), and
//! amounts are [`Money`]: exact decimal numbers in major units (`1250.00`).
//! 1.x messages (UUID ids, integer cents) are refused as an unknown major
//! version and dead-lettered; drain the queues before upgrading from 1.x.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use orderflow_envelope::{DecodeError, DomainEvent, Envelope, EventSet, SchemaVersion};

use crate::Money;

/// One line of an order, as carried between services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    /// Product SKU.
    pub sku: String,
    /// Units ordered (> 0).
    pub quantity: i32,
    /// Price of one unit, as the customer saw it.
    pub unit_price: Money,
}

/// Declares event structs' catalog entries and the [`Event`] sum type.
macro_rules! catalog {
    ($( $(#[$doc:meta])* $variant:ident => $event_type:literal, $aggregate:literal, v($major:literal, $minor:literal); )*) => {
        $(
            impl DomainEvent for $variant {
                const EVENT_TYPE: &'static str = $event_type;
                const AGGREGATE_TYPE: &'static str = $aggregate;
                const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new($major, $minor);
                fn aggregate_id(&self) -> String {
                    self.order_id.clone()
                }
            }

            impl From<$variant> for Event {
                fn from(e: $variant) -> Self {
                    Event::$variant(e)
                }
            }
        )*

        /// Any event of the catalog, decoded from an envelope.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            $( $(#[$doc])* $variant($variant), )*
        }

        impl Event {
            /// Every event type of the catalog (the routing keys).
            pub const ALL_TYPES: &'static [&'static str] = &[$($event_type),*];

            /// Decodes an envelope into the typed event its `event_type` names.
            pub fn decode(env: &Envelope) -> Result<Self, DecodeError> {
                match env.event_type.as_str() {
                    $( $event_type => env.decode::<$variant>().map(Event::$variant), )*
                    other => Err(DecodeError::UnknownEventType(other.to_owned())),
                }
            }

            /// The order this event is about.
            pub fn order_id(&self) -> &str {
                match self {
                    $( Event::$variant(e) => &e.order_id, )*
                }
            }

            /// The event's routing key.
            pub fn event_type(&self) -> &'static str {
                match self {
                    $( Event::$variant(_) => $event_type, )*
                }
            }
        }

        impl EventSet for Event {
            fn from_envelope(env: &Envelope) -> Result<Self, DecodeError> {
                Event::decode(env)
            }
        }
    };
}

catalog! {
    /// An order was accepted (order-service).
    OrderCreated => "order.created", "order", v(2, 0);
    /// Stock for every line was reserved (inventory).
    InventoryReserved => "inventory.reserved", "reservation", v(2, 0);
    /// Stock could not be reserved (inventory).
    InventoryRejected => "inventory.rejected", "reservation", v(2, 0);
    /// Reserved stock went back on hand (inventory, compensation).
    InventoryReleased => "inventory.released", "reservation", v(2, 0);
    /// The payment was authorized (payment).
    PaymentAuthorized => "payment.authorized", "payment", v(2, 0);
    /// The payment was declined (payment).
    PaymentDeclined => "payment.declined", "payment", v(2, 0);
    /// An authorized payment was refunded (payment, compensation).
    PaymentRefunded => "payment.refunded", "payment", v(2, 0);
    /// A shipment was created (shipping).
    ShipmentCreated => "shipment.created", "shipment", v(2, 0);
    /// The order reached `confirmed` (order-service).
    OrderConfirmed => "order.confirmed", "order", v(2, 0);
    /// The order reached `failed` (order-service).
    OrderFailed => "order.failed", "order", v(2, 0);
    /// The order was cancelled (order-service).
    OrderCancelled => "order.cancelled", "order", v(2, 0);
}

/// `order.created`: what inventory needs to reserve and what payment needs
/// later (carried forward in `inventory.reserved`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<LineItem>,
    /// Sum of quantity × unit price.
    pub total_amount: Money,
    /// Ask payment to decline (for demos and tests).
    #[serde(default)]
    pub force_fail: bool,
}

/// `inventory.reserved`: stock is held for every line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Lines reserved.
    pub items: Vec<LineItem>,
    /// Amount to charge: the sum inventory verified against the catalog.
    pub total_amount: Money,
    /// Carried forward from `order.created`.
    #[serde(default)]
    pub force_fail: bool,
}

/// `inventory.rejected`: nothing was reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryRejected {
    /// The order.
    pub order_id: String,
    /// Why, e.g. `insufficient stock for SKU-1 (wanted 3, on hand 1)`.
    pub reason: String,
}

/// `inventory.released`: a reservation went back on hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    /// The order.
    pub order_id: String,
    /// Lines released.
    pub items: Vec<LineItem>,
    /// Why, e.g. `payment declined` or `order cancelled`.
    pub reason: String,
}

/// `payment.authorized`: the customer was charged (once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    /// The order.
    pub order_id: String,
    /// The payment.
    pub payment_id: Uuid,
    /// Amount charged.
    pub amount: Money,
    /// Who ordered (added in 1.1, carried on to shipping; absent from 1.0
    /// messages).
    #[serde(default)]
    pub customer_id: Option<String>,
}

/// `payment.declined`: nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    /// The order.
    pub order_id: String,
    /// Why, e.g. `amount 1200.00 exceeds the limit of 1000.00`.
    pub reason: String,
}

/// `payment.refunded`: an authorized payment was given back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: String,
    /// The payment refunded.
    pub payment_id: Uuid,
    /// Amount refunded.
    pub amount: Money,
}

/// `shipment.created`: the order is shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCreated {
    /// The order.
    pub order_id: String,
    /// The shipment.
    pub shipment_id: Uuid,
    /// Carrier tracking number.
    pub tracking_number: String,
    /// Who ordered (added in 1.1, for the shipping notification; absent from
    /// 1.0 messages).
    #[serde(default)]
    pub customer_id: Option<String>,
}

/// `order.confirmed`: final, success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Amount charged.
    pub total_amount: Money,
    /// Carrier tracking number.
    pub tracking_number: Option<String>,
}

/// `order.failed`: final, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFailed {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Why it failed.
    pub reason: String,
}

/// `order.cancelled`: final, compensation follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Reason given by the caller, if any.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use orderflow_envelope::Metadata;

    #[test]
    fn decodes_by_type() {
        let order_id = "ord-001".to_owned();
        let env = Envelope::new(
            &PaymentDeclined { order_id: order_id.clone(), reason: "no".into() },
            2,
            &Metadata::default(),
        )
        .unwrap();
        assert_eq!(env.aggregate_id, order_id);
        assert_eq!(env.event_type, "payment.declined");
        let ev = Event::decode(&env).unwrap();
        assert_eq!(ev.order_id(), order_id);
        assert_eq!(env.schema_version.to_string(), "2.0");
        assert_eq!(ev.event_type(), "payment.declined");
    }

    #[test]
    fn wrong_types_are_invalid_payloads() {
        let mut env =
            Envelope::new(&PaymentDeclined { order_id: "o-1".into(), reason: "no".into() }, 2, &Metadata::default())
                .unwrap();
        env.payload["order_id"] = serde_json::json!(42);
        assert!(matches!(Event::decode(&env), Err(DecodeError::InvalidPayload { .. })));
        env.event_type = "order.teleported".into();
        assert!(matches!(Event::decode(&env), Err(DecodeError::UnknownEventType(_))));
    }
}
