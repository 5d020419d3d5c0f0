//! kvwire-codec: a CacheGen-style codec for LLM KV caches.
//!
//! A KV cache (`[layers, 2, kv_heads, tokens, head_dim]` in the Hugging Face layout, or vLLM's
//! `[layers, 2, tokens, kv_heads, head_dim]`; f16, bf16 or f32) is cut into blocks of one
//! layer and `chunk_tokens` tokens. Each block is quantized per token (CacheGen's symmetric
//! absmax with per-layer bin counts) and entropy coded, independently of every other block,
//! into a self-describing, checksummed bitstream (`codec/FORMAT.md`).
//!
//! ```
//! use kvwire_codec::{decode, encode, DType, EncodeOptions, KvCache, KvShape, KvSpec, Layout, Level};
//!
//! let spec = KvSpec { shape: KvShape::new(2, 4, 64, 32), layout: Layout::Hf, dtype: DType::F16 };
//! let kv = KvCache::from_fn(spec, |i| ((i % 37) as f32 - 18.0) / 7.0);
//! let bytes = encode(&kv.view(), &EncodeOptions::level(Level::Raw))?;
//! assert_eq!(decode(&bytes)?, kv);
//! let small = encode(&kv.view(), &EncodeOptions::level(Level::CgDefault))?;
//! assert!(small.len() < bytes.len() / 2);
//! # Ok::<(), kvwire_codec::CodecError>(())
//! ```
//!
//! Modules: the typed views ([`KvView`], [`KvCache`]), [`quant`] (the quantizer), [`model`] and
//! [`rans`] (the native entropy model family and coder), [`native`] (per-channel model choice
//! and lanes), [`lmcache`] (the bit-exact reference coder), [`container`] (the bitstream),
//! [`mod@file`] (safetensors KV files).
//!
//! # Thread safety
//! Encoders and decoders are immutable and `Sync`; whole-cache calls use rayon's global pool.
//! Output never depends on the number of threads.
// Unsafe code only where a module says why: the SIMD coder (`native/simd.rs`), `cpu.rs`.
#![deny(unsafe_code)]

mod bits;
pub mod container;
mod cpu;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
mod dtype;
mod error;
pub mod file;
mod layout;
mod level;
pub mod lmcache;
pub mod model;
pub mod native;
mod plain_f16;
pub mod quant;
pub mod rans;
mod scratch;
mod stream;
pub mod synthetic;

pub use container::{BlockHeader, Header, FORMAT_VERSION};
pub use dtype::DType;
pub use error::{CodecError, DecodeError, Result};
pub use layout::{KvCache, KvShape, KvSpec, KvView, Layout, Part, RowRuns};
pub use level::Level;
pub use stream::{
    decode, encode, index_blocks, BlockInfo, Decoder, EncodeOptions, Encoder, DEFAULT_CHUNK_TOKENS,
};
