//! The committed real KV cache (SmolLM2-135M, 256 tokens): every level within bound in both
//! layouts and every dtype, the output's layout and dtype, and the compression ratio.

use kvwire_codec::{decode, encode, file, DType, EncodeOptions, KvCache, Layout, Level};
use kvwire_tests::{
    check_within_bound, convert, fixture, fixture_encoded, fixture_head, fixture_path,
};

/// Every level on `kv` with `chunk_tokens` (and the per-channel K scale at the levels that
/// have it, if asked): decoded spec equal to the input's, values within bound.
fn every_level(kv: &KvCache, chunk_tokens: usize, channel_scale_k: bool) {
    for level in Level::ALL {
        if channel_scale_k && matches!(level, Level::Raw | Level::Lmcache) {
            continue;
        }
        let opts = EncodeOptions {
            level,
            chunk_tokens,
            channel_scale_k,
        };
        let bytes = encode(&kv.view(), &opts).unwrap();
        check_file(kv, &bytes, &opts);
    }
}

/// `file` decodes to `kv`'s spec, within bound of `kv`.
fn check_file(kv: &KvCache, file: &[u8], opts: &EncodeOptions) {
    let back = decode(file).unwrap();
    assert_eq!(
        back.spec(),
        kv.spec(),
        "{}: layout or dtype changed",
        opts.level
    );
    let rep = check_within_bound(&kv.view(), &back, opts)
        .unwrap_or_else(|e| panic!("{}, chunk {}: {e}", opts.level, opts.chunk_tokens));
    assert_eq!(rep.elements, kv.spec().shape.elements());
}

#[test]
fn fixture_is_what_we_think() {
    let kv = fixture();
    let s = kv.spec();
    assert_eq!((s.layout, s.dtype), (Layout::Hf, DType::F16));
    assert_eq!(s.shape.tokens, 256);
    let meta = file::load(fixture_path()).unwrap().metadata;
    assert!(meta.contains_key("model"), "{meta:?}");
}

#[test]
fn fixture_hf_f16_every_level_within_bound() {
    let kv = fixture();
    for level in Level::ALL {
        check_file(kv, fixture_encoded(level), &EncodeOptions::level(level));
    }
    // Sizes fall level by level (lmcache is the odd one: it ships CDFs with every block).
    let size = |l: Level| fixture_encoded(l).len();
    assert!(size(Level::Raw) > size(Level::Q8));
    assert!(size(Level::Q8) > size(Level::CgHigh));
    assert!(size(Level::CgHigh) > size(Level::CgDefault));
    assert!(size(Level::CgDefault) > size(Level::CgLow));
    assert!(size(Level::Q8) > size(Level::Lmcache));
    // Raw is the tensor plus a little framing.
    assert!(size(Level::Raw) >= kv.bytes().len());
    assert!(size(Level::Raw) < kv.bytes().len() + 4096);
}

/// cg-default at most 1/2.5 of q8 on the fixture. Measured (256-token fixture, one chunk
/// per layer): q8 2,980,656 bytes, cg-default 883,764, a ratio of 3.37; the 4096-token target
/// of 3x is a benchmark's business. 2.5 leaves room for coder changes but catches a real
/// regression (losing the entropy coder's gain over q8's 8 bits per element).
#[test]
fn fixture_cg_default_is_at_most_q8_over_2_5() {
    let q8 = fixture_encoded(Level::Q8).len();
    let cg = fixture_encoded(Level::CgDefault).len();
    let ratio = q8 as f64 / cg as f64;
    println!("fixture: q8 {q8} bytes, cg-default {cg} bytes, ratio {ratio:.3}");
    assert!(
        cg as f64 * 2.5 <= q8 as f64,
        "cg-default {cg} bytes vs q8 {q8}: ratio {ratio:.3} < 2.5"
    );
}

#[test]
fn fixture_vllm_every_level_within_bound() {
    let kv = fixture().view().to_layout(Layout::Vllm);
    assert_eq!(kv.spec().layout, Layout::Vllm);
    every_level(&kv, 100, false);
}

// The dtype and per-channel-scale variants run on the first 12 layers (40% of the cost, and
// still every kind of layer of the bin tables: cg-default's K switches from 32 to 16 bins
// at layer 10, V at layer 2; cg-low's K from 16 to 12 at layer 8).

#[test]
fn fixture_bf16_every_level_within_bound() {
    let kv = convert(&fixture_head(12), DType::BF16);
    every_level(&kv, 256, false);
}

#[test]
fn fixture_f32_vllm_every_level_within_bound() {
    let kv = convert(&fixture_head(12), DType::F32)
        .view()
        .to_layout(Layout::Vllm);
    assert_eq!(
        (kv.spec().dtype, kv.spec().layout),
        (DType::F32, Layout::Vllm)
    );
    every_level(&kv, 96, false);
}

#[test]
fn fixture_channel_scaled_k_within_bound() {
    every_level(&fixture_head(12), 256, true);
}

/// A KV file written back from a decoded cache reads as the same cache (layout in metadata).
#[test]
fn fixture_file_round_trip_keeps_layout_and_dtype() {
    for (layout, dtype) in [
        (Layout::Hf, DType::F16),
        (Layout::Vllm, DType::BF16),
        (Layout::Vllm, DType::F32),
    ] {
        let kv = convert(&fixture_head(12), dtype).view().to_layout(layout);
        let back = decode(&encode(&kv.view(), &EncodeOptions::level(Level::Raw)).unwrap()).unwrap();
        let bytes = file::write_safetensors(&back, &Default::default()).unwrap();
        let read = file::read_safetensors(&bytes).unwrap();
        assert_eq!(read.cache, kv);
        assert_eq!(
            read.metadata.get("layout").map(String::as_str),
            Some(layout.name())
        );
    }
}
