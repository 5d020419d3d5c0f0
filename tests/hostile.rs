//! Hostile input at every level: truncation, bit flips, forged headers and blocks (with valid
//! CRC32Cs, so the checks behind the checksums run), random bytes, trailing garbage. `decode`
//! must return an error, never panic, and never allocate what the input cannot justify.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use kvwire_codec::container::{BLOCK_HEADER_LEN, FILE_MAGIC, FLAG_CHANNEL_SCALE_K};
use kvwire_codec::{
    decode, encode, CodecError, DType, DecodeError, Decoder, EncodeOptions, KvCache, Layout, Level,
};
use kvwire_tests::{
    block_parts, block_ranges, fix_block_crc, fixture_encoded, fixture_head, forge_block,
    forge_block_with_len, gen_cache, header_len, spec, RawHeader, Rng, Values,
};

/// A small cache: 2 layers, 13 tokens in chunks of 5 (5 + 5 + 3), 16 channels, f16.
fn small_cache() -> KvCache {
    gen_cache(
        spec(2, 2, 13, 8, Layout::Hf, DType::F16),
        Values::OutlierChannels,
        3,
    )
}

fn small_opts(level: Level) -> EncodeOptions {
    EncodeOptions {
        level,
        chunk_tokens: 5,
        channel_scale_k: false,
    }
}

fn small_file(level: Level) -> Vec<u8> {
    encode(&small_cache().view(), &small_opts(level)).unwrap()
}

/// `decode(buf)`, turning a panic into a test failure that names `what`.
fn try_decode(buf: &[u8], what: &str) -> Result<KvCache, CodecError> {
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
fn assert_rejected(buf: &[u8], what: &str) -> CodecError {
    match try_decode(buf, what) {
        Ok(kv) => panic!("{what}: accepted, decoded {:?}", kv.spec()),
        Err(e) => e,
    }
}

/// The `DecodeError` inside `e`.
#[track_caller]
fn decode_error(e: CodecError) -> DecodeError {
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

/// A ~100-byte file claiming a 1 TiB cache (2^30 tokens of 256 f16 channels) is rejected as
/// truncated at once, before anything the size of the claim is allocated.
#[test]
fn tiny_file_claiming_a_huge_cache_fails_fast() {
    for level in Level::ALL {
        let bins = match level.bins(1) {
            Some((k, v)) => [k, v].concat(),
            None => vec![0, 0],
        };
        let mut h = RawHeader::new(
            level.code(),
            DType::F16.code(),
            1,
            [1, 1, 1 << 30, 256],
            256,
        );
        h.bins = bins.clone();
        let mut file = h.to_bytes();
        file.extend(forge_block(0, 0, 256, &[0; 12]));
        file.truncate(100);
        let t = Instant::now();
        let e = decode_error(assert_rejected(&file, &format!("{level} 1 TiB claim")));
        assert!(matches!(e, DecodeError::Truncated { .. }), "{level}: {e:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "{level}: slow");

        // As large as the format allows (2^40 elements) in other shapes, and one past it.
        for dims in [
            [1 << 10, 1 << 10, 1 << 10, 1 << 9],
            [1, 1, 1 << 20, 1 << 19],
        ] {
            let mut h = RawHeader::new(level.code(), 1, 1, dims, 65_535);
            h.bins = vec![bins[0]; 2 * dims[0] as usize];
            let t = Instant::now();
            let e = decode_error(assert_rejected(&h.to_bytes(), &format!("{level} {dims:?}")));
            assert!(matches!(e, DecodeError::Truncated { .. }), "{level}: {e:?}");
            assert!(t.elapsed() < Duration::from_secs(1), "{level}: slow");
        }
        let mut h = RawHeader::new(level.code(), 1, 1, [1, 1, 1 << 20, 1 << 20], 256);
        h.bins = bins.clone();
        let e = decode_error(assert_rejected(&h.to_bytes(), "2^41 elements"));
        assert!(
            matches!(e, DecodeError::InvalidField { field: "shape", .. }),
            "{e:?}"
        );
    }
}

/// A tiny file claiming a huge cache through its channel count (1 layer x 2^16 heads x 1
/// token x 2^22 head_dim: 2^39 f16 elements, 1 TiB) must be rejected as truncated, quickly:
/// the allocation guard (`Header::min_encoded_len`) must count per-channel costs. (Found
/// while writing these tests and fixed in the codec: the guard counted 4 bytes per (layer,
/// token) whatever the channel count, and `decode` aborted on a 1 TiB allocation.) Runs in a
/// child process under a 4 GiB address-space limit so that a regression aborts the child,
/// not the whole test binary.
#[test]
#[cfg(target_os = "linux")]
fn tiny_file_claiming_huge_channels_fails_fast() {
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304; exec \"$0\" \"$@\"")
        .arg(exe)
        .args([
            "--exact",
            "hostile::huge_channels_child",
            "--ignored",
            "--nocapture",
        ])
        .env("KVWIRE_HUGE_CHANNELS_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "child failed ({:?}):\n{text}",
        out.status
    );
    assert!(text.contains("1 passed"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(5), "slow");
}

/// The body of `tiny_file_claiming_huge_channels_fails_fast`, run in its child process.
#[test]
#[ignore = "runs only as the child of tiny_file_claiming_huge_channels_fails_fast"]
fn huge_channels_child() {
    if std::env::var_os("KVWIRE_HUGE_CHANNELS_CHILD").is_none() {
        return;
    }
    for level in [Level::Q8, Level::CgDefault, Level::Lmcache] {
        let bins = if level == Level::Q8 { 0 } else { 32 };
        let mut h = RawHeader::new(level.code(), 1, 1, [1, 1 << 16, 1, 1 << 22], 1);
        h.bins = vec![bins; 2];
        let mut file = h.to_bytes();
        // One block, one token: the two per-token scales (f16 1.0) and nothing else.
        file.extend(forge_block(0, 0, 1, &[0x00, 0x3c, 0x00, 0x3c]));
        assert!(file.len() < 100);
        let t = Instant::now();
        let e = decode_error(assert_rejected(&file, &format!("{level} 2^38 channels")));
        assert!(matches!(e, DecodeError::Truncated { .. }), "{level}: {e:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "{level}: slow");

        // A valid small file whose header is re-forged to 2^30 heads or a huge head_dim.
        let small = small_file(level);
        for (i, d) in [(1, 1 << 30), (3, 1 << 30), (3, u32::MAX)] {
            let mut h = RawHeader::parse(&small);
            h.dims[i] = d;
            let buf = [h.to_bytes(), small[header_len(&small)..].to_vec()].concat();
            let t = Instant::now();
            assert_rejected(&buf, &format!("{level} dim {i} = {d}"));
            assert!(t.elapsed() < Duration::from_secs(1), "{level}: slow");
        }
    }
}

/// Headers whose fields are out of range, each with a valid CRC32C.
#[test]
fn forged_headers_with_valid_crcs_are_rejected() {
    for level in Level::ALL {
        let file = small_file(level);
        let base = RawHeader::parse(&file);
        assert_eq!(
            base.to_bytes(),
            file[..header_len(&file)],
            "header parse/forge"
        );
        let body = &file[header_len(&file)..];
        let with = |h: &RawHeader| [h.to_bytes(), body.to_vec()].concat();

        let mut cases: Vec<(String, RawHeader)> = Vec::new();
        let mut add = |name: &str, f: &dyn Fn(&mut RawHeader)| {
            let mut h = base.clone();
            f(&mut h);
            cases.push((name.to_string(), h));
        };
        add("version 0", &|h| h.version = 0);
        add("version 2", &|h| h.version = 2);
        add("level 6", &|h| h.level = 6);
        add("level 255", &|h| h.level = 255);
        add("dtype 0", &|h| h.dtype = 0);
        add("dtype 4", &|h| h.dtype = 4);
        add("layout 0", &|h| h.layout = 0);
        add("layout 3", &|h| h.layout = 3);
        add("unknown flag", &|h| h.flags |= 2);
        add("high flag", &|h| h.flags |= 1 << 31);
        add("chunk 0", &|h| h.chunk_tokens = 0);
        add("chunk 65536", &|h| h.chunk_tokens = 65_536);
        add("chunk 4", &|h| h.chunk_tokens = 4);
        add("chunk 6", &|h| h.chunk_tokens = 6);
        add("chunk u32::MAX", &|h| h.chunk_tokens = u32::MAX);
        for i in 0..4 {
            add(&format!("dim {i} zero"), &|h| h.dims[i] = 0);
            add(&format!("dim {i} + 1"), &|h| h.dims[i] += 1);
            // A huge kv_heads or head_dim at a lossy level is tested in a child process by
            // `tiny_file_claiming_huge_channels_fails_fast` (a regression would abort).
            if i == 0 || i == 2 || level == Level::Raw {
                add(&format!("dim {i} u32::MAX"), &|h| h.dims[i] = u32::MAX);
                add(&format!("dim {i} 2^30"), &|h| h.dims[i] = 1 << 30);
            }
        }
        add("tokens - 1", &|h| h.dims[2] -= 1);
        add("tokens 2^30, bins kept", &|h| h.dims[2] = 1 << 30);
        add("layers 2^20, bins kept", &|h| h.dims[0] = 1 << 20);
        add("layers 1", &|h| {
            h.dims[0] = 1;
            h.bins = vec![h.bins[0], h.bins[2]];
        });
        add("layers 3", &|h| {
            h.dims[0] = 3;
            h.bins = vec![h.bins[0]; 6];
        });
        add("bins 2", &|h| h.bins[0] = 2);
        add("bins 3", &|h| h.bins[1] = 3);
        add("bins 31", &|h| h.bins[2] = 31);
        add("bins 66", &|h| h.bins[3] = 66);
        add("bins 255", &|h| h.bins[0] = 255);
        add("bins 1", &|h| h.bins[0] = 1);
        add("bins table cut", &|h| {
            h.bins.pop();
        });
        add("bins table long", &|h| h.bins.push(h.bins[0]));
        if matches!(level, Level::Raw | Level::Lmcache) {
            add("channel scale flag", &|h| h.flags |= FLAG_CHANNEL_SCALE_K);
        }
        // (At lossy levels the dtype only says how to read the scales and what to write:
        // a file under another dtype's header is valid, see the next test.)
        if level != Level::Raw {
            add("as raw", &|h| {
                h.level = Level::Raw.code();
                h.bins = vec![0; 4];
            });
        } else {
            add("as q8", &|h| h.level = Level::Q8.code());
            add("dtype f32", &|h| h.dtype = DType::F32.code());
            add("bins nonzero", &|h| h.bins = vec![32; 4]);
        }
        if level == Level::Q8 {
            add("q8 bins 32", &|h| h.bins = vec![32; 4]);
        }
        if level.is_lossy() && level != Level::Q8 {
            add("bins 0", &|h| h.bins[0] = 0);
            add("as q8", &|h| {
                h.level = Level::Q8.code();
                h.bins = vec![0; 4];
            });
        }
        for (name, h) in &cases {
            let t = Instant::now();
            assert_rejected(&with(h), &format!("{level} header {name}"));
            assert!(t.elapsed() < Duration::from_secs(1), "{level} {name}: slow");
        }
        // The header alone, and the header with its CRC broken.
        assert_rejected(&file[..header_len(&file)], &format!("{level} header only"));
        let mut bad = file.clone();
        bad[header_len(&file) - 1] ^= 0x80;
        let e = decode_error(assert_rejected(&bad, "bad header crc"));
        assert!(
            matches!(e, DecodeError::Checksum { what: "header", .. }),
            "{e:?}"
        );
    }
}

/// Header fields re-forged so the file still parses (valid CRC): decoding may fail or (where
/// the payloads happen to fit the new header) succeed, but must not panic, and a success has
/// the header's spec.
#[test]
fn plausible_forged_headers_never_panic() {
    for level in Level::ALL {
        let file = small_file(level);
        let base = RawHeader::parse(&file);
        let body = &file[header_len(&file)..];
        for new_level in Level::ALL {
            for dtype in [DType::F16, DType::BF16, DType::F32] {
                for layout in [Layout::Hf, Layout::Vllm] {
                    let mut h = base.clone();
                    h.level = new_level.code();
                    h.dtype = dtype.code();
                    h.layout = layout.code();
                    h.bins = match new_level.bins(2) {
                        Some((k, v)) => [k, v].concat(),
                        None => vec![0; 4],
                    };
                    let buf = [h.to_bytes(), body.to_vec()].concat();
                    let what = format!("{level} file under a {new_level} {dtype} header");
                    if let Ok(kv) = try_decode(&buf, &what) {
                        assert_eq!(kv.spec().dtype, dtype, "{what}");
                        assert_eq!(kv.spec().layout, layout, "{what}");
                    }
                }
            }
        }
    }
}

/// Blocks with lengths or indices that do not fit, some with valid CRCs.
#[test]
fn forged_blocks_are_rejected() {
    for level in Level::ALL {
        let file = small_file(level);
        let h = header_len(&file);
        let head = &file[..h];
        let blocks: Vec<Vec<u8>> = block_ranges(&file)
            .into_iter()
            .map(|r| file[r].to_vec())
            .collect();
        assert_eq!(blocks.len(), 6);
        let join = |bs: &[Vec<u8>]| [head.to_vec(), bs.concat()].concat();
        assert!(decode(&join(&blocks)).is_ok());
        let check = |bs: Vec<Vec<u8>>, what: &str| {
            let t = Instant::now();
            let e = assert_rejected(&join(&bs), &format!("{level} {what}"));
            assert!(t.elapsed() < Duration::from_secs(1), "{level} {what}: slow");
            decode_error(e)
        };

        for i in [0, 2, 5] {
            let ((layer, t0, n), payload) = block_parts(&blocks[i]);
            let p = payload.len() as u32;
            let with = |j: usize, b: Vec<u8>, what: &str| {
                let mut bs = blocks.clone();
                bs[j] = b;
                check(bs, &format!("block {i}: {what}"))
            };
            // payload_len inflated, CRC valid for the fields and the bytes present.
            for len in [p + 1, p + 1000, u32::MAX, u32::MAX - 23] {
                let e = with(i, forge_block_with_len(layer, t0, n, len, payload), "long");
                if i == 5 {
                    assert!(matches!(e, DecodeError::Truncated { .. }), "{e:?}");
                }
            }
            // payload_len deflated.
            if p > 0 {
                with(
                    i,
                    forge_block_with_len(layer, t0, n, p - 1, payload),
                    "short",
                );
            }
            // Payload cut or extended, length and CRC consistent with it.
            for cut in [1usize, 2, 4] {
                if payload.len() >= cut {
                    let short = &payload[..payload.len() - cut];
                    with(i, forge_block(layer, t0, n, short), &format!("cut {cut}"));
                }
            }
            for extra in [&[0u8][..], &[0, 0, 0, 0], &[0xff; 9]] {
                let long = [payload, extra].concat();
                with(
                    i,
                    forge_block(layer, t0, n, &long),
                    &format!("+{} bytes", extra.len()),
                );
            }
            with(i, forge_block(layer, t0, n, &[]), "empty payload");
            // Indices that do not fit.
            for (l2, t2, n2) in [
                (2, t0, n),
                (u32::MAX, t0, n),
                (layer, t0 + 1, n),
                (layer, 15, n),
                (layer, u32::MAX - 4, n),
                (layer, t0, n + 1),
                (layer, t0, n.wrapping_sub(1)),
                (layer, t0, 0),
                (layer, t0, u32::MAX),
            ] {
                let e = with(i, forge_block(l2, t2, n2, payload), "bad index");
                assert!(matches!(e, DecodeError::BlockOutOfRange { .. }), "{e:?}");
            }
            // Another block's place: a duplicate of it and a missing block.
            let (l2, t2) = if i == 0 { (1, 0) } else { (0, 0) };
            if n == block_parts(&blocks[if i == 0 { 3 } else { 0 }]).0 .2 {
                let e = with(i, forge_block(l2, t2, n, payload), "moved onto another");
                assert!(matches!(e, DecodeError::BlockOutOfRange { .. }), "{e:?}");
            }
            // Bad block magic.
            let mut b = blocks[i].clone();
            b[0] = b'X';
            assert_eq!(with(i, b, "magic"), DecodeError::BadMagic);
            // A payload bit flipped without fixing the CRC.
            if p > 0 {
                let mut b = blocks[i].clone();
                b[BLOCK_HEADER_LEN] ^= 1;
                let e = with(i, b, "payload bit");
                assert!(
                    matches!(e, DecodeError::Checksum { what: "block", .. }),
                    "{e:?}"
                );
            }
        }

        // Duplicated, missing, and (accepted) reordered blocks.
        for i in 0..blocks.len() {
            let mut bs = blocks.clone();
            bs.insert(i, blocks[i].clone());
            let e = check(bs, &format!("block {i} twice"));
            assert!(matches!(e, DecodeError::BlockOutOfRange { .. }), "{e:?}");
            let mut bs = blocks.clone();
            bs.remove(i);
            let e = check(bs, &format!("block {i} missing"));
            // `min_encoded_len` is exact for raw and q8 (and tight elsewhere), so a missing
            // block may show as truncation before the block index sees it.
            assert!(
                matches!(
                    e,
                    DecodeError::MissingBlocks {
                        missing: 1,
                        expected: 6
                    } | DecodeError::Truncated { .. }
                ),
                "{level} block {i} missing: {e:?}"
            );
        }
        check(vec![], "no blocks");
        check(blocks[..1].to_vec(), "one block");
        // `decode` indexes blocks by their (layer, token_start) before decoding, so a file
        // whose blocks come in another order is valid (a receiver may write blocks as they
        // arrive) and decodes to the same cache.
        let want = decode(&file).unwrap();
        let mut bs = blocks.clone();
        bs.reverse();
        assert_eq!(decode(&join(&bs)).unwrap(), want, "{level} reversed");
        bs.swap(1, 4);
        assert_eq!(decode(&join(&bs)).unwrap(), want, "{level} shuffled");
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
