#!/usr/bin/env bash
# The compression policy over shaped links: one KV file sent with `kvwire send` between two
# network namespaces (shaped-link.sh) at every fixed level and at `--level auto`, at each
# rate, timing send-to-last-layer-decoded (the levels in turn, each rep in the order of the
# next row of a Williams square, so that every level follows every other equally often);
# prints the table and whether auto is within 1.10x of the best fixed level at each rate,
# and auto's speed-up over raw at 1 Gbit/s. --reps in multiples of 6 (of the number of
# levels; twice it when odd) balance the neighbours fully.
#
#   tests/netns/policy-bench.sh [--kv FILE] [--rates "0.3gbit 1gbit 3gbit 10gbit unshaped"]
#                               [--levels "raw q8 cg-high cg-default cg-low auto"] [--reps N]
#                               [--receiver warm|fresh] [--runs FILE]
#   tests/netns/policy-bench.sh --summarize "RUNS_FILE..." [--rates LIST] [--levels LIST]
#
# "unshaped": the veth pair with its tbf qdiscs removed. Both ends share this machine's
# cores (no pinning): the codec competes with the other side and with anything else running.
# --receiver warm (default): one `kvwire recv --transfers` per rate, as a long-lived decode
# worker, each transfer decoding into the last one's memory (an untimed transfer first warms
# it); fresh: a new receiver process per transfer, decoding into fresh pages (on this VM the
# first touch of fresh memory costs the receiver 1-3x from run to run). Every sender is a new
# process and probes the link. The received caches go to /dev/null.
# Beside each rate's auto/best it prints a 90% bootstrap interval of that ratio (the best
# level chosen again in every resample) and the median of the per-rep ratios (auto and the
# best level ran in the same rep, a few transfers apart): how far the medians can be trusted
# on a noisy host.
# --runs FILE keeps every transfer's `send --json` line (with its rate, and the level of the
# transfer before it as "after") in FILE;
# --summarize prints the table of such files pooled (batches of equal reps), running nothing.
# KVWIRE_BIN selects the binary (default target/release/kvwire); exits 77 (skip) when
# network namespaces are not available here.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
NET="$HERE/shaped-link.sh"
BIN=${KVWIRE_BIN:-$ROOT/target/release/kvwire}
KV=$ROOT/data/smollm2-pydoc-4096.safetensors
RATES="0.3gbit 1gbit 3gbit 10gbit unshaped"
LEVELS="raw q8 cg-high cg-default cg-low auto"
REPS=1
RECEIVER=warm
RUNS=
SUMMARIZE=

while (($# > 0)); do
    case $1 in
        --kv) KV=$2; shift 2 ;;
        --rates) RATES=$2; shift 2 ;;
        --levels) LEVELS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --receiver) RECEIVER=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --summarize) SUMMARIZE=$2; shift 2 ;;
        *) echo "usage: $0 [--kv FILE] [--rates LIST] [--levels LIST] [--reps N] [--receiver warm|fresh] [--runs FILE] | --summarize \"FILE...\"" >&2; exit 2 ;;
    esac
done
# Prints the table, the verdicts and the JSON summary of the runs in file $1.
summarize() {
    python3 - "$1" "$KV" "$RATES" "$LEVELS" "$RECEIVER" <<'PY'
import json, random, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rates, levels = sys.argv[3].split(), sys.argv[4].split()
t = {}
for r in rows:
    t.setdefault((r["rate"], r["level"]), []).append(r["last_layer_decoded_s"] * 1e3)
med = {k: statistics.median(v) for k, v in t.items()}

def spread(rate):
    """How sure the ratio is: a 90% bootstrap interval of median(auto) / the best fixed
    level's median, the runs of every level resampled and the best level chosen again in
    each resample (so picking the luckiest of near-equal levels counts against auto as it
    does in the headline figure); and the median of the per-rep ratios of auto to the best
    level's run in the same rep (a few transfers apart, under about the same load)."""
    fixed = [l for l in levels if l != "auto" and (rate, l) in t]
    if not fixed or (rate, "auto") not in t:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(7)
    boot = []
    for _ in range(2000):
        m = lambda l: statistics.median(rng.choices(t[(rate, l)], k=len(t[(rate, l)])))
        boot.append(m("auto") / min(m(l) for l in fixed))
    boot.sort()
    best = min(fixed, key=lambda l: med[(rate, l)])
    paired = statistics.median(a / b for a, b in zip(t[(rate, "auto")], t[(rate, best)]))
    return boot[len(boot) // 20], boot[len(boot) * 19 // 20], paired
print(f"KV {sys.argv[2]}: send-to-last-layer-decoded, ms (median of {len(next(iter(t.values())))}; {sys.argv[5]} receiver)")
print(f"{'rate':>10} " + " ".join(f"{l:>10}" for l in levels) + "   auto/best  auto's blocks per run")
summary = []
for rate in rates:
    fixed = {l: med[(rate, l)] for l in levels if l != "auto" and (rate, l) in med}
    best = min(fixed, key=fixed.get) if fixed else None
    a = med.get((rate, "auto"))
    ratio = a / fixed[best] if a and best else float("nan")
    pol = [r["policy"] for r in rows if r["rate"] == rate and r["level"] == "auto"]
    # What auto chose in each run: distinct block mixes, with how many runs chose each.
    mixes = {}
    for q in pol:
        mixes[q["blocks_per_level"]] = mixes.get(q["blocks_per_level"], 0) + 1
    counts = ", ".join(f"{m} x{n}" for m, n in sorted(mixes.items(), key=lambda kv: -kv[1]))
    print(f"{rate:>10} " + " ".join(f"{med.get((rate, l), float('nan')):10.1f}" for l in levels)
          + f"   {ratio:5.2f} ({best})  {counts}")
    summary.append({"rate": rate, "best_fixed": best, "auto_over_best": ratio,
                    "ms": {l: med.get((rate, l)) for l in levels}, "auto_policy": pol[-1] if pol else None})
for s in summary:
    r = s["auto_over_best"]
    lo, hi, paired = spread(s["rate"])
    s["auto_over_best_90ci"], s["auto_over_best_paired"] = [lo, hi], paired
    print(f"  {s['rate']}: auto / best fixed ({s['best_fixed']}) = {r:.2f}  (target <= 1.10: {'PASS' if r <= 1.10 else 'MISS'})"
          f"  90% bootstrap {lo:.2f}-{hi:.2f}, paired by rep {paired:.2f}")
one = [s for s in summary if s["rate"] == "1gbit"]
if one and one[0]["ms"].get("raw") and one[0]["ms"].get("auto"):
    sp = one[0]["ms"]["raw"] / one[0]["ms"]["auto"]
    print(f"  1gbit: raw / auto = {sp:.2f}x  (target >= 3: {'PASS' if sp >= 3 else 'MISS'})")
print(json.dumps(summary))
PY
}

if [[ -n $SUMMARIZE ]]; then
    POOLED=$(mktemp)
    # shellcheck disable=SC2086 # a list of files
    cat $SUMMARIZE >"$POOLED"
    summarize "$POOLED"
    rm -f "$POOLED"
    exit 0
fi

[[ -x $BIN ]] || { echo "no kvwire binary at $BIN (cargo build --release -p kvwire-bench)" >&2; exit 2; }
[[ $RECEIVER == warm || $RECEIVER == fresh ]] || { echo "--receiver is warm or fresh" >&2; exit 2; }
[[ -f $KV ]] || { echo "no KV file at $KV (see tools/realkv, or pass --kv)" >&2; exit 2; }
"$NET" check || exit $?

NAME=kvwpol$$
TMP=$(mktemp -d)
cleanup() { "$NET" down --name "$NAME" >/dev/null 2>&1 || true; rm -rf "$TMP"; }
trap cleanup EXIT

PORT=47500
# Starts a receiver for $1 transfers on a new port, in the background (RPID).
start_receiver() {
    PORT=$((PORT + 1))
    "$NET" exec b --name "$NAME" -- "$BIN" recv --calibrate --listen "$ADDR_B:$PORT" -o /dev/null \
        --transfers "$1" --timeout 60 --accept-timeout 60 --json >"$TMP/recv.json" 2>"$TMP/recv.err" &
    RPID=$!
}
# One transfer at level $1 to the receiver on PORT (retried while it is not listening yet);
# prints the sender's JSON line.
send_one() {
    local tries=0
    until "$NET" exec a --name "$NAME" -- "$BIN" send --connect "$ADDR_B:$PORT" "$KV" --level "$1" \
        --timeout 60 --json >"$TMP/send.json" 2>"$TMP/send.err"; do
        tries=$((tries + 1))
        if ((tries > 100)) || ! grep -q "refused" "$TMP/send.err"; then
            cat "$TMP/send.err" "$TMP/recv.err" >&2; kill "$RPID" 2>/dev/null || true; exit 1
        fi
        sleep 0.1
    done
}
# One timed transfer at level $1; prints the sender's JSON line.
transfer() {
    if [[ $RECEIVER == fresh ]]; then
        start_receiver 1
        send_one "$1"
        wait "$RPID"
    else
        send_one "$1"
    fi
    cat "$TMP/send.json"
}

# Row $2 (mod the square's rows) of a Williams square of order $1, as level indices: the
# first row is 0, 1, n-1, 2, n-2, ..., row r adds r (mod n) to each; for odd n, rows n..2n-1
# are rows 0..n-1 reversed.
williams_row() {
    local n=$1 rows=$1 r lo=1 hi=$(($1 - 1)) first=(0) row=() k
    ((n % 2 == 0)) || rows=$((2 * n))
    r=$(($2 % rows))
    while ((${#first[@]} < n)); do
        first+=("$lo"); lo=$((lo + 1))
        if ((${#first[@]} < n)); then first+=("$hi"); hi=$((hi - 1)); fi
    done
    for k in "${first[@]}"; do row+=($(((k + r % n) % n))); done
    if ((r >= n)); then
        for ((k = n - 1; k >= 0; k--)); do echo -n "${row[$k]} "; done
        echo
    else
        echo "${row[*]}"
    fi
}

RESULTS=$TMP/results.jsonl
: >"$RESULTS"
for rate in $RATES; do
    "$NET" down --name "$NAME" >/dev/null 2>&1 || true
    eval "$("$NET" up --name "$NAME" --rate "$([[ $rate == unshaped ]] && echo 10gbit || echo "$rate")")"
    if [[ $rate == unshaped ]]; then
        for ns in "$A" "$B"; do
            for dev in $(ip -n "$ns" -o link show type veth | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'); do
                tc -n "$ns" qdisc del dev "$dev" root
            done
        done
    fi
    # The receiver's calibration is measured once per build and cached: do it before timing.
    "$BIN" recv --calibrate --listen 127.0.0.1:1 -o /dev/null --accept-timeout 0.01 >/dev/null 2>&1 || true
    if [[ $RECEIVER == warm ]]; then
        start_receiver $((REPS * $(wc -w <<<"$LEVELS") + 1))
        send_one cg-low # untimed: the receiver's memory is touched once
        PREV=cg-low
    else
        PREV=
    fi
    read -ra ORDER <<<"$LEVELS"
    n=${#ORDER[@]}
    for ((i = 0; i < REPS; i++)); do
        # Rep i takes its order from row i of a Williams square: over n reps (2n for an odd
        # number of levels) every level comes right after every other level once. The
        # transfer before leaves its mark on the next (a CPU-heavy one slowed the next by
        # 10-15% at 10 Gbit/s here), so a fixed neighbour would bias a level's median; a
        # rotated list keeps every level's neighbour the same.
        read -ra ROW <<<"$(williams_row "$n" "$i")"
        for j in "${ROW[@]}"; do
            level=${ORDER[$j]}
            # Not in a subshell: the receiver's port and pid stay with this shell.
            transfer "$level" >"$TMP/line.json"
            python3 -c "import json,sys; d=json.load(open(sys.argv[2])); d['rate']=sys.argv[1]; d['after']=sys.argv[3]; print(json.dumps(d))" \
                "$rate" "$TMP/line.json" "${PREV:-}" >>"$RESULTS"
            PREV=$level
        done
    done
    [[ $RECEIVER == fresh ]] || wait "$RPID"
done

[[ -z $RUNS ]] || cp "$RESULTS" "$RUNS"
summarize "$RESULTS"
