// kernels.cuh — every numeric op of ModernBERT, written twice with one signature:
//
//   namespace ref   the plain C++ loops: the readable specification. The CPU build runs these
//                   (GEMMs go to OpenBLAS); the GPU tests compare every kernel against them.
//   namespace cuda  the CUDA kernels and their launchers (only when nvcc compiles this file).
//
// `namespace ops` names the set this build runs; picotron.cu only ever calls ops::.
//
// Conventions shared by every op:
//   - row-major fp32 buffers; pointers live where the build computes (host for CPU, device for GPU);
//   - shape comments use T tokens, N rows, C/H columns, I intermediate, V vocabulary, nh heads,
//     hd head dim (64);
//   - a *_forward writes its outputs; a *_backward ADDS into its gradient outputs (+=), so gradients
//     that meet at a residual or a tied weight simply accumulate; a null gradient pointer is skipped;
//   - nothing uses float atomics whose order changes between runs: results are deterministic.
#pragma once
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mpi.h>
#ifndef __CUDACC__
#include <cblas.h>
#endif

// ---- errors ----
// Every failure anywhere ends the whole job: print one line, then MPI_Abort so that no rank is left
// waiting in a collective. Before MPI is up (or after it is down) a plain exit does the same.
[[noreturn]] inline void fatal(const char* fmt, ...) {
    char msg[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg, sizeof msg, fmt, args);
    va_end(args);
    int rank = 0, initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    fprintf(stderr, "picotron: rank %d: %s\n", rank, msg);
    fflush(stderr);
    if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}
#define MPI_CHECK(call)                                                                         \
    do {                                                                                        \
        int mpi_status_ = (call);                                                               \
        if (mpi_status_ != MPI_SUCCESS) fatal("MPI error %d at %s:%d", mpi_status_, __FILE__, __LINE__); \
    } while (0)

// ---- reference ops ----
// One function per op, plain loops, accumulation in double where a sum runs long so that the
// reference is the most accurate thing in the project (finite-difference checks lean on it).
namespace ref {

// -- memory: the CPU build's "device" is the host --
inline float* alloc_floats(size_t n) {
    float* p = static_cast<float*>(calloc(n ? n : 1, sizeof(float)));
    if (!p) fatal("out of host memory allocating %zu floats", n);
    return p;
}
inline int* alloc_ints(size_t n) {
    int* p = static_cast<int*>(calloc(n ? n : 1, sizeof(int)));
    if (!p) fatal("out of host memory allocating %zu ints", n);
    return p;
}
inline void free_buffer(void* p) { free(p); }
inline void zero_floats(float* p, size_t n) { memset(p, 0, n * sizeof(float)); }
inline void copy_to_device(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void copy_to_host(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void copy_on_device(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
inline void synchronize() {}

// -- embedding lookup over a vocabulary shard [vocab_start, vocab_start + vocab_rows) --
// out (T, H) = wte[ids - vocab_start]; ids outside the shard give zero rows (tensor parallel sums them).
inline void embedding_forward(float* out, const int* ids, const float* wte, int T, int H, int vocab_start,
                              int vocab_rows) {
    for (int t = 0; t < T; t++) {
        int row = ids[t] - vocab_start;
        for (int c = 0; c < H; c++)
            out[(size_t)t * H + c] = (row >= 0 && row < vocab_rows) ? wte[(size_t)row * H + c] : 0.0f;
    }
}
// dwte (vocab_rows, H) += dout rows scattered by id; the padding id gets no gradient (HF padding_idx).
inline void embedding_backward(float* dwte, const float* dout, const int* ids, int T, int H, int vocab_start,
                               int vocab_rows, int pad_id) {
    for (int t = 0; t < T; t++) {
        int row = ids[t] - vocab_start;
        if (ids[t] == pad_id || row < 0 || row >= vocab_rows) continue;
        for (int c = 0; c < H; c++) dwte[(size_t)row * H + c] += dout[(size_t)t * H + c];
    }
}

// -- LayerNorm without bias --
// out (N, C) = (inp - mean) * rstd * weight; mean, rstd (N) are kept for the backward.
inline void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, int N,
                              int C, float eps) {
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
// dinp (N, C) += ∂/∂inp, dweight (C) += ∂/∂weight, given dout (N, C).
inline void layernorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                               const float* weight, const float* mean, const float* rstd, int N, int C) {
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
        for (int c = 0; c < C; c++) {
            double xhat = (x[c] - mean[n]) * rstd[n];
            double dxhat = (double)dy[c] * weight[c];
            if (dweight) dweight[c] += (float)(dy[c] * xhat);
            if (dinp) dinp[(size_t)n * C + c] += (float)(rstd[n] * (dxhat - sum_dxhat / C - xhat * sum_dxhat_xhat / C));
        }
    }
}

// -- linear layer: out (N, OC) = inp (N, C) · weight (OC, C)ᵀ [+ bias (OC)] --
// The GEMM is the one op the reference hands to a library (OpenBLAS): loops here would make the
// CPU build too slow to train anything; the finite-difference tests still check it.
inline void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int C,
                           int OC) {
#ifdef __CUDACC__
    for (int n = 0; n < N; n++)  // the GPU build's reference (used only by its tests): plain loops
        for (int o = 0; o < OC; o++) {
            double acc = bias ? bias[o] : 0.0;
            for (int c = 0; c < C; c++) acc += (double)inp[(size_t)n * C + c] * weight[(size_t)o * C + c];
            out[(size_t)n * OC + o] = (float)acc;
        }
#else
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
    if (bias)
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) out[(size_t)n * OC + o] += bias[o];
#endif
}
// dinp (N, C) += dout · weight; dweight (OC, C) += doutᵀ · inp; dbias (OC) += Σ_n dout.
inline void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                            const float* weight, int N, int C, int OC) {
#ifdef __CUDACC__
    if (dinp)
        for (int n = 0; n < N; n++)
            for (int c = 0; c < C; c++) {
                double acc = 0.0;
                for (int o = 0; o < OC; o++) acc += (double)dout[(size_t)n * OC + o] * weight[(size_t)o * C + c];
                dinp[(size_t)n * C + c] += (float)acc;
            }
    if (dweight)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                double acc = 0.0;
                for (int n = 0; n < N; n++) acc += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * C + c];
                dweight[(size_t)o * C + c] += (float)acc;
            }
#else
    if (dinp) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    if (dweight)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
#endif
    if (dbias)
        for (int o = 0; o < OC; o++) {
            double acc = 0.0;
            for (int n = 0; n < N; n++) acc += dout[(size_t)n * OC + o];
            dbias[o] += (float)acc;
        }
}

// -- residual: x (n) += y (n); its backward is the identity, so it has none --
inline void add_inplace(float* x, const float* y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

// -- rotary position embedding, rotate-half style, on the q and k parts of qkv --
// qkv (T, 3, nh, hd) rows are [q heads | k heads | v heads]. Pair (i, i + hd/2) of each q/k head
// turns by angle pos[t] · inv_freq_i, inv_freq_i = θ^(−2i/hd), everything in accurate fp32 as
// transformers computes it (the float product pos·inv_freq is rounded once, then cos/sin).
inline float rope_inv_freq(int i, int hd, float theta) { return 1.0f / powf(theta, (float)(2 * i) / (float)hd); }
inline void rope_rotate(float* qkv, const int* pos, int T, int nh, int hd, float theta, float direction) {
    int half = hd / 2;
    for (int t = 0; t < T; t++)
        for (int part = 0; part < 2; part++)  // q, then k; v is not rotated
            for (int h = 0; h < nh; h++) {
                float* x = qkv + (size_t)t * 3 * nh * hd + (size_t)part * nh * hd + (size_t)h * hd;
                for (int i = 0; i < half; i++) {
                    float angle = (float)pos[t] * rope_inv_freq(i, hd, theta);
                    float c = cosf(angle), s = direction * sinf(angle);
                    float x1 = x[i], x2 = x[i + half];
                    x[i] = x1 * c - x2 * s;
                    x[i + half] = x2 * c + x1 * s;
                }
            }
}
// in place: q, k ← R(pos) q, R(pos) k
inline void rope_forward(float* qkv, const int* pos, int T, int nh, int hd, float theta) {
    rope_rotate(qkv, pos, T, nh, hd, theta, 1.0f);
}
// in place: dq, dk ← R(pos)ᵀ dq, R(pos)ᵀ dk (a rotation's transpose turns the other way)
inline void rope_backward(float* dqkv, const int* pos, int T, int nh, int hd, float theta) {
    rope_rotate(dqkv, pos, T, nh, hd, theta, -1.0f);
}

// -- attention confined to each packed document, optionally to a ±window band --
// qkv (T, 3, nh, hd); out (T, nh, hd); lse (T, nh) = log Σ_j exp(s_ij), kept for the backward.
// Token i of document d = [cu_seqlens[d], cu_seqlens[d+1]) sees keys j of the same document with
// |i − j| ≤ window (window < 0: no band). Tokens past cu_seqlens[n_docs] are padding: zero output.
inline void attention_key_range(int i, int doc_start, int doc_end, int window, int* j0, int* j1) {
    *j0 = doc_start;
    *j1 = doc_end;
    if (window >= 0) {
        if (i - window > *j0) *j0 = i - window;
        if (i + window + 1 < *j1) *j1 = i + window + 1;
    }
}
inline void attention_forward(float* out, float* lse, const float* qkv, const int* cu_seqlens, int n_docs, int T,
                              int nh, int hd, int window) {
    const int H = nh * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    memset(out, 0, (size_t)T * H * sizeof(float));
    for (int t = 0; t < T * nh; t++) lse[t] = 0.0f;
    double* scores = static_cast<double*>(malloc(sizeof(double) * (size_t)(T > 0 ? T : 1)));
    for (int d = 0; d < n_docs; d++)
        for (int i = cu_seqlens[d]; i < cu_seqlens[d + 1]; i++)
            for (int h = 0; h < nh; h++) {
                const float* q = qkv + (size_t)i * 3 * H + (size_t)h * hd;
                int j0, j1;
                attention_key_range(i, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
                double max_score = -INFINITY;
                for (int j = j0; j < j1; j++) {
                    const float* k = qkv + (size_t)j * 3 * H + H + (size_t)h * hd;
                    double s = 0.0;
                    for (int c = 0; c < hd; c++) s += (double)q[c] * k[c];
                    scores[j - j0] = s * scale;
                    if (scores[j - j0] > max_score) max_score = scores[j - j0];
                }
                double denom = 0.0;
                for (int j = j0; j < j1; j++) {
                    scores[j - j0] = exp(scores[j - j0] - max_score);  // now unnormalised probabilities
                    denom += scores[j - j0];
                }
                float* o = out + (size_t)i * H + (size_t)h * hd;
                for (int c = 0; c < hd; c++) {
                    double acc = 0.0;
                    for (int j = j0; j < j1; j++) acc += scores[j - j0] * qkv[(size_t)j * 3 * H + 2 * H + (size_t)h * hd + c];
                    o[c] = (float)(acc / denom);
                }
                lse[(size_t)i * nh + h] = (float)(max_score + log(denom));
            }
    free(scores);
}
// dqkv (T, 3, nh, hd) += gradients of q, k, v. With p_ij = exp(s_ij − lse_i) and
// D_i = dout_i · out_i: dv_j += p_ij dout_i; ds_ij = p_ij (dout_i · v_j − D_i);
// dq_i += scale Σ_j ds_ij k_j; dk_j += scale ds_ij q_i.
inline void attention_backward(float* dqkv, const float* dout, const float* out, const float* lse, const float* qkv,
                               const int* cu_seqlens, int n_docs, int T, int nh, int hd, int window) {
    (void)T;
    const int H = nh * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int d = 0; d < n_docs; d++)
        for (int i = cu_seqlens[d]; i < cu_seqlens[d + 1]; i++)
            for (int h = 0; h < nh; h++) {
                const float* q = qkv + (size_t)i * 3 * H + (size_t)h * hd;
                const float* dout_i = dout + (size_t)i * H + (size_t)h * hd;
                const float* out_i = out + (size_t)i * H + (size_t)h * hd;
                float* dq = dqkv + (size_t)i * 3 * H + (size_t)h * hd;
                double D = 0.0;
                for (int c = 0; c < hd; c++) D += (double)dout_i[c] * out_i[c];
                int j0, j1;
                attention_key_range(i, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
                for (int j = j0; j < j1; j++) {
                    const float* k = qkv + (size_t)j * 3 * H + H + (size_t)h * hd;
                    const float* v = qkv + (size_t)j * 3 * H + 2 * H + (size_t)h * hd;
                    float* dk = dqkv + (size_t)j * 3 * H + H + (size_t)h * hd;
                    float* dv = dqkv + (size_t)j * 3 * H + 2 * H + (size_t)h * hd;
                    double s = 0.0, dp = 0.0;
                    for (int c = 0; c < hd; c++) {
                        s += (double)q[c] * k[c];
                        dp += (double)dout_i[c] * v[c];
                    }
                    double p = exp(s * scale - lse[(size_t)i * nh + h]);
                    double ds = p * (dp - D) * scale;
                    for (int c = 0; c < hd; c++) {
                        dq[c] += (float)(ds * k[c]);
                        dk[c] += (float)(ds * q[c]);
                        dv[c] += (float)(p * dout_i[c]);
                    }
                }
            }
}

// -- GELU, the exact (erf) form: gelu(x) = x/2 · (1 + erf(x/√2)) --
inline float gelu(float x) { return 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2)); }
inline float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * (float)M_SQRT1_2)) + x * expf(-0.5f * x * x) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);
}
// out (n) = gelu(inp); dinp (n) += gelu'(inp) · dout
inline void gelu_forward(float* out, const float* inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = gelu(inp[i]);
}
inline void gelu_backward(float* dinp, const float* dout, const float* inp, size_t n) {
    for (size_t i = 0; i < n; i++) dinp[i] += gelu_grad(inp[i]) * dout[i];
}

// -- GeGLU: inp (N, 2I) = [x | g] (the activation is on the first half); out (N, I) = gelu(x) ⊙ g --
inline void geglu_forward(float* out, const float* inp, int N, int I) {
    for (int n = 0; n < N; n++)
        for (int i = 0; i < I; i++) {
            const float* row = inp + (size_t)n * 2 * I;
            out[(size_t)n * I + i] = gelu(row[i]) * row[I + i];
        }
}
// dinp (N, 2I) += [gelu'(x) ⊙ g ⊙ dout | gelu(x) ⊙ dout]
inline void geglu_backward(float* dinp, const float* dout, const float* inp, int N, int I) {
    for (int n = 0; n < N; n++)
        for (int i = 0; i < I; i++) {
            const float* row = inp + (size_t)n * 2 * I;
            float dy = dout[(size_t)n * I + i];
            dinp[(size_t)n * 2 * I + i] += gelu_grad(row[i]) * row[I + i] * dy;
            dinp[(size_t)n * 2 * I + I + i] += gelu(row[i]) * dy;
        }
}

// -- sparse prediction: only the masked rows go through the head --
// out (n_rows, C) = inp[rows]; its backward scatters: dinp[rows[r]] += dout[r].
inline void gather_rows(float* out, const float* inp, const int* rows, int n_rows, int C) {
    for (int r = 0; r < n_rows; r++) memcpy(out + (size_t)r * C, inp + (size_t)rows[r] * C, sizeof(float) * C);
}
inline void scatter_rows_backward(float* dinp, const float* dout, const int* rows, int n_rows, int C) {
    for (int r = 0; r < n_rows; r++)
        for (int c = 0; c < C; c++) dinp[(size_t)rows[r] * C + c] += dout[(size_t)r * C + c];
}

// -- cross-entropy over the vocabulary: losses (N) = logsumexp(logits_n) − logits_n[target_n] --
// A target of −100 is ignored (loss 0, gradient 0).
inline void crossentropy_forward(float* losses, const float* logits, const int* targets, int N, int V) {
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        if (targets[n] < 0) { losses[n] = 0.0f; continue; }
        double m = -INFINITY, s = 0.0;
        for (int v = 0; v < V; v++) m = x[v] > m ? x[v] : m;
        for (int v = 0; v < V; v++) s += exp(x[v] - m);
        losses[n] = (float)(m + log(s) - x[targets[n]]);
    }
}
// dlogits (N, V) = dloss · (softmax(logits) − onehot(target)). Overwrites; may alias logits.
inline void crossentropy_backward(float* dlogits, const float* logits, const int* targets, float dloss, int N, int V) {
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * V;
        float* dx = dlogits + (size_t)n * V;
        if (targets[n] < 0) { memset(dx, 0, sizeof(float) * V); continue; }
        double m = -INFINITY, s = 0.0;
        for (int v = 0; v < V; v++) m = x[v] > m ? x[v] : m;
        for (int v = 0; v < V; v++) s += exp(x[v] - m);
        int target = targets[n];
        for (int v = 0; v < V; v++) {
            double p = exp(x[v] - m) / s;
            dx[v] = (float)(dloss * (p - (v == target ? 1.0 : 0.0)));
        }
    }
}

// -- reductions, returned to the host in double (the loss sum, the gradient norm) --
inline double sum(const float* x, size_t n) {
    double acc = 0.0;
    for (size_t i = 0; i < n; i++) acc += x[i];
    return acc;
}
inline double sum_squares(const float* x, size_t n) {
    double acc = 0.0;
    for (size_t i = 0; i < n; i++) acc += (double)x[i] * x[i];
    return acc;
}

// -- AdamW, as torch.optim.AdamW computes it --
// grad is the raw gradient sum; grad_scale (1 / masked tokens · clip factor) normalises it on the fly.
// p ← p·(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
// p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)
inline void adamw_update(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                         float beta2, float eps, float weight_decay, int t, float grad_scale) {
    float bias_correction1 = 1.0f - powf(beta1, (float)t);
    float bias_correction2_sqrt = sqrtf(1.0f - powf(beta2, (float)t));
    float step_size = lr / bias_correction1;
    for (size_t i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        param[i] *= 1.0f - lr * weight_decay;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        float denom = sqrtf(v[i]) / bias_correction2_sqrt + eps;
        param[i] -= step_size * m[i] / denom;
    }
}
// StableAdamW's per-tensor update clipping (ModernBERT's optimizer): the learning rate of a tensor
// is divided by max(1, RMS(g / √max(v̂, ε²))) with v̂ the bias-corrected second moment after this
// step. This returns that RMS without touching the state; adamw_update then runs with the lower lr.
inline double stable_adamw_rms(const float* grad, const float* v, size_t n, float beta2, float eps, int t,
                               float grad_scale) {
    double bias_correction2 = 1.0 - pow((double)beta2, t);
    double acc = 0.0;
    for (size_t i = 0; i < n; i++) {
        double g = (double)grad[i] * grad_scale;
        double v_hat = (beta2 * (double)v[i] + (1.0 - beta2) * g * g) / bias_correction2;
        acc += g * g / fmax(v_hat, (double)eps * eps);
    }
    return sqrt(acc / (double)(n ? n : 1));
}

}  // namespace ref

#ifdef __CUDACC__
// ---- CUDA kernels ----
// Same signatures as namespace ref, device pointers. Written for clarity first; speed comes later.
#include "kernels_cuda.cuh"
namespace ops = cuda;
#else
namespace ops = ref;
#endif
