//! The AVX2 coder of the 32 lanes, chosen at run time where the CPU has AVX2 and F16C.
//!
//! The decoder: four vectors of 8 lanes; per vector and step, one eight-entry gather of slot
//! entries (scalar loads, cheaper than `vpgatherdd` on Zen 4) and one 8-word load of the shared
//! word sequence, spread over the lanes that refill by a permutation chosen by the refill mask.
//! It can also write the f16 values itself ([`F16Rows`]). The encoder: one such gather per
//! vector for each half of the packed encoder symbols, the exact reciprocal division in 64-bit
//! lanes, and the spilled words of a vector compressed to the top of 8 slots and stored below
//! the write position.
//!
//! Both compute exactly what `lanes::decode` and `lanes::encode` compute (the tests in `native`
//! compare them on valid and corrupt blocks, and `container::block`'s tests compare the f16
//! output with the dequantizer's). The unsafe parts are the intrinsics' loads, gathers and
//! stores, each justified where it happens.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{BlockSymbols, F16Rows, StreamCode, LANES};
use crate::error::DecodeError;
use crate::model::ModelSet;
use crate::rans::{PROB_BITS, PROB_SCALE, RANS_L};

/// Whether this CPU runs the AVX2 coder.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// For each 8-bit refill mask, the word index each lane takes: lane `i` of a refilling set
/// takes word `popcount(mask & ((1 << i) - 1))`.
static SPREAD: [[u32; 8]; 256] = spread_table();

const fn spread_table() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut k = 0;
        let mut i = 0;
        while i < 8 {
            t[m][i] = k;
            if m & (1 << i) != 0 {
                k += 1;
            }
            i += 1;
        }
        m += 1;
    }
    t
}

/// Decodes as `lanes::decode` does; the caller checked that AVX2 is present and that `words`
/// holds `count` words plus `lanes::WORD_PAD` zeros.
pub(super) fn decode(
    words: &[u16],
    count: usize,
    b: BlockSymbols,
    codes: &[StreamCode],
    sets: &[std::sync::Arc<ModelSet>; 2],
    syms: &mut [u8],
    f16_rows: Option<&mut F16Rows<'_>>,
) -> Result<(), DecodeError> {
    assert!(available() && words.len() >= count + super::lanes::WORD_PAD);
    assert_eq!(syms.len(), b.len());
    if let Some(r) = &f16_rows {
        assert!(r.fits(b), "f16 rows outside the output buffer");
    }
    // SAFETY: AVX2 and F16C are present (checked above); the function's memory accesses are
    // justified inside it from the asserted lengths.
    unsafe { decode_avx2(words, count, b, codes, sets, syms, f16_rows) }
}

#[target_feature(enable = "avx2,popcnt,f16c")]
unsafe fn decode_avx2(
    words: &[u16],
    count: usize,
    b: BlockSymbols,
    codes: &[StreamCode],
    sets: &[std::sync::Arc<ModelSet>; 2],
    syms: &mut [u8],
    mut f16_rows: Option<&mut F16Rows<'_>>,
) -> Result<(), DecodeError> {
    let (n, c) = (b.n, b.channels);
    let lanes = b.lanes();
    let mut xs = [0u32; LANES];
    for (j, s) in xs.iter_mut().enumerate().take(lanes) {
        *s = (words[2 * j] as u32) << 16 | words[2 * j + 1] as u32;
    }
    let mut x: [__m256i; 4] = [_mm256_setzero_si256(); 4];
    for (v, xv) in x.iter_mut().enumerate() {
        *xv = _mm256_loadu_si256(xs[8 * v..].as_ptr().cast());
    }
    let mut pos = 2 * lanes;
    let mut bad = _mm256_setzero_si256();
    let slot_mask = _mm256_set1_epi32(PROB_SCALE as i32 - 1);
    let low13 = _mm256_set1_epi32(0x1FFF);
    let low12 = _mm256_set1_epi32(0xFFF);
    let rans_l = _mm256_set1_epi32(RANS_L as i32);
    let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (p, g0, k) in b.groups() {
        let set = &sets[p];
        let w = set.half_width;
        let wv = _mm256_set1_epi32(w as i32);
        let table = set.slots().as_ptr().cast::<i32>();
        let vectors = k.div_ceil(8);
        // Per lane: the table offset, the predictor, the active mask. Lanes past `k` keep their
        // state (they belong to a later group's streams) and read table 0 harmlessly.
        let mut offs = [0i32; LANES];
        let mut rho2 = [0i32; LANES];
        let mut bias = [0i32; LANES];
        let mut base = [0i32; LANES];
        for j in 0..k {
            let sc = &codes[b.stream(p, g0 + j)];
            offs[j] = (sc.member * PROB_SCALE as usize) as i32;
            rho2[j] = sc.pred.rho2 as i32;
            bias[j] = sc.pred.bias as i32;
            base[j] = sc.pred.first as i32 - w as i32;
        }
        let mut offv = [_mm256_setzero_si256(); 4];
        let mut rhov = offv;
        let mut biasv = offv;
        let mut basev = offv;
        let mut active = offv;
        for v in 0..4 {
            offv[v] = _mm256_loadu_si256(offs[8 * v..].as_ptr().cast());
            rhov[v] = _mm256_loadu_si256(rho2[8 * v..].as_ptr().cast());
            biasv[v] = _mm256_loadu_si256(bias[8 * v..].as_ptr().cast());
            basev[v] = _mm256_loadu_si256(base[8 * v..].as_ptr().cast());
            active[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32 - 8 * v as i32), lane_index);
        }
        // With fused output: each vector's element offset within a row, the part's levels.
        let mut chunk_off = [0usize; 4];
        let (mut maxv, mut out_base) = (_mm256_setzero_ps(), std::ptr::null_mut::<u16>());
        if let Some(r) = f16_rows.as_deref_mut() {
            for (v, o) in chunk_off.iter_mut().enumerate() {
                *o = r.channel_offset(g0 + 8 * v);
            }
            maxv = _mm256_set1_ps(r.max[p]);
            out_base = r.out.as_mut_ptr().cast::<u16>();
        }
        let fused = f16_rows
            .as_deref()
            .map(|r| (r.plane[p] + r.t0 * r.row_step, r.row_step));
        let rows = &mut syms[p * n * c..(p + 1) * n * c];
        for (i, row) in rows.chunks_exact_mut(c).enumerate() {
            if pos > count {
                return Err(DecodeError::CorruptStream { stream: 0 });
            }
            let row = &mut row[g0..g0 + k];
            let (row_el, scale) = match (&fused, f16_rows.as_deref()) {
                (Some((start, step)), Some(r)) => {
                    (start + i * step, _mm256_set1_ps(r.scales[p * n + i]))
                }
                _ => (0, _mm256_setzero_ps()),
            };
            macro_rules! decode_vector {
                ($v:expr) => {{
                    let v: usize = $v;
                    let xv = x[v];
                    let idx = _mm256_add_epi32(offv[v], _mm256_and_si256(xv, slot_mask));
                    // SAFETY: every index is a member's offset (member < members) plus a slot
                    // below PROB_SCALE, so it lies inside `set.slots()`, which has
                    // members · PROB_SCALE entries.
                    let e = gather8(table, idx);
                    let freq = _mm256_and_si256(e, low13);
                    let off = _mm256_and_si256(_mm256_srli_epi32::<13>(e), low12);
                    let r = _mm256_srli_epi32::<25>(e);
                    let xn = _mm256_add_epi32(
                        _mm256_mullo_epi32(freq, _mm256_srli_epi32::<{ PROB_BITS as i32 }>(xv)),
                        off,
                    );
                    // Refill the active lanes whose state fell below RANS_L, in lane order.
                    let need = _mm256_and_si256(_mm256_cmpgt_epi32(rans_l, xn), active[v]);
                    let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
                    // SAFETY: pos <= count + 24 here (at most 8 refills per earlier vector of
                    // this step, and pos <= count before it), so the 8 words read lie within
                    // `words`, which has count + WORD_PAD (= count + 40) entries.
                    let wv8 = _mm256_cvtepu16_epi32(_mm_loadu_si128(
                        words.as_ptr().add(pos).cast::<__m128i>(),
                    ));
                    let spread = _mm256_loadu_si256(SPREAD[m].as_ptr().cast());
                    let refill = _mm256_or_si256(
                        _mm256_slli_epi32::<16>(xn),
                        _mm256_permutevar8x32_epi32(wv8, spread),
                    );
                    let xn = _mm256_blendv_epi8(xn, refill, need);
                    pos += m.count_ones() as usize;
                    x[v] = _mm256_blendv_epi8(xv, xn, active[v]);
                    // The symbol, its range check and the next prediction.
                    let s = _mm256_add_epi32(basev[v], r);
                    let out_of_range = _mm256_xor_si256(_mm256_max_epu32(s, wv), wv);
                    bad = _mm256_or_si256(bad, _mm256_and_si256(out_of_range, active[v]));
                    let s8 = _mm256_and_si256(s, _mm256_set1_epi32(0xFF));
                    basev[v] = _mm256_sub_epi32(
                        _mm256_srli_epi32::<4>(_mm256_add_epi32(
                            _mm256_mullo_epi32(rhov[v], s8),
                            biasv[v],
                        )),
                        wv,
                    );
                    if !out_base.is_null() {
                        // x^ = ((q - MAX) / MAX) · m in f32 (the same IEEE operations as
                        // `quant::level_values` and the dequantizer), rounded to f16.
                        let sf = _mm256_cvtepi32_ps(s8);
                        let val =
                            _mm256_mul_ps(_mm256_div_ps(_mm256_sub_ps(sf, maxv), maxv), scale);
                        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(val);
                        // SAFETY: `F16Rows::fits` (asserted by `decode`) bounds every row
                        // start plus every 8-channel chunk offset plus 8 within `out`.
                        _mm_storeu_si128(out_base.add(row_el + chunk_off[v]).cast(), h);
                    } else {
                        // Pack the 8 low bytes: bytes 0, 4, 8, 12 of each 128-bit half, then the
                        // two halves' first dwords side by side.
                        let packed = _mm256_shuffle_epi8(
                            s8,
                            _mm256_setr_epi8(
                                0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4,
                                8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                            ),
                        );
                        let packed = _mm256_permutevar8x32_epi32(
                            packed,
                            _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0),
                        );
                        let bytes = _mm256_extract_epi64::<0>(packed).to_le_bytes();
                        if 8 * v + 8 <= k {
                            row[8 * v..8 * v + 8].copy_from_slice(&bytes);
                        } else {
                            for (d, &b) in row[8 * v..k].iter_mut().zip(&bytes) {
                                *d = b;
                            }
                        }
                    }
                }};
            }
            if vectors == 4 {
                decode_vector!(0);
                decode_vector!(1);
                decode_vector!(2);
                decode_vector!(3);
            } else {
                for v in 0..vectors {
                    decode_vector!(v);
                }
            }
        }
    }
    if _mm256_testz_si256(bad, bad) == 0 {
        return Err(DecodeError::SymbolOutOfRange { stream: 0 });
    }
    for (v, xv) in x.iter().enumerate() {
        _mm256_storeu_si256(xs[8 * v..].as_mut_ptr().cast(), *xv);
    }
    if pos != count || xs[..lanes].iter().any(|&s| s != RANS_L) {
        return Err(DecodeError::CorruptStream { stream: 0 });
    }
    Ok(())
}

/// For each 8-bit spill mask, which lane's word goes to each of the 8 output slots: the
/// spilling lanes in ascending order fill the *last* `popcount(mask)` slots, so that a 16-byte
/// store ending at the write position lays them down in the decoder's reading order.
static GATHER_HIGH: [[u32; 8]; 256] = gather_high_table();

const fn gather_high_table() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let cnt = (m as u32).count_ones() as usize;
        let mut slot = 8 - cnt;
        let mut i = 0;
        while i < 8 {
            if m & (1 << i) != 0 {
                t[m][slot] = i as u32;
                slot += 1;
            }
            i += 1;
        }
        m += 1;
    }
    t
}

/// Encodes as `lanes::encode` does (same words, same first index); the caller checked that
/// AVX2 is present.
pub(super) fn encode(
    residuals: &[u8],
    b: BlockSymbols,
    codes: &[StreamCode],
    sets: &[std::sync::Arc<ModelSet>; 2],
    words: &mut Vec<u16>,
) -> usize {
    assert!(available());
    assert_eq!(residuals.len(), b.len());
    let lanes = b.lanes();
    // At most one word per symbol, plus the states, plus 8 words of slack below: a spill
    // store writes the 8 words below the write position.
    let cap = residuals.len() + 2 * lanes + 8;
    // Stale contents are fine: every word from the first one returned up was written here.
    words.resize(cap, 0);
    // SAFETY: AVX2 is present (checked above); the memory accesses are justified inside
    // from `words.len() == cap` and `residuals.len() == b.len()`.
    unsafe { encode_avx2(residuals, b, codes, sets, words) }
}

#[target_feature(enable = "avx2,popcnt")]
unsafe fn encode_avx2(
    residuals: &[u8],
    b: BlockSymbols,
    codes: &[StreamCode],
    sets: &[std::sync::Arc<ModelSet>; 2],
    words: &mut [u16],
) -> usize {
    use crate::model::MAX_RESIDUALS;
    let (n, c) = (b.n, b.channels);
    let lanes = b.lanes();
    let mut pos = words.len();
    let mut x = [_mm256_set1_epi32(RANS_L as i32); 4];
    let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let low12 = _mm256_set1_epi32(0xFFF);
    let low16 = _mm256_set1_epi32(0xFFFF);
    let scale = _mm256_set1_epi32(PROB_SCALE as i32);
    let shift_base = _mm256_set1_epi64x(31);
    // Low 16 bits of each dword to the low 8 bytes of each 128-bit half, then the halves'
    // low quadwords side by side.
    let pack16 = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1,
        -1, -1, -1, -1, -1, -1,
    );
    for (p, g0, k) in b.groups().rev() {
        let table = sets[p].enc_packed.as_ptr().cast::<i32>();
        let vectors = k.div_ceil(8);
        let mut offs = [0i32; LANES];
        for (j, o) in offs.iter_mut().enumerate().take(k) {
            *o = (codes[b.stream(p, g0 + j)].member * MAX_RESIDUALS) as i32;
        }
        let mut offv = [_mm256_setzero_si256(); 4];
        let mut active = offv;
        for v in 0..4 {
            // SAFETY: `offs` has LANES = 32 entries; 8·v + 8 <= 32.
            offv[v] = _mm256_loadu_si256(offs[8 * v..].as_ptr().cast());
            active[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32 - 8 * v as i32), lane_index);
        }
        let rows = &residuals[p * n * c..(p + 1) * n * c];
        for row in rows.chunks_exact(c).rev() {
            let row = &row[g0..g0 + k];
            macro_rules! encode_vector {
                ($v:expr) => {{
                    let v: usize = $v;
                    let mut r8 = [0u8; 8];
                    if 8 * v + 8 <= k {
                        r8.copy_from_slice(&row[8 * v..8 * v + 8]);
                    } else {
                        for (d, &b) in r8.iter_mut().zip(&row[8 * v..k]) {
                            *d = b;
                        }
                    }
                    let r = _mm256_and_si256(
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(r8.as_ptr().cast())),
                        _mm256_set1_epi32(MAX_RESIDUALS as i32 - 1),
                    );
                    let idx = _mm256_add_epi32(offv[v], r);
                    // SAFETY: idx = member · MAX_RESIDUALS + r with member < members and
                    // r < MAX_RESIDUALS, so entries 2·idx and 2·idx + 1 lie inside `enc_packed`
                    // (2 · members · MAX_RESIDUALS entries); inactive lanes read member 0.
                    let idx2 = _mm256_slli_epi32::<1>(idx);
                    let rcp = gather8(table, idx2);
                    let packed = gather8(table.add(1), idx2);
                    let start = _mm256_and_si256(packed, low12);
                    let cmpl = _mm256_and_si256(_mm256_srli_epi32::<12>(packed), low12);
                    let s = _mm256_srli_epi32::<24>(packed);
                    let x_max = _mm256_slli_epi32::<{ 31 - PROB_BITS as i32 }>(_mm256_sub_epi32(
                        scale, cmpl,
                    ));
                    let xv = x[v];
                    // Spill where x >= x_max (both below 2^31, so the signed compare is right).
                    let keep = _mm256_cmpgt_epi32(x_max, xv);
                    let spill = _mm256_andnot_si256(keep, active[v]);
                    let m = _mm256_movemask_ps(_mm256_castsi256_ps(spill)) as usize;
                    let gathered = _mm256_permutevar8x32_epi32(
                        _mm256_and_si256(xv, low16),
                        // SAFETY: m < 256 indexes the table; each row is 8 u32.
                        _mm256_loadu_si256(GATHER_HIGH[m].as_ptr().cast()),
                    );
                    let w16 =
                        _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(gathered, pack16));
                    // SAFETY: pos >= 8 + (words still to be written below), because the buffer
                    // has 8 slack words below the lowest position a valid count reaches; the
                    // store covers words pos-8 .. pos, of which the top popcount(m) are kept.
                    _mm_storeu_si128(
                        words.as_mut_ptr().add(pos - 8).cast(),
                        _mm256_castsi256_si128(w16),
                    );
                    pos -= m.count_ones() as usize;
                    let xs = _mm256_blendv_epi8(xv, _mm256_srli_epi32::<16>(xv), spill);
                    // q = (x · rcp) >> (31 + s), per lane in 64 bits: even lanes, then odd lanes.
                    let sh_even =
                        _mm256_add_epi64(_mm256_and_si256(s, _mm256_set1_epi64x(0xFF)), shift_base);
                    let sh_odd = _mm256_add_epi64(_mm256_srli_epi64::<32>(s), shift_base);
                    let q_even = _mm256_srlv_epi64(_mm256_mul_epu32(xs, rcp), sh_even);
                    let q_odd = _mm256_srlv_epi64(
                        _mm256_mul_epu32(_mm256_srli_epi64::<32>(xs), _mm256_srli_epi64::<32>(rcp)),
                        sh_odd,
                    );
                    let q =
                        _mm256_blend_epi32::<0b1010_1010>(q_even, _mm256_slli_epi64::<32>(q_odd));
                    let xn =
                        _mm256_add_epi32(_mm256_add_epi32(xs, start), _mm256_mullo_epi32(q, cmpl));
                    x[v] = _mm256_blendv_epi8(xv, xn, active[v]);
                }};
            }
            if vectors == 4 {
                encode_vector!(3);
                encode_vector!(2);
                encode_vector!(1);
                encode_vector!(0);
            } else {
                for v in (0..vectors).rev() {
                    encode_vector!(v);
                }
            }
        }
    }
    let mut xs = [0u32; LANES];
    for (v, xv) in x.iter().enumerate() {
        // SAFETY: `xs` has 32 entries; 8·v + 8 <= 32.
        _mm256_storeu_si256(xs[8 * v..].as_mut_ptr().cast(), *xv);
    }
    pos -= 2 * lanes;
    for (j, &s) in xs.iter().enumerate().take(lanes) {
        words[pos + 2 * j] = (s >> 16) as u16;
        words[pos + 2 * j + 1] = s as u16;
    }
    pos
}

/// The encoder's model choice (`choose::choose_block`) compiled for AVX2.
pub(super) fn choose_block_avx2(
    syms: &[u8],
    b: BlockSymbols,
    sets: &[std::sync::Arc<ModelSet>; 2],
    residuals: &mut [u8],
) -> Vec<super::ChannelModel> {
    #[target_feature(enable = "avx2")]
    unsafe fn inner(
        syms: &[u8],
        b: BlockSymbols,
        sets: &[std::sync::Arc<ModelSet>; 2],
        residuals: &mut [u8],
    ) -> Vec<super::ChannelModel> {
        super::choose::choose_block_portable(syms, b, sets, residuals)
    }
    assert!(available());
    // SAFETY: AVX2 is present (checked above); the body is safe code.
    unsafe { inner(syms, b, sets, residuals) }
}

/// `table[idx[i]]` for the 8 lanes, by scalar loads: on AMD Zen 4 (this project's machine)
/// the hardware gather costs more than eight loads and inserts (measured: one-core decode
/// median 1.00-1.16 GB/s with `vpgatherdd`, 1.17-1.21 GB/s with this). The caller guarantees
/// every index is inside the table.
#[inline(always)]
unsafe fn gather8(table: *const i32, idx: __m256i) -> __m256i {
    let lo = _mm256_castsi256_si128(idx);
    let hi = _mm256_extracti128_si256::<1>(idx);
    let a = _mm_setr_epi32(
        *table.add(_mm_cvtsi128_si32(lo) as usize),
        *table.add(_mm_extract_epi32::<1>(lo) as usize),
        *table.add(_mm_extract_epi32::<2>(lo) as usize),
        *table.add(_mm_extract_epi32::<3>(lo) as usize),
    );
    let b = _mm_setr_epi32(
        *table.add(_mm_cvtsi128_si32(hi) as usize),
        *table.add(_mm_extract_epi32::<1>(hi) as usize),
        *table.add(_mm_extract_epi32::<2>(hi) as usize),
        *table.add(_mm_extract_epi32::<3>(hi) as usize),
    );
    _mm256_set_m128i(b, a)
}
