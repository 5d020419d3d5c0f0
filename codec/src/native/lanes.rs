//! The 32 rANS lanes of a block over one shared word sequence: the encoder and the portable
//! decoder (the SIMD decoder in `simd.rs` must agree with this one on every input).

use super::{BlockSymbols, StreamCode, LANES};
use crate::error::DecodeError;
use crate::model::{ModelSet, MAX_RESIDUALS};
use crate::rans::{self, EncSymbol, PROB_SCALE, RANS_L};

/// Zero words kept after a block's words: a decoder step reads at most `LANES` words, and a
/// vector load of 8 words may start at any of them.
pub(super) const WORD_PAD: usize = LANES + 8;

/// Codes the residual indices of a block (laid out as `b` says) into `words`, backwards;
/// returns the index of the first word. `words[first..]` is the block's word sequence: the
/// lanes' initial states (high half first), then the refill words in decoding order.
pub(super) fn encode(
    residuals: &[u8],
    b: BlockSymbols,
    codes: &[StreamCode],
    sets: &[std::sync::Arc<ModelSet>; 2],
    words: &mut Vec<u16>,
) -> usize {
    let (n, c) = (b.n, b.channels);
    let lanes = b.lanes();
    // At most one word per symbol, plus the states.
    let cap = residuals.len() + 2 * lanes;
    // Stale contents are fine: every word from the first one returned up was written here.
    words.resize(cap, 0);
    let mut pos = cap;
    let mut x = [RANS_L; LANES];
    for (p, g0, k) in b.groups().rev() {
        let tables: Vec<&[EncSymbol; MAX_RESIDUALS]> = (0..k)
            .map(|j| &*sets[p].tables[codes[b.stream(p, g0 + j)].member].enc)
            .collect();
        let rows = &residuals[p * n * c..(p + 1) * n * c];
        for row in rows.chunks_exact(c).rev() {
            let row = &row[g0..g0 + k];
            for j in (0..k).rev() {
                let e = &tables[j][row[j] as usize & (MAX_RESIDUALS - 1)];
                rans::encode_into(&mut x[j], words, &mut pos, e);
            }
        }
    }
    pos -= 2 * lanes;
    for (j, &s) in x.iter().enumerate().take(lanes) {
        words[pos + 2 * j] = (s >> 16) as u16;
        words[pos + 2 * j + 1] = s as u16;
    }
    pos
}

/// Decodes a block's `count` words (`words`, followed by [`WORD_PAD`] zeros) into `syms`.
pub(super) fn decode(
    words: &[u16],
    count: usize,
    b: BlockSymbols,
    codes: &[StreamCode],
    sets: &[std::sync::Arc<ModelSet>; 2],
    syms: &mut [u8],
) -> Result<(), DecodeError> {
    let (n, c) = (b.n, b.channels);
    let lanes = b.lanes();
    debug_assert!(words.len() >= count + WORD_PAD && count >= 2 * lanes);
    let mut x = [0u32; LANES];
    for (j, s) in x.iter_mut().enumerate().take(lanes) {
        *s = (words[2 * j] as u32) << 16 | words[2 * j + 1] as u32;
    }
    let mut pos = 2 * lanes;
    let mut bad = 0u32;
    for (p, g0, k) in b.groups() {
        let set = &sets[p];
        let w = set.half_width;
        let lane_codes = &codes[b.stream(p, g0)..b.stream(p, g0) + k];
        let slots: Vec<&[u32; PROB_SCALE as usize]> = lane_codes
            .iter()
            .map(|sc| set.member_slots(sc.member))
            .collect();
        // `base` is kept less the width (wrapping), so that a symbol is `base + r`.
        let mut base: Vec<u32> = lane_codes
            .iter()
            .map(|sc| sc.pred.first.wrapping_sub(w))
            .collect();
        let rows = &mut syms[p * n * c..(p + 1) * n * c];
        for row in rows.chunks_exact_mut(c) {
            // A valid block never reads past its words; stopping here keeps every read
            // within the padding.
            if pos > count {
                return Err(DecodeError::CorruptStream { stream: 0 });
            }
            let row = &mut row[g0..g0 + k];
            for j in 0..k {
                let r = rans::decode_slot(&mut x[j], slots[j]);
                let need = (x[j] < RANS_L) as u32;
                x[j] = (x[j] << (need << 4)) | (words[pos] as u32 & need.wrapping_neg());
                pos += need as usize;
                // Out of range when above `w`: wrapping makes a negative symbol huge.
                let s = base[j].wrapping_add(r);
                bad |= (s > w) as u32;
                row[j] = s as u8;
                let pr = &lane_codes[j].pred;
                base[j] = ((pr.rho2 * (s & 0xFF) + pr.bias) >> 4).wrapping_sub(w);
            }
        }
    }
    if bad != 0 {
        return Err(DecodeError::SymbolOutOfRange { stream: 0 });
    }
    if pos != count || x[..lanes].iter().any(|&s| s != RANS_L) {
        return Err(DecodeError::CorruptStream { stream: 0 });
    }
    Ok(())
}
