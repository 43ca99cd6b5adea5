#!/usr/bin/env bash
# Data-parallel end-to-end checks beyond layout equivalence (tests/layouts.sh):
#   - checkpoints are layout-independent: saved under dp 2 × grad-accum 2 with ZeRO-1, resumed under
#     dp 4 × grad-accum 1 without it, the run follows the single-rank run (grad-accum 4);
#   - traffic: the bytes each rank reports per step equal the ring formulas for the model size;
#   - trace: every rank writes spans for each layer's forward and backward, the optimizer and every
#     collective (group, bytes), gradient buckets start before the backward ends (overlap), and
#     scripts/merge_traces.py (when python3 is there) merges the ranks into one file.
# Tensor parallel (--tp, --sp):
#   - checkpoints move between tp layouts: saved under dp 2 × tp 2 with ZeRO-1 after 2 of 4 steps,
#     resumed under 1 rank and under tp 4 (both grad-accum 2), each follows the single-rank
#     grad-accum 2 run (losses 1e-5, final weights 1e-4; --lr 2e-4, see tests/layouts.sh for why);
#   - parameter memory: rank 0's "parameters per rank: S bytes sharded over tp N + R bytes replicated"
#     falls as S(1)/N for tiny (its vocabulary divides), R stays, S(1) + R(1) = 4 bytes × the
#     parameters counted from the architecture; an odd vocabulary (V 4097) pads to N·⌈V/N⌉ rows;
#   - traffic: the step log's tp bytes equal the ring formulas (below) for tp 2 and tp 4, with and
#     without --sp, exactly; with --sp the head's rows come from the step's --dump (tests/dump_info);
#   - trace: every tp rank writes the regions' collectives (all-gather / reduce-scatter with --sp,
#     all-reduce without) as spans with "group": "tp" and their bytes, and not the other kind.
# Pipeline parallel (--pp, --pp-schedule; layout equivalence is in tests/layouts.sh):
#   - checkpoints move between pp layouts: saved under tp 2 × pp 2 (grad-accum 2) after 2 of 4 steps,
#     resumed under 1 rank and under pp 3 (afab), both grad-accum 2, each follows the single-rank
#     grad-accum 2 run (the tp checkpoint test's reference: losses 1e-5, final weights 1e-4, --lr 2e-4);
#   - stages: rank 0's "pipeline:" line gives each stage the layers [s·⌊L/pp⌋ + min(s, L mod pp), …)
#     (the first L mod pp stages one more), the embedding on the first, the head on the last;
#   - tied embedding: after every pp run here rank 0 says the first and last stages' copies are
#     bit-identical (the trainer stops otherwise), and the exported embedding (one tensor) is the
#     1-rank run's (compare_runs, above and in tests/layouts.sh);
#   - activation memory, on a 5-layer model (L5: mini's config with H 256, 4 heads, I 256, L 5) under
#     pp 2 with grad-accum m = 2, 4, 8: the log's activation_bytes per stage are a whole number of
#     sets, m sets under afab (so exactly 2× and 4× m = 2's) and min(pp − s, m) on stage s under
#     1f1b (constant in m), the same on every step;
#   - bubble: pp 2 (m 4) and pp 4 (m 8) log pp_bubble, one idle fraction in [0, 1) per stage on every
#     step; printed beside (pp − 1)/(m + pp − 1) for reference only (the stages are unequal in cost:
#     the last holds the head);
#   - trace: under pp 2 (m 2) both ranks write "micro-batch i forward/backward" spans, their
#     activation / gradient exchanges with "group": "pp" and bytes, and "pp embedding grad
#     all-reduce" with "group": "embedding" and bytes.
# Context parallel (--cp; layout equivalence is in tests/layouts.sh):
#   - checkpoints: saved under the 16-rank dp 2 × tp 2 × pp 2 × cp 2 layout (--sp, ZeRO-1) after 2 of
#     4 steps, resumed under one rank (grad-accum 2), the run follows the 1-rank run;
#   - traffic: rank 0's ring and halo bytes per step (the log's cp_bytes) equal the formulas (below)
#     for cp 2, 4 and 8 (shards shorter than the window), every block needed, none, or some (blocks
#     stop where nobody further along the ring needs them), and tp 2 × cp 2;
#   - trace: the ring's and the halo's exchanges (and their gradients) are spans with group cp.
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

# ---- tensor parallel: checkpoints move between tp layouts ----
# A checkpoint saved after 2 of 4 steps (DIR, its log SAVED) resumed under each "ranks | flags" must
# finish on the 1-rank grad-accum 2 trajectory (tpref): label, prefix, DIR, SAVED, layouts...
# (RESUME_FLAGS and RESUME_REF: the runs' shared flags and the reference's name; TINY's by default)
resumes_on_reference() {
    local label=$1 prefix=$2 ckpt=$3 saved=$4 to ranks flags name v
    local run_flags=${RESUME_FLAGS:-$TINY $TPLR} ref=${RESUME_REF:-tpref}
    shift 4
    for to in "$@"; do
        ranks=${to%% |*} flags=${to#*| } name="${prefix}_${ranks}"
        cp "$saved" "$WORK/$name.jsonl"  # the resumed run appends steps 3 and 4
        if ! $MPIRUN -np "$ranks" ./picotron_cpu $run_flags --steps 4 $flags --resume "$ckpt" --log "$WORK/$name.jsonl" \
                --export "$WORK/$name" > "$WORK/$name.out" 2>&1; then
            fail "checkpoint $label -> [$flags]" "resume failed: $(grep -m1 picotron: "$WORK/$name.out")"
        elif v=$(./tests/compare_runs "$WORK/$ref.jsonl" "$WORK/$name.jsonl" "$WORK/$ref/model.safetensors" \
                 "$WORK/$name/model.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
            pass "checkpoint saved under $label resumes under [$flags] on the 1-rank trajectory: $v"
        else fail "checkpoint $label -> [$flags]" "$v"; fi
    done
}
# --lr 2e-4: at TINY's 2e-3 Adam amplifies fp32 roundoff in near-zero gradients past 1e-4 (tests/layouts.sh)
TPLR="--lr 2e-4"
$MPIRUN -np 1 ./picotron_cpu $TINY $TPLR --steps 4 --grad-accum 2 --log "$WORK/tpref.jsonl" --export "$WORK/tpref" > "$WORK/tpref.out" 2>&1 &&
$MPIRUN -np 4 ./picotron_cpu $TINY $TPLR --steps 2 --dp 2 --tp 2 --zero 1 --save "$WORK/tpck" --log "$WORK/tpsaved.jsonl" > "$WORK/tpsaved.out" 2>&1
if [ $? != 0 ]; then fail "checkpoint dp 2 × tp 2 (ZeRO-1)" "the reference or the saving run failed"
else
    resumes_on_reference "dp 2 × tp 2 with ZeRO-1" tpmoved "$WORK/tpck" "$WORK/tpsaved.jsonl" "1 | --grad-accum 2" "4 | --tp 4 --grad-accum 2"
fi

# ---- tensor parallel: parameter memory per rank ----
# rank 0's line: "parameters per rank: S bytes sharded over tp N + R bytes replicated; ..."
param_bytes() {  # out-file -> "S R"
    sed -n 's/^parameters per rank: \([0-9]*\) bytes sharded over tp [0-9]* + \([0-9]*\) bytes replicated.*/\1 \2/p' "$1"
}
# The odd-vocabulary model (as in tests/layouts.sh): mini's config with V 4097, H 256, 4 heads, I 256
ODD="$WORK/odd_vocab"
if ! { $MPIRUN -np 1 ./picotron_cpu --model mini --data data/mini --steps 0 --export "$ODD" > "$WORK/odd.out" 2>&1 &&
       sed -i -e 's/"vocab_size": 4096,/"vocab_size": 4097,/' -e 's/"hidden_size": 64,/"hidden_size": 256,/' \
              -e 's/"num_attention_heads": 1,/"num_attention_heads": 4,/' -e 's/"intermediate_size": 128,/"intermediate_size": 256,/' \
              "$ODD/config.json" &&
       [ "$(grep -c '"vocab_size": 4097,\|"hidden_size": 256,\|"num_attention_heads": 4,\|"intermediate_size": 256,' "$ODD/config.json")" = 4 ] &&
       ./tests/make_model "$ODD" >> "$WORK/odd.out" 2>&1; }; then
    fail "odd-vocabulary model" "could not be made: $(tail -n 1 "$WORK/odd.out")"
fi
# (the model, n, V H I L) -> the formula's "S R": the sharded tensors (embedding and decoder bias on
# n·⌈V/n⌉ padded rows, Wqkv, Wo, Wi, MLP Wo) over n; the replicated (2L + 2 LayerNorms, head.dense)
want_bytes() {
    awk -v n=$1 -v V=$2 -v H=$3 -v I=$4 -v L=$5 'BEGIN { Vl = int((V + n - 1) / n);
        printf "%.0f %.0f", 4 * (Vl*H + Vl + L*(3*H*H + H*H + 2*I*H + I*H) / n), 4 * ((2*L + 2)*H + H*H) }'
}
declare -A SH RE  # per tp size: the sharded and the replicated bytes
ok=1; why=""
for n in 1 2 4; do
    if $MPIRUN -np $n ./picotron_cpu $TINY --tp $n --steps 0 --export "$WORK/init_$n" > "$WORK/mem_$n.out" 2>&1 &&
       read -r SH[$n] RE[$n] <<< "$(param_bytes "$WORK/mem_$n.out")" && [ -n "${RE[$n]}" ]; then :
    else ok=0; why="$why tp $n: run failed or printed no parameter bytes;"; fi
done
# P: tiny's parameter count from its architecture (the dp traffic test above)
if [ $ok = 1 ]; then
    [ "$((SH[1] + RE[1]))" = "$((4 * P))" ] || { ok=0; why="$why S(1) + R(1) = $((SH[1] + RE[1])), 4P = $((4 * P));"; }
    for n in 2 4; do
        [ "$((SH[$n] * n))" = "${SH[1]}" ] || { ok=0; why="$why S(tp $n) = ${SH[$n]}, S(1)/$n = $((SH[1] / n));"; }
        [ "${RE[$n]}" = "${RE[1]}" ] || { ok=0; why="$why R(tp $n) = ${RE[$n]}, R(1) = ${RE[1]};"; }
        [ "${SH[$n]} ${RE[$n]}" = "$(want_bytes $n 50368 256 384 6)" ] ||
            { ok=0; why="$why tp $n: '${SH[$n]} ${RE[$n]}', formula '$(want_bytes $n 50368 256 384 6)';"; }
    done
fi
if [ $ok = 1 ]; then
    pass "parameter memory (tiny): S(tp 1) = ${SH[1]} = 2·S(tp 2) = 4·S(tp 4) bytes, R = ${RE[1]} at every tp, S + R = 4 bytes × $P parameters"
else fail "parameter memory (tiny)" "$why"; fi
# initialisation: each shard is drawn from its elements' places in the full tensors, so the
# untrained model that tp 2 and tp 4 assemble from their shards is byte-identical to one rank's
for n in 2 4; do
    if cmp -s "$WORK/init_1/model.safetensors" "$WORK/init_$n/model.safetensors"; then
        pass "initialisation under tp $n: the gathered untrained model is byte-identical to one rank's"
    else fail "initialisation under tp $n" "the exported untrained model differs from one rank's"; fi
done
for n in 2 4; do  # odd vocabulary: 4097 rows padded to n·⌈4097/n⌉
    padded=$((n * ((4097 + n - 1) / n)))
    if $MPIRUN -np $n ./picotron_cpu --init-from "$ODD" --data data/mini --tp $n --steps 0 > "$WORK/memodd_$n.out" 2>&1; then
        got=$(param_bytes "$WORK/memodd_$n.out"); want=$(want_bytes $n 4097 256 256 2)
        if [ "$got" = "$want" ] && grep -q "^vocabulary 4097 padded to $padded for tp $n " "$WORK/memodd_$n.out"; then
            pass "parameter memory (V 4097, tp $n, padded to $padded rows): S R = $got bytes"
        else fail "parameter memory (V 4097, tp $n)" "measured '$got', formula '$want' (padded to $padded: $(grep -c "padded to $padded" "$WORK/memodd_$n.out") line)"; fi
    else fail "parameter memory (V 4097, tp $n)" "run failed: $(grep -m1 picotron: "$WORK/memodd_$n.out")"; fi
done

# ---- tensor parallel: traffic, measured (summed per call) == formula ----
# Bytes this rank sends in the tp group per step, by the ring formulas (all-reduce 2f·S, all-gather
# and reduce-scatter f·S of the full buffer S, f = (n−1)/n); T micro-batch tokens, H hidden, L layers:
#   no --sp:  2f·4·T·H·(1 + 4L)          embedding-out all-reduce; per layer attention-out and mlp-out
#                                        forward, attention-in and mlp-in backward all-reduces
#           + 2f·4·M·H                   decoder-in grad all-reduce of the M masked rows (the log's masked_tokens)
#           + 2f·4·3M                    cross-entropy: row max (M), sum-exp and target logit (2M)
#           + 2f·8                       grad norm tp all-reduce (one double)
#   --sp:     f·4·T·H·(2 + 8L)           embedding-out reduce-scatter and its grad all-gather; per layer
#                                        4 all-gathers and 4 reduce-scatters
#           + 2f·4·nR·H                  decoder-in all-gather of the head rows and its grad reduce-scatter
#           + 2f·4·3·nR                  cross-entropy on the n·R decoder rows
#           + 2f·4·((2L + 2)·H + H·H)    replicated grad all-reduce: the LayerNorms and head.dense
#           + 2f·8                       grad norm tp all-reduce
# where R is the most masked tokens any tp rank's token slice (rows [r·T/n, (r+1)·T/n)) holds, read
# from step 1's --dump by tests/dump_info (so with --sp step 1 is checked; without, both steps).
tp_bytes() { grep -o '"tp": [0-9]*' "$1" | awk '{print $2}'; }
for n in 2 4; do
    for sp in "" "--sp"; do
        what="traffic tp $n${sp:+ --sp}"
        trace=(); [ $n = 2 ] && trace=(--trace "$WORK/trace_tp2${sp/--/_}")  # tp 2's runs also feed the trace test
        if [ -z "$sp" ]; then steps=2; extra=(); else steps=1; extra=(--dump "$WORK/dump_tp$n"); fi
        if ! $MPIRUN -np $n ./picotron_cpu $TINY --steps $steps --tp $n $sp "${extra[@]}" "${trace[@]}" \
                --log "$WORK/tt_$n$sp.jsonl" > "$WORK/tt_$n$sp.out" 2>&1; then
            fail "$what" "run failed: $(grep -m1 picotron: "$WORK/tt_$n$sp.out")"; continue
        fi
        got=($(tp_bytes "$WORK/tt_$n$sp.jsonl"))
        if [ -z "$sp" ]; then
            masked=($(grep -o '"masked_tokens": [0-9]*' "$WORK/tt_$n$sp.jsonl" | awk '{print $2}'))
            want=()
            for M in "${masked[@]}"; do
                want+=($(awk -v n=$n -v M=$M 'BEGIN { f = (n-1)/n; T = 256; H = 256; L = 6;
                    printf "%.0f", 2*f*4*T*H*(1 + 4*L) + 2*f*4*M*H + 2*f*4*3*M + 2*f*8 }'))
            done
            detail="M ${masked[*]}"
        else
            R=$(./tests/dump_info "$WORK/dump_tp$n/dump.safetensors" $n | awk '$1 == "micro" { print $8 }')
            want=($(awk -v n=$n -v R=$R 'BEGIN { f = (n-1)/n; T = 256; H = 256; L = 6;
                printf "%.0f", f*4*T*H*(2 + 8*L) + 2*f*4*n*R*H + 2*f*4*3*n*R + 2*f*4*((2*L + 2)*H + H*H) + 2*f*8 }'))
            detail="R $R"
        fi
        if [ "${#got[@]}" = "$steps" ] && [ "${got[*]}" = "${want[*]}" ]; then
            pass "$what: ${got[*]} bytes per step = formula ($detail)"
        else fail "$what" "measured '${got[*]}', formula '${want[*]}' ($detail)"; fi
    done
done

# ---- tensor parallel: trace ----
# the tp 2 traffic runs' traces: the regions' collectives as spans with group tp and bytes on every rank
for sp in "" "--sp"; do
    dir="$WORK/trace_tp2${sp/--/_}"
    if [ -n "$sp" ]; then
        want=("tp embedding-out reduce-scatter" "tp attention-in all-gather" "tp attention-out reduce-scatter"
              "tp mlp-in all-gather" "tp mlp-out reduce-scatter" "tp decoder-in all-gather" "tp decoder-in grad reduce-scatter"
              "tp mlp-out grad all-gather" "tp mlp-in grad reduce-scatter" "tp attention-out grad all-gather"
              "tp attention-in grad reduce-scatter" "tp embedding-out grad all-gather" "tp cross-entropy max all-reduce"
              "tp cross-entropy sum-exp all-reduce" "tp replicated grad all-reduce" "grad norm tp all-reduce")
        absent=("tp attention-out all-reduce" "tp mlp-in grad all-reduce" "tp embedding-out all-reduce")
    else
        want=("tp embedding-out all-reduce" "tp attention-out all-reduce" "tp mlp-out all-reduce" "tp mlp-in grad all-reduce"
              "tp attention-in grad all-reduce" "tp decoder-in grad all-reduce" "tp cross-entropy max all-reduce"
              "tp cross-entropy sum-exp all-reduce" "grad norm tp all-reduce")
        absent=("tp attention-in all-gather" "tp mlp-out reduce-scatter" "tp replicated grad all-reduce")
    fi
    ok=1; why=""
    for r in 0 1; do
        f="$dir/trace_rank$r.json"
        [ -f "$f" ] || { ok=0; why="$why no $f;"; continue; }
        for span in "${want[@]}"; do
            grep -q "\"name\": \"$span\".*\"group\": \"tp\", \"bytes\": [1-9]" "$f" || { ok=0; why="$why rank $r lacks '$span' (group tp, bytes);"; }
        done
        for span in "${absent[@]}"; do
            ! grep -q "\"name\": \"$span\"" "$f" || { ok=0; why="$why rank $r has '$span';"; }
        done
    done
    if [ $ok = 1 ]; then pass "trace tp 2${sp:+ --sp}: ${#want[@]} tp collective spans with group and bytes on both ranks, none of the other kind"
    else fail "trace tp 2${sp:+ --sp}" "$why"; fi
done

# ---- pipeline parallel: checkpoints move between pp layouts; stages; the tied embedding ----
TIED="tied embedding: the first and last stages' copies are bit-identical"
stages_line() {  # L pp schedule -> rank 0's expected "pipeline:" line
    awk -v L=$1 -v pp=$2 -v sch=$3 'BEGIN { printf "pipeline: %d stages, %s:", pp, sch; b = 0;
        for (s = 0; s < pp; s++) { n = int(L / pp) + (s < L % pp); printf "%s stage %d layers %d-%d%s", s ? "," : "", s, b, b + n - 1,
            s == 0 ? " + embedding" : s == pp - 1 ? " + head and tied embedding" : ""; b += n }; printf "\n" }'
}
stages_ok() {  # out-file L pp schedule: rank 0 printed the stages and, after training, the tied-embedding line
    grep -qxF "$(stages_line $2 $3 $4)" "$1" && grep -qxF "$TIED" "$1"
}
if [ ! -f "$WORK/tpref/model.safetensors" ]; then fail "checkpoint tp 2 × pp 2" "no 1-rank reference (the tp checkpoint test's)"
elif ! $MPIRUN -np 4 ./picotron_cpu $TINY $TPLR --steps 2 --tp 2 --pp 2 --grad-accum 2 --save "$WORK/ppck" \
        --log "$WORK/ppsaved.jsonl" > "$WORK/ppsaved.out" 2>&1; then
    fail "checkpoint tp 2 × pp 2" "the saving run failed: $(grep -m1 picotron: "$WORK/ppsaved.out")"
else
    if stages_ok "$WORK/ppsaved.out" 6 2 1f1b; then pass "tp 2 × pp 2 (tiny, L 6): stages 0-2, 3-5 printed; $TIED"
    else fail "tp 2 × pp 2 stages / tied embedding" "want '$(stages_line 6 2 1f1b)' and '$TIED', got: $(grep -m1 '^pipeline:' "$WORK/ppsaved.out") / $(grep -c '^tied' "$WORK/ppsaved.out") tied lines"; fi
    resumes_on_reference "tp 2 × pp 2 (tied embedding included)" ppmoved "$WORK/ppck" "$WORK/ppsaved.jsonl" \
        "1 | --grad-accum 2" "3 | --pp 3 --pp-schedule afab --grad-accum 2"
    if stages_ok "$WORK/ppmoved_3.out" 6 3 afab; then pass "pp 3 afab (tiny, L 6): stages 0-1, 2-3, 4-5 printed; $TIED"
    else fail "pp 3 stages / tied embedding" "want '$(stages_line 6 3 afab)' and '$TIED', got: $(grep -m1 '^pipeline:' "$WORK/ppmoved_3.out") / $(grep -c '^tied' "$WORK/ppmoved_3.out") tied lines"; fi
fi

# ---- pipeline parallel: activation memory, bubble, trace (on the 5-layer model) ----
L5="$WORK/l5"
L5_TYPES='"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]'
if ! { $MPIRUN -np 1 ./picotron_cpu --model mini --data data/mini --steps 0 --export "$L5" > "$WORK/l5.out" 2>&1 &&
       sed -i -e 's/"hidden_size": 64,/"hidden_size": 256,/' -e 's/"num_attention_heads": 1,/"num_attention_heads": 4,/' \
              -e 's/"intermediate_size": 128,/"intermediate_size": 256,/' -e 's/"num_hidden_layers": 2,/"num_hidden_layers": 5,/' \
              -e "s/\"layer_types\": \[[^]]*\]/$L5_TYPES/" "$L5/config.json" &&
       [ "$(grep -c '"hidden_size": 256,\|"num_attention_heads": 4,\|"intermediate_size": 256,\|"num_hidden_layers": 5,' "$L5/config.json")" = 4 ] &&
       grep -qF "$L5_TYPES" "$L5/config.json" && ./tests/make_model "$L5" >> "$WORK/l5.out" 2>&1; }; then
    fail "5-layer model" "could not be made: $(tail -n 1 "$WORK/l5.out")"
fi
L5RUN="--init-from $L5 --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2 --steps 2"
field() { grep -o "\"$1\": \[[^]]*\]" "$2" | sed 's/.*\[//; s/\]//; s/,//g'; }  # field log -> one line per step
declare -A ACT  # schedule m -> the stages' activation bytes
ok=1; why=""
for sch in afab 1f1b; do
    for m in 2 4 8; do
        name="ppmem_${sch}_$m" extra=()
        [ $sch$m = 1f1b2 ] && extra=(--trace "$WORK/pptrace")  # also the trace test's run
        if ! $MPIRUN -np 2 ./picotron_cpu $L5RUN --pp 2 --pp-schedule $sch --grad-accum $m "${extra[@]}" \
                --log "$WORK/$name.jsonl" > "$WORK/$name.out" 2>&1; then
            ok=0; why="$why $sch m $m: run failed: $(grep -m1 picotron: "$WORK/$name.out");"; continue
        fi
        stages_ok "$WORK/$name.out" 5 2 $sch || { ok=0; why="$why $sch m $m: no '$(stages_line 5 2 $sch)' or '$TIED';"; }
        mapfile -t per_step < <(field activation_bytes "$WORK/$name.jsonl")
        if [ "${#per_step[@]}" != 2 ] || [ "${per_step[0]}" != "${per_step[1]}" ]; then
            ok=0; why="$why $sch m $m: activation_bytes per step '${per_step[*]}';"
        fi
        ACT[$sch$m]=${per_step[1]:-}
    done
done
if [ $ok = 1 ]; then
    read -r a0 a1 <<< "${ACT[afab2]}"
    for s in 0 1; do  # afab m 2 holds 2 sets on each stage: one set's bytes
        v=$([ $s = 0 ] && echo $a0 || echo $a1)
        if [ -z "$v" ] || [ "$v" -le 0 ] || [ $((v % 2)) != 0 ]; then ok=0; why="$why afab m 2 stage $s: '$v' bytes, not 2 sets;"; fi
    done
fi
if [ $ok = 1 ]; then
    set1=($((a0 / 2)) $((a1 / 2)))
    for sch in afab 1f1b; do
        for m in 2 4 8; do
            want=()
            for s in 0 1; do
                if [ $sch = afab ]; then sets=$m; else sets=$((2 - s < m ? 2 - s : m)); fi
                want+=($((sets * set1[s])))
            done
            [ "${ACT[$sch$m]}" = "${want[*]}" ] || { ok=0; why="$why $sch m $m: activation_bytes '${ACT[$sch$m]}', want '${want[*]}';"; }
        done
    done
fi
if [ $ok = 1 ]; then
    pass "activation memory pp 2 (L5): one set ${set1[*]} bytes per stage; afab m 2/4/8: [${ACT[afab2]}] [${ACT[afab4]}] [${ACT[afab8]}] (m sets); 1f1b: [${ACT[1f1b2]}] [${ACT[1f1b4]}] [${ACT[1f1b8]}] (min(pp − s, m) sets)"
else fail "activation memory pp 2" "$why"; fi

# bubble: pp 2 m 4 (the memory test's 1f1b run) and pp 4 m 8
$MPIRUN -np 4 ./picotron_cpu $L5RUN --pp 4 --grad-accum 8 --log "$WORK/ppbub_4_8.jsonl" > "$WORK/ppbub_4_8.out" 2>&1 ||
    fail "bubble pp 4" "run failed: $(grep -m1 picotron: "$WORK/ppbub_4_8.out")"
stages_ok "$WORK/ppbub_4_8.out" 5 4 1f1b && pass "pp 4 (L5): stages 0-1, 2, 3, 4 printed; $TIED" ||
    fail "pp 4 stages / tied embedding" "want '$(stages_line 5 4 1f1b)' and '$TIED', got: $(grep -m1 '^pipeline:' "$WORK/ppbub_4_8.out")"
for run in "2 4 $WORK/ppmem_1f1b_4.jsonl" "4 8 $WORK/ppbub_4_8.jsonl"; do
    read -r pp m log <<< "$run"
    [ -f "$log" ] || { fail "bubble pp $pp m $m" "no log"; continue; }
    mapfile -t per_step < <(field pp_bubble "$log")
    bad=$(printf '%s\n' "${per_step[@]}" | awk -v pp=$pp '{ if (NF != pp) { print "step " NR ": " NF " values"; next }
                                                           for (i = 1; i <= NF; i++) if (!($i >= 0 && $i < 1)) print "step " NR ": " $i }')
    formula=$(awk -v pp=$pp -v m=$m 'BEGIN { printf "%.4f", (pp - 1) / (m + pp - 1) }')
    if [ "${#per_step[@]}" = 2 ] && [ -z "$bad" ]; then
        pass "bubble pp $pp m $m (L5, 1f1b): per stage [${per_step[1]}] (step 2), in [0, 1) on every step; (pp − 1)/(m + pp − 1) = $formula"
    else fail "bubble pp $pp m $m" "pp_bubble per step '${per_step[*]}':${bad:- $(( ${#per_step[@]} )) steps}"; fi
done

# trace: the memory test's 1f1b m 2 run. Stage 0 sends activations and receives gradients, stage 1
# the other way (exchanges that only receive send 0 bytes); both all-reduce the embedding's gradient.
ok=1; why=""
for r in 0 1; do
    f="$WORK/pptrace/trace_rank$r.json"
    [ -f "$f" ] || { ok=0; why="$why no $f;"; continue; }
    if [ $r = 0 ]; then send="pp send activation" recv="pp recv gradient"; else send="pp send gradient" recv="pp recv activation"; fi
    for span in "micro-batch 0 forward" "micro-batch 1 forward" "micro-batch 0 backward" "micro-batch 1 backward"; do
        grep -q "\"name\": \"$span\"" "$f" || { ok=0; why="$why rank $r lacks '$span';"; }
    done
    grep -q "\"name\": \"$send\".*\"group\": \"pp\", \"bytes\": [1-9]" "$f" || { ok=0; why="$why rank $r lacks '$send' (group pp, bytes);"; }
    grep -q "\"name\": \"$recv\".*\"group\": \"pp\"" "$f" || { ok=0; why="$why rank $r lacks '$recv' (group pp);"; }
    grep -q '"name": "pp embedding grad all-reduce".*"group": "embedding", "bytes": [1-9]' "$f" ||
        { ok=0; why="$why rank $r lacks 'pp embedding grad all-reduce' (group embedding, bytes);"; }
done
if [ $ok = 1 ]; then pass "trace pp 2 (m 2): micro-batch forward/backward spans, activation/gradient exchanges (group pp) and the embedding grad all-reduce (group embedding) on both ranks"
else fail "trace pp 2" "$why"; fi

# ---- context parallel: checkpoints across the 4D layout, ring and halo traffic ----
# The 16-rank dp 2 × tp 2 × pp 2 × cp 2 layout (--sp, ZeRO-1) saves after 2 of 4 steps; one rank
# resumes (grad-accum 2: the same global batch) and follows the 1-rank run (S4, tests/common.sh).
S4="$WORK/s4"
make_s4 "$S4" || fail "4-layer model" "could not be made: $(tail -n 1 "$S4.out")"
S4RUN="--init-from $S4 --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-4 --warmup 2"
$MPIRUN -np 1 ./picotron_cpu $S4RUN --steps 4 --grad-accum 2 --log "$WORK/s4ref.jsonl" --export "$WORK/s4ref" > "$WORK/s4ref.out" 2>&1 &&
$MPIRUN -np 16 ./picotron_cpu $S4RUN --steps 2 --dp 2 --tp 2 --pp 2 --cp 2 --sp --zero 1 --save "$WORK/cpck" \
    --log "$WORK/cpsaved.jsonl" > "$WORK/cpsaved.out" 2>&1
if [ $? != 0 ]; then fail "checkpoint dp 2 × tp 2 × pp 2 × cp 2" "the reference or the saving run failed"
else
    RESUME_FLAGS=$S4RUN RESUME_REF=s4ref resumes_on_reference "dp 2 × tp 2 × pp 2 × cp 2 (16 ranks, --sp, ZeRO-1)" \
        cpmoved "$WORK/cpck" "$WORK/cpsaved.jsonl" "1 | --grad-accum 2"
fi

# Traffic. Per micro-batch, with B = Tc·2·(H/tp)·4 bytes (one shard's K and V, fp32), rank r sends
#   a global layer: forward, one B per ring hop it passes a block on (step s = 1 … cp−1, the
#     block of r − s + 1 if rank r + 1 is no further than its reach); backward, those hops again
#     plus one B per shard o ≠ r its queries attend to (that block's gradient, to o). With every
#     block needed: 3·(cp − 1)·B; with no document crossing a shard edge: 0;
#   a local layer (window w): forward the rows its neighbours' halos hold, Σ_d rows(d) for each
#     neighbour r ± d that exists (rows(d) = min(Tc, w − (d − 1)·Tc), d ≥ 1, while positive),
#     2·(H/tp)·4 bytes a row; backward the same number of rows of its own halo's gradient. On rank 0
#     (neighbours on the right only): 2·min(w, (cp − 1)·Tc) rows.
# Rank 0's log (cp_bytes ring / halo, every step) is checked against these on data made to fix the
# case: documents of exactly 256 tokens (every micro-batch of 256 one document: every block needed)
# and of exactly 128 (two documents a micro-batch, aligned with cp 2's shards: no block needed).
mkdir -p "$WORK/cptext"
words() { awk -v n=$1 'BEGIN { split("alpha beta gamma delta epsilon zeta eta theta", w, " ");
                              for (d = 0; d < 12; d++) { s = ""; for (i = 0; i < n; i++) s = s w[1 + (i + d) % 8] " "; print s; print "" } }'; }
words 254 > "$WORK/cptext/long.txt"
mkdir -p "$WORK/cptext_short"; words 126 > "$WORK/cptext_short/short.txt"
if ! { $MPIRUN -np 1 ./picotron_cpu --model mini --prepare-text "$WORK/cptext" --data "$WORK/cplong" > "$WORK/cpprep.out" 2>&1 &&
       $MPIRUN -np 1 ./picotron_cpu --model mini --prepare-text "$WORK/cptext_short" --data "$WORK/cpshort" >> "$WORK/cpprep.out" 2>&1; }; then
    fail "cp traffic data" "--prepare-text failed: $(tail -n 1 "$WORK/cpprep.out")"
fi
cp_traffic() {  # label ranks data model-flags Lg Ll H tp cp blocks flags...: blocks = rank 0's B per global layer
    local label=$1 ranks=$2 data=$3 model=$4 Lg=$5 Ll=$6 H=$7 tp=$8 cp=$9 blocks=${10} want got log
    shift 10
    log="$WORK/cpt_${ranks}_${cp}_$blocks.jsonl"
    if ! $MPIRUN -np "$ranks" ./picotron_cpu $model --data "$data" --seq-len 256 --micro-batch-tokens 256 --steps 2 \
            --cp "$cp" "$@" --log "$log" > "$WORK/cpt.out" 2>&1; then
        fail "cp traffic $label" "run failed: $(grep -m1 picotron: "$WORK/cpt.out")"; return
    fi
    want=$(awk -v Lg=$Lg -v Ll=$Ll -v H=$H -v tp=$tp -v cp=$cp -v blocks=$blocks 'BEGIN { Tc = 256 / cp; w = 64;
        B = Tc * 2 * (H / tp) * 4; rows = (cp - 1) * Tc < w ? (cp - 1) * Tc : w;
        printf "%.0f %.0f", Lg * blocks * B, Ll * 2 * rows * 2 * (H / tp) * 4 }')
    got=$(grep -o '"cp_bytes": {"ring": [0-9]*, "halo": [0-9]*' "$log" | sed 's/[^0-9 ]//g' | tr -s ' ' | sort -u)
    if [ "$(echo $got)" = "$want" ]; then pass "cp traffic $label: rank 0 sends ring $(echo $want | cut -d' ' -f1) + halo $(echo $want | cut -d' ' -f2) bytes a step, as the formulas say"
    else fail "cp traffic $label" "rank 0 logged ring/halo '$(echo $got)' per step, the formulas say '$want'"; fi
}
MINIM="--model mini --lr 2e-3 --warmup 2"
# every block needed: 3·(cp − 1) blocks a global layer
cp_traffic "cp 2, every block needed (mini)" 2 "$WORK/cplong" "$MINIM" 1 1 64 1 2 3 --trace "$WORK/cptrace"
cp_traffic "cp 4, every block needed (mini)" 4 "$WORK/cplong" "$MINIM" 1 1 64 1 4 9
cp_traffic "cp 8, shards of 32 < the window: halos from 2 ranks (mini)" 8 "$WORK/cplong" "$MINIM" 1 1 64 1 8 21
cp_traffic "tp 2 × cp 2 --sp, every block needed (S4: H/tp = 64)" 4 "$WORK/cplong" "--init-from $S4 --lr 2e-4 --warmup 2" 2 2 128 2 2 3 --tp 2 --sp
# cp 2, two documents of 128: none crosses the edge, no block is sent
cp_traffic "cp 2, documents aligned with the shards: no ring block sent (mini)" 2 "$WORK/cpshort" "$MINIM" 1 1 64 1 2 0
# cp 4, documents of 128 on shards {0, 1} and {2, 3}: rank 0 passes on its own block (rank 1 needs
# it) and, at step 2, shard 3's (rank 2, the last before shard 2, needs it: reach 3), not shard 2's
# at step 3 (shard 2's reach is 1); backward those 2 hops again and the gradient of shard 1's block
# only: 2 + 2 + 1 = 5 blocks, against 9 with every block needed
cp_traffic "cp 4, documents on shard pairs: blocks stop where nobody further needs them (mini)" 4 "$WORK/cpshort" "$MINIM" 1 1 64 1 4 5
# trace (the first cp 2 run): both ranks have the ring's and the halo's exchanges, forward and
# backward, as spans with "group": "cp" and the bytes they sent
ok=1; why=""
for r in 0 1; do
    f="$WORK/cptrace/trace_rank$r.json"
    [ -f "$f" ] || { ok=0; why="$why no $f;"; continue; }
    for span in "cp ring kv send/recv" "cp ring grad dkv send/recv" "cp halo kv send/recv" "cp halo grad dkv send/recv"; do
        grep -q "\"name\": \"$span\".*\"group\": \"cp\", \"bytes\": [1-9]" "$f" || { ok=0; why="$why rank $r lacks '$span' (group cp, bytes);"; }
    done
done
if [ $ok = 1 ]; then pass "trace cp 2: the ring's and the halo's exchanges and their gradients, with group cp and bytes, on both ranks"
else fail "trace cp 2" "$why"; fi

summary
