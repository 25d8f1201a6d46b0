#!/usr/bin/env bash
# Test hosts on one machine: N network namespaces on one IPv4 subnet, with optional
# one-way delay and packet loss on every link. Needs root (ip netns).
#
#   scripts/netns-cluster.sh up N [--delay MS] [--loss PERCENT] [--prefix ls] [--subnet 10.77.0]
#   scripts/netns-cluster.sh down [--prefix ls]
#   scripts/netns-cluster.sh hosts [--prefix ls]      # "NAMESPACE IP" a line
#
# Host i is namespace <prefix><i> with address <subnet>.<i+1>/24.
#
# Without delay or loss the namespaces are joined by veth pairs on a bridge in the root
# namespace. With delay or loss, `tc netem` on each namespace's veth applies them where the
# kernel has sch_netem; where it does not ("Specified qdisc kind is unknown", as on the
# Firecracker kernels this project is developed on), the links go through
# lockstep-linkem instead: a TUN interface per namespace and a userspace switch that delays
# and drops packets (target/release/lockstep-linkem, or $LINKEM).
set -euo pipefail

cmd=${1:-}
shift || true
n=0
delay=0
loss=0
prefix=ls
subnet=10.77.0
subnet_given=0
if [[ $cmd == up ]]; then
    n=${1:?usage: netns-cluster.sh up N [--delay MS] [--loss PERCENT]}
    shift
fi
while [[ $# -gt 0 ]]; do
    case $1 in
        --delay) delay=$2; shift 2 ;;
        --loss) loss=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --subnet) subnet=$2; subnet_given=1; shift 2 ;;
        *) echo "netns-cluster.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
state=/run/lockstep-netns-$prefix
here=$(cd "$(dirname "$0")" && pwd)

namespaces() { ip netns list | awk '{print $1}' | grep -E "^${prefix}[0-9]+$" | sort -V || true; }

down() {
    if [[ -f $state/linkem.pid ]]; then
        kill "$(cat "$state/linkem.pid")" 2>/dev/null || true
    fi
    for ns in $(namespaces); do
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "${prefix}br" 2>/dev/null || true
    rm -rf "$state"
}

has_netem() {
    ip netns add "${prefix}probe"
    local ok=0
    ip -n "${prefix}probe" link set lo up
    ip netns exec "${prefix}probe" tc qdisc add dev lo root netem delay 1ms 2>/dev/null && ok=1
    ip netns del "${prefix}probe"
    [[ $ok == 1 ]]
}

up() {
    [[ $n -ge 1 ]] || { echo "netns-cluster.sh: N must be at least 1" >&2; exit 2; }
    down
    mkdir -p "$state"
    local impaired=0
    [[ $delay != 0 || $loss != 0 ]] && impaired=1
    local mode=bridge
    if [[ $impaired == 1 ]] && ! has_netem; then
        mode=linkem
        echo "netns-cluster.sh: this kernel has no sch_netem; links go through lockstep-linkem" >&2
    fi
    for ((i = 0; i < n; i++)); do
        ip netns add "$prefix$i"
        ip -n "$prefix$i" link set lo up
    done
    if [[ $mode == bridge ]]; then
        ip link add "${prefix}br" type bridge
        ip link set "${prefix}br" up
        for ((i = 0; i < n; i++)); do
            ip link add "${prefix}v$i" type veth peer name eth0 netns "$prefix$i"
            ip link set "${prefix}v$i" master "${prefix}br" up
            ip -n "$prefix$i" addr add "$subnet.$((i + 1))/24" dev eth0
            ip -n "$prefix$i" link set eth0 up
            if [[ $impaired == 1 ]]; then
                ip netns exec "$prefix$i" tc qdisc add dev eth0 root netem delay "${delay}ms" loss "${loss}%"
            fi
        done
    else
        local linkem=${LINKEM:-$here/../target/release/lockstep-linkem}
        [[ -x $linkem ]] || { echo "netns-cluster.sh: $linkem not found (cargo build --release)" >&2; exit 1; }
        local hosts=()
        for ((i = 0; i < n; i++)); do hosts+=("$prefix$i=$subnet.$((i + 1))"); done
        local loss_p
        loss_p=$(awk "BEGIN { print $loss / 100 }")
        "$linkem" --delay-ms "$delay" --loss "$loss_p" "${hosts[@]}" >"$state/linkem.log" 2>&1 &
        echo $! >"$state/linkem.pid"
        # Ready when linkem says so: it prints its "linkem: N hosts" line once every
        # interface is configured. Setting up 4 hosts runs 16 `ip` commands, which took
        # over 10 s on 2 loaded cores, so wait on readiness (or linkem's exit), not a guess.
        local pid waited=0
        pid=$(cat "$state/linkem.pid")
        until grep -q '^linkem: ' "$state/linkem.log"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" && rc=0 || rc=$?
                echo "netns-cluster.sh: lockstep-linkem exited (status $rc) before its links were up:" >&2
                cat "$state/linkem.log" >&2
                exit 1
            fi
            if [[ $waited -ge 1200 ]]; then
                echo "netns-cluster.sh: lockstep-linkem not ready after 120 s; its log:" >&2
                cat "$state/linkem.log" >&2
                exit 1
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        ip -n "$prefix$((n - 1))" addr show | grep -q "$subnet.$n/" || {
            echo "netns-cluster.sh: linkem is ready but $prefix$((n - 1)) has no address $subnet.$n:" >&2
            ip -n "$prefix$((n - 1))" addr show >&2 || true
            exit 1
        }
    fi
    echo "$mode" >"$state/mode"
    echo "$subnet" >"$state/subnet"
    echo "netns-cluster.sh: $n hosts ($mode, delay ${delay} ms, loss ${loss}%): $(hosts | tr '\n' ' ')" >&2
}

hosts() {
    local i=0
    # The subnet `up` used, unless one is given.
    [[ $subnet_given == 0 && -f $state/subnet ]] && subnet=$(cat "$state/subnet")
    for ns in $(namespaces); do
        echo "$ns $subnet.$((${ns#"$prefix"} + 1))"
        i=$((i + 1))
    done
}

case $cmd in
    up) up ;;
    down) down ;;
    hosts) hosts ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
