-- The order aggregate. `version` is the optimistic concurrency token:
-- every change is `UPDATE ... WHERE id = $1 AND version = $2`.
CREATE TABLE orders (
    id              UUID PRIMARY KEY,
    customer_id     TEXT        NOT NULL,
    status          TEXT        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'confirmed', 'failed', 'cancelled')),
    -- minor units (cents); never floats
    total_amount    BIGINT      NOT NULL CHECK (total_amount >= 0),
    force_fail      BOOLEAN     NOT NULL DEFAULT false,
    fail_reason     TEXT,
    cancel_reason   TEXT,
    tracking_number TEXT,
    version         BIGINT      NOT NULL DEFAULT 1,
    -- SHA-256 of the canonical request: a repeated POST with the same id
    -- must carry the same body.
    request_hash    TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Listing: newest first, keyset pagination on (created_at, id).
CREATE INDEX orders_created ON orders (created_at DESC, id DESC);
CREATE INDEX orders_customer_created ON orders (customer_id, created_at DESC, id DESC);
CREATE INDEX orders_status_created ON orders (status, created_at DESC, id DESC);

CREATE TABLE order_items (
    order_id   UUID    NOT NULL REFERENCES orders (id),
    line_no    INTEGER NOT NULL,
    sku        TEXT    NOT NULL,
    quantity   INTEGER NOT NULL CHECK (quantity > 0),
    unit_price BIGINT  NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, line_no)
);

-- The order's timeline: every event about it, ours and the pipeline's.
CREATE TABLE order_timeline (
    id          BIGSERIAL PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (id),
    event_type  TEXT        NOT NULL,
    message_id  UUID        NOT NULL UNIQUE,
    occurred_at TIMESTAMPTZ NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    details     JSONB       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX order_timeline_order ON order_timeline (order_id, occurred_at, id);
