//! The receiving side: a driver thread turns notifications into decode jobs; decode
//! threads copy each block out of its slot, give the slot back to the sender, decode it into
//! a chunk buffer and place the chunk into its layer; finished layers come out in order
//! ([`KvReceiver::next_layer`]), or every chunk goes straight into one cache ([`recv_kv`]).

mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvwire_codec::model::ModelRole;
use kvwire_codec::{Decoder, KvCache, KvSpec, Level};

use super::msg::{SessionMsg, MAX_SLOTS};
use crate::endpoint::{Connection, Endpoint};
use crate::error::{Result, TransportError};
use crate::link::{Event, Notification};
use crate::region::{Access, Region, RegionId};
use worker::{decode_loop, decode_rates, drive};

/// A registered receive region cut into equal slots; one block lands in each.
#[derive(Debug, Clone)]
pub struct RecvSlots {
    /// The region's id at the endpoint.
    pub region: RegionId,
    /// The region.
    pub mem: Arc<Region>,
    /// Bytes per slot.
    pub slot_size: u64,
    /// Slots.
    pub slots: u16,
}

impl RecvSlots {
    /// Registers a region of `slots` x `slot_size` bytes with `ep` (writable by peers), once;
    /// every transfer reuses it.
    ///
    /// # Errors
    /// A slot count outside 1..=256, or the region cannot be mapped.
    pub fn register(ep: &Endpoint, slots: u16, slot_size: u64) -> Result<Self> {
        if slots == 0 || slots > MAX_SLOTS || slot_size == 0 {
            return Err(TransportError::Invalid(format!(
                "{slots} slots of {slot_size} bytes (1 to {MAX_SLOTS} slots, non-empty)"
            )));
        }
        let len = usize::try_from(u64::from(slots) * slot_size)
            .map_err(|_| TransportError::Invalid("receive region too large".into()))?;
        let (region, mem) = ep.register(
            len,
            Access {
                remote_write: true,
                remote_read: false,
            },
        )?;
        Ok(Self {
            region,
            mem,
            slot_size,
            slots,
        })
    }
}

/// How to receive.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Decode threads (0: one per core).
    pub threads: usize,
    /// Longest silence from the sender before the transfer fails.
    pub timeout: Duration,
    /// Largest KV cache (bytes, decoded) accepted; a `Begin` announcing more is refused
    /// before anything is allocated.
    pub max_kv_bytes: u64,
}

impl Default for RecvOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            timeout: Duration::from_secs(5),
            max_kv_bytes: 64 << 30,
        }
    }
}

/// What a finished receive measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvStats {
    /// Blocks decoded.
    pub blocks: usize,
    /// Block bytes that arrived.
    pub wire_bytes: u64,
    /// From the transfer's `Begin` to the last block decoded.
    pub elapsed: Duration,
}

/// A decoded layer (index, bytes) or the error that ended the transfer.
type LayerResult = Result<(usize, Vec<u8>)>;

struct LayerState {
    buf: Vec<u8>,
    chunks_done: Vec<bool>,
    remaining: usize,
}

struct Shared {
    conn: Connection,
    /// Whether chunks go into `cache` rather than per-layer buffers ([`recv_kv`]).
    collect: bool,
    /// With `collect`: the cache every chunk is placed into, until [`recv_kv`] takes it.
    cache: Mutex<Option<KvCache>>,
    /// This transfer's cut of the receive region: bytes per slot and slots.
    slot_size: u64,
    slot_count: u16,
    /// One decoder per level of the transfer (`Begin`: one).
    decoders: Vec<Decoder>,
    /// Whether each block starts with its level's index (`BeginLevels`).
    levels_on_wire: bool,
    slots: RecvSlots,
    layers: Vec<Mutex<Option<LayerState>>>,
    decoded: AtomicUsize,
    total: usize,
    wire_bytes: AtomicUsize,
    failed: AtomicBool,
    out: Mutex<Sender<LayerResult>>,
    first_block: Mutex<Option<Instant>>,
    /// Slots the decoders freed (and already granted to the sender), for the driver's
    /// bookkeeping of which slots may be written.
    regrant: Mutex<Vec<u16>>,
    /// Signalled by the decoder that finishes the last block.
    all_decoded: Mutex<Sender<()>>,
}

impl Shared {
    fn emit(&self, r: LayerResult) {
        let tx = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(r);
    }

    fn fail(&self, e: TransportError) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            let _ = self.conn.send_msg(
                &SessionMsg::Abort {
                    reason: e.to_string(),
                }
                .to_bytes(),
            );
            self.emit(Err(e));
        }
    }
}

/// One KV transfer being received.
pub struct KvReceiver {
    driver: Option<thread::JoinHandle<()>>,
    /// The decode threads: joined with the driver, so that once the transfer is over no
    /// thread of it holds the connection (whose last owner's drop closes it in order).
    decode_threads: Vec<thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    rx: Receiver<LayerResult>,
    done: BTreeMap<usize, Vec<u8>>,
    next: usize,
    started: Instant,
    timeout: Duration,
}

impl KvReceiver {
    /// Waits for the sender's `Begin`, checks the announced cache against the limits, and
    /// offers the slots; decoding starts in the background and each layer is handed out,
    /// in order, by [`Self::next_layer`].
    ///
    /// # Errors
    /// Nothing announced within the timeout; a bad codec header; a cache larger than
    /// `max_kv_bytes`; a failed connection.
    pub fn accept(conn: &Connection, slots: &RecvSlots, opts: &RecvOptions) -> Result<Self> {
        Self::start(conn, slots, opts, Placement::Layers)
    }

    /// As [`Self::accept`], for a receiver that wants the whole cache: it is allocated at
    /// the start and the decoders place every chunk straight into it, so that
    /// [`Self::recv_all`] hands it over without copying ([`Self::next_layer`] still works,
    /// copying each layer out).
    ///
    /// # Errors
    /// As [`Self::accept`]; the cache cannot be allocated.
    pub fn accept_whole(conn: &Connection, slots: &RecvSlots, opts: &RecvOptions) -> Result<Self> {
        Self::start(conn, slots, opts, Placement::Whole(Vec::new()))
    }

    /// As [`Self::accept_whole`], decoding into `memory` when its capacity holds the announced
    /// cache (a long-lived receiver handing back the memory of its last cache, or a serving
    /// framework's own buffer): no allocation, and no page faults on memory already touched.
    /// Every byte of it is overwritten by the transfer's blocks before [`Self::recv_all`]
    /// returns it; memory too small is dropped and a fresh cache allocated. On an error the
    /// memory is dropped.
    ///
    /// # Errors
    /// As [`Self::accept_whole`].
    pub fn accept_whole_into(
        conn: &Connection,
        slots: &RecvSlots,
        opts: &RecvOptions,
        memory: Vec<u8>,
    ) -> Result<Self> {
        Self::start(conn, slots, opts, Placement::Whole(memory))
    }

    /// `accept` (per-layer buffers) or `accept_whole` (one cache).
    fn start(
        conn: &Connection,
        slots: &RecvSlots,
        opts: &RecvOptions,
        placement: Placement,
    ) -> Result<Self> {
        let collect = matches!(placement, Placement::Whole(_));
        let (headers, levels_on_wire) = loop {
            match conn.poll(opts.timeout)? {
                Some(Event::Message(m)) => match SessionMsg::from_bytes(&m)? {
                    SessionMsg::Begin { header } => break (vec![header], false),
                    SessionMsg::BeginLevels { headers } => break (headers, true),
                    SessionMsg::Abort { reason } => {
                        return Err(TransportError::RemoteAbort(reason))
                    }
                    other => {
                        return Err(TransportError::Protocol(format!(
                            "expected Begin, got {other:?}"
                        )))
                    }
                },
                // An acknowledgement of an earlier transfer this side sent on the connection.
                Some(Event::WriteDone { .. }) => {}
                Some(other) => {
                    return Err(TransportError::Protocol(format!(
                        "unexpected event before Begin: {other:?}"
                    )))
                }
                None => {
                    return Err(TransportError::Timeout(
                        opts.timeout,
                        "the sender to begin a transfer",
                    ))
                }
            }
        };
        let started = Instant::now();
        let mut decoders = Vec::with_capacity(headers.len());
        for header in &headers {
            let d = match Decoder::new(header) {
                Ok((d, n)) if n == header.len() => d,
                Ok(_) => {
                    return Err(refuse(
                        conn,
                        TransportError::Protocol("stray bytes after the codec header".into()),
                    ))
                }
                Err(e) => return Err(refuse(conn, TransportError::Codec(e.into()))),
            };
            // Every level must cut the same cache the same way.
            if let Some(first) = decoders.first().map(Decoder::header) {
                let h = d.header();
                if h.spec != first.spec || h.chunk_tokens != first.chunk_tokens {
                    return Err(refuse(
                        conn,
                        TransportError::Protocol(
                            "the levels of a transfer differ in shape or chunking".into(),
                        ),
                    ));
                }
            }
            decoders.push(d);
        }
        let decoder = &decoders[0];
        if !levels_on_wire {
            // One level: its tables are needed for the first block; build them while the
            // sender starts up (a multi-level sender says which level comes next: Prepare).
            super::prepare_tables(decoder.header(), ModelRole::Decode);
        }
        let spec = decoder.header().spec;
        let total_bytes = spec.byte_len() as u64;
        if total_bytes > opts.max_kv_bytes {
            return Err(refuse(
                conn,
                TransportError::Invalid(format!(
                    "the sender announced a {total_bytes}-byte cache, the limit is {}",
                    opts.max_kv_bytes
                )),
            ));
        }
        if levels_on_wire && spec.shape.layers >= super::msg::MAX_LAYERS {
            return Err(refuse(
                conn,
                TransportError::Invalid("a multi-level transfer names at most 4095 layers".into()),
            ));
        }
        let chunks = decoder.header().chunks();
        let total = spec.shape.layers * chunks;
        let (slot_size, slot_count) = slot_layout(
            slots.slot_size,
            slots.slots,
            decoder.chunk_spec(0).byte_len() as u64,
        );
        let cache = match placement {
            Placement::Whole(memory) => Some(cache_in(spec, memory).map_err(|e| refuse(conn, e))?),
            Placement::Layers => None,
        };
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let threads = match opts.threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let ready = if levels_on_wire {
            SessionMsg::ReadyRates {
                region: slots.region.0,
                slot_size,
                slots: slot_count,
                host: crate::policy::calib::host_id(),
                decode_rates: decode_rates(&decoders, threads),
            }
        } else {
            SessionMsg::Ready {
                region: slots.region.0,
                slot_size,
                slots: slot_count,
            }
        };
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            collect,
            cache: Mutex::new(cache),
            slot_size,
            slot_count,
            decoders,
            levels_on_wire,
            slots: slots.clone(),
            layers: (0..spec.shape.layers).map(|_| Mutex::new(None)).collect(),
            decoded: AtomicUsize::new(0),
            total,
            wire_bytes: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            out: Mutex::new(tx),
            first_block: Mutex::new(None),
            regrant: Mutex::new(Vec::new()),
            all_decoded: Mutex::new(done_tx),
        });
        conn.send_msg(&ready.to_bytes())?;
        conn.send_msg(
            &SessionMsg::Grant {
                slots: (0..slot_count).collect(),
            }
            .to_bytes(),
        )?;
        let (job_tx, job_rx) = mpsc::channel::<Notification>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut decode_threads = Vec::with_capacity(threads);
        for i in 0..threads {
            let (sh, jr) = (shared.clone(), job_rx.clone());
            let t = thread::Builder::new()
                .name(format!("kvwire-decode{i}"))
                .spawn(move || decode_loop(&sh, &jr))
                .map_err(|e| TransportError::io("spawning a decode thread", e))?;
            decode_threads.push(t);
        }
        let sh = shared.clone();
        let timeout = opts.timeout;
        let driver = thread::Builder::new()
            .name("kvwire-recv".into())
            .spawn(move || drive(&sh, &job_tx, &done_rx, timeout))
            .map_err(|e| TransportError::io("spawning the receive driver", e))?;
        Ok(Self {
            driver: Some(driver),
            decode_threads,
            shared,
            rx,
            done: BTreeMap::new(),
            next: 0,
            started,
            timeout: opts.timeout,
        })
    }

    /// The spec of the cache being received.
    pub fn spec(&self) -> KvSpec {
        self.shared.decoders[0].header().spec
    }

    /// The codec header of the transfer (of a multi-level transfer: its first level).
    pub fn decoder(&self) -> &Decoder {
        &self.shared.decoders[0]
    }

    /// The levels the sender may use in this transfer.
    pub fn levels(&self) -> Vec<Level> {
        self.shared
            .decoders
            .iter()
            .map(|d| d.header().level)
            .collect()
    }

    /// The next layer in order (index, bytes in the cache's layout and dtype), once all its
    /// blocks decoded; `None` after the last.
    ///
    /// # Errors
    /// A block failed (CRC, decode), the sender aborted or went silent, the connection
    /// failed.
    pub fn next_layer(&mut self) -> Result<Option<(usize, Vec<u8>)>> {
        let Some((l, buf)) = self.next_finished()? else {
            return Ok(None);
        };
        if !self.shared.collect {
            return Ok(Some((l, buf)));
        }
        let cache = self.shared.cache.lock().unwrap_or_else(|p| p.into_inner());
        let cache = cache
            .as_ref()
            .expect("taken only by recv_all, which consumes self");
        Ok(Some((
            l,
            cache.bytes()[layer_bytes(cache.spec(), l)].to_vec(),
        )))
    }

    /// The next finished layer in order; with `collect` its bytes are in the cache and the
    /// buffer is empty.
    fn next_finished(&mut self) -> Result<Option<(usize, Vec<u8>)>> {
        let layers = self.shared.layers.len();
        if self.next >= layers {
            // The driver confirms the transfer and stops reading the connection; after
            // this, the connection is free for the next transfer.
            self.join_threads();
            return Ok(None);
        }
        loop {
            if let Some(buf) = self.done.remove(&self.next) {
                let l = self.next;
                self.next += 1;
                return Ok(Some((l, buf)));
            }
            match self.rx.recv_timeout(self.timeout + Duration::from_secs(1)) {
                Ok(Ok((l, buf))) => {
                    self.done.insert(l, buf);
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(TransportError::Timeout(self.timeout, "the next layer"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::PeerClosed(
                        "the receive threads ended".into(),
                    ));
                }
            }
        }
    }

    /// Receives every layer into one cache: after [`Self::accept_whole`] the cache the
    /// decoders filled, after [`Self::accept`] a new one each layer is copied into.
    ///
    /// # Errors
    /// As [`Self::next_layer`]; the cache cannot be allocated.
    pub fn recv_all(mut self) -> Result<(KvCache, RecvStats)> {
        if self.shared.collect {
            while self.next_finished()?.is_some() {}
            let stats = self.stats();
            // Every layer came out, so the decoders are done with the cache.
            let cache = self
                .shared
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .expect("a collecting receiver's cache, taken once");
            return Ok((cache, stats));
        }
        let spec = self.spec();
        let mut cache = zeroed_cache(spec)?;
        while let Some((l, buf)) = self.next_layer()? {
            cache.bytes_mut()[layer_bytes(&spec, l)].copy_from_slice(&buf);
        }
        let stats = self.stats();
        Ok((cache, stats))
    }

    /// What was received so far.
    pub fn stats(&self) -> RecvStats {
        RecvStats {
            blocks: self.shared.decoded.load(Ordering::Acquire),
            wire_bytes: self.shared.wire_bytes.load(Ordering::Acquire) as u64,
            elapsed: self.started.elapsed(),
        }
    }

    /// Waits for the driver (which confirms the transfer, or stops on a failure) and then
    /// the decode threads (which end once the driver drops their job queue). Until they have,
    /// they hold clones of the connection: a caller dropping its own right after the
    /// transfer would then not be the last owner, the connection would not close in order,
    /// and a process exiting next could end before the confirmation left its queue.
    fn join_threads(&mut self) {
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
        for t in self.decode_threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for KvReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReceiver")
            .field("spec", &self.spec())
            .field("next_layer", &self.next)
            .finish_non_exhaustive()
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        if self.driver.is_some() && self.next < self.shared.layers.len() {
            // The caller gave up early: stop the driver and the decoders.
            self.shared.failed.store(true, Ordering::Release);
        }
        self.join_threads();
    }
}

/// Receives one whole KV transfer ([`KvReceiver::accept_whole`], then
/// [`KvReceiver::recv_all`]): every chunk is decoded straight into its place in the cache while
/// later blocks are still on the wire. Returns once every block arrived, passed its CRC and
/// decoded.
///
/// # Errors
/// As [`KvReceiver::accept_whole`] and [`KvReceiver::recv_all`].
pub fn recv_kv(
    conn: &Connection,
    slots: &RecvSlots,
    opts: &RecvOptions,
) -> Result<(KvCache, RecvStats)> {
    KvReceiver::accept_whole(conn, slots, opts)?.recv_all()
}

/// Where a receiver puts the decoded chunks.
enum Placement {
    /// A buffer per layer, handed out as the layer completes.
    Layers,
    /// One cache for the whole transfer, in this memory if it is large enough.
    Whole(Vec<u8>),
}

/// A cache of `spec` in `memory` if its capacity holds one (its old bytes stay until the
/// blocks overwrite them), else a fresh one ([`zeroed_cache`]).
fn cache_in(spec: KvSpec, mut memory: Vec<u8>) -> Result<KvCache> {
    let bytes = spec.byte_len();
    if memory.capacity() < bytes {
        return zeroed_cache(spec);
    }
    // Within the capacity: no reallocation; only a grown tail is written (zeros).
    memory.resize(bytes, 0);
    Ok(KvCache::from_bytes(spec, memory)?)
}

/// A cache of `spec` on untouched zero pages ([`crate::raw::zeroed_vec`]).
fn zeroed_cache(spec: KvSpec) -> Result<KvCache> {
    let bytes = spec.byte_len();
    let data = crate::raw::zeroed_vec(bytes)
        .ok_or_else(|| TransportError::Invalid(format!("cannot allocate a {bytes}-byte cache")))?;
    Ok(KvCache::from_bytes(spec, data)?)
}

/// The byte range of layer `l` in a cache of `spec`.
pub(crate) fn layer_bytes(spec: &KvSpec, l: usize) -> std::ops::Range<usize> {
    let (r, es) = (spec.layer_range(l), spec.dtype.size());
    r.start * es..r.end * es
}

/// Bytes a block of this transfer may take beyond its chunk's raw bytes: the block header,
/// the level byte, a compressed level's models and scales.
const BLOCK_OVERHEAD: u64 = 64 << 10;

/// How a transfer whose largest raw chunk is `chunk_bytes` cuts a region registered as
/// `slots` slots of `slot_size` bytes: into slots just large enough for the largest block
/// the sender can make (the raw chunk plus overhead; compressed levels are smaller), so that
/// as many blocks as fit can be in flight (at most [`MAX_SLOTS`]), which lets the sender run
/// ahead while the decoders catch up; as registered when those slots are no larger (the
/// sender then refuses a block that does not fit, with a message).
fn slot_layout(slot_size: u64, slots: u16, chunk_bytes: u64) -> (u64, u16) {
    let region = slot_size * u64::from(slots);
    let need = chunk_bytes
        .checked_add(BLOCK_OVERHEAD)
        .and_then(|n| n.checked_next_multiple_of(4096));
    let Some(need) = need.filter(|&n| n < slot_size) else {
        return (slot_size, slots);
    };
    let count = (region / need).min(u64::from(MAX_SLOTS)) as u16;
    (need, count)
}

fn refuse(conn: &Connection, e: TransportError) -> TransportError {
    let _ = conn.send_msg(
        &SessionMsg::Abort {
            reason: e.to_string(),
        }
        .to_bytes(),
    );
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blocks_get_more_slots_of_the_same_region() {
        // 16 x 4 MiB registered; 192 KiB chunks: 256 KiB slots, 256 of them (the cap).
        assert_eq!(slot_layout(4 << 20, 16, 192 << 10), (256 << 10, 256));
        // 4 x 1 MiB registered; 100-byte chunks: 68 KiB slots, 60 of them.
        assert_eq!(slot_layout(1 << 20, 4, 100), (68 << 10, 60));
        // The region never grows: every cut fits in it.
        for (size, n, chunk) in [(1u64 << 20, 8u16, 5000u64), (3 << 20, 3, 1 << 20)] {
            let (s, c) = slot_layout(size, n, chunk);
            assert!(s * u64::from(c) <= size * u64::from(n));
            assert!(s >= chunk + BLOCK_OVERHEAD);
        }
    }

    #[test]
    fn blocks_as_large_as_the_slots_keep_the_registered_cut() {
        assert_eq!(slot_layout(1 << 20, 8, 1 << 20), (1 << 20, 8));
        assert_eq!(slot_layout(1 << 20, 8, 2 << 20), (1 << 20, 8));
        assert_eq!(slot_layout(1 << 20, 8, u64::MAX), (1 << 20, 8));
    }
}
