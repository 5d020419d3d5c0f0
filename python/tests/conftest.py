"""Shared fixtures: small synthetic caches with the statistics that matter for the codec
(per-token scale, a few large channels), deterministic per seed."""

import threading

import numpy as np
import pytest


def make_kv(layers=2, heads=3, tokens=300, dim=64, dtype=np.float16, seed=0, layout="hf"):
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((layers, 2, heads, tokens, dim)).astype(np.float32)
    kv *= rng.uniform(0.5, 3.0, size=(layers, 2, heads, 1, dim)).astype(np.float32)
    if layout == "vllm":
        kv = np.ascontiguousarray(kv.transpose(0, 1, 3, 2, 4))
    return kv.astype(dtype)


@pytest.fixture
def kv():
    return make_kv()


class Background:
    """Runs `fn` on a thread and hands back its result or exception."""

    def __init__(self, fn):
        self.result = None
        self.error = None

        def run():
            try:
                self.result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background side hung"
        return self
