//! The native entropy coder: 32-bit rANS with 16-bit words and interleaved lanes.
//!
//! Models (frequency tables normalized to [`PROB_SCALE`]) live in [`crate::model`]; this module
//! only codes a symbol under a given table. The encoder runs backwards over the symbols and
//! writes its words backwards, so the decoder reads them forwards.
//!
//! State invariant: `RANS_L <= x < RANS_L << 16` (so `x < 2^31`) between symbols. Encoding a
//! symbol of frequency `f` first spills 16 bits if `x >= f << (31 - PROB_BITS)` (one spill
//! always suffices), then `x' = (x / f) << PROB_BITS + x % f + start`. The division is a
//! multiply by `m = ceil(2^(31+s) / f)` with `s = ceil(log2 f)`, which is exact for every
//! `x < 2^31`: the error term `x·(m·f - 2^(31+s)) / (f·2^(31+s))` stays below `1/f`.
//! Decoding inverts it with a table of packed slots ([`DecSlot`]).

/// Bits of probability precision: frequencies sum to `1 << PROB_BITS` (the model family's,
/// which its tables are normalized to).
pub const PROB_BITS: u32 = crate::model::family::PROB_BITS;
/// Sum of every table's frequencies.
pub const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Lower bound of the coder state; also the state every lane starts and must end in.
pub const RANS_L: u32 = 1 << 15;

/// What the encoder needs to know of one symbol of a table.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncSymbol {
    /// `ceil(2^(31+shift) / freq)`.
    rcp: u64,
    /// `31 + ceil(log2(freq))`.
    shift: u32,
    /// `freq << (31 - PROB_BITS)`: states at or above it spill a word first.
    x_max: u32,
    /// Cumulative frequency of the symbols before this one.
    start: u32,
    /// `PROB_SCALE - freq`.
    cmpl: u32,
}

impl EncSymbol {
    /// The coding parameters of a symbol with cumulative start `start` and frequency `freq`.
    pub fn new(start: u32, freq: u32) -> Self {
        debug_assert!((1..PROB_SCALE).contains(&freq) && start + freq <= PROB_SCALE);
        let s = 32 - (freq - 1).leading_zeros(); // ceil(log2 freq); 0 for freq 1
        Self {
            rcp: (1u64 << (31 + s)).div_ceil(freq as u64),
            shift: 31 + s,
            x_max: freq << (31 - PROB_BITS),
            start,
            cmpl: PROB_SCALE - freq,
        }
    }

    /// Frequency.
    pub const fn freq(&self) -> u32 {
        PROB_SCALE - self.cmpl
    }

    /// The symbol in two words for a SIMD encoder: the reciprocal (which fits 32 bits:
    /// `2^(31+s) / f < 2^32` because `f > 2^(s-1)`), and `start | cmpl << 12 | (shift - 31) << 24`.
    /// The state bound is `(PROB_SCALE - cmpl) << (31 - PROB_BITS)`.
    pub fn packed(&self) -> [u32; 2] {
        debug_assert!(self.rcp < 1 << 32 && self.start < PROB_SCALE && self.cmpl < PROB_SCALE);
        [
            self.rcp as u32,
            self.start | self.cmpl << 12 | (self.shift - 31) << 24,
        ]
    }
}

/// Encodes one symbol into state `x`, writing a spilled word backwards into `words` below
/// `*pos` (the caller sizes `words` for one word per symbol). Branch-free.
#[inline(always)]
pub fn encode_into(x: &mut u32, words: &mut [u16], pos: &mut usize, s: &EncSymbol) {
    let v = *x;
    let spill = v >= s.x_max;
    // Always store; only advance when spilling (the slot is rewritten otherwise).
    words[*pos - 1] = v as u16;
    *pos -= spill as usize;
    let v = v >> (16 * spill as u32);
    let q = ((v as u64 * s.rcp) >> s.shift) as u32;
    *x = v + s.start + q * s.cmpl;
}

/// A decoder's entry for one slot (`x mod PROB_SCALE`) of a table, packed in a `u32` so that
/// decoding a symbol is one load: bits 0..13 the symbol's frequency, bits 13..25 the slot's
/// offset from the symbol's start, bits 25..32 the symbol (at most 127).
pub type DecSlot = u32;

/// The [`PROB_SCALE`] decoder slots of a frequency list (in symbol order, at most 128 symbols)
/// that sums to [`PROB_SCALE`], appended to `out`.
pub fn push_dec_slots(freqs: &[u32], out: &mut Vec<DecSlot>) {
    debug_assert!(freqs.len() <= 128 && freqs.iter().sum::<u32>() == PROB_SCALE);
    for (s, &f) in freqs.iter().enumerate() {
        out.extend((0..f).map(|k| f | k << 13 | (s as u32) << 25));
    }
}

/// Decodes one symbol from state `x` with the slot table `slots` (length [`PROB_SCALE`]),
/// without the refill; the caller refills while `x < RANS_L`.
#[inline(always)]
pub fn decode_slot(x: &mut u32, slots: &[DecSlot; PROB_SCALE as usize]) -> u32 {
    let e = slots[(*x & (PROB_SCALE - 1)) as usize];
    *x = (e & 0x1FFF) * (*x >> PROB_BITS) + ((e >> 13) & 0xFFF);
    e >> 25
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reciprocal_division_is_exact() {
        for f in [1u32, 2, 3, 5, 7, 100, 1000, 2049, 4095] {
            let s = EncSymbol::new(0, f);
            for x in [
                0u32,
                1,
                2,
                3,
                f - 1,
                f,
                f + 1,
                65535,
                1 << 20,
                (1 << 31) / 3,
                (1 << 31) - 1,
            ] {
                let q = ((x as u64 * s.rcp) >> s.shift) as u32;
                assert_eq!(q, x / f, "x={x} f={f}");
            }
        }
    }

    #[test]
    fn round_trip_one_lane() {
        // A 3-symbol table: freqs 2048, 1024, 1024.
        let starts = [0u32, 2048, 3072];
        let freqs = [2048u32, 1024, 1024];
        let enc: Vec<_> = (0..3)
            .map(|i| EncSymbol::new(starts[i], freqs[i]))
            .collect();
        let mut dt = Vec::new();
        push_dec_slots(&freqs, &mut dt);
        let dt: &[DecSlot; PROB_SCALE as usize] = dt.as_slice().try_into().unwrap();
        let msg: Vec<u32> = (0..1000).map(|i| (i * 7 % 11 % 3) as u32).collect();
        let mut x = RANS_L;
        let mut words = vec![0u16; msg.len() + 2];
        let mut pos = words.len();
        for &m in msg.iter().rev() {
            encode_into(&mut x, &mut words, &mut pos, &enc[m as usize]);
        }
        words[pos - 2] = (x >> 16) as u16;
        words[pos - 1] = x as u16;
        let words = words[pos - 2..].to_vec();
        let mut p = 2;
        let mut y = (words[0] as u32) << 16 | words[1] as u32;
        for &m in &msg {
            assert_eq!(decode_slot(&mut y, dt), m);
            if y < RANS_L {
                y = y << 16 | words[p] as u32;
                p += 1;
            }
        }
        assert_eq!(y, RANS_L);
        assert_eq!(p, words.len());
    }
}
