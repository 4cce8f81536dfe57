-- Customers are also told when their order ships (shipment.created).
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check
    CHECK (kind IN ('order_shipped', 'order_confirmed', 'order_failed', 'order_cancelled'));
