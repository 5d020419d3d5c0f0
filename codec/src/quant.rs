//! CacheGen's quantizer: symmetric, one absmax per (layer, K/V, token) over all channels.
//!
//! For a row `x` (one token's `channels` values) and a layer's bin count `bins`:
//!
//! ```text
//! MAX = bins/2 - 1                      (32 -> 15, 16 -> 7, 12 -> 5, 256 -> 127)
//! m   = max_c |x[c]|                    (stored as 16 bits, see DType::scale_dtype)
//! q   = round_half_even(x * (MAX/m) + MAX)      all in f32, the multiply and add rounded apart
//! x^  = ((q - MAX) / MAX) * m           decoded in f32, then rounded to the output dtype
//! ```
//!
//! Symbols lie in `0..=2·MAX` (`bins - 1` levels). An all-zero row (m = 0) gives every symbol
//! `MAX` and decodes to zeros, never NaN. The error of every element is at most `m / (2·MAX)`
//! plus the output dtype's rounding of `x^`.

use crate::dtype::DType;

/// Largest bin count a level may use: symbols must fit a byte.
pub const MAX_BINS: u32 = 256;

/// `bins/2 - 1`: the symbol of value zero, and the number of positive levels.
#[inline]
pub const fn max_level(bins: u32) -> u32 {
    bins / 2 - 1
}

/// Number of distinct symbols (`2·MAX + 1`).
#[inline]
pub const fn alphabet(bins: u32) -> u32 {
    2 * max_level(bins) + 1
}

/// `round_half_even(v)` for `0 <= v < 2^22`, exactly (adding 2^23 rounds to the integer grid
/// in the FPU's round-to-nearest-even mode, which Rust guarantees).
#[inline(always)]
fn round_half_even_small(v: f32) -> u32 {
    (v + 8_388_608.0).to_bits().wrapping_sub(0x4B00_0000)
}

/// The absmax of `row` and whether it held a non-finite value.
#[inline]
pub(crate) fn absmax(row: &[f32]) -> (f32, bool) {
    // On the bits: for non-negative floats (and +inf, NaN) the integer order is the float
    // order, so an integer max over `bits & 0x7FFF_FFFF` is the absmax, and a value at or above
    // 0x7F80_0000 is infinite or NaN. Integer reductions vectorize; float max does not.
    let m = row
        .iter()
        .fold(0u32, |m, x| m.max(x.to_bits() & 0x7FFF_FFFF));
    (f32::from_bits(m), m >= 0x7F80_0000)
}

/// Quantizes one row of input of `dtype` into `out` (same length) with `bins` bins; returns
/// the scale's stored bits (see [`DType::scale_bits`]), or `None` if the row is not finite.
#[inline]
pub fn quantize_row(row: &[f32], bins: u32, dtype: DType, out: &mut [u8]) -> Option<u16> {
    debug_assert_eq!(row.len(), out.len());
    let (m, bad) = absmax(row);
    if bad {
        return None;
    }
    let bits = dtype.scale_bits(m);
    let m = dtype.scale_value(bits);
    if !m.is_finite() {
        return None; // f32 input beyond bf16's range
    }
    quantize_row_with_scale(row, bins, m, out);
    Some(bits)
}

/// Quantizes `row` with a given scale `m` (`m >= max |row|`).
#[inline]
pub(crate) fn quantize_row_with_scale(row: &[f32], bins: u32, m: f32, out: &mut [u8]) {
    let max = max_level(bins);
    let top = 2 * max;
    let maxf = max as f32;
    let factor = maxf / m;
    if m == 0.0 || !factor.is_finite() {
        // All-zero row (or a scale so small its reciprocal overflows f32): every value is 0.
        out.fill(max as u8);
        return;
    }
    for (q, &x) in out.iter_mut().zip(row) {
        let v = x * factor + maxf;
        *q = round_half_even_small(v.max(0.0)).min(top) as u8;
    }
}

/// The decoded value of every symbol of a row with scale 1: `(q - MAX) / MAX` in f32 for
/// `q` in `0..alphabet(bins)`; further entries (which a valid stream never produces) decode
/// as the top level. A row with scale `m` decodes symbol `q` to `values[q] · m` (f32), then
/// rounds it to the output dtype.
pub fn level_values(bins: u32) -> [f32; 256] {
    let max = max_level(bins) as f32;
    let n = alphabet(bins) as usize;
    let mut v = [0f32; 256];
    for (q, e) in v.iter_mut().enumerate() {
        *e = (q.min(n - 1) as f32 - max) / max;
    }
    v
}

/// The documented bound on `|x - x^|` for an element of a row with scale `m` decoded into
/// `dtype`: half a quantization step plus the rounding of the output dtype.
pub fn error_bound(bins: u32, m: f32, dtype: DType) -> f32 {
    let step_half = m / (2.0 * max_level(bins) as f32);
    let rel = match dtype {
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        DType::F32 => 1.0 / 16_777_216.0,
    };
    // The output rounding is relative to |x^| <= m, plus f16's subnormal spacing.
    step_half * (1.0 + 1e-5) + m * rel + 6e-8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even() {
        for (v, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (3.49, 3),
            (14.5, 14),
            (15.5, 16),
        ] {
            assert_eq!(round_half_even_small(v), want, "{v}");
            assert_eq!(f32::round_ties_even(v) as u32, want);
        }
    }

    #[test]
    fn zero_row_gives_zero_not_nan() {
        let row = [0.0f32; 8];
        let mut q = [0u8; 8];
        let bits = quantize_row(&row, 32, DType::F16, &mut q).unwrap();
        assert_eq!(q, [15; 8]);
        let v = level_values(32);
        let m = DType::F16.scale_value(bits);
        assert_eq!(v[15] * m, 0.0);
        assert!(q.iter().all(|&s| !(v[s as usize] * m).is_nan()));
    }

    #[test]
    fn nonfinite_rows_are_refused() {
        let mut q = [0u8; 2];
        assert!(quantize_row(&[1.0, f32::NAN], 32, DType::F16, &mut q).is_none());
        assert!(quantize_row(&[f32::INFINITY, 1.0], 32, DType::F16, &mut q).is_none());
    }

    #[test]
    fn extremes_map_to_the_ends() {
        let row = [-2.0f32, 2.0, 0.0, 1.0];
        let mut q = [0u8; 4];
        quantize_row(&row, 32, DType::F32, &mut q).unwrap();
        assert_eq!(q, [0, 30, 15, 22]); // 1.0 * 7.5 + 15 = 22.5 -> 22 (even)
    }
}
