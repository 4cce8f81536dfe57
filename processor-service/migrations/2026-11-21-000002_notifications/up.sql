-- One notification per order and outcome; delivered to the webhook at
-- least once (receivers dedupe on the Idempotency-Key header = id), never
-- dropped: undeliverable ones stay pending or failed and are retried.
CREATE TABLE notifications (
    id              UUID PRIMARY KEY,
    order_id        UUID        NOT NULL,
    customer_id     TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('order_confirmed', 'order_failed', 'order_cancelled')),
    text            TEXT        NOT NULL,
    status          TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at    TIMESTAMPTZ,
    UNIQUE (order_id, kind)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status <> 'delivered';
