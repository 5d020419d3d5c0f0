//! Statistics of a real KV cache from which synthetic caches of other shapes are generated
//! (`kvwire perf kv --synthetic`, the GPU benchmark): per (layer, K/V, channel) mean and
//! scale, per (layer, K/V) lag-1 correlation over tokens; and the deterministic random source
//! both generators draw from. Generators reproduce each channel as an AR(1) process.

use crate::layout::{KvShape, KvView, Part};

/// The statistics of one (layer, K/V) plane.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneStats {
    /// Mean per channel.
    pub mean: Vec<f32>,
    /// Standard deviation per channel.
    pub scale: Vec<f32>,
    /// Lag-1 autocorrelation over tokens of the standardized values, averaged over channels
    /// (clamped to `0..=0.99`).
    pub rho: f32,
}

/// The statistics of every plane of `view`, layer-major, K before V; and `view`'s shape.
pub fn plane_stats(view: &KvView<'_>) -> (KvShape, Vec<PlaneStats>) {
    let shape = view.spec().shape;
    let (t_n, c_n) = (shape.tokens, shape.channels());
    let mut planes = Vec::with_capacity(shape.layers * 2);
    let mut col = vec![0f32; t_n];
    for layer in 0..shape.layers {
        for part in Part::BOTH {
            let mut mean = vec![0f32; c_n];
            let mut scale = vec![0f32; c_n];
            let (mut num, mut den) = (0f64, 0f64);
            for c in 0..c_n {
                for (t, x) in col.iter_mut().enumerate() {
                    *x = view.get(layer, part, t, c);
                }
                let m = col.iter().map(|&x| f64::from(x)).sum::<f64>() / t_n as f64;
                let var = col.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / t_n as f64;
                mean[c] = m as f32;
                scale[c] = var.sqrt() as f32;
                for w in col.windows(2) {
                    num += (f64::from(w[0]) - m) * (f64::from(w[1]) - m);
                }
                den += var * t_n as f64;
            }
            let rho = if den > 0.0 {
                (num / den).clamp(0.0, 0.99)
            } else {
                0.0
            };
            planes.push(PlaneStats {
                mean,
                scale,
                rho: rho as f32,
            });
        }
    }
    (shape, planes)
}

/// splitmix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Two standard normal samples (Box-Muller).
    pub fn normal_pair(&mut self) -> (f32, f32) {
        let r = (-2.0 * self.unit().ln()).sqrt();
        let a = std::f64::consts::TAU * self.unit();
        ((r * a.cos()) as f32, (r * a.sin()) as f32)
    }
}
