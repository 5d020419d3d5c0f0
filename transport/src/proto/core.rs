//! The established-connection logic, without sockets: it assigns request ids, checks every
//! outgoing request against the peer's advertised regions and every incoming header against
//! the local region table, and matches answers to requests. The I/O layer only moves the
//! bytes it is told to move.

use std::collections::HashMap;
use std::sync::Arc;

use super::frame::{CloseCode, FrameHeader, FrameKind};
use super::handshake::close_error;
use crate::error::{Result, TransportError};
use crate::meta::EndpointMeta;
use crate::region::{Region, RegionId, RegionTable};

/// What to do with an incoming frame whose header passed the checks.
#[derive(Debug)]
pub enum Inbound<T> {
    /// Read `len` payload bytes into `region` at `offset`, then report
    /// [`Core::write_placed`] and deliver a notification carrying `imm`.
    Write {
        /// Destination region (checked: registered, writable, range inside).
        region: Arc<Region>,
        /// Its id.
        region_id: RegionId,
        /// Offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Immediate.
        imm: Option<u32>,
        /// Request id to acknowledge.
        id: u32,
    },
    /// The peer placed our write `id`. `buf` is its buffer if the I/O layer had already
    /// reported it sent ([`Core::write_sent`]); otherwise that call hands the buffer back.
    WriteAck {
        /// Request id.
        id: u32,
        /// The buffer the write was sent from, when the write is now complete.
        buf: Option<T>,
    },
    /// Answer with a `ReadResp` frame carrying these region bytes.
    ReadRequest {
        /// Source region (checked: registered, readable, range inside).
        region: Arc<Region>,
        /// Offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Request id to answer.
        id: u32,
    },
    /// Read the `len` payload bytes into the destination of our read `id`.
    ReadResponse {
        /// Request id.
        id: u32,
        /// Where they go (given to [`Core::start_read`]).
        dst: T,
        /// Bytes.
        len: u64,
    },
    /// Read a `len`-byte message (bounded by the header check).
    Message {
        /// Bytes.
        len: u64,
    },
    /// The peer is closing: read the `len`-byte reason, then stop.
    Close {
        /// Close code.
        code: u32,
        /// Reason bytes.
        len: u64,
    },
}

/// Where a write stands: its payload is being sent, or sent (buffer parked until the
/// acknowledgement), or acknowledged before the sender finished (the ack can overtake the
/// sending thread's bookkeeping).
#[derive(Debug)]
enum WriteState<T> {
    Sending,
    Sent(T),
    Acked,
}

/// The state of one established connection.
#[derive(Debug)]
pub struct Core<T> {
    local: RegionTable,
    peer: EndpointMeta,
    pending_writes: HashMap<u32, WriteState<T>>,
    pending_reads: HashMap<u32, (u64, T)>,
    next_id: u32,
    /// Most requests of each kind in flight at once.
    max_pending: usize,
}

impl<T> Core<T> {
    /// A core for a connection to `peer`, serving remote accesses to `local`.
    pub fn new(local: RegionTable, peer: EndpointMeta, max_pending: usize) -> Self {
        Self {
            local,
            peer,
            pending_writes: HashMap::new(),
            pending_reads: HashMap::new(),
            next_id: 0,
            max_pending,
        }
    }

    /// The peer's metadata.
    pub const fn peer(&self) -> &EndpointMeta {
        &self.peer
    }

    /// Requests in flight (writes, reads).
    pub fn in_flight(&self) -> (usize, usize) {
        (self.pending_writes.len(), self.pending_reads.len())
    }

    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.pending_writes.contains_key(&id) && !self.pending_reads.contains_key(&id) {
                return id;
            }
        }
    }

    /// Checks an access to the peer's (`region`, `offset`, `len`) against its metadata.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] naming what failed.
    pub fn check_peer(&self, region: RegionId, offset: u64, len: u64, write: bool) -> Result<()> {
        let r = self.peer.region(region).ok_or_else(|| {
            TransportError::OutOfBounds(format!("the peer has no region {}", region.0))
        })?;
        let ok = if write {
            r.access.remote_write
        } else {
            r.access.remote_read
        };
        if !ok {
            return Err(TransportError::OutOfBounds(format!(
                "the peer's region {} does not allow remote {}",
                region.0,
                if write { "writes" } else { "reads" }
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= r.len => Ok(()),
            _ => Err(TransportError::OutOfBounds(format!(
                "{len} bytes at offset {offset} exceed the peer's region {} of {} bytes",
                region.0, r.len
            ))),
        }
    }

    /// Starts a write of `len` bytes to the peer's (`region`, `offset`); report the buffer
    /// with [`Self::write_sent`] once its bytes are handed to the wire.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] if the peer did not advertise a writable region
    /// holding the range (nothing is sent); [`TransportError::Invalid`] if too many writes
    /// are in flight.
    pub fn start_write(
        &mut self,
        region: RegionId,
        offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> Result<FrameHeader> {
        self.check_peer(region, offset, len, true)?;
        if self.pending_writes.len() >= self.max_pending {
            return Err(TransportError::Invalid(format!(
                "{} writes already in flight",
                self.pending_writes.len()
            )));
        }
        let id = self.fresh_id();
        self.pending_writes.insert(id, WriteState::Sending);
        Ok(FrameHeader {
            kind: FrameKind::Write,
            region: region.0,
            offset,
            len,
            imm,
            id,
        })
    }

    /// Starts a read of `len` bytes at the peer's (`region`, `offset`) into `dst`.
    ///
    /// # Errors
    /// As [`Self::start_write`], for reads.
    pub fn start_read(
        &mut self,
        region: RegionId,
        offset: u64,
        len: u64,
        dst: T,
    ) -> Result<FrameHeader> {
        self.check_peer(region, offset, len, false)?;
        if self.pending_reads.len() >= self.max_pending {
            return Err(TransportError::Invalid(format!(
                "{} reads already in flight",
                self.pending_reads.len()
            )));
        }
        let id = self.fresh_id();
        self.pending_reads.insert(id, (len, dst));
        Ok(FrameHeader {
            kind: FrameKind::Read,
            region: region.0,
            offset,
            len,
            imm: None,
            id,
        })
    }

    /// The payload of write `id` is on the wire; `buf` held it. Returns the buffer when the
    /// write is already acknowledged (so it is complete now), else parks it until the ack.
    pub fn write_sent(&mut self, id: u32, buf: T) -> Option<T> {
        match self.pending_writes.get(&id) {
            Some(WriteState::Acked) => {
                self.pending_writes.remove(&id);
                Some(buf)
            }
            Some(WriteState::Sending) => {
                self.pending_writes.insert(id, WriteState::Sent(buf));
                None
            }
            // Unknown or already parked: the connection was drained; give the buffer back.
            _ => Some(buf),
        }
    }

    /// The acknowledgement to send once a write's payload is in place.
    pub fn write_placed(&self, id: u32) -> FrameHeader {
        let mut h = FrameHeader::new(FrameKind::WriteAck);
        h.id = id;
        h
    }

    /// The header of the answer to read `id` of `len` bytes.
    pub fn read_answer(&self, id: u32, len: u64) -> FrameHeader {
        let mut h = FrameHeader::new(FrameKind::ReadResp);
        h.id = id;
        h.len = len;
        h
    }

    /// Classifies an incoming header, checking it before any payload byte is read.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] for an access outside the local regions,
    /// [`TransportError::Protocol`] for a frame that does not belong here (an answer to
    /// nothing, a handshake frame, a read answer of the wrong length). The connection must
    /// then be closed with [`close_code`] of the error.
    pub fn on_header(&mut self, h: &FrameHeader) -> Result<Inbound<T>> {
        match h.kind {
            FrameKind::Write => {
                let region = self
                    .local
                    .check_remote(RegionId(h.region), h.offset, h.len, true)?;
                Ok(Inbound::Write {
                    region,
                    region_id: RegionId(h.region),
                    offset: h.offset,
                    len: h.len,
                    imm: h.imm,
                    id: h.id,
                })
            }
            FrameKind::WriteAck => {
                let buf = match self.pending_writes.remove(&h.id) {
                    Some(WriteState::Sent(buf)) => Some(buf),
                    Some(WriteState::Sending) => {
                        self.pending_writes.insert(h.id, WriteState::Acked);
                        None
                    }
                    Some(WriteState::Acked) | None => {
                        return Err(TransportError::Protocol(format!(
                            "acknowledgement of unknown write {}",
                            h.id
                        )))
                    }
                };
                Ok(Inbound::WriteAck { id: h.id, buf })
            }
            FrameKind::Read => {
                let region = self
                    .local
                    .check_remote(RegionId(h.region), h.offset, h.len, false)?;
                Ok(Inbound::ReadRequest {
                    region,
                    offset: h.offset,
                    len: h.len,
                    id: h.id,
                })
            }
            FrameKind::ReadResp => {
                let Some((want, _)) = self.pending_reads.get(&h.id) else {
                    return Err(TransportError::Protocol(format!(
                        "answer to unknown read {}",
                        h.id
                    )));
                };
                if *want != h.len {
                    return Err(TransportError::Protocol(format!(
                        "read {} asked for {want} bytes, the answer carries {}",
                        h.id, h.len
                    )));
                }
                let (_, dst) = self.pending_reads.remove(&h.id).expect("checked above");
                Ok(Inbound::ReadResponse {
                    id: h.id,
                    dst,
                    len: h.len,
                })
            }
            FrameKind::Msg => Ok(Inbound::Message { len: h.len }),
            FrameKind::Close => Ok(Inbound::Close {
                code: h.region,
                len: h.len,
            }),
            k => Err(TransportError::Protocol(format!(
                "{k:?} frame after the handshake"
            ))),
        }
    }

    /// Ends the connection: every buffer of an unanswered request comes back, with its id.
    pub fn drain(&mut self) -> Vec<(u32, T)> {
        let mut v: Vec<(u32, T)> = self
            .pending_writes
            .drain()
            .filter_map(|(id, s)| match s {
                WriteState::Sent(t) => Some((id, t)),
                _ => None,
            })
            .collect();
        v.extend(self.pending_reads.drain().map(|(id, (_, t))| (id, t)));
        v
    }
}

/// The close code that reports `e` to the peer.
pub fn close_code(e: &TransportError) -> CloseCode {
    match e {
        TransportError::OutOfBounds(_) => CloseCode::OutOfBounds,
        TransportError::Protocol(_) => CloseCode::ProtocolViolation,
        TransportError::VersionMismatch { .. } => CloseCode::VersionMismatch,
        TransportError::Auth(_) => CloseCode::AuthFailed,
        TransportError::FabricMismatch(_) => CloseCode::FabricMismatch,
        _ => CloseCode::Aborted,
    }
}

/// The error a close frame received on an established connection stands for.
pub fn peer_close_error(code: u32, reason: &[u8]) -> TransportError {
    close_error(code, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Capabilities, FabricKind, RegionDesc};
    use crate::region::{Access, RegionOptions};

    fn table(len: usize, access: Access) -> (RegionTable, RegionId) {
        let t = RegionTable::default();
        let id = t.register(
            Arc::new(Region::new(len, RegionOptions::default()).unwrap()),
            access,
        );
        (t, id)
    }

    fn meta_of(t: &RegionTable) -> EndpointMeta {
        EndpointMeta {
            protocol_version: crate::PROTOCOL_VERSION,
            fabric: FabricKind::Tcp,
            capabilities: Capabilities::default(),
            addrs: vec![],
            regions: t
                .entries()
                .into_iter()
                .map(|(id, r, access)| RegionDesc {
                    id,
                    len: r.len() as u64,
                    key: 0,
                    access,
                    handle: String::new(),
                })
                .collect(),
        }
    }

    /// Two cores that advertised their regions to each other.
    fn pair() -> (Core<&'static str>, Core<&'static str>, RegionId) {
        let (ta, _) = table(4096, Access::ALL);
        let (tb, idb) = table(4096, Access::ALL);
        let a = Core::new(ta.clone(), meta_of(&tb), 4);
        let b = Core::new(tb, meta_of(&ta), 4);
        (a, b, idb)
    }

    #[test]
    fn a_write_flows_and_its_ack_returns_the_buffer() {
        let (mut a, mut b, idb) = pair();
        let h = a.start_write(idb, 100, 200, Some(7)).unwrap();
        assert_eq!(a.write_sent(h.id, "buf"), None);
        match b.on_header(&h).unwrap() {
            Inbound::Write {
                offset,
                len,
                imm,
                id,
                ..
            } => {
                assert_eq!((offset, len, imm), (100, 200, Some(7)));
                let ack = b.write_placed(id);
                match a.on_header(&ack).unwrap() {
                    Inbound::WriteAck { buf, .. } => assert_eq!(buf, Some("buf")),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.in_flight(), (0, 0));
        // An ack that overtakes the sender's bookkeeping completes the write at write_sent.
        let h2 = a.start_write(idb, 0, 1, None).unwrap();
        let Inbound::WriteAck { buf: None, .. } = a.on_header(&b.write_placed(h2.id)).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.write_sent(h2.id, "early"), Some("early"));
        // A second ack for the same id is a protocol violation.
        let ack = b.write_placed(h.id);
        assert!(matches!(
            a.on_header(&ack),
            Err(TransportError::Protocol(_))
        ));
    }

    #[test]
    fn a_read_is_answered_with_exactly_the_requested_length() {
        let (mut a, mut b, idb) = pair();
        let h = a.start_read(idb, 0, 64, "dst").unwrap();
        let Inbound::ReadRequest { id, len, .. } = b.on_header(&h).unwrap() else {
            panic!()
        };
        let mut wrong = b.read_answer(id, len + 1);
        assert!(a.on_header(&wrong).is_err());
        wrong.len = len;
        let Inbound::ReadResponse { dst, .. } = a.on_header(&wrong).unwrap() else {
            panic!()
        };
        assert_eq!(dst, "dst");
    }

    #[test]
    fn out_of_region_requests_are_refused_on_both_sides() {
        let (mut a, mut b, idb) = pair();
        // Sender-side: refused before anything is sent.
        assert!(matches!(
            a.start_write(idb, 4000, 97, None),
            Err(TransportError::OutOfBounds(_))
        ));
        assert!(a.start_write(RegionId(5), 0, 1, None).is_err());
        assert!(a.start_write(idb, u64::MAX, 1, None).is_err());
        // Receiver-side: a forged header is refused before its payload is read.
        let forged = FrameHeader {
            kind: FrameKind::Write,
            region: idb.0,
            offset: 4000,
            len: 97,
            imm: None,
            id: 1,
        };
        let e = b.on_header(&forged).unwrap_err();
        assert_eq!(close_code(&e), CloseCode::OutOfBounds);
        let forged_read = FrameHeader {
            kind: FrameKind::Read,
            ..forged
        };
        assert!(b.on_header(&forged_read).is_err());
    }

    #[test]
    fn access_rights_are_enforced() {
        let (ta, _) = table(4096, Access::ALL);
        let (tb, idb) = table(
            4096,
            Access {
                remote_write: false,
                remote_read: true,
            },
        );
        let mut a: Core<()> = Core::new(ta.clone(), meta_of(&tb), 4);
        let mut b: Core<()> = Core::new(tb, meta_of(&ta), 4);
        assert!(a.start_write(idb, 0, 1, None).is_err());
        let h = FrameHeader {
            kind: FrameKind::Write,
            region: idb.0,
            offset: 0,
            len: 1,
            imm: None,
            id: 0,
        };
        assert!(b.on_header(&h).is_err());
        assert!(a.start_read(idb, 0, 1, ()).is_ok());
    }

    #[test]
    fn in_flight_requests_are_bounded_and_drained() {
        let (mut a, _, idb) = pair();
        for _ in 0..4 {
            let h = a.start_write(idb, 0, 1, None).unwrap();
            assert_eq!(a.write_sent(h.id, "w"), None);
        }
        assert!(a.start_write(idb, 0, 1, None).is_err());
        a.start_read(idb, 0, 1, "r").unwrap();
        let drained = a.drain();
        assert_eq!(drained.len(), 5);
        assert_eq!(a.in_flight(), (0, 0));
    }

    #[test]
    fn handshake_frames_after_the_handshake_are_violations() {
        let (_, mut b, _) = pair();
        for k in [
            FrameKind::Hello,
            FrameKind::Auth,
            FrameKind::Meta,
            FrameKind::Ticket,
            FrameKind::Join,
        ] {
            assert!(b.on_header(&FrameHeader::new(k)).is_err());
        }
        assert!(b.on_header(&FrameHeader::new(FrameKind::ReadResp)).is_err());
    }
}
