#!/usr/bin/env bash
# Fault tests: when one rank dies, the whole job must go down fast, loudly, and leave nothing
# behind. Prints "PASS name" / "FAIL name: why" lines and, last, "N passed, M failed".
# Runs standalone (bash tests/fault_tests.sh from anywhere, after `make picotron_cpu data`) or
# from tests/run_tests.sh, whose MPIRUN / BIN / TINY it takes when they are exported.
#
#   a. injected failure: PICOTRON_FAIL_AT=2:2 (to every rank) makes rank 2 stop at step 2 with
#      "picotron: rank 2: injected failure at step 2"; mpirun must exit non-zero within 10 s of
#      that line, the whole run must take under 60 s (a bound against hangs on a slow, shared machine), and no rank process may be left.
#   b. SIGKILL: kill -9 one rank of a 2-rank data-parallel run in mid-training; mpirun must exit
#      non-zero within 10 s and no rank process may be left.
#   c. pipeline parallel (-np 2 --pp 2 --grad-accum 4, mini): a and b for the last stage and, apart,
#      the first; the stage left alive is blocked on a receive from the dead one and must go down too.
#   d. context parallel (-np 2 --cp 2, mini): a and b for cp rank 1; the other is inside a ring or
#      halo exchange with it.
#
# Rank processes are told apart from everything else on the machine (mpirun included) by their
# argv[0]: the binary is copied into this run's own temp dir and started from there.
set -u
cd "$(dirname "$0")/.." || exit 1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1
MPIRUN=${MPIRUN:-mpirun --oversubscribe -x OPENBLAS_NUM_THREADS=1}
BIN=${BIN:-./picotron_cpu}
TINY=${TINY:---model tiny --data data/default --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2}
PPMINI="--model mini --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2"

FT=$(mktemp -d /tmp/picotron-fault.XXXXXX)
RANKBIN="$FT/picotron_cpu"
passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b - a}'; }   # seconds from a to b
less_than() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a < b)}'; }

# pids of rank processes still alive (zombies have no command line, so they do not match)
rank_pids() { pgrep -f "^$RANKBIN " || true; }

# Kill what this script started: mpirun by pid, then any rank process by pid.
MPIRUN_PID=
cleanup_procs() {
    if [ -n "$MPIRUN_PID" ] && kill -0 "$MPIRUN_PID" 2>/dev/null; then
        kill -TERM "$MPIRUN_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$MPIRUN_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MPIRUN_PID" 2>/dev/null
        wait "$MPIRUN_PID" 2>/dev/null
    fi
    local p
    for p in $(rank_pids); do kill -KILL "$p" 2>/dev/null; done
    MPIRUN_PID=
}
trap 'cleanup_procs; if [ -n "${PICOTRON_FAULT_KEEP:-}" ]; then echo "kept $FT" >&2; else rm -rf "$FT"; fi' EXIT

# what a run's output says: its first "picotron:" line, else its last 3 lines, on one line
said() { { grep -m1 '^picotron:' "$1" || tail -n 3 "$1"; } 2>/dev/null | tr '\n' '|'; }

# After mpirun has exited: rank processes get up to 2 s to disappear. Echoes the leftovers.
leftovers() {
    local left
    for _ in $(seq 20); do
        left=$(rank_pids)
        [ -z "$left" ] && return 0
        sleep 0.1
    done
    echo "$left" | tr '\n' ' '
}

if [ ! -x "$BIN" ] || [ ! -d data/default ] || [ ! -d data/mini ]; then
    why="no $BIN, data/default or data/mini (run make picotron_cpu data first)"
    fail "fault: injected failure" "$why"
    fail "fault: SIGKILL of one rank" "$why"
    echo "$passed passed, $failed failed"
    exit 1
fi
cp "$BIN" "$RANKBIN"

# inject NAME FAIL_AT RANKS FLAGS...: PICOTRON_FAIL_AT=FAIL_AT (RANK:STEP, to every rank) makes
# that rank stop with "picotron: rank RANK: injected failure at step STEP"; mpirun must exit
# non-zero within 10 s of that line, the whole run within 60 s, no rank process left.
inject() {
    local name=$1 spec=$2 ranks=$3
    shift 3
    local msg="picotron: rank ${spec%%:*}: injected failure at step ${spec#*:}"
    local out="$FT/inject.out" start seen rc end total left
    start=$(now)
    # shellcheck disable=SC2086  # MPIRUN is a word list
    $MPIRUN -x PICOTRON_FAIL_AT="$spec" -np "$ranks" "$RANKBIN" "$@" --steps 50 --log "$FT/inject.jsonl" \
        </dev/null >"$out" 2>&1 &
    MPIRUN_PID=$!
    seen=        # when the failure line first showed up in the output
    rc=
    while :; do
        if [ -z "$seen" ] && grep -qF "$msg" "$out" 2>/dev/null; then seen=$(now); fi
        if ! kill -0 "$MPIRUN_PID" 2>/dev/null; then wait "$MPIRUN_PID"; rc=$?; MPIRUN_PID=; break; fi
        if ! less_than "$(elapsed "$start" "$(now)")" 30; then break; fi   # hard cap, then kill
        sleep 0.1
    done
    end=$(now)
    [ -z "$seen" ] && grep -qF "$msg" "$out" 2>/dev/null && seen=$end
    total=$(elapsed "$start" "$end")
    if [ -z "$rc" ]; then
        cleanup_procs
        fail "$name" "mpirun still running after ${total} s (killed); output: $(said "$out")"
    elif [ "$rc" = 0 ]; then
        fail "$name" "mpirun exited 0 after ${total} s"
    elif [ -z "$seen" ]; then
        fail "$name" "no '$msg' line (exit $rc); output: $(said "$out")"
    elif ! less_than "$(elapsed "$seen" "$end")" 10; then
        fail "$name" "mpirun exited $(elapsed "$seen" "$end") s after the failure (want < 10 s)"
    elif ! less_than "$total" 60; then
        fail "$name" "whole run took ${total} s (want < 60 s)"
    elif left=$(leftovers) && [ -n "$left" ]; then
        cleanup_procs
        fail "$name" "rank processes left after mpirun exited: $left"
    else
        pass "$name (exit $rc, down $(elapsed "$seen" "$end") s after the failure < 10 s, whole run ${total} s < 60 s, no process left)"
    fi
    cleanup_procs
}

# the pid of the rank process whose MPI world rank is $1 (Open MPI puts it in every rank's environment)
pid_of_rank() {
    local p
    for p in $(rank_pids); do
        tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1" && { echo "$p"; return 0; }
    done
    return 1
}

# kill_one NAME RANKS VICTIM FLAGS...: a run of RANKS ranks training (100000 steps) until its
# first step is logged, then kill -9 of one rank process (VICTIM: a world rank, or "first", the
# lowest pid); mpirun must exit non-zero within 10 s, and no rank process may be left. The other
# ranks are then inside a step (waiting in a collective, or on a pipeline receive from the dead rank).
kill_one() {
    local name=$1 ranks=$2 target=$3
    shift 3
    local out="$FT/kill.out" log="$FT/kill.jsonl" start why="" pids victim killed rc="" down left
    rm -f "$log"
    # shellcheck disable=SC2086
    $MPIRUN -np "$ranks" "$RANKBIN" "$@" --steps 100000 --log "$log" </dev/null >"$out" 2>&1 &
    MPIRUN_PID=$!
    start=$(now)
    while :; do   # until the first step is logged (60 s cap)
        [ -s "$log" ] && grep -q . "$log" && break
        if ! kill -0 "$MPIRUN_PID" 2>/dev/null; then
            wait "$MPIRUN_PID"
            why="mpirun exited ($?) before the first step; output: $(said "$out")"
            MPIRUN_PID=
            break
        fi
        if ! less_than "$(elapsed "$start" "$(now)")" 60; then why="no step logged within 60 s"; break; fi
        sleep 0.1
    done
    if [ -z "$why" ]; then
        pids=$(rank_pids | tr "\n" " ")
        # shellcheck disable=SC2086
        set -- $pids
        if [ $# != "$ranks" ]; then
            why="expected $ranks rank processes, found $# ($pids)"
        elif [ "$target" = first ]; then victim=$1
        elif ! victim=$(pid_of_rank "$target"); then why="no rank process with OMPI_COMM_WORLD_RANK=$target among $pids"
        fi
    fi
    if [ -z "$why" ]; then
        kill -KILL "$victim"
        killed=$(now)
        while :; do
            if ! kill -0 "$MPIRUN_PID" 2>/dev/null; then wait "$MPIRUN_PID"; rc=$?; MPIRUN_PID=; break; fi
            if ! less_than "$(elapsed "$killed" "$(now)")" 10; then break; fi
            sleep 0.1
        done
        down=$(elapsed "$killed" "$(now)")
        if [ -z "$rc" ]; then
            why="mpirun still running ${down} s after kill -9 of rank pid $victim (killed everything)"
        elif [ "$rc" = 0 ]; then
            why="mpirun exited 0 after a rank was killed"
        elif left=$(leftovers) && [ -n "$left" ]; then
            why="rank processes left after mpirun exited: $left"
        fi
    fi
    cleanup_procs
    if [ -n "$why" ]; then fail "$name" "$why"
    else pass "$name (mpirun exit $rc ${down} s after kill -9 < 10 s, no process left)"; fi
}

# ---- a. injected failure on rank 2 at step 2 of 50, 4 data-parallel ranks ----
# shellcheck disable=SC2086  # TINY is a word list
inject "fault: injected failure (rank 2 of 4 at step 2)" 2:2 4 --dp 4 $TINY

# ---- b. SIGKILL of one rank of 2 in mid-training ----
# shellcheck disable=SC2086
kill_one "fault: SIGKILL of one rank (2 data-parallel ranks)" 2 first --dp 2 $TINY

# ---- c. pipeline parallel: pp 2, grad-accum 4 (mini: one layer a stage, ~0.1 s a step) ----
# The surviving stage is inside a step, blocked on a paired send-recv with the dead one (the first
# stage waits for a gradient, the last for an activation): it must not wait there forever.
# shellcheck disable=SC2086
for r in 1 0; do
    stage=$([ $r = 1 ] && echo "last" || echo "first")
    inject "fault: pp 2, injected failure of the $stage stage (rank $r at step 3)" "$r:3" 2 --pp 2 --grad-accum 4 $PPMINI
    kill_one "fault: pp 2, SIGKILL of the $stage stage (rank $r) in mid-training" 2 "$r" --pp 2 --grad-accum 4 $PPMINI
done

# ---- d. context parallel: cp 2 (mini), one rank dies inside the ring ----
# The survivor is inside a layer's ring or halo exchange with the dead one: it must go down too.
# shellcheck disable=SC2086
inject "fault: cp 2, injected failure of cp rank 1 at step 3" "1:3" 2 --cp 2 $PPMINI
# shellcheck disable=SC2086
kill_one "fault: cp 2, SIGKILL of cp rank 1 in mid-training" 2 1 --cp 2 $PPMINI

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
