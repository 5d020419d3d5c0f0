//! Measuring the link: an estimator fed with completed writes, and the send pacer.
//!
//! A write is busy on the link from the moment it is handed to it (or starts waiting for the
//! pacer) until its completion (the peer has it). The estimator sums the union of those
//! intervals and the bytes completed in them, but only for writes posted behind a backlog of
//! at least [`BACKLOG`] bytes (or held by the pacer): a write that finds the link idle or
//! nearly so completes at the pace of the round trip and of both ends' threads getting a
//! core, which on a loaded machine says nothing of the link's rate (when encoding is the
//! bottleneck the link never builds a backlog and the rate cannot be seen; the last estimate
//! stands). Each idle-to-busy transition that is counted pays one round trip, so a window's
//! rate is bytes / (busy - periods x rtt). The estimate is the second highest of the last
//! [`RateEstimator::SAMPLES`] windows of at least [`RateEstimator::WINDOW`] busy time each
//! (the highest while there are three or fewer). A window is a lower bound on what the link
//! can carry: when the cores are busy (the codec, or the peer itself on the same machine),
//! the peer's reader thread waits for one and a window reads far below the link's rate, and
//! several in a row can. A token bucket's burst after an idle spell reads above it, but the
//! bucket empties in the first window that follows, so one outlier above is all there is.
//! The connect-time probe counts as the first window. A rate that drops (another flow, a
//! lowered `tc` rate) moves the estimate once four of five windows see it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bytes in flight behind which a write's completion paces with the link: a few blocks of
/// a compressed level, well past what a round trip holds on a local link.
pub const BACKLOG: u64 = 512 * 1024;

/// What a finished transfer measured of its connection's link, kept on the connection
/// ([`crate::link::Link::link_estimate`]) so that the next policy transfer on it starts from
/// it instead of probing: a long-lived connection pays the probe once. Only estimates that
/// windows of a backlogged link confirmed are kept ([`LinkEstimate::CONFIRMING_WINDOWS`]): a
/// transfer bound by its encoder never sees the link and leaves the last one as it was (or
/// none, and the next transfer probes). A rate that moved since is corrected by the windows
/// as within a transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimate {
    /// Link rate, bytes/s.
    pub rate: f64,
    /// Round trip (from the probe that first measured the link; zero if none did).
    pub rtt: Duration,
    /// CPU seconds the transport spent per byte sent (0: not measured).
    pub wire_cpu: f64,
    /// When the transfer that measured it finished.
    pub measured_at: Instant,
}

impl LinkEstimate {
    /// How long an estimate stands in for a probe; older ones are probed again.
    pub const TTL: Duration = Duration::from_secs(30);
    /// Windows a transfer must have seen for its estimate to be kept.
    pub const CONFIRMING_WINDOWS: u32 = 4;

    /// Whether it may replace a probe at `now`.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.rate.is_finite()
            && self.rate > 0.0
            && now.saturating_duration_since(self.measured_at) <= Self::TTL
    }
}

/// Link-rate estimate of one path.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    rate: Option<f64>,
    /// The last window rates, newest last.
    recent: VecDeque<f64>,
    rtt: Duration,
    covered_until: Option<Instant>,
    window_bytes: u64,
    window_busy: Duration,
    window_periods: u32,
    samples: u32,
}

impl RateEstimator {
    /// Busy time a window gathers before it becomes a sample.
    pub const WINDOW: Duration = Duration::from_millis(4);
    /// Windows the estimate is taken from.
    pub const SAMPLES: usize = 5;
    /// Places a probe's reading takes among the [`Self::SAMPLES`]: with the estimate the
    /// second highest of four or five, one window alone then neither raises nor lowers it,
    /// two above it raise it and four below lower it. Right after the probe a transfer bound
    /// by its encoder leaves a shaper's token bucket time to refill, and a window can read
    /// the bucket's burst: at 1 Gbit/s one such window read 2-4 Gbit/s and, outvoting the
    /// probe alone, sent ~50 blocks as `q8` before later windows brought the estimate back.
    pub const PROBE_WEIGHT: usize = 3;

    /// An estimator starting from `initial` bytes/s (`None`: nothing known yet).
    pub const fn new(initial: Option<f64>) -> Self {
        Self {
            rate: initial,
            recent: VecDeque::new(),
            rtt: Duration::ZERO,
            covered_until: None,
            window_bytes: 0,
            window_busy: Duration::ZERO,
            window_periods: 0,
            samples: 0,
        }
    }

    /// The round trip to subtract per busy period (the probe measures it).
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt;
    }

    /// The round trip in use.
    pub const fn rtt(&self) -> Duration {
        self.rtt
    }

    /// Bytes/s, once known.
    pub const fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Samples taken.
    pub const fn samples(&self) -> u32 {
        self.samples
    }

    /// A probe's result: the estimate now, and [`Self::PROBE_WEIGHT`] of the samples it is
    /// taken from.
    pub fn set_rate(&mut self, rate: f64) {
        if rate.is_finite() && rate > 0.0 {
            for _ in 0..Self::PROBE_WEIGHT {
                self.push(rate);
            }
        }
    }

    /// Adds a window's rate and takes the estimate from the last [`Self::SAMPLES`].
    fn push(&mut self, sample: f64) {
        if self.recent.len() == Self::SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(sample);
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        // The highest of up to three, the second highest of four or five.
        self.rate = Some(sorted[if n <= 3 { n - 1 } else { n - 2 }]);
    }

    /// A write of `bytes` was busy on the link from `begin` to `end`; `queued`: it was posted
    /// while another write was in flight or the pacer held it (only those are samples).
    /// Writes are reported roughly in the order they started; overlaps count once.
    pub fn record(&mut self, bytes: u64, begin: Instant, end: Instant, queued: bool) {
        let end = end.max(begin);
        if !queued {
            self.covered_until = Some(self.covered_until.map_or(end, |c| c.max(end)));
            return;
        }
        match self.covered_until {
            Some(c) if begin <= c => {
                if end > c {
                    self.window_busy += end - c;
                }
            }
            _ => {
                self.window_busy += end - begin;
                self.window_periods += 1;
            }
        }
        self.covered_until = Some(self.covered_until.map_or(end, |c| c.max(end)));
        self.window_bytes += bytes;
        if self.window_busy >= Self::WINDOW {
            let latency = self.rtt * self.window_periods;
            // The round trips can at most explain three quarters of the busy time.
            let wire = self
                .window_busy
                .saturating_sub(latency)
                .max(self.window_busy / 4);
            self.push(self.window_bytes as f64 / wire.as_secs_f64());
            self.samples += 1;
            self.window_bytes = 0;
            self.window_busy = Duration::ZERO;
            self.window_periods = 0;
        }
    }
}

/// A token bucket that spaces block writes to `rate` bytes/s (a burst of one block).
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    next: Instant,
}

impl Pacer {
    /// A pacer at `rate` bytes/s (at least 1).
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1) as f64,
            next: Instant::now(),
        }
    }

    /// Reserves the link for `bytes`: returns when the write may start and when the link is
    /// free again at this rate.
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> (Instant, Instant) {
        let start = self.next.max(now);
        let end = start + Duration::from_secs_f64(bytes as f64 / self.rate);
        self.next = end;
        (start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_estimate_stands_in_for_a_probe_only_while_fresh() {
        let now = Instant::now();
        let e = LinkEstimate {
            rate: 1.25e8,
            rtt: Duration::from_micros(80),
            wire_cpu: 0.4e-9,
            measured_at: now,
        };
        assert!(e.is_fresh(now));
        assert!(e.is_fresh(now + LinkEstimate::TTL));
        assert!(!e.is_fresh(now + LinkEstimate::TTL + Duration::from_millis(1)));
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(!LinkEstimate { rate, ..e }.is_fresh(now), "{rate}");
        }
    }

    #[test]
    fn back_to_back_writes_measure_the_rate() {
        let mut e = RateEstimator::new(None);
        let t0 = Instant::now();
        // 1 MB per ms = 1 GB/s, 10 writes back to back.
        for i in 0..10u32 {
            let b = t0 + Duration::from_millis(u64::from(i));
            e.record(1_000_000, b, b + Duration::from_millis(1), true);
        }
        let r = e.rate().unwrap();
        assert!((r - 1e9).abs() < 1e7, "{r}");
    }

    #[test]
    fn idle_gaps_do_not_lower_the_rate_and_rtt_is_taken_out() {
        let mut e = RateEstimator::new(None);
        e.set_rtt(Duration::from_micros(100));
        let t0 = Instant::now();
        // Isolated writes: 100 µs round trip + 100 KB at 1 GB/s (100 µs), 5 ms apart.
        for i in 0..40u64 {
            let b = t0 + Duration::from_millis(5 * i);
            e.record(100_000, b, b + Duration::from_micros(200), true);
        }
        let r = e.rate().unwrap();
        assert!((r - 1e9).abs() < 5e7, "{r}");
    }

    #[test]
    fn the_estimate_follows_a_rate_change() {
        let mut e = RateEstimator::new(Some(1.25e9));
        let mut t = Instant::now();
        for _ in 0..50 {
            e.record(1_000_000, t, t + Duration::from_micros(800), true);
            t += Duration::from_micros(800);
        }
        assert!(e.rate().unwrap() > 1.2e9);
        // The link drops to 0.125 GB/s.
        for _ in 0..20 {
            e.record(1_000_000, t, t + Duration::from_millis(8), true);
            t += Duration::from_millis(8);
        }
        let r = e.rate().unwrap();
        assert!(r < 0.14e9, "{r}");
    }

    /// Feeds one window per stretch from `t` on: 1 MB over 8 ms x stretch (0.125 GB/s at 1).
    fn windows(e: &mut RateEstimator, t: &mut Instant, stretches: &[f64]) {
        for s in stretches {
            let d = Duration::from_secs_f64(0.008 * s);
            e.record(1_000_000, *t, *t + d, true);
            *t += d;
        }
    }

    #[test]
    fn stalled_windows_and_one_burst_do_not_move_the_estimate() {
        // One stalled (4x longer), then a burst (4x shorter).
        let mut e = RateEstimator::new(None);
        windows(
            &mut e,
            &mut Instant::now(),
            &[1.0, 1.0, 4.0, 1.0, 0.25, 1.0],
        );
        let r = e.rate().unwrap();
        assert!((r - 0.125e9).abs() < 1e6, "{r}");
        // Three of five stalled: the peer's reader waited for a core, not the link.
        let mut e = RateEstimator::new(None);
        windows(&mut e, &mut Instant::now(), &[1.0, 1.0, 4.0, 3.0, 1.0, 4.0]);
        let r = e.rate().unwrap();
        assert!((r - 0.125e9).abs() < 1e6, "{r}");
    }

    #[test]
    fn the_probe_counts_as_three_windows() {
        let mut e = RateEstimator::new(None);
        e.set_rate(1e9);
        assert_eq!(e.rate(), Some(1e9));
        // A lower window, or three, do not yet outvote it ...
        let mut t = Instant::now();
        windows(&mut e, &mut t, &[1.0]);
        assert_eq!(e.rate(), Some(1e9));
        windows(&mut e, &mut t, &[1.0, 1.0]);
        assert_eq!(e.rate(), Some(1e9));
        // ... four do.
        windows(&mut e, &mut t, &[1.0]);
        let r = e.rate().unwrap();
        assert!((r - 0.125e9).abs() < 1e6, "{r}");
        // A burst's window above the probe does not raise it; two windows above it do.
        // (Windows of 4 ms at 0.25 GB/s.)
        let mut e = RateEstimator::new(None);
        e.set_rate(0.1e9);
        let mut t = Instant::now();
        windows(&mut e, &mut t, &[0.5]);
        assert_eq!(e.rate(), Some(0.1e9));
        windows(&mut e, &mut t, &[0.5]);
        let r = e.rate().unwrap();
        assert!((r - 0.25e9).abs() < 1e6, "{r}");
    }

    #[test]
    fn pacer_spaces_writes() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000);
        let (s1, e1) = p.reserve(1000, t0);
        let (s2, e2) = p.reserve(1000, t0);
        assert!(s1 >= t0 && e1 == s2);
        assert_eq!(e2 - s1, Duration::from_millis(2));
    }
}
