//! Diesel schema of the platform tables (see `migrations/`).
#![allow(missing_docs)]

diesel::table! {
    outbox (id) {
        id -> Int8,
        message_id -> Uuid,
        event_type -> Text,
        schema_version -> Text,
        aggregate_type -> Text,
        aggregate_id -> Text,
        aggregate_version -> Int8,
        lane -> Int2,
        payload -> Jsonb,
        headers -> Jsonb,
        occurred_at -> Timestamptz,
        created_at -> Timestamptz,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
        published_at -> Nullable<Timestamptz>,
        dead_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    inbox (consumer, message_id) {
        consumer -> Text,
        message_id -> Uuid,
        event_type -> Text,
        received_at -> Timestamptz,
    }
}

diesel::table! {
    outbox_replays (id) {
        id -> Int8,
        replayed_at -> Timestamptz,
        operator -> Text,
        reason -> Nullable<Text>,
        kind -> Text,
        selector -> Jsonb,
        items -> Jsonb,
        item_count -> Int4,
    }
}
