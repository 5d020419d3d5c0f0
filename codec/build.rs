//! Computes the model family's frequencies for the built-in levels' widths
//! (`model::EMBEDDED_WIDTHS`) and writes them to `$OUT_DIR/model_frequencies.bin`, which the
//! crate embeds: a process then builds those tables without integrating any density.

use std::path::PathBuf;

// The family's arithmetic, the same file the crate compiles (it uses std only).
#[allow(dead_code, unreachable_pub)]
#[path = "src/model/family.rs"]
mod family;

fn main() {
    println!("cargo::rerun-if-changed=src/model/family.rs");
    println!("cargo::rerun-if-changed=build.rs");
    let mut bytes = Vec::new();
    for w in family::EMBEDDED_WIDTHS {
        for f in family::frequencies(w) {
            let f = u16::try_from(f).expect("a frequency fits 16 bits (PROB_BITS <= 15)");
            bytes.extend_from_slice(&f.to_le_bytes());
        }
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("model_frequencies.bin"), bytes).expect("writing the tables");
}
