//! The link probe before a policy transfer's first block: the round trip, the delivery rate
//! (past a shaper's burst allowance) and what the transport's CPU pays per byte sent.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::KvSender;
use crate::error::{Result, TransportError};
use crate::link::Event;
use crate::session::msg::BlockImm;

/// Immediate of a probe write (layer 4095, chunk 4095; policy transfers name fewer layers).
const PROBE_IMM_LAYER: u32 = 0xfff;
/// Bytes of each of the rate probe's writes, and at most how many are in flight.
const PROBE_WRITE: u64 = 64 * 1024;
const PROBE_DEPTH: usize = 8;
/// The probe keeps in flight about what the link delivered over this much time just before
/// (at least 2 writes): enough to keep it busy, and little to wait for at the end on a slow
/// link, where [`PROBE_DEPTH`] writes would queue for many ms ahead of the first block.
const PROBE_QUEUE: Duration = Duration::from_millis(1);
/// Bytes in flight before the first completion: enough that a fast link's first round trips
/// measure more than the round trip (a small cache probes with small writes), little enough
/// to queue for only a few ms on a slow one.
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
/// At most how many bytes the probe sends ...
const PROBE_MAX_BYTES: u64 = 8 << 20;
/// ... and at most this fraction of the cache's own size, so that probing a fast link costs
/// a small transfer no more than a few percent.
const PROBE_MAX_SHARE: u64 = 32;

impl KvSender<'_> {
    /// Measures the link before the first block: one-byte writes (the round trip), then
    /// writes of up to [`PROBE_WRITE`] bytes until the delivery rate settles (the rate,
    /// [`Self::probe_rate`]), timing what the transport's threads spend on them (the CPU per
    /// byte sent, [`crate::link::Link::send_cpu`]). The receiver gives probe slots back
    /// without decoding them.
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
        let started = Instant::now();
        let rate = self.probe_rate(write, max_bytes)?;
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
            wire_cpu_ns_per_byte = wire_cpu * 1e9,
            "link probe"
        );
        Ok(())
    }

    /// Keeps up to [`PROBE_DEPTH`] probe writes of `bytes` each in flight ([`probe_depth`])
    /// until the delivery rate has settled ([`PROBE_MIN_SPAN`], [`rate_settled`]) or the
    /// first level no longer depends on it ([`Self::choice_settled`]),
    /// [`PROBE_MAX_SPAN`] after the first completion, or `max_bytes` posted; the delivery rate
    /// ([`delivery_rate`]), bytes/s.
    fn probe_rate(&self, bytes: u64, max_bytes: u64) -> Result<f64> {
        let start = Instant::now();
        let deadline = start + self.opts.timeout;
        let (mut posted, mut done) = (0u64, 0u64);
        // When each probe write completed, from `start`, in order (writes complete in the
        // order posted, and the pacer's end times increase).
        let mut times: Vec<Duration> = Vec::new();
        let mut wrs = Vec::new();
        loop {
            let measured = times.first().is_some_and(|&t| {
                let span = start.elapsed().saturating_sub(t);
                span >= PROBE_MAX_SPAN
                    || (span >= PROBE_MIN_SPAN
                        && (rate_settled(&times, PROBE_AGREE)
                            || self.choice_settled(&times, bytes)))
                    || (span >= PROBE_LOOSE_SPAN && rate_settled(&times, PROBE_AGREE_LOOSE))
            });
            let stop = measured || posted * bytes >= max_bytes;
            let depth = probe_depth(&times, start.elapsed(), bytes);
            while !stop && posted - done < depth {
                let Some(slot) = self.lock().free_slots.pop_front() else {
                    break;
                };
                wrs.push(self.post_probe(slot, bytes)?);
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

    /// Whether the rate the probe reads from completions at `times` (writes of `bytes` each)
    /// leaves the first level settled: the same at [`PROBE_DECISION_MARGIN`] times the
    /// reading, and at the reading over it.
    fn choice_settled(&self, times: &[Duration], bytes: u64) -> bool {
        if times.len() < PROBE_DECIDING {
            return false;
        }
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        evenly_spaced(measured_stretch(&sorted))
            && level_settled(delivery_rate(&sorted, bytes), |r| self.level_at(r))
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
        self.post_to_slot(buf, slot, imm, wr)?;
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
}

/// Whether completions at `times` (in order, at least three) come evenly: no gap between
/// two more than [`PROBE_EVEN_GAP`] times their median gap. A link that is slow delivers
/// evenly at its rate; a stall of either end's threads (a busy core) leaves one long gap and
/// then a clump, and reads low though the link is fast.
fn evenly_spaced(times: &[Duration]) -> bool {
    let mut gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
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

/// How many probe writes of `bytes` to keep in flight at `now` (from the first post), given
/// the completions so far: before any, [`PROBE_START_BYTES`] worth; then as many as
/// completed over the last [`PROBE_QUEUE`]; from 2 to [`PROBE_DEPTH`].
fn probe_depth(times: &[Duration], now: Duration, bytes: u64) -> u64 {
    let n = if times.is_empty() {
        (PROBE_START_BYTES / bytes.max(1)) as usize
    } else {
        times
            .iter()
            .rev()
            .take_while(|&&t| now.saturating_sub(t) <= PROBE_QUEUE)
            .count()
    };
    n.clamp(2, PROBE_DEPTH) as u64
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
    let Some(&last) = times.last() else {
        return 0.0;
    };
    let stretch = measured_stretch(times);
    let n = stretch.len() - 1;
    let span = (last - stretch[0]).as_secs_f64();
    if n == 0 || span <= 0.0 {
        return (times.len() as u64 * bytes) as f64 / last.as_secs_f64().max(1e-6);
    }
    (n as u64 * bytes) as f64 / span
}

/// The completions [`delivery_rate`] measures over (`times` non-empty, in order): from the
/// last one at or before the midpoint of the span to the end, or all of them when that
/// leaves fewer than two after its start.
fn measured_stretch(times: &[Duration]) -> &[Duration] {
    let (first, last) = (times[0], times[times.len() - 1]);
    let mid = first + (last - first) / 2;
    let k = times.iter().rposition(|&t| t <= mid).unwrap_or(0);
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
        assert_eq!(probe_depth(&[], ms(0.0), 65536), 4);
        assert_eq!(probe_depth(&[], ms(0.0), 16384), PROBE_DEPTH as u64);
        assert_eq!(probe_depth(&[], ms(0.0), 1 << 20), 2);
        // One completion per 1.75 ms (64 KiB at 0.3 Gbit/s): the minimum.
        let slow: Vec<Duration> = (1..=5).map(|i| ms(1.75 * f64::from(i))).collect();
        assert_eq!(probe_depth(&slow, ms(9.0), 65536), 2);
        // One per 0.17 ms (3 Gbit/s): about 6.
        let mid: Vec<Duration> = (1..=30).map(|i| ms(0.17 * f64::from(i))).collect();
        assert_eq!(probe_depth(&mid, ms(5.2), 65536), 6);
        // One per 0.05 ms: capped.
        let fast: Vec<Duration> = (1..=60).map(|i| ms(0.05 * f64::from(i))).collect();
        assert_eq!(probe_depth(&fast, ms(3.0), 65536), PROBE_DEPTH as u64);
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
        assert!(evenly_spaced(measured_stretch(&slow)));
        // A fast link whose receiver lost its core for 2 ms: a gap, then a clump.
        let stall = [0.0, 0.08, 0.16, 2.3, 2.35, 2.4].map(ms);
        assert!(!evenly_spaced(measured_stretch(&stall)));
        assert!(!evenly_spaced(measured_stretch(
            &[0.0, 2.1, 2.15, 2.2].map(ms)
        )));
        assert!(!evenly_spaced(&[ms(1.0), ms(2.0)]), "one gap says nothing");
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
