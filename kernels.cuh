// kernels.cuh — every numeric op of ModernBERT, written twice with one signature:
//
//   namespace ref   the plain C++ loops: the readable specification. The CPU build runs these
//                   (GEMMs go to OpenBLAS); the GPU tests compare every kernel against them.
//   namespace cuda  the CUDA kernels and their launchers (only when nvcc compiles this file).
//
// `namespace ops` names the set this build runs; picotron.cu only ever calls ops::.
//
// Conventions shared by every op:
//   - row-major buffers, fp32 except the GPU build's activations (act: bf16); pointers live where the
//     build computes (host for CPU, device for GPU);
//   - shape comments use T tokens, N rows, C/H columns, I intermediate, V vocabulary, nh heads,
//     hd head dim (64);
//   - a *_forward writes its outputs. A *_backward ADDS into weight gradients (+=), so micro-batches
//     and the tied embedding accumulate; it WRITES the gradient of its input (=), except where an op
//     takes `accumulate` (LayerNorm, matmul: the ops whose input gradient meets a residual) or says
//     += (scatter_rows_backward: it touches only some rows). No buffer needs zeroing before a
//     backward that overwrites it. A null gradient pointer is skipped;
//   - nothing uses float atomics whose order changes between runs: results are deterministic.
//   - the CPU build splits every op's loop over OpenMP threads so that each output element has one
//     writer, and sums over rows (weight gradients, reductions) run in fixed chunks added in chunk
//     order: results do not depend on the thread count.
#pragma once
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <mpi.h>
#ifdef PICOTRON_EMULATE
#include "tests/cuda_emu.h"  // the g++ test build: the CUDA section runs on the CPU (it defines __CUDACC__)
#endif
#ifndef __CUDACC__
#include <cblas.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// ---- errors ----
// Every failure anywhere ends the whole job: print one line, then MPI_Abort so that no rank is left
// waiting in a collective. Before MPI is up (or after it is down) a plain exit does the same.
// The line is "picotron: rank R: message"; the return says whether MPI is up.
inline bool print_error_line(const char* fmt, va_list args) {
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, args);
    int rank = 0, initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    bool mpi_up = initialized && !finalized;
    if (mpi_up) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    fprintf(stderr, "picotron: rank %d: %s\n", rank, msg);
    fflush(stderr);
    return mpi_up;
}
[[noreturn]] inline void fatal(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    bool mpi_up = print_error_line(fmt, args);
    va_end(args);
    if (mpi_up) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}
// For a verdict every rank reaches at the same point from the same all-reduced numbers (a loss or
// gradient norm that is not finite): each rank prints its line, they meet (for at most 5 s, in case
// one never comes), then the job ends.
[[noreturn]] inline void fatal_all_ranks(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    print_error_line(fmt, args);
    va_end(args);
    MPI_Request barrier;
    int done = 0;
    MPI_Ibarrier(MPI_COMM_WORLD, &barrier);
    for (double t0 = MPI_Wtime(); !done && MPI_Wtime() - t0 < 5.0;) MPI_Test(&barrier, &done, MPI_STATUS_IGNORE);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}
#define MPI_CHECK(call)                                                                         \
    do {                                                                                        \
        int mpi_status_ = (call);                                                               \
        if (mpi_status_ != MPI_SUCCESS) fatal("MPI error %d at %s:%d", mpi_status_, __FILE__, __LINE__); \
    } while (0)

// ---- types the ops share ----
// One stretch of a tensor that adamw_update_pieces updates; the table is built once and lives where the ops run.
struct AdamwPiece {
    size_t param;         // the tensor's index: its learning rate is lr[param]
    size_t offset, n;     // in the flat parameter buffer
    size_t state_offset;  // in the Adam moments
    size_t start;         // Σ n of the pieces before it: where it starts in their concatenation
    const float* grad;    // (n) its summed gradient (the flat gradient buffer, or a ZeRO-1 shard)
    bool decay;           // weight decay applies (not on 1-D tensors)
};

// ---- reference ops ----
// One function per op, plain loops, accumulation in double where a sum runs long so that the
// reference is the most accurate thing in the project (finite-difference checks lean on it).
namespace ref {

// The type the activations that GEMMs and attention read are stored in: fp32 here, the oracle; the CUDA
// build's is bf16 (DESIGN.md §5). Buffers of it are marked act in the signatures below.
using act = float;

// -- memory: the CPU build's "device" is the host --
// (n) zeroed elements of T; `what` names them in the error
template <typename T>
inline T* alloc_array(size_t n, const char* what) {
    T* p = static_cast<T*>(calloc(n ? n : 1, sizeof(T)));
    if (!p) fatal("out of host memory allocating %zu %s", n, what);
    return p;
}
inline float* alloc_floats(size_t n) { return alloc_array<float>(n, "floats"); }
inline int* alloc_ints(size_t n) { return alloc_array<int>(n, "ints"); }
inline void free_buffer(void* p) { free(p); }
inline void zero_floats(float* p, size_t n) { memset(p, 0, n * sizeof(float)); }
inline act* alloc_acts(size_t n) { return alloc_array<act>(n, "activations"); }
inline void zero_acts(act* p, size_t n) { memset(p, 0, n * sizeof(act)); }
// dst (n) = src rounded to act: here a copy, and nothing when dst is src (the CPU build keeps one buffer)
inline void to_act(act* dst, const float* src, size_t n) {
    if (dst != src) memcpy(dst, src, n * sizeof(float));
}
inline void copy_to_device(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void copy_to_host(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void copy_on_device(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void synchronize() {}

// -- threads: loops below are split with `#pragma omp parallel for` (a no-op without OpenMP) --
// A sum over many terms (rows of a weight gradient, a reduction) is cut into chunks of a fixed
// size; each chunk is summed in order by whichever thread takes it, then the chunk partials are
// added in chunk order. The grouping depends only on n, so the result is the same bits for any
// thread count.
constexpr size_t kSumChunk = 4096;  // terms per chunk of a reduction
template <typename Term>
inline double chunked_sum(size_t n, Term term) {
    const size_t n_chunks = (n + kSumChunk - 1) / kSumChunk;
    double* partial = static_cast<double*>(malloc(sizeof(double) * (n_chunks ? n_chunks : 1)));
    if (!partial) fatal("out of host memory for a reduction of %zu terms", n);
#pragma omp parallel for schedule(static)
    for (size_t k = 0; k < n_chunks; k++) {
        double acc = 0.0;
        for (size_t i = k * kSumChunk; i < n && i < (k + 1) * kSumChunk; i++) acc += term(i);
        partial[k] = acc;
    }
    double total = 0.0;
    for (size_t k = 0; k < n_chunks; k++) total += partial[k];
    free(partial);
    return total;
}
// dst (C) += Σ_n term(n, c) over N rows, for weight and bias gradients: rows in chunks of
// kRowChunk, each chunk's column sums in double (one thread per chunk), chunks added in order.
constexpr int kRowChunk = 64;
template <typename Term>
inline void column_sums_add(float* dst, int N, int C, Term term) {
    const int n_chunks = (N + kRowChunk - 1) / kRowChunk;
    double* partial = static_cast<double*>(calloc((size_t)(n_chunks ? n_chunks : 1) * C, sizeof(double)));
    if (!partial) fatal("out of host memory for column sums of (%d, %d)", N, C);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < n_chunks; k++)
        for (int n = k * kRowChunk; n < N && n < (k + 1) * kRowChunk; n++)
            for (int c = 0; c < C; c++) partial[(size_t)k * C + c] += term(n, c);
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        double acc = 0.0;
        for (int k = 0; k < n_chunks; k++) acc += partial[(size_t)k * C + c];
        dst[c] += (float)acc;
    }
    free(partial);
}

// -- exp for the long loops (softmax rows of attention and cross-entropy) --
// libm's expf is one call per element, which the compiler cannot vectorize; this one it can
// (`#pragma omp simd` loops). Cephes' method: x = k·ln2 + r with |r| ≤ ln2/2 (ln2 split in two so
// that k·ln2 is exact), exp(r) by a degree-7 polynomial, 2^k by writing the exponent bits. Within
// 2 ulp of exp over the normal range (tests/test_ops checks it); 0 below the smallest normal result.
inline float exp_vec(float x) {
    const float big = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
    const bool underflow = x < -87.33f;
    x = underflow ? -87.33f : (x > 88.72f ? 88.72f : x);
    const float k = (x * 1.44269504088896341f + big) - big;  // round(x / ln2)
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t k1 = (int32_t)k / 2, k2 = (int32_t)k - k1;  // 2^k = 2^k1 · 2^k2, each normal for k ∈ [−126, 128]
    const float two_k1 = __builtin_bit_cast(float, (k1 + 127) << 23), two_k2 = __builtin_bit_cast(float, (k2 + 127) << 23);
    return underflow ? 0.0f : p * two_k1 * two_k2;
}

// Σ_i exp(x_i − shift) over n values, written to out (which may be x) when out is given: float
// partial sums of kExpChunk terms (vectorized), added in double.
constexpr int kExpChunk = 256;
inline double sum_exp(float* out, const float* x, int n, float shift) {
    double total = 0.0;
    for (int i0 = 0; i0 < n; i0 += kExpChunk) {
        const int i1 = i0 + kExpChunk < n ? i0 + kExpChunk : n;
        float part = 0.0f;
        if (out) {
#pragma omp simd reduction(+ : part)
            for (int i = i0; i < i1; i++) {
                out[i] = exp_vec(x[i] - shift);
                part += out[i];
            }
        } else {
#pragma omp simd reduction(+ : part)
            for (int i = i0; i < i1; i++) part += exp_vec(x[i] - shift);
        }
        total += part;
    }
    return total;
}

// -- embedding lookup over a vocabulary shard [vocab_start, vocab_start + vocab_rows) --
// out (T, H) = wte[ids - vocab_start]; ids outside the shard give zero rows (tensor parallel sums them).
inline void embedding_forward(float* out, const int* ids, const float* wte, int T, int H, int vocab_start,
                              int vocab_rows) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        int row = ids[t] - vocab_start;
        for (int c = 0; c < H; c++)
            out[(size_t)t * H + c] = (row >= 0 && row < vocab_rows) ? wte[(size_t)row * H + c] : 0.0f;
    }
}
// dwte (vocab_rows, H) += dout rows scattered by id; the padding id gets no gradient (HF padding_idx).
// Threads split the columns (a repeated id is added by one thread, in token order).
inline void embedding_backward(float* dwte, const float* dout, const int* ids, int T, int H, int vocab_start,
                               int vocab_rows, int pad_id) {
    constexpr int kColumns = 32;
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < H; c0 += kColumns)
        for (int t = 0; t < T; t++) {
            int row = ids[t] - vocab_start;
            if (ids[t] == pad_id || row < 0 || row >= vocab_rows) continue;
            for (int c = c0; c < H && c < c0 + kColumns; c++) dwte[(size_t)row * H + c] += dout[(size_t)t * H + c];
        }
}

// -- LayerNorm without bias --
// out (N, C) = (inp - mean) * rstd * weight; mean, rstd (N) are kept for the backward.
inline void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, int N,
                              int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        double m = 0.0;
        for (int c = 0; c < C; c++) m += x[c];
        m /= C;
        double var = 0.0;
        for (int c = 0; c < C; c++) var += (x[c] - m) * (x[c] - m);
        var /= C;
        float s = (float)(1.0 / sqrt(var + eps));
        for (int c = 0; c < C; c++) out[(size_t)n * C + c] = (float)((x[c] - m) * s) * weight[c];
        mean[n] = (float)m;
        rstd[n] = s;
    }
}
// dinp (N, C) = ∂/∂inp (+= with accumulate), dweight (C) += ∂/∂weight, given dout (N, C).
inline void layernorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                               const float* weight, const float* mean, const float* rstd, int N, int C,
                               bool accumulate) {
    if (dinp) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const float* x = inp + (size_t)n * C;
            const float* dy = dout + (size_t)n * C;
            // xhat = (x - mean) * rstd; dxhat = dy * w; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
            for (int c = 0; c < C; c++) {
                double xhat = (x[c] - mean[n]) * rstd[n];
                double dxhat = (double)dy[c] * weight[c];
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * xhat;
            }
            float* dx = dinp + (size_t)n * C;
            for (int c = 0; c < C; c++) {
                double xhat = (x[c] - mean[n]) * rstd[n];
                double dxhat = (double)dy[c] * weight[c];
                float grad = (float)(rstd[n] * (dxhat - sum_dxhat / C - xhat * sum_dxhat_xhat / C));
                dx[c] = accumulate ? dx[c] + grad : grad;
            }
        }
    }
    if (dweight)
        column_sums_add(dweight, N, C, [&](int n, int c) {
            return (double)dout[(size_t)n * C + c] * ((inp[(size_t)n * C + c] - mean[n]) * rstd[n]);
        });
}

// -- general matrix products --
// Row-major C (M, N) = alpha · op(A) · op(B) + beta · C, op(X) = X or Xᵀ, with row strides lda,
// ldb, ldc: OpenBLAS on the CPU build, plain loops in the GPU build (whose tests are its only user).
inline void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
#ifdef __CUDACC__
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++)
                acc += (double)(trans_a ? A[(size_t)k * lda + m] : A[(size_t)m * lda + k]) *
                       (trans_b ? B[(size_t)n * ldb + k] : B[(size_t)k * ldb + n]);
            float* c = C + (size_t)m * ldc + n;
            *c = (float)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
#else
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
                alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

// The same product cut into slices of fixed size that the threads share, one BLAS call per slice;
// BLAS itself runs on one thread (set_cpu_threads in picotron.cu), so a single pool of OpenMP
// threads does all the work and no BLAS pool spins while the ops' loops run. C is cut along its
// longer side (the operand every slice re-reads, hence re-packs, is then the smaller one). The
// slices do not depend on the thread count, so neither do the results, and dynamic scheduling
// lets a thread that lost its core take fewer slices.
constexpr int kGemmSliceRows = 512, kGemmSliceCols = 4096;
inline void gemm_threaded(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                          const float* B, int ldb, float beta, float* C, int ldc) {
    const bool by_rows = M >= N;
    const int extent = by_rows ? M : N, slice = by_rows ? kGemmSliceRows : kGemmSliceCols;
    const int n_slices = (extent + slice - 1) / slice;
#pragma omp parallel for schedule(dynamic)
    for (int k = 0; k < n_slices; k++) {
        const int lo = k * slice, len = extent - lo < slice ? extent - lo : slice;
        if (by_rows)  // rows [lo, lo + len) of C and of op(A)
            gemm(trans_a, trans_b, len, N, K, alpha, trans_a ? A + lo : A + (size_t)lo * lda, lda, B, ldb, beta,
                 C + (size_t)lo * ldc, ldc);
        else  // columns [lo, lo + len) of C and of op(B)
            gemm(trans_a, trans_b, M, len, K, alpha, A, lda, trans_b ? B + (size_t)lo * ldb : B + lo, ldb, beta,
                 C + lo, ldc);
    }
}

// -- linear layer: out (N, OC) = inp (N, C) · weight (OC, C)ᵀ [+ bias (OC)] --
// The GEMM is the one op the reference hands to a library (OpenBLAS): loops here would make the
// CPU build too slow to train anything; the finite-difference tests still check it.
inline void matmul_forward(float* out, const act* inp, const act* weight, const float* bias, int N, int C,
                           int OC) {
#ifdef __CUDACC__
    for (int n = 0; n < N; n++)  // the GPU build's reference (used only by its tests): plain loops
        for (int o = 0; o < OC; o++) {
            double acc = bias ? bias[o] : 0.0;
            for (int c = 0; c < C; c++) acc += (double)inp[(size_t)n * C + c] * weight[(size_t)o * C + c];
            out[(size_t)n * OC + o] = (float)acc;
        }
#else
    gemm_threaded(false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
    if (bias) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) out[(size_t)n * OC + o] += bias[o];
    }
#endif
}
// dinp (N, C) = dout · weight (+= with accumulate); dweight (OC, C) += doutᵀ · inp; dbias (OC) += Σ_n dout.
inline void matmul_backward(float* dinp, float* dweight, float* dbias, const act* dout, const act* inp,
                            const act* weight, int N, int C, int OC, bool accumulate) {
#ifdef __CUDACC__
    if (dinp)
        for (int n = 0; n < N; n++)
            for (int c = 0; c < C; c++) {
                double acc = 0.0;
                for (int o = 0; o < OC; o++) acc += (double)dout[(size_t)n * OC + o] * weight[(size_t)o * C + c];
                float& d = dinp[(size_t)n * C + c];
                d = accumulate ? d + (float)acc : (float)acc;
            }
    if (dweight)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                double acc = 0.0;
                for (int n = 0; n < N; n++) acc += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * C + c];
                dweight[(size_t)o * C + c] += (float)acc;
            }
#else
    if (dinp) gemm_threaded(false, false, N, C, OC, 1.0f, dout, OC, weight, C, accumulate ? 1.0f : 0.0f, dinp, C);
    if (dweight) gemm_threaded(true, false, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
#endif
    if (dbias) column_sums_add(dbias, N, OC, [&](int n, int o) { return (double)dout[(size_t)n * OC + o]; });
}

// -- residual: x (n) += y (n); its backward is the identity, so it has none --
inline void add_inplace(float* x, const float* y, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}
// resid (N, C) += add (N, C), then out (N, C), mean, rstd (N) = layernorm_forward(resid): one op on the GPU;
// here the two, so that the CPU build's float operations are those of the unfused pair.
inline void add_layernorm_forward(act* out, float* mean, float* rstd, float* resid, const float* add,
                                  const float* weight, int N, int C, float eps) {
    add_inplace(resid, add, (size_t)N * C);
    layernorm_forward(out, mean, rstd, resid, weight, N, C, eps);
}

// -- rotary position embedding, rotate-half style: the attention ops turn q and k as they read them --
// A head's row is [pair firsts | pair seconds]: pair (i, i + hd/2) of a token at position p turns by
// angle p · inv_freq_i, inv_freq_i = θ^(−2i/hd), in accurate fp32 as transformers computes it (the
// float product p·inv_freq rounded once, then cos/sin). The table holds each angle's cos and sin, so
// that the kernels read them instead of evaluating cos/sin for every tile they load.
inline float rope_inv_freq(int i, int hd, float theta) { return 1.0f / powf(theta, (float)(2 * i) / (float)hd); }
// table (P, hd/2, 2): cos and sin of p·inv_freq_i for the positions p < P
inline void rope_table(float* table, int P, int hd, float theta) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float inv_freq = rope_inv_freq(i, hd, theta);
        for (int p = 0; p < P; p++) {
            const float angle = (float)p * inv_freq;
            table[((size_t)p * half + i) * 2] = cosf(angle);
            table[((size_t)p * half + i) * 2 + 1] = sinf(angle);
        }
    }
}
// x (rows, stride): the nh heads of each row r (columns [0, nh·hd)) turned by R(pos[r]) (direction 1)
// or by its transpose (direction −1, the backward: a rotation's transpose turns the other way).
inline void rope_rotate(float* x, int stride, int rows, const int* pos, int nh, int hd, const float* table,
                        float direction) {
    const int half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < half; i++) {  // one angle per (token, pair), shared by every head
            const float* cs = table + ((size_t)pos[r] * half + i) * 2;
            const float c = cs[0], s = direction * cs[1];
            for (int h = 0; h < nh; h++) {
                float* xh = x + (size_t)r * stride + (size_t)h * hd;
                const float x1 = xh[i], x2 = xh[i + half];
                xh[i] = x1 * c - x2 * s;
                xh[i + half] = x2 * c + x1 * s;
            }
        }
}
// (rows, width): columns [0, width) of x (rows, stride), the first `parts` blocks of nh heads turned
// by R(pos[r]): what the attention ops compute on (they leave their inputs as they are).
inline std::vector<float> rope_copy(const float* x, int stride, int rows, int width, int parts, const int* pos, int nh,
                                    int hd, const float* table) {
    std::vector<float> y((size_t)rows * width);
    for (int r = 0; r < rows; r++) memcpy(&y[(size_t)r * width], x + (size_t)r * stride, sizeof(float) * width);
    for (int part = 0; part < parts; part++) rope_rotate(y.data() + part * nh * hd, width, rows, pos, nh, hd, table, 1.0f);
    return y;
}
// [k | v] (Tk, 2·nh·hd): a key/value block's keys turned by their positions, beside its values.
inline std::vector<float> rope_kv_copy(const float* k, const float* v, int kv_stride, int Tk, const int* pos, int nh,
                                       int hd, const float* table) {
    const int H = nh * hd;
    std::vector<float> kv((size_t)Tk * 2 * H);
    for (int j = 0; j < Tk; j++) {
        memcpy(&kv[(size_t)j * 2 * H], k + (size_t)j * kv_stride, sizeof(float) * H);
        memcpy(&kv[(size_t)j * 2 * H + H], v + (size_t)j * kv_stride, sizeof(float) * H);
    }
    rope_rotate(kv.data(), 2 * H, Tk, pos, nh, hd, table, 1.0f);
    return kv;
}

// -- attention confined to each packed document, optionally to a ±window band --
// qkv (T, 3, nh, hd); out (T, nh, hd); lse (T, nh) = log Σ_j exp(s_ij), kept for the backward.
// RoPE is part of the op: q and k are turned by their tokens' positions (T) through the table of
// rope_table (a null table: no rotation), and the backward's dq and dk are those of the unturned q, k.
// Token i of document d = [cu_seqlens[d], cu_seqlens[d+1]) sees keys j of the same document with
// |i − j| ≤ window (window < 0: no band). Tokens past cu_seqlens[n_docs] are padding: zero output, lse −∞.
//
// Computed in blocks of kAttentionBlock queries of one document and one head: the block's scores
// against the keys any of its rows can see (S = Q Kᵀ, one GEMM), the band masked out, a softmax per
// row, then O = P V (one GEMM). Only keys inside the document and the band are touched, so a local
// layer costs O(T · window) and a global one O(Σ len²). tests/test_ops checks this against plain
// per-query loops and against a brute force with a T×T mask.
inline void attention_key_range(int i, int doc_start, int doc_end, int window, int* j0, int* j1) {
    *j0 = doc_start;
    *j1 = doc_end;
    if (window >= 0) {
        if (i - window > *j0) *j0 = i - window;
        if (i + window + 1 < *j1) *j1 = i + window + 1;
    }
}
constexpr int kAttentionBlock = 64;

// One block: queries [q0, q0 + nq) of the document [doc_start, doc_end), keys [k0, k0 + nk).
struct AttentionBlock {
    int q0, nq, k0, nk;
};
inline AttentionBlock attention_block(int q0, int doc_start, int doc_end, int window) {
    AttentionBlock b;
    b.q0 = q0;
    b.nq = doc_end - q0 < kAttentionBlock ? doc_end - q0 : kAttentionBlock;
    int first_lo, first_hi, last_lo, last_hi;  // the keys of the block's first and last query
    attention_key_range(q0, doc_start, doc_end, window, &first_lo, &first_hi);
    attention_key_range(q0 + b.nq - 1, doc_start, doc_end, window, &last_lo, &last_hi);
    b.k0 = first_lo;
    b.nk = last_hi - first_lo;
    return b;
}
// S (nq, nk) ← the block's scaled scores s_ij = q_i · k_j / √hd.
inline void attention_block_scores(float* S, const float* qkv, const AttentionBlock& b, int nh, int hd, int h) {
    const int H = nh * hd;
    gemm(false, true, b.nq, b.nk, hd, 1.0f / sqrtf((float)hd), qkv + (size_t)b.q0 * 3 * H + (size_t)h * hd, 3 * H,
         qkv + (size_t)b.k0 * 3 * H + H + (size_t)h * hd, 3 * H, 0.0f, S, b.nk);
}
// In place, S → P: p_ij = exp(s_ij − lse_i) inside each row's band, 0 outside it (the backward's
// recomputation from the forward's lse).
inline void attention_block_probs(float* S, const float* lse, const AttentionBlock& b, int doc_start, int doc_end,
                                  int nh, int h, int window) {
    for (int r = 0; r < b.nq; r++) {
        int j0, j1;
        attention_key_range(b.q0 + r, doc_start, doc_end, window, &j0, &j1);
        const float l = lse[(size_t)(b.q0 + r) * nh + h];
        float* row = S + (size_t)r * b.nk;
        for (int j = b.k0; j < j0; j++) row[j - b.k0] = 0.0f;
#pragma omp simd
        for (int j = j0; j < j1; j++) row[j - b.k0] = exp_vec(row[j - b.k0] - l);
        for (int j = j1; j < b.k0 + b.nk; j++) row[j - b.k0] = 0.0f;
    }
}

// The blocks' (document, first query) in order: the forward's threads share the (block, head) pairs.
struct AttentionTask {
    int doc, q0;
};
inline std::vector<AttentionTask> attention_tasks(const int* cu_seqlens, int n_docs) {
    std::vector<AttentionTask> tasks;
    for (int d = 0; d < n_docs; d++)
        for (int q0 = cu_seqlens[d]; q0 < cu_seqlens[d + 1]; q0 += kAttentionBlock) tasks.push_back({d, q0});
    return tasks;
}
// a thread's scratch for one block's scores: kAttentionBlock rows of at most T keys
inline float* attention_scratch(int T) {
    float* p = static_cast<float*>(malloc(sizeof(float) * (size_t)kAttentionBlock * (T > 0 ? T : 1)));
    if (!p) fatal("out of host memory for attention scratch of %d keys", T);
    return p;
}

inline void attention_forward(act* out, float* lse, const act* qkv, const int* cu_seqlens, int n_docs,
                              const int* positions, const float* rope, int T, int nh, int hd, int window) {
    const int H = nh * hd, used = cu_seqlens[n_docs];
    std::vector<float> turned;
    if (rope) qkv = (turned = rope_copy(qkv, 3 * H, T, 3 * H, 2, positions, nh, hd, rope)).data();
    memset(out + (size_t)used * H, 0, (size_t)(T - used) * H * sizeof(float));  // padding rows
    for (size_t i = (size_t)used * nh; i < (size_t)T * nh; i++) lse[i] = -INFINITY;  // as a row that sees nothing
    const std::vector<AttentionTask> tasks = attention_tasks(cu_seqlens, n_docs);
    const int n_tasks = (int)tasks.size() * nh;
#pragma omp parallel
    {
        float* P = attention_scratch(T);
#pragma omp for schedule(dynamic)
        for (int task = 0; task < n_tasks; task++) {
            const int d = tasks[task / nh].doc, h = task % nh;
            AttentionBlock b = attention_block(tasks[task / nh].q0, cu_seqlens[d], cu_seqlens[d + 1], window);
            attention_block_scores(P, qkv, b, nh, hd, h);
            for (int r = 0; r < b.nq; r++) {  // row softmax over the band; lse_i = log Σ_j exp(s_ij)
                int j0, j1;
                attention_key_range(b.q0 + r, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
                float* row = P + (size_t)r * b.nk;
                float max_score = -INFINITY;
#pragma omp simd reduction(max : max_score)
                for (int j = j0; j < j1; j++) max_score = row[j - b.k0] > max_score ? row[j - b.k0] : max_score;
                for (int j = b.k0; j < j0; j++) row[j - b.k0] = 0.0f;
                const double denom = sum_exp(row + (j0 - b.k0), row + (j0 - b.k0), j1 - j0, max_score);
                for (int j = j1; j < b.k0 + b.nk; j++) row[j - b.k0] = 0.0f;
                const float inv_denom = (float)(1.0 / denom);
                for (int j = j0; j < j1; j++) row[j - b.k0] *= inv_denom;
                lse[(size_t)(b.q0 + r) * nh + h] = max_score + (float)log(denom);
            }
            gemm(false, false, b.nq, hd, b.nk, 1.0f, P, b.nk, qkv + (size_t)b.k0 * 3 * H + 2 * H + (size_t)h * hd,
                 3 * H, 0.0f, out + (size_t)b.q0 * H + (size_t)h * hd, H);  // O = P V
        }
        free(P);
    }
}
// dqkv (T, 3, nh, hd) = gradients of q, k, v (written, not added). With p_ij = exp(s_ij − lse_i)
// and D_i = dout_i · out_i: dv_j = Σ_i p_ij dout_i; ds_ij = p_ij (dout_i · v_j − D_i);
// dq_i = scale Σ_j ds_ij k_j; dk_j = scale Σ_i ds_ij q_i. Per block, P is recomputed from Q, K and
// the forward's lse (cheaper than keeping it), and every sum above is one GEMM. A query block sees
// all its keys at once, so its dq is written by one GEMM; dk and dv collect over the query blocks of
// the document, so the threads share (document, head) pairs, each of which owns its dk, dv rows.
inline void attention_backward(act* dqkv, const act* dout, const act* out, const float* lse, const act* qkv,
                               const int* cu_seqlens, int n_docs, const int* positions, const float* rope, int T,
                               int nh, int hd, int window) {
    const int H = nh * hd, used = cu_seqlens[n_docs];
    const float scale = 1.0f / sqrtf((float)hd);
    std::vector<float> turned;
    if (rope) qkv = (turned = rope_copy(qkv, 3 * H, T, 3 * H, 2, positions, nh, hd, rope)).data();
    memset(dqkv + (size_t)used * 3 * H, 0, (size_t)(T - used) * 3 * H * sizeof(float));  // padding rows
#pragma omp parallel
    {
        float* P = attention_scratch(T);
        float* dS = attention_scratch(T);
#pragma omp for schedule(dynamic)
        for (int task = 0; task < n_docs * nh; task++) {
            const int d = task / nh, h = task % nh;
            for (int t = cu_seqlens[d]; t < cu_seqlens[d + 1]; t++) {  // this pair's dk, dv rows collect from 0
                float* row = dqkv + (size_t)t * 3 * H + (size_t)h * hd;
                memset(row + H, 0, sizeof(float) * hd);
                memset(row + 2 * H, 0, sizeof(float) * hd);
            }
            for (int q0 = cu_seqlens[d]; q0 < cu_seqlens[d + 1]; q0 += kAttentionBlock) {
                AttentionBlock b = attention_block(q0, cu_seqlens[d], cu_seqlens[d + 1], window);
                attention_block_scores(P, qkv, b, nh, hd, h);
                attention_block_probs(P, lse, b, cu_seqlens[d], cu_seqlens[d + 1], nh, h, window);
                const size_t q_at = (size_t)b.q0 * 3 * H + (size_t)h * hd, k_at = (size_t)b.k0 * 3 * H + H + (size_t)h * hd;
                const size_t v_at = k_at + H, o_at = (size_t)b.q0 * H + (size_t)h * hd;
                gemm(false, true, b.nq, b.nk, hd, 1.0f, dout + o_at, H, qkv + v_at, 3 * H, 0.0f, dS, b.nk);  // dout Vᵀ
                for (int r = 0; r < b.nq; r++) {
                    double D = 0.0;
                    for (int c = 0; c < hd; c++) D += (double)dout[o_at + (size_t)r * H + c] * out[o_at + (size_t)r * H + c];
                    for (int j = 0; j < b.nk; j++) {
                        float& ds = dS[(size_t)r * b.nk + j];
                        ds = P[(size_t)r * b.nk + j] * (ds - (float)D) * scale;
                    }
                }
                gemm(false, false, b.nq, hd, b.nk, 1.0f, dS, b.nk, qkv + k_at, 3 * H, 0.0f, dqkv + q_at, 3 * H);  // dq = dS K
                gemm(true, false, b.nk, hd, b.nq, 1.0f, dS, b.nk, qkv + q_at, 3 * H, 1.0f, dqkv + k_at, 3 * H);   // dk += dSᵀ Q
                gemm(true, false, b.nk, hd, b.nq, 1.0f, P, b.nk, dout + o_at, H, 1.0f, dqkv + v_at, 3 * H);      // dv += Pᵀ dout
            }
        }
        free(P);
        free(dS);
    }
    if (!rope) return;
    rope_rotate(dqkv, 3 * H, T, positions, nh, hd, rope, -1.0f);  // the gradients of the unturned q and k
    rope_rotate(dqkv + H, 3 * H, T, positions, nh, hd, rope, -1.0f);
}

// -- attention of a shard's queries against one block of keys/values (context parallelism) --
// Queries are micro-batch tokens [q_start, q_start + Tq), keys/values tokens [k_start, k_start + Tk).
// Query i sees key j iff both are in the same document (cu_seqlens (n_docs + 1) over the whole
// micro-batch) and, when window >= 0, |i − j| <= window. q: (Tq, q_stride), k, v: (Tk, kv_stride),
// head h at columns h·hd (so qkv rows with stride 3H work: q = qkv, k = qkv + H, v = qkv + 2H).
// RoPE as in attention_forward: positions (the whole micro-batch's) of query i and key j are
// positions[i] and positions[j]; a null table: no rotation.
// A ring over key blocks runs attention_block_forward per block, folds each result into the running
// one with attention_merge, and after the last merge calls attention_block_backward per block with
// the final out and lse. Plain per-(row, head) loops; sums over keys in double.

// The document d with cu_seqlens[d] ≤ i < cu_seqlens[d + 1], or −1 for padding (empty documents stepped over).
inline int attention_document(const int* cu_seqlens, int n_docs, int i) {
    int lo = 0, hi = n_docs;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (cu_seqlens[mid] <= i) lo = mid + 1;
        else hi = mid;
    }
    const int d = lo - 1;
    return (d >= 0 && i < cu_seqlens[d + 1]) ? d : -1;
}
// [*a, *b): the tokens of [lo, hi) that token i sees (by symmetry: keys of query i, or queries of key i).
inline void attention_visible(int i, const int* cu_seqlens, int n_docs, int window, int lo, int hi, int* a, int* b) {
    *a = *b = lo;
    const int d = attention_document(cu_seqlens, n_docs, i);
    if (d < 0) return;
    int j0, j1;
    attention_key_range(i, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
    if (j0 < lo) j0 = lo;
    if (j1 > hi) j1 = hi;
    if (j1 > j0) {
        *a = j0;
        *b = j1;
    }
}
// out (Tq, nh·hd): softmax(q·kᵀ·scale)·v over this block's visible keys only (scale = 1/√hd); lse (Tq, nh):
// log Σ exp(scaled scores) over them, −INFINITY (and an all-zero out row) when the block holds no visible key.
inline void attention_block_forward(float* out, float* lse, const act* q, int q_stride, int q_start, int Tq,
                                    const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                    const int* cu_seqlens, int n_docs, const int* positions, const float* rope, int nh,
                                    int hd, int window) {
    const int H = nh * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    if (rope) {  // on turned copies of q and [k | v]
        const std::vector<float> qt = rope_copy(q, q_stride, Tq, H, 1, positions + q_start, nh, hd, rope);
        const std::vector<float> kv = rope_kv_copy(k, v, kv_stride, Tk, positions + k_start, nh, hd, rope);
        attention_block_forward(out, lse, qt.data(), H, q_start, Tq, kv.data(), kv.data() + H, 2 * H, k_start, Tk,
                                cu_seqlens, n_docs, positions, nullptr, nh, hd, window);
        return;
    }
#pragma omp parallel
    {
        std::vector<float> s(Tk > 0 ? Tk : 1);
        std::vector<double> acc(hd);
#pragma omp for schedule(dynamic, 16)
        for (long task = 0; task < (long)Tq * nh; task++) {
            const int r = (int)(task / nh), h = (int)(task % nh);
            float* o = out + (size_t)r * H + (size_t)h * hd;
            int j0, j1;
            attention_visible(q_start + r, cu_seqlens, n_docs, window, k_start, k_start + Tk, &j0, &j1);
            if (j0 == j1) {
                for (int c = 0; c < hd; c++) o[c] = 0.0f;
                lse[task] = -INFINITY;
                continue;
            }
            const float* qi = q + (size_t)r * q_stride + (size_t)h * hd;
            float max_score = -INFINITY;
            for (int j = j0; j < j1; j++) {
                const float* kj = k + (size_t)(j - k_start) * kv_stride + (size_t)h * hd;
                float dot = 0.0f;
                for (int c = 0; c < hd; c++) dot += qi[c] * kj[c];
                s[j - j0] = dot * scale;
                max_score = s[j - j0] > max_score ? s[j - j0] : max_score;
            }
            const double denom = sum_exp(s.data(), s.data(), j1 - j0, max_score);
            acc.assign(hd, 0.0);
            for (int j = j0; j < j1; j++) {
                const float* vj = v + (size_t)(j - k_start) * kv_stride + (size_t)h * hd;
                for (int c = 0; c < hd; c++) acc[c] += (double)s[j - j0] * vj[c];
            }
            for (int c = 0; c < hd; c++) o[c] = (float)(acc[c] / denom);
            lse[task] = max_score + (float)log(denom);
        }
    }
}
// Merges a block's result into the running one, per (row, head): lse ← log(e^lse + e^lse_b),
// out ← out·e^(lse_old − lse) + out_b·e^(lse_b − lse); −INFINITY on either side is handled (no NaN):
// an empty block leaves the running result as it is (bitwise), an empty running result becomes the block's.
// out, out_b (T, nh·hd); lse, lse_b (T, nh).
inline void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int T, int nh, int hd) {
    const size_t H = (size_t)nh * hd;
#pragma omp parallel for schedule(static)
    for (long task = 0; task < (long)T * nh; task++) {
        const float la = lse[task], lb = lse_b[task];
        float* o = out + (size_t)(task / nh) * H + (size_t)(task % nh) * hd;
        const float* ob = out_b + (size_t)(task / nh) * H + (size_t)(task % nh) * hd;
        if (lb == -INFINITY) continue;
        if (la == -INFINITY) {
            for (int c = 0; c < hd; c++) o[c] = ob[c];
            lse[task] = lb;
            continue;
        }
        const float l = (la > lb ? la : lb) + log1pf(expf(-fabsf(la - lb)));
        const float wa = expf(la - l), wb = expf(lb - l);
        for (int c = 0; c < hd; c++) o[c] = o[c] * wa + ob[c] * wb;
        lse[task] = l;
    }
}
// The block's share of the backward, given the FINAL out and lse (after all merges) and dout (Tq, nh·hd):
// with p_ij = exp(s_ij − lse_i), D_i = dout_i · out_i, ds_ij = p_ij (dout_i · v_j − D_i) over this block's
// visible pairs: dq_i += scale Σ_j ds_ij k_j (dq (Tq, dq_stride)), dk_j += scale Σ_i ds_ij q_i,
// dv_j += Σ_i p_ij dout_i (dk, dv (Tk, dkv_stride)); they ADD (a ring adds every block's share).
// Null dq, or null dk and dv, skip that side. The dq loop runs over (query, head), the dk/dv loop over
// (key, head): each element has one writer.
inline void attention_block_backward(float* dq, float* dk, float* dv, int dq_stride, int dkv_stride, const act* dout,
                                     const act* out, const float* lse, const act* q, int q_stride, int q_start,
                                     int Tq, const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                     const int* cu_seqlens, int n_docs, const int* positions, const float* rope, int nh,
                                     int hd, int window) {
    const size_t H = (size_t)nh * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    if (rope) {  // the turned copies' gradients, collected from zero, turned back and added
        const std::vector<float> qt = rope_copy(q, q_stride, Tq, (int)H, 1, positions + q_start, nh, hd, rope);
        const std::vector<float> kv = rope_kv_copy(k, v, kv_stride, Tk, positions + k_start, nh, hd, rope);
        std::vector<float> dqt(dq ? (size_t)Tq * H : 0), dkv(dk || dv ? (size_t)Tk * 2 * H : 0);
        attention_block_backward(dq ? dqt.data() : nullptr, dk ? dkv.data() : nullptr, dv ? dkv.data() + H : nullptr,
                                 (int)H, 2 * (int)H, dout, out, lse, qt.data(), (int)H, q_start, Tq, kv.data(),
                                 kv.data() + H, 2 * (int)H, k_start, Tk, cu_seqlens, n_docs, positions, nullptr, nh, hd,
                                 window);
        if (dq) rope_rotate(dqt.data(), (int)H, Tq, positions + q_start, nh, hd, rope, -1.0f);
        if (dk) rope_rotate(dkv.data(), 2 * (int)H, Tk, positions + k_start, nh, hd, rope, -1.0f);
        for (int i = 0; dq && i < Tq; i++)
            for (size_t c = 0; c < H; c++) dq[(size_t)i * dq_stride + c] += dqt[(size_t)i * H + c];
        for (int j = 0; (dk || dv) && j < Tk; j++)
            for (size_t c = 0; c < H; c++) {
                if (dk) dk[(size_t)j * dkv_stride + c] += dkv[(size_t)j * 2 * H + c];
                if (dv) dv[(size_t)j * dkv_stride + c] += dkv[(size_t)j * 2 * H + H + c];
            }
        return;
    }
    std::vector<float> D((size_t)Tq * nh > 0 ? (size_t)Tq * nh : 1);
#pragma omp parallel for schedule(static)
    for (long task = 0; task < (long)Tq * nh; task++) {
        const size_t at = (size_t)(task / nh) * H + (size_t)(task % nh) * hd;
        double acc = 0.0;
        for (int c = 0; c < hd; c++) acc += (double)dout[at + c] * out[at + c];
        D[task] = (float)acc;
    }
    if (dq) {
#pragma omp parallel
        {
            std::vector<double> acc(hd);
#pragma omp for schedule(dynamic, 16)
            for (long task = 0; task < (long)Tq * nh; task++) {
                const int r = (int)(task / nh), h = (int)(task % nh);
                int j0, j1;
                attention_visible(q_start + r, cu_seqlens, n_docs, window, k_start, k_start + Tk, &j0, &j1);
                if (j0 == j1) continue;
                const float* qi = q + (size_t)r * q_stride + (size_t)h * hd;
                const float* gi = dout + (size_t)r * H + (size_t)h * hd;
                acc.assign(hd, 0.0);
                for (int j = j0; j < j1; j++) {
                    const float* kj = k + (size_t)(j - k_start) * kv_stride + (size_t)h * hd;
                    const float* vj = v + (size_t)(j - k_start) * kv_stride + (size_t)h * hd;
                    float s = 0.0f, dp = 0.0f;
                    for (int c = 0; c < hd; c++) {
                        s += qi[c] * kj[c];
                        dp += gi[c] * vj[c];
                    }
                    const float ds = expf(s * scale - lse[task]) * (dp - D[task]) * scale;
                    for (int c = 0; c < hd; c++) acc[c] += (double)ds * kj[c];
                }
                float* dqi = dq + (size_t)r * dq_stride + (size_t)h * hd;
                for (int c = 0; c < hd; c++) dqi[c] += (float)acc[c];
            }
        }
    }
    if (dk || dv) {
#pragma omp parallel
        {
            std::vector<double> acc_k(hd), acc_v(hd);
#pragma omp for schedule(dynamic, 16)
            for (long task = 0; task < (long)Tk * nh; task++) {
                const int jj = (int)(task / nh), h = (int)(task % nh);
                int i0, i1;
                attention_visible(k_start + jj, cu_seqlens, n_docs, window, q_start, q_start + Tq, &i0, &i1);
                if (i0 == i1) continue;
                const float* kj = k + (size_t)jj * kv_stride + (size_t)h * hd;
                const float* vj = v + (size_t)jj * kv_stride + (size_t)h * hd;
                acc_k.assign(hd, 0.0);
                acc_v.assign(hd, 0.0);
                for (int i = i0; i < i1; i++) {
                    const size_t row = (size_t)(i - q_start);
                    const float* qi = q + row * q_stride + (size_t)h * hd;
                    const float* gi = dout + row * H + (size_t)h * hd;
                    float s = 0.0f, dp = 0.0f;
                    for (int c = 0; c < hd; c++) {
                        s += qi[c] * kj[c];
                        dp += gi[c] * vj[c];
                    }
                    const float p = expf(s * scale - lse[row * nh + h]);
                    const float ds = p * (dp - D[row * nh + h]) * scale;
                    for (int c = 0; c < hd; c++) {
                        acc_k[c] += (double)ds * qi[c];
                        acc_v[c] += (double)p * gi[c];
                    }
                }
                float* dkj = dk ? dk + (size_t)jj * dkv_stride + (size_t)h * hd : nullptr;
                float* dvj = dv ? dv + (size_t)jj * dkv_stride + (size_t)h * hd : nullptr;
                for (int c = 0; c < hd; c++) {
                    if (dkj) dkj[c] += (float)acc_k[c];
                    if (dvj) dvj[c] += (float)acc_v[c];
                }
            }
        }
    }
}

// -- K/V blocks for context parallelism: what a rank sends of its shard, and the gradients it gets back --
// kv (n, 2·Hl) ← the key and value columns [Hl, 3·Hl) of rows [row0, row0 + n) of qkv (T, 3·Hl): a ring
// block or a halo as it travels. kv_unpack_add is its adjoint: dqkv's rows [row0, row0 + n), columns
// [Hl, 3·Hl) += dkv (n, 2·Hl), the gradients a block's users send back to its owner.
inline void kv_pack(act* kv, const act* qkv, int row0, int n, int Hl) {
    for (int r = 0; r < n; r++)
        for (int c = 0; c < 2 * Hl; c++) kv[(size_t)r * 2 * Hl + c] = qkv[(size_t)(row0 + r) * 3 * Hl + Hl + c];
}
inline void kv_unpack_add(float* dqkv, const float* dkv, int row0, int n, int Hl) {
    for (int r = 0; r < n; r++)
        for (int c = 0; c < 2 * Hl; c++) dqkv[(size_t)(row0 + r) * 3 * Hl + Hl + c] += dkv[(size_t)r * 2 * Hl + c];
}

// -- GELU, the exact (erf) form: gelu(x) = x/2 · (1 + erf(x/√2)) --
inline float gelu(float x) { return 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2)); }
inline float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * (float)M_SQRT1_2)) + x * expf(-0.5f * x * x) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
}
// out (n) = gelu(inp); dinp (n) = gelu'(inp) · dout
inline void gelu_forward(float* out, const float* inp, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = gelu(inp[i]);
}
inline void gelu_backward(act* dinp, const float* dout, const float* inp, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) dinp[i] = gelu_grad(inp[i]) * dout[i];
}

// -- GeGLU: inp (N, 2I) = [x | g] (the activation is on the first half); out (N, I) = gelu(x) ⊙ g --
inline void geglu_forward(act* out, const act* inp, int N, int I) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int i = 0; i < I; i++) {
            const float* row = inp + (size_t)n * 2 * I;
            out[(size_t)n * I + i] = gelu(row[i]) * row[I + i];
        }
}
// dinp (N, 2I) = [gelu'(x) ⊙ g ⊙ dout | gelu(x) ⊙ dout]; gelu and gelu' share one erf (same bits
// as gelu() and gelu_grad()).
inline void geglu_backward(act* dinp, const act* dout, const act* inp, int N, int I) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int i = 0; i < I; i++) {
            const float* row = inp + (size_t)n * 2 * I;
            const float x = row[i], dy = dout[(size_t)n * I + i];
            const float one_plus_erf = 1.0f + erff(x * (float)M_SQRT1_2);
            const float grad = 0.5f * one_plus_erf + x * expf(-0.5f * x * x) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
            dinp[(size_t)n * 2 * I + i] = grad * row[I + i] * dy;
            dinp[(size_t)n * 2 * I + I + i] = 0.5f * x * one_plus_erf * dy;
        }
}

// -- sparse prediction: only the masked rows go through the head --
// out (n_rows, C) = inp[rows]; its backward scatters: dinp[rows[r]] += dout[r]. The rows are distinct
// (masked positions), which lets the GPU scatter without atomics.
inline void gather_rows(act* out, const act* inp, const int* rows, int n_rows, int C) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n_rows; r++) memcpy(out + (size_t)r * C, inp + (size_t)rows[r] * C, sizeof(float) * C);
}
inline void scatter_rows_backward(float* dinp, const float* dout, const int* rows, int n_rows, int C) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n_rows; r++)
        for (int c = 0; c < C; c++) dinp[(size_t)rows[r] * C + c] += dout[(size_t)r * C + c];
}

// -- cross-entropy over the vocabulary, vocab-parallel: losses (N) = lse_n − logits_n[target_n] --
// Each tp rank holds a vocabulary shard; full logits are never gathered. Three forward pieces with two
// all-reduces between them (done by the caller): row_max (max over tp), then partial (sum over tp),
// then finish. lse (N) = logsumexp(logits_n) is kept for the backward, which then needs one pass over
// the shard's row. A target < 0 (−100) is ignored (loss 0, lse 0, gradient 0). The exponentials are
// fp32 (as torch's), their sum within a row double. Shapes, for every piece:
//   logits (N, V): this rank's shard, global ids [vocab_start, vocab_start + V); only the first V_valid
//   columns are real vocabulary (the rest pads a vocabulary tp does not divide: it never reaches a max,
//   a sum, a loss or a gradient). V_valid may be 0 (a shard of padding only) or V.
//   targets (N): global ids, or < 0 (ignored row).
// With one shard (vocab_start 0, V_valid = V) the pieces are plain cross-entropy.
inline void check_crossentropy_shape(int V, int V_valid) {
    if (V <= 0 || V_valid < 0 || V_valid > V) fatal("crossentropy: shard of %d columns, %d valid", V, V_valid);
}
// row_max (N) = max over the shard's valid columns; −∞ for ignored rows and when V_valid = 0.
inline void crossentropy_row_max(float* row_max, const act* logits, const int* targets, int N, int V, int V_valid) {
    check_crossentropy_shape(V, V_valid);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        float m = -INFINITY;
        if (targets[n] >= 0) {
#pragma omp simd reduction(max : m)
            for (int v = 0; v < V_valid; v++) m = x[v] > m ? x[v] : m;
        }
        row_max[n] = m;
    }
}
// partial (2N): partial[n] = Σ_{valid v} exp(logits_n[v] − row_max[n]) with row_max the global max (after
// the max over tp); partial[N + n] = logits_n[target_n − vocab_start] when the target is in this shard's
// valid columns, else 0 (the sum over tp then holds the target's logit). Ignored rows: both 0.
inline void crossentropy_sum_exp(float* partial, const act* logits, const float* row_max, const int* targets, int N,
                                 int V, int V_valid, int vocab_start) {
    check_crossentropy_shape(V, V_valid);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        const int local = targets[n] - vocab_start;
        if (targets[n] < 0) {
            partial[n] = partial[N + n] = 0.0f;
            continue;
        }
        partial[n] = (float)sum_exp(nullptr, x, V_valid, row_max[n]);
        partial[N + n] = local >= 0 && local < V_valid ? x[local] : 0.0f;
    }
}
// After the sum of partial over tp: lse (N) = row_max + log(Σ exp), losses (N) = lse − target logit
// (the loss taken in double from its parts, as one rounding). Ignored rows: both 0.
inline void crossentropy_finish(float* losses, float* lse, const float* row_max, const float* partial,
                                const int* targets, int N) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        if (targets[n] < 0) {
            losses[n] = lse[n] = 0.0f;
            continue;
        }
        const double log_s = log((double)partial[n]);
        lse[n] = row_max[n] + (float)log_s;
        losses[n] = (float)((double)row_max[n] + log_s - partial[N + n]);
    }
}
// dlogits (N, V) = dloss · (exp(logits − lse) − onehot(target − vocab_start)) on the valid columns; 0 on
// the padding columns and on ignored rows. Overwrites; may alias logits.
inline void crossentropy_backward(act* dlogits, const act* logits, const float* lse, const int* targets,
                                  float dloss, int N, int V, int V_valid, int vocab_start) {
    check_crossentropy_shape(V, V_valid);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        float* dx = dlogits + (size_t)n * V;
        if (targets[n] < 0) {
            memset(dx, 0, sizeof(float) * V);
            continue;
        }
        const float l = lse[n];
        const int target = targets[n] - vocab_start;  // may lie outside the shard: then no column matches
#pragma omp simd
        for (int v = 0; v < V_valid; v++) {
            const float p = exp_vec(x[v] - l);
            dx[v] = dloss * (v == target ? p - 1.0f : p);
        }
        if (V_valid < V) memset(dx + V_valid, 0, sizeof(float) * (V - V_valid));
    }
}

// -- reductions, returned to the host in double (the loss sum, the gradient norm) --
inline double sum(const float* x, size_t n) {
    return chunked_sum(n, [&](size_t i) { return (double)x[i]; });
}
inline double sum_squares(const float* x, size_t n) {
    return chunked_sum(n, [&](size_t i) { return (double)x[i] * x[i]; });
}

// -- AdamW, as torch.optim.AdamW computes it --
// grad is the raw gradient sum; grad_scale (1 / masked tokens · clip factor) normalises it on the fly.
// p ← p·(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
// p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)
// Over every piece of the table pieces (n_pieces; total = Σ n, the size of the CUDA grid): the
// piece's param, m and v at its offsets, lr[piece.param] (one per tensor), weight_decay if piece.decay.
inline void adamw_update_pieces(float* param, float* m, float* v, const AdamwPiece* pieces, int n_pieces,
                                [[maybe_unused]] size_t total, const float* lr, float beta1, float beta2, float eps,
                                float weight_decay, int t, float grad_scale) {
    float bias_correction1 = 1.0f - powf(beta1, (float)t);
    float bias_correction2_sqrt = sqrtf(1.0f - powf(beta2, (float)t));
    for (int k = 0; k < n_pieces; k++) {
        const AdamwPiece& piece = pieces[k];
        const float rate = lr[piece.param], wd = piece.decay ? weight_decay : 0.0f;
        float step_size = rate / bias_correction1;
        float *p = param + piece.offset, *pm = m + piece.state_offset, *pv = v + piece.state_offset;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < piece.n; i++) {
            float g = piece.grad[i] * grad_scale;
            p[i] *= 1.0f - rate * wd;
            pm[i] = beta1 * pm[i] + (1.0f - beta1) * g;
            pv[i] = beta2 * pv[i] + (1.0f - beta2) * g * g;
            float denom = sqrtf(pv[i]) / bias_correction2_sqrt + eps;
            p[i] -= step_size * pm[i] / denom;
        }
    }
}
// StableAdamW's per-tensor update clipping (ModernBERT's optimizer): the learning rate of a tensor
// is divided by max(1, RMS(g / √max(v̂, ε²))) with v̂ the bias-corrected second moment after this
// step. This returns that RMS without touching the state; adamw_update_pieces then runs with the lower lr.
inline double stable_adamw_rms(const float* grad, const float* v, size_t n, float beta2, float eps, int t,
                               float grad_scale) {
    double bias_correction2 = 1.0 - pow((double)beta2, t);
    double acc = chunked_sum(n, [&](size_t i) {
        double g = (double)grad[i] * grad_scale;
        double v_hat = (beta2 * (double)v[i] + (1.0 - beta2) * g * g) / bias_correction2;
        return g * g / fmax(v_hat, (double)eps * eps);
    });
    return sqrt(acc / (double)(n ? n : 1));
}

}  // namespace ref

#ifdef __CUDACC__
// ---- CUDA kernels ----
// The twin of every op in namespace ref: same names, same order, same signatures, device pointers.
// The activations that GEMMs and attention read (act) are bf16 here, rounded to nearest even as a
// kernel or a GEMM's epilogue writes them; every sum accumulates in fp32, and the rest (residual
// stream, statistics, weights, gradients, optimizer state) stays fp32 (DESIGN.md §5).
// Ground rules, as for the reference, plus:
//   - deterministic: every output element is written by exactly one thread, and every sum runs in a
//     fixed order (no float atomics), so two runs give bit-identical results;
//   - everything runs on the default stream; the only lazily created state is the cuBLASLt handle,
//     its workspace and its GEMM plans (see "device context"). The reductions to the host use a small
//     static device array;
//   - no fast math: expf/logf/erff/cosf/sinf/powf are the accurate ones.
#include <cstdint>
#include <tuple>
#ifndef PICOTRON_EMULATE  // (the emulator provides both)
#include <cuda_runtime.h>
#include <cublasLt.h>
#endif

// ---- error checks ----
// Every CUDA or cuBLAS call is checked, every kernel launch too (CUDA_LAUNCH below).
#define CUDA_CHECK(call)                                                                                     \
    do {                                                                                                     \
        cudaError_t cuda_status_ = (call);                                                                   \
        if (cuda_status_ != cudaSuccess)                                                                     \
            fatal("CUDA error %s (%s) at %s:%d", cudaGetErrorName(cuda_status_),                            \
                  cudaGetErrorString(cuda_status_), __FILE__, __LINE__);                                     \
    } while (0)
#define CUBLAS_CHECK(call)                                                                                   \
    do {                                                                                                     \
        cublasStatus_t cublas_status_ = (call);                                                              \
        if (cublas_status_ != CUBLAS_STATUS_SUCCESS)                                                         \
            fatal("cuBLAS error %d (%s) at %s:%d", (int)cublas_status_, cublasLtGetStatusString(cublas_status_), \
                  __FILE__, __LINE__);                                                                       \
    } while (0)
// Every kernel starts through CUDA_LAUNCH(kernel, grid, block, args...), which also checks the launch:
// the <<<grid, block>>> launch under nvcc; under the emulator its launch, which runs the kernel thread
// by thread on the CPU and names it in its error messages.
// CUDA_LAUNCH_SHARED(kernel, grid, block, shared_bytes, args...) launches with shared_bytes of dynamic
// shared memory, which the kernel reaches through dynamic_shared<T>() (16-byte aligned; never
// `extern __shared__` in a kernel, so the emulator can give each launch its own exact buffer).
// Above 48 KiB the kernel needs cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)
// first on the GPU (the emulator only refuses more than 227 KiB).
#ifdef PICOTRON_EMULATE
#define CUDA_LAUNCH(kernel, grid, block, ...)         \
    do {                                              \
        EMU_LAUNCH(kernel, grid, block, __VA_ARGS__); \
        CUDA_CHECK(cudaGetLastError());               \
    } while (0)
#define CUDA_LAUNCH_SHARED(kernel, grid, block, shared_bytes, ...)         \
    do {                                                                   \
        EMU_LAUNCH_SHARED(kernel, grid, block, shared_bytes, __VA_ARGS__); \
        CUDA_CHECK(cudaGetLastError());                                    \
    } while (0)
template <typename T>
__device__ T* dynamic_shared() {
    return ::emu::dynamic_shared<T>();
}
#else
#define CUDA_LAUNCH(kernel, grid, block, ...) \
    do {                                      \
        kernel<<<grid, block>>>(__VA_ARGS__); \
        CUDA_CHECK(cudaGetLastError());       \
    } while (0)
#define CUDA_LAUNCH_SHARED(kernel, grid, block, shared_bytes, ...) \
    do {                                                           \
        kernel<<<grid, block, shared_bytes>>>(__VA_ARGS__);        \
        CUDA_CHECK(cudaGetLastError());                            \
    } while (0)
template <typename T>
__device__ T* dynamic_shared() {
    extern __shared__ __align__(16) unsigned char dynamic_smem[];
    return reinterpret_cast<T*>(dynamic_smem);
}
#endif

namespace cuda {

// ---- launch helpers ----
constexpr int WARP_SIZE = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int BLOCK_SIZE = 256;            // threads per block of the element-wise kernels
constexpr size_t MAX_GRID_BLOCKS = 1 << 20;  // element-wise kernels grid-stride beyond this

inline size_t div_round_up(size_t a, size_t b) { return (a + b - 1) / b; }
// blocks for an element-wise kernel over n items (n > 0); the kernels grid-stride, so capping is safe
inline unsigned grid_for(size_t n) {
    size_t blocks = div_round_up(n, BLOCK_SIZE);
    return (unsigned)(blocks < MAX_GRID_BLOCKS ? blocks : MAX_GRID_BLOCKS);
}
// blocks for a kernel with one warp per task and `warps` warps per block (no grid-stride)
inline unsigned grid_for_warps(size_t tasks, int warps) {
    size_t blocks = div_round_up(tasks, (size_t)warps);
    if (blocks > 0x7fffffffu) fatal("kernel grid too large: %zu tasks", tasks);
    return (unsigned)blocks;
}

// Reductions with a fixed combination order. The xor butterfly leaves the same value in every lane
// (each step adds a and b in both lanes; float addition is commutative), so results never depend on
// which lane reads them.
template <typename T>
__device__ inline T warp_sum(T v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}
__device__ inline float warp_max(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}
// Sum or max over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. Warps reduce by butterfly, then every thread adds the warp partials in warp order. The
// leading barrier lets a kernel call this several times in a row (the shared slots are reused).
template <typename T>
__device__ inline T block_sum(T v) {
    __shared__ T partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n_warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    T total = partial[0];
    for (int w = 1; w < n_warps; w++) total += partial[w];
    return total;
}
__device__ inline float block_max(float v) {
    __shared__ float partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n_warps = blockDim.x / WARP_SIZE;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = partial[0];
    for (int w = 1; w < n_warps; w++) total = fmaxf(total, partial[w]);
    return total;
}

// ---- tensor-core primitives ----
// Thin wrappers for the warp-level tensor-core and asynchronous-copy instructions that fast kernels
// use; kernels call these and never write asm themselves. Under nvcc each is one inline-PTX
// instruction (sm_80+); under the emulator (PICOTRON_EMULATE) each calls its model in
// tests/cuda_emu_mma.h, which states the fragment layouts (PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type" and "ldmatrix") and checks them against tests/test_gpu.cu's
// tile test on a GPU. bf16 values travel as raw 16-bit patterns, two to a uint32_t register (the
// lower-indexed element in the low half). mma and ldmatrix are warp-collective: all 32 lanes call
// them together (converged, full warp).
//   mma_m16n8k16_bf16: D (16×8 f32) = A (16×16 bf16, row) · B (16×8 bf16, col) + C; per lane
//     a[4], b[2], c[4], d[4] in the PTX fragment layouts (d may alias c).
//   ldmatrix_x{1,2,4}[_trans]: 1, 2 or 4 8×8 b16 matrices from shared memory; lane 8m+i passes the
//     address of row i of matrix m (16-byte aligned); _trans delivers each matrix transposed.
//   cp_async_16 / cp_async_commit / cp_async_wait<N>: 16-byte global → shared copies (cp.async.cg,
//     both 16-byte aligned), grouped by commit; wait<N> returns once at most N of this thread's
//     groups are still in flight. Other threads see the data only after a barrier that follows the wait.
//   pack_bf16x2(lo, hi): two floats to bf16, round to nearest even (NaN stays NaN); bf16_to_float and
//   bf16x2_lo / bf16x2_hi: exact widening.
__device__ inline uint32_t pack_bf16x2(float lo, float hi) {
#ifdef PICOTRON_EMULATE
    return emu::pack_bf16x2(lo, hi);
#else
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // d.hi = cvt(a), d.lo = cvt(b)
    return r;
#endif
}
__host__ __device__ inline float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
__host__ __device__ inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }
__host__ __device__ inline float bf16x2_lo(uint32_t r) { return bits_to_float(r << 16); }
__host__ __device__ inline float bf16x2_hi(uint32_t r) { return bits_to_float(r & 0xffff0000u); }
// The activations' storage type: a bf16 as its 16 bits, the high half of the fp32 of the same value (our
// own type: the emulator has no __nv_bfloat16). to_float widens exactly; store rounds to nearest even.
struct bf16 {
    uint16_t bits;
};
using act = bf16;
__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(bf16 x) { return bf16_to_float(x.bits); }
__device__ inline void store(float* dst, float x) { *dst = x; }
__device__ inline void store(bf16* dst, float x) { dst->bits = (uint16_t)(pack_bf16x2(x, 0.0f) & 0xffffu); }

__device__ inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#ifdef PICOTRON_EMULATE
    emu::mma_m16n8k16_bf16(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

#ifndef PICOTRON_EMULATE
__device__ inline uint32_t smem_address(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif
__device__ inline void ldmatrix_x1(uint32_t r[1], const void* smem_row) {
#ifdef PICOTRON_EMULATE
    emu::ldmatrix<1, false>(r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_address(smem_row)));
#endif
}
__device__ inline void ldmatrix_x2(uint32_t r[2], const void* smem_row) {
#ifdef PICOTRON_EMULATE
    emu::ldmatrix<2, false>(r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_address(smem_row)));
#endif
}
__device__ inline void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
#ifdef PICOTRON_EMULATE
    emu::ldmatrix<4, false>(r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(smem_row)));
#endif
}
__device__ inline void ldmatrix_x1_trans(uint32_t r[1], const void* smem_row) {
#ifdef PICOTRON_EMULATE
    emu::ldmatrix<1, true>(r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(smem_address(smem_row)));
#endif
}
__device__ inline void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row) {
#ifdef PICOTRON_EMULATE
    emu::ldmatrix<2, true>(r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_address(smem_row)));
#endif
}
__device__ inline void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
#ifdef PICOTRON_EMULATE
    emu::ldmatrix<4, true>(r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(smem_row)));
#endif
}

__device__ inline void cp_async_16(void* smem, const void* gmem) {
#ifdef PICOTRON_EMULATE
    emu::cp_async_16(smem, gmem);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_address(smem)),
                 "l"(__cvta_generic_to_global(gmem))
                 : "memory");
#endif
}
__device__ inline void cp_async_commit() {
#ifdef PICOTRON_EMULATE
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ inline void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group N: N ≥ 0");
#ifdef PICOTRON_EMULATE
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// ---- device context ----
// The one piece of lazily created state: a cuBLASLt handle and a 32 MiB device workspace, made on first
// use, and the GEMM plans made as GEMMs are met. cuBLASLt uses the workspace inside its GEMMs; between
// GEMMs the two-pass column sums below keep their partial sums there. Everything runs in order on the
// default stream, so the two uses never overlap. Nothing here is ever destroyed: the context lives until
// the process exits, and a static destructor would run cuBLAS calls while the CUDA runtime shuts down.
//
// What defines a GEMM (see gemm below) apart from its pointers: the shape, the operations, the pointer
// alignments the heuristic was told (they decide which kernels may run), whether C is read, the epilogue,
// D's type (A and B are always bf16).
struct GemmKey {
    int m, n, k, lda, ldb, ldd;
    bool trans_a, trans_b, beta_zero;
    cublasLtEpilogue_t epilogue;
    uint32_t align_a, align_b, align_d, align_bias;  // align_bias 0: no bias
    cudaDataType_t d_type;
    auto fields() const {
        return std::tie(m, n, k, lda, ldb, ldd, trans_a, trans_b, beta_zero, epilogue, align_a, align_b, align_d,
                        align_bias, d_type);
    }
};
// A GEMM made once and reused: its descriptor, layouts (D's serves C: C is D) and the algorithm chosen.
struct GemmPlan {
    GemmKey key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t layout_a, layout_b, layout_d;
    cublasLtMatmulAlgo_t algo;
};
struct Blas {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    std::vector<GemmPlan> plans;  // a few dozen in training: a linear search is enough
};
inline Blas& blas() {
    static Blas b = [] {
        Blas init;
        CUBLAS_CHECK(cublasLtCreate(&init.handle));
        init.workspace_bytes = (size_t)32 << 20;
        CUDA_CHECK(cudaMalloc(&init.workspace, init.workspace_bytes));
        return init;
    }();
    return b;
}

// ---- column sums ----
// out[c] += Σ_n term(n, c) over an (N, C) array of terms (layernorm dweight, matmul dbias), in a fixed
// order, in two passes.
// Pass 1: grid (column tiles of 32, R row chunks), block (32, 32). Block (x, r) sums the rows of chunk r
// for its 32 columns: threadIdx.x is the column (a warp reads 32 consecutive floats of a row),
// threadIdx.y a row phase; thread (x, y) adds rows n0+y, n0+y+32, … in order, then the y = 0 row of
// threads adds the 32 phase sums in order and writes the chunk's partial (or, with one chunk, adds
// straight into out).
// Pass 2: one thread per column adds the R chunk partials in chunk order into out[c].
// R depends only on (N, C) — never on the GPU — so results are bit-identical run to run and machine
// to machine; it aims at ~512 blocks so that small C (768 columns = 24 tiles) still fills the GPU.
constexpr int COLUMN_SUM_TARGET_BLOCKS = 512;
template <typename Term>
__global__ void column_sum_partial_kernel(float* partial, float* out, int N, int C, int rows_per_chunk, Term term) {
    __shared__ float phase_sum[WARP_SIZE][WARP_SIZE + 1];
    const int c = blockIdx.x * WARP_SIZE + threadIdx.x;
    const int n0 = blockIdx.y * rows_per_chunk;
    const int n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
    float acc = 0.0f;
    if (c < C)
        for (int n = n0 + threadIdx.y; n < n1; n += WARP_SIZE) acc += term(n, c);
    phase_sum[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
        for (int r = 0; r < WARP_SIZE; r++) total += phase_sum[r][threadIdx.x];
        if (partial) partial[(size_t)blockIdx.y * C + c] = total;
        else out[c] += total;
    }
}
__global__ void column_sum_final_kernel(float* out, const float* partial, int n_chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float total = 0.0f;
    for (int r = 0; r < n_chunks; r++) total += partial[(size_t)r * C + c];
    out[c] += total;
}
template <typename Term>
inline void column_sum_add(float* out, int N, int C, Term term) {
    if (N <= 0 || C <= 0) return;
    const size_t column_tiles = div_round_up(C, WARP_SIZE);
    size_t chunks = div_round_up(COLUMN_SUM_TARGET_BLOCKS, column_tiles);
    const size_t max_chunks = div_round_up(N, WARP_SIZE);  // chunks of about 32 rows or more
    if (chunks > max_chunks) chunks = max_chunks;
    const size_t scratch_chunks = blas().workspace_bytes / (sizeof(float) * (size_t)C);
    if (chunks > scratch_chunks) chunks = scratch_chunks;
    if (chunks < 1) chunks = 1;
    const int rows_per_chunk = (int)div_round_up(N, chunks);
    const int n_chunks = (int)div_round_up(N, rows_per_chunk);  // no empty chunk
    float* partial = n_chunks > 1 ? static_cast<float*>(blas().workspace) : nullptr;
    dim3 grid((unsigned)column_tiles, (unsigned)n_chunks);
    CUDA_LAUNCH(column_sum_partial_kernel, grid, dim3(WARP_SIZE, WARP_SIZE), partial, out, N, C, rows_per_chunk, term);
    if (partial)
        CUDA_LAUNCH(column_sum_final_kernel, (unsigned)div_round_up(C, BLOCK_SIZE), BLOCK_SIZE, out, partial, n_chunks,
                    C);
}

// ---- memory ----
template <typename T>
inline T* alloc_array(size_t n, const char* what) {
    T* p = nullptr;
    if (cudaMalloc(&p, (n ? n : 1) * sizeof(T)) != cudaSuccess) fatal("out of device memory allocating %zu %s", n, what);
    CUDA_CHECK(cudaMemset(p, 0, (n ? n : 1) * sizeof(T)));
    return p;
}
inline float* alloc_floats(size_t n) { return alloc_array<float>(n, "floats"); }
inline int* alloc_ints(size_t n) { return alloc_array<int>(n, "ints"); }
inline void free_buffer(void* p) { CUDA_CHECK(cudaFree(p)); }
template <typename T>
inline void zero_array(T* p, size_t n) {  // all-zero bits: 0.0 in fp32 and in bf16
    if (n) CUDA_CHECK(cudaMemset(p, 0, n * sizeof(T)));
}
inline void zero_floats(float* p, size_t n) { zero_array(p, n); }
inline act* alloc_acts(size_t n) { return alloc_array<act>(n, "activations"); }
inline void zero_acts(act* p, size_t n) { zero_array(p, n); }
// dst (n) = src rounded to bf16 (nearest even). One thread per element, grid-stride.
__global__ void to_act_kernel(act* dst, const float* src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        store(&dst[i], src[i]);
}
inline void to_act(act* dst, const float* src, size_t n) {
    if (n) CUDA_LAUNCH(to_act_kernel, grid_for(n), BLOCK_SIZE, dst, src, n);
}
inline void copy_to_device(void* dst, const void* src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
inline void copy_to_host(void* dst, const void* src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
inline void copy_on_device(void* dst, const void* src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}
inline void synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }

// ---- embedding ----
// out (T, H) = wte[ids - vocab_start], zero rows for ids outside the shard.
// One thread per output element (t, c), grid-stride.
__global__ void embedding_forward_kernel(float* out, const int* ids, const float* wte, int T, int H, int vocab_start,
                                         int vocab_rows) {
    const size_t total = (size_t)T * H;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / H, c = idx % H;
        const int row = ids[t] - vocab_start;
        out[idx] = (row >= 0 && row < vocab_rows) ? wte[(size_t)row * H + c] : 0.0f;
    }
}
inline void embedding_forward(float* out, const int* ids, const float* wte, int T, int H, int vocab_start,
                              int vocab_rows) {
    if (T <= 0 || H <= 0) return;
    CUDA_LAUNCH(embedding_forward_kernel, grid_for((size_t)T * H), BLOCK_SIZE, out, ids, wte, T, H, vocab_start,
                vocab_rows);
}

// dwte (vocab_rows, H) += dout rows scattered by id, pad id skipped — without atomics.
// Grid (column tiles of 128, EMB_ROW_BLOCKS vocabulary row ranges). Block (x, y) owns columns
// [128x, 128x+128) of the vocabulary rows [r0, r1) of range y: it walks ALL tokens in order (ids staged
// through shared memory a chunk at a time) and for each token whose row falls in its range, thread c
// adds dout[t, c] into dwte[row, c]. Each dwte element has one owner thread and receives its tokens
// in increasing t, exactly the reference's order, so the result is bit-identical to ref. The branch
// on the token's row is uniform over the block (no divergence).
constexpr int EMB_COLS = 128;
constexpr int EMB_ROW_BLOCKS = 128;
constexpr int EMB_TOKEN_CHUNK = 1024;
__global__ void embedding_backward_kernel(float* dwte, const float* dout, const int* ids, int T, int H, int vocab_start,
                                          int vocab_rows, int pad_id, int rows_per_block) {
    __shared__ int row_of_token[EMB_TOKEN_CHUNK];  // shard row of each token of the chunk, −1 if not ours
    const int c = blockIdx.x * EMB_COLS + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_block;
    const int r1 = r0 + rows_per_block < vocab_rows ? r0 + rows_per_block : vocab_rows;
    for (int t0 = 0; t0 < T; t0 += EMB_TOKEN_CHUNK) {
        const int n = T - t0 < EMB_TOKEN_CHUNK ? T - t0 : EMB_TOKEN_CHUNK;
        __syncthreads();  // everyone is done with the previous chunk
        for (int u = threadIdx.x; u < n; u += blockDim.x) {
            const int id = ids[t0 + u];
            const int row = id - vocab_start;
            row_of_token[u] = (id == pad_id || row < r0 || row >= r1) ? -1 : row;
        }
        __syncthreads();
        if (c < H)
            for (int u = 0; u < n; u++) {
                const int row = row_of_token[u];
                if (row >= 0) dwte[(size_t)row * H + c] += dout[(size_t)(t0 + u) * H + c];
            }
    }
}
inline void embedding_backward(float* dwte, const float* dout, const int* ids, int T, int H, int vocab_start,
                               int vocab_rows, int pad_id) {
    if (!dwte || T <= 0 || H <= 0 || vocab_rows <= 0) return;
    const int row_blocks = vocab_rows < EMB_ROW_BLOCKS ? vocab_rows : EMB_ROW_BLOCKS;
    const int rows_per_block = (int)div_round_up(vocab_rows, row_blocks);
    dim3 grid((unsigned)div_round_up(H, EMB_COLS), (unsigned)row_blocks);
    CUDA_LAUNCH(embedding_backward_kernel, grid, EMB_COLS, dwte, dout, ids, T, H, vocab_start, vocab_rows, pad_id,
                rows_per_block);
}

// ---- layernorm ----
// out (N, C) = (inp - mean) * rstd * weight, mean and rstd (N) saved. One warp per row: lanes stride
// over the columns; two passes (mean, then the variance of x - mean) with warp butterfly sums.
constexpr int LN_WARPS = 4;  // rows per block
template <typename Out>
__global__ void layernorm_forward_kernel(Out* out, float* mean, float* rstd, const float* inp, const float* weight,
                                         int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const size_t n = (size_t)blockIdx.x * LN_WARPS + threadIdx.x / WARP_SIZE;
    if (n >= (size_t)N) return;  // the whole warp leaves together
    const float* x = inp + n * C;
    float acc = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) acc += x[c];
    const float m = warp_sum(acc) / C;
    acc = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) acc += (x[c] - m) * (x[c] - m);
    const float var = warp_sum(acc) / C;
    const float s = 1.0f / sqrtf(var + eps);
    for (int c = lane; c < C; c += WARP_SIZE) store(&out[n * C + c], ((x[c] - m) * s) * weight[c]);
    if (lane == 0) {
        mean[n] = m;
        rstd[n] = s;
    }
}
template <typename Out>  // float or act
inline void layernorm_forward(Out* out, float* mean, float* rstd, const float* inp, const float* weight, int N, int C,
                              float eps) {
    if (N <= 0 || C <= 0) return;
    CUDA_LAUNCH(layernorm_forward_kernel<Out>, grid_for_warps(N, LN_WARPS), LN_WARPS * WARP_SIZE, out, mean, rstd, inp,
                weight, N, C, eps);
}

// dinp (N, C) = (or +=, accumulate) rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * weight.
// One warp per row: a butterfly sum of the two row means, then each lane updates its columns.
__global__ void layernorm_backward_dinp_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                                               const float* mean, const float* rstd, int N, int C, bool accumulate) {
    const int lane = threadIdx.x % WARP_SIZE;
    const size_t n = (size_t)blockIdx.x * LN_WARPS + threadIdx.x / WARP_SIZE;
    if (n >= (size_t)N) return;
    const float* x = inp + n * C;
    const float* dy = dout + n * C;
    const float m = mean[n], s = rstd[n];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float xhat = (x[c] - m) * s;
        const float dxhat = dy[c] * weight[c];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
    }
    const float mean_dxhat = warp_sum(sum_dxhat) / C;
    const float mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float xhat = (x[c] - m) * s;
        const float dxhat = dy[c] * weight[c];
        const float grad = s * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        dinp[n * C + c] = accumulate ? dinp[n * C + c] + grad : grad;
    }
}
// dweight[c] += Σ_n dout[n, c] * xhat[n, c], through column_sum_add (fixed order, two passes).
struct LayerNormWeightGrad {
    const float *dout, *inp, *mean, *rstd;
    int C;
    __device__ float operator()(int n, int c) const {
        const size_t idx = (size_t)n * C + c;
        return dout[idx] * ((inp[idx] - mean[n]) * rstd[n]);
    }
};
inline void layernorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                               const float* mean, const float* rstd, int N, int C, bool accumulate) {
    if (N <= 0 || C <= 0) return;
    if (dinp)
        CUDA_LAUNCH(layernorm_backward_dinp_kernel, grid_for_warps(N, LN_WARPS), LN_WARPS * WARP_SIZE, dinp, dout, inp,
                    weight, mean, rstd, N, C, accumulate);
    if (dweight) column_sum_add(dweight, N, C, LayerNormWeightGrad{dout, inp, mean, rstd, C});
}

// ---- matmul (cuBLASLt) ----
// cuBLASLt is column-major; a row-major (r, c) matrix is the column-major (c, r) matrix with the same
// leading dimension, so each row-major product is computed as its transpose:
//   forward   out (N, OC) = inp · Wᵀ      ⇔  outᵀ (OC, N)  = W'ᵀ · inp'   (W' = W seen column-major, C×OC)
//   dinp      (N, C)     (+)= dout · W    ⇔  dinpᵀ (C, N) (+)= W' · dout'
//   dweight   (OC, C)    += doutᵀ · inp   ⇔  dweightᵀ (C, OC) += inp' · dout'ᵀ
// The handle, the workspace and the GEMM plans are the device context above (blas()).
// the largest power of two (≤ 256) dividing the address: tells the heuristic which kernels may run
inline uint32_t pointer_alignment(const void* p) {
    const uintptr_t address = (uintptr_t)p;
    uint32_t align = 256;
    while (align > 1 && address % align) align /= 2;
    return align;
}
// The plan of the GEMM `key`, made on first use: descriptor, layouts, then the heuristic's algorithm.
// cuBLASLt reads the bias pointer's alignment from the descriptor when choosing, so it is set first.
inline const GemmPlan& gemm_plan(const GemmKey& key, const void* bias) {
    Blas& lt = blas();
    for (const GemmPlan& plan : lt.plans)
        if (plan.key.fields() == key.fields()) return plan;
    GemmPlan p{key, nullptr, nullptr, nullptr, nullptr, {}};
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &key.epilogue, sizeof key.epilogue));
    if (bias) {  // the bias is D's type (cublasLt.h, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE)
        const int32_t bias_type = key.d_type;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                    sizeof bias_type));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    const int m = key.m, n = key.n, k = key.k;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.layout_a, CUDA_R_16BF, key.trans_a ? k : m, key.trans_a ? m : k, key.lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.layout_b, CUDA_R_16BF, key.trans_b ? n : k, key.trans_b ? k : n, key.ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.layout_d, key.d_type, m, n, key.ldd));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t workspace_bytes = lt.workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                      sizeof workspace_bytes));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_a,
                                                      sizeof key.align_a));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_b,
                                                      sizeof key.align_b));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_d,
                                                      sizeof key.align_d));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_d,
                                                      sizeof key.align_d));
    cublasLtMatmulHeuristicResult_t heuristic;
    int n_results = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt.handle, p.desc, p.layout_a, p.layout_b, p.layout_d,
                                                                 p.layout_d, pref, 1, &heuristic, &n_results);
    if (status != CUBLAS_STATUS_SUCCESS || n_results == 0)
        fatal("cuBLASLt has no algorithm for m=%d n=%d k=%d trans_a=%d trans_b=%d (%s) at %s:%d", m, n, k,
              (int)key.trans_a, (int)key.trans_b, cublasLtGetStatusString(status), __FILE__, __LINE__);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    p.algo = heuristic.algo;
    lt.plans.push_back(p);
    return lt.plans.back();
}
// Column-major D (m, n; leading dim ldd) = op(A) · op(B) + beta · D [+ bias (m) on every column]. A and B
// are bf16 activations; CUBLAS_COMPUTE_32F multiplies them on the tensor cores and accumulates in fp32;
// D (and C, which is D, and the bias) is fp32 or bf16 (Out), rounded to nearest even by the epilogue
// (DESIGN.md §5). A is stored (m, k), or (k, m) if trans_a; B (k, n), or (n, k) if trans_b. The bias rides in
// the epilogue (CUBLASLT_EPILOGUE_BIAS); cuBLASLt's GELU epilogues are the tanh approximation and
// ModernBERT's head needs the exact erf GELU, so that one stays a kernel (gelu_forward).
inline cudaDataType_t data_type(const float*) { return CUDA_R_32F; }
inline cudaDataType_t data_type(const act*) { return CUDA_R_16BF; }
template <typename Out>
inline void gemm(Out* d, const act* a, const act* b, const Out* bias, bool trans_a, bool trans_b, int m, int n, int k,
                 int lda, int ldb, int ldd, float beta) {
    const GemmKey key{m, n, k, lda, ldb, ldd, trans_a, trans_b, beta == 0.0f,
                      bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, pointer_alignment(a),
                      pointer_alignment(b), pointer_alignment(d), bias ? pointer_alignment(bias) : 0, data_type(d)};
    const GemmPlan& plan = gemm_plan(key, bias);
    // the plan fixes only the bias pointer's alignment: this call's pointer goes in now
    if (bias)
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    Blas& lt = blas();
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasLtMatmul(lt.handle, plan.desc, &alpha, a, plan.layout_a, b, plan.layout_b, &beta, d,
                                plan.layout_d, d, plan.layout_d, &plan.algo, lt.workspace, lt.workspace_bytes, 0));
}

// Out (float or act) is deduced from out alone (remove_cv_t<Out> is Out, but not deduced from), so that a
// null bias may be spelled nullptr.
template <typename Out>
inline void matmul_forward(Out* out, const act* inp, const act* weight, const std::remove_cv_t<Out>* bias, int N, int C,
                           int OC) {
    if (N <= 0 || OC <= 0) return;
    if (C > 0) {
        gemm(out, weight, inp, bias, true, false, OC, N, C, C, C, OC, 0.0f);
    } else if (bias) {  // an empty sum plus the bias: each row (OC) is the bias (no model layer gets here)
        for (int row = 0; row < N; row++) copy_on_device(out + (size_t)row * OC, bias, OC * sizeof(Out));
    } else {
        zero_array(out, (size_t)N * OC);  // an empty sum
    }
}
// dbias[o] += Σ_n dout[n, o], through column_sum_add (fixed order, two passes).
struct BiasGrad {
    const act* dout;
    int OC;
    __device__ float operator()(int n, int o) const { return to_float(dout[(size_t)n * OC + o]); }
};
// dinp float or act; act only written: C += into bf16 would round the running sum at every micro-batch.
template <typename Out>
inline void matmul_backward(Out* dinp, float* dweight, float* dbias, const act* dout, const act* inp,
                            const act* weight, int N, int C, int OC, bool accumulate) {
    if (dinp && accumulate && data_type(dinp) != CUDA_R_32F) fatal("matmul_backward: dinp += needs fp32 dinp, not bf16");
    if (dinp && !accumulate && N > 0 && C > 0 && OC <= 0) zero_array(dinp, (size_t)N * C);  // an empty sum
    if (N <= 0 || C <= 0 || OC <= 0) {
        if (dbias && N > 0 && OC > 0) column_sum_add(dbias, N, OC, BiasGrad{dout, OC});
        return;  // every other product is empty: nothing to add
    }
    if (dinp) gemm(dinp, weight, dout, (const Out*)nullptr, false, false, C, N, OC, C, OC, C, accumulate ? 1.0f : 0.0f);
    if (dweight) gemm(dweight, inp, dout, (const float*)nullptr, false, true, C, OC, N, C, OC, C, 1.0f);
    if (dbias) column_sum_add(dbias, N, OC, BiasGrad{dout, OC});
}
inline void matmul_backward(std::nullptr_t, float* dweight, float* dbias, const act* dout, const act* inp,
                            const act* weight, int N, int C, int OC, bool accumulate) {  // no dinp, spelled nullptr
    matmul_backward((float*)nullptr, dweight, dbias, dout, inp, weight, N, C, OC, accumulate);
}

// ---- residual ----
// x (n) += y (n). One thread per element, grid-stride.
__global__ void add_inplace_kernel(float* x, const float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}
inline void add_inplace(float* x, const float* y, size_t n) {
    if (!n) return;
    CUDA_LAUNCH(add_inplace_kernel, grid_for(n), BLOCK_SIZE, x, y, n);
}
// resid (N, C) += add, then out = LayerNorm(resid) as layernorm_forward_kernel computes it (a warp per
// row, the same sums in the same order), but the row stays in the lanes' registers between the passes
// (x[k] is column lane + 32k; the fixed-count loops unroll, so x needs no memory): resid and add are
// read once, resid written once. Rows wider than that (C > 1024) take the two kernels.
constexpr int LN_COLS_PER_LANE = 32;
__global__ void add_layernorm_forward_kernel(act* out, float* mean, float* rstd, float* resid, const float* add,
                                             const float* weight, int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const size_t n = (size_t)blockIdx.x * LN_WARPS + threadIdx.x / WARP_SIZE;
    if (n >= (size_t)N) return;  // the whole warp leaves together
    float* r = resid + n * C;
    const float* y = add + n * C;
    float x[LN_COLS_PER_LANE];
    float acc = 0.0f;
    for (int k = 0, c = lane; k < LN_COLS_PER_LANE; k++, c += WARP_SIZE)
        if (c < C) acc += (r[c] = x[k] = r[c] + y[c]);  // resid += add, kept in x[k] and summed
    const float m = warp_sum(acc) / C;
    acc = 0.0f;
    for (int k = 0, c = lane; k < LN_COLS_PER_LANE; k++, c += WARP_SIZE)
        if (c < C) acc += (x[k] - m) * (x[k] - m);
    const float var = warp_sum(acc) / C;
    const float s = 1.0f / sqrtf(var + eps);
    for (int k = 0, c = lane; k < LN_COLS_PER_LANE; k++, c += WARP_SIZE)
        if (c < C) store(&out[n * C + c], ((x[k] - m) * s) * weight[c]);
    if (lane == 0) mean[n] = m, rstd[n] = s;
}
inline void add_layernorm_forward(act* out, float* mean, float* rstd, float* resid, const float* add,
                                  const float* weight, int N, int C, float eps) {
    if (N <= 0 || C <= 0) return;
    if (C > LN_COLS_PER_LANE * WARP_SIZE) {
        add_inplace(resid, add, (size_t)N * C);
        layernorm_forward(out, mean, rstd, resid, weight, N, C, eps);
        return;
    }
    CUDA_LAUNCH(add_layernorm_forward_kernel, grid_for_warps(N, LN_WARPS), LN_WARPS * WARP_SIZE, out, mean, rstd, resid,
                add, weight, N, C, eps);
}

// ---- rope ----
// The attention kernels turn q and k as they load them (see flash_load_tile), reading cos and sin
// from this table: built on the host by ref's own code (so every angle is bit-identical to the CPU
// build's) and uploaded once per activation set.
inline void rope_table(float* table, int P, int hd, float theta) {
    std::vector<float> host((size_t)P * hd);
    ref::rope_table(host.data(), P, hd, theta);
    copy_to_device(table, host.data(), host.size() * sizeof(float));
}

// ---- attention ----
// The contract of ref's attention ops, on the tensor cores: flash attention, forward and backward,
// for head dim 64 (ModernBERT's, every size; the run set-up refuses others on the GPU build), on the
// bf16 activations q, k, v, dO and O, RoPE applied to Q and K tiles as they are loaded and undone on
// dQ and dK as they are stored. One
// pair of kernels serves every call: the whole micro-batch (attention_forward/backward: q, k and v
// from one qkv) and a query shard against one key/value block (the ring and the halo of context
// parallelism); the merge of block results and the K/V block packing are simple element-wise kernels.
// Same key range as ref::attention_key_range, usable in kernels. The relation "i sees j" (same
// document, |i − j| ≤ window) is symmetric, so the same function also gives the queries that see key j.
__host__ __device__ inline void attention_key_range(int i, int doc_start, int doc_end, int window, int* j0, int* j1) {
    *j0 = doc_start;
    *j1 = doc_end;
    if (window >= 0) {
        if (i - window > *j0) *j0 = i - window;
        if (i + window + 1 < *j1) *j1 = i + window + 1;
    }
}
// The document d with cu_seqlens[d] ≤ i < cu_seqlens[d + 1], or −1 for padding (binary search for the
// last d < n_docs with cu_seqlens[d] ≤ i; empty documents are stepped over).
__device__ inline int find_document(const int* cu_seqlens, int n_docs, int i) {
    int lo = 0, hi = n_docs;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (cu_seqlens[mid] <= i) lo = mid + 1;
        else hi = mid;
    }
    const int d = lo - 1;
    return (d >= 0 && i < cu_seqlens[d + 1]) ? d : -1;
}

// [*a, *b): the tokens of [lo, hi) that token i sees (empty for padding).
__device__ inline void attention_visible(int i, const int* cu_seqlens, int n_docs, int window, int lo, int hi, int* a,
                                         int* b) {
    *a = *b = lo;
    const int d = find_document(cu_seqlens, n_docs, i);
    if (d < 0) return;
    int j0, j1;
    attention_key_range(i, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
    if (j0 < lo) j0 = lo;
    if (j1 > hi) j1 = hi;
    if (j1 > j0) {
        *a = j0;
        *b = j1;
    }
}

// -- flash attention on tensor cores (head dim 64): the fast form of attention_block_forward --
// Same contract as ref::attention_block_forward (a query shard against one key/value block of a
// packed micro-batch, global or windowed, out and lse), computed in bf16 on the tensor cores with
// fp32 accumulation and softmax. A CTA takes 64 query rows of one head, four warps 16 rows each;
// it visits only the 64-key tiles that its rows' documents (and window) reach, and a warp skips a
// tile none of its rows sees. Per key tile: K (turned) and V into bf16 tiles in shared memory,
// S = Q·Kᵀ (mma m16n8k16, fragments by ldmatrix), masked and scaled, an online softmax (running
// max and sum per row, the four lanes of a row reduced by shuffles), then O += bf16(P)·V (P's
// fragments are S's accumulator layout, repacked; V's come by ldmatrix.trans). Out = O / Σ, lse =
// max + log Σ; a row that sees nothing gets zeros and −inf, as the reference. Every output element
// has one writer: deterministic. Inputs are bf16 activations; out is bf16 (the whole batch) or fp32
// (a block, for attention_merge).
constexpr int FLASH_TILE = 64, FLASH_HD = 64, FLASH_WARPS = 4;
__device__ inline int flash_min(int a, int b) { return a < b ? a : b; }
__device__ inline void store_bf16x2(uint16_t* dst, uint32_t pair) {  // dst[0] = low half, dst[1] = high
    dst[0] = (uint16_t)(pair & 0xffffu);
    dst[1] = (uint16_t)(pair >> 16);
}
// [*lo, *hi) ← the union of the non-empty ranges [lo_of[i], hi_of[i]) for i in [begin, end); empty
// (*lo = none_lo ≥ *hi = none_hi) when all are.
__device__ inline void flash_union(const int* lo_of, const int* hi_of, int begin, int end, int none_lo, int none_hi,
                                   int* lo, int* hi) {
    *lo = none_lo, *hi = none_hi;
    for (int i = begin; i < end; i++)
        if (hi_of[i] > lo_of[i]) *lo = lo_of[i] < *lo ? lo_of[i] : *lo, *hi = hi_of[i] > *hi ? hi_of[i] : *hi;
}
// Once the CTA's 64 rows have their ranges in shared memory (and its first tiles are loaded): the
// union over all of them into *tile_lo, *tile_hi (shared), and over this warp's 16 into *warp_lo, *warp_hi.
__device__ inline void flash_unions(const int* lo_of, const int* hi_of, int none_lo, int none_hi, int warp, int* tile_lo,
                                    int* tile_hi, int* warp_lo, int* warp_hi) {
    __syncthreads();
    if (threadIdx.x == 0) flash_union(lo_of, hi_of, 0, FLASH_TILE, none_lo, none_hi, tile_lo, tile_hi);
    __syncthreads();
    flash_union(lo_of, hi_of, 16 * warp, 16 * warp + 16, none_lo, none_hi, warp_lo, warp_hi);
}
constexpr int FLASH_LD = FLASH_HD + 8;  // shared row stride in bf16: 144 bytes, 16-byte aligned rows whose
                                        // 8 ldmatrix addresses fall in distinct bank groups
// Rows [row0, row0 + rows) of src's head at col0 → the bf16 tile, zeros past them. With a rope table,
// each row is first widened and turned by its position, positions[first + row0 + row] (first: src row
// 0's token index), then rounded to bf16 again: a thread takes dims c, c + 1 and their partners c + 32,
// c + 33, with ref's arithmetic (_rn: no FMA). Without one the values pass through exactly.
constexpr int FLASH_HALF = FLASH_HD / 2;
__device__ inline void flash_load_tile(uint16_t* dst, const act* src, int stride, int col0, int row0, int rows,
                                       int tid, int threads, const float* rope = nullptr, const int* positions = nullptr,
                                       int first = 0) {
    for (int e = tid; e < FLASH_TILE * FLASH_HALF / 2; e += threads) {
        const int row = e / (FLASH_HALF / 2), c = 2 * (e % (FLASH_HALF / 2));
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // dims c, c + 1, c + 32, c + 33
        if (row < rows) {
            const act* at = src + (size_t)(row0 + row) * stride + col0 + c;
            x[0] = to_float(at[0]), x[1] = to_float(at[1]);
            x[2] = to_float(at[FLASH_HALF]), x[3] = to_float(at[FLASH_HALF + 1]);
            if (rope) {
                const float* cs = rope + ((size_t)positions[first + row0 + row] * FLASH_HALF + c) * 2;
                for (int i = 0; i < 2; i++) {
                    const float x1 = x[i], x2 = x[2 + i], co = cs[2 * i], si = cs[2 * i + 1];
                    x[i] = __fsub_rn(__fmul_rn(x1, co), __fmul_rn(x2, si));
                    x[2 + i] = __fadd_rn(__fmul_rn(x2, co), __fmul_rn(x1, si));
                }
            }
        }
        store_bf16x2(&dst[row * FLASH_LD + c], pack_bf16x2(x[0], x[1]));
        store_bf16x2(&dst[row * FLASH_LD + FLASH_HALF + c], pack_bf16x2(x[2], x[3]));
    }
}
// Double buffering: while a tile is multiplied, the next tile's two operands (K and V, or Q and dO)
// travel by cp.async into a bf16 stage (2 × 64 × 64 of dynamic shared memory), one 16-byte copy per
// 8 elements, rows [row0, row0 + rows) of a and b at col0 (16-byte aligned: the launchers check);
// flash_load_tile then turns them from the stage into the padded bf16 tiles that ldmatrix reads.
constexpr int FLASH_COPY = 16 / (int)sizeof(act);  // the elements of one 16-byte cp.async
constexpr size_t FLASH_STAGE_BYTES = 2 * FLASH_TILE * FLASH_HD * sizeof(act);
__device__ inline void flash_stage(act* stage, const act* a, int a_stride, const act* b, int b_stride, int col0,
                                   int row0, int rows, int tid, int threads) {
    for (int e = tid; e < rows * FLASH_HD / FLASH_COPY; e += threads) {
        const int row = e / (FLASH_HD / FLASH_COPY), c = FLASH_COPY * (e % (FLASH_HD / FLASH_COPY));
        cp_async_16(&stage[row * FLASH_HD + c], a + (size_t)(row0 + row) * a_stride + col0 + c);
        cp_async_16(&stage[(FLASH_TILE + row) * FLASH_HD + c], b + (size_t)(row0 + row) * b_stride + col0 + c);
    }
    cp_async_commit();
}
// One step of a tile walk over rows [lo, hi) of a and b (a tile's rows from t, in a's numbering
// from `base`): the first call starts tile lo's copies; each waits for tile t to land in the stage,
// runs between() (what must follow the previous tile's products), turns a's rows by RoPE and moves
// both into the bf16 tiles x and y, then starts the next tile's copies, which overlap t's products.
template <typename Between>
__device__ inline void flash_walk_step(uint16_t* x, uint16_t* y, act* stage, const act* a, int a_stride,
                                       const act* b, int b_stride, int col0, int base, int lo, int hi, int t,
                                       const float* rope, const int* positions, int tid, Between between) {
    const int threads = FLASH_WARPS * WARP_SIZE, rows = flash_min(FLASH_TILE, hi - t);
    if (t == lo) flash_stage(stage, a, a_stride, b, b_stride, col0, t - base, rows, tid, threads);
    cp_async_wait<0>();
    __syncthreads();  // tile t is in the stage; the previous tile's readers are done with x and y
    between();
    flash_load_tile(x, stage, FLASH_HD, 0, 0, rows, tid, threads, rope, positions, t);
    flash_load_tile(y, stage + FLASH_TILE * FLASH_HD, FLASH_HD, 0, 0, rows, tid, threads);
    __syncthreads();  // the stage is free
    if (t + FLASH_TILE < hi)
        flash_stage(stage, a, a_stride, b, b_stride, col0, t + FLASH_TILE - base,
                    flash_min(FLASH_TILE, hi - t - FLASH_TILE), tid, threads);
}
inline void flash_check_aligned(const act* p, int stride) {  // cp.async reads 16-byte aligned rows
    if ((uintptr_t)p % 16 || stride % FLASH_COPY) fatal("flash attention: operand %p with row stride %d is not 16-byte aligned", (const void*)p, stride);
}
// Launches a flash kernel with its stage; in the backward kernels the stage and the static tiles
// together pass 48 KiB, which CUDA wants the kernel to opt in to.
#define FLASH_LAUNCH(kernel, grid, ...)                                                                                   \
    do {                                                                                                                  \
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)FLASH_STAGE_BYTES)); \
        CUDA_LAUNCH_SHARED(kernel, grid, FLASH_WARPS * WARP_SIZE, FLASH_STAGE_BYTES, __VA_ARGS__);                      \
    } while (0)
template <typename Out>  // fp32 (a block's partial result) or act (the whole batch's)
__global__ void flash_attention_forward_kernel(Out* out, float* lse, const act* q, int q_stride, int q_start, int Tq,
                                               const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                               const int* cu_seqlens, int n_docs, const int* positions,
                                               const float* rope, int nh, int window, float scale) {
    alignas(16) __shared__ uint16_t sQ[FLASH_TILE * FLASH_LD], sK[FLASH_TILE * FLASH_LD], sV[FLASH_TILE * FLASH_LD];
    __shared__ int row_lo[FLASH_TILE], row_hi[FLASH_TILE];  // each query row's visible keys [lo, hi)
    __shared__ int tile_lo, tile_hi;                         // the union over the CTA's rows
    const int h = blockIdx.y, q0 = blockIdx.x * FLASH_TILE, tid = threadIdx.x, warp = tid / WARP_SIZE;
    const int lane = tid % WARP_SIZE, g = lane / 4, t = lane % 4, mat = lane / 8, mrow = lane % 8;
    const int H = nh * FLASH_HD;
    if (tid < FLASH_TILE) {
        int lo = k_start, hi = k_start;
        if (q0 + tid < Tq) attention_visible(q_start + q0 + tid, cu_seqlens, n_docs, window, k_start, k_start + Tk, &lo, &hi);
        row_lo[tid] = lo;
        row_hi[tid] = hi;
    }
    flash_load_tile(sQ, q, q_stride, h * FLASH_HD, q0, Tq - q0, tid, blockDim.x, rope, positions, q_start);  // zeros past Tq
    int warp_lo, warp_hi;  // the union over this warp's 16 rows
    flash_unions(row_lo, row_hi, k_start + Tk, k_start, warp, &tile_lo, &tile_hi, &warp_lo, &warp_hi);
    const int ra = 16 * warp + g, rb = ra + 8;
    const int lo_a = row_lo[ra], hi_a = row_hi[ra], lo_b = row_lo[rb], hi_b = row_hi[rb];
    uint32_t qf[FLASH_HD / 16][4];  // A fragments of the warp's 16 rows, one per 16 dims
    for (int kk = 0; kk < FLASH_HD / 16; kk++)
        ldmatrix_x4(qf[kk], sQ + (16 * warp + mrow + 8 * (mat % 2)) * FLASH_LD + 16 * kk + 8 * (mat / 2));
    float o[FLASH_HD / 8][4];  // the accumulator: 8 tiles of 8 dims, rows g (0, 1) and g + 8 (2, 3)
    for (auto& tile : o)
        for (float& x : tile) x = 0.0f;
    float max_a = -INFINITY, max_b = -INFINITY, sum_a = 0.0f, sum_b = 0.0f;  // this lane's share of the sums
    act* stage = dynamic_shared<act>();  // (2, 64, 64): K | V of the tile in flight
    for (int kt = tile_lo; kt < tile_hi; kt += FLASH_TILE) {
        flash_walk_step(sK, sV, stage, k, kv_stride, v, kv_stride, h * FLASH_HD, k_start, tile_lo, tile_hi, kt, rope,
                        positions, tid, [] {});
        if (kt >= warp_hi || kt + FLASH_TILE <= warp_lo) continue;  // none of this warp's rows sees this tile
        float s[FLASH_TILE / 8][4];  // scores: 8 tiles of 8 keys
        for (auto& tile : s)
            for (float& x : tile) x = 0.0f;
        for (int p = 0; p < FLASH_TILE / 16; p++)  // keys 16p … 16p + 15
            for (int kk = 0; kk < FLASH_HD / 16; kk++) {
                uint32_t b[4];
                ldmatrix_x4(b, sK + (16 * p + mrow + 8 * (mat / 2)) * FLASH_LD + 16 * kk + 8 * (mat % 2));
                mma_m16n8k16_bf16(s[2 * p], qf[kk], b, s[2 * p]);
                mma_m16n8k16_bf16(s[2 * p + 1], qf[kk], b + 2, s[2 * p + 1]);
            }
        float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
        for (int n = 0; n < FLASH_TILE / 8; n++)
            for (int i = 0; i < 4; i++) {
                const int j = kt + 8 * n + 2 * t + i % 2;
                const bool seen = i < 2 ? (j >= lo_a && j < hi_a) : (j >= lo_b && j < hi_b);
                s[n][i] = seen ? s[n][i] * scale : -INFINITY;
                if (i < 2) tile_max_a = fmaxf(tile_max_a, s[n][i]);
                else tile_max_b = fmaxf(tile_max_b, s[n][i]);
            }
        for (int offset = 1; offset < 4; offset *= 2) {  // the 4 lanes of a row
            tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(FULL_MASK, tile_max_a, offset));
            tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(FULL_MASK, tile_max_b, offset));
        }
        const float new_a = fmaxf(max_a, tile_max_a), new_b = fmaxf(max_b, tile_max_b);
        // rescale what was summed under the old max (nothing was, while the max is −inf)
        const float alpha_a = max_a == -INFINITY ? 0.0f : expf(max_a - new_a);
        const float alpha_b = max_b == -INFINITY ? 0.0f : expf(max_b - new_b);
        sum_a *= alpha_a;
        sum_b *= alpha_b;
        for (auto& tile : o) tile[0] *= alpha_a, tile[1] *= alpha_a, tile[2] *= alpha_b, tile[3] *= alpha_b;
        for (int n = 0; n < FLASH_TILE / 8; n++)
            for (int i = 0; i < 4; i++) {
                const float mx = i < 2 ? new_a : new_b;
                s[n][i] = s[n][i] == -INFINITY ? 0.0f : expf(s[n][i] - mx);
                (i < 2 ? sum_a : sum_b) += s[n][i];
            }
        max_a = new_a;
        max_b = new_b;
        for (int p = 0; p < FLASH_TILE / 16; p++) {  // O += P (keys 16p …) · V
            const uint32_t pa[4] = {pack_bf16x2(s[2 * p][0], s[2 * p][1]), pack_bf16x2(s[2 * p][2], s[2 * p][3]),
                                    pack_bf16x2(s[2 * p + 1][0], s[2 * p + 1][1]),
                                    pack_bf16x2(s[2 * p + 1][2], s[2 * p + 1][3])};
            for (int dp = 0; dp < FLASH_HD / 16; dp++) {  // dims 16dp …
                uint32_t b[4];
                ldmatrix_x4_trans(b, sV + (16 * p + mrow + 8 * (mat % 2)) * FLASH_LD + 16 * dp + 8 * (mat / 2));
                mma_m16n8k16_bf16(o[2 * dp], pa, b, o[2 * dp]);
                mma_m16n8k16_bf16(o[2 * dp + 1], pa, b + 2, o[2 * dp + 1]);
            }
        }
    }
    for (int offset = 1; offset < 4; offset *= 2) {
        sum_a += __shfl_xor_sync(FULL_MASK, sum_a, offset);
        sum_b += __shfl_xor_sync(FULL_MASK, sum_b, offset);
    }
    for (int half = 0; half < 2; half++) {
        const int row = q0 + (half ? rb : ra);
        const float sum = half ? sum_b : sum_a, mx = half ? max_b : max_a;
        if (row >= Tq) continue;
        Out* dst = out + (size_t)row * H + (size_t)h * FLASH_HD;
        for (int n = 0; n < FLASH_HD / 8; n++)
            for (int i = 0; i < 2; i++) store(&dst[8 * n + 2 * t + i], sum > 0.0f ? o[n][2 * half + i] / sum : 0.0f);
        if (t == 0) lse[(size_t)row * nh + h] = sum > 0.0f ? mx + logf(sum) : -INFINITY;
    }
}
template <typename Out>
inline void flash_attention_forward(Out* out, float* lse, const act* q, int q_stride, int q_start, int Tq,
                                    const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                    const int* cu_seqlens, int n_docs, const int* positions, const float* rope, int nh,
                                    int hd, int window) {
    if (hd != FLASH_HD) fatal("flash attention: head dim %d, the kernel is built for %d", hd, FLASH_HD);
    if (Tq <= 0 || nh <= 0) return;
    flash_check_aligned(k, kv_stride);
    flash_check_aligned(v, kv_stride);
    FLASH_LAUNCH(flash_attention_forward_kernel<Out>, dim3((unsigned)div_round_up(Tq, FLASH_TILE), (unsigned)nh), out,
                 lse, q, q_stride, q_start, Tq, k, v, kv_stride, k_start, Tk, cu_seqlens, n_docs, positions, rope, nh,
                 window, 1.0f / sqrtf((float)hd));
}
inline void attention_block_forward(float* out, float* lse, const act* q, int q_stride, int q_start, int Tq,
                                    const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                    const int* cu_seqlens, int n_docs, const int* positions, const float* rope, int nh,
                                    int hd, int window) {
    flash_attention_forward(out, lse, q, q_stride, q_start, Tq, k, v, kv_stride, k_start, Tk, cu_seqlens, n_docs,
                            positions, rope, nh, hd, window);
}
// The whole micro-batch: its queries against its own keys, q | k | v the column blocks of qkv (T, 3H).
inline void attention_forward(act* out, float* lse, const act* qkv, const int* cu_seqlens, int n_docs,
                              const int* positions, const float* rope, int T, int nh, int hd, int window) {
    const int H = nh * hd;
    flash_attention_forward(out, lse, qkv, 3 * H, 0, T, qkv + H, qkv + 2 * H, 3 * H, 0, T, cu_seqlens, n_docs,
                            positions, rope, nh, hd, window);
}

// -- flash attention backward on tensor cores: the fast form of attention_block_backward --
// Same contract (the block op adds into its fp32 dq, dk, dv; the whole-batch op writes its bf16 dqkv,
// every row, so it needs no zeroing pass; a null dq, or null dk and dv, skips that side), in bf16 on
// the tensor cores with fp32 accumulation. P is recomputed tile by tile from the saved lse, and
// D_i = dO_i · O_i once per query tile in fp32. Two kernels, so that every output element has one
// writer and no atomics are needed (deterministic): the dq kernel takes 64 queries and walks the
// key tiles they see (S = Q·Kᵀ, dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ += dS·K); the dk/dv kernel takes
// 64 keys and walks the query tiles that see them (Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D),
// dV += Pᵀ·dO, dK += dSᵀ·Q). Each warp owns 16 rows (queries, or keys); the mma operand patterns
// are the forward's: a row-major tile as A or as the "col" B of Xᵀ by ldmatrix, and as B of X by
// ldmatrix.trans; an accumulator repacked to bf16 is the next product's A.
// acc (16 rows × 64 cols, 8 tiles) += A (16 × 64, fragments a[4][4]: 16 columns each) · Xᵀ, X a
// row-major 64 × 64 bf16 tile in shared memory (B of Xᵀ: ldmatrix without .trans).
__device__ inline void flash_mma_abt(float acc[8][4], const uint32_t a[4][4], const uint16_t* x, int mat, int mrow) {
    for (int p = 0; p < 4; p++)
        for (int kk = 0; kk < 4; kk++) {
            uint32_t b[4];
            ldmatrix_x4(b, x + (16 * p + mrow + 8 * (mat / 2)) * FLASH_LD + 16 * kk + 8 * (mat % 2));
            mma_m16n8k16_bf16(acc[2 * p], a[kk], b, acc[2 * p]);
            mma_m16n8k16_bf16(acc[2 * p + 1], a[kk], b + 2, acc[2 * p + 1]);
        }
}
// acc (16 × 64) += P (16 × 64, an fp32 accumulator, rounded to bf16 here) · X, X row-major 64 × 64
// in shared memory (B of X: ldmatrix.trans).
__device__ inline void flash_mma_pb(float acc[8][4], const float p[8][4], const uint16_t* x, int mat, int mrow) {
    for (int kk = 0; kk < 4; kk++) {
        const uint32_t a[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                               pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
        for (int dp = 0; dp < 4; dp++) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, x + (16 * kk + mrow + 8 * (mat % 2)) * FLASH_LD + 16 * dp + 8 * (mat / 2));
            mma_m16n8k16_bf16(acc[2 * dp], a, b, acc[2 * dp]);
            mma_m16n8k16_bf16(acc[2 * dp + 1], a, b + 2, acc[2 * dp + 1]);
        }
    }
}
__device__ inline void flash_fragments(uint32_t a[4][4], const uint16_t* x, int warp, int mat, int mrow) {
    for (int kk = 0; kk < 4; kk++) ldmatrix_x4(a[kk], x + (16 * warp + mrow + 8 * (mat % 2)) * FLASH_LD + 16 * kk + 8 * (mat / 2));
}
// Query row i (of the shard from q_start) of head h: the keys it sees [*lo, *hi), D = dO_i · O_i and
// its lse; a row past the shard (!real) sees nothing.
__device__ inline void flash_query_row(int* lo, int* hi, float* D, float* l, bool real, int i, const act* dout,
                                       const act* out, const float* lse, int q_start, int k_start, int Tk,
                                       const int* cu_seqlens, int n_docs, int nh, int h, int window) {
    *lo = *hi = k_start;
    *D = *l = 0.0f;
    if (!real) return;
    attention_visible(q_start + i, cu_seqlens, n_docs, window, k_start, k_start + Tk, lo, hi);
    const size_t at = (size_t)i * nh * FLASH_HD + (size_t)h * FLASH_HD;
    for (int c = 0; c < FLASH_HD; c++) *D += to_float(dout[at + c]) * to_float(out[at + c]);
    *l = lse[(size_t)i * nh + h];
}
__device__ inline void flash_zero(float x[8][4]) {
    for (int n = 0; n < 8; n++)
        for (int i = 0; i < 4; i++) x[n][i] = 0.0f;
}
// One row of a lane's 16 × 64 accumulator (its dims 8n + 2t + {0, 1}; half 0: row g, 1: row g + 8)
// times scale, into dst's 64 dims: added into fp32, written over bf16. With the row's RoPE cos and sin
// (cs), the gradient is turned back first (Rᵀ: that of the unturned q or k): the lane holds both dims
// of each pair, c and c + 32 (tiles n and n + 4).
__device__ inline void add_or_write(float* dst, float g) { *dst += g; }
__device__ inline void add_or_write(bf16* dst, float g) { store(dst, g); }
template <typename Out>
__device__ inline void flash_store_row(Out* dst, const float acc[8][4], int half, int t, float scale, const float* cs) {
    for (int n = 0; n < 4; n++)
        for (int i = 0; i < 2; i++) {
            const int c = 8 * n + 2 * t + i;
            float g1 = scale * acc[n][2 * half + i], g2 = scale * acc[n + 4][2 * half + i];
            if (cs) {
                const float co = cs[2 * c], si = cs[2 * c + 1], g = g1;
                g1 = __fadd_rn(__fmul_rn(g1, co), __fmul_rn(g2, si));
                g2 = __fsub_rn(__fmul_rn(g2, co), __fmul_rn(g, si));
            }
            add_or_write(&dst[c], g1);
            add_or_write(&dst[c + FLASH_HALF], g2);
        }
}
template <typename Out>  // fp32 (added into) or act (written)
__global__ void flash_attention_backward_dq_kernel(Out* dq, int dq_stride, const act* dout, const act* out,
                                                   const float* lse, const act* q, int q_stride, int q_start, int Tq,
                                                   const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                                   const int* cu_seqlens, int n_docs, const int* positions,
                                                   const float* rope, int nh, int window, float scale) {
    alignas(16) __shared__ uint16_t sQ[FLASH_TILE * FLASH_LD], sdO[FLASH_TILE * FLASH_LD];
    alignas(16) __shared__ uint16_t sK[FLASH_TILE * FLASH_LD], sV[FLASH_TILE * FLASH_LD];
    __shared__ int row_lo[FLASH_TILE], row_hi[FLASH_TILE];
    __shared__ float row_lse[FLASH_TILE], row_D[FLASH_TILE];
    __shared__ int tile_lo, tile_hi;
    const int h = blockIdx.y, q0 = blockIdx.x * FLASH_TILE, tid = threadIdx.x, warp = tid / WARP_SIZE;
    const int lane = tid % WARP_SIZE, g = lane / 4, t = lane % 4, mat = lane / 8, mrow = lane % 8;
    const int H = nh * FLASH_HD, rows = flash_min(FLASH_TILE, Tq - q0);
    if (tid < FLASH_TILE)
        flash_query_row(&row_lo[tid], &row_hi[tid], &row_D[tid], &row_lse[tid], tid < rows, q0 + tid, dout, out, lse,
                        q_start, k_start, Tk, cu_seqlens, n_docs, nh, h, window);
    flash_load_tile(sQ, q, q_stride, h * FLASH_HD, q0, rows, tid, blockDim.x, rope, positions, q_start);
    flash_load_tile(sdO, dout, H, h * FLASH_HD, q0, rows, tid, blockDim.x);
    int warp_lo, warp_hi;  // the union over this warp's 16 rows
    flash_unions(row_lo, row_hi, k_start + Tk, k_start, warp, &tile_lo, &tile_hi, &warp_lo, &warp_hi);
    const int ra = 16 * warp + g, rb = ra + 8;
    uint32_t qf[4][4], gf[4][4];  // A fragments of the warp's Q and dO rows
    flash_fragments(qf, sQ, warp, mat, mrow);
    flash_fragments(gf, sdO, warp, mat, mrow);
    float acc[8][4];
    flash_zero(acc);
    act* stage = dynamic_shared<act>();  // (2, 64, 64): K | V of the tile in flight, as in the forward
    for (int kt = tile_lo; kt < tile_hi; kt += FLASH_TILE) {
        flash_walk_step(sK, sV, stage, k, kv_stride, v, kv_stride, h * FLASH_HD, k_start, tile_lo, tile_hi, kt, rope,
                        positions, tid, [] {});
        if (kt >= warp_hi || kt + FLASH_TILE <= warp_lo) continue;
        float s[8][4], dp[8][4];
        flash_zero(s);
        flash_zero(dp);
        flash_mma_abt(s, qf, sK, mat, mrow);   // S = Q·Kᵀ
        flash_mma_abt(dp, gf, sV, mat, mrow);  // dP = dO·Vᵀ
        for (int n = 0; n < 8; n++)
            for (int i = 0; i < 4; i++) {
                const int r = i < 2 ? ra : rb, j = kt + 8 * n + 2 * t + i % 2;
                const float p = j >= row_lo[r] && j < row_hi[r] ? expf(s[n][i] * scale - row_lse[r]) : 0.0f;
                s[n][i] = p * (dp[n][i] - row_D[r]);  // dS
            }
        flash_mma_pb(acc, s, sK, mat, mrow);  // dQ += dS·K
    }
    for (int half = 0; half < 2; half++) {
        const int row = (half ? rb : ra);
        if (row >= rows) continue;
        const float* cs = rope ? rope + (size_t)positions[q_start + q0 + row] * FLASH_HD : nullptr;
        flash_store_row(dq + (size_t)(q0 + row) * dq_stride + (size_t)h * FLASH_HD, acc, half, t, scale, cs);
    }
}
template <typename Out>
__global__ void flash_attention_backward_dkv_kernel(Out* dk, Out* dv, int dkv_stride, const act* dout, const act* out,
                                                    const float* lse, const act* q, int q_stride, int q_start, int Tq,
                                                    const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                                    const int* cu_seqlens, int n_docs, const int* positions,
                                                    const float* rope, int nh, int window, float scale) {
    alignas(16) __shared__ uint16_t sK[FLASH_TILE * FLASH_LD], sV[FLASH_TILE * FLASH_LD];
    alignas(16) __shared__ uint16_t sQ[FLASH_TILE * FLASH_LD], sdO[FLASH_TILE * FLASH_LD];
    __shared__ int key_lo[FLASH_TILE], key_hi[FLASH_TILE];  // each key's queries [lo, hi), in q_start's numbering
    __shared__ int q_lo[FLASH_TILE], q_hi[FLASH_TILE];      // the query tile's rows' keys
    __shared__ float q_lse[FLASH_TILE], q_D[FLASH_TILE];
    __shared__ int tile_lo, tile_hi;
    const int h = blockIdx.y, k0 = blockIdx.x * FLASH_TILE, tid = threadIdx.x, warp = tid / WARP_SIZE;
    const int lane = tid % WARP_SIZE, g = lane / 4, t = lane % 4, mat = lane / 8, mrow = lane % 8;
    const int H = nh * FLASH_HD, keys = flash_min(FLASH_TILE, Tk - k0);
    if (tid < FLASH_TILE) {
        int lo = q_start, hi = q_start;
        if (tid < keys) attention_visible(k_start + k0 + tid, cu_seqlens, n_docs, window, q_start, q_start + Tq, &lo, &hi);
        key_lo[tid] = lo, key_hi[tid] = hi;
    }
    flash_load_tile(sK, k, kv_stride, h * FLASH_HD, k0, keys, tid, blockDim.x, rope, positions, k_start);
    flash_load_tile(sV, v, kv_stride, h * FLASH_HD, k0, keys, tid, blockDim.x);
    int warp_lo, warp_hi;  // the union over this warp's 16 rows
    flash_unions(key_lo, key_hi, q_start + Tq, q_start, warp, &tile_lo, &tile_hi, &warp_lo, &warp_hi);
    const int ja = k_start + k0 + 16 * warp + g, jb = ja + 8;  // this lane's two keys
    uint32_t kf[4][4], vf[4][4];
    flash_fragments(kf, sK, warp, mat, mrow);
    flash_fragments(vf, sV, warp, mat, mrow);
    float acc_k[8][4], acc_v[8][4];
    flash_zero(acc_k);
    flash_zero(acc_v);
    act* stage = dynamic_shared<act>();  // (2, 64, 64): Q | dO of the query tile in flight
    for (int qt = tile_lo; qt < tile_hi; qt += FLASH_TILE) {  // qt in q_start's numbering
        const int first = qt - q_start, rows = flash_min(FLASH_TILE, tile_hi - qt);
        flash_walk_step(sQ, sdO, stage, q, q_stride, dout, H, h * FLASH_HD, q_start, tile_lo, tile_hi, qt, rope, positions,
                        tid, [&] {  // the query tile's rows, once the previous tile's products no longer read them
                            if (tid < FLASH_TILE)
                                flash_query_row(&q_lo[tid], &q_hi[tid], &q_D[tid], &q_lse[tid], tid < rows, first + tid,
                                                dout, out, lse, q_start, k_start, Tk, cu_seqlens, n_docs, nh, h, window);
                        });
        if (qt >= warp_hi || qt + FLASH_TILE <= warp_lo) continue;
        float s[8][4], dp[8][4];
        flash_zero(s);
        flash_zero(dp);
        flash_mma_abt(s, kf, sQ, mat, mrow);    // Sᵀ = K·Qᵀ
        flash_mma_abt(dp, vf, sdO, mat, mrow);  // dPᵀ = V·dOᵀ
        for (int n = 0; n < 8; n++)
            for (int i = 0; i < 4; i++) {
                const int col = 8 * n + 2 * t + i % 2, j = i < 2 ? ja : jb;  // query qt + col, key j
                const bool seen = col < rows && j >= q_lo[col] && j < q_hi[col];
                const float p = seen ? expf(s[n][i] * scale - q_lse[col]) : 0.0f;
                s[n][i] = p;
                dp[n][i] = p * (dp[n][i] - q_D[col]);  // dSᵀ
            }
        flash_mma_pb(acc_v, s, sdO, mat, mrow);  // dV += Pᵀ·dO
        flash_mma_pb(acc_k, dp, sQ, mat, mrow);  // dK += dSᵀ·Q
    }
    for (int half = 0; half < 2; half++) {
        const int row = 16 * warp + g + 8 * half;
        if (row >= keys) continue;
        const size_t at = (size_t)(k0 + row) * dkv_stride + (size_t)h * FLASH_HD;
        const float* cs = rope ? rope + (size_t)positions[k_start + k0 + row] * FLASH_HD : nullptr;
        if (dk) flash_store_row(dk + at, acc_k, half, t, scale, cs);
        if (dv) flash_store_row(dv + at, acc_v, half, t, 1.0f, nullptr);
    }
}
template <typename Out>
inline void flash_attention_backward(Out* dq, Out* dk, Out* dv, int dq_stride, int dkv_stride, const act* dout,
                                     const act* out, const float* lse, const act* q, int q_stride, int q_start,
                                     int Tq, const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                     const int* cu_seqlens, int n_docs, const int* positions, const float* rope,
                                     int nh, int hd, int window) {
    if (hd != FLASH_HD) fatal("flash attention: head dim %d, the kernel is built for %d", hd, FLASH_HD);
    if (Tq <= 0 || Tk <= 0 || nh <= 0) return;
    const float scale = 1.0f / sqrtf((float)hd);
    for (auto [p, stride] : {std::pair{q, q_stride}, {k, kv_stride}, {v, kv_stride}, {dout, nh * hd}})
        flash_check_aligned(p, stride);
    if (dq)
        FLASH_LAUNCH(flash_attention_backward_dq_kernel<Out>, dim3((unsigned)div_round_up(Tq, FLASH_TILE), (unsigned)nh),
                     dq, dq_stride, dout, out, lse, q, q_stride, q_start, Tq, k, v, kv_stride, k_start, Tk, cu_seqlens,
                     n_docs, positions, rope, nh, window, scale);
    if (dk || dv)
        FLASH_LAUNCH(flash_attention_backward_dkv_kernel<Out>, dim3((unsigned)div_round_up(Tk, FLASH_TILE), (unsigned)nh),
                     dk, dv, dkv_stride, dout, out, lse, q, q_stride, q_start, Tq, k, v, kv_stride, k_start, Tk,
                     cu_seqlens, n_docs, positions, rope, nh, window, scale);
}
inline void attention_block_backward(float* dq, float* dk, float* dv, int dq_stride, int dkv_stride, const act* dout,
                                     const act* out, const float* lse, const act* q, int q_stride, int q_start,
                                     int Tq, const act* k, const act* v, int kv_stride, int k_start, int Tk,
                                     const int* cu_seqlens, int n_docs, const int* positions, const float* rope,
                                     int nh, int hd, int window) {
    flash_attention_backward(dq, dk, dv, dq_stride, dkv_stride, dout, out, lse, q, q_stride, q_start, Tq, k, v,
                             kv_stride, k_start, Tk, cu_seqlens, n_docs, positions, rope, nh, hd, window);
}
// dqkv (T, 3H) written in bf16: the gradients of the whole micro-batch's q | k | v.
inline void attention_backward(act* dqkv, const act* dout, const act* out, const float* lse, const act* qkv,
                               const int* cu_seqlens, int n_docs, const int* positions, const float* rope, int T,
                               int nh, int hd, int window) {
    const int H = nh * hd;
    flash_attention_backward(dqkv, dqkv + H, dqkv + 2 * H, 3 * H, 3 * H, dout, out, lse, qkv, 3 * H, 0, T, qkv + H,
                             qkv + 2 * H, 3 * H, 0, T, cu_seqlens, n_docs, positions, rope, nh, hd, window);
}
__global__ void attention_merge_kernel(float* out, float* lse, const float* out_b, const float* lse_b, int T, int nh,
                                       int hd) {
    const size_t total = (size_t)T * nh, H = (size_t)nh * hd;
    for (size_t task = blockIdx.x * (size_t)blockDim.x + threadIdx.x; task < total;
         task += (size_t)gridDim.x * blockDim.x) {
        const float la = lse[task], lb = lse_b[task];
        float* o = out + (task / nh) * H + (task % nh) * hd;
        const float* ob = out_b + (task / nh) * H + (task % nh) * hd;
        if (lb == -INFINITY) continue;
        if (la == -INFINITY) {
            for (int c = 0; c < hd; c++) o[c] = ob[c];
            lse[task] = lb;
            continue;
        }
        const float l = fmaxf(la, lb) + log1pf(expf(-fabsf(la - lb)));
        const float wa = expf(la - l), wb = expf(lb - l);
        for (int c = 0; c < hd; c++) o[c] = o[c] * wa + ob[c] * wb;
        lse[task] = l;
    }
}
inline void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int T, int nh, int hd) {
    if (T <= 0 || nh <= 0) return;
    CUDA_LAUNCH(attention_merge_kernel, grid_for((size_t)T * nh), BLOCK_SIZE, out, lse, out_b, lse_b, T, nh, hd);
}
// Same contract as ref::kv_pack / kv_unpack_add: one thread per element.
__global__ void kv_pack_kernel(act* kv, const act* qkv, int row0, int n, int Hl) {
    const size_t total = (size_t)n * 2 * Hl;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / (2 * Hl), c = i % (2 * Hl);
        kv[i] = qkv[(row0 + r) * 3 * Hl + Hl + c];
    }
}
__global__ void kv_unpack_add_kernel(float* dqkv, const float* dkv, int row0, int n, int Hl) {
    const size_t total = (size_t)n * 2 * Hl;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / (2 * Hl), c = i % (2 * Hl);
        dqkv[(row0 + r) * 3 * Hl + Hl + c] += dkv[i];
    }
}
inline void kv_pack(act* kv, const act* qkv, int row0, int n, int Hl) {
    if (n <= 0) return;
    CUDA_LAUNCH(kv_pack_kernel, grid_for((size_t)n * 2 * Hl), BLOCK_SIZE, kv, qkv, row0, n, Hl);
}
inline void kv_unpack_add(float* dqkv, const float* dkv, int row0, int n, int Hl) {
    if (n <= 0) return;
    CUDA_LAUNCH(kv_unpack_add_kernel, grid_for((size_t)n * 2 * Hl), BLOCK_SIZE, dqkv, dkv, row0, n, Hl);
}

// ---- gelu ----
// The exact (erf) GELU and its derivative, written as in ref, usable on both sides.
__host__ __device__ inline float gelu(float x) { return 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2)); }
__host__ __device__ inline float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * (float)M_SQRT1_2)) + x * expf(-0.5f * x * x) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
}
// out = gelu(inp), dinp = gelu'(inp) · dout. One thread per element, grid-stride.
__global__ void gelu_forward_kernel(float* out, const float* inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = gelu(inp[i]);
}
__global__ void gelu_backward_kernel(act* dinp, const float* dout, const float* inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        store(&dinp[i], gelu_grad(inp[i]) * dout[i]);
}
inline void gelu_forward(float* out, const float* inp, size_t n) {
    if (!n) return;
    CUDA_LAUNCH(gelu_forward_kernel, grid_for(n), BLOCK_SIZE, out, inp, n);
}
inline void gelu_backward(act* dinp, const float* dout, const float* inp, size_t n) {
    if (!n || !dinp) return;
    CUDA_LAUNCH(gelu_backward_kernel, grid_for(n), BLOCK_SIZE, dinp, dout, inp, n);
}

// ---- geglu ----
// out (N, I) = gelu(x) ⊙ g with inp rows [x | g]; dinp (N, 2I) = [gelu'(x) g dout | gelu(x) dout].
// One thread per (n, i), grid-stride; the backward thread writes both halves of its pair.
__global__ void geglu_forward_kernel(act* out, const act* inp, int N, int I) {
    const size_t total = (size_t)N * I;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t n = idx / I, i = idx % I;
        const act* row = inp + n * 2 * I;
        store(&out[idx], gelu(to_float(row[i])) * to_float(row[I + i]));
    }
}
__global__ void geglu_backward_kernel(act* dinp, const act* dout, const act* inp, int N, int I) {
    const size_t total = (size_t)N * I;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t n = idx / I, i = idx % I;
        const float x = to_float(inp[n * 2 * I + i]), g = to_float(inp[n * 2 * I + I + i]), dy = to_float(dout[idx]);
        store(&dinp[n * 2 * I + i], gelu_grad(x) * g * dy);
        store(&dinp[n * 2 * I + I + i], gelu(x) * dy);
    }
}
inline void geglu_forward(act* out, const act* inp, int N, int I) {
    if (N <= 0 || I <= 0) return;
    CUDA_LAUNCH(geglu_forward_kernel, grid_for((size_t)N * I), BLOCK_SIZE, out, inp, N, I);
}
inline void geglu_backward(act* dinp, const act* dout, const act* inp, int N, int I) {
    if (!dinp || N <= 0 || I <= 0) return;
    CUDA_LAUNCH(geglu_backward_kernel, grid_for((size_t)N * I), BLOCK_SIZE, dinp, dout, inp, N, I);
}

// ---- sparse prediction rows ----
// out (n_rows, C) = inp[rows]; dinp[rows[r]] += dout[r]. One thread per (r, c), grid-stride.
// The scatter assumes the rows are distinct (they are: the masked positions of the batch); with a
// repeated row two threads would race on the same element.
__global__ void gather_rows_kernel(act* out, const act* inp, const int* rows, int n_rows, int C) {
    const size_t total = (size_t)n_rows * C;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t r = idx / C, c = idx % C;
        out[idx] = inp[(size_t)rows[r] * C + c];
    }
}
__global__ void scatter_rows_backward_kernel(float* dinp, const float* dout, const int* rows, int n_rows, int C) {
    const size_t total = (size_t)n_rows * C;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t r = idx / C, c = idx % C;
        dinp[(size_t)rows[r] * C + c] += dout[idx];
    }
}
inline void gather_rows(act* out, const act* inp, const int* rows, int n_rows, int C) {
    if (n_rows <= 0 || C <= 0) return;
    CUDA_LAUNCH(gather_rows_kernel, grid_for((size_t)n_rows * C), BLOCK_SIZE, out, inp, rows, n_rows, C);
}
inline void scatter_rows_backward(float* dinp, const float* dout, const int* rows, int n_rows, int C) {
    if (!dinp || n_rows <= 0 || C <= 0) return;
    CUDA_LAUNCH(scatter_rows_backward_kernel, grid_for((size_t)n_rows * C), BLOCK_SIZE, dinp, dout, rows, n_rows, C);
}

// ---- cross-entropy ----
// Vocab-parallel, as the reference: logits (N, V) is this rank's shard (global ids from vocab_start, the
// first V_valid columns real, the rest padding that never counts); targets (N) global ids, < 0 ignored.
// row_max and sum_exp run one block per row n (a block max, then a block sum of exp(x − max), both in a
// fixed order); the caller all-reduces row_max (max) and partial (sum) over tp in between; finish is one
// thread per row. Ignored rows get 0 (row_max −∞).
constexpr int CE_THREADS = 512;
inline void check_crossentropy_shape(int V, int V_valid) {
    if (V <= 0 || V_valid < 0 || V_valid > V) fatal("crossentropy: shard of %d columns, %d valid", V, V_valid);
}
// row_max (N) = max over the valid columns; −∞ for ignored rows and when V_valid = 0.
__global__ void crossentropy_row_max_kernel(float* row_max, const act* logits, const int* targets, int V,
                                            int V_valid) {
    const size_t n = blockIdx.x;
    if (targets[n] < 0 || V_valid == 0) {  // uniform over the block: nobody reaches a barrier
        if (threadIdx.x == 0) row_max[n] = -INFINITY;
        return;
    }
    const act* x = logits + n * V;
    float m = -INFINITY;
    for (int v = threadIdx.x; v < V_valid; v += blockDim.x) m = fmaxf(m, to_float(x[v]));
    m = block_max(m);
    if (threadIdx.x == 0) row_max[n] = m;
}
inline void crossentropy_row_max(float* row_max, const act* logits, const int* targets, int N, int V, int V_valid) {
    check_crossentropy_shape(V, V_valid);
    if (N <= 0) return;
    CUDA_LAUNCH(crossentropy_row_max_kernel, (unsigned)N, CE_THREADS, row_max, logits, targets, V, V_valid);
}
// partial (2N): partial[n] = Σ_{valid v} exp(x[v] − row_max[n]) (row_max the global max);
// partial[N + n] = x[target − vocab_start] when that is a valid column of the shard, else 0.
__global__ void crossentropy_sum_exp_kernel(float* partial, const act* logits, const float* row_max,
                                            const int* targets, int N, int V, int V_valid, int vocab_start) {
    const size_t n = blockIdx.x;
    const int target = targets[n];
    if (target < 0) {  // uniform over the block
        if (threadIdx.x == 0) partial[n] = partial[N + n] = 0.0f;
        return;
    }
    const act* x = logits + n * V;
    const float m = row_max[n];
    float s = 0.0f;
    for (int v = threadIdx.x; v < V_valid; v += blockDim.x) s += expf(to_float(x[v]) - m);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        const int local = target - vocab_start;
        partial[n] = s;
        partial[N + n] = local >= 0 && local < V_valid ? to_float(x[local]) : 0.0f;
    }
}
inline void crossentropy_sum_exp(float* partial, const act* logits, const float* row_max, const int* targets, int N,
                                 int V, int V_valid, int vocab_start) {
    check_crossentropy_shape(V, V_valid);
    if (N <= 0) return;
    CUDA_LAUNCH(crossentropy_sum_exp_kernel, (unsigned)N, CE_THREADS, partial, logits, row_max, targets, N, V, V_valid,
                vocab_start);
}
// After the sum of partial over tp: lse (N) = row_max + log(partial[n]) (kept for the backward),
// losses (N) = lse − partial[N + n]; ignored rows: both 0. One thread per row, grid-stride.
__global__ void crossentropy_finish_kernel(float* losses, float* lse, const float* row_max, const float* partial,
                                           const int* targets, int N) {
    for (size_t n = blockIdx.x * (size_t)blockDim.x + threadIdx.x; n < (size_t)N; n += (size_t)gridDim.x * blockDim.x) {
        if (targets[n] < 0) {
            losses[n] = lse[n] = 0.0f;
            continue;
        }
        const float m = row_max[n], log_s = logf(partial[n]);
        lse[n] = m + log_s;
        losses[n] = m + log_s - partial[N + n];
    }
}
inline void crossentropy_finish(float* losses, float* lse, const float* row_max, const float* partial,
                                const int* targets, int N) {
    if (N <= 0) return;
    CUDA_LAUNCH(crossentropy_finish_kernel, grid_for((size_t)N), BLOCK_SIZE, losses, lse, row_max, partial, targets, N);
}
// dlogits (N, V) = dloss · (exp(x − lse) − onehot(target − vocab_start)) on the valid columns, overwriting;
// padding columns and ignored rows get zeros. One thread per element, grid-stride; each reads x[v] just
// before writing dx[v] at the same index, so dlogits may alias logits.
__global__ void crossentropy_backward_kernel(act* dlogits, const act* logits, const float* lse, const int* targets,
                                             float dloss, int N, int V, int V_valid, int vocab_start) {
    const size_t total = (size_t)N * V;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t n = idx / V;
        const int v = (int)(idx % V), target = targets[n];
        store(&dlogits[idx], target < 0 || v >= V_valid ? 0.0f
                             : dloss * (expf(to_float(logits[idx]) - lse[n]) - (v == target - vocab_start ? 1.0f : 0.0f)));
    }
}
inline void crossentropy_backward(act* dlogits, const act* logits, const float* lse, const int* targets,
                                  float dloss, int N, int V, int V_valid, int vocab_start) {
    check_crossentropy_shape(V, V_valid);
    if (N <= 0) return;
    CUDA_LAUNCH(crossentropy_backward_kernel, grid_for((size_t)N * V), BLOCK_SIZE, dlogits, logits, lse, targets, dloss,
                N, V, V_valid, vocab_start);
}

// ---- reductions to the host ----
// Two passes in a fixed order, in double: pass 1 runs a fixed grid (depending only on n) whose
// threads grid-stride over their elements and whose blocks write one partial each; pass 2, one block,
// adds the partials. Partials and result live in static device arrays (not lazily created state).
constexpr int REDUCE_THREADS = 256;
constexpr int REDUCE_MAX_BLOCKS = 1024;
static __device__ double reduce_partials[REDUCE_MAX_BLOCKS];
static __device__ double reduce_result;
template <typename Term>
__global__ void reduce_partials_kernel(size_t n, Term term) {
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += term(i);
    acc = block_sum(acc);
    if (threadIdx.x == 0) reduce_partials[blockIdx.x] = acc;
}
__global__ void reduce_final_kernel(int n_partials) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) acc += reduce_partials[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) reduce_result = acc;
}
template <typename Term>
inline double reduce_to_host(size_t n, Term term) {
    if (!n) return 0.0;
    const size_t blocks = div_round_up(n, REDUCE_THREADS);
    const int n_blocks = (int)(blocks < (size_t)REDUCE_MAX_BLOCKS ? blocks : (size_t)REDUCE_MAX_BLOCKS);
    CUDA_LAUNCH(reduce_partials_kernel, n_blocks, REDUCE_THREADS, n, term);
    CUDA_LAUNCH(reduce_final_kernel, 1, REDUCE_THREADS, n_blocks);
    double result = 0.0;
    CUDA_CHECK(cudaMemcpyFromSymbol(&result, reduce_result, sizeof result));
    return result;
}
struct SumTerm {
    const float* x;
    __device__ double operator()(size_t i) const { return x[i]; }
};
struct SumSquaresTerm {
    const float* x;
    __device__ double operator()(size_t i) const { return (double)x[i] * x[i]; }
};
inline double sum(const float* x, size_t n) { return reduce_to_host(n, SumTerm{x}); }
inline double sum_squares(const float* x, size_t n) { return reduce_to_host(n, SumSquaresTerm{x}); }

// ---- AdamW ----
// One launch for every piece: one thread per element of the pieces' concatenation, grid-stride; each
// finds its piece by a binary search over the table's starts (a small table, read by a warp's threads
// along the same path: it stays in cache). The scalar factors are computed as ref computes them, on the
// host or with _rn intrinsics (no FMA contraction), so the update matches ref bit for bit.
__device__ inline const AdamwPiece& piece_of(const AdamwPiece* pieces, int n_pieces, size_t i) {
    int lo = 0, hi = n_pieces - 1;  // the last piece with start ≤ i (an empty piece shares the next one's start)
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (pieces[mid].start <= i) lo = mid;
        else hi = mid - 1;
    }
    return pieces[lo];
}
__global__ void adamw_kernel(float* param, float* m, float* v, const AdamwPiece* pieces, int n_pieces, size_t total,
                             const float* lr, float beta1, float beta2, float one_minus_beta1, float one_minus_beta2,
                             float eps, float weight_decay, float bias_correction1, float bias_correction2_sqrt,
                             float grad_scale) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const AdamwPiece& piece = piece_of(pieces, n_pieces, e);
        const size_t i = e - piece.start, p_i = piece.offset + i, s_i = piece.state_offset + i;
        const float rate = lr[piece.param], step_size = __fdiv_rn(rate, bias_correction1);
        const float decay = __fsub_rn(1.0f, __fmul_rn(rate, piece.decay ? weight_decay : 0.0f));
        const float g = __fmul_rn(piece.grad[i], grad_scale);
        float p = __fmul_rn(param[p_i], decay);
        const float m_i = __fadd_rn(__fmul_rn(beta1, m[s_i]), __fmul_rn(one_minus_beta1, g));
        const float v_i = __fadd_rn(__fmul_rn(beta2, v[s_i]), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v_i), bias_correction2_sqrt), eps);
        p = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, m_i), denom));
        m[s_i] = m_i;
        v[s_i] = v_i;
        param[p_i] = p;
    }
}
inline void adamw_update_pieces(float* param, float* m, float* v, const AdamwPiece* pieces, int n_pieces, size_t total,
                                const float* lr, float beta1, float beta2, float eps, float weight_decay, int t,
                                float grad_scale) {
    if (!total) return;
    const float bias_correction1 = 1.0f - powf(beta1, (float)t);
    const float bias_correction2_sqrt = sqrtf(1.0f - powf(beta2, (float)t));
    CUDA_LAUNCH(adamw_kernel, grid_for(total), BLOCK_SIZE, param, m, v, pieces, n_pieces, total, lr, beta1, beta2,
                1.0f - beta1, 1.0f - beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, grad_scale);
}
// StableAdamW's RMS(g / √max(v̂, ε²)), v̂ the bias-corrected second moment after this step: the same
// fixed-order double reduction as sum(), each term computed in double exactly as ref does.
struct StableAdamwTerm {
    const float *grad, *v;
    float beta2, eps, grad_scale;
    double bias_correction2;
    __device__ double operator()(size_t i) const {
        const double g = (double)grad[i] * grad_scale;
        const double v_hat = (beta2 * (double)v[i] + (1.0 - beta2) * g * g) / bias_correction2;
        return g * g / fmax(v_hat, (double)eps * eps);
    }
};
inline double stable_adamw_rms(const float* grad, const float* v, size_t n, float beta2, float eps, int t,
                               float grad_scale) {
    const double bias_correction2 = 1.0 - pow((double)beta2, t);
    const double acc = reduce_to_host(n, StableAdamwTerm{grad, v, beta2, eps, grad_scale, bias_correction2});
    return sqrt(acc / (double)(n ? n : 1));
}
}  // namespace cuda
namespace ops = cuda;
#else
namespace ops = ref;
#endif
