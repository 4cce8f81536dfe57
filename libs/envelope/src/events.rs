//! The events of the order pipeline (see DESIGN.md, "The order pipeline").
//!
//! Every event is about one order, and its aggregate id is the order id, so
//! that in each service's outbox all events of one order share a lane and are
//! published in the order they were written. Money is in integer minor units
//! (cents); nothing here uses floats.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{DecodeError, DomainEvent, Envelope, SchemaVersion};

/// One line of an order, as carried between services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    /// Product SKU.
    pub sku: String,
    /// Units ordered (> 0).
    pub quantity: i32,
    /// Price of one unit in minor units.
    pub unit_price: i64,
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
                    self.order_id.to_string()
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
            pub fn order_id(&self) -> Uuid {
                match self {
                    $( Event::$variant(e) => e.order_id, )*
                }
            }

            /// The event's routing key.
            pub fn event_type(&self) -> &'static str {
                match self {
                    $( Event::$variant(_) => $event_type, )*
                }
            }
        }
    };
}

catalog! {
    /// An order was accepted (order-service).
    OrderCreated => "order.created", "order", v(1, 0);
    /// Stock for every line was reserved (inventory).
    InventoryReserved => "inventory.reserved", "reservation", v(1, 0);
    /// Stock could not be reserved (inventory).
    InventoryRejected => "inventory.rejected", "reservation", v(1, 0);
    /// Reserved stock went back on hand (inventory, compensation).
    InventoryReleased => "inventory.released", "reservation", v(1, 0);
    /// The payment was authorized (payment).
    PaymentAuthorized => "payment.authorized", "payment", v(1, 1);
    /// The payment was declined (payment).
    PaymentDeclined => "payment.declined", "payment", v(1, 0);
    /// An authorized payment was refunded (payment, compensation).
    PaymentRefunded => "payment.refunded", "payment", v(1, 0);
    /// A shipment was created (shipping).
    ShipmentCreated => "shipment.created", "shipment", v(1, 1);
    /// The order reached `confirmed` (order-service).
    OrderConfirmed => "order.confirmed", "order", v(1, 0);
    /// The order reached `failed` (order-service).
    OrderFailed => "order.failed", "order", v(1, 0);
    /// The order was cancelled (order-service).
    OrderCancelled => "order.cancelled", "order", v(1, 0);
}

/// `order.created`: what inventory needs to reserve and what payment needs
/// later (carried forward in `inventory.reserved`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<LineItem>,
    /// Sum of quantity × unit price, minor units.
    pub total_amount: i64,
    /// Ask payment to decline (for demos and tests).
    #[serde(default)]
    pub force_fail: bool,
}

/// `inventory.reserved`: stock is held for every line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Lines reserved.
    pub items: Vec<LineItem>,
    /// Amount to charge, minor units.
    pub total_amount: i64,
    /// Carried forward from `order.created`.
    #[serde(default)]
    pub force_fail: bool,
}

/// `inventory.rejected`: nothing was reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryRejected {
    /// The order.
    pub order_id: Uuid,
    /// Why, e.g. `insufficient stock for SKU-1 (wanted 3, on hand 1)`.
    pub reason: String,
}

/// `inventory.released`: a reservation went back on hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    /// The order.
    pub order_id: Uuid,
    /// Lines released.
    pub items: Vec<LineItem>,
    /// Why, e.g. `payment declined` or `order cancelled`.
    pub reason: String,
}

/// `payment.authorized`: the customer was charged (once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    /// The order.
    pub order_id: Uuid,
    /// The payment.
    pub payment_id: Uuid,
    /// Amount charged, minor units.
    pub amount: i64,
    /// Who ordered (added in 1.1, carried on to shipping; absent from 1.0
    /// messages).
    #[serde(default)]
    pub customer_id: Option<String>,
}

/// `payment.declined`: nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    /// The order.
    pub order_id: Uuid,
    /// Why, e.g. `amount 120000 exceeds limit 100000`.
    pub reason: String,
}

/// `payment.refunded`: an authorized payment was given back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: Uuid,
    /// The payment refunded.
    pub payment_id: Uuid,
    /// Amount refunded, minor units.
    pub amount: i64,
}

/// `shipment.created`: the order is shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCreated {
    /// The order.
    pub order_id: Uuid,
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
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Amount charged, minor units.
    pub total_amount: i64,
    /// Carrier tracking number.
    pub tracking_number: Option<String>,
}

/// `order.failed`: final, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFailed {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Why it failed.
    pub reason: String,
}

/// `order.cancelled`: final, compensation follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Reason given by the caller, if any.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Metadata;

    #[test]
    fn decodes_by_type() {
        let order_id = Uuid::now_v7();
        let env = Envelope::new(&PaymentDeclined { order_id, reason: "no".into() }, 2, &Metadata::default()).unwrap();
        assert_eq!(env.aggregate_id, order_id.to_string());
        assert_eq!(env.event_type, "payment.declined");
        let ev = Event::decode(&env).unwrap();
        assert_eq!(ev.order_id(), order_id);
        assert_eq!(ev.event_type(), "payment.declined");
    }

    #[test]
    fn wrong_types_are_invalid_payloads() {
        let mut env =
            Envelope::new(&PaymentDeclined { order_id: Uuid::now_v7(), reason: "no".into() }, 2, &Metadata::default())
                .unwrap();
        env.payload["order_id"] = serde_json::json!(42);
        assert!(matches!(Event::decode(&env), Err(DecodeError::InvalidPayload { .. })));
        env.event_type = "order.teleported".into();
        assert!(matches!(Event::decode(&env), Err(DecodeError::UnknownEventType(_))));
    }
}
