//! Frames: a fixed 32-byte header, then (for some kinds) a payload of `len` bytes.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | kind ([`FrameKind`]) |
//! | 1 | flags (bit 0: `imm` is present; other bits zero) |
//! | 2 | reserved, zero |
//! | 4 | `region` (write, read), `status` (ack, read response) or close code |
//! | 8 | `offset` into the region |
//! | 8 | `len`: payload bytes that follow (for a read request: bytes requested, no payload) |
//! | 4 | `imm`, the immediate value of a write |
//! | 4 | `id`: request id (writes, reads and their answers) or stream index (join) |
//!
//! The header is parsed and checked on its own, before any payload byte is read, so a
//! payload is read straight into its destination (a registered region) or refused.

use crate::error::{Result, TransportError};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;
/// Largest two-sided message payload.
pub const MAX_MSG_LEN: u64 = 1 << 20;
/// Largest close-reason payload.
pub const MAX_REASON_LEN: u64 = 1024;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Handshake: magic, version, role, nonce.
    Hello,
    /// Handshake: token proof.
    Auth,
    /// Handshake: the endpoint's metadata blob.
    Meta,
    /// Handshake (acceptor to connector): the secret extra data streams join with.
    Ticket,
    /// First frame of an extra data stream: the ticket and the stream index.
    Join,
    /// One-sided write of `len` payload bytes into (`region`, `offset`).
    Write,
    /// A write was placed in the peer's region (`id`).
    WriteAck,
    /// One-sided read request of `len` bytes at (`region`, `offset`).
    Read,
    /// Answer to a read: `len` payload bytes.
    ReadResp,
    /// Two-sided message of `len` bytes.
    Msg,
    /// Connection end: close code in `region`, UTF-8 reason as payload.
    Close,
}

impl FrameKind {
    const fn code(self) -> u8 {
        match self {
            Self::Hello => 0x01,
            Self::Auth => 0x02,
            Self::Meta => 0x03,
            Self::Ticket => 0x04,
            Self::Join => 0x05,
            Self::Write => 0x10,
            Self::WriteAck => 0x11,
            Self::Read => 0x12,
            Self::ReadResp => 0x13,
            Self::Msg => 0x20,
            Self::Close => 0x30,
        }
    }

    const fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0x01 => Self::Hello,
            0x02 => Self::Auth,
            0x03 => Self::Meta,
            0x04 => Self::Ticket,
            0x05 => Self::Join,
            0x10 => Self::Write,
            0x11 => Self::WriteAck,
            0x12 => Self::Read,
            0x13 => Self::ReadResp,
            0x20 => Self::Msg,
            0x30 => Self::Close,
            _ => return None,
        })
    }

    /// Whether `len` counts payload bytes following the header (false only for reads).
    pub const fn has_payload(self) -> bool {
        !matches!(self, Self::Read | Self::WriteAck)
    }
}

/// Why a connection ended, carried by a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// Orderly end.
    Normal,
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// Token authentication failed.
    AuthFailed,
    /// A malformed or unexpected frame.
    ProtocolViolation,
    /// An access outside a registered region.
    OutOfBounds,
    /// The peers want different fabrics.
    FabricMismatch,
    /// The application gave up on the transfer.
    Aborted,
    /// A code this version does not know.
    Other(u32),
}

impl CloseCode {
    /// Wire value.
    pub const fn code(self) -> u32 {
        match self {
            Self::Normal => 0,
            Self::VersionMismatch => 1,
            Self::AuthFailed => 2,
            Self::ProtocolViolation => 3,
            Self::OutOfBounds => 4,
            Self::FabricMismatch => 5,
            Self::Aborted => 6,
            Self::Other(c) => c,
        }
    }

    /// From the wire value.
    pub const fn from_code(c: u32) -> Self {
        match c {
            0 => Self::Normal,
            1 => Self::VersionMismatch,
            2 => Self::AuthFailed,
            3 => Self::ProtocolViolation,
            4 => Self::OutOfBounds,
            5 => Self::FabricMismatch,
            6 => Self::Aborted,
            c => Self::Other(c),
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Kind.
    pub kind: FrameKind,
    /// Region, status or close code.
    pub region: u32,
    /// Offset into the region.
    pub offset: u64,
    /// Payload length (or requested length for reads).
    pub len: u64,
    /// Immediate value of a write.
    pub imm: Option<u32>,
    /// Request id or stream index.
    pub id: u32,
}

impl FrameHeader {
    /// A header of `kind` with every other field zero.
    pub const fn new(kind: FrameKind) -> Self {
        Self {
            kind,
            region: 0,
            offset: 0,
            len: 0,
            imm: None,
            id: 0,
        }
    }

    /// Serializes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind.code();
        b[1] = u8::from(self.imm.is_some());
        b[4..8].copy_from_slice(&self.region.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.imm.unwrap_or(0).to_le_bytes());
        b[28..32].copy_from_slice(&self.id.to_le_bytes());
        b
    }

    /// Parses and checks a header: known kind, no unknown flag, zero reserved bytes, and a
    /// payload length within the kind's limit (messages and close reasons are bounded here;
    /// writes and read answers are bounded by the region they target, checked later).
    ///
    /// # Errors
    /// [`TransportError::Protocol`] naming the problem.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self> {
        let kind = FrameKind::from_code(b[0])
            .ok_or_else(|| TransportError::Protocol(format!("unknown frame kind {:#04x}", b[0])))?;
        let flags = b[1];
        if flags & !1 != 0 || b[2] != 0 || b[3] != 0 {
            return Err(TransportError::Protocol(format!(
                "frame {kind:?} has unknown flags {flags:#04x} or nonzero reserved bytes"
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let imm_raw = u32_at(24);
        if flags & 1 == 0 && imm_raw != 0 {
            return Err(TransportError::Protocol(
                "immediate bytes set without the flag".into(),
            ));
        }
        if flags & 1 != 0 && kind != FrameKind::Write {
            return Err(TransportError::Protocol(format!(
                "frame {kind:?} cannot carry an immediate"
            )));
        }
        let h = Self {
            kind,
            region: u32_at(4),
            offset: u64_at(8),
            len: u64_at(16),
            imm: (flags & 1 != 0).then_some(imm_raw),
            id: u32_at(28),
        };
        let limit = match kind {
            FrameKind::Hello => Some(super::handshake::HELLO_LEN as u64),
            FrameKind::Auth => Some(super::handshake::PROOF_LEN as u64),
            FrameKind::Ticket | FrameKind::Join => Some(super::handshake::TICKET_LEN as u64),
            FrameKind::Meta => Some(crate::meta::MAX_META_LEN as u64),
            FrameKind::Msg => Some(MAX_MSG_LEN),
            FrameKind::Close => Some(MAX_REASON_LEN),
            FrameKind::Write | FrameKind::ReadResp | FrameKind::Read | FrameKind::WriteAck => None,
        };
        if let Some(limit) = limit {
            if h.len > limit {
                return Err(TransportError::Protocol(format!(
                    "frame {kind:?} announces {} payload bytes (limit {limit})",
                    h.len
                )));
            }
        }
        if kind == FrameKind::WriteAck && h.len != 0 {
            return Err(TransportError::Protocol("write ack with a length".into()));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_rejections() {
        let h = FrameHeader {
            kind: FrameKind::Write,
            region: 2,
            offset: 77,
            len: 1 << 20,
            imm: Some(0xabcd),
            id: 9,
        };
        assert_eq!(FrameHeader::parse(&h.to_bytes()).unwrap(), h);
        let mut b = h.to_bytes();
        b[0] = 0x7f;
        assert!(FrameHeader::parse(&b).is_err());
        let mut b = h.to_bytes();
        b[2] = 1;
        assert!(FrameHeader::parse(&b).is_err());
        let mut m = FrameHeader::new(FrameKind::Msg);
        m.len = MAX_MSG_LEN + 1;
        assert!(FrameHeader::parse(&m.to_bytes()).is_err());
        m.len = MAX_MSG_LEN;
        assert!(FrameHeader::parse(&m.to_bytes()).is_ok());
        let mut r = FrameHeader::new(FrameKind::Read);
        r.imm = Some(1);
        assert!(FrameHeader::parse(&r.to_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_reserializes(b in proptest::array::uniform32(any::<u8>())) {
            if let Ok(h) = FrameHeader::parse(&b) {
                prop_assert_eq!(h.to_bytes(), b);
            }
        }
    }
}
