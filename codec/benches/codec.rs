//! Criterion benchmarks of the codec on a real KV cache, against a same-run `memcpy` baseline.
//!
//! Input: `codec/testdata/smollm2-pydoc-256.safetensors` (256 tokens of SmolLM2-135M, f16), or
//! the file named by `KVWIRE_BENCH_KV` (absolute, or relative to the current directory or to
//! the workspace root), e.g.
//! `KVWIRE_BENCH_KV=data/smollm2-pydoc-4096.safetensors cargo bench -p kvwire-codec --bench codec -- 'cg-default|q8'`
//! (a filter of plain names joined by `|` also limits the summary table to those levels).
//!
//! Benchmarks, each with `Throughput::Bytes` of the fp16 input (2 bytes per element):
//! - `memcpy/1core`: `copy_from_slice` of that many bytes into a preallocated buffer;
//! - `encode_1core/<level>`, `encode_allcores/<level>`: whole-cache [`encode`];
//! - `decode_1core/<level>`, `decode_allcores/<level>`: the streaming receiver path,
//!   [`Decoder::decode_block`] of every block into a preallocated cache-sized buffer, one
//!   layer per rayon task (block boundaries are parsed once, outside the timed loop).
//!
//! Every id ends in the input file's stem (e.g. `encode_1core/cg-default/smollm2-pydoc-256`),
//! so criterion's change report compares runs on the same input only.
//! `1core` runs inside a one-thread rayon pool, `allcores` in the global pool. After
//! criterion's output a Markdown summary table is printed (own `Instant` timing, median of
//! `KVWIRE_BENCH_REPS` = 5 repetitions, for the levels the filter selects), with every rate
//! also given as a multiple of the same run's memcpy rate.

use std::hint::black_box;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use kvwire_codec::file::view_safetensors;
use kvwire_codec::{decode, encode, Decoder, EncodeOptions, KvCache, KvView, Level};
use rayon::prelude::*;
use rayon::ThreadPool;

const FIXTURE: &str = "testdata/smollm2-pydoc-256.safetensors";

/// The input file: its path and bytes, read once.
struct Input {
    path: PathBuf,
    buf: Vec<u8>,
}

fn input() -> &'static Input {
    static INPUT: OnceLock<Input> = OnceLock::new();
    INPUT.get_or_init(|| {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = match std::env::var_os("KVWIRE_BENCH_KV").filter(|s| !s.is_empty()) {
            None => manifest.join(FIXTURE),
            Some(p) => {
                let p = PathBuf::from(p);
                // cargo runs benches in the package directory; also accept paths relative
                // to the workspace root, where `cargo bench` is usually typed.
                [p.clone(), manifest.join("..").join(&p)]
                    .into_iter()
                    .find(|c| c.is_file())
                    .unwrap_or_else(|| panic!("KVWIRE_BENCH_KV={} is not a file", p.display()))
            }
        };
        let buf =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Input { path, buf }
    })
}

/// The input file's stem: the last part of every benchmark id, so that criterion compares a
/// run only with earlier runs on the same input.
fn input_tag() -> String {
    input()
        .path
        .file_stem()
        .map_or_else(|| "input".to_owned(), |s| s.to_string_lossy().into_owned())
}

fn view() -> KvView<'static> {
    view_safetensors(&input().buf)
        .expect("input is a KV safetensors file")
        .0
}

/// Bytes of the cache as fp16 (2 per element): the throughput unit of every benchmark.
fn fp16_bytes() -> usize {
    2 * view().spec().shape.elements()
}

/// The memcpy source: the first `fp16_bytes()` bytes of the tensor data (all of it for f16).
fn memcpy_src() -> &'static [u8] {
    let v = view();
    let data = v.bytes();
    &data[..fp16_bytes().min(data.len())]
}

fn one_core() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("one-thread rayon pool")
    })
}

/// One level's encoded file, and where each layer's blocks lie in it.
struct Prepared {
    level: Level,
    bytes: Vec<u8>,
    decoder: Decoder,
    /// `blocks[layer]`: byte ranges of that layer's blocks in `bytes`.
    blocks: Vec<Vec<Range<usize>>>,
    layer_bytes: usize,
}

fn prepared(level: Level) -> &'static Prepared {
    static PREPARED: [OnceLock<Prepared>; Level::ALL.len()] =
        [const { OnceLock::new() }; Level::ALL.len()];
    let i = Level::ALL
        .iter()
        .position(|&l| l == level)
        .expect("a level");
    PREPARED[i].get_or_init(|| prepare(level))
}

fn prepare(level: Level) -> Prepared {
    let kv = view();
    let bytes = encode(&kv, &EncodeOptions::level(level)).expect("encode");
    let (decoder, mut pos) = Decoder::new(&bytes).expect("header");
    let mut blocks = vec![Vec::new(); kv.spec().shape.layers];
    while pos < bytes.len() {
        let (bh, _) = decoder.block_header(&bytes[pos..]).expect("block header");
        blocks[bh.layer as usize].push(pos..pos + bh.block_len());
        pos += bh.block_len();
    }
    let layer_bytes = decoder.layer_spec().byte_len();
    let p = Prepared {
        level,
        bytes,
        decoder,
        blocks,
        layer_bytes,
    };
    // The timed decode path must give what `decode` gives.
    let mut out = KvCache::zeroed(*kv.spec());
    decode_into(&p, out.bytes_mut());
    assert!(
        out == decode(&p.bytes).expect("decode"),
        "{level}: block-wise decode differs from decode()"
    );
    p
}

fn encode_once(p: &Prepared) -> Vec<u8> {
    encode(&view(), &EncodeOptions::level(p.level)).expect("encode")
}

/// Decodes every block into `out` (the whole cache's bytes), one layer per rayon task.
fn decode_into(p: &Prepared, out: &mut [u8]) {
    out.par_chunks_mut(p.layer_bytes)
        .zip(p.blocks.par_iter())
        .for_each(|(layer_out, blocks)| {
            for r in blocks {
                p.decoder
                    .decode_block(&p.bytes[r.clone()], layer_out)
                    .expect("decode_block");
            }
        });
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Encode,
    Decode,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cores {
    One,
    All,
}

impl Op {
    const fn name(self) -> &'static str {
        match self {
            Self::Encode => "encode",
            Self::Decode => "decode",
        }
    }
}

impl Cores {
    const fn name(self) -> &'static str {
        match self {
            Self::One => "1core",
            Self::All => "allcores",
        }
    }

    /// Runs `f` in the pool these cores stand for.
    fn run<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Self::One => one_core().install(f),
            Self::All => f(),
        }
    }
}

const CASES: [(Op, Cores); 4] = [
    (Op::Encode, Cores::One),
    (Op::Encode, Cores::All),
    (Op::Decode, Cores::One),
    (Op::Decode, Cores::All),
];

fn bench_memcpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("memcpy");
    g.throughput(Throughput::Bytes(fp16_bytes() as u64));
    g.bench_function(BenchmarkId::new("1core", input_tag()), |b| {
        let src = memcpy_src();
        let mut dst = vec![0u8; src.len()];
        b.iter(|| {
            dst.copy_from_slice(black_box(src));
            black_box(&mut dst);
        });
    });
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    for (op, cores) in CASES {
        let mut g = c.benchmark_group(format!("{}_{}", op.name(), cores.name()));
        g.throughput(Throughput::Bytes(fp16_bytes() as u64));
        // Whole-cache calls take milliseconds to seconds: a fixed number of iterations per sample.
        g.sampling_mode(SamplingMode::Flat);
        for level in Level::ALL {
            g.bench_function(BenchmarkId::new(level.name(), input_tag()), |b| {
                let p = prepared(level);
                match op {
                    Op::Encode => cores.run(|| b.iter(|| encode_once(p))),
                    Op::Decode => {
                        let mut out = KvCache::zeroed(*view().spec());
                        cores.run(|| b.iter(|| decode_into(p, black_box(out.bytes_mut()))));
                    }
                }
            });
        }
        g.finish();
    }
}

/// How the benchmark binary was invoked, as far as the summary cares.
struct Args {
    /// Criterion's FILTER (a regex; `exact` makes it a whole-name match).
    filter: Option<String>,
    exact: bool,
    list: bool,
    test: bool,
    profile: bool,
}

fn args() -> Args {
    // Criterion options that take a value (`--opt value`; `--opt=value` is one word).
    const WITH_VALUE: [&str; 20] = [
        "-c",
        "--color",
        "--colour",
        "-s",
        "--save-baseline",
        "-b",
        "--baseline",
        "--baseline-lenient",
        "--format",
        "--profile-time",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--plotting-backend",
        "--output-format",
    ];
    let mut a = Args {
        filter: None,
        exact: false,
        list: false,
        test: false,
        profile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--exact" => a.exact = true,
            "--list" => a.list = true,
            "--test" => a.test = true,
            s if s.starts_with("--profile-time") => {
                a.profile = true;
                if !s.contains('=') {
                    it.next();
                }
            }
            s if WITH_VALUE.contains(&s) => {
                it.next();
            }
            s if s.starts_with('-') => {}
            _ => {
                if a.filter.is_none() {
                    a.filter = Some(arg);
                }
            }
        }
    }
    a
}

impl Args {
    /// Whether the filter selects any benchmark of `level`. Plain names and `a|b`
    /// alternatives of plain names are matched as criterion matches them; a filter with other
    /// regex syntax selects every level (the summary does not evaluate regexes).
    fn selects(&self, level: Level) -> bool {
        let Some(f) = &self.filter else {
            return true;
        };
        let ids: Vec<String> = CASES
            .iter()
            .map(|(op, cores)| {
                format!(
                    "{}_{}/{}/{}",
                    op.name(),
                    cores.name(),
                    level.name(),
                    input_tag()
                )
            })
            .collect();
        if self.exact {
            return ids.iter().any(|id| id == f);
        }
        let plain = |s: &str| {
            s.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_/ ".contains(ch))
        };
        let alternatives: Vec<&str> = f.split('|').collect();
        if !alternatives.iter().all(|a| plain(a)) {
            return true;
        }
        ids.iter()
            .any(|id| alternatives.iter().any(|a| id.contains(a)))
    }
}

/// Per-call seconds of `f` for each of `reps` samples, after one warm-up call; a sample
/// repeats `f` enough times to last at least 20 ms.
fn samples(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    let t = Instant::now();
    f();
    let once = t.elapsed().max(Duration::from_nanos(1));
    let inner = (Duration::from_millis(20).as_secs_f64() / once.as_secs_f64()).ceil() as usize;
    let inner = inner.clamp(1, 10_000);
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn memcpy_samples(reps: usize) -> Vec<f64> {
    let src = memcpy_src();
    let mut dst = vec![0u8; src.len()];
    samples(reps, || {
        dst.copy_from_slice(black_box(src));
        black_box(&mut dst);
    })
}

/// Prints the Markdown summary table (own timing; criterion's estimates are not exposed).
fn summary() {
    let a = args();
    if a.list || a.profile {
        return;
    }
    let reps = if a.test {
        1
    } else {
        std::env::var("KVWIRE_BENCH_REPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(5)
    };
    let kv = view();
    let spec = *kv.spec();
    let s = spec.shape;
    let bytes = fp16_bytes() as f64;
    let gbps = |secs: f64| bytes / secs / 1e9;

    let mut copies = memcpy_samples(reps);
    let memcpy_start = gbps(median(copies.clone()));
    let levels: Vec<Level> = Level::ALL.into_iter().filter(|&l| a.selects(l)).collect();
    let mut rows = Vec::new();
    for &level in &levels {
        let p = prepared(level);
        let mut out = KvCache::zeroed(spec);
        let rates: Vec<f64> = CASES
            .iter()
            .map(|&(op, cores)| {
                let t = cores.run(|| match op {
                    Op::Encode => samples(reps, || drop(black_box(encode_once(p)))),
                    Op::Decode => samples(reps, || decode_into(p, black_box(out.bytes_mut()))),
                });
                gbps(median(t))
            })
            .collect();
        rows.push((level, bytes / p.bytes.len() as f64, rates));
    }
    let end = memcpy_samples(reps);
    let memcpy_end = gbps(median(end.clone()));
    copies.extend(end);
    let memcpy = gbps(median(copies));

    let name = input_tag();
    println!();
    println!(
        "## kvwire-codec throughput: {name} ({} layers x {} kv heads x {} tokens x {} dims, {:?} {:?}; {:.1} MiB as fp16)",
        s.layers,
        s.kv_heads,
        s.tokens,
        s.head_dim,
        spec.dtype,
        spec.layout,
        bytes / (1u64 << 20) as f64,
    );
    println!();
    println!(
        "GB/s of fp16 input (1e9 bytes/s), median of {reps} timed repetitions; (×memcpy) = rate / \
         same-run single-core memcpy rate of {memcpy:.2} GB/s (start {memcpy_start:.2}, end {memcpy_end:.2}). \
         all cores = {} rayon threads. Shared machine: expect noise.",
        rayon::current_num_threads()
    );
    println!();
    // Columns in `CASES` order, the order of each row's rates.
    let columns: Vec<String> = CASES
        .iter()
        .map(|(op, cores)| {
            let cores = match cores {
                Cores::One => "1 core",
                Cores::All => "all cores",
            };
            format!("{} {cores} GB/s", op.name())
        })
        .collect();
    println!("| level | fp16 / encoded | {} |", columns.join(" | "));
    println!("|---|---:|{}", "---:|".repeat(CASES.len()));
    for (level, ratio, rates) in &rows {
        let cells: Vec<String> = rates
            .iter()
            .map(|r| format!("{r:.3} ({:.3}×)", r / memcpy))
            .collect();
        println!("| {level} | {ratio:.2}× | {} |", cells.join(" | "));
    }
    if rows.is_empty() {
        println!(
            "| (no level matches the filter) | |{}",
            " |".repeat(CASES.len())
        );
    }
    println!();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_memcpy, bench_codec
}
criterion_main!(benches, summary);
