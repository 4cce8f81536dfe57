DROP TABLE order_timeline;
DROP TABLE order_items;
DROP TABLE orders;
