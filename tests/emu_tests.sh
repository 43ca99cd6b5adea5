#!/usr/bin/env bash
# make test-emu: the emulator's self-tests and every CUDA kernel against its reference
# (tests/test_gpu.cu built by g++ under tests/cuda_emu.h), each in the three thread orders, then
# both once under AddressSanitizer; then picotron_emu (the trainer's GPU build) against picotron_cpu.
# The random order's seed is PICOTRON_EMU_SEED if set, else a fresh one, printed so that a failure
# can be replayed. Last line: the total "N passed, M failed".
cd "$(dirname "$0")/.."
seed=${PICOTRON_EMU_SEED:-$RANDOM}
digests=$(mktemp -d)
trap 'rm -rf "$digests"' EXIT
passed=0
failed=0
run() {  # program, thread order
    local prog=$1 order=$2 start=$SECONDS out rc line p f
    echo "== $prog, $order order$([ "$order" = random ] && echo ", PICOTRON_EMU_SEED=$seed")"
    out=$(PICOTRON_EMU_ORDER=$order PICOTRON_EMU_SEED=$seed PICOTRON_DIGEST="$digests/$(basename "$prog").$order" \
          ASAN_OPTIONS=detect_leaks=0 timeout 900 "$prog" 2>&1)
    rc=$?
    echo "$out" | grep -E '^FAIL|^cuda_emu' || true
    line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $prog ($order): no summary line (exit $rc): $(echo "$out" | tail -n 3)"
        failed=$((failed + 1))
        return
    fi
    p=${line%% passed*}
    f=${line#*, }; f=${f%% failed*}
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        echo "FAIL $prog ($order): exit $rc with no failed check"
        failed=$((failed + 1))
    fi
    echo "$prog ($order): $line in $((SECONDS - start)) s"
}
for prog in tests/test_emu tests/test_gpu_emu; do
    for order in forward reverse random; do run $prog $order; done
done
# once more under AddressSanitizer: out-of-bounds indexing, use after free (test_emu_asan's
# self-tests include a kernel that reads one past the end of its buffer)
run tests/test_emu_asan forward
run tests/test_gpu_emu_asan forward
# picotron.cu's GPU build under the emulator trains like picotron_cpu (tests/emu_trainer.sh)
echo "== bash tests/emu_trainer.sh"
out=$(timeout 900 bash tests/emu_trainer.sh 2>&1)
echo "$out" | grep -E '^(PASS|FAIL)' || true
line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
if [ -z "$line" ]; then echo "FAIL tests/emu_trainer.sh: no summary line: $(echo "$out" | tail -n 3)"; failed=$((failed + 1))
else p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}; passed=$((passed + p)); failed=$((failed + f)); fi

# Every kernel's checked outputs, hashed per check, are the same bits in the three orders.
d="$digests/test_gpu_emu"
if [ -s "$d.forward" ] && cmp -s "$d.forward" "$d.reverse" && cmp -s "$d.forward" "$d.random"; then
    echo "PASS every checked kernel output is bit-identical in the three thread orders ($(wc -l < "$d.forward") outputs)"
    passed=$((passed + 1))
else
    echo "FAIL kernel outputs differ between thread orders: $(diff "$d.forward" "$d.reverse" | head -n 2 | tr '\n' ' ')"
    failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
