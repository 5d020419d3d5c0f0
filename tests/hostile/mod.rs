//! Hostile input at every level: truncation, bit flips, forged headers and blocks (with valid
//! CRC32Cs, so the checks behind the checksums run), random bytes, trailing garbage. `decode`
//! must return an error, never panic, and never allocate what the input cannot justify.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use kvwire_codec::container::{BLOCK_HEADER_LEN, FILE_MAGIC};
use kvwire_codec::{
    decode, encode, CodecError, DType, DecodeError, Decoder, EncodeOptions, KvCache, Layout, Level,
};
use kvwire_tests::{
    block_ranges, fix_block_crc, fixture_encoded, fixture_head, forge_block, gen_cache, header_len,
    spec, Rng, Values,
};

mod forged;

/// A small cache: 2 layers, 13 tokens in chunks of 5 (5 + 5 + 3), 16 channels, f16.
pub(super) fn small_cache() -> KvCache {
    gen_cache(
        spec(2, 2, 13, 8, Layout::Hf, DType::F16),
        Values::OutlierChannels,
        3,
    )
}

pub(super) fn small_opts(level: Level) -> EncodeOptions {
    EncodeOptions {
        level,
        chunk_tokens: 5,
        channel_scale_k: false,
    }
}

pub(super) fn small_file(level: Level) -> Vec<u8> {
    encode(&small_cache().view(), &small_opts(level)).unwrap()
}

/// `decode(buf)`, turning a panic into a test failure that names `what`.
pub(super) fn try_decode(buf: &[u8], what: &str) -> Result<KvCache, CodecError> {
    match catch_unwind(AssertUnwindSafe(|| decode(buf))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("decode panicked on {what} ({} bytes): {msg}", buf.len())
        }
    }
}

/// `decode(buf)` must be an error.
#[track_caller]
pub(super) fn assert_rejected(buf: &[u8], what: &str) -> CodecError {
    match try_decode(buf, what) {
        Ok(kv) => panic!("{what}: accepted, decoded {:?}", kv.spec()),
        Err(e) => e,
    }
}

/// The `DecodeError` inside `e`.
#[track_caller]
pub(super) fn decode_error(e: CodecError) -> DecodeError {
    match e {
        CodecError::Decode(d) => d,
        other => panic!("expected a DecodeError, got {other}"),
    }
}

#[test]
fn every_proper_prefix_of_a_small_file_is_rejected() {
    for level in Level::ALL {
        let file = small_file(level);
        assert!(decode(&file).is_ok());
        for n in 0..file.len() {
            assert_rejected(&file[..n], &format!("{level} prefix {n}/{}", file.len()));
        }
    }
}

#[test]
fn prefixes_of_the_fixture_are_rejected() {
    let mut rng = Rng::new(5);
    for level in Level::ALL {
        let file = fixture_encoded(level);
        let mut cuts = vec![0, 1, 4, 31, 32, file.len() - 1];
        let h = header_len(file);
        cuts.extend([h - 1, h, h + 1, h + BLOCK_HEADER_LEN]);
        for r in block_ranges(file).iter().take(3) {
            cuts.extend([r.end - 1, r.end, r.end + 1]);
        }
        cuts.extend((0..200).map(|_| rng.below(file.len())));
        for n in cuts {
            let t = Instant::now();
            let e = assert_rejected(&file[..n], &format!("{level} fixture prefix {n}"));
            // Nothing is decoded from an incomplete file, so rejection is quick.
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{level} prefix {n}: slow"
            );
            let d = decode_error(e);
            assert!(
                n < 4 + 4 * 8
                    || matches!(
                        d,
                        DecodeError::Truncated { .. }
                            | DecodeError::MissingBlocks { .. }
                            | DecodeError::Checksum { .. }
                    ),
                "{level} prefix {n}: {d:?}"
            );
        }
    }
}

/// CRC32C detects every single-bit error in the header and in every block, and magic,
/// lengths and indices are checked before that: no single flipped bit goes unnoticed.
///
/// Every bit of the file header and of every block header is flipped and decoded with
/// `decode`. Every payload bit is flipped too, and the block checked with
/// `Decoder::decode_block` (what `decode` runs on each block once the block headers are
/// indexed); one bit of each payload byte also goes through `decode` itself (a flip there
/// makes `decode` decode every other block first, which is slow in debug builds).
#[test]
fn every_single_bit_flip_of_a_small_file_is_rejected() {
    let mut rng = Rng::new(11);
    for level in Level::ALL {
        // lmcache ships a CDF per channel per block: fewer channels keep the file small.
        let file = if level == Level::Lmcache {
            let kv = gen_cache(
                spec(2, 1, 13, 4, Layout::Vllm, DType::BF16),
                Values::Normal,
                4,
            );
            encode(&kv.view(), &small_opts(level)).unwrap()
        } else {
            small_file(level)
        };
        let (dec, _) = Decoder::new(&file).unwrap();
        let mut layer = vec![0u8; dec.layer_spec().byte_len()];
        let blocks = block_ranges(&file);
        let mut buf = file.clone();
        let flip = |buf: &mut Vec<u8>, bit: usize| buf[bit / 8] ^= 1 << (bit % 8);
        for bit in 0..header_len(&file) * 8 {
            flip(&mut buf, bit);
            assert_rejected(&buf, &format!("{level} header bit {bit} flipped"));
            flip(&mut buf, bit);
        }
        for r in &blocks {
            for bit in r.start * 8..(r.start + BLOCK_HEADER_LEN) * 8 {
                flip(&mut buf, bit);
                assert_rejected(&buf, &format!("{level} block header bit {bit} flipped"));
                flip(&mut buf, bit);
            }
            for byte in r.start + BLOCK_HEADER_LEN..r.end {
                for b in 0..8 {
                    flip(&mut buf, byte * 8 + b);
                    let e = dec.decode_block(&buf[r.clone()], &mut layer);
                    assert!(
                        matches!(
                            e,
                            Err(CodecError::Decode(DecodeError::Checksum {
                                what: "block",
                                ..
                            }))
                        ),
                        "{level} payload bit {} flipped: {e:?}",
                        byte * 8 + b
                    );
                    flip(&mut buf, byte * 8 + b);
                }
                let bit = byte * 8 + rng.below(8);
                flip(&mut buf, bit);
                assert_rejected(&buf, &format!("{level} payload bit {bit} flipped"));
                flip(&mut buf, bit);
            }
        }
        assert!(buf == file);
    }
}

/// A sample of bit flips of a real file: all of the header, three block headers, and random
/// payload bits.
#[test]
fn sampled_bit_flips_of_a_real_file_are_rejected() {
    let kv = fixture_head(2);
    let mut rng = Rng::new(9);
    for level in Level::ALL {
        let file = encode(
            &kv.view(),
            &EncodeOptions {
                chunk_tokens: 64,
                ..small_opts(level)
            },
        )
        .unwrap();
        let blocks = block_ranges(&file);
        let mut bits: Vec<usize> = (0..header_len(&file) * 8).collect();
        // Block headers: magic, indices and length bits in full (rejected before anything
        // is decoded); one bit of two CRC bytes (those decode every block, which is slow).
        for r in [
            &blocks[0],
            &blocks[blocks.len() / 2],
            &blocks[blocks.len() - 1],
        ] {
            bits.extend(r.start * 8..(r.start + 20) * 8);
            bits.extend([20, 23].map(|b| (r.start + b) * 8 + rng.below(8)));
        }
        bits.extend((0..6).map(|_| rng.below(file.len() * 8)));
        let mut buf = file.clone();
        for bit in bits {
            buf[bit / 8] ^= 1 << (bit % 8);
            assert_rejected(&buf, &format!("{level} fixture bit {bit} flipped"));
            buf[bit / 8] ^= 1 << (bit % 8);
        }
    }
}

#[test]
fn valid_file_with_trailing_garbage_is_rejected() {
    for level in Level::ALL {
        let file = small_file(level);
        let last = block_ranges(&file).pop().unwrap();
        let h = header_len(&file);
        let tails: Vec<Vec<u8>> = vec![
            vec![0],
            vec![0xff; 3],
            b"KVWB".to_vec(),
            vec![0; BLOCK_HEADER_LEN],
            vec![0; 1000],
            file[..h].to_vec(),
            file[last.clone()].to_vec(),
            file[last.start..last.end - 1].to_vec(),
            forge_block(0, 0, 5, &[]),
            file.clone(),
        ];
        for tail in tails {
            let buf = [file.clone(), tail.clone()].concat();
            assert_rejected(&buf, &format!("{level} + {} bytes", tail.len()));
        }
    }
}

#[test]
fn random_bytes_are_rejected() {
    let mut rng = Rng::new(77);
    let valid = small_file(Level::CgDefault);
    let h = header_len(&valid);
    for i in 0..3000 {
        let len = rng.below(400);
        let mut buf: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        match i % 3 {
            // Pure noise.
            0 => {}
            // Noise after a file magic and version.
            1 if len >= 5 => {
                buf[..4].copy_from_slice(&FILE_MAGIC);
                buf[4] = 1;
            }
            // Noise after a valid header (sometimes after a block magic too).
            _ => {
                let mut b = valid[..h].to_vec();
                if rng.chance(0.5) {
                    b.extend_from_slice(b"KVWB");
                }
                b.extend(buf);
                buf = b;
            }
        }
        assert_rejected(&buf, &format!("random buffer {i}"));
    }
}

/// Mutated payloads with their CRC32C recomputed reach the entropy decoders (native rANS,
/// LMCache's range coder, q8's symbol check): any result but a panic is acceptable, and a
/// success must have the header's spec.
#[test]
fn corrupt_payloads_with_valid_crcs_never_panic() {
    let mut rng = Rng::new(1234);
    let kv = small_cache();
    for level in Level::ALL {
        for (csk, layout) in [(false, Layout::Hf), (true, Layout::Vllm)] {
            if csk && matches!(level, Level::Raw | Level::Lmcache) {
                continue;
            }
            let kv = kv.view().to_layout(layout);
            let o = EncodeOptions {
                channel_scale_k: csk,
                ..small_opts(level)
            };
            let file = encode(&kv.view(), &o).unwrap();
            let blocks = block_ranges(&file);
            for m in 0..200 {
                let mut buf = file.clone();
                let r = blocks[rng.below(blocks.len())].clone();
                let payload = r.start + BLOCK_HEADER_LEN..r.end;
                if payload.is_empty() {
                    continue;
                }
                let flips = 1 + rng.below(4);
                for _ in 0..flips {
                    let at = payload.start + rng.below(payload.len());
                    match rng.below(3) {
                        0 => buf[at] ^= 1 << rng.below(8),
                        1 => buf[at] = rng.next_u64() as u8,
                        _ => buf[at] = if rng.chance(0.5) { 0 } else { 0xff },
                    }
                }
                fix_block_crc(&mut buf, r);
                let what = format!("{level} csk {csk} mutation {m}");
                if let Ok(out) = try_decode(&buf, &what) {
                    assert_eq!(out.spec(), kv.spec(), "{what}");
                }
            }
        }
    }
}

/// The block-level API on hostile blocks: errors, no panics.
#[test]
fn hostile_blocks_through_the_streaming_decoder() {
    let mut rng = Rng::new(8);
    for level in Level::ALL {
        let file = small_file(level);
        let (dec, _) = Decoder::new(&file).unwrap();
        let mut layer = vec![0u8; dec.layer_spec().byte_len()];
        let mut cache = KvCache::zeroed(dec.header().spec);
        for r in block_ranges(&file) {
            let block = &file[r.clone()];
            for n in 0..block.len() {
                assert!(
                    dec.decode_block(&block[..n], &mut layer).is_err(),
                    "{level} {n}"
                );
                assert!(dec.decode_block_into(&block[..n], &mut cache).is_err());
            }
            for _ in 0..50 {
                let mut b = block.to_vec();
                let bit = rng.below(b.len() * 8);
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    dec.decode_block(&b, &mut layer).is_err(),
                    "{level} bit {bit}"
                );
            }
        }
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            assert!(dec.decode_block(&junk, &mut layer).is_err());
            assert!(Decoder::new(&junk).is_err());
        }
    }
}
