//! The GPU decoder: a kvwire bitstream in, the fp16 cache in device memory out.

use std::sync::Arc;

use cudarc::driver::{result, CudaSlice, LaunchConfig, PushKernelArg};

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
        let (dec, mut pos) = Decoder::new(buf)?;
        let h = dec.header().clone();
        check_supported(&h)?;
        if (buf.len() as u64) < h.min_encoded_len() {
            return Err(DecodeError::Truncated {
                offset: buf.len(),
                needed: (h.min_encoded_len() - buf.len() as u64) as usize,
            }
            .into());
        }
        let chunks = h.chunks();
        let mut seen = vec![false; h.spec.shape.layers * chunks];
        let mut offsets = Vec::with_capacity(seen.len());
        while pos < buf.len() {
            let (bh, chunk) = dec.block_header(&buf[pos..])?;
            let slot = &mut seen[bh.layer as usize * chunks + chunk];
            if *slot {
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
            *slot = true;
            offsets.push(pos as u64);
            pos += bh.block_len();
        }
        let missing = seen.iter().filter(|s| !**s).count();
        if missing > 0 {
            return Err(DecodeError::MissingBlocks {
                missing,
                expected: seen.len(),
            }
            .into());
        }
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
        let spec = self.header.spec;
        let stream = &self.codec.stream;
        let k = &self.codec.k;
        let s = &spec.shape;
        let (c, h, t, d) = (
            s.channels() as u32,
            s.kv_heads as u32,
            s.tokens as u32,
            s.head_dim as u32,
        );
        let vllm = (spec.layout == crate::Layout::Vllm) as u32;
        let nblocks = self.offsets.len() as u32;
        let layer0 = 0u32;
        let ml = models_len(s.channels()) as u32;
        let p_in = dptr(&self.d_in, stream);
        let p_blocks = dptr(&self.d_blocks, stream);
        let p_err = dptr(&self.err, stream);
        let p_bins = dptr(&self.bins, stream);
        let p_set = dptr(&self.set_of, stream);
        let p_slots = dptr(&self.tables.slots, stream);
        let p_sym8 = dptr(&self.tables.sym8, stream);
        let p_info = dptr(&self.tables.info, stream);
        let p_crc = dptr(&self.codec.crc_tab, stream);
        let p_x2n = dptr(&self.codec.x2n, stream);
        // SAFETY: `p_out` holds the spec's bytes (checked by `launch`, promised by the caller
        // of `launch_into_ptr`). The other pointers are live allocations: the uploaded
        // stream, whose block offsets and block headers the host checked (each block lies
        // within the stream, its layer and tokens within the shape), and the tables. The
        // kernels bound every payload read by the block's payload_len and clamp word reads to
        // the word count. The argument lists match the kernels' parameter lists.
        unsafe {
            self.codec.mark("start", stream)?;
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
            self.codec.mark("verify", stream)?;
            let tbytes = self.tables.compact.len() as u32;
            let mb = self.tables.compact_mb as u32;
            // Blocks spread over the SMs in one wave: about one CTA per SM, each loading the
            // tables into its shared memory once.
            let wpc = nblocks.div_ceil(self.codec.sms).clamp(1, SHARED_WARPS);
            let kernel = match self.kernel {
                DecodeKernel::Shared if tbytes + wpc * WARP_SMEM > self.codec.smem_optin => {
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
            let p_compact = dptr(&self.tables.compact, stream);
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
            self.codec.mark("decode", stream)?;
        }
        Ok(())
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
        let Some((bi, &e)) = err.iter().enumerate().find(|(_, &e)| e != 0) else {
            return Ok(());
        };
        let at = self.offsets[bi] as usize;
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
