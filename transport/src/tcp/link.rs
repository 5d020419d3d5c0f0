//! An established connection over sockets: a reader and a writer thread per stream, the
//! protocol [`Core`] shared between them. With the shared-memory data path, writes and
//! reads bypass the sockets (see [`crate::shm`]) and the one stream carries only messages.

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Result, TransportError};
use crate::link::{Event, Link, Notification, SendBuf};
use crate::meta::{EndpointMeta, FabricKind};
use crate::policy::rate::LinkEstimate;
use crate::proto::frame::{FrameHeader, FrameKind, HEADER_LEN, MAX_MSG_LEN};
use crate::proto::handshake::close_frame;
use crate::proto::{close_code, CloseCode, Core, Inbound};
use crate::region::{Region, RegionId, RegionSlice, RegionTable};
use crate::shm::ShmPath;

/// Incoming events (notifications, messages) the application has not taken yet, at most;
/// past this the reader threads stop reading, which back-pressures the peer through TCP.
const INBOUND_CAP: usize = 4096;
/// Operations queued per stream writer.
const WRITER_QUEUE: usize = 1024;

/// What a request's buffer is, parked in the core until its answer.
#[derive(Debug)]
pub(crate) enum Pending {
    Write(u64, SendBuf),
    Read(u64, RegionSlice),
}

enum OutOp {
    Frame(Vec<u8>),
    Write {
        hdr: FrameHeader,
        wr_id: u64,
        buf: SendBuf,
    },
    ReadResp {
        hdr: FrameHeader,
        region: Arc<Region>,
        offset: u64,
    },
}

/// State every thread of a link shares.
pub(crate) struct Shared {
    core: Mutex<Core<Pending>>,
    failed: Mutex<Option<TransportError>>,
    closed: AtomicBool,
    inbound: AtomicUsize,
    sockets: Vec<TcpStream>,
    /// Held while a frame is written to stream 0, so a close frame sent from another thread
    /// never lands inside another frame.
    control_write: Mutex<()>,
    /// Operations queued to writer threads and not yet written; an orderly close waits for
    /// them (a confirmation queued just before the close must still reach the peer).
    queued: AtomicUsize,
    /// Payload bytes the writer threads have written, and the CPU time (ns) they spent on it.
    sent_bytes: AtomicU64,
    send_cpu_ns: AtomicU64,
    events: Mutex<Sender<Event>>,
    local_events: Mutex<VecDeque<Event>>,
    timeout: Duration,
}

impl Shared {
    fn emit(&self, ev: Event) {
        let inbound = matches!(ev, Event::Notify(_) | Event::Message(_));
        if inbound {
            self.inbound.fetch_add(1, Ordering::AcqRel);
        }
        let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(ev);
    }

    /// Records the connection's first failure, tells the peer (best effort) and stops
    /// every thread by shutting the sockets down.
    pub(crate) fn fail(&self, err: TransportError, tell_peer: bool) {
        let frame = tell_peer.then(|| close_frame(close_code(&err), &err.to_string()));
        self.end(err, frame.as_deref());
    }

    /// Ends the connection once: records `err` as what later calls report, sends `frame`
    /// (a close frame) if given, and shuts the sockets down, which stops every thread.
    fn end(&self, err: TransportError, frame: Option<&[u8]>) {
        {
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_some() {
                return;
            }
            if let Some(frame) = frame {
                self.send_close(frame);
            }
            tracing::debug!("connection ended: {err}");
            *f = Some(err);
        }
        self.closed.store(true, Ordering::Release);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Writes a close frame on stream 0 between two frames of the writer thread (waiting at
    /// most 200 ms for it to finish the current one; the peer then sees a bare end instead).
    fn send_close(&self, frame: &[u8]) {
        let Some(s) = self.sockets.first() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match self.control_write.try_lock() {
                Ok(_g) => {
                    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                    let _ = (&*s).write_all(frame);
                    return;
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                Err(_) => return,
            }
        }
    }

    fn failure(&self) -> Option<TransportError> {
        let f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.as_ref().map(clone_err)
    }

    pub(crate) fn core(&self) -> std::sync::MutexGuard<'_, Core<Pending>> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push_local(&self, ev: Event) {
        self.local_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(ev);
    }

    pub(crate) fn push_inbound(&self, ev: Event) {
        self.emit(ev);
    }

    pub(crate) fn inbound_full(&self) -> bool {
        self.inbound.load(Ordering::Acquire) >= INBOUND_CAP
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A copy of an error for a second reader of it (errors hold `io::Error`, which is not
/// `Clone`).
fn clone_err(e: &TransportError) -> TransportError {
    match e {
        TransportError::Timeout(d, w) => TransportError::Timeout(*d, w),
        TransportError::PeerClosed(m) => TransportError::PeerClosed(m.clone()),
        TransportError::VersionMismatch { ours, theirs } => TransportError::VersionMismatch {
            ours: *ours,
            theirs: *theirs,
        },
        TransportError::Auth(m) => TransportError::Auth(m.clone()),
        TransportError::Protocol(m) => TransportError::Protocol(m.clone()),
        TransportError::OutOfBounds(m) => TransportError::OutOfBounds(m.clone()),
        TransportError::FabricMismatch(m) => TransportError::FabricMismatch(m.clone()),
        TransportError::RemoteAbort(m) => TransportError::RemoteAbort(m.clone()),
        other => TransportError::PeerClosed(other.to_string()),
    }
}

/// A connection over one or more sockets (and, for shm, shared mappings).
pub(crate) struct SocketLink {
    fabric: FabricKind,
    peer: EndpointMeta,
    shared: Arc<Shared>,
    writers: Vec<SyncSender<OutOp>>,
    events: Mutex<Receiver<Event>>,
    next_stream: AtomicUsize,
    shm: Option<ShmPath>,
    #[cfg(feature = "verbs")]
    verbs: Option<Arc<crate::verbs::VerbsPath>>,
    /// What the last transfer on this connection measured of the link.
    estimate: Mutex<Option<LinkEstimate>>,
}

/// The data path of a connection whose payloads do not travel on its sockets.
pub(crate) enum DataPath {
    /// Payloads on the TCP data streams.
    Sockets,
    /// Shared mappings.
    Shm(ShmPath),
    /// RDMA.
    #[cfg(feature = "verbs")]
    Verbs(Arc<crate::verbs::VerbsPath>),
}

impl SocketLink {
    /// Starts the threads of a link over `streams` (stream 0 carries messages).
    pub(crate) fn start(
        fabric: FabricKind,
        peer: EndpointMeta,
        local: RegionTable,
        streams: Vec<TcpStream>,
        timeout: Duration,
        max_in_flight: usize,
        path: DataPath,
    ) -> Result<Arc<Self>> {
        let (ev_tx, ev_rx) = mpsc::channel();
        let mut sockets = Vec::with_capacity(streams.len());
        for s in &streams {
            s.set_nodelay(true)
                .map_err(|e| TransportError::io("TCP_NODELAY", e))?;
            // Reads wake at least this often to notice a close; a stall mid-frame for this
            // long is an error.
            s.set_read_timeout(Some(timeout))
                .map_err(|e| TransportError::io("SO_RCVTIMEO", e))?;
            s.set_write_timeout(Some(timeout))
                .map_err(|e| TransportError::io("SO_SNDTIMEO", e))?;
            sockets.push(
                s.try_clone()
                    .map_err(|e| TransportError::io("dup of a socket", e))?,
            );
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(local.clone(), peer.clone(), max_in_flight)),
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
            inbound: AtomicUsize::new(0),
            sockets,
            control_write: Mutex::new(()),
            queued: AtomicUsize::new(0),
            sent_bytes: AtomicU64::new(0),
            send_cpu_ns: AtomicU64::new(0),
            events: Mutex::new(ev_tx),
            local_events: Mutex::new(VecDeque::new()),
            timeout,
        });
        let mut writers = Vec::with_capacity(streams.len());
        for (i, s) in streams.into_iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel::<OutOp>(WRITER_QUEUE);
            let wsock = s
                .try_clone()
                .map_err(|e| TransportError::io("dup of a socket", e))?;
            let sh = shared.clone();
            thread::Builder::new()
                .name(format!("kvwire-tx{i}"))
                .spawn(move || writer_loop(&sh, i, &wsock, &rx))
                .map_err(|e| TransportError::io("spawning a writer thread", e))?;
            let sh = shared.clone();
            let my_tx = tx.clone();
            thread::Builder::new()
                .name(format!("kvwire-rx{i}"))
                .spawn(move || reader_loop(&sh, i, s, &my_tx))
                .map_err(|e| TransportError::io("spawning a reader thread", e))?;
            writers.push(tx);
        }
        let mut shm = None;
        #[cfg(feature = "verbs")]
        let mut verbs = None;
        match path {
            DataPath::Sockets => {}
            DataPath::Shm(p) => {
                p.start_consumer(shared.clone(), local)?;
                shm = Some(p);
            }
            #[cfg(feature = "verbs")]
            DataPath::Verbs(p) => {
                p.start_poller(shared.clone(), local)?;
                verbs = Some(p);
            }
        }
        Ok(Arc::new(Self {
            fabric,
            peer,
            shared,
            writers,
            events: Mutex::new(ev_rx),
            next_stream: AtomicUsize::new(0),
            shm,
            #[cfg(feature = "verbs")]
            verbs,
            estimate: Mutex::new(None),
        }))
    }

    fn check_open(&self) -> Result<()> {
        if let Some(e) = self.shared.failure() {
            return Err(e);
        }
        if self.shared.is_closed() {
            return Err(TransportError::PeerClosed(
                "the connection is closed".into(),
            ));
        }
        Ok(())
    }

    fn data_stream(&self) -> usize {
        if self.writers.len() == 1 {
            0
        } else {
            // Stream 0 carries messages; data goes round-robin over the others.
            1 + self.next_stream.fetch_add(1, Ordering::Relaxed) % (self.writers.len() - 1)
        }
    }

    fn enqueue(&self, stream: usize, op: OutOp) -> Result<()> {
        let deadline = Instant::now() + self.shared.timeout;
        let mut op = op;
        loop {
            self.shared.queued.fetch_add(1, Ordering::AcqRel);
            match self.writers[stream].try_send(op) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Full(o)) => {
                    self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                    self.check_open()?;
                    if Instant::now() >= deadline {
                        return Err(TransportError::Timeout(
                            self.shared.timeout,
                            "room in a send queue",
                        ));
                    }
                    op = o;
                    thread::sleep(Duration::from_micros(200));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                    self.check_open()?;
                    return Err(TransportError::PeerClosed("the writer thread ended".into()));
                }
            }
        }
    }
}

impl Link for SocketLink {
    fn fabric(&self) -> FabricKind {
        self.fabric
    }

    fn peer(&self) -> &EndpointMeta {
        &self.peer
    }

    fn post_write(
        &self,
        buf: SendBuf,
        dst: RegionId,
        offset: u64,
        imm: Option<u32>,
        wr_id: u64,
    ) -> Result<()> {
        self.check_open()?;
        #[cfg(feature = "verbs")]
        if let Some(v) = &self.verbs {
            return v.write(&self.shared, buf, dst, offset, imm, wr_id);
        }
        if let Some(shm) = &self.shm {
            shm.write(&self.shared, &buf, dst, offset, imm)?;
            self.shared.push_local(Event::WriteDone { wr_id, buf });
            return Ok(());
        }
        let hdr = self
            .shared
            .core()
            .start_write(dst, offset, buf.len(), imm)?;
        self.enqueue(self.data_stream(), OutOp::Write { hdr, wr_id, buf })
    }

    fn post_read(&self, src: RegionId, offset: u64, dst: RegionSlice, wr_id: u64) -> Result<()> {
        self.check_open()?;
        #[cfg(feature = "verbs")]
        if let Some(v) = &self.verbs {
            return v.read(&self.shared, src, offset, dst, wr_id);
        }
        if let Some(shm) = &self.shm {
            shm.read(&self.shared, src, offset, &dst)?;
            self.shared.push_local(Event::ReadDone { wr_id, dst });
            return Ok(());
        }
        let len = dst.len;
        let hdr = self
            .shared
            .core()
            .start_read(src, offset, len, Pending::Read(wr_id, dst))?;
        let f = hdr.to_bytes().to_vec();
        self.enqueue(self.data_stream(), OutOp::Frame(f))
    }

    fn send_msg(&self, msg: &[u8]) -> Result<()> {
        self.check_open()?;
        if msg.len() as u64 > MAX_MSG_LEN {
            return Err(TransportError::Invalid(format!(
                "message of {} bytes (limit {MAX_MSG_LEN})",
                msg.len()
            )));
        }
        let mut h = FrameHeader::new(FrameKind::Msg);
        h.len = msg.len() as u64;
        let mut f = h.to_bytes().to_vec();
        f.extend_from_slice(msg);
        self.enqueue(0, OutOp::Frame(f))
    }

    fn poll(&self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        let rx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ev) = self
                .shared
                .local_events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return Ok(Some(ev));
            }
            let now = Instant::now();
            // Wake at least every 50 ms to notice a failure recorded without an event.
            let slice = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(50));
            match rx.recv_timeout(slice) {
                Ok(ev) => {
                    if matches!(ev, Event::Notify(_) | Event::Message(_)) {
                        self.shared.inbound.fetch_sub(1, Ordering::AcqRel);
                    }
                    return Ok(Some(ev));
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    if let Some(e) = self.shared.failure() {
                        return Err(e);
                    }
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn link_estimate(&self) -> Option<LinkEstimate> {
        *self.estimate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_link_estimate(&self, estimate: LinkEstimate) {
        *self.estimate.lock().unwrap_or_else(|p| p.into_inner()) = Some(estimate);
    }

    fn send_cpu(&self) -> Option<(u64, Duration)> {
        Some((
            self.shared.sent_bytes.load(Ordering::Relaxed),
            Duration::from_nanos(self.shared.send_cpu_ns.load(Ordering::Relaxed)),
        ))
    }

    fn close(&self, reason: &str) {
        let code = if reason.is_empty() {
            CloseCode::Normal
        } else {
            CloseCode::Aborted
        };
        if reason.is_empty() {
            // Orderly: let the writers finish what is queued (bounded by the timeout).
            let deadline = Instant::now() + self.shared.timeout;
            while self.shared.queued.load(Ordering::Acquire) > 0
                && !self.shared.is_closed()
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_micros(200));
            }
        }
        self.shared.end(
            TransportError::PeerClosed("closed by this side".into()),
            Some(&close_frame(code, reason)),
        );
    }
}

impl Drop for SocketLink {
    fn drop(&mut self) {
        self.close("");
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn writer_loop(sh: &Shared, stream: usize, sock: &TcpStream, rx: &Receiver<OutOp>) {
    loop {
        let op = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => {
                if sh.is_closed() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if sh.is_closed() {
            return;
        }
        let _guard =
            (stream == 0).then(|| sh.control_write.lock().unwrap_or_else(|p| p.into_inner()));
        if sh.is_closed() {
            return;
        }
        let r = match op {
            OutOp::Frame(f) => (&*sock)
                .write_all(&f)
                .map_err(|e| TransportError::io("sending a frame", e)),
            OutOp::Write { hdr, wr_id, buf } => {
                let head = hdr.to_bytes();
                let cpu = thread_cpu();
                let sent = match &buf {
                    SendBuf::Bytes(v) => write_all_vectored(sock, &head, v),
                    SendBuf::Region(s) => s.span().write_to_fd_after(sock, &head),
                };
                sh.send_cpu_ns.fetch_add(
                    thread_cpu().saturating_sub(cpu).as_nanos() as u64,
                    Ordering::Relaxed,
                );
                sh.sent_bytes.fetch_add(hdr.len, Ordering::Relaxed);
                match sent {
                    Ok(()) => {
                        let done = sh.core().write_sent(hdr.id, Pending::Write(wr_id, buf));
                        if let Some(Pending::Write(wr_id, buf)) = done {
                            sh.emit(Event::WriteDone { wr_id, buf });
                        }
                        Ok(())
                    }
                    Err(e) => Err(TransportError::io("sending a write", e)),
                }
            }
            OutOp::ReadResp {
                hdr,
                region,
                offset,
            } => match region.span(offset, hdr.len) {
                Ok(span) => span
                    .write_to_fd_after(sock, &hdr.to_bytes())
                    .map_err(|e| TransportError::io("answering a read", e)),
                Err(e) => Err(e),
            },
        };
        sh.queued.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = r {
            let e = match e {
                TransportError::Io { source, .. } if is_timeout(&source) => {
                    TransportError::Timeout(sh.timeout, "the peer to take our bytes")
                }
                e => e,
            };
            sh.fail(e, false);
            return;
        }
    }
}

fn write_all_vectored(mut sock: &TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let total = head.len() + body.len();
    let mut done = 0;
    while done < total {
        let n = if done < head.len() {
            sock.write_vectored(&[IoSlice::new(&head[done..]), IoSlice::new(body)])
        } else {
            sock.write(&body[done - head.len()..])
        };
        match n {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// What [`read_full`] got.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    /// The whole buffer.
    Full,
    /// Nothing within the read timeout (only with `idle_ok`).
    Idle,
    /// The peer closed the stream before the first byte (only with `idle_ok`).
    Closed,
}

/// Reads exactly `buf.len()` bytes. `idle_ok`: a timeout or the stream's end before the first
/// byte is not an error (`Got::Idle`, `Got::Closed`), so an idle connection can wait for its
/// next frame and the caller decides what an end between frames means.
fn read_full(sh: &Shared, mut sock: &TcpStream, buf: &mut [u8], idle_ok: bool) -> Result<Got> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) if got == 0 && idle_ok => return Ok(Got::Closed),
            Ok(0) => {
                return Err(TransportError::PeerClosed(
                    "the peer closed the socket inside a frame".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if got == 0 && idle_ok {
                    return Ok(Got::Idle);
                }
                return Err(TransportError::Timeout(sh.timeout, "the rest of a frame"));
            }
            Err(e) => return Err(TransportError::io("reading a frame", e)),
        }
    }
    Ok(Got::Full)
}

fn reader_loop(sh: &Arc<Shared>, stream: usize, sock: TcpStream, my_writer: &SyncSender<OutOp>) {
    if let Err(e) = read_frames(sh, stream, &sock, my_writer) {
        let tell = matches!(
            e,
            TransportError::Protocol(_) | TransportError::OutOfBounds(_)
        );
        sh.fail(e, tell);
    }
}

fn read_frames(
    sh: &Arc<Shared>,
    stream: usize,
    sock: &TcpStream,
    my_writer: &SyncSender<OutOp>,
) -> Result<()> {
    let mut hb = [0u8; HEADER_LEN];
    loop {
        if sh.is_closed() {
            return Ok(());
        }
        while sh.inbound_full() && !sh.is_closed() {
            thread::sleep(Duration::from_millis(1));
        }
        match read_full(sh, sock, &mut hb, true)? {
            Got::Full => {}
            Got::Idle => continue,
            // A data stream's clean end says nothing by itself: a peer closing in order ends
            // every stream after its Close frame on stream 0, whose reader may still hold
            // frames (the transfer's confirmation, say). Failing here would race that reader
            // and could drop them; stream 0's end (or a write on this stream failing, or the
            // caller's timeout) reports the connection's end.
            Got::Closed if stream > 0 => return Ok(()),
            Got::Closed => {
                return Err(TransportError::PeerClosed(
                    "the peer closed the socket".into(),
                ))
            }
        }
        let h = FrameHeader::parse(&hb)?;
        let inbound = sh.core().on_header(&h)?;
        match inbound {
            Inbound::Write {
                region,
                region_id,
                offset,
                len,
                imm,
                id,
            } => {
                region
                    .span(offset, len)?
                    .read_from_fd(sock)
                    .map_err(|e| payload_err(sh, e))?;
                let ack = sh.core().write_placed(id).to_bytes().to_vec();
                sh.queued.fetch_add(1, Ordering::AcqRel);
                if my_writer.send(OutOp::Frame(ack)).is_err() {
                    sh.queued.fetch_sub(1, Ordering::AcqRel);
                }
                sh.emit(Event::Notify(Notification {
                    region: region_id,
                    offset,
                    len,
                    imm,
                }));
            }
            Inbound::WriteAck { buf, .. } => {
                if let Some(Pending::Write(wr_id, buf)) = buf {
                    sh.emit(Event::WriteDone { wr_id, buf });
                }
            }
            Inbound::ReadRequest {
                region,
                offset,
                id,
                len,
            } => {
                let hdr = sh.core().read_answer(id, len);
                let _ = my_writer.send(OutOp::ReadResp {
                    hdr,
                    region,
                    offset,
                });
            }
            Inbound::ReadResponse { dst, .. } => {
                let Pending::Read(wr_id, dst) = dst else {
                    return Err(TransportError::Protocol(
                        "read answer matched a write".into(),
                    ));
                };
                dst.span()
                    .read_from_fd(sock)
                    .map_err(|e| payload_err(sh, e))?;
                sh.emit(Event::ReadDone { wr_id, dst });
            }
            Inbound::Message { len } => {
                let mut m = vec![0u8; len as usize];
                read_full(sh, sock, &mut m, false)?;
                sh.emit(Event::Message(m));
            }
            Inbound::Close { code, len } => {
                let mut reason = vec![0u8; len as usize];
                read_full(sh, sock, &mut reason, false)?;
                return Err(crate::proto::core::peer_close_error(code, &reason));
            }
        }
    }
}

fn payload_err(sh: &Shared, e: std::io::Error) -> TransportError {
    if is_timeout(&e) {
        TransportError::Timeout(sh.timeout, "the rest of a payload")
    } else {
        TransportError::io("reading a payload", e)
    }
}
