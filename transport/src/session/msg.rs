//! The session's own messages, carried by the link's two-sided messages.
//!
//! | tag | message | fields |
//! |---|---|---|
//! | 1 | `Begin` | the codec header of the transfer (shape, dtype, layout, level, bins) |
//! | 2 | `Ready` | receive region id u32, slot size u64, slot count u16 |
//! | 3 | `Grant` | count u16, then that many slot indices u16: slots the sender may write |
//! | 4 | `Complete` | blocks decoded u32, receiver's first-block-to-last-decode time in ns u64 |
//! | 5 | `Abort` | UTF-8 reason |
//! | 6 | `BeginLevels` | count u8 (1..=8), then per candidate level: length u32 + codec header; each block then starts with a one-byte index into this list |
//! | 7 | `ReadyRates` | as `Ready`, then host id u64 (0: unknown; equal ids: both ends share one machine's cores), then count u8 (0..=16) of (level code u8, decode bytes/s u64): the receiver's measured decode speed over all its threads; the code's top bit ([`TABLES_READY`]) says the level's model tables are already built there |
//! | 8 | `Prepare` | candidate index u8: the sender is about to send this level's first block; the receiver may build its model tables now (sent only to a receiver that set [`ACCEPTS_PREPARE`] on the level's code) |
//!
//! Every message starts with the byte `S` and the tag; parsing checks each length against
//! the bytes present and the limits here.

use crate::error::{Result, TransportError};

/// Largest codec header a `Begin` may carry.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Most slots a receiver offers (the immediate holds a slot index in 8 bits).
pub const MAX_SLOTS: u16 = 256;
/// Longest abort reason.
pub const MAX_REASON: usize = 1024;
/// Most candidate levels a `BeginLevels` announces.
pub const MAX_LEVELS: usize = 8;
/// Set in a `ReadyRates` level code: the receiver has that level's model tables built (a
/// first block of it costs no setup there). Level codes stay below [`ACCEPTS_PREPARE`].
pub const TABLES_READY: u8 = 0x80;

/// Set in a `ReadyRates` level code: the receiver accepts `Prepare` (tag 8) for that level; a
/// sender sends it to no receiver that did not say so (one older than the message).
pub const ACCEPTS_PREPARE: u8 = 0x40;

/// The level code in a `ReadyRates` entry, its flags cleared.
pub const LEVEL_CODE: u8 = 0x3f;

/// Most decode rates a `ReadyRates` reports.
pub const MAX_RATES: usize = 16;

/// A session message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionMsg {
    /// Sender -> receiver: a transfer starts; its codec header.
    Begin {
        /// Serialized `kvwire_codec::Header`.
        header: Vec<u8>,
    },
    /// Receiver -> sender: where the blocks go.
    Ready {
        /// The receive region.
        region: u32,
        /// Bytes per slot (the largest block accepted).
        slot_size: u64,
        /// Slots in the region.
        slots: u16,
    },
    /// Receiver -> sender: these slots are free to write.
    Grant {
        /// Slot indices.
        slots: Vec<u16>,
    },
    /// Receiver -> sender: every block arrived, passed its CRC and decoded.
    Complete {
        /// Blocks decoded.
        blocks: u32,
        /// Receiver-side time from the first block landing to the last one decoded.
        decode_ns: u64,
    },
    /// Either way: the transfer is abandoned, and why.
    Abort {
        /// Why.
        reason: String,
    },
    /// Sender -> receiver: a transfer whose blocks may use any of several levels; each
    /// block starts with one byte, the index of its level's header here.
    BeginLevels {
        /// Serialized `kvwire_codec::Header`s, one per candidate level (same spec and chunking).
        headers: Vec<Vec<u8>>,
    },
    /// Receiver -> sender, answering `BeginLevels`: `Ready` plus the receiver's decode speed.
    ReadyRates {
        /// The receive region.
        region: u32,
        /// Bytes per slot (the largest block accepted, its level byte included).
        slot_size: u64,
        /// Slots in the region.
        slots: u16,
        /// The receiver's host (a hash of the kernel's boot id; 0: unknown): a sender with
        /// the same id shares its cores with the receiver.
        host: u64,
        /// (level code, input bytes/s decoded over all the receiver's threads).
        decode_rates: Vec<(u8, u64)>,
    },
    /// Sender -> receiver, in a `BeginLevels` transfer: the first block of this candidate
    /// follows soon; its model tables may be built now, while the sender builds its own,
    /// rather than after the block arrives.
    Prepare {
        /// Index into the `BeginLevels` headers.
        index: u8,
    },
}

impl SessionMsg {
    /// Serializes the message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![b'S'];
        match self {
            Self::Begin { header } => {
                out.push(1);
                out.extend_from_slice(header);
            }
            Self::Ready {
                region,
                slot_size,
                slots,
            } => {
                out.push(2);
                out.extend_from_slice(&region.to_le_bytes());
                out.extend_from_slice(&slot_size.to_le_bytes());
                out.extend_from_slice(&slots.to_le_bytes());
            }
            Self::Grant { slots } => {
                out.push(3);
                out.extend_from_slice(&(slots.len() as u16).to_le_bytes());
                for s in slots {
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
            Self::Complete { blocks, decode_ns } => {
                out.push(4);
                out.extend_from_slice(&blocks.to_le_bytes());
                out.extend_from_slice(&decode_ns.to_le_bytes());
            }
            Self::Abort { reason } => {
                out.push(5);
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
            Self::BeginLevels { headers } => {
                out.push(6);
                out.push(headers.len().min(MAX_LEVELS) as u8);
                for h in headers.iter().take(MAX_LEVELS) {
                    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
                    out.extend_from_slice(h);
                }
            }
            Self::ReadyRates {
                region,
                slot_size,
                slots,
                host,
                decode_rates,
            } => {
                out.push(7);
                out.extend_from_slice(&region.to_le_bytes());
                out.extend_from_slice(&slot_size.to_le_bytes());
                out.extend_from_slice(&slots.to_le_bytes());
                out.extend_from_slice(&host.to_le_bytes());
                out.push(decode_rates.len().min(MAX_RATES) as u8);
                for (code, rate) in decode_rates.iter().take(MAX_RATES) {
                    out.push(*code);
                    out.extend_from_slice(&rate.to_le_bytes());
                }
            }
            Self::Prepare { index } => {
                out.push(8);
                out.push(*index);
            }
        }
        out
    }

    /// Parses a message.
    ///
    /// # Errors
    /// [`TransportError::Protocol`] for anything malformed.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| TransportError::Protocol(format!("session message: {m}"));
        if b.len() < 2 || b[0] != b'S' {
            return Err(bad("not a session message"));
        }
        let body = &b[2..];
        let fixed = |n: usize| {
            if body.len() == n {
                Ok(())
            } else {
                Err(bad(&format!(
                    "tag {} needs {n} bytes, has {}",
                    b[1],
                    body.len()
                )))
            }
        };
        Ok(match b[1] {
            1 => {
                if body.is_empty() || body.len() > MAX_HEADER_LEN {
                    return Err(bad(&format!("codec header of {} bytes", body.len())));
                }
                Self::Begin {
                    header: body.to_vec(),
                }
            }
            2 => {
                fixed(14)?;
                let slots = u16::from_le_bytes([body[12], body[13]]);
                if slots == 0 || slots > MAX_SLOTS {
                    return Err(bad(&format!("{slots} slots (1 to {MAX_SLOTS})")));
                }
                Self::Ready {
                    region: u32::from_le_bytes(body[0..4].try_into().expect("4 bytes")),
                    slot_size: u64::from_le_bytes(body[4..12].try_into().expect("8 bytes")),
                    slots,
                }
            }
            3 => {
                if body.len() < 2 {
                    return Err(bad("grant without a count"));
                }
                let n = u16::from_le_bytes([body[0], body[1]]);
                if n > MAX_SLOTS {
                    return Err(bad(&format!("grant of {n} slots")));
                }
                fixed(2 + 2 * n as usize)?;
                Self::Grant {
                    slots: body[2..]
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                }
            }
            4 => {
                fixed(12)?;
                Self::Complete {
                    blocks: u32::from_le_bytes(body[0..4].try_into().expect("4 bytes")),
                    decode_ns: u64::from_le_bytes(body[4..12].try_into().expect("8 bytes")),
                }
            }
            5 => {
                if body.len() > MAX_REASON {
                    return Err(bad("abort reason too long"));
                }
                Self::Abort {
                    reason: String::from_utf8(body.to_vec())
                        .map_err(|_| bad("abort reason is not UTF-8"))?,
                }
            }
            6 => {
                let (&n, mut rest) = body.split_first().ok_or_else(|| bad("no level count"))?;
                if n == 0 || usize::from(n) > MAX_LEVELS {
                    return Err(bad(&format!("{n} levels (1 to {MAX_LEVELS})")));
                }
                let mut headers = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    if rest.len() < 4 {
                        return Err(bad("truncated level header length"));
                    }
                    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                    rest = &rest[4..];
                    if len == 0 || len > MAX_HEADER_LEN || len > rest.len() {
                        return Err(bad(&format!("level header of {len} bytes")));
                    }
                    headers.push(rest[..len].to_vec());
                    rest = &rest[len..];
                }
                if !rest.is_empty() {
                    return Err(bad("bytes after the level headers"));
                }
                Self::BeginLevels { headers }
            }
            7 => {
                if body.len() < 23 {
                    return Err(bad("short ReadyRates"));
                }
                let n = usize::from(body[22]);
                if n > MAX_RATES {
                    return Err(bad(&format!("{n} decode rates")));
                }
                fixed(23 + 9 * n)?;
                let slots = u16::from_le_bytes([body[12], body[13]]);
                if slots == 0 || slots > MAX_SLOTS {
                    return Err(bad(&format!("{slots} slots (1 to {MAX_SLOTS})")));
                }
                Self::ReadyRates {
                    region: u32::from_le_bytes(body[0..4].try_into().expect("4 bytes")),
                    slot_size: u64::from_le_bytes(body[4..12].try_into().expect("8 bytes")),
                    slots,
                    host: u64::from_le_bytes(body[14..22].try_into().expect("8 bytes")),
                    decode_rates: body[23..]
                        .chunks_exact(9)
                        .map(|c| {
                            (
                                c[0],
                                u64::from_le_bytes(c[1..9].try_into().expect("8 bytes")),
                            )
                        })
                        .collect(),
                }
            }
            8 => {
                fixed(1)?;
                Self::Prepare { index: body[0] }
            }
            t => return Err(bad(&format!("unknown tag {t}"))),
        })
    }
}

/// The immediate of a block write: slot (8 bits), layer (12 bits), chunk (12 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockImm {
    /// Receive slot.
    pub slot: u16,
    /// Layer.
    pub layer: u32,
    /// Chunk within the layer.
    pub chunk: u32,
}

/// Most layers the immediate can name.
pub const MAX_LAYERS: usize = 1 << 12;
/// Most chunks per layer the immediate can name.
pub const MAX_CHUNKS: usize = 1 << 12;

impl BlockImm {
    /// Packs into 32 bits (fits a verbs immediate).
    pub const fn pack(self) -> u32 {
        ((self.slot as u32 & 0xff) << 24) | ((self.layer & 0xfff) << 12) | (self.chunk & 0xfff)
    }

    /// Unpacks.
    pub const fn unpack(v: u32) -> Self {
        Self {
            slot: (v >> 24) as u16,
            layer: (v >> 12) & 0xfff,
            chunk: v & 0xfff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrips() {
        for m in [
            SessionMsg::Begin {
                header: vec![1, 2, 3],
            },
            SessionMsg::Ready {
                region: 3,
                slot_size: 1 << 22,
                slots: 16,
            },
            SessionMsg::Grant {
                slots: vec![0, 5, 255],
            },
            SessionMsg::Complete {
                blocks: 9,
                decode_ns: 123,
            },
            SessionMsg::Abort {
                reason: "CRC".into(),
            },
            SessionMsg::BeginLevels {
                headers: vec![vec![1, 2], vec![3]],
            },
            SessionMsg::ReadyRates {
                region: 1,
                slot_size: 99,
                slots: 4,
                host: 7,
                decode_rates: vec![(0, 1 << 40), (4 | TABLES_READY, 250_000_000)],
            },
            SessionMsg::Prepare { index: 3 },
        ] {
            assert_eq!(SessionMsg::from_bytes(&m.to_bytes()).unwrap(), m);
        }
        let i = BlockImm {
            slot: 255,
            layer: 4095,
            chunk: 17,
        };
        assert_eq!(BlockImm::unpack(i.pack()), i);
    }

    #[test]
    fn malformed_messages_are_refused() {
        for b in [
            &b""[..],
            b"S",
            b"X\x01abc",
            b"S\x01",
            b"S\x02\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            b"S\x03\x02\x00\x01\x00",
            b"S\x04\0\0",
            b"S\x09",
            b"S\x05\xff",
            b"S\x06\x00",
            b"S\x06\x01\x05\x00\x00\x00ab",
            b"S\x06\x01\x01\x00\x00\x00ab",
            b"S\x07\0\0\0\0\0\0\0\0\0\0\0\0\x01\x00\x01",
            b"S\x07\0\0\0\0\0\0\0\0\0\0\0\0\x01\x00\0\0\0\0\0\0\0\0\x01",
            b"S\x08",
            b"S\x08\x01\x02",
        ] {
            assert!(SessionMsg::from_bytes(b).is_err(), "{b:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = SessionMsg::from_bytes(&b);
        }
    }
}
