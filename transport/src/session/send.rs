//! The sending side: encode (layer, chunk) blocks on worker threads, each straight into a
//! pooled send buffer, and write each into a receive slot the peer granted, while the
//! calling thread turns completions and grants back into free buffers and slots.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvwire_codec::model::ModelRole;
use kvwire_codec::{EncodeOptions, Encoder, KvSpec, KvView, Level};

use super::msg::{BlockImm, SessionMsg, MAX_CHUNKS, MAX_LAYERS};
use crate::endpoint::Connection;
use crate::error::{Result, TransportError};
use crate::link::{Event, SendBuf};
use crate::policy::{
    self, Calibration, LinkEstimate, Pacer, PolicyOptions, PolicySummary, RateEstimator,
};
use crate::region::RegionId;

mod auto;
mod probe;
use auto::{live_state, Live};

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Codec level and chunking.
    pub encode: EncodeOptions,
    /// Encoding threads (0: one per core).
    pub threads: usize,
    /// Send buffers (encoded blocks not yet acknowledged), at most; bounds memory.
    pub buffers: usize,
    /// Longest wait for the receiver (a grant, the completion).
    pub timeout: Duration,
    /// Choose the level per block from measured rates (`--level auto`); `None`: every
    /// block at `encode.level`. `encode.chunk_tokens` and `channel_scale_k` still apply.
    pub policy: Option<PolicyOptions>,
    /// Pace block writes to this many bytes/s (a token bucket before each write), to emulate
    /// a slower link; the rate estimator sees the paced rate.
    pub pace: Option<u64>,
}

impl SendOptions {
    /// Options for `encode` with the other fields at their defaults.
    pub fn new(encode: EncodeOptions) -> Self {
        Self {
            encode,
            threads: 0,
            buffers: 32,
            timeout: Duration::from_secs(5),
            policy: None,
            pace: None,
        }
    }
}

/// What a finished transfer measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// Blocks sent (each acknowledged by the receiver's completion).
    pub blocks: usize,
    /// Bytes written to the peer (blocks plus the codec header).
    pub wire_bytes: u64,
    /// Bytes of the KV cache as given (its dtype).
    pub input_bytes: u64,
    /// From `begin` to the receiver's report that the last block decoded.
    pub elapsed: Duration,
    /// The receiver's own first-block-to-last-decode time.
    pub receiver_decode: Duration,
    /// What the policy chose (with [`SendOptions::policy`]).
    pub policy: Option<PolicySummary>,
}

/// Encodes block (layer, chunk) with an encoder into a buffer.
type EncodeFn<'a> =
    dyn Fn(&Encoder, usize, usize, &mut Vec<u8>) -> kvwire_codec::Result<()> + Sync + 'a;

struct Pool {
    free_slots: VecDeque<u16>,
    buffers: Vec<Vec<u8>>,
    outstanding: usize,
    error: Option<TransportError>,
    /// The receiver's `Complete`, if it came while blocks were still being posted.
    complete: Option<(u32, u64)>,
    /// Link rate of this transfer's writes.
    rate: RateEstimator,
    /// Writes on the link: wr id -> (bytes, busy since, paced until, queued behind another).
    in_flight: HashMap<u64, (u64, Instant, Instant, bool)>,
    pacer: Option<Pacer>,
    live: Option<Live>,
}

/// One KV transfer being sent; layers may be pushed as a prefill engine produces them.
pub struct KvSender<'c> {
    conn: &'c Connection,
    /// One encoder per candidate level (one without a policy), best quality first.
    encoders: Vec<Encoder>,
    /// Whether blocks carry a level byte (a `BeginLevels` transfer).
    levels_on_wire: bool,
    opts: SendOptions,
    region: RegionId,
    slot_size: u64,
    pool: Mutex<Pool>,
    changed: Condvar,
    started: Instant,
    blocks: usize,
    wire_bytes: AtomicUsize,
    next_wr: AtomicUsize,
    /// The link's transport CPU counter when the blocks began
    /// ([`crate::link::Link::send_cpu`]).
    cpu_at_begin: Option<(u64, Duration)>,
    /// The link is to be probed before the next block (a policy transfer without an
    /// estimate): the first [`Self::pump`] does, with that call's first blocks at hand.
    probe_pending: bool,
}

impl<'c> KvSender<'c> {
    /// Announces a transfer of a cache of `spec` and waits for the receiver's slots.
    ///
    /// # Errors
    /// The codec refuses the spec or options; the shape exceeds what the immediate can name
    /// (4096 layers, 4096 chunks per layer); the receiver aborts, goes silent past the
    /// timeout, or the connection fails.
    pub fn begin(conn: &'c Connection, spec: KvSpec, opts: &SendOptions) -> Result<Self> {
        let levels = match &opts.policy {
            Some(p) => p.candidates()?,
            None => vec![opts.encode.level],
        };
        let mut encoders = Vec::new();
        for &level in &levels {
            let mut e = opts.encode;
            e.level = level;
            // Per-channel K scaling does not exist at raw; the other candidates keep it.
            e.channel_scale_k &= !matches!(level, Level::Raw | Level::Lmcache);
            encoders.push(Encoder::new(spec, &e)?);
        }
        // A fixed level: build the coder's model tables in the background while the
        // connection starts up, so that the first blocks do not wait for them. A policy
        // builds a level's tables when it first chooses it (the first block of a level is not
        // timed): building every candidate's up front cost tens of milliseconds of CPU that
        // a fast link's transfer, at a level needing none of them, could not hide.
        if opts.policy.is_none() {
            super::prepare_tables(encoders[0].header(), ModelRole::Encode);
        }
        let chunks = encoders[0].header().chunks();
        // A policy transfer keeps layer 4095 free for the probe's immediate.
        let max_layers = if opts.policy.is_some() {
            MAX_LAYERS - 1
        } else {
            MAX_LAYERS
        };
        if spec.shape.layers > max_layers || chunks > MAX_CHUNKS {
            return Err(TransportError::Invalid(format!(
                "{} layers of {chunks} chunks: a session names at most {max_layers} layers and {MAX_CHUNKS} chunks (raise --chunk-tokens)",
                spec.shape.layers
            )));
        }
        let calibration = match &opts.policy {
            Some(p) => Some(match &p.calibration {
                Some(c) => c.clone(),
                None => Calibration::cached()?,
            }),
            None => None,
        };
        let headers: Vec<Vec<u8>> = encoders
            .iter()
            .map(|e| {
                let mut h = Vec::new();
                e.write_header(&mut h);
                h
            })
            .collect();
        let header_len = headers.iter().map(Vec::len).sum();
        let begin = if opts.policy.is_some() {
            SessionMsg::BeginLevels { headers }
        } else {
            SessionMsg::Begin {
                header: headers.into_iter().next().expect("one level"),
            }
        };
        conn.send_msg(&begin.to_bytes())?;
        let started = Instant::now();
        let deadline = started + opts.timeout;
        let (region, slot_size, slots, host, decode_rates) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match conn.poll(left)? {
                Some(Event::Message(m)) => match SessionMsg::from_bytes(&m)? {
                    SessionMsg::Ready {
                        region,
                        slot_size,
                        slots,
                    } if opts.policy.is_none() => break (region, slot_size, slots, 0, Vec::new()),
                    SessionMsg::ReadyRates {
                        region,
                        slot_size,
                        slots,
                        host,
                        decode_rates,
                    } if opts.policy.is_some() => {
                        break (region, slot_size, slots, host, decode_rates)
                    }
                    SessionMsg::Abort { reason } => {
                        return Err(TransportError::RemoteAbort(reason))
                    }
                    other => {
                        return Err(TransportError::Protocol(format!(
                            "expected Ready, got {other:?}"
                        )));
                    }
                },
                // An acknowledgement of the previous transfer on this connection.
                Some(Event::WriteDone { .. }) => {}
                Some(other) => {
                    return Err(TransportError::Protocol(format!(
                        "unexpected event before Ready: {other:?}"
                    )));
                }
                None => {
                    return Err(TransportError::Timeout(
                        opts.timeout,
                        "the receiver to accept the transfer",
                    ))
                }
            }
        };
        tracing::debug!(region, slot_size, slots, ?decode_rates, "receiver ready");
        let mut live = match (&opts.policy, calibration) {
            (Some(p), Some(cal)) => {
                let mut live = live_state(p, &cal, &encoders, &decode_rates, opts);
                live.shared_cpu = host != 0 && host == policy::calib::host_id();
                live.summary.shared_cpu = live.shared_cpu;
                Some(live)
            }
            _ => None,
        };
        // What an earlier transfer on this connection measured: its round trip serves every
        // transfer's windows, and its rate stands in for a policy transfer's probe.
        let earlier = conn.link_estimate().filter(|e| e.is_fresh(Instant::now()));
        let start_from = earlier.filter(|_| {
            opts.policy
                .as_ref()
                .is_some_and(|p| p.initial_rate.is_none() && !p.always_probe)
        });
        let initial = opts
            .policy
            .as_ref()
            .and_then(|p| p.initial_rate)
            .or(start_from.map(|e| e.rate));
        let mut rate = RateEstimator::new(initial);
        if let Some(e) = earlier {
            rate.set_rtt(e.rtt);
        }
        if let (Some(l), Some(e)) = (&mut live, start_from) {
            l.wire_cpu = e.wire_cpu;
            l.summary.wire_cpu_ps = (e.wire_cpu * 1e12) as u64;
            l.summary.rtt_ns = e.rtt.as_nanos() as u64;
        }
        let mut sender = Self {
            conn,
            encoders,
            levels_on_wire: opts.policy.is_some(),
            opts: opts.clone(),
            region: RegionId(region),
            slot_size,
            pool: Mutex::new(Pool {
                free_slots: VecDeque::new(),
                buffers: Vec::new(),
                outstanding: 0,
                error: None,
                complete: None,
                rate,
                in_flight: HashMap::new(),
                pacer: opts.pace.map(Pacer::new),
                live,
            }),
            changed: Condvar::new(),
            started,
            blocks: 0,
            wire_bytes: AtomicUsize::new(header_len),
            next_wr: AtomicUsize::new(0),
            cpu_at_begin: None,
            probe_pending: opts.policy.is_some() && initial.is_none(),
        };
        if let Some(e) = start_from {
            tracing::debug!(
                rate = e.rate,
                "link estimate from an earlier transfer on this connection"
            );
        }
        sender.cpu_at_begin = conn.send_cpu();
        Ok(sender)
    }

    /// The codec header of the transfer (with a policy: of its best-quality candidate).
    pub fn encoder(&self) -> &Encoder {
        &self.encoders[0]
    }

    /// The link-rate estimate so far, bytes/s.
    pub fn link_rate(&self) -> Option<f64> {
        self.lock().rate.rate()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: TransportError) {
        let mut p = self.lock();
        if p.error.is_none() {
            p.error = Some(e);
        }
        self.changed.notify_all();
    }

    /// Waits until `ready` says the pool has what a worker needs, then lets `take` take it.
    fn wait_for<T>(
        &self,
        what: &'static str,
        mut take: impl FnMut(&mut Pool) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut p = self.lock();
        loop {
            if let Some(e) = &p.error {
                return Err(TransportError::Invalid(format!("transfer failed: {e}")));
            }
            if let Some(t) = take(&mut p) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout(self.opts.timeout, what));
            }
            p = self
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Handles one connection event on the calling thread.
    fn on_event(&self, ev: Event) -> Result<()> {
        match ev {
            Event::WriteDone { buf, wr_id } => {
                let mut p = self.lock();
                p.outstanding -= 1;
                if let Some((bytes, begin, paced, queued)) = p.in_flight.remove(&wr_id) {
                    p.rate
                        .record(bytes, begin, paced.max(Instant::now()), queued);
                }
                if let SendBuf::Bytes(v) = buf {
                    p.buffers.push(v);
                }
                self.changed.notify_all();
                Ok(())
            }
            Event::Message(m) => match SessionMsg::from_bytes(&m)? {
                SessionMsg::Grant { slots } => {
                    let mut p = self.lock();
                    p.free_slots.extend(slots);
                    self.changed.notify_all();
                    Ok(())
                }
                SessionMsg::Complete { blocks, decode_ns } => {
                    self.lock().complete = Some((blocks, decode_ns));
                    Ok(())
                }
                SessionMsg::Abort { reason } => Err(TransportError::RemoteAbort(reason)),
                other => Err(TransportError::Protocol(format!(
                    "unexpected {other:?} mid-transfer"
                ))),
            },
            other => Err(TransportError::Protocol(format!(
                "unexpected event mid-transfer: {other:?}"
            ))),
        }
    }

    /// Writes `buf` into the receiver's slot that the immediate `imm` names, as work request
    /// `wr`.
    fn post_to_slot(&self, buf: Vec<u8>, imm: BlockImm, wr: u64) -> Result<()> {
        self.conn.post_write(
            SendBuf::Bytes(buf),
            self.region,
            u64::from(imm.slot) * self.slot_size,
            Some(imm.pack()),
            wr,
        )
    }

    /// Encodes and writes `blocks` ((layer, chunk) pairs), `encode` filling a buffer per
    /// block; returns when every block is posted.
    fn pump(&mut self, blocks: &[(usize, usize)], encode: &EncodeFn<'_>) -> Result<()> {
        let mut blocks = blocks;
        if std::mem::take(&mut self.probe_pending) {
            let sent = match self.probe(blocks, encode) {
                Ok(sent) => sent,
                Err(e) => return Err(self.abort(e)),
            };
            if let Some(l) = &mut self.lock().live {
                l.summary.probed = true;
            }
            self.blocks += sent;
            blocks = &blocks[sent..];
            self.cpu_at_begin = self.conn.send_cpu();
        }
        let threads = match self.opts.threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(blocks.len().max(1));
        let next = AtomicUsize::new(0);
        let running = AtomicUsize::new(threads);
        let this = &*self;
        let worker = || -> Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(layer, chunk)) = blocks.get(i) else {
                    return Ok(());
                };
                let cap = this.opts.buffers.max(1);
                let mut buf =
                    this.wait_for("a free send buffer (writes are not completing)", |p| {
                        (p.outstanding < cap).then(|| {
                            p.outstanding += 1;
                            p.buffers.pop().unwrap_or_default()
                        })
                    })?;
                let (index, announce) = this.decide(layer, chunk);
                this.encode_block(layer, chunk, index, announce, &mut buf, encode)?;
                let slot = this
                    .wait_for("a free receive slot (the receiver stopped granting)", |p| {
                        p.free_slots.pop_front()
                    })?;
                let imm = BlockImm {
                    slot,
                    layer: layer as u32,
                    chunk: chunk as u32,
                };
                this.wire_bytes.fetch_add(buf.len(), Ordering::Relaxed);
                let wr = this.next_wr.fetch_add(1, Ordering::Relaxed) as u64;
                let begin = Instant::now();
                let (paced, held) = this.pace(buf.len() as u64).unwrap_or((begin, false));
                {
                    let mut p = this.lock();
                    // Queued: the link (or the pacer, emulating one) had a backlog when this
                    // write came, so its completion paces with the link rather than with how
                    // fast either end's threads get a core.
                    let backlog: u64 = p.in_flight.values().map(|w| w.0).sum();
                    let queued = held || backlog >= policy::rate::BACKLOG;
                    p.in_flight
                        .insert(wr, (buf.len() as u64, begin, paced, queued));
                }
                this.post_to_slot(buf, imm, wr)?;
            }
        };
        let result = thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    if let Err(e) = worker() {
                        this.fail(e);
                    }
                    running.fetch_sub(1, Ordering::AcqRel);
                    this.changed.notify_all();
                });
            }
            // This thread serves completions and grants until the workers are done.
            while running.load(Ordering::Acquire) > 0 {
                match this.conn.poll(Duration::from_millis(20)) {
                    Ok(Some(ev)) => {
                        if let Err(e) = this.on_event(ev) {
                            this.fail(e);
                        }
                    }
                    Ok(None) => {}
                    // The receiver confirmed every block and closed before the last worker
                    // returned from posting: not a failure; wait for the workers.
                    Err(_) if this.lock().complete.is_some() => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => this.fail(e),
                }
            }
            this.lock().error.take()
        });
        self.blocks += blocks.len();
        match result {
            Some(e) => Err(self.abort(e)),
            None => Ok(()),
        }
    }

    /// Tells the receiver the transfer failed with `e` (if the connection still carries it);
    /// returns `e`.
    fn abort(&self, e: TransportError) -> TransportError {
        let _ = self.conn.send_msg(
            &SessionMsg::Abort {
                reason: e.to_string(),
            }
            .to_bytes(),
        );
        e
    }

    /// Encodes block (`layer`, `chunk`) with candidate `index` into `buf` (cleared first),
    /// behind its level byte where blocks carry one; with `announce`, first tells the
    /// receiver to build the level's tables (`Prepare`).
    ///
    /// # Errors
    /// The codec's; a block larger than the receiver's slots.
    fn encode_block(
        &self,
        layer: usize,
        chunk: usize,
        index: usize,
        announce: bool,
        buf: &mut Vec<u8>,
        encode: &EncodeFn<'_>,
    ) -> Result<()> {
        buf.clear();
        if announce {
            // The receiver builds this level's tables while this end builds its own.
            self.conn
                .send_msg(&SessionMsg::Prepare { index: index as u8 }.to_bytes())?;
        }
        if self.levels_on_wire {
            buf.push(index as u8);
        }
        let t = Instant::now();
        encode(&self.encoders[index], layer, chunk, buf)?;
        self.observe(index, buf.len(), t.elapsed());
        if buf.len() as u64 > self.slot_size {
            return Err(TransportError::Invalid(format!(
                "block (layer {layer}, chunk {chunk}) is {} bytes, the receiver's slots hold {} (use smaller chunks)",
                buf.len(),
                self.slot_size
            )));
        }
        Ok(())
    }

    /// Encodes and sends every chunk of layer `layer`, given as a one-layer view; returns
    /// once they are posted (the wire and the receiver keep working while the caller
    /// produces the next layer).
    ///
    /// # Errors
    /// As [`Self::begin`], plus codec errors for the view.
    pub fn push_layer(&mut self, layer: usize, layer_view: &KvView<'_>) -> Result<()> {
        let chunks = self.encoders[0].header().chunks();
        let blocks: Vec<(usize, usize)> = (0..chunks).map(|c| (layer, c)).collect();
        self.pump(&blocks, &|enc, l, c, out| {
            enc.encode_layer_block(layer_view, l, c, out)
        })
    }

    /// Encodes and sends every block of a whole cache, layer-major, several blocks in
    /// flight at once.
    ///
    /// # Errors
    /// As [`Self::push_layer`].
    pub fn push_all(&mut self, view: &KvView<'_>) -> Result<()> {
        let chunks = self.encoders[0].header().chunks();
        let blocks: Vec<(usize, usize)> = (0..view.spec().shape.layers)
            .flat_map(|l| (0..chunks).map(move |c| (l, c)))
            .collect();
        self.pump(&blocks, &|enc, l, c, out| enc.encode_block(view, l, c, out))
    }

    /// Waits for the receiver to report every block decoded.
    ///
    /// # Errors
    /// The receiver aborted (a block failed its CRC, ...), went silent past the timeout,
    /// counted a different number of blocks, or the connection failed.
    pub fn finish(self) -> Result<SendStats> {
        let h = self.encoders[0].header();
        let total = h.spec.shape.layers * h.chunks();
        if self.blocks != total {
            let e =
                TransportError::Invalid(format!("finish after {} of {total} blocks", self.blocks));
            let _ = self.conn.send_msg(
                &SessionMsg::Abort {
                    reason: e.to_string(),
                }
                .to_bytes(),
            );
            return Err(e);
        }
        let deadline = Instant::now() + self.opts.timeout;
        // Done when the receiver confirmed and every write completed (an acknowledgement
        // may trail the confirmation on another stream; none may leak into the next transfer).
        loop {
            let (complete, outstanding) = {
                let p = self.lock();
                (p.complete, p.outstanding)
            };
            if let (Some((blocks, decode_ns)), 0) = (complete, outstanding) {
                if blocks as usize != self.blocks {
                    return Err(TransportError::Protocol(format!(
                        "receiver confirmed {blocks} blocks, {} were sent",
                        self.blocks
                    )));
                }
                self.keep_link_estimate();
                let policy = self.lock().live.as_ref().map(|l| l.summary);
                if let Some(s) = &policy {
                    tracing::info!(levels = %s.counts(), first_bps = s.first_rate, last_bps = s.last_rate, switches = s.switches, "policy summary");
                }
                return Ok(SendStats {
                    blocks: self.blocks,
                    wire_bytes: self.wire_bytes.load(Ordering::Relaxed) as u64,
                    input_bytes: self.encoders[0].header().spec.byte_len() as u64,
                    elapsed: self.started.elapsed(),
                    receiver_decode: Duration::from_nanos(decode_ns),
                    policy,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.conn.poll(left) {
                Ok(Some(ev)) => self.on_event(ev)?,
                Ok(None) => {
                    return Err(TransportError::Timeout(
                        self.opts.timeout,
                        "the receiver to confirm the transfer",
                    ))
                }
                // The receiver confirmed and then closed before every acknowledgement came
                // back: the confirmation already says every block landed and decoded.
                Err(_) if complete.is_some() => {
                    self.lock().outstanding = 0;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The transport's CPU seconds per byte sent since `before` ([`crate::link::Link::send_cpu`]),
    /// once more than `min_bytes` went by; `None` before that or where the fabric does not
    /// measure it.
    fn wire_cpu_since(&self, before: Option<(u64, Duration)>, min_bytes: u64) -> Option<f64> {
        let ((b0, c0), (b1, c1)) = (before?, self.conn.send_cpu()?);
        (b1 >= b0 + min_bytes && b1 > b0)
            .then(|| c1.saturating_sub(c0).as_secs_f64() / (b1 - b0) as f64)
    }

    /// Leaves what this transfer measured of the link on the connection for the next
    /// transfer ([`LinkEstimate`]), if windows of a backlogged link confirmed it.
    fn keep_link_estimate(&self) {
        let (rate, rtt, windows, probe_cpu) = {
            let p = self.lock();
            let probe_cpu = p.live.as_ref().map_or(0.0, |l| l.wire_cpu);
            (p.rate.rate(), p.rate.rtt(), p.rate.samples(), probe_cpu)
        };
        let Some(rate) = rate.filter(|_| windows >= LinkEstimate::CONFIRMING_WINDOWS) else {
            return;
        };
        // The transport's CPU per byte over this transfer's blocks, where enough went by.
        let wire_cpu = self
            .wire_cpu_since(self.cpu_at_begin, 1 << 20)
            .unwrap_or(probe_cpu);
        self.conn.set_link_estimate(LinkEstimate {
            rate,
            rtt,
            wire_cpu,
            measured_at: Instant::now(),
        });
    }
}

/// Sends a whole cache: `begin`, every block, `finish`.
///
/// # Errors
/// As [`KvSender::begin`], [`KvSender::push_all`] and [`KvSender::finish`].
pub fn send_kv(conn: &Connection, view: &KvView<'_>, opts: &SendOptions) -> Result<SendStats> {
    let mut s = KvSender::begin(conn, *view.spec(), opts)?;
    s.push_all(view)?;
    s.finish()
}
