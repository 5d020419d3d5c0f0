//! File and block headers.

use crate::bits::ByteReader;
use crate::dtype::DType;
use crate::error::DecodeError;
use crate::layout::{KvShape, KvSpec, Layout};
use crate::level::{bins_of_byte, Level};

/// First four bytes of a kvwire file.
pub const FILE_MAGIC: [u8; 4] = *b"KVWC";
/// First four bytes of every block.
pub const BLOCK_MAGIC: [u8; 4] = *b"KVWB";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 2;
/// Bytes of a block header.
pub const BLOCK_HEADER_LEN: usize = 24;
/// Header flag: K is divided by a per-channel scale before per-token quantization.
pub const FLAG_CHANNEL_SCALE_K: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_CHANNEL_SCALE_K;
/// Largest token chunk (LMCache's uint16 histograms bound it too).
pub const MAX_CHUNK_TOKENS: u32 = 65_535;

/// The file header: what the cache is and how it was coded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Shape, layout and dtype of the cache.
    pub spec: KvSpec,
    /// Compression level.
    pub level: Level,
    /// Tokens per block (the last block of a layer may hold fewer).
    pub chunk_tokens: u32,
    /// Option flags (`FLAG_*`).
    pub flags: u32,
    /// Bins per layer for K (header byte: 0 means 256); empty for `raw`.
    pub bins_k: Vec<u8>,
    /// Bins per layer for V.
    pub bins_v: Vec<u8>,
}

impl Header {
    /// Bytes of the serialized header.
    pub fn encoded_len(&self) -> usize {
        32 + 2 * self.bins_k.len() + 4
    }

    /// Whether K carries per-channel scales.
    pub const fn channel_scale_k(&self) -> bool {
        self.flags & FLAG_CHANNEL_SCALE_K != 0
    }

    /// Blocks per layer.
    pub fn chunks(&self) -> usize {
        self.spec.shape.tokens.div_ceil(self.chunk_tokens as usize)
    }

    /// Token range of chunk `chunk`.
    pub fn chunk_range(&self, chunk: usize) -> std::ops::Range<usize> {
        let t0 = chunk * self.chunk_tokens as usize;
        t0..(t0 + self.chunk_tokens as usize).min(self.spec.shape.tokens)
    }

    /// Bins of K and V in `layer` (256 for q8).
    pub fn layer_bins(&self, layer: usize) -> (u32, u32) {
        (
            bins_of_byte(self.bins_k[layer]),
            bins_of_byte(self.bins_v[layer]),
        )
    }

    /// Builds the native coder's model tables this header's bins need for `role`, if not
    /// built yet (they are built once per process and bin count, on first use, which takes
    /// milliseconds per bin count: an encoder or decoder that times its first block, or must
    /// not stall on it, calls this first). Nothing to do for the other levels.
    pub fn prepare_models(&self, role: crate::model::ModelRole) {
        let mut seen = [false; 64];
        for w in self.model_widths() {
            if !std::mem::replace(&mut seen[w as usize], true) {
                crate::model::ModelSet::get(w, role);
            }
        }
    }

    /// Whether [`Self::prepare_models`] has nothing left to build for `role` (always, for the
    /// levels without model tables).
    pub fn models_ready(&self, role: crate::model::ModelRole) -> bool {
        self.model_widths()
            .all(|w| crate::model::ModelSet::is_built(w, role))
    }

    /// The model-set half-widths (in `1..64`) of every layer's K and V bins, with repeats;
    /// none for the levels without model tables.
    fn model_widths(&self) -> impl Iterator<Item = u32> + '_ {
        let native = matches!(self.level, Level::CgHigh | Level::CgDefault | Level::CgLow);
        self.bins_k
            .iter()
            .chain(&self.bins_v)
            .filter(move |_| native)
            .map(|&b| crate::quant::alphabet(bins_of_byte(b)) - 1)
            .filter(|w| (1..64).contains(w))
    }

    /// Appends the header to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let s = &self.spec.shape;
        out.extend_from_slice(&FILE_MAGIC);
        out.extend_from_slice(&[
            FORMAT_VERSION,
            self.level.code(),
            self.spec.dtype.code(),
            self.spec.layout.code(),
        ]);
        for v in [s.layers, s.kv_heads, s.tokens, s.head_dim] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.chunk_tokens.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        if self.level == Level::Raw {
            out.extend(std::iter::repeat_n(0u8, 2 * s.layers));
        } else {
            out.extend_from_slice(&self.bins_k);
            out.extend_from_slice(&self.bins_v);
        }
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Parses a header from the start of `buf`; returns it and its length.
    ///
    /// # Errors
    /// Any [`DecodeError`] the fields or the checksum call for.
    pub fn read(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = ByteReader::new(buf);
        if r.take(4)? != FILE_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let level_code = r.u8()?;
        let level = Level::from_code(level_code).ok_or(DecodeError::InvalidField {
            field: "level",
            value: level_code as u64,
        })?;
        let dc = r.u8()?;
        let dtype = DType::from_code(dc).ok_or(DecodeError::InvalidField {
            field: "dtype",
            value: dc as u64,
        })?;
        let lc = r.u8()?;
        let layout = Layout::from_code(lc).ok_or(DecodeError::InvalidField {
            field: "layout",
            value: lc as u64,
        })?;
        let layers = r.u32()? as usize;
        let kv_heads = r.u32()? as usize;
        let tokens = r.u32()? as usize;
        let head_dim = r.u32()? as usize;
        let shape = KvShape::new(layers, kv_heads, tokens, head_dim);
        if shape.validate().is_err() {
            return Err(DecodeError::InvalidField {
                field: "shape",
                value: (layers as u64)
                    .saturating_mul(kv_heads as u64)
                    .saturating_mul(tokens as u64)
                    .saturating_mul(head_dim as u64),
            });
        }
        let chunk_tokens = r.u32()?;
        if chunk_tokens == 0 || chunk_tokens > MAX_CHUNK_TOKENS {
            return Err(DecodeError::InvalidField {
                field: "chunk_tokens",
                value: chunk_tokens as u64,
            });
        }
        let flags = r.u32()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::ReservedBits("header flags"));
        }
        // The bins table is 2·layers bytes: layers is bounded by the validated shape, and
        // `take` checks it against the input before anything is copied.
        let bins = r.take(2 * layers)?;
        let (bins_k, bins_v) = (bins[..layers].to_vec(), bins[layers..].to_vec());
        let end = r.pos();
        let stored = r.u32()?;
        let computed = crc32c::crc32c(&buf[..end]);
        if stored != computed {
            return Err(DecodeError::Checksum {
                what: "header",
                stored,
                computed,
            });
        }
        let h = Self {
            spec: KvSpec {
                shape,
                layout,
                dtype,
            },
            level,
            chunk_tokens,
            flags,
            bins_k,
            bins_v,
        };
        h.check_bins()?;
        if h.channel_scale_k() && matches!(level, Level::Raw | Level::Lmcache) {
            return Err(DecodeError::InvalidField {
                field: "flags",
                value: flags as u64,
            });
        }
        Ok((h, r.pos()))
    }

    pub(crate) fn check_bins(&self) -> Result<(), DecodeError> {
        for &b in self.bins_k.iter().chain(&self.bins_v) {
            let ok = match self.level {
                Level::Raw => b == 0,
                Level::Q8 => b == 0,
                // The native coder's residual alphabet needs bins <= 64.
                Level::CgHigh | Level::CgDefault | Level::CgLow => {
                    (4..=64).contains(&b) && b % 2 == 0
                }
                // LMCache's CDFs need max_bins < 64.
                Level::Lmcache => (4..=62).contains(&b) && b % 2 == 0,
            };
            if !ok {
                return Err(DecodeError::InvalidField {
                    field: "bins",
                    value: b as u64,
                });
            }
        }
        Ok(())
    }

    /// A lower bound on the bytes of a complete file with this header. A reader compares it
    /// with the input's length before allocating the output, so the output it allocates is at
    /// most a fixed multiple of the input it was given (about `chunk_tokens · dtype size / 2`
    /// for the native levels, where every channel of every block costs a model description;
    /// 1-2 for `raw` and `q8`).
    pub fn min_encoded_len(&self) -> u64 {
        let s = &self.spec.shape;
        let c = s.channels() as u64;
        let (layers, tokens) = (s.layers as u64, s.tokens as u64);
        let blocks = layers * self.chunks() as u64;
        let scales = 4 * layers * tokens
            + if self.channel_scale_k() {
                2 * c * blocks
            } else {
                0
            };
        let payload = match self.level {
            Level::Raw => 2 * c * self.spec.dtype.size() as u64 * layers * tokens,
            Level::Q8 => scales + 2 * c * layers * tokens,
            // Per block: every channel's model, the word count and two state words per lane.
            Level::CgHigh | Level::CgDefault | Level::CgLow => {
                let per_block = crate::native::min_coded_len(s.channels()) as u64;
                scales + blocks * per_block
            }
            // Per block: the CDF tables (at least 4 entries per channel), one length per stream.
            Level::Lmcache => scales + blocks * (2 * c * 2 * 4 + 2 * c * 4),
        };
        self.encoded_len() as u64 + blocks * BLOCK_HEADER_LEN as u64 + payload
    }
}

/// The fixed part of a block: where its tokens go and how long its payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Layer index.
    pub layer: u32,
    /// First token.
    pub token_start: u32,
    /// Tokens in the block.
    pub tokens: u32,
    /// Bytes of payload after the block header.
    pub payload_len: u32,
    /// CRC32C of the block header's bytes 4..20 followed by the payload.
    pub crc: u32,
}

impl BlockHeader {
    /// Appends a block whose payload `write_payload` appends to `out` (no intermediate
    /// buffer): a placeholder header first, then the payload, then the header fields and the
    /// CRC are filled in. If `write_payload` fails, `out` is left as it was.
    ///
    /// # Errors
    /// Whatever `write_payload` returns.
    pub fn write_block<E>(
        layer: u32,
        token_start: u32,
        tokens: u32,
        out: &mut Vec<u8>,
        write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = out.len();
        out.extend_from_slice(&[0u8; BLOCK_HEADER_LEN]);
        if let Err(e) = write_payload(out) {
            out.truncate(start);
            return Err(e);
        }
        let payload_len = (out.len() - start - BLOCK_HEADER_LEN) as u32;
        let block = &mut out[start..];
        block[0..4].copy_from_slice(&BLOCK_MAGIC);
        block[4..8].copy_from_slice(&layer.to_le_bytes());
        block[8..12].copy_from_slice(&token_start.to_le_bytes());
        block[12..16].copy_from_slice(&tokens.to_le_bytes());
        block[16..20].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&block[4..20]), &block[BLOCK_HEADER_LEN..]);
        block[20..24].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Parses a block header at the start of `buf`.
    ///
    /// # Errors
    /// [`DecodeError::BadMagic`] or [`DecodeError::Truncated`].
    pub fn read(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = ByteReader::new(buf);
        if r.take(4)? != BLOCK_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        Ok(Self {
            layer: r.u32()?,
            token_start: r.u32()?,
            tokens: r.u32()?,
            payload_len: r.u32()?,
            crc: r.u32()?,
        })
    }

    /// Bytes of the whole block.
    pub const fn block_len(&self) -> usize {
        BLOCK_HEADER_LEN + self.payload_len as usize
    }

    /// Checks the CRC against `block` (the whole block, header included) and returns the
    /// payload.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] or [`DecodeError::Checksum`].
    pub fn verified_payload<'a>(&self, block: &'a [u8]) -> Result<&'a [u8], DecodeError> {
        if block.len() < self.block_len() {
            return Err(DecodeError::Truncated {
                offset: block.len(),
                needed: self.block_len() - block.len(),
            });
        }
        let payload = &block[BLOCK_HEADER_LEN..self.block_len()];
        let computed = crc32c::crc32c_append(crc32c::crc32c(&block[4..20]), payload);
        if computed != self.crc {
            return Err(DecodeError::Checksum {
                what: "block",
                stored: self.crc,
                computed,
            });
        }
        Ok(payload)
    }
}
