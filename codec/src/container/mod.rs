//! The kvwire bitstream: a file header, then one block per (layer, token chunk).
//!
//! The byte-by-byte specification is `codec/FORMAT.md`; this module is its reference reader
//! and writer. Readers reject an unknown magic or version, reserved bits, out-of-range
//! fields and bad checksums with a [`DecodeError`](crate::DecodeError), and never allocate more than the header's
//! shape justifies (see [`Header::min_encoded_len`]).

mod block;
mod header;

pub(crate) use block::{decode_payload, encode_payload, BlockAt};
pub use header::{
    BlockHeader, Header, BLOCK_HEADER_LEN, BLOCK_MAGIC, FILE_MAGIC, FLAG_CHANNEL_SCALE_K,
    FORMAT_VERSION, MAX_CHUNK_TOKENS,
};
