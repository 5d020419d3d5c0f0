//! Every `unsafe` of the crate: copies to and from mapped region memory, the socket
//! syscalls that read into / write from it, and the zeroed allocation of received caches.
//!
//! Region memory is treated like memory a NIC can DMA into: it is shared with the kernel
//! (socket I/O lands there directly) and, for the shared-memory fabric, with another
//! process. Rust code therefore never holds a reference into it; every access is a raw copy
//! through a pointer that [`crate::Region`] has bounds-checked first. The functions here take
//! a [`RawSpan`], which can only be built by a region's bounds check.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// A bounds-checked span of mapped memory: `len` bytes at `ptr`, inside a live mapping.
///
/// Invariant: `ptr..ptr + len` lies inside a mapping owned by a `Region` that outlives this
/// value (the region hands spans out only borrowed from `&self`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawSpan<'a> {
    ptr: *mut u8,
    len: usize,
    _region: std::marker::PhantomData<&'a ()>,
}

impl<'a> RawSpan<'a> {
    /// The span `offset..offset + len` of `map`, or `None` if it leaves the mapping.
    pub(crate) fn of_map(map: &'a memmap2::MmapRaw, offset: u64, len: u64) -> Option<Self> {
        let end = offset.checked_add(len)?;
        if end > map.len() as u64 {
            return None;
        }
        Some(Self {
            // SAFETY: `offset <= end <= map.len()`, so the result stays inside (or one past
            // the end of) the mapping, which lives for 'a.
            ptr: unsafe { map.as_mut_ptr().add(offset as usize) },
            len: len as usize,
            _region: std::marker::PhantomData,
        })
    }

    /// Copies `src` into the span (lengths must match).
    pub(crate) fn copy_from(&self, src: &[u8]) {
        assert_eq!(src.len(), self.len, "RawSpan::copy_from length");
        // SAFETY: the span is inside a live mapping (type invariant) and `src` is a valid
        // slice of the same length; region memory is never borrowed as a Rust reference, so
        // `src` cannot overlap a reference we invalidate (it may point into another mapping).
        unsafe { std::ptr::copy(src.as_ptr(), self.ptr, self.len) };
    }

    /// Copies the span into `dst` (lengths must match).
    pub(crate) fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len, "RawSpan::copy_to length");
        // SAFETY: as in `copy_from`, with the roles swapped; `dst` is an exclusive borrow of
        // ordinary memory, which no mapping of ours aliases.
        unsafe { std::ptr::copy(self.ptr, dst.as_mut_ptr(), self.len) };
    }

    /// Copies `src` (another region's span, possibly in a peer's mapping) into this span.
    pub(crate) fn copy_from_span(&self, src: RawSpan<'_>) {
        assert_eq!(src.len, self.len, "RawSpan::copy_from_span length");
        // SAFETY: both spans lie inside live mappings (type invariant); `ptr::copy` allows
        // overlap.
        unsafe { std::ptr::copy(src.ptr, self.ptr, self.len) };
    }

    /// The span as 64-bit atomics (for rings shared between processes).
    ///
    /// # Panics
    /// If the span is not 8-byte aligned or its length not a multiple of 8 (ring layouts
    /// are fixed by the crate, so this is a bug, not an input error).
    pub(crate) fn atomic_u64s(&self) -> &'a [AtomicU64] {
        assert!(
            self.ptr as usize % 8 == 0 && self.len % 8 == 0,
            "ring span alignment"
        );
        // SAFETY: aligned and in bounds (checked above, type invariant), the mapping lives
        // for 'a. Every access to ring memory, in this process and in the peer's, goes
        // through atomics, so handing out shared references to atomics creates no data race.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU64>(), self.len / 8) }
    }

    /// The first 4 bytes of the span as an atomic (a futex word).
    ///
    /// # Panics
    /// If the span is shorter than 4 bytes or misaligned.
    pub(crate) fn atomic_u32(&self) -> &'a AtomicU32 {
        assert!(
            self.ptr as usize % 4 == 0 && self.len >= 4,
            "futex word alignment"
        );
        // SAFETY: as in `atomic_u64s`: aligned, in bounds, only ever accessed atomically.
        unsafe { &*self.ptr.cast::<AtomicU32>() }
    }

    /// Reads from `fd` until the span is full; `UnexpectedEof` if the stream ends first.
    pub(crate) fn read_from_fd(&self, fd: &impl AsRawFd) -> io::Result<()> {
        let mut done = 0;
        while done < self.len {
            // SAFETY: `ptr + done .. ptr + len` is inside the live mapping (type invariant);
            // the kernel writes at most `len - done` bytes there. No Rust reference to this
            // memory exists.
            let n =
                unsafe { libc::read(fd.as_raw_fd(), self.ptr.add(done).cast(), self.len - done) };
            match progress(
                n,
                io::ErrorKind::UnexpectedEof,
                "stream ended inside a payload",
            )? {
                Some(n) => done += n,
                None => continue,
            }
        }
        Ok(())
    }

    /// Writes `head` and then the span to `fd`, fully, with as few syscalls as the kernel
    /// allows (`writev`): the payload goes from the region to the socket without a copy.
    pub(crate) fn write_to_fd_after(&self, fd: &impl AsRawFd, head: &[u8]) -> io::Result<()> {
        let total = head.len() + self.len;
        let mut done = 0usize;
        while done < total {
            let (h_off, p_off) = if done < head.len() {
                (done, 0)
            } else {
                (head.len(), done - head.len())
            };
            let iov = [
                libc::iovec {
                    iov_base: head[h_off..].as_ptr() as *mut libc::c_void,
                    iov_len: head.len() - h_off,
                },
                libc::iovec {
                    // SAFETY: `p_off <= len`, so the pointer stays inside (or one past) the
                    // live mapping (type invariant).
                    iov_base: unsafe { self.ptr.add(p_off) }.cast(),
                    iov_len: self.len - p_off,
                },
            ];
            // SAFETY: both iovecs describe readable memory: a live slice and a span of a live
            // mapping; the kernel only reads them.
            let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) };
            match progress(n, io::ErrorKind::WriteZero, "socket took no bytes")? {
                Some(n) => done += n,
                None => continue,
            }
        }
        Ok(())
    }
}

/// `len` zero bytes in a `Vec`, fallibly, from the allocator's zeroed path: a large request is
/// a fresh anonymous mapping the kernel zeroes on first touch, so nothing is written now. Where
/// the kernel grants transparent huge pages on request (`madvise` mode), the 2 MiB-aligned
/// interior is advised to use them, so that filling it costs one fault per 2 MiB rather than
/// per 4 KiB. `None` if the memory is not available.
pub(crate) fn zeroed_vec(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) & !(HUGE - 1);
        if end > start {
            // SAFETY: `start..end` lies inside the allocation just made; the advice changes
            // how the kernel backs those pages, never their contents (they stay zero), and a
            // failure (no THP support) is harmless and ignored.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of a `Vec<u8>` of
    // capacity `len` (size `len`, align 1), and all `len` bytes are initialized (zero).
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// The bytes a `read`/`writev` returning `n` moved: `None` to retry (interrupted), an error
/// of `zero_kind` when it moved nothing (the peer ended the stream).
fn progress(n: isize, zero_kind: io::ErrorKind, zero_msg: &str) -> io::Result<Option<usize>> {
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            }
        }
        0 => Err(io::Error::new(zero_kind, zero_msg.to_owned())),
        n => Ok(Some(n as usize)),
    }
}

// SAFETY: a span is a pointer into a mapping plus a length; it carries no thread-affine
// state, and all accesses through it are raw copies (see the module doc).
unsafe impl Send for RawSpan<'_> {}
// SAFETY: as for `Send`: shared spans only allow raw copies.
unsafe impl Sync for RawSpan<'_> {}
