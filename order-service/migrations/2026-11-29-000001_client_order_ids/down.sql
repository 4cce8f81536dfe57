-- Only possible while every id is a UUID.
ALTER TABLE order_items DROP CONSTRAINT order_items_order_id_fkey;
ALTER TABLE order_timeline DROP CONSTRAINT order_timeline_order_id_fkey;
ALTER TABLE orders DROP CONSTRAINT orders_id_form;
ALTER TABLE orders ALTER COLUMN id TYPE UUID USING id::uuid;
ALTER TABLE order_items ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE order_timeline ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE order_items ADD CONSTRAINT order_items_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id);
ALTER TABLE order_timeline ADD CONSTRAINT order_timeline_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id);
