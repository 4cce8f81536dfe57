//! Diesel schema of processor-service's own tables (see `migrations/`).
#![allow(missing_docs)]

diesel::table! {
    products (sku) {
        sku -> Text,
        name -> Text,
        price -> Int8,
        on_hand -> Int4,
        reserved -> Int4,
        shipped -> Int4,
        received -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    reservations (order_id) {
        order_id -> Text,
        status -> Text,
        items -> Jsonb,
        reason -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    payments (order_id) {
        order_id -> Text,
        payment_id -> Uuid,
        amount -> Int8,
        status -> Text,
        reason -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    shipments (order_id) {
        order_id -> Text,
        shipment_id -> Uuid,
        tracking_number -> Text,
        status -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    notifications (id) {
        id -> Uuid,
        order_id -> Text,
        customer_id -> Text,
        kind -> Text,
        text -> Text,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
        created_at -> Timestamptz,
        delivered_at -> Nullable<Timestamptz>,
        traceparent -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(reservations, payments);
