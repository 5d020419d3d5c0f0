"""Type stubs of the compiled half of kvwire (``kvwire._kvwire``); use the ``kvwire`` module."""

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

PROTOCOL_VERSION: int
FORMAT_VERSION: int

class KvwireError(Exception): ...
class CodecError(KvwireError): ...
class TransportError(KvwireError): ...
class TransferTimeout(TransportError): ...

def encode_flat(
    data: npt.NDArray[np.uint8],
    dims: List[int],
    layout: str,
    dtype: str,
    level: str,
    chunk_tokens: int,
    channel_scale_k: bool = ...,
    bins: Optional[Tuple[List[int], List[int]]] = ...,
) -> bytes: ...
def decode_flat(data: npt.NDArray[np.uint8]) -> Tuple[npt.NDArray[np.uint8], Dict[str, Any]]: ...
def header(data: npt.NDArray[np.uint8]) -> Dict[str, Any]: ...
def levels() -> List[str]: ...

class Sender:
    def __init__(
        self,
        connect: str,
        token: Optional[str] = ...,
        fabric: str = ...,
        level: str = ...,
        chunk_tokens: int = ...,
        threads: int = ...,
        timeout: float = ...,
        streams: int = ...,
        channel_scale_k: bool = ...,
    ) -> None: ...
    @property
    def peer(self) -> str: ...
    def send(
        self,
        data: npt.NDArray[np.uint8],
        dims: List[int],
        layout: str,
        dtype: str,
        level: Optional[str] = ...,
        channel_scale_k: Optional[bool] = ...,
    ) -> Dict[str, Any]: ...
    def begin(
        self,
        dims: List[int],
        layout: str,
        dtype: str,
        level: Optional[str] = ...,
        channel_scale_k: Optional[bool] = ...,
    ) -> None: ...
    def send_layer(
        self, layer: int, k: npt.NDArray[np.uint8], v: Optional[npt.NDArray[np.uint8]] = ...
    ) -> None: ...
    def finish(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...

class Receiver:
    def __init__(
        self,
        listen: str,
        token: Optional[str] = ...,
        fabric: str = ...,
        slots: int = ...,
        slot_size: int = ...,
        threads: int = ...,
        timeout: float = ...,
        max_kv_bytes: int = ...,
        streams: int = ...,
    ) -> None: ...
    @property
    def address(self) -> str: ...
    def accept(self, timeout: float = ...) -> Dict[str, Any]: ...
    def recv_layer(self) -> Optional[Tuple[int, npt.NDArray[np.uint8]]]: ...
    def recv_rest(
        self,
    ) -> Tuple[npt.NDArray[np.uint8], Dict[str, Any], Dict[str, Any]]: ...
    def stats(self) -> Optional[Dict[str, Any]]: ...
    def close(self) -> None: ...
