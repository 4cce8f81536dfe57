-- Order ids are the clients' own strings (`ord-001`, `123`, a UUID): 1 to 64
-- characters of A-Z a-z 0-9 . _ : - (checked by the API; the CHECK keeps
-- anything else out). Existing UUID ids keep their text form.
ALTER TABLE order_items DROP CONSTRAINT order_items_order_id_fkey;
ALTER TABLE order_timeline DROP CONSTRAINT order_timeline_order_id_fkey;
ALTER TABLE orders ALTER COLUMN id TYPE TEXT USING id::text;
ALTER TABLE order_items ALTER COLUMN order_id TYPE TEXT USING order_id::text;
ALTER TABLE order_timeline ALTER COLUMN order_id TYPE TEXT USING order_id::text;
ALTER TABLE orders ADD CONSTRAINT orders_id_form CHECK (id ~ '^[A-Za-z0-9._:-]{1,64}$');
ALTER TABLE order_items ADD CONSTRAINT order_items_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id);
ALTER TABLE order_timeline ADD CONSTRAINT order_timeline_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id);
