DROP TABLE grants;
DROP TABLE accounts;
