#!/usr/bin/env bash
# Starts a lockstep run where the machines already are.
#
# Over ssh, from a hostfile:
#   scripts/launch.sh --hostfile FILE [options] -- CONFIG [--set key=value ...]
#     FILE: one host a line, `NAME [slots=N] [addr=IP]` (# comments). The first host runs the
#     coordinator; every host runs `slots` workers (default 1; slots=0 for a coordinator-only
#     host). Ranks follow the file's order. NAME is what the remote shell connects to; addr is
#     the address the other hosts reach it at (default NAME).
#     --rsh CMD        remote shell, called as `CMD HOST 'command'` (default: ssh -o BatchMode=yes).
#                      scripts/netns-rsh.sh runs the command in a network namespace instead
#                      (test hosts from scripts/netns-cluster.sh).
#     --port N         coordinator port (default: $MASTER_PORT or 7070)
#     --bin PATH       the lockstep binary on the hosts (default: target/release/lockstep here)
#     --workdir DIR    where commands run on the hosts (default: this directory)
#     --out DIR        run directory on the coordinator host (default: runs/<job name>)
#     --worker-args S  extra arguments for every worker (e.g. "--threads 2 --congestion bbr")
#     --coordinator-args S   extra arguments for the coordinator
#     --logs DIR       where the coordinator's and workers' output is kept here (default: a temp dir)
#
# Under Slurm (`srun scripts/launch.sh -- CONFIG`) or mpirun (`mpirun -n N scripts/launch.sh
# -- CONFIG`), every task runs this script: it maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID,
# OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} or PMI_RANK/PMI_SIZE to RANK, WORLD_SIZE and
# LOCAL_RANK; rank 0 also starts the coordinator (advertised as $MASTER_ADDR, default its
# host name). The tasks meet through files in the run directory (--out), which must be on a
# file system all nodes share: the join address (launch-<id>.join) and the token.
# The launch id is $SLURM_JOB_ID.$SLURM_STEP_ID, $OMPI_MCA_ess_base_jobid, $PMIX_NAMESPACE
# or --launch-id.
#
# The token never appears on a command line: it goes to each remote shell on stdin.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
hostfile=
rsh="ssh -o BatchMode=yes"
port=${MASTER_PORT:-7070}
bin=$here/target/release/lockstep
workdir=$PWD
out=
worker_args=
coordinator_args=
logs=
launch_id=
while [[ $# -gt 0 ]]; do
    case $1 in
        --hostfile) hostfile=$2; shift 2 ;;
        --rsh) rsh=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --workdir) workdir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --worker-args) worker_args=$2; shift 2 ;;
        --coordinator-args) coordinator_args=$2; shift 2 ;;
        --logs) logs=$2; shift 2 ;;
        --launch-id) launch_id=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "launch.sh: unknown option $1 (job arguments go after --)" >&2; exit 2 ;;
    esac
done
[[ $# -ge 1 ]] || { echo "launch.sh: no job: launch.sh [options] -- CONFIG [--set k=v ...]" >&2; exit 2; }
job=("$@")
if [[ -z $out ]]; then
    name=$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "${job[0]}" | head -1)
    out=runs/${name:-launch}
fi

# Quotes one argument for a remote shell.
q() { printf '%q' "$1"; }
job_q=$(for a in "${job[@]}"; do printf '%s ' "$(q "$a")"; done)

rank_env() {
    RANK=${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-}}}
    WORLD_SIZE=${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-}}}
    LOCAL_RANK=${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-0}}}
}

if [[ -z $hostfile ]]; then
    rank_env
    if [[ -z $RANK || -z $WORLD_SIZE ]]; then
        echo "launch.sh: give --hostfile, or run under srun or mpirun (no SLURM_PROCID, OMPI_COMM_WORLD_RANK or PMI_RANK here)" >&2
        exit 2
    fi
    if [[ -z $launch_id ]]; then
        if [[ -n ${SLURM_JOB_ID:-} ]]; then launch_id=$SLURM_JOB_ID.${SLURM_STEP_ID:-0}
        elif [[ -n ${OMPI_MCA_ess_base_jobid:-} ]]; then launch_id=$OMPI_MCA_ess_base_jobid
        elif [[ -n ${PMIX_NAMESPACE:-} ]]; then launch_id=$PMIX_NAMESPACE
        else echo "launch.sh: cannot tell this launch apart from earlier ones: pass --launch-id" >&2; exit 2
        fi
    fi
    export RANK WORLD_SIZE LOCAL_RANK
    mkdir -p "$out"
    join_file=$out/launch-${launch_id//\//_}.join
    coordinator_pid=
    if [[ $RANK == 0 ]]; then
        rm -f "$join_file"
        advertise=${MASTER_ADDR:-$(hostname)}
        # shellcheck disable=SC2086
        "$bin" coordinator --listen "0.0.0.0:$port" --advertise "$advertise" --workers "$WORLD_SIZE" \
            --out "$out" --join-file "$join_file" --quiet $coordinator_args "${job[@]}" &
        coordinator_pid=$!
    fi
    token_args=(--token-file "$out/token")
    [[ -n ${LOCKSTEP_TOKEN:-} ]] && token_args=()
    # shellcheck disable=SC2086
    "$bin" worker --once --join-file "$join_file" "${token_args[@]}" $worker_args &
    worker_pid=$!
    # Preemption: pass SIGTERM/SIGINT on to what this task started (they stop after the
    # current step, with a checkpoint), then wait for them as usual.
    forward() { kill "-$1" "$worker_pid" $coordinator_pid 2>/dev/null || true; }
    trap 'forward TERM' TERM
    trap 'forward INT' INT
    # (A trapped signal interrupts `wait`: wait again until the process has exited.)
    wait_for() {
        status=0
        wait "$1" || status=$?
        while kill -0 "$1" 2>/dev/null; do status=0; wait "$1" || status=$?; done
    }
    wait_for "$worker_pid"
    worker_status=$status
    if [[ -n $coordinator_pid ]]; then wait_for "$coordinator_pid"; fi
    [[ $worker_status != 0 ]] && status=$worker_status
    exit "$status"
fi

# --- hostfile mode -------------------------------------------------------------------------
names=() slots=() addrs=()
while read -r line; do
    line=${line%%#*}
    read -r -a fields <<<"$line"
    [[ ${#fields[@]} -eq 0 ]] && continue
    name=${fields[0]} n=1 addr=${fields[0]}
    for f in "${fields[@]:1}"; do
        case $f in
            slots=*) n=${f#slots=} ;;
            addr=*) addr=${f#addr=} ;;
            *) echo "launch.sh: $hostfile: unknown field '$f' for host $name (expected slots=N or addr=IP)" >&2; exit 2 ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ ]] || { echo "launch.sh: $hostfile: slots=$n for host $name is not a number" >&2; exit 2; }
    names+=("$name") slots+=("$n") addrs+=("$addr")
done <"$hostfile"
[[ ${#names[@]} -ge 1 ]] || { echo "launch.sh: $hostfile lists no hosts" >&2; exit 2; }
world=0
for n in "${slots[@]}"; do world=$((world + n)); done
[[ $world -ge 1 ]] || { echo "launch.sh: $hostfile gives no worker slots" >&2; exit 2; }

logs=${logs:-$(mktemp -d -t lockstep-launch.XXXXXX)}
mkdir -p "$logs"
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
# Preemption: the first SIGTERM/SIGINT goes to the coordinator, which stops every rank
# after its current step with a checkpoint (over the control plane, so on every host);
# a second one stops everything at once.
stopping=0
on_signal() {
    if [[ $stopping == 1 ]]; then exit "$2"; fi
    stopping=1
    echo "launch.sh: $1: the coordinator stops every rank after its current step, with a checkpoint" >&2
    kill "-$1" "${pids[0]}" 2>/dev/null || true
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

# The remote command reads the token from stdin into LOCKSTEP_TOKEN, then runs.
remote() {
    local host=$1 cmd=$2 log=$3
    printf '%s\n' "$token" | $rsh "$host" "cd $(q "$workdir") && read -r LOCKSTEP_TOKEN && export LOCKSTEP_TOKEN && $cmd" >"$log" 2>&1 &
    pids+=($!)
}

echo "launch.sh: coordinator on ${names[0]} (${addrs[0]}:$port), $world workers; output in $logs" >&2
remote "${names[0]}" "HOSTNAME=$(q "${names[0]}") exec $(q "$bin") coordinator --listen 0.0.0.0:$port \
--advertise $(q "${addrs[0]}") --workers $world --out $(q "$out") --quiet $coordinator_args $job_q" "$logs/coordinator.log"
coordinator=${pids[0]}
join=
for _ in $(seq 600); do
    join=$(sed -n 's/^join address: //p' "$logs/coordinator.log" | head -1)
    [[ -n $join ]] && break
    kill -0 "$coordinator" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $join ]]; then
    echo "launch.sh: the coordinator did not start:" >&2
    tail -20 "$logs/coordinator.log" >&2
    exit 1
fi
echo "launch.sh: join address $join" >&2

rank=0
for i in "${!names[@]}"; do
    for ((local_rank = 0; local_rank < slots[i]; local_rank++)); do
        remote "${names[i]}" "HOSTNAME=$(q "${names[i]}") RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$local_rank \
exec $(q "$bin") worker --once --join $(q "$join") --advertise $(q "${addrs[i]}") $worker_args" "$logs/worker-$rank.log"
        rank=$((rank + 1))
    done
done

# (A trapped signal interrupts `wait`: wait again until the coordinator has exited.)
status=0
wait "$coordinator" || status=$?
while kill -0 "$coordinator" 2>/dev/null; do status=0; wait "$coordinator" || status=$?; done
# Workers leave after the coordinator's Shutdown; give them a moment, then stop stragglers.
for p in "${pids[@]:1}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
done
if [[ $status != 0 ]]; then
    echo "launch.sh: the coordinator exited with $status; its output:" >&2
    tail -20 "$logs/coordinator.log" >&2
fi
sed -n '/steps in/p' "$logs/coordinator.log"
exit "$status"
