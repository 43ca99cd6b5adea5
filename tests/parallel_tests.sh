#!/usr/bin/env bash
# Data-parallel end-to-end checks beyond layout equivalence (tests/layouts.sh):
#   - checkpoints are layout-independent: saved under dp 2 × grad-accum 2 with ZeRO-1, resumed under
#     dp 4 × grad-accum 1 without it, the run follows the single-rank run (grad-accum 4);
#   - traffic: the bytes each rank reports per step equal the ring formulas for the model size;
#   - trace: every rank writes spans for each layer's forward and backward, the optimizer and every
#     collective (group, bytes), gradient buckets start before the backward ends (overlap), and
#     scripts/merge_traces.py (when python3 is there) merges the ranks into one file.
# Prints PASS/FAIL lines and "N passed, M failed" last.
source "$(dirname "$0")/common.sh"

# ---- checkpoints move between layouts ----
$MPIRUN -np 1 ./picotron_cpu $TINY --steps 6 --grad-accum 4 --log "$WORK/ref.jsonl" --export "$WORK/ref" > /dev/null 2>&1 &&
$MPIRUN -np 2 ./picotron_cpu $TINY --steps 3 --dp 2 --grad-accum 2 --zero 1 --save "$WORK/ck" --log "$WORK/moved.jsonl" > /dev/null 2>&1 &&
$MPIRUN -np 4 ./picotron_cpu $TINY --steps 6 --dp 4 --resume "$WORK/ck" --log "$WORK/moved.jsonl" --export "$WORK/moved" > /dev/null 2>&1
if [ $? != 0 ]; then fail "checkpoint dp 2 (ZeRO-1) -> dp 4" "a run failed"
elif v=$(./tests/compare_runs "$WORK/ref.jsonl" "$WORK/moved.jsonl" "$WORK/ref/model.safetensors" "$WORK/moved/model.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
    pass "checkpoint saved under dp 2 × ga 2 with ZeRO-1 resumes under dp 4 on the 1-rank trajectory: $v"
else fail "checkpoint dp 2 (ZeRO-1) -> dp 4" "$v"; fi

# ---- traffic: measured (summed per call) == formula ----
# P for tiny (V 50368, H 256, I 384, L 6): embedding V·H + norms + per layer 3H² + H² + 2IH + IH + head H² + bias V
P=$(awk 'BEGIN { V = 50368; H = 256; I = 384; L = 6;
                 print V*H + H + L*(3*H*H + H*H + 2*I*H + I*H) + (L-1)*H + L*H + H + H*H + H + V }')
bytes_of() { grep -o '"dp_cp": [0-9]*' "$1" | tail -n 1 | awk '{print $2}'; }
for n in 2 4; do
    # ZeRO-0: all-reduce of the gradient (4P bytes) + the step's scalars (3 doubles) + the step time (1 double)
    if $MPIRUN -np $n ./picotron_cpu $TINY --steps 2 --dp $n --log "$WORK/t0_$n.jsonl" > /dev/null 2>&1; then
        got=$(bytes_of "$WORK/t0_$n.jsonl")
        want=$(awk -v n=$n -v P=$P 'BEGIN { printf "%.0f", 2*(n-1)/n * (4*P + 24) + 2*(n-1)/n * 8 }')
        if [ "$got" = "$want" ]; then pass "traffic dp $n ZeRO-0: $got bytes = 2(n-1)/n·(4P + 32)"
        else fail "traffic dp $n ZeRO-0" "measured $got, formula $want"; fi
    else fail "traffic dp $n ZeRO-0" "run failed"; fi
    # ZeRO-1 in one bucket: reduce-scatter + all-gather of n·⌈P/n⌉ floats, scalars, the norm, the step time
    if $MPIRUN -np $n ./picotron_cpu $TINY --steps 2 --dp $n --zero 1 --bucket-mb 1000 --log "$WORK/t1_$n.jsonl" > /dev/null 2>&1; then
        got=$(bytes_of "$WORK/t1_$n.jsonl")
        want=$(awk -v n=$n -v P=$P 'BEGIN { padded = n * int((P + n - 1) / n);
               printf "%.0f", 2 * (n-1)/n * 4*padded + 2*(n-1)/n * (24 + 8 + 8) }')
        if [ "$got" = "$want" ]; then pass "traffic dp $n ZeRO-1: $got bytes = 2·(n-1)/n·4·n⌈P/n⌉ + 2(n-1)/n·40"
        else fail "traffic dp $n ZeRO-1" "measured $got, formula $want"; fi
    else fail "traffic dp $n ZeRO-1" "run failed"; fi
done

# ---- trace ----
if $MPIRUN -np 2 ./picotron_cpu $TINY --steps 2 --dp 2 --bucket-mb 4 --trace "$WORK/trace" > /dev/null 2>&1; then
    ok=1; why=""
    for r in 0 1; do
        f="$WORK/trace/trace_rank$r.json"
        for span in "layer 0 forward" "layer 5 forward" "layer 5 backward" "layer 0 backward" "head forward" \
                    "head backward" "embedding backward" "optimizer" "dp grad all-reduce" "loss and token count all-reduce"; do
            grep -q "\"name\": \"$span\"" "$f" 2>/dev/null || { ok=0; why="$why rank $r lacks '$span';"; }
        done
        grep -q '"name": "dp grad all-reduce".*"group": "dp_cp", "bytes": [1-9]' "$f" || { ok=0; why="$why rank $r: collective without group/bytes;"; }
        # overlap: the first gradient bucket starts before layer 0's backward has ended
        awk -v r=$r '/"name": "dp grad all-reduce"/ && !b { match($0, /"ts": [0-9.]+/); b = substr($0, RSTART + 6, RLENGTH - 6) }
                     /"name": "layer 0 backward"/ && !l { match($0, /"ts": [0-9.]+/); s = substr($0, RSTART + 6, RLENGTH - 6);
                                                        match($0, /"dur": [0-9.]+/); l = s + substr($0, RSTART + 7, RLENGTH - 7) }
                     END { exit !(b != "" && l != "" && b + 0 < l + 0) }' "$f" || { ok=0; why="$why rank $r: no bucket before the backward ended;"; }
    done
    if [ $ok = 1 ]; then pass "trace: layer, optimizer and collective spans on every rank; buckets overlap the backward"
    else fail "trace" "$why"; fi
    if command -v python3 > /dev/null 2>&1; then
        if python3 scripts/merge_traces.py "$WORK/trace" -o "$WORK/merged.json" > /dev/null && grep -q '"rank 1"' "$WORK/merged.json"; then
            pass "trace: merge_traces.py merges the ranks into one file"
        else fail "trace merge" "merge_traces.py failed"; fi
    fi
else fail "trace" "run failed"; fi

summary
