//! Arbitrary bytes into `kvwire_codec::decode`: must return Ok or Err, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Bound memory: a parsed header may claim up to 2^40 elements, and for lossy levels a
    // file of ~100 bytes passes `min_encoded_len` (see README.md), after which `decode`
    // allocates the whole output. Skip those inputs (the allocation is not a panic).
    if kvwire_fuzz::too_big(data) {
        return;
    }
    if let Ok(kv) = kvwire_codec::decode(data) {
        // A successful decode yields exactly the header's cache.
        let (h, _) = kvwire_codec::Header::read(data).expect("decode accepted the header");
        assert_eq!(*kv.spec(), h.spec);
        assert_eq!(kv.bytes().len(), h.spec.byte_len());
    }
});
