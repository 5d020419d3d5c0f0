//! Forged input: headers and blocks whose fields do not fit (with valid CRC32Cs, so the checks
//! behind the checksums run), and tiny files that claim huge caches.

use std::time::{Duration, Instant};

use kvwire_codec::container::{BLOCK_HEADER_LEN, FLAG_CHANNEL_SCALE_K};
use kvwire_codec::{decode, DType, DecodeError, Layout, Level};
use kvwire_tests::{
    block_parts, block_ranges, forge_block, forge_block_with_len, header_len, RawHeader,
};

use super::{assert_rejected, decode_error, small_file, try_decode};

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
            "hostile::forged::huge_channels_child",
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
        add("version 1 (the 4-lane format)", &|h| h.version = 1);
        add("version 3", &|h| h.version = 3);
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
