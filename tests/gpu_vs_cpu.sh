#!/usr/bin/env bash
# make test-gpu, second half: the GPU build trains like the CPU build. Same data, seed and flags,
# 5 steps; every step's loss must agree to 1e-4 relative (the GPU computes in fp32 with its own
# summation order, so bit equality is not expected). Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
WORK=$(mktemp -d /tmp/picotron-gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FLAGS="--model tiny --data data/default --seq-len 128 --micro-batch-tokens 512 --steps 5 --lr 2e-3 --warmup 2"
./picotron_cpu $FLAGS --log "$WORK/cpu.jsonl" >/dev/null || { echo "FAIL cpu run"; echo "0 passed, 1 failed"; exit 1; }
./picotron $FLAGS --log "$WORK/gpu.jsonl" || { echo "FAIL gpu run"; echo "0 passed, 1 failed"; exit 1; }
paste -d' ' <(grep -o '"loss": [^,]*' "$WORK/cpu.jsonl" | cut -d' ' -f2) <(grep -o '"loss": [^,]*' "$WORK/gpu.jsonl" | cut -d' ' -f2) |
awk '{ r = ($1 - $2) / $1; if (r < 0) r = -r; if (r > worst) worst = r; printf "step %d cpu %s gpu %s rel %.2e\n", NR, $1, $2, r }
     END { if (NR == 5 && worst <= 1e-4) { print "PASS GPU losses match the CPU build"; print "1 passed, 0 failed" }
           else { print "FAIL GPU losses differ (worst " worst ", " NR " steps)"; print "0 passed, 1 failed"; exit 1 } }'
