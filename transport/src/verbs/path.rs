//! The verbs data path of one connection (the RDMA tier): payloads move by RDMA WRITE and
//! READ on an RC queue pair; the TCP control connection carries the handshake, messages and
//! the close, as for shared memory, and its end is how a dead peer is noticed (a verbs QP
//! may never complete a write to a peer that vanished; see the transport README).
//!
//! A write is two work requests on the same QP: the RDMA WRITE of the payload into the peer's
//! region (unsignaled), then a SEND of a 32-byte descriptor (region, offset, length,
//! immediate), inline and signaled. RC delivers the SEND after the WRITE's data, so the peer's
//! receive completion is its notification, and our SEND's completion says both landed. (Not
//! RDMA WRITE WITH IMMEDIATE: its 32 bits cannot name the region and offset a `Link`
//! notification carries; the descriptor SEND costs the same one receive at the peer.) A receiver that stops reposting receives (its
//! caller is not taking notifications) makes the sender's SEND wait (receiver-not-ready
//! retries): back-pressure without extra messages.
//!
//! Setup, right after the handshake: each side creates its QP, registers every region of its
//! endpoint, and sends one message with its [`QpInfo`] and, per region, (id, address, length,
//! rkey); each checks the peer's list against the handshake's metadata, then connects.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::{CompletionKind, QpInfo, RcQueuePair, RemoteRegion, VerbsDevice, VerbsRegion};
use crate::error::{Result, TransportError};
use crate::link::{Event, Notification, SendBuf};
use crate::meta::{EndpointMeta, MAX_REGIONS};
use crate::proto::frame::{FrameHeader, FrameKind, HEADER_LEN};
use crate::proto::handshake::frame;
use crate::region::{Access, Region, RegionId, RegionOptions, RegionSlice, RegionTable};
use crate::tcp::link::Shared;

/// Bytes of a write descriptor.
const DESC_LEN: usize = 32;
/// Receives kept posted for descriptors.
const RECV_DEPTH: usize = 256;
/// Staging slots for writes from unregistered buffers (`SendBuf::Bytes`), and their size.
const STAGE_SLOTS: usize = 8;
const STAGE_SLOT: usize = 4 << 20;
/// Work-request ids with this bit are receives (the rest is the ring slot).
const RECV_TAG: u64 = 1 << 63;
/// Bytes of one region entry in the setup message.
const REGION_ENTRY: usize = 4 + 8 + 8 + 4;

enum Pending {
    /// The descriptor SEND: the write is done when it completes.
    Write {
        wr_id: u64,
        buf: SendBuf,
        stage: Option<usize>,
    },
    /// An RDMA READ.
    Read { wr_id: u64, dst: RegionSlice },
}

/// The verbs data path of one connection.
pub(crate) struct VerbsPath {
    qp: Arc<RcQueuePair>,
    local: Vec<VerbsRegion>,
    peer: HashMap<RegionId, RemoteRegion>,
    staging: VerbsRegion,
    free_stage: Mutex<Vec<usize>>,
    stage_freed: Condvar,
    recv_ring: VerbsRegion,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn proto(what: String) -> TransportError {
    TransportError::Protocol(format!("verbs setup: {what}"))
}

fn scratch_region(dev: &Arc<VerbsDevice>, len: usize) -> Result<VerbsRegion> {
    let r = Arc::new(Region::new(len, RegionOptions::default())?);
    dev.register(
        r,
        Access {
            remote_write: false,
            remote_read: false,
        },
    )
}

impl VerbsPath {
    /// Creates the QP, registers the endpoint's regions, trades QP and region keys with the
    /// peer over the control stream, and connects.
    pub(crate) fn setup(
        ctrl: &TcpStream,
        dev: &Arc<VerbsDevice>,
        regions: &RegionTable,
        peer_meta: &EndpointMeta,
        max_in_flight: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let depth = (2 * max_in_flight + RECV_DEPTH).clamp(64, 4096) as u32;
        let qp = Arc::new(RcQueuePair::new(dev, depth)?);
        let entries = regions.entries();
        let mut local = Vec::with_capacity(entries.len());
        let mut msg = qp.info().to_bytes().to_vec();
        msg.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (id, region, access) in entries {
            let vr = dev.register(region, access)?;
            msg.extend_from_slice(&id.0.to_le_bytes());
            msg.extend_from_slice(&vr.addr().to_le_bytes());
            msg.extend_from_slice(&(vr.len() as u64).to_le_bytes());
            msg.extend_from_slice(&vr.rkey().to_le_bytes());
            local.push(vr);
        }
        (&*ctrl)
            .write_all(&frame(FrameKind::Msg, 0, &msg))
            .map_err(|e| TransportError::io("sending the verbs setup", e))?;
        let (peer_info, peer) = read_setup(ctrl, peer_meta)?;
        let staging = scratch_region(dev, STAGE_SLOTS * STAGE_SLOT)?;
        let recv_ring = scratch_region(dev, RECV_DEPTH * DESC_LEN)?;
        for slot in 0..RECV_DEPTH {
            qp.post_recv_into(
                RECV_TAG | slot as u64,
                (&recv_ring, (slot * DESC_LEN) as u64),
                DESC_LEN as u32,
            )?;
        }
        qp.connect(&peer_info)?;
        Ok(Self {
            qp,
            local,
            peer,
            staging,
            free_stage: Mutex::new((0..STAGE_SLOTS).rev().collect()),
            stage_freed: Condvar::new(),
            recv_ring,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            timeout,
        })
    }

    /// Starts the thread that turns completions into events.
    pub(crate) fn start_poller(
        self: &Arc<Self>,
        sh: Arc<Shared>,
        local: RegionTable,
    ) -> Result<()> {
        let me = Arc::clone(self);
        thread::Builder::new()
            .name("kvwire-verbs-cq".into())
            .spawn(move || me.poll_loop(&sh, &local))
            .map_err(|e| TransportError::io("spawning the completion thread", e))?;
        Ok(())
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) & !RECV_TAG
    }

    /// The peer's region `id` with its key, once the range passed the connection's checks
    /// against the peer's metadata.
    fn peer_region(
        &self,
        sh: &Shared,
        id: RegionId,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<RemoteRegion> {
        sh.core().check_peer(id, offset, len, write)?;
        self.peer
            .get(&id)
            .copied()
            .ok_or_else(|| TransportError::OutOfBounds(format!("peer region {} has no key", id.0)))
    }

    /// The registration of the region `s` points into, if the endpoint registered it.
    fn registered(&self, region: &Arc<Region>) -> Option<&VerbsRegion> {
        self.local.iter().find(|v| Arc::ptr_eq(v.region(), region))
    }

    fn take_stage(&self, sh: &Shared) -> Result<usize> {
        let deadline = Instant::now() + self.timeout;
        let mut free = lock(&self.free_stage);
        loop {
            if let Some(s) = free.pop() {
                return Ok(s);
            }
            if sh.is_closed() {
                return Err(TransportError::PeerClosed(
                    "the connection is closed".into(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout(
                    self.timeout,
                    "a free staging buffer",
                ));
            }
            free = self
                .stage_freed
                .wait_timeout(free, left.min(Duration::from_millis(50)))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn free_stage(&self, slot: usize) {
        lock(&self.free_stage).push(slot);
        self.stage_freed.notify_one();
    }

    /// One-sided write: RDMA WRITE of the payload, then the descriptor SEND.
    pub(crate) fn write(
        &self,
        sh: &Shared,
        buf: SendBuf,
        dst: RegionId,
        offset: u64,
        imm: Option<u32>,
        wr_id: u64,
    ) -> Result<()> {
        let len = buf.len();
        let remote = self.peer_region(sh, dst, offset, len, true)?;
        let (src, src_off, stage) = match &buf {
            SendBuf::Region(s) => {
                let vr = self.registered(&s.region).ok_or_else(|| {
                    TransportError::Invalid(
                        "a verbs write from a region this endpoint did not register before connecting"
                            .into(),
                    )
                })?;
                (vr, s.offset, None)
            }
            SendBuf::Bytes(v) => {
                if v.len() > STAGE_SLOT {
                    return Err(TransportError::Invalid(format!(
                        "a verbs write of {} bytes from an unregistered buffer (staging holds {STAGE_SLOT}; write from a registered region)",
                        v.len()
                    )));
                }
                let slot = self.take_stage(sh)?;
                self.staging
                    .region()
                    .write_at((slot * STAGE_SLOT) as u64, v)?;
                (&self.staging, (slot * STAGE_SLOT) as u64, Some(slot))
            }
        };
        let mut d = [0u8; DESC_LEN];
        d[0..4].copy_from_slice(&dst.0.to_le_bytes());
        d[4..8].copy_from_slice(&u32::from(imm.is_some()).to_le_bytes());
        d[8..16].copy_from_slice(&offset.to_le_bytes());
        d[16..24].copy_from_slice(&len.to_le_bytes());
        d[24..28].copy_from_slice(&imm.unwrap_or(0).to_le_bytes());
        // Selective signaling: the payload WRITE completes silently; the SEND after it (in
        // order on the QP) reports both. `buf` (held in `pending`) keeps the source alive.
        let desc = self.id();
        lock(&self.pending).insert(desc, Pending::Write { wr_id, buf, stage });
        let posted = self
            .qp
            .post_write_unsignaled((src, src_off), (&remote, offset), len)
            .and_then(|()| self.qp.post_send_inline(desc, &d));
        if let Err(e) = posted {
            let mut p = lock(&self.pending);
            if let Some(Pending::Write { stage: Some(s), .. }) = p.remove(&desc) {
                drop(p);
                self.free_stage(s);
            }
            return Err(e);
        }
        Ok(())
    }

    /// One-sided read straight into `dst`, which must be a registered region.
    pub(crate) fn read(
        &self,
        sh: &Shared,
        src: RegionId,
        offset: u64,
        dst: RegionSlice,
        wr_id: u64,
    ) -> Result<()> {
        let remote = self.peer_region(sh, src, offset, dst.len, false)?;
        let vr = self.registered(&dst.region).ok_or_else(|| {
            TransportError::Invalid(
                "a verbs read into a region this endpoint did not register before connecting"
                    .into(),
            )
        })?;
        let id = self.id();
        let (off, len) = (dst.offset, dst.len);
        lock(&self.pending).insert(id, Pending::Read { wr_id, dst });
        self.qp
            .post_read(id, (vr, off), (&remote, offset), len)
            .inspect_err(|_| {
                lock(&self.pending).remove(&id);
            })
    }

    fn poll_loop(&self, sh: &Shared, local: &RegionTable) {
        while !sh.is_closed() {
            let done = match self.qp.poll(Duration::from_millis(50)) {
                Ok(d) => d,
                Err(e) => return sh.fail(e, true),
            };
            for c in done {
                if let Err(e) = c.status {
                    if !sh.is_closed() {
                        sh.fail(
                            TransportError::Verbs(format!("a work request failed: {e}")),
                            true,
                        );
                    }
                    return;
                }
                if c.wr_id & RECV_TAG != 0 {
                    if let Err(e) = self.on_descriptor(sh, local, c.wr_id & !RECV_TAG, c.kind) {
                        return sh.fail(e, true);
                    }
                    continue;
                }
                let p = lock(&self.pending).remove(&c.wr_id);
                match (p, c.kind) {
                    (Some(Pending::Write { wr_id, buf, stage }), CompletionKind::Send) => {
                        if let Some(s) = stage {
                            self.free_stage(s);
                        }
                        sh.push_inbound(Event::WriteDone { wr_id, buf });
                    }
                    (Some(Pending::Read { wr_id, dst }), CompletionKind::Read) => {
                        sh.push_inbound(Event::ReadDone { wr_id, dst });
                    }
                    (_, kind) => {
                        return sh.fail(
                            TransportError::Verbs(format!(
                                "unexpected completion {kind:?} for request {}",
                                c.wr_id
                            )),
                            true,
                        );
                    }
                }
            }
        }
    }

    /// A descriptor landed in receive slot `slot`: check it, notify, repost the receive.
    fn on_descriptor(
        &self,
        sh: &Shared,
        local: &RegionTable,
        slot: u64,
        kind: CompletionKind,
    ) -> Result<()> {
        if kind != CompletionKind::Recv || slot >= RECV_DEPTH as u64 {
            return Err(TransportError::Protocol(format!(
                "unexpected receive completion {kind:?} in slot {slot}"
            )));
        }
        let mut d = [0u8; DESC_LEN];
        self.recv_ring
            .region()
            .read_at(slot * DESC_LEN as u64, &mut d)?;
        let u32_at = |i: usize| u32::from_le_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
        let (region, flags, offset, len, imm) = (
            RegionId(u32_at(0)),
            u32_at(4),
            u64_at(8),
            u64_at(16),
            u32_at(24),
        );
        if flags > 1 {
            return Err(TransportError::Protocol(format!(
                "write descriptor with flags {flags:#x}"
            )));
        }
        // The data is already here (the NIC checked the rkey); this check keeps a peer from
        // notifying about ranges it may not write, exactly as the TCP and shm paths do.
        local.check_remote(region, offset, len, true)?;
        // Back-pressure: hold the receive (the peer's next SEND waits) while the caller is
        // behind on notifications.
        while sh.inbound_full() && !sh.is_closed() {
            thread::sleep(Duration::from_millis(1));
        }
        sh.push_inbound(Event::Notify(Notification {
            region,
            offset,
            len,
            imm: (flags == 1).then_some(imm),
        }));
        self.qp.post_recv_into(
            RECV_TAG | slot,
            (&self.recv_ring, slot * DESC_LEN as u64),
            DESC_LEN as u32,
        )
    }
}

/// Reads the peer's setup message and matches its regions with the handshake's metadata.
fn read_setup(
    ctrl: &TcpStream,
    meta: &EndpointMeta,
) -> Result<(QpInfo, HashMap<RegionId, RemoteRegion>)> {
    let mut hb = [0u8; HEADER_LEN];
    (&*ctrl)
        .read_exact(&mut hb)
        .map_err(|e| TransportError::io("reading the peer's verbs setup", e))?;
    let h = FrameHeader::parse(&hb)?;
    let most = QpInfo::LEN + 4 + MAX_REGIONS * REGION_ENTRY;
    if h.kind != FrameKind::Msg || h.len as usize > most {
        return Err(proto(format!(
            "expected the peer's QP and keys, got a {:?} frame of {} bytes",
            h.kind, h.len
        )));
    }
    let mut p = vec![0u8; h.len as usize];
    (&*ctrl)
        .read_exact(&mut p)
        .map_err(|e| TransportError::io("reading the peer's verbs setup", e))?;
    if p.len() < QpInfo::LEN + 4 {
        return Err(proto(format!("{} bytes", p.len())));
    }
    let info = QpInfo::from_bytes(&p[..QpInfo::LEN])?;
    let n = u32::from_le_bytes(p[QpInfo::LEN..QpInfo::LEN + 4].try_into().expect("4")) as usize;
    let body = &p[QpInfo::LEN + 4..];
    if n > MAX_REGIONS || body.len() != n * REGION_ENTRY {
        return Err(proto(format!("{n} regions in {} bytes", body.len())));
    }
    let mut keys = HashMap::with_capacity(n);
    for e in body.chunks_exact(REGION_ENTRY) {
        let id = RegionId(u32::from_le_bytes(e[0..4].try_into().expect("4")));
        let r = RemoteRegion {
            addr: u64::from_le_bytes(e[4..12].try_into().expect("8")),
            len: u64::from_le_bytes(e[12..20].try_into().expect("8")),
            rkey: u32::from_le_bytes(e[20..24].try_into().expect("4")),
        };
        if keys.insert(id, r).is_some() {
            return Err(proto(format!("region {} listed twice", id.0)));
        }
    }
    for d in &meta.regions {
        match keys.get(&d.id) {
            Some(r) if r.len == d.len => {}
            Some(r) => {
                return Err(proto(format!(
                    "region {} is {} bytes in the metadata, {} in the keys",
                    d.id.0, d.len, r.len
                )))
            }
            None => return Err(proto(format!("no key for region {}", d.id.0))),
        }
    }
    Ok((info, keys))
}
