//! The receiving side: a driver thread turns notifications into decode jobs; decode
//! threads copy each block out of its slot, decode it into a chunk buffer, give the slot
//! back to the sender and place the chunk into its layer; finished layers come out in
//! order.

mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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
    shared: Arc<Shared>,
    rx: Receiver<LayerResult>,
    done: BTreeMap<usize, Vec<u8>>,
    next: usize,
    started: Instant,
    timeout: Duration,
}

impl KvReceiver {
    /// Waits for the sender's `Begin`, checks the announced cache against the limits, and
    /// offers the slots; decoding starts in the background.
    ///
    /// # Errors
    /// Nothing announced within the timeout; a bad codec header; a cache larger than
    /// `max_kv_bytes`; a failed connection.
    pub fn accept(conn: &Connection, slots: &RecvSlots, opts: &RecvOptions) -> Result<Self> {
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
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let threads = match opts.threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let ready = if levels_on_wire {
            SessionMsg::ReadyRates {
                region: slots.region.0,
                slot_size: slots.slot_size,
                slots: slots.slots,
                host: crate::policy::calib::host_id(),
                decode_rates: decode_rates(&decoders, threads),
            }
        } else {
            SessionMsg::Ready {
                region: slots.region.0,
                slot_size: slots.slot_size,
                slots: slots.slots,
            }
        };
        let shared = Arc::new(Shared {
            conn: conn.clone(),
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
                slots: (0..slots.slots).collect(),
            }
            .to_bytes(),
        )?;
        let (job_tx, job_rx) = mpsc::channel::<Notification>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for i in 0..threads {
            let (sh, jr) = (shared.clone(), job_rx.clone());
            thread::Builder::new()
                .name(format!("kvwire-decode{i}"))
                .spawn(move || decode_loop(&sh, &jr))
                .map_err(|e| TransportError::io("spawning a decode thread", e))?;
        }
        let sh = shared.clone();
        let timeout = opts.timeout;
        let driver = thread::Builder::new()
            .name("kvwire-recv".into())
            .spawn(move || drive(&sh, &job_tx, &done_rx, timeout))
            .map_err(|e| TransportError::io("spawning the receive driver", e))?;
        Ok(Self {
            driver: Some(driver),
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
        let layers = self.shared.layers.len();
        if self.next >= layers {
            // The driver confirms the transfer and stops reading the connection; after
            // this, the connection is free for the next transfer.
            if let Some(d) = self.driver.take() {
                let _ = d.join();
            }
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

    /// Receives every layer into one cache.
    ///
    /// # Errors
    /// As [`Self::next_layer`]; the cache cannot be allocated.
    pub fn recv_all(mut self) -> Result<(KvCache, RecvStats)> {
        let spec = self.spec();
        let mut cache = KvCache::try_zeroed(spec)?;
        let es = spec.dtype.size();
        while let Some((l, buf)) = self.next_layer()? {
            let r = spec.layer_range(l);
            cache.bytes_mut()[r.start * es..r.end * es].copy_from_slice(&buf);
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
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
    }
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
