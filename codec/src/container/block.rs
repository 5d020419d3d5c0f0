//! Block payloads of every level: quantize a (layer, token chunk), code it; and the reverse.

use crate::bits::ByteReader;
use crate::dtype::{bf16_bits_round_up, DType};
use crate::error::{CodecError, DecodeError, Result};
use crate::layout::{KvView, Part};
use crate::level::Level;
use crate::native::{self, BlockSymbols};
use crate::plain_f16;
use crate::quant::{self, alphabet};
use crate::{lmcache, Header};
use half::slice::HalfFloatSliceExt;

/// LMCache codes each stream over at most this many tokens.
const LMCACHE_GROUP: usize = 256;

/// The quantized form of one block: per-token scales and channel-major symbols.
struct QuantBlock {
    /// Scale bits, `[part][token]`.
    scales: [Vec<u16>; 2],
    /// Per-channel K scale bits (bf16), when the header asks for them.
    channel_scales: Option<Vec<u16>>,
    /// Symbols, token-major per part: `[part][token][channel]`.
    syms: Vec<u8>,
}

/// Quantizes tokens `t0..t0+n` of `layer` of `view`.
#[inline(always)]
fn quantize(header: &Header, view: &KvView<'_>, at: BlockAt) -> Result<QuantBlock> {
    let BlockAt {
        view_layer,
        layer,
        t0,
        n,
    } = at;
    let c = view.spec().shape.channels();
    let (bk, bv) = header.layer_bins(layer);
    let dt = header.spec.dtype;
    let mut row = vec![0f32; c];
    let mut q = vec![0u8; c];
    let mut syms = vec![0u8; 2 * c * n];
    let mut scales = [vec![0u16; n], vec![0u16; n]];
    let channel_scales = header.channel_scale_k().then(|| {
        let mut cs = vec![0f32; c];
        for t in t0..t0 + n {
            view.read_row(view_layer, Part::K, t, &mut row);
            for (m, &x) in cs.iter_mut().zip(&row) {
                *m = m.max(x.abs());
            }
        }
        cs.iter()
            .map(|&m| bf16_bits_round_up(m))
            .collect::<Vec<u16>>()
    });
    if let Some(cs) = &channel_scales {
        // A channel scale beyond bf16's range (or from non-finite input) cannot be stored.
        if let Some(ch) = cs
            .iter()
            .position(|&b| !DType::BF16.f32_from_bits(b as u32).is_finite())
        {
            let token = (t0..t0 + n)
                .find(|&t| {
                    view.read_row(view_layer, Part::K, t, &mut row);
                    !DType::BF16
                        .f32_from_bits(bf16_bits_round_up(row[ch].abs()) as u32)
                        .is_finite()
                })
                .unwrap_or(t0);
            return Err(CodecError::NonFinite {
                layer,
                part: Part::K.name(),
                token,
            });
        }
    }
    let inv: Option<Vec<f32>> = channel_scales.as_ref().map(|cs| {
        cs.iter()
            .map(|&b| {
                let s = DType::BF16.f32_from_bits(b as u32);
                if s > 0.0 && (1.0 / s).is_finite() {
                    1.0 / s
                } else {
                    0.0
                }
            })
            .collect()
    });
    for (p, part) in Part::BOTH.into_iter().enumerate() {
        let bins = if p == 0 { bk } else { bv };
        for i in 0..n {
            view.read_row(view_layer, part, t0 + i, &mut row);
            if let (Part::K, Some(inv)) = (part, &inv) {
                for (x, s) in row.iter_mut().zip(inv) {
                    *x *= s;
                }
            }
            let bits =
                quant::quantize_row(&row, bins, dt, &mut q).ok_or(CodecError::NonFinite {
                    layer,
                    part: part.name(),
                    token: t0 + i,
                })?;
            scales[p][i] = bits;
            syms[(p * n + i) * c..(p * n + i + 1) * c].copy_from_slice(&q);
        }
    }
    Ok(QuantBlock {
        scales,
        channel_scales,
        syms,
    })
}

/// Where a block's tokens are: layer `view_layer` of the view being encoded, which is layer
/// `layer` of the cache, tokens `t0..t0 + n`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockAt {
    pub(crate) view_layer: usize,
    pub(crate) layer: usize,
    pub(crate) t0: usize,
    pub(crate) n: usize,
}

/// Appends the payload of the block `at` of `view` at `header`'s level.
pub(crate) fn encode_payload(
    header: &Header,
    view: &KvView<'_>,
    at: BlockAt,
    out: &mut Vec<u8>,
) -> Result<()> {
    encode_payload_with(header, view, at, out, true)
}

/// [`encode_payload`]; `fused` lets a SIMD loop quantize q8 blocks of f16 rows itself (tests
/// turn it off to compare with the portable quantizer).
fn encode_payload_with(
    header: &Header,
    view: &KvView<'_>,
    at: BlockAt,
    out: &mut Vec<u8>,
    fused: bool,
) -> Result<()> {
    let BlockAt {
        view_layer,
        layer,
        t0,
        n,
    } = at;
    let c = view.spec().shape.channels();
    if header.level == Level::Raw {
        let rb = c * view.spec().dtype.size();
        let start = out.len();
        out.resize(start + 2 * n * rb, 0);
        let mut pos = start;
        for part in Part::BOTH {
            for t in t0..t0 + n {
                view.copy_row_bytes(view_layer, part, t, &mut out[pos..pos + rb]);
                pos += rb;
            }
        }
        return Ok(());
    }
    if fused
        && header.level == Level::Q8
        && header.spec.dtype == DType::F16
        && view.spec().dtype == DType::F16
        && !header.channel_scale_k()
        && plain_f16::available()
    {
        let start = out.len();
        let done = encode_q8_f16(header, view, at, out);
        if !matches!(done, Ok(true)) {
            out.truncate(start);
        }
        if done? {
            return Ok(());
        }
    }
    let qb = crate::cpu::with_avx2(
        #[inline(always)]
        || quantize(header, view, at),
    )?;
    for s in qb.scales.iter().flatten() {
        out.extend_from_slice(&s.to_le_bytes());
    }
    if let Some(cs) = &qb.channel_scales {
        for s in cs {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    let (bk, bv) = header.layer_bins(layer);
    match header.level {
        Level::Raw => unreachable!("handled above"),
        Level::Q8 => out.extend_from_slice(&qb.syms),
        Level::CgHigh | Level::CgDefault | Level::CgLow => {
            let b = BlockSymbols {
                n,
                channels: c,
                widths: [alphabet(bk) - 1, alphabet(bv) - 1],
            };
            native::encode_symbols(&qb.syms, b, out);
        }
        Level::Lmcache => {
            let mut streams = vec![0u8; qb.syms.len()];
            transpose(&qb.syms, n, c, &mut streams);
            encode_lmcache(header, &streams, c, n, out);
        }
    }
    Ok(())
}

/// Appends a q8 payload of f16 rows quantized by the SIMD loop: every row's scale, then its
/// symbols, as the portable path lays them out. `Ok(false)` (with `out` partly written) where
/// a row's layout is out of the loop's reach.
fn encode_q8_f16(
    header: &Header,
    view: &KvView<'_>,
    at: BlockAt,
    out: &mut Vec<u8>,
) -> Result<bool> {
    let (c, n) = (view.spec().shape.channels(), at.n);
    let (bk, bv) = header.layer_bins(at.layer);
    let start = out.len();
    out.resize(start + 4 * n + 2 * c * n, 0);
    let (scales, syms) = out[start..].split_at_mut(4 * n);
    for (p, part) in Part::BOTH.into_iter().enumerate() {
        let bins = if p == 0 { bk } else { bv };
        for i in 0..n {
            let r = view.spec().row_runs(at.view_layer, part, at.t0 + i);
            if !plain_f16::row_fits(view.bytes(), r) || r.runs * r.run_len != c {
                return Ok(false);
            }
            let row = p * n + i;
            let bits = plain_f16::quantize_row(view.bytes(), r, bins, &mut syms[row * c..][..c])
                .ok_or(CodecError::NonFinite {
                    layer: at.layer,
                    part: part.name(),
                    token: at.t0 + i,
                })?;
            scales[2 * row..2 * row + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    Ok(true)
}

/// LMCache's max_bins over the whole header: one CDF length (Lp = max_bins + 1) for K and V.
fn lmcache_max_bins(header: &Header) -> u32 {
    header
        .bins_k
        .iter()
        .chain(&header.bins_v)
        .map(|&b| b as u32)
        .max()
        .unwrap_or(32)
}

fn encode_lmcache(header: &Header, syms: &[u8], c: usize, n: usize, out: &mut Vec<u8>) {
    let max_bins = lmcache_max_bins(header);
    let lp = max_bins as usize + 1;
    let mut cdfs = vec![0u16; 2 * c * lp];
    for (ch, cdf) in cdfs.chunks_exact_mut(lp).enumerate() {
        lmcache::cdf::channel_cdf(&syms[ch * n..(ch + 1) * n], max_bins, cdf);
        for v in cdf.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut streams = Vec::new();
    for g0 in (0..n).step_by(LMCACHE_GROUP) {
        let g1 = (g0 + LMCACHE_GROUP).min(n);
        streams.clear();
        let mut lens = Vec::with_capacity(2 * c);
        for ch in 0..2 * c {
            let cdf = &cdfs[ch * lp..(ch + 1) * lp];
            lens.push(
                lmcache::range::encode(cdf, &syms[ch * n + g0..ch * n + g1], &mut streams) as u32,
            );
        }
        for l in lens {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&streams);
    }
}

/// Decodes a block payload of (`layer`, tokens `t0..t0+n`) into `out`: the bytes of that
/// layer alone, in the header's layout and dtype (`header.spec` with one layer).
pub(crate) fn decode_payload(
    header: &Header,
    layer: usize,
    t0: usize,
    n: usize,
    payload: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), DecodeError> {
    decode_payload_with(header, layer, t0, n, payload, out, true)
}

/// [`decode_payload`]; `fused` lets the SIMD decoder write f16 values itself (tests turn it
/// off to compare with the separate dequantizer).
fn decode_payload_with(
    header: &Header,
    layer: usize,
    t0: usize,
    n: usize,
    payload: &[u8],
    out: &mut [u8],
    fused: bool,
) -> std::result::Result<(), DecodeError> {
    let mut spec = header.spec;
    spec.shape.layers = 1;
    let c = spec.shape.channels();
    let es = spec.dtype.size();
    let mut r = ByteReader::new(payload);
    if header.level == Level::Raw {
        let rb = c * es;
        for part in Part::BOTH {
            for t in t0..t0 + n {
                let row = r.take(rb)?;
                crate::layout::write_row_bytes(&spec, out, 0, part, t, row);
            }
        }
        return finish(&r);
    }
    let mut scales = [vec![0u16; n], vec![0u16; n]];
    r.u16s(&mut scales[0])?;
    r.u16s(&mut scales[1])?;
    let channel_scales = if header.channel_scale_k() {
        let mut cs = vec![0u16; c];
        r.u16s(&mut cs)?;
        Some(cs)
    } else {
        None
    };
    let (bk, bv) = header.layer_bins(layer);
    // Where f16 output has no channel scales, SIMD loops write the values themselves.
    let values: Vec<f32> = if fused && spec.dtype == DType::F16 && channel_scales.is_none() {
        scales
            .iter()
            .flatten()
            .map(|&s| spec.dtype.scale_value(s))
            .collect()
    } else {
        Vec::new()
    };
    let max = [quant::max_level(bk) as f32, quant::max_level(bv) as f32];
    crate::scratch::with_bytes(2 * c * n, |syms| {
        match header.level {
            Level::Raw => unreachable!("handled above"),
            Level::Q8 => {
                let plain = r.take(2 * c * n)?;
                let top = (alphabet(256) - 1) as u8;
                if let Some(i) = first_above(plain, top) {
                    let stream = i / (n * c) * c + i % c;
                    return Err(DecodeError::SymbolOutOfRange { stream });
                }
                if !values.is_empty() && plain_f16::available() {
                    let mut rows = f16_rows(&spec, t0, max, &values, out);
                    let b = BlockSymbols {
                        n,
                        channels: c,
                        widths: [top.into(); 2],
                    };
                    if rows.fits(b) {
                        plain_f16::dequantize(plain, b, &mut rows);
                        return finish(&r);
                    }
                }
                syms.copy_from_slice(plain);
            }
            Level::CgHigh | Level::CgDefault | Level::CgLow => {
                let b = BlockSymbols {
                    n,
                    channels: c,
                    widths: [alphabet(bk) - 1, alphabet(bv) - 1],
                };
                let rest = r.take(r.remaining())?;
                if !values.is_empty() {
                    // The SIMD decoder writes the values itself where it can.
                    let mut rows = f16_rows(&spec, t0, max, &values, out);
                    if native::decode_symbols_f16(rest, b, syms, &mut rows)? {
                        return finish(&r);
                    }
                } else {
                    native::decode_symbols(rest, b, syms)?;
                }
            }
            Level::Lmcache => {
                let mut streams = vec![0u8; syms.len()];
                decode_lmcache(header, &mut r, c, n, [bk, bv], &mut streams)?;
                untranspose(&streams, n, c, syms);
            }
        }
        let rows = Rows {
            spec: &spec,
            t0,
            n,
            bins: [bk, bv],
            scales: &scales,
            channel_scales: channel_scales.as_deref(),
        };
        crate::cpu::with_avx2(
            #[inline(always)]
            || dequantize(&rows, syms, out),
        );
        finish(&r)
    })
}

/// The index of the first byte of `s` above `top`, if any; the common case (none) in one
/// vectorized pass.
fn first_above(s: &[u8], top: u8) -> Option<usize> {
    let max = crate::cpu::with_avx2(
        #[inline(always)]
        || s.iter().fold(0u8, |m, &x| m.max(x)),
    );
    if max <= top {
        return None;
    }
    s.iter().position(|&x| x > top)
}

/// Where (part, token, channel) of a block of tokens from `t0` of `spec`'s one layer lies in
/// `out`, for the loops that write f16 values themselves.
fn f16_rows<'a>(
    spec: &crate::KvSpec,
    t0: usize,
    max: [f32; 2],
    scales: &'a [f32],
    out: &'a mut [u8],
) -> native::F16Rows<'a> {
    let row0 = |part| spec.row_runs(0, part, 0);
    let (k0, v0) = (row0(Part::K), row0(Part::V));
    native::F16Rows {
        out,
        plane: [k0.start, v0.start],
        row_step: spec.row_runs(0, Part::K, 1).start - k0.start,
        run_len: k0.run_len,
        run_stride: k0.stride,
        t0,
        max,
        scales,
    }
}

/// What the dequantizer needs to place a block's rows.
struct Rows<'a> {
    spec: &'a crate::KvSpec,
    t0: usize,
    n: usize,
    bins: [u32; 2],
    scales: &'a [Vec<u16>; 2],
    channel_scales: Option<&'a [u16]>,
}

/// Writes the block's token-major symbols `syms` as values into `out` (one layer).
#[inline(always)]
fn dequantize(rows: &Rows<'_>, syms: &[u8], out: &mut [u8]) {
    let spec = rows.spec;
    let (c, n) = (spec.shape.channels(), rows.n);
    let cs: Option<Vec<f32>> = rows.channel_scales.map(|v| {
        v.iter()
            .map(|&b| DType::BF16.f32_from_bits(b as u32))
            .collect()
    });
    let mut vals = vec![0f32; c];
    let mut bits = vec![half::f16::ZERO; c];
    for (p, part) in Part::BOTH.into_iter().enumerate() {
        let levels = quant::level_values(rows.bins[p]);
        let part_rows = &syms[p * c * n..(p + 1) * c * n];
        for (i, row) in part_rows.chunks_exact(c).enumerate() {
            let m = spec.dtype.scale_value(rows.scales[p][i]);
            let runs = spec.row_runs(0, part, rows.t0 + i);
            // x^ = ((q - MAX) / MAX) · m (· s_c), in f32, then the output dtype.
            for (v, &q) in vals.iter_mut().zip(row) {
                *v = levels[q as usize] * m;
            }
            if let (Part::K, Some(cs)) = (part, &cs) {
                // The channel scale is rounded up to bf16, so `m · cs` may exceed the
                // output dtype's range (f16 near 65504); no input value did, so clamping
                // only moves the value towards it.
                let lim = spec.dtype.max_finite();
                for (v, &s) in vals.iter_mut().zip(cs) {
                    *v = (*v * s).clamp(-lim, lim);
                }
            }
            write_row(out, spec.dtype, runs, &vals, &mut bits);
        }
    }
}

/// Writes one row of values into its runs of `out`, rounded to `dtype`.
#[inline(always)]
fn write_row(
    out: &mut [u8],
    dtype: DType,
    r: crate::layout::RowRuns,
    vals: &[f32],
    bits: &mut [half::f16],
) {
    let es = dtype.size();
    if dtype == DType::F16 {
        // One vectorized conversion (F16C where present) for the whole row.
        bits.convert_from_f32_slice(vals);
    }
    for run in 0..r.runs {
        let at = (r.start + run * r.stride) * es;
        let dst = &mut out[at..at + r.run_len * es];
        let c0 = run * r.run_len;
        match dtype {
            DType::F16 => {
                for (e, b) in dst.chunks_exact_mut(2).zip(&bits[c0..c0 + r.run_len]) {
                    e.copy_from_slice(&b.to_bits().to_le_bytes());
                }
            }
            DType::BF16 => {
                for (e, &v) in dst.chunks_exact_mut(2).zip(&vals[c0..c0 + r.run_len]) {
                    e.copy_from_slice(&(dtype.bits_from_f32(v) as u16).to_le_bytes());
                }
            }
            DType::F32 => {
                for (e, &v) in dst.chunks_exact_mut(4).zip(&vals[c0..c0 + r.run_len]) {
                    e.copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
        }
    }
}

/// Token-major symbols (`[part][token][channel]`) to stream-major (`[part·C + channel][token]`).
fn transpose(rows: &[u8], n: usize, c: usize, streams: &mut [u8]) {
    for p in 0..2 {
        for t in 0..n {
            for ch in 0..c {
                streams[(p * c + ch) * n + t] = rows[(p * n + t) * c + ch];
            }
        }
    }
}

/// The inverse of [`transpose`].
fn untranspose(streams: &[u8], n: usize, c: usize, rows: &mut [u8]) {
    for p in 0..2 {
        for t in 0..n {
            for ch in 0..c {
                rows[(p * n + t) * c + ch] = streams[(p * c + ch) * n + t];
            }
        }
    }
}

fn decode_lmcache(
    header: &Header,
    r: &mut ByteReader<'_>,
    c: usize,
    n: usize,
    bins: [u32; 2],
    syms: &mut [u8],
) -> std::result::Result<(), DecodeError> {
    let max_bins = lmcache_max_bins(header);
    let lp = max_bins as usize + 1;
    let mut cdfs = vec![0u16; 2 * c * lp];
    r.u16s(&mut cdfs)?;
    for cdf in cdfs.chunks_exact(lp) {
        lmcache::cdf::validate_cdf(cdf)?;
    }
    let mut lens = vec![0u32; 2 * c];
    for g0 in (0..n).step_by(LMCACHE_GROUP) {
        let g1 = (g0 + LMCACHE_GROUP).min(n);
        for l in lens.iter_mut() {
            *l = r.u32()?;
        }
        for (ch, &len) in lens.iter().enumerate() {
            let bytes = r.take(len as usize)?;
            let cdf = &cdfs[ch * lp..(ch + 1) * lp];
            let dst = &mut syms[ch * n + g0..ch * n + g1];
            lmcache::range::decode(cdf, bytes, dst).map_err(|e| remap_stream(e, ch))?;
            let top = (alphabet(bins[ch / c]) - 1) as u8;
            if dst.iter().any(|&s| s > top) {
                return Err(DecodeError::SymbolOutOfRange { stream: ch });
            }
        }
    }
    Ok(())
}

fn remap_stream(e: DecodeError, stream: usize) -> DecodeError {
    match e {
        DecodeError::CorruptStream { .. } => DecodeError::CorruptStream { stream },
        DecodeError::SymbolOutOfRange { .. } => DecodeError::SymbolOutOfRange { stream },
        other => other,
    }
}

fn finish(r: &ByteReader<'_>) -> std::result::Result<(), DecodeError> {
    match r.remaining() {
        0 => Ok(()),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockHeader, EncodeOptions, Encoder, KvCache, KvShape, KvSpec, Layout};

    /// Calls `f` with two-layer f16 specs of both layouts and shapes that give full and
    /// partial chunks, channel counts from 16 to 192 and runs from 8 to 64 channels.
    fn each_f16_spec(mut f: impl FnMut(KvSpec)) {
        for layout in [Layout::Hf, Layout::Vllm] {
            for (heads, dim, tokens) in [(3, 64, 300), (2, 8, 37), (8, 16, 64), (1, 40, 5)] {
                f(KvSpec {
                    shape: KvShape::new(2, heads, tokens, dim),
                    layout,
                    dtype: DType::F16,
                });
            }
        }
    }

    /// The SIMD decoder's own f16 output equals the separate dequantizer's, bit for bit, in
    /// both layouts, for full and partial chunks and every native level and q8.
    #[test]
    fn fused_f16_output_matches_the_dequantizer() {
        each_f16_spec(|spec| {
            let (layout, heads, dim) = (spec.layout, spec.shape.kv_heads, spec.shape.head_dim);
            let kv = KvCache::from_fn(spec, |i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) % 2000;
                (h as f32 / 1000.0 - 1.0) * (1.0 + (i % 7) as f32)
            });
            for level in [Level::Q8, Level::CgHigh, Level::CgDefault, Level::CgLow] {
                let enc = Encoder::new(spec, &EncodeOptions::level(level)).unwrap();
                let h = enc.header();
                let mut one = spec;
                one.shape.layers = 1;
                for layer in 0..2 {
                    for chunk in 0..h.chunks() {
                        let mut block = Vec::new();
                        enc.encode_block(&kv.view(), layer, chunk, &mut block)
                            .unwrap();
                        let bh = BlockHeader::read(&block).unwrap();
                        let payload = bh.verified_payload(&block).unwrap();
                        let r = h.chunk_range(chunk);
                        let mut a = vec![0u8; one.byte_len()];
                        let mut b = vec![0u8; one.byte_len()];
                        decode_payload_with(h, layer, r.start, r.len(), payload, &mut a, true)
                            .unwrap();
                        decode_payload_with(h, layer, r.start, r.len(), payload, &mut b, false)
                            .unwrap();
                        assert!(a == b, "{layout:?} {heads}x{dim} {level} l{layer} c{chunk}");
                    }
                }
            }
        });
    }

    /// A q8 symbol outside the alphabet (255) is refused with its stream, whether or not the
    /// f16 loop would have written the block.
    #[test]
    fn a_q8_symbol_out_of_range_names_its_stream() {
        let spec = KvSpec {
            shape: KvShape::new(1, 3, 40, 64),
            layout: Layout::Hf,
            dtype: DType::F16,
        };
        let kv = KvCache::from_fn(spec, |i| (i % 13) as f32 - 6.0);
        let enc = Encoder::new(spec, &EncodeOptions::level(Level::Q8)).unwrap();
        let h = enc.header();
        let mut block = Vec::new();
        enc.encode_block(&kv.view(), 0, 0, &mut block).unwrap();
        let bh = BlockHeader::read(&block).unwrap();
        let mut payload = bh.verified_payload(&block).unwrap().to_vec();
        let (n, c) = (40, 192);
        // V (part 1), token 2, channel 5; the symbols follow 2·n scales of 2 bytes.
        payload[4 * n + (n + 2) * c + 5] = 0xff;
        let mut out = vec![0u8; spec.byte_len()];
        for fused in [true, false] {
            let e = decode_payload_with(h, 0, 0, n, &payload, &mut out, fused).unwrap_err();
            assert_eq!(
                e,
                DecodeError::SymbolOutOfRange { stream: c + 5 },
                "{fused}"
            );
        }
    }

    /// The SIMD q8 quantizer writes the portable quantizer's payload, bit for bit, in both
    /// layouts, for full and partial chunks, all-zero rows and subnormal scales; a row with a
    /// NaN or infinity fails alike on both paths and leaves nothing behind.
    #[test]
    fn fused_q8_encoding_matches_the_quantizer() {
        each_f16_spec(|spec| {
            let (layout, heads, dim) = (spec.layout, spec.shape.kv_heads, spec.shape.head_dim);
            let (c, tokens) = (spec.shape.channels(), spec.shape.tokens);
            let kv = KvCache::from_fn(spec, |i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) % 2000;
                match (i / c) % 5 {
                    0 => 0.0,
                    1 => (h as f32 - 1000.0) * 1e-10,
                    _ => (h as f32 / 1000.0 - 1.0) * (1.0 + (i % 7) as f32),
                }
            });
            let enc = Encoder::new(spec, &EncodeOptions::level(Level::Q8)).unwrap();
            let h = enc.header();
            for layer in 0..2 {
                for chunk in 0..h.chunks() {
                    let r = h.chunk_range(chunk);
                    let at = BlockAt {
                        view_layer: layer,
                        layer,
                        t0: r.start,
                        n: r.len(),
                    };
                    let (mut a, mut b) = (vec![7u8], vec![7u8]);
                    encode_payload_with(h, &kv.view(), at, &mut a, true).unwrap();
                    encode_payload_with(h, &kv.view(), at, &mut b, false).unwrap();
                    assert!(a == b, "{layout:?} {heads}x{dim} l{layer} c{chunk}");
                }
            }
            let mut bad = kv.clone();
            let token = tokens - 1;
            let at = spec.index(1, Part::V, token, c - 1) * 2;
            for (v, name) in [(0x7e00u16, "NaN"), (0x7c00, "inf")] {
                bad.bytes_mut()[at..at + 2].copy_from_slice(&v.to_le_bytes());
                let chunk = h.chunks() - 1;
                let r = h.chunk_range(chunk);
                let at = BlockAt {
                    view_layer: 1,
                    layer: 1,
                    t0: r.start,
                    n: r.len(),
                };
                for fused in [true, false] {
                    let mut out = vec![7u8];
                    let e = encode_payload_with(h, &bad.view(), at, &mut out, fused).unwrap_err();
                    assert!(
                        matches!(e, CodecError::NonFinite { layer: 1, part: "V", token: t } if t == token),
                        "{name} {fused}: {e}"
                    );
                    assert_eq!(out, [7], "{name} {fused}: a failed block leaves nothing");
                }
            }
        });
    }
}
