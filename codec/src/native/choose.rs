//! The encoder's choice of each stream's model: the prediction weight from the stream's
//! moments, then the shape and scale of least exact code length.
//!
//! The moments, residuals and histograms of a part are gathered token row by token row, all
//! channels at once (the loops vectorize across channels), from the token-major symbols the
//! quantizer writes; only the final search runs per channel, on its histogram.

use super::{BlockSymbols, ChannelModel, Predictor, RHOS};
use crate::model::{member, scale_index, ModelRole, ModelSet, MAX_RESIDUALS, SCALES, SHAPES};

/// Channels whose residual histograms are counted together (32 · 128 · 2 bytes: L1-sized).
const CHANNEL_CHUNK: usize = 32;

/// Chooses the cheapest model for one channel's symbols (each `<= set.half_width`), given in
/// token order.
pub fn choose_model(syms: &[u8], set: &ModelSet) -> ChannelModel {
    let b = BlockSymbols {
        n: syms.len(),
        channels: 1,
        widths: [set.half_width; 2],
    };
    let mut both = syms.to_vec();
    both.extend_from_slice(syms);
    let sets = [
        ModelSet::get(set.half_width, ModelRole::Encode),
        ModelSet::get(set.half_width, ModelRole::Encode),
    ];
    let mut residuals = vec![0u8; both.len()];
    choose_block(&both, b, &sets, &mut residuals)[0]
}

/// Chooses the model of every stream of a block (stream order: K channels, then V channels)
/// and writes each symbol's residual index under its stream's model (`s[t] - base[t] + w`)
/// into `residuals`, laid out like `syms`.
pub(super) fn choose_block(
    syms: &[u8],
    b: BlockSymbols,
    sets: &[std::sync::Arc<ModelSet>; 2],
    residuals: &mut [u8],
) -> Vec<ChannelModel> {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        return super::simd::choose_block_avx2(syms, b, sets, residuals);
    }
    choose_block_portable(syms, b, sets, residuals)
}

/// [`choose_block`]'s body, inlined into a portable and an AVX2 build (the loops over
/// channels vectorize twice as wide with AVX2).
#[inline(always)]
pub(super) fn choose_block_portable(
    syms: &[u8],
    b: BlockSymbols,
    sets: &[std::sync::Arc<ModelSet>; 2],
    residuals: &mut [u8],
) -> Vec<ChannelModel> {
    let (n, c) = (b.n, b.channels);
    let mut models = Vec::with_capacity(2 * c);
    if n == 0 {
        models.resize(2 * c, ChannelModel::default());
        return models;
    }
    let mut s1 = vec![0u32; c];
    let mut s2 = vec![0u32; c];
    let mut lag = vec![0u32; c];
    let mut rho2 = vec![0u32; c];
    let mut bias = vec![0u32; c];
    let mut base = vec![0u32; c];
    // Per channel, a histogram of residual indices; n <= 65535, so a count fits u16.
    let mut hist = vec![0u16; c * MAX_RESIDUALS];
    for p in 0..2 {
        let set = &sets[p];
        let w = set.half_width;
        let rows = &syms[p * n * c..(p + 1) * n * c];
        // Moments: Σs, Σs², Σ s[t]·s[t-1] (with s[-1] = s[0]); at most 65535·126² < 2^32.
        s1.fill(0);
        s2.fill(0);
        lag.fill(0);
        let mut prev = &rows[..c];
        for row in rows.chunks_exact(c) {
            for ch in 0..c {
                let (s, q) = (row[ch] as u32, prev[ch] as u32);
                s1[ch] += s;
                s2[ch] += s * s;
                lag[ch] += s * q;
            }
            prev = row;
        }
        let first_model = models.len();
        for ch in 0..c {
            let m = prediction_model(s1[ch], s2[ch], lag[ch], n, w);
            let pr = Predictor::new(&m);
            rho2[ch] = pr.rho2;
            bias[ch] = pr.bias;
            base[ch] = pr.first;
            models.push(m);
        }
        // Residual indices and their histograms, 32 channels at a time over all tokens, so
        // that the histograms being counted stay in L1.
        hist.fill(0);
        let res_rows = &mut residuals[p * n * c..(p + 1) * n * c];
        for c0 in (0..c).step_by(CHANNEL_CHUNK) {
            let c1 = (c0 + CHANNEL_CHUNK).min(c);
            let (base, rho2, bias) = (&mut base[c0..c1], &rho2[c0..c1], &bias[c0..c1]);
            let hist = &mut hist[c0 * MAX_RESIDUALS..c1 * MAX_RESIDUALS];
            for (row, rrow) in rows.chunks_exact(c).zip(res_rows.chunks_exact_mut(c)) {
                let (row, rrow) = (&row[c0..c1], &mut rrow[c0..c1]);
                for ch in 0..c1 - c0 {
                    let s = row[ch] as u32;
                    let ri = (s + w - base[ch]) & (MAX_RESIDUALS as u32 - 1);
                    rrow[ch] = ri as u8;
                    base[ch] = (rho2[ch] * s + bias[ch]) >> 4;
                }
                for (h, &ri) in hist.chunks_exact_mut(MAX_RESIDUALS).zip(rrow.iter()) {
                    h[ri as usize] += 1;
                }
            }
        }
        for ch in 0..c {
            let m = &mut models[first_model + ch];
            let h = &hist[ch * MAX_RESIDUALS..][..2 * w as usize + 1];
            *m = choose_shape_scale(*m, h, n, set);
        }
    }
    models
}

/// The stream's mean and prediction weight from its moments (shape and scale left 0).
fn prediction_model(s1: u32, s2: u32, lag: u32, n: usize, w: u32) -> ChannelModel {
    let nf = n as f64;
    let mean = s1 as f64 / nf;
    let var = s2 as f64 / nf - mean * mean;
    let cov = lag as f64 / nf - mean * mean;
    let mu2 = ((2 * s1 as u64 + n as u64 / 2) / n as u64).min(2 * w as u64) as u8;
    // The weight whose prediction leaves the least residual variance:
    // var(s[t] - rho·s[t-1] - (1-rho)·mean) = var·(1 + rho²) - 2·rho·cov.
    let rho = (0..RHOS.len())
        .min_by(|&a, &b| {
            let f = |i: usize| {
                let r = RHOS[i] as f64 / 8.0;
                var * (1.0 + r * r) - 2.0 * r * cov
            };
            f(a).total_cmp(&f(b))
        })
        .unwrap_or(0);
    ChannelModel {
        rho: rho as u8,
        mu2,
        ..Default::default()
    }
}

/// The shape and scale of least exact code length for residual histogram `hist`
/// (`2w + 1` counts over `n` tokens).
#[inline(always)]
fn choose_shape_scale(m: ChannelModel, hist: &[u16], n: usize, set: &ModelSet) -> ChannelModel {
    let p = Predictor::new(&m);
    let w = set.half_width;
    // Spread of the residuals around the table's centre (offset/2), in symbols.
    let centre = p.offset as f64 * 0.5;
    let sq: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let d = i as f64 - w as f64 - centre;
            c as f64 * d * d
        })
        .sum();
    let sd = (sq / n as f64).sqrt().max(1e-3);
    let lo = hist.iter().position(|&c| c != 0).unwrap_or(0);
    let hi = hist.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    let mut best = (u32::MAX, m);
    for shape in 0..SHAPES {
        // Laplace's standard deviation is b·√2, Gauss's is b.
        let b = if shape == 0 {
            sd / std::f64::consts::SQRT_2
        } else {
            sd
        };
        // Exact integer code lengths: n·12·4096 < 2^32, and integer sums vectorize.
        let cost = |k: usize| -> u32 {
            let t = &set.tables[member(shape, k, p.offset)].cost_q;
            hist[lo..hi]
                .iter()
                .zip(&t[lo..hi])
                .map(|(&h, &c)| h as u32 * c)
                .sum()
        };
        let k0 = scale_index(b);
        let (mut k, mut ck) = (k0, cost(k0));
        for dir in [1isize, -1] {
            loop {
                let nk = k as isize + dir;
                if nk < 0 || nk >= SCALES as isize {
                    break;
                }
                let c = cost(nk as usize);
                if c >= ck {
                    break;
                }
                (k, ck) = (nk as usize, c);
            }
        }
        if ck < best.0 {
            best = (
                ck,
                ChannelModel {
                    shape: shape as u8,
                    scale: k as u8,
                    ..m
                },
            );
        }
    }
    best.1
}
