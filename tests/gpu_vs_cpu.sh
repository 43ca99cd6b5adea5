#!/usr/bin/env bash
# make test-gpu, second half: the GPU build trains like the CPU build. Same data, seed and flags,
# 5 steps; the GPU stores activations in bf16 and accumulates in fp32, so every step's
# loss must agree to 1e-3 relative and each weight tensor's RMS difference to 3e-2 of its RMS (the
# bf16 tolerances of tests/emu_trainer.sh, explained there). Then data-, context- and
# tensor-parallel layouts of the GPU build on one GPU (--comm mpi stages through host memory: NCCL
# refuses two ranks on one device) against the same single-rank CPU run, grad-accum 2 (tiny's 4
# heads of 64 and intermediate_size 384 split over tp 2; --sp cuts the 512-token micro-batch into
# two 256-row slices; pp 2 puts 3 of tiny's 6 layers on each stage, its 2 micro-batches a step
# passing activations and gradients between them; cp 2 cuts each 512-token micro-batch into two
# shards, ring attention on the global layers, halos on the local ones). Last line: "N passed, M failed".
source "$(dirname "$0")/common.sh"
FLAGS="--model tiny --data data/default --seq-len 128 --micro-batch-tokens 512 --steps 5 --lr 2e-3 --warmup 2"
compare() {  # name, cpu run, gpu run
    if v=$(./tests/compare_runs "$WORK/$2.jsonl" "$WORK/$3.jsonl" "$WORK/$2/model.safetensors" "$WORK/$3/model.safetensors" \
           --loss-rel 1e-3 --weight-rel 3e-2 --rms); then pass "$1: $v"
    else fail "$1" "$v"; fi
}
$MPIRUN -np 1 ./picotron_cpu $FLAGS --grad-accum 2 --log "$WORK/cpu.jsonl" --export "$WORK/cpu" > /dev/null
gpu() {  # name, ranks, flags…: a GPU run compared with the CPU run
    local name=$1 ranks=$2 id
    shift 2
    id=$(echo "$name" | tr -c 'a-zA-Z0-9' '_')
    if $MPIRUN -np "$ranks" ./picotron $FLAGS "$@" --log "$WORK/$id.jsonl" --export "$WORK/$id"; then compare "$name" cpu "$id"
    else fail "$name" "run failed"; fi
}
gpu "GPU build follows the CPU build" 1 --grad-accum 2
gpu "GPU dp 2 (--comm mpi, one GPU)" 2 --dp 2 --comm mpi
gpu "GPU dp 2 ZeRO-1 (--comm mpi)" 2 --dp 2 --zero 1 --comm mpi
gpu "GPU tp 2 (--comm mpi, one GPU)" 2 --tp 2 --grad-accum 2 --comm mpi
gpu "GPU tp 2 --sp (--comm mpi, one GPU)" 2 --tp 2 --sp --grad-accum 2 --comm mpi
gpu "GPU pp 2 (1f1b, --comm mpi, one GPU)" 2 --pp 2 --grad-accum 2 --comm mpi
gpu "GPU cp 2 (ring and halo, --comm mpi, one GPU)" 2 --cp 2 --grad-accum 2 --comm mpi
summary
