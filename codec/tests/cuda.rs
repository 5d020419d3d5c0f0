//! The GPU codec against the CPU codec (feature `cuda`). Every test prints `SKIPPED` and
//! returns where no CUDA driver (or no device) is found, so the suite passes on CI machines.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use cudarc::driver::DevicePtr;

use kvwire_codec::cuda::{
    available, DecodeKernel, DeviceKv, GpuCodec, GpuDecoder, GpuEncoder, GpuStreamDecoder,
};
use kvwire_codec::{
    decode, encode, file, quant, DType, EncodeOptions, KvCache, KvShape, KvSpec, Layout, Level,
    Part,
};

/// The shared codec, or `None` (with a message) where there is no GPU.
fn gpu(test: &str) -> Option<&'static GpuCodec> {
    static CODEC: OnceLock<Option<GpuCodec>> = OnceLock::new();
    let c = CODEC.get_or_init(|| {
        if !available() {
            return None;
        }
        match GpuCodec::new(0) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("no usable GPU: {e}");
                None
            }
        }
    });
    if c.is_none() {
        eprintln!("SKIPPED {test}: no CUDA driver or device found");
    }
    c.as_ref()
}

/// A file of codec/testdata: from the repository root (where tools/gpu/device-run.sh runs the
/// carried test binary), else from the crate directory this binary was built in.
fn testdata(name: &str) -> std::path::PathBuf {
    let here = std::path::Path::new("codec/testdata").join(name);
    if here.exists() {
        return here;
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

const NATIVE: [Level; 3] = [Level::CgHigh, Level::CgDefault, Level::CgLow];

/// A deterministic cache with drifting channels, outliers and an all-zero row.
fn cache(spec: KvSpec, seed: u64) -> KvCache {
    let mut s = seed;
    let c = spec.shape.channels();
    KvCache::from_fn(spec, |i| {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let noise = ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
        let ch = (i % c) as f32;
        let v = (ch * 0.37).sin() * 2.0 + noise * (1.0 + (ch % 7.0));
        if i % 997 == 5 {
            v * 40.0
        } else {
            v
        }
    })
}

fn upload(codec: &GpuCodec, kv: &KvCache) -> cudarc::driver::CudaSlice<u16> {
    let words: Vec<u16> = kv
        .bytes()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    codec.stream().clone_htod(&words).expect("upload")
}

fn download(codec: &GpuCodec, d: &cudarc::driver::CudaSlice<u16>, spec: KvSpec) -> KvCache {
    let words = codec.stream().clone_dtoh(d).expect("download");
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    KvCache::from_bytes(spec, bytes).expect("spec")
}

/// Every element of `got` within the level's bound of `want`.
fn assert_within_bound(want: &KvCache, got: &KvCache, level: Level) {
    let spec = *want.spec();
    let s = spec.shape;
    let (bk, bv) = level.bins(s.layers).expect("lossy");
    let (a, b) = (want.view(), got.view());
    let mut row = vec![0f32; s.channels()];
    for l in 0..s.layers {
        for (p, part) in Part::BOTH.into_iter().enumerate() {
            let bins = if p == 0 { bk[l] } else { bv[l] } as u32;
            for t in 0..s.tokens {
                a.read_row(l, part, t, &mut row);
                let m = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let bound = quant::error_bound(bins, m, DType::F16);
                for (c, &x) in row.iter().enumerate() {
                    let y = b.get(l, part, t, c);
                    assert!(
                        (x - y).abs() <= bound,
                        "{level} layer {l} {} token {t} channel {c}: {x} vs {y} (bound {bound})",
                        part.name()
                    );
                }
            }
        }
    }
}

/// Shapes: HF and vLLM, a channel count that is not a multiple of 32 or 8 (scalar loads,
/// partial lane groups), a last chunk shorter than the others, one-token chunks.
fn specs() -> Vec<(KvSpec, usize)> {
    let f16 = |layers, heads, tokens, dim, layout| KvSpec {
        shape: KvShape::new(layers, heads, tokens, dim),
        layout,
        dtype: DType::F16,
    };
    vec![
        (f16(12, 2, 100, 64, Layout::Hf), 32),
        (f16(3, 4, 77, 32, Layout::Vllm), 256),
        (f16(2, 3, 50, 20, Layout::Hf), 16),
        (f16(2, 1, 9, 4, Layout::Vllm), 1),
        (f16(2, 2, 300, 128, Layout::Hf), 256),
    ]
}

#[test]
fn gpu_round_trip_within_bound_and_cpu_reads_it() {
    let Some(codec) = gpu("gpu_round_trip_within_bound_and_cpu_reads_it") else {
        return;
    };
    for (seed, (spec, chunk)) in specs().into_iter().enumerate() {
        let kv = cache(spec, seed as u64);
        let d_in = upload(codec, &kv);
        let input = DeviceKv::from_slice(&d_in, spec).unwrap();
        for level in NATIVE {
            let opts = EncodeOptions {
                level,
                chunk_tokens: chunk,
                channel_scale_k: false,
            };
            let gpu_bytes = GpuEncoder::new(codec, spec, &opts)
                .unwrap()
                .encode(&input)
                .unwrap();
            // The CPU reads the GPU's stream, within the level's bound.
            let cpu_dec = decode(&gpu_bytes).expect("CPU decodes the GPU stream");
            assert_within_bound(&kv, &cpu_dec, level);
            // The GPU decodes its own stream to the same bits as the CPU, into a buffer it is
            // handed by raw device pointer (as a serving engine's cache).
            let mut dec = GpuDecoder::new(codec, &gpu_bytes).unwrap();
            let out = codec
                .stream()
                .alloc_zeros::<u16>(spec.byte_len() / 2)
                .unwrap();
            let (ptr, _) = out.device_ptr(codec.stream());
            #[allow(unsafe_code)] // the raw-pointer entry point is unsafe by nature
            // SAFETY: `out` is a live allocation of the spec's size, used by nothing else.
            let r = unsafe { dec.decode_into_ptr(ptr) };
            r.unwrap();
            let gpu_dec = download(codec, &out, spec);
            assert!(
                gpu_dec.bytes() == cpu_dec.bytes(),
                "{level} {spec:?}: GPU and CPU decodes differ"
            );
        }
    }
}

#[test]
fn cpu_output_decodes_on_the_gpu_bit_exact() {
    let Some(codec) = gpu("cpu_output_decodes_on_the_gpu_bit_exact") else {
        return;
    };
    for (seed, (spec, chunk)) in specs().into_iter().enumerate() {
        let kv = cache(spec, 100 + seed as u64);
        for level in NATIVE {
            let opts = EncodeOptions {
                level,
                chunk_tokens: chunk,
                channel_scale_k: false,
            };
            let bytes = encode(&kv.view(), &opts).unwrap();
            let want = decode(&bytes).unwrap();
            let mut dec = GpuDecoder::new(codec, &bytes).unwrap();
            for kernel in [
                DecodeKernel::Slots,
                DecodeKernel::Small,
                DecodeKernel::Shared,
            ] {
                dec.set_kernel(kernel);
                let got = download(codec, &dec.decode().unwrap(), spec);
                assert!(
                    got.bytes() == want.bytes(),
                    "{level} {spec:?} {kernel:?}: GPU decode of the CPU stream differs"
                );
            }
        }
    }
}

/// The GPU makes the CPU encoder's model choices: the streams are byte-identical.
#[test]
fn gpu_stream_is_byte_identical_to_cpu() {
    let Some(codec) = gpu("gpu_stream_is_byte_identical_to_cpu") else {
        return;
    };
    let mut same = 0;
    let mut total = 0;
    for (seed, (spec, chunk)) in specs().into_iter().enumerate() {
        let kv = cache(spec, 200 + seed as u64);
        let d_in = upload(codec, &kv);
        let input = DeviceKv::from_slice(&d_in, spec).unwrap();
        for level in NATIVE {
            let opts = EncodeOptions {
                level,
                chunk_tokens: chunk,
                channel_scale_k: false,
            };
            let cpu = encode(&kv.view(), &opts).unwrap();
            let gpu = GpuEncoder::new(codec, spec, &opts)
                .unwrap()
                .encode(&input)
                .unwrap();
            total += 1;
            if cpu == gpu {
                same += 1;
            } else {
                let at = cpu.iter().zip(&gpu).position(|(a, b)| a != b);
                eprintln!(
                    "{level} {spec:?}: {} vs {} bytes, first difference at {at:?}",
                    cpu.len(),
                    gpu.len()
                );
            }
        }
    }
    eprintln!("byte-identical GPU/CPU streams: {same} of {total}");
    assert_eq!(same, total);
}

#[test]
fn real_cache_both_ways() {
    let Some(codec) = gpu("real_cache_both_ways") else {
        return;
    };
    let kv = file::load(testdata("smollm2-pydoc-256.safetensors"))
        .unwrap()
        .cache;
    let spec = *kv.spec();
    let d_in = upload(codec, &kv);
    let input = DeviceKv::from_slice(&d_in, spec).unwrap();
    for level in NATIVE {
        let opts = EncodeOptions::level(level);
        let cpu = encode(&kv.view(), &opts).unwrap();
        let gpu = GpuEncoder::new(codec, spec, &opts)
            .unwrap()
            .encode(&input)
            .unwrap();
        let from_gpu = decode(&gpu).unwrap();
        assert_within_bound(&kv, &from_gpu, level);
        let mut dec = GpuDecoder::new(codec, &cpu).unwrap();
        let got = download(codec, &dec.decode().unwrap(), spec);
        assert!(got.bytes() == decode(&cpu).unwrap().bytes());
        eprintln!(
            "real {level}: CPU {} bytes, GPU {} bytes, identical {}",
            cpu.len(),
            gpu.len(),
            cpu == gpu
        );
    }
}

#[test]
fn pipelined_encode_equals_whole_encode() {
    let Some(codec) = gpu("pipelined_encode_equals_whole_encode") else {
        return;
    };
    let (spec, _) = specs()[0];
    let kv = cache(spec, 7);
    let d_in = upload(codec, &kv);
    let input = DeviceKv::from_slice(&d_in, spec).unwrap();
    let opts = EncodeOptions::level(Level::CgDefault);
    let mut enc = GpuEncoder::new(codec, spec, &opts).unwrap();
    let whole = enc.encode(&input).unwrap();
    let mut staging = enc.staging().unwrap();
    let mut piped = Vec::new();
    let mut layers = Vec::new();
    enc.encode_pipelined(&input, &mut staging, |layer, bytes| {
        layers.push(layer);
        piped.extend_from_slice(bytes);
        Ok(())
    })
    .unwrap();
    assert_eq!(layers[0], None);
    assert_eq!(layers.len(), spec.shape.layers + 1);
    assert!(piped == whole);
}

#[test]
fn corruption_and_bad_input_are_errors() {
    let Some(codec) = gpu("corruption_and_bad_input_are_errors") else {
        return;
    };
    let (spec, chunk) = specs()[2];
    let kv = cache(spec, 9);
    let opts = EncodeOptions {
        level: Level::CgDefault,
        chunk_tokens: chunk,
        channel_scale_k: false,
    };
    let bytes = encode(&kv.view(), &opts).unwrap();
    let hl = kvwire_codec::Header::read(&bytes).unwrap().1;
    for at in [hl + 30, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        for kernel in [
            DecodeKernel::Slots,
            DecodeKernel::Small,
            DecodeKernel::Shared,
        ] {
            let r = GpuDecoder::new(codec, &bad).and_then(|mut d| {
                d.set_kernel(kernel);
                d.decode().map(|_| ())
            });
            assert!(r.is_err(), "flipped byte {at} decoded ({kernel:?})");
        }
    }
    // Truncated streams are refused before any kernel runs.
    assert!(GpuDecoder::new(codec, &bytes[..bytes.len() - 3]).is_err());
    // Non-finite input is refused, as on the CPU.
    let mut nan = kv.clone();
    nan.bytes_mut()[2 * 123..2 * 123 + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
    let d_in = upload(codec, &nan);
    let input = DeviceKv::from_slice(&d_in, spec).unwrap();
    let r = GpuEncoder::new(codec, spec, &opts).unwrap().encode(&input);
    assert!(r.is_err());
    // Levels the GPU does not do are refused.
    let q8 = EncodeOptions::level(Level::Q8);
    assert!(GpuEncoder::new(codec, spec, &q8).is_err());
}

/// A receiver's path: the stream pushed layer by layer (in reverse order) decodes to the CPU's
/// bits; a missing layer and a corrupt block are reported.
#[test]
fn streaming_decode_layer_by_layer() {
    let Some(codec) = gpu("streaming_decode_layer_by_layer") else {
        return;
    };
    let (spec, chunk) = specs()[0];
    let kv = cache(spec, 21);
    let opts = EncodeOptions {
        level: Level::CgDefault,
        chunk_tokens: chunk,
        channel_scale_k: false,
    };
    let bytes = encode(&kv.view(), &opts).unwrap();
    let want = decode(&bytes).unwrap();
    let (dec, mut pos) = kvwire_codec::Decoder::new(&bytes).unwrap();
    // Cut the stream into layers (blocks are layer-major).
    let mut layers: Vec<&[u8]> = Vec::new();
    let (mut start, mut cur) = (pos, None);
    while pos < bytes.len() {
        let (bh, _) = dec.block_header(&bytes[pos..]).unwrap();
        if cur.is_some() && cur != Some(bh.layer) {
            layers.push(&bytes[start..pos]);
            start = pos;
        }
        cur = Some(bh.layer);
        pos += bh.block_len();
    }
    layers.push(&bytes[start..]);
    assert_eq!(layers.len(), spec.shape.layers);
    let header = dec.header().clone();
    let mut out = codec
        .stream()
        .alloc_zeros::<u16>(spec.byte_len() / 2)
        .unwrap();
    {
        let mut sd = GpuStreamDecoder::new(codec, header.clone(), &mut out).unwrap();
        for l in layers.iter().rev() {
            sd.push(l).unwrap();
        }
        sd.finish().unwrap();
    }
    let got = download(codec, &out, spec);
    assert!(got.bytes() == want.bytes());
    // A layer that never comes.
    let mut sd = GpuStreamDecoder::new(codec, header.clone(), &mut out).unwrap();
    for l in &layers[1..] {
        sd.push(l).unwrap();
    }
    assert!(sd.finish().is_err());
    // A corrupt payload byte (found by the CRC check, at the next push or at the end).
    let mut bad = layers[3].to_vec();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let mut sd = GpuStreamDecoder::new(codec, header.clone(), &mut out).unwrap();
    let mut r = Ok(());
    for (i, l) in layers.iter().enumerate() {
        r = r.and(sd.push(if i == 3 { &bad } else { l }));
    }
    let end = sd.finish();
    assert!(r.is_err() || end.is_err());
    // A repeated layer is refused at once.
    let mut sd = GpuStreamDecoder::new(codec, header, &mut out).unwrap();
    sd.push(layers[0]).unwrap();
    assert!(sd.push(layers[0]).is_err());
}
