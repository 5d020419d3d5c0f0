//! Whole-cache encode and decode over flat byte views (the Python half does the shapes).

use kvwire_codec::{Decoder, EncodeOptions, Encoder, KvView, Level};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::convert::{self, codec_err, decode_err};

/// Encodes a KV cache given as its bytes (C order) plus full dims, layout and dtype.
///
/// The GIL is released while encoding; the input is read in place.
#[pyfunction]
#[pyo3(signature = (data, dims, layout, dtype, level, chunk_tokens, channel_scale_k=false, bins=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_flat<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
    dims: Vec<usize>,
    layout: &str,
    dtype: &str,
    level: &str,
    chunk_tokens: usize,
    channel_scale_k: bool,
    bins: Option<(Vec<u8>, Vec<u8>)>,
) -> PyResult<Bound<'py, PyBytes>> {
    let spec = convert::spec(&dims, layout, dtype)?;
    let opts = EncodeOptions {
        level: convert::level(level)?,
        chunk_tokens,
        channel_scale_k,
    };
    let bytes = data.as_slice()?;
    let out = py.detach(|| {
        let view = KvView::new(spec, bytes)?;
        match &bins {
            None => kvwire_codec::encode(&view, &opts),
            Some((k, v)) => Encoder::with_bins(spec, &opts, k, v)?.encode(&view),
        }
    });
    Ok(PyBytes::new(py, &out.map_err(codec_err)?))
}

/// Decodes a bitstream; returns the cache's bytes (a new uint8 array, no further copy) and
/// its spec as a dict.
#[pyfunction]
pub(crate) fn decode_flat<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, Bound<'py, PyDict>)> {
    let bytes = data.as_slice()?;
    let cache = py
        .detach(|| kvwire_codec::decode(bytes))
        .map_err(codec_err)?;
    let spec = *cache.spec();
    let arr = PyArray1::from_vec(py, cache.into_bytes());
    Ok((arr, convert::spec_dict(py, &spec)?))
}

/// Reads a bitstream's header only: spec, level, chunk tokens, bins per layer.
#[pyfunction]
pub(crate) fn header<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
) -> PyResult<Bound<'py, PyDict>> {
    let (dec, _) = Decoder::new(data.as_slice()?).map_err(decode_err)?;
    let h = dec.header();
    let d = convert::spec_dict(py, &h.spec)?;
    d.set_item("level", h.level.name())?;
    d.set_item("chunk_tokens", h.chunk_tokens)?;
    let bins: Vec<(u32, u32)> = (0..h.spec.shape.layers).map(|l| h.layer_bins(l)).collect();
    d.set_item("bins", bins)?;
    Ok(d)
}

/// Every level's name, from largest output to smallest.
#[pyfunction]
pub(crate) fn levels() -> Vec<&'static str> {
    Level::ALL.iter().map(|l| l.name()).collect()
}

/// Refuses a chunk size the codec cannot use (as `Encoder::new` would), so that a `Sender`
/// fails as it is made, with a ValueError, rather than at its first transfer.
pub(crate) fn check_chunk_tokens(chunk_tokens: usize) -> PyResult<()> {
    let most = kvwire_codec::container::MAX_CHUNK_TOKENS as usize;
    if (1..=most).contains(&chunk_tokens) {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "chunk_tokens must be in 1..={most}, got {chunk_tokens}"
        )))
    }
}
