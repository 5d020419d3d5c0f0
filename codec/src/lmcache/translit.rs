//! Test oracle: a deliberately plain, line-by-line transliteration of the CDF formula and the
//! range coder pseudo-code of reference/cachegen.md §2.1-§2.2 (one bit at a time into a
//! `Vec<bool>`, u64/u32 arithmetic as written), plus the tests that hold the production
//! coder in `range.rs` and `cdf.rs` to it.

use super::cdf::{channel_cdf, validate_cdf};
use super::range::{decode, encode};

/// §2.1, literally: uint16 histogram, cumulative sum, `floor((0xFFFF - max_bins) * cum / T) + i`
/// in u32.
fn cdf_plain(symbols: &[u8], max_bins: u32) -> Vec<u16> {
    let t = symbols.len() as u32;
    let mut n = vec![0u16; max_bins as usize];
    for &s in symbols {
        n[s as usize] += 1;
    }
    let mut cdf = Vec::new();
    for i in 0..=max_bins as usize {
        let cum: u32 = n[..i].iter().map(|&x| x as u32).sum();
        let v: u32 = (0xFFFF - max_bins) * cum / t + i as u32;
        cdf.push(v as u16);
    }
    cdf
}

/// `emit(bit)` followed by `pending` inverted bits, then `pending = 0`.
fn emit(bits: &mut Vec<bool>, bit: bool, pending: &mut u64) {
    bits.push(bit);
    while *pending > 0 {
        bits.push(!bit);
        *pending -= 1;
    }
}

/// MSB-first packing, final partial byte zero-padded.
fn pack(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, &b) in bits.iter().enumerate() {
        if b {
            out[i / 8] |= 0x80 >> (i % 8);
        }
    }
    out
}

/// §2.2 encoder, literally.
fn encode_plain(cdf: &[u16], symbols: &[u8]) -> Vec<u8> {
    let max_sym = cdf.len() - 2;
    let mut low: u32 = 0;
    let mut high: u32 = 0xFFFF_FFFF;
    let mut pending: u64 = 0;
    let mut bits: Vec<bool> = Vec::new();
    for &sym in symbols {
        let sym = sym as usize;
        let span: u64 = high as u64 - low as u64 + 1;
        let c_lo: u64 = cdf[sym] as u64;
        let c_hi: u64 = if sym == max_sym {
            0x10000
        } else {
            cdf[sym + 1] as u64
        };
        // C: (low - 1) in u32 (wraps), plus a u64, truncated back to u32.
        high = (low.wrapping_sub(1) as u64).wrapping_add((span * c_hi) >> 16) as u32;
        low = (low as u64 + ((span * c_lo) >> 16)) as u32;
        loop {
            if high < 0x8000_0000 {
                emit(&mut bits, false, &mut pending);
                low <<= 1;
                high = (high << 1) | 1;
            } else if low >= 0x8000_0000 {
                emit(&mut bits, true, &mut pending);
                low <<= 1;
                high = (high << 1) | 1;
            } else if low >= 0x4000_0000 && high < 0xC000_0000 {
                pending += 1;
                low = (low << 1) & 0x7FFF_FFFF;
                high = (high << 1) | 0x8000_0001;
            } else {
                break;
            }
        }
    }
    pending += 1;
    emit(&mut bits, low >= 0x4000_0000, &mut pending);
    pack(&bits)
}

/// Bit `i` of the stream, MSB-first, zero past the end.
fn bit_at(bytes: &[u8], i: usize) -> u32 {
    match bytes.get(i / 8) {
        Some(&b) => ((b >> (7 - i % 8)) & 1) as u32,
        None => 0,
    }
}

/// §2.2 decoder, literally (count by division, search for the largest `m <= max_sym` with
/// `cdf[m] <= count`, stop after the last symbol). Only for tables that pass `validate_cdf`.
fn decode_plain(cdf: &[u16], bytes: &[u8], n: usize) -> Vec<u8> {
    let max_sym = cdf.len() - 2;
    let mut value: u32 = 0;
    for i in 0..32 {
        value = (value << 1) | bit_at(bytes, i);
    }
    let mut next_bit = 32;
    let mut low: u32 = 0;
    let mut high: u32 = 0xFFFF_FFFF;
    let mut out = Vec::new();
    for i in 0..n {
        let span: u64 = high as u64 - low as u64 + 1;
        let count: u64 = ((value as u64 - low as u64 + 1) * 0x10000 - 1) / span;
        let mut m = 0;
        while m < max_sym && cdf[m + 1] as u64 <= count {
            m += 1;
        }
        out.push(m as u8);
        if i == n - 1 {
            break;
        }
        let c_lo: u64 = cdf[m] as u64;
        let c_hi: u64 = if m == max_sym {
            0x10000
        } else {
            cdf[m + 1] as u64
        };
        high = (low.wrapping_sub(1) as u64).wrapping_add((span * c_hi) >> 16) as u32;
        low = (low as u64 + ((span * c_lo) >> 16)) as u32;
        loop {
            if high < 0x8000_0000 || low >= 0x8000_0000 {
                low <<= 1;
                high = (high << 1) | 1;
                value = (value << 1) | bit_at(bytes, next_bit);
                next_bit += 1;
            } else if low >= 0x4000_0000 && high < 0xC000_0000 {
                low = (low << 1) & 0x7FFF_FFFF;
                high = (high << 1) | 0x8000_0001;
                value -= 0x4000_0000;
                value = (value << 1) | bit_at(bytes, next_bit);
                next_bit += 1;
            } else {
                break;
            }
        }
    }
    out
}

/// Both encoders give `want`; both decoders give the symbols back.
fn check_vector(cdf: &[u16], symbols: &[u8], want: &[u8]) {
    validate_cdf(cdf).unwrap();
    assert_eq!(encode_plain(cdf, symbols), want, "plain encoder");
    let mut out = vec![0xAA];
    let n = encode(cdf, symbols, &mut out);
    assert_eq!(n, want.len());
    assert_eq!(&out[1..], want, "production encoder");
    assert_eq!(
        decode_plain(cdf, want, symbols.len()),
        symbols,
        "plain decoder"
    );
    let mut dec = vec![0u8; symbols.len()];
    decode(cdf, want, &mut dec).unwrap();
    assert_eq!(dec, symbols, "production decoder");
}

#[test]
fn vector_empty_stream() {
    // No symbols: low = 0 at the end, pending = 0 + 1: emit 0 then one inverted bit (1).
    // Bits "01" -> 0b0100_0000.
    check_vector(&[0, 0x8000, 0xFFFF], &[], &[0x40]);
    check_vector(&[0, 1], &[], &[0x40]);
}

#[test]
fn vector_uniform_two_symbols() {
    // cdf = [0, 0x8000, 0xFFFF], max_sym = 1 (c_hi of symbol 1 is 0x10000).
    // sym 0: span 2^32, high = -1 + 2^31 = 0x7FFF_FFFF, low = 0 -> E1: emit 0; low 0, high !0.
    // sym 1: high = -1 + 2^32 = 0xFFFF_FFFF, low = 2^31 -> E2: emit 1; low 0, high !0.
    // sym 1: emit 1.  sym 0: emit 0.
    // end: low 0 < 2^30, pending 1: "01".  Bits 0110 01(00) -> 0x64.
    check_vector(&[0, 0x8000, 0xFFFF], &[0, 1, 1, 0], &[0x64]);
}

#[test]
fn vector_skewed_with_straddle() {
    // cdf = [0, 0x4000, 0xC000, 0xFFFF]: widths 1/4, 1/2, 1/4 (max_sym = 2).
    // sym 1: high = -1 + 0xC000_0000 = 0xBFFF_FFFF, low = 0x4000_0000 -> E3: pending 1,
    //        low = 0x8000_0000 & 0x7FFF_FFFF = 0, high = 0x7FFF_FFFE | 0x8000_0001 = !0.
    // sym 1: same, pending 2.
    // sym 2: c_hi 0x10000: high = !0, low = 0xC000_0000 -> E2: emit 1 + "00" (pending);
    //        low = 0x8000_0000 -> E2: emit 1; low 0, high !0.               bits "1001"
    // sym 0: high = 0x3FFF_FFFF -> E1: emit 0, high 0x7FFF_FFFF -> E1: emit 0. bits "100100"
    // end: low 0, pending 1: "01".  Bits 1001 0001 -> 0x91.
    check_vector(&[0, 0x4000, 0xC000, 0xFFFF], &[1, 1, 2, 0], &[0x91]);
    // A lone straddle: sym 1 -> pending 1, low 0; end: pending 2, emit 0 + "11" -> 0x60.
    check_vector(&[0, 0x4000, 0xC000, 0xFFFF], &[1], &[0x60]);
}

#[test]
fn vector_final_bit_one() {
    // cdf = [0, 0x6000, 0xE000, 0xFFFF]. sym 1: high = 0xDFFF_FFFF, low = 0x6000_0000: no
    // shift (low < 2^31 <= high, high >= 0xC000_0000).
    // end: low >= 2^30 -> emit 1, then pending (1) inverted: "10" -> 0x80.
    check_vector(&[0, 0x6000, 0xE000, 0xFFFF], &[1], &[0x80]);
    // sym 1 again: span 2^31: high = 0x6000_0000 - 1 + 0x7000_0000 = 0xCFFF_FFFF,
    // low = 0x6000_0000 + 0x3000_0000 = 0x9000_0000 -> E2: emit 1; low 0x2000_0000,
    // high 0x9FFF_FFFF; stop. end: low < 2^30: emit 0 + "1" -> bits "101" -> 0xA0.
    check_vector(&[0, 0x6000, 0xE000, 0xFFFF], &[1, 1], &[0xA0]);
}

#[test]
fn vector_rare_symbol_costs_16_bits() {
    // cdf = [0, 1, 0xFFFF]: symbol 0 has width 1/65536. high = -1 + 2^16 = 0xFFFF, low 0:
    // 16 E1 shifts emit 16 zeros; end "01": 18 bits -> 00 00 40.
    check_vector(&[0, 1, 0xFFFF], &[0], &[0x00, 0x00, 0x40]);
    // symbol 1 (the last, up to 0x10000): low = 2^16, high = !0: no shift; end "01".
    check_vector(&[0, 1, 0xFFFF], &[1], &[0x40]);
    // Two symbols only one coded: a one-entry alphabet costs nothing per symbol.
    check_vector(&[0, 0xFFFF], &[0; 1000], &[0x40]);
}

#[test]
fn cdf_matches_plain_formula() {
    let mut rng = Rng(7);
    for &max_bins in &[1u32, 2, 3, 8, 12, 16, 32, 48, 63] {
        for &t in &[1usize, 2, 3, 255, 256, 257, 4096, 65535] {
            let spread = 1 + rng.below(8) as u32;
            let syms: Vec<u8> = (0..t).map(|_| rng.laplace(max_bins, spread)).collect();
            let mut cdf = vec![0u16; max_bins as usize + 1];
            channel_cdf(&syms, max_bins, &mut cdf);
            assert_eq!(cdf, cdf_plain(&syms, max_bins), "max_bins {max_bins} T {t}");
            validate_cdf(&cdf).unwrap();
        }
    }
}

/// splitmix64: the tests' deterministic source of skewed symbols.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A two-sided geometric ("Laplacian") symbol in `0..max_bins` centred on the middle;
    /// larger `spread` is wider.
    fn laplace(&mut self, max_bins: u32, spread: u32) -> u8 {
        let centre = (max_bins / 2) as i64;
        let mut mag = 0i64;
        while self.below(u64::from(spread) + 1) != 0 && mag < 64 {
            mag += 1;
        }
        let v = if self.next() & 1 == 0 {
            centre + mag
        } else {
            centre - mag
        };
        v.clamp(0, i64::from(max_bins) - 1) as u8
    }
}

#[test]
fn stream_longer_than_256_bytes() {
    // A 65535-token chunk almost all at one symbol; the 256-token group codes symbols that
    // occur once in the chunk, each about 15-16 bits: far beyond the reference's 256-byte
    // per-stream buffer.
    let max_bins = 32u32;
    let mut chunk = vec![15u8; 65535];
    let group: Vec<u8> = (0..256).map(|i| if i % 2 == 0 { 0 } else { 30 }).collect();
    chunk[..256].copy_from_slice(&group);
    let mut cdf = vec![0u16; 33];
    channel_cdf(&chunk, max_bins, &mut cdf);
    let mut bytes = Vec::new();
    let n = encode(&cdf, &group, &mut bytes);
    assert!(n > 256, "only {n} bytes");
    assert_eq!(bytes, encode_plain(&cdf, &group));
    let mut dec = vec![0u8; 256];
    decode(&cdf, &bytes, &mut dec).unwrap();
    assert_eq!(dec, group);
    assert_eq!(decode_plain(&cdf, &bytes, 256), group);

    // An unseen symbol below max_sym has width 1: exactly 16 bits each, the worst case.
    // (The last symbol, 31, has width 0x10000 - 0xFFFE = 2 when unseen: 15 bits.)
    let group = vec![20u8; 256];
    let mut bytes = Vec::new();
    let n = encode(&cdf, &group, &mut bytes);
    assert_eq!(n, 513);
    assert_eq!(bytes, encode_plain(&cdf, &group));
    decode(&cdf, &bytes, &mut dec).unwrap();
    assert_eq!(dec, group);
}

#[test]
fn long_pending_runs() {
    // Symbols straddling the midpoint again and again build pending runs longer than the
    // writer's 32-bit chunks.
    let cdf = [0u16, 0x7FF0, 0x8010, 0xFFFF];
    let mut syms = vec![1u8; 200];
    syms.extend([0, 2, 1, 1, 1, 0, 1, 2]);
    let want = encode_plain(&cdf, &syms);
    let mut got = Vec::new();
    encode(&cdf, &syms, &mut got);
    assert_eq!(got, want);
    let mut dec = vec![0u8; syms.len()];
    decode(&cdf, &got, &mut dec).unwrap();
    assert_eq!(dec, syms);
}

#[test]
fn bits_per_symbol_on_laplacian_source() {
    // 31 levels (32 bins), peaked: the CDF over the same 256 tokens, as LMCache's default.
    let mut rng = Rng(42);
    let mut total_bits = 0usize;
    let mut entropy_bits = 0f64;
    let mut total_syms = 0usize;
    for _ in 0..200 {
        let syms: Vec<u8> = (0..256).map(|_| rng.laplace(31, 1)).collect();
        let mut cdf = vec![0u16; 33];
        channel_cdf(&syms, 32, &mut cdf);
        let mut bytes = Vec::new();
        total_bits += 8 * encode(&cdf, &syms, &mut bytes);
        total_syms += syms.len();
        let mut hist = [0usize; 32];
        for &s in &syms {
            hist[s as usize] += 1;
        }
        entropy_bits += hist
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| -(n as f64) * (n as f64 / 256.0).log2())
            .sum::<f64>();
    }
    let bps = total_bits as f64 / total_syms as f64;
    let entropy = entropy_bits / total_syms as f64;
    assert!(bps < 31f64.log2(), "{bps} bits/symbol");
    // Within the CDF's quantization loss plus ~9 bits of termination and padding per stream.
    assert!(
        bps < entropy + 0.1,
        "{bps} bits/symbol vs empirical entropy {entropy}"
    );
    assert!(bps > 1.5 && bps < 3.0, "{bps} bits/symbol");
}

/// Throughput in MB/s of symbols: `cargo test --release -p kvwire-codec throughput -- --ignored
/// --nocapture`.
#[test]
#[ignore = "timing, run in release by hand"]
fn throughput() {
    use std::time::Instant;
    let mut rng = Rng(1);
    let streams: Vec<(Vec<u16>, Vec<u8>)> = (0..8192)
        .map(|_| {
            let spread = 1 + rng.below(3) as u32;
            let syms: Vec<u8> = (0..256).map(|_| rng.laplace(31, spread)).collect();
            let mut cdf = vec![0u16; 33];
            channel_cdf(&syms, 32, &mut cdf);
            (cdf, syms)
        })
        .collect();
    let nsym = (streams.len() * 256) as f64;
    let mut best = [f64::MAX; 4];
    let mut total_bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let mut bytes = Vec::new();
        let mut lens = Vec::new();
        for (cdf, syms) in &streams {
            lens.push(encode(cdf, syms, &mut bytes));
        }
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        total_bytes = bytes.len();

        let t = Instant::now();
        let mut out = vec![0u8; 256];
        let mut at = 0;
        for ((cdf, syms), &len) in streams.iter().zip(&lens) {
            decode(cdf, &bytes[at..at + len], &mut out).unwrap();
            assert_eq!(&out, syms);
            at += len;
        }
        best[1] = best[1].min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut plain = Vec::new();
        for (cdf, syms) in &streams {
            plain.extend(encode_plain(cdf, syms));
        }
        best[2] = best[2].min(t.elapsed().as_secs_f64());
        assert_eq!(plain, bytes);

        let t = Instant::now();
        let mut at = 0;
        for ((cdf, syms), &len) in streams.iter().zip(&lens) {
            assert_eq!(&decode_plain(cdf, &bytes[at..at + len], 256), syms);
            at += len;
        }
        best[3] = best[3].min(t.elapsed().as_secs_f64());
    }
    println!(
        "{:.3} bits/symbol; MB/s of symbols (1 byte each), one thread: encode {:.0}, decode {:.0}; \
         plain transliteration: encode {:.0}, decode {:.0}",
        total_bytes as f64 * 8.0 / nsym,
        nsym / best[0] / 1e6,
        nsym / best[1] / 1e6,
        nsym / best[2] / 1e6,
        nsym / best[3] / 1e6,
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// (max_bins, group, chunk): the group's symbols are the first tokens of the chunk, whose
    /// CDF is either the group alone or a larger, more peaked superset.
    fn case() -> impl Strategy<Value = (u32, Vec<u8>, Vec<u8>)> {
        (
            prop::sample::select(vec![3u32, 8, 12, 16, 32, 48, 63]),
            1usize..=256,
            prop_oneof![Just(0usize), 1usize..4096, 30000usize..=65279],
            1u32..16,
            1u32..4,
            any::<u64>(),
        )
            .prop_map(|(max_bins, t, extra, spread, extra_spread, seed)| {
                let mut rng = Rng(seed);
                let group: Vec<u8> = (0..t).map(|_| rng.laplace(max_bins, spread)).collect();
                let mut chunk = group.clone();
                chunk.extend((0..extra).map(|_| rng.laplace(max_bins, extra_spread)));
                (max_bins, group, chunk)
            })
    }

    /// A table that passes `validate_cdf`: `Lp` in 2..=64, strictly increasing from 0.
    fn valid_cdf() -> impl Strategy<Value = Vec<u16>> {
        (2usize..=64)
            .prop_flat_map(|lp| prop::collection::btree_set(1u16..=u16::MAX, lp - 1))
            .prop_map(|set| std::iter::once(0).chain(set).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encoder_matches_transliteration((max_bins, group, chunk) in case()) {
            let mut cdf = vec![0u16; max_bins as usize + 1];
            channel_cdf(&chunk, max_bins, &mut cdf);
            prop_assert_eq!(&cdf, &cdf_plain(&chunk, max_bins));
            let want = encode_plain(&cdf, &group);
            let mut got = vec![1, 2, 3];
            let n = encode(&cdf, &group, &mut got);
            prop_assert_eq!(n, want.len());
            prop_assert_eq!(&got[3..], &want[..]);

            let mut dec = vec![0u8; group.len()];
            decode(&cdf, &want, &mut dec).unwrap();
            prop_assert_eq!(&dec, &group);
            prop_assert_eq!(decode_plain(&cdf, &want, group.len()), group);
        }

        #[test]
        fn any_valid_table_round_trips(
            cdf in valid_cdf(),
            raw in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let syms: Vec<u8> = raw.iter().map(|&b| b % (cdf.len() as u8 - 1)).collect();
            let want = encode_plain(&cdf, &syms);
            let mut got = Vec::new();
            encode(&cdf, &syms, &mut got);
            prop_assert_eq!(&got, &want);
            let mut dec = vec![0u8; syms.len()];
            decode(&cdf, &got, &mut dec).unwrap();
            prop_assert_eq!(dec, syms);
        }

        #[test]
        fn garbage_decodes_like_the_reference(
            cdf in valid_cdf(),
            bytes in prop::collection::vec(any::<u8>(), 0..80),
            n in 0usize..400,
        ) {
            let mut dec = vec![0u8; n];
            // A valid table cannot reach an inconsistent state: Ok, and the same symbols as
            // the transliteration.
            decode(&cdf, &bytes, &mut dec).unwrap();
            let max_sym = cdf.len() - 2;
            prop_assert!(dec.iter().all(|&s| usize::from(s) <= max_sym));
            prop_assert_eq!(dec, decode_plain(&cdf, &bytes, n));
        }

        #[test]
        fn garbage_tables_never_panic(
            mut cdf in prop::collection::vec(any::<u16>(), 0..80),
            zero_start in any::<bool>(),
            bytes in prop::collection::vec(any::<u8>(), 0..80),
            n in 0usize..300,
        ) {
            if zero_start && !cdf.is_empty() {
                cdf[0] = 0;
            }
            let mut dec = vec![0u8; n];
            if decode(&cdf, &bytes, &mut dec).is_ok() {
                prop_assert!(dec.iter().all(|&s| usize::from(s) + 2 <= cdf.len()));
            }
            let _ = validate_cdf(&cdf);
        }

        #[test]
        fn validate_rejects_non_monotonic(mut cdf in valid_cdf(), i in any::<prop::sample::Index>(),
                                           delta in 0u16..100) {
            // Make entry j (>= 1) no greater than entry j - 1.
            let j = 1 + i.index(cdf.len() - 1);
            cdf[j] = cdf[j - 1].saturating_sub(delta);
            prop_assert!(validate_cdf(&cdf).is_err());
        }

        #[test]
        fn validate_rejects_nonzero_start(mut cdf in valid_cdf(), first in 1u16..=u16::MAX) {
            cdf[0] = first;
            prop_assert!(validate_cdf(&cdf).is_err());
        }
    }
}
