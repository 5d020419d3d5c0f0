//! The link probe before a policy transfer's first block: the round trip, the delivery rate
//! (past a shaper's burst allowance) and what the transport's CPU pays per byte sent.
//!
//! Its writes are the transfer's first blocks, at a level whose blocks cost one pass over the
//! data (`raw` or `q8`, [`KvSender::probe_levels`]), so that probing moves the cache rather
//! than filler through both ends' cores; filler where no such level is a candidate, its
//! blocks are too large for the probe's writes, or the blocks at hand ran out.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvwire_codec::Level;

use super::{EncodeFn, KvSender};
use crate::error::{Result, TransportError};
use crate::link::Event;
use crate::session::msg::BlockImm;

/// Immediate of a probe write (layer 4095, chunk 4095; policy transfers name fewer layers).
const PROBE_IMM_LAYER: u32 = 0xfff;
/// Bytes of each filler write of the rate probe, and at most how many writes are in flight.
const PROBE_WRITE: u64 = 64 * 1024;
const PROBE_DEPTH: usize = 8;
/// The probe keeps in flight about what the link delivered over this much time just before
/// (at least 2 writes): enough to keep it busy, and little to wait for at the end on a slow
/// link, where [`PROBE_DEPTH`] writes would queue for many ms ahead of the first block.
const PROBE_QUEUE: Duration = Duration::from_millis(1);
/// Bytes in flight before the first completion, counted in filler writes (blocks may be up
/// to twice as large): enough that a fast link's first round trips measure more than the
/// round trip (a small cache probes with small writes), little enough to queue for only a
/// few ms on a slow one.
const PROBE_START_BYTES: u64 = 256 * 1024;
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
/// A probe also ends, past [`PROBE_MIN_SPAN`] and with at least [`PROBE_DECIDING`]
/// completions, once its reading can no longer change the first level: the policy picks the
/// same one at [`PROBE_DECISION_MARGIN`] times the rate and at that fraction of it. On a slow
/// link, where every probe byte holds up the transfer's, it does not run on to a precise rate
/// that would not change the choice.
/// Only a reading from evenly spaced completions ends it so ([`evenly_spaced`]).
const PROBE_DECIDING: usize = 4;
const PROBE_DECISION_MARGIN: f64 = 1.5;
const PROBE_EVEN_GAP: f64 = 3.0;
/// At most how many bytes the probe sends (filler and blocks) ...
const PROBE_MAX_BYTES: u64 = 8 << 20;
/// ... and at most this fraction of the cache's own size, so that probing a fast link costs
/// a small transfer no more than a few percent.
const PROBE_MAX_SHARE: u64 = 32;

impl KvSender<'_> {
    /// Measures the link before the first block: one-byte writes (the round trip), then
    /// writes until the delivery rate settles (the rate, [`Self::probe_rate`]), timing what
    /// the transport's threads spend on them (the CPU per byte sent,
    /// [`crate::link::Link::send_cpu`]). Filler writes are of up to [`PROBE_WRITE`] bytes and
    /// the receiver gives their slots back without decoding them; the writes that are blocks
    /// are taken from the front of `blocks`, encoded by `encode`. Returns how many it sent.
    pub(super) fn probe(
        &mut self,
        blocks: &[(usize, usize)],
        encode: &EncodeFn<'_>,
    ) -> Result<usize> {
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
        let started = Instant::now();
        let (rate, sent) = self.probe_rate(write, max_bytes, blocks, encode)?;
        let took = started.elapsed();
        // What sending the probe's bytes cost the transport's threads, per byte.
        let wire_cpu = self.wire_cpu_since(cpu_before, 1).unwrap_or(0.0);
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
            took_us = took.as_micros() as u64,
            rate,
            blocks = sent,
            wire_cpu_ns_per_byte = wire_cpu * 1e9,
            "link probe"
        );
        Ok(sent)
    }

    /// Keeps up to [`PROBE_DEPTH`] probe writes in flight ([`probe_depth`]) until the
    /// delivery rate has settled ([`PROBE_MIN_SPAN`], [`rate_settled`]) or the first level no
    /// longer depends on it ([`Self::choice_settled`]), [`PROBE_MAX_SPAN`] after the first
    /// completion, or `max_bytes` posted; each write the next of `blocks` where
    /// [`Self::probe_level`] names a level, else filler of `bytes`. The delivery rate
    /// ([`delivery_rate`]), bytes/s, and how many blocks it sent.
    fn probe_rate(
        &self,
        bytes: u64,
        max_bytes: u64,
        blocks: &[(usize, usize)],
        encode: &EncodeFn<'_>,
    ) -> Result<(f64, usize)> {
        let start = Instant::now();
        let deadline = start + self.opts.timeout;
        let fit = self.probe_levels(bytes);
        let (mut posted, mut done, mut probe_bytes, mut sent) = (0usize, 0usize, 0u64, 0usize);
        // When each probe write completed, from `start`, and its bytes, in order (writes
        // complete in the order posted, and the pacer's end times increase).
        let mut times: Vec<Completion> = Vec::new();
        // Posted writes: work-request id, when the pacer has them leave the link, bytes.
        let mut wrs: Vec<(u64, Option<Instant>, u64)> = Vec::new();
        loop {
            let measured = times.first().is_some_and(|&(t, _)| {
                let span = start.elapsed().saturating_sub(t);
                span >= PROBE_MAX_SPAN
                    || (span >= PROBE_MIN_SPAN
                        && (rate_settled(&times, PROBE_AGREE) || self.choice_settled(&times)))
                    || (span >= PROBE_LOOSE_SPAN && rate_settled(&times, PROBE_AGREE_LOOSE))
            });
            let stop = measured || probe_bytes >= max_bytes;
            let depth = probe_depth(&times, start.elapsed(), bytes);
            while !stop && posted - done < depth {
                let Some(slot) = self.lock().free_slots.pop_front() else {
                    break;
                };
                let level = blocks
                    .get(sent)
                    .and_then(|&b| self.probe_level(&times, &fit).map(|l| (b, l)));
                let (wr, paced, n) = match level {
                    Some(((layer, chunk), given)) => {
                        sent += 1;
                        self.post_probe_block(slot, layer, chunk, given, encode)?
                    }
                    None => self.post_probe(slot, bytes)?,
                };
                probe_bytes += n;
                wrs.push((wr, paced, n));
                posted += 1;
            }
            // Once the rate has settled, the writes still in flight need not be waited for:
            // they complete on the link ahead of the first blocks either way, and the main
            // loop takes their completions (as it does any write's) while the first blocks
            // are encoded. A probe that ran out of bytes first (a small cache) needs every
            // completion for its reading.
            if stop && (done == posted || measured) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.conn.poll(left)? {
                Some(ev) => {
                    if let Event::WriteDone { wr_id, .. } = &ev {
                        if let Some(&(_, paced, n)) = wrs.iter().find(|w| w.0 == *wr_id) {
                            done += 1;
                            // Behind the pacer the write is done when the emulated link
                            // would have carried it (the link under it is far faster, and
                            // this completion may be read late: the posting loop sleeps in
                            // the pacer).
                            times.push((paced.unwrap_or_else(Instant::now) - start, n));
                        }
                    }
                    self.on_event(ev)?;
                }
                None => return Err(TransportError::Timeout(self.opts.timeout, "the link probe")),
            }
        }
        times.sort_unstable();
        Ok((delivery_rate(&times), sent))
    }

    /// Whether the rate the probe reads from completions at `times` leaves the first level
    /// settled: the same at [`PROBE_DECISION_MARGIN`] times the reading, and at the reading
    /// over it.
    fn choice_settled(&self, times: &[Completion]) -> bool {
        deciding(times).is_some_and(|sorted| {
            evenly_spaced(measured_stretch(&sorted))
                && level_settled(delivery_rate(&sorted), |r| self.level_at(r))
        })
    }

    /// The level (index into the encoders) the probe's next write is a block at, and the
    /// reading it was chosen at (0 before one): of the levels `fit` ([`Self::probe_levels`]),
    /// the one the reading from completions at `times` (at least [`PROBE_DECIDING`]) points
    /// to, else the smallest (`fit` is smallest first). `None`: a filler write.
    fn probe_level(&self, times: &[Completion], fit: &[usize]) -> Option<(usize, f64)> {
        let rate = deciding(times)
            .map(|sorted| delivery_rate(&sorted))
            .filter(|r| r.is_finite() && *r > 0.0);
        let read = rate
            .and_then(|r| self.level_at(r))
            .filter(|l| fit.contains(l));
        read.or(fit.first().copied())
            .map(|level| (level, rate.unwrap_or(0.0)))
    }

    /// The candidates whose blocks may serve as probe writes, smallest first: those that cost
    /// one pass over the data (`raw`, `q8`; encoding them on the probing thread keeps up
    /// with the link, as an entropy coder would not) and whose blocks are at most twice the
    /// filler write `write` (a small cache probes with small writes). A block at a larger
    /// level than the transfer goes on with costs the link about what filler would (a `q8`
    /// block carries a quarter of its bytes' worth as `cg-low`, filler nothing), and on a
    /// fast link the probe moves the cache instead of filler.
    fn probe_levels(&self, write: u64) -> Vec<usize> {
        let p = self.lock();
        let Some(live) = &p.live else {
            return Vec::new();
        };
        let mut fit: Vec<usize> = (0..self.encoders.len())
            .filter(|&i| {
                matches!(self.encoders[i].header().level, Level::Raw | Level::Q8)
                    && live.costs[i].ratio * live.block_bytes <= 2.0 * write as f64
            })
            .collect();
        fit.sort_by(|&a, &b| live.costs[a].ratio.total_cmp(&live.costs[b].ratio));
        fit
    }

    /// Posts block (`layer`, `chunk`) as a probe write into `slot`, at the level and link
    /// rate `given` ([`Self::probe_level`]); its work-request id, when the pacer (if any) has
    /// it leave the link, and its bytes.
    fn post_probe_block(
        &self,
        slot: u16,
        layer: usize,
        chunk: usize,
        given: (usize, f64),
        encode: &EncodeFn<'_>,
    ) -> Result<(u64, Option<Instant>, u64)> {
        let mut buf = self.lock().buffers.pop().unwrap_or_default();
        let (index, announce) = self.decide_with(layer, chunk, Some(given));
        self.encode_block(layer, chunk, index, announce, &mut buf, encode)?;
        let imm = BlockImm {
            slot,
            layer: layer as u32,
            chunk: chunk as u32,
        };
        self.post_probe_write(buf, imm)
    }

    /// Posts one filler write of `bytes` into `slot` ([`Self::post_probe_write`]).
    fn post_probe(&self, slot: u16, bytes: u64) -> Result<(u64, Option<Instant>, u64)> {
        let mut buf = vec![0u8; bytes as usize];
        buf[0] = 0xff;
        let imm = BlockImm {
            slot,
            layer: PROBE_IMM_LAYER,
            chunk: 0xfff,
        };
        self.post_probe_write(buf, imm)
    }

    /// Writes `buf` into the slot `imm` names, behind the pacer (if any); its work-request
    /// id, when the pacer (emulating a slower link) has it leave the link, and its bytes.
    fn post_probe_write(&self, buf: Vec<u8>, imm: BlockImm) -> Result<(u64, Option<Instant>, u64)> {
        let n = buf.len() as u64;
        let paced = self.pace(n).map(|(end, _)| end);
        let wr = self.next_wr.fetch_add(1, Ordering::Relaxed) as u64;
        self.lock().outstanding += 1;
        self.wire_bytes.fetch_add(buf.len(), Ordering::Relaxed);
        self.post_to_slot(buf, imm, wr)?;
        Ok((wr, paced, n))
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
}

/// A probe write's completion: when (from the probe's first post) and its bytes.
type Completion = (Duration, u64);

/// `times` in order, once there are enough to decide on ([`PROBE_DECIDING`]).
fn deciding(times: &[Completion]) -> Option<Vec<Completion>> {
    (times.len() >= PROBE_DECIDING).then(|| {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        sorted
    })
}

/// Whether completions at `times` (in order, at least three) come evenly: no gap between
/// two more than [`PROBE_EVEN_GAP`] times their median gap. A link that is slow delivers
/// evenly at its rate; a stall of either end's threads (a busy core) leaves one long gap and
/// then a clump, and reads low though the link is fast.
fn evenly_spaced(times: &[Completion]) -> bool {
    let mut gaps: Vec<Duration> = times.windows(2).map(|w| w[1].0 - w[0].0).collect();
    if gaps.len() < 2 {
        return false;
    }
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    gaps[gaps.len() - 1] <= median.mul_f64(PROBE_EVEN_GAP)
}

/// Whether `level_at` (the policy's choice at a link rate) gives one level from
/// [`PROBE_DECISION_MARGIN`] times below `rate` to as many times above it.
fn level_settled(rate: f64, level_at: impl Fn(f64) -> Option<usize>) -> bool {
    if !(rate.is_finite() && rate > 0.0) {
        return false;
    }
    let level = level_at(rate);
    level.is_some()
        && level_at(rate / PROBE_DECISION_MARGIN) == level
        && level_at(rate * PROBE_DECISION_MARGIN) == level
}

/// How many probe writes to keep in flight at `now` (from the first post), given the
/// completions so far: before any, [`PROBE_START_BYTES`] worth of filler writes of `bytes`;
/// then as many as completed over the last [`PROBE_QUEUE`]; from 2 to [`PROBE_DEPTH`].
fn probe_depth(times: &[Completion], now: Duration, bytes: u64) -> usize {
    let n = if times.is_empty() {
        (PROBE_START_BYTES / bytes.max(1)) as usize
    } else {
        times
            .iter()
            .rev()
            .take_while(|&&(t, _)| now.saturating_sub(t) <= PROBE_QUEUE)
            .count()
    };
    n.clamp(2, PROBE_DEPTH)
}

/// Whether completions at `times` (in order) come at one rate by now: the third and fourth
/// quarters of the span from the first completion to the last carry about as many bytes
/// (within `agree`), in at least three completions each. A shaper's burst allowance makes
/// the early part of the span faster until it is spent; the rate is taken over the second
/// half.
fn rate_settled(times: &[Completion], agree: f64) -> bool {
    let (Some(&(first, _)), Some(&(last, _))) = (times.first(), times.last()) else {
        return false;
    };
    let quarter = (last - first) / 4;
    let within = |from: Duration, to: Duration| {
        times
            .iter()
            .filter(|&&(t, _)| t > from && t <= to)
            .fold((0usize, 0u64), |(n, b), &(_, bytes)| (n + 1, b + bytes))
    };
    let (n3, b3) = within(first + quarter * 2, first + quarter * 3);
    let (n4, b4) = within(first + quarter * 3, last);
    n3 >= 3 && n4 >= 3 && (b3 as f64 - b4 as f64).abs() <= agree * b4 as f64
}

/// The rate at which the writes completing at `times` (from the first post, in order) were
/// delivered: over the second half of the span from the first completion to the last, where
/// a shaper's burst allowance, spent at the start, no longer inflates it; over the whole span
/// when the second half holds fewer than two completions; all bytes over the last
/// completion's time when there is no span.
fn delivery_rate(times: &[Completion]) -> f64 {
    let Some(&(last, _)) = times.last() else {
        return 0.0;
    };
    let stretch = measured_stretch(times);
    let span = (last - stretch[0].0).as_secs_f64();
    if stretch.len() < 2 || span <= 0.0 {
        let all: u64 = times.iter().map(|c| c.1).sum();
        return all as f64 / last.as_secs_f64().max(1e-6);
    }
    // The bytes of the writes that completed after the stretch's first: those its span
    // delivered.
    let bytes: u64 = stretch[1..].iter().map(|c| c.1).sum();
    bytes as f64 / span
}

/// The completions [`delivery_rate`] measures over (`times` non-empty, in order): from the
/// last one at or before the midpoint of the span to the end, or all of them when that
/// leaves fewer than two after its start.
fn measured_stretch(times: &[Completion]) -> &[Completion] {
    let (first, last) = (times[0].0, times[times.len() - 1].0);
    let mid = first + (last - first) / 2;
    let k = times.iter().rposition(|&(t, _)| t <= mid).unwrap_or(0);
    if times.len() - 1 - k >= 2 {
        &times[k..]
    } else {
        times
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    /// Completions at `times` of writes of `bytes` each.
    fn w(times: &[Duration], bytes: u64) -> Vec<Completion> {
        times.iter().map(|&t| (t, bytes)).collect()
    }

    #[test]
    fn a_burst_allowance_at_the_start_does_not_inflate_the_rate() {
        // 64 KiB writes: the first 8 through a full bucket 0.1 ms apart, then one per 0.5 ms
        // (131 MB/s) for 4 ms.
        let mut times: Vec<Duration> = (0..8).map(|i| ms(0.1 + 0.1 * f64::from(i))).collect();
        let burst_end = 0.8;
        times.extend((1..=8).map(|i| ms(burst_end + 0.5 * f64::from(i))));
        let r = delivery_rate(&w(&times, 65536));
        assert!((r - 65536.0 / 0.0005).abs() < 1e6, "{r}");
    }

    #[test]
    fn the_probe_keeps_about_a_millisecond_of_the_link_in_flight() {
        assert_eq!(probe_depth(&[], ms(0.0), 65536), 4);
        assert_eq!(probe_depth(&[], ms(0.0), 16384), PROBE_DEPTH);
        assert_eq!(probe_depth(&[], ms(0.0), 1 << 20), 2);
        // One completion per 1.75 ms (64 KiB at 0.3 Gbit/s): the minimum.
        let slow: Vec<Duration> = (1..=5).map(|i| ms(1.75 * f64::from(i))).collect();
        assert_eq!(probe_depth(&w(&slow, 65536), ms(9.0), 65536), 2);
        // One per 0.17 ms (3 Gbit/s): about 6.
        let mid: Vec<Duration> = (1..=30).map(|i| ms(0.17 * f64::from(i))).collect();
        assert_eq!(probe_depth(&w(&mid, 65536), ms(5.2), 65536), 6);
        // One per 0.05 ms: capped.
        let fast: Vec<Duration> = (1..=60).map(|i| ms(0.05 * f64::from(i))).collect();
        assert_eq!(probe_depth(&w(&fast, 65536), ms(3.0), 65536), PROBE_DEPTH);
    }

    #[test]
    fn the_probe_runs_on_while_a_burst_allowance_lasts() {
        // Steady: settled once each late quarter holds enough completions.
        let steady: Vec<Duration> = (1..=16).map(|i| ms(0.5 * f64::from(i))).collect();
        assert!(rate_settled(&w(&steady, 65536), PROBE_AGREE));
        assert!(!rate_settled(&w(&steady[..8], 65536), PROBE_AGREE));
        // A bucket passing 20 writes at 0.05 ms each, then one per 0.5 ms: not settled while
        // the burst reaches into the second half, settled once it lies in the first.
        let mut burst: Vec<Duration> = (1..=20).map(|i| ms(0.05 * f64::from(i))).collect();
        burst.extend((1..=3).map(|i| ms(1.0 + 0.5 * f64::from(i))));
        assert!(!rate_settled(&w(&burst, 65536), PROBE_AGREE));
        burst.extend((4..=16).map(|i| ms(1.0 + 0.5 * f64::from(i))));
        assert!(rate_settled(&w(&burst, 65536), PROBE_AGREE));
        assert!(!rate_settled(&[], PROBE_AGREE));
    }

    #[test]
    fn a_reading_settles_the_choice_only_away_from_a_level_boundary() {
        // The most compressed level below 200 MB/s, a lighter one up to 1 GB/s, raw above.
        let policy = |r: f64| Some(usize::from(r >= 2e8) + usize::from(r >= 1e9));
        assert!(level_settled(1e8, policy));
        assert!(
            !level_settled(1.5e8, policy),
            "1.5 x 150 MB/s crosses 200 MB/s"
        );
        assert!(
            !level_settled(2.5e8, policy),
            "250 MB/s / 1.5 lies below 200 MB/s"
        );
        assert!(level_settled(5e8, policy));
        assert!(level_settled(5e9, policy));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(!level_settled(bad, policy), "{bad}");
        }
        assert!(
            !level_settled(1e8, |_| None),
            "no policy, nothing to settle"
        );
    }

    #[test]
    fn a_stall_is_not_an_even_reading() {
        // A slow link: one completion per 1.75 ms after a bucket's burst.
        let slow = [0.0, 0.1, 0.2, 1.9, 3.6, 5.4].map(ms);
        assert!(evenly_spaced(measured_stretch(&w(&slow, 1))));
        // A fast link whose receiver lost its core for 2 ms: a gap, then a clump.
        let stall = [0.0, 0.08, 0.16, 2.3, 2.35, 2.4].map(ms);
        assert!(!evenly_spaced(measured_stretch(&w(&stall, 1))));
        assert!(!evenly_spaced(measured_stretch(&w(
            &[0.0, 2.1, 2.15, 2.2].map(ms),
            1
        ))));
        assert!(
            !evenly_spaced(&w(&[ms(1.0), ms(2.0)], 1)),
            "one gap says nothing"
        );
    }

    #[test]
    fn steady_completions_give_their_rate_and_few_do_not_panic() {
        let times: Vec<Duration> = (1..=10).map(|i| ms(f64::from(i))).collect();
        let c = w(&times, 1000);
        assert!((delivery_rate(&c) - 1e6).abs() < 1.0);
        assert!((delivery_rate(&c[..2]) - 1e6).abs() < 1.0);
        assert!(delivery_rate(&c[..1]) > 0.0);
        assert_eq!(delivery_rate(&[]), 0.0);
    }

    #[test]
    fn writes_of_different_sizes_count_their_bytes() {
        // Filler of 64 KiB, then blocks of 96 KiB, one per 0.1 ms and one per 0.15 ms: one
        // link rate (655 MB/s) throughout.
        let mut c: Vec<Completion> = (1..=6).map(|i| (ms(0.1 * f64::from(i)), 65536)).collect();
        c.extend((1..=12).map(|i| (ms(0.6 + 0.15 * f64::from(i)), 98304)));
        let r = delivery_rate(&c);
        assert!((r - 98304.0 / 0.00015).abs() < 1e6, "{r}");
        assert!(rate_settled(&c, PROBE_AGREE));
        // One write per 0.1 ms, filler up to 1.5 ms and blocks after: the last two quarters
        // hold 5 writes each, but the last carries 1.5 times the bytes: not settled.
        let growing: Vec<Completion> = (1..=20)
            .map(|i| (ms(0.1 * f64::from(i)), if i <= 15 { 65536 } else { 98304 }))
            .collect();
        assert!(!rate_settled(&growing, PROBE_AGREE));
    }
}
