#!/usr/bin/env bash
# Every GPU check and timing of the GPU codec (kvwire-codec, feature `cuda`) in one go, run ON
# the GPU machine from the repository root, with the binaries built here and carried in
# .devcarry/ (see tools/gpu/README.md). Results go to $OUT (default /tmp/kvwire-gpu).
#
#   tools/gpu/device-run.sh [quick]     quick: tests and one cg-default timing only
set -u -o pipefail
OUT=${OUT:-/tmp/kvwire-gpu}
BIN=${BIN:-.devcarry}
mkdir -p "$OUT"
mode=${1:-full}

# libcuda comes with the driver; NVRTC from the toolkit or from the Python wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.dirname(nvidia.cuda_nvrtc.__file__) + "/lib")' 2>/dev/null) \
    $(ls -d /usr/local/lib/python3*/dist-packages/nvidia/cu*/lib 2>/dev/null); do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    ls "$BIN"
} 2>&1 | tee "$OUT/env.txt"

rc=0
echo "== tests (GPU and CPU cross-checks)" | tee "$OUT/tests.log"
"$BIN/cuda_tests" --test-threads=1 2>&1 | tee -a "$OUT/tests.log" || rc=1

echo "== benchmark: llama-3-8b shape, 8192 tokens" | tee "$OUT/bench.log"
if [ "$mode" = quick ]; then
    "$BIN/gpu_bench" --levels cg-default --iters 10 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log" || rc=1
else
    KVWIRE_GPU_PROFILE=1 "$BIN/gpu_bench" --chunk 256 --iters 20 --cpu-check --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log" || rc=1
    KVWIRE_GPU_PROFILE=1 "$BIN/gpu_bench" --chunk 128,64 --iters 20 --json "$OUT/bench-chunks.jsonl" 2>&1 | tee -a "$OUT/bench.log" || rc=1
fi
echo "device-run: exit $rc" | tee -a "$OUT/bench.log"
exit $rc
