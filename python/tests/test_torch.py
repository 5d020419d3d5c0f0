"""torch tensors in (f32, f16, bf16): skipped where torch is not installed (CI installs numpy
only; tools/realkv/.venv has torch: `tools/realkv/.venv/bin/python -m pytest python/tests`)."""

import numpy as np
import pytest

import kvwire
from conftest import Background, make_kv

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_tensors_round_trip(dtype):
    t = torch.from_numpy(make_kv(dtype=np.float32, seed=11)).to(getattr(torch, dtype))
    out = kvwire.decode(kvwire.encode(t, "raw"))
    if dtype == "bfloat16":
        back = torch.from_numpy(np.asarray(out).view(np.int16)).view(torch.bfloat16)
    else:
        back = torch.from_numpy(out)
    assert back.dtype == t.dtype and torch.equal(back, t)
    lossy = kvwire.decode(kvwire.encode(t, "cg-default"))
    assert lossy.shape == tuple(t.shape)


def test_non_contiguous_torch_layers_stream():
    kv = torch.from_numpy(make_kv(layers=2, tokens=128, dtype=np.float32, seed=12))
    with kvwire.Receiver("127.0.0.1:0") as rx:
        bg = Background(lambda: rx.recv(timeout=20))
        with kvwire.Sender(rx.address, level="raw") as tx:
            tx.begin(layers=2, kv_heads=3, tokens=128, head_dim=64, dtype="f32")
            for layer in range(2):
                # A [T, H, D] tensor transposed to [H, T, D]: a strided view, as attention makes.
                k = kv[layer, 0].transpose(0, 1).contiguous().transpose(0, 1)
                tx.send_layer(layer, k, kv[layer, 1])
            tx.finish()
        out = bg.join().result
    assert np.array_equal(out, kv.numpy())
