# Sourced by the test scripts: run from the repository root, mpirun as root with more ranks than
# cores and one BLAS thread per rank, a scratch folder removed on exit, PASS/FAIL counting.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=1
MPIRUN="mpirun --oversubscribe -x OPENBLAS_NUM_THREADS=1"
WORK=$(mktemp -d /tmp/picotron-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TINY="--model tiny --data data/default --seq-len 128 --micro-batch-tokens 256 --lr 2e-3 --warmup 2"
passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
# The closing line every suite ends with; the exit status says whether anything failed.
summary() {
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
}
# make_s4 DIR: the small model of the 8- and 16-rank context-parallel tests: mini's config with
# H 128, 2 heads, L 4 (global, local, local, global: each pp 2 stage has both kinds), V 4096
# (data/mini), initialised by tests/make_model. Exit non-zero if any step fails.
make_s4() {
    local dir=$1 types='"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]'
    $MPIRUN -np 1 ./picotron_cpu --model mini --data data/mini --steps 0 --export "$dir" > "$dir.out" 2>&1 &&
    sed -i -e 's/"hidden_size": 64,/"hidden_size": 128,/' -e 's/"num_attention_heads": 1,/"num_attention_heads": 2,/' \
           -e 's/"num_hidden_layers": 2,/"num_hidden_layers": 4,/' -e "s/\"layer_types\": \[[^]]*\]/$types/" "$dir/config.json" &&
    [ "$(grep -c '"hidden_size": 128,\|"num_attention_heads": 2,\|"num_hidden_layers": 4,' "$dir/config.json")" = 3 ] &&
    grep -qF "$types" "$dir/config.json" && ./tests/make_model "$dir" >> "$dir.out" 2>&1
}
