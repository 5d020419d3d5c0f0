#!/usr/bin/env bash
# write_bw against its same-run baseline, repeated: each run is one server/client pair of
# `kvwire perf write_bw --compare-baseline` (iperf3 with -P = -q for tcp, memcpy for shm, each
# measured just before kvwire's own run), per fabric and connection count; prints every
# run's ratio and the median. One run on a shared machine can land on a slow moment of either
# tool; the median of several says what the two agree on.
#
#   bench/scripts/write-bw-compare.sh [--reps N] [--size BYTES] [--iters N] [--cases "tcp:1 tcp:2 shm:1 shm:2"]
#
# KVWIRE_BIN selects the binary (default target/release/kvwire). Exits 1 if a run fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${KVWIRE_BIN:-$ROOT/target/release/kvwire}
REPS=5
SIZE=1048576
ITERS=2000
CASES="tcp:1 tcp:2 shm:1 shm:2"
while (($# > 0)); do
    case $1 in
        --reps) REPS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --cases) CASES=$2; shift 2 ;;
        *) echo "usage: $0 [--reps N] [--size BYTES] [--iters N] [--cases LIST]" >&2; exit 2 ;;
    esac
done
[[ -x $BIN ]] || { echo "no kvwire binary at $BIN (cargo build --release -p kvwire-bench)" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

PORT=19300
echo "write_bw -s $SIZE -n $ITERS --compare-baseline, $REPS runs per case"
for case in $CASES; do
    fabric=${case%%:*}
    q=${case##*:}
    ratios=()
    for ((i = 0; i < REPS; i++)); do
        PORT=$((PORT + 3))
        args=(perf write_bw -s "$SIZE" -n "$ITERS" -q "$q" --fabric "$fabric" --compare-baseline -p "$PORT" --json)
        "$BIN" "${args[@]}" >"$TMP/server.json" 2>"$TMP/server.err" &
        spid=$!
        tries=0
        until "$BIN" "${args[@]}" 127.0.0.1 >"$TMP/client.json" 2>"$TMP/client.err"; do
            tries=$((tries + 1))
            if ((tries > 50)) || ! grep -qi "refused" "$TMP/client.err"; then
                cat "$TMP/client.err" "$TMP/server.err" >&2; kill "$spid" 2>/dev/null || true; exit 1
            fi
            sleep 0.1
        done
        wait "$spid"
        ratios+=("$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; b=r["baseline"]; print("%.0f %s %.0f %.3f" % (r["BW_average"], b["tool"], b["BW_average"], b["ratio"]))' "$TMP/client.json")")
    done
    python3 - "$fabric" "$q" "${ratios[@]}" <<'PY'
import statistics, sys
fabric, q, runs = sys.argv[1], sys.argv[2], [r.split() for r in sys.argv[3:]]
ratios = [float(r[3]) for r in runs]
med = statistics.median(ratios)
each = ", ".join(f"{r[3]} ({r[0]} vs {r[1]} {r[2]} MiB/s)" for r in runs)
ok = "PASS" if abs(med - 1) <= 0.10 else "MISS"
print(f"{fabric} -q {q}: median ratio {med:.3f} (target within 10%: {ok}); runs: {each}")
PY
done
