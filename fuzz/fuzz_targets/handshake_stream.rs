//! An acceptor's handshake fed frames from the input, then the connection core fed
//! requests and headers, both checked against a small model.
//!
//! Input: byte 0 is the mode (`kvwire_fuzz::transport::MODE_*`): bit 0 the acceptor has a
//! token, bit 1 every `Auth` payload is replaced by the correct proof, bit 2 skip the
//! handshake, bit 3 every `Meta` payload gets its trailing CRC32C recomputed. Then:
//!
//! 1. Handshake phase: frames carved from the input as the TCP fabric reads them (32-byte
//!    header, parsed with `FrameHeader::parse`, unparsable headers skipped; then
//!    `min(len, remaining)` payload bytes for kinds with a payload). Each goes to
//!    `Handshake::handle`, then every queued frame is taken with `poll_transmit` and checked
//!    (its header parses, its length matches, a failure queues a `Close`). The phase ends at
//!    the first error, when the handshake is established (as the fabric's loop does), or
//!    at the end of the input. An established handshake must have seen a valid `Hello`, the
//!    right proof (with a token) and a `Meta` payload that parses to the peer's metadata.
//! 2. Core phase, on the bytes the handshake did not consume: a `Core<u32>` over one
//!    registered 4096-byte region (id 0), its peer the established metadata or
//!    `default_peer_meta()`, at most 4 requests of each kind in flight. Operations (first
//!    byte `% 8`): 0-3 `on_header` of the next 32 bytes (unparsable: skipped), 4
//!    `start_write`, 5 `write_sent`, 6 `start_read`, 7 `drain` (see `OP_*`). Errors are
//!    fine; every result is compared with a model of the pending requests.
#![no_main]

use std::collections::HashMap;

use kvwire_fuzz::transport::{
    acceptor, connector_proof, default_peer_meta, header_bytes, local_table, reseal_meta,
    FrameStream, ACCEPTOR_NONCE, ACCEPTOR_TICKET, MAX_PENDING, MODE_FIX_AUTH, MODE_FIX_META,
    MODE_SKIP_HANDSHAKE, MODE_TOKEN, OP_DRAIN, OP_START_READ, OP_START_WRITE, OP_WRITE_SENT,
    REGION_LEN, TOKEN,
};
use kvwire_transport::proto::frame::{FrameHeader, FrameKind, HEADER_LEN};
use kvwire_transport::proto::handshake::{Handshake, MAX_STREAMS};
use kvwire_transport::proto::{Core, Inbound};
use kvwire_transport::{EndpointMeta, RegionId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut frames = FrameStream::new(rest);
    let mut peer = None;
    if mode & MODE_SKIP_HANDSHAKE == 0 {
        peer = handshake(mode, &mut frames);
    }
    core(peer.unwrap_or_else(default_peer_meta), frames.rest());
});

/// Takes every queued frame; checks each is well formed. Returns the kinds.
fn drain_out(hs: &mut Handshake) -> Vec<FrameKind> {
    let mut kinds = Vec::new();
    while let Some(f) = hs.poll_transmit() {
        assert!(f.len() >= HEADER_LEN, "short frame {f:?}");
        let h = match FrameHeader::parse(&header_bytes(&f)) {
            Ok(h) => h,
            Err(e) => panic!("the handshake queued an unparsable frame: {e}: {f:?}"),
        };
        assert_eq!(h.len, (f.len() - HEADER_LEN) as u64, "{h:?}");
        kinds.push(h.kind);
        assert!(kinds.len() <= 4, "too many frames queued: {kinds:?}");
    }
    kinds
}

fn handshake(mode: u8, frames: &mut FrameStream<'_>) -> Option<EndpointMeta> {
    let token = mode & MODE_TOKEN != 0;
    let mut hs = acceptor(token);
    assert_eq!(drain_out(&mut hs), [FrameKind::Hello]);
    assert!(hs.established().is_none());
    // What the model has seen: the accepted hello's nonce and streams, whether a right
    // proof came, the last metadata payload.
    let mut hello: Option<([u8; 16], u16)> = None;
    let mut authed = false;
    while let Some((h, payload)) = frames.next_frame() {
        let proof_buf;
        let mut meta_buf;
        let payload: &[u8] = match hello {
            Some((nonce, _)) if h.kind == FrameKind::Auth && mode & MODE_FIX_AUTH != 0 => {
                proof_buf = connector_proof(TOKEN, &nonce, &ACCEPTOR_NONCE);
                &proof_buf
            }
            // At most MAX_META_LEN bytes: FrameHeader::parse bounds a Meta frame's length.
            _ if h.kind == FrameKind::Meta && mode & MODE_FIX_META != 0 => {
                meta_buf = payload.to_vec();
                reseal_meta(&mut meta_buf);
                &meta_buf
            }
            _ => payload,
        };
        let r = hs.handle(&h, payload);
        let out = drain_out(&mut hs);
        match &r {
            Err(_) if h.kind == FrameKind::Close => assert!(out.is_empty(), "{out:?}"),
            Err(_) => assert_eq!(out, [FrameKind::Close]),
            Ok(()) => match h.kind {
                FrameKind::Hello => {
                    assert!(hello.is_none(), "a second hello was accepted");
                    assert_eq!(payload.len(), 32);
                    let nonce: [u8; 16] = payload[16..32].try_into().unwrap();
                    let streams = u16::from_le_bytes([payload[10], payload[11]]);
                    assert!((1..=MAX_STREAMS).contains(&streams));
                    assert_eq!(payload[8], 0, "a hello from a non-connector was accepted");
                    assert_eq!(payload[9] != 0, token);
                    hello = Some((nonce, streams));
                    if token {
                        assert_eq!(out, [FrameKind::Auth]);
                    } else {
                        assert_eq!(out, [FrameKind::Meta, FrameKind::Ticket]);
                    }
                }
                FrameKind::Auth => {
                    let (nonce, _) = hello.expect("auth accepted before a hello");
                    assert!(token && !authed);
                    assert_eq!(payload, connector_proof(TOKEN, &nonce, &ACCEPTOR_NONCE));
                    authed = true;
                    assert_eq!(out, [FrameKind::Meta, FrameKind::Ticket]);
                }
                FrameKind::Meta => {
                    assert!(hello.is_some() && (authed || !token));
                    assert!(out.is_empty());
                }
                k => panic!("{k:?} frame accepted by the acceptor's handshake"),
            },
        }
        if r.is_err() {
            assert!(hs.established().is_none());
            return None;
        }
        if let Some(est) = hs.established() {
            assert_eq!(h.kind, FrameKind::Meta);
            let (_, streams) = hello.expect("established without a hello");
            assert_eq!(est.peer_streams, streams);
            assert_eq!(est.ticket, ACCEPTOR_TICKET);
            assert_eq!(
                EndpointMeta::from_bytes(payload).ok().as_ref(),
                Some(&est.peer)
            );
            return Some(est.peer);
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum W {
    Sending,
    Sent(u32),
    Acked,
}

struct Ops<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Ops<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.len().min(N);
        a[..n].copy_from_slice(&rest[..n]);
        self.pos += N;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// Whether the model expects `check_peer` to accept the access.
fn peer_allows(peer: &EndpointMeta, region: u32, offset: u64, len: u64, write: bool) -> bool {
    peer.regions
        .iter()
        .find(|r| r.id.0 == region)
        .is_some_and(|r| {
            (if write {
                r.access.remote_write
            } else {
                r.access.remote_read
            }) && offset.checked_add(len).is_some_and(|e| e <= r.len)
        })
}

fn local_allows(h: &FrameHeader) -> bool {
    h.region == 0
        && h.offset
            .checked_add(h.len)
            .is_some_and(|e| e <= REGION_LEN as u64)
}

fn core(peer: EndpointMeta, data: &[u8]) {
    let mut core: Core<u32> = Core::new(local_table(), peer.clone(), MAX_PENDING);
    let mut writes: HashMap<u32, W> = HashMap::new();
    let mut reads: HashMap<u32, (u64, u32)> = HashMap::new();
    let mut next_buf = 0u32;
    let mut ops = Ops { data, pos: 0 };
    while ops.pos < data.len() {
        let op = ops.u8();
        match op % 8 {
            OP_START_WRITE => {
                let (region, offset, len) = (ops.u8() as u32, ops.u64(), ops.u64());
                let imm = (op & 0x80 != 0).then(|| ops.u32());
                let r = core.start_write(RegionId(region), offset, len, imm);
                let want =
                    peer_allows(&peer, region, offset, len, true) && writes.len() < MAX_PENDING;
                assert_eq!(
                    r.is_ok(),
                    want,
                    "start_write({region}, {offset}, {len}): {r:?}"
                );
                if let Ok(h) = r {
                    assert_eq!(
                        (h.kind, h.region, h.offset, h.len, h.imm),
                        (FrameKind::Write, region, offset, len, imm)
                    );
                    assert!(!writes.contains_key(&h.id) && !reads.contains_key(&h.id));
                    assert_eq!(FrameHeader::parse(&h.to_bytes()).ok(), Some(h));
                    writes.insert(h.id, W::Sending);
                }
            }
            OP_WRITE_SENT => {
                let id = ops.u8() as u32;
                next_buf += 1;
                let got = core.write_sent(id, next_buf);
                match writes.get(&id).copied() {
                    Some(W::Sending) => {
                        assert_eq!(got, None);
                        writes.insert(id, W::Sent(next_buf));
                    }
                    Some(W::Acked) => {
                        assert_eq!(got, Some(next_buf));
                        writes.remove(&id);
                    }
                    Some(W::Sent(_)) | None => assert_eq!(got, Some(next_buf)),
                }
            }
            OP_START_READ => {
                let (region, offset, len) = (ops.u8() as u32, ops.u64(), ops.u64());
                next_buf += 1;
                let r = core.start_read(RegionId(region), offset, len, next_buf);
                let want =
                    peer_allows(&peer, region, offset, len, false) && reads.len() < MAX_PENDING;
                assert_eq!(
                    r.is_ok(),
                    want,
                    "start_read({region}, {offset}, {len}): {r:?}"
                );
                if let Ok(h) = r {
                    assert_eq!(
                        (h.kind, h.region, h.offset, h.len, h.imm),
                        (FrameKind::Read, region, offset, len, None)
                    );
                    assert!(!writes.contains_key(&h.id) && !reads.contains_key(&h.id));
                    assert_eq!(FrameHeader::parse(&h.to_bytes()).ok(), Some(h));
                    reads.insert(h.id, (len, next_buf));
                }
            }
            OP_DRAIN => {
                let mut got = core.drain();
                got.sort_unstable();
                let mut want: Vec<(u32, u32)> = writes
                    .iter()
                    .filter_map(|(&id, w)| match w {
                        W::Sent(b) => Some((id, *b)),
                        _ => None,
                    })
                    .chain(reads.iter().map(|(&id, &(_, b))| (id, b)))
                    .collect();
                want.sort_unstable();
                assert_eq!(got, want);
                writes.clear();
                reads.clear();
            }
            _ => {
                let b: [u8; HEADER_LEN] = ops.take();
                if let Ok(h) = FrameHeader::parse(&b) {
                    on_header(&mut core, &h, &mut writes, &mut reads);
                }
            }
        }
        assert_eq!(core.in_flight(), (writes.len(), reads.len()));
    }
}

fn on_header(
    core: &mut Core<u32>,
    h: &FrameHeader,
    writes: &mut HashMap<u32, W>,
    reads: &mut HashMap<u32, (u64, u32)>,
) {
    let r = core.on_header(h);
    match (h.kind, r) {
        (FrameKind::Write, r) => {
            assert_eq!(r.is_ok(), local_allows(h), "{h:?}: {r:?}");
            if let Ok(i) = r {
                let Inbound::Write {
                    region,
                    region_id,
                    offset,
                    len,
                    imm,
                    id,
                } = i
                else {
                    panic!("{h:?} gave {i:?}")
                };
                assert_eq!(region.len(), REGION_LEN);
                assert!(region.check(offset, len).is_ok());
                assert_eq!(
                    (region_id.0, offset, len, imm, id),
                    (h.region, h.offset, h.len, h.imm, h.id)
                );
            }
        }
        (FrameKind::Read, r) => {
            assert_eq!(r.is_ok(), local_allows(h), "{h:?}: {r:?}");
            if let Ok(i) = r {
                let Inbound::ReadRequest {
                    region,
                    offset,
                    len,
                    id,
                } = i
                else {
                    panic!("{h:?} gave {i:?}")
                };
                assert!(region.check(offset, len).is_ok());
                assert_eq!((offset, len, id), (h.offset, h.len, h.id));
            }
        }
        (FrameKind::WriteAck, r) => match writes.get(&h.id).copied() {
            Some(W::Sent(b)) => {
                assert!(
                    matches!(r, Ok(Inbound::WriteAck { id, buf: Some(x) }) if id == h.id && x == b),
                    "{h:?}: {r:?}"
                );
                writes.remove(&h.id);
            }
            Some(W::Sending) => {
                assert!(
                    matches!(r, Ok(Inbound::WriteAck { id, buf: None }) if id == h.id),
                    "{h:?}: {r:?}"
                );
                writes.insert(h.id, W::Acked);
            }
            Some(W::Acked) => {
                // A second ack of a write acknowledged before `write_sent`: refused, and the
                // core forgets the write (`remove` before the match in `on_header`). Harmless:
                // `write_sent` then hands the buffer back as for an acknowledged write, and
                // the connection is closed after the error anyway.
                assert!(r.is_err(), "{h:?}: {r:?}");
                writes.remove(&h.id);
            }
            None => assert!(r.is_err(), "{h:?}: {r:?}"),
        },
        (FrameKind::ReadResp, r) => match reads.get(&h.id).copied() {
            Some((want, b)) if want == h.len => {
                assert!(
                    matches!(r, Ok(Inbound::ReadResponse { id, dst, len }) if id == h.id && dst == b && len == h.len),
                    "{h:?}: {r:?}"
                );
                reads.remove(&h.id);
            }
            _ => assert!(r.is_err(), "{h:?}: {r:?}"),
        },
        (FrameKind::Msg, r) => {
            assert!(
                matches!(r, Ok(Inbound::Message { len }) if len == h.len),
                "{h:?}: {r:?}"
            )
        }
        (FrameKind::Close, r) => assert!(
            matches!(r, Ok(Inbound::Close { code, len }) if code == h.region && len == h.len),
            "{h:?}: {r:?}"
        ),
        (_, r) => assert!(r.is_err(), "{h:?}: {r:?}"),
    }
}
