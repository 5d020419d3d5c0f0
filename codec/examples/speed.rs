//! One-core encode and decode rates of one level on a KV file, for quick iteration on the
//! coder (the criterion bench `benches/codec.rs` is the reference measurement).
//!
//! `cargo run --release -p kvwire-codec --example speed -- FILE.safetensors [LEVEL] [REPS]`
//! prints the best of `REPS` (default 5) runs of the whole-cache encode and of the streaming
//! decode of every block into a preallocated cache buffer, in GB/s of fp16 input.

use std::time::Instant;

use kvwire_codec::file::view_safetensors;
use kvwire_codec::{Decoder, EncodeOptions, Encoder, Level};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: speed FILE [LEVEL] [REPS]")?;
    let level: Level = args.get(1).map_or("cg-default", String::as_str).parse()?;
    let reps: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let data = std::fs::read(path)?;
    let (view, _) = view_safetensors(&data)?;
    let fp16 = (view.spec().shape.elements() * 2) as f64;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let enc = Encoder::new(*view.spec(), &EncodeOptions::level(level))?;
    let (mut bytes, mut best_enc) = (Vec::new(), f64::INFINITY);
    for _ in 0..reps {
        let t = Instant::now();
        bytes = pool.install(|| enc.encode(&view))?;
        best_enc = best_enc.min(t.elapsed().as_secs_f64());
    }
    let (dec, header_len) = Decoder::new(&bytes)?;
    let mut blocks = Vec::new();
    let mut pos = header_len;
    while pos < bytes.len() {
        let (bh, _) = dec.block_header(&bytes[pos..])?;
        blocks.push((bh.layer as usize, pos));
        pos += bh.block_len();
    }
    // Into a whole cache-sized buffer, as a receiver does (and the criterion bench).
    let layer_bytes = dec.layer_spec().byte_len();
    let mut cache = vec![0u8; layer_bytes * view.spec().shape.layers];
    let mut best_dec = f64::INFINITY;
    let mut dec_times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        pool.install(|| -> Result<(), kvwire_codec::CodecError> {
            for &(layer, at) in &blocks {
                let out = &mut cache[layer * layer_bytes..(layer + 1) * layer_bytes];
                dec.decode_block(&bytes[at..], out)?;
            }
            Ok(())
        })?;
        best_dec = best_dec.min(t.elapsed().as_secs_f64());
        dec_times.push(t.elapsed().as_secs_f64());
    }
    dec_times.sort_by(f64::total_cmp);
    println!(
        "{level}: {:.2}x vs fp16, encode {:.3} GB/s, decode {:.3} GB/s (1 core, best of {reps}; \
         decode median {:.3} GB/s)",
        fp16 / bytes.len() as f64,
        fp16 / best_enc / 1e9,
        fp16 / best_dec / 1e9,
        fp16 / dec_times[dec_times.len() / 2] / 1e9
    );
    Ok(())
}
