//! Reliable-connected queue pairs: connection by exchanged [`QpInfo`], one-sided WRITE (with
//! an immediate), READ, and completion polling with a deadline.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, GenericCompletionQueue, PollCompletionQueueError,
    WorkCompletionOperationType, WorkCompletionStatus,
};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState, SetInlineData,
    WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use super::device::{mtu_bytes, VerbsDevice, VerbsRegion};
use super::sys::{self, RemoteOp};
use crate::error::{Result, TransportError};

/// What the peer needs to connect its QP to ours (exchanged out of band).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// QP number.
    pub qpn: u32,
    /// First packet sequence number of our send queue.
    pub psn: u32,
    /// Our GID (16 bytes).
    pub gid: [u8; 16],
    /// Our port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Our port's active MTU, bytes.
    pub mtu: u32,
}

impl QpInfo {
    /// Serialized length.
    pub const LEN: usize = 4 + 4 + 16 + 2 + 4;

    /// Little-endian bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..24].copy_from_slice(&self.gid);
        b[24..26].copy_from_slice(&self.lid.to_le_bytes());
        b[26..30].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// Parses [`Self::to_bytes`]'s output, checking every field.
    ///
    /// # Errors
    /// [`TransportError::Protocol`] for a wrong length, a QP number or PSN beyond 24 bits, or
    /// an MTU that is not 256..=4096 and a power of two.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |what: String| TransportError::Protocol(format!("QP info: {what}"));
        if b.len() != Self::LEN {
            return Err(bad(format!("{} bytes, expected {}", b.len(), Self::LEN)));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let info = Self {
            qpn: u32_at(0),
            psn: u32_at(4),
            gid: b[8..24].try_into().expect("16 bytes"),
            lid: u16::from_le_bytes([b[24], b[25]]),
            mtu: u32_at(26),
        };
        if info.qpn >= 1 << 24 || info.psn >= 1 << 24 {
            return Err(bad(format!(
                "QPN {} / PSN {} beyond 24 bits",
                info.qpn, info.psn
            )));
        }
        if !(256..=4096).contains(&info.mtu) || !info.mtu.is_power_of_two() {
            return Err(bad(format!("MTU {}", info.mtu)));
        }
        Ok(info)
    }
}

/// A peer's registered region as it advertised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Address of its first byte, in the peer's terms.
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// Its remote key.
    pub rkey: u32,
}

/// What completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    /// Our RDMA WRITE finished (the data is at the peer).
    Write,
    /// Our RDMA READ finished (the data is here).
    Read,
    /// A peer's RDMA WRITE WITH IMMEDIATE landed here (consumed one posted receive).
    RecvImm,
    /// Our SEND finished.
    Send,
    /// A peer's SEND landed in one of our posted receives.
    Recv,
    /// Anything else the device reported.
    Other(u32),
}

/// One work completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The work request id given when posting (or to [`RcQueuePair::post_recv`]).
    pub wr_id: u64,
    /// What completed.
    pub kind: CompletionKind,
    /// `Err` with the status name when the request failed.
    pub status: std::result::Result<(), String>,
    /// The immediate of a [`CompletionKind::RecvImm`].
    pub imm: Option<u32>,
    /// Bytes moved (for received writes: the write's length).
    pub byte_len: u32,
}

/// An RC queue pair with its own completion queue.
pub struct RcQueuePair {
    qp: Mutex<ExtendedQueuePair>,
    // The basic CQ (ibv_poll_cq copies whole entries out): the extended poller returned
    // bogus repeated entries on rxe.
    cq: Arc<BasicCompletionQueue>,
    dev: Arc<VerbsDevice>,
    psn: u32,
    depth: u32,
    // Regions named by send requests not completed yet: the hardware may still DMA into
    // them, so they must not be deregistered or unmapped before their completion.
    in_flight: Mutex<HashMap<u64, VerbsRegion>>,
}

impl std::fmt::Debug for RcQueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcQueuePair")
            .field("info", &self.info())
            .finish()
    }
}

fn verr(what: impl std::fmt::Display) -> TransportError {
    TransportError::Verbs(what.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn mtu_of(bytes: u32) -> Mtu {
    match bytes {
        0..=256 => Mtu::Mtu256,
        257..=512 => Mtu::Mtu512,
        513..=1024 => Mtu::Mtu1024,
        1025..=2048 => Mtu::Mtu2048,
        _ => Mtu::Mtu4096,
    }
}

/// Bytes a SEND may carry inline (copied into the work request: no registered buffer).
pub const MAX_INLINE: u32 = 64;

/// RDMA READs (and atomics) one QP keeps outstanding towards its peer.
const READ_DEPTH: u8 = 16;

impl RcQueuePair {
    /// Creates a QP (and its CQ) on `dev` with room for `depth` outstanding requests each way,
    /// and moves it to INIT.
    ///
    /// # Errors
    /// [`TransportError::Verbs`] if the device refuses.
    pub fn new(dev: &Arc<VerbsDevice>, depth: u32) -> Result<Self> {
        let depth = depth.clamp(1, 4096);
        let cq = dev
            .ctx
            .create_cq_builder()
            .setup_cqe(2 * depth + 1)
            .build()
            .map_err(|e| verr(format!("completion queue: {e}")))?;
        let handle = GenericCompletionQueue::from(Arc::clone(&cq));
        let mut qp = dev
            .pd
            .create_qp_builder()
            .setup_send_cq(handle.clone())
            .setup_recv_cq(handle)
            // Twice the signaled requests: each may follow an unsignaled one (selective
            // signaling), which holds its send-queue slot until the signaled one completes.
            .setup_max_send_wr(2 * depth)
            .setup_max_recv_wr(depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(MAX_INLINE)
            .build_ex()
            .map_err(|e| verr(format!("queue pair: {e}")))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(dev.port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&attr)
            .map_err(|e| verr(format!("queue pair to INIT: {e}")))?;
        // A PSN from the clock: distinct per QP, only 24 bits matter.
        let psn = (Instant::now().elapsed().as_nanos() as u32
            ^ std::process::id().rotate_left(8)
            ^ qp.qp_number().rotate_left(16))
            & 0xff_ffff;
        Ok(Self {
            qp: Mutex::new(qp),
            cq,
            dev: Arc::clone(dev),
            psn,
            depth,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// What the peer needs to connect to this QP.
    pub fn info(&self) -> QpInfo {
        QpInfo {
            qpn: lock(&self.qp).qp_number(),
            psn: self.psn,
            gid: Ipv6Addr::from(self.dev.gid).octets(),
            lid: self.dev.lid,
            mtu: mtu_bytes(self.dev.mtu),
        }
    }

    /// Connects to the peer's QP: INIT -> ready to receive -> ready to send, at the smaller
    /// of the two MTUs.
    ///
    /// # Errors
    /// [`TransportError::Verbs`] if a transition fails (wrong GID index, unreachable peer).
    pub fn connect(&self, peer: &QpInfo) -> Result<()> {
        let mut qp = lock(&self.qp);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(peer.lid)
            .setup_port(self.dev.port)
            .setup_service_level(0)
            .setup_grh(
                &Gid::from(Ipv6Addr::from(peer.gid)),
                0,
                self.dev.gid_index as u8,
                64,
                0,
            );
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu_of(peer.mtu.min(mtu_bytes(self.dev.mtu))))
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(peer.psn)
            .setup_max_dest_read_atomic(READ_DEPTH)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        qp.modify(&attr)
            .map_err(|e| verr(format!("queue pair to RTR (peer QPN {}): {e}", peer.qpn)))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            // 4.096 us x 2^18 = 1.07 s before a missing ACK counts as lost (NCCL's default):
            // with 14 (67 ms, perftest's) soft-RoCE under emulation retransmitted spuriously.
            .setup_timeout(18)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(READ_DEPTH);
        qp.modify(&attr)
            .map_err(|e| verr(format!("queue pair to RTS: {e}")))
    }

    /// Posts one receive, consumed by a peer's WRITE WITH IMMEDIATE (no data lands in it).
    ///
    /// # Errors
    /// [`TransportError::Verbs`] if the receive queue is full or the QP failed.
    pub fn post_recv(&self, wr_id: u64) -> Result<()> {
        let mut qp = lock(&self.qp);
        let mut g = qp.start_post_recv();
        let _ = g.construct_wr(wr_id);
        g.post()
            .map_err(|e| verr(format!("posting a receive: {e}")))
    }

    /// Posts a receive into `local` (region, offset) of at most `len` bytes, for a peer's SEND.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] for a range outside the region;
    /// [`TransportError::Verbs`] if the receive queue is full or the QP failed.
    pub fn post_recv_into(&self, wr_id: u64, local: (&VerbsRegion, u64), len: u32) -> Result<()> {
        let (r, off) = local;
        if off
            .checked_add(u64::from(len))
            .is_none_or(|e| e > r.len() as u64)
        {
            return Err(TransportError::OutOfBounds(format!(
                "receive range {off}+{len} outside its {}-byte region",
                r.len()
            )));
        }
        let mut qp = lock(&self.qp);
        let mut g = qp.start_post_recv();
        sys::add_recv(&mut g, wr_id, r.lkey(), r.addr() + off, len);
        g.post()
            .map_err(|e| verr(format!("posting a receive: {e}")))
    }

    /// Posts a SEND of `data` (at most [`MAX_INLINE`] bytes, copied into the request). On an
    /// RC queue pair it lands after every WRITE posted before it.
    ///
    /// # Errors
    /// [`TransportError::Invalid`] for more than [`MAX_INLINE`] bytes; [`TransportError::Verbs`]
    /// if the send queue is full or the QP failed.
    pub fn post_send_inline(&self, wr_id: u64, data: &[u8]) -> Result<()> {
        if data.len() > MAX_INLINE as usize {
            return Err(TransportError::Invalid(format!(
                "{} bytes inline (at most {MAX_INLINE})",
                data.len()
            )));
        }
        let mut qp = lock(&self.qp);
        let mut g = qp.start_post_send();
        // The Inline flag as well: rxe's provider copies the data either way, but its kernel
        // side reads the flag (without it the SEND fails with a local QP operation error).
        g.construct_wr(wr_id, WorkRequestFlags::Signaled | WorkRequestFlags::Inline)
            .setup_send()
            .setup_inline_data(data);
        g.post().map_err(|e| verr(format!("posting a send: {e}")))
    }

    /// Posts an RDMA WRITE of `len` bytes from `local` (region, offset) to `remote` (region,
    /// offset), with an immediate when given (the peer then sees a
    /// [`CompletionKind::RecvImm`]).
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] when either range leaves its region (checked before
    /// anything is posted); [`TransportError::Invalid`] for a request over 2 GiB, a `wr_id`
    /// already in flight or a full queue; [`TransportError::Verbs`] if the QP failed.
    pub fn post_write(
        &self,
        wr_id: u64,
        local: (&VerbsRegion, u64),
        remote: (&RemoteRegion, u64),
        len: u64,
        imm: Option<u32>,
    ) -> Result<()> {
        self.post(Some(wr_id), RemoteOp::Write(imm), local, remote, len)
    }

    /// Posts an RDMA WRITE that produces no completion of its own (selective signaling): it
    /// retires when a signaled request posted after it completes, and so does its failure.
    /// The caller posts such a request next and keeps `local`'s region alive until then.
    ///
    /// # Errors
    /// As [`Self::post_write`].
    pub fn post_write_unsignaled(
        &self,
        local: (&VerbsRegion, u64),
        remote: (&RemoteRegion, u64),
        len: u64,
    ) -> Result<()> {
        self.post(None, RemoteOp::Write(None), local, remote, len)
    }

    /// Posts an RDMA READ of `len` bytes from `remote` (region, offset) into `local`.
    ///
    /// # Errors
    /// As [`Self::post_write`].
    pub fn post_read(
        &self,
        wr_id: u64,
        local: (&VerbsRegion, u64),
        remote: (&RemoteRegion, u64),
        len: u64,
    ) -> Result<()> {
        self.post(Some(wr_id), RemoteOp::Read, local, remote, len)
    }

    fn post(
        &self,
        wr_id: Option<u64>,
        op: RemoteOp,
        (local, offset): (&VerbsRegion, u64),
        (remote, remote_offset): (&RemoteRegion, u64),
        len: u64,
    ) -> Result<()> {
        let oob = |side: &str, off: u64, have: u64| {
            TransportError::OutOfBounds(format!(
                "{side} range {off}+{len} outside its {have}-byte region"
            ))
        };
        let fits = |off: u64, have: u64| off.checked_add(len).is_some_and(|e| e <= have);
        if !fits(offset, local.len() as u64) {
            return Err(oob("local", offset, local.len() as u64));
        }
        if !fits(remote_offset, remote.len) {
            return Err(oob("remote", remote_offset, remote.len));
        }
        let len32 = u32::try_from(len)
            .ok()
            .filter(|&l| l <= 1 << 31)
            .ok_or_else(|| TransportError::Invalid(format!("{len} bytes in one request")))?;
        let remote_addr = remote
            .addr
            .checked_add(remote_offset)
            .ok_or_else(|| oob("remote", remote_offset, remote.len))?;
        if let Some(wr_id) = wr_id {
            let mut fl = lock(&self.in_flight);
            if fl.len() >= self.depth as usize {
                return Err(TransportError::Invalid(format!(
                    "{} requests already in flight (queue depth)",
                    self.depth
                )));
            }
            if fl.insert(wr_id, local.clone()).is_some() {
                return Err(TransportError::Invalid(format!(
                    "wr_id {wr_id} is in flight"
                )));
            }
        }
        let mut qp = lock(&self.qp);
        let mut g = qp.start_post_send();
        sys::add_send(
            &mut g,
            sys::SendWr {
                wr_id: wr_id.unwrap_or(0),
                signaled: wr_id.is_some(),
                op,
                rkey: remote.rkey,
                remote_addr,
                lkey: local.lkey(),
                addr: local.addr() + offset,
                len: len32,
            },
        );
        let r = g.post();
        drop(qp);
        r.map_err(|e| {
            if let Some(id) = wr_id {
                lock(&self.in_flight).remove(&id);
            }
            verr(format!("posting a request: {e}"))
        })
    }

    /// Waits up to `timeout` for completions; returns those that came (none on timeout).
    ///
    /// # Errors
    /// [`TransportError::Verbs`] if polling the CQ fails.
    pub fn poll(&self, timeout: Duration) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        let mut nap = Duration::from_micros(10);
        loop {
            let got = self.poll_once()?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(got);
            }
            // Busy-poll briefly (completions come within microseconds on hardware), then
            // sleep, longer and longer up to 1 ms, so that an idle QP leaves the cores to
            // the rest (with soft-RoCE, to the kernel doing the NIC's work).
            spins += 1;
            if spins > 64 {
                std::thread::sleep(nap.min(deadline - now));
                nap = (nap * 2).min(Duration::from_millis(1));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn poll_once(&self) -> Result<Vec<Completion>> {
        let mut out = Vec::new();
        match self.cq.start_poll() {
            Ok(poller) => {
                for wc in poller {
                    // Raw values, compared by hand: sideway's `From<u32>` panics on a value
                    // it does not know, and a device may report one.
                    let op = wc.opcode();
                    let kind = if op == WorkCompletionOperationType::Write as u32 {
                        CompletionKind::Write
                    } else if op == WorkCompletionOperationType::Read as u32 {
                        CompletionKind::Read
                    } else if op == WorkCompletionOperationType::ReceiveWithImmediate as u32 {
                        CompletionKind::RecvImm
                    } else if op == WorkCompletionOperationType::Send as u32 {
                        CompletionKind::Send
                    } else if op == WorkCompletionOperationType::Receive as u32 {
                        CompletionKind::Recv
                    } else {
                        CompletionKind::Other(op)
                    };
                    let ok = wc.status() == WorkCompletionStatus::Success as u32;
                    out.push(Completion {
                        wr_id: wc.wr_id(),
                        // The opcode of a failed completion is undefined: only the status
                        // and the id count then.
                        kind: if ok {
                            kind
                        } else {
                            CompletionKind::Other(wc.opcode())
                        },
                        status: if ok {
                            Ok(())
                        } else {
                            Err(status_name(wc.status()))
                        },
                        imm: (ok && kind == CompletionKind::RecvImm).then(|| wc.imm_data()),
                        byte_len: wc.byte_len(),
                    });
                }
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {}
            Err(e) => return Err(verr(format!("polling completions: {e}"))),
        }
        if !out.is_empty() {
            let mut fl = lock(&self.in_flight);
            for c in &out {
                if !matches!(c.kind, CompletionKind::RecvImm | CompletionKind::Recv) {
                    fl.remove(&c.wr_id);
                }
            }
        }
        Ok(out)
    }
}

/// A failed completion's status, named where known.
fn status_name(status: u32) -> String {
    use WorkCompletionStatus as S;
    let known = [
        (S::LocalLengthError, "local length error"),
        (S::LocalQueuePairOperationError, "local QP operation error"),
        (S::LocalProtectionError, "local protection error"),
        (S::WorkRequestFlushedError, "flushed (the QP is in error)"),
        (S::BadResponseError, "bad response"),
        (S::LocalAccessError, "local access error"),
        (S::RemoteInvalidRequestError, "remote invalid request"),
        (
            S::RemoteAccessError,
            "remote access error (bad rkey or range)",
        ),
        (S::RemoteOperationError, "remote operation error"),
        (
            S::RetryCounterExceededError,
            "retries exceeded (peer unreachable or gone)",
        ),
        (
            S::ResponderNotReadyRetryCounterExceededError,
            "receiver-not-ready retries exceeded",
        ),
        (S::RemoteAbortedError, "remote aborted"),
        (S::FatalError, "fatal error"),
        (S::ResponseTimeoutError, "response timeout"),
        (S::GeneralError, "general error"),
    ];
    match known.iter().find(|(s, _)| *s as u32 == status) {
        Some((_, name)) => format!("{name} (status {status})"),
        None => format!("status {status}"),
    }
}
