//! Synthetic KV caches of real models' shapes, generated from the statistics of the embedded
//! real cache (SmolLM2-135M, 256 tokens): per-(layer, K|V, channel) mean and scale, and the
//! token-to-token correlation per (layer, K|V), reproduced by an AR(1) process per channel.
//! Deterministic for a given seed. Compressibility follows the real cache far better than
//! uniform noise would (which no entropy coder can shrink).

use anyhow::{bail, Context, Result};
use kvwire_codec::synthetic::{plane_stats, PlaneStats, SplitMix64};
use kvwire_codec::{file, DType, KvCache, KvShape, KvSpec, Layout};

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

fn sample_stats() -> Result<(KvShape, Vec<PlaneStats>)> {
    let kv = file::read_safetensors(SAMPLE).context("reading the embedded sample")?;
    Ok(plane_stats(&kv.cache.view()))
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
    let mut rng = SplitMix64(seed ^ 0x6b76_7769_7265);
    let d_n = model.head_dim;
    // AR(1) state of the current (layer, part, head), one per head dim.
    let mut state = vec![0f32; d_n];
    let mut spare: Option<f32> = None;
    let mut normal = move |rng: &mut SplitMix64| -> f32 {
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
