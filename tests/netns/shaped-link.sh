#!/usr/bin/env bash
# shaped-link.sh: a rate-shaped point-to-point link between two network
# namespaces, for the transport tests and benchmarks.  See README.md here.
#
#   shaped-link.sh up   [--name PREFIX] [--rate RATE] [--delay MS]
#                       [--burst BYTES] [--limit BYTES] [--gso-segs N]
#   shaped-link.sh down [--name PREFIX]
#   shaped-link.sh rate [--name PREFIX] --rate RATE   (re-shape a link that is up)
#   shaped-link.sh exec a|b [--name PREFIX] -- CMD [ARG...]
#   shaped-link.sh check [--delay MS]
#
# `up` prints one eval-able line on stdout and nothing else:
#   A=<prefix>-a B=<prefix>-b ADDR_A=192.0.2.1 ADDR_B=192.0.2.2
# `check` exits 0 when the harness can run here, else 77 (the automake/ctest
# "skipped" code) with one line on stderr saying why.
#
# Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), iproute2 (ip, tc), coreutils, awk,
# and a kernel with veth and sch_tbf (sch_netem for --delay).

set -euo pipefail

readonly PROG=shaped-link
readonly ADDR_A=192.0.2.1   # RFC 5737 TEST-NET-1: never routed anywhere
readonly ADDR_B=192.0.2.2
readonly PLEN=24

die()  { echo "$PROG: error: $*" >&2; exit 1; }
warn() { echo "$PROG: warning: $*" >&2; }

usage() {
    cat >&2 <<'EOF'
usage: shaped-link.sh up   [--name PREFIX] [--rate RATE] [--delay MS]
                           [--burst BYTES] [--limit BYTES] [--gso-segs N]
       shaped-link.sh down [--name PREFIX]
       shaped-link.sh rate [--name PREFIX] --rate RATE
       shaped-link.sh exec a|b [--name PREFIX] -- CMD [ARG...]
       shaped-link.sh check [--delay MS]
RATE: <number><bit|kbit|mbit|gbit|tbit> (SI, as tc), default 1gbit.
MS:   one-way delay in milliseconds added in each direction (RTT grows by 2*MS).
PREFIX: [A-Za-z0-9][A-Za-z0-9_.-]*, at most 40 characters, default "kvwire".
BYTES: tbf bucket and bucket+queue sizes (default rate/250 and that + 5 ms).
N:    most MTU-sized segments per packet the qdisc sees (default 44, 64 KiB as a TSO NIC takes; 1 = no GSO).
EOF
    exit 2
}

# ---------------------------------------------------------------- arguments

PREFIX=kvwire
RATE=1gbit
DELAY_MS=
BURST=
LIMIT=
GSO_SEGS=44

need_val() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

set_prefix() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$ ]] \
        || die "bad --name '$1' (want [A-Za-z0-9][A-Za-z0-9_.-]*, at most 40 characters)"
    PREFIX=$1
}

# Rate in bit/s, as an integer; SI multipliers like tc's "kbit", "mbit", ...
rate_bps() {
    local r=${1,,}
    [[ $r =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)$ ]] \
        || die "bad --rate '$1' (want e.g. 1gbit, 500mbit, 2.5gbit)"
    local mult
    case ${BASH_REMATCH[3]} in
        bit) mult=1 ;; kbit) mult=1000 ;; mbit) mult=1000000 ;;
        gbit) mult=1000000000 ;; tbit) mult=1000000000000 ;;
    esac
    local bps
    bps=$(awk -v n="${BASH_REMATCH[1]}" -v m="$mult" 'BEGIN { printf "%.0f", n * m }')
    ((bps >= 8000)) || die "--rate '$1' is below 8kbit"
    echo "$bps"
}

check_delay() {
    [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad --delay '$1' (milliseconds, e.g. 1 or 0.5)"
}

check_bytes() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "bad $1 '$2' (a byte count)"
}

# Interface names: IFNAMSIZ allows 15 characters, so derive short ones from a
# hash of the prefix ("kv" + 8 hex digits + side = 11 characters).  Distinct
# prefixes get distinct names, so several harnesses can run at once.
derive_names() {
    NS_A=$PREFIX-a
    NS_B=$PREFIX-b
    local h
    h=$(printf '%s' "$PREFIX" | sha256sum | cut -c1-8)
    IF_A=kv${h}a
    IF_B=kv${h}b
}

ns_exists() {
    ip netns list 2>/dev/null | awk '{ print $1 }' | grep -qxF -- "$1"
}

# ---------------------------------------------------------------- down

# Kill whatever a test left running inside one of our namespaces (a daemonized
# server, say): a namespace lives on, with its addresses, while a process is in it.
kill_ns_pids() {
    local ns=$1 pids i
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for i in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -n $pids ]] || return 0
        sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

# Remove everything `up` may have made for PREFIX.  Never fails.
do_down() {
    derive_names
    local ns dev
    for ns in "$NS_A" "$NS_B"; do
        if ns_exists "$ns"; then
            # Deleting one end of a veth deletes the pair.
            ip -n "$ns" link del "$IF_A" >/dev/null 2>&1 || true
            ip -n "$ns" link del "$IF_B" >/dev/null 2>&1 || true
            kill_ns_pids "$ns"
            ip netns del "$ns" >/dev/null 2>&1 || true
        fi
    done
    # The veth is created directly inside the namespaces and never appears in
    # the root namespace; this only catches an end stranded by a foreign tool.
    for dev in "$IF_A" "$IF_B"; do
        if ip link show dev "$dev" >/dev/null 2>&1; then
            ip link del dev "$dev" >/dev/null 2>&1 || true
        fi
    done
    return 0
}

# ---------------------------------------------------------------- up

# Receive steering.  A veth without XDP delivers with netif_rx() to the
# backlog of whichever CPU transmits, and behind a qdisc that CPU changes:
# the sender's when tbf has tokens, the timer's when it had to wait.  Two CPUs'
# backlogs then run in either order and the receiver sees reordering, which
# costs TCP spurious retransmits and throughput (measured: out-of-order
# segments and retransmits on a loaded 2-vCPU VM).  RPS hashes each flow to
# one CPU, so a flow's packets always share one backlog and stay in order, as
# on a real wire.
rps_mask() {
    # All CPUs 0..n-1 in the kernel's format: hex, comma every 32 bits.
    local n out="" w
    n=$(nproc --all 2>/dev/null || echo 1)
    while ((n > 0)); do
        if ((n >= 32)); then w=ffffffff; n=$((n - 32))
        else w=$(printf '%x' $(( (1 << n) - 1 ))); n=0; fi
        out=$w${out:+,$out}
    done
    echo "$out"    # only the leftmost (highest) group can be short
}

set_rps() {
    local ns=$1 dev=$2 mask
    mask=$(rps_mask)
    # shellcheck disable=SC2016  # $1 and $2 are the inner shell's
    ip netns exec "$ns" sh -c '
        for q in /sys/class/net/"$1"/queues/rx-*; do
            echo "$2" 2>/dev/null > "$q/rps_cpus" || echo 1 > "$q/rps_cpus"
        done' sh "$dev" "$mask" >&2 \
        || warn "could not set RPS on $dev in $ns; packets may be reordered under CPU load"
}

# Wait until the link reports carrier on this end (veth turns it on once both
# ends are up; link state reaches user space a moment later).
wait_up() {
    local ns=$1 dev=$2 i
    for ((i = 0; i < 100; i++)); do
        if [[ $(ip -n "$ns" -o link show dev "$dev" 2>/dev/null) == *"state UP"* ]]; then
            return 0
        fi
        sleep 0.05
    done
    die "$dev in $ns did not come up within 5 s"
}

UP_OK=0
up_exit_trap() {
    local rc=$?
    if ((UP_OK == 0)); then
        do_down
        ((rc != 0)) || rc=1
        echo "$PROG: up failed; removed what it had created" >&2
    fi
    exit "$rc"
}

# Shape one direction: the egress of $dev in $ns.
shape() {
    local ns=$1 dev=$2
    # tbf parameters, all in bytes:
    #  burst: the bucket size.  Rule of thumb for tbf: at least rate/HZ, the
    #    bytes of one timer tick at the rate; smaller, and a late or coarse
    #    timer leaves the link idle with packets queued, below its rate.  We
    #    assume HZ=250 (Debian's kernels): 500000 B at 1gbit, 4 ms of rate.
    #    Modern tbf uses hrtimers, so this is a safe margin for a loaded
    #    machine rather than a hard need.  It must also exceed the largest
    #    packet (--gso-segs frames), or tbf re-segments it in software; see
    #    min_burst in do_up for the floor at low rates.
    #  limit: bucket + queue; the queue holds 5 ms at the rate (625000 B at
    #    1gbit): enough to absorb a TCP window's bursts without drops that cost
    #    throughput, short enough to keep the RTT under load realistic.
    # The rate counts Ethernet frame bytes (header + payload, per segment of a
    # GSO packet); preamble, FCS and inter-frame gap are not counted, so TCP
    # goodput at MTU 1500 tops out at 1448/1514 of the rate (956 Mbit/s at
    # 1gbit; real gigabit Ethernet gives 941).
    local tbf=(tbf rate "${BPS}bit" burst "$BURST_B" limit "$LIMIT_B")
    if [[ -n $DELAY_MS ]]; then
        # netem first (root, handle 1:) then tbf as its child: packets wait
        # DELAY_MS in netem, then queue in tbf for the rate.  netem's limit is in
        # packets (default 1000, too few past a few ms at 1gbit): room for twice
        # what the delay line plus the tbf queue hold in full-size frames.
        local nlimit
        nlimit=$(awk -v bps="$BPS" -v ms="$DELAY_MS" -v lim="$LIMIT_B" 'BEGIN {
            n = 2 * (bps / 8 * ms / 1000 + lim) / 1514; n = int(n) + 1;
            if (n < 1000) n = 1000; print n }')
        tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "${DELAY_MS}ms" limit "$nlimit" >&2 \
            || die "cannot add netem qdisc on $dev in $ns (kernel without sch_netem?)"
        tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: "${tbf[@]}" >&2 \
            || die "cannot add tbf qdisc under netem on $dev in $ns"
    else
        tc -n "$ns" qdisc add dev "$dev" root "${tbf[@]}" >&2 \
            || die "cannot add tbf qdisc on $dev in $ns (kernel without sch_tbf?)"
    fi
}

do_up() {
    BPS=$(rate_bps "$RATE")
    # Smallest sane bucket: 16 full frames, and more than the largest packet
    # (a GSO packet is at most 64 KiB, about 44 frames).
    local segs=$((GSO_SEGS < 44 ? GSO_SEGS : 44))
    local min_burst=$(( (segs < 16 ? 16 : segs + 1) * 1514 ))
    if [[ -n $BURST ]]; then
        BURST_B=$BURST
        ((BURST_B >= min_burst)) || die "--burst must be at least $min_burst bytes with --gso-segs $GSO_SEGS"
    else
        BURST_B=$(( BPS / 8 / 250 ))
        ((BURST_B >= min_burst)) || BURST_B=$min_burst
    fi
    LIMIT_B=${LIMIT:-$(( BURST_B + BPS * 5 / 8000 ))}
    ((LIMIT_B >= BURST_B)) || die "--limit ($LIMIT_B) must be at least the burst ($BURST_B)"
    if [[ -n $DELAY_MS ]] && awk -v d="$DELAY_MS" 'BEGIN { exit !(d == 0) }'; then
        DELAY_MS=
    fi
    command -v ip >/dev/null || die "'ip' (iproute2) not found"
    command -v tc >/dev/null || die "'tc' (iproute2) not found"

    do_down                      # a crashed earlier run with the same prefix
    trap up_exit_trap EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    ip netns add "$NS_A" >&2 || die "cannot create network namespace $NS_A"
    ip netns add "$NS_B" >&2 || die "cannot create network namespace $NS_B"
    # Create each end directly inside its namespace: the root namespace never
    # holds them.
    #
    # Offloads: with GSO/TSO, TCP hands the qdisc up to 64 KiB (44 frames) in
    # one packet, which tbf meters and sends as one burst.  Turning them off
    # (ethtool -K gso off tso off) makes every frame a packet, but a veth pair
    # then costs a full trip through the stack per 1514 bytes: on a 2-vCPU VM
    # that measured 525 Mbit/s unshaped, short of the 1 Gbit/s to emulate.
    # So keep GSO, capped with gso_max_segs (iproute2 alone, no ethtool, so the
    # link is the same wherever it runs) at N frames per packet.  The default,
    # 44 (64 KiB), is what a host with a TSO NIC hands its NIC: each end then
    # pays the per-packet CPU such a host pays, which the pipelining benchmarks
    # (each end on one core) measure.  8 frames (12 KB, 97 us at 1gbit) gave
    # the same rate at five times that cost.  GRO is off on veth unless XDP is
    # attached.
    ip link add "$IF_A" netns "$NS_A" gso_max_segs "$GSO_SEGS" type veth \
        peer name "$IF_B" netns "$NS_B" gso_max_segs "$GSO_SEGS" >&2 \
        || die "cannot create veth pair $IF_A/$IF_B"

    local side ns dev addr
    for side in a b; do
        if [[ $side == a ]]; then ns=$NS_A dev=$IF_A addr=$ADDR_A
        else ns=$NS_B dev=$IF_B addr=$ADDR_B; fi
        ip -n "$ns" link set dev lo up >&2
        ip -n "$ns" addr add "$addr/$PLEN" dev "$dev" >&2
        set_rps "$ns" "$dev"
        shape "$ns" "$dev"
        ip -n "$ns" link set dev "$dev" up >&2
    done

    wait_up "$NS_A" "$IF_A"
    wait_up "$NS_B" "$IF_B"

    UP_OK=1
    trap - EXIT INT TERM
    echo "A=$NS_A B=$NS_B ADDR_A=$ADDR_A ADDR_B=$ADDR_B"
}

# Changes the rate of a link that is up (`tc qdisc change`, connections keep running), with
# the bucket and queue sizes `up` would pick for the new rate.
do_rate() {
    BPS=$(rate_bps "$RATE")
    local segs=$((GSO_SEGS < 44 ? GSO_SEGS : 44))
    local min_burst=$(( (segs < 16 ? 16 : segs + 1) * 1514 ))
    BURST_B=$(( BPS / 8 / 250 ))
    ((BURST_B >= min_burst)) || BURST_B=$min_burst
    LIMIT_B=$(( BURST_B + BPS * 5 / 8000 ))
    local tbf=(tbf rate "${BPS}bit" burst "$BURST_B" limit "$LIMIT_B")
    local pair
    for pair in "$NS_A $IF_A" "$NS_B $IF_B"; do
        set -- $pair
        ns_exists "$1" || die "no namespace $1 (is the link up?)"
        # tbf is the root, or netem's child with --delay.
        tc -n "$1" qdisc change dev "$2" root "${tbf[@]}" >&2 2>/dev/null \
            || tc -n "$1" qdisc change dev "$2" parent 1:1 handle 10: "${tbf[@]}" >&2 \
            || die "cannot change the tbf rate on $2 in $1"
    done
}

# ---------------------------------------------------------------- check

CHECK_NS=
check_cleanup() {
    [[ -z $CHECK_NS ]] || ip netns del "$CHECK_NS" >/dev/null 2>&1 || true
}

skip() { echo "$PROG: cannot run here: $*" >&2; exit 77; }

first_line() { printf '%s' "$1" | head -n 1; }

do_check() {
    [[ $(id -u) == 0 ]] || skip "not root (needs CAP_NET_ADMIN and CAP_SYS_ADMIN for network namespaces)"
    command -v ip >/dev/null 2>&1 || skip "'ip' (iproute2) not found"
    command -v tc >/dev/null 2>&1 || skip "'tc' (iproute2) not found"
    command -v sha256sum >/dev/null 2>&1 || skip "'sha256sum' (coreutils) not found"
    command -v awk >/dev/null 2>&1 || skip "'awk' not found"

    CHECK_NS=kvwire-check-$$-$RANDOM
    trap check_cleanup EXIT
    local err
    err=$(ip netns add "$CHECK_NS" 2>&1) || { CHECK_NS=; skip "cannot create a network namespace: $(first_line "$err")"; }
    err=$(ip -n "$CHECK_NS" link add kvchk0 type veth peer name kvchk1 2>&1) \
        || skip "cannot create a veth pair: $(first_line "$err")"
    err=$(tc -n "$CHECK_NS" qdisc add dev kvchk0 root tbf rate 1gbit burst 500000 limit 1125000 2>&1) \
        || skip "cannot add a tbf qdisc (sch_tbf): $(first_line "$err")"
    if [[ -n $DELAY_MS ]]; then
        err=$(tc -n "$CHECK_NS" qdisc add dev kvchk1 root netem delay "${DELAY_MS}ms" 2>&1) \
            || skip "cannot add a netem qdisc for --delay (kernel without sch_netem?): $(first_line "$err")"
    fi
    exit 0
}

# ---------------------------------------------------------------- exec

do_exec() {
    local side=$1; shift
    derive_names
    local ns
    case $side in a) ns=$NS_A ;; b) ns=$NS_B ;; *) usage ;; esac
    (($# > 0)) || die "exec: no command (shaped-link.sh exec a|b [--name PREFIX] -- CMD...)"
    ns_exists "$ns" || die "namespace $ns does not exist (run 'up --name $PREFIX' first)"
    exec ip netns exec "$ns" "$@"
}

# ---------------------------------------------------------------- main

(($# > 0)) || usage
cmd=$1; shift

case $cmd in
    up)
        while (($# > 0)); do
            case $1 in
                --name)  need_val "$@"; set_prefix "$2"; shift 2 ;;
                --rate)  need_val "$@"; RATE=$2; shift 2 ;;
                --delay) need_val "$@"; check_delay "$2"; DELAY_MS=$2; shift 2 ;;
                --burst) need_val "$@"; check_bytes "$1" "$2"; BURST=$2; shift 2 ;;
                --limit) need_val "$@"; check_bytes "$1" "$2"; LIMIT=$2; shift 2 ;;
                --gso-segs)
                    need_val "$@"
                    if ! [[ $2 =~ ^[1-9][0-9]{0,4}$ ]] || (($2 > 65535)); then
                        die "bad --gso-segs '$2' (1..65535)"
                    fi
                    GSO_SEGS=$2; shift 2 ;;
                *) usage ;;
            esac
        done
        derive_names
        do_up
        ;;
    down)
        while (($# > 0)); do
            case $1 in
                --name) need_val "$@"; set_prefix "$2"; shift 2 ;;
                *) usage ;;
            esac
        done
        do_down
        ;;
    rate)
        while (($# > 0)); do
            case $1 in
                --name) need_val "$@"; set_prefix "$2"; shift 2 ;;
                --rate) need_val "$@"; RATE=$2; shift 2 ;;
                *) usage ;;
            esac
        done
        derive_names
        do_rate
        ;;
    exec)
        (($# > 0)) || usage
        side=$1; shift
        while (($# > 0)); do
            case $1 in
                --name) need_val "$@"; set_prefix "$2"; shift 2 ;;
                --) shift; break ;;
                -*) usage ;;
                *) break ;;
            esac
        done
        do_exec "$side" "$@"
        ;;
    check)
        while (($# > 0)); do
            case $1 in
                --delay) need_val "$@"; check_delay "$2"; DELAY_MS=$2; shift 2 ;;
                *) usage ;;
            esac
        done
        do_check
        ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
