#!/usr/bin/env python3
"""Disaggregated prefill -> decode with kvwire, on a real model (SmolLM2-135M-Instruct).

Process A (`prefill`) prefills a long text and ships its KV cache layer by layer *while the
prefill runs* (a DynamicCache whose `update` hands each finished layer to `kvwire.Sender`).
Process B (`decode`) receives the layers in order with `kvwire.Receiver`, rebuilds the cache,
continues the text greedily and scores the true continuation against B's own single-process
run with the exact cache: perplexity, top-1 accuracy, top-1 agreement, KL, greedy tokens.

  disagg.py decode  --listen 127.0.0.1:18600 --text pydoc --transfers 6 --json b.jsonl
  disagg.py prefill --connect 127.0.0.1:18600 --text pydoc --levels raw,cg-default --json a.jsonl
  disagg.py table   [--texts pydoc,coreutils] [--levels all] [--netns RATE]   # runs both, prints the table

The model and torch come from tools/realkv (run tools/realkv/setup.sh once); the `kvwire`
package is installed into that venv with `pip install ./python`.
"""

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "realkv"))

TEXTS = {
    # name: (loader, token offset into the text) -- both ship with every Debian machine
    "pydoc": ("pydoc", 20000),  # CPython's pydoc_data/topics.py
    "coreutils": ("/usr/share/info/coreutils.info.gz", 4000),  # coreutils' info manual
}


def log(msg):
    print(f"[{os.path.basename(sys.argv[0])} {sys.argv[1] if len(sys.argv) > 1 else ''}] {msg}",
          file=sys.stderr, flush=True)


def read_text(name):
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "".join(topics[k] for k in sorted(topics))
    path = TEXTS.get(name, (name, 0))[0]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def token_ids(tok, text_name, context, score):
    """[<|endoftext|>] + the text's tokens from its offset: `context` tokens of context (the
    separator included) and `score` tokens of continuation."""
    import make_kv

    offset = TEXTS.get(text_name, (text_name, 0))[1]
    stream, n = make_kv.token_stream(tok, read_text(text_name), offset)
    if len(stream) < context + score:
        sys.exit(f"{text_name}: {len(stream)} tokens after offset {offset}, need {context + score}")
    return stream[:context], stream[context:context + score]


class ShippingCache:
    """A DynamicCache that ships each layer's K and V the moment the prefill finished it."""

    def __new__(cls, sender, dtype):
        import numpy as np
        from transformers import DynamicCache

        class _Shipping(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                k = key_states[0].detach().contiguous().numpy()  # [H, T, D]
                v = value_states[0].detach().contiguous().numpy()
                if dtype == "f16":
                    k, v = k.astype(np.float16), v.astype(np.float16)
                sender.send_layer(layer_idx, k, v)
                return out

        return _Shipping()


def cmd_prefill(a):
    import kvwire
    import make_kv

    torch = make_kv.setup_torch()
    tok, model = make_kv.load_model()
    cfg = model.config
    ctx, _ = token_ids(tok, a.text, a.context, a.score)
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    levels = list(kvwire.LEVELS) if a.levels == "all" else a.levels.split(",")
    out = open(a.json, "w") if a.json else None
    deadline = time.monotonic() + 300
    while True:  # the decode side listens only once its reference run is done
        try:
            tx = kvwire.Sender(a.connect, token=a.token, timeout=600.0, chunk_tokens=a.chunk_tokens)
            break
        except kvwire.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with tx:
        for level in levels:
            # "LEVEL+ks": the level with K divided by per-channel scales first (KIVI)
            name, _, opt = level.partition("+")
            tx.begin(layers=cfg.num_hidden_layers, kv_heads=heads, tokens=len(ctx), head_dim=dim,
                     dtype=a.dtype, level=name, channel_scale_k=opt == "ks")
            t0 = time.perf_counter()
            with torch.inference_mode():
                make_kv.forward(model, torch.tensor([ctx]), ShippingCache(tx, a.dtype), logits_to_keep=1)
            prefill_s = time.perf_counter() - t0
            st = tx.finish()
            rec = {"text": a.text, "level": level, "dtype": a.dtype, "tokens": len(ctx),
                   "wire_bytes": st["wire_bytes"], "bytes_per_token": st["wire_bytes"] / len(ctx),
                   "prefill_s": prefill_s, "last_layer_decoded_s": st["elapsed_s"],
                   "after_prefill_s": st["elapsed_s"] - prefill_s}
            log(f"{level}: {st['wire_bytes']} B on the wire ({rec['bytes_per_token']:.0f} B/token), "
                f"prefill {prefill_s:.2f} s, last layer decoded {st['elapsed_s']:.2f} s after begin")
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()


def build_cache(kv):
    """A DynamicCache holding kv [L, 2, H, T, D] (fp32)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for l in range(kv.shape[0]):
        cache.update(kv[l, 0][None].contiguous(), kv[l, 1][None].contiguous(), l)
    return cache


def evaluate(model, kv, cont, greedy_n):
    """Teacher-forced logits over the continuation (positions 1..) and a greedy continuation
    of `greedy_n` tokens, both from cache `kv` followed by cont[0]."""
    import make_kv

    torch = make_kv.setup_torch()
    with torch.inference_mode():
        logits = make_kv.forward(model, torch.tensor([cont[:-1]]), build_cache(kv))[0].logits[0].float()
        cache = build_cache(kv)
        nxt = torch.tensor([[cont[0]]])
        greedy = []
        for _ in range(greedy_n):
            out, cache = make_kv.forward(model, nxt, cache)
            t = int(out.logits[0, -1].argmax())
            greedy.append(t)
            nxt = torch.tensor([[t]])
    return logits, greedy


def compare(ref_logits, logits, target, ref_greedy, greedy):
    import make_kv

    torch = make_kv.setup_torch()
    lp_ref = torch.log_softmax(ref_logits, -1)
    lp = torch.log_softmax(logits, -1)
    nll = torch.nn.functional.nll_loss(lp, target).item()
    same = next((i for i, (x, y) in enumerate(zip(ref_greedy, greedy)) if x != y), len(greedy))
    return {
        "ppl": math.exp(nll),
        "top1_acc": (logits.argmax(-1) == target).float().mean().item(),
        "top1_agree": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        "kl": (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item(),
        "greedy_identical_prefix": same,
        "greedy_matches": sum(int(x == y) for x, y in zip(ref_greedy, greedy)),
    }


def cmd_decode(a):
    import numpy as np

    import kvwire
    import make_kv

    torch = make_kv.setup_torch()
    tok, model = make_kv.load_model()
    ctx, cont = token_ids(tok, a.text, a.context, a.score)
    target = torch.tensor(cont[1:])
    # The single-process reference: this process's own prefill, the exact cache.
    exact, _ = make_kv.prefill(model, ctx)
    ref_logits, ref_greedy = evaluate(model, exact, cont, a.greedy)
    ref = compare(ref_logits, ref_logits, target, ref_greedy, ref_greedy)
    log(f"exact cache: ppl {ref['ppl']:.3f}, top-1 {ref['top1_acc']:.3f}")
    # Listen only now, so that the transfers' timings do not include the reference run.
    rx = kvwire.Receiver(a.listen, token=a.token, timeout=600.0)
    log(f"listening on {rx.address}")
    received = []
    for _ in range(a.transfers):
        spec = rx.accept(timeout=600.0)
        t0 = time.perf_counter()
        layers = [np.stack([k, v]) for _, k, v in _in_order(rx)]
        received.append((spec, time.perf_counter() - t0, np.stack(layers)))
    rx.close()
    out = open(a.json, "w") if a.json else None
    for spec, recv_s, layers in received:
        kv = torch.from_numpy(layers).float()
        logits, greedy = evaluate(model, kv, cont, a.greedy)
        m = compare(ref_logits, logits, target, ref_greedy, greedy)
        m.update({"text": a.text, "level": spec["level"], "tokens": len(ctx),
                  "ppl_exact": ref["ppl"], "ppl_increase_pct": 100 * (m["ppl"] / ref["ppl"] - 1),
                  "top1_acc_exact": ref["top1_acc"], "max_abs_err": (kv - exact).abs().max().item(),
                  "recv_s": recv_s, "greedy_n": a.greedy, "scored": len(cont) - 1})
        log(f"{spec['level']}: ppl {m['ppl']:.3f} ({m['ppl_increase_pct']:+.2f}%), top-1 agree "
            f"{m['top1_agree']:.3f}, KL {m['kl']:.4f}, greedy {m['greedy_identical_prefix']}/{a.greedy} identical")
        if out:
            out.write(json.dumps(m) + "\n")
            out.flush()


def _in_order(rx):
    expect = 0
    while True:
        got = rx.recv_layer()
        if got is None:
            return
        if got[0] != expect:
            sys.exit(f"layer {got[0]} arrived where {expect} was due")
        expect += 1
        yield got


def cmd_table(a):
    import kvwire

    py = sys.executable
    me = os.path.abspath(__file__)
    levels = list(kvwire.LEVELS) if a.levels == "all" else a.levels.split(",")
    rows = []
    link = tests_netns = None
    if a.netns:
        tests_netns = os.path.join(ROOT, "tests", "netns", "shaped-link.sh")
        subprocess.run([tests_netns, "up", "--name", "kvdisagg", "--rate", a.netns], check=True,
                       stdout=subprocess.DEVNULL)
        link = "192.0.2.2"
    try:
        for text in a.texts.split(","):
            host = link or "127.0.0.1"
            addr = f"{host}:{a.port}"
            common = ["--text", text, "--context", str(a.context), "--score", str(a.score),
                      "--token", "disagg"]
            bj, aj = f"/tmp/disagg-{text}-b.jsonl", f"/tmp/disagg-{text}-a.jsonl"
            dec = [py, me, "decode", "--listen", addr, "--transfers", str(len(levels)),
                   "--greedy", str(a.greedy), "--json", bj] + common
            pre = [py, me, "prefill", "--connect", addr, "--levels", ",".join(levels),
                   "--dtype", a.dtype, "--json", aj] + common
            if a.netns:
                dec = [tests_netns, "exec", "b", "--name", "kvdisagg", "--"] + dec
                pre = [tests_netns, "exec", "a", "--name", "kvdisagg", "--"] + pre
            b = subprocess.Popen(dec)
            ra = subprocess.run(pre, timeout=3600)
            rb = b.wait(timeout=3600)
            if ra.returncode or rb:
                sys.exit(f"{text}: prefill exited {ra.returncode}, decode exited {rb}")
            sent = [json.loads(l) for l in open(aj)]
            got = [json.loads(l) for l in open(bj)]
            rows += [{**g, **s} for s, g in zip(sent, got)]  # the sender's level label (with +ks)
    finally:
        if a.netns:
            subprocess.run([tests_netns, "down", "--name", "kvdisagg"], check=False)
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"link: {'netns, tbf ' + a.netns if a.netns else 'loopback'}; cache shipped as {a.dtype}; "
          f"{a.context} context tokens, {a.score - 1} scored, {a.greedy} greedy")
    print("| text | level | B/token | ppl (exact) | ppl increase | top-1 agree | KL | top-1 acc | greedy identical | last layer decoded after prefill |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['text']} | `{r['level']}` | {r['bytes_per_token']:,.0f} | {r['ppl']:.3f} ({r['ppl_exact']:.3f}) | "
              f"{r['ppl_increase_pct']:+.2f}% | {r['top1_agree']:.3f} | {r['kl']:.4f} | {r['top1_acc']:.3f} | "
              f"{r['greedy_identical_prefix']}/{r['greedy_n']} | {r['after_prefill_s'] * 1e3:.0f} ms |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--text", default="pydoc", help="pydoc, coreutils or a file path")
        p.add_argument("--context", type=int, default=2048, help="context tokens (with the separator)")
        p.add_argument("--score", type=int, default=1025, help="continuation tokens (the first is fed, the rest scored)")
        p.add_argument("--token", default=None, help="kvwire pre-shared token")
        p.add_argument("--json", default=None, help="write one JSON line per transfer here")

    p = sub.add_parser("prefill", help="process A: prefill and ship the cache layer by layer")
    common(p)
    p.add_argument("--connect", required=True)
    p.add_argument("--levels", default="cg-default",
                   help="comma-separated levels (LEVEL+ks: with per-channel K scaling), or all")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="dtype the cache ships in")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p = sub.add_parser("decode", help="process B: receive, continue, score")
    common(p)
    p.add_argument("--listen", required=True)
    p.add_argument("--transfers", type=int, default=1)
    p.add_argument("--greedy", type=int, default=64)
    p = sub.add_parser("table", help="run both for every level and text; print the quality table")
    p.add_argument("--texts", default="pydoc,coreutils")
    p.add_argument("--levels", default="all")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--score", type=int, default=1025)
    p.add_argument("--greedy", type=int, default=64)
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--netns", default=None, metavar="RATE",
                   help="run A and B in two network namespaces joined by a tbf-shaped veth (e.g. 1gbit)")
    p.add_argument("--json", default=None)
    a = ap.parse_args()
    {"prefill": cmd_prefill, "decode": cmd_decode, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
