//! `Decoder::decode_block` on arbitrary block bytes for a fixed valid header.
//!
//! Input: byte 0 picks the level (`Level::ALL[b % 6]`), byte 1 the header variant (bit 0
//! layout, bits 1-2 dtype, bit 3 per-channel K scales where the level allows them; see
//! `kvwire_fuzz::block_header`) and, in bit 7, whether to recompute the block's CRC so that
//! the payload decoder is reached. The rest is the block.
#![no_main]

use kvwire_codec::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let header = kvwire_fuzz::block_header(data[0], data[1]);
    let mut block = data[2..].to_vec();
    if data[1] & 0x80 != 0 {
        kvwire_fuzz::reseal_block(&mut block);
    }
    let dec = Decoder::from_header(header);
    let mut out = vec![0u8; dec.layer_spec().byte_len()];
    if let Ok(info) = dec.decode_block(&block, &mut out) {
        let h = dec.header();
        assert!(info.layer < h.spec.shape.layers);
        assert!(info.chunk < h.chunks());
        assert_eq!(info.tokens, h.chunk_range(info.chunk));
        assert!(info.consumed <= block.len());
    }
    // A wrong-sized buffer is an error, not a panic.
    let mut small = vec![0u8; out.len() - 1];
    assert!(dec.decode_block(&block, &mut small).is_err());
});
