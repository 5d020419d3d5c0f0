//! Integration tests across crates: one test binary, one module per concern.
//!
//! * `roundtrip`: every level on random caches (property tests), bit-exact `raw`, lossy
//!   levels within the documented error bound;
//! * `fixture`: the committed real KV cache in every layout and dtype, the compression ratio;
//! * `streaming`: layer-by-layer encoding, out-of-order block decoding, thread independence;
//! * `hostile`: truncated, bit-flipped, forged and random input is an error, never a panic;
//! * `cli`: the `kvwire` binary's codec commands and its error reporting.

mod cli;
mod fixture;
mod hostile;
mod perf;
mod roundtrip;
mod streaming;
mod transport;
