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

if [ ! -x "$BIN" ] || [ ! -d data/default ]; then
    why="no $BIN or data/default (run make picotron_cpu data first)"
    fail "fault: injected failure" "$why"
    fail "fault: SIGKILL of one rank" "$why"
    echo "$passed passed, $failed failed"
    exit 1
fi
cp "$BIN" "$RANKBIN"

# ---- a. injected failure on rank 2 at step 2 of 50, 4 data-parallel ranks ----
name="fault: injected failure (rank 2 of 4 at step 2)"
MSG="picotron: rank 2: injected failure at step 2"
out="$FT/inject.out"
start=$(now)
# shellcheck disable=SC2086  # MPIRUN and TINY are word lists
$MPIRUN -x PICOTRON_FAIL_AT=2:2 -np 4 "$RANKBIN" --dp 4 $TINY --steps 50 --log "$FT/inject.jsonl" \
    </dev/null >"$out" 2>&1 &
MPIRUN_PID=$!
seen=        # when the failure line first showed up in the output
rc=
while :; do
    if [ -z "$seen" ] && grep -qF "$MSG" "$out" 2>/dev/null; then seen=$(now); fi
    if ! kill -0 "$MPIRUN_PID" 2>/dev/null; then wait "$MPIRUN_PID"; rc=$?; MPIRUN_PID=; break; fi
    if ! less_than "$(elapsed "$start" "$(now)")" 30; then break; fi   # hard cap, then kill
    sleep 0.1
done
end=$(now)
[ -z "$seen" ] && grep -qF "$MSG" "$out" 2>/dev/null && seen=$end
total=$(elapsed "$start" "$end")
if [ -z "$rc" ]; then
    cleanup_procs
    fail "$name" "mpirun still running after ${total} s (killed); output: $(said "$out")"
elif [ "$rc" = 0 ]; then
    fail "$name" "mpirun exited 0 after ${total} s"
elif [ -z "$seen" ]; then
    fail "$name" "no '$MSG' line (exit $rc); output: $(said "$out")"
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

# ---- b. SIGKILL of one rank of 2 in mid-training ----
name="fault: SIGKILL of one rank (2 data-parallel ranks)"
out="$FT/kill.out"
log="$FT/kill.jsonl"
# shellcheck disable=SC2086
$MPIRUN -np 2 "$RANKBIN" --dp 2 $TINY --steps 100000 --log "$log" </dev/null >"$out" 2>&1 &
MPIRUN_PID=$!
start=$(now)
why=
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
    if [ $# != 2 ]; then
        why="expected 2 rank processes, found $# ($pids)"
    else
        victim=$1
        kill -KILL "$victim"
        killed=$(now)
        rc=
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
fi
cleanup_procs
if [ -n "$why" ]; then fail "$name" "$why"
else pass "$name (mpirun exit $rc ${down} s after kill -9 < 10 s, no process left)"; fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
