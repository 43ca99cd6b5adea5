#!/usr/bin/env bash
# Static checks of the GPU build, no GPU needed (make test runs this where nvcc exists):
#   - ptxas (-Xptxas -v) reports no register spills in any kernel;
#   - cuobjdump lists every __global__ kernel of kernels.cuh in the sm_90 code;
#   - a table per kernel: registers, static shared memory, local memory (bytes), spilled bytes and
#     tensor-core instructions (HMMA, HGMMA, IMMA in the SASS);
#   - the tensor-core kernels (flash attention forward and backward) have HMMA instructions in their SASS,
#     and LDGSTS (cp.async: their double-buffered tile loads).
# cuobjdump comes from PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm; scripts/install_deps.sh
# installs them when nvcc exists) since this toolkit lacks it. Ends with "N passed, M failed".
source "$(dirname "$0")/common.sh"

if ! command -v nvcc >/dev/null; then
    echo "no nvcc: nothing to check"
    summary
    exit
fi
pip_bin=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin"))' 2>/dev/null)
PATH="$PATH:${pip_bin:-/nonexistent}"
if ! command -v cuobjdump >/dev/null; then
    fail "static GPU checks" "no cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    summary
    exit
fi

# Device code only (no host compile): the same flags as the Makefile's GPU build, on tests/test_gpu.cu,
# which calls every op of kernels.cuh in every type it offers (fp32 and bf16 outputs), so every kernel
# the trainer can instantiate is compiled (picotron.cu itself has no kernels).
cubin="$WORK/test_gpu.cubin"
if ! nvcc -std=c++17 -O2 -arch=sm_90 --cubin -DOMPI_SKIP_MPICXX $(mpicxx --showme:compile) -Xptxas -v -I. \
     -x cu tests/test_gpu.cu -o "$cubin" 2> "$WORK/ptxas.log"; then
    fail "static GPU checks" "nvcc --cubin failed: $(tail -3 "$WORK/ptxas.log")"
    summary
    exit
fi

# ptxas: "Function properties for F" then "N bytes stack frame, S bytes spill stores, L bytes spill loads"
awk '/Function properties for/ {f = $NF} /spill stores/ {print f, $5 + $9}' "$WORK/ptxas.log" > "$WORK/spills"
spilling=$(awk '$2 > 0 {print $1}' "$WORK/spills" | c++filt | tr '\n' ' ')
if [ ! -s "$WORK/spills" ]; then fail "no spills" "ptxas -v printed no function properties"
elif [ -n "$spilling" ]; then fail "no spills" "kernels that spill: $spilling"
else pass "no kernel spills registers ($(wc -l < "$WORK/spills") kernels, ptxas -v)"; fi

# cuobjdump: resource usage and SASS per function
cuobjdump --dump-resource-usage "$cubin" > "$WORK/usage" 2>&1
cuobjdump --dump-sass "$cubin" > "$WORK/sass" 2>&1
awk '/Function :/ {f = $NF} /HMMA|HGMMA|IMMA/ {n[f]++} /Function :/ {if (!(f in n)) n[f] = 0}
     END {for (f in n) print f, n[f]}' "$WORK/sass" | sort > "$WORK/tensor"
missing=""
for k in $(grep -o '__global__ void [a-z_0-9]*' kernels.cuh | awk '{print $3}' | sort -u); do
    grep -q "$k" "$WORK/tensor" || missing+=" $k"
done
n_kernels=$(wc -l < "$WORK/tensor")
if [ "$n_kernels" = 0 ]; then fail "kernel list" "cuobjdump --dump-sass listed no function"
elif [ -n "$missing" ]; then fail "kernel list" "kernels.cuh kernels missing from the SASS:$missing"
else pass "cuobjdump lists every __global__ kernel of kernels.cuh ($n_kernels functions in the sm_90 code)"; fi

# The tensor-core kernels must use the tensor cores: mma.sync compiles to HMMA (flash attention)
tc_missing=""
for k in flash_attention_forward_kernel flash_attention_backward_dq_kernel flash_attention_backward_dkv_kernel; do
    n=$(awk -v k="$k" 'index($1, k) {print $2}' "$WORK/tensor" | head -n 1)
    [ "${n:-0}" -gt 0 ] || tc_missing+=" $k (${n:-absent})"
done
if [ -z "$tc_missing" ]; then pass "tensor-core instructions (HMMA) in the SASS of the flash attention kernels (forward, backward dq, backward dk/dv)"
else fail "tensor cores" "no HMMA in:$tc_missing"; fi

# ... and double-buffer their loads: cp.async compiles to LDGSTS (global → shared, no registers)
async_missing=""
for k in flash_attention_forward_kernel flash_attention_backward_dq_kernel flash_attention_backward_dkv_kernel; do
    n=$(awk -v k="$k" '/Function :/ {f = $NF} index(f, k) && /LDGSTS/ {n++} END {print n + 0}' "$WORK/sass")
    [ "$n" -gt 0 ] || async_missing+=" $k"
done
if [ -z "$async_missing" ]; then pass "cp.async (LDGSTS) in the SASS of the flash attention kernels: the next tile loads while one is computed"
else fail "cp.async" "no LDGSTS in:$async_missing"; fi

# The table, by demangled name (markdown rows, so that run_tests.sh shows them)
printf '| %-50s | %4s | %6s | %5s | %6s | %6s |\n' kernel regs shared local spills tensor
awk '/Function [^:]/ {sub(":", "", $2); f = $2} /REG:/ {for (i = 1; i <= NF; i++) {split($i, kv, ":"); v[kv[1]] = kv[2]}
     print f, v["REG"], v["SHARED"], v["LOCAL"]}' "$WORK/usage" | sort > "$WORK/res"
join "$WORK/res" <(sort "$WORK/spills") | join - "$WORK/tensor" | while read -r f regs shared local spills tc; do
    name=$(echo "$f" | c++filt | sed 's/(.*//; s/^void //; s/cuda:://g')
    printf '| %-50.50s | %4s | %6s | %5s | %6s | %6s |\n' "$name" "$regs" "$shared" "$local" "$spills" "$tc"
done
summary
