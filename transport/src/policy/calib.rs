//! This machine's codec speeds per level, measured on the embedded real KV sample (256 tokens
//! of SmolLM2-135M) with one thread per core at once, and cached in
//! `$XDG_CACHE_HOME/kvwire/calibration-v1`
//! (or `~/.cache/kvwire/`). The cache is keyed by the CPU (model name and core count from
//! `/proc/cpuinfo`) and the build (a hash of the running executable's path, size and mtime
//! plus this crate's version); a different key measures again.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use kvwire_codec::model::ModelRole;
use kvwire_codec::{file, Decoder, EncodeOptions, Encoder, Level};
use sha2::{Digest, Sha256};

use super::AUTO_LEVELS;
use crate::error::Result;

static SAMPLE: &[u8] = include_bytes!("../../../codec/testdata/smollm2-pydoc-256.safetensors");

/// The process's calibration, once loaded or measured.
static ONCE: OnceLock<Calibration> = OnceLock::new();

/// Largest cache file read back.
const MAX_FILE: u64 = 16 * 1024;

/// One level's measured speeds per thread, with a thread on every core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelSpeed {
    /// The level.
    pub level: Level,
    /// Encoded bytes per input byte on the sample.
    pub ratio: f64,
    /// Input bytes/s encoded by one thread while every core encodes.
    pub encode_rate: f64,
    /// Input bytes/s decoded (into a fresh cache) by one thread while every core decodes.
    pub decode_rate: f64,
    /// Seconds the level's first use in a process costs before its first block: building
    /// its coder's model tables (0 for levels without them).
    pub setup: f64,
}

/// Passes over the sample per level; the fastest counts. Fifteen: the entropy-coded levels
/// run within a few percent of each other, and on a shared 2-core VM seven passes (about half
/// a second) left their order to chance (cg-low's encode speed measured 9% below and 23%
/// above cg-default's in four calibrations of builds with the same codec), which decides
/// among them where the cores bound a transfer. A debug build (tests) makes two: its speeds
/// say nothing of a release build's, and seven take it half a minute.
pub const CALIBRATION_PASSES: usize = if cfg!(debug_assertions) { 2 } else { 15 };

/// Codec speeds of this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// The key the measurement belongs to (CPU and build).
    pub key: String,
    /// Per level, [`AUTO_LEVELS`] order.
    pub levels: Vec<LevelSpeed>,
    /// Cores of this machine (the policy multiplies per-thread rates by the threads used).
    pub cores: usize,
}

impl Calibration {
    /// The speeds of `level`, if measured.
    pub fn get(&self, level: Level) -> Option<LevelSpeed> {
        self.levels.iter().copied().find(|l| l.level == level)
    }

    /// Measures every auto level on the embedded sample (best of [`CALIBRATION_PASSES`]
    /// passes; about two seconds in all on a 2-core VM).
    ///
    /// Each pass runs one thread per core at once, as a transfer does: a single thread on an
    /// idle machine reads faster than each of several that share the memory system, and the
    /// receiver's decoders place chunks into a fresh cache (page faults, cold lines) rather
    /// than into one warm buffer. The rates stored are per thread under that load.
    ///
    /// # Errors
    /// Codec errors on the sample (a bug).
    pub fn measure() -> Result<Self> {
        let (view, _) = file::view_safetensors(SAMPLE)?;
        let spec = *view.spec();
        let input = spec.byte_len() as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Per level: its coder pair, the blocks of one unmeasured pass (what the decode passes
        // read), and the setup time.
        let mut prepared = Vec::new();
        for level in AUTO_LEVELS {
            let enc = Encoder::new(spec, &EncodeOptions::level(level))?;
            let mut header = Vec::new();
            enc.write_header(&mut header);
            let (dec, _) = Decoder::new(&header).map_err(kvwire_codec::CodecError::from)?;
            // The tables this level needs beyond what earlier levels built (each process
            // builds a table set once; the levels are measured in the order auto tries them).
            // A decoder's (a superset of an encoder's): what a receiver lacking them pays.
            let t = Instant::now();
            enc.header().prepare_models(ModelRole::Decode);
            let setup = t.elapsed().as_secs_f64();
            let blocks = encode_sample(&enc, &view)?;
            prepared.push((level, enc, dec, blocks, setup));
        }
        // The passes go round the levels, so that a spell of the machine running slow (its
        // neighbours, on a shared host) costs each level a pass rather than one level all.
        let mut best = vec![(f64::INFINITY, f64::INFINITY); prepared.len()];
        for _ in 0..CALIBRATION_PASSES {
            for ((_, enc, dec, blocks, _), (encode_s, decode_s)) in prepared.iter().zip(&mut best) {
                *encode_s = encode_s.min(on_every_core(cores, || {
                    encode_sample(enc, &view).map(drop)
                })?);
                *decode_s = decode_s.min(on_every_core(cores, || decode_sample(dec, blocks))?);
            }
        }
        let levels = prepared
            .iter()
            .zip(best)
            .map(
                |((level, _, _, blocks, setup), (encode_s, decode_s))| LevelSpeed {
                    level: *level,
                    ratio: blocks.iter().map(Vec::len).sum::<usize>() as f64 / input,
                    encode_rate: input / encode_s.max(1e-6),
                    decode_rate: input / decode_s.max(1e-6),
                    setup: *setup,
                },
            )
            .collect();
        Ok(Self {
            key: machine_key(),
            levels,
            cores,
        })
    }

    /// The cached calibration of this machine and build, measured (and written to the cache)
    /// when missing or stale; measured once per process.
    ///
    /// # Errors
    /// As [`Self::measure`]. A cache that cannot be written is only logged.
    pub fn cached() -> Result<Self> {
        if let Some(c) = ONCE.get() {
            return Ok(c.clone());
        }
        let key = machine_key();
        let path = cache_path();
        if let Some(c) = path
            .as_ref()
            .and_then(|p| read_bounded(p))
            .and_then(|t| Self::parse(&t))
            .filter(|c| c.key == key)
        {
            return Ok(ONCE.get_or_init(|| c).clone());
        }
        let t = Instant::now();
        let c = Self::measure()?;
        tracing::info!(
            ms = t.elapsed().as_millis() as u64,
            "codec calibration measured"
        );
        if let Some(p) = &path {
            let write = p
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(p, c.to_text()));
            if let Err(e) = write {
                tracing::warn!(path = %p.display(), error = %e, "cannot cache the calibration");
            }
        }
        Ok(ONCE.get_or_init(|| c).clone())
    }

    /// Makes `self` the process's calibration (what [`Self::cached`] returns) without
    /// touching the cache file, e.g. fixed speeds in tests; false if one was already in use.
    pub fn install(self) -> bool {
        ONCE.set(self).is_ok()
    }

    /// The cache file's text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "kvwire-calibration 3\nkey {}\ncores {}\n",
            self.key, self.cores
        );
        for l in &self.levels {
            s += &format!(
                "level {} {} {} {} {}\n",
                l.level, l.ratio, l.encode_rate, l.decode_rate, l.setup
            );
        }
        s
    }

    /// Parses [`Self::to_text`]; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != "kvwire-calibration 3" {
            return None;
        }
        let key = lines.next()?.strip_prefix("key ")?.to_string();
        let cores = lines.next()?.strip_prefix("cores ")?.parse().ok()?;
        let mut levels = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split(' ').collect();
            let ["level", name, ratio, enc, dec, setup] = f[..] else {
                return None;
            };
            let num = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0);
            levels.push(LevelSpeed {
                level: name.parse().ok()?,
                ratio: num(ratio)?,
                encode_rate: num(enc)?,
                decode_rate: num(dec)?,
                setup: setup
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && (0.0..60.0).contains(v))?,
            });
        }
        (levels.len() == AUTO_LEVELS.len()).then_some(Self { key, levels, cores })
    }
}

/// Every block of the sample at `enc`'s level, in order.
fn encode_sample(enc: &Encoder, view: &kvwire_codec::KvView<'_>) -> Result<Vec<Vec<u8>>> {
    let spec = view.spec();
    let mut blocks = Vec::new();
    for l in 0..spec.shape.layers {
        for c in 0..enc.header().chunks() {
            let mut b = Vec::new();
            enc.encode_block(view, l, c, &mut b)?;
            blocks.push(b);
        }
    }
    Ok(blocks)
}

/// Decodes `blocks` into a fresh cache the way the receiver does: each chunk decoded, then
/// placed into its layer.
fn decode_sample(dec: &Decoder, blocks: &[Vec<u8>]) -> Result<()> {
    let spec = dec.header().spec;
    let mut cache = crate::raw::zeroed_vec(spec.byte_len()).ok_or_else(|| {
        crate::TransportError::Invalid("cannot allocate the calibration cache".into())
    })?;
    let mut chunk = Vec::new();
    for b in blocks {
        let (_, c) = dec
            .block_header(b)
            .map_err(kvwire_codec::CodecError::from)?;
        chunk.resize(dec.chunk_spec(c).byte_len(), 0);
        let info = dec.decode_block_chunk(b, &mut chunk)?;
        let r = crate::session::layer_bytes(&spec, info.layer);
        dec.place_chunk(&info, &chunk, &mut cache[r])?;
    }
    std::hint::black_box(&cache);
    Ok(())
}

/// Runs `work` on `threads` threads at once; seconds until the last one finished.
fn on_every_core(threads: usize, work: impl Fn() -> Result<()> + Sync) -> Result<f64> {
    let barrier = std::sync::Barrier::new(threads);
    let t = std::sync::Mutex::new(None::<Instant>);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    if barrier.wait().is_leader() {
                        *t.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    }
                    work()
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| {
                crate::TransportError::Invalid("a calibration thread panicked".into())
            })??;
        }
        Ok::<(), crate::TransportError>(())
    })?;
    let start = t.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(start.map_or(0.0, |t| t.elapsed().as_secs_f64()))
}

fn read_bounded(p: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(p).ok()?;
    let mut s = String::new();
    f.take(MAX_FILE).read_to_string(&mut s).ok()?;
    Some(s)
}

/// `$XDG_CACHE_HOME/kvwire/calibration-v1`, else `~/.cache/kvwire/calibration-v1`.
pub fn cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kvwire").join("calibration-v1"))
}

/// This machine's identity for this boot (a hash of the kernel's boot id), 0 if unknown:
/// two endpoints with the same id share one machine's cores, so their codec stages compete.
pub fn host_id() -> u64 {
    let Ok(id) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return 0;
    };
    let h = Sha256::digest(id.trim().as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")).max(1)
}

/// CPU model and core count, and the build: changes to either invalidate the cache.
pub fn machine_key() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION"));
    if let Ok(exe) = std::env::current_exe() {
        h.update(exe.to_string_lossy().as_bytes());
        if let Ok(m) = exe.metadata() {
            h.update(m.len().to_le_bytes());
            if let Ok(t) = m.modified() {
                let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                h.update(since.as_nanos().to_le_bytes());
            }
        }
    }
    let build: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Spaces separate fields in the cache file.
    format!("{}|{cores}|{build}", model.replace(' ', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_quickly_and_roundtrips_through_the_cache_text() {
        let t = Instant::now();
        let c = Calibration::measure().unwrap();
        // Debug builds are slower; the release build takes a fraction of this.
        assert!(t.elapsed().as_secs_f64() < 30.0);
        assert_eq!(c.levels.len(), AUTO_LEVELS.len());
        let raw = c.get(Level::Raw).unwrap();
        let low = c.get(Level::CgLow).unwrap();
        assert!((raw.ratio - 1.0).abs() < 0.01, "{}", raw.ratio);
        assert!(low.ratio < 0.3, "{}", low.ratio);
        assert_eq!(Calibration::parse(&c.to_text()), Some(c.clone()));
        assert!(
            Calibration::parse("kvwire-calibration 3\nkey x\ncores 2\nlevel raw 1 NaN 1 0\n")
                .is_none()
        );
        // Earlier formats (2: one thread on an idle machine; 1: no setup times) are measured
        // again.
        for old in [" 1\n", " 2\n"] {
            assert!(Calibration::parse(&c.to_text().replacen(" 3\n", old, 1)).is_none());
        }
        // Levels with model tables take time to set up; raw and q8 have none to build.
        assert!(c.get(Level::CgHigh).unwrap().setup > 0.0);
        assert!(raw.setup < c.get(Level::CgHigh).unwrap().setup);
        assert!(Calibration::parse("").is_none());
    }
}
