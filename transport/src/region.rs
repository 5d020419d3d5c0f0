//! Pinned memory regions: mapped once, registered once with an endpoint, sliced per
//! transfer.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, RwLock};

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::error::{Result, TransportError};
use crate::raw::RawSpan;

/// A region's number inside its endpoint; the peer names the region by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u32);

/// How a region's pages are provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A private anonymous mapping (TCP and, later, verbs).
    Anonymous,
    /// A `memfd`, so a peer process on the same node can map the same pages (shared-memory
    /// fabric).
    Shared,
}

/// Options for [`Region::new`].
#[derive(Debug, Clone, Copy)]
pub struct RegionOptions {
    /// Anonymous or memfd-backed.
    pub backing: Backing,
    /// Try `mlock` (kept resident, never swapped); failing that (RLIMIT_MEMLOCK) the region
    /// is still usable and [`Region::is_locked`] says so.
    pub lock: bool,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) where the kernel offers them.
    pub huge_pages: bool,
}

impl Default for RegionOptions {
    fn default() -> Self {
        Self {
            backing: Backing::Anonymous,
            lock: true,
            huge_pages: true,
        }
    }
}

/// Pinned, pre-faulted memory that remote peers may write into or read from.
///
/// Its bytes are never borrowed as Rust references: remote writes land there while the
/// program runs (see the `raw` module). Local code moves bytes in and out with
/// [`Region::write_at`] and [`Region::read_at`], both bounds-checked.
pub struct Region {
    map: MmapRaw,
    file: Option<File>,
    locked: bool,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len())
            .field("shared", &self.file.is_some())
            .field("locked", &self.locked)
            .finish()
    }
}

impl Region {
    /// Maps `len` bytes (zeroed, pre-faulted), then locks them and asks for huge pages as
    /// `opts` says.
    ///
    /// # Errors
    /// [`TransportError::Invalid`] for `len == 0`; [`TransportError::Io`] if the mapping
    /// fails.
    pub fn new(len: usize, opts: RegionOptions) -> Result<Self> {
        if len == 0 {
            return Err(TransportError::Invalid(
                "a region needs at least one byte".into(),
            ));
        }
        let (map, file) = match opts.backing {
            Backing::Anonymous => {
                let m = MmapOptions::new()
                    .len(len)
                    .populate()
                    .map_anon()
                    .map_err(|e| TransportError::io("mmap of an anonymous region", e))?;
                (MmapRaw::from(m), None)
            }
            Backing::Shared => {
                let fd = rustix::fs::memfd_create("kvwire-region", rustix::fs::MemfdFlags::CLOEXEC)
                    .map_err(|e| TransportError::io("memfd_create", e.into()))?;
                let file = File::from(fd);
                file.set_len(len as u64)
                    .map_err(|e| TransportError::io("sizing a memfd region", e))?;
                let m = MmapOptions::new()
                    .len(len)
                    .populate()
                    .map_raw(&file)
                    .map_err(|e| TransportError::io("mmap of a memfd region", e))?;
                (m, Some(file))
            }
        };
        if opts.huge_pages {
            // Best effort: the kernel may not offer THP for this mapping kind.
            let _ = map.advise(Advice::HugePage);
        }
        let locked = opts.lock && map.lock().is_ok();
        Ok(Self { map, file, locked })
    }

    /// Maps a peer's memfd region, reached through `/proc/<pid>/fd/<fd>`, read-write.
    ///
    /// # Errors
    /// [`TransportError::Io`] if the file cannot be opened or is shorter than `len`.
    pub(crate) fn open_peer(path: &str, len: usize) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| TransportError::io("opening the peer's shared region", e))?;
        let have = file
            .metadata()
            .map_err(|e| TransportError::io("stat of the peer's shared region", e))?
            .len();
        if have < len as u64 || len == 0 {
            return Err(TransportError::Protocol(format!(
                "peer's shared region is {have} bytes, its metadata says {len}"
            )));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| TransportError::io("mmap of the peer's shared region", e))?;
        Ok(Self {
            map,
            file: Some(file),
            locked: false,
        })
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: regions have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Whether `mlock` succeeded.
    pub const fn is_locked(&self) -> bool {
        self.locked
    }

    /// The memfd behind a shared region.
    pub(crate) const fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Checks that `offset..offset + len` lies inside the region.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] otherwise.
    pub fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() as u64 => Ok(()),
            _ => Err(TransportError::OutOfBounds(format!(
                "{len} bytes at offset {offset} in a region of {} bytes",
                self.len()
            ))),
        }
    }

    /// The first byte of the mapping, for registering the region with an RDMA device (which
    /// then reads and writes it by DMA; the region outlives the registration, see `verbs`).
    #[cfg(feature = "verbs")]
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// A bounds-checked raw span of the region.
    pub(crate) fn span(&self, offset: u64, len: u64) -> Result<RawSpan<'_>> {
        self.check(offset, len)?;
        Ok(RawSpan::of_map(&self.map, offset, len).expect("range checked above"))
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] if it does not fit.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.span(offset, src.len() as u64)?.copy_from(src);
        Ok(())
    }

    /// Copies region bytes at `offset` into `dst`.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] if the range leaves the region.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.span(offset, dst.len() as u64)?.copy_to(dst);
        Ok(())
    }
}

/// A range of a registered region, owned (keeps the region alive).
#[derive(Debug, Clone)]
pub struct RegionSlice {
    /// The region.
    pub region: Arc<Region>,
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

impl RegionSlice {
    /// A checked slice of `region`.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] if the range leaves the region.
    pub fn new(region: Arc<Region>, offset: u64, len: u64) -> Result<Self> {
        region.check(offset, len)?;
        Ok(Self {
            region,
            offset,
            len,
        })
    }

    pub(crate) fn span(&self) -> RawSpan<'_> {
        self.region
            .span(self.offset, self.len)
            .expect("RegionSlice was bounds-checked at construction")
    }
}

/// What a remote peer may do with a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Peers may write into it.
    pub remote_write: bool,
    /// Peers may read from it.
    pub remote_read: bool,
}

impl Access {
    /// Writes and reads.
    pub const ALL: Self = Self {
        remote_write: true,
        remote_read: true,
    };
}

type Entries = HashMap<RegionId, (Arc<Region>, Access)>;

/// The regions an endpoint has registered, shared by its connections.
#[derive(Debug, Default, Clone)]
pub struct RegionTable {
    inner: Arc<RwLock<Entries>>,
}

impl RegionTable {
    /// Adds `region` under the next free id.
    pub fn register(&self, region: Arc<Region>, access: Access) -> RegionId {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let id = RegionId(
            (0..)
                .find(|i| !map.contains_key(&RegionId(*i)))
                .unwrap_or(0),
        );
        map.insert(id, (region, access));
        id
    }

    /// Removes a region; later remote accesses to it are refused.
    pub fn deregister(&self, id: RegionId) -> Option<Arc<Region>> {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&id).map(|(r, _)| r)
    }

    /// The region `id`.
    pub fn get(&self, id: RegionId) -> Option<(Arc<Region>, Access)> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.get(&id).cloned()
    }

    /// Every registered region, by id.
    pub fn entries(&self) -> Vec<(RegionId, Arc<Region>, Access)> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map
            .iter()
            .map(|(id, (r, a))| (*id, r.clone(), *a))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }

    /// Checks a remote access before any byte moves: the region exists, allows the access,
    /// and holds the whole range.
    ///
    /// # Errors
    /// [`TransportError::OutOfBounds`] naming what failed.
    pub fn check_remote(
        &self,
        id: RegionId,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Arc<Region>> {
        let (region, access) = self.get(id).ok_or_else(|| {
            TransportError::OutOfBounds(format!("region {} is not registered", id.0))
        })?;
        let allowed = if write {
            access.remote_write
        } else {
            access.remote_read
        };
        if !allowed {
            return Err(TransportError::OutOfBounds(format!(
                "region {} does not allow remote {}",
                id.0,
                if write { "writes" } else { "reads" }
            )));
        }
        region.check(offset, len).map_err(|e| match e {
            TransportError::OutOfBounds(m) => {
                TransportError::OutOfBounds(format!("region {}: {m}", id.0))
            }
            other => other,
        })?;
        Ok(region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_with_overflow_in_mind() {
        let r = Region::new(4096, RegionOptions::default()).unwrap();
        assert!(r.check(0, 4096).is_ok());
        assert!(r.check(4096, 0).is_ok());
        assert!(r.check(1, 4096).is_err());
        assert!(r.check(u64::MAX, 2).is_err());
        assert!(r.write_at(4090, &[1; 7]).is_err());
        r.write_at(4090, &[7; 6]).unwrap();
        let mut b = [0u8; 6];
        r.read_at(4090, &mut b).unwrap();
        assert_eq!(b, [7; 6]);
    }

    #[test]
    fn shared_regions_are_visible_through_a_second_mapping() {
        let r = Region::new(
            8192,
            RegionOptions {
                backing: Backing::Shared,
                ..RegionOptions::default()
            },
        )
        .unwrap();
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fd/{}", r.file().unwrap().as_raw_fd());
        let peer = Region::open_peer(&path, 8192).unwrap();
        peer.write_at(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        r.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(Region::open_peer(&path, 8193).is_err());
    }

    #[test]
    fn remote_checks_name_the_failure() {
        let t = RegionTable::default();
        let id = t.register(
            Arc::new(Region::new(100, RegionOptions::default()).unwrap()),
            Access {
                remote_write: true,
                remote_read: false,
            },
        );
        assert!(t.check_remote(id, 0, 100, true).is_ok());
        let e = t.check_remote(id, 0, 100, false).unwrap_err().to_string();
        assert!(e.contains("remote reads"), "{e}");
        let e = t.check_remote(id, 50, 51, true).unwrap_err().to_string();
        assert!(e.contains("51 bytes at offset 50"), "{e}");
        let e = t
            .check_remote(RegionId(9), 0, 1, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not registered"), "{e}");
    }
}
