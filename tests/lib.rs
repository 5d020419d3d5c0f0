//! Shared helpers of the integration tests: the fixture, a deterministic RNG, value
//! generators, the error-bound oracle, and tools to take a bitstream apart and forge one.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;

use kvwire_codec::container::{BLOCK_HEADER_LEN, BLOCK_MAGIC, FILE_MAGIC, FORMAT_VERSION};
use kvwire_codec::{
    quant, DType, EncodeOptions, KvCache, KvShape, KvSpec, KvView, Layout, Level, Part,
};

/// The committed real KV cache: SmolLM2-135M, 256 tokens, f16, Hugging Face layout.
pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("codec")
        .join("testdata")
        .join("smollm2-pydoc-256.safetensors")
}

/// The fixture's cache, loaded once per test process.
pub fn fixture() -> &'static KvCache {
    static CACHE: OnceLock<KvCache> = OnceLock::new();
    CACHE.get_or_init(|| {
        kvwire_codec::file::load(fixture_path())
            .expect("the committed fixture loads")
            .cache
    })
}

/// The fixture encoded at `level` with default options (computed once per test process, all
/// levels together, and shared by the tests that only need to read these files).
pub fn fixture_encoded(level: Level) -> &'static [u8] {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let files = FILES.get_or_init(|| {
        Level::ALL
            .iter()
            .map(|&l| {
                kvwire_codec::encode(&fixture().view(), &EncodeOptions::level(l))
                    .expect("the fixture encodes")
            })
            .collect()
    });
    let i = Level::ALL
        .iter()
        .position(|&l| l == level)
        .expect("a level of Level::ALL");
    &files[i]
}

/// The first `layers` layers of the fixture, a smaller real cache for the costlier tests.
pub fn fixture_head(layers: usize) -> KvCache {
    let kv = fixture();
    let mut s = *kv.spec();
    s.shape.layers = layers;
    KvCache::from_bytes(s, kv.bytes()[..s.byte_len()].to_vec()).expect("a prefix of layers")
}

/// splitmix64: a tiny deterministic generator (property tests draw its seed).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Roughly normal (sum of uniforms), mean 0, deviation about 1.
    pub fn normalish(&mut self) -> f64 {
        (0..4).map(|_| self.unit()).sum::<f64>() * 1.732 - 3.464
    }

    /// In-place Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Families of values the property tests draw caches from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Roughly normal values at one random magnitude per cache.
    Normal,
    /// Normal values with a few outlier channels (as real K tensors have).
    OutlierChannels,
    /// Normal values where a fraction of the tokens are entirely zero.
    ZeroTokens,
    /// Small values with one huge outlier per cache (near the dtype's top for f16).
    HugeOutlier,
    /// Tiny values: f16 subnormals, or 1e-30-ish for bf16/f32.
    Tiny,
    /// Negative values only.
    NegativeOnly,
    /// The same value everywhere in each row.
    ConstantRows,
    /// Every element zero.
    AllZero,
    /// Values from a grid of a few levels (many exact ties with quantization midpoints).
    Grid,
}

impl Values {
    /// Every family.
    pub const ALL: [Self; 9] = [
        Self::Normal,
        Self::OutlierChannels,
        Self::ZeroTokens,
        Self::HugeOutlier,
        Self::Tiny,
        Self::NegativeOnly,
        Self::ConstantRows,
        Self::AllZero,
        Self::Grid,
    ];
}

/// A cache of `spec` with values of family `values`, drawn from `seed`. Values are finite
/// and below 1e38 in magnitude (see the `f32_above_bf16_max` test for larger ones).
pub fn gen_cache(spec: KvSpec, values: Values, seed: u64) -> KvCache {
    let mut rng = Rng::new(seed);
    let s = spec.shape;
    let c = s.channels();
    let scale = match spec.dtype {
        DType::F16 => 2f64.powf(rng.unit() * 16.0 - 8.0),
        _ => 2f64.powf(rng.unit() * 40.0 - 20.0),
    };
    let huge = match spec.dtype {
        DType::F16 => 60_000.0,
        DType::BF16 => 1e37,
        DType::F32 => 9.9e37,
    };
    let outlier_at = (
        rng.below(s.layers),
        rng.below(2),
        rng.below(s.tokens),
        rng.below(c),
    );
    let ch_gain: Vec<f64> = (0..c)
        .map(|_| if rng.chance(0.1) { 30.0 } else { 1.0 })
        .collect();
    let zero_tok: Vec<bool> = (0..s.tokens).map(|_| rng.chance(0.3)).collect();
    let mut cache = KvCache::zeroed(spec);
    let mut row = vec![0u8; c * spec.dtype.size()];
    for l in 0..s.layers {
        for (p, part) in Part::BOTH.into_iter().enumerate() {
            for (t, &zero) in zero_tok.iter().enumerate() {
                let rowc = rng.normalish() * scale;
                for (ch, e) in row.chunks_exact_mut(spec.dtype.size()).enumerate() {
                    let v = match values {
                        Values::Normal => rng.normalish() * scale,
                        Values::OutlierChannels => rng.normalish() * scale * ch_gain[ch],
                        Values::ZeroTokens if zero => 0.0,
                        Values::ZeroTokens => rng.normalish() * scale,
                        Values::HugeOutlier if (l, p, t, ch) == outlier_at => {
                            if rng.chance(0.5) {
                                huge
                            } else {
                                -huge
                            }
                        }
                        Values::HugeOutlier => rng.normalish(),
                        Values::Tiny => {
                            let tiny = match spec.dtype {
                                DType::F16 => 3e-7,
                                _ => 1e-30,
                            };
                            rng.normalish() * tiny
                        }
                        Values::NegativeOnly => -(rng.normalish().abs() + 1e-3) * scale,
                        Values::ConstantRows => rowc,
                        Values::AllZero => 0.0,
                        Values::Grid => (rng.below(9) as f64 - 4.0) * 0.25 * scale,
                    };
                    let bits = spec.dtype.bits_from_f32(v as f32).to_le_bytes();
                    e.copy_from_slice(&bits[..spec.dtype.size()]);
                }
                cache.write_row_bytes(l, part, t, &row);
            }
        }
    }
    cache
}

/// `cache` with its values converted to `dtype` (exact when widening, round to nearest even
/// otherwise), same shape and layout.
pub fn convert(cache: &KvCache, dtype: DType) -> KvCache {
    let src = cache.spec();
    let spec = KvSpec { dtype, ..*src };
    let n = src.shape.elements();
    let mut vals = vec![0f32; n];
    src.dtype.load_f32(cache.bytes(), &mut vals);
    let mut out = Vec::with_capacity(n * dtype.size());
    for v in vals {
        out.extend_from_slice(&dtype.bits_from_f32(v).to_le_bytes()[..dtype.size()]);
    }
    KvCache::from_bytes(spec, out).expect("same shape")
}

/// Layer `layer` of `cache` as a one-layer cache (layers are contiguous in every layout).
pub fn layer_cache(cache: &KvCache, layer: usize) -> KvCache {
    let spec = cache.spec();
    let mut one = *spec;
    one.shape.layers = 1;
    let r = spec.layer_range(layer);
    let es = spec.dtype.size();
    KvCache::from_bytes(one, cache.bytes()[r.start * es..r.end * es].to_vec())
        .expect("one layer's bytes")
}

/// A spec from its parts.
pub const fn spec(
    layers: usize,
    kv_heads: usize,
    tokens: usize,
    head_dim: usize,
    layout: Layout,
    dtype: DType,
) -> KvSpec {
    KvSpec {
        shape: KvShape::new(layers, kv_heads, tokens, head_dim),
        layout,
        dtype,
    }
}

/// The bin count of a header byte (0 means 256, q8).
pub const fn bins_of(byte: u8) -> u32 {
    if byte == 0 {
        256
    } else {
        byte as u32
    }
}

/// An upper bound on the scale the codec stores for a row (or channel) of absmax `m` of
/// input in `dtype`.
///
/// 16-bit input stores its absmax exactly (it is one of the input's own values, f16 or bf16).
/// `f32` input stores it rounded *up* to bf16, at most one bf16 ulp (2^-7 relative) above.
pub fn stored_scale_upper(m: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 | DType::BF16 => m,
        DType::F32 => m * (1.0 + 1.0 / 128.0),
    }
}

/// The bound on `|x - x̂|` for the K element of channel `c` when the per-channel K scale is
/// on, with `cmax` = the largest `|K[t][c]|` over the block's tokens.
///
/// Derivation (codec/src/container/block.rs, `quantize` and `decode_payload`):
/// * the encoder stores `s = bf16_round_up(cmax)`, so `cmax <= s <= cmax·(1 + 2^-7)`, and
///   quantizes `y = x·fl(1/s)`, so `|y| <= 1 + 2^-22`;
/// * the row of `y` is quantized per token with its stored scale `m_s`: rounded up to bf16
///   for bf16/f32 input (`m_s <= 1 + 2^-7`), rounded to nearest f16 for f16 input
///   (`m_s <= 1`, and a value above `m_s` is clipped by at most `2^-11·|y| + 2^-25`, less
///   than half a step); so `|y - ŷ| <= m_s/(2·MAX)` up to f32 rounding;
/// * the decoder writes `x̂ = dtype(((q - MAX)/MAX)·m_s·s)`: the error in `x` is `s·|y - ŷ|`
///   plus a few f32 roundings (each `2^-24` relative to `|x̂| <= m_s·s`) plus the output
///   dtype's rounding of `x̂`.
///
/// So with `M = cmax·(1 + 2^-7)^2·(1 + 2^-20)` (which bounds `m_s·s`), the error is at most
/// `quant::error_bound(bins, M, dtype)` (half a step of `M`, the output rounding of `M`, f16's
/// subnormal spacing) plus `2^-21·M` for the extra f32 roundings of the division by `s`.
pub fn channel_scaled_bound(bins: u32, cmax: f32, dtype: DType) -> f32 {
    let u = 1.0 + 1.0 / 128.0f32;
    let big_m = cmax * u * u * (1.0 + 1.0 / 1_048_576.0);
    quant::error_bound(bins, big_m, dtype) + big_m / 2_097_152.0
}

/// The worst `|x - x̂| / bound` seen by [`check_within_bound`], and where.
#[derive(Debug, Clone, Default)]
pub struct BoundReport {
    /// Largest ratio of error to bound (at most 1 when the check passes).
    pub worst_ratio: f64,
    /// Elements checked.
    pub elements: usize,
}

/// Checks every element of `decoded` against `original` encoded with `opts`: bit-exact bytes
/// for `raw`; otherwise within the documented bound of each element's row (per channel for
/// K when `opts.channel_scale_k`). Returns a description of the first violation.
///
/// # Errors
/// A message naming the first element out of bound, or a spec mismatch.
pub fn check_within_bound(
    original: &KvView<'_>,
    decoded: &KvCache,
    opts: &EncodeOptions,
) -> Result<BoundReport, String> {
    if decoded.spec() != original.spec() {
        return Err(format!(
            "decoded spec {:?} differs from the input's {:?}",
            decoded.spec(),
            original.spec()
        ));
    }
    let spec = *original.spec();
    let s = spec.shape;
    let c = s.channels();
    let Some((bins_k, bins_v)) = opts.level.bins(s.layers) else {
        return if decoded.bytes() == original.bytes() {
            Ok(BoundReport {
                worst_ratio: 0.0,
                elements: s.elements(),
            })
        } else {
            let i = decoded
                .bytes()
                .iter()
                .zip(original.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            Err(format!("raw round trip differs at byte {i}"))
        };
    };
    let dec = decoded.view();
    let mut x = vec![0f32; c];
    let mut y = vec![0f32; c];
    let mut cmax = vec![0f32; c];
    let mut rep = BoundReport::default();
    for l in 0..s.layers {
        for part in Part::BOTH {
            let bins = bins_of(match part {
                Part::K => bins_k[l],
                Part::V => bins_v[l],
            });
            let per_channel = opts.channel_scale_k && part == Part::K;
            for t in 0..s.tokens {
                if per_channel && t % opts.chunk_tokens == 0 {
                    let end = (t + opts.chunk_tokens).min(s.tokens);
                    cmax.fill(0.0);
                    for u in t..end {
                        original.read_row(l, part, u, &mut x);
                        for (m, v) in cmax.iter_mut().zip(&x) {
                            *m = m.max(v.abs());
                        }
                    }
                }
                original.read_row(l, part, t, &mut x);
                dec.read_row(l, part, t, &mut y);
                let m = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let row_bound =
                    quant::error_bound(bins, stored_scale_upper(m, spec.dtype), spec.dtype);
                for ch in 0..c {
                    let bound = if per_channel {
                        channel_scaled_bound(bins, cmax[ch], spec.dtype)
                    } else {
                        row_bound
                    };
                    let err = (x[ch] - y[ch]).abs();
                    // A NaN output (or bound) is out of bound too.
                    if err.partial_cmp(&bound) != Some(std::cmp::Ordering::Less) && err != bound {
                        return Err(format!(
                            "layer {l} {} token {t} channel {ch}: x = {:e}, decoded {:e}, \
                             |error| {err:e} > bound {bound:e} (bins {bins}, row absmax {m:e}, \
                             {:?}, {:?}, chunk {}, channel_scale_k {})",
                            part.name(),
                            x[ch],
                            y[ch],
                            spec.dtype,
                            spec.layout,
                            opts.chunk_tokens,
                            opts.channel_scale_k
                        ));
                    }
                    if bound > 0.0 {
                        rep.worst_ratio = rep.worst_ratio.max((err / bound) as f64);
                    }
                }
                rep.elements += c;
            }
        }
    }
    Ok(rep)
}

/// The fields of a file header, to forge headers with any values (and a valid CRC32C).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    /// Format version byte.
    pub version: u8,
    /// Level code.
    pub level: u8,
    /// DType code.
    pub dtype: u8,
    /// Layout code.
    pub layout: u8,
    /// layers, kv_heads, tokens, head_dim.
    pub dims: [u32; 4],
    /// Tokens per block.
    pub chunk_tokens: u32,
    /// Flags.
    pub flags: u32,
    /// Bins of K then V, one byte per layer each (`2·layers` bytes).
    pub bins: Vec<u8>,
}

impl RawHeader {
    /// Parses the header fields of a valid file (no checks beyond lengths).
    pub fn parse(file: &[u8]) -> Self {
        let u32_at = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().expect("4"));
        let layers = u32_at(8) as usize;
        Self {
            version: file[4],
            level: file[5],
            dtype: file[6],
            layout: file[7],
            dims: [u32_at(8), u32_at(12), u32_at(16), u32_at(20)],
            chunk_tokens: u32_at(24),
            flags: u32_at(28),
            bins: file[32..32 + 2 * layers].to_vec(),
        }
    }

    /// The serialized header, CRC32C recomputed over its bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = FILE_MAGIC.to_vec();
        out.extend_from_slice(&[self.version, self.level, self.dtype, self.layout]);
        for d in self.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&self.chunk_tokens.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.bins);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// A header of format version [`FORMAT_VERSION`].
    pub fn new(level: u8, dtype: u8, layout: u8, dims: [u32; 4], chunk_tokens: u32) -> Self {
        Self {
            version: FORMAT_VERSION,
            level,
            dtype,
            layout,
            dims,
            chunk_tokens,
            flags: 0,
            bins: Vec::new(),
        }
    }
}

/// Length of the file header at the start of `file` (a valid one).
pub fn header_len(file: &[u8]) -> usize {
    let layers = u32::from_le_bytes(file[8..12].try_into().expect("4")) as usize;
    32 + 2 * layers + 4
}

/// The byte ranges of the blocks of a valid file, in file order.
pub fn block_ranges(file: &[u8]) -> Vec<Range<usize>> {
    let mut at = header_len(file);
    let mut out = Vec::new();
    while at < file.len() {
        let len = BLOCK_HEADER_LEN
            + u32::from_le_bytes(file[at + 16..at + 20].try_into().expect("4")) as usize;
        out.push(at..at + len);
        at += len;
    }
    assert_eq!(at, file.len(), "blocks tile the file");
    out
}

/// A block with the given header fields and payload, its CRC32C computed.
pub fn forge_block(layer: u32, token_start: u32, tokens: u32, payload: &[u8]) -> Vec<u8> {
    forge_block_with_len(layer, token_start, tokens, payload.len() as u32, payload)
}

/// A block whose `payload_len` field says `payload_len` whatever the payload's real length,
/// with a CRC32C that matches its fields and payload.
pub fn forge_block_with_len(
    layer: u32,
    token_start: u32,
    tokens: u32,
    payload_len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut fields = Vec::with_capacity(16);
    for v in [layer, token_start, tokens, payload_len] {
        fields.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&fields), payload);
    let mut out = BLOCK_MAGIC.to_vec();
    out.extend_from_slice(&fields);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The header fields `(layer, token_start, tokens)` and payload of a block.
pub fn block_parts(block: &[u8]) -> ((u32, u32, u32), &[u8]) {
    let u32_at = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().expect("4"));
    (
        (u32_at(4), u32_at(8), u32_at(12)),
        &block[BLOCK_HEADER_LEN..],
    )
}

/// Recomputes the CRC32C of the block at `range` of `file` after its bytes were changed
/// (its `payload_len` must still match the range).
pub fn fix_block_crc(file: &mut [u8], range: Range<usize>) {
    let b = &file[range.clone()];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[4..20]), &b[BLOCK_HEADER_LEN..]);
    file[range.start + 20..range.start + 24].copy_from_slice(&crc.to_le_bytes());
}

/// A loopback TCP port free right now, for a subprocess to listen on: one the kernel hands out
/// for an ephemeral bind (a fixed port could be another test's listener or connection; it
/// then gets this test's sender).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// The `kvwire` command-line binary of the `kvwire-bench` package, built on first use.
///
/// The binary belongs to another package, so Cargo neither builds it for this crate's tests
/// nor sets `CARGO_BIN_EXE_kvwire` here. We run `cargo build -p kvwire-bench --bin kvwire`
/// (the same cargo and profile as the tests, so it is fresh and a no-op when already built;
/// cargo has released its build lock by the time tests run) and take the path Cargo reports.
/// `KVWIRE_BIN` overrides it with a prebuilt binary.
///
/// # Panics
/// If the build fails, with Cargo's output.
pub fn kvwire_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KVWIRE_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
            .args([
                "build",
                "-p",
                "kvwire-bench",
                "--bin",
                "kvwire",
                "--message-format=json-render-diagnostics",
            ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("running cargo to build the kvwire binary");
        assert!(
            out.status.success(),
            "`cargo build -p kvwire-bench --bin kvwire` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .filter_map(kvwire_executable)
            .next_back()
            .unwrap_or_else(|| panic!("cargo reported no kvwire executable:\n{stdout}"))
    })
    .clone()
}

/// The `executable` of a cargo `compiler-artifact` message for the `kvwire` binary.
fn kvwire_executable(line: &str) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["reason"] != "compiler-artifact" || v["target"]["name"] != "kvwire" {
        return None;
    }
    v["executable"].as_str().map(PathBuf::from)
}

/// Two network namespaces joined by a rate-shaped veth (`tests/netns/shaped-link.sh`),
/// torn down when dropped, however the test ends. Each one has a name of its own, so tests
/// running in parallel in one process never share namespaces.
#[derive(Debug)]
pub struct ShapedLink {
    name: String,
}

impl ShapedLink {
    /// The harness script.
    pub fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("netns/shaped-link.sh")
    }

    /// Brings a link up at `rate` (tc syntax, e.g. `1gbit`), or prints `SKIPPED <test>: why`
    /// and returns `None` where namespaces cannot be made here.
    ///
    /// # Panics
    /// If the harness says it can run but `up` fails.
    pub fn up(test: &str, rate: &str) -> Option<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let check = std::process::Command::new(Self::script())
            .arg("check")
            .output()
            .expect("running shaped-link.sh check");
        if !check.status.success() {
            eprintln!(
                "SKIPPED {test}: {}",
                String::from_utf8_lossy(&check.stderr).trim()
            );
            return None;
        }
        let link = Self {
            name: format!(
                "kw{}x{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let up = std::process::Command::new(Self::script())
            .args(["up", "--name", &link.name, "--rate", rate])
            .output()
            .expect("running shaped-link.sh up");
        assert!(
            up.status.success(),
            "shaped-link.sh up: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        Some(link)
    }

    /// `program` to run inside namespace `side` (`a` = 192.0.2.1, `b` = 192.0.2.2).
    pub fn exec(&self, side: &str, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut c = std::process::Command::new(Self::script());
        c.args(["exec", side, "--name", &self.name, "--"])
            .arg(program);
        c
    }

    /// Re-shapes the link to `rate` while it is up.
    ///
    /// # Panics
    /// If the harness fails.
    pub fn set_rate(&self, rate: &str) {
        let st = std::process::Command::new(Self::script())
            .args(["rate", "--name", &self.name, "--rate", rate])
            .status()
            .expect("running shaped-link.sh rate");
        assert!(st.success(), "shaped-link.sh rate {rate} failed");
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Self::script())
            .args(["down", "--name", &self.name])
            .status();
    }
}
