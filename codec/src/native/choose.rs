//! The encoder's choice of a channel's model: the prediction weight from the symbols'
//! moments, then the shape and scale of least exact code length.

use super::{ChannelModel, Predictor, RHOS};
use crate::model::{member, scale_index, ModelSet, SCALES, SHAPES};

/// Chooses the cheapest model for one channel's symbols (each `<= set.half_width`).
pub fn choose_model(syms: &[u8], set: &ModelSet) -> ChannelModel {
    choose_model_residuals(syms, set, &mut vec![0; syms.len()])
}

/// [`choose_model`], also writing each symbol's residual index under the chosen model
/// (`s[t] - base[t] + w`) into `residuals` (same length), for the coder.
pub(super) fn choose_model_residuals(
    syms: &[u8],
    set: &ModelSet,
    residuals: &mut [u8],
) -> ChannelModel {
    let w = set.half_width;
    let n = syms.len();
    if n == 0 {
        return ChannelModel::default();
    }
    let (mut s1, mut s2, mut lag) = (0u64, 0u64, 0u64);
    let mut prev = syms[0] as u64;
    for &s in syms {
        let s = s as u64;
        s1 += s;
        s2 += s * s;
        lag += s * prev;
        prev = s;
    }
    let nf = n as f64;
    let mean = s1 as f64 / nf;
    let var = s2 as f64 / nf - mean * mean;
    let cov = lag as f64 / nf - mean * mean;
    let mu2 = ((2 * s1 + n as u64 / 2) / n as u64).min(2 * w as u64) as u8;
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
    let m = ChannelModel {
        rho: rho as u8,
        mu2,
        ..Default::default()
    };
    let p = Predictor::new(&m);
    let nr = 2 * w as usize + 1;
    // Two histograms, even and odd tokens: runs of equal residuals would otherwise serialize
    // on store-to-load forwarding of one counter.
    let mut hist = [[0u32; 2 * 63 + 1]; 2];
    let mut base = p.first;
    for (pair, rpair) in syms.chunks(2).zip(residuals.chunks_mut(2)) {
        for (k, (&s, r)) in pair.iter().zip(rpair.iter_mut()).enumerate() {
            let ri = s as u32 + w - base;
            hist[k][ri as usize] += 1;
            *r = ri as u8;
            base = p.next(s as u32);
        }
    }
    let (h0, h1) = hist.split_at_mut(1);
    for (x, y) in h0[0][..nr].iter_mut().zip(&h1[0][..nr]) {
        *x += y;
    }
    let hist = &hist[0][..nr];
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
    let sd = (sq / nf).sqrt().max(1e-3);
    let lo = hist.iter().position(|&c| c != 0).unwrap_or(0);
    let hi = hist.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    let mut best = (f32::INFINITY, m);
    for shape in 0..SHAPES {
        // Laplace's standard deviation is b·√2, Gauss's is b.
        let b = if shape == 0 {
            sd / std::f64::consts::SQRT_2
        } else {
            sd
        };
        let cost = |k: usize| -> f32 {
            let t = &set.tables[member(shape, k, p.offset)].cost;
            hist[lo..hi]
                .iter()
                .zip(&t[lo..hi])
                .map(|(&h, &c)| h as f32 * c)
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
