//! Diesel schema of order-service's own tables (see `migrations/`).
#![allow(missing_docs)]

diesel::table! {
    orders (id) {
        id -> Text,
        customer_id -> Text,
        status -> Text,
        total_amount -> Int8,
        force_fail -> Bool,
        fail_reason -> Nullable<Text>,
        cancel_reason -> Nullable<Text>,
        tracking_number -> Nullable<Text>,
        version -> Int8,
        request_hash -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    order_items (order_id, line_no) {
        order_id -> Text,
        line_no -> Int4,
        sku -> Text,
        quantity -> Int4,
        unit_price -> Int8,
    }
}

diesel::table! {
    order_timeline (id) {
        id -> Int8,
        order_id -> Text,
        event_type -> Text,
        message_id -> Uuid,
        occurred_at -> Timestamptz,
        recorded_at -> Timestamptz,
        details -> Jsonb,
    }
}

diesel::joinable!(order_items -> orders (order_id));
diesel::joinable!(order_timeline -> orders (order_id));
diesel::allow_tables_to_appear_in_same_query!(orders, order_items, order_timeline);
