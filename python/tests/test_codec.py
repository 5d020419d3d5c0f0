"""encode / decode: round trips per level, dtype and layout; errors on bad input."""

import numpy as np
import pytest

import kvwire
from conftest import make_kv

# Per-element error bound relative to the token's absmax in that layer's K or V
# (codec/FORMAT.md): m/254 for q8, m/14 for the 16-bin layers (the coarsest cg-default uses),
# m/10 for cg-low's 12 bins; plus the dtype's own rounding.
BOUND = {"q8": 1 / 254, "cg-high": 1 / 30, "cg-default": 1 / 14, "cg-low": 1 / 10, "lmcache": 1 / 14}


def token_absmax(kv, layout="hf"):
    a = np.abs(kv.astype(np.float32))
    if layout == "hf":  # [L, 2, H, T, D]: max over heads and dims per (layer, part, token)
        return a.max(axis=(2, 4), keepdims=True)
    return a.max(axis=(3, 4), keepdims=True)  # vllm [L, 2, T, H, D]


def check_within(kv, out, level, layout="hf", rel_round=2**-10):
    assert out.shape == kv.shape and out.dtype == kv.dtype
    err = np.abs(out.astype(np.float32) - kv.astype(np.float32))
    m = token_absmax(kv, layout)
    assert np.all(err <= m * (BOUND[level] + rel_round) + 1e-6), f"{level}: max err {err.max()}"


@pytest.mark.parametrize("level", kvwire.LEVELS)
def test_every_level_round_trips_within_its_bound(kv, level):
    data = kvwire.encode(kv, level)
    assert isinstance(data, bytes)
    out = kvwire.decode(data)
    if level == "raw":
        assert np.array_equal(out, kv)
    else:
        check_within(kv, out, level)
    h = kvwire.header(data)
    assert h["level"] == level and h["shape"] == list(kv.shape) and h["dtype"] == "f16"


def test_compressed_levels_are_smaller(kv):
    sizes = {lv: len(kvwire.encode(kv, lv)) for lv in ("raw", "q8", "cg-default", "cg-low")}
    assert sizes["q8"] < sizes["raw"] * 0.55
    assert sizes["cg-default"] < sizes["q8"]
    assert sizes["cg-low"] <= sizes["cg-default"]


def test_float32_round_trip():
    kv = make_kv(dtype=np.float32, seed=1)
    assert np.array_equal(kvwire.decode(kvwire.encode(kv, "raw")), kv)
    check_within(kv, kvwire.decode(kvwire.encode(kv, "cg-default")), "cg-default", rel_round=1e-6)


def test_bfloat16_bit_patterns_round_trip():
    f32 = make_kv(dtype=np.float32, seed=2)
    bits = (f32.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
    data = kvwire.encode(bits, "raw", dtype="bf16")
    assert kvwire.header(data)["dtype"] == "bf16"
    out = kvwire.decode(data)
    assert out.shape == bits.shape
    assert np.array_equal(out.view(np.uint16), bits)
    lossy = kvwire.decode(kvwire.encode(bits, "cg-default", dtype="bf16")).view(np.uint16)
    back = (lossy.astype(np.uint32) << 16).view(np.float32)
    ref = (bits.astype(np.uint32) << 16).view(np.float32)
    err = np.abs(back - ref)
    assert np.all(err <= token_absmax(ref) * (1 / 14 + 2**-7) + 1e-6)


def test_vllm_layout_round_trips_in_its_own_layout():
    kv = make_kv(layout="vllm", seed=3)
    data = kvwire.encode(kv, "cg-default", layout="vllm")
    assert kvwire.header(data)["layout"] == "vllm"
    check_within(kv, kvwire.decode(data), "cg-default", layout="vllm")
    assert np.array_equal(kvwire.decode(kvwire.encode(kv, "raw", layout="vllm")), kv)


def test_non_contiguous_and_dlpack_inputs():
    kv = make_kv(seed=4)
    strided = np.asfortranarray(kv)  # same values, other memory order: copied to C order
    assert np.array_equal(kvwire.decode(kvwire.encode(strided, "raw")), kv)

    class OnlyDlpack:  # like a torch CPU tensor: numpy takes it through __dlpack__
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    assert np.array_equal(kvwire.decode(kvwire.encode(OnlyDlpack(kv), "raw")), kv)


def test_decode_accepts_buffers(kv):
    data = kvwire.encode(kv, "q8")
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.uint8)):
        assert np.array_equal(kvwire.decode(buf), kvwire.decode(data))


def test_chunk_tokens_changes_blocks_not_values(kv):
    a = kvwire.decode(kvwire.encode(kv, "cg-default", chunk_tokens=64))
    check_within(kv, a, "cg-default")
    assert kvwire.header(kvwire.encode(kv, "cg-default", chunk_tokens=64))["chunk_tokens"] == 64


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 2, 3, 8), np.float16), "5-D"),
        (np.zeros((2, 3, 3, 8, 4), np.float16), "K and V|2"),
        (np.zeros((2, 2, 3, 8, 4), np.int32), "dtype"),
        (np.zeros((2, 2, 3, 8, 4), np.float64), "dtype"),
    ],
)
def test_bad_arrays_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        kvwire.encode(bad, "raw")


def test_bad_arguments_raise_value_error(kv):
    with pytest.raises(ValueError, match="level"):
        kvwire.encode(kv, "cg-ultra")
    with pytest.raises(ValueError, match="layout"):
        kvwire.encode(kv, "raw", layout="sglang")
    with pytest.raises(ValueError):
        kvwire.encode(kv, "cg-default", chunk_tokens=0)
    with pytest.raises(ValueError, match="does not match"):
        kvwire.encode(kv, "raw", dtype="f32")


def test_non_finite_input_is_refused_by_lossy_levels(kv):
    bad = kv.copy()
    bad[1, 0, 2, 5, 7] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        kvwire.encode(bad, "cg-default")
    assert np.array_equal(kvwire.decode(kvwire.encode(bad, "raw")), bad, equal_nan=True)


def test_corrupt_and_truncated_bitstreams_raise_codec_error(kv):
    data = bytearray(kvwire.encode(kv, "cg-default"))
    for cut in (0, 3, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(kvwire.CodecError):
            kvwire.decode(bytes(data[:cut]))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    with pytest.raises(kvwire.CodecError):
        kvwire.decode(bytes(flipped))
    with pytest.raises(kvwire.CodecError):
        kvwire.decode(b"KVWC" + b"\xff" * 60)
    with pytest.raises(kvwire.CodecError):
        kvwire.header(b"not a kvwire stream at all")
    assert issubclass(kvwire.CodecError, kvwire.KvwireError)


def test_custom_bin_table(kv):
    data = kvwire.encode(kv, "cg-default", bins=([64, 64], [4, 4]))
    assert kvwire.header(data)["bins"] == [(64, 4), (64, 4)]
    out = kvwire.decode(data).astype(np.float32)
    err = np.abs(out - kv.astype(np.float32))
    m = token_absmax(kv)
    assert np.all(err[:, 0] <= m[:, 0] * (1 / 62 + 2**-10) + 1e-6)  # K: 64 bins
    assert np.all(err[:, 1] <= m[:, 1] * (1 / 2 + 2**-10) + 1e-6)  # V: 4 bins
    assert err[:, 1].max() > err[:, 0].max()
    for bad in (([16], [16, 16]), ([15, 16], [16, 16]), ([16, 66], [16, 16])):
        with pytest.raises(ValueError, match="bin"):
            kvwire.encode(kv, "cg-default", bins=bad)
    with pytest.raises(ValueError, match="no bins"):
        kvwire.encode(kv, "q8", bins=([16, 16], [16, 16]))
