#!/usr/bin/env bash
# Layout equivalence: the tiny model trained for 4 steps under each layout below must follow the
# single-rank run over the same global batch (dp × grad-accum micro-batches): every step's loss
# within 1e-5 relative, every final weight tensor within 1e-4 (max |diff| / max |w|).
# Adding a layout is one line: "ranks | flags". The single-rank reference for a layout is the run
# with the same flags minus the layout ones (--dp, --tp, --cp, --sp, --zero, --pp, --pp-schedule) and with
# --grad-accum = dp × grad-accum; it is computed once per distinct set of flags.
#
# Layouts:
#   data parallel: dp 2, dp 3/4/8 with ZeRO-1, with grad-accum, with StableAdamW and clipping
#   (dp 4 and dp 8 on S4, below: the 4- and 8-rank lines cost most on tiny's vocabulary);
#   tensor parallel: tp 2 and 4, with and without sequence parallel (--sp), dp 2 × tp 2 (with
#   ZeRO-1 and --sp, and with ZeRO-1 and grad-accum 2), tp 2 with grad-accum 2 and --sp (dp 2 ×
#   tp 2 and dp 2 × tp 2 with ZeRO-1 and grad-accum 2 on S4; tp 4 with and without --sp on the
#   odd-vocabulary model below, which has 4 heads);
#   an odd vocabulary (V 4097: a model made by tests/make_model for --init-from, trained on
#   data/mini), which tp 2 and tp 4 pad to 4098 and 4100 rows;
#   pipeline parallel (--pp, --pp-schedule): pp 2, 3 and 4, both schedules, grad-accum below, equal
#   to and above pp, with dp, tp, --sp and ZeRO-1: dp 2 × tp 2 × pp 2 with --sp, ZeRO-1 and
#   grad-accum 2 (8 ranks, 1f1b, on S4 below), pp 2 with grad-accum 4 (afab), tp 2 × pp 2 with grad-accum 1
#   (afab), and on a 5-layer model (L5: mini's config with H 256, 4 heads, I 256, L 5, made by
#   tests/make_model) pp 3 with grad-accum 2 (stages of 2, 2, 1 layers, 1f1b) and pp 4 with
#   grad-accum 6 (stages of 2, 1, 1, 1 layers, 1f1b). The tied embedding's two copies (first and
#   last stage) are checked by the trainer; the exported one is compared here. Without tp, pp
#   matches one rank at TINY's lr 2e-3 (weights to ~1e-5); with tp the lines train at --lr 2e-4.
#   context parallel (--cp): on tiny cp 2 (shards of 128 tokens: documents of up to 128 tokens cross
#   the edge) and cp 4 on 128-token micro-batches (shards of 32 tokens, shorter than the 64-token
#   window: halos from two ranks each side; one document longer than a shard); on a 4-layer model
#   (S4: mini's config with H 128, 2 heads, L 4, made by tests/make_model; cheaper than tiny's
#   vocabulary of 50368) cp 4 (shards of 64), dp 2 × cp 2 with ZeRO-1, tp 2 × cp 2 with --sp,
#   cp 2 × pp 2, cp 8 (shards of 32 tokens, a ring of 8), the 8-rank dp 2 × cp 2 × tp 2 (--sp, ZeRO-1), tp 2 × cp 2 × pp 2 and dp 2 × cp 2 × pp 2
#   (ZeRO-1, afab) and the 16-rank dp 2 × tp 2 × pp 2 × cp 2 (--sp, ZeRO-1, grad-accum 2). They
#   train at --lr 2e-4 as tp does (cp's partial attention sums round differently, and Adam's eps
#   amplifies that in the smallest gradients: cp 2 at 2e-3 matches weights to 8.2e-5 only).
# The tensor-parallel layouts train at --lr 2e-4 (their reference too; the lr is part of the flags
# the reference keeps). At TINY's 2e-3 their losses match one rank to ~1e-8 but their final weights
# only to ~2.6e-4 (head.dense.weight): Adam divides each gradient by √v + eps with eps 1e-6, so in an
# element whose gradient is far below eps (one element's step-1 gradient is 1.3e-7, the median
# 1.6e-2) the update is ~lr·g/eps and the fp32 rounding of a sum taken in another order (tp's
# partial sums) is amplified by lr/eps; the step-1 gradients of the two runs agree to 8.4e-7. At
# --lr 2e-4 the worst weight mismatch is ~3.4e-5 to 3.9e-5 (head.dense.weight), under the 1e-4 asked for.
#
# --dump equivalence: step 1's dump (the batch, the loss, every normalised gradient) of tp 2 --sp, of
# dp 2 × tp 2 with ZeRO-1, of tp 2 × pp 2 with grad-accum 2 and of cp 2 × tp 2 --sp equals the single-rank dump: gradients
# within 1e-4 relative per tensor (max |diff| / max |g|), the loss within 1e-5, ids/labels/positions/
# cu_seqlens equal. These run at TINY's lr 2e-3: step 1's gradients do not go through Adam.
# Prints PASS/FAIL lines and "N passed, M failed" last.
source "$(dirname "$0")/common.sh"
BASE="$TINY --steps 4 --bucket-mb 8"

# the odd-vocabulary model: mini's config (its special ids fit data/mini) with V 4097, H 256, 4 heads, I 256
ODD="$WORK/odd_vocab"
if $MPIRUN -np 1 ./picotron_cpu --model mini --data data/mini --steps 0 --export "$ODD" > "$WORK/odd.out" 2>&1 &&
   sed -i -e 's/"vocab_size": 4096,/"vocab_size": 4097,/' -e 's/"hidden_size": 64,/"hidden_size": 256,/' \
          -e 's/"num_attention_heads": 1,/"num_attention_heads": 4,/' -e 's/"intermediate_size": 128,/"intermediate_size": 256,/' \
          "$ODD/config.json" &&
   [ "$(grep -c '"vocab_size": 4097,\|"hidden_size": 256,\|"num_attention_heads": 4,\|"intermediate_size": 256,' "$ODD/config.json")" = 4 ] &&
   ./tests/make_model "$ODD" >> "$WORK/odd.out" 2>&1; then :
else fail "odd-vocabulary model" "could not be made: $(tail -n 1 "$WORK/odd.out")"; fi
ODD_FLAGS="--init-from $ODD --data data/mini"
# the 5-layer model for pipeline stages that L does not divide: mini's config with H 256, 4 heads,
# I 256, L 5 (and "layer_types" listing 5 kinds, every 3rd global as global_attn_every_n_layers says)
L5="$WORK/l5"
L5_TYPES='"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]'
if $MPIRUN -np 1 ./picotron_cpu --model mini --data data/mini --steps 0 --export "$L5" > "$WORK/l5.out" 2>&1 &&
   sed -i -e 's/"hidden_size": 64,/"hidden_size": 256,/' -e 's/"num_attention_heads": 1,/"num_attention_heads": 4,/' \
          -e 's/"intermediate_size": 128,/"intermediate_size": 256,/' -e 's/"num_hidden_layers": 2,/"num_hidden_layers": 5,/' \
          -e "s/\"layer_types\": \[[^]]*\]/$L5_TYPES/" "$L5/config.json" &&
   [ "$(grep -c '"hidden_size": 256,\|"num_attention_heads": 4,\|"intermediate_size": 256,\|"num_hidden_layers": 5,' "$L5/config.json")" = 4 ] &&
   grep -qF "$L5_TYPES" "$L5/config.json" && ./tests/make_model "$L5" >> "$WORK/l5.out" 2>&1; then :
else fail "5-layer model" "could not be made: $(tail -n 1 "$WORK/l5.out")"; fi
L5_FLAGS="--init-from $L5 --data data/mini"
# the small model for the 8- and 16-rank context-parallel layouts (tests/common.sh)
S4="$WORK/s4"
make_s4 "$S4" || fail "4-layer model" "could not be made: $(tail -n 1 "$S4.out")"
S4_FLAGS="--init-from $S4 --data data/mini --lr 2e-4"

LAYOUTS=(
  "2 | --dp 2"
  "2 | --dp 2 --grad-accum 2"
  "2 | --dp 2 --zero 1"
  "3 | --dp 3 --zero 1"
  "4 | --dp 4 --zero 1 --grad-accum 2 $S4_FLAGS"
  "8 | --dp 8 --zero 1 $S4_FLAGS"
  "2 | --dp 2 --zero 1 --optimizer stable-adamw --clip 0.5"
  "2 | --tp 2 --lr 2e-4"
  "4 | --tp 4 --lr 2e-4 $ODD_FLAGS"
  "2 | --tp 2 --sp --lr 2e-4"
  "4 | --dp 2 --tp 2 $S4_FLAGS"
  "4 | --dp 2 --tp 2 --zero 1 --sp --lr 2e-4"
  "2 | --tp 2 --grad-accum 2 --sp --lr 2e-4"
  "4 | --dp 2 --tp 2 --zero 1 --grad-accum 2 $S4_FLAGS"
  "2 | --tp 2 --lr 2e-4 $ODD_FLAGS"
  "4 | --tp 4 --sp --lr 2e-4 $ODD_FLAGS"
  "8 | --dp 2 --tp 2 --pp 2 --grad-accum 2 --sp --zero 1 $S4_FLAGS"
  "2 | --pp 2 --grad-accum 4 --pp-schedule afab"
  "4 | --tp 2 --pp 2 --pp-schedule afab --lr 2e-4"
  "3 | --pp 3 --grad-accum 2 $L5_FLAGS"
  "4 | --pp 4 --grad-accum 6 $L5_FLAGS"
  "2 | --cp 2 --lr 2e-4"
  "4 | --cp 4 --micro-batch-tokens 128 --lr 2e-4"
  "4 | --cp 4 $S4_FLAGS"
  "4 | --dp 2 --cp 2 --zero 1 --grad-accum 2 $S4_FLAGS"
  "4 | --tp 2 --cp 2 --sp $S4_FLAGS"
  "4 | --cp 2 --pp 2 --grad-accum 2 $S4_FLAGS"
  "8 | --cp 8 $S4_FLAGS"
  "8 | --dp 2 --cp 2 --tp 2 --sp --zero 1 --grad-accum 2 $S4_FLAGS"
  "8 | --tp 2 --cp 2 --pp 2 --grad-accum 2 $S4_FLAGS"
  "8 | --dp 2 --cp 2 --pp 2 --zero 1 --pp-schedule afab $S4_FLAGS"
  "16 | --dp 2 --tp 2 --pp 2 --cp 2 --sp --zero 1 --grad-accum 2 $S4_FLAGS"
)
# step 1's --dump under these layouts vs one rank's
DUMPS=(
  "2 | --tp 2 --sp"
  "4 | --dp 2 --tp 2 --zero 1"
  "4 | --tp 2 --pp 2 --grad-accum 2"
  "4 | --cp 2 --tp 2 --sp"
)
run() {  # name ranks flags...; a model from --init-from replaces BASE's --model tiny
    local name=$1 ranks=$2 base=$BASE; shift 2
    case " $* " in *" --init-from "*) base=${BASE/--model tiny/} ;; esac
    $MPIRUN -np "$ranks" ./picotron_cpu $base "$@" --log "$WORK/$name.jsonl" --export "$WORK/$name" > "$WORK/$name.out" 2>&1
}
flag() { echo " $2 " | grep -o -- " $1 [^ ]*" | awk '{print $2}'; }
# the flags without the layout ones: what the single-rank reference shares with the layout
non_layout() { echo " $1 " | sed -E 's/ --(dp|tp|pp|cp|pp-schedule|zero|grad-accum) [^ ]+/ /g; s/ --sp / /g' | tr -s ' ' | sed 's/^ //; s/ $//'; }
label() { echo "${1//$WORK\//}" | tr -c 'a-z0-9' '_'; }  # a file name for flags ($WORK left out)
check() {  # kind (layout|dump) "ranks | flags"
    local kind=$1 ranks=${2%% |*} flags=${2#*| } dp ga micro shared ref name extra=() verdict
    dp=$(flag --dp "$flags"); dp=${dp:-1}; ga=$(flag --grad-accum "$flags"); ga=${ga:-1}
    micro=$((dp * ga))
    shared=$(non_layout "$flags")
    ref="${kind}_ref_${micro}_$(label "$shared")"
    if [ ! -f "$WORK/$ref.jsonl" ]; then
        [ "$kind" = dump ] && extra=(--steps 1 --dump "$WORK/$ref")
        run "$ref" 1 --grad-accum "$micro" $shared "${extra[@]}" || { fail "reference $ref" "run failed: $(grep -m1 picotron: "$WORK/$ref.out")"; return; }
    fi
    name="${kind}_$(label "$flags")"
    [ "$kind" = dump ] && extra=(--steps 1 --dump "$WORK/$name")
    if ! run "$name" "$ranks" $flags "${extra[@]}"; then
        fail "$kind [$flags]" "run failed: $(grep -m1 picotron: "$WORK/$name.out")"; return
    fi
    local what="$kind [${flags//$WORK\//}] vs 1 rank × grad-accum $micro" a=model b=model
    [ "$kind" = dump ] && { what="step-1 dump [$flags] vs 1 rank × grad-accum $micro"; a=dump; b=dump; }
    if verdict=$(./tests/compare_runs "$WORK/$ref.jsonl" "$WORK/$name.jsonl" "$WORK/$ref/$a.safetensors" \
                 "$WORK/$name/$b.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
        pass "$what: $verdict"
    else
        fail "$what" "$verdict"
    fi
}
for layout in "${LAYOUTS[@]}"; do check layout "$layout"; done
for layout in "${DUMPS[@]}"; do check dump "$layout"; done
summary
