//! The GPU codec (cargo feature `cuda`): encode a KV cache that lives in GPU memory into a
//! kvwire bitstream, and decode a bitstream into GPU memory, with CUDA kernels compiled at run
//! time by NVRTC (through `cudarc`, which loads the driver and NVRTC dynamically, so a build
//! with this feature runs, and reports [`available`] `false`, on a machine without CUDA).
//!
//! Scope: the native levels (`cg-high`, `cg-default`, `cg-low`), fp16 caches in either
//! layout, no per-channel K scales. The output is an ordinary kvwire stream
//! (`codec/FORMAT.md`, format version 2) that [`crate::decode`] reads, and the GPU decoder
//! reads what [`crate::encode`] writes at those levels.
//!
//! Kernels (`kernels.cu`): per-token absmax and quantization (a warp per row); model choice
//! per stream (a warp per 32 streams of a block, the same search as `native::choose`);
//! rANS over the 32 lanes of a block (a warp per block, lane `j` = rANS lane `j`, spilled
//! words placed by ballot and prefix popcount); a scan of block sizes; and block assembly
//! with the CRC32C (a CTA per block, per-thread CRCs combined by `x^(8n) mod P`). Decoding:
//! CRC check (a CTA per block), then rANS decode, prediction and dequantization to fp16 in
//! one pass (a warp per block, its words staged through shared memory).
//!
//! The entropy model tables are built on the host ([`crate::model::ModelSet`]) and uploaded
//! once per set of alphabet widths.

mod decode;
mod encode;

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::model::{member, ModelRole, ModelSet, SCALES, SHAPES};
use crate::rans::PROB_SCALE;
use crate::{CodecError, DType, Header, KvSpec, Level};

pub use decode::{DecodeKernel, GpuDecoder, GpuStreamDecoder};
pub use encode::{GpuEncoder, Staging};

/// The CUDA C source of every kernel.
const SOURCE: &str = include_str!("kernels.cu");

/// Members of one model set: shapes × scales × two centre offsets.
const MEMBERS: usize = SHAPES * SCALES * 2;
// Residual slots per member in the encoder and cost tables (kernels.cu `MAXR`).
use crate::model::MAX_RESIDUALS;
// rANS lanes per block (format version 2).
use crate::native::LANES;

/// Bytes of a block's model section for `channels` channels per part (`2C` streams).
const fn models_len(channels: usize) -> usize {
    crate::native::models_len(2 * channels)
}

/// Why a GPU call failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No CUDA driver or NVRTC library could be loaded on this machine.
    #[error("no CUDA driver or NVRTC library found")]
    NoDevice,
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// NVRTC could not compile the kernels.
    #[error("NVRTC: {0}")]
    Compile(String),
    /// The codec rejected the input, the options or the bitstream.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl From<crate::DecodeError> for GpuError {
    fn from(e: crate::DecodeError) -> Self {
        Self::Codec(e.into())
    }
}

/// Result of the GPU codec.
pub type GpuResult<T> = Result<T, GpuError>;

/// Whether a CUDA driver and NVRTC can be loaded here. Call it before anything else of this
/// module: cudarc panics on the first call when the libraries are missing.
pub fn available() -> bool {
    // SAFETY: both probes only try to dlopen the libraries by name; no CUDA function is
    // called and nothing is kept loaded that a later call depends on.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() }
}

/// A KV cache in GPU memory: a device pointer to fp16 elements and the cache's spec, as a
/// serving engine holds it (see [`crate::Layout`] for the two memory orders).
#[derive(Debug, Clone, Copy)]
pub struct DeviceKv {
    ptr: u64,
    spec: KvSpec,
}

impl DeviceKv {
    /// A cache at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to `spec.byte_len()` readable bytes of device memory in the context of
    /// the [`GpuCodec`] it is used with, and stay valid and unchanged while kernels read it.
    pub const unsafe fn from_raw(ptr: u64, spec: KvSpec) -> Self {
        Self { ptr, spec }
    }

    /// A cache held in a device allocation of this crate's caller (fp16 bits).
    ///
    /// # Errors
    /// [`CodecError::InvalidKv`] if the allocation's size does not match `spec`.
    pub fn from_slice(slice: &CudaSlice<u16>, spec: KvSpec) -> GpuResult<Self> {
        if spec.byte_len() != slice.num_bytes() {
            return Err(CodecError::InvalidKv(format!(
                "device buffer of {} bytes for a cache of {}",
                slice.num_bytes(),
                spec.byte_len()
            ))
            .into());
        }
        let (ptr, _sync) = slice.device_ptr(slice.stream());
        Ok(Self { ptr, spec })
    }

    /// The device address.
    pub const fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The cache's spec.
    pub const fn spec(&self) -> &KvSpec {
        &self.spec
    }
}

/// The compiled kernels.
struct Kernels {
    quantize: CudaFunction,
    models: CudaFunction,
    rans_encode: CudaFunction,
    scan: CudaFunction,
    assemble: CudaFunction,
    verify: CudaFunction,
    decode: CudaFunction,
    decode_small: CudaFunction,
    decode_shared: CudaFunction,
}

/// The model tables of every alphabet width a header uses, on the device.
struct DeviceTables {
    /// The widths, in set order.
    widths: Vec<u32>,
    /// `[set][member][PROB_SCALE]` decoder slots (`freq | offset << 13 | residual << 25`).
    slots: CudaSlice<u32>,
    /// `[set][member][MAX_RESIDUALS]` pairs (`start | freq << 12 | (shift - 31) << 25`, `rcp`).
    enc: CudaSlice<u32>,
    /// `[set][member][MAX_RESIDUALS]` code lengths in 1/4096 bits (`ResidualTable::cost_q`).
    cost: CudaSlice<u32>,
    /// `[set][member][PROB_SCALE]` residual index of each slot (the compact decoder table).
    sym8: CudaSlice<u8>,
    /// `[set][member][MAX_RESIDUALS]` `freq | start << 13` (with `sym8`).
    info: CudaSlice<u32>,
    /// `[set][member]` compact tables of `compact_mb` bytes each: the residual index of slot
    /// `64·b` for `b = 0..64` (u8), then the cumulative starts `0, f[0], ..., 4096` (u16).
    compact: CudaSlice<u8>,
    /// Bytes per member in `compact` (a multiple of 4).
    compact_mb: usize,
}

impl DeviceTables {
    fn set_of(&self, w: u32) -> u8 {
        self.widths
            .iter()
            .position(|&x| x == w)
            .expect("width uploaded") as u8
    }
}

/// A GPU codec bound to one device: the compiled kernels, the CRC tables and the uploaded model
/// tables. Create it once (compiling takes a second or so); it is `Send + Sync`.
pub struct GpuCodec {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    crc_tab: CudaSlice<u32>,
    x2n: CudaSlice<u32>,
    tables: Mutex<Vec<Arc<DeviceTables>>>,
    ln_step: f64,
    /// Largest dynamic shared memory of a CTA (bytes).
    smem_optin: u32,
    /// Streaming multiprocessors.
    sms: u32,
    /// Per-kernel timing (environment `KVWIRE_GPU_PROFILE=1`): events after each kernel.
    prof: Option<Mutex<Vec<(&'static str, cudarc::driver::CudaEvent)>>>,
}

impl std::fmt::Debug for GpuCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCodec")
            .field("ordinal", &self.ctx.ordinal())
            .finish_non_exhaustive()
    }
}

impl GpuCodec {
    /// Opens device `ordinal` (its primary context, shared with a CUDA runtime user of the same
    /// process) and compiles the kernels for it.
    ///
    /// # Errors
    /// [`GpuError::NoDevice`] without a driver; driver or NVRTC failures.
    pub fn new(ordinal: usize) -> GpuResult<Self> {
        if !available() {
            return Err(GpuError::NoDevice);
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: this codec orders every use of its buffers itself (one stream, or events
        // between its streams), so cudarc's per-buffer event tracking is not needed; turning
        // it off only removes implicit waits this module never relies on.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let opts = CompileOptions {
            fmad: Some(false),
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            name: Some("kvwire_kernels.cu".into()),
            ..Default::default()
        };
        let ptx =
            compile_ptx_with_opts(SOURCE, opts).map_err(|e| GpuError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx)?;
        let k = Kernels {
            quantize: module.load_function("kv_quantize")?,
            models: module.load_function("kv_models")?,
            rans_encode: module.load_function("kv_rans_encode")?,
            scan: module.load_function("kv_scan")?,
            assemble: module.load_function("kv_assemble")?,
            verify: module.load_function("kv_verify")?,
            decode: module.load_function("kv_decode")?,
            decode_small: module.load_function("kv_decode_small")?,
            decode_shared: module.load_function("kv_decode_shared")?,
        };
        let smem_optin = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        k.decode_shared.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_optin,
        )?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )?
            .max(1) as u32;
        let stream = ctx.new_stream()?;
        let crc_tab = stream.clone_htod(&crc_table())?;
        let x2n = stream.clone_htod(&x2n_table())?;
        stream.synchronize()?;
        Ok(Self {
            ctx,
            stream,
            k,
            crc_tab,
            x2n,
            tables: Mutex::new(Vec::new()),
            ln_step: 1.125f64.ln(),
            smem_optin: smem_optin as u32,
            sms,
            prof: std::env::var_os("KVWIRE_GPU_PROFILE").map(|_| Mutex::new(Vec::new())),
        })
    }

    /// Records a profiling mark named `what` on `stream` (only with `KVWIRE_GPU_PROFILE`).
    fn mark(&self, what: &'static str, stream: &CudaStream) -> GpuResult<()> {
        if let Some(p) = &self.prof {
            let ev = self
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            ev.record(stream)?;
            p.lock().unwrap_or_else(|e| e.into_inner()).push((what, ev));
        }
        Ok(())
    }

    /// With `KVWIRE_GPU_PROFILE` set: the time of each kernel since the last report, as
    /// `(kernel, ms)`, summed by kernel name (waits for the marks). Empty otherwise.
    ///
    /// # Errors
    /// Driver failures.
    pub fn profile_report(&self) -> GpuResult<Vec<(&'static str, f32)>> {
        let Some(p) = &self.prof else {
            return Ok(Vec::new());
        };
        let marks = std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<(&'static str, f32)> = Vec::new();
        for w in marks.windows(2) {
            if w[1].0 == "start" {
                continue;
            }
            let ms = w[0].1.elapsed_ms(&w[1].1)?;
            match out.iter_mut().find(|(n, _)| *n == w[1].0) {
                Some(e) => e.1 += ms,
                None => out.push((w[1].0, ms)),
            }
        }
        Ok(out)
    }

    /// The CUDA context (to allocate caches in, or to share with other CUDA code).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every synchronous call of this codec runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The uploaded tables for the widths of `header` (built and uploaded on first use).
    fn tables(&self, header: &Header) -> GpuResult<Arc<DeviceTables>> {
        let mut widths: Vec<u32> = header
            .bins_k
            .iter()
            .chain(&header.bins_v)
            .map(|&b| b as u32 - 2)
            .collect();
        widths.sort_unstable();
        widths.dedup();
        let mut cache = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache
            .iter()
            .find(|t| widths.iter().all(|w| t.widths.contains(w)))
        {
            return Ok(t.clone());
        }
        let per_slots = MEMBERS * PROB_SCALE as usize;
        let per_res = MEMBERS * MAX_RESIDUALS;
        let mut slots = Vec::with_capacity(widths.len() * per_slots);
        let mut enc = vec![0u32; widths.len() * per_res * 2];
        let mut cost = vec![0u32; widths.len() * per_res];
        let mut sym8 = Vec::with_capacity(widths.len() * per_slots);
        let wmax = widths.iter().copied().max().unwrap_or(1) as usize;
        let compact_mb = 64 + 2 * (2 * wmax + 2);
        let mut compact = vec![0u8; widths.len() * MEMBERS * compact_mb];
        let mut info = vec![0u32; widths.len() * per_res];
        for (si, &w) in widths.iter().enumerate() {
            let set = ModelSet::get(w, ModelRole::Encode);
            for shape in 0..SHAPES {
                for scale in 0..SCALES {
                    for offset in 0..2 {
                        let m = member(shape, scale, offset);
                        let t = &set.tables[m];
                        let base = si * per_res + m * MAX_RESIDUALS;
                        let mut start = 0u32;
                        for (r, &f) in t.freq.iter().enumerate() {
                            enc[2 * (base + r)] = start | f << 12 | enc_shift(f) << 25;
                            enc[2 * (base + r) + 1] = enc_rcp(f);
                            cost[base + r] = t.cost_q[r];
                            info[base + r] = f | start << 13;
                            start += f;
                        }
                    }
                }
            }
            // Slots member after member, in member order.
            for m in 0..MEMBERS {
                let freq = &set.tables[m].freq;
                for (r, &f) in freq.iter().enumerate() {
                    slots.extend((0..f).map(|k| f | k << 13 | (r as u32) << 25));
                    sym8.extend((0..f).map(|_| r as u8));
                }
                let at = (si * MEMBERS + m) * compact_mb;
                compact_member(freq, &mut compact[at..at + compact_mb]);
            }
        }
        let t = Arc::new(DeviceTables {
            widths,
            slots: self.stream.clone_htod(&slots)?,
            enc: self.stream.clone_htod(&enc)?,
            cost: self.stream.clone_htod(&cost)?,
            sym8: self.stream.clone_htod(&sym8)?,
            info: self.stream.clone_htod(&info)?,
            compact: self.stream.clone_htod(&compact)?,
            compact_mb,
        });
        self.stream.synchronize()?;
        cache.push(t.clone());
        Ok(t)
    }
}

/// Writes the compact decoder table of a member with frequencies `freq` into `out`: the
/// residual index holding slot `64·b` for `b = 0..64` (u8), then the cumulative starts
/// `0, f[0], f[0] + f[1], ..., 4096` (u16 LE).
fn compact_member(freq: &[u32], out: &mut [u8]) {
    let mut cum = vec![0u32];
    for &f in freq {
        cum.push(cum[cum.len() - 1] + f);
    }
    for b in 0..64u32 {
        out[b as usize] = (cum.partition_point(|&c| c <= 64 * b) - 1) as u8;
    }
    for (i, &c) in cum.iter().enumerate() {
        out[64 + 2 * i..66 + 2 * i].copy_from_slice(&(c as u16).to_le_bytes());
    }
}

/// Checks that the GPU codec handles `header`'s stream.
fn check_supported(header: &Header) -> GpuResult<()> {
    if !matches!(
        header.level,
        Level::CgHigh | Level::CgDefault | Level::CgLow
    ) {
        return Err(CodecError::Unsupported(format!(
            "the GPU codec handles cg-high, cg-default and cg-low, not {}",
            header.level
        ))
        .into());
    }
    if header.spec.dtype != DType::F16 {
        return Err(CodecError::Unsupported(format!(
            "the GPU codec handles f16 caches, not {}",
            header.spec.dtype.name()
        ))
        .into());
    }
    if header.channel_scale_k() {
        return Err(CodecError::Unsupported(
            "the GPU codec does not do per-channel K scales".into(),
        )
        .into());
    }
    Ok(())
}

/// `ceil(log2 f)` (0 for `f = 1`): the encoder's reciprocal shift less 31.
const fn enc_shift(f: u32) -> u32 {
    32 - (f - 1).leading_zeros()
}

/// `ceil(2^(31 + s) / f)`, which fits a `u32` for every `1 <= f < 4096`.
fn enc_rcp(f: u32) -> u32 {
    let r = (1u64 << (31 + enc_shift(f))).div_ceil(f as u64);
    u32::try_from(r).expect("reciprocal fits u32")
}

/// Reflected CRC32C polynomial.
const CRC_POLY: u32 = 0x82F6_3B78;

/// The byte-at-a-time CRC32C table.
fn crc_table() -> Vec<u32> {
    (0..256u32)
        .map(|i| {
            (0..8).fold(i, |c, _| {
                if c & 1 != 0 {
                    (c >> 1) ^ CRC_POLY
                } else {
                    c >> 1
                }
            })
        })
        .collect()
}

/// zlib's `multmodp`: `a · b mod P` in the reflected representation (bit 31 is `x^0`).
fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC_POLY
        } else {
            b >> 1
        };
    }
    p
}

/// `x^(2^k) mod P` for `k = 0..32`.
fn x2n_table() -> Vec<u32> {
    let mut p = 1u32 << 30;
    let mut t = vec![p];
    for _ in 1..32 {
        p = multmodp(p, p);
        t.push(p);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' CRC: per-segment raw CRCs (from state 0) shifted by the bytes after them,
    /// plus the shifted initial state, equal the CRC32C of the whole buffer.
    #[test]
    fn crc_combination_matches_crc32c() {
        let tab = crc_table();
        let x2n = x2n_table();
        let x8n = |mut n: u64| {
            let (mut p, mut k) = (1u32 << 31, 3usize);
            while n != 0 {
                if n & 1 != 0 {
                    p = multmodp(x2n[k & 31], p);
                }
                n >>= 1;
                k += 1;
            }
            p
        };
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761u32) >> 13) as u8)
            .collect();
        for parts in [1usize, 7, 32, 256] {
            let r = data.len() as u64;
            let seg = r.div_ceil(parts as u64);
            let mut all = multmodp(x8n(r), 0xffff_ffff);
            for i in 0..parts as u64 {
                let (b0, b1) = ((seg * i).min(r), (seg * (i + 1)).min(r));
                let c = data[b0 as usize..b1 as usize].iter().fold(0u32, |c, &b| {
                    tab[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
                });
                if b1 > b0 {
                    all ^= multmodp(x8n(r - b1), c);
                }
            }
            assert_eq!(all ^ 0xffff_ffff, crc32c::crc32c(&data), "{parts} parts");
        }
    }

    #[test]
    fn reciprocals_divide_exactly() {
        for f in 1..PROB_SCALE {
            let (s, rcp) = (enc_shift(f), enc_rcp(f) as u64);
            for x in [0u32, 1, f - 1, f, 65_535, 1 << 20, (1 << 31) - 1] {
                assert_eq!(((x as u64 * rcp) >> (31 + s)) as u32, x / f, "x={x} f={f}");
            }
        }
    }

    /// The shared-memory kernel's lookup (kernels.cu, `MODE == 2`) finds every slot's residual,
    /// start and frequency, for every member of the widths the levels use.
    #[test]
    fn compact_tables_find_every_slot() {
        for w in [30u32, 14, 10, 62] {
            let set = ModelSet::get(w, ModelRole::Encode);
            let mb = 64 + 2 * (2 * w as usize + 2);
            let mut t = vec![0u8; mb];
            for table in &set.tables {
                compact_member(&table.freq, &mut t);
                let cum = |i: usize| u16::from_le_bytes([t[64 + 2 * i], t[65 + 2 * i]]) as u32;
                let mut want = Vec::new();
                for (r, &f) in table.freq.iter().enumerate() {
                    want.extend((0..f).map(|_| r as u32));
                }
                for slot in 0..PROB_SCALE {
                    let bk = (slot >> 6) as usize;
                    let (mut lo, mut hi) = (
                        t[bk] as u32,
                        if bk == 63 { 2 * w } else { t[bk + 1] as u32 },
                    );
                    while lo < hi {
                        let mid = (lo + hi + 1) >> 1;
                        if cum(mid as usize) <= slot {
                            lo = mid;
                        } else {
                            hi = mid - 1;
                        }
                    }
                    let r = lo as usize;
                    assert_eq!(lo, want[slot as usize]);
                    assert_eq!(cum(r + 1) - cum(r), table.freq[r]);
                    assert!(cum(r) <= slot && slot < cum(r + 1));
                }
            }
        }
    }

    #[test]
    fn probe_does_not_panic() {
        let _ = available();
    }
}
