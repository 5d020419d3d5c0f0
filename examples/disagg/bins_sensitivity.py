#!/usr/bin/env python3
"""Which layers' K and V need more quantization bins? Evidence for cg-default's bin table.

Quantizes the exact cache of SmolLM2-135M the way kvwire's lossy levels do (symmetric
per-token absmax over the layer's K or V channels, round half to even; the 16-bit storage of
the scale is ignored), with every layer part at 16 bins except the ones named, and measures the
teacher-forced continuation against the exact cache (KL, top-1 agreement, perplexity).

  tools/realkv/.venv/bin/python examples/disagg/bins_sensitivity.py --text pydoc [--uniform-only] [--json OUT]

Then `--calibrate SCAN.jsonl --top 12,20` builds bin tables from a scan (the N layer parts whose
upgrade to 32 bins cut the KL most get 32, the rest 16), writes them to --tables OUT.json, and
measures them with the real codec (kvwire.encode(..., bins=...)) beside cg-default and cg-high:
bytes per token and quality, on the text given (use another text than the scan's to validate).
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import disagg  # noqa: E402  (token ids, cache building, comparison)


def quantize(x, bins):
    """x: [H, T, D] one layer part; per-token absmax over (H, D)."""
    import torch

    mx = bins // 2 - 1
    m = x.abs().amax(dim=(0, 2), keepdim=True)
    scale = torch.where(m > 0, m / mx, torch.ones_like(m))
    return torch.round(x / scale).clamp(-mx, mx) * scale  # torch.round: half to even


def quantized(kv, bins_k, bins_v):
    out = kv.clone()
    for l in range(kv.shape[0]):
        out[l, 0] = quantize(kv[l, 0], bins_k[l])
        out[l, 1] = quantize(kv[l, 1], bins_v[l])
    return out


def tables_from_scan(path, L, tops):
    scan = [json.loads(l) for l in open(path)]
    base = next(r["kl"] for r in scan if r["name"] == "all-16")
    gains = sorted(((base - r["kl"], r["name"]) for r in scan if "@" in r["name"]), reverse=True)
    out = {}
    for n in tops:
        bk, bv = [16] * L, [16] * L
        for _, name in gains[:n]:
            part, layer = name[0], int(name[1:].split("@")[0])
            (bk if part == "K" else bv)[layer] = 32
        out[f"top{n}"] = {"bins_k": bk, "bins_v": bv}
    return out


def calibrate(a, model, exact, cont, ref, target, L):
    import numpy as np
    import torch

    import kvwire

    tables = tables_from_scan(a.calibrate, L, [int(n) for n in a.top.split(",")])
    if a.tables:
        head = {"model": "SmolLM2-135M-Instruct", "scan": os.path.basename(a.calibrate),
                "rule": "the N layer parts whose 16->32 bin upgrade cut the KL most get 32 bins"}
        with open(a.tables, "w") as f:  # one line per table, readable in a diff
            f.write("{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items()))
            f.write(' "tables": {\n' + ",\n".join(
                f'  "{n}": {{"bins_k": {json.dumps(t["bins_k"])},\n          "bins_v": {json.dumps(t["bins_v"])}}}'
                for n, t in tables.items()) + "\n }\n}\n")
    kv = exact.numpy()
    tokens = kv.shape[3]
    runs = [("cg-default", None), ("cg-high", None)]
    runs += [(f"cg-default+{name}", (t["bins_k"], t["bins_v"])) for name, t in tables.items()]
    ppl_exact = math.exp(torch.nn.functional.cross_entropy(ref, target).item())
    for name, bins in runs:
        data = kvwire.encode(kv, name.split("+")[0], bins=bins)
        out = torch.from_numpy(np.asarray(kvwire.decode(data))).float()
        logits, _ = disagg.evaluate(model, out, cont, 0)
        m = disagg.compare(ref, logits, target, [], [])
        print(json.dumps({"text": a.text, "name": name, "bytes_per_token": round(len(data) / tokens),
                          "ppl_increase_pct": round(100 * (m["ppl"] / ppl_exact - 1), 2),
                          "top1_agree": round(m["top1_agree"], 4), "kl": round(m["kl"], 4)}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="pydoc")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--score", type=int, default=257)
    ap.add_argument("--json", default=None)
    ap.add_argument("--calibrate", default=None, metavar="SCAN.jsonl",
                    help="build tables from a scan's JSON lines and measure them with the codec")
    ap.add_argument("--top", default="12,20", help="layer parts at 32 bins in each table")
    ap.add_argument("--tables", default=None, help="write the calibrated tables here (JSON)")
    ap.add_argument("--uniform-only", action="store_true",
                    help="only the uniform tables (every layer part at 16, 20, 24, 28, 32 bins)")
    a = ap.parse_args()
    import make_kv

    torch = make_kv.setup_torch()
    tok, model = make_kv.load_model()
    ctx, cont = disagg.token_ids(tok, a.text, a.context, a.score)
    target = torch.tensor(cont[1:])
    exact, _ = make_kv.prefill(model, ctx)
    L = exact.shape[0]
    ref, _ = disagg.evaluate(model, exact, cont, 0)

    def run(name, bk, bv):
        logits, _ = disagg.evaluate(model, quantized(exact, bk, bv), cont, 0)
        m = disagg.compare(ref, logits, target, [], [])
        m.update({"name": name, "bins_k": bk, "bins_v": bv,
                  "ppl_increase_pct": 100 * (m["ppl"] / math.exp(torch.nn.functional.cross_entropy(ref, target).item()) - 1)})
        print(json.dumps({k: m[k] for k in ("name", "kl", "top1_agree", "ppl_increase_pct")}), flush=True)
        return m

    if a.calibrate:
        return calibrate(a, model, exact, cont, ref, target, L)
    rows = []
    lm_k = [32 if l < 10 else 16 for l in range(L)]
    lm_v = [32 if l < 2 else 16 for l in range(L)]
    rows.append(run("lmcache-default", lm_k, lm_v))
    for b in (16, 20, 24, 28, 32) if a.uniform_only else (16, 32):
        rows.append(run(f"all-{b}", [b] * L, [b] * L))
    for l in range(0 if a.uniform_only else L):
        for part in ("K", "V"):
            bk, bv = [16] * L, [16] * L
            (bk if part == "K" else bv)[l] = 32
            rows.append(run(f"{part}{l}@32", bk, bv))
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
