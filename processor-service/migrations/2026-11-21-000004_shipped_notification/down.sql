DELETE FROM notifications WHERE kind = 'order_shipped';
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check
    CHECK (kind IN ('order_confirmed', 'order_failed', 'order_cancelled'));
