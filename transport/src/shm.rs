//! The shared-memory data path (intra-node tier): both processes map the same memfd pages.
//! A write is one copy into the peer's region plus an entry in the peer's notification
//! ring and a futex wake; no socket carries data. The TCP control connection still carries
//! the handshake, messages and the close, and its end is how a dead peer is noticed.
//!
//! Ring layout (one per direction, created by its consumer, 8-byte words):
//! word 0 head (entries produced), word 8 tail (entries consumed), word 16 (low half) the
//! futex sequence the consumer sleeps on, word 24 (low half) non-zero while the consumer is
//! (about to be) asleep on it, entries from byte 256: four words each
//! (`region | imm_present << 32`, offset, len, imm).
//!
//! Waking a sleeping thread costs the producer a futex syscall and an inter-processor
//! interrupt (about 6 us per write in this project's 2-core VM, a fifth of a 1 MiB copy), so
//! the producer wakes the consumer only when it says it sleeps, and a consumer whose entries
//! come close together spins for the next one (at most [`SPIN`]) before it sleeps.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::thread::futex;

use crate::error::{Result, TransportError};
use crate::link::{Event, Notification, SendBuf};
use crate::meta::EndpointMeta;
use crate::proto::frame::{FrameHeader, FrameKind, HEADER_LEN};
use crate::proto::handshake::frame;
use crate::region::{Backing, Region, RegionId, RegionOptions, RegionSlice, RegionTable};
use crate::tcp::link::Shared;

/// Entries in a notification ring.
const RING_ENTRIES: usize = 1024;
const RING_HEAD: usize = 256;
const RING_BYTES: usize = RING_HEAD + RING_ENTRIES * 32;

/// The shm data path of one connection.
pub(crate) struct ShmPath {
    inbound: Arc<Region>,
    outbound: Region,
    peer_regions: HashMap<RegionId, Region>,
    produce: Mutex<()>,
    timeout: Duration,
}

fn ring_words(r: &Region) -> &[AtomicU64] {
    r.span(0, RING_BYTES as u64)
        .expect("rings are RING_BYTES long")
        .atomic_u64s()
}

fn ring_seq(r: &Region) -> &std::sync::atomic::AtomicU32 {
    r.span(128, 4)
        .expect("rings are RING_BYTES long")
        .atomic_u32()
}

fn ring_asleep(r: &Region) -> &std::sync::atomic::AtomicU32 {
    r.span(192, 4)
        .expect("rings are RING_BYTES long")
        .atomic_u32()
}

/// Longest a consumer spins for the next entry, and only when the previous two came closer
/// together than this: dense traffic (large writes back to back) spares the producer its
/// wakes, sparse traffic (a KV block every few hundred microseconds) costs no spinning.
const SPIN: Duration = Duration::from_micros(50);

impl ShmPath {
    /// Sets up both rings over the control stream (right after the handshake) and maps the
    /// peer's regions.
    pub(crate) fn setup(ctrl: &TcpStream, peer: &EndpointMeta, timeout: Duration) -> Result<Self> {
        let inbound = Arc::new(Region::new(
            RING_BYTES,
            RegionOptions {
                backing: Backing::Shared,
                ..RegionOptions::default()
            },
        )?);
        let handle = {
            use std::os::fd::AsRawFd;
            let f = inbound.file().expect("shared region has a file");
            format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())
        };
        (&*ctrl)
            .write_all(&frame(FrameKind::Msg, 0, handle.as_bytes()))
            .map_err(|e| TransportError::io("sending the ring handle", e))?;
        let mut hb = [0u8; HEADER_LEN];
        (&*ctrl)
            .read_exact(&mut hb)
            .map_err(|e| TransportError::io("reading the peer's ring handle", e))?;
        let h = FrameHeader::parse(&hb)?;
        if h.kind != FrameKind::Msg || h.len > 4096 {
            return Err(TransportError::Protocol(format!(
                "expected the peer's ring handle, got a {:?} frame of {} bytes",
                h.kind, h.len
            )));
        }
        let mut p = vec![0u8; h.len as usize];
        (&*ctrl)
            .read_exact(&mut p)
            .map_err(|e| TransportError::io("reading the peer's ring handle", e))?;
        let path = String::from_utf8(p)
            .map_err(|_| TransportError::Protocol("ring handle is not UTF-8".into()))?;
        let outbound = Region::open_peer(&path, RING_BYTES)?;
        let mut peer_regions = HashMap::new();
        for r in &peer.regions {
            let len = usize::try_from(r.len)
                .map_err(|_| TransportError::Protocol(format!("region {} is too long", r.id.0)))?;
            peer_regions.insert(r.id, Region::open_peer(&r.handle, len)?);
        }
        Ok(Self {
            inbound,
            outbound,
            peer_regions,
            produce: Mutex::new(()),
            timeout,
        })
    }

    /// Starts the thread that turns ring entries into notifications.
    pub(crate) fn start_consumer(&self, sh: Arc<Shared>, local: RegionTable) -> Result<()> {
        let ring = self.inbound.clone();
        thread::Builder::new()
            .name("kvwire-shm-rx".into())
            .spawn(move || consume(&sh, &ring, &local))
            .map_err(|e| TransportError::io("spawning the ring consumer", e))?;
        Ok(())
    }

    fn peer_span_check(
        &self,
        sh: &Shared,
        dst: RegionId,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<&Region> {
        sh.core().check_peer(dst, offset, len, write)?;
        self.peer_regions.get(&dst).ok_or_else(|| {
            TransportError::OutOfBounds(format!("peer region {} is not mapped", dst.0))
        })
    }

    /// One-sided write: copy into the peer's region, then ring its doorbell.
    pub(crate) fn write(
        &self,
        sh: &Shared,
        buf: &SendBuf,
        dst: RegionId,
        offset: u64,
        imm: Option<u32>,
    ) -> Result<()> {
        let region = self.peer_span_check(sh, dst, offset, buf.len(), true)?;
        let span = region.span(offset, buf.len())?;
        match buf {
            SendBuf::Bytes(v) => span.copy_from(v),
            SendBuf::Region(s) => span.copy_from_span(s.span()),
        }
        let _g = self.produce.lock().unwrap_or_else(|p| p.into_inner());
        let w = ring_words(&self.outbound);
        let head = w[0].load(Ordering::Relaxed);
        let deadline = Instant::now() + self.timeout;
        while head - w[1].load(Ordering::Acquire) >= RING_ENTRIES as u64 {
            if sh.is_closed() {
                return Err(TransportError::PeerClosed(
                    "the connection is closed".into(),
                ));
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout(
                    self.timeout,
                    "room in the peer's notification ring",
                ));
            }
            thread::sleep(Duration::from_micros(50));
        }
        let e = RING_HEAD / 8 + (head as usize % RING_ENTRIES) * 4;
        w[e].store(
            u64::from(dst.0) | (u64::from(imm.is_some()) << 32),
            Ordering::Relaxed,
        );
        w[e + 1].store(offset, Ordering::Relaxed);
        w[e + 2].store(buf.len(), Ordering::Relaxed);
        w[e + 3].store(u64::from(imm.unwrap_or(0)), Ordering::Relaxed);
        w[0].store(head + 1, Ordering::Release);
        let seq = ring_seq(&self.outbound);
        seq.fetch_add(1, Ordering::Release);
        // Pairs with the consumer's fence between announcing sleep and re-reading the head:
        // either it sees this entry, or this sees it asleep and wakes it.
        std::sync::atomic::fence(Ordering::SeqCst);
        if ring_asleep(&self.outbound).load(Ordering::Relaxed) != 0 {
            let _ = futex::wake(seq, futex::Flags::empty(), 1);
        }
        Ok(())
    }

    /// One-sided read: copy out of the peer's region.
    pub(crate) fn read(
        &self,
        sh: &Shared,
        src: RegionId,
        offset: u64,
        dst: &RegionSlice,
    ) -> Result<()> {
        let region = self.peer_span_check(sh, src, offset, dst.len, false)?;
        dst.span().copy_from_span(region.span(offset, dst.len)?);
        Ok(())
    }
}

fn consume(sh: &Shared, ring: &Region, local: &RegionTable) {
    let w = ring_words(ring);
    let seq = ring_seq(ring);
    let asleep = ring_asleep(ring);
    let wait = futex::Timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    // When the last entry came, and how long after the one before.
    let mut last_entry = Instant::now();
    let mut gap = Duration::MAX;
    loop {
        if sh.is_closed() {
            return;
        }
        if sh.inbound_full() {
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        let s = seq.load(Ordering::Acquire);
        let tail = w[1].load(Ordering::Relaxed);
        let head = w[0].load(Ordering::Acquire);
        if tail == head {
            if gap < SPIN && spin_for_entry(&w[0], tail, last_entry + SPIN) {
                continue;
            }
            asleep.store(1, Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::SeqCst);
            if w[0].load(Ordering::Acquire) == tail {
                // Sleeps until the producer bumps the sequence (or 50 ms, to notice a close).
                let _ = futex::wait(seq, futex::Flags::empty(), s, Some(&wait));
            }
            asleep.store(0, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        gap = now - last_entry;
        last_entry = now;
        if head.wrapping_sub(tail) > RING_ENTRIES as u64 {
            sh.fail(
                TransportError::Protocol("the peer corrupted the notification ring".into()),
                true,
            );
            return;
        }
        let e = RING_HEAD / 8 + (tail as usize % RING_ENTRIES) * 4;
        let a = w[e].load(Ordering::Relaxed);
        let offset = w[e + 1].load(Ordering::Relaxed);
        let len = w[e + 2].load(Ordering::Relaxed);
        let imm = w[e + 3].load(Ordering::Relaxed);
        w[1].store(tail + 1, Ordering::Release);
        let region = RegionId(a as u32);
        if let Err(err) = local.check_remote(region, offset, len, true) {
            sh.fail(err, true);
            return;
        }
        sh.push_inbound(Event::Notify(Notification {
            region,
            offset,
            len,
            imm: (a >> 32 != 0).then_some(imm as u32),
        }));
    }
}

/// Spins until the ring's head moves past `tail` (true) or `until` passes (false).
fn spin_for_entry(head: &AtomicU64, tail: u64, until: Instant) -> bool {
    loop {
        for _ in 0..64 {
            if head.load(Ordering::Acquire) != tail {
                return true;
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= until {
            return false;
        }
    }
}
