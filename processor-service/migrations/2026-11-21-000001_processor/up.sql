-- Stock. Every unit ever received is in exactly one bucket, at every
-- commit: on hand (sellable), reserved (held for a pending order) or
-- shipped. The CHECK makes the bookkeeping impossible to break.
CREATE TABLE products (
    sku        TEXT PRIMARY KEY,
    name       TEXT        NOT NULL,
    -- minor units (cents)
    price      BIGINT      NOT NULL CHECK (price >= 0),
    on_hand    INTEGER     NOT NULL CHECK (on_hand >= 0),
    reserved   INTEGER     NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    shipped    INTEGER     NOT NULL DEFAULT 0 CHECK (shipped >= 0),
    received   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT stock_balances CHECK (on_hand + reserved + shipped = received)
);

-- One row per order seen by inventory. `cancelled` without stock is a
-- tombstone: the cancel arrived before the order, which must then not
-- reserve anything.
CREATE TABLE reservations (
    order_id   UUID PRIMARY KEY,
    status     TEXT        NOT NULL
               CHECK (status IN ('pending', 'reserved', 'rejected', 'released', 'shipped', 'cancelled')),
    items      JSONB       NOT NULL DEFAULT '[]'::jsonb,
    reason     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One payment per order at most: the primary key is what makes "charged
-- once" hold. `cancelled` is a tombstone as above.
CREATE TABLE payments (
    order_id   UUID PRIMARY KEY,
    payment_id UUID        NOT NULL UNIQUE,
    amount     BIGINT      NOT NULL CHECK (amount >= 0),
    status     TEXT        NOT NULL
               CHECK (status IN ('pending', 'authorized', 'declined', 'refunded', 'cancelled')),
    reason     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One shipment per order at most.
CREATE TABLE shipments (
    order_id        UUID PRIMARY KEY,
    shipment_id     UUID        NOT NULL UNIQUE,
    tracking_number TEXT        NOT NULL UNIQUE,
    status          TEXT        NOT NULL CHECK (status IN ('created', 'voided')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
