#!/usr/bin/env bash
# make test-gpu, second half: the GPU build trains like the CPU build. Same data, seed and flags,
# 5 steps; every step's loss must agree to 1e-4 relative and the final weights to 1e-3 (the GPU
# computes in fp32 with its own summation order, so bit equality is not expected). Then data-parallel
# layouts of the GPU build on one GPU (--comm mpi stages through host memory) against the same
# single-rank CPU run. Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
MPIRUN="mpirun --oversubscribe -x OPENBLAS_NUM_THREADS=1"
WORK=$(mktemp -d /tmp/picotron-gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FLAGS="--model tiny --data data/default --seq-len 128 --micro-batch-tokens 512 --steps 5 --lr 2e-3 --warmup 2"
passed=0; failed=0
compare() {  # name, cpu run, gpu run
    if v=$(./tests/compare_runs "$WORK/$2.jsonl" "$WORK/$3.jsonl" "$WORK/$2/model.safetensors" "$WORK/$3/model.safetensors" \
           --loss-rel 1e-4 --weight-rel 1e-3); then echo "PASS $1: $v"; passed=$((passed + 1))
    else echo "FAIL $1: $v"; failed=$((failed + 1)); fi
}
$MPIRUN -np 1 ./picotron_cpu $FLAGS --grad-accum 2 --log "$WORK/cpu.jsonl" --export "$WORK/cpu" > /dev/null
$MPIRUN -np 1 ./picotron $FLAGS --grad-accum 2 --log "$WORK/gpu.jsonl" --export "$WORK/gpu" && compare "GPU build follows the CPU build" cpu gpu
$MPIRUN -np 2 ./picotron $FLAGS --dp 2 --comm mpi --log "$WORK/gpu_dp2.jsonl" --export "$WORK/gpu_dp2" && compare "GPU dp 2 (--comm mpi, one GPU)" cpu gpu_dp2
$MPIRUN -np 2 ./picotron $FLAGS --dp 2 --zero 1 --comm mpi --log "$WORK/gpu_z1.jsonl" --export "$WORK/gpu_z1" && compare "GPU dp 2 ZeRO-1 (--comm mpi)" cpu gpu_z1
echo "$passed passed, $((3 - passed)) failed"  # a run that did not finish counts as failed
[ "$passed" = 3 ]
