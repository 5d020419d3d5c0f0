//! The streaming API: encode and decode one (layer, token chunk) block at a time, or a whole
//! cache in parallel.
//!
//! Blocks are independent: a receiver decodes layer `l` while `l+1` is still on the wire, and
//! a whole-cache encode spreads blocks over all cores with output that does not depend on the
//! thread count (each block is coded alone, then blocks are concatenated in order).

use rayon::prelude::*;

use crate::container::{
    decode_payload, encode_payload, BlockAt, BlockHeader, Header, MAX_CHUNK_TOKENS,
};
use crate::error::{CodecError, DecodeError, Result};
use crate::layout::{KvCache, KvSpec, KvView};
use crate::level::Level;

/// Tokens per block by default: LMCache's chunk size.
pub const DEFAULT_CHUNK_TOKENS: usize = 256;

/// How to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Compression level.
    pub level: Level,
    /// Tokens per block (1..=65535). Smaller blocks start decoding sooner and cost more
    /// per-block overhead.
    pub chunk_tokens: usize,
    /// Divide K by a per-channel scale before per-token quantization (KIVI's finding that K
    /// has outlier channels). Not for `raw` or `lmcache`.
    pub channel_scale_k: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            level: Level::CgDefault,
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
            channel_scale_k: false,
        }
    }
}

impl EncodeOptions {
    /// Options for `level`, other fields default.
    pub fn level(level: Level) -> Self {
        Self {
            level,
            ..Self::default()
        }
    }
}

/// Encodes blocks of caches of one spec.
#[derive(Debug, Clone)]
pub struct Encoder {
    header: Header,
}

impl Encoder {
    /// An encoder for caches of `spec`.
    ///
    /// # Errors
    /// [`CodecError::Unsupported`] for options the level cannot honour,
    /// [`CodecError::InvalidKv`] for an invalid shape.
    pub fn new(spec: KvSpec, opts: &EncodeOptions) -> Result<Self> {
        spec.shape.validate()?;
        if opts.chunk_tokens == 0 || opts.chunk_tokens > MAX_CHUNK_TOKENS as usize {
            return Err(CodecError::Unsupported(format!(
                "chunk_tokens must be 1..={MAX_CHUNK_TOKENS}, got {}",
                opts.chunk_tokens
            )));
        }
        if opts.channel_scale_k && matches!(opts.level, Level::Raw | Level::Lmcache) {
            return Err(CodecError::Unsupported(format!(
                "per-channel K scaling is not available at level {}",
                opts.level
            )));
        }
        let (bins_k, bins_v) = opts
            .level
            .bins(spec.shape.layers)
            .unwrap_or_else(|| (vec![0; spec.shape.layers], vec![0; spec.shape.layers]));
        Ok(Self {
            header: Header {
                spec,
                level: opts.level,
                chunk_tokens: opts.chunk_tokens as u32,
                flags: if opts.channel_scale_k {
                    crate::container::FLAG_CHANNEL_SCALE_K
                } else {
                    0
                },
                bins_k,
                bins_v,
            },
        })
    }

    /// An encoder whose level uses a bin table of the caller's (one entry per layer for K
    /// and for V) instead of the level's own: a table calibrated for a model, as
    /// `examples/disagg/bins_sensitivity.py` derives one. The table travels in the header, so
    /// any decoder reads the result.
    ///
    /// # Errors
    /// As [`Self::new`]; [`CodecError::Unsupported`] for `raw` and `q8` (no bins to choose),
    /// a table whose length is not the layer count, or a bin count the level's coder cannot
    /// take (even, 4..=64 for the native levels, 4..=62 for `lmcache`).
    pub fn with_bins(
        spec: KvSpec,
        opts: &EncodeOptions,
        bins_k: &[u8],
        bins_v: &[u8],
    ) -> Result<Self> {
        let mut enc = Self::new(spec, opts)?;
        if matches!(opts.level, Level::Raw | Level::Q8) {
            return Err(CodecError::Unsupported(format!(
                "level {} has no bins to choose",
                opts.level
            )));
        }
        let layers = spec.shape.layers;
        if bins_k.len() != layers || bins_v.len() != layers {
            return Err(CodecError::Unsupported(format!(
                "a bin table needs {layers} entries for K and for V, got {} and {}",
                bins_k.len(),
                bins_v.len()
            )));
        }
        enc.header.bins_k = bins_k.to_vec();
        enc.header.bins_v = bins_v.to_vec();
        enc.header.check_bins().map_err(|_| {
            CodecError::Unsupported(format!(
                "bins must be even and in 4..={} for level {}",
                if opts.level == Level::Lmcache { 62 } else { 64 },
                opts.level
            ))
        })?;
        Ok(enc)
    }

    /// The header every block of this encoder belongs to.
    pub const fn header(&self) -> &Header {
        &self.header
    }

    /// Appends the serialized header.
    pub fn write_header(&self, out: &mut Vec<u8>) {
        self.header.write(out);
    }

    /// Appends block (`layer`, `chunk`) of the whole-cache view `view`.
    ///
    /// # Errors
    /// [`CodecError::InvalidKv`] if `view`'s spec differs from the encoder's or the indices
    /// are out of range; [`CodecError::NonFinite`] for NaN or infinite input at lossy levels.
    pub fn encode_block(
        &self,
        view: &KvView<'_>,
        layer: usize,
        chunk: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if *view.spec() != self.header.spec {
            return Err(CodecError::InvalidKv(format!(
                "view {:?} does not match the encoder's {:?}",
                view.spec(),
                self.header.spec
            )));
        }
        self.block(view, layer, layer, chunk, out)
    }

    /// Appends block (`layer`, `chunk`) from a view of that one layer (`layers == 1`), as a
    /// prefill engine produces layers one at a time.
    ///
    /// # Errors
    /// As [`Self::encode_block`].
    pub fn encode_layer_block(
        &self,
        layer_view: &KvView<'_>,
        layer: usize,
        chunk: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let mut want = self.header.spec;
        want.shape.layers = 1;
        if *layer_view.spec() != want {
            return Err(CodecError::InvalidKv(format!(
                "layer view {:?} does not match one layer of {:?}",
                layer_view.spec(),
                self.header.spec
            )));
        }
        self.block(layer_view, 0, layer, chunk, out)
    }

    /// Appends every block of one layer (from a one-layer view), chunks coded in parallel.
    ///
    /// # Errors
    /// As [`Self::encode_layer_block`].
    pub fn encode_layer(
        &self,
        layer_view: &KvView<'_>,
        layer: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let blocks: Vec<Result<Vec<u8>>> = (0..self.header.chunks())
            .into_par_iter()
            .map(|chunk| {
                let mut b = Vec::new();
                self.encode_layer_block(layer_view, layer, chunk, &mut b)?;
                Ok(b)
            })
            .collect();
        for b in blocks {
            out.extend_from_slice(&b?);
        }
        Ok(())
    }

    /// The whole file: header, then every block, layer-major, blocks coded in parallel.
    ///
    /// # Errors
    /// As [`Self::encode_block`].
    pub fn encode(&self, view: &KvView<'_>) -> Result<Vec<u8>> {
        let chunks = self.header.chunks();
        let n = self.header.spec.shape.layers * chunks;
        let blocks: Vec<Result<Vec<u8>>> = (0..n)
            .into_par_iter()
            .map(|i| {
                let mut b = Vec::new();
                self.encode_block(view, i / chunks, i % chunks, &mut b)?;
                Ok(b)
            })
            .collect();
        let mut out = Vec::new();
        self.write_header(&mut out);
        for b in blocks {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    fn block(
        &self,
        view: &KvView<'_>,
        view_layer: usize,
        layer: usize,
        chunk: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let h = &self.header;
        if layer >= h.spec.shape.layers || chunk >= h.chunks() {
            return Err(CodecError::InvalidKv(format!(
                "block (layer {layer}, chunk {chunk}) outside {} layers x {} chunks",
                h.spec.shape.layers,
                h.chunks()
            )));
        }
        let r = h.chunk_range(chunk);
        let at = BlockAt {
            view_layer,
            layer,
            t0: r.start,
            n: r.len(),
        };
        BlockHeader::write_block(layer as u32, r.start as u32, r.len() as u32, out, |out| {
            encode_payload(h, view, at, out)
        })
    }
}

/// Where a decoded block went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Layer index.
    pub layer: usize,
    /// Chunk index within the layer.
    pub chunk: usize,
    /// Tokens decoded.
    pub tokens: std::ops::Range<usize>,
    /// Bytes of the block consumed from the input.
    pub consumed: usize,
}

/// Decodes blocks of one file or stream.
#[derive(Debug, Clone)]
pub struct Decoder {
    header: Header,
}

impl Decoder {
    /// Parses the header at the start of `buf`; returns the decoder and the header's length.
    ///
    /// # Errors
    /// [`DecodeError`] for a bad header.
    pub fn new(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let (header, len) = Header::read(buf)?;
        Ok((Self { header }, len))
    }

    /// A decoder for blocks of a known header (e.g. received out of band).
    pub const fn from_header(header: Header) -> Self {
        Self { header }
    }

    /// The file header.
    pub const fn header(&self) -> &Header {
        &self.header
    }

    /// The spec of one layer's output buffer (the header's spec with one layer).
    pub fn layer_spec(&self) -> KvSpec {
        let mut s = self.header.spec;
        s.shape.layers = 1;
        s
    }

    /// Reads the block header at the start of `buf` and checks that it fits the file.
    ///
    /// # Errors
    /// [`DecodeError`] for a bad magic, a truncated header or a block outside the shape.
    pub fn block_header(&self, buf: &[u8]) -> Result<(BlockHeader, usize), DecodeError> {
        let bh = BlockHeader::read(buf)?;
        let h = &self.header;
        let oob = DecodeError::BlockOutOfRange {
            layer: bh.layer,
            token_start: bh.token_start,
            tokens: bh.tokens,
        };
        if bh.layer as usize >= h.spec.shape.layers || bh.token_start % h.chunk_tokens != 0 {
            return Err(oob);
        }
        let chunk = (bh.token_start / h.chunk_tokens) as usize;
        if chunk >= h.chunks() || h.chunk_range(chunk).len() != bh.tokens as usize {
            return Err(oob);
        }
        Ok((bh, chunk))
    }

    /// Decodes the block at the start of `block` into `layer_out`, the bytes of its layer
    /// (length `layer_spec().byte_len()`).
    ///
    /// # Errors
    /// [`DecodeError`] for any corruption; [`CodecError::BufferTooSmall`] for a wrong buffer.
    /// After an error the block's tokens in `layer_out` may hold partial output (a block that
    /// passed its CRC but whose coded symbols are forged is found out while decoding, by then
    /// written in place); the rest of the buffer is untouched.
    pub fn decode_block(&self, block: &[u8], layer_out: &mut [u8]) -> Result<BlockInfo> {
        let need = self.layer_spec().byte_len();
        if layer_out.len() != need {
            return Err(CodecError::BufferTooSmall {
                needed: need,
                have: layer_out.len(),
            });
        }
        let (bh, chunk) = self.block_header(block)?;
        let payload = bh.verified_payload(block)?;
        let r = self.header.chunk_range(chunk);
        decode_payload(
            &self.header,
            bh.layer as usize,
            r.start,
            r.len(),
            payload,
            layer_out,
        )?;
        Ok(BlockInfo {
            layer: bh.layer as usize,
            chunk,
            tokens: r,
            consumed: bh.block_len(),
        })
    }

    /// The spec of the buffer [`Self::decode_block_chunk`] fills for `chunk`: one layer,
    /// the chunk's tokens only.
    pub fn chunk_spec(&self, chunk: usize) -> KvSpec {
        let mut s = self.layer_spec();
        s.shape.tokens = self.header.chunk_range(chunk).len();
        s
    }

    /// Decodes the block at the start of `block` into `chunk_out`, a buffer of its tokens
    /// only ([`Self::chunk_spec`] of its chunk, whose length the caller learns from
    /// [`Self::block_header`]). Blocks of one layer can so decode on several threads at once;
    /// [`Self::place_chunk`] then copies each into the layer.
    ///
    /// # Errors
    /// As [`Self::decode_block`].
    pub fn decode_block_chunk(&self, block: &[u8], chunk_out: &mut [u8]) -> Result<BlockInfo> {
        let (bh, chunk) = self.block_header(block)?;
        let spec = self.chunk_spec(chunk);
        if chunk_out.len() != spec.byte_len() {
            return Err(CodecError::BufferTooSmall {
                needed: spec.byte_len(),
                have: chunk_out.len(),
            });
        }
        let payload = bh.verified_payload(block)?;
        let r = self.header.chunk_range(chunk);
        // Row placement follows the header's spec: one whose token count is the chunk's
        // makes the payload land in a chunk-shaped buffer at token 0.
        let mut h = self.header.clone();
        h.spec.shape.tokens = r.len();
        decode_payload(&h, bh.layer as usize, 0, r.len(), payload, chunk_out)?;
        Ok(BlockInfo {
            layer: bh.layer as usize,
            chunk,
            tokens: r,
            consumed: bh.block_len(),
        })
    }

    /// Copies a chunk decoded by [`Self::decode_block_chunk`] into `layer_out`, the bytes of
    /// its layer (length `layer_spec().byte_len()`).
    ///
    /// # Errors
    /// [`CodecError::BufferTooSmall`] if either buffer has the wrong length.
    pub fn place_chunk(&self, info: &BlockInfo, chunk: &[u8], layer_out: &mut [u8]) -> Result<()> {
        let cspec = self.chunk_spec(info.chunk);
        let lspec = self.layer_spec();
        for (need, have) in [
            (cspec.byte_len(), chunk.len()),
            (lspec.byte_len(), layer_out.len()),
        ] {
            if need != have {
                return Err(CodecError::BufferTooSmall { needed: need, have });
            }
        }
        // In both layouts the rows of consecutive tokens within one run (a head in the HF
        // layout, the whole row in vLLM's) are adjacent, so a chunk's tokens of one run are one
        // contiguous span in the chunk and in the layer.
        let es = cspec.dtype.size();
        let n = info.tokens.len();
        for part in crate::Part::BOTH {
            let (c, l) = (
                cspec.row_runs(0, part, 0),
                lspec.row_runs(0, part, info.tokens.start),
            );
            for run in 0..c.runs {
                let span = n * c.run_len * es;
                let from = (c.start + run * c.stride) * es;
                let to = (l.start + run * l.stride) * es;
                layer_out[to..to + span].copy_from_slice(&chunk[from..from + span]);
            }
        }
        Ok(())
    }

    /// Decodes the block at the start of `block` into its place in `cache`.
    ///
    /// # Errors
    /// As [`Self::decode_block`]; [`CodecError::InvalidKv`] if `cache`'s spec is not the header's.
    pub fn decode_block_into(&self, block: &[u8], cache: &mut KvCache) -> Result<BlockInfo> {
        if *cache.spec() != self.header.spec {
            return Err(CodecError::InvalidKv(
                "cache spec differs from the stream's".into(),
            ));
        }
        let (bh, _) = self.block_header(block)?;
        let range = self.header.spec.layer_range(bh.layer as usize);
        let es = self.header.spec.dtype.size();
        let bytes = &mut cache.bytes_mut()[range.start * es..range.end * es];
        self.decode_block(block, bytes)
    }
}

/// Encodes a whole cache at `opts`.
///
/// # Errors
/// As [`Encoder::new`] and [`Encoder::encode`].
pub fn encode(view: &KvView<'_>, opts: &EncodeOptions) -> Result<Vec<u8>> {
    Encoder::new(*view.spec(), opts)?.encode(view)
}

/// Checks a whole file's framing before anything is decoded (cheap: headers only, so nothing
/// is decoded from a file that turns out to be incomplete): the header, the input length
/// against `Header::min_encoded_len`, every block header, each (layer, chunk) present exactly
/// once, nothing trailing. Returns the decoder and each block's byte offset, layer-major
/// (block (`l`, `c`) at index `l · chunks + c`).
///
/// # Errors
/// [`DecodeError`] for a bad header, truncation, a block outside the shape, a repeated or
/// missing block.
pub fn index_blocks(buf: &[u8]) -> Result<(Decoder, Vec<usize>)> {
    let (dec, mut pos) = Decoder::new(buf)?;
    let h = dec.header();
    if (buf.len() as u64) < h.min_encoded_len() {
        return Err(DecodeError::Truncated {
            offset: buf.len(),
            needed: (h.min_encoded_len() - buf.len() as u64) as usize,
        }
        .into());
    }
    let chunks = h.chunks();
    let mut at: Vec<Option<usize>> = vec![None; h.spec.shape.layers * chunks];
    while pos < buf.len() {
        let (bh, chunk) = dec.block_header(&buf[pos..])?;
        let slot = &mut at[bh.layer as usize * chunks + chunk];
        if slot.is_some() {
            return Err(DecodeError::BlockOutOfRange {
                layer: bh.layer,
                token_start: bh.token_start,
                tokens: bh.tokens,
            }
            .into());
        }
        if buf.len() - pos < bh.block_len() {
            return Err(DecodeError::Truncated {
                offset: buf.len(),
                needed: bh.block_len() - (buf.len() - pos),
            }
            .into());
        }
        *slot = Some(pos);
        pos += bh.block_len();
    }
    let missing = at.iter().filter(|s| s.is_none()).count();
    if missing > 0 {
        return Err(DecodeError::MissingBlocks {
            missing,
            expected: at.len(),
        }
        .into());
    }
    let at = at.into_iter().flatten().collect();
    Ok((dec, at))
}

/// Decodes a whole file: every block must be present exactly once; layers decode in parallel.
///
/// # Errors
/// [`DecodeError`] for any corruption, truncation, missing, repeated or trailing data.
pub fn decode(buf: &[u8]) -> Result<KvCache> {
    let (dec, at) = index_blocks(buf)?;
    let h = dec.header();
    let chunks = h.chunks();
    let mut cache = KvCache::try_zeroed(h.spec)?;
    let layer_bytes = dec.layer_spec().byte_len();
    cache
        .bytes_mut()
        .par_chunks_mut(layer_bytes)
        .enumerate()
        .try_for_each(|(l, out)| -> Result<()> {
            for &p in &at[l * chunks..(l + 1) * chunks] {
                dec.decode_block(&buf[p..], out)?;
            }
            Ok(())
        })?;
    Ok(cache)
}
