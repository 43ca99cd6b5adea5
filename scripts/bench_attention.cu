// bench_attention.cu — TFLOP/s of kernels.cuh's attention kernels on one GPU (make bench builds it).
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -DOMPI_SKIP_MPICXX $(mpicxx --showme:compile) -I.
//       scripts/bench_attention.cu -o bench_attention -lcublasLt -lcublas -lnccl -lgomp $(mpicxx --showme:link)
//   ./bench_attention [--runs 20] [--warmup 3]
//
// base's attention shape: 12 heads of 64, T = 1024, 2048, 4096, 8192 tokens packed as ONE document,
// global (window −1) and ModernBERT's local band (window 64: |i − j| ≤ 64), through the ops the
// training step calls, cuda::attention_forward / _backward (the bf16 tensor-core flash kernels, on bf16
// q, k, v, out and dout as the trainer stores them, RoPE applied as they load).
// FLOPs FlashAttention style: forward 4·hd·(visible query-key pairs) per head (QKᵀ and PV, 2 FLOPs a
// multiply-add each), backward 2.5× the forward (five products of that size instead of two). The pairs
// are counted exactly from the band, so a windowed run is credited only with the work it must do.
// Each timing is one launch between two cudaEvents, after warm-up launches; the median is printed.
// Output: one line per (impl, T, window), "RESULT {json}", for scripts/bench_gpu.py.
#include "kernels.cuh"

#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr int kHeads = 12, kHeadDim = 64, kWindow = 64;

// The one place that knows the kernels' argument lists: qkv (T, 3, nh, hd) holds q, k, v at columns
// 0, H, 2H of each row; positions (T) 0 … T − 1 into the RoPE table (ModernBERT's global θ).
constexpr float kRopeTheta = 160000.0f;
struct Buffers {
    cuda::act *qkv, *out, *dout, *dqkv;
    float *lse, *rope;
    int *cu_seqlens, *positions;
};
void run_forward(const Buffers& b, int T, int window) {
    cuda::attention_forward(b.out, b.lse, b.qkv, b.cu_seqlens, 1, b.positions, b.rope, T, kHeads, kHeadDim, window);
}
void run_backward(const Buffers& b, int T, int window) {  // writes dqkv
    cuda::attention_backward(b.dqkv, b.dout, b.out, b.lse, b.qkv, b.cu_seqlens, 1, b.positions, b.rope, T, kHeads,
                             kHeadDim, window);
}

// Query-key pairs with |i − j| ≤ window inside one document of T tokens (window < 0: all T²).
double visible_pairs(int T, int window) {
    if (window < 0) return (double)T * T;
    double pairs = 0;
    for (int i = 0; i < T; i++) pairs += std::min(i + window, T - 1) - std::max(i - window, 0) + 1;
    return pairs;
}

// Milliseconds of one call of f, the median of `runs` after `warmup`; before() runs untimed before each.
template <typename F, typename G>
double median_ms(int warmup, int runs, F f, G before) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    for (int i = 0; i < warmup; i++) before(), f();
    std::vector<float> ms(runs);
    for (int i = 0; i < runs; i++) {
        before();
        CUDA_CHECK(cudaEventRecord(start));
        f();
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&ms[i], start, stop));
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return ms[runs / 2];
}

std::vector<float> random_values(size_t n, uint64_t seed) {  // uniform in [−1, 1), a fixed LCG: no state shared
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)((seed >> 40) * (1.0 / (1ull << 24))) * 2.0f - 1.0f;
    }
    return v;
}

cuda::act* device_acts(const std::vector<float>& host) {  // uploaded in fp32, rounded to bf16 on the device
    float* staging = cuda::alloc_floats(host.size());
    cuda::copy_to_device(staging, host.data(), host.size() * sizeof(float));
    cuda::act* d = cuda::alloc_acts(host.size());
    cuda::to_act(d, staging, host.size());
    cuda::free_buffer(staging);
    return d;
}

}  // namespace

int main(int argc, char** argv) {
    int runs = 20, warmup = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string flag = argv[i];
        if (flag == "--runs") runs = std::max(1, atoi(argv[i + 1]));
        else if (flag == "--warmup") warmup = std::max(0, atoi(argv[i + 1]));
        else fatal("bench_attention: unknown flag %s (--runs N, --warmup N)", flag.c_str());
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s; %d heads × %d, one document; median of %d runs after %d warm-up\n", prop.name, kHeads,
           kHeadDim, runs, warmup);

    const int H = kHeads * kHeadDim, T_max = 8192;
    Buffers b;
    b.qkv = device_acts(random_values((size_t)T_max * 3 * H, 1));
    b.dout = device_acts(random_values((size_t)T_max * H, 2));
    b.out = cuda::alloc_acts((size_t)T_max * H);
    b.dqkv = cuda::alloc_acts((size_t)T_max * 3 * H);
    b.lse = cuda::alloc_floats((size_t)T_max * kHeads);
    b.rope = cuda::alloc_floats((size_t)T_max * kHeadDim);
    cuda::rope_table(b.rope, T_max, kHeadDim, kRopeTheta);
    std::vector<int> positions(T_max);
    for (int t = 0; t < T_max; t++) positions[t] = t;
    b.positions = cuda::alloc_ints(T_max);
    cuda::copy_to_device(b.positions, positions.data(), T_max * sizeof(int));
    b.cu_seqlens = cuda::alloc_ints(2);

    for (int T : {1024, 2048, 4096, 8192})
        for (int window : {-1, kWindow}) {
            const int cu[2] = {0, T};
            CUDA_CHECK(cudaMemcpy(b.cu_seqlens, cu, sizeof cu, cudaMemcpyHostToDevice));
            const double fwd_flops = 4.0 * kHeadDim * visible_pairs(T, window) * kHeads, bwd_flops = 2.5 * fwd_flops;
            const double fwd_ms = median_ms(warmup, runs, [&] { run_forward(b, T, window); }, [] {});
            run_forward(b, T, window);  // the backward's out and lse
            const double bwd_ms = median_ms(warmup, runs, [&] { run_backward(b, T, window); }, [] {});
            printf("RESULT {\"impl\": \"flash\", \"T\": %d, \"window\": %d, \"pairs\": %.0f, \"fwd_ms\": %.6g, "
                   "\"bwd_ms\": %.6g, \"fwd_tflops\": %.6g, \"bwd_tflops\": %.6g}\n",
                   T, window, visible_pairs(T, window), fwd_ms, bwd_ms, fwd_flops / (fwd_ms * 1e9),
                   bwd_flops / (bwd_ms * 1e9));
            fflush(stdout);
        }
    return 0;
}
