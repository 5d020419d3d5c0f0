//! KV files: `.safetensors` holding one tensor `kv`.
//!
//! The tensor is `[layers, 2, kv_heads, tokens, head_dim]` (metadata `layout` = `hf`, the
//! default) or `[layers, 2, tokens, kv_heads, head_dim]` (`layout` = `vllm`), dtype F16, BF16
//! or F32. Metadata `model` names the model; other metadata entries are kept as they are.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype as StDtype, SafeTensors};

use crate::dtype::DType;
use crate::error::{CodecError, Result};
use crate::layout::{KvCache, KvShape, KvSpec, KvView, Layout};

/// Name of the one tensor in a KV file.
pub const TENSOR_NAME: &str = "kv";

/// A KV cache with its file metadata.
#[derive(Debug, Clone)]
pub struct KvFile {
    /// The cache.
    pub cache: KvCache,
    /// Every metadata entry of the file (`layout` and `model` included).
    pub metadata: HashMap<String, String>,
}

impl KvFile {
    /// The `model` metadata entry, if any.
    pub fn model(&self) -> Option<&str> {
        self.metadata.get("model").map(String::as_str)
    }
}

fn st_err(e: impl std::fmt::Display) -> CodecError {
    CodecError::SafeTensors(e.to_string())
}

/// A zero-copy view of the `kv` tensor of a safetensors buffer, and the file's metadata.
///
/// # Errors
/// [`CodecError::SafeTensors`] for a malformed file, a missing `kv` tensor, an unsupported
/// dtype or layout; [`CodecError::InvalidKv`] for a bad shape.
pub fn view_safetensors(buf: &[u8]) -> Result<(KvView<'_>, HashMap<String, String>)> {
    let (_, meta) = SafeTensors::read_metadata(buf).map_err(st_err)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(buf).map_err(st_err)?;
    let t = st
        .tensor(TENSOR_NAME)
        .map_err(|_| CodecError::SafeTensors(format!("no tensor named {TENSOR_NAME:?}")))?;
    let dtype = match t.dtype() {
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F32 => DType::F32,
        other => {
            return Err(CodecError::SafeTensors(format!(
                "tensor {TENSOR_NAME:?} has dtype {other:?}; expected F16, BF16 or F32"
            )))
        }
    };
    let layout = match metadata.get("layout") {
        None => Layout::Hf,
        Some(s) => s.parse().map_err(CodecError::SafeTensors)?,
    };
    let shape = KvShape::from_dims(t.shape(), layout)?;
    let view = KvView::new(
        KvSpec {
            shape,
            layout,
            dtype,
        },
        t.data(),
    )?;
    Ok((view, metadata))
}

/// Reads a KV file from a buffer (one copy of the tensor bytes).
///
/// # Errors
/// As [`view_safetensors`].
pub fn read_safetensors(buf: &[u8]) -> Result<KvFile> {
    let (view, metadata) = view_safetensors(buf)?;
    Ok(KvFile {
        cache: KvCache::from_bytes(*view.spec(), view.bytes().to_vec())?,
        metadata,
    })
}

/// Serializes `cache` as a KV file; `metadata`'s `layout` entry is set from the cache.
///
/// # Errors
/// [`CodecError::SafeTensors`] if serialization fails.
pub fn write_safetensors(cache: &KvCache, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let (tv, meta) = tensor_view(cache, metadata)?;
    safetensors::serialize([(TENSOR_NAME, tv)], Some(meta)).map_err(st_err)
}

/// The cache as the file's one tensor, and the file's metadata (`layout` set from it).
fn tensor_view<'a>(
    cache: &'a KvCache,
    metadata: &HashMap<String, String>,
) -> Result<(safetensors::tensor::TensorView<'a>, HashMap<String, String>)> {
    let spec = cache.spec();
    let dtype = match spec.dtype {
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F32 => StDtype::F32,
    };
    let mut meta = metadata.clone();
    meta.insert("layout".into(), spec.layout.name().into());
    let tv = safetensors::tensor::TensorView::new(
        dtype,
        spec.shape.dims(spec.layout).to_vec(),
        cache.bytes(),
    )
    .map_err(st_err)?;
    Ok((tv, meta))
}

/// Reads a KV file from disk.
///
/// # Errors
/// [`CodecError::Io`] or as [`read_safetensors`].
pub fn load(path: impl AsRef<Path>) -> Result<KvFile> {
    let p = path.as_ref();
    let buf = std::fs::read(p).map_err(|source| CodecError::Io {
        path: p.display().to_string(),
        source,
    })?;
    read_safetensors(&buf)
}

/// Writes a KV file to disk, the cache's bytes straight from its memory (a receiver saving
/// each cache it gets must not first copy, and fault in, a file-sized buffer).
///
/// # Errors
/// [`CodecError::Io`] or as [`write_safetensors`].
pub fn save(
    path: impl AsRef<Path>,
    cache: &KvCache,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let p = path.as_ref();
    let (tv, meta) = tensor_view(cache, metadata)?;
    safetensors::serialize_to_file([(TENSOR_NAME, tv)], Some(meta), p).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => CodecError::Io {
            path: p.display().to_string(),
            source,
        },
        e => st_err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> KvCache {
        let spec = KvSpec {
            shape: KvShape::new(2, 1, 8, 4),
            layout: Layout::Vllm,
            dtype: DType::BF16,
        };
        let bytes = (0..spec.byte_len()).map(|i| (i * 7) as u8).collect();
        KvCache::from_bytes(spec, bytes).unwrap()
    }

    #[test]
    fn a_saved_file_loads_back_as_written() {
        let kv = cache();
        let dir = std::env::temp_dir().join(format!("kvwire-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kv.safetensors");
        let meta = HashMap::from([("model".to_string(), "m".to_string())]);
        save(&path, &kv, &meta).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        // The streamed file is byte for byte the in-memory serialization.
        assert_eq!(on_disk, write_safetensors(&kv, &meta).unwrap());
        let back = load(&path).unwrap();
        assert_eq!(back.cache.spec(), kv.spec());
        assert_eq!(back.cache.bytes(), kv.bytes());
        assert_eq!(back.metadata.get("model").map(String::as_str), Some("m"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn saving_where_no_file_can_be_made_names_the_path() {
        let path = std::env::temp_dir().join("kvwire-no-such-dir/kv.safetensors");
        match save(&path, &cache(), &HashMap::new()) {
            Err(CodecError::Io { path: p, .. }) => assert!(p.contains("kvwire-no-such-dir"), "{p}"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }
}
