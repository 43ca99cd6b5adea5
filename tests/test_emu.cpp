// tests/test_emu.cpp — the CUDA emulator (tests/cuda_emu.h) catches what it claims to catch.
//
// Positive checks run in this process, in whatever thread order PICOTRON_EMU_ORDER gives: a block
// reduction with its barriers is right, shuffles, votes and atomics give CUDA's values, the _rn
// intrinsics are not fused, fresh memory is poison, the runtime refuses bad copies and launches.
// Negative checks run this program again as a child (`test_emu --case NAME`) with a chosen order and
// look at its exit status and stderr: a reduction missing a barrier is wrong in some order, and a
// divergent barrier, a missed barrier, a shuffle naming an exited lane, a deadlock, divergent
// shuffles and a host
// pointer passed to a kernel end the child with an error naming the kernel.
// Prints "PASS name" / "FAIL name: …" per check and ends with "N passed, M failed"; exit 1 on failure.
//
//   g++ -std=c++17 -O2 -ffp-contract=off -DPICOTRON_EMULATE -I. tests/test_emu.cpp -o tests/test_emu
#include "tests/cuda_emu.h"

#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static int n_passed = 0, n_failed = 0;
static void record(bool ok, const std::string& name, const std::string& detail = "") {
    (ok ? n_passed : n_failed)++;
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    fflush(stdout);
}

template <typename T>
static T* device_array(size_t n) {
    T* p = nullptr;
    if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) {
        fprintf(stderr, "test_emu: cudaMalloc failed\n");
        exit(1);
    }
    return p;
}

// ---- kernels ----
constexpr int THREADS = 256, WARPS = THREADS / 32;

// out[block] = Σ over the block's threads of (block · 1000 + thread): warp butterflies, then warp 0
// adds the warp partials. with_barrier = false drops the barrier between writing and reading them.
__global__ void block_sum_kernel(float* out, bool with_barrier) {
    __shared__ float partial[WARPS];
    float v = (float)(blockIdx.x * 1000 + threadIdx.x);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    if (with_barrier) __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < WARPS; w++) total += partial[w];
        out[blockIdx.x] = total;
    }
}
static float block_sum_want(int block) {
    return (float)(THREADS * block * 1000 + THREADS * (THREADS - 1) / 2);
}

// One warp; each lane writes what it got from every collective: out[lane · 16 + k].
__global__ void collectives_kernel(unsigned* out) {
    const int lane = threadIdx.x;
    unsigned* o = out + lane * 16;
    o[0] = __shfl_sync(0xffffffffu, lane * 10, 7);                      // broadcast lane 7
    o[1] = __shfl_sync(0xffffffffu, lane * 10, (lane * 5) % 32);        // a different source per lane
    o[2] = __shfl_sync(0xffffffffu, lane * 10, lane + 3, 8);            // source modulo the width
    o[3] = __shfl_up_sync(0xffffffffu, lane * 10, 3, 16);               // own value below the delta
    o[4] = __shfl_down_sync(0xffffffffu, lane * 10, 5);                 // own value past the end
    o[5] = __shfl_xor_sync(0xffffffffu, lane * 10, 6);
    o[6] = __shfl_xor_sync(0xffffffffu, lane * 10, 8, 8);               // a later segment gives the own value
    o[7] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    o[8] = __any_sync(0xffffffffu, lane == 17);
    o[9] = __all_sync(0xffffffffu, lane < 31);
    o[10] = __all_sync(0xffffffffu, lane < 32);
    double d = __shfl_sync(0xffffffffu, lane + 0.5, 31 - lane);        // 8-byte values move whole
    o[11] = (unsigned)(d * 2);
    if (lane < 16) o[12] = __shfl_sync(0x0000ffffu, lane * 10, 15 - lane);  // a half-warp mask
    else o[12] = __shfl_sync(0xffff0000u, lane * 10, 47 - lane);            // (both pending at once)
    __syncwarp();
}
static unsigned collectives_want(int lane, int k) {
    auto seg = [](int l, int w) { return l / w * w; };
    switch (k) {
        case 0: return 70;
        case 1: return (lane * 5) % 32 * 10;
        case 2: return (seg(lane, 8) + (lane + 3) % 8) * 10;
        case 3: return (lane % 16 >= 3 ? lane - 3 : lane) * 10;
        case 4: return (lane + 5 < 32 ? lane + 5 : lane) * 10;
        case 5: return (lane ^ 6) * 10;
        case 6: return (lane & 8 ? lane ^ 8 : lane) * 10;  // lanes 8-15 of each 16 read the earlier segment
        case 7: return 0x49249249u;  // lanes 0, 3, 6, …, 30
        case 8: return 1;
        case 9: return 0;
        case 10: return 1;
        case 11: return (unsigned)((31 - lane + 0.5) * 2);
        case 12: return (lane < 16 ? 15 - lane : 47 - lane) * 10;
    }
    return 0;
}

__global__ void atomics_kernel(int* counter, int* maximum) {
    atomicAdd(counter, 1);
    atomicMax(maximum, (int)(blockIdx.x * blockDim.x + threadIdx.x));
}

// out[2 · block + 0]: the bits of a shared word read before any write in this block; + 1: the same
// word after thread 0 wrote it
__global__ void shared_poison_kernel(uint32_t* out) {
    __shared__ uint32_t word;
    if (threadIdx.x == 0) out[2 * blockIdx.x] = word;
    __syncthreads();
    if (threadIdx.x == 0) word = 12345;
    __syncthreads();
    if (threadIdx.x == 1) out[2 * blockIdx.x + 1] = word;
}

// ---- the failing cases (run in a child) ----
// reads one element past the end of its 64-int buffer: the ASan build must stop it
__global__ void out_of_bounds_kernel(const int* d, int* out) {
    out[threadIdx.x] = d[threadIdx.x + 1];
}
__global__ void divergent_barrier_kernel() {
    if (threadIdx.x < 32) __syncthreads();
    else __syncthreads();
}
__global__ void missed_barrier_kernel() {
    if (threadIdx.x >= 32) return;
    __syncthreads();
}
__global__ void shuffle_exited_lane_kernel(int* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}
__global__ void deadlock_kernel(int* out) {
    if (threadIdx.x == 5) __syncthreads();
    else out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 5);
}
__global__ void divergent_shuffle_kernel(int* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
    else out[threadIdx.x] = __shfl_sync(0xffffffffu, 2, 0);
}
__global__ void host_pointer_kernel(int* out) { out[threadIdx.x] = 1; }

// One failing case, in the child: returns normally only if the emulator missed the error.
static int run_case(const std::string& name) {
    if (name == "block_sum_no_barrier") {  // prints the sums; the parent judges them
        const int blocks = 3;
        float* d_out = device_array<float>(blocks);
        EMU_LAUNCH(block_sum_kernel, blocks, THREADS, d_out, false);
        float out[blocks];
        cudaMemcpy(out, d_out, sizeof out, cudaMemcpyDeviceToHost);
        bool right = true;
        for (int b = 0; b < blocks; b++) right &= out[b] == block_sum_want(b);
        printf("%s\n", right ? "right" : "wrong");
        return 0;
    }
    int* d = device_array<int>(64);
    if (name == "divergent_barrier") EMU_LAUNCH(divergent_barrier_kernel, 2, 64);
    else if (name == "missed_barrier") EMU_LAUNCH(missed_barrier_kernel, 1, 64);
    else if (name == "shuffle_exited_lane") EMU_LAUNCH(shuffle_exited_lane_kernel, 1, 32, d);
    else if (name == "deadlock") EMU_LAUNCH(deadlock_kernel, 1, 32, d);
    else if (name == "divergent_shuffle") EMU_LAUNCH(divergent_shuffle_kernel, 1, 32, d);
    else if (name == "out_of_bounds") {
        int* out = device_array<int>(64);
        EMU_LAUNCH(out_of_bounds_kernel, 1, 64, d, out);
    } else if (name == "host_pointer") {
        static int host[64];
        EMU_LAUNCH(host_pointer_kernel, 1, 32, host);
    } else {
        fprintf(stderr, "test_emu: no case %s\n", name.c_str());
        return 2;
    }
    printf("no error\n");
    return 0;
}

// Run `test_emu --case NAME` with PICOTRON_EMU_ORDER=order; its exit status and its output.
struct Child {
    int status;
    std::string out;
};
static Child run_child(const char* name, const char* order) {
    std::string cmd = std::string("PICOTRON_EMU_ORDER=") + order + " PICOTRON_EMU_SEED=3 /proc/" +
                      std::to_string(getpid()) + "/exe --case " + name + " 2>&1";
    Child c{-1, ""};
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) return c;
    char buf[512];
    while (fgets(buf, sizeof buf, p)) c.out += buf;
    const int status = pclose(p);
    c.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return c;
}
static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// the child must fail with exit 1, and its message must name the kernel and contain `expect`
static void expect_error(const char* name, const char* kernel, const char* expect) {
    for (const char* order : {"forward", "reverse", "random"}) {
        Child c = run_child(name, order);
        const bool ok = c.status == 1 && c.out.find(kernel) != std::string::npos &&
                        c.out.find(expect) != std::string::npos;
        record(ok, std::string("reports ") + name + " (" + order + ")",
               ok ? "" : "exit " + std::to_string(c.status) + ": " + first_line(c.out));
        if (ok && !strcmp(order, "forward")) printf("    %s", c.out.c_str());
    }
}

int main(int argc, char** argv) {
    if (argc == 3 && !strcmp(argv[1], "--case")) return run_case(argv[2]);

    // a correct block reduction, several blocks: right in this run's order
    {
        const int blocks = 5;
        float* d_out = device_array<float>(blocks);
        EMU_LAUNCH(block_sum_kernel, blocks, THREADS, d_out, true);
        float out[blocks];
        cudaMemcpy(out, d_out, sizeof out, cudaMemcpyDeviceToHost);
        bool ok = true;
        for (int b = 0; b < blocks; b++) ok &= out[b] == block_sum_want(b);
        record(ok, "block reduction with barriers is right");
        cudaFree(d_out);
    }
    // shuffles and votes
    {
        unsigned* d_out = device_array<unsigned>(32 * 16);
        EMU_LAUNCH(collectives_kernel, 1, 32, d_out);
        std::vector<unsigned> out(32 * 16);
        cudaMemcpy(out.data(), d_out, out.size() * sizeof(unsigned), cudaMemcpyDeviceToHost);
        const char* names[] = {"__shfl_sync broadcast", "__shfl_sync per-lane source", "__shfl_sync width 8",
                               "__shfl_up_sync width 16", "__shfl_down_sync", "__shfl_xor_sync",
                               "__shfl_xor_sync width 8", "__ballot_sync", "__any_sync", "__all_sync false",
                               "__all_sync true", "__shfl_sync double", "__shfl_sync half-warp masks"};
        for (int k = 0; k < 13; k++) {
            std::string bad;
            for (int lane = 0; lane < 32 && bad.empty(); lane++)
                if (out[lane * 16 + k] != collectives_want(lane, k))
                    bad = "lane " + std::to_string(lane) + " got " + std::to_string(out[lane * 16 + k]) + " want " +
                          std::to_string(collectives_want(lane, k));
            record(bad.empty(), names[k], bad);
        }
        cudaFree(d_out);
    }
    // atomics over several blocks
    {
        int* d = device_array<int>(2);
        cudaMemset(d, 0, 2 * sizeof(int));
        EMU_LAUNCH(atomics_kernel, 7, 96, d, d + 1);
        int h[2];
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        record(h[0] == 7 * 96 && h[1] == 7 * 96 - 1, "atomicAdd / atomicMax",
               std::to_string(h[0]) + ", " + std::to_string(h[1]));
        cudaFree(d);
    }
    // _rn intrinsics round each operation: (1 + 2⁻¹²)² − (1 + 2⁻¹¹) is 0, fused it would be 2⁻²⁴
    {
        volatile float a = 1.0f + 0x1p-12f, c = -(1.0f + 0x1p-11f);
        const float separate = __fadd_rn(__fmul_rn(a, a), c), fused = __fmaf_rn(a, a, c);
        record(separate == 0.0f && fused == 0x1p-24f, "_rn intrinsics are not fused into FMAs");
    }
    // poison: fresh device memory, and shared memory at every block start
    {
        uint32_t* d = device_array<uint32_t>(6);
        uint32_t h[6];
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        float f;
        memcpy(&f, h, sizeof f);
        record(h[0] == emu::POISON_WORD && std::isnan(f), "cudaMalloc memory is poison (a NaN as float)");
        EMU_LAUNCH(shared_poison_kernel, 3, 64, d);
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        bool ok = true;
        for (int b = 0; b < 3; b++) ok &= h[2 * b] == emu::POISON_WORD && h[2 * b + 1] == 12345;
        record(ok, "__shared__ memory is poison at every block start");
        cudaFree(d);
    }
    // the runtime refuses copies whose kind does not match the pointers, and bad configurations
    {
        float* d = device_array<float>(4);
        float h[4] = {};
        bool ok = cudaMemcpy(h, d, sizeof h, cudaMemcpyHostToDevice) == cudaErrorInvalidValue &&
                  cudaGetLastError() == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess &&
                  cudaMemcpy(d, h, sizeof h, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue &&
                  cudaMemcpy(d, h, sizeof h + 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue &&
                  cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice) == cudaSuccess &&
                  cudaMemcpy(d, d + 1, 3 * sizeof(float), cudaMemcpyDeviceToDevice) == cudaSuccess &&
                  cudaFree(h) == cudaErrorInvalidValue;
        cudaGetLastError();
        record(ok, "cudaMemcpy checks its kind against the pointers; cudaFree refuses host memory");
        int* di = device_array<int>(1);
        EMU_LAUNCH(atomics_kernel, 1, 2048, di, di);
        record(cudaGetLastError() == cudaErrorInvalidConfiguration, "a block of 2048 threads is an invalid configuration");
        cudaFree(d);
        cudaFree(di);
    }

    // a missing barrier gives a wrong sum in at least one order
    {
        std::string results;
        bool some_wrong = false;
        for (const char* order : {"forward", "reverse", "random"}) {
            Child c = run_child("block_sum_no_barrier", order);
            some_wrong |= c.status == 0 && first_line(c.out) == "wrong";
            results += std::string(order) + ": " + (c.status == 0 ? first_line(c.out) : "exit " + std::to_string(c.status)) + "  ";
        }
        record(some_wrong, "block reduction without its barrier is wrong in some order", results);
    }
    expect_error("divergent_barrier", "divergent_barrier_kernel", "divergent __syncthreads");
    expect_error("missed_barrier", "missed_barrier_kernel", "__syncthreads");
    expect_error("shuffle_exited_lane", "shuffle_exited_lane_kernel", "exit");
    expect_error("deadlock", "deadlock_kernel", "deadlock");
    expect_error("divergent_shuffle", "divergent_shuffle_kernel", "divergent warp collective");
    expect_error("host_pointer", "host_pointer_kernel", "is not device memory");
#ifdef __SANITIZE_ADDRESS__  // out-of-bounds indexing is AddressSanitizer's to catch (cudaMalloc is exact)
    expect_error("out_of_bounds", "out_of_bounds_kernel", "heap-buffer-overflow");
#endif

    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
