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
