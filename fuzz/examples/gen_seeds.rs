//! Writes seed inputs for every fuzz target: valid encoded files (`decode_file`), valid
//! blocks of the fixed headers (`block_decode`) and case descriptions (`decode_mutated`).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds -- <dir> [--small]`
//! writes `<dir>/<target>/<name>`; `--small` keeps only the smallest seeds (for the
//! committed `fuzz/seeds/`).

use kvwire_codec::{encode, Decoder, EncodeOptions, Encoder, KvCache, KvShape, KvSpec, Level};
use kvwire_fuzz::{block_header, DTYPES, LAYOUTS};
use std::path::Path;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn values(i: usize) -> f32 {
    // Deterministic, varied, finite: a smooth part plus outliers.
    let x = ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0;
    if i.is_multiple_of(97) {
        x * 40.0
    } else {
        x
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).expect("usage: gen_seeds <dir> [--small]"));
    let small = args.iter().any(|a| a == "--small");

    // decode_file: whole encoded files.
    let shapes: &[(KvShape, usize)] = if small {
        &[(KvShape::new(1, 1, 5, 4), 2), (KvShape::new(2, 2, 9, 3), 4)]
    } else {
        &[
            (KvShape::new(1, 1, 5, 4), 2),
            (KvShape::new(2, 2, 9, 3), 4),
            (KvShape::new(3, 2, 40, 8), 16),
            (KvShape::new(2, 3, 64, 16), 64),
        ]
    };
    for (si, &(shape, chunk)) in shapes.iter().enumerate() {
        for level in Level::ALL {
            for (vi, (dtype, layout, csk)) in [
                (DTYPES[0], LAYOUTS[0], false),
                (DTYPES[1], LAYOUTS[1], true),
                (DTYPES[2], LAYOUTS[0], false),
            ]
            .into_iter()
            .enumerate()
            {
                if small && si > 0 && (vi > 0 || level == Level::Lmcache) {
                    continue;
                }
                let spec = KvSpec { shape, layout, dtype };
                let kv = KvCache::from_fn(spec, values);
                let opts = EncodeOptions {
                    level,
                    chunk_tokens: chunk,
                    channel_scale_k: csk && !matches!(level, Level::Raw | Level::Lmcache),
                };
                let bytes = encode(&kv.view(), &opts).unwrap();
                write(dir, "decode_file", &format!("{}-s{si}-v{vi}", level.name()), &bytes);
            }
        }
    }

    // block_decode: [level, variant] + one valid block of the fixed header.
    for (li, level) in Level::ALL.into_iter().enumerate() {
        for variant in [0u8, 0x03, 0x0c, 0x85] {
            let h = block_header(li as u8, variant);
            let kv = KvCache::from_fn(h.spec, values);
            let opts = EncodeOptions {
                level,
                chunk_tokens: h.chunk_tokens as usize,
                channel_scale_k: h.channel_scale_k(),
            };
            let enc = Encoder::new(h.spec, &opts).unwrap();
            for (layer, chunk) in [(0, 0), (1, 2)] {
                if small && ((layer, chunk) == (0, 0) || matches!(variant, 0x03 | 0x0c)) {
                    continue;
                }
                let mut input = vec![li as u8, variant];
                enc.encode_block(&kv.view(), layer, chunk, &mut input).unwrap();
                // Sanity: the seed decodes.
                let dec = Decoder::from_header(h.clone());
                let mut out = vec![0u8; dec.layer_spec().byte_len()];
                dec.decode_block(&input[2..], &mut out).unwrap();
                write(
                    dir,
                    "block_decode",
                    &format!("{}-v{variant:02x}-l{layer}c{chunk}", level.name()),
                    &input,
                );
            }
        }
    }

    // decode_mutated: case bytes (see kvwire_fuzz::Case::read), then values.
    for (li, level) in Level::ALL.into_iter().enumerate() {
        for (k, (params, muts)) in [
            // layers, heads, tokens-1, head_dim-1, dtype/layout, chunk-1, flags
            ([0u8, 1, 8, 3, 0, 3, 0], vec![]),
            ([1, 2, 39, 7, 3, 15, 0x03], vec![]),
            ([2, 0, 63, 15, 4, 71, 0x04], vec![]),
            // One bit flip in the payload; resealed.
            ([1, 1, 20, 5, 2, 7, 0x80], vec![[0u8, 200, 0, 3, 0, 0, 0]]),
            // A truncation; not resealed.
            ([0, 0, 9, 2, 1, 4, 0x00], vec![[4u8, 90, 0, 0, 0, 0, 0]]),
        ]
        .into_iter()
        .enumerate()
        {
            if small && k >= 3 && li % 2 == 1 {
                continue;
            }
            let mut input = vec![li as u8];
            input.extend_from_slice(&params);
            input.push(muts.len() as u8);
            for m in &muts {
                input.extend_from_slice(m);
            }
            input.extend((0..64u32).map(|i| (i * 37 % 251) as u8));
            write(dir, "decode_mutated", &format!("{}-{k}", level.name()), &input);
        }
    }
}
