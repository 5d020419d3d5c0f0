"""kvwire: move LLM KV caches between machines, compressed.

A KV cache is one array of shape ``[layers, 2, kv_heads, tokens, head_dim]`` (``layout="hf"``,
Hugging Face) or ``[layers, 2, tokens, kv_heads, head_dim]`` (``layout="vllm"``); axis 1 is K
then V; dtype float16, bfloat16 or float32.

* :func:`encode` / :func:`decode`: a whole cache to a self-describing bitstream and back.
* :class:`Sender` / :class:`Receiver`: ship a cache to another process (TCP or shared memory),
  whole or layer by layer as a prefill engine produces it; the receiver decodes layer ``l``
  while later layers are still on the wire and hands layers out in order.

Arrays in: numpy arrays, or anything numpy can take without copying through ``__dlpack__``
(torch CPU tensors; CUDA tensors are copied to the host first). bfloat16 comes as a torch
tensor, an ``ml_dtypes.bfloat16`` array, or raw 16-bit patterns (uint16/int16) with
``dtype="bf16"``. Arrays out: numpy arrays that own their memory; bfloat16 comes back as
``ml_dtypes.bfloat16`` when that package is installed, else as uint16 bit patterns (for torch:
``torch.from_numpy(a.view(numpy.int16)).view(torch.bfloat16)``).

The GIL is released while encoding, decoding and waiting. Errors raise :class:`KvwireError`
subclasses (:class:`CodecError`, :class:`TransportError`, :class:`TransferTimeout`) with the
Rust message; bad arguments raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from . import _kvwire
from ._kvwire import (
    FORMAT_VERSION,
    PROTOCOL_VERSION,
    CodecError,
    KvwireError,
    TransferTimeout,
    TransportError,
)

__all__ = [
    "encode",
    "decode",
    "header",
    "levels",
    "Sender",
    "Receiver",
    "KvwireError",
    "CodecError",
    "TransportError",
    "TransferTimeout",
    "FORMAT_VERSION",
    "PROTOCOL_VERSION",
    "LEVELS",
]

LEVELS: Tuple[str, ...] = tuple(_kvwire.levels())
"""Every level, from largest output to smallest."""

_DTYPES = {"f16": np.float16, "f32": np.float32}


def levels() -> Tuple[str, ...]:
    """Every level's name, from largest output to smallest."""
    return LEVELS


def _bf16_numpy_dtype() -> Optional[np.dtype]:
    try:
        import ml_dtypes  # type: ignore[import-not-found]
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _to_numpy(x: Any, dtype: Optional[str]) -> Tuple[np.ndarray, str]:
    """Returns a C-contiguous numpy view of ``x`` (a copy only where unavoidable) and the
    kvwire dtype name (``f16``, ``bf16`` or ``f32``)."""
    if not isinstance(x, np.ndarray):
        mod = type(x).__module__ or ""
        if mod.startswith("torch"):
            t = x.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if str(t.dtype) == "torch.bfloat16":
                import torch  # only reached with a torch tensor in hand

                arr = t.contiguous().view(torch.int16).numpy().view(np.uint16)
                if dtype not in (None, "bf16", "bfloat16"):
                    raise ValueError(f"dtype={dtype!r} given for a bfloat16 tensor")
                return arr, "bf16"
            x = t.contiguous().numpy()
        elif hasattr(x, "__dlpack__"):
            x = np.from_dlpack(x)
        else:
            x = np.asarray(x)
    arr = np.ascontiguousarray(x)
    name = arr.dtype.name
    if name == "bfloat16":
        kind = "bf16"
        arr = arr.view(np.uint16)
    elif name == "float16":
        kind = "f16"
    elif name == "float32":
        kind = "f32"
    elif name in ("uint16", "int16") and dtype in ("bf16", "bfloat16"):
        kind = "bf16"
    else:
        raise ValueError(
            f"unsupported array dtype {arr.dtype} (expected float16, bfloat16 or float32; "
            "for raw bfloat16 bit patterns pass a uint16 array with dtype='bf16')"
        )
    if dtype is not None and dtype not in (kind, {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}[kind]):
        raise ValueError(f"dtype={dtype!r} does not match the array's {arr.dtype}")
    return arr, kind


def _flat(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1).view(np.uint8)


def _typed(flat: np.ndarray, dtype: str, shape) -> np.ndarray:
    if dtype == "bf16":
        bf = _bf16_numpy_dtype()
        out = flat.view(bf if bf is not None else np.uint16)
    else:
        out = flat.view(_DTYPES[dtype])
    return out.reshape(tuple(shape))


def _as_bytes_view(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def encode(
    kv: Any,
    level: str = "cg-default",
    layout: str = "hf",
    *,
    dtype: Optional[str] = None,
    chunk_tokens: int = 256,
    channel_scale_k: bool = False,
    bins: Optional[Tuple[Sequence[int], Sequence[int]]] = None,
) -> bytes:
    """Encodes a whole KV cache into a kvwire bitstream.

    Args:
        kv: the cache, 5-D: ``[layers, 2, kv_heads, tokens, head_dim]`` for ``layout="hf"``,
            ``[layers, 2, tokens, kv_heads, head_dim]`` for ``"vllm"``.
        level: one of :data:`LEVELS` (``raw`` is bit-exact; ``cg-*`` are lossy within the
            bounds in codec/FORMAT.md).
        layout: ``"hf"`` or ``"vllm"``.
        dtype: only needed for raw bfloat16 bit patterns (``"bf16"``); otherwise checked
            against the array's dtype.
        chunk_tokens: tokens per independently decodable block.
        channel_scale_k: divide K by a per-channel scale first (KIVI's finding).
        bins: ``(bins_k, bins_v)``, one even bin count per layer each (4..64; lmcache 4..62),
            replacing the level's own table (e.g. a table calibrated for the model with
            examples/disagg/bins_sensitivity.py); not for ``raw`` and ``q8``.

    Returns:
        The bitstream; :func:`decode` gives back the same shape, dtype and layout.
    """
    arr, kind = _to_numpy(kv, dtype)
    return _kvwire.encode_flat(
        _flat(arr),
        list(arr.shape),
        layout,
        kind,
        level,
        chunk_tokens,
        channel_scale_k,
        None if bins is None else (list(bins[0]), list(bins[1])),
    )


def decode(data: Any) -> np.ndarray:
    """Decodes a kvwire bitstream (bytes, bytearray, memoryview or uint8 array) into a numpy
    array of the encoded shape, dtype and layout."""
    flat, spec = _kvwire.decode_flat(_as_bytes_view(data))
    return _typed(flat, spec["dtype"], spec["shape"])


def header(data: Any) -> Dict[str, Any]:
    """Reads a bitstream's header without decoding: shape, layout, dtype, level, chunk_tokens,
    bins per layer."""
    return _kvwire.header(_as_bytes_view(data))


class Sender:
    """Ships KV caches to a :class:`Receiver`.

    Example (a prefill engine, layer by layer)::

        with kvwire.Sender("10.0.0.2:18515", token="s3cret") as tx:
            tx.begin(layers=30, kv_heads=3, tokens=4096, head_dim=64, dtype="f16")
            for l in range(30):
                tx.send_layer(l, k[l], v[l])     # [kv_heads, tokens, head_dim] each
            stats = tx.finish()

    Args:
        connect: the receiver's ``host:port``.
        token: pre-shared token; both sides must give the same one.
        fabric: ``"tcp"`` or ``"shm"`` (same host, shared memory).
        level: default level for transfers (see :data:`LEVELS`).
        chunk_tokens: tokens per block.
        threads: encode threads (0: one per core).
        timeout: longest wait, in seconds, for the receiver at any step.
        streams: TCP connections per peer (more fill faster links).
        channel_scale_k: divide K by a per-channel scale before quantizing (KIVI's finding
            that K has outlier channels); lossy levels other than ``lmcache`` only.
    """

    def __init__(
        self,
        connect: str,
        *,
        token: Optional[str] = None,
        fabric: str = "tcp",
        level: str = "cg-default",
        chunk_tokens: int = 256,
        threads: int = 0,
        timeout: float = 5.0,
        streams: int = 2,
        channel_scale_k: bool = False,
    ) -> None:
        self._inner = _kvwire.Sender(
            connect, token, fabric, level, chunk_tokens, threads, timeout, streams, channel_scale_k
        )
        self._layer: Optional[Tuple[str, str, Tuple[int, ...]]] = None

    @property
    def peer(self) -> str:
        """The receiver's address."""
        return self._inner.peer

    def send(
        self,
        kv: Any,
        *,
        layout: str = "hf",
        dtype: Optional[str] = None,
        level: Optional[str] = None,
        channel_scale_k: Optional[bool] = None,
    ) -> Dict[str, Any]:
        """Ships a whole cache; returns once the receiver decoded every block.

        Returns a dict: ``blocks``, ``wire_bytes``, ``input_bytes``, ``elapsed_s`` (until the
        receiver decoded the last layer), ``receiver_decode_s``.
        """
        arr, kind = _to_numpy(kv, dtype)
        return self._inner.send(_flat(arr), list(arr.shape), layout, kind, level, channel_scale_k)

    def begin(
        self,
        *,
        layers: int,
        kv_heads: int,
        tokens: int,
        head_dim: int,
        dtype: str = "f16",
        layout: str = "hf",
        level: Optional[str] = None,
        channel_scale_k: Optional[bool] = None,
    ) -> None:
        """Starts a layer-by-layer transfer of a cache of this shape (``level`` and
        ``channel_scale_k`` default to the sender's)."""
        dims = [layers, 2, kv_heads, tokens, head_dim] if layout == "hf" else [layers, 2, tokens, kv_heads, head_dim]
        kind = {"float16": "f16", "float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)
        self._inner.begin(dims, layout, kind, level, channel_scale_k)
        self._layer = (layout, kind, tuple(dims[2:]))

    def send_layer(self, layer: int, k: Any, v: Any = None) -> None:
        """Encodes and sends one layer; returns once its blocks are posted (the wire and the
        receiver keep working while the caller computes the next layer).

        ``k`` and ``v`` are ``[kv_heads, tokens, head_dim]`` (hf) or ``[tokens, kv_heads,
        head_dim]`` (vllm); or pass the whole layer ``[2, ...]`` as ``k`` and leave ``v`` out.
        """
        if self._layer is None:
            raise RuntimeError("send_layer() before begin()")
        _, kind, part = self._layer
        ka, kk = _to_numpy(k, kind)
        if kk != kind:
            raise ValueError(f"layer {layer}: dtype {kk} differs from the transfer's {kind}")
        if v is None:
            if tuple(ka.shape) != (2,) + part:
                raise ValueError(f"layer {layer}: expected shape {(2,) + part}, got {tuple(ka.shape)}")
            self._inner.send_layer(layer, _flat(ka), None)
            return
        va, vk = _to_numpy(v, kind)
        if vk != kind:
            raise ValueError(f"layer {layer}: dtype {vk} differs from the transfer's {kind}")
        for name, a in (("K", ka), ("V", va)):
            if tuple(a.shape) != part:
                raise ValueError(f"layer {layer}: {name} must have shape {part}, got {tuple(a.shape)}")
        self._inner.send_layer(layer, _flat(ka), _flat(va))

    def finish(self) -> Dict[str, Any]:
        """Waits until the receiver decoded every block; returns the stats (as :meth:`send`)."""
        self._layer = None
        return self._inner.finish()

    def close(self) -> None:
        """Ends the connection; an unfinished transfer is abandoned (the receiver sees it end)."""
        self._inner.close()

    def __enter__(self) -> "Sender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Receiver:
    """Receives KV caches from :class:`Sender` s.

    Example (a decode engine)::

        with kvwire.Receiver("0.0.0.0:18515", token="s3cret") as rx:
            for layer, k, v in rx.layers():      # in order, each as soon as it decoded
                cache.update(k, v, layer)
            # or: kv = rx.recv()                 # the whole cache at once

    Args:
        listen: ``host:port`` to listen on (port 0 picks one; see :attr:`address`).
        token, fabric, threads, timeout, streams: as for :class:`Sender` (``threads`` decode).
        slots: receive slots registered once (blocks in flight at most).
        slot_size: bytes per slot (a block must fit: 4 MiB holds a 256-token raw block of
            heads*dim up to 4096 in fp16).
        max_kv_bytes: largest decoded cache accepted; a bigger one is refused before anything
            is allocated.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        token: Optional[str] = None,
        fabric: str = "tcp",
        slots: int = 16,
        slot_size: int = 4 << 20,
        threads: int = 0,
        timeout: float = 5.0,
        max_kv_bytes: int = 64 << 30,
        streams: int = 2,
    ) -> None:
        self._inner = _kvwire.Receiver(
            listen, token, fabric, slots, slot_size, threads, timeout, max_kv_bytes, streams
        )
        self._spec: Optional[Dict[str, Any]] = None

    @property
    def address(self) -> str:
        """The bound ``host:port``."""
        return self._inner.address

    @property
    def spec(self) -> Optional[Dict[str, Any]]:
        """The current transfer's shape, layout, dtype and level (after :meth:`accept`)."""
        return self._spec

    def accept(self, timeout: float = 60.0) -> Dict[str, Any]:
        """Waits for the next transfer (from the connected sender, or a new one); returns its
        spec: ``shape``, ``layout``, ``dtype``, ``level``, ``layers``, ``kv_heads``, ``tokens``,
        ``head_dim``."""
        self._spec = self._inner.accept(timeout)
        return self._spec

    def recv_layer(self) -> Optional[Tuple[int, np.ndarray, np.ndarray]]:
        """The next layer ``(index, k, v)`` of the current transfer, in order, or ``None``
        after the last one. ``k``/``v`` are views into one array owned by the caller."""
        if self._spec is None:
            raise RuntimeError("recv_layer() before accept()")
        got = self._inner.recv_layer()
        if got is None:
            return None
        layer, flat = got
        both = _typed(flat, self._spec["dtype"], [2] + list(self._spec["shape"][2:]))
        return layer, both[0], both[1]

    def layers(self, timeout: float = 60.0) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """Accepts the next transfer and yields its layers ``(index, k, v)`` in order."""
        self.accept(timeout)
        while True:
            got = self.recv_layer()
            if got is None:
                return
            yield got

    def recv(self, timeout: float = 60.0) -> np.ndarray:
        """Accepts the next transfer and returns the whole decoded cache."""
        return self.recv_with_stats(timeout)[0]

    def recv_with_stats(self, timeout: float = 60.0) -> Tuple[np.ndarray, Dict[str, Any]]:
        """As :meth:`recv`, plus the receive stats (``blocks``, ``wire_bytes``, ``elapsed_s``)."""
        self.accept(timeout)
        flat, spec, stats = self._inner.recv_rest()
        return _typed(flat, spec["dtype"], spec["shape"]), stats

    def close(self) -> None:
        """Stops listening and ends the current connection."""
        self._inner.close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
