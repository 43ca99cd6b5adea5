#!/usr/bin/env bash
# make test: every CPU test, counted. Unit programs print their own "N passed, M failed" and are
# added in; the end-to-end checks below run the real binary under mpirun. Last line: the total.
source "$(dirname "$0")/common.sh"
BIN=./picotron_cpu

# ---- suites that count for themselves ----
# unit programs, the 4-rank communication test, layout equivalence, data-parallel end to end, faults
SUITES=(
  "tests/test_ops"
  "tests/test_data"
  "tests/test_safetensors"
  "tests/test_model"
  "tests/test_model tests/golden_pattern"
  "$MPIRUN -np 4 tests/test_comm"
  "bash tests/layouts.sh"
  "bash tests/parallel_tests.sh"
  "bash tests/fault_tests.sh"
  "bash tests/reliability_tests.sh"
  "bash tests/emu_tests.sh"
)
if command -v nvcc >/dev/null 2>&1; then SUITES+=("bash tests/gpu_static.sh"); fi  # spills, kernel table
for t in "${SUITES[@]}"; do
    echo "== $t"
    t_start=$SECONDS
    out=$(timeout 900 $t 2>&1)
    rc=$?
    if [[ $t == bash* ]]; then echo "$out" | grep -E '^(PASS|FAIL|\| )' || true  # few lines, each worth reading
    else echo "$out" | grep -E '^FAIL|^ ' || true; fi
    line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$line" ]; then fail "$t" "no summary line (exit $rc): $(echo "$out" | tail -n 3)"; continue; fi
    p=${line%% passed*}
    f=${line#*, }; f=${f%% failed*}
    passed=$((passed + p))
    failed=$((failed + f))
    [ "$rc" = 0 ] || [ "$f" != 0 ] || fail "$t" "exit $rc with no failed check"
    echo "$t totals: $line ($((SECONDS - t_start)) s)"
done

# ---- end to end ----
echo "== end to end"

# Exact resume: 6 steps straight vs 3 steps + resume to 6, losses and weights bit for bit.
$MPIRUN -np 1 $BIN $TINY --steps 6 --log "$WORK/full.jsonl" --export "$WORK/full" >/dev/null 2>&1 \
  && $MPIRUN -np 1 $BIN $TINY --steps 3 --save "$WORK/ck" --save-every 3 --log "$WORK/part.jsonl" >/dev/null 2>&1 \
  && $MPIRUN -np 1 $BIN $TINY --steps 6 --resume "$WORK/ck" --log "$WORK/part.jsonl" --export "$WORK/resumed" >/dev/null 2>&1
if [ $? != 0 ]; then fail "exact resume" "a run failed"
else
    a=$(grep -o '"loss": [^,]*' "$WORK/full.jsonl"); b=$(grep -o '"loss": [^,]*' "$WORK/part.jsonl")
    if [ "$a" != "$b" ]; then fail "exact resume" "loss trajectories differ: $(echo $a) vs $(echo $b)"
    elif ! cmp -s "$WORK/full/model.safetensors" "$WORK/resumed/model.safetensors"; then fail "exact resume" "final weights differ"
    else pass "exact resume (6 losses and final weights bit for bit)"; fi
fi

# Threads: the ops and the GEMM slices do not depend on the thread count, so 1, 2 and 3 threads
# give the same losses and weights bit for bit; an exact resume holds with 2 threads. Run without
# mpirun, so that no binding limits the threads.
$BIN $TINY --steps 4 --threads 1 --log "$WORK/t1.jsonl" --export "$WORK/t1" >/dev/null 2>&1 \
  && $BIN $TINY --steps 4 --threads 2 --log "$WORK/t2.jsonl" --export "$WORK/t2" >/dev/null 2>&1 \
  && $BIN $TINY --steps 4 --threads 3 --log "$WORK/t3.jsonl" --export "$WORK/t3" >/dev/null 2>&1 \
  && $BIN $TINY --steps 2 --threads 2 --save "$WORK/tck" --save-every 2 >/dev/null 2>&1 \
  && $BIN $TINY --steps 4 --threads 2 --resume "$WORK/tck" --export "$WORK/t2r" >/dev/null 2>&1
if [ $? != 0 ]; then fail "threads" "a run failed"
else
    a=$(grep -o '"loss": [^,]*' "$WORK/t1.jsonl"); b=$(grep -o '"loss": [^,]*' "$WORK/t2.jsonl")
    c=$(grep -o '"loss": [^,]*' "$WORK/t3.jsonl")
    if [ "$a" != "$b" ] || [ "$a" != "$c" ]; then fail "threads" "losses differ: $(echo $a) / $(echo $b) / $(echo $c)"
    elif ! cmp -s "$WORK/t1/model.safetensors" "$WORK/t2/model.safetensors" \
      || ! cmp -s "$WORK/t1/model.safetensors" "$WORK/t3/model.safetensors"; then fail "threads" "final weights differ"
    elif ! cmp -s "$WORK/t2/model.safetensors" "$WORK/t2r/model.safetensors"; then fail "threads" "resume with 2 threads differs"
    else pass "1, 2 and 3 threads: 4 losses and final weights bit for bit; exact resume with 2 threads"; fi
fi
# The thread count in use, and the warning when a rank is bound to fewer cores than its threads.
out=$($MPIRUN -np 2 $BIN $TINY --dp 2 --steps 1 2>&1)
if echo "$out" | grep -q "^threads per rank: 1 "; then pass "two ranks on one machine default to 1 thread each"
else fail "threads default" "no 'threads per rank: 1' line in: $(echo "$out" | head -3)"; fi
out=$(mpirun -np 1 --bind-to core $BIN $TINY --steps 1 --threads 2 2>&1)
if echo "$out" | grep -q "warning: 2 threads on 1 core this rank may use"; then pass "a rank bound to 1 core with 2 threads is warned"
else fail "binding warning" "no warning in: $(echo "$out" | head -3)"; fi

# Export → import round trip is the identity: re-exporting an imported model gives the same bytes.
if $MPIRUN -np 1 $BIN --init-from "$WORK/full" --data data/default --steps 0 --export "$WORK/again" >/dev/null 2>&1 \
   && cmp -s "$WORK/full/model.safetensors" "$WORK/again/model.safetensors" \
   && cmp -s "$WORK/full/config.json" "$WORK/again/config.json"; then
    pass "export -> import -> export is byte-identical"
else fail "export round trip" "files differ or a run failed"; fi

# Training tiny on the default corpus lowers the loss: mean of the last 5 of 30 steps must sit at
# least 2.0 nats below the first step's loss (ln 50368 ≈ 10.8 at the start).
if $MPIRUN -np 1 $BIN --model tiny --data data/default --seq-len 256 --micro-batch-tokens 512 --steps 30 \
     --lr 3e-3 --warmup 3 --log "$WORK/train.jsonl" >/dev/null 2>&1; then
    read first last5 < <(awk -F'"loss": ' '{split($2, a, ","); l[NR] = a[1]} END {s = 0; for (i = NR - 4; i <= NR; i++) s += l[i]; print l[1], s / 5}' "$WORK/train.jsonl")
    if awk -v a="$first" -v b="$last5" 'BEGIN{exit !(a - b >= 2.0)}'; then pass "loss falls on the default corpus ($first -> $last5)"
    else fail "loss falls" "first $first, mean of last five $last5 (want a drop of 2.0)"; fi
else fail "loss falls" "training run failed"; fi

# Bad input: one line naming the problem on stderr, non-zero exit, within seconds.
bad() {  # name, expected stderr text, command...
    local name=$1 want=$2; shift 2
    local err rc
    err=$(timeout 30 "$@" 2>&1 >/dev/null); rc=$?
    if [ $rc = 0 ]; then fail "bad input: $name" "exit 0"
    elif [ $rc = 124 ]; then fail "bad input: $name" "hung (timeout)"
    elif ! echo "$err" | grep -q "^picotron: .*$want"; then fail "bad input: $name" "no 'picotron: ...$want' line in: $(echo "$err" | head -3)"
    else pass "bad input: $name"; fi
}
mkdir -p "$WORK/bad"
printf 'NOTMAGIC0000000000000000000000000000' > "$WORK/bad/magic.bin"
head -c 40 data/default/shard_00000.bin > "$WORK/bad/truncated.bin"
# a shard whose header is fine but holds token 60000 >= vocab 50368
printf 'PICOTOK1\x01\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xc0\xc4\x00\x00\x00\x00\x00\x00\x60\xea' > "$WORK/bad/bigtoken.bin"
mkdir -p "$WORK/bad/cfg" "$WORK/bad/st"
echo '{"hidden_size": 64, "vocab_size": ' > "$WORK/bad/cfg/config.json"
cp "$WORK/full/config.json" "$WORK/bad/st/config.json"
head -c 100 "$WORK/full/model.safetensors" > "$WORK/bad/st/model.safetensors"
bad "missing shard" "data/missing" $MPIRUN -np 1 $BIN --data data/missing --steps 1
bad "wrong magic" "magic" $MPIRUN -np 1 $BIN --data "$WORK/bad/magic.bin" --steps 1
bad "truncated shard" "truncated.bin" $MPIRUN -np 1 $BIN --data "$WORK/bad/truncated.bin" --steps 1
bad "token >= vocab" "bigtoken.bin" $MPIRUN -np 1 $BIN --data "$WORK/bad/bigtoken.bin" --steps 1
bad "unknown flag" "unknown flag --bogus" $MPIRUN -np 1 $BIN --bogus 1
bad "malformed number" "--steps" $MPIRUN -np 1 $BIN --steps ten
bad "missing value" "needs a value" $MPIRUN -np 1 $BIN --steps
bad "unknown model" "--model" $MPIRUN -np 1 $BIN --model huge
bad "seq-len > micro-batch" "seq-len" $MPIRUN -np 1 $BIN --seq-len 512 --micro-batch-tokens 256
bad "malformed config.json" "config.json" $MPIRUN -np 1 $BIN --init-from "$WORK/bad/cfg" --steps 1
bad "malformed safetensors" "model.safetensors" $MPIRUN -np 1 $BIN --init-from "$WORK/bad/st" --steps 1
bad "layout does not match the world" "dp 3 × pp 1 × cp 1 × tp 1 = 3 ranks, but mpirun started 2" $MPIRUN -np 2 $BIN --dp 3 --steps 1
bad "nccl on the CPU build" "--comm nccl needs the GPU build" $MPIRUN -np 1 $BIN --comm nccl --steps 1
bad "zero 2" "--zero" $MPIRUN -np 1 $BIN --zero 2 --steps 1

# --help prints every flag and exits 0
if $BIN --help | grep -q -- "--micro-batch-tokens"; then pass "--help"; else fail "--help" "no usage text"; fi

# Where nvcc exists the GPU build must exist and carry sm_90 code.
if command -v nvcc >/dev/null 2>&1; then
    # cuobjdump lists the cubins where the toolkit ships it; otherwise the fatbin's recorded
    # device-link options name the architecture of the cubin it holds
    if command -v cuobjdump >/dev/null 2>&1; then has_sm90() { cuobjdump --list-elf picotron | grep -q sm_90; }
    else has_sm90() { readelf -S picotron | grep -q nv_fatbin && strings -a picotron | grep -q -- "-arch sm_90"; }; fi
    if make -s picotron >/dev/null && has_sm90; then pass "picotron (nvcc) builds with sm_90 code"
    else fail "GPU build" "picotron did not build or has no sm_90 code"; fi
fi

summary
