-- The trace the outcome belongs to: sent as `traceparent` with the webhook
-- call, so the receiver can join the order's trace.
ALTER TABLE notifications ADD COLUMN traceparent TEXT;
