//! The `lmcache` profile: LMCache's CacheGen coder reproduced bit-exactly
//! (reference/cachegen.md §2.1-2.2).
//!
//! * [`cdf`]: the integer CDF of one (row, channel) over a chunk's tokens.
//! * [`range`]: the 32-bit range coder with 16-bit CDFs, one independent stream per
//!   (row, channel, 256-token group), MSB-first bits, bytes past the end read as zero.
//!
//! The `lmcache` level's blocks are assembled in `container::block`.

pub mod cdf;
pub mod range;
#[cfg(test)]
mod translit;
