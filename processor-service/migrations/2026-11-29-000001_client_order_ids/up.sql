-- Order ids are the clients' own strings (see order-service); existing
-- UUID ids keep their text form.
ALTER TABLE reservations ALTER COLUMN order_id TYPE TEXT USING order_id::text;
ALTER TABLE payments ALTER COLUMN order_id TYPE TEXT USING order_id::text;
ALTER TABLE shipments ALTER COLUMN order_id TYPE TEXT USING order_id::text;
ALTER TABLE notifications ALTER COLUMN order_id TYPE TEXT USING order_id::text;
