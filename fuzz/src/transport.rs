//! Helpers shared by the kvwire-transport fuzz targets (`transport_parsers`,
//! `handshake_stream`) and their seed generator (`examples/make_transport_seeds.rs`).

use std::sync::{Arc, OnceLock};

use kvwire_transport::meta::{Capabilities, RegionDesc};
use kvwire_transport::proto::frame::{FrameHeader, FrameKind, HEADER_LEN};
use kvwire_transport::proto::handshake::{Handshake, Role, TICKET_LEN};
use kvwire_transport::{
    Access, Backing, EndpointMeta, FabricKind, Region, RegionId, RegionOptions, RegionTable,
};
use sha2::{Digest, Sha256};

/// `transport_parsers` selector (byte 0, `& 0x7f`, modulo 3): which parser gets the rest.
pub const SEL_FRAME: u8 = 0;
/// See [`SEL_FRAME`].
pub const SEL_META: u8 = 1;
/// See [`SEL_FRAME`].
pub const SEL_SESSION: u8 = 2;
/// `transport_parsers` selector bit: recompute a metadata blob's trailing CRC32C first.
pub const SEL_RESEAL: u8 = 0x80;

/// `handshake_stream` mode bit (byte 0): the acceptor is configured with [`TOKEN`].
pub const MODE_TOKEN: u8 = 1;
/// Mode bit: replace every `Auth` payload by the proof the acceptor expects (the fuzzer
/// cannot forge a SHA-256; without this bit, only the seeds reach `Meta` with a token).
pub const MODE_FIX_AUTH: u8 = 2;
/// Mode bit: skip the handshake; all bytes after byte 0 drive the [`Core`] phase.
///
/// [`Core`]: kvwire_transport::proto::Core
pub const MODE_SKIP_HANDSHAKE: u8 = 4;
/// Mode bit: recompute the trailing CRC32C of every `Meta` payload, so that fuzzed peer
/// metadata (duplicate region ids, huge lengths, ...) gets through and reaches the `Core`.
pub const MODE_FIX_META: u8 = 8;

/// The acceptor's token (with [`MODE_TOKEN`]).
pub const TOKEN: &[u8] = b"fuzz-token";
/// The acceptor's nonce.
pub const ACCEPTOR_NONCE: [u8; 16] = *b"acceptor-nonce-0";
/// The acceptor's ticket.
pub const ACCEPTOR_TICKET: [u8; TICKET_LEN] = *b"acceptor-ticket!";
/// Streams the acceptor announces.
pub const ACCEPTOR_STREAMS: u16 = 1;
/// Bytes of the one local region of the `Core` phase.
pub const REGION_LEN: usize = 4096;
/// `max_pending` of the `Core` phase (small, so the limit is reached).
pub const MAX_PENDING: usize = 4;

/// The acceptor's own metadata (what it sends in its `Meta` frame).
pub fn acceptor_meta() -> EndpointMeta {
    EndpointMeta {
        protocol_version: kvwire_transport::PROTOCOL_VERSION,
        fabric: FabricKind::Tcp,
        capabilities: Capabilities(Capabilities::WRITE_IMM | Capabilities::READ),
        addrs: vec!["127.0.0.1:7000".into()],
        regions: vec![RegionDesc {
            id: RegionId(0),
            len: REGION_LEN as u64,
            key: 0,
            access: Access::ALL,
            handle: String::new(),
        }],
    }
}

/// The acceptor-role handshake of `handshake_stream`.
pub fn acceptor(token: bool) -> Handshake {
    Handshake::new(
        Role::Acceptor,
        token.then_some(TOKEN),
        ACCEPTOR_NONCE,
        acceptor_meta()
            .to_bytes()
            .expect("fixed metadata serializes"),
        ACCEPTOR_TICKET,
        ACCEPTOR_STREAMS,
    )
}

/// The `Auth` proof a connector with `token` and nonce `connector_nonce` sends to an
/// acceptor of nonce `acceptor_nonce`. Mirrors `Handshake::proof` (private in
/// `transport/src/proto/handshake.rs`): SHA-256(domain ‖ role ‖ token length u64 LE ‖
/// token ‖ own nonce ‖ peer nonce), role 0 = connector.
pub fn connector_proof(
    token: &[u8],
    connector_nonce: &[u8; 16],
    acceptor_nonce: &[u8; 16],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kvwire-auth-v1");
    h.update([0u8]);
    h.update((token.len() as u64).to_le_bytes());
    h.update(token);
    h.update(connector_nonce);
    h.update(acceptor_nonce);
    h.finalize().into()
}

/// Pads or truncates `b` to a frame header.
pub fn header_bytes(b: &[u8]) -> [u8; HEADER_LEN] {
    let mut a = [0u8; HEADER_LEN];
    let n = b.len().min(HEADER_LEN);
    a[..n].copy_from_slice(&b[..n]);
    a
}

/// Recomputes the trailing CRC32C of a metadata blob (if it has room for one).
pub fn reseal_meta(b: &mut [u8]) {
    if b.len() >= 4 {
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Carves frames out of a byte stream the way the TCP fabric reads them during the
/// handshake (`read_frame` in `transport/src/tcp/mod.rs`): a 32-byte header, then, for kinds
/// that have a payload, `min(len, remaining)` payload bytes. A header that does not parse is
/// skipped (32 bytes consumed, no payload). Nothing is allocated: payloads borrow the input.
pub struct FrameStream<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> FrameStream<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// Bytes not consumed yet.
    pub fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or(&[])
    }

    /// The next parsable frame, skipping unparsable headers; `None` once fewer than 32
    /// bytes are left.
    pub fn next_frame(&mut self) -> Option<(FrameHeader, &'a [u8])> {
        loop {
            let rest = self.rest();
            if rest.len() < HEADER_LEN {
                self.pos = self.data.len();
                return None;
            }
            self.pos += HEADER_LEN;
            let Ok(h) = FrameHeader::parse(&header_bytes(rest)) else {
                continue;
            };
            let avail = self.rest();
            let n = if h.kind.has_payload() {
                usize::try_from(h.len)
                    .unwrap_or(usize::MAX)
                    .min(avail.len())
            } else {
                0
            };
            self.pos += n;
            return Some((h, &avail[..n]));
        }
    }
}

/// The local region table of the `Core` phase: one 4096-byte region, id 0, readable and
/// writable by the peer. Created once per process (a region is an mmap).
pub fn local_table() -> RegionTable {
    static T: OnceLock<RegionTable> = OnceLock::new();
    T.get_or_init(|| {
        let t = RegionTable::default();
        let r = Region::new(
            REGION_LEN,
            RegionOptions {
                backing: Backing::Anonymous,
                lock: false,
                huge_pages: false,
            },
        )
        .expect("a 4096-byte region maps");
        let id = t.register(Arc::new(r), Access::ALL);
        assert_eq!(id, RegionId(0));
        t
    })
    .clone()
}

/// The peer metadata of the `Core` phase when the handshake did not complete: region 0
/// (4096 bytes, all access), region 1 (write-only, `u64::MAX` bytes, for overflow checks),
/// region 2 (read-only, 100 bytes).
pub fn default_peer_meta() -> EndpointMeta {
    let mut m = acceptor_meta();
    m.regions.push(RegionDesc {
        id: RegionId(1),
        len: u64::MAX,
        key: 1,
        access: Access {
            remote_write: true,
            remote_read: false,
        },
        handle: String::new(),
    });
    m.regions.push(RegionDesc {
        id: RegionId(2),
        len: 100,
        key: 2,
        access: Access {
            remote_write: false,
            remote_read: true,
        },
        handle: String::new(),
    });
    m
}

/// `Core` phase operation codes (`op % 8` of each operation's first byte). Codes 0-3 feed a
/// 32-byte header (padded with zeros at the end of the input) to `on_header`.
pub const OP_HEADER: u8 = 0;
/// `start_write`: region id u8, offset u64 LE, len u64 LE, then (if bit 7 of the op byte is
/// set) an immediate u32 LE.
pub const OP_START_WRITE: u8 = 4;
/// `write_sent`: request id u8.
pub const OP_WRITE_SENT: u8 = 5;
/// `start_read`: region id u8, offset u64 LE, len u64 LE.
pub const OP_START_READ: u8 = 6;
/// `drain`.
pub const OP_DRAIN: u8 = 7;

/// Encodes `Core` phase operations (for the seed generator).
#[derive(Default)]
pub struct CoreOps(pub Vec<u8>);

impl CoreOps {
    pub fn header(&mut self, h: &FrameHeader) -> &mut Self {
        self.0.push(OP_HEADER);
        self.0.extend_from_slice(&h.to_bytes());
        self
    }
    pub fn start_write(
        &mut self,
        region: u8,
        offset: u64,
        len: u64,
        imm: Option<u32>,
    ) -> &mut Self {
        self.0
            .push(OP_START_WRITE | if imm.is_some() { 0x80 } else { 0 });
        self.0.push(region);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.extend_from_slice(&len.to_le_bytes());
        if let Some(i) = imm {
            self.0.extend_from_slice(&i.to_le_bytes());
        }
        self
    }
    pub fn write_sent(&mut self, id: u8) -> &mut Self {
        self.0.extend_from_slice(&[OP_WRITE_SENT, id]);
        self
    }
    pub fn start_read(&mut self, region: u8, offset: u64, len: u64) -> &mut Self {
        self.0.push(OP_START_READ);
        self.0.push(region);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.extend_from_slice(&len.to_le_bytes());
        self
    }
    pub fn drain(&mut self) -> &mut Self {
        self.0.push(OP_DRAIN);
        self
    }
}

/// A header of `kind` with the given fields (for the seed generator).
pub fn hdr(kind: FrameKind, region: u32, offset: u64, len: u64, id: u32) -> FrameHeader {
    FrameHeader {
        kind,
        region,
        offset,
        len,
        imm: None,
        id,
    }
}
