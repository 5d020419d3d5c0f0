//! Little-endian byte and bit readers/writers for the container (bounds-checked, no panics).

use crate::error::DecodeError;

/// Reads fixed-width little-endian fields from a byte slice, reporting truncation exactly.
#[derive(Debug)]
pub(crate) struct ByteReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    pub(crate) const fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub(crate) const fn pos(&self) -> usize {
        self.pos
    }
    pub(crate) const fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u16s(&mut self, out: &mut [u16]) -> Result<(), DecodeError> {
        let b = self.take(out.len() * 2)?;
        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]);
        }
        Ok(())
    }
}

/// Packs fields of up to 32 bits, least significant bit first.
#[derive(Debug, Default)]
pub(crate) struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    pub(crate) fn put(&mut self, v: u32, bits: u32) {
        debug_assert!(bits <= 32 && (bits == 32 || v >> bits == 0));
        self.acc |= (v as u64) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// The bytes, the last one zero-padded.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Reads what [`BitWriter`] wrote.
#[derive(Debug)]
pub(crate) struct BitReader<'a> {
    buf: &'a [u8],
    bit: usize,
}

impl<'a> BitReader<'a> {
    pub(crate) const fn new(buf: &'a [u8]) -> Self {
        Self { buf, bit: 0 }
    }
    pub(crate) fn get(&mut self, bits: u32) -> Result<u32, DecodeError> {
        let end = self.bit + bits as usize;
        if end > self.buf.len() * 8 {
            return Err(DecodeError::Truncated {
                offset: self.bit / 8,
                needed: end.div_ceil(8) - self.buf.len(),
            });
        }
        let mut v = 0u32;
        for i in 0..bits as usize {
            let b = self.bit + i;
            v |= (((self.buf[b / 8] >> (b % 8)) & 1) as u32) << i;
        }
        self.bit = end;
        Ok(v)
    }
}

/// Bytes needed for `bits` bits.
pub(crate) const fn bytes_for_bits(bits: usize) -> usize {
    bits.div_ceil(8)
}
