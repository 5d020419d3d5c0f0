//! Synthetic KV caches of real models' shapes, generated from the statistics of the embedded
//! real cache (SmolLM2-135M, 256 tokens): per-(layer, K|V, channel) mean and scale, and the
//! token-to-token correlation per (layer, K|V), reproduced by an AR(1) process per channel.
//! Deterministic for a given seed. Compressibility follows the real cache far better than
//! uniform noise would (which no entropy coder can shrink).

use anyhow::{bail, Context, Result};
use kvwire_codec::{file, DType, KvCache, KvShape, KvSpec, Layout, Part};

/// The real cache the statistics come from.
const SAMPLE: &[u8] = include_bytes!("../../../codec/testdata/smollm2-pydoc-256.safetensors");

/// A model's KV shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelShape {
    /// Name as given on the command line.
    pub(crate) name: &'static str,
    /// Layers.
    pub(crate) layers: usize,
    /// KV heads.
    pub(crate) kv_heads: usize,
    /// Head dimension.
    pub(crate) head_dim: usize,
}

/// The known shapes.
pub(crate) const MODELS: [ModelShape; 5] = [
    ModelShape {
        name: "llama-3-8b",
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "llama-3-70b",
        layers: 80,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "mistral-7b",
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "qwen2.5-7b",
        layers: 28,
        kv_heads: 4,
        head_dim: 128,
    },
    ModelShape {
        name: "smollm2-135m",
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
    },
];

impl ModelShape {
    /// The shape called `name`.
    pub(crate) fn by_name(name: &str) -> Result<Self> {
        match MODELS.iter().find(|m| m.name == name) {
            Some(m) => Ok(*m),
            None => bail!(
                "unknown model shape {name:?} for --synthetic (known: {})",
                MODELS.map(|m| m.name).join(", ")
            ),
        }
    }
}

/// Statistics of one (layer, part) plane of the sample.
struct PlaneStats {
    mean: Vec<f32>,
    scale: Vec<f32>,
    /// Lag-1 autocorrelation over tokens of the standardized values, averaged over channels.
    rho: f32,
}

fn sample_stats() -> Result<(KvShape, Vec<PlaneStats>)> {
    let kv = file::read_safetensors(SAMPLE).context("reading the embedded sample")?;
    let view = kv.cache.view();
    let shape = kv.cache.spec().shape;
    let (t_n, c_n) = (shape.tokens, shape.channels());
    let mut planes = Vec::with_capacity(shape.layers * 2);
    let mut col = vec![0f32; t_n];
    for layer in 0..shape.layers {
        for part in [Part::K, Part::V] {
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
    Ok((shape, planes))
}

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Two standard normal samples (Box-Muller).
    fn normal_pair(&mut self) -> (f32, f32) {
        let r = (-2.0 * self.unit().ln()).sqrt();
        let a = std::f64::consts::TAU * self.unit();
        ((r * a.cos()) as f32, (r * a.sin()) as f32)
    }
}

/// A cache of `model`'s shape with `tokens` tokens (fp16, HF layout).
pub(crate) fn generate(model: ModelShape, tokens: usize, seed: u64) -> Result<KvCache> {
    let (src, stats) = sample_stats()?;
    let shape = KvShape::new(model.layers, model.kv_heads, tokens, model.head_dim);
    let spec = KvSpec {
        shape,
        layout: Layout::Hf,
        dtype: DType::F16,
    };
    shape.validate().context("synthetic shape")?;
    let mut rng = Rng(seed ^ 0x6b76_7769_7265);
    let d_n = model.head_dim;
    // AR(1) state of the current (layer, part, head), one per head dim.
    let mut state = vec![0f32; d_n];
    let mut spare: Option<f32> = None;
    let mut normal = move |rng: &mut Rng| -> f32 {
        if let Some(x) = spare.take() {
            return x;
        }
        let (a, b) = rng.normal_pair();
        spare = Some(b);
        a
    };
    // Memory order of the HF layout: [layer, part, head, token, dim].
    let per_head = tokens * d_n;
    let cache = KvCache::from_fn(spec, |i| {
        let dim = i % d_n;
        let token = (i / d_n) % tokens;
        let head = (i / per_head) % model.kv_heads;
        let plane = i / (per_head * model.kv_heads);
        let (layer, part) = (plane / 2, plane % 2);
        let src_layer = layer * src.layers / model.layers;
        let src_channel = (head % src.kv_heads) * src.head_dim + dim * src.head_dim / d_n;
        let st = &stats[src_layer * 2 + part];
        let e = normal(&mut rng);
        let z = if token == 0 {
            e
        } else {
            st.rho * state[dim] + (1.0 - st.rho * st.rho).sqrt() * e
        };
        state[dim] = z;
        st.mean[src_channel] + st.scale[src_channel] * z
    });
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_shaped() {
        let m = ModelShape::by_name("qwen2.5-7b").unwrap();
        let a = generate(m, 16, 7).unwrap();
        let b = generate(m, 16, 7).unwrap();
        let c = generate(m, 16, 8).unwrap();
        assert_eq!(a.spec().shape, KvShape::new(28, 4, 16, 128));
        assert_eq!(a.bytes(), b.bytes());
        assert_ne!(a.bytes(), c.bytes());
        assert!(ModelShape::by_name("gpt-5").is_err());
    }
}
