//! What encoding and decoding really cost in transfers on this machine, measured by the
//! transfers themselves and remembered for the next ones.
//!
//! The calibration times each codec alone on a small sample. A transfer runs encoders,
//! decoders and the transport's threads at once, and the receiver decodes into a cache it has
//! just allocated, whose pages the kernel zeroes on first touch. On this 2-core VM that made
//! real transfers cost 1.3x the calibrated encode CPU and 1.6-2.5x the calibrated decode CPU
//! (`cg-low`'s receiver: 256 ms of CPU where 108 were priced, a third of it zeroing fresh
//! pages). Priced that low, the heavy levels looked cheap enough that a 3 Gbit/s link read 15%
//! low tipped the policy from `q8` to `cg-low`, which then ran twice as long.
//!
//! Each end times its own codec work on the thread CPU clock (which, unlike wall time, does
//! not count waiting for a core that the other end holds): the sender each block's encode,
//! the receiver each block's decode and placement. At the end of a transfer each end folds
//! its per-level CPU seconds per input byte into a small file under the cache dir, keyed like
//! the calibration (a level needs [`MIN_BLOCKS`] blocks to count; each transfer moves the kept
//! value halfway). The sender prices encodes, and the receiver reports decode speeds, from
//! those where a level has them, from the calibration elsewhere.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvwire_codec::Level;

/// Blocks of a level a transfer must have timed for its cost to be kept.
pub const MIN_BLOCKS: u64 = 8;
/// Largest file read back.
const MAX_FILE: u64 = 4096;

/// Which end's work a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The sender's encodes.
    Encode,
    /// The receiver's decodes.
    Decode,
}

impl Side {
    fn file_name(self) -> &'static str {
        match self {
            Self::Encode => "learned-encode-v1",
            Self::Decode => "learned-decode-v1",
        }
    }
}

/// CPU time and input bytes of the blocks coded at each level over one transfer; shared by
/// the threads that code them. A level's first block is left out: it may have built the
/// level's model tables.
#[derive(Debug, Default)]
pub struct CpuTally {
    /// Per [`Level::code`]: CPU ns, input bytes, blocks counted, blocks offered.
    levels: [[AtomicU64; 4]; 6],
}

impl CpuTally {
    /// Adds a block of `bytes` input bytes at `level` that took `cpu`.
    pub fn add(&self, level: Level, bytes: u64, cpu: Duration) {
        let Some(l) = self.levels.get(usize::from(level.code())) else {
            return;
        };
        if l[3].fetch_add(1, Ordering::Relaxed) == 0 {
            return;
        }
        l[0].fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        l[1].fetch_add(bytes, Ordering::Relaxed);
        l[2].fetch_add(1, Ordering::Relaxed);
    }

    /// CPU seconds per input byte at each level with at least [`MIN_BLOCKS`] blocks.
    pub fn per_byte(&self) -> Vec<(Level, f64)> {
        Level::ALL
            .iter()
            .filter_map(|&level| {
                let l = &self.levels[usize::from(level.code())];
                let (ns, bytes, blocks) = (
                    l[0].load(Ordering::Relaxed),
                    l[1].load(Ordering::Relaxed),
                    l[2].load(Ordering::Relaxed),
                );
                (blocks >= MIN_BLOCKS && bytes > 0 && ns > 0)
                    .then(|| (level, ns as f64 * 1e-9 / bytes as f64))
            })
            .collect()
    }
}

/// The CPU clock of the calling thread.
pub fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// CPU seconds per input byte, per level, as this machine's transfers have measured them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LearnedCosts {
    /// (level, CPU seconds per input byte).
    pub levels: Vec<(Level, f64)>,
}

impl LearnedCosts {
    /// The kept cost of `level`, if any.
    pub fn get(&self, level: Level) -> Option<f64> {
        self.levels.iter().find(|(l, _)| *l == level).map(|p| p.1)
    }

    /// One thread's bytes/s at `level` by the kept cost, if any.
    pub fn rate(&self, level: Level) -> Option<f64> {
        self.get(level).map(|c| 1.0 / c)
    }

    /// Moves each level's kept cost halfway towards `measured` (a new level takes it as is).
    pub fn fold(&mut self, measured: &[(Level, f64)]) {
        for &(level, cost) in measured {
            if !(cost.is_finite() && cost > 0.0) {
                continue;
            }
            match self.levels.iter_mut().find(|(l, _)| *l == level) {
                Some((_, kept)) => *kept += 0.5 * (cost - *kept),
                None => self.levels.push((level, cost)),
            }
        }
    }

    fn to_text(&self, key: &str) -> String {
        let mut s = format!("kvwire-learned 1\nkey {key}\n");
        for (level, cost) in &self.levels {
            s += &format!("level {level} {cost}\n");
        }
        s
    }

    /// [`Self::to_text`] for `key`; `None` for anything else.
    fn parse(text: &str, key: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != "kvwire-learned 1" || lines.next()?.strip_prefix("key ")? != key {
            return None;
        }
        let mut levels = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split(' ').collect();
            let ["level", name, cost] = f[..] else {
                return None;
            };
            let cost: f64 = cost.parse().ok()?;
            // Between 1 TB/s and 1 MB/s a thread: anything else is not a measurement.
            if !(1e-12..=1e-6).contains(&cost) {
                return None;
            }
            levels.push((name.parse().ok()?, cost));
        }
        Some(Self { levels })
    }

    /// What this machine and build's transfers measured for `side` (empty if nothing yet).
    pub fn load(side: Side) -> Self {
        path(side)
            .and_then(|p| read_bounded(&p))
            .and_then(|t| Self::parse(&t, &super::calib::machine_key()))
            .unwrap_or_default()
    }

    /// Folds `measured` into what is kept for `side`; a file that cannot be written is only
    /// logged (the costs are a hint).
    pub fn remember(side: Side, measured: &[(Level, f64)]) {
        if measured.is_empty() {
            return;
        }
        let Some(path) = path(side) else {
            return;
        };
        let mut kept = Self::load(side);
        kept.fold(measured);
        // Written aside and renamed: a reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let key = super::calib::machine_key();
        let write = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, kept.to_text(&key)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = write {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the measured codec costs");
        }
    }
}

fn path(side: Side) -> Option<PathBuf> {
    Some(super::calib::cache_path()?.with_file_name(side.file_name()))
}

fn read_bounded(p: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(p).ok()?;
    let mut s = String::new();
    f.take(MAX_FILE).read_to_string(&mut s).ok()?;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_gives_cpu_per_byte_for_levels_with_enough_blocks() {
        let t = CpuTally::default();
        // The first block (a table build) is not counted.
        t.add(Level::CgLow, 200_000, Duration::from_millis(20));
        for _ in 0..MIN_BLOCKS {
            t.add(Level::CgLow, 200_000, Duration::from_micros(400));
        }
        for _ in 0..MIN_BLOCKS {
            t.add(Level::Q8, 200_000, Duration::from_micros(100));
        }
        let got = t.per_byte();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, Level::CgLow);
        assert!((got[0].1 - 2e-9).abs() < 1e-15, "{}", got[0].1);
    }

    #[test]
    fn each_transfer_moves_the_kept_cost_halfway() {
        let mut k = LearnedCosts::default();
        k.fold(&[(Level::CgLow, 2e-9)]);
        assert_eq!(k.get(Level::CgLow), Some(2e-9));
        k.fold(&[
            (Level::CgLow, 4e-9),
            (Level::Raw, f64::NAN),
            (Level::Q8, 1e-9),
        ]);
        assert!((k.get(Level::CgLow).unwrap() - 3e-9).abs() < 1e-18);
        assert_eq!(k.get(Level::Raw), None);
        assert!((k.rate(Level::Q8).unwrap() - 1e9).abs() < 1.0);
    }

    #[test]
    fn the_file_roundtrips_for_its_key_only() {
        let mut k = LearnedCosts::default();
        k.fold(&[(Level::CgLow, 2.5e-9), (Level::Q8, 6e-10)]);
        let text = k.to_text("machine");
        assert_eq!(LearnedCosts::parse(&text, "machine"), Some(k));
        assert_eq!(LearnedCosts::parse(&text, "other"), None);
        assert_eq!(LearnedCosts::parse("", "machine"), None);
        // A cost no codec has (1 byte/s) is refused.
        let bad = "kvwire-learned 1\nkey machine\nlevel q8 1\n";
        assert_eq!(LearnedCosts::parse(bad, "machine"), None);
    }
}
