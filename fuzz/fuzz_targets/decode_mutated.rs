//! Encode a small cache chosen by the input, check the round trip, then decode mutated copies
//! of the bitstream: must never panic.
//!
//! Input layout (`kvwire_fuzz::Case::read`): level, layers 1..=3, heads 1..=3, tokens 1..=64,
//! head_dim 1..=16, dtype/layout, chunk_tokens 1..=72, flags (bit 0 per-channel K scales,
//! bits 1-2 value mode, bit 7 recompute checksums after mutating), mutation count 0..=7,
//! 7 bytes per mutation, then the values (cycled).
#![no_main]

use kvwire_codec::{decode, encode, CodecError, Decoder, KvCache, Level};
use kvwire_fuzz::{check_lossy, mutate, reseal, too_big, Bytes, Case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let case = Case::read(&mut b);
    let kv = case.cache(b.remaining());
    let enc = match encode(&kv.view(), &case.opts) {
        Ok(e) => e,
        // Lossy levels refuse NaN and infinities; nothing else may fail.
        Err(CodecError::NonFinite { .. }) if case.opts.level != Level::Raw => return,
        Err(e) => panic!("encode failed: {e} for {case:?}"),
    };

    // Unmutated: the round trip succeeds (raw: byte-identical).
    let dec = decode(&enc).unwrap_or_else(|e| panic!("round trip failed: {e} for {case:?}"));
    assert_eq!(dec.spec(), kv.spec());
    let (decoder, hlen) = Decoder::new(&enc).expect("header");
    if case.opts.level == Level::Raw {
        assert!(dec == kv, "raw round trip is not byte-identical for {case:?}");
    } else if let Some(msg) = check_lossy(&kv, &dec, decoder.header()) {
        panic!("lossy error bound violated: {msg} for {case:?}");
    }
    // Block by block through the streaming decoder: the same cache.
    let mut streamed = KvCache::zeroed(*kv.spec());
    let mut pos = hlen;
    while pos < enc.len() {
        let info = decoder
            .decode_block_into(&enc[pos..], &mut streamed)
            .unwrap_or_else(|e| panic!("streaming decode failed: {e} for {case:?}"));
        pos += info.consumed;
    }
    assert!(streamed == dec, "streaming decode differs from decode for {case:?}");

    // Mutated: any result but a panic.
    if case.mutations.is_empty() {
        return;
    }
    let mut bad = enc.clone();
    for &m in &case.mutations {
        mutate(&mut bad, m);
    }
    if case.reseal {
        reseal(&mut bad);
    }
    if too_big(&bad) {
        return;
    }
    let _ = decode(&bad);
});
