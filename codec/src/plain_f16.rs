//! AVX2 + F16C loops between f16 rows and plain 8-bit symbols (the `q8` level's payload, which
//! no entropy coder touches): quantizing a row of the cache straight into its symbols, and
//! writing a block's symbols straight into the f16 output. Chosen at run time where the CPU
//! has both; elsewhere (and for other dtypes or per-channel K scales) the portable
//! quantizer and dequantizer run.
//!
//! Both compute exactly what [`crate::quant`] computes, with the same IEEE operations in the
//! same order (no fused multiply-add): `container::block`'s tests compare the two paths bit for
//! bit. The unsafe parts are the intrinsics' loads and stores, each justified where it happens.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::layout::RowRuns;
use crate::native::{BlockSymbols, F16Rows};
use crate::quant::max_level;

/// Whether this CPU runs these loops.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a row laid out as `r` can be read by [`quantize_row`] from `data` (f16 bytes):
/// runs of a multiple of 8 elements, every element inside `data`.
pub(crate) fn row_fits(data: &[u8], r: RowRuns) -> bool {
    r.runs > 0
        && r.run_len > 0
        && r.run_len % 8 == 0
        && (r.start + (r.runs - 1) * r.stride + r.run_len) * 2 <= data.len()
}

/// Quantizes the f16 row `r` of `data` with `bins` bins into `out` (its channels, in order)
/// as [`crate::quant::quantize_row`] does with an f16 dtype; returns the scale's stored bits,
/// or `None` (and `out` unspecified) if the row holds an infinity or NaN. Only where
/// [`available`] and [`row_fits`].
pub(crate) fn quantize_row(data: &[u8], r: RowRuns, bins: u32, out: &mut [u8]) -> Option<u16> {
    assert!(
        available() && row_fits(data, r),
        "row outside the loop's reach"
    );
    assert_eq!(
        out.len(),
        r.runs * r.run_len,
        "symbols do not match the row"
    );
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `available()` (asserted) says the CPU has AVX2 and F16C, the only
        // requirement of these functions beyond the bounds `row_fits` gives.
        let m = unsafe { absmax_avx2(data, r) };
        if m >= 0x7F80_0000 {
            return None;
        }
        let bits = half::f16::from_f32(f32::from_bits(m)).to_bits();
        let m = half::f16::from_bits(bits).to_f32();
        let maxf = max_level(bins) as f32;
        let factor = maxf / m;
        if m == 0.0 || !factor.is_finite() {
            out.fill(max_level(bins) as u8);
        } else {
            // SAFETY: as above.
            unsafe { quantize_avx2(data, r, factor, maxf, 2 * max_level(bins), out) };
        }
        Some(bits)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false")
}

/// The row's absmax as f32 bits (sign cleared), at or above `0x7F80_0000` if any element is
/// infinite or NaN: an integer max over the bits, as `quant::absmax` takes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn absmax_avx2(data: &[u8], r: RowRuns) -> u32 {
    let base = data.as_ptr().cast::<u16>();
    let mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut m = _mm256_setzero_si256();
    for run in 0..r.runs {
        let at = r.start + run * r.stride;
        for j in (0..r.run_len).step_by(8) {
            // SAFETY: `row_fits` bounds every run's end within `data`, and j + 8 <= run_len.
            let x = _mm256_cvtph_ps(_mm_loadu_si128(base.add(at + j).cast()));
            m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(x), mask));
        }
    }
    let m4 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
    let m2 = _mm_max_epu32(m4, _mm_shuffle_epi32::<0b01_00_11_10>(m4));
    let m1 = _mm_max_epu32(m2, _mm_shuffle_epi32::<0b10_11_00_01>(m2));
    _mm_cvtsi128_si32(m1) as u32
}

/// `q = min(round_half_even(max(x · factor + maxf, 0)), top)` for every element of the row,
/// the rounding by adding 2^23 as `quant` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn quantize_avx2(data: &[u8], r: RowRuns, factor: f32, maxf: f32, top: u32, out: &mut [u8]) {
    let base = data.as_ptr().cast::<u16>();
    let (fv, mv) = (_mm256_set1_ps(factor), _mm256_set1_ps(maxf));
    let (zero, grid) = (_mm256_setzero_ps(), _mm256_set1_ps(8_388_608.0));
    let (grid_bits, topv) = (
        _mm256_set1_epi32(0x4B00_0000),
        _mm256_set1_epi32(top as i32),
    );
    let mut o = 0;
    for run in 0..r.runs {
        let at = r.start + run * r.stride;
        for j in (0..r.run_len).step_by(8) {
            // SAFETY: as in `absmax_avx2`.
            let x = _mm256_cvtph_ps(_mm_loadu_si128(base.add(at + j).cast()));
            let v = _mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(x, fv), mv), zero);
            let q = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(v, grid)), grid_bits);
            let q = _mm256_min_epu32(q, topv);
            // 8 values below 256: to 16 bits, then 8, each 128-bit half holding its 4 first.
            let w = _mm256_packus_epi32(q, q);
            let b = _mm256_packus_epi16(w, w);
            let lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(b)) as u32;
            let hi = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(b)) as u32;
            let bytes = (u64::from(hi) << 32 | u64::from(lo)).to_le_bytes();
            out[o..o + 8].copy_from_slice(&bytes);
            o += 8;
        }
    }
}

/// Writes a block of plain symbols (`syms`, token-major per part, as [`BlockSymbols`] lays
/// them out; its `widths` are not read) into `rows` as f16: `x^ = ((q - MAX) / MAX) · m`, the
/// same IEEE operations as the dequantizer. Every symbol must lie in its part's alphabet.
/// Only where [`available`], `rows.fits(b)`.
pub(crate) fn dequantize(syms: &[u8], b: BlockSymbols, rows: &mut F16Rows<'_>) {
    assert!(
        available() && rows.fits(b),
        "f16 rows outside the output buffer"
    );
    assert_eq!(syms.len(), b.len(), "symbols do not match the block shape");
    // SAFETY: `available()` (asserted) says the CPU has AVX2 and F16C, the only requirement of
    // `dequantize_avx2` beyond the bounds `fits` gives.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        dequantize_avx2(syms, b, rows)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequantize_avx2(syms: &[u8], b: BlockSymbols, rows: &mut F16Rows<'_>) {
    let (n, c) = (b.n, b.channels);
    let offsets: Vec<usize> = (0..c)
        .step_by(8)
        .map(|ch| rows.channel_offset(ch))
        .collect();
    let out = rows.out.as_mut_ptr().cast::<u16>();
    for p in 0..2 {
        let maxv = _mm256_set1_ps(rows.max[p]);
        for i in 0..n {
            let scale = _mm256_set1_ps(rows.scales[p * n + i]);
            let row_el = rows.plane[p] + (rows.t0 + i) * rows.row_step;
            let row = &syms[(p * n + i) * c..(p * n + i + 1) * c];
            for (src, &off) in row.chunks_exact(8).zip(&offsets) {
                // SAFETY: `src` holds 8 bytes (chunks_exact), the 64-bit load's width.
                let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.as_ptr().cast()));
                let val = _mm256_mul_ps(
                    _mm256_div_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), maxv), maxv),
                    scale,
                );
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(val);
                // SAFETY: `F16Rows::fits` (asserted by the caller) bounds every row start plus
                // every 8-channel chunk offset plus 8 within `out`.
                _mm_storeu_si128(out.add(row_el + off).cast(), h);
            }
        }
    }
}
