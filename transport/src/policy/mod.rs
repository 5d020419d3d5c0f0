//! Choosing a compression level per block from measured rates (issue 5, parts 3-5).
//!
//! - [`model`]: the pure decision — inputs (link rate, codec speeds on both sides, output
//!   ratio per level, blocks left, quality floor, deadline) -> level. No clock, no IO.
//! - [`rate`]: the link-rate estimator (windows of completed writes over the time the link was
//!   busy, corrected for the round trip each idle-to-busy period pays; the estimate is the
//!   second highest of the last five) and the send pacer.
//! - [`calib`]: this machine's encode/decode throughput per level with every core busy,
//!   measured on the embedded real KV sample and cached under the user's cache dir.

pub mod calib;
pub mod model;
pub mod rate;

pub use calib::{Calibration, LevelSpeed};
pub use model::{choose, Choice, LevelCost, PolicyInputs};
pub use rate::{LinkEstimate, Pacer, RateEstimator};

use kvwire_codec::Level;

/// The levels `--level auto` chooses among, best quality first (`lmcache` is `cg-default`'s
/// bins with a slower coder, so never the better choice).
pub const AUTO_LEVELS: [Level; 5] = [
    Level::Raw,
    Level::Q8,
    Level::CgHigh,
    Level::CgDefault,
    Level::CgLow,
];

/// How the sender picks levels when the policy is on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyOptions {
    /// Lowest quality allowed (`None`: down to `cg-low`).
    pub floor: Option<Level>,
    /// Deadline mode: the highest quality whose predicted finish meets this budget from the
    /// transfer's start (CacheGen §4); `None`: minimize the time to the last decoded layer.
    pub deadline: Option<std::time::Duration>,
    /// Link rate to assume before any measurement, bytes/s (`None`: start from what an
    /// earlier transfer on the connection measured, if fresh, else probe).
    pub initial_rate: Option<f64>,
    /// Probe the link even where an earlier transfer on the connection left a fresh
    /// estimate ([`LinkEstimate`]).
    pub always_probe: bool,
    /// Codec speeds of this machine (`None`: load or measure [`Calibration::cached`]).
    pub calibration: Option<Calibration>,
}

impl PolicyOptions {
    /// The candidate levels under the floor, best quality first.
    ///
    /// # Errors
    /// A floor that `auto` does not choose among (`lmcache`).
    pub fn candidates(&self) -> crate::Result<Vec<Level>> {
        let floor = self.floor.unwrap_or(Level::CgLow);
        let Some(last) = AUTO_LEVELS.iter().position(|&l| l == floor) else {
            return Err(crate::TransportError::Invalid(format!(
                "--floor {floor}: the policy chooses among {}",
                AUTO_LEVELS.map(Level::name).join(", ")
            )));
        };
        Ok(AUTO_LEVELS[..=last].to_vec())
    }
}

/// What the policy did over one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicySummary {
    /// Blocks sent per level, indexed by [`Level::code`].
    pub blocks_per_level: [u32; 6],
    /// Link rate of the first decision taken at one, bytes/s (the probe's first blocks go
    /// before it has a reading).
    pub first_rate: u64,
    /// Link rate estimate at the end, bytes/s.
    pub last_rate: u64,
    /// Round trip measured by the probe, ns.
    pub rtt_ns: u64,
    /// CPU time the transport spent per byte it sent during the probe, ps (0: not measured,
    /// or a fabric that moves bytes without the CPU).
    pub wire_cpu_ps: u64,
    /// Times the chosen level changed from one block to the next.
    pub switches: u32,
    /// [`Level::code`] of the level of that decision's block.
    pub first_level: u8,
    /// [`Level::code`] of the last block's level.
    pub last_level: u8,
    /// The receiver reported this machine's host id: the codec stages shared its cores.
    pub shared_cpu: bool,
    /// Whether the transfer probed the link (else it started from an earlier transfer's
    /// estimate on the connection, or from [`PolicyOptions::initial_rate`]).
    pub probed: bool,
    /// Blocks the probe sent as its writes (counted in [`Self::blocks_per_level`] too).
    pub probe_blocks: u32,
}

impl PolicySummary {
    /// "level:count" pairs of the levels used, e.g. `raw:12 q8:468`.
    pub fn counts(&self) -> String {
        Level::ALL
            .iter()
            .filter(|l| self.blocks_per_level[usize::from(l.code())] > 0)
            .map(|l| format!("{}:{}", l, self.blocks_per_level[usize::from(l.code())]))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
