//! The sender's side of `--level auto`: the link probe, the pacer wait, the per-block
//! decision with live estimates, and the policy's starting state.

use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use kvwire_codec::Encoder;

use super::{KvSender, SendOptions};
use crate::error::{Result, TransportError};
use crate::link::{Event, SendBuf};
use crate::policy::{self, Calibration, LevelCost, PolicyInputs, PolicyOptions, PolicySummary};
use crate::session::msg::{BlockImm, TABLES_READY};

/// Immediate of a probe write (layer 4095, chunk 4095; policy transfers name fewer layers).
const PROBE_IMM_LAYER: u32 = 0xfff;
/// Bytes of each of the rate probe's writes, and at most how many are in flight.
const PROBE_WRITE: u64 = 64 * 1024;
const PROBE_DEPTH: usize = 8;
/// The probe keeps in flight about what the link delivered over this much time just before
/// (at least 2 writes): enough to keep it busy, and little to wait for at the end on a slow
/// link, where [`PROBE_DEPTH`] writes would queue for many ms ahead of the first block.
const PROBE_QUEUE: Duration = Duration::from_millis(1);
/// How long the rate probe keeps writing after its first write completed: at least
/// [`PROBE_MIN_SPAN`], then until the rates over its last two quarters agree within
/// [`PROBE_AGREE`] (or, past [`PROBE_LOOSE_SPAN`], within [`PROBE_AGREE_LOOSE`]: on a busy
/// machine completions come in clumps), at most [`PROBE_MAX_SPAN`]. A shaper's burst
/// allowance (a token bucket) passes the first bytes at any speed; a bucket of a few ms at the
/// rate takes that long and more to drain, and the rate is taken over the second half only.
const PROBE_MIN_SPAN: Duration = Duration::from_millis(2);
const PROBE_LOOSE_SPAN: Duration = Duration::from_millis(4);
const PROBE_MAX_SPAN: Duration = Duration::from_millis(10);
const PROBE_AGREE: f64 = 0.25;
const PROBE_AGREE_LOOSE: f64 = 0.5;
/// At most how many bytes the probe sends ...
const PROBE_MAX_BYTES: u64 = 8 << 20;
/// ... and at most this fraction of the cache's own size, so that probing a fast link costs
/// a small transfer no more than a few percent.
const PROBE_MAX_SHARE: u64 = 32;

/// The policy's live state.
pub(super) struct Live {
    pub(super) opts: PolicyOptions,
    pub(super) costs: Vec<LevelCost>,
    /// Observed encoded bytes per input byte, per candidate.
    pub(super) ratios: Vec<Option<f64>>,
    /// Observed encode speed per thread (input bytes/s of wall time, so it includes sharing
    /// the cores with whatever else runs), per candidate; not kept when the receiver shares
    /// this machine's cores (see [`KvSender::observe`]).
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
    /// The transport's CPU seconds per byte sent, measured by the probe (0 until then, and
    /// where the fabric does not report it); the receiver is taken to pay the same.
    pub(super) wire_cpu: f64,
}

impl KvSender<'_> {
    /// Measures the link before the first block: one-byte writes (the round trip), then
    /// back-to-back writes of up to [`PROBE_WRITE`] bytes for [`PROBE_SPAN`] past the first
    /// completion (the rate, [`delivery_rate`]). The receiver gives probe slots back without
    /// decoding them.
    pub(super) fn probe(&mut self) -> Result<()> {
        // The smallest of three one-byte round trips: the first also pays thread wake-ups.
        let mut rtt = Duration::MAX;
        for _ in 0..3 {
            rtt = rtt.min(self.probe_round(1, 1)?);
        }
        // At most the probe's share of the cache, in writes small enough that PROBE_DEPTH of
        // them fit in it.
        let share = self.encoders[0].header().spec.byte_len() as u64 / PROBE_MAX_SHARE;
        let write = PROBE_WRITE
            .min(self.slot_size)
            .min(share / PROBE_DEPTH as u64)
            .max(4096);
        let max_bytes = PROBE_MAX_BYTES.min(share).max(PROBE_DEPTH as u64 * write);
        let cpu_before = self.conn.send_cpu();
        let rate = self.probe_rate(write, max_bytes)?;
        // What sending the probe's bytes cost the transport's threads, per byte.
        let wire_cpu = match (cpu_before, self.conn.send_cpu()) {
            (Some((b0, c0)), Some((b1, c1))) if b1 > b0 => {
                c1.saturating_sub(c0).as_secs_f64() / (b1 - b0) as f64
            }
            _ => 0.0,
        };
        let mut p = self.lock();
        p.rate.set_rtt(rtt);
        p.rate.set_rate(rate);
        if let Some(l) = &mut p.live {
            l.summary.rtt_ns = rtt.as_nanos() as u64;
            l.summary.wire_cpu_ps = (wire_cpu * 1e12) as u64;
            l.wire_cpu = wire_cpu;
        }
        tracing::debug!(
            rtt_us = rtt.as_micros() as u64,
            rate,
            wire_cpu_ns_per_byte = wire_cpu * 1e9,
            "link probe"
        );
        Ok(())
    }

    /// Keeps up to [`PROBE_DEPTH`] probe writes of `bytes` each in flight ([`probe_depth`])
    /// until the delivery rate
    /// has settled ([`PROBE_MIN_SPAN`], [`rate_settled`]), [`PROBE_MAX_SPAN`] after the first
    /// completion, or `max_bytes` posted; the delivery rate ([`delivery_rate`]), bytes/s.
    fn probe_rate(&self, bytes: u64, max_bytes: u64) -> Result<f64> {
        let start = Instant::now();
        let deadline = start + self.opts.timeout;
        let (mut posted, mut done) = (0u64, 0u64);
        // When each probe write completed, from `start`, in order (writes complete in the
        // order posted, and the pacer's end times increase).
        let mut times: Vec<Duration> = Vec::new();
        let mut wrs = Vec::new();
        loop {
            let stop = posted * bytes >= max_bytes
                || times.first().is_some_and(|&t| {
                    let span = start.elapsed().saturating_sub(t);
                    span >= PROBE_MAX_SPAN
                        || (span >= PROBE_MIN_SPAN && rate_settled(&times, PROBE_AGREE))
                        || (span >= PROBE_LOOSE_SPAN && rate_settled(&times, PROBE_AGREE_LOOSE))
                });
            let depth = probe_depth(&times, start.elapsed());
            while !stop && posted - done < depth {
                let Some(slot) = self.lock().free_slots.pop_front() else {
                    break;
                };
                wrs.push(self.post_probe(slot, bytes)?);
                posted += 1;
            }
            // The writes still in flight need not be waited for: they complete on the link
            // ahead of the first blocks either way, and the main loop takes their completions
            // (as it does any write's) while the first blocks are encoded.
            if stop && (done == posted || !times.is_empty()) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.conn.poll(left)? {
                Some(ev) => {
                    if let Event::WriteDone { wr_id, .. } = &ev {
                        if let Some(&(_, paced)) = wrs.iter().find(|w| w.0 == *wr_id) {
                            done += 1;
                            // Behind the pacer the write is done when the emulated link
                            // would have carried it (the link under it is far faster, and
                            // this completion may be read late: the posting loop sleeps in
                            // the pacer).
                            times.push(paced.unwrap_or_else(Instant::now) - start);
                        }
                    }
                    self.on_event(ev)?;
                }
                None => return Err(TransportError::Timeout(self.opts.timeout, "the link probe")),
            }
        }
        times.sort_unstable();
        Ok(delivery_rate(&times, bytes))
    }

    /// Posts one probe write of `bytes` into `slot`; its work-request id, and when the pacer
    /// (if any, emulating a slower link) has the write leave the link.
    fn post_probe(&self, slot: u16, bytes: u64) -> Result<(u64, Option<Instant>)> {
        let mut buf = vec![0u8; bytes as usize];
        buf[0] = 0xff;
        let paced = self.pace(bytes).map(|(end, _)| end);
        let wr = self.next_wr.fetch_add(1, Ordering::Relaxed) as u64;
        self.lock().outstanding += 1;
        self.wire_bytes.fetch_add(buf.len(), Ordering::Relaxed);
        let imm = BlockImm {
            slot,
            layer: PROBE_IMM_LAYER,
            chunk: 0xfff,
        };
        self.conn.post_write(
            SendBuf::Bytes(buf),
            self.region,
            u64::from(slot) * self.slot_size,
            Some(imm.pack()),
            wr,
        )?;
        Ok((wr, paced))
    }

    /// Posts `n` probe writes of `bytes` each as slots allow; returns the time from the first
    /// post to the last completion.
    fn probe_round(&self, bytes: u64, n: usize) -> Result<Duration> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut posted = 0;
        let mut done = 0;
        let mut first: Option<Instant> = None;
        let mut wrs = Vec::new();
        while done < n {
            while posted < n {
                let Some(slot) = self.lock().free_slots.pop_front() else {
                    break;
                };
                first.get_or_insert_with(Instant::now);
                wrs.push(self.post_probe(slot, bytes)?.0);
                posted += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.conn.poll(left)? {
                Some(ev) => {
                    if let Event::WriteDone { wr_id, .. } = &ev {
                        if wrs.contains(wr_id) {
                            done += 1;
                        }
                    }
                    self.on_event(ev)?;
                }
                None => return Err(TransportError::Timeout(self.opts.timeout, "the link probe")),
            }
        }
        Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
    }

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

    /// The policy's level for the next block (index into the encoders).
    pub(super) fn decide(&self, layer: usize, chunk: usize) -> usize {
        let mut p = self.lock();
        let rate = p.rate.rate();
        let elapsed = self.started.elapsed().as_secs_f64();
        let Some(live) = &mut p.live else {
            return 0;
        };
        let costs = live.costs_now();
        // Nothing measured (a probe-less start without an initial rate): assume a fast link.
        let link_rate = rate.unwrap_or(f64::MAX / 4.0);
        let choice = policy::choose(&PolicyInputs {
            levels: &costs,
            link_rate,
            block_bytes: live.block_bytes,
            blocks_left: live.total - live.decided,
            time_left: live.opts.deadline.map(|d| d.as_secs_f64() - elapsed),
            shared_cpu: live.shared_cpu,
            current: live.last,
            wire_cpu: live.wire_cpu / live.cores,
        })
        .expect("at least one candidate");
        if live.decided == 0 {
            live.summary.first_rate = link_rate as u64;
            live.summary.first_level = choice.level.code();
        }
        live.summary.last_rate = link_rate as u64;
        live.summary.last_level = choice.level.code();
        live.decided += 1;
        live.summary.blocks_per_level[usize::from(choice.level.code())] += 1;
        if live.last.is_some_and(|l| l != choice.index) {
            live.summary.switches += 1;
            tracing::info!(layer, chunk, level = %choice.level, link_bps = link_rate, "policy switches level");
        }
        live.last = Some(choice.index);
        tracing::debug!(layer, chunk, level = %choice.level, link_bps = link_rate, predicted_s = choice.predicted, "policy decision");
        choice.index
    }

    /// Records an encoded block's size and encode time ([`Live::observe`]).
    pub(super) fn observe(&self, index: usize, encoded: usize, took: Duration) {
        if let Some(live) = &mut self.lock().live {
            live.observe(index, encoded, took);
        }
    }
}

impl Live {
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

/// How many probe writes to keep in flight at `now` (from the first post), given the
/// completions so far: as many as completed over the last [`PROBE_QUEUE`], from 2 to
/// [`PROBE_DEPTH`].
fn probe_depth(times: &[Duration], now: Duration) -> u64 {
    let recent = times
        .iter()
        .rev()
        .take_while(|&&t| now.saturating_sub(t) <= PROBE_QUEUE)
        .count();
    recent.clamp(2, PROBE_DEPTH) as u64
}

/// Whether completions at `times` (in order) come at one rate by now: the third and fourth
/// quarters of the span from the first completion to the last hold about as many (within
/// `agree`), at least three each. A shaper's burst allowance makes the early part of
/// the span faster until it is spent; the rate is taken over the second half.
fn rate_settled(times: &[Duration], agree: f64) -> bool {
    let (Some(&first), Some(&last)) = (times.first(), times.last()) else {
        return false;
    };
    let quarter = (last - first) / 4;
    let count =
        |from: Duration, to: Duration| times.iter().filter(|&&t| t > from && t <= to).count();
    let third = count(first + quarter * 2, first + quarter * 3);
    let fourth = count(first + quarter * 3, last);
    third >= 3 && fourth >= 3 && (third as f64 - fourth as f64).abs() <= agree * fourth as f64
}

/// The rate at which writes of `bytes` each completed at `times` (from the first post, in
/// order): over the second half of the span from the first completion to the last, where a
/// shaper's burst allowance, spent at the start, no longer inflates it; over the whole span
/// when the second half holds fewer than two completions; a lone completion's bytes over its
/// time when there is no span.
fn delivery_rate(times: &[Duration], bytes: u64) -> f64 {
    let (Some(&first), Some(&last)) = (times.first(), times.last()) else {
        return 0.0;
    };
    let mid = first + (last - first) / 2;
    // The last completion at or before the midpoint starts the measured stretch.
    let k = times.iter().rposition(|&t| t <= mid).unwrap_or(0);
    let (from, n) = if times.len() - 1 - k >= 2 {
        (times[k], times.len() - 1 - k)
    } else {
        (first, times.len() - 1)
    };
    let span = (last - from).as_secs_f64();
    if n == 0 || span <= 0.0 {
        return (times.len() as u64 * bytes) as f64 / last.as_secs_f64().max(1e-6);
    }
    (n as u64 * bytes) as f64 / span
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
    let costs: Vec<LevelCost> = encoders
        .iter()
        .map(|e| {
            let level = e.header().level;
            let speed = cal.get(level);
            let report = decode_rates
                .iter()
                .find(|(c, _)| c & !TABLES_READY == level.code());
            let reported = report.map(|&(_, r)| r as f64).filter(|r| *r > 0.0);
            // Each end not yet holding the level's tables builds them on its first block.
            let unready = u8::from(!e.header().models_ready())
                + u8::from(report.is_none_or(|(c, _)| c & TABLES_READY == 0));
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
        cores: cal.cores.max(1) as f64,
        wire_cpu: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LevelSpeed;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

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
        encoders[1].header().prepare_models();
        let ready = [(Level::CgLow.code() | TABLES_READY, 1_000_000_000)];
        assert_eq!(setup(&ready), 0.0);
        // A receiver without them (or one that does not say) builds them on its first block.
        assert_eq!(setup(&[(Level::CgLow.code(), 1_000_000_000)]), 0.01);
        assert_eq!(setup(&[]), 0.01);
        // The reported decode speed is found under the marked code.
        let l = live_state(&PolicyOptions::default(), &cal, &encoders, &ready, &opts);
        assert_eq!(l.costs[1].decode_rate, 1e9);
        assert_eq!(l.costs[0].setup, 0.0);
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

    #[test]
    fn a_burst_allowance_at_the_start_does_not_inflate_the_rate() {
        // 64 KiB writes: the first 8 through a full bucket 0.1 ms apart, then one per 0.5 ms
        // (131 MB/s) for 4 ms.
        let mut times: Vec<Duration> = (0..8).map(|i| ms(0.1 + 0.1 * f64::from(i))).collect();
        let burst_end = 0.8;
        times.extend((1..=8).map(|i| ms(burst_end + 0.5 * f64::from(i))));
        let r = delivery_rate(&times, 65536);
        assert!((r - 65536.0 / 0.0005).abs() < 1e6, "{r}");
    }

    #[test]
    fn the_probe_keeps_about_a_millisecond_of_the_link_in_flight() {
        assert_eq!(probe_depth(&[], ms(0.0)), 2);
        // One completion per 1.75 ms (64 KiB at 0.3 Gbit/s): the minimum.
        let slow: Vec<Duration> = (1..=5).map(|i| ms(1.75 * f64::from(i))).collect();
        assert_eq!(probe_depth(&slow, ms(9.0)), 2);
        // One per 0.17 ms (3 Gbit/s): about 6.
        let mid: Vec<Duration> = (1..=30).map(|i| ms(0.17 * f64::from(i))).collect();
        assert_eq!(probe_depth(&mid, ms(5.2)), 6);
        // One per 0.05 ms: capped.
        let fast: Vec<Duration> = (1..=60).map(|i| ms(0.05 * f64::from(i))).collect();
        assert_eq!(probe_depth(&fast, ms(3.0)), PROBE_DEPTH as u64);
    }

    #[test]
    fn the_probe_runs_on_while_a_burst_allowance_lasts() {
        // Steady: settled once each late quarter holds enough completions.
        let steady: Vec<Duration> = (1..=16).map(|i| ms(0.5 * f64::from(i))).collect();
        assert!(rate_settled(&steady, PROBE_AGREE));
        assert!(!rate_settled(&steady[..8], PROBE_AGREE));
        // A bucket passing 20 writes at 0.05 ms each, then one per 0.5 ms: not settled while
        // the burst reaches into the second half, settled once it lies in the first.
        let mut burst: Vec<Duration> = (1..=20).map(|i| ms(0.05 * f64::from(i))).collect();
        burst.extend((1..=3).map(|i| ms(1.0 + 0.5 * f64::from(i))));
        assert!(!rate_settled(&burst, PROBE_AGREE));
        burst.extend((4..=16).map(|i| ms(1.0 + 0.5 * f64::from(i))));
        assert!(rate_settled(&burst, PROBE_AGREE));
        assert!(!rate_settled(&[], PROBE_AGREE));
    }

    #[test]
    fn steady_completions_give_their_rate_and_few_do_not_panic() {
        let times: Vec<Duration> = (1..=10).map(|i| ms(f64::from(i))).collect();
        assert!((delivery_rate(&times, 1000) - 1e6).abs() < 1.0);
        assert!((delivery_rate(&times[..2], 1000) - 1e6).abs() < 1.0);
        assert!(delivery_rate(&times[..1], 1000) > 0.0);
        assert_eq!(delivery_rate(&[], 1000), 0.0);
    }
}
