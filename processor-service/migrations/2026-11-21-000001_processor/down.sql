DROP TABLE shipments;
DROP TABLE payments;
DROP TABLE reservations;
DROP TABLE products;
