//! LMCache's 32-bit range coder with 16-bit CDFs (reference/cachegen.md §2.2), bit-exact.
//!
//! One stream codes the symbols of one (row, channel, token group) under that (row, channel)'s
//! CDF ([`super::cdf`]). With `Lp = cdf.len()`, the alphabet is `0..=max_sym`,
//! `max_sym = Lp - 2`; symbol `s` owns `[cdf[s], cdf[s+1])` of the 16-bit range, except the
//! last one, which owns `[cdf[max_sym], 0x10000)` (`cdf[Lp-1]` is never used).
//!
//! Encoder state: `low = 0`, `high = 0xFFFF_FFFF`, `pending = 0`. Per symbol:
//!
//! ```text
//! span = high - low + 1                                   (u64)
//! high = low - 1 + (span * c_hi >> 16)                    (u32 wrap)
//! low  = low     + (span * c_lo >> 16)                    (u32 wrap)
//! loop: high <  0x8000_0000          => emit 0, pending x 1; low <<= 1; high = high << 1 | 1
//!       low  >= 0x8000_0000          => emit 1, pending x 0; low <<= 1; high = high << 1 | 1
//!       low >= 0x4000_0000 && high < 0xC000_0000
//!                                    => pending += 1; low = low << 1 & 0x7FFF_FFFF;
//!                                       high = high << 1 | 0x8000_0001
//!       else break
//! end:  pending += 1; emit (low >= 0x4000_0000) then `pending` inverted bits
//! ```
//!
//! Bits are packed MSB-first; the final partial byte is zero-padded, so a stream is
//! `ceil(bits / 8)` bytes and never empty (an empty symbol sequence codes as `[0x40]`).
//!
//! The decoder starts from `value` = the first 4 bytes big-endian and reads one more bit per
//! shift; bytes past the end of the stream read as zero, as in the reference kernel. Trailing
//! bytes beyond what the decoder reads are ignored. The number of symbols is not in the stream:
//! the caller passes it (the group's token count).
//!
//! This implementation does the renormalization loop in bulk (a run of E1/E2 shifts, then a
//! run of E3 shifts, which is the only order in which the loop can take them) and moves bits
//! through 64-bit accumulators. `translit.rs` (tests) holds a line-by-line transliteration of
//! the pseudo-code above, and the tests check that both produce identical bytes and symbols.

use crate::error::DecodeError;

/// Largest CDF length (`Lp`) the coder accepts: `max_bins < 64`.
const MAX_LP: usize = 64;

/// The 16-bit range, `1 << PRECISION`: upper bound of the last symbol.
const TOTAL: u32 = 0x1_0000;

const HALF: u32 = 0x8000_0000;
const QUARTER: u32 = 0x4000_0000;

/// MSB-first bit writer with a 64-bit accumulator; spills 32 bits at a time, big-endian.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    /// The last `n` bits written (older bits above them are stale and ignored).
    acc: u64,
    /// Bits held in `acc`, always `< 32` between calls.
    n: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out, acc: 0, n: 0 }
    }

    /// Appends the `k <= 32` low bits of `bits` (which must be `< 1 << k`).
    #[inline(always)]
    fn put(&mut self, bits: u64, k: u32) {
        debug_assert!(k <= 32 && bits >> k == 0);
        self.acc = (self.acc << k) | bits;
        self.n += k;
        if self.n >= 32 {
            self.n -= 32;
            let word = (self.acc >> self.n) as u32;
            self.out.extend_from_slice(&word.to_be_bytes());
        }
    }

    /// Appends `count` copies of `bit`.
    #[inline]
    fn put_run(&mut self, bit: bool, mut count: u64) {
        while count > 0 {
            let k = count.min(32) as u32;
            let bits = if bit { (1u64 << k) - 1 } else { 0 };
            self.put(bits, k);
            count -= u64::from(k);
        }
    }

    /// Writes the remaining bits, zero-padding the last byte.
    fn finish(self) {
        if self.n > 0 {
            let word = ((self.acc << (32 - self.n)) as u32).to_be_bytes();
            let nbytes = self.n.div_ceil(8) as usize;
            self.out.extend_from_slice(&word[..nbytes]);
        }
    }
}

/// MSB-first bit reader over a byte slice; bytes past its end read as zero.
struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next byte of `bytes` not yet (fully) in `acc`.
    pos: usize,
    /// Unread bits, left-aligned; bits below the `avail` valid ones are either zero or the
    /// leading bits of `bytes[pos]`.
    acc: u64,
    avail: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            acc: 0,
            avail: 0,
        }
    }

    /// Tops `acc` up to at least 56 valid bits.
    #[inline]
    fn refill(&mut self) {
        if let Some(chunk) = self
            .bytes
            .get(self.pos..)
            .and_then(<[u8]>::first_chunk::<8>)
        {
            self.acc |= u64::from_be_bytes(*chunk) >> self.avail;
            let nbytes = (63 - self.avail) / 8;
            self.pos += nbytes as usize;
            self.avail += nbytes * 8;
        } else {
            while self.avail <= 56 {
                let b = self.bytes.get(self.pos).copied().unwrap_or(0);
                self.acc |= u64::from(b) << (56 - self.avail);
                self.pos += 1;
                self.avail += 8;
            }
        }
    }

    /// The next `k` bits, `1 <= k <= 32`.
    #[inline(always)]
    fn read(&mut self, k: u32) -> u64 {
        debug_assert!((1..=32).contains(&k));
        if self.avail < k {
            self.refill();
        }
        let v = self.acc >> (64 - k);
        self.acc <<= k;
        self.avail -= k;
        v
    }
}

/// E1/E2 shift count: the number of leading bits `low` and `high` share (`0..=32`).
#[inline(always)]
fn shared_prefix(low: u32, high: u32) -> u32 {
    (low ^ high).leading_zeros()
}

/// `low << n`, `high << n | ones`, for `n <= 32`.
#[inline(always)]
fn shift_out(low: u32, high: u32, n: u32) -> (u32, u32) {
    let low = (u64::from(low) << n) as u32;
    let high = ((u64::from(high) << n) | ((1u64 << n) - 1)) as u32;
    (low, high)
}

/// E3 shift count once `low < HALF <= high`: how many times `low` is in `[Q1, HALF)` and
/// `high` in `[HALF, Q3)`, i.e. the run of positions from bit 30 down where `low` has a 1 and
/// `high` a 0 (`0..=31`).
#[inline(always)]
fn straddle_count(low: u32, high: u32) -> u32 {
    ((low & !high) << 1).leading_ones()
}

/// `k` E3 shifts of `low` and `high`, `k <= 31`.
#[inline(always)]
fn shift_straddle(low: u32, high: u32, k: u32) -> (u32, u32) {
    let low = (low << k) & (HALF - 1);
    let high = (high << k) | HALF | ((1u32 << k) - 1);
    (low, high)
}

/// Appends the range-coded bytes of `symbols` (each `<= cdf.len()-2`) under `cdf` to `out`;
/// returns bytes written.
///
/// `cdf` is a table as [`super::cdf::channel_cdf`] makes it (strictly increasing, `cdf[0] ==
/// 0`, `2 <= cdf.len() <= 64`); with any other table the bytes are unspecified (no panic
/// beyond the ones below). The output is byte-identical to LMCache's `encode` kernel, with
/// no 256-byte limit: a stream of rare symbols can take up to about 2 bytes per symbol.
///
/// # Panics
///
/// If `cdf.len()` is not in `2..=64`, or a symbol is greater than `cdf.len() - 2`.
pub fn encode(cdf: &[u16], symbols: &[u8], out: &mut Vec<u8>) -> usize {
    assert!(
        (2..=MAX_LP).contains(&cdf.len()),
        "CDF length {} not in 2..={MAX_LP}",
        cdf.len()
    );
    let max_sym = cdf.len() - 2;
    if let Some(&s) = symbols.iter().max() {
        assert!(usize::from(s) <= max_sym, "symbol {s} > max_sym {max_sym}");
    }
    // bounds[s] = c_lo of s, bounds[s + 1] = c_hi of s; 257 entries so that any u8 symbol
    // indexes it without a bounds check.
    let mut bounds = [TOTAL; 257];
    for (b, &c) in bounds.iter_mut().zip(&cdf[..=max_sym]) {
        *b = u32::from(c);
    }

    let start = out.len();
    out.reserve(symbols.len() / 2 + 8);
    let mut w = BitWriter::new(out);
    let mut low = 0u32;
    let mut high = u32::MAX;
    let mut pending = 0u64;

    for &sym in symbols {
        let s = usize::from(sym);
        let span = u64::from(high.wrapping_sub(low)) + 1;
        let c_lo = u64::from(bounds[s]);
        let c_hi = u64::from(bounds[s + 1]);
        high = low
            .wrapping_sub(1)
            .wrapping_add(((span * c_hi) >> 16) as u32);
        low = low.wrapping_add(((span * c_lo) >> 16) as u32);

        // E1/E2: emit the shared leading bits, the pending bits after the first of them.
        let n = shared_prefix(low, high);
        if n != 0 {
            let top = u64::from(low) >> (32 - n);
            if pending == 0 {
                w.put(top, n);
            } else {
                let first = top >> (n - 1);
                w.put(first, 1);
                w.put_run(first == 0, pending);
                pending = 0;
                w.put(top & ((1u64 << (n - 1)) - 1), n - 1);
            }
            (low, high) = shift_out(low, high, n);
        }
        // E3: only possible once the E1/E2 run is over, and never followed by one.
        let k = straddle_count(low, high);
        pending += u64::from(k);
        (low, high) = shift_straddle(low, high, k);
    }

    pending += 1;
    let last = low >= QUARTER;
    w.put(u64::from(last), 1);
    w.put_run(!last, pending);
    w.finish();
    out.len() - start
}

/// Decodes `out.len()` symbols from `bytes` (one stream, exactly what `encode` wrote; bytes
/// past the end read as 0).
///
/// Never panics on any input (any cdf that passed
/// [`validate_cdf`](super::cdf::validate_cdf), any bytes): garbage gives garbage symbols in
/// range `0..=max_sym`, or an error; never out-of-bounds. With a table that passed
/// `validate_cdf` the decoder cannot reach an inconsistent state, so it returns `Ok` for any
/// bytes, exactly as the reference kernel would decode them.
///
/// # Errors
///
/// [`DecodeError::InvalidField`] (`lp`) if `cdf.len()` is not in `2..=64`;
/// [`DecodeError::CorruptStream`] with `stream: 0` (callers remap the index) if the state
/// becomes inconsistent, which only a table that fails `validate_cdf` can cause.
pub fn decode(cdf: &[u16], bytes: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let lp = cdf.len();
    if !(2..=MAX_LP).contains(&lp) {
        return Err(DecodeError::InvalidField {
            field: "lp",
            value: lp as u64,
        });
    }
    let corrupt = DecodeError::CorruptStream { stream: 0 };
    let max_sym = lp - 2;
    // bounds[0..=max_sym] = cdf, everything above = 0x10000 (greater than any count), so the
    // branchless search below never lands above max_sym and bounds[m + 1] is m's c_hi.
    let mut bounds = [TOTAL; MAX_LP + 1];
    for (b, &c) in bounds.iter_mut().zip(&cdf[..=max_sym]) {
        *b = u32::from(c);
    }

    let mut r = BitReader::new(bytes);
    let mut value = r.read(32) as u32;
    let mut low = 0u32;
    let mut high = u32::MAX;
    let nsym = out.len();

    for (i, o) in out.iter_mut().enumerate() {
        // Invariant (kept by the check below): low <= value <= high.
        let span = u64::from(high.wrapping_sub(low)) + 1;
        let offset = u64::from(value.wrapping_sub(low));
        let count = (((offset + 1) << 16) - 1) / span;
        if count >= u64::from(TOTAL) {
            return Err(corrupt);
        }
        let count = count as u32;
        // Largest m in 0..=max_sym with bounds[m] <= count (bounds[0] == 0 for a valid table).
        let mut m = 0usize;
        for step in [32, 16, 8, 4, 2, 1] {
            if bounds[m + step] <= count {
                m += step;
            }
        }
        let c_lo = bounds[m];
        let c_hi = bounds[m + 1];
        // Always true for a valid table; guarantees the new interval holds `value`.
        if !(c_lo <= count && count < c_hi) {
            return Err(corrupt);
        }
        *o = m as u8;
        if i + 1 == nsym {
            break;
        }

        high = low
            .wrapping_sub(1)
            .wrapping_add(((span * u64::from(c_hi)) >> 16) as u32);
        low = low.wrapping_add(((span * u64::from(c_lo)) >> 16) as u32);

        let n = shared_prefix(low, high);
        if n != 0 {
            (low, high) = shift_out(low, high, n);
            value = ((u64::from(value) << n) | r.read(n)) as u32;
        }
        let k = straddle_count(low, high);
        if k != 0 {
            (low, high) = shift_straddle(low, high, k);
            // k times: value = ((value - 0x4000_0000) << 1) | bit, which is (value << 1 | bit)
            // with bit 31 flipped; the flips of all but the last shift are shifted out.
            value = (((u64::from(value) << k) | r.read(k)) as u32) ^ HALF;
        }
    }
    Ok(())
}
