//! The native symbol coder of the `cg-*` levels: per-channel parametric models, prediction from
//! the previous token, and 32 rANS lanes sharing one interleaved word sequence.
//!
//! A block's symbols are held token-major per part ([`BlockSymbols`]): the row of K symbols of
//! each token, then the V rows, as the quantizer produces them and the dequantizer consumes
//! them. Each (part, channel) is a *stream*; for each the encoder picks a [`ChannelModel`]:
//!
//! * a prediction `base[t]` in whole symbols: for `rho = 0`, `mu2 >> 1` for every token;
//!   otherwise `(mu2 + 1) >> 1` for the block's first token and
//!   `(2·rho·s[t-1] + (8 - rho)·mu2 + 8) >> 4` after it (`rho ∈ {2, 4, 6, 8}` eighths of the
//!   previous symbol, the rest the channel's mean `mu2` in half symbols, rounded);
//! * a residual `r = s[t] - base[t]`, coded with the family member (`shape`, `scale`, offset)
//!   of [`crate::model`], where the offset is `mu2 & 1` for `rho = 0` (the distribution is
//!   centred on the half-symbol mean) and 0 otherwise. The table is fixed for the stream, so
//!   the decoder's rANS chain never waits for a decoded symbol.
//!
//! Lanes: the K streams, then the V streams, are taken [`LANES`] at a time; within such a
//! group, token by token, lane `j` codes the group's stream `j`, lanes in ascending order. All
//! lanes share one word sequence: a lane that needs a word takes the next one. A SIMD or GPU
//! decoder so handles 8 or 32 lanes per step, finding each lane's word by a prefix popcount of
//! the refill mask (the reason for the layout: per-lane word streams would need a gather per
//! refill, and a warp of 32 threads maps one thread to one lane). The encoder runs the exact
//! reverse order and writes words backwards, so the decoder reads them forwards.

mod choose;
mod lanes;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use choose::choose_model;

use crate::bits::{BitReader, BitWriter};
use crate::error::DecodeError;
use crate::model::{member, ModelRole, ModelSet, SCALES, SHAPES};

/// rANS lanes per block (and streams per group).
pub const LANES: usize = 32;
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

/// The prediction arithmetic of one stream, in the form the inner loops use: the prediction
/// after symbol `s` is `(rho2·s + bias) >> 4` (for `rho = 0`, `rho2 = 0` and `bias = 16·first`,
/// so one formula covers both cases without a branch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Predictor {
    /// `2·rho`.
    pub(crate) rho2: u32,
    /// `(8 - rho)·mu2 + 8`, or `16·first` when `rho = 0`.
    pub(crate) bias: u32,
    /// Prediction of the first token.
    pub(crate) first: u32,
    /// Centre offset of the stream's table (0 or 1 half symbol).
    pub(crate) offset: usize,
}

impl Predictor {
    pub(crate) fn new(m: &ChannelModel) -> Self {
        let rho = RHOS[m.rho as usize];
        let mu2 = m.mu2 as u32;
        let first = if rho == 0 { mu2 >> 1 } else { (mu2 + 1) >> 1 };
        Self {
            rho2: 2 * rho,
            bias: if rho == 0 {
                16 * first
            } else {
                (8 - rho) * mu2 + 8
            },
            first,
            offset: if rho == 0 { (mu2 & 1) as usize } else { 0 },
        }
    }
}

/// The shape of a block's symbols: `n` tokens of `channels` K streams and as many V streams,
/// token-major per part: the symbol of (part `p`, token `t`, channel `c`) is at
/// `(p·n + t)·channels + c`. `widths` are the K and V alphabets' half widths (`bins - 2`): a
/// symbol of part `p` lies in `0..=widths[p]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSymbols {
    /// Tokens.
    pub n: usize,
    /// Channels per part.
    pub channels: usize,
    /// Half width of the K and of the V alphabet, each in `1..=63`.
    pub widths: [u32; 2],
}

impl BlockSymbols {
    /// Symbols in the block (`2·n·channels`).
    pub const fn len(&self) -> usize {
        2 * self.n * self.channels
    }

    /// Whether the block has no symbols.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lanes the block uses: `min(channels, LANES)`.
    pub const fn lanes(&self) -> usize {
        if self.channels < LANES {
            self.channels
        } else {
            LANES
        }
    }

    /// The lane groups in decoding order: `(part, first channel, streams)`.
    pub(crate) fn groups(&self) -> impl DoubleEndedIterator<Item = (usize, usize, usize)> {
        let c = self.channels;
        (0..2).flat_map(move |p| {
            (0..c)
                .step_by(LANES)
                .map(move |g0| (p, g0, LANES.min(c - g0)))
        })
    }

    /// The stream index (`p·channels + c`) of part `p`, channel `c`.
    const fn stream(&self, p: usize, c: usize) -> usize {
        p * self.channels + c
    }
}

/// What the coding loops need of one stream: its predictor and its family member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamCode {
    pub(crate) pred: Predictor,
    /// `member(shape, scale, offset)`.
    pub(crate) member: usize,
}

fn stream_codes(models: &[ChannelModel]) -> Vec<StreamCode> {
    models
        .iter()
        .map(|m| {
            let pred = Predictor::new(m);
            StreamCode {
                pred,
                member: member(m.shape as usize, m.scale as usize, pred.offset),
            }
        })
        .collect()
}

/// The model sets of a block's K and V alphabets, with what `role` needs.
fn model_sets(b: &BlockSymbols, role: ModelRole) -> [std::sync::Arc<ModelSet>; 2] {
    [
        ModelSet::get(b.widths[0], role),
        ModelSet::get(b.widths[1], role),
    ]
}

/// Appends the coded form of `syms` (laid out as `b` says, each symbol within its part's
/// alphabet) to `out`: the models bit-packed, the word count (`u32`), then the words (`u16`),
/// little-endian.
pub fn encode_symbols(syms: &[u8], b: BlockSymbols, out: &mut Vec<u8>) {
    encode_symbols_with(syms, b, out, Kernel::Best);
}

/// [`encode_symbols`] with a chosen loop (every loop writes the same bytes).
pub fn encode_symbols_with(syms: &[u8], b: BlockSymbols, out: &mut Vec<u8>, kernel: Kernel) {
    assert_eq!(syms.len(), b.len(), "symbols do not match the block shape");
    let sets = model_sets(&b, ModelRole::Encode);
    crate::scratch::with_bytes(syms.len(), |residuals| {
        let models = choose::choose_block(syms, b, &sets, residuals);
        let mut bw = BitWriter::default();
        for m in &models {
            bw.put(m.rho as u32, RHO_BITS);
            bw.put(m.mu2 as u32, MU_BITS);
            bw.put(m.shape as u32, SHAPE_BITS);
            bw.put(m.scale as u32, SCALE_BITS);
        }
        out.extend_from_slice(&bw.finish());
        let codes = stream_codes(&models);
        crate::scratch::with_words(|words| {
            #[cfg(target_arch = "x86_64")]
            let first = if kernel == Kernel::Best && simd::available() {
                simd::encode(residuals, b, &codes, &sets, words)
            } else {
                lanes::encode(residuals, b, &codes, &sets, words)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let first = {
                let _ = kernel;
                lanes::encode(residuals, b, &codes, &sets, words)
            };
            let w = &mut words[first..];
            out.extend_from_slice(&(w.len() as u32).to_le_bytes());
            // Little-endian words: a byte swap on big-endian hosts, then one copy.
            for x in w.iter_mut() {
                *x = x.to_le();
            }
            out.extend_from_slice(bytemuck::cast_slice(w));
        });
    });
}

/// Bytes of the model section for `streams` streams.
pub const fn models_len(streams: usize) -> usize {
    crate::bits::bytes_for_bits(streams * MODEL_BITS as usize)
}

/// Smallest coded size of a block of `channels` channels per part: models, word count and
/// the lanes' initial states.
pub const fn min_coded_len(channels: usize) -> usize {
    let lanes = if channels < LANES { channels } else { LANES };
    models_len(2 * channels) + 4 + 4 * lanes
}

/// Decodes what [`encode_symbols`] wrote (exactly `bytes`) into `syms`, laid out as `b` says.
///
/// # Errors
/// [`DecodeError`] if a model field is out of range, the word count does not match, a symbol
/// leaves its alphabet, or the lanes do not end in their initial state with every word read.
pub fn decode_symbols(bytes: &[u8], b: BlockSymbols, syms: &mut [u8]) -> Result<(), DecodeError> {
    decode_symbols_with(bytes, b, syms, Kernel::Best)
}

/// Where a decoder that writes values itself puts a block's rows, as f16: the layer buffer and
/// how (part, token, channel) maps into it (the layout of [`crate::KvSpec::row_runs`]:
/// element `plane[p] + t·row_step + (c / run_len)·run_stride + c mod run_len`).
#[derive(Debug)]
pub struct F16Rows<'a> {
    /// The layer's bytes (f16, little-endian).
    pub out: &'a mut [u8],
    /// Element offset of token 0 of each part.
    pub plane: [usize; 2],
    /// Elements from one token's row to the next.
    pub row_step: usize,
    /// Channels stored contiguously.
    pub run_len: usize,
    /// Elements between runs.
    pub run_stride: usize,
    /// The block's first token.
    pub t0: usize,
    /// `MAX` of each part's bins, as f32.
    pub max: [f32; 2],
    /// Each row's scale value (`[part][token]`, `2·n` values).
    pub scales: &'a [f32],
}

impl F16Rows<'_> {
    /// Element offset of channel `ch` within a row.
    pub(crate) fn channel_offset(&self, ch: usize) -> usize {
        (ch / self.run_len) * self.run_stride + ch % self.run_len
    }

    /// Whether a block of shape `b` can be written this way: 8-channel chunks that never
    /// cross a run, every element inside `out`, a scale per row.
    pub(crate) fn fits(&self, b: BlockSymbols) -> bool {
        if b.n == 0 || b.channels % 8 != 0 || self.run_len % 8 != 0 || self.scales.len() != 2 * b.n
        {
            return false;
        }
        let last = |p: usize| {
            self.plane[p]
                + (self.t0 + b.n - 1) * self.row_step
                + self.channel_offset(b.channels - 8)
                + 8
        };
        let elements = self.out.len() / 2;
        last(0) <= elements && last(1) <= elements
    }
}

/// Decodes like [`decode_symbols`] and, where this CPU has a decoder that does so, writes the
/// values straight into `rows` (returns `true`); otherwise only fills `syms` (returns
/// `false`) and the caller dequantizes. On error, the block's part of `rows.out` may have been
/// written.
///
/// # Errors
/// As [`decode_symbols`].
pub fn decode_symbols_f16(
    bytes: &[u8],
    b: BlockSymbols,
    syms: &mut [u8],
    rows: &mut F16Rows<'_>,
) -> Result<bool, DecodeError> {
    #[cfg(target_arch = "x86_64")]
    if simd::available() && rows.fits(b) {
        decode_impl(bytes, b, syms, Kernel::Best, Some(rows))?;
        return Ok(true);
    }
    decode_impl(bytes, b, syms, Kernel::Best, None)?;
    Ok(false)
}

/// Which decoding loop to run (tests compare them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest this CPU has.
    Best,
    /// The portable scalar loop.
    Scalar,
}

/// [`decode_symbols`] with a chosen loop.
///
/// # Errors
/// As [`decode_symbols`].
pub fn decode_symbols_with(
    bytes: &[u8],
    b: BlockSymbols,
    syms: &mut [u8],
    kernel: Kernel,
) -> Result<(), DecodeError> {
    decode_impl(bytes, b, syms, kernel, None)
}

fn decode_impl(
    bytes: &[u8],
    b: BlockSymbols,
    syms: &mut [u8],
    kernel: Kernel,
    f16_rows: Option<&mut F16Rows<'_>>,
) -> Result<(), DecodeError> {
    assert_eq!(syms.len(), b.len(), "buffer does not match the block shape");
    let streams = 2 * b.channels;
    let ml = models_len(streams);
    if bytes.len() < ml + 4 {
        return Err(DecodeError::Truncated {
            offset: bytes.len(),
            needed: ml + 4 - bytes.len(),
        });
    }
    let models = read_models(&bytes[..ml], b)?;
    let mut r = crate::bits::ByteReader::new(&bytes[ml..]);
    let count = r.u32()? as usize;
    if count < 2 * b.lanes() || count.checked_mul(2) != Some(r.remaining()) {
        return Err(DecodeError::CorruptStream { stream: 0 });
    }
    let wb = r.take(r.remaining())?;
    let sets = model_sets(&b, ModelRole::Decode);
    let codes = stream_codes(&models);
    crate::scratch::with_words(|words| {
        // The words, then zeros a vector load past the last word may touch (a refill past the
        // end reads 0; the loops stop a stream that reads past its words).
        words.clear();
        words.resize(count + lanes::WORD_PAD, 0);
        bytemuck::cast_slice_mut(&mut words[..count]).copy_from_slice(wb);
        for x in &mut words[..count] {
            *x = u16::from_le(*x);
        }
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Best && simd::available() {
            return simd::decode(words, count, b, &codes, &sets, syms, f16_rows);
        }
        let _ = kernel;
        debug_assert!(f16_rows.is_none(), "fused output without the SIMD decoder");
        lanes::decode(words, count, b, &codes, &sets, syms)
    })
}

fn read_models(bytes: &[u8], b: BlockSymbols) -> Result<Vec<ChannelModel>, DecodeError> {
    let streams = 2 * b.channels;
    let mut br = BitReader::new(bytes);
    let mut models = Vec::with_capacity(streams);
    for k in 0..streams {
        let m = ChannelModel {
            rho: br.get(RHO_BITS)? as u8,
            mu2: br.get(MU_BITS)? as u8,
            shape: br.get(SHAPE_BITS)? as u8,
            scale: br.get(SCALE_BITS)? as u8,
        };
        let w = b.widths[(k >= b.channels) as usize];
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
    let used = streams * MODEL_BITS as usize;
    if used % 8 != 0 && bytes[bytes.len() - 1] >> (used % 8) != 0 {
        return Err(DecodeError::ReservedBits("model padding"));
    }
    Ok(models)
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

    /// Symbols with drifting, constant, extreme and noisy channels.
    fn test_symbols(b: BlockSymbols, seed: &mut u64) -> Vec<u8> {
        let mut syms = vec![0u8; b.len()];
        for p in 0..2 {
            let w = b.widths[p];
            for ch in 0..b.channels {
                let mut v = w / 2;
                for t in 0..b.n {
                    if lcg(seed) % 3 == 0 {
                        v = (v as i32 + (lcg(seed) % 5) as i32 - 2).clamp(0, w as i32) as u32;
                    }
                    syms[(p * b.n + t) * b.channels + ch] = match ch % 5 {
                        4 => (lcg(seed) % (w + 1)) as u8,
                        3 => w as u8,
                        2 => 0,
                        _ => v as u8,
                    };
                }
            }
        }
        syms
    }

    const SHAPES_UNDER_TEST: [(usize, usize); 8] = [
        (1, 1),
        (3, 5),
        (24, 256),
        (40, 100),
        (64, 33),
        (8, 1),
        (100, 3),
        (192, 64),
    ];

    #[test]
    fn round_trip_random_blocks_every_kernel() {
        let mut seed = 7;
        for (channels, n) in SHAPES_UNDER_TEST {
            for widths in [[30, 14], [62, 1], [10, 10]] {
                let b = BlockSymbols {
                    n,
                    channels,
                    widths,
                };
                let syms = test_symbols(b, &mut seed);
                let mut out = Vec::new();
                encode_symbols(&syms, b, &mut out);
                let mut scalar = Vec::new();
                encode_symbols_with(&syms, b, &mut scalar, Kernel::Scalar);
                assert!(out == scalar, "encoders differ: channels {channels} n {n}");
                for kernel in [Kernel::Best, Kernel::Scalar] {
                    let mut back = vec![0u8; b.len()];
                    decode_symbols_with(&out, b, &mut back, kernel).unwrap();
                    assert_eq!(back, syms, "{kernel:?} channels {channels} n {n}");
                }
            }
        }
    }

    /// Scratch buffers are reused without zeroing: nothing of an earlier block may leak into
    /// a later one's bytes.
    #[test]
    fn output_does_not_depend_on_earlier_blocks() {
        let mut seed = 5;
        let big = BlockSymbols {
            n: 200,
            channels: 96,
            widths: [30, 14],
        };
        let small = BlockSymbols {
            n: 17,
            channels: 40,
            widths: [14, 10],
        };
        let (a, b) = (test_symbols(small, &mut seed), test_symbols(big, &mut seed));
        for kernel in [Kernel::Best, Kernel::Scalar] {
            let mut first = Vec::new();
            encode_symbols_with(&a, small, &mut first, kernel);
            encode_symbols_with(&b, big, &mut Vec::new(), kernel);
            let mut again = Vec::new();
            encode_symbols_with(&a, small, &mut again, kernel);
            assert!(first == again, "{kernel:?}");
        }
    }

    /// Every kernel rejects the same corrupted blocks (or decodes them to the same symbols),
    /// and none panics.
    #[test]
    fn kernels_agree_on_corrupt_blocks() {
        let mut seed = 11;
        for (channels, n) in SHAPES_UNDER_TEST {
            let b = BlockSymbols {
                n,
                channels,
                widths: [30, 14],
            };
            let syms = test_symbols(b, &mut seed);
            let mut out = Vec::new();
            encode_symbols(&syms, b, &mut out);
            for trial in 0..40 {
                let mut bad = out.clone();
                let i = lcg(&mut seed) as usize % bad.len();
                bad[i] ^= 1 << (lcg(&mut seed) % 8);
                if trial % 4 == 0 {
                    // Also cut the block short (the count then disagrees).
                    bad.truncate(bad.len() - 2);
                }
                let run = |k| {
                    let mut back = vec![0u8; b.len()];
                    decode_symbols_with(&bad, b, &mut back, k).map(|()| back)
                };
                let (best, scalar) = (run(Kernel::Best), run(Kernel::Scalar));
                match (&best, &scalar) {
                    (Ok(x), Ok(y)) => assert_eq!(x, y),
                    (Err(_), Err(_)) => {}
                    _ => panic!("kernels disagree: {best:?} vs {scalar:?}"),
                }
                if trial % 4 == 0 {
                    assert!(best.is_err());
                }
            }
        }
    }
}
