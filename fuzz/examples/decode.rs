//! Prints what `kvwire_codec::decode` makes of each file given (for triaging fuzz inputs).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example decode -- <file>...`

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).expect("readable file");
        let header = kvwire_codec::Header::read(&data).map(|(h, _)| {
            format!(
                "{:?} {} chunk_tokens {}: output {} bytes, min_encoded_len {}",
                h.spec,
                h.level,
                h.chunk_tokens,
                h.spec.byte_len(),
                h.min_encoded_len()
            )
        });
        println!("{path} ({} bytes)\n  header: {header:?}", data.len());
        if kvwire_fuzz::too_big(&data) {
            println!("  decode: skipped (output above the fuzz targets' 64 MiB bound)");
            continue;
        }
        match kvwire_codec::decode(&data) {
            Ok(kv) => println!("  decode: ok, {:?}", kv.spec()),
            Err(e) => println!("  decode: error: {e:?}"),
        }
    }
}
