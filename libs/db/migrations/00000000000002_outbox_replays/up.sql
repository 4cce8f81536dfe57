-- Every operator replay (outbox rows) and dead-letter requeue: who, when,
-- what, why.
CREATE TABLE outbox_replays (
    id          BIGSERIAL PRIMARY KEY,
    replayed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    operator    TEXT        NOT NULL,
    reason      TEXT,
    -- 'outbox' (rows made due again) or 'dlq' (messages requeued)
    kind        TEXT        NOT NULL CHECK (kind IN ('outbox', 'dlq')),
    -- the selection as given on the command line
    selector    JSONB       NOT NULL,
    -- outbox row ids or message ids
    items       JSONB       NOT NULL,
    item_count  INTEGER     NOT NULL
);
