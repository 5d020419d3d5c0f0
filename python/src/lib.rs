//! `kvwire._kvwire`: the compiled half of the `kvwire` Python package.
//!
//! The Python half (`py/kvwire/__init__.py`) turns numpy arrays and torch tensors into flat
//! byte views plus a shape and dtype, and reshapes what comes back; this half does the work
//! with the GIL released: encode and decode (`codec`), shipping a KV cache whole or layer by
//! layer (`transfer`). Errors surface as `kvwire.KvwireError` subclasses carrying the Rust
//! message.

mod codec;
mod convert;
mod transfer;

use pyo3::prelude::*;

pyo3::create_exception!(
    _kvwire,
    KvwireError,
    pyo3::exceptions::PyException,
    "Base class of every kvwire error."
);
pyo3::create_exception!(
    _kvwire,
    CodecError,
    KvwireError,
    "A bitstream could not be encoded or decoded (corrupt, truncated, unsupported)."
);
pyo3::create_exception!(
    _kvwire,
    TransportError,
    KvwireError,
    "A transfer failed: the peer refused, aborted, closed or the connection broke."
);
pyo3::create_exception!(
    _kvwire,
    TransferTimeout,
    TransportError,
    "A wait for the peer (connect, accept, a layer, the completion) ran past its timeout."
);

/// The compiled module.
#[pymodule]
fn _kvwire(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KvwireError", py.get_type::<KvwireError>())?;
    m.add("CodecError", py.get_type::<CodecError>())?;
    m.add("TransportError", py.get_type::<TransportError>())?;
    m.add("TransferTimeout", py.get_type::<TransferTimeout>())?;
    m.add("PROTOCOL_VERSION", kvwire_transport::PROTOCOL_VERSION)?;
    m.add("FORMAT_VERSION", kvwire_codec::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(codec::encode_flat, m)?)?;
    m.add_function(wrap_pyfunction!(codec::decode_flat, m)?)?;
    m.add_function(wrap_pyfunction!(codec::header, m)?)?;
    m.add_function(wrap_pyfunction!(codec::levels, m)?)?;
    m.add_class::<transfer::Sender>()?;
    m.add_class::<transfer::Receiver>()?;
    Ok(())
}
