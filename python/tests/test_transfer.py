"""Sender / Receiver over real sockets (TCP on loopback) and shared memory."""

import time

import numpy as np
import pytest

import kvwire
from conftest import Background, make_kv
from test_codec import check_within


def test_whole_cache_raw_is_bit_exact_over_tcp():
    kv = make_kv(layers=3, tokens=513)
    with kvwire.Receiver("127.0.0.1:0", token="t0k") as rx:
        bg = Background(lambda: rx.recv_with_stats(timeout=20))
        with kvwire.Sender(rx.address, token="t0k", level="raw") as tx:
            st = tx.send(kv)
        out, rst = bg.join().result
    assert bg.error is None
    assert np.array_equal(out, kv)
    assert st["blocks"] == 3 * 3 and rst["blocks"] == 9
    assert st["wire_bytes"] >= kv.nbytes and st["input_bytes"] == kv.nbytes


@pytest.mark.parametrize("fabric", ["tcp", "shm"])
def test_layer_streaming_arrives_in_order_within_bound(fabric):
    kv = make_kv(layers=4, tokens=600, seed=5)
    with kvwire.Receiver("127.0.0.1:0", fabric=fabric) as rx:

        def receive():
            got = []
            for layer, k, v in rx.layers(timeout=20):
                got.append((layer, k.copy(), v.copy()))
            return got

        bg = Background(receive)
        with kvwire.Sender(rx.address, fabric=fabric, level="cg-default") as tx:
            tx.begin(layers=4, kv_heads=3, tokens=600, head_dim=64, dtype="f16")
            for layer in (0, 1, 2):
                tx.send_layer(layer, kv[layer, 0], kv[layer, 1])
            tx.send_layer(3, kv[3])  # whole layer [2, H, T, D] in one array
            st = tx.finish()
        got = bg.join().result
    assert bg.error is None, bg.error
    assert [g[0] for g in got] == [0, 1, 2, 3]
    out = np.stack([np.stack([k, v]) for _, k, v in got])
    check_within(kv, out, "cg-default")
    assert st["wire_bytes"] < kv.nbytes / 3


def test_several_transfers_on_one_connection_and_vllm_layout():
    a = make_kv(layers=2, tokens=100, seed=6, layout="vllm")
    b = make_kv(layers=2, tokens=50, seed=7, dtype=np.float32)
    with kvwire.Receiver("127.0.0.1:0") as rx:
        bg = Background(lambda: (rx.recv(timeout=20), rx.recv(timeout=20)))
        with kvwire.Sender(rx.address) as tx:
            tx.send(a, layout="vllm", level="raw")
            tx.send(b, level="q8")
        out_a, out_b = bg.join().result
    assert bg.error is None, bg.error
    assert np.array_equal(out_a, a)
    assert out_b.dtype == np.float32 and out_b.shape == b.shape
    check_within(b, out_b, "q8", rel_round=2**-8)  # scales are stored in 16 bits


def test_token_mismatch_is_refused_on_both_sides():
    with kvwire.Receiver("127.0.0.1:0", token="right") as rx:
        bg = Background(lambda: rx.accept(timeout=10))
        with pytest.raises(kvwire.TransportError, match="token"):
            kvwire.Sender(rx.address, token="wrong")
        bg.join()
    assert isinstance(bg.error, kvwire.TransportError), bg.error
    assert "token" in str(bg.error)


def test_nobody_listening_raises_transport_error():
    with kvwire.Receiver("127.0.0.1:0") as rx:
        addr = rx.address
    with pytest.raises(kvwire.TransportError):
        kvwire.Sender(addr, timeout=2.0)


def test_accept_times_out_with_transfer_timeout():
    with kvwire.Receiver("127.0.0.1:0") as rx:
        t0 = time.monotonic()
        with pytest.raises(kvwire.TransferTimeout):
            rx.accept(timeout=0.5)
        assert time.monotonic() - t0 < 5


def test_sender_gone_mid_transfer_is_an_error_not_a_hang():
    kv = make_kv(layers=4, tokens=300, seed=8)
    with kvwire.Receiver("127.0.0.1:0", timeout=2.0) as rx:

        def receive():
            got = []
            for layer, _, _ in rx.layers(timeout=20):
                got.append(layer)
            return got

        bg = Background(receive)
        tx = kvwire.Sender(rx.address, level="q8", timeout=2.0)
        tx.begin(layers=4, kv_heads=3, tokens=300, head_dim=64)
        tx.send_layer(0, kv[0])
        tx.close()  # dies after one of four layers
        bg.join(timeout=30)
    assert isinstance(bg.error, kvwire.TransportError), bg.error


def test_receiver_gone_mid_transfer_fails_the_sender():
    kv = make_kv(layers=4, tokens=300, seed=9)
    rx = kvwire.Receiver("127.0.0.1:0", timeout=2.0)
    bg = Background(lambda: rx.accept(timeout=10))
    tx = kvwire.Sender(rx.address, level="raw", timeout=2.0)
    tx.begin(layers=4, kv_heads=3, tokens=300, head_dim=64)
    bg.join()
    rx.close()
    with pytest.raises(kvwire.TransportError):
        for layer in range(4):
            tx.send_layer(layer, kv[layer])
        tx.finish()
    tx.close()


def test_misuse_raises_clear_errors():
    kv = make_kv(layers=2, tokens=64)
    with kvwire.Receiver("127.0.0.1:0") as rx:
        with pytest.raises(RuntimeError, match="accept"):
            rx.recv_layer()
        bg = Background(lambda: rx.recv(timeout=20))
        with kvwire.Sender(rx.address, level="raw") as tx:
            with pytest.raises(RuntimeError, match="begin"):
                tx.send_layer(0, kv[0])
            tx.begin(layers=2, kv_heads=3, tokens=64, head_dim=64)
            with pytest.raises(ValueError, match="shape"):
                tx.send_layer(0, kv[0, 0])  # only K given as the whole layer
            with pytest.raises(ValueError, match="out of range"):
                tx.send_layer(2, kv[0])
            with pytest.raises(ValueError, match="does not match"):
                tx.send_layer(0, kv[0].astype(np.float32))
            with pytest.raises(RuntimeError, match="in progress"):
                tx.send(kv)
            tx.send_layer(0, kv[0])
            tx.send_layer(1, kv[1])
            tx.finish()
        out = bg.join().result
    assert np.array_equal(out, kv)
    with pytest.raises(ValueError, match="fabric"):
        kvwire.Receiver("127.0.0.1:0", fabric="carrier-pigeon")
    with pytest.raises(ValueError, match="verbs"):
        kvwire.Sender("127.0.0.1:1", fabric="verbs")


def test_oversized_cache_is_refused_before_allocation():
    kv = make_kv(layers=2, tokens=64)
    with kvwire.Receiver("127.0.0.1:0", max_kv_bytes=1000) as rx:
        bg = Background(lambda: rx.recv(timeout=20))
        with kvwire.Sender(rx.address, level="raw") as tx:
            with pytest.raises(kvwire.TransportError):
                tx.send(kv)
        bg.join()
    assert isinstance(bg.error, kvwire.TransportError), bg.error
