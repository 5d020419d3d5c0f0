//! Golden bitstreams: a small deterministic cache encoded at every level must reproduce the
//! committed files byte for byte, and the committed files must decode to the same cache. A
//! failure means the format (or the encoder's choices) changed, so files written before no
//! longer match. Regenerate deliberately with
//! `KVWIRE_BLESS=1 cargo test -p kvwire-codec --test golden`, say so in the commit, and bump
//! `FORMAT_VERSION` if old files stop decoding.

use kvwire_codec::{decode, encode, DType, EncodeOptions, KvCache, KvShape, KvSpec, Layout, Level};

/// 2 layers x 2 heads x 40 tokens x 8 dims, f16, HF layout; values with per-channel offsets,
/// a slow drift along tokens and one outlier channel, from a fixed integer hash.
fn golden_cache() -> KvCache {
    let spec = KvSpec {
        shape: KvShape::new(2, 2, 40, 8),
        layout: Layout::Hf,
        dtype: DType::F16,
    };
    KvCache::from_fn(spec, |i| {
        let h = (i as u32).wrapping_mul(2_654_435_761).rotate_left(13) % 1000;
        let noise = h as f32 / 1000.0 - 0.5;
        let channel = (i % 8) as f32;
        let token = ((i / 8) % 40) as f32;
        let outlier = if i % 16 == 3 { 6.0 } else { 0.0 };
        noise + 0.2 * channel - 0.7 + 0.01 * token + outlier
    })
}

#[test]
fn every_level_matches_its_golden_file() {
    let kv = golden_cache();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let bless = std::env::var_os("KVWIRE_BLESS").is_some();
    let crc_path = dir.join("decoded-crc32c.txt");
    let mut crcs = String::new();
    for level in Level::ALL {
        let opts = EncodeOptions {
            level,
            chunk_tokens: 16,
            channel_scale_k: false,
        };
        let bytes = encode(&kv.view(), &opts).unwrap();
        let path = dir.join(format!("{}.kvw", level.name()));
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            golden == bytes,
            "{level}: encoder output differs from {}",
            path.display()
        );
        let back = decode(&golden).unwrap();
        assert_eq!(back.spec(), kv.spec(), "{level}");
        if level == Level::Raw {
            assert_eq!(back, kv);
        }
        // The decoded values are pinned too (the dequantizer is part of the format).
        crcs.push_str(&format!(
            "{} {:08x}\n",
            level.name(),
            crc32c::crc32c(back.bytes())
        ));
    }
    if bless {
        std::fs::write(&crc_path, &crcs).unwrap();
    }
    let want = std::fs::read_to_string(&crc_path).unwrap();
    assert_eq!(
        want,
        crcs,
        "decoded values differ from {}",
        crc_path.display()
    );
}
