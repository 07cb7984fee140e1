-- The shop's schema, applied once when the snapshot is built; every test starts from it.
CREATE TABLE customers (
    id   serial PRIMARY KEY,
    name text NOT NULL UNIQUE
);
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int  NOT NULL REFERENCES customers (id),
    item        text NOT NULL,
    qty         int  NOT NULL CHECK (qty > 0)
);
INSERT INTO customers (name) VALUES ('ada'), ('grace');
