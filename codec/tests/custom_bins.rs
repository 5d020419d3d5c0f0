//! Encoder::with_bins: a caller's bin table travels in the header and decodes anywhere.

use kvwire_codec::{
    decode, DType, EncodeOptions, Encoder, KvCache, KvShape, KvSpec, Layout, Level,
};

fn cache() -> KvCache {
    let spec = KvSpec {
        shape: KvShape::new(3, 2, 40, 16),
        layout: Layout::Hf,
        dtype: DType::F32,
    };
    KvCache::from_fn(spec, |i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
}

fn max_err_per_layer(a: &KvCache, b: &KvCache) -> Vec<f32> {
    let spec = *a.spec();
    (0..spec.shape.layers)
        .map(|l| {
            let r = spec.layer_range(l);
            let (x, y) = (
                &a.bytes()[r.start * 4..r.end * 4],
                &b.bytes()[r.start * 4..r.end * 4],
            );
            x.chunks_exact(4)
                .zip(y.chunks_exact(4))
                .map(|(p, q)| {
                    let p = f32::from_le_bytes(p.try_into().unwrap());
                    let q = f32::from_le_bytes(q.try_into().unwrap());
                    (p - q).abs()
                })
                .fold(0.0, f32::max)
        })
        .collect()
}

#[test]
fn a_custom_table_is_written_and_honoured() {
    let kv = cache();
    let opts = EncodeOptions::level(Level::CgDefault);
    let enc = Encoder::with_bins(*kv.spec(), &opts, &[4, 64, 16], &[64, 4, 16]).unwrap();
    assert_eq!(enc.header().bins_k, vec![4, 64, 16]);
    let out = decode(&enc.encode(&kv.view()).unwrap()).unwrap();
    let err = max_err_per_layer(&kv, &out);
    // Layer 0 has 4 bins for K (coarse), layer 1 64 (fine) for K but 4 for V: both coarse
    // somewhere; layer 2 is the level's usual 16. 4 bins: |err| <= m/2; 64 bins: m/62.
    let m = 506.0 / 97.0;
    assert!(err.iter().all(|&e| e <= m / 2.0 + 1e-3), "{err:?}");
    assert!(err[2] <= m / 14.0 + 1e-3, "{err:?}");
    assert!(err[0] > err[2], "4 bins must be coarser than 16: {err:?}");
}

#[test]
fn bad_tables_are_refused() {
    let spec = *cache().spec();
    let cg = EncodeOptions::level(Level::CgDefault);
    for (k, v) in [
        (&[16u8, 16][..], &[16u8, 16, 16][..]),
        (&[16, 16, 15], &[16, 16, 16]),
        (&[16, 16, 66], &[16, 16, 16]),
        (&[2, 16, 16], &[16, 16, 16]),
    ] {
        assert!(Encoder::with_bins(spec, &cg, k, v).is_err(), "{k:?} {v:?}");
    }
    let t = [16u8; 3];
    assert!(Encoder::with_bins(spec, &EncodeOptions::level(Level::Q8), &t, &t).is_err());
    assert!(Encoder::with_bins(spec, &EncodeOptions::level(Level::Raw), &t, &t).is_err());
    let lm = EncodeOptions::level(Level::Lmcache);
    assert!(Encoder::with_bins(spec, &lm, &[64; 3], &t).is_err());
    assert!(Encoder::with_bins(spec, &lm, &[62; 3], &t).is_ok());
}
