//! Conversions between Python arguments and kvwire types, and errors into exceptions.

use std::time::Duration;

use kvwire_codec::{CodecError, DType, DecodeError, KvShape, KvSpec, Layout, Level};
use kvwire_transport::{FabricKind, TransportError};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A codec error as `kvwire.CodecError` (or `ValueError` for bad arguments).
pub(crate) fn codec_err(e: CodecError) -> PyErr {
    match e {
        CodecError::InvalidKv(_) | CodecError::Unsupported(_) | CodecError::NonFinite { .. } => {
            PyValueError::new_err(e.to_string())
        }
        CodecError::Decode(d) => decode_err(d),
        other => crate::CodecError::new_err(other.to_string()),
    }
}

/// A decode error as `kvwire.CodecError`.
pub(crate) fn decode_err(e: DecodeError) -> PyErr {
    crate::CodecError::new_err(e.to_string())
}

/// A transport error as `kvwire.TransferTimeout` or `kvwire.TransportError`.
pub(crate) fn transport_err(e: TransportError) -> PyErr {
    match e {
        TransportError::Timeout(..) => crate::TransferTimeout::new_err(e.to_string()),
        other => crate::TransportError::new_err(other.to_string()),
    }
}

/// Parses a level name (`raw`, `q8`, `cg-high`, `cg-default`, `cg-low`, `lmcache`).
pub(crate) fn level(name: &str) -> PyResult<Level> {
    name.parse().map_err(PyValueError::new_err)
}

/// Parses a fabric name (`tcp` or `shm`).
pub(crate) fn fabric(name: &str) -> PyResult<FabricKind> {
    match name {
        "tcp" => Ok(FabricKind::Tcp),
        "shm" => Ok(FabricKind::Shm),
        "verbs" => Err(PyValueError::new_err(
            "fabric \"verbs\" is not available in this build (RDMA support is not built yet); use \"tcp\" or \"shm\"",
        )),
        other => Err(PyValueError::new_err(format!(
            "unknown fabric {other:?} (expected \"tcp\" or \"shm\")"
        ))),
    }
}

/// A timeout in seconds as a `Duration`, refusing what `Duration` cannot hold or what would
/// make a wait meaningless.
pub(crate) fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    if s.is_finite() && s > 0.0 && s <= 86_400.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(PyValueError::new_err(format!(
            "{what} must be between 0 and 86400 seconds, got {s}"
        )))
    }
}

/// The spec of a cache given as full 5-d dims (`[layers, 2, kv_heads, tokens, head_dim]` for
/// `hf`, `[layers, 2, tokens, kv_heads, head_dim]` for `vllm`), a layout and a dtype name.
pub(crate) fn spec(dims: &[usize], layout: &str, dtype: &str) -> PyResult<KvSpec> {
    let layout: Layout = layout.parse().map_err(PyValueError::new_err)?;
    let dtype: DType = dtype.parse().map_err(PyValueError::new_err)?;
    let shape = KvShape::from_dims(dims, layout).map_err(codec_err)?;
    let spec = KvSpec {
        shape,
        layout,
        dtype,
    };
    shape.validate().map_err(codec_err)?;
    Ok(spec)
}

/// The full dims of a cache in its layout.
pub(crate) fn dims(spec: &KvSpec) -> [usize; 5] {
    let s = spec.shape;
    match spec.layout {
        Layout::Hf => [s.layers, 2, s.kv_heads, s.tokens, s.head_dim],
        Layout::Vllm => [s.layers, 2, s.tokens, s.kv_heads, s.head_dim],
    }
}

/// A spec as a dict: `shape` (full dims), `layout`, `dtype`, and the named sizes.
pub(crate) fn spec_dict<'py>(py: Python<'py>, spec: &KvSpec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("shape", dims(spec).to_vec())?;
    d.set_item("layout", spec.layout.name())?;
    d.set_item("dtype", spec.dtype.name())?;
    d.set_item("layers", spec.shape.layers)?;
    d.set_item("kv_heads", spec.shape.kv_heads)?;
    d.set_item("tokens", spec.shape.tokens)?;
    d.set_item("head_dim", spec.shape.head_dim)?;
    Ok(d)
}
