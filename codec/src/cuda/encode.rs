//! The GPU encoder: a device cache in, a kvwire bitstream out (in device memory, in a `Vec`,
//! or layer by layer through pinned host staging).

use std::sync::Arc;

use cudarc::driver::{
    result, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::{
    check_supported, models_len, DeviceKv, DeviceTables, GpuCodec, GpuError, GpuResult, LANES,
};
use crate::{CodecError, EncodeOptions, Encoder, Header, KvSpec, Part};

/// The device address of a buffer (event tracking is off, so the guard does nothing).
pub(super) fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Scratch of one encode launch over `nl` layers.
struct Workspace {
    nl: usize,
    syms: CudaSlice<u8>,
    scales: CudaSlice<u16>,
    models: CudaSlice<u32>,
    wbuf: CudaSlice<u16>,
    wstart: CudaSlice<u32>,
    sizes: CudaSlice<u64>,
    offs: CudaSlice<u64>,
    err: CudaSlice<u32>,
    /// The coded blocks (after `base` bytes kept for the file header).
    out: CudaSlice<u8>,
}

/// Geometry shared by every launch of one encoder.
#[derive(Debug, Clone, Copy)]
struct Geo {
    c: usize,
    t: usize,
    h: usize,
    d: usize,
    vllm: u32,
    chunk: usize,
    nb: usize,
    /// Words of scratch per block: one per symbol plus the lanes' states.
    wcap: usize,
    models_len: usize,
    /// Largest bytes of one coded block.
    max_block: usize,
    /// Width of the widest alphabet (for the histogram's shared memory).
    wmax: u32,
}

impl Workspace {
    fn new(stream: &Arc<CudaStream>, g: &Geo, nl: usize, base: usize) -> GpuResult<Self> {
        let blocks = nl * g.nb;
        Ok(Self {
            nl,
            syms: stream.alloc_zeros(blocks * 2 * g.chunk * g.c)?,
            scales: stream.alloc_zeros(nl * 2 * g.t)?,
            models: stream.alloc_zeros(blocks * 2 * g.c)?,
            wbuf: stream.alloc_zeros(blocks * g.wcap)?,
            wstart: stream.alloc_zeros(blocks)?,
            sizes: stream.alloc_zeros(blocks)?,
            offs: stream.alloc_zeros(blocks + 1)?,
            err: stream.alloc_zeros(1)?,
            out: stream.alloc_zeros(base + blocks * g.max_block)?,
        })
    }
}

/// Encodes fp16 caches of one spec at one native level on the GPU.
///
/// Holds the header, the device tables and the scratch of a whole-cache encode (about 2.5×
/// the cache's bytes: symbols, worst-case words and worst-case output), so that repeated
/// encodes allocate nothing.
pub struct GpuEncoder<'a> {
    codec: &'a GpuCodec,
    header: Header,
    header_len: usize,
    tables: Arc<DeviceTables>,
    bins: CudaSlice<u8>,
    set_of: CudaSlice<u8>,
    geo: Geo,
    ws: Workspace,
}

impl std::fmt::Debug for GpuEncoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEncoder")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl<'a> GpuEncoder<'a> {
    /// An encoder for caches of `spec` at `opts` (level `cg-high`, `cg-default` or `cg-low`,
    /// no channel scales; `spec.dtype` f16).
    ///
    /// # Errors
    /// [`CodecError::Unsupported`] for options the GPU codec does not handle, as
    /// [`Encoder::new`] for invalid ones; driver failures.
    pub fn new(codec: &'a GpuCodec, spec: KvSpec, opts: &EncodeOptions) -> GpuResult<Self> {
        let header = Encoder::new(spec, opts)?.header().clone();
        check_supported(&header)?;
        let tables = codec.tables(&header)?;
        let s = &spec.shape;
        let c = s.channels();
        let chunk = header.chunk_tokens as usize;
        let nb = header.chunks();
        let ml = models_len(c);
        let wcap = 2 * c * chunk + 2 * LANES;
        let geo = Geo {
            c,
            t: s.tokens,
            h: s.kv_heads,
            d: s.head_dim,
            vllm: (spec.layout == crate::Layout::Vllm) as u32,
            chunk,
            nb,
            wcap,
            models_len: ml,
            max_block: 24 + 4 * chunk + ml + 4 + 2 * wcap,
            wmax: tables.widths.iter().copied().max().unwrap_or(2),
        };
        let stream = &codec.stream;
        let (bins, set_of) = layer_arrays(&header, &tables);
        let mut head = Vec::new();
        header.write(&mut head);
        let ws = Workspace::new(stream, &geo, s.layers, head.len())?;
        // The file header goes in front of the blocks once; every encode keeps it.
        // SAFETY: `ws.out` holds at least `head.len()` bytes; `head` lives until the copy is
        // synchronized below.
        unsafe {
            result::memcpy_htod_async(dptr(&ws.out, stream), &head, stream.cu_stream())?;
        }
        let enc = Self {
            codec,
            header_len: head.len(),
            tables,
            bins: stream.clone_htod(&bins)?,
            set_of: stream.clone_htod(&set_of)?,
            header,
            geo,
            ws,
        };
        stream.synchronize()?;
        Ok(enc)
    }

    /// The file header of every stream this encoder writes.
    pub const fn header(&self) -> &Header {
        &self.header
    }

    fn check_input(&self, input: &DeviceKv) -> GpuResult<()> {
        if input.spec != self.header.spec {
            return Err(CodecError::InvalidKv(format!(
                "device cache {:?} does not match the encoder's {:?}",
                input.spec, self.header.spec
            ))
            .into());
        }
        Ok(())
    }

    /// Queues the encode of the whole cache on the codec's stream and returns at once; the
    /// stream is in [`Self::device_output`] after [`Self::finish`]. For timing with events.
    ///
    /// # Errors
    /// [`CodecError::InvalidKv`] for a cache of another spec; launch failures.
    pub fn launch(&mut self, input: &DeviceKv) -> GpuResult<()> {
        self.check_input(input)?;
        let stream = self.codec.stream.clone();
        launch_layers(
            self.codec,
            &stream,
            &self.geo,
            &self.tables,
            &self.bins,
            &self.set_of,
            &mut self.ws,
            input.ptr,
            0,
            self.header_len as u64,
            (self.geo.h * self.geo.d) % 8 == 0 && self.geo.d % 8 == 0 && input.ptr % 16 == 0,
        )
    }

    /// Waits for the encode queued by [`Self::launch`]; returns the stream's length.
    ///
    /// # Errors
    /// [`CodecError::NonFinite`] for NaN or infinite input; driver failures.
    pub fn finish(&mut self) -> GpuResult<usize> {
        let stream = &self.codec.stream;
        let (end, err) = read_end(stream, &self.ws)?;
        check_err(err, 0, self.geo.t)?;
        Ok(end as usize)
    }

    /// The encoded stream in device memory (valid after [`Self::finish`]; `len` from it).
    pub fn device_output(&self) -> &CudaSlice<u8> {
        &self.ws.out
    }

    /// Encodes the whole cache and copies the stream to the host.
    ///
    /// # Errors
    /// As [`Self::launch`] and [`Self::finish`].
    pub fn encode(&mut self, input: &DeviceKv) -> GpuResult<Vec<u8>> {
        self.launch(input)?;
        let len = self.finish()?;
        let mut v = vec![0u8; len];
        let stream = &self.codec.stream;
        // SAFETY: `ws.out` holds at least `len` bytes (the scan's end) and the encode that
        // wrote them is complete (finish synchronized the stream).
        unsafe {
            result::memcpy_dtoh_async(&mut v, dptr(&self.ws.out, stream), stream.cu_stream())?;
        }
        stream.synchronize()?;
        Ok(v)
    }

    /// Host-pinned staging for [`Self::encode_pipelined`] with 8 layers in flight.
    ///
    /// # Errors
    /// Driver failures (allocation).
    pub fn staging(&self) -> GpuResult<Staging> {
        self.staging_with_depth(8)
    }

    /// Host-pinned staging for [`Self::encode_pipelined`]: `depth` (at least 2) layers' worth
    /// of scratch, device output and pinned memory, each with its stream, and a copy stream.
    /// More layers in flight keep more of the GPU busy (one layer at the default 256-token
    /// chunks is only `tokens / 256` blocks, each coded by one warp).
    ///
    /// # Errors
    /// Driver failures (allocation).
    pub fn staging_with_depth(&self, depth: usize) -> GpuResult<Staging> {
        let ctx = &self.codec.ctx;
        let per_layer = self.geo.nb * self.geo.max_block;
        let mut slots = Vec::with_capacity(depth.max(2));
        for _ in 0..depth.max(2) {
            let stream = ctx.new_stream()?;
            let ws = Workspace::new(&stream, &self.geo, 1, 0)?;
            // SAFETY: plain page-locked host memory (flags 0: cached, not write-combined, so
            // the host reads it at full speed); every byte is written by a copy before it is
            // read.
            let pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(per_layer, 0)? };
            // SAFETY: as above, one u64 and one u32 written by copies before they are read.
            let (end, err) = unsafe {
                (
                    ctx.alloc_pinned_with_flags::<u64>(1, 0)?,
                    ctx.alloc_pinned_with_flags::<u32>(1, 0)?,
                )
            };
            slots.push(Slot {
                stream,
                ws,
                pinned,
                end,
                err,
            });
        }
        Ok(Staging {
            copy: ctx.new_stream()?,
            slots,
        })
    }

    /// Encodes layer by layer into pinned host memory: while layer `l` is copied out, the
    /// kernels of the next layers (up to the staging's depth) run, and `sink` gets the header,
    /// then each layer's blocks (`Some(layer)`), in order, from pinned memory. Their
    /// concatenation is the stream [`Self::encode`] returns.
    ///
    /// # Errors
    /// As [`Self::encode`]; the first error of `sink`.
    pub fn encode_pipelined(
        &mut self,
        input: &DeviceKv,
        staging: &mut Staging,
        mut sink: impl FnMut(Option<usize>, &[u8]) -> GpuResult<()>,
    ) -> GpuResult<()> {
        self.check_input(input)?;
        let mut head = Vec::new();
        self.header.write(&mut head);
        sink(None, &head)?;
        let layers = self.header.spec.shape.layers;
        let depth = staging.slots.len();
        let layer_bytes = self.header.spec.shape.layer_elements() as u64 * 2;
        let vec = (self.geo.h * self.geo.d) % 8 == 0 && self.geo.d % 8 == 0 && input.ptr % 16 == 0;
        let blocks = self.geo.nb as u64;
        let tokens = self.geo.t;
        let finish = |l: usize,
                      s: &mut Slot,
                      copy: &Arc<CudaStream>,
                      sink: &mut LayerSink<'_>|
         -> GpuResult<()> {
            s.stream.synchronize()?;
            check_err(s.err.as_slice()?[0], l, tokens)?;
            let len = s.end.as_slice()?[0] as usize;
            // SAFETY: the layer's kernels are complete (its stream was synchronized), its
            // output holds `len` bytes, and `pinned` holds at least `len`.
            unsafe {
                result::memcpy_dtoh_async(
                    &mut s.pinned.as_mut_slice()?[..len],
                    dptr(&s.ws.out, copy),
                    copy.cu_stream(),
                )?;
            }
            copy.synchronize()?;
            sink(Some(l), &s.pinned.as_slice()?[..len])
        };
        for l in 0..layers {
            if l >= depth {
                finish(
                    l - depth,
                    &mut staging.slots[l % depth],
                    &staging.copy,
                    &mut sink,
                )?;
            }
            let s = &mut staging.slots[l % depth];
            let stream = s.stream.clone();
            launch_layers(
                self.codec,
                &stream,
                &self.geo,
                &self.tables,
                &self.bins,
                &self.set_of,
                &mut s.ws,
                input.ptr + l as u64 * layer_bytes,
                l,
                0,
                vec,
            )?;
            // SAFETY: `offs` has `blocks + 1` entries and `err` one; the pinned targets have
            // room for them and are not read before the stream is synchronized.
            unsafe {
                result::memcpy_dtoh_async(
                    s.end.as_mut_slice()?,
                    dptr(&s.ws.offs, &stream) + 8 * blocks,
                    stream.cu_stream(),
                )?;
                result::memcpy_dtoh_async(
                    s.err.as_mut_slice()?,
                    dptr(&s.ws.err, &stream),
                    stream.cu_stream(),
                )?;
            }
        }
        for l in layers.saturating_sub(depth)..layers {
            finish(l, &mut staging.slots[l % depth], &staging.copy, &mut sink)?;
        }
        Ok(())
    }
}

/// Where [`GpuEncoder::encode_pipelined`] hands each layer's bytes.
type LayerSink<'a> = dyn FnMut(Option<usize>, &[u8]) -> GpuResult<()> + 'a;

/// The per-layer scratch, output and pinned memory of one in-flight layer.
struct Slot {
    stream: Arc<CudaStream>,
    ws: Workspace,
    pinned: PinnedHostSlice<u8>,
    end: PinnedHostSlice<u64>,
    err: PinnedHostSlice<u32>,
}

/// Pinned host staging and streams for [`GpuEncoder::encode_pipelined`] (from
/// [`GpuEncoder::staging`]; reuse it across calls).
pub struct Staging {
    copy: Arc<CudaStream>,
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging").finish_non_exhaustive()
    }
}

/// Per file layer and part: the bins byte, and the index of its width's table set.
pub(super) fn layer_arrays(header: &Header, tables: &DeviceTables) -> (Vec<u8>, Vec<u8>) {
    let mut bins = Vec::new();
    let mut set_of = Vec::new();
    for (k, v) in header.bins_k.iter().zip(&header.bins_v) {
        for b in [*k, *v] {
            bins.push(b);
            set_of.push(tables.set_of(b as u32 - 2));
        }
    }
    (bins, set_of)
}

/// Reads the scan's end and the error word (synchronizing the stream).
fn read_end(stream: &Arc<CudaStream>, ws: &Workspace) -> GpuResult<(u64, u32)> {
    let mut end = [0u64];
    let mut err = [0u32];
    let blocks = ws.wstart.len();
    // SAFETY: `offs` has `blocks + 1` entries and `err` one; the host arrays live until the
    // synchronize below.
    unsafe {
        result::memcpy_dtoh_async(
            &mut end,
            dptr(&ws.offs, stream) + 8 * blocks as u64,
            stream.cu_stream(),
        )?;
        result::memcpy_dtoh_async(&mut err, dptr(&ws.err, stream), stream.cu_stream())?;
    }
    stream.synchronize()?;
    Ok((end[0], err[0]))
}

/// Maps the quantizer's error word (the first non-finite row, or `u32::MAX`) to an error.
fn check_err(err: u32, layer0: usize, tokens: usize) -> GpuResult<()> {
    if err == u32::MAX {
        return Ok(());
    }
    let row = err as usize;
    Err(GpuError::Codec(CodecError::NonFinite {
        layer: layer0 + row / (2 * tokens),
        part: [Part::K, Part::V][(row / tokens) % 2].name(),
        token: row % tokens,
    }))
}

/// Queues every kernel of an encode of `ws.nl` layers (file layers `layer0..`) of the cache at
/// `input` on `stream`, the blocks written from byte `base` of `ws.out`.
#[allow(clippy::too_many_arguments)]
fn launch_layers(
    codec: &GpuCodec,
    stream: &Arc<CudaStream>,
    g: &Geo,
    tables: &DeviceTables,
    bins: &CudaSlice<u8>,
    set_of: &CudaSlice<u8>,
    ws: &mut Workspace,
    input: u64,
    layer0: usize,
    base: u64,
    vec: bool,
) -> GpuResult<()> {
    let k = &codec.k;
    let nl = ws.nl as u32;
    let (c, t, h, d) = (g.c as u32, g.t as u32, g.h as u32, g.d as u32);
    let (chunk, nb) = (g.chunk as u32, g.nb as u32);
    let layer0 = layer0 as u32;
    let blocks = nl * nb;
    let p_bins = dptr(bins, stream);
    let p_set = dptr(set_of, stream);
    let p_syms = dptr(&ws.syms, stream);
    let p_scales = dptr(&ws.scales, stream);
    let p_models = dptr(&ws.models, stream);
    let p_wbuf = dptr(&ws.wbuf, stream);
    let p_wstart = dptr(&ws.wstart, stream);
    let p_sizes = dptr(&ws.sizes, stream);
    let p_offs = dptr(&ws.offs, stream);
    let p_err = dptr(&ws.err, stream);
    let p_out = dptr(&ws.out, stream);
    let p_cost = dptr(&tables.cost, stream);
    let p_enc = dptr(&tables.enc, stream);
    let p_crc = dptr(&codec.crc_tab, stream);
    let p_x2n = dptr(&codec.x2n, stream);
    let wcap = g.wcap as u64;
    let ml = g.models_len as u32;
    let vec = vec as u32;
    let vllm = g.vllm;
    // SAFETY: every pointer is a live allocation of this encoder (or the caller's cache,
    // which `DeviceKv` vouches for) sized for `nl` layers of this geometry as `Workspace::new`
    // computed; the kernels index within those sizes (kernels.cu); the argument list matches
    // each kernel's parameter list in type and order.
    unsafe {
        codec.mark("start", stream)?;
        result::memset_d8_async(p_err, 0xff, 4, stream.cu_stream())?;
        let rows = nl as u64 * 2 * t as u64;
        stream
            .launch_builder(&k.quantize)
            .arg(&input)
            .arg(&nl)
            .arg(&h)
            .arg(&t)
            .arg(&d)
            .arg(&vllm)
            .arg(&chunk)
            .arg(&nb)
            .arg(&p_bins)
            .arg(&layer0)
            .arg(&vec)
            .arg(&p_syms)
            .arg(&p_scales)
            .arg(&p_err)
            .launch(LaunchConfig {
                grid_dim: ((rows * 32).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })?;
        codec.mark("quantize", stream)?;
        let hist_bins = 2 * g.wmax + 1;
        let per_warp = hist_bins * 32 * 4;
        let wpc = (48 * 1024 / per_warp).clamp(1, 4);
        let warps = blocks as u64 * 2 * c.div_ceil(32) as u64;
        stream
            .launch_builder(&k.models)
            .arg(&p_syms)
            .arg(&nl)
            .arg(&c)
            .arg(&t)
            .arg(&chunk)
            .arg(&nb)
            .arg(&p_bins)
            .arg(&layer0)
            .arg(&p_set)
            .arg(&p_cost)
            .arg(&codec.ln_step)
            .arg(&p_models)
            .arg(&hist_bins)
            .launch(LaunchConfig {
                grid_dim: (warps.div_ceil(wpc as u64) as u32, 1, 1),
                block_dim: (32 * wpc, 1, 1),
                shared_mem_bytes: wpc * per_warp,
            })?;
        codec.mark("models", stream)?;
        stream
            .launch_builder(&k.rans_encode)
            .arg(&p_syms)
            .arg(&nl)
            .arg(&c)
            .arg(&t)
            .arg(&chunk)
            .arg(&nb)
            .arg(&layer0)
            .arg(&p_set)
            .arg(&p_enc)
            .arg(&p_models)
            .arg(&p_wbuf)
            .arg(&wcap)
            .arg(&p_wstart)
            .arg(&p_sizes)
            .arg(&ml)
            .launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })?;
        codec.mark("rans_encode", stream)?;
        stream
            .launch_builder(&k.scan)
            .arg(&p_sizes)
            .arg(&blocks)
            .arg(&base)
            .arg(&p_offs)
            .launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            })?;
        codec.mark("scan", stream)?;
        stream
            .launch_builder(&k.assemble)
            .arg(&p_out)
            .arg(&p_offs)
            .arg(&nl)
            .arg(&c)
            .arg(&t)
            .arg(&chunk)
            .arg(&nb)
            .arg(&layer0)
            .arg(&p_scales)
            .arg(&p_models)
            .arg(&p_wbuf)
            .arg(&wcap)
            .arg(&p_wstart)
            .arg(&ml)
            .arg(&p_crc)
            .arg(&p_x2n)
            .launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })?;
        codec.mark("assemble", stream)?;
    }
    Ok(())
}
