//! Helpers shared by the kvwire-codec fuzz targets and the seed generator; the transport
//! targets' helpers are in [`transport`].

use std::sync::OnceLock;

pub mod transport;

use kvwire_codec::{
    DType, EncodeOptions, Encoder, Header, KvCache, KvShape, KvSpec, Layout, Level,
};

/// Inputs whose header claims more output than this are skipped (see README.md: a lossy file
/// that passes `Header::min_encoded_len` may still decode to ~0.47·chunk_tokens·dtype_size
/// times its own size, so even a small input could make `decode` allocate gigabytes).
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

pub const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];
pub const LAYOUTS: [Layout; 2] = [Layout::Hf, Layout::Vllm];

/// Whether `decode(buf)` could allocate more than [`MAX_OUTPUT_BYTES`]: the header parses,
/// claims a big cache, and the input is long enough to pass the decoder's
/// `min_encoded_len` check (shorter files are refused before anything is allocated).
///
/// `KVWIRE_FUZZ_NO_SIZE_GUARD=1` turns the guard off (to reproduce the allocation, e.g. with
/// `fuzz/regressions/decode_file/lossy-header-claims-2tib`).
pub fn too_big(buf: &[u8]) -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| env_flag("KVWIRE_FUZZ_NO_SIZE_GUARD")) {
        return false;
    }
    match Header::read(buf) {
        Ok((h, _)) => {
            h.spec.byte_len() > MAX_OUTPUT_BYTES && buf.len() as u64 >= h.min_encoded_len()
        }
        Err(_) => false,
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v != "0")
}

/// A cursor over fuzz input bytes that yields zeros once exhausted.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn remaining(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or(&[])
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Recomputes the header CRC and the CRC of every block that lies wholly inside `buf`, so that
/// mutated bytes reach the payload decoders instead of being stopped by a checksum. Follows
/// `codec/FORMAT.md`: header = 32 fixed bytes + 2·layers bins bytes + CRC32C; block = "KVWB",
/// layer, token_start, tokens, payload_len (u32 LE each), CRC32C(bytes 4..20 ‖ payload),
/// payload.
pub fn reseal(buf: &mut [u8]) {
    let Some(layers) = le32(buf, 8) else { return };
    let Some(hl) = (layers as usize).checked_mul(2).and_then(|x| x.checked_add(32)) else {
        return;
    };
    if hl + 4 > buf.len() {
        return;
    }
    let crc = crc32c::crc32c(&buf[..hl]);
    buf[hl..hl + 4].copy_from_slice(&crc.to_le_bytes());
    let mut pos = hl + 4;
    while let Some(end) = reseal_block(&mut buf[pos..]) {
        pos += end;
    }
}

/// Reseals the block at the start of `buf`; returns its length, or `None` if it does not fit.
pub fn reseal_block(buf: &mut [u8]) -> Option<usize> {
    if buf.get(0..4)? != b"KVWB" {
        return None;
    }
    let plen = le32(buf, 16)? as usize;
    let end = 24usize.checked_add(plen)?;
    if end > buf.len() {
        return None;
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[4..20]), &buf[24..end]);
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
    Some(end)
}

/// One encode/decode case derived from fuzz input (see `decode_mutated`).
#[derive(Debug)]
pub struct Case {
    pub spec: KvSpec,
    pub opts: EncodeOptions,
    /// 0: small integers / 8; 1: raw f32 bits (NaN, inf, huge, subnormal); 2: small with
    /// outliers.
    pub value_mode: u8,
    /// Recompute checksums after mutating.
    pub reseal: bool,
    pub mutations: Vec<Mutation>,
}

#[derive(Debug, Clone, Copy)]
pub enum Mutation {
    /// Flip bit `bit` of byte `pos` (modulo the length).
    Flip { pos: u16, bit: u8 },
    /// Overwrite byte `pos` with `val`.
    Set { pos: u16, val: u8 },
    /// Overwrite 4 bytes at `pos` with `val` (LE), e.g. a length or shape field.
    Set32 { pos: u16, val: u32 },
    /// Truncate to `len` (modulo the length).
    Truncate { len: u16 },
    /// Remove `n` bytes at `pos`.
    Delete { pos: u16, n: u8 },
    /// Insert `n` copies of `val` at `pos`.
    Insert { pos: u16, n: u8, val: u8 },
    /// Append `n` bytes `val`.
    Append { n: u8, val: u8 },
}

impl Case {
    /// Reads a case from the first bytes of `b` (13 + 8·mutations bytes; zeros past the end).
    pub fn read(b: &mut Bytes<'_>) -> Self {
        let level = Level::ALL[b.u8() as usize % Level::ALL.len()];
        let shape = KvShape::new(
            1 + b.u8() as usize % 3,
            1 + b.u8() as usize % 3,
            1 + b.u8() as usize % 64,
            1 + b.u8() as usize % 16,
        );
        let f = b.u8();
        let spec = KvSpec {
            shape,
            layout: LAYOUTS[(f & 1) as usize],
            dtype: DTYPES[(f >> 1) as usize % 3],
        };
        // 1..=72: sometimes more than the tokens (one block per layer).
        let chunk_tokens = 1 + b.u8() as usize % 72;
        let g = b.u8();
        let channel_scale_k = g & 1 != 0 && !matches!(level, Level::Raw | Level::Lmcache);
        let value_mode = (g >> 1) % 3;
        let reseal = g & 0x80 != 0;
        let nmut = b.u8() as usize % 8;
        let mut mutations = Vec::with_capacity(nmut);
        for _ in 0..nmut {
            let kind = b.u8();
            let pos = b.u16();
            let x = b.u32();
            let [v0, v1, ..] = x.to_le_bytes();
            mutations.push(match kind % 8 {
                0 | 1 => Mutation::Flip { pos, bit: v0 % 8 },
                2 => Mutation::Set { pos, val: v0 },
                3 => Mutation::Set32 { pos, val: x },
                4 => Mutation::Truncate { len: pos },
                5 => Mutation::Delete { pos, n: 1 + v0 % 32 },
                6 => Mutation::Insert { pos, n: 1 + v0 % 32, val: v1 },
                _ => Mutation::Append { n: 1 + v0 % 64, val: v1 },
            });
        }
        Self {
            spec,
            opts: EncodeOptions {
                level,
                chunk_tokens,
                channel_scale_k,
            },
            value_mode,
            reseal,
            mutations,
        }
    }

    /// The cache, its values taken from `vals` (cycled; zeros if empty).
    pub fn cache(&self, vals: &[u8]) -> KvCache {
        let get = |i: usize| -> u8 {
            if vals.is_empty() {
                0
            } else {
                vals[i % vals.len()]
            }
        };
        match self.value_mode {
            0 => KvCache::from_fn(self.spec, |i| (get(i) as i8) as f32 / 8.0),
            1 => KvCache::from_fn(self.spec, |i| {
                f32::from_bits(u32::from_le_bytes([
                    get(4 * i),
                    get(4 * i + 1),
                    get(4 * i + 2),
                    get(4 * i + 3),
                ]))
            }),
            _ => KvCache::from_fn(self.spec, |i| {
                let m = (get(2 * i) as i8) as f32;
                let e = get(2 * i + 1);
                // Mostly small, sometimes an outlier of up to 2^31 or a tiny value.
                let p = if e & 0xE0 == 0 { e as i32 - 16 } else { -4 };
                m * 2f32.powi(p)
            }),
        }
    }
}

/// Applies `m` to `buf`.
pub fn mutate(buf: &mut Vec<u8>, m: Mutation) {
    if buf.is_empty() {
        return;
    }
    let at = |p: u16, len: usize| p as usize % len;
    match m {
        Mutation::Flip { pos, bit } => {
            let i = at(pos, buf.len());
            buf[i] ^= 1 << bit;
        }
        Mutation::Set { pos, val } => {
            let i = at(pos, buf.len());
            buf[i] = val;
        }
        Mutation::Set32 { pos, val } => {
            let i = at(pos, buf.len());
            for (k, b) in val.to_le_bytes().into_iter().enumerate() {
                if let Some(x) = buf.get_mut(i + k) {
                    *x = b;
                }
            }
        }
        Mutation::Truncate { len } => {
            let l = at(len, buf.len());
            buf.truncate(l);
        }
        Mutation::Delete { pos, n } => {
            let i = at(pos, buf.len());
            let j = (i + n as usize).min(buf.len());
            buf.drain(i..j);
        }
        Mutation::Insert { pos, n, val } => {
            let i = at(pos, buf.len() + 1);
            buf.splice(i..i, std::iter::repeat_n(val, n as usize));
        }
        Mutation::Append { n, val } => buf.extend(std::iter::repeat_n(val, n as usize)),
    }
}

/// The fixed headers of `block_decode`: for each level, every dtype × layout, with and
/// without per-channel K scales where the level allows them. 2 layers, 2 heads, 40 tokens,
/// head_dim 8, 16 tokens per chunk (chunks of 16, 16 and 8 tokens).
pub fn block_header(level_sel: u8, variant: u8) -> Header {
    let level = Level::ALL[level_sel as usize % Level::ALL.len()];
    let spec = KvSpec {
        shape: KvShape::new(2, 2, 40, 8),
        layout: LAYOUTS[(variant & 1) as usize],
        dtype: DTYPES[(variant >> 1) as usize % 3],
    };
    let channel_scale_k = variant & 0x08 != 0 && !matches!(level, Level::Raw | Level::Lmcache);
    let opts = EncodeOptions {
        level,
        chunk_tokens: 16,
        channel_scale_k,
    };
    Encoder::new(spec, &opts)
        .expect("valid fixed header")
        .header()
        .clone()
}

/// The documented error bound of a lossy level (`quant.rs`): every element within
/// `m / (2·MAX)` of the input plus the output dtype's rounding, `m` the row's stored scale.
/// Checked loosely (the scale itself is rounded to 16 bits); `None` if it holds, else a
/// description of the first violation. Skips K when per-channel K scales are on.
pub fn check_lossy(orig: &KvCache, dec: &KvCache, h: &Header) -> Option<String> {
    use kvwire_codec::Part;
    let s = orig.spec().shape;
    let c = s.channels();
    let (mut x, mut y) = (vec![0f32; c], vec![0f32; c]);
    let rel = match orig.spec().dtype {
        DType::F16 => 2f32.powi(-10),
        DType::BF16 => 2f32.powi(-7),
        DType::F32 => 2f32.powi(-22),
    };
    let sub = match orig.spec().dtype {
        DType::F16 => 2f32.powi(-25),
        DType::BF16 | DType::F32 => 1e-30,
    };
    for l in 0..s.layers {
        let (bk, bv) = h.layer_bins(l);
        for (part, bins) in [(Part::K, bk), (Part::V, bv)] {
            if part == Part::K && h.channel_scale_k() {
                continue;
            }
            let max = (bins / 2 - 1) as f32;
            for t in 0..s.tokens {
                orig.view().read_row(l, part, t, &mut x);
                dec.view().read_row(l, part, t, &mut y);
                let m = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                // Scale rounding (bf16 rounds up by < 2^-7, f16 to nearest), dtype rounding,
                // and rows whose scale is too small for MAX/m to be finite decode to zero.
                // Plus half the output's subnormal spacing: a small x^ rounds to it absolutely
                // (quant::error_bound's last term).
                let bound = m / (2.0 * max) * (1.0 + 2f32.powi(-6)) + m * 2f32.powi(-6) + sub;
                for ch in 0..c {
                    let err = (x[ch] - y[ch]).abs();
                    // NaN in the output fails too.
                    let ok = err <= bound + y[ch].abs() * rel;
                    if !ok {
                        return Some(format!(
                            "layer {l} {part:?} token {t} channel {ch}: in {} out {} (row absmax {m}, bins {bins}, bound {bound})",
                            x[ch], y[ch]
                        ));
                    }
                }
            }
        }
    }
    None
}
