//! LMCache's per-(row, channel) integer CDF (reference/cachegen.md §2.1).
//!
//! One CDF describes the symbols of one (row, channel) counted over all `T` tokens of an
//! encode call, and is shared by every 256-token group of that call. It has
//! `Lp = max_bins + 1` entries:
//!
//! ```text
//! n[s]   = number of tokens with symbol s
//! cum[i] = sum_{s < i} n[s]                        (i = 0..=max_bins, cum[max_bins] = T)
//! cdf[i] = floor((0xFFFF - max_bins) * cum[i] / T) + i      (u32 math, stored as u16)
//! ```
//!
//! so `cdf[0] == 0`, `cdf[max_bins] == 0xFFFF` and the table is strictly increasing: every
//! symbol slot, seen or not, keeps a width of at least 1/65536. The range coder
//! ([`super::range`]) codes symbols `0..=Lp-2` and uses `0x10000` (not `cdf[Lp-1]`) as the
//! upper bound of the last one.
//!
//! Limits inherited from the reference kernel (`cal_cdf.cu`): `T <= 65535` (its histogram is
//! `uint16`) and `max_bins < 64`. [`channel_cdf`] expects its callers to enforce them;
//! [`validate_cdf`] checks a table read from an untrusted stream.

use crate::error::DecodeError;

/// Largest `T` (tokens counted into one CDF) the reference supports: its histogram is `uint16`.
pub const MAX_TOKENS: usize = 0xFFFF;

/// `max_bins` must be below this (the reference's `MAX_BINS_SUPPORTED`); `Lp = max_bins + 1`
/// is therefore at most 64.
pub const MAX_BINS_LIMIT: u32 = 64;

/// The LMCache CDF of one stream's symbols counted over all `T` tokens of a chunk.
///
/// `symbols`: the `T = symbols.len()` symbols (each `< max_bins`) of one (row, channel);
/// `out.len() == max_bins + 1`.
/// `n[s]` = count, `cum[i] = sum_{s<i} n[s]`,
/// `cdf[i] = floor((0xFFFF - max_bins) * cum[i] / T) + i` (u32 math), stored as u16.
///
/// Preconditions, checked by the callers (and by `debug_assert!` here):
/// `1 <= T <= 65535` ([`MAX_TOKENS`]), `max_bins < 64` ([`MAX_BINS_LIMIT`]) and every symbol
/// `< max_bins`. Outside them the result is not the reference's but the function still does
/// not panic: `T == 0` gives `cdf[i] = i`, a symbol `>= max_bins` is not counted, and the
/// products are formed in u64 so nothing overflows.
///
/// # Panics
///
/// If `out.len() != max_bins + 1`.
pub fn channel_cdf(symbols: &[u8], max_bins: u32, out: &mut [u16]) {
    debug_assert!(
        max_bins < MAX_BINS_LIMIT,
        "max_bins {max_bins} must be < {MAX_BINS_LIMIT}"
    );
    debug_assert!(
        symbols.len() <= MAX_TOKENS,
        "T = {} exceeds {MAX_TOKENS}",
        symbols.len()
    );
    assert_eq!(
        out.len() as u64,
        u64::from(max_bins) + 1,
        "CDF output must have max_bins + 1 entries"
    );

    let mut hist = [0u32; 256];
    for &s in symbols {
        hist[usize::from(s)] += 1;
    }
    debug_assert!(
        hist[(max_bins as usize).min(256)..].iter().all(|&n| n == 0),
        "a symbol is >= max_bins {max_bins}"
    );

    let t = symbols.len() as u64;
    // 0xFFFF - max_bins in the reference's u32 math; saturating keeps an out-of-contract
    // max_bins from wrapping.
    let scale = u64::from(0xFFFFu32.saturating_sub(max_bins));
    let mut cum = 0u64;
    for (i, o) in out.iter_mut().enumerate() {
        // With T <= 65535 the product fits u32 exactly as in the reference.
        let q = (scale * cum).checked_div(t).unwrap_or(0);
        *o = (q + i as u64) as u16;
        if let Some(&n) = hist.get(i) {
            cum += u64::from(n);
        }
    }
}

/// Checks a CDF read from an untrusted stream: `len = Lp >= 2`, `Lp - 1 < 64`, `cdf[0] == 0`,
/// strictly increasing.
///
/// The last entry (`cdf[Lp-1]`, `0xFFFF` when produced by [`channel_cdf`]) is not used by
/// the coder, but it must still exceed `cdf[Lp-2]`.
///
/// # Errors
///
/// [`DecodeError::InvalidField`] with field `lp` (value: the length) for a wrong length,
/// `cdf[0]` (value: the entry) when the table does not start at zero, and `cdf` (value: the
/// first index `i` with `cdf[i] <= cdf[i-1]`) when it is not strictly increasing.
pub fn validate_cdf(cdf: &[u16]) -> Result<(), DecodeError> {
    let lp = cdf.len();
    if lp < 2 || lp > MAX_BINS_LIMIT as usize {
        return Err(DecodeError::InvalidField {
            field: "lp",
            value: lp as u64,
        });
    }
    if cdf[0] != 0 {
        return Err(DecodeError::InvalidField {
            field: "cdf[0]",
            value: u64::from(cdf[0]),
        });
    }
    if let Some(i) = cdf.windows(2).position(|w| w[1] <= w[0]) {
        return Err(DecodeError::InvalidField {
            field: "cdf",
            value: (i + 1) as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_by_hand() {
        // max_bins = 3, T = 4, symbols {0,0,1,2}: n = [2,1,1], cum = [0,2,3,4].
        // scale = 0xFFFF - 3 = 65532.
        // cdf = [0, 65532*2/4 + 1, 65532*3/4 + 2, 65532 + 3] = [0, 32767, 49151, 65535].
        let mut cdf = [0u16; 4];
        channel_cdf(&[0, 1, 0, 2], 3, &mut cdf);
        assert_eq!(cdf, [0, 32767, 49151, 65535]);
        validate_cdf(&cdf).unwrap();

        // Floors: T = 3, symbols {0,1,1}, max_bins = 2: scale = 65533, cum = [0,1,3].
        // cdf[1] = floor(65533/3) + 1 = 21844 + 1; cdf[2] = 65533 + 2.
        let mut cdf = [0u16; 3];
        channel_cdf(&[1, 0, 1], 2, &mut cdf);
        assert_eq!(cdf, [0, 21845, 65535]);
    }

    #[test]
    fn unseen_symbols_keep_width_one() {
        let mut cdf = [0u16; 33];
        channel_cdf(&[15; 256], 32, &mut cdf);
        for (i, &c) in cdf.iter().enumerate() {
            let want = if i <= 15 { i } else { 0xFFFF - 32 + i };
            assert_eq!(usize::from(c), want, "entry {i}");
        }
        validate_cdf(&cdf).unwrap();
    }

    #[test]
    fn max_tokens_and_max_bins() {
        // The largest legal inputs stay within u32 math and give a valid table.
        let syms: Vec<u8> = (0..MAX_TOKENS).map(|i| (i % 63) as u8).collect();
        let mut cdf = [0u16; 64];
        channel_cdf(&syms, 63, &mut cdf);
        assert_eq!(cdf[0], 0);
        assert_eq!(cdf[63], 0xFFFF);
        validate_cdf(&cdf).unwrap();
    }

    #[test]
    fn empty_input_is_defined() {
        let mut cdf = [7u16; 5];
        channel_cdf(&[], 4, &mut cdf);
        assert_eq!(cdf, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn validate_rejects_bad_tables() {
        assert_eq!(
            validate_cdf(&[]),
            Err(DecodeError::InvalidField {
                field: "lp",
                value: 0
            })
        );
        assert_eq!(
            validate_cdf(&[0]),
            Err(DecodeError::InvalidField {
                field: "lp",
                value: 1
            })
        );
        let long: Vec<u16> = (0..65).collect();
        assert_eq!(
            validate_cdf(&long),
            Err(DecodeError::InvalidField {
                field: "lp",
                value: 65
            })
        );
        validate_cdf(&long[..64]).unwrap();
        validate_cdf(&[0, 1]).unwrap();
        assert_eq!(
            validate_cdf(&[1, 2, 3]),
            Err(DecodeError::InvalidField {
                field: "cdf[0]",
                value: 1
            })
        );
        assert_eq!(
            validate_cdf(&[0, 5, 5, 9]),
            Err(DecodeError::InvalidField {
                field: "cdf",
                value: 2
            })
        );
        assert_eq!(
            validate_cdf(&[0, 5, 9, 3]),
            Err(DecodeError::InvalidField {
                field: "cdf",
                value: 3
            })
        );
        assert!(validate_cdf(&[0, 0xFFFF, 0]).is_err());
    }
}
