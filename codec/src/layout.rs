//! Typed views of a KV cache over its bytes, in the Hugging Face and vLLM layouts.
//!
//! A KV cache holds, for every layer, a key tensor and a value tensor of `tokens × kv_heads ×
//! head_dim` elements. Two memory orders are common:
//!
//! | layout | shape | a token's channels |
//! |---|---|---|
//! | [`Layout::Hf`] (Hugging Face) | `[layers, 2, kv_heads, tokens, head_dim]` | `kv_heads` runs of `head_dim` elements |
//! | [`Layout::Vllm`] | `[layers, 2, tokens, kv_heads, head_dim]` | one run of `kv_heads·head_dim` elements |
//!
//! The codec works on *rows*: the `channels = kv_heads·head_dim` values of one token in one
//! layer's K (or V), channel `c = h·head_dim + d` as in CacheGen. [`KvView::row_runs`] says where
//! a row's elements lie, so both layouts are read and written in place, without a transposing copy.

use crate::dtype::DType;
use crate::error::{CodecError, Result};

/// Memory order of a KV cache (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// `[layers, 2, kv_heads, tokens, head_dim]`.
    #[default]
    Hf,
    /// `[layers, 2, tokens, kv_heads, head_dim]`.
    Vllm,
}

impl Layout {
    /// Code stored in the bitstream header.
    pub const fn code(self) -> u8 {
        match self {
            Self::Hf => 1,
            Self::Vllm => 2,
        }
    }
    /// The layout of a header code.
    pub const fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Hf),
            2 => Some(Self::Vllm),
            _ => None,
        }
    }
    /// `hf` or `vllm`, as in the safetensors metadata.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hf => "hf",
            Self::Vllm => "vllm",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hf" => Ok(Self::Hf),
            "vllm" => Ok(Self::Vllm),
            other => Err(format!("unknown layout {other:?} (expected hf or vllm)")),
        }
    }
}

/// Key or value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The key tensor (axis-1 index 0).
    K = 0,
    /// The value tensor (axis-1 index 1).
    V = 1,
}

impl Part {
    /// Both parts, in storage order.
    pub const BOTH: [Self; 2] = [Self::K, Self::V];
    /// `K` or `V`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::K => "K",
            Self::V => "V",
        }
    }
}

/// Dimensions of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvShape {
    /// Transformer layers.
    pub layers: usize,
    /// Key/value heads (after grouped-query sharing).
    pub kv_heads: usize,
    /// Tokens in the cache.
    pub tokens: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// Upper bound on the elements of a cache the codec accepts (2^40, 2 TiB of fp16), so that
/// index arithmetic can never overflow and header-derived sizes stay plausible.
pub(crate) const MAX_ELEMENTS: u64 = 1 << 40;

impl KvShape {
    /// A shape; see [`Self::validate`].
    pub const fn new(layers: usize, kv_heads: usize, tokens: usize, head_dim: usize) -> Self {
        Self {
            layers,
            kv_heads,
            tokens,
            head_dim,
        }
    }

    /// Channels per row: `kv_heads · head_dim`.
    pub const fn channels(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Elements in the whole cache (K and V of every layer).
    pub const fn elements(&self) -> usize {
        self.layers * 2 * self.tokens * self.channels()
    }

    /// Elements of one layer (K and V).
    pub const fn layer_elements(&self) -> usize {
        2 * self.tokens * self.channels()
    }

    /// The 5-D tensor shape in `layout`.
    pub const fn dims(&self, layout: Layout) -> [usize; 5] {
        match layout {
            Layout::Hf => [self.layers, 2, self.kv_heads, self.tokens, self.head_dim],
            Layout::Vllm => [self.layers, 2, self.tokens, self.kv_heads, self.head_dim],
        }
    }

    /// The shape of 5-D dims given in `layout`.
    pub fn from_dims(dims: &[usize], layout: Layout) -> Result<Self> {
        let [l, two, a, b, d] = dims else {
            return Err(CodecError::InvalidKv(format!(
                "expected a 5-D tensor, got shape {dims:?}"
            )));
        };
        if *two != 2 {
            return Err(CodecError::InvalidKv(format!(
                "axis 1 must be 2 (K, V), got shape {dims:?}"
            )));
        }
        let s = match layout {
            Layout::Hf => Self::new(*l, *a, *b, *d),
            Layout::Vllm => Self::new(*l, *b, *a, *d),
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks that no dimension is zero and the element count is below `MAX_ELEMENTS`
    /// (2^40).
    pub fn validate(&self) -> Result<()> {
        let dims = [self.layers, self.kv_heads, self.tokens, self.head_dim];
        if dims.contains(&0) {
            return Err(CodecError::InvalidKv(format!("zero dimension in {self:?}")));
        }
        let n = dims
            .iter()
            .try_fold(2u64, |acc, &d| acc.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if n > MAX_ELEMENTS {
            return Err(CodecError::InvalidKv(format!(
                "{n} elements exceed the limit of {MAX_ELEMENTS}"
            )));
        }
        Ok(())
    }
}

/// Where one row (one token's channels of one layer's K or V) lies, in elements: `runs` runs
/// of `run_len` contiguous elements, the first at `start`, each next one `stride` further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRuns {
    /// Element index of the row's first element.
    pub start: usize,
    /// Contiguous elements per run.
    pub run_len: usize,
    /// Elements between the starts of consecutive runs.
    pub stride: usize,
    /// Number of runs.
    pub runs: usize,
}

/// Shape, layout and dtype: everything needed to interpret a KV cache's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvSpec {
    /// Dimensions.
    pub shape: KvShape,
    /// Memory order.
    pub layout: Layout,
    /// Element type.
    pub dtype: DType,
}

impl KvSpec {
    /// Bytes of the whole cache.
    pub const fn byte_len(&self) -> usize {
        self.shape.elements() * self.dtype.size()
    }

    /// Where the row of (`layer`, `part`, `token`) lies.
    #[inline]
    pub const fn row_runs(&self, layer: usize, part: Part, token: usize) -> RowRuns {
        let s = &self.shape;
        let plane = (layer * 2 + part as usize) * s.tokens * s.channels();
        match self.layout {
            Layout::Hf => RowRuns {
                start: plane + token * s.head_dim,
                run_len: s.head_dim,
                stride: s.tokens * s.head_dim,
                runs: s.kv_heads,
            },
            Layout::Vllm => RowRuns {
                start: plane + token * s.channels(),
                run_len: s.channels(),
                stride: s.channels(),
                runs: 1,
            },
        }
    }

    /// Element index of (`layer`, `part`, `token`, `channel`).
    #[inline]
    pub const fn index(&self, layer: usize, part: Part, token: usize, channel: usize) -> usize {
        let r = self.row_runs(layer, part, token);
        r.start + (channel / r.run_len) * r.stride + channel % r.run_len
    }

    /// The element range of `layer` (K then V): layers are contiguous in both layouts.
    pub const fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        let n = self.shape.layer_elements();
        layer * n..(layer + 1) * n
    }
}

/// A borrowed, typed view of a KV cache's bytes (no copy).
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    spec: KvSpec,
    data: &'a [u8],
}

impl<'a> KvView<'a> {
    /// A view of `data` as a cache of `spec`.
    ///
    /// # Errors
    /// [`CodecError::InvalidKv`] if the shape is invalid or `data` is not exactly its size.
    pub fn new(spec: KvSpec, data: &'a [u8]) -> Result<Self> {
        spec.shape.validate()?;
        if data.len() != spec.byte_len() {
            return Err(CodecError::InvalidKv(format!(
                "{} bytes do not hold a {:?} {} cache ({} bytes expected)",
                data.len(),
                spec.shape.dims(spec.layout),
                spec.dtype,
                spec.byte_len()
            )));
        }
        Ok(Self { spec, data })
    }

    /// Shape, layout and dtype.
    pub const fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// The raw little-endian bytes.
    pub const fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Reads the row of (`layer`, `part`, `token`) as `f32` into `out` (`channels` long).
    #[inline]
    pub fn read_row(&self, layer: usize, part: Part, token: usize, out: &mut [f32]) {
        let r = self.spec.row_runs(layer, part, token);
        let es = self.spec.dtype.size();
        for (i, chunk) in out.chunks_exact_mut(r.run_len).enumerate().take(r.runs) {
            let at = (r.start + i * r.stride) * es;
            self.spec
                .dtype
                .load_f32(&self.data[at..at + r.run_len * es], chunk);
        }
    }

    /// Copies the raw bytes of the row of (`layer`, `part`, `token`) into `out`, channel order.
    pub fn copy_row_bytes(&self, layer: usize, part: Part, token: usize, out: &mut [u8]) {
        let r = self.spec.row_runs(layer, part, token);
        let es = self.spec.dtype.size();
        let n = r.run_len * es;
        for (i, chunk) in out.chunks_exact_mut(n).enumerate().take(r.runs) {
            let at = (r.start + i * r.stride) * es;
            chunk.copy_from_slice(&self.data[at..at + n]);
        }
    }

    /// The value at (`layer`, `part`, `token`, `channel`) as `f32` (slow; for tests and tools).
    pub fn get(&self, layer: usize, part: Part, token: usize, channel: usize) -> f32 {
        let es = self.spec.dtype.size();
        let at = self.spec.index(layer, part, token, channel) * es;
        let mut v = [0f32];
        self.spec.dtype.load_f32(&self.data[at..at + es], &mut v);
        v[0]
    }

    /// Copies this view into another layout (and the same dtype).
    pub fn to_layout(&self, layout: Layout) -> KvCache {
        let mut spec = self.spec;
        spec.layout = layout;
        let mut out = KvCache::zeroed(spec);
        let s = self.spec.shape;
        let mut row = vec![0u8; s.channels() * spec.dtype.size()];
        for l in 0..s.layers {
            for p in Part::BOTH {
                for t in 0..s.tokens {
                    self.copy_row_bytes(l, p, t, &mut row);
                    out.write_row_bytes(l, p, t, &row);
                }
            }
        }
        out
    }
}

/// An owned KV cache: its spec and its little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCache {
    spec: KvSpec,
    data: Vec<u8>,
}

impl KvCache {
    /// A cache of `spec` filled with zeros.
    ///
    /// # Panics
    /// If the shape is invalid (check with [`KvShape::validate`] first).
    pub fn zeroed(spec: KvSpec) -> Self {
        spec.shape.validate().expect("validated shape");
        Self {
            spec,
            data: vec![0; spec.byte_len()],
        }
    }

    /// A cache of `spec` filled with zeros, or an error if the memory cannot be had.
    ///
    /// # Errors
    /// [`CodecError::InvalidKv`] for an invalid shape, [`CodecError::Alloc`] if allocation fails.
    pub fn try_zeroed(spec: KvSpec) -> Result<Self> {
        spec.shape.validate()?;
        let bytes = spec.byte_len();
        let mut data = Vec::new();
        data.try_reserve_exact(bytes)
            .map_err(|_| CodecError::Alloc { bytes })?;
        data.resize(bytes, 0);
        Ok(Self { spec, data })
    }

    /// Takes ownership of `data` as a cache of `spec`.
    ///
    /// # Errors
    /// As [`KvView::new`].
    pub fn from_bytes(spec: KvSpec, data: Vec<u8>) -> Result<Self> {
        KvView::new(spec, &data)?;
        Ok(Self { spec, data })
    }

    /// A cache of `spec` whose element `i` (in memory order) is `f(i)`, rounded to the dtype.
    pub fn from_fn(spec: KvSpec, mut f: impl FnMut(usize) -> f32) -> Self {
        let mut c = Self::zeroed(spec);
        let es = spec.dtype.size();
        for (i, e) in c.data.chunks_exact_mut(es).enumerate() {
            let bits = spec.dtype.bits_from_f32(f(i)).to_le_bytes();
            e.copy_from_slice(&bits[..es]);
        }
        c
    }

    /// Shape, layout and dtype.
    pub const fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// A borrowed view.
    pub fn view(&self) -> KvView<'_> {
        KvView {
            spec: self.spec,
            data: &self.data,
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The bytes, mutable (same length).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Gives the bytes back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Writes the raw bytes of one row (channel order) into place.
    pub fn write_row_bytes(&mut self, layer: usize, part: Part, token: usize, row: &[u8]) {
        write_row_bytes(&self.spec, &mut self.data, layer, part, token, row);
    }
}

/// Writes the raw bytes of one row (channel order) into a cache's bytes `data` of `spec`.
pub(crate) fn write_row_bytes(
    spec: &KvSpec,
    data: &mut [u8],
    layer: usize,
    part: Part,
    token: usize,
    row: &[u8],
) {
    let r = spec.row_runs(layer, part, token);
    let es = spec.dtype.size();
    let n = r.run_len * es;
    for (i, chunk) in row.chunks_exact(n).enumerate().take(r.runs) {
        let at = (r.start + i * r.stride) * es;
        data[at..at + n].copy_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_and_vllm_index_the_same_element() {
        let shape = KvShape::new(2, 3, 5, 4);
        let hf = KvSpec {
            shape,
            layout: Layout::Hf,
            dtype: DType::F32,
        };
        let c = KvCache::from_fn(hf, |i| i as f32);
        let v = c.view().to_layout(Layout::Vllm);
        for l in 0..2 {
            for p in Part::BOTH {
                for t in 0..5 {
                    for ch in 0..12 {
                        assert_eq!(c.view().get(l, p, t, ch), v.view().get(l, p, t, ch));
                    }
                }
            }
        }
        // HF element (l=1, V, h=2, t=3, d=1) sits at the C-order offset of that index.
        let (l, s, h, t, d) = (1, 1, 2, 3, 1);
        let want = (((l * 2 + s) * 3 + h) * 5 + t) * 4 + d;
        assert_eq!(hf.index(1, Part::V, 3, 2 * 4 + 1), want);
        assert_eq!(
            c.view()
                .to_layout(Layout::Vllm)
                .view()
                .to_layout(Layout::Hf),
            c
        );
    }

    #[test]
    fn shape_rejects_zero_and_huge() {
        assert!(KvShape::new(0, 1, 1, 1).validate().is_err());
        assert!(KvShape::new(1 << 20, 1 << 10, 1 << 10, 1 << 10)
            .validate()
            .is_err());
        assert!(KvShape::from_dims(&[1, 3, 1, 1, 1], Layout::Hf).is_err());
    }
}
