-- loyalty-service's own tables. The platform's (outbox, inbox,
-- outbox_replays) come from orderflow_db::PLATFORM_MIGRATIONS, run first.

-- One row per customer: the balance, changed only with a grant or a revoke.
CREATE TABLE accounts (
    customer_id TEXT PRIMARY KEY,
    balance     BIGINT NOT NULL DEFAULT 0,
    version     BIGINT NOT NULL DEFAULT 0
);

-- One row per order: what it earned, and whether it was taken back. The
-- primary key makes "once per order" a fact of the data, not only of the
-- inbox. A cancellation that arrives before its confirmation leaves a row
-- with 0 points, revoked, so the late confirmation grants nothing.
CREATE TABLE grants (
    order_id    TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    points      BIGINT NOT NULL,
    granted_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX grants_customer ON grants (customer_id, granted_at);
