//! The GPU decoder: a kvwire bitstream in, the fp16 cache in device memory out.

use std::sync::Arc;

use cudarc::driver::{result, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::encode::{dptr, layer_arrays};
use super::{check_supported, models_len, DeviceTables, GpuCodec, GpuResult};
use crate::{CodecError, DecodeError, Decoder, Header, KvSpec};

/// Words of a warp's shared-memory window over its block's word sequence (kernels.cu `RING`).
const RING: u32 = 1024;
/// Shared memory of one decoding warp: the word window and a 64-entry dequantization table.
const WARP_SMEM: u32 = RING * 2 + 64 * 4;
/// Most warps (blocks decoded) per CTA of the shared-table kernel.
const SHARED_WARPS: u32 = 16;

/// Which table layout the decoding kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeKernel {
    /// One `u32` per slot (frequency, offset in the symbol, symbol): one load per symbol.
    /// About 20 % slower than [`Self::Shared`] at 256-token chunks (H100, H200).
    Slots,
    /// One byte per slot (the symbol), then the symbol's frequency and start: two dependent
    /// loads over a quarter of the table bytes.
    Small,
    /// Compact tables (a 64-bucket index and the cumulative starts, 188 bytes a member at
    /// `cg-*` widths) of every alphabet width in shared memory: a bucket read and a binary
    /// search over the residuals that start inside the bucket (usually none). Falls back to
    /// [`Self::Slots`] where the tables do not fit a CTA's shared memory. The default.
    #[default]
    Shared,
}

/// A parsed and uploaded bitstream, ready to decode on the GPU (repeatedly, e.g. for timing).
///
/// [`Self::new`] makes the whole-file reader's checks on the host (header, every block
/// header, missing, repeated and trailing blocks, sizes), as [`crate::decode`] does, and
/// uploads the stream; the kernels check the block CRCs and the payloads.
pub struct GpuDecoder<'a> {
    codec: &'a GpuCodec,
    header: Header,
    tables: Arc<DeviceTables>,
    bins: CudaSlice<u8>,
    set_of: CudaSlice<u8>,
    /// Byte offset of each block in the stream, in stream order.
    offsets: Vec<u64>,
    d_blocks: CudaSlice<u64>,
    d_in: CudaSlice<u8>,
    err: CudaSlice<u32>,
    kernel: DecodeKernel,
}

impl std::fmt::Debug for GpuDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDecoder")
            .field("header", &self.header)
            .field("blocks", &self.offsets.len())
            .finish_non_exhaustive()
    }
}

impl<'a> GpuDecoder<'a> {
    /// Checks and indexes the stream `buf` and uploads it.
    ///
    /// # Errors
    /// [`DecodeError`] as [`crate::decode`] for the header and block headers;
    /// [`CodecError::Unsupported`] for a stream the GPU decoder does not handle (a level other
    /// than the native ones, a dtype other than f16, channel scales); driver failures.
    pub fn new(codec: &'a GpuCodec, buf: &[u8]) -> GpuResult<Self> {
        let (dec, _) = Decoder::new(buf)?;
        check_supported(dec.header())?;
        let (dec, offsets) = crate::index_blocks(buf)?;
        let h = dec.header().clone();
        let offsets: Vec<u64> = offsets.into_iter().map(|o| o as u64).collect();
        let tables = codec.tables(&h)?;
        let (bins, set_of) = layer_arrays(&h, &tables);
        let stream = &codec.stream;
        let d = Self {
            codec,
            bins: stream.clone_htod(&bins)?,
            set_of: stream.clone_htod(&set_of)?,
            d_blocks: stream.clone_htod(&offsets)?,
            d_in: stream.clone_htod(buf)?,
            err: stream.alloc_zeros(offsets.len())?,
            offsets,
            tables,
            header: h,
            kernel: DecodeKernel::default(),
        };
        stream.synchronize()?;
        Ok(d)
    }

    /// The stream's header.
    pub const fn header(&self) -> &Header {
        &self.header
    }

    /// The spec of the decoded cache.
    pub const fn spec(&self) -> &KvSpec {
        &self.header.spec
    }

    /// Chooses the decoding kernel (both decode the same bits; they differ in speed).
    pub fn set_kernel(&mut self, kernel: DecodeKernel) {
        self.kernel = kernel;
    }

    /// Bytes of the uploaded stream.
    pub fn stream_len(&self) -> usize {
        self.d_in.len()
    }

    /// Queues the decode into `out` (fp16 elements of [`Self::spec`]) on the codec's stream
    /// and returns at once; [`Self::finish`] waits and reports errors. For timing with events.
    ///
    /// # Errors
    /// [`CodecError::BufferTooSmall`] for a wrong-sized `out`; launch failures.
    pub fn launch(&mut self, out: &mut CudaSlice<u16>) -> GpuResult<()> {
        let spec = self.header.spec;
        if out.num_bytes() != spec.byte_len() {
            return Err(CodecError::BufferTooSmall {
                needed: spec.byte_len(),
                have: out.num_bytes(),
            }
            .into());
        }
        let p_out = dptr(out, &self.codec.stream);
        self.launch_at(p_out)
    }

    /// Queues the decode into the device memory at `out`, a cache of [`Self::spec`] that
    /// the caller (a serving engine) owns; [`Self::finish`] waits and reports errors.
    ///
    /// # Safety
    /// `out` must point to `self.spec().byte_len()` writable bytes of device memory in the
    /// codec's context, not used by anything else until [`Self::finish`] returns.
    ///
    /// # Errors
    /// Launch failures.
    pub unsafe fn launch_into_ptr(&mut self, out: u64) -> GpuResult<()> {
        self.launch_at(out)
    }

    /// Decodes into the device memory at `out` (see [`Self::launch_into_ptr`]) and waits.
    ///
    /// # Safety
    /// As [`Self::launch_into_ptr`].
    ///
    /// # Errors
    /// As [`Self::launch_into_ptr`] and [`Self::finish`].
    pub unsafe fn decode_into_ptr(&mut self, out: u64) -> GpuResult<()> {
        self.launch_at(out)?;
        self.finish()
    }

    /// Queues the kernels; `p_out` holds `spec().byte_len()` writable device bytes.
    fn launch_at(&mut self, p_out: u64) -> GpuResult<()> {
        let stream = &self.codec.stream;
        let at = Launch {
            p_in: dptr(&self.d_in, stream),
            p_blocks: dptr(&self.d_blocks, stream),
            nblocks: self.offsets.len() as u32,
            p_err: dptr(&self.err, stream),
            p_out,
        };
        // SAFETY: `p_out` holds the spec's bytes (checked by `launch`, promised by the caller
        // of `launch_into_ptr`); the uploaded stream's blocks were checked by `new`.
        unsafe {
            launch_decode(
                self.codec,
                stream,
                &self.header,
                &self.tables,
                &self.bins,
                &self.set_of,
                self.kernel,
                &at,
            )
        }
    }

    /// Waits for the decode queued by [`Self::launch`] and reports the first bad block (in
    /// stream order).
    ///
    /// # Errors
    /// [`DecodeError`]: `Checksum` for a block CRC mismatch, `Truncated`, `CorruptStream`,
    /// `SymbolOutOfRange`, `InvalidField` (a model field) or `ReservedBits` (model padding).
    pub fn finish(&mut self) -> GpuResult<()> {
        let stream = &self.codec.stream;
        let err = stream.clone_dtoh(&self.err)?;
        stream.synchronize()?;
        block_errors(&err, &self.offsets)
    }

    /// Decodes into `out`, an fp16 device buffer of [`Self::spec`].
    ///
    /// # Errors
    /// As [`Self::launch`] and [`Self::finish`].
    pub fn decode_into(&mut self, out: &mut CudaSlice<u16>) -> GpuResult<()> {
        self.launch(out)?;
        self.finish()
    }

    /// Decodes into a new device buffer.
    ///
    /// # Errors
    /// As [`Self::decode_into`].
    pub fn decode(&mut self) -> GpuResult<CudaSlice<u16>> {
        let mut out = self
            .codec
            .stream
            .alloc_zeros::<u16>(self.header.spec.byte_len() / 2)?;
        self.decode_into(&mut out)?;
        Ok(out)
    }
}

/// Device addresses of one decode launch.
#[derive(Debug, Clone, Copy)]
struct Launch {
    /// Stream bytes.
    p_in: u64,
    /// `nblocks` u64 byte offsets of block headers within `p_in`.
    p_blocks: u64,
    nblocks: u32,
    /// `nblocks` u32 error words.
    p_err: u64,
    /// The cache (fp16, the header's spec).
    p_out: u64,
}

/// Queues the CRC check and the decode of `at`'s blocks on `stream`.
///
/// # Safety
/// Every address of `at` is live device memory of the sizes its fields say; each block offset
/// points at a block header checked by the host (`Decoder::block_header`: layer, tokens within
/// the shape) whose `payload_len` bytes lie within the uploaded bytes; `p_out` holds the
/// header spec's bytes; nothing else uses these until the stream has finished them.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_decode(
    codec: &GpuCodec,
    stream: &Arc<CudaStream>,
    header: &Header,
    tables: &DeviceTables,
    bins: &CudaSlice<u8>,
    set_of: &CudaSlice<u8>,
    kernel: DecodeKernel,
    at: &Launch,
) -> GpuResult<()> {
    let spec = header.spec;
    let k = &codec.k;
    let s = &spec.shape;
    let (c, h, t, d) = (
        s.channels() as u32,
        s.kv_heads as u32,
        s.tokens as u32,
        s.head_dim as u32,
    );
    let vllm = (spec.layout == crate::Layout::Vllm) as u32;
    let Launch {
        p_in,
        p_blocks,
        nblocks,
        p_err,
        p_out,
    } = *at;
    let layer0 = 0u32;
    let ml = models_len(s.channels()) as u32;
    let p_bins = dptr(bins, stream);
    let p_set = dptr(set_of, stream);
    let p_slots = dptr(&tables.slots, stream);
    let p_sym8 = dptr(&tables.sym8, stream);
    let p_info = dptr(&tables.info, stream);
    let p_crc = dptr(&codec.crc_tab, stream);
    let p_x2n = dptr(&codec.x2n, stream);
    // SAFETY: the caller vouches for `at` (see below); the tables, bins and CRC tables are
    // live allocations of this codec. The kernels bound every payload read by the block's
    // payload_len and clamp word reads to the word count. The argument lists match the
    // kernels' parameter lists.
    unsafe {
        codec.mark("start", stream)?;
        result::memset_d8_async(p_err, 0, 4 * nblocks as usize, stream.cu_stream())?;
        stream
            .launch_builder(&k.verify)
            .arg(&p_in)
            .arg(&p_blocks)
            .arg(&p_err)
            .arg(&p_crc)
            .arg(&p_x2n)
            .launch(LaunchConfig {
                grid_dim: (nblocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })?;
        codec.mark("verify", stream)?;
        let tbytes = tables.compact.len() as u32;
        let mb = tables.compact_mb as u32;
        // Blocks spread over the SMs in one wave: about one CTA per SM, each loading the
        // tables into its shared memory once.
        let wpc = nblocks.div_ceil(codec.sms).clamp(1, SHARED_WARPS);
        let kernel = match kernel {
            DecodeKernel::Shared if tbytes + wpc * WARP_SMEM > codec.smem_optin => {
                DecodeKernel::Slots
            }
            k => k,
        };
        let cfg = match kernel {
            DecodeKernel::Shared => LaunchConfig {
                grid_dim: (nblocks.div_ceil(wpc), 1, 1),
                block_dim: (32 * wpc, 1, 1),
                shared_mem_bytes: tbytes + wpc * WARP_SMEM,
            },
            _ => LaunchConfig {
                grid_dim: (nblocks, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: WARP_SMEM,
            },
        };
        let p_compact = dptr(&tables.compact, stream);
        let mut b = stream.launch_builder(match kernel {
            DecodeKernel::Slots => &k.decode,
            DecodeKernel::Small => &k.decode_small,
            DecodeKernel::Shared => &k.decode_shared,
        });
        b.arg(&p_in)
            .arg(&p_blocks)
            .arg(&nblocks)
            .arg(&c)
            .arg(&h)
            .arg(&t)
            .arg(&d)
            .arg(&vllm)
            .arg(&layer0)
            .arg(&p_bins)
            .arg(&p_set);
        match kernel {
            DecodeKernel::Slots => b.arg(&p_slots),
            DecodeKernel::Small => b.arg(&p_sym8).arg(&p_info),
            DecodeKernel::Shared => b.arg(&p_compact).arg(&tbytes).arg(&mb),
        };
        b.arg(&p_out).arg(&p_err).arg(&ml).launch(cfg)?;
        codec.mark("decode", stream)?;
    }
    Ok(())
}

/// The first bad block's error (in stream order), from the kernels' error words.
fn block_errors(err: &[u32], offsets: &[u64]) -> GpuResult<()> {
    let Some((bi, &e)) = err.iter().enumerate().find(|(_, &e)| e != 0) else {
        return Ok(());
    };
    let at = offsets[bi] as usize;
    let de = if e & 1 != 0 {
        DecodeError::Checksum {
            what: "block",
            stored: 0,
            computed: 0,
        }
    } else if e & 32 != 0 {
        DecodeError::Truncated {
            offset: at,
            needed: 0,
        }
    } else if e & 8 != 0 {
        DecodeError::InvalidField {
            field: "model",
            value: 0,
        }
    } else if e & 16 != 0 {
        DecodeError::ReservedBits("model padding")
    } else if e & 4 != 0 {
        DecodeError::SymbolOutOfRange { stream: 0 }
    } else {
        DecodeError::CorruptStream { stream: 0 }
    };
    Err(de.into())
}

/// One of [`GpuStreamDecoder`]'s in-flight uploads.
struct Pending {
    stream: Arc<CudaStream>,
    d_in: CudaSlice<u8>,
    d_blocks: CudaSlice<u64>,
    err: CudaSlice<u32>,
    /// Byte offsets of the blocks of the last push within the whole stream (for errors).
    offsets: Vec<u64>,
    busy: bool,
}

/// Decodes a stream on the GPU as its blocks arrive, as a receiver gets them: each
/// [`Self::push`] uploads whole blocks (one layer's, say, from pinned host memory) and queues
/// their CRC check and decode on one of `depth` streams (8 by default), so that the uploads
/// of the next pushes overlap the decodes of the earlier ones (one layer of 256-token blocks is
/// only `tokens / 256` blocks, each decoded by one warp, so several layers must be in flight
/// to fill the GPU). [`Self::finish`] waits for everything and reports the first bad block, or
/// blocks that never came.
pub struct GpuStreamDecoder<'a> {
    codec: &'a GpuCodec,
    dec: Decoder,
    tables: Arc<DeviceTables>,
    bins: CudaSlice<u8>,
    set_of: CudaSlice<u8>,
    kernel: DecodeKernel,
    out: u64,
    seen: Vec<bool>,
    /// Bytes pushed so far (the stream offset of the next push's first block).
    pushed: u64,
    slots: Vec<Pending>,
    next: usize,
    _out: std::marker::PhantomData<&'a mut CudaSlice<u16>>,
}

impl std::fmt::Debug for GpuStreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStreamDecoder")
            .field("header", self.dec.header())
            .field("pushed", &self.pushed)
            .finish_non_exhaustive()
    }
}

impl<'a> GpuStreamDecoder<'a> {
    /// A decoder of the blocks of a stream with `header` (read from the stream's first bytes
    /// with [`Header::read`], or received out of band) into `out`, a device cache of
    /// `header.spec`.
    ///
    /// # Errors
    /// [`CodecError::Unsupported`] for a stream the GPU does not decode,
    /// [`CodecError::BufferTooSmall`] for a wrong-sized `out`; driver failures.
    pub fn new(
        codec: &'a GpuCodec,
        header: Header,
        out: &'a mut CudaSlice<u16>,
    ) -> GpuResult<Self> {
        if out.num_bytes() != header.spec.byte_len() {
            return Err(CodecError::BufferTooSmall {
                needed: header.spec.byte_len(),
                have: out.num_bytes(),
            }
            .into());
        }
        let p = dptr(out, &codec.stream);
        // SAFETY: `out` is a live allocation of the spec's size, borrowed mutably for 'a.
        unsafe { Self::new_raw(codec, header, p, 8) }
    }

    /// As [`Self::new`], into the device memory at `out`, with `depth` (at least 1) pushes in
    /// flight.
    ///
    /// # Safety
    /// `out` must point to `header.spec.byte_len()` writable bytes of device memory in the
    /// codec's context, used by nothing else until [`Self::finish`] returns or the decoder is
    /// dropped.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub unsafe fn new_raw(
        codec: &'a GpuCodec,
        header: Header,
        out: u64,
        depth: usize,
    ) -> GpuResult<Self> {
        check_supported(&header)?;
        let tables = codec.tables(&header)?;
        let (bins, set_of) = layer_arrays(&header, &tables);
        let ctx = &codec.ctx;
        let mut slots = Vec::with_capacity(depth.max(1));
        for _ in 0..depth.max(1) {
            let stream = ctx.new_stream()?;
            slots.push(Pending {
                d_in: stream.alloc_zeros(1)?,
                d_blocks: stream.alloc_zeros(1)?,
                err: stream.alloc_zeros(1)?,
                stream,
                offsets: Vec::new(),
                busy: false,
            });
        }
        let seen = vec![false; header.spec.shape.layers * header.chunks()];
        let d = Self {
            codec,
            bins: codec.stream.clone_htod(&bins)?,
            set_of: codec.stream.clone_htod(&set_of)?,
            tables,
            dec: Decoder::from_header(header),
            kernel: DecodeKernel::default(),
            out,
            seen,
            pushed: 0,
            slots,
            next: 0,
            _out: std::marker::PhantomData,
        };
        codec.stream.synchronize()?;
        Ok(d)
    }

    /// Checks, uploads and queues the decode of `blocks`: one or more whole blocks of the
    /// stream, in any order across pushes. Returns once `blocks` has been copied to the GPU
    /// (so the caller may reuse it); the decode runs on. Waits first for the push `depth`
    /// pushes back, and reports its errors.
    ///
    /// # Errors
    /// [`DecodeError`] for a bad, repeated or truncated block header (nothing of this push is
    /// queued then), or the errors of the earlier push; driver failures.
    pub fn push(&mut self, blocks: &[u8]) -> GpuResult<()> {
        let mut pos = 0;
        let mut offsets = Vec::new();
        let chunks = self.dec.header().chunks();
        let mut mine = Vec::new();
        while pos < blocks.len() {
            let (bh, chunk) = self.dec.block_header(&blocks[pos..])?;
            let i = bh.layer as usize * chunks + chunk;
            if self.seen[i] || mine.contains(&i) {
                return Err(DecodeError::BlockOutOfRange {
                    layer: bh.layer,
                    token_start: bh.token_start,
                    tokens: bh.tokens,
                }
                .into());
            }
            if blocks.len() - pos < bh.block_len() {
                return Err(DecodeError::Truncated {
                    offset: self.pushed as usize + blocks.len(),
                    needed: bh.block_len() - (blocks.len() - pos),
                }
                .into());
            }
            mine.push(i);
            offsets.push(pos as u64);
            pos += bh.block_len();
        }
        if offsets.is_empty() {
            return Ok(());
        }
        let slot = self.next % self.slots.len();
        self.wait(slot)?;
        let s = &mut self.slots[slot];
        let stream = s.stream.clone();
        if s.d_in.len() < blocks.len() {
            s.d_in = stream.alloc_zeros(blocks.len())?;
        }
        if s.d_blocks.len() < offsets.len() {
            s.d_blocks = stream.alloc_zeros(offsets.len())?;
            s.err = stream.alloc_zeros(offsets.len())?;
        }
        let p_in = dptr(&s.d_in, &stream);
        let p_blocks = dptr(&s.d_blocks, &stream);
        // SAFETY: `d_in` and `d_blocks` hold at least `blocks.len()` bytes and
        // `offsets.len()` entries and are idle (their last decode was waited for); both host
        // slices outlive the copies, which are synchronized before this function returns.
        unsafe {
            result::memcpy_htod_async(p_in, blocks, stream.cu_stream())?;
            result::memcpy_htod_async(p_blocks, &offsets, stream.cu_stream())?;
        }
        stream.synchronize()?;
        let at = Launch {
            p_in,
            p_blocks,
            nblocks: offsets.len() as u32,
            p_err: dptr(&s.err, &stream),
            p_out: self.out,
        };
        // SAFETY: the uploaded blocks were checked above (header fields within the shape,
        // each block within the uploaded bytes); `out` holds the spec's bytes (`new`).
        unsafe {
            launch_decode(
                self.codec,
                &stream,
                self.dec.header(),
                &self.tables,
                &self.bins,
                &self.set_of,
                self.kernel,
                &at,
            )?;
        }
        for i in mine {
            self.seen[i] = true;
        }
        let s = &mut self.slots[slot];
        s.offsets = offsets.iter().map(|o| o + self.pushed).collect();
        s.busy = true;
        self.pushed += blocks.len() as u64;
        self.next += 1;
        Ok(())
    }

    /// Waits for slot `i`'s decode and reports its errors.
    fn wait(&mut self, i: usize) -> GpuResult<()> {
        let s = &mut self.slots[i];
        if !s.busy {
            return Ok(());
        }
        s.busy = false;
        let err = s.stream.clone_dtoh(&s.err)?;
        s.stream.synchronize()?;
        block_errors(&err[..s.offsets.len()], &s.offsets)
    }

    /// Waits for every queued decode; reports the first error, then blocks never pushed
    /// ([`DecodeError::MissingBlocks`]).
    ///
    /// # Errors
    /// As [`Self::push`]; `MissingBlocks`.
    pub fn finish(mut self) -> GpuResult<()> {
        let n = self.slots.len();
        let waits: Vec<GpuResult<()>> = (0..n).map(|i| self.wait((self.next + i) % n)).collect();
        for w in waits {
            w?;
        }
        let missing = self.seen.iter().filter(|s| !**s).count();
        if missing > 0 {
            return Err(DecodeError::MissingBlocks {
                missing,
                expected: self.seen.len(),
            }
            .into());
        }
        Ok(())
    }
}

impl Drop for GpuStreamDecoder<'_> {
    fn drop(&mut self) {
        // Kernels may still write into the output: let them finish first.
        for s in &self.slots {
            let _ = s.stream.synchronize();
        }
    }
}
