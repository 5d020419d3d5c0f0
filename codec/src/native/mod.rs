//! The native symbol coder of the `cg-*` levels: per-channel parametric models, prediction from
//! the previous token, and 4-lane interleaved rANS.
//!
//! A block holds the symbols of `channels` streams (K channels, then V channels) over `n`
//! tokens, channel-major. For each channel the encoder picks a [`ChannelModel`]:
//!
//! * a prediction `base[t]` in whole symbols: for `rho = 0`, `mu2 >> 1` for every token;
//!   otherwise `(mu2 + 1) >> 1` for the block's first token and
//!   `(2·rho·s[t-1] + (8 - rho)·mu2 + 8) >> 4` after it (`rho ∈ {2, 4, 6, 8}` eighths of the
//!   previous symbol, the rest the channel's mean `mu2` in half symbols, rounded);
//! * a residual `r = s[t] - base[t]`, coded with the family member (`shape`, `scale`, offset)
//!   of [`crate::model`], where the offset is `mu2 & 1` for `rho = 0` (the distribution is
//!   centred on the half-symbol mean) and 0 otherwise. The table is fixed for the channel, so
//!   the decoder's rANS chain never waits for a decoded symbol.
//!
//! The encoder picks `rho` from the channel's mean, variance and lag-1 covariance (the weight
//! that leaves the least residual variance), then tries both shapes and the scales around the
//! residuals' spread and keeps the choice of least exact code length. A channel's model costs [`MODEL_BITS`] bits.
//!
//! Lanes: the K channels, then the V channels, are taken [`LANES`] at a time; within such a
//! group, token by token, lane `j` codes the group's channel `j` (a partial group at the end of
//! a part codes its lanes one after another). A lane's symbols depend only on its own earlier ones, so
//! the decoder runs `LANES` independent dependency chains. Each lane has its own word stream
//! (a shared one would chain every lane's refill to the previous lane's), written backwards
//! by the encoder so the decoder reads it forwards.

mod choose;

pub use choose::choose_model;
use choose::choose_model_residuals;

use crate::bits::{BitReader, BitWriter};
use crate::error::DecodeError;
use crate::model::{member, ModelSet, ResidualTable, SCALES, SHAPES};
use crate::rans::{self, DecTable, EncSymbol, RANS_L};

/// Interleaved rANS lanes per block.
pub const LANES: usize = 4;
/// Bits of one channel's model description.
pub const MODEL_BITS: u32 = RHO_BITS + MU_BITS + SHAPE_BITS + SCALE_BITS;
const RHO_BITS: u32 = 3;
const MU_BITS: u32 = 7;
const SHAPE_BITS: u32 = 1;
const SCALE_BITS: u32 = 6;
/// Prediction weights, in eighths.
const RHOS: [u32; 5] = [0, 2, 4, 6, 8];

/// The model of one channel of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelModel {
    /// Index into the prediction weights `{0, 2, 4, 6, 8}/8`.
    pub rho: u8,
    /// Mean symbol in half units (`0..=2·half_width`).
    pub mu2: u8,
    /// Shape of the residual distribution (0 Laplace, 1 Gauss).
    pub shape: u8,
    /// Scale index.
    pub scale: u8,
}

/// The prediction arithmetic of one channel, in the form the inner loops use.
#[derive(Debug, Clone, Copy)]
struct Predictor {
    /// `2·rho` (0: no prediction from the previous symbol).
    rho2: u32,
    /// `(8 - rho)·mu2 + 8`.
    bias: u32,
    /// Prediction of the first token (and of every token when `rho2 == 0`).
    first: u32,
    /// Centre offset of the channel's table (0 or 1 half symbol).
    offset: usize,
}

impl Predictor {
    fn new(m: &ChannelModel) -> Self {
        let rho = RHOS[m.rho as usize];
        let mu2 = m.mu2 as u32;
        Self {
            rho2: 2 * rho,
            bias: (8 - rho) * mu2 + 8,
            first: if rho == 0 { mu2 >> 1 } else { (mu2 + 1) >> 1 },
            offset: if rho == 0 { (mu2 & 1) as usize } else { 0 },
        }
    }
    /// The prediction after symbol `prev`.
    #[inline(always)]
    fn next(&self, prev: u32) -> u32 {
        if self.rho2 == 0 {
            self.first
        } else {
            (self.rho2 * prev + self.bias) >> 4
        }
    }
}

/// The residual half widths of a block's channels: the first `first` channels (K) use
/// `first_width`, the rest (V) `rest_width`; each is `bins - 2`.
#[derive(Debug, Clone, Copy)]
pub struct ChannelAlphabets {
    /// Channels that use `first_width` (the K channels).
    pub first: usize,
    /// Half width of the first `first` channels.
    pub first_width: u32,
    /// Half width of the rest (the V channels).
    pub rest_width: u32,
}

/// What the coding loops need of one channel.
struct Lane<'a> {
    pred: Predictor,
    table: &'a ResidualTable,
    dec: &'a DecTable,
    width: u32,
}

fn lanes_of<'a>(
    models: &[ChannelModel],
    alpha: ChannelAlphabets,
    sets: &'a [std::sync::Arc<ModelSet>; 2],
) -> Vec<Lane<'a>> {
    models
        .iter()
        .enumerate()
        .map(|(ch, m)| {
            let set = &sets[(ch >= alpha.first) as usize];
            let pred = Predictor::new(m);
            let k = member(m.shape as usize, m.scale as usize, pred.offset);
            Lane {
                pred,
                table: &set.tables[k],
                dec: &set.dec[k],
                width: set.half_width,
            }
        })
        .collect()
}

/// Appends the coded form of channel-major `syms` (`channels × n`, each symbol within its
/// channel's alphabet) to `out`: the models bit-packed, then [`LANES`] word counts (`u32`),
/// then each lane's words (its initial state first, high half first), little-endian.
pub fn encode_channels(syms: &[u8], n: usize, alpha: ChannelAlphabets, out: &mut Vec<u8>) {
    let channels = syms.len() / n;
    let sets = [
        ModelSet::get(alpha.first_width),
        ModelSet::get(alpha.rest_width),
    ];
    // The models, and each symbol's residual index under its channel's model.
    crate::scratch::with_bytes(syms.len(), |residuals| {
        let models: Vec<ChannelModel> = (0..channels)
            .map(|ch| {
                choose_model_residuals(
                    &syms[ch * n..(ch + 1) * n],
                    &sets[(ch >= alpha.first) as usize],
                    &mut residuals[ch * n..(ch + 1) * n],
                )
            })
            .collect();
        let mut bw = BitWriter::default();
        for m in &models {
            bw.put(m.rho as u32, RHO_BITS);
            bw.put(m.mu2 as u32, MU_BITS);
            bw.put(m.shape as u32, SHAPE_BITS);
            bw.put(m.scale as u32, SCALE_BITS);
        }
        out.extend_from_slice(&bw.finish());
        let lanes = lanes_of(&models, alpha, &sets);
        // Each lane has its own word stream, written backwards: at most one word per symbol,
        // plus the final state.
        crate::scratch::with_lane_words(LANES, |scratch| {
            encode_lanes(residuals, n, alpha, &lanes, scratch, out);
        });
    });
}

/// Codes the residual indices of a block (channel-major) into per-lane word buffers
/// (`scratch`, one per lane) and appends the counts and words to `out`.
fn encode_lanes(
    residuals: &[u8],
    n: usize,
    alpha: ChannelAlphabets,
    lanes: &[Lane<'_>],
    scratch: &mut [Vec<u16>],
    out: &mut Vec<u8>,
) {
    let channels = residuals.len() / n;
    let mut bufs: Vec<LaneWords<'_>> = lane_symbols(alpha, channels, n)
        .iter()
        .zip(scratch.iter_mut())
        .map(|(&syms_in_lane, buf)| {
            buf.resize(syms_in_lane + 2, 0);
            LaneWords {
                buf,
                pos: syms_in_lane + 2,
            }
        })
        .collect();
    let mut states = [RANS_L; LANES];
    let all: Vec<(usize, usize)> = groups(alpha, channels).collect();
    for &(c0, k) in all.iter().rev() {
        let ls = &lanes[c0..c0 + k];
        let rs = &residuals[c0 * n..(c0 + k) * n];
        if k == LANES {
            encode_group::<LANES>(ls, rs, n, &mut states, &mut bufs);
        } else {
            for j in (0..k).rev() {
                encode_group::<1>(
                    &ls[j..j + 1],
                    &rs[j * n..(j + 1) * n],
                    n,
                    &mut states[j..j + 1],
                    &mut bufs[j..j + 1],
                );
            }
        }
    }
    for (b, &x) in bufs.iter_mut().zip(&states) {
        b.pos -= 2;
        b.buf[b.pos] = (x >> 16) as u16;
        b.buf[b.pos + 1] = x as u16;
    }
    for b in &bufs {
        out.extend_from_slice(&((b.buf.len() - b.pos) as u32).to_le_bytes());
    }
    for b in &bufs {
        out.reserve(2 * (b.buf.len() - b.pos));
        for w in &b.buf[b.pos..] {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

/// One lane's word stream while encoding: words are written backwards below `pos`.
struct LaneWords<'a> {
    buf: &'a mut Vec<u16>,
    pos: usize,
}

/// Encodes `L` lanes (channels `ls`, residual indices `rs`, channel-major) backwards.
#[inline(always)]
fn encode_group<const L: usize>(
    ls: &[Lane<'_>],
    rs: &[u8],
    n: usize,
    states: &mut [u32],
    bufs: &mut [LaneWords<'_>],
) {
    let ls: &[Lane<'_>; L] = ls.try_into().expect("L lanes");
    let states: &mut [u32; L] = states.try_into().expect("L states");
    let bufs: &mut [LaneWords<'_>; L] = bufs.try_into().expect("L streams");
    for t in (0..n).rev() {
        for j in (0..L).rev() {
            let e: &EncSymbol = &ls[j].table.enc[rs[j * n + t] as usize];
            let b = &mut bufs[j];
            rans::encode_into(&mut states[j], b.buf, &mut b.pos, e);
        }
    }
}

/// Bytes of the model section for `channels` channels.
pub const fn models_len(channels: usize) -> usize {
    crate::bits::bytes_for_bits(channels * MODEL_BITS as usize)
}

/// Decodes what [`encode_channels`] wrote (exactly `bytes`) into channel-major `syms`
/// (`channels × n`).
///
/// # Errors
/// [`DecodeError`] if a model field is out of range, the words run out, a residual leaves the
/// alphabet, or a lane does not end in its initial state.
pub fn decode_channels(
    bytes: &[u8],
    n: usize,
    alpha: ChannelAlphabets,
    syms: &mut [u8],
) -> Result<(), DecodeError> {
    let channels = syms.len() / n;
    let ml = models_len(channels);
    if bytes.len() < ml + 4 * LANES {
        return Err(DecodeError::Truncated {
            offset: bytes.len(),
            needed: ml + 4 * LANES - bytes.len(),
        });
    }
    let sets = [
        ModelSet::get(alpha.first_width),
        ModelSet::get(alpha.rest_width),
    ];
    let mut br = BitReader::new(&bytes[..ml]);
    let mut models = Vec::with_capacity(channels);
    for ch in 0..channels {
        let m = ChannelModel {
            rho: br.get(RHO_BITS)? as u8,
            mu2: br.get(MU_BITS)? as u8,
            shape: br.get(SHAPE_BITS)? as u8,
            scale: br.get(SCALE_BITS)? as u8,
        };
        let w = if ch < alpha.first {
            alpha.first_width
        } else {
            alpha.rest_width
        };
        let check = |field, v: u8, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(DecodeError::InvalidField {
                    field,
                    value: v as u64,
                })
            }
        };
        check("model.rho", m.rho, (m.rho as usize) < RHOS.len())?;
        check("model.mu2", m.mu2, m.mu2 as u32 <= 2 * w)?;
        check("model.shape", m.shape, (m.shape as usize) < SHAPES)?;
        check("model.scale", m.scale, (m.scale as usize) < SCALES)?;
        models.push(m);
    }
    let used = channels * MODEL_BITS as usize;
    if used % 8 != 0 && bytes[ml - 1] >> (used % 8) != 0 {
        return Err(DecodeError::ReservedBits("model padding"));
    }
    let mut r = crate::bits::ByteReader::new(&bytes[ml..]);
    let mut counts = [0usize; LANES];
    for c in counts.iter_mut() {
        *c = r.u32()? as usize;
        if *c < 2 {
            return Err(DecodeError::CorruptStream { stream: 0 });
        }
    }
    let total: usize = counts
        .iter()
        .try_fold(0usize, |a, &c| a.checked_add(c))
        .unwrap_or(usize::MAX);
    if total.checked_mul(2) != Some(r.remaining()) {
        return Err(DecodeError::CorruptStream { stream: 0 });
    }
    let wb = r.take(r.remaining())?;
    // Each lane's words, then one zero word per symbol the lane decodes: a refill can then
    // never index past the end, whatever the words say (a stream that reads its padding is
    // corrupt, which the final checks report).
    let lane_syms = lane_symbols(alpha, channels, n);
    crate::scratch::with_words(|words| {
        words.reserve(total + channels * n);
        let mut starts = [0usize; LANES];
        let mut wi = wb.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        for j in 0..LANES {
            starts[j] = words.len();
            words.extend(wi.by_ref().take(counts[j]));
            words.resize(words.len() + lane_syms[j], 0);
        }
        let mut x: [u32; LANES] =
            std::array::from_fn(|j| (words[starts[j]] as u32) << 16 | words[starts[j] + 1] as u32);
        let mut pos: [usize; LANES] = std::array::from_fn(|j| starts[j] + 2);
        let lanes = lanes_of(&models, alpha, &sets);
        let mut bad = false;
        for (c0, k) in groups(alpha, channels) {
            let ls = &lanes[c0..c0 + k];
            let ss = &mut syms[c0 * n..(c0 + k) * n];
            let w = ls[0].width;
            if k == LANES {
                bad |= decode_group::<LANES>(ls, ss, n, w, words, &mut x, &mut pos);
            } else {
                for j in 0..k {
                    bad |= decode_group::<1>(
                        &ls[j..j + 1],
                        &mut ss[j * n..(j + 1) * n],
                        n,
                        w,
                        words,
                        &mut x[j..j + 1],
                        &mut pos[j..j + 1],
                    );
                }
            }
        }
        if bad {
            return Err(DecodeError::SymbolOutOfRange { stream: 0 });
        }
        for j in 0..LANES {
            if pos[j] != starts[j] + counts[j] || x[j] != RANS_L {
                return Err(DecodeError::CorruptStream { stream: j });
            }
        }
        Ok(())
    })
}

/// The lane groups of a block: `(first channel, lanes)`, [`LANES`] channels at a time within
/// the K channels, then within the V channels (so a group shares one alphabet); the last group
/// of each part may be partial.
fn groups(alpha: ChannelAlphabets, channels: usize) -> impl Iterator<Item = (usize, usize)> {
    let part = |lo: usize, hi: usize| {
        (lo..hi)
            .step_by(LANES)
            .map(move |c0| (c0, LANES.min(hi - c0)))
    };
    part(0, alpha.first.min(channels)).chain(part(alpha.first.min(channels), channels))
}

/// Symbols each lane codes.
fn lane_symbols(alpha: ChannelAlphabets, channels: usize, n: usize) -> [usize; LANES] {
    let mut per = [0usize; LANES];
    for (_, k) in groups(alpha, channels) {
        for p in per.iter_mut().take(k) {
            *p += n;
        }
    }
    per
}

/// Decodes `L` lanes forwards (alphabet half width `w`); returns whether a symbol left the
/// alphabet. Lane `j` reads `words` at `pos[j]`, which the caller's padding keeps in bounds.
#[inline(always)]
fn decode_group<const L: usize>(
    ls: &[Lane<'_>],
    ss: &mut [u8],
    n: usize,
    w: u32,
    words: &[u16],
    x: &mut [u32],
    pos: &mut [usize],
) -> bool {
    let ls: &[Lane<'_>; L] = ls.try_into().expect("L lanes");
    let x: &mut [u32; L] = x.try_into().expect("L states");
    let pos: &mut [usize; L] = pos.try_into().expect("L positions");
    // Per lane: the prediction after each possible symbol, less the width (wrapping), so that
    // a symbol is `base + r`. The rANS chain (`x`) never reads it; only the symbol chain does.
    let mut next = [[0u32; 64]; L];
    for (nx, l) in next.iter_mut().zip(ls) {
        for (s, e) in nx.iter_mut().enumerate() {
            *e = l.pred.next(s as u32).wrapping_sub(w);
        }
    }
    let dec: [&DecTable; L] = std::array::from_fn(|j| ls[j].dec);
    let mut base: [u32; L] = std::array::from_fn(|j| ls[j].pred.first.wrapping_sub(w));
    let mut bad = 0u32;
    for t in 0..n {
        for j in 0..L {
            let r = rans::decode(&mut x[j], dec[j], words, &mut pos[j]);
            // Out of range when above `w`: wrapping makes a negative symbol huge.
            let s = base[j].wrapping_add(r);
            bad |= (s > w) as u32;
            ss[j * n + t] = s as u8;
            base[j] = next[j][(s & 63) as usize];
        }
    }
    bad != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn round_trip_random_channels() {
        let mut seed = 7;
        for (channels, n, first) in [
            (1, 1, 1),
            (3, 5, 2),
            (24, 256, 12),
            (17, 100, 9),
            (8, 1, 4),
            (20, 3, 20),
        ] {
            let alpha = ChannelAlphabets {
                first,
                first_width: 30,
                rest_width: 14,
            };
            let mut syms = vec![0u8; channels * n];
            for ch in 0..channels {
                let w = if ch < first { 30 } else { 14 };
                let mut v = w / 2;
                for t in 0..n {
                    if lcg(&mut seed) % 3 == 0 {
                        v = (v as i32 + (lcg(&mut seed) % 5) as i32 - 2).clamp(0, w as i32) as u32;
                    }
                    syms[ch * n + t] = match ch % 5 {
                        4 => (lcg(&mut seed) % (w + 1)) as u8,
                        3 => w as u8, // extreme constant channel
                        _ => v as u8,
                    };
                }
            }
            let mut out = Vec::new();
            encode_channels(&syms, n, alpha, &mut out);
            let mut back = vec![0u8; channels * n];
            decode_channels(&out, n, alpha, &mut back).unwrap();
            assert_eq!(back, syms, "channels {channels} n {n}");
            // Corruption and truncation give an error or other symbols, never a panic.
            let mut bad = out.clone();
            let i = bad.len() / 2;
            bad[i] ^= 0x5A;
            let _ = decode_channels(&bad, n, alpha, &mut back);
            assert!(decode_channels(&out[..out.len() - 2], n, alpha, &mut back).is_err());
        }
    }
}
