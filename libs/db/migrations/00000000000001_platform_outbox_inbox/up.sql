-- Platform tables shared by every orderflow service database.
-- Written once here (libs/db) and run by every service's migrations.

-- The transactional outbox: events appended in the same transaction as the
-- domain change, published later by the relay (outbox-relay).
CREATE TABLE outbox (
    id                BIGSERIAL PRIMARY KEY,
    message_id        UUID        NOT NULL UNIQUE,
    event_type        TEXT        NOT NULL,
    schema_version    TEXT        NOT NULL,
    aggregate_type    TEXT        NOT NULL,
    aggregate_id      TEXT        NOT NULL,
    aggregate_version BIGINT      NOT NULL,
    -- lane = crc32(aggregate_id) % LANE_COUNT; a lane is owned by one relay at a time.
    lane              SMALLINT    NOT NULL,
    payload           JSONB       NOT NULL,
    -- correlation_id, causation_id, traceparent
    headers           JSONB       NOT NULL DEFAULT '{}'::jsonb,
    occurred_at       TIMESTAMPTZ NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts          INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error        TEXT,
    published_at      TIMESTAMPTZ,
    dead_at           TIMESTAMPTZ
);

-- The relay's claim walks unpublished rows in id order and keeps those of
-- its lanes. A (lane, id) index cannot give one id order across many lanes
-- without sorting the whole backlog, so the index is on id alone.
CREATE INDEX outbox_unpublished_id ON outbox (id)
    WHERE published_at IS NULL AND dead_at IS NULL;
-- "Is an earlier event of this aggregate still waiting?"
CREATE INDEX outbox_unpublished_aggregate ON outbox (aggregate_id, id)
    WHERE published_at IS NULL;
-- Retention sweeps published rows by age.
CREATE INDEX outbox_published_at ON outbox (published_at)
    WHERE published_at IS NOT NULL;

-- The inbox: one row per (consumer, message) handled, written in the
-- handler's transaction. A conflict means the message was handled before.
CREATE TABLE inbox (
    consumer    TEXT        NOT NULL,
    message_id  UUID        NOT NULL,
    event_type  TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_received_at ON inbox (received_at);
