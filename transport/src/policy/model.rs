//! The decision, pure: no clock, no IO, only numbers in and a level out.
//!
//! Encode, wire and decode run as a pipeline over blocks (the sender encodes block i+1 while
//! block i is on the wire and block i-1 decodes), so `n` blocks of one level take about
//!
//! ```text
//! T(n) = n * pace(e, w, d) + (e + w + d - max(e, w, d))
//! ```
//!
//! where e, w, d are one block's encode, wire and decode times: the slowest stage sets the
//! pace, the other two are paid once (filling the pipe before the slow stage, draining after
//! it). The pace is a soft maximum of the stages ([`STAGE_NORM`]): stages of nearly equal
//! time hold each other up, the wire waiting for a block still being encoded, the encoder
//! for a buffer still on the wire. e = block bytes / (encode bytes/s per core x sender
//! threads), w = block bytes x ratio / link bytes/s, d = block bytes / receiver decode
//! bytes/s (the receiver reports its total).
//! Moving the encoded bytes also costs each end CPU (a TCP stack, a copy; nothing over RDMA):
//! x = block bytes x ratio x [`PolicyInputs::wire_cpu`], on the same cores as the codec, so
//! the sender's stage is e + x and the receiver's d + x; on one machine's cores, e + d + 2x.
//! Where the link is the machine itself (two namespaces over veth) that term is what makes
//! compressing cost more than it saves.
//! The policy prices every candidate level as if the rest of the transfer used it and picks
//! the cheapest; in deadline mode the best quality whose T fits the time left. A level not yet
//! used in this process also pays its setup once (building its coder's tables), and the level
//! in use is kept unless another is cheaper by more than [`HYSTERESIS`]: among levels that
//! price within a few percent of each other, hopping costs more than it saves.

use kvwire_codec::Level;

/// What one candidate level costs per byte of input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelCost {
    /// The level.
    pub level: Level,
    /// Encoded bytes per input byte.
    pub ratio: f64,
    /// Sender's encode throughput over all its threads, input bytes/s.
    pub encode_rate: f64,
    /// Receiver's decode throughput over all its threads, input bytes/s.
    pub decode_rate: f64,
    /// Seconds its first block costs before encoding can start (0 once set up).
    pub setup: f64,
}

/// Everything the decision looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInputs<'a> {
    /// Candidates allowed by the floor, best quality first.
    pub levels: &'a [LevelCost],
    /// Link rate estimate, bytes/s.
    pub link_rate: f64,
    /// Input bytes of one block.
    pub block_bytes: f64,
    /// Blocks still to send, this one included.
    pub blocks_left: u64,
    /// Time left before the deadline, seconds (`None`: no deadline).
    pub time_left: Option<f64>,
    /// Sender and receiver run on one machine's cores: encode and decode compete, so their
    /// stage is e + d rather than two stages of their own.
    pub shared_cpu: bool,
    /// Index of the level the previous block used, if any.
    pub current: Option<usize>,
    /// Seconds of each end's cores (all of them at once) that one wire byte costs to send or
    /// receive, besides the codec: the transport's measured CPU time per byte over the
    /// cores; 0 where it moves bytes without the CPU.
    pub wire_cpu: f64,
}

/// How much cheaper (relative) another level must price to replace the one in use: more
/// than the link estimate and the codec speeds move by from one window to the next on a
/// busy machine, so that near-equal levels do not alternate with them.
pub const HYSTERESIS: f64 = 0.1;

/// The norm of the stage times that paces the pipeline: (e^p + w^p + d^p)^(1/p). The
/// slowest stage alone at p = infinity; at 6, two equal stages pace at 1.12x either, a stage
/// half the slowest adds 0.3%. Chosen at 1 Gbit/s here, where `cg-high` (its wire about as
/// slow as the shared cores) ran 2-8% slower than `cg-low` (its wire at 60% of them) in five
/// measurements while their maxima priced within 2%: noise in the calibration then sent
/// `auto` to `cg-high` in 5-10 runs of 15. With the 6-norm, 15 of 20 runs chose `cg-low`
/// (4 of 20 before) under the same calibration.
pub const STAGE_NORM: f64 = 6.0;

/// The soft maximum of `stages` ([`STAGE_NORM`]), scaled by the largest so that it neither
/// overflows nor underflows.
fn pace(stages: &[f64]) -> f64 {
    let max = stages.iter().copied().fold(0.0, f64::max);
    if max <= 0.0 || !max.is_finite() {
        return max;
    }
    max * stages
        .iter()
        .map(|s| (s / max).powf(STAGE_NORM))
        .sum::<f64>()
        .powf(1.0 / STAGE_NORM)
}

/// A decision and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Index into `PolicyInputs::levels`.
    pub index: usize,
    /// The level.
    pub level: Level,
    /// Predicted seconds until the last block decoded if the rest used this level.
    pub predicted: f64,
}

/// Predicted seconds for `n` blocks of `c` (the pipeline model above: stages e + x, w and
/// d + x; with `shared_cpu`, e + d + 2x and w; paced by their soft maximum).
pub fn predict(
    c: &LevelCost,
    link_rate: f64,
    block_bytes: f64,
    n: u64,
    shared_cpu: bool,
    wire_cpu: f64,
) -> f64 {
    let pos = |r: f64| if r.is_finite() && r > 0.0 { r } else { 1.0 };
    let wire_bytes = block_bytes * c.ratio.max(0.0);
    let e = block_bytes / pos(c.encode_rate);
    let w = wire_bytes / pos(link_rate);
    let d = block_bytes / pos(c.decode_rate);
    let x = if wire_cpu.is_finite() {
        wire_bytes * wire_cpu.max(0.0)
    } else {
        0.0
    };
    let (slow, paced) = if shared_cpu {
        let cores = e + d + 2.0 * x;
        (cores.max(w), pace(&[cores, w]))
    } else {
        ((e + x).max(w).max(d + x), pace(&[e + x, w, d + x]))
    };
    n as f64 * paced + (e + w + d - slow).max(0.0)
}

/// Picks the level for the next block; `None` only when `levels` is empty.
pub fn choose(inp: &PolicyInputs<'_>) -> Option<Choice> {
    let n = inp.blocks_left.max(1);
    let priced: Vec<Choice> = inp
        .levels
        .iter()
        .enumerate()
        .map(|(index, c)| Choice {
            index,
            level: c.level,
            predicted: predict(
                c,
                inp.link_rate,
                inp.block_bytes,
                n,
                inp.shared_cpu,
                inp.wire_cpu,
            ) + if c.setup.is_finite() {
                c.setup.max(0.0)
            } else {
                0.0
            },
        })
        .collect();
    let cheapest = priced
        .iter()
        .copied()
        .min_by(|a, b| a.predicted.total_cmp(&b.predicted))?;
    let fastest = match inp.current.and_then(|i| priced.get(i)) {
        Some(cur) if cur.predicted <= cheapest.predicted * (1.0 + HYSTERESIS) => *cur,
        _ => cheapest,
    };
    match inp.time_left {
        // Best quality first: the first that meets the deadline, else the fastest.
        Some(left) => Some(
            priced
                .iter()
                .copied()
                .find(|c| c.predicted <= left)
                .unwrap_or(fastest),
        ),
        None => Some(fastest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roughly this machine: q8 is cheap, the entropy-coded levels cost ~0.25 GB/s a core.
    fn levels(floor: usize) -> Vec<LevelCost> {
        let all = [
            (Level::Raw, 1.0, 20e9, 20e9),
            (Level::Q8, 0.52, 2e9, 3e9),
            (Level::CgHigh, 0.20, 0.5e9, 0.5e9),
            (Level::CgDefault, 0.15, 0.5e9, 0.5e9),
            (Level::CgLow, 0.12, 0.5e9, 0.5e9),
        ];
        all[..=floor]
            .iter()
            .map(|&(level, ratio, encode_rate, decode_rate)| LevelCost {
                level,
                ratio,
                encode_rate,
                decode_rate,
                setup: 0.0,
            })
            .collect()
    }

    fn pick(levels: &[LevelCost], gbit: f64, deadline: Option<f64>) -> Level {
        choose(&PolicyInputs {
            levels,
            link_rate: gbit * 1e9 / 8.0,
            block_bytes: 196_608.0,
            blocks_left: 480,
            time_left: deadline,
            shared_cpu: false,
            current: None,
            wire_cpu: 0.0,
        })
        .unwrap()
        .level
    }

    #[test]
    fn raw_on_fast_links() {
        assert_eq!(pick(&levels(4), 100.0, None), Level::Raw);
        assert_eq!(pick(&levels(4), 400.0, None), Level::Raw);
    }

    #[test]
    fn compression_on_slow_links() {
        // 0.1 Gbit/s: wire-bound at every level, so the smallest output wins.
        assert_eq!(pick(&levels(4), 0.1, None), Level::CgLow);
        // 3 Gbit/s: q8 halves the wire time and encodes faster than the wire.
        assert_eq!(pick(&levels(4), 3.0, None), Level::Q8);
        // 1 Gbit/s: the wire at q8 (0.52 / 0.125 GB/s) is slower than cg-low's encode.
        assert_eq!(pick(&levels(4), 1.0, None), Level::CgLow);
    }

    #[test]
    fn never_below_the_floor() {
        for gbit in [0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0] {
            for floor in 0..5 {
                let ls = levels(floor);
                let got = pick(&ls, gbit, None);
                assert!(ls.iter().any(|c| c.level == got), "{gbit} {floor} {got}");
            }
        }
        assert_eq!(pick(&levels(1), 0.1, None), Level::Q8);
        assert_eq!(pick(&levels(0), 0.1, None), Level::Raw);
    }

    #[test]
    fn level_gets_no_better_as_the_link_slows() {
        let ls = levels(4);
        let rank = |l: Level| ls.iter().position(|c| c.level == l).unwrap();
        let mut last = 0;
        for gbit in [400.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.01] {
            let r = rank(pick(&ls, gbit, None));
            assert!(
                r >= last,
                "{gbit} Gbit/s chose a better level than a faster link"
            );
            last = r;
        }
    }

    #[test]
    fn the_transports_cpu_tips_a_machine_bound_link_towards_raw() {
        // Two namespaces on one 2-core machine, "link" 8 Gbit/s (the veth pair, as fast as
        // the cores push it); q8 costs more codec time than it saves wire time once moving
        // each byte is seen to cost the cores too.
        let ls = [
            LevelCost {
                level: Level::Raw,
                ratio: 1.0,
                encode_rate: 12e9,
                decode_rate: 8.8e9,
                setup: 0.0,
            },
            LevelCost {
                level: Level::Q8,
                ratio: 0.5,
                encode_rate: 1.9e9,
                decode_rate: 2.8e9,
                setup: 0.0,
            },
        ];
        let pick = |link_gbit: f64, wire_cpu: f64| {
            choose(&PolicyInputs {
                levels: &ls,
                link_rate: link_gbit * 1e9 / 8.0,
                block_bytes: 196_608.0,
                blocks_left: 480,
                time_left: None,
                shared_cpu: true,
                current: None,
                wire_cpu,
            })
            .unwrap()
            .level
        };
        // 0.4 ns of CPU per byte sent (as measured over veth here), spread over 2 cores.
        assert_eq!(pick(8.0, 0.0), Level::Q8);
        assert_eq!(pick(8.0, 0.2e-9), Level::Raw);
        // A real 3 Gbit/s link stays worth halving whatever the transport costs.
        assert_eq!(pick(3.0, 0.2e-9), Level::Q8);
    }

    #[test]
    fn deadline_takes_the_best_quality_that_fits() {
        let ls = levels(4);
        // 480 blocks of 192 KiB = 94 MB; at 1 Gbit/s raw takes 0.75 s, q8 ~0.4 s,
        // cg-* ~0.19 s (encode-bound).
        assert_eq!(pick(&ls, 1.0, Some(10.0)), Level::Raw);
        assert_eq!(pick(&ls, 1.0, Some(0.5)), Level::Q8);
        assert_eq!(pick(&ls, 1.0, Some(0.3)), Level::CgHigh);
        // Nothing fits: the fastest.
        assert_eq!(pick(&ls, 1.0, Some(0.01)), Level::CgLow);
    }

    #[test]
    fn pipeline_model_is_a_soft_max_plus_fill_and_drain() {
        let c = LevelCost {
            level: Level::Q8,
            ratio: 0.5,
            encode_rate: 1.0,
            decode_rate: 4.0,
            setup: 0.0,
        };
        // e = 1, w = 0.5 / 0.25 = 2, d = 0.25: 10 blocks -> 10 * pace + 1.25, the pace a
        // little over the wire's 2 (the encoder at half of it).
        let soft = |stages: &[f64]| {
            stages
                .iter()
                .map(|s| s.powf(STAGE_NORM))
                .sum::<f64>()
                .powf(1.0 / STAGE_NORM)
        };
        let want = 10.0 * soft(&[1.0, 2.0, 0.25]) + 1.25;
        assert!((predict(&c, 0.25, 1.0, 10, false, 0.0) - want).abs() < 1e-9);
        assert!(want > 21.25 && want < 21.4, "{want}");
        // Sharing cores: encode + decode (1.25) is one stage, the wire (2) still the slowest.
        let want = 10.0 * soft(&[1.25, 2.0]) + 1.25;
        assert!((predict(&c, 0.25, 1.0, 10, true, 0.0) - want).abs() < 1e-9);
        // Two stages of equal time (1.25 and 0.5 / 0.4) pace at 1.12x either.
        let p = predict(&c, 0.4, 1.0, 10, true, 0.0);
        assert!(
            (p - (10.0 * 1.25 * 2f64.powf(1.0 / STAGE_NORM) + 1.25)).abs() < 1e-9,
            "{p}"
        );
        assert!(
            (predict(&c, 1.0, 1.0, 10, true, 0.0) - (10.0 * soft(&[1.25, 0.5]) + 0.5)).abs() < 1e-9
        );
        // Garbage rates do not produce NaN or a panic.
        let bad = LevelCost {
            encode_rate: f64::NAN,
            decode_rate: 0.0,
            ..c
        };
        assert!(predict(&bad, -1.0, 1.0, 3, false, 0.0).is_finite());
        assert!(choose(&PolicyInputs {
            levels: &[],
            link_rate: 1.0,
            block_bytes: 1.0,
            blocks_left: 1,
            time_left: None,
            shared_cpu: false,
            current: None,
            wire_cpu: 0.0,
        })
        .is_none());
    }

    #[test]
    fn setup_and_hysteresis_keep_near_equal_levels_from_hopping() {
        let mut ls = levels(4);
        fn inputs(ls: &[LevelCost], current: Option<usize>) -> PolicyInputs<'_> {
            PolicyInputs {
                levels: ls,
                link_rate: 0.1e9 / 8.0,
                block_bytes: 196_608.0,
                blocks_left: 480,
                time_left: None,
                shared_cpu: false,
                current,
                wire_cpu: 0.0,
            }
        }
        // 0.1 Gbit/s: cg-low is cheapest (the smallest output on a wire-bound link).
        assert_eq!(choose(&inputs(&ls, None)).unwrap().level, Level::CgLow);
        // Its tables not built yet, and building them costs more than it would save over
        // cg-default (built): cg-default.
        let low = ls.len() - 1;
        let gap = predict(&ls[low - 1], 0.1e9 / 8.0, 196_608.0, 480, false, 0.0)
            - predict(&ls[low], 0.1e9 / 8.0, 196_608.0, 480, false, 0.0);
        ls[low].setup = gap * 2.0;
        assert_eq!(choose(&inputs(&ls, None)).unwrap().level, Level::CgDefault);
        // Built (setup 0), but cg-default in use and within HYSTERESIS of it: stays.
        ls[low].setup = 0.0;
        let def = predict(&ls[low - 1], 0.1e9 / 8.0, 196_608.0, 480, false, 0.0);
        let lo = predict(&ls[low], 0.1e9 / 8.0, 196_608.0, 480, false, 0.0);
        let c = choose(&inputs(&ls, Some(low - 1))).unwrap();
        if def <= lo * (1.0 + HYSTERESIS) {
            assert_eq!(c.level, Level::CgDefault);
        } else {
            assert_eq!(c.level, Level::CgLow);
        }
        // A level far cheaper than the one in use replaces it.
        assert_eq!(choose(&inputs(&ls, Some(0))).unwrap().level, Level::CgLow);
    }
}
