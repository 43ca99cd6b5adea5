#!/usr/bin/env bash
# The GPU build of the trainer, compiled by g++ under the CUDA emulator (picotron_emu: make
# picotron_emu; tests/cuda_emu.h), trains like the CPU build: every kernel, cuBLASLt call, stream,
# event and pinned staging copy of picotron.cu's GPU branches runs thread by thread on the CPU.
# Same data, seed and flags, 3 steps (the 1-rank run: 20); the GPU build stores what GEMMs and
# attention read in bf16 and multiplies it on (emulated) tensor cores with fp32 accumulation, the
# CPU build computes in fp32, so the runs agree to bf16's precision. The tolerances (those of tests/gpu_vs_cpu.sh, on a real GPU):
#   - losses, derived: bf16 keeps 8 significant bits, an operand is off by ≤ 2⁻⁸ relative and a
#     product by ≤ 2⁻⁷, so a logit moves by ≤ 2⁻⁷ of its Σ|terms| per rounded product on its path,
#     and the mean cross-entropy by ≤ twice the largest logit change: with logits of order 1 and
#     Σ|terms| a few times |logit|, ≲ 1e-2 nats of a loss of ~8, so every step agrees to 1e-3
#     relative (measured: 8.7e-5 at 20 steps; storing an operand in bf16 is the same one rounding);
#   - weights, stated from measurement: Adam moves an element whose gradient is below its roundoff
#     by up to ±lr a step whatever its size (its first step is sign(g)), so a tensor's max difference
#     says little; the RMS of a tensor's difference over its RMS (compare_runs --rms) measures how
#     far the runs drift apart: 8.9e-3 at 20 steps (the MLP's Wo), 5.3e-3 to 1.5e-2 at 3 steps (the
#     largest, head.dense under cp 4 on 128-token micro-batches: fewer masked tokens, noisier
#     gradients), and the tolerance is 3e-2.
# What these runs catch: a wiring or layout error (a wrong pointer, stride, shard or collective)
# moves whole tensors. An op's rounding is the kernel tests' business (tests/test_gpu.cu checks
# each op against its reference element by element): at init attention is near uniform, so even a
# window one key short moves the loss by 4e-7 and the weights' RMS by 0.6% (with fp32 GEMMs).
# NCCL is not emulated, so every emulated run uses --comm mpi. Layouts: 1 rank, dp 2
# (with and without ZeRO-1) against a 1-rank grad-accum 2 run, and tensor parallel (tp 2, tp 2
# --sp) against a 1-rank run: tp splits every layer's GEMMs, attention heads, the vocabulary and
# the cross-entropy over the ranks, so its kernels run on other shapes than one rank's.
# The emulator is slow (the cuBLASLt GEMM is plain loops): the tiny model ($TINY, V 50368) takes
# ~22 s a step, so the default is the mini model (V 4096, ~1.7 s a step, 3-7 s a run on 2 cores);
# EMU_TRAINER_TINY=1 runs the tiny shapes instead (~100 s a run on 2 cores).
# mini has one attention head, which tp cannot split: the tp runs train "h2", mini's shape with
# 2 heads of 64 (the GPU attention kernel's head size), H 128, I 192 and V 4097 (an odd vocabulary:
# tp 2 pads it to 2 × 2049 rows), initialised by tests/make_model (6-8 s a tp run on 2 cores).
# Pipeline parallel (pp 2, one layer a stage, grad-accum 2, 2 steps) trains h2 too, against a
# 1-rank grad-accum 2 run. Context parallel: cp 2 (mini, shards of 128 tokens) against the 1-rank
# run; cp 4 (mini, micro-batch 128: shards of 32 tokens, shorter than the local layers' 64-token
# window, so each halo comes from 2 ranks) against a 1-rank micro-batch 128 run; cp 2 × tp 2 --sp
# (h2, 4 ranks) against h2's 1-rank run. mini and h2 have a global layer (ring attention) and a
# local one (halo exchange); each cp run must also log ring traffic on every step (cp_bytes.ring
# > 0: a block is only passed on when a document crosses a shard edge). cp runs take 2-7 s.
# The whole script takes ~80 s on 2 cores (the 20-step run ~30 s). Last line: "N passed, M failed".
source "$(dirname "$0")/common.sh"
if [ "${EMU_TRAINER_TINY:-0}" = 1 ]; then FLAGS="$TINY --steps 3"
else FLAGS="--model mini --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2 --steps 3"; fi
for f in picotron_emu picotron_cpu tests/compare_runs tests/make_model; do
    [ -x "$f" ] || { echo "tests/emu_trainer.sh: $f is missing (make picotron_emu picotron_cpu tests/compare_runs tests/make_model)"; fail "$f" "missing"; summary; exit; }
done
compare() {  # name, cpu run, emulated run
    if v=$(./tests/compare_runs "$WORK/$2.jsonl" "$WORK/$3.jsonl" "$WORK/$2/model.safetensors" "$WORK/$3/model.safetensors" \
           --loss-rel 1e-3 --weight-rel 3e-2 --rms); then pass "$1: $v"
    else fail "$1" "$v"; fi
}
# the references: one rank, one micro-batch a step (3 and 20 steps) and two
$MPIRUN -np 1 ./picotron_cpu $FLAGS --log "$WORK/cpu1.jsonl" --export "$WORK/cpu1" > /dev/null &&
$MPIRUN -np 1 ./picotron_cpu $FLAGS --steps 20 --log "$WORK/cpu20.jsonl" --export "$WORK/cpu20" > /dev/null &&
$MPIRUN -np 1 ./picotron_cpu $FLAGS --grad-accum 2 --log "$WORK/cpu2.jsonl" --export "$WORK/cpu2" > /dev/null ||
    { fail "picotron_cpu reference runs" "run failed"; summary; exit; }
emu() {  # name, reference, ranks, thread order, flags…: an emulated run ($FLAGS) compared with a CPU run
    local name=$1 ref=$2 ranks=$3 order=$4 id t0
    shift 4
    id=$(echo "$name" | tr -c 'a-zA-Z0-9' '_')
    t0=$(date +%s)
    if $MPIRUN -np "$ranks" -x PICOTRON_EMU_ORDER="$order" -x PICOTRON_EMU_SEED=7 ./picotron_emu $FLAGS "$@" --comm mpi --log "$WORK/$id.jsonl" --export "$WORK/$id" > "$WORK/$id.out" 2>&1
    then echo "  ($name: $(( $(date +%s) - t0 )) s)"; compare "$name" "$ref" "$id"
    else tail -n 5 "$WORK/$id.out"; fail "$name" "run failed"; fi
}
crosses() {  # name: every step of that emulated run passed a ring block (documents cross a shard edge)
    local id steps ring
    id=$(echo "$1" | tr -c 'a-zA-Z0-9' '_')
    steps=$(grep -c '"step"' "$WORK/$id.jsonl" 2>/dev/null)
    ring=$(grep -c '"cp_bytes": {"ring": [1-9]' "$WORK/$id.jsonl" 2>/dev/null)
    if [ "${steps:-0}" -gt 0 ] && [ "$steps" = "$ring" ]; then pass "$1: ring traffic on all $steps steps"
    else fail "$1" "ring traffic on ${ring:-0} of ${steps:-0} steps: no document crosses a shard edge"; fi
}
# mpirun -x passes the thread order (tests/cuda_emu.h: PICOTRON_EMU_ORDER, PICOTRON_EMU_SEED) to every rank
emu "emulated GPU build follows the CPU build for 20 steps (1 rank, forward thread order)" cpu20 1 forward --steps 20
emu "emulated GPU build, dp 2 (--comm mpi, random thread order), vs CPU grad-accum 2" cpu2 2 random --dp 2
emu "emulated GPU build, dp 2 ZeRO-1 (--comm mpi, reverse thread order), vs CPU grad-accum 2" cpu2 2 reverse --dp 2 --zero 1

# ---- checkpoints: the GEMMs' bf16 copy of the weights is remade whenever the weights change
# (init, a checkpoint's load, every step), so a run resumed from its own step-2 checkpoint ends
# bit-identical to the uninterrupted run (~6 s) ----
if $MPIRUN -np 1 ./picotron_emu $FLAGS --steps 2 --save "$WORK/ck" --save-every 2 > "$WORK/ck.out" 2>&1 &&
   $MPIRUN -np 1 ./picotron_emu $FLAGS --resume "$WORK/ck" --export "$WORK/resumed" > "$WORK/resumed.out" 2>&1 &&
   $MPIRUN -np 1 ./picotron_emu $FLAGS --export "$WORK/straight" > "$WORK/straight.out" 2>&1; then
    if cmp -s "$WORK/resumed/model.safetensors" "$WORK/straight/model.safetensors"; then
        pass "emulated GPU build: resumed from step 2, bit-identical to the uninterrupted run"
    else fail "emulated GPU build: resume" "the resumed run's weights differ from the uninterrupted run's"; fi
else tail -n 3 "$WORK"/ck.out "$WORK"/resumed.out "$WORK"/straight.out; fail "emulated GPU build: resume" "a run failed"; fi

# ---- context parallel: ring attention (layer 0, global) and halo exchange (layer 1, local) ----
emu "picotron_emu trains with cp 2 and follows picotron_cpu (mini, reverse thread order), vs CPU 1 rank" cpu1 2 reverse --cp 2
crosses "picotron_emu trains with cp 2 and follows picotron_cpu (mini, reverse thread order), vs CPU 1 rank"
if $MPIRUN -np 1 ./picotron_cpu $FLAGS --micro-batch-tokens 128 --log "$WORK/cpu1_128.jsonl" --export "$WORK/cpu1_128" > /dev/null; then
    emu "picotron_emu trains with cp 4, shards of 32 tokens, and follows picotron_cpu (mini, random thread order), vs CPU 1 rank" \
        cpu1_128 4 random --cp 4 --micro-batch-tokens 128
    crosses "picotron_emu trains with cp 4, shards of 32 tokens, and follows picotron_cpu (mini, random thread order), vs CPU 1 rank"
else fail "cp 4: the picotron_cpu micro-batch 128 reference run" "failed"; fi

# ---- tensor parallel: the h2 model (see the header) ----
mkdir -p "$WORK/h2"
if $MPIRUN -np 1 ./picotron_cpu --model mini --data data/mini --steps 0 --export "$WORK/mini0" > /dev/null &&
   sed 's/"vocab_size": .*/"vocab_size": 4097,/; s/"hidden_size": .*/"hidden_size": 128,/;
        s/"num_attention_heads": .*/"num_attention_heads": 2,/; s/"intermediate_size": .*/"intermediate_size": 192,/' \
       "$WORK/mini0/config.json" > "$WORK/h2/config.json" && ./tests/make_model "$WORK/h2" > /dev/null &&
   FLAGS="--init-from $WORK/h2 --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2 --steps 3" &&
   $MPIRUN -np 1 ./picotron_cpu $FLAGS --log "$WORK/cpu_h2.jsonl" --export "$WORK/cpu_h2" > /dev/null; then
    emu "picotron_emu trains with tp 2 and follows picotron_cpu (h2, --comm mpi, random thread order), vs CPU 1 rank" cpu_h2 2 random --tp 2
    emu "picotron_emu trains with tp 2 --sp and follows picotron_cpu (h2, reverse thread order), vs CPU 1 rank" cpu_h2 2 reverse --tp 2 --sp
    emu "picotron_emu trains with cp 2 × tp 2 --sp and follows picotron_cpu (h2, forward thread order), vs CPU 1 rank" cpu_h2 4 forward --cp 2 --tp 2 --sp
    crosses "picotron_emu trains with cp 2 × tp 2 --sp and follows picotron_cpu (h2, forward thread order), vs CPU 1 rank"
    # pipeline parallel: 2 stages of one layer, the activations and gradients of 2 micro-batches a
    # step sent between them (1f1b), the tied embedding summed over both; 2 steps (a run ~9 s)
    if $MPIRUN -np 1 ./picotron_cpu $FLAGS --steps 2 --grad-accum 2 --log "$WORK/cpu_h2_ga2.jsonl" --export "$WORK/cpu_h2_ga2" > /dev/null; then
        emu "picotron_emu trains with pp 2 and follows picotron_cpu (h2, --comm mpi, random thread order), vs CPU grad-accum 2" \
            cpu_h2_ga2 2 random --pp 2 --grad-accum 2 --steps 2
    else fail "pp: the picotron_cpu grad-accum 2 reference run (h2)" "failed"; fi
else fail "tp: the h2 model and its picotron_cpu reference run" "failed"; fi
summary
