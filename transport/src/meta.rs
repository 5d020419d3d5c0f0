//! An endpoint's metadata: the versioned blob two endpoints exchange out of band before any
//! data moves (fabric kind, addresses, registered regions with their keys, capabilities).
//!
//! Layout (little-endian), ending in a CRC32C of everything before it:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `KVWM` |
//! | 2 | metadata version ([`META_VERSION`]) |
//! | 2 | wire protocol version ([`crate::PROTOCOL_VERSION`]) |
//! | 1 | fabric kind (1 tcp, 2 shm, 3 verbs) |
//! | 3 | reserved, zero |
//! | 4 | capability bits ([`Capabilities`]) |
//! | 2 | address count, then per address: 2-byte length + UTF-8 |
//! | 2 | region count, then per region: id u32, len u64, key u64, access u8 (bit 0 write, bit 1 read), 2-byte length + UTF-8 handle |
//! | 4 | CRC32C |
//!
//! Decoding never trusts a count or a length: each is checked against the bytes left and
//! the limits below before anything is allocated.

use crate::error::{Result, TransportError};
use crate::region::{Access, RegionId};

/// Version of this blob's layout.
pub const META_VERSION: u16 = 1;
/// Largest blob accepted.
pub const MAX_META_LEN: usize = 64 * 1024;
/// Largest address or handle string accepted.
pub const MAX_STRING_LEN: usize = 1024;
/// Most regions one endpoint may advertise.
pub const MAX_REGIONS: usize = 1024;
/// Most addresses one endpoint may advertise.
pub const MAX_ADDRS: usize = 64;

const MAGIC: [u8; 4] = *b"KVWM";

/// The fabric an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FabricKind {
    /// One-sided-write semantics over TCP sockets.
    Tcp,
    /// Shared memory between processes of one node.
    Shm,
    /// InfiniBand / RoCE verbs.
    Verbs,
}

impl FabricKind {
    /// The wire code.
    pub const fn code(self) -> u8 {
        match self {
            Self::Tcp => 1,
            Self::Shm => 2,
            Self::Verbs => 3,
        }
    }

    /// From the wire code.
    pub const fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Tcp),
            2 => Some(Self::Shm),
            3 => Some(Self::Verbs),
            _ => None,
        }
    }

    /// Lower-case name (`tcp`, `shm`, `verbs`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Verbs => "verbs",
        }
    }
}

impl std::str::FromStr for FabricKind {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            "verbs" => Ok(Self::Verbs),
            _ => Err(TransportError::Invalid(format!(
                "unknown fabric {s:?} (expected tcp, shm or verbs)"
            ))),
        }
    }
}

/// Capability bits an endpoint advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// One-sided writes with an immediate value.
    pub const WRITE_IMM: u32 = 1;
    /// One-sided reads.
    pub const READ: u32 = 2;
    /// Several data streams per connection.
    pub const MULTI_STREAM: u32 = 4;

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
}

/// One advertised region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDesc {
    /// The region's id at its endpoint.
    pub id: RegionId,
    /// Its length in bytes.
    pub len: u64,
    /// Fabric key (the rkey for verbs; 0 where unused).
    pub key: u64,
    /// What peers may do with it.
    pub access: Access,
    /// Fabric-specific handle (for shm, the path a peer opens to map it).
    pub handle: String,
}

/// An endpoint's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMeta {
    /// Wire protocol version of the endpoint.
    pub protocol_version: u16,
    /// Its fabric.
    pub fabric: FabricKind,
    /// What it can do.
    pub capabilities: Capabilities,
    /// Addresses (socket addresses, process ids, GIDs: fabric-specific strings).
    pub addrs: Vec<String>,
    /// Its registered regions.
    pub regions: Vec<RegionDesc>,
}

impl EndpointMeta {
    /// Serializes the blob.
    ///
    /// # Errors
    /// [`TransportError::Invalid`] if a string, a count or the whole blob exceeds the limits.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.addrs.len() > MAX_ADDRS || self.regions.len() > MAX_REGIONS {
            return Err(TransportError::Invalid(format!(
                "metadata holds {} addresses and {} regions (limits {MAX_ADDRS}, {MAX_REGIONS})",
                self.addrs.len(),
                self.regions.len()
            )));
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&META_VERSION.to_le_bytes());
        out.extend_from_slice(&self.protocol_version.to_le_bytes());
        out.push(self.fabric.code());
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.capabilities.0.to_le_bytes());
        out.extend_from_slice(&(self.addrs.len() as u16).to_le_bytes());
        for a in &self.addrs {
            put_str(&mut out, a)?;
        }
        out.extend_from_slice(&(self.regions.len() as u16).to_le_bytes());
        for r in &self.regions {
            out.extend_from_slice(&r.id.0.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            out.extend_from_slice(&r.key.to_le_bytes());
            out.push(u8::from(r.access.remote_write) | (u8::from(r.access.remote_read) << 1));
            put_str(&mut out, &r.handle)?;
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        if out.len() > MAX_META_LEN {
            return Err(TransportError::Invalid(format!(
                "metadata is {} bytes (limit {MAX_META_LEN})",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Parses a blob.
    ///
    /// # Errors
    /// [`TransportError::Protocol`] naming the first problem: size, magic, version, CRC,
    /// truncation, a bad count, string or fabric code; [`TransportError::VersionMismatch`] if
    /// the metadata layout is from another version.
    pub fn from_bytes(buf: &[u8]) -> Result<Self> {
        if buf.len() > MAX_META_LEN {
            return Err(bad(format!(
                "metadata blob of {} bytes exceeds {MAX_META_LEN}",
                buf.len()
            )));
        }
        if buf.len() < 24 {
            return Err(bad(format!(
                "metadata blob of {} bytes is truncated",
                buf.len()
            )));
        }
        if buf[..4] != MAGIC {
            return Err(bad("metadata blob has no KVWM magic".into()));
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != META_VERSION {
            return Err(TransportError::VersionMismatch {
                ours: META_VERSION,
                theirs: version,
            });
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(bad(format!(
                "metadata CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let mut r = Reader { buf: body, pos: 6 };
        let protocol_version = r.u16()?;
        let fabric = FabricKind::from_code(r.u8()?)
            .ok_or_else(|| bad(format!("unknown fabric code {}", buf[8])))?;
        if r.take(3)? != [0, 0, 0] {
            return Err(bad("metadata reserved bytes are not zero".into()));
        }
        let capabilities = Capabilities(r.u32()?);
        let n_addrs = r.u16()? as usize;
        if n_addrs > MAX_ADDRS {
            return Err(bad(format!("{n_addrs} addresses (limit {MAX_ADDRS})")));
        }
        let mut addrs = Vec::with_capacity(n_addrs);
        for _ in 0..n_addrs {
            addrs.push(r.string()?);
        }
        let n_regions = r.u16()? as usize;
        // Each region takes at least 23 bytes: a count the bytes cannot hold is refused
        // before the vector is sized from it.
        if n_regions > MAX_REGIONS || n_regions * 23 > r.left() {
            return Err(bad(format!(
                "{n_regions} regions in {} bytes (limit {MAX_REGIONS})",
                r.left()
            )));
        }
        let mut regions = Vec::with_capacity(n_regions);
        for _ in 0..n_regions {
            let id = RegionId(r.u32()?);
            let len = r.u64()?;
            let key = r.u64()?;
            let a = r.u8()?;
            if a & !3 != 0 {
                return Err(bad(format!(
                    "region {} has unknown access bits {a:#04x}",
                    id.0
                )));
            }
            let access = Access {
                remote_write: a & 1 != 0,
                remote_read: a & 2 != 0,
            };
            let handle = r.string()?;
            regions.push(RegionDesc {
                id,
                len,
                key,
                access,
                handle,
            });
        }
        if r.left() != 0 {
            return Err(bad(format!("{} stray bytes after the metadata", r.left())));
        }
        Ok(Self {
            protocol_version,
            fabric,
            capabilities,
            addrs,
            regions,
        })
    }

    /// The advertised region `id`.
    pub fn region(&self, id: RegionId) -> Option<&RegionDesc> {
        self.regions.iter().find(|r| r.id == id)
    }
}

fn bad(msg: String) -> TransportError {
    TransportError::Protocol(msg)
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > MAX_STRING_LEN {
        return Err(TransportError::Invalid(format!(
            "metadata string of {} bytes (limit {MAX_STRING_LEN})",
            s.len()
        )));
    }
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    const fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(bad(format!(
                "metadata truncated: {n} bytes needed at offset {}, {} left",
                self.pos,
                self.left()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        if n > MAX_STRING_LEN {
            return Err(bad(format!(
                "metadata string of {n} bytes (limit {MAX_STRING_LEN})"
            )));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad("metadata string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> EndpointMeta {
        EndpointMeta {
            protocol_version: 1,
            fabric: FabricKind::Shm,
            capabilities: Capabilities(Capabilities::WRITE_IMM | Capabilities::READ),
            addrs: vec!["127.0.0.1:4000".into(), "pid:77".into()],
            regions: vec![RegionDesc {
                id: RegionId(3),
                len: 1 << 26,
                key: 0xdead_beef,
                access: Access::ALL,
                handle: "/proc/77/fd/5".into(),
            }],
        }
    }

    #[test]
    fn roundtrips() {
        let m = sample();
        assert_eq!(EndpointMeta::from_bytes(&m.to_bytes().unwrap()).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_refused() {
        let b = sample().to_bytes().unwrap();
        for n in 0..b.len() {
            assert!(
                EndpointMeta::from_bytes(&b[..n]).is_err(),
                "truncated to {n}"
            );
        }
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(EndpointMeta::from_bytes(&c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn a_newer_layout_is_a_version_mismatch() {
        let mut b = sample().to_bytes().unwrap();
        b[4] = 9;
        assert!(matches!(
            EndpointMeta::from_bytes(&b),
            Err(TransportError::VersionMismatch { ours: 1, theirs: 9 })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = EndpointMeta::from_bytes(&b);
        }

        #[test]
        fn huge_counts_with_a_valid_crc_are_refused(n in 24u16..u16::MAX) {
            // A forged blob: valid header and CRC but a region count the bytes cannot hold.
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&META_VERSION.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
            b.push(1);
            b.extend_from_slice(&[0; 3]);
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            let crc = crc32c::crc32c(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            prop_assert!(EndpointMeta::from_bytes(&b).is_err());
        }
    }
}
