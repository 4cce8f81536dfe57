-- Only possible while every id is a UUID.
ALTER TABLE reservations ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE payments ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE shipments ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE notifications ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
