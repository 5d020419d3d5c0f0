//! GPU codec benchmark: encode and decode GB/s of fp16 input per native level, beside the same
//! run's device-to-device copy rate.
//!
//! ```text
//! cargo run --release -p kvwire-codec --features cuda --example gpu_bench -- \
//!     [--layers 32] [--heads 8] [--dim 128] [--tokens 8192] [--chunk 256[,64...]] \
//!     [--levels cg-high,cg-default,cg-low] [--iters 20] [--seed 1] [--json out.jsonl] \
//!     [--sample codec/testdata/smollm2-pydoc-256.safetensors] [--cpu-check]
//! ```
//!
//! The cache is synthetic from real statistics, as `kvwire perf kv --synthetic llama-3-8b`
//! makes it (`kvwire_codec::synthetic`): per (layer, K/V, channel) mean and scale and a
//! per-(layer, K/V) lag-1 correlation measured on the embedded real SmolLM2 cache, reproduced
//! by an AR(1) process per channel; planes are generated in parallel, each with its own seed.
//! Times are CUDA-event medians over `--iters` runs after two warm-ups (NVRTC compile and first
//! launch excluded); GB/s = fp16 input bytes / time.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_bench needs the `cuda` feature: cargo run --release -p kvwire-codec --features cuda --example gpu_bench");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = bench::run() {
        eprintln!("gpu_bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::error::Error;
    use std::io::Write;
    use std::time::Instant;

    use cudarc::driver::sys::CUevent_flags;
    use cudarc::driver::CudaSlice;
    use kvwire_codec::cuda::{
        available, DecodeKernel, DeviceKv, GpuCodec, GpuDecoder, GpuEncoder, GpuStreamDecoder,
    };
    use kvwire_codec::synthetic::{plane_stats, PlaneStats, SplitMix64};
    use kvwire_codec::{
        decode, encode, file, quant, DType, EncodeOptions, KvCache, KvShape, KvSpec, Layout, Level,
    };
    use rayon::prelude::*;

    type R<T> = Result<T, Box<dyn Error>>;

    struct Args {
        layers: usize,
        heads: usize,
        dim: usize,
        tokens: usize,
        chunks: Vec<usize>,
        levels: Vec<Level>,
        iters: usize,
        seed: u64,
        json: Option<String>,
        sample: String,
        cpu_check: bool,
    }

    fn args() -> R<Args> {
        let mut a = Args {
            layers: 32,
            heads: 8,
            dim: 128,
            tokens: 8192,
            chunks: vec![256],
            levels: vec![Level::CgHigh, Level::CgDefault, Level::CgLow],
            iters: 20,
            seed: 1,
            json: None,
            sample: {
                let here = "codec/testdata/smollm2-pydoc-256.safetensors";
                if std::path::Path::new(here).exists() {
                    here.into()
                } else {
                    concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/testdata/smollm2-pydoc-256.safetensors"
                    )
                    .into()
                }
            },
            cpu_check: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
            match k.as_str() {
                "--layers" => a.layers = v()?.parse()?,
                "--heads" => a.heads = v()?.parse()?,
                "--dim" => a.dim = v()?.parse()?,
                "--tokens" => a.tokens = v()?.parse()?,
                "--chunk" => {
                    a.chunks = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?
                }
                "--levels" => {
                    a.levels = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?
                }
                "--iters" => a.iters = v()?.parse()?,
                "--seed" => a.seed = v()?.parse()?,
                "--json" => a.json = Some(v()?),
                "--sample" => a.sample = v()?,
                "--cpu-check" => a.cpu_check = true,
                other => return Err(format!("unknown argument {other}").into()),
            }
        }
        Ok(a)
    }

    /// The statistics of the real sample (`kvwire_codec::synthetic`, as `kvwire perf` uses).
    fn sample_stats(path: &str) -> R<(KvShape, Vec<PlaneStats>)> {
        let kv = file::load(path)?.cache;
        Ok(plane_stats(&kv.view()))
    }

    /// A synthetic fp16 cache (HF layout) of `spec`, one AR(1) process per channel.
    fn synthetic(spec: KvSpec, src: KvShape, stats: &[PlaneStats], seed: u64) -> Vec<u16> {
        let s = spec.shape;
        let (tn, dn) = (s.tokens, s.head_dim);
        let mut data = vec![0u16; s.elements()];
        data.par_chunks_mut(tn * dn)
            .enumerate()
            .for_each(|(plane, out)| {
                let head = plane % s.kv_heads;
                let (layer, part) = ((plane / s.kv_heads) / 2, (plane / s.kv_heads) % 2);
                let st = &stats[(layer * src.layers / s.layers) * 2 + part];
                let mut rng =
                    SplitMix64(seed ^ 0x6b76_7769_7265 ^ (plane as u64).wrapping_mul(0x9e37_79b9));
                let mut state = vec![0f32; dn];
                for t in 0..tn {
                    for d in 0..dn {
                        let e = rng.normal_pair().0;
                        let z = if t == 0 {
                            e
                        } else {
                            st.rho * state[d] + (1.0 - st.rho * st.rho).sqrt() * e
                        };
                        state[d] = z;
                        let sc = (head % src.kv_heads) * src.head_dim + d * src.head_dim / dn;
                        let x = st.mean[sc] + st.scale[sc] * z;
                        out[t * dn + d] = half::f16::from_f32(x).to_bits();
                    }
                }
            });
        data
    }

    fn median(mut v: Vec<f32>) -> f32 {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    }

    /// Largest |error| over the bound, per element, of `got` against `want` (both HF fp16):
    /// returns the number of elements outside the level's bound.
    fn outside_bound(spec: KvSpec, level: Level, want: &[u16], got: &[u16]) -> usize {
        let s = spec.shape;
        let (bk, bv) = level.bins(s.layers).expect("lossy");
        let (hn, tn, dn) = (s.kv_heads, s.tokens, s.head_dim);
        (0..s.layers * 2)
            .into_par_iter()
            .map(|lp| {
                let bins = if lp % 2 == 0 { bk[lp / 2] } else { bv[lp / 2] } as u32;
                let mut bad = 0;
                for t in 0..tn {
                    let idx = |h: usize, d: usize| ((lp * hn + h) * tn + t) * dn + d;
                    let mut m = 0f32;
                    for h in 0..hn {
                        for d in 0..dn {
                            m = m.max(half::f16::from_bits(want[idx(h, d)]).to_f32().abs());
                        }
                    }
                    let bound = quant::error_bound(bins, m, DType::F16);
                    for h in 0..hn {
                        for d in 0..dn {
                            let x = half::f16::from_bits(want[idx(h, d)]).to_f32();
                            let y = half::f16::from_bits(got[idx(h, d)]).to_f32();
                            bad += ((x - y).abs() > bound) as usize;
                        }
                    }
                }
                bad
            })
            .sum()
    }

    pub(super) fn run() -> R<()> {
        let a = args()?;
        if !available() {
            println!("SKIPPED: no CUDA driver or NVRTC found");
            return Ok(());
        }
        let t0 = Instant::now();
        let codec = GpuCodec::new(0)?;
        let ctx = codec.context().clone();
        let stream = codec.stream().clone();
        let name = ctx.name()?;
        eprintln!("device: {name}; kernels compiled in {:.2?}", t0.elapsed());
        let spec = KvSpec {
            shape: KvShape::new(a.layers, a.heads, a.tokens, a.dim),
            layout: Layout::Hf,
            dtype: DType::F16,
        };
        let bytes_in = spec.byte_len();
        let (src, stats) = sample_stats(&a.sample)?;
        let t = Instant::now();
        let host = synthetic(spec, src, &stats, a.seed);
        eprintln!(
            "synthetic cache {:?}: {:.1} MiB in {:.2?}",
            spec.shape,
            bytes_in as f64 / (1 << 20) as f64,
            t.elapsed()
        );
        let d_in: CudaSlice<u16> = stream.clone_htod(&host)?;
        let mut d_copy: CudaSlice<u16> = stream.alloc_zeros(host.len())?;
        let input = DeviceKv::from_slice(&d_in, spec)?;
        let timing = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let (e0, e1) = (timing()?, timing()?);
        let time = |f: &mut dyn FnMut() -> R<()>| -> R<f32> {
            for _ in 0..2 {
                f()?;
            }
            stream.synchronize()?;
            let mut ms = Vec::new();
            for _ in 0..a.iters {
                e0.record(&stream)?;
                f()?;
                e1.record(&stream)?;
                ms.push(e0.elapsed_ms(&e1)?);
            }
            Ok(median(ms))
        };
        // The baseline: a device-to-device copy of the same bytes.
        let d2d_ms = time(&mut || {
            stream.memcpy_dtod(&d_in, &mut d_copy)?;
            Ok(())
        })?;
        let gbps = |ms: f32| bytes_in as f64 / (ms as f64 * 1e-3) / 1e9;
        let d2d = gbps(d2d_ms);
        println!(
            "device {name}: cache {} layers x {} kv heads x {} tokens x {} head dim fp16 = {:.1} MiB, median of {} runs",
            a.layers, a.heads, a.tokens, a.dim, bytes_in as f64 / (1 << 20) as f64, a.iters
        );
        println!(
            "d2d copy: {d2d_ms:.3} ms = {d2d:.1} GB/s (bytes copied; {:.1} GB/s read+write)",
            2.0 * d2d
        );
        println!(
            "{:<11} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7} {:>11}",
            "level",
            "chunk",
            "ratio",
            "enc ms",
            "enc GB/s",
            "dec ms",
            "dec GB/s",
            "vs d2d",
            "bound",
            "pipe GB/s"
        );
        let mut json = match &a.json {
            Some(p) => Some(std::fs::File::create(p)?),
            None => None,
        };
        for &chunk in &a.chunks {
            for &level in &a.levels {
                let opts = EncodeOptions {
                    level,
                    chunk_tokens: chunk,
                    channel_scale_k: false,
                };
                let mut enc = GpuEncoder::new(&codec, spec, &opts)?;
                let enc_ms = time(&mut || {
                    enc.launch(&input)?;
                    Ok(())
                })?;
                let enc_prof = codec.profile_report()?;
                let bytes = enc.encode(&input)?;
                let ratio = bytes_in as f64 / bytes.len() as f64;
                let mut dec = GpuDecoder::new(&codec, &bytes)?;
                let mut out: CudaSlice<u16> = stream.alloc_zeros(host.len())?;
                let mut dec_ms = f32::INFINITY;
                let mut dec_kernels = Vec::new();
                for kernel in [
                    DecodeKernel::Slots,
                    DecodeKernel::Small,
                    DecodeKernel::Shared,
                ] {
                    dec.set_kernel(kernel);
                    let ms = time(&mut || {
                        dec.launch(&mut out)?;
                        Ok(())
                    })?;
                    let prof = codec.profile_report()?;
                    dec_kernels.push(format!("{kernel:?} {ms:.3} ms {prof:?}"));
                    if kernel == DecodeKernel::default() {
                        dec_ms = ms;
                    }
                }
                dec.set_kernel(DecodeKernel::default());
                dec.decode_into(&mut out)?;
                let got = stream.clone_dtoh(&out)?;
                let bad = outside_bound(spec, level, &host, &got);
                // Layer-pipelined encode into pinned host memory (wall clock).
                let mut pipes = Vec::new();
                for depth in [8, 32] {
                    let mut staging = enc.staging_with_depth(depth)?;
                    let mut piped = 0usize;
                    enc.encode_pipelined(&input, &mut staging, |_, b| {
                        piped += b.len();
                        Ok(())
                    })?;
                    let tp = Instant::now();
                    let reps = 3;
                    for _ in 0..reps {
                        enc.encode_pipelined(&input, &mut staging, |_, b| {
                            piped += b.len();
                            Ok(())
                        })?;
                    }
                    pipes.push(tp.elapsed().as_secs_f32() * 1e3 / reps as f32);
                }
                // Receiver: the stream pushed layer by layer (from pageable host memory, so
                // the uploads are synchronous copies) into the device cache (wall clock).
                let (hdr_dec, mut pos) = kvwire_codec::Decoder::new(&bytes)?;
                let mut cuts = vec![pos];
                let mut cur = None;
                while pos < bytes.len() {
                    let (bh, _) = hdr_dec.block_header(&bytes[pos..])?;
                    if cur.is_some() && cur != Some(bh.layer) {
                        cuts.push(pos);
                    }
                    cur = Some(bh.layer);
                    pos += bh.block_len();
                }
                cuts.push(bytes.len());
                let mut stream_ms = f32::INFINITY;
                for _ in 0..4 {
                    let ts = Instant::now();
                    let mut sd = GpuStreamDecoder::new(&codec, hdr_dec.header().clone(), &mut out)?;
                    for w in cuts.windows(2) {
                        sd.push(&bytes[w[0]..w[1]])?;
                    }
                    sd.finish()?;
                    stream_ms = stream_ms.min(ts.elapsed().as_secs_f32() * 1e3);
                }
                eprintln!(
                    "  {level} chunk {chunk}: streaming decode (layer pushes from pageable memory, wall clock, best of 4): {stream_ms:.3} ms = {:.1} GB/s",
                    gbps(stream_ms)
                );
                let _ = codec.profile_report()?;
                let pipe_ms = pipes.iter().copied().fold(f32::INFINITY, f32::min);
                eprintln!(
                    "  {level} chunk {chunk}: encode kernels {enc_prof:?}; decode {dec_kernels:?}; pipelined ms (depth 8, 32) {pipes:?}"
                );
                let (eg, dg, pg) = (gbps(enc_ms), gbps(dec_ms), gbps(pipe_ms));
                println!(
                    "{:<11} {:>6} {:>7.2}x {:>10.3} {:>10.1} {:>10.3} {:>10.1} {:>4.2}/{:<4.2} {:>7} {:>11.1}",
                    level.name(), chunk, ratio, enc_ms, eg, dec_ms, dg, eg / d2d, dg / d2d,
                    if bad == 0 { "ok".to_string() } else { format!("{bad} BAD") }, pg
                );
                let mut cpu = String::new();
                if a.cpu_check {
                    let t = Instant::now();
                    let kv = KvCache::from_bytes(
                        spec,
                        host.iter().flat_map(|w| w.to_le_bytes()).collect(),
                    )?;
                    let cpu_bytes = encode(&kv.view(), &opts)?;
                    let identical = cpu_bytes == bytes;
                    let cpu_dec = decode(&bytes)?;
                    let got_bytes: Vec<u8> = got.iter().flat_map(|w| w.to_le_bytes()).collect();
                    let same_decode = cpu_dec.bytes() == &got_bytes[..];
                    let mut gd = GpuDecoder::new(&codec, &cpu_bytes)?;
                    let from_cpu = gd.decode()?;
                    let from_cpu = stream.clone_dtoh(&from_cpu)?;
                    let cpu_on_gpu = decode(&cpu_bytes)?.bytes()
                        == &from_cpu
                            .iter()
                            .flat_map(|w| w.to_le_bytes())
                            .collect::<Vec<u8>>()[..];
                    cpu = format!(
                        ", \"cpu_stream_identical\": {identical}, \"cpu_decodes_gpu_same\": {same_decode}, \"gpu_decodes_cpu_same\": {cpu_on_gpu}"
                    );
                    println!(
                        "  cpu check: GPU stream byte-identical to CPU's: {identical}; CPU decode of GPU stream == GPU decode: {same_decode}; GPU decode of CPU stream == CPU decode: {cpu_on_gpu} ({:.1?})",
                        t.elapsed()
                    );
                }
                if let Some(f) = json.as_mut() {
                    writeln!(
                        f,
                        "{{\"device\": \"{name}\", \"level\": \"{}\", \"chunk_tokens\": {chunk}, \"layers\": {}, \"kv_heads\": {}, \"tokens\": {}, \"head_dim\": {}, \"input_bytes\": {bytes_in}, \"encoded_bytes\": {}, \"ratio\": {ratio:.4}, \"encode_ms\": {enc_ms:.4}, \"encode_gbps\": {eg:.2}, \"decode_ms\": {dec_ms:.4}, \"decode_gbps\": {dg:.2}, \"d2d_ms\": {d2d_ms:.4}, \"d2d_gbps\": {d2d:.2}, \"pipelined_encode_gbps\": {pg:.2}, \"streaming_decode_gbps\": {:.2}, \"outside_bound\": {bad}, \"iters\": {}{cpu}}}",
                        level.name(), a.layers, a.heads, a.tokens, a.dim, bytes.len(), gbps(stream_ms), a.iters
                    )?;
                }
            }
        }
        Ok(())
    }
}
