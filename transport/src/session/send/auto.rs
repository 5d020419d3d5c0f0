//! The sender's side of `--level auto`: the pacer wait, the per-block decision with live
//! estimates, and the policy's starting state (the link probe is in [`super::probe`]).

use std::thread;
use std::time::{Duration, Instant};

use kvwire_codec::model::ModelRole;
use kvwire_codec::Encoder;

use super::{KvSender, SendOptions};
use crate::policy::{self, Calibration, LevelCost, PolicyInputs, PolicyOptions, PolicySummary};
use crate::session::msg::{ACCEPTS_PREPARE, LEVEL_CODE, TABLES_READY};

/// The policy's live state.
pub(super) struct Live {
    pub(super) opts: PolicyOptions,
    pub(super) costs: Vec<LevelCost>,
    /// Observed encoded bytes per input byte, per candidate.
    pub(super) ratios: Vec<Option<f64>>,
    /// Observed encode speed per thread (input bytes/s of wall time, so it includes sharing
    /// the cores with whatever else runs), per candidate; not kept when the receiver shares
    /// this machine's cores (see [`Live::observe`]).
    pub(super) encode_seen: Vec<Option<f64>>,
    /// Observed over calibrated encode speed, over the levels seen so far: how much slower
    /// (or faster) the codec runs now than at calibration. Levels not yet seen are priced
    /// at their calibrated speeds times this, so that the level in use, whose slowdown is
    /// seen, does not look worse than the others only because theirs is not.
    pub(super) speed_factor: Option<f64>,
    /// Encoding threads.
    pub(super) threads: f64,
    pub(super) block_bytes: f64,
    pub(super) total: u64,
    pub(super) decided: u64,
    pub(super) last: Option<usize>,
    pub(super) summary: PolicySummary,
    /// The receiver runs on this machine.
    pub(super) shared_cpu: bool,
    /// Cores of this machine (the transport's CPU time spreads over them as the codec's does).
    pub(super) cores: f64,
    /// Per candidate: the receiver said it lacks the level's model tables and accepts
    /// `Prepare`, and has not been sent one yet.
    pub(super) receiver_unready: Vec<bool>,
    /// The transport's CPU seconds per byte sent, measured by the probe (0 until then, and
    /// where the fabric does not report it); the receiver is taken to pay the same.
    pub(super) wire_cpu: f64,
}

impl KvSender<'_> {
    /// Waits for the pacer (if any) to let `bytes` go; returns when the link is free again
    /// and whether the pacer held the write back.
    pub(super) fn pace(&self, bytes: u64) -> Option<(Instant, bool)> {
        let (start, end) = self.lock().pacer.as_mut()?.reserve(bytes, Instant::now());
        let now = Instant::now();
        let held = start > now;
        if held {
            thread::sleep(start - now);
        }
        Some((end, held))
    }

    /// The policy's level for the next block (index into the encoders), and whether it is
    /// that level's first block and the receiver said it lacks its model tables (the caller
    /// tells it to build them now: `Prepare`).
    pub(super) fn decide(&self, layer: usize, chunk: usize) -> (usize, bool) {
        self.decide_with(layer, chunk, None)
    }

    /// [`Self::decide`]; with `given` (a level and the link rate it was chosen at), that level
    /// rather than the policy's choice: the probe's blocks, sent at the level its reading
    /// so far points to.
    pub(super) fn decide_with(
        &self,
        layer: usize,
        chunk: usize,
        given: Option<(usize, f64)>,
    ) -> (usize, bool) {
        let mut p = self.lock();
        let rate = p.rate.rate();
        let elapsed = self.started.elapsed().as_secs_f64();
        let Some(live) = &mut p.live else {
            return (0, false);
        };
        let (index, link_rate, predicted) = match given {
            Some((index, link_rate)) => (index, link_rate, f64::NAN),
            None => {
                let costs = live.costs_now();
                // Nothing measured (a probe-less start without an initial rate): assume a
                // fast link.
                let link_rate = rate.unwrap_or(f64::MAX / 4.0);
                let choice = policy::choose(&live.inputs(&costs, link_rate, elapsed))
                    .expect("at least one candidate");
                (choice.index, link_rate, choice.predicted)
            }
        };
        let level = live.costs[index].level;
        // The first decision taken at a link rate (the probe's first blocks go before it has
        // a reading).
        if live.summary.first_rate == 0 && link_rate > 0.0 {
            live.summary.first_rate = link_rate as u64;
            live.summary.first_level = level.code();
        }
        live.summary.last_rate = link_rate as u64;
        live.summary.last_level = level.code();
        live.decided += 1;
        live.summary.blocks_per_level[usize::from(level.code())] += 1;
        live.summary.probe_blocks += u32::from(given.is_some());
        if live.last.is_some_and(|l| l != index) {
            live.summary.switches += 1;
            tracing::info!(layer, chunk, level = %level, link_bps = link_rate, "policy switches level");
        }
        live.last = Some(index);
        tracing::debug!(layer, chunk, level = %level, link_bps = link_rate, predicted_s = predicted, "policy decision");
        let announce = std::mem::take(&mut live.receiver_unready[index]);
        (index, announce)
    }

    /// The level (index into the encoders) the policy would choose for the next block were
    /// the link at `link_rate` bytes/s; takes no decision. `None` without a policy.
    pub(super) fn level_at(&self, link_rate: f64) -> Option<usize> {
        let elapsed = self.started.elapsed().as_secs_f64();
        let p = self.lock();
        let live = p.live.as_ref()?;
        let costs = live.costs_now();
        policy::choose(&live.inputs(&costs, link_rate, elapsed)).map(|c| c.index)
    }

    /// Records an encoded block's size and encode time ([`Live::observe`]).
    pub(super) fn observe(&self, index: usize, encoded: usize, took: Duration) {
        if let Some(live) = &mut self.lock().live {
            live.observe(index, encoded, took);
        }
    }
}

impl Live {
    /// What the policy weighs for the next block, priced at `costs` over a link at
    /// `link_rate` bytes/s, `elapsed` seconds into the transfer.
    fn inputs<'a>(&self, costs: &'a [LevelCost], link_rate: f64, elapsed: f64) -> PolicyInputs<'a> {
        PolicyInputs {
            levels: costs,
            link_rate,
            block_bytes: self.block_bytes,
            blocks_left: self.total - self.decided,
            time_left: self.opts.deadline.map(|d| d.as_secs_f64() - elapsed),
            shared_cpu: self.shared_cpu,
            current: self.last,
            wire_cpu: self.wire_cpu / self.cores,
        }
    }

    /// The candidates as priced now: observed ratios and encode speeds where blocks of the
    /// level have been seen, the calibration (scaled by [`Live::speed_factor`]) elsewhere, and
    /// no setup for a level in use.
    pub(super) fn costs_now(&self) -> Vec<LevelCost> {
        let f = self.speed_factor.unwrap_or(1.0);
        self.costs
            .iter()
            .zip(self.ratios.iter().zip(&self.encode_seen))
            .map(|(c, (r, e))| LevelCost {
                ratio: r.unwrap_or(c.ratio),
                encode_rate: e.map_or(c.encode_rate * f, |e| e * self.threads),
                // A level that has encoded a block is set up (the ratio is seen from then on).
                setup: if r.is_some() { 0.0 } else { c.setup },
                ..*c
            })
            .collect()
    }

    /// Records an encoded block's size and encode time for its level's observed ratio and
    /// speed.
    pub(super) fn observe(&mut self, index: usize, encoded: usize, took: Duration) {
        let r = encoded as f64 / self.block_bytes.max(1.0);
        let slot = &mut self.ratios[index];
        let first = slot.is_none();
        *slot = Some(slot.map_or(r, |old| old + 0.2 * (r - old)));
        // A level's first block may have built the coder's model tables (tens of ms, once
        // per process): timing it would make the level look several times slower than it
        // is, and the policy would shun it. Its speed is left to the calibration.
        //
        // With the receiver on the same cores, an encode's wall time also counts the
        // receiver's decoding, which the model prices as a stage of its own; its CPU time
        // misses what sharing a core's memory system costs. The calibration, measured with
        // every core busy, prices both, so it stands alone there.
        if first || self.shared_cpu {
            return;
        }
        let speed = self.block_bytes / took.as_secs_f64().max(1e-9);
        let slot = &mut self.encode_seen[index];
        let seen = slot.map_or(speed, |old| old + 0.2 * (speed - old));
        *slot = Some(seen);
        let calibrated = self.costs[index].encode_rate / self.threads;
        if calibrated > 0.0 {
            let f = seen / calibrated;
            self.speed_factor = Some(self.speed_factor.map_or(f, |old| old + 0.2 * (f - old)));
        }
    }
}

/// The policy's starting state: per candidate, this machine's encode speed times the threads
/// used, the receiver's reported decode speed (this machine's when it reported none), the
/// sample's ratio until blocks of the level have been seen, and the calibrated table build
/// once for each end that has not built the level's tables yet.
pub(super) fn live_state(
    p: &PolicyOptions,
    cal: &Calibration,
    encoders: &[Encoder],
    decode_rates: &[(u8, u64)],
    opts: &SendOptions,
) -> Live {
    let threads = match opts.threads {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    } as f64;
    let mut receiver_unready = Vec::with_capacity(encoders.len());
    let costs: Vec<LevelCost> = encoders
        .iter()
        .map(|e| {
            let level = e.header().level;
            let speed = cal.get(level);
            let report = decode_rates
                .iter()
                .find(|(c, _)| c & LEVEL_CODE == level.code());
            let reported = report.map(|&(_, r)| r as f64).filter(|r| *r > 0.0);
            // Each end not yet holding the level's tables builds them on its first block.
            let there = report.is_none_or(|(c, _)| c & TABLES_READY == 0);
            receiver_unready.push(there && report.is_some_and(|(c, _)| c & ACCEPTS_PREPARE != 0));
            let unready = u8::from(!e.header().models_ready(ModelRole::Encode)) + u8::from(there);
            LevelCost {
                level,
                ratio: speed.map_or(1.0, |s| s.ratio),
                encode_rate: speed.map_or(1e9, |s| s.encode_rate) * threads,
                decode_rate: reported
                    .unwrap_or_else(|| speed.map_or(1e9, |s| s.decode_rate) * cal.cores as f64),
                setup: f64::from(unready) * speed.map_or(0.0, |s| s.setup),
            }
        })
        .collect();
    let h = encoders[0].header();
    let total = (h.spec.shape.layers * h.chunks()) as u64;
    tracing::debug!(?costs, "policy inputs");
    Live {
        opts: p.clone(),
        ratios: vec![None; costs.len()],
        encode_seen: vec![None; costs.len()],
        speed_factor: None,
        threads,
        costs,
        block_bytes: h.spec.byte_len() as f64 / total.max(1) as f64,
        total,
        decided: 0,
        last: None,
        summary: PolicySummary::default(),
        shared_cpu: false,
        receiver_unready,
        cores: cal.cores.max(1) as f64,
        wire_cpu: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LevelSpeed;

    /// A live state of q8 and cg-low at 1 and 0.25 GB/s of encode per thread, 2 threads.
    fn live(shared_cpu: bool) -> Live {
        let cost = |level, ratio, encode_rate| LevelCost {
            level,
            ratio,
            encode_rate,
            decode_rate: 4e9,
            setup: 0.01,
        };
        Live {
            opts: PolicyOptions::default(),
            costs: vec![
                cost(kvwire_codec::Level::Q8, 0.5, 2e9),
                cost(kvwire_codec::Level::CgLow, 0.12, 0.5e9),
            ],
            ratios: vec![None; 2],
            encode_seen: vec![None; 2],
            speed_factor: None,
            threads: 2.0,
            block_bytes: 1e6,
            total: 100,
            decided: 0,
            last: None,
            summary: PolicySummary::default(),
            shared_cpu,
            receiver_unready: vec![true; 2],
            cores: 2.0,
            wire_cpu: 0.0,
        }
    }

    #[test]
    fn setup_is_priced_once_per_end_without_the_tables() {
        use kvwire_codec::{DType, EncodeOptions, KvShape, KvSpec, Layout, Level};
        let spec = KvSpec {
            shape: KvShape::new(2, 2, 512, 64),
            layout: Layout::Hf,
            dtype: DType::F16,
        };
        let encoders: Vec<Encoder> = [Level::Raw, Level::CgLow]
            .iter()
            .map(|&l| Encoder::new(spec, &EncodeOptions::level(l)).unwrap())
            .collect();
        let speed = |level, setup| LevelSpeed {
            level,
            ratio: 0.5,
            encode_rate: 1e9,
            decode_rate: 1e9,
            setup,
        };
        let cal = Calibration {
            key: String::new(),
            levels: vec![speed(Level::Raw, 0.0), speed(Level::CgLow, 0.01)],
            cores: 2,
        };
        let opts = SendOptions::new(EncodeOptions::level(Level::Raw));
        let setup = |rates: &[(u8, u64)]| {
            live_state(&PolicyOptions::default(), &cal, &encoders, rates, &opts).costs[1].setup
        };
        // Built here (this process), and the receiver says built there: nothing to pay.
        encoders[1].header().prepare_models(ModelRole::Encode);
        let ready = [(Level::CgLow.code() | TABLES_READY, 1_000_000_000)];
        assert_eq!(setup(&ready), 0.0);
        // A receiver without them (or one that does not say) builds them on its first block.
        assert_eq!(setup(&[(Level::CgLow.code(), 1_000_000_000)]), 0.01);
        assert_eq!(setup(&[]), 0.01);
        // The reported decode speed is found under the marked code.
        let l = live_state(&PolicyOptions::default(), &cal, &encoders, &ready, &opts);
        assert_eq!(l.costs[1].decode_rate, 1e9);
        assert_eq!(l.costs[0].setup, 0.0);
        // Prepare goes to a receiver lacking the tables only if it said it accepts it.
        assert_eq!(l.receiver_unready, [false, false]);
        let unready = |rates: &[(u8, u64)]| {
            live_state(&PolicyOptions::default(), &cal, &encoders, rates, &opts).receiver_unready
        };
        let code = Level::CgLow.code();
        assert_eq!(unready(&[(code, 1)]), [false, false]);
        assert_eq!(unready(&[(code | ACCEPTS_PREPARE, 1)]), [false, true]);
        let both = code | ACCEPTS_PREPARE | TABLES_READY;
        assert_eq!(unready(&[(both, 1)]), [false, false]);
        assert_eq!(
            live_state(
                &PolicyOptions::default(),
                &cal,
                &encoders,
                &[(both, 7)],
                &opts
            )
            .costs[1]
                .decode_rate,
            7.0
        );
    }

    #[test]
    fn a_slowdown_seen_on_one_level_is_assumed_of_the_others() {
        let mut l = live(false);
        // q8's first block (tables, not timed), then blocks at half its calibrated speed.
        l.observe(0, 400_000, Duration::from_millis(100));
        assert_eq!(l.costs_now()[0].encode_rate, 2e9);
        for _ in 0..30 {
            l.observe(0, 500_000, Duration::from_millis(2));
        }
        let c = l.costs_now();
        assert!((c[0].encode_rate - 1e9).abs() < 1e7, "{}", c[0].encode_rate);
        assert!(
            (c[1].encode_rate - 0.25e9).abs() < 1e7,
            "{}",
            c[1].encode_rate
        );
        // The seen ratio replaces the calibrated one; a level in use has no setup left.
        assert!((c[0].ratio - 0.5).abs() < 0.02 && c[0].setup == 0.0 && c[1].setup > 0.0);
        // Sharing the receiver's cores, wall time is not the encoder's: speeds stay calibrated.
        let mut l = live(true);
        for _ in 0..30 {
            l.observe(0, 500_000, Duration::from_millis(2));
        }
        assert_eq!(l.costs_now()[1].encode_rate, 0.5e9);
    }
}
