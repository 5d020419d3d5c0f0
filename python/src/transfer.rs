//! `Sender` and `Receiver`: a KV cache shipped whole or layer by layer over a kvwire
//! connection (TCP or shared memory), every wait bounded and run with the GIL released.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvwire_codec::{EncodeOptions, KvSpec, KvView};
use kvwire_transport::session::{
    send_kv, KvReceiver, KvSender, RecvOptions, RecvSlots, RecvStats, SendOptions, SendStats,
};
use kvwire_transport::{Connection, Endpoint, EndpointConfig, Listener, TransportError};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{self, codec_err, transport_err};

/// A layer-by-layer transfer in progress: the sender and the spec its layers must match.
type Streaming<'c> = Option<(KvSender<'c>, KvSpec)>;

self_cell::self_cell!(
    /// A connection and the transfer (if any) that borrows it.
    struct SendState {
        owner: Connection,
        #[not_covariant]
        dependent: Streaming,
    }
);

fn endpoint_config(
    fabric: &str,
    token: Option<&str>,
    timeout: f64,
    streams: u16,
) -> PyResult<EndpointConfig> {
    let mut cfg = EndpointConfig::new(convert::fabric(fabric)?);
    cfg.token = token.map(|t| t.as_bytes().to_vec());
    cfg.timeout = convert::seconds("timeout", timeout)?;
    // Checked here too (the endpoint would refuse it) so that it is a ValueError.
    let most = kvwire_transport::proto::handshake::MAX_STREAMS;
    if !(1..=most).contains(&streams) {
        return Err(PyValueError::new_err(format!(
            "streams must be in 1..={most}, got {streams}"
        )));
    }
    cfg.streams = streams;
    Ok(cfg)
}

fn closed() -> PyErr {
    PyRuntimeError::new_err("this kvwire connection is closed")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock can only come from a bug; the state it guards is
    // still consistent (every update is a single assignment), so keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn send_stats<'py>(py: Python<'py>, st: &SendStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("blocks", st.blocks)?;
    d.set_item("wire_bytes", st.wire_bytes)?;
    d.set_item("input_bytes", st.input_bytes)?;
    d.set_item("elapsed_s", st.elapsed.as_secs_f64())?;
    d.set_item("receiver_decode_s", st.receiver_decode.as_secs_f64())?;
    Ok(d)
}

fn recv_stats<'py>(py: Python<'py>, st: &RecvStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("blocks", st.blocks)?;
    d.set_item("wire_bytes", st.wire_bytes)?;
    d.set_item("elapsed_s", st.elapsed.as_secs_f64())?;
    Ok(d)
}

/// The sending side of a kvwire connection (compiled half of `kvwire.Sender`).
#[pyclass(module = "kvwire._kvwire", name = "Sender")]
pub(crate) struct Sender {
    state: Mutex<Option<SendState>>,
    opts: SendOptions,
    peer: String,
    // The endpoint owns the registered regions the connection's sends come from.
    _ep: Endpoint,
}

#[pymethods]
impl Sender {
    #[new]
    #[pyo3(signature = (connect, token=None, fabric="tcp", level="cg-default", chunk_tokens=256, threads=0, timeout=5.0, streams=2, channel_scale_k=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        connect: &str,
        token: Option<&str>,
        fabric: &str,
        level: &str,
        chunk_tokens: usize,
        threads: usize,
        timeout: f64,
        streams: u16,
        channel_scale_k: bool,
    ) -> PyResult<Self> {
        crate::codec::check_chunk_tokens(chunk_tokens)?;
        let cfg = endpoint_config(fabric, token, timeout, streams)?;
        let mut opts = SendOptions::new(EncodeOptions {
            level: convert::level(level)?,
            chunk_tokens,
            channel_scale_k,
        });
        opts.threads = threads;
        opts.timeout = cfg.timeout;
        let ep = Endpoint::new(cfg).map_err(transport_err)?;
        let conn = py.detach(|| ep.connect(connect)).map_err(transport_err)?;
        Ok(Self {
            state: Mutex::new(Some(SendState::new(conn, |_| None))),
            opts,
            peer: connect.to_string(),
            _ep: ep,
        })
    }

    /// The address this sender connected to.
    #[getter]
    fn peer(&self) -> &str {
        &self.peer
    }

    /// Ships a whole cache given as its bytes plus dims, layout and dtype.
    #[pyo3(signature = (data, dims, layout, dtype, level=None, channel_scale_k=None))]
    #[allow(clippy::too_many_arguments)]
    fn send<'py>(
        &self,
        py: Python<'py>,
        data: PyReadonlyArray1<'py, u8>,
        dims: Vec<usize>,
        layout: &str,
        dtype: &str,
        level: Option<&str>,
        channel_scale_k: Option<bool>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let spec = convert::spec(&dims, layout, dtype)?;
        let opts = self.opts_for(level, channel_scale_k)?;
        let bytes = data.as_slice()?;
        let view = KvView::new(spec, bytes).map_err(codec_err)?;
        let st = py.detach(|| -> PyResult<SendStats> {
            let mut g = lock(&self.state);
            let state = g.as_mut().ok_or_else(closed)?;
            state.with_dependent_mut(|conn, streaming| {
                if streaming.is_some() {
                    return Err(PyRuntimeError::new_err(
                        "a layer-by-layer transfer is in progress: finish() it first",
                    ));
                }
                send_kv(conn, &view, &opts).map_err(transport_err)
            })
        })?;
        send_stats(py, &st)
    }

    /// Starts a layer-by-layer transfer of a cache with these dims, layout and dtype.
    #[pyo3(signature = (dims, layout, dtype, level=None, channel_scale_k=None))]
    fn begin(
        &self,
        py: Python<'_>,
        dims: Vec<usize>,
        layout: &str,
        dtype: &str,
        level: Option<&str>,
        channel_scale_k: Option<bool>,
    ) -> PyResult<()> {
        let spec = convert::spec(&dims, layout, dtype)?;
        let opts = self.opts_for(level, channel_scale_k)?;
        py.detach(|| {
            let mut g = lock(&self.state);
            let state = g.as_mut().ok_or_else(closed)?;
            state.with_dependent_mut(|conn, streaming| {
                if streaming.is_some() {
                    return Err(PyRuntimeError::new_err(
                        "a layer-by-layer transfer is already in progress",
                    ));
                }
                let tx = KvSender::begin(conn, spec, &opts).map_err(transport_err)?;
                *streaming = Some((tx, spec));
                Ok(())
            })
        })
    }

    /// Encodes and sends layer `layer`: `k` alone holds the whole layer (K then V), or `k`
    /// and `v` hold one half each. Returns once the layer's blocks are posted.
    #[pyo3(signature = (layer, k, v=None))]
    fn send_layer<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        k: PyReadonlyArray1<'py, u8>,
        v: Option<PyReadonlyArray1<'py, u8>>,
    ) -> PyResult<()> {
        let k = k.as_slice()?;
        let v = v.as_ref().map(|v| v.as_slice()).transpose()?;
        py.detach(|| {
            let mut g = lock(&self.state);
            let state = g.as_mut().ok_or_else(closed)?;
            state.with_dependent_mut(|_, streaming| {
                let Some((tx, spec)) = streaming.as_mut() else {
                    return Err(PyRuntimeError::new_err(
                        "send_layer() before begin(): no transfer in progress",
                    ));
                };
                if layer >= spec.shape.layers {
                    return Err(PyValueError::new_err(format!(
                        "layer {layer} out of range: the cache has {} layers",
                        spec.shape.layers
                    )));
                }
                let mut one = *spec;
                one.shape.layers = 1;
                let want = one.byte_len();
                let joined;
                let bytes: &[u8] = match v {
                    None => k,
                    Some(v) => {
                        if k.len() != want / 2 || v.len() != want / 2 {
                            return Err(PyValueError::new_err(format!(
                                "layer {layer}: K and V must hold {} bytes each, got {} and {}",
                                want / 2,
                                k.len(),
                                v.len()
                            )));
                        }
                        joined = [k, v].concat();
                        &joined
                    }
                };
                if bytes.len() != want {
                    return Err(PyValueError::new_err(format!(
                        "layer {layer}: expected {want} bytes (K and V), got {}",
                        bytes.len()
                    )));
                }
                let view = KvView::new(one, bytes).map_err(codec_err)?;
                let r = tx.push_layer(layer, &view).map_err(transport_err);
                if r.is_err() {
                    // The transfer is dead (the sender told the peer why); a new one may begin.
                    *streaming = None;
                }
                r
            })
        })
    }

    /// Waits for the receiver to confirm every block decoded; returns the transfer's stats.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = py.detach(|| {
            let mut g = lock(&self.state);
            let state = g.as_mut().ok_or_else(closed)?;
            state.with_dependent_mut(|_, streaming| {
                let (tx, _) = streaming.take().ok_or_else(|| {
                    PyRuntimeError::new_err("finish() without a transfer in progress")
                })?;
                tx.finish().map_err(transport_err)
            })
        })?;
        send_stats(py, &st)
    }

    /// Ends the connection (an unfinished transfer is abandoned; the receiver sees it end).
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            if let Some(state) = lock(&self.state).take() {
                state.borrow_owner().close("sender closed");
            }
        });
    }
}

impl Sender {
    fn opts_for(
        &self,
        level: Option<&str>,
        channel_scale_k: Option<bool>,
    ) -> PyResult<SendOptions> {
        let mut opts = self.opts.clone();
        if let Some(l) = level {
            opts.encode.level = convert::level(l)?;
        }
        if let Some(k) = channel_scale_k {
            opts.encode.channel_scale_k = k;
        }
        Ok(opts)
    }
}

struct RecvState {
    slots: RecvSlots,
    listener: Listener,
    conn: Option<Connection>,
    transfer: Option<KvReceiver>,
    opts: RecvOptions,
}

/// The receiving side: listens, accepts senders, hands out layers in order (compiled half of
/// `kvwire.Receiver`).
#[pyclass(module = "kvwire._kvwire", name = "Receiver")]
pub(crate) struct Receiver {
    state: Mutex<Option<RecvState>>,
    addr: SocketAddr,
    _ep: Endpoint,
}

/// How often a long wait for a peer checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(200);

#[pymethods]
impl Receiver {
    #[new]
    #[pyo3(signature = (listen, token=None, fabric="tcp", slots=16, slot_size=4 << 20, threads=0, timeout=5.0, max_kv_bytes=64 << 30, streams=2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        listen: &str,
        token: Option<&str>,
        fabric: &str,
        slots: u16,
        slot_size: u64,
        threads: usize,
        timeout: f64,
        max_kv_bytes: u64,
        streams: u16,
    ) -> PyResult<Self> {
        let cfg = endpoint_config(fabric, token, timeout, streams)?;
        let most = kvwire_transport::session::msg::MAX_SLOTS;
        if !(1..=most).contains(&slots) {
            return Err(PyValueError::new_err(format!(
                "slots must be in 1..={most}, got {slots}"
            )));
        }
        let opts = RecvOptions {
            threads,
            timeout: cfg.timeout,
            max_kv_bytes,
        };
        let ep = Endpoint::new(cfg).map_err(transport_err)?;
        let (slots, listener) = py
            .detach(|| -> Result<_, TransportError> {
                let s = RecvSlots::register(&ep, slots, slot_size)?;
                Ok((s, ep.listen(listen)?))
            })
            .map_err(transport_err)?;
        Ok(Self {
            addr: listener.local_addr(),
            state: Mutex::new(Some(RecvState {
                slots,
                listener,
                conn: None,
                transfer: None,
                opts,
            })),
            _ep: ep,
        })
    }

    /// The bound address as `host:port` (useful after listening on port 0).
    #[getter]
    fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Waits (at most `timeout` seconds) for the next transfer: on the current sender's
    /// connection if it is still open, else from a new sender. Returns the cache's spec and
    /// level.
    #[pyo3(signature = (timeout=60.0))]
    fn accept<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
        let timeout = convert::seconds("timeout", timeout)?;
        let (spec, level) = py.detach(|| -> PyResult<_> {
            let mut g = lock(&self.state);
            let st = g.as_mut().ok_or_else(closed)?;
            if st.transfer.is_some() {
                return Err(PyRuntimeError::new_err(
                    "a transfer is in progress: read its layers first",
                ));
            }
            if let Some(conn) = &st.conn {
                match KvReceiver::accept(conn, &st.slots, &st.opts) {
                    Ok(rx) => {
                        let out = (rx.spec(), rx.decoder().header().level);
                        st.transfer = Some(rx);
                        return Ok(out);
                    }
                    Err(e @ TransportError::Timeout(..)) => return Err(transport_err(e)),
                    // The sender went away after its last transfer: wait for the next one.
                    Err(_) => st.conn = None,
                }
            }
            let deadline = Instant::now() + timeout;
            let conn = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match st.listener.accept(left.min(SIGNAL_POLL)) {
                    Ok(c) => break c,
                    Err(TransportError::Timeout(..)) if !left.is_zero() => {
                        Python::attach(|py| py.check_signals())?;
                    }
                    Err(TransportError::Timeout(..)) => {
                        return Err(transport_err(TransportError::Timeout(
                            timeout,
                            "a sender to connect",
                        )))
                    }
                    Err(e) => return Err(transport_err(e)),
                }
            };
            let rx = KvReceiver::accept(&conn, &st.slots, &st.opts).map_err(transport_err)?;
            let out = (rx.spec(), rx.decoder().header().level);
            st.conn = Some(conn);
            st.transfer = Some(rx);
            Ok(out)
        })?;
        let d = convert::spec_dict(py, &spec)?;
        d.set_item("level", level.name())?;
        Ok(d)
    }

    /// The next layer of the transfer in progress, in order, as `(index, bytes)` (K then V
    /// in the cache's layout and dtype); `None` after the last layer.
    fn recv_layer<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Option<(usize, Bound<'py, PyArray1<u8>>)>> {
        let got = py.detach(|| {
            let mut g = lock(&self.state);
            let st = g.as_mut().ok_or_else(closed)?;
            let rx = st.transfer.as_mut().ok_or_else(|| {
                PyRuntimeError::new_err("recv_layer() without a transfer: call accept() first")
            })?;
            match rx.next_layer() {
                Ok(Some(x)) => Ok(Some(x)),
                Ok(None) => {
                    st.transfer = None;
                    Ok(None)
                }
                Err(e) => {
                    st.transfer = None;
                    st.conn = None;
                    Err(transport_err(e))
                }
            }
        })?;
        Ok(got.map(|(l, bytes)| (l, PyArray1::from_vec(py, bytes))))
    }

    /// Reads every remaining layer of the transfer in progress into one cache; returns its
    /// bytes, spec and stats.
    #[allow(clippy::type_complexity)]
    fn recv_rest<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        Bound<'py, PyArray1<u8>>,
        Bound<'py, PyDict>,
        Bound<'py, PyDict>,
    )> {
        let (cache, stats) = py.detach(|| {
            let mut g = lock(&self.state);
            let st = g.as_mut().ok_or_else(closed)?;
            let rx = st.transfer.take().ok_or_else(|| {
                PyRuntimeError::new_err("recv without a transfer: call accept() first")
            })?;
            rx.recv_all().map_err(|e| {
                st.conn = None;
                transport_err(e)
            })
        })?;
        let spec = *cache.spec();
        Ok((
            PyArray1::from_vec(py, cache.into_bytes()),
            convert::spec_dict(py, &spec)?,
            recv_stats(py, &stats)?,
        ))
    }

    /// What the transfer in progress received so far (`None` without one).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let st = lock(&self.state)
            .as_ref()
            .and_then(|s| s.transfer.as_ref().map(KvReceiver::stats));
        st.map(|s| recv_stats(py, &s)).transpose()
    }

    /// Stops listening and ends the current connection.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            if let Some(st) = lock(&self.state).take() {
                drop(st.transfer);
                if let Some(c) = st.conn {
                    c.close("receiver closed");
                }
            }
        });
    }
}
