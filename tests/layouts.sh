#!/usr/bin/env bash
# Layout equivalence: the tiny model trained for 4 steps under each layout below must follow the
# single-rank run over the same global batch (dp × grad-accum micro-batches): every step's loss
# within 1e-5 relative, every final weight tensor within 1e-4 (max |diff| / max |w|).
# Adding a layout is one line: "ranks | flags". The single-rank reference for a layout is the run
# with grad-accum = dp × grad-accum and no layout flags; it is computed once per global batch size.
# Prints PASS/FAIL lines and "N passed, M failed" last.
source "$(dirname "$0")/common.sh"
BASE="$TINY --steps 4 --bucket-mb 8"
LAYOUTS=(
  "2 | --dp 2"
  "3 | --dp 3"
  "4 | --dp 4"
  "8 | --dp 8"
  "2 | --dp 2 --grad-accum 2"
  "2 | --dp 2 --zero 1"
  "3 | --dp 3 --zero 1"
  "4 | --dp 4 --zero 1 --grad-accum 2"
  "8 | --dp 8 --zero 1"
  "2 | --dp 2 --zero 1 --optimizer stable-adamw --clip 0.5"
)
run() {  # name ranks flags...
    local name=$1 ranks=$2; shift 2
    $MPIRUN -np "$ranks" ./picotron_cpu $BASE "$@" --log "$WORK/$name.jsonl" --export "$WORK/$name" > "$WORK/$name.out" 2>&1
}
flag() { echo " $2 " | grep -o -- " $1 [^ ]*" | awk '{print $2}'; }
for layout in "${LAYOUTS[@]}"; do
    ranks=${layout%% |*}
    flags=${layout#*| }
    dp=$(flag --dp "$flags"); ga=$(flag --grad-accum "$flags"); ga=${ga:-1}
    opt=$(echo " $flags " | grep -o -- "--optimizer [^ ]* \|--clip [^ ]* " | tr -d '\n')
    micro=$((dp * ga))
    ref="ref_${micro}_$(echo "$opt" | tr -c 'a-z0-9' '_')"
    if [ ! -f "$WORK/$ref.jsonl" ]; then run "$ref" 1 --grad-accum "$micro" $opt || { fail "reference $ref" "run failed"; continue; }; fi
    name=$(echo "$flags" | tr -c 'a-z0-9' '_')
    if ! run "$name" "$ranks" $flags; then
        fail "layout [$flags]" "run failed: $(grep -m1 picotron: "$WORK/$name.out")"; continue
    fi
    if verdict=$(./tests/compare_runs "$WORK/$ref.jsonl" "$WORK/$name.jsonl" "$WORK/$ref/model.safetensors" \
                 "$WORK/$name/model.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
        pass "layout [$flags] vs 1 rank × grad-accum $micro: $verdict"
    else
        fail "layout [$flags] vs 1 rank × grad-accum $micro" "$verdict"
    fi
done
summary
