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
use crate::session::msg::BlockImm;

/// Immediate of a probe write (layer 4095, chunk 4095; policy transfers name fewer layers).
const PROBE_IMM_LAYER: u32 = 0xfff;
/// Bytes of each of the rate probe's writes, and at most how many are in flight.
const PROBE_WRITE: u64 = 64 * 1024;
const PROBE_DEPTH: usize = 8;
/// How long the rate probe keeps writing after its first write completed, and at most how
/// many bytes it sends. A shaper's burst allowance (a token bucket) passes the first bytes
/// at any speed; a few milliseconds of traffic past the first completion bound that error
/// to a small factor, which the per-block estimates then correct.
const PROBE_SPAN: Duration = Duration::from_millis(4);
const PROBE_MAX_BYTES: u64 = 8 << 20;

/// The policy's live state.
pub(super) struct Live {
    pub(super) opts: PolicyOptions,
    pub(super) costs: Vec<LevelCost>,
    /// Observed encoded bytes per input byte, per candidate.
    pub(super) ratios: Vec<Option<f64>>,
    /// Observed encode speed per thread (input bytes/s of wall time, so it includes sharing
    /// the cores with whatever else runs), per candidate.
    pub(super) encode_seen: Vec<Option<f64>>,
    /// Encoding threads.
    pub(super) threads: f64,
    pub(super) block_bytes: f64,
    pub(super) total: u64,
    pub(super) decided: u64,
    pub(super) last: Option<usize>,
    pub(super) summary: PolicySummary,
    /// The receiver runs on this machine.
    pub(super) shared_cpu: bool,
}

impl KvSender<'_> {
    /// Measures the link before the first block: one-byte writes (the round trip), then
    /// [`PROBE_SPAN`] of back-to-back [`PROBE_WRITE`]-byte writes (the rate: bytes completed
    /// after the first completion over the time to the last). The receiver gives probe slots
    /// back without decoding them.
    pub(super) fn probe(&mut self) -> Result<()> {
        // The smallest of three one-byte round trips: the first also pays thread wake-ups.
        let mut rtt = Duration::MAX;
        for _ in 0..3 {
            rtt = rtt.min(self.probe_round(1, 1)?);
        }
        let rate = self.probe_rate(PROBE_WRITE.min(self.slot_size))?;
        let mut p = self.lock();
        p.rate.set_rtt(rtt);
        p.rate.set_rate(rate);
        if let Some(l) = &mut p.live {
            l.summary.rtt_ns = rtt.as_nanos() as u64;
        }
        tracing::debug!(rtt_us = rtt.as_micros() as u64, rate, "link probe");
        Ok(())
    }

    /// Keeps [`PROBE_DEPTH`] probe writes of `bytes` each in flight until [`PROBE_SPAN`]
    /// after the first completion (or [`PROBE_MAX_BYTES`]); the delivery rate after the
    /// first completion, bytes/s.
    fn probe_rate(&self, bytes: u64) -> Result<f64> {
        let start = Instant::now();
        let deadline = start + self.opts.timeout;
        let (mut posted, mut done) = (0u64, 0u64);
        let mut first_done: Option<(Instant, u64)> = None;
        let mut last_done = Instant::now();
        let mut wrs = Vec::new();
        loop {
            let stop = posted * bytes >= PROBE_MAX_BYTES
                || first_done.is_some_and(|(t, _)| t.elapsed() >= PROBE_SPAN);
            while !stop && posted - done < PROBE_DEPTH as u64 {
                let Some(slot) = self.lock().free_slots.pop_front() else {
                    break;
                };
                let wr = self.post_probe(slot, bytes)?;
                wrs.push(wr);
                posted += 1;
            }
            if stop && done == posted {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.conn.poll(left)? {
                Some(ev) => {
                    if let Event::WriteDone { wr_id, .. } = &ev {
                        if wrs.contains(wr_id) {
                            done += 1;
                            last_done = Instant::now();
                            first_done.get_or_insert((last_done, done));
                        }
                    }
                    self.on_event(ev)?;
                }
                None => return Err(TransportError::Timeout(self.opts.timeout, "the link probe")),
            }
        }
        let (first, at) = first_done.expect("at least one probe write completed");
        let span = (last_done - first).as_secs_f64();
        Ok(if done > at && span > 0.0 {
            ((done - at) * bytes) as f64 / span
        } else {
            // A single completion: its bytes over the whole probe, round trip included.
            (done * bytes) as f64 / (last_done - start).as_secs_f64().max(1e-6)
        })
    }

    /// Posts one probe write of `bytes` into `slot`; its work-request id.
    fn post_probe(&self, slot: u16, bytes: u64) -> Result<u64> {
        let mut buf = vec![0u8; bytes as usize];
        buf[0] = 0xff;
        self.pace(bytes);
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
        Ok(wr)
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
                wrs.push(self.post_probe(slot, bytes)?);
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
        let costs: Vec<LevelCost> = live
            .costs
            .iter()
            .zip(live.ratios.iter().zip(&live.encode_seen))
            .map(|(c, (r, e))| LevelCost {
                ratio: r.unwrap_or(c.ratio),
                encode_rate: e.map_or(c.encode_rate, |e| e * live.threads),
                // A level that has encoded a block is set up (the ratio is seen from then on).
                setup: if r.is_some() { 0.0 } else { c.setup },
                ..*c
            })
            .collect();
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

    /// Records an encoded block's size and encode time for its level's observed ratio and
    /// speed.
    pub(super) fn observe(&self, index: usize, encoded: usize, took: Duration) {
        if let Some(live) = &mut self.lock().live {
            let r = encoded as f64 / live.block_bytes.max(1.0);
            let slot = &mut live.ratios[index];
            let first = slot.is_none();
            *slot = Some(slot.map_or(r, |old| old + 0.2 * (r - old)));
            // A level's first block may have built the coder's model tables (tens of ms, once
            // per process): timing it would make the level look several times slower than it
            // is, and the policy would shun it. Its speed is left to the calibration.
            if first {
                return;
            }
            let speed = live.block_bytes / took.as_secs_f64().max(1e-9);
            let slot = &mut live.encode_seen[index];
            *slot = Some(slot.map_or(speed, |old| old + 0.2 * (speed - old)));
        }
    }
}

/// The policy's starting state: per candidate, this machine's encode speed times the threads
/// used, the receiver's reported decode speed (this machine's when it reported none), and the
/// sample's ratio until blocks of the level have been seen.
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
            let reported = decode_rates
                .iter()
                .find(|(c, _)| *c == level.code())
                .map(|&(_, r)| r as f64)
                .filter(|r| *r > 0.0);
            LevelCost {
                level,
                ratio: speed.map_or(1.0, |s| s.ratio),
                encode_rate: speed.map_or(1e9, |s| s.encode_rate) * threads,
                decode_rate: reported
                    .unwrap_or_else(|| speed.map_or(1e9, |s| s.decode_rate) * cal.cores as f64),
                // Both ends build the level's tables on its first block.
                setup: 2.0 * speed.map_or(0.0, |s| s.setup),
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
        threads,
        costs,
        block_bytes: h.spec.byte_len() as f64 / total.max(1) as f64,
        total,
        decided: 0,
        last: None,
        summary: PolicySummary::default(),
        shared_cpu: false,
    }
}
