//! Shipping KV caches over a connection (to be written).
