#!/usr/bin/env bash
# Set-up, interop and reliability: the promise is one clear line, every rank down in seconds,
# nothing lost. Each class of defect gets several members:
#   deps       the set-up probes what the build consumes (the library the linker needs), not a header
#   interop    per-layer attention patterns, fields written back as read, --dump of the whole
#              global batch under any layout
#   files      everything read is validated before use (directories, sizes, metadata, NaN, ranges,
#              weights that disagree with their config, data with nothing to train on, binary text)
#   outputs    every output path is checked before step 1; another run's checkpoints are not reused
#   no damage  a failing --prepare-text leaves the dataset as it was; --export never goes into a checkpoint
#   resume     the architecture comes from the checkpoint; contradicting flags are refused
#   tp, pp, cp layouts the model or the world cannot take are refused on every rank; --export and
#              --predict under tensor and pipeline parallel give the 1-rank files and lines
#   diverged   a non-finite loss stops every rank; no non-finite checkpoint becomes latest
# Prints PASS/FAIL lines and "N passed, M failed" last.
source "$(dirname "$0")/common.sh"
BIN=./picotron_cpu
RUN="$MPIRUN -np 1 $BIN"
MINI="--model mini --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2"
W=$WORK

# bad NAME WANT CMD...: exit non-zero within 30 s, a "picotron: ...WANT" line on stderr, and no
# training step on stdout (the problem is found before step 1).
bad() {
    local name=$1 want=$2; shift 2
    local err rc
    err=$(timeout 30 "$@" 2>&1 >"$W/bad.out"); rc=$?
    if [ $rc = 0 ]; then fail "$name" "exit 0"
    elif [ $rc = 124 ]; then fail "$name" "hung (timeout)"
    elif ! echo "$err" | grep -q "^picotron: .*$want"; then fail "$name" "no 'picotron: ...$want' line in: $(echo "$err" | head -3 | tr '\n' '|')"
    elif grep -q "^step " "$W/bad.out"; then fail "$name" "trained before refusing"
    else pass "$name"; fi
}

# ---- deps ----
if bash scripts/install_deps.sh --check 2>/dev/null; then pass "deps: every probe passes on this machine"
else fail "deps" "install_deps.sh --check fails here: $(bash scripts/install_deps.sh --check 2>&1)"; fi
# cblas.h is there (the build just compiled), yet a BLAS library the linker cannot find must be reported
out=$(BLAS_LIB=picotron_no_such_blas bash scripts/install_deps.sh --check 2>&1); rc=$?
if [ $rc != 0 ] && echo "$out" | grep -q libopenblas-dev; then pass "deps: a missing BLAS library is found by linking, not by its header"
else fail "deps: missing library" "exit $rc: $out"; fi

# ---- fixtures: an initial mini model, a checkpoint ----
$RUN $MINI --steps 0 --export "$W/m0" >/dev/null 2>&1 || fail "fixture" "mini export failed"
$RUN $MINI --steps 2 --save "$W/ck" >/dev/null 2>&1 || fail "fixture" "mini checkpoint failed"
ckpt="$W/ck/$(cat "$W/ck/latest")"
# copy_model DIR: a copy of the initial mini model to break
copy_model() { rm -rf "$1"; cp -r "$W/m0" "$1"; }
# copy_ckpt DIR: a copy of the checkpoint root to break; echoes its step directory
copy_ckpt() { rm -rf "$1"; cp -r "$W/ck" "$1"; echo "$1/$(cat "$1/latest")"; }
# set_json FILE KEY VALUE: replace (or add) a top-level "KEY": VALUE line of our config.json
set_json() {
    if grep -q "^  \"$2\":" "$1"; then sed -i "s|^  \"$2\": .*|  \"$2\": $3,|" "$1"
    else sed -i "s|^{|{\n  \"$2\": $3,|" "$1"; fi
}

# ---- interop ----
copy_model "$W/lt"
sed -i '/"global_attn_every_n_layers"/d; s|^  "layer_types": .*|  "layer_types": ["sliding_attention", "full_attention"]|' "$W/lt/config.json"
set_json "$W/lt/config.json" local_attention 33
set_json "$W/lt/config.json" max_position_embeddings 1024
if $RUN --init-from "$W/lt" --data data/mini --steps 0 --export "$W/lt2" >/dev/null 2>&1 &&
   grep -q '"layer_types": \["sliding_attention", "full_attention"\]' "$W/lt2/config.json" &&
   grep -q '"local_attention": 33,' "$W/lt2/config.json" && grep -q '"max_position_embeddings": 1024,' "$W/lt2/config.json"; then
    pass "interop: an irregular layer_types, local_attention 33, max_position_embeddings 1024 load and export as read"
else fail "interop: layer_types" "refused, or not written back: $(grep -E 'layer_types|local_attention|max_position' "$W/lt2/config.json" 2>&1 | tr '\n' ' ')"; fi
# the unknown-word id survives an export: mini's (4091) is not ModernBERT's 50280, and a model
# whose [UNK] became an ordinary word would mask, count and predict it (another loss, another
# unigram baseline)
if $RUN $MINI --steps 1 --lr 0 --log "$W/unk_a.jsonl" >/dev/null 2>&1 &&
   $RUN --init-from "$W/m0" --data data/mini --seq-len 128 --micro-batch-tokens 256 --steps 1 --lr 0 --log "$W/unk_b.jsonl" >/dev/null 2>&1 &&
   grep -q '"unk_token_id": 4091,' "$W/m0/config.json" &&
   [ "$(grep -o '"loss": [^,]*, "unigram_loss": [^,]*' "$W/unk_a.jsonl")" = "$(grep -o '"loss": [^,]*, "unigram_loss": [^,]*' "$W/unk_b.jsonl")" ]; then
    pass "interop: unk_token_id is exported and read back: --init-from an exported mini gives --model mini's loss and unigram baseline"
else fail "interop: unk_token_id" "$(grep -o '"unk_token_id": [0-9]*' "$W/m0/config.json"); $(grep -o '"loss": [^,]*' "$W/unk_a.jsonl" "$W/unk_b.jsonl" | tr '\n' ' ')"; fi
# the pattern is applied per layer: the same weights under another pattern give another loss
# (local_attention 128 again, so that only the pattern differs)
set_json "$W/lt/config.json" local_attention 128
copy_model "$W/lt3"
sed -i 's|^  "layer_types": .*|  "layer_types": ["full_attention", "full_attention"]|' "$W/lt3/config.json"
loss_of() { $RUN --init-from "$1" --data data/mini --seq-len 128 --micro-batch-tokens 512 --steps 1 --lr 0 --log "$2" >/dev/null 2>&1 && grep -o '"loss": [^,]*' "$2" | awk '{print $2}'; }
a=$(loss_of "$W/lt" "$W/lt.jsonl"); b=$(loss_of "$W/lt3" "$W/lt3.jsonl")
if [ -n "$a" ] && [ -n "$b" ] && [ "$a" != "$b" ]; then pass "interop: layer_types is applied per layer (loss $a vs every-3 pattern $b)"
else fail "interop: layer_types applied" "losses '$a' and '$b'"; fi
bad "interop: layer_types of the wrong length" "layer_types" bash -c "cp -r '$W/m0' '$W/lt4' && sed -i 's|^  \"layer_types\": .*|  \"layer_types\": [\"full_attention\"]|' '$W/lt4/config.json' && $RUN --init-from '$W/lt4' --data data/mini --steps 1"
bad "interop: unknown layer type" "layer_types" bash -c "cp -r '$W/m0' '$W/lt5' && sed -i 's|\"sliding_attention\"|\"chunked_attention\"|' '$W/lt5/config.json' && $RUN --init-from '$W/lt5' --data data/mini --steps 1"

# --dump holds the whole global batch under any layout: the same file for 1 rank × grad-accum 2,
# dp 2, dp 2 with ZeRO-1 (ids and labels equal, loss 1e-5, gradients 1e-4 relative)
dump_run() {  # name ranks flags...
    local name=$1 ranks=$2; shift 2
    $MPIRUN -np "$ranks" $BIN $MINI --steps 1 "$@" --dump "$W/$name" --log "$W/$name.jsonl" >"$W/$name.out" 2>&1
}
if dump_run d_ref 1 --grad-accum 2; then
    if head -c 4000 "$W/d_ref/dump.safetensors" | grep -q '"input_ids":{"dtype":"I32","shape":\[2,256\]'; then
        pass "dump: 1 rank × grad-accum 2 holds both micro-batches (input_ids [2,256])"
    else fail "dump: shape" "$(head -c 400 "$W/d_ref/dump.safetensors" | tr -c '[:print:]' ' ')"; fi
    for layout in "2|--dp 2" "2|--dp 2 --zero 1"; do
        ranks=${layout%%|*}; flags=${layout#*|}
        name=d_$(echo "$flags" | tr -c 'a-z0-9' '_')
        if dump_run "$name" "$ranks" $flags; then
            if v=$(./tests/compare_runs "$W/d_ref.jsonl" "$W/$name.jsonl" "$W/d_ref/dump.safetensors" "$W/$name/dump.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
                pass "dump [$flags] equals 1 rank × grad-accum 2: $v"
            else fail "dump [$flags]" "$v"; fi
        else fail "dump [$flags]" "run failed: $(grep -m1 picotron: "$W/$name.out")"; fi
    done
else fail "dump" "reference run failed: $(grep -m1 picotron: "$W/d_ref.out")"; fi
bad "dump: a resumed run has no step 1" "--dump" $RUN $MINI --steps 3 --resume "$W/ck" --dump "$W/d_resume"

# ---- files: validated before use ----
copy_model "$W/cfgdir"; rm "$W/cfgdir/config.json"; mkdir "$W/cfgdir/config.json"
bad "files: config.json is a directory" "config.json: is a directory" $RUN --init-from "$W/cfgdir" --data data/mini --steps 1
copy_ckpt "$W/latestdir" >/dev/null; rm "$W/latestdir/latest"; mkdir "$W/latestdir/latest"
bad "files: latest is a directory" "latest: is a directory" $RUN $MINI --steps 3 --resume "$W/latestdir"
copy_ckpt "$W/latestbad" >/dev/null; echo "../../etc" > "$W/latestbad/latest"
bad "files: latest names no checkpoint" "latest must hold a checkpoint name" $RUN $MINI --steps 3 --resume "$W/latestbad"
copy_model "$W/huge"; set_json "$W/huge/config.json" hidden_size 65536; set_json "$W/huge/config.json" vocab_size 16000000
set_json "$W/huge/config.json" num_attention_heads 1024
bad "files: a config that needs terabytes" "needs about" $RUN --init-from "$W/huge" --data data/mini --steps 1
copy_model "$W/huge2"; set_json "$W/huge2/config.json" num_hidden_layers 1024; set_json "$W/huge2/config.json" intermediate_size 262144
sed -i "s|^  \"layer_types\": .*|  \"layer_types\": null|" "$W/huge2/config.json"
bad "files: a config with 1024 layers of 262144" "needs about" $RUN --init-from "$W/huge2" --data data/mini --steps 1
for v in '-3' 'abc' '99999999999999' '1e3' ''; do
    d=$(copy_ckpt "$W/meta"); ./tests/st_edit "$d/optimizer.safetensors" "$d/optimizer.safetensors" --meta "step=$v"
    bad "files: optimizer step metadata '$v'" "step" $RUN $MINI --steps 3 --resume "$W/meta"
done
for v in '-1' 'x' '5'; do  # 5 > step 2
    d=$(copy_ckpt "$W/meta"); ./tests/st_edit "$d/optimizer.safetensors" "$d/optimizer.safetensors" --meta "adam_step=$v"
    bad "files: adam_step metadata '$v'" "adam_step" $RUN $MINI --steps 3 --resume "$W/meta"
done
copy_model "$W/nan"; ./tests/st_edit "$W/nan/model.safetensors" "$W/nan/model.safetensors" --set model.layers.1.attn.Wo.weight 7 nan
bad "files: NaN in loaded weights" "non-finite" $RUN --init-from "$W/nan" --data data/mini --steps 1
copy_model "$W/inf"; ./tests/st_edit "$W/inf/model.safetensors" "$W/inf/model.safetensors" --set decoder.bias 3 inf
bad "files: inf in loaded weights" "non-finite" $RUN --init-from "$W/inf" --data data/mini --steps 1
d=$(copy_ckpt "$W/vnan"); ./tests/st_edit "$d/optimizer.safetensors" "$d/optimizer.safetensors" --set adam_v.head.norm.weight 0 nan
bad "files: NaN in the optimizer state" "non-finite" $RUN $MINI --steps 3 --resume "$W/vnan"
d=$(copy_ckpt "$W/vneg"); ./tests/st_edit "$d/optimizer.safetensors" "$d/optimizer.safetensors" --set adam_v.head.norm.weight 0 -1
bad "files: a negative second moment" "negative" $RUN $MINI --steps 3 --resume "$W/vneg"
for kv in "norm_eps 0.0" "norm_eps -1e-5" "global_rope_theta 0.0" "local_rope_theta -10.0" "initializer_cutoff_factor 0.0"; do
    set -- $kv
    copy_model "$W/range"; set_json "$W/range/config.json" "$1" "$2"
    bad "files: config $1 = $2" "$1" $RUN --init-from "$W/range" --data data/mini --steps 1
done
copy_model "$W/ropep"; sed -i 's|^{|{\n  "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 0.0}},|' "$W/ropep/config.json"
bad "files: rope_parameters theta 0" "rope_theta" $RUN --init-from "$W/ropep" --data data/mini --steps 1
copy_model "$W/layers"; set_json "$W/layers/config.json" num_hidden_layers 1
sed -i 's|^  "layer_types": .*|  "layer_types": ["full_attention"]|' "$W/layers/config.json"
bad "files: config says 1 layer, weights hold 2" "model.layers.1" $RUN --init-from "$W/layers" --data data/mini --steps 1
copy_model "$W/ids"; set_json "$W/ids/config.json" pad_token_id 4095
bad "files: pad and mask ids equal" "must differ" $RUN --init-from "$W/ids" --data data/mini --steps 1
copy_model "$W/missing"; ./tests/st_edit "$W/missing/model.safetensors" "$W/missing/model.safetensors" --drop head.norm.weight
bad "files: a missing tensor" "missing tensor head.norm.weight" $RUN --init-from "$W/missing" --data data/mini --steps 1
# a shard of nothing but [CLS] and [SEP] (ids 4092, 4093 of mini; vocab 4096): nothing can be masked
printf 'PICOTOK1\x01\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\xfc\x0f\xfd\x0f\xfc\x0f\xfd\x0f' > "$W/special.bin"
bad "files: a shard with nothing maskable" "nothing to train on" $RUN --model mini --data "$W/special.bin" --steps 1
bad "files: data prepared for another model's vocabulary" "holds no" $RUN --model tiny --data data/mini --steps 1
bad "files: ... and the other way round" "vocabulary" $RUN --model mini --data data/default --steps 1
mkdir -p "$W/bin_text"; cp "$BIN" "$W/bin_text/program"
bad "files: --prepare-text on a binary file" "not a text file" $RUN --model mini --prepare-text "$W/bin_text" --data "$W/bin_data"
head -c 3000 /dev/urandom | tr -d '\000' > "$W/bin_text/noise"; rm "$W/bin_text/program"
bad "files: --prepare-text on random bytes" "not a text file" $RUN --model mini --prepare-text "$W/bin_text" --data "$W/bin_data"
mkdir -p "$W/vocabdir/vocab.txt"
bad "files: --predict with a vocab that is a directory" "directory" $RUN --init-from "$W/m0" --data "$W/vocabdir" --predict "a [MASK] ."
mkdir -p "$W/vocabempty"; : > "$W/vocabempty/vocab.txt"
bad "files: --predict with an empty vocab" "empty" $RUN --init-from "$W/m0" --data "$W/vocabempty" --predict "a [MASK] ."
bad "files: --predict with --resume" "--predict reads its model from --init-from" $RUN $MINI --resume "$W/ck" --predict "a [MASK] ."
bad "files: --predict with tiny's vocabulary on mini" "special ids" $RUN --init-from "$W/m0" --data data/default --predict "a [MASK] ."

# ---- outputs: checked before step 1 ----
: > "$W/a_file"
bad "outputs: --save onto a file" "exists and is not a directory" $RUN $MINI --steps 1 --save "$W/a_file"
bad "outputs: --save under a file" "cannot create" $RUN $MINI --steps 1 --save "$W/a_file/sub"
bad "outputs: --export onto a file" "exists and is not a directory" $RUN $MINI --steps 1 --export "$W/a_file"
bad "outputs: --trace onto a file" "exists and is not a directory" $RUN $MINI --steps 1 --trace "$W/a_file"
bad "outputs: --dump onto a file" "exists and is not a directory" $RUN $MINI --steps 1 --dump "$W/a_file"
bad "outputs: --log onto a directory" "--log" $RUN $MINI --steps 1 --log "$W"
bad "outputs: --log in a missing directory" "--log" $RUN $MINI --steps 1 --log "$W/no/such/dir/log.jsonl"
bad "outputs: --save into another run's checkpoints" "already holds another run" $RUN $MINI --steps 1 --save "$W/ck"
bad "outputs: --save into another run's, resuming a third" "already holds another run" \
    bash -c "cp -r '$W/ck' '$W/ck_other' && $RUN $MINI --steps 3 --resume '$W/ck' --save '$W/ck_other'"
bad "outputs: --export into a checkpoint" "checkpoint directory" $RUN $MINI --steps 1 --export "$ckpt"
bad "outputs: --export into a checkpoint root" "checkpoint directory" $RUN $MINI --steps 1 --export "$W/ck"
bad "outputs: --export and --save the same" "same directory" $RUN $MINI --steps 1 --save "$W/same" --export "$W/same"
bad "outputs: checked on a 2-rank run too" "exists and is not a directory" $MPIRUN -np 2 $BIN --dp 2 $MINI --steps 1 --export "$W/a_file"

# ---- no damage ----
rm -rf "$W/ds"; cp -r data/mini "$W/ds"; cp -r data/mini "$W/ds_orig"
mkdir -p "$W/mixed"; echo "some text that is fine to read, some text" > "$W/mixed/a.txt"; cp "$BIN" "$W/mixed/b.bin"
bad "no damage: --prepare-text failing on a binary file" "not a text file" $RUN --model mini --prepare-text "$W/mixed" --data "$W/ds"
if diff -r "$W/ds" "$W/ds_orig" >/dev/null; then pass "no damage: the dataset is unchanged after the failed --prepare-text"
else fail "no damage: dataset" "$(diff -rq "$W/ds" "$W/ds_orig" | head -3 | tr '\n' ' ')"; fi
d=$(copy_ckpt "$W/swapped"); cp "$W/m0/model.safetensors" "$d/model.safetensors"
bad "no damage: a checkpoint whose model was replaced" "checksum" $RUN $MINI --steps 3 --resume "$W/swapped"

# ---- resume: the checkpoint's architecture ----
# trained from --init-from (mini) and resumed with no model flag (the default is tiny): follows the
# straight run bit for bit
$RUN --init-from "$W/m0" --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2 --steps 4 \
     --log "$W/straight.jsonl" --export "$W/straight" >/dev/null 2>&1 &&
$RUN --init-from "$W/m0" --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2 --steps 2 \
     --save "$W/ck_init" --log "$W/resumed.jsonl" >/dev/null 2>&1 &&
$RUN --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2 --steps 4 \
     --resume "$W/ck_init" --log "$W/resumed.jsonl" --export "$W/resumed" >/dev/null 2>&1
if [ $? != 0 ]; then fail "resume: checkpoint from --init-from" "a run failed"
elif v=$(./tests/compare_runs "$W/straight.jsonl" "$W/resumed.jsonl" "$W/straight/model.safetensors" "$W/resumed/model.safetensors" --loss-rel 0 --weight-rel 0); then
    pass "resume: a checkpoint trained from --init-from resumes its own architecture, bit for bit: $v"
else fail "resume: checkpoint from --init-from" "$v"; fi
bad "resume: --model contradicting the checkpoint" "another architecture" $RUN --model tiny --data data/mini --steps 4 --resume "$W/ck_init"
bad "resume: --init-from contradicting the checkpoint" "another architecture" $RUN --init-from "$W/lt3" --data data/mini --steps 4 --resume "$W/ck_init"

# ---- tensor and pipeline parallel: bad layouts refused on every rank; --predict and --export as on one rank ----
# h2: mini's shape with 2 heads (tiny's 4 and mini's 1 do not fit tp 2 and 3 alike), H 128, I 192,
# and V 4097, which tp 2 pads to 2 × 2049 vocabulary rows; h2i the same with intermediate_size 191
h2_config() {  # DIR I: mini's exported config.json with 2 heads, H 128, V 4097 and intermediate_size I
    mkdir -p "$1" && sed "s/\"vocab_size\": .*/\"vocab_size\": 4097,/; s/\"hidden_size\": .*/\"hidden_size\": 128,/;
        s/\"num_attention_heads\": .*/\"num_attention_heads\": 2,/; s/\"intermediate_size\": .*/\"intermediate_size\": $2,/" \
        "$W/m0/config.json" > "$1/config.json" && ./tests/make_model "$1" > /dev/null
}
h2_config "$W/h2" 192 || fail "tp fixture" "make_model h2 failed"
h2_config "$W/h2i" 191 || fail "tp fixture" "make_model h2i failed"
H2="--init-from $W/h2 --data data/mini --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2"
bad "tp: --tp 3 on tiny's 4 heads (3 ranks)" "--tp 3 does not divide the model's 4 attention heads" $MPIRUN -np 3 $BIN --tp 3 $TINY --steps 1
bad "tp: --tp 2 on intermediate_size 191 (2 ranks)" "--tp 2 does not divide the model's intermediate_size 191" \
    $MPIRUN -np 2 $BIN --tp 2 --init-from "$W/h2i" --data data/mini --steps 1
bad "tp: --sp with --micro-batch-tokens 255 over --tp 2" "--sp: --micro-batch-tokens 255 is not divisible by --tp 2" \
    $MPIRUN -np 2 $BIN --tp 2 --sp --init-from "$W/h2" --data data/mini --seq-len 128 --micro-batch-tokens 255 --steps 1
bad "tp: --sp without --tp (dp 2)" "--sp cuts token rows over the tensor-parallel ranks: it needs --tp > 1" \
    $MPIRUN -np 2 $BIN --dp 2 --sp $MINI --steps 1
bad "tp: layout tp 2 on 3 ranks" "layout dp 1 × pp 1 × cp 1 × tp 2 = 2 ranks, but mpirun started 3" $MPIRUN -np 3 $BIN --tp 2 $H2 --steps 1
bad "tp: --predict with --dp 2" "--predict runs on one model replica: --tp and --pp, but not --dp" \
    $MPIRUN -np 2 $BIN --dp 2 --init-from "$W/h2" --data data/mini --predict "the [MASK] of"
bad "tp: --predict with --dp 2 --tp 2 (4 ranks)" "--predict runs on one model replica: --tp and --pp, but not --dp" \
    $MPIRUN -np 4 $BIN --dp 2 --tp 2 --init-from "$W/h2" --data data/mini --predict "the [MASK] of"
# pipeline parallel: a stage needs a layer (mini and h2 have 2), the schedule is named, --predict
# runs on one replica
bad "pp: --pp 3 on mini's 2 layers (3 ranks)" "--pp 3 is more than the model's 2 layers (a stage needs at least one)" \
    $MPIRUN -np 3 $BIN --pp 3 $MINI --steps 1
bad "pp: unknown --pp-schedule (2 ranks)" "--pp-schedule must be afab or 1f1b, got 'gpipe'" \
    $MPIRUN -np 2 $BIN --pp 2 --pp-schedule gpipe $MINI --steps 1
bad "pp: --predict with --dp 2 --pp 2 (4 ranks)" "--predict runs on one model replica: --tp and --pp, but not --dp" \
    $MPIRUN -np 4 $BIN --dp 2 --pp 2 --init-from "$W/h2" --data data/mini --predict "the [MASK] of"
# context parallel: equal shards, and tp's equal slices of a shard with --sp; --predict on one replica
bad "cp: --micro-batch-tokens 255 over --cp 2" "--cp: --micro-batch-tokens 255 is not divisible by --cp 2" \
    $MPIRUN -np 2 $BIN --cp 2 --model mini --data data/mini --seq-len 128 --micro-batch-tokens 255 --steps 1
bad "cp: --sp with shards of 129 tokens over --tp 2 (4 ranks)" \
    "--sp: a --cp shard of 129 tokens (--micro-batch-tokens 258 / --cp 2) is not divisible by --tp 2" \
    $MPIRUN -np 4 $BIN --cp 2 --tp 2 --sp --init-from "$W/h2" --data data/mini --seq-len 128 --micro-batch-tokens 258 --steps 1
bad "cp: --predict with --cp 2" "--predict runs on one model replica: --tp and --pp, but not --dp or --cp" \
    $MPIRUN -np 2 $BIN --cp 2 --init-from "$W/h2" --data data/mini --predict "the [MASK] of"
if ./picotron_cpu --help 2>&1 | grep -A2 -- "^  --sp " | grep -q -- "needs --tp > 1"; then pass "tp: --help says --sp needs --tp > 1"
else fail "tp: --help" "no '--sp … needs --tp > 1' in --help"; fi
# --export under tp 2 --sp after 2 steps: the 1-rank run's losses (1e-5) and export (weights 1e-4,
# the same config.json): every shard, the padded vocabulary's rows included, goes back in its place
if $RUN $H2 --steps 2 --log "$W/tp1.jsonl" --export "$W/tp1" > /dev/null 2>&1 &&
   $MPIRUN -np 2 $BIN --tp 2 --sp $H2 --steps 2 --log "$W/tp2.jsonl" --export "$W/tp2" > "$W/tp2.out" 2>&1; then
    if ! v=$(./tests/compare_runs "$W/tp1.jsonl" "$W/tp2.jsonl" "$W/tp1/model.safetensors" "$W/tp2/model.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
        fail "tp: --export under tp 2 --sp" "$v"
    elif ! d=$(diff "$W/tp1/config.json" "$W/tp2/config.json"); then fail "tp: --export under tp 2 --sp" "config.json differs: $d"
    else pass "tp: --export under tp 2 --sp after 2 steps equals the 1-rank export, config.json identical: $v"; fi
else fail "tp: --export under tp 2 --sp" "a run failed: $(grep -m1 picotron: "$W/tp2.out")"; fi
# --predict under tp 2 (and with --sp, which --predict runs without): rank 0 assembles the logits
# from both vocabulary shards. Decoder biases raised on the last id of rank 0's shard (2048,
# "experiment"), the first of rank 1's (2049, "federal") and the last real id (4096, no word:
# "[UNK]") make the top three known; every top-5 line (words, percentages) must be the 1-rank run's.
rm -rf "$W/tpp"; mkdir -p "$W/tpp"; cp "$W/tp1/config.json" "$W/tpp/"
./tests/st_edit "$W/tp1/model.safetensors" "$W/tpp/model.safetensors" --set decoder.bias 2048 7.5 --set decoder.bias 2049 7 --set decoder.bias 4096 8 > /dev/null
P=(--init-from "$W/tpp" --data data/mini --predict "the [MASK] of" --predict "a [MASK] [MASK] .")
$RUN "${P[@]}" > "$W/p1.out" 2>&1
if [ "$(grep -c '^  \[MASK\] #[0-9]*:  \[UNK\] ([0-9.]*%)  experiment ([0-9.]*%)  federal ([0-9.]*%)' "$W/p1.out")" != 3 ]; then
    fail "tp: --predict reference" "the raised biases are not the 1-rank top three: $(tr '\n' '|' < "$W/p1.out")"
else
    for flags in "--tp 2" "--tp 2 --sp"; do
        if $MPIRUN -np 2 $BIN $flags "${P[@]}" > "$W/p2.out" 2>&1 && d=$(diff "$W/p1.out" "$W/p2.out"); then
            pass "tp: --predict under $flags prints the 1-rank top-5 lines ($(grep -m1 '#1:' "$W/p1.out" | cut -c 15-))"
        else fail "tp: --predict under $flags" "differs from 1 rank: $(diff "$W/p1.out" "$W/p2.out" | tr '\n' '|')"; fi
    done
    # pp: the last stage prints, from the activation the stages passed on. The lines see stage 0's
    # layer: two weights of layer 0 changed by ±30 change them ([UNK] 20.3% → 20.1%), so a pipeline that
    # skipped or garbled a stage would not print the 1-rank lines.
    rm -rf "$W/tpq"; mkdir -p "$W/tpq"; cp "$W/tpp/config.json" "$W/tpq/"
    ./tests/st_edit "$W/tpp/model.safetensors" "$W/tpq/model.safetensors" --set model.layers.0.mlp.Wo.weight 0 30 \
        --set model.layers.0.mlp.Wo.weight 1 -30 > /dev/null
    if $RUN --init-from "$W/tpq" "${P[@]:2}" > "$W/pq.out" 2>&1 && ! diff -q "$W/p1.out" "$W/pq.out" > /dev/null; then
        for layout in "2|--pp 2" "4|--pp 2 --tp 2"; do
            ranks=${layout%%|*}; flags=${layout#*|}
            if $MPIRUN -np "$ranks" $BIN $flags "${P[@]}" > "$W/p3.out" 2>&1 && diff -q "$W/p1.out" "$W/p3.out" > /dev/null; then
                pass "pp: --predict under $flags ($ranks ranks) prints the 1-rank top-5 lines (a changed layer-0 weight changes them)"
            else fail "pp: --predict under $flags" "differs from 1 rank: $(diff "$W/p1.out" "$W/p3.out" | tr '\n' '|')"; fi
        done
    else fail "pp: --predict" "a changed layer-0 weight leaves the 1-rank lines as they were: the check could not fail"; fi
fi
# --export under pp 2 (1f1b, grad-accum 2) after 2 steps: the 1-rank grad-accum 2 run's losses
# (1e-5) and export (weights 1e-4, the same config.json): each stage's layers go back in their
# place, the tied embedding once
if $RUN $H2 --steps 2 --grad-accum 2 --log "$W/pp1.jsonl" --export "$W/pp1" > /dev/null 2>&1 &&
   $MPIRUN -np 2 $BIN --pp 2 $H2 --steps 2 --grad-accum 2 --log "$W/pp2.jsonl" --export "$W/pp2" > "$W/pp2.out" 2>&1; then
    if ! v=$(./tests/compare_runs "$W/pp1.jsonl" "$W/pp2.jsonl" "$W/pp1/model.safetensors" "$W/pp2/model.safetensors" --loss-rel 1e-5 --weight-rel 1e-4); then
        fail "pp: --export under pp 2" "$v"
    elif ! d=$(diff "$W/pp1/config.json" "$W/pp2/config.json"); then fail "pp: --export under pp 2" "config.json differs: $d"
    else pass "pp: --export under pp 2 (grad-accum 2) after 2 steps equals the 1-rank export, config.json identical: $v"; fi
else fail "pp: --export under pp 2" "a run failed: $(grep -m1 picotron: "$W/pp2.out")"; fi

# ---- diverged ----
# weight decay 1 at lr 10 multiplies every matrix by −9 a step: the weights overflow within ~40 steps
out=$(timeout 120 $MPIRUN -np 2 $BIN --dp 2 $MINI --lr 10 --weight-decay 1 --warmup 0 --steps 200 --save "$W/div" --save-every 1 2>&1); rc=$?
if [ $rc = 0 ]; then fail "diverged: --lr 10" "the run ended normally"
elif [ $rc = 124 ]; then fail "diverged: --lr 10" "hung"
elif ! echo "$out" | grep -q "^picotron: rank 0: .*diverged" || ! echo "$out" | grep -q "^picotron: rank 1: .*diverged"; then
    fail "diverged: --lr 10" "no 'diverged' line from both ranks: $(echo "$out" | grep picotron: | head -3 | tr '\n' '|')"
elif [ ! -f "$W/div/latest" ]; then fail "diverged: --lr 10" "no checkpoint at all (diverged at step 1?)"
elif ! $RUN $MINI --steps 0 --resume "$W/div" >/dev/null 2>"$W/div.err"; then
    fail "diverged: latest checkpoint" "latest is not a loadable finite checkpoint: $(head -1 "$W/div.err")"
else pass "diverged: --lr 10 stops both ranks with a line each; latest ($(cat "$W/div/latest")) holds finite weights"; fi

# ---- step line: GFLOP/s without a known peak, MFU with one ----
$RUN $MINI --steps 1 --log "$W/speed.jsonl" > "$W/speed.out" 2>&1
$RUN $MINI --steps 1 --peak-tflops 1 > "$W/peak.out" 2>&1
if grep -q "^step .*GFLOP/s" "$W/speed.out" && ! grep -q "MFU" "$W/speed.out" && grep -q '"mfu": null' "$W/speed.jsonl" &&
   grep -q "^step .*MFU" "$W/peak.out" && grep -q "unigram baseline" "$W/speed.out"; then
    pass "step line: GFLOP/s and no MFU without a peak, MFU with --peak-tflops; unigram baseline printed"
else fail "step line" "$(grep -h '^step' "$W/speed.out" "$W/peak.out" | tr '\n' '|')"; fi

summary
