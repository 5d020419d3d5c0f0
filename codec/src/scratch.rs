//! Per-thread scratch buffers, reused from block to block.
//!
//! A block's working buffers (symbols, rANS words) are a few hundred KiB: above glibc's mmap
//! threshold, so a fresh `Vec` per block would map, fault in and unmap new pages every time,
//! which costs more than the coding. Each thread keeps one buffer of each kind instead. A
//! nested user of the same kind simply gets a new buffer (correct, just not reused).

use std::cell::RefCell;

thread_local! {
    static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static WORDS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's byte buffer, `len` long. Its contents are unspecified (what an
/// earlier user left, zeros where it grew): every user writes what it reads, and zero-filling
/// a block's worth of scratch per block measurably slowed the coder.
pub(crate) fn with_bytes<R>(len: usize, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut v = BYTES.with(|c| c.take());
    v.resize(len, 0);
    let r = f(&mut v);
    BYTES.with(|c| *c.borrow_mut() = v);
    r
}

/// Runs `f` with this thread's word buffer, as left by its last user (capacity and contents
/// kept; each user sets the length and contents it needs).
pub(crate) fn with_words<R>(f: impl FnOnce(&mut Vec<u16>) -> R) -> R {
    let mut v = WORDS.with(|c| c.take());
    let r = f(&mut v);
    WORDS.with(|c| *c.borrow_mut() = v);
    r
}
