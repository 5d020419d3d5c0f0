//! The streaming API: layer-by-layer encoding from one-layer views, block-by-block decoding
//! in any order, and output independent of the thread count.

use kvwire_codec::{
    decode, encode, CodecError, Decoder, EncodeOptions, Encoder, KvCache, Layout, Level,
};
use kvwire_tests::{
    block_ranges, convert, fixture, fixture_encoded, fixture_head, gen_cache, layer_cache, spec,
    Rng, Values,
};

fn opts(level: Level, chunk_tokens: usize) -> EncodeOptions {
    EncodeOptions {
        level,
        chunk_tokens,
        channel_scale_k: false,
    }
}

/// Header then `encode_layer_block` for every (layer, chunk), each from a one-layer cache as
/// a prefill engine would hand it over, is byte for byte the whole-cache `encode`; so is
/// `encode_layer`.
#[test]
fn layer_by_layer_encoding_equals_whole_file() {
    let kv = fixture_head(4);
    for level in Level::ALL {
        let o = EncodeOptions {
            channel_scale_k: matches!(level, Level::CgDefault | Level::Q8),
            ..opts(level, 100)
        };
        let whole = encode(&kv.view(), &o).unwrap();
        let enc = Encoder::new(*kv.spec(), &o).unwrap();
        let mut streamed = Vec::new();
        let mut by_layer = Vec::new();
        enc.write_header(&mut streamed);
        enc.write_header(&mut by_layer);
        assert_eq!(streamed.len(), enc.header().encoded_len());
        for l in 0..kv.spec().shape.layers {
            let one = layer_cache(&kv, l);
            for chunk in 0..enc.header().chunks() {
                enc.encode_layer_block(&one.view(), l, chunk, &mut streamed)
                    .unwrap();
            }
            enc.encode_layer(&one.view(), l, &mut by_layer).unwrap();
        }
        assert!(streamed == whole, "{level}: streamed blocks differ");
        assert!(by_layer == whole, "{level}: encode_layer differs");
        // Blocks of the whole-cache view, one at a time, are the same bytes too.
        let mut blocks = Vec::new();
        enc.write_header(&mut blocks);
        for l in 0..kv.spec().shape.layers {
            for chunk in 0..enc.header().chunks() {
                enc.encode_block(&kv.view(), l, chunk, &mut blocks).unwrap();
            }
        }
        assert!(blocks == whole, "{level}: encode_block differs");
    }
}

/// Blocks decoded one by one, in a random order, into a cache or into per-layer buffers,
/// give exactly what the whole-file decode gives; each `BlockInfo` says where it went.
#[test]
fn blocks_decode_out_of_order_like_the_whole_file() {
    let kv = fixture_head(3).view().to_layout(Layout::Vllm);
    let mut rng = Rng::new(42);
    for level in Level::ALL {
        let file = encode(&kv.view(), &opts(level, 60)).unwrap();
        let whole = decode(&file).unwrap();
        let (dec, hlen) = Decoder::new(&file).unwrap();
        assert_eq!(hlen, kvwire_tests::header_len(&file));
        assert_eq!(dec.header().spec, *kv.spec());
        let mut blocks = block_ranges(&file);
        assert_eq!(blocks.len(), 3 * 256usize.div_ceil(60));
        rng.shuffle(&mut blocks);

        let mut cache = KvCache::zeroed(*kv.spec());
        let layer_len = dec.layer_spec().byte_len();
        let mut layers = vec![vec![0u8; layer_len]; 3];
        let mut seen = std::collections::HashSet::new();
        for r in &blocks {
            let info = dec.decode_block_into(&file[r.clone()], &mut cache).unwrap();
            assert_eq!(info.consumed, r.len());
            assert_eq!(info.tokens, dec.header().chunk_range(info.chunk));
            assert!(seen.insert((info.layer, info.chunk)), "{info:?} twice");
            // A block followed by more bytes (the rest of the stream) decodes the same.
            let info2 = dec
                .decode_block(&file[r.start..], &mut layers[info.layer])
                .unwrap();
            assert_eq!(info, info2);
        }
        assert_eq!(cache, whole, "{level}");
        assert_eq!(layers.concat(), whole.bytes(), "{level}");

        // A decoder made from the header alone (sent out of band) decodes the same blocks.
        let dec2 = Decoder::from_header(dec.header().clone());
        let mut cache2 = KvCache::zeroed(*kv.spec());
        for r in blocks.iter().rev() {
            dec2.decode_block_into(&file[r.clone()], &mut cache2)
                .unwrap();
        }
        assert_eq!(cache2, whole, "{level}");
    }
}

/// Misuse of the streaming API is an error, not a panic.
#[test]
fn streaming_misuse_is_an_error() {
    let s = spec(2, 2, 10, 8, Layout::Hf, kvwire_codec::DType::F16);
    let kv = gen_cache(s, Values::Normal, 1);
    let enc = Encoder::new(s, &opts(Level::CgDefault, 4)).unwrap();
    let mut out = Vec::new();
    // A whole-cache view where a one-layer view is expected, and the reverse.
    assert!(matches!(
        enc.encode_layer_block(&kv.view(), 0, 0, &mut out),
        Err(CodecError::InvalidKv(_))
    ));
    let one = layer_cache(&kv, 1);
    assert!(matches!(
        enc.encode_block(&one.view(), 0, 0, &mut out),
        Err(CodecError::InvalidKv(_))
    ));
    // Out-of-range layer or chunk (3 chunks of 4 tokens).
    assert!(matches!(
        enc.encode_layer_block(&one.view(), 2, 0, &mut out),
        Err(CodecError::InvalidKv(_))
    ));
    assert!(matches!(
        enc.encode_block(&kv.view(), 0, 3, &mut out),
        Err(CodecError::InvalidKv(_))
    ));
    // A view of another dtype or layout.
    let other = convert(&kv, kvwire_codec::DType::F32);
    assert!(enc.encode_block(&other.view(), 0, 0, &mut out).is_err());
    let other = kv.view().to_layout(Layout::Vllm);
    assert!(enc.encode_block(&other.view(), 0, 0, &mut out).is_err());
    assert!(out.is_empty(), "failed calls appended {} bytes", out.len());

    let file = encode(&kv.view(), &opts(Level::CgDefault, 4)).unwrap();
    let (dec, _) = Decoder::new(&file).unwrap();
    let first = block_ranges(&file)[0].clone();
    let block = &file[first];
    let need = dec.layer_spec().byte_len();
    for len in [0, need - 1, need + 1] {
        let mut buf = vec![0u8; len];
        assert!(matches!(
            dec.decode_block(block, &mut buf),
            Err(CodecError::BufferTooSmall { .. })
        ));
    }
    let mut wrong = KvCache::zeroed(spec(2, 2, 11, 8, Layout::Hf, kvwire_codec::DType::F16));
    assert!(matches!(
        dec.decode_block_into(block, &mut wrong),
        Err(CodecError::InvalidKv(_))
    ));
    // The file header is not a block.
    let mut buf = vec![0u8; need];
    assert!(dec.decode_block(&file, &mut buf).is_err());
}

/// Output does not depend on the number of threads: 1, 2 and 4 worker pools give the same
/// bytes (the same as the global pool's), and decode the same cache.
#[test]
fn output_is_independent_of_thread_count() {
    let kv = fixture();
    let pools: Vec<rayon::ThreadPool> = [1, 2, 4]
        .into_iter()
        .map(|n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        })
        .collect();
    // cg-high and cg-low run the same code as cg-default with other bin tables (cg-low is
    // below with other options).
    for level in [Level::Raw, Level::Q8, Level::CgDefault, Level::Lmcache] {
        let o = EncodeOptions::level(level);
        for pool in &pools {
            let bytes = pool.install(|| encode(&kv.view(), &o).unwrap());
            assert!(
                bytes == fixture_encoded(level),
                "{level}: {} threads give other bytes",
                pool.current_num_threads()
            );
        }
    }
    // Small blocks and the per-channel K scale: many more blocks to schedule.
    let o = EncodeOptions {
        level: Level::CgLow,
        chunk_tokens: 48,
        channel_scale_k: true,
    };
    let files: Vec<Vec<u8>> = pools
        .iter()
        .map(|p| p.install(|| encode(&kv.view(), &o).unwrap()))
        .collect();
    assert!(
        files[0] == files[1] && files[0] == files[2],
        "cg-low chunk 48: bytes differ"
    );
    // Decoding too.
    for file in [&files[0][..], fixture_encoded(Level::Lmcache)] {
        let x = pools[0].install(|| decode(file).unwrap());
        let y = pools[2].install(|| decode(file).unwrap());
        assert!(x == y, "decode differs between 1 and 4 threads");
    }
}

#[test]
fn chunk_decoding_then_placing_equals_decoding_into_the_layer() {
    use kvwire_codec::{Decoder, Encoder, Layout};
    for layout in [Layout::Hf, Layout::Vllm] {
        let kv = fixture_head(2).view().to_layout(layout);
        for level in Level::ALL {
            let mut o = EncodeOptions::level(level);
            o.chunk_tokens = 96; // 256 tokens: chunks of 96, 96 and 64
            let enc = Encoder::new(*kv.spec(), &o).unwrap();
            let mut header = Vec::new();
            enc.write_header(&mut header);
            let (dec, _) = Decoder::new(&header).unwrap();
            let lspec = dec.layer_spec();
            for layer in 0..2 {
                let mut whole = vec![0u8; lspec.byte_len()];
                let mut placed = vec![0u8; lspec.byte_len()];
                for chunk in 0..3 {
                    let mut block = Vec::new();
                    enc.encode_block(&kv.view(), layer, chunk, &mut block)
                        .unwrap();
                    dec.decode_block(&block, &mut whole).unwrap();
                    let mut cbuf = vec![0u8; dec.chunk_spec(chunk).byte_len()];
                    let info = dec.decode_block_chunk(&block, &mut cbuf).unwrap();
                    assert_eq!((info.layer, info.chunk), (layer, chunk));
                    dec.place_chunk(&info, &cbuf, &mut placed).unwrap();
                }
                assert!(whole == placed, "{layout:?} {level:?} layer {layer}");
            }
        }
    }
}
