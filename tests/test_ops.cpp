// tests/test_ops.cpp — gradient checks of every reference op in kernels.cuh (namespace ref).
//
// Method, for every op and every input x of it:
//   - random inputs from a fixed-seed xorshift, a random upstream gradient G, objective f = Σ G ⊙ forward(x)
//     accumulated in double;
//   - analytic gradient: the op's backward called on gradient buffers pre-filled with C_FILL, minus C_FILL
//     where it adds (weight gradients, accumulate = true: one that overwrote would be off by C_FILL), as is
//     where it writes (an op that added would be off by C_FILL; check_written compares the two modes);
//   - numeric gradient: central difference (f(x+h) − f(x−h)) / (x₊ − x₋), where x₊, x₋ are the fp32 values
//     actually stored (so the rounding of x ± h does not bias the quotient). Linear ops (embedding, matmul,
//     gather/scatter): h = 1e-2. Nonlinear ops (layernorm, attention, gelu, geglu, crossentropy): h = 5e-2 with
//     Richardson extrapolation against 2h (see H_NL);
//   - element-wise test |a − n| ≤ atol + rtol·|n|. Each PASS line prints the worst ratio
//     |a − n| / (atol + rtol·|n|) so the margin is visible. Tolerances (atol, rtol):
//       embedding, gather/scatter 1e-5, 1e-5   matmul 1e-4, 1e-4   (linear: the quotient is exact up to fp32)
//       layernorm, attention, gelu, geglu, crossentropy 2e-5, 2e-4 (observed worst ratio ≈ 0.05–0.1)
//       rope: transpose element by element 1e-6, 1e-6; forwards against double transcriptions 1e-5 (abs);
//       adamw: param 2e-6 abs (the per-step update is ~1e-2), m, v 1e-5 rel; stable_adamw_rms 1e-9 rel.
// Self-checks (attention, layernorm, matmul, geglu, crossentropy): the analytic gradient is corrupted on
// purpose (largest element ×1.1, a median-size element ×1.1, two elements swapped, a sign flipped, a factor 2;
// for attention also the backward run with D_i = 0, a missing term) and the same comparison must then FAIL;
// detecting the corruption counts as a PASS.
//
// Build: mpicxx -std=c++17 -O2 -Wall -Wextra -DOMPI_SKIP_MPICXX -I. tests/test_ops.cpp -o tests/test_ops -lopenblas
// Run:   ./tests/test_ops      (prints PASS/FAIL per check, ends with "N passed, M failed"; exit 1 on failure)
#include "kernels.cuh"

#include <algorithm>
#include <functional>
#include <limits>
#include <string>
#include <vector>

using std::vector;

// ---------------------------------------------------------------------------------------------------------
// bookkeeping
static int g_passed = 0, g_failed = 0;
static void pass(const std::string& name, const char* fmt = nullptr, ...) {
    char extra[512] = "";
    if (fmt) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(extra, sizeof extra, fmt, args);
        va_end(args);
    }
    printf("PASS %s%s%s\n", name.c_str(), fmt ? " " : "", extra);
    g_passed++;
}
static void fail(const std::string& name, const char* fmt, ...) {
    char extra[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(extra, sizeof extra, fmt, args);
    va_end(args);
    printf("FAIL %s: %s\n", name.c_str(), extra);
    g_failed++;
}
static void check(const std::string& name, bool ok, const char* fmt, ...) {
    char extra[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(extra, sizeof extra, fmt, args);
    va_end(args);
    if (ok) extra[0] ? pass(name, "%s", extra) : pass(name);
    else fail(name, "%s", extra);
}

// ---------------------------------------------------------------------------------------------------------
// random numbers: xorshift64*, fixed seed
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64() {
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}
static float uniform(float lo, float hi) {  // [lo, hi)
    double u = (double)(next_u64() >> 11) * (1.0 / 9007199254740992.0);
    return (float)(lo + (hi - lo) * u);
}
static vector<float> random_vec(size_t n, float lo = -1.0f, float hi = 1.0f) {
    vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
}

// nonlinear ops: Richardson-extrapolated central differences at h = 5e-2 (points x ± 0.05, x ± 0.1). At h = 1e-2
// the plain quotient's error is dominated by the fp32 rounding of the forward (~1e-5 / 2h), not by truncation;
// a 5x larger h cuts that 5x and the extrapolation removes the O(h²) truncation that a larger h brings.
static const double H_NL = 5e-2;
static const bool RICH = true;
static const float C_FILL = 0.75f;  // the known constant gradient buffers start from

static double dot(const vector<float>& a, const vector<float>& b) {
    double acc = 0.0;
    for (size_t i = 0; i < a.size(); i++) acc += (double)a[i] * b[i];
    return acc;
}
static vector<double> minus_fill(const vector<float>& g) {
    vector<double> r(g.size());
    for (size_t i = 0; i < g.size(); i++) r[i] = (double)g[i] - C_FILL;
    return r;
}
static vector<double> as_double(const vector<float>& g) { return vector<double>(g.begin(), g.end()); }
// An overwriting backward, run on a buffer pre-filled with C_FILL, against the accumulating run minus
// C_FILL: equal up to the rounding of adding C_FILL (an accumulating op would be off by C_FILL).
static void check_written(const std::string& name, const vector<float>& written, const vector<double>& accumulated) {
    double worst = 0.0;
    for (size_t i = 0; i < written.size(); i++) worst = std::max(worst, fabs(written[i] - accumulated[i]));
    check(name + " writes its gradient", worst <= 1e-6, "(max abs diff %.2e, tol 1e-6)", worst);
}

// Central differences of objective() with respect to every element of x (x is perturbed in place and restored).
// The quotient divides by the spacing of the fp32 values actually stored, so the rounding of x ± h does not bias
// it. With richardson, the central differences at h and 2h are combined, D = D_h + (D_h − D_2h) / (r² − 1)
// (r = 2h/h from the stored spacings), which cancels the O(h²) truncation term: the nonlinear ops use this so
// that the remaining error is the fp32 rounding of the forward (~1e-6 here) and the tolerance can be tight.
static double central(vector<float>& x, size_t i, const std::function<double()>& objective, double h,
                      double* spacing) {
    float x0 = x[i];
    float xp = (float)(x0 + h), xm = (float)(x0 - h);
    x[i] = xp;
    double fp = objective();
    x[i] = xm;
    double fm = objective();
    x[i] = x0;
    *spacing = (double)xp - (double)xm;
    return (fp - fm) / *spacing;
}
static vector<double> numeric_grad(vector<float>& x, const std::function<double()>& objective, double h,
                                   bool richardson = false) {
    vector<double> g(x.size());
    for (size_t i = 0; i < x.size(); i++) {
        double s1, s2;
        double d1 = central(x, i, objective, h, &s1);
        if (!richardson) {
            g[i] = d1;
            continue;
        }
        double d2 = central(x, i, objective, 2 * h, &s2);
        double r = s2 / s1;
        g[i] = d1 + (d1 - d2) / (r * r - 1.0);
    }
    return g;
}

struct Tol {
    double atol, rtol;
};
struct CompareResult {
    bool ok;
    double worst_ratio;  // max |a − n| / (atol + rtol |n|)
    size_t worst_index;
    double worst_a, worst_n;
};
static CompareResult compare(const vector<double>& a, const vector<double>& n, Tol tol,
                             const vector<char>* skip = nullptr) {
    CompareResult r{true, 0.0, 0, 0.0, 0.0};
    for (size_t i = 0; i < a.size(); i++) {
        if (skip && (*skip)[i]) continue;
        double ratio = fabs(a[i] - n[i]) / (tol.atol + tol.rtol * fabs(n[i]));
        if (!(ratio <= 1.0)) r.ok = false;  // NaN fails too
        if (!(ratio <= r.worst_ratio)) {
            r.worst_ratio = ratio;
            r.worst_index = i;
            r.worst_a = a[i];
            r.worst_n = n[i];
        }
    }
    return r;
}
// Report an analytic-vs-numeric comparison as one PASS/FAIL line.
static bool grad_check(const std::string& name, const vector<double>& a, const vector<double>& n, Tol tol,
                       const vector<char>* skip = nullptr) {
    CompareResult r = compare(a, n, tol, skip);
    if (r.ok)
        pass(name, "(n=%zu, atol %.0e rtol %.0e, worst err/tol %.3f)", a.size(), tol.atol, tol.rtol, r.worst_ratio);
    else
        fail(name, "element %zu analytic %.7g numeric %.7g (err/tol %.2f; atol %.0e rtol %.0e)", r.worst_index,
             r.worst_a, r.worst_n, r.worst_ratio, tol.atol, tol.rtol);
    return r.ok;
}

// Self-checks: corrupt a correct analytic gradient in several ways; each corruption must be caught.
static size_t argmax_abs(const vector<double>& a) {
    size_t k = 0;
    for (size_t i = 1; i < a.size(); i++)
        if (fabs(a[i]) > fabs(a[k])) k = i;
    return k;
}
static void self_checks(const std::string& name, const vector<double>& a, const vector<double>& n, Tol tol) {
    // (1) one element scaled by 1.1: the largest one (the check must see a 10% error where it matters)
    {
        vector<double> b = a;
        size_t k = argmax_abs(b);
        b[k] *= 1.1;
        CompareResult r = compare(b, n, tol);
        check("selfcheck " + name + " one element x1.1 detected", !r.ok, "(element %zu, err/tol %.2f)", k,
              r.worst_ratio);
    }
    // (2) two elements swapped (a transposed index): the largest with the one most different from it
    {
        vector<double> b = a;
        size_t k = argmax_abs(b), m = 0;
        for (size_t i = 0; i < b.size(); i++)
            if (fabs(b[i] - b[k]) > fabs(b[m] - b[k])) m = i;
        std::swap(b[k], b[m]);
        CompareResult r = compare(b, n, tol);
        check("selfcheck " + name + " two elements swapped detected", !r.ok, "(elements %zu,%zu, err/tol %.2f)", k,
              m, r.worst_ratio);
    }
    // (3) a wrong sign on the largest element
    {
        vector<double> b = a;
        b[argmax_abs(b)] *= -1.0;
        CompareResult r = compare(b, n, tol);
        check("selfcheck " + name + " wrong sign detected", !r.ok, "(err/tol %.2f)", r.worst_ratio);
    }
    // (4) a 10% error on a typical element (the one closest to the median magnitude of the non-zero ones)
    {
        vector<double> mags;
        for (double x : a)
            if (fabs(x) > 1e-6) mags.push_back(fabs(x));
        if (!mags.empty()) {
            std::nth_element(mags.begin(), mags.begin() + mags.size() / 2, mags.end());
            double med = mags[mags.size() / 2];
            size_t k = 0;
            for (size_t i = 0; i < a.size(); i++)
                if (fabs(fabs(a[i]) - med) < fabs(fabs(a[k]) - med)) k = i;
            vector<double> b = a;
            b[k] *= 1.1;
            CompareResult r = compare(b, n, tol);
            check("selfcheck " + name + " median-size element x1.1 detected", !r.ok,
                  "(element %zu, |a| %.3g, err/tol %.2f)", k, fabs(a[k]), r.worst_ratio);
        }
    }
    // (5) a factor 2 on everything
    {
        vector<double> b = a;
        for (auto& x : b) x *= 2.0;
        CompareResult r = compare(b, n, tol);
        check("selfcheck " + name + " factor 2 detected", !r.ok, "(err/tol %.2f)", r.worst_ratio);
    }
}

// ---------------------------------------------------------------------------------------------------------
// embedding: vocabulary shard [10, 16), H = 4; ids below, inside (with repeats), above, and the pad id.
static void test_embedding() {
    const int T = 10, H = 4, vocab_start = 10, vocab_rows = 6, pad_id = 13;
    const int ids[T] = {12, 3, 10, 15, 13, 12, 16, 40, 11, 13};  // 3, 16, 40: outside; 13: pad (twice)
    vector<float> wte = random_vec((size_t)vocab_rows * H);
    vector<float> G = random_vec((size_t)T * H);
    vector<float> out((size_t)T * H);

    // forward: rows outside the shard are exact zeros, rows inside are copies
    ref::embedding_forward(out.data(), ids, wte.data(), T, H, vocab_start, vocab_rows);
    bool ok = true;
    for (int t = 0; t < T; t++) {
        int row = ids[t] - vocab_start;
        bool inside = row >= 0 && row < vocab_rows;
        for (int c = 0; c < H; c++) {
            float want = inside ? wte[(size_t)row * H + c] : 0.0f;
            if (out[(size_t)t * H + c] != want) ok = false;
        }
    }
    check("embedding forward (shard rows copied, outside rows zero)", ok, "");

    // backward into a buffer with guard zones on both sides (ids outside the shard must not write anywhere)
    const int guard = 64;
    vector<float> buf((size_t)vocab_rows * H + 2 * guard, C_FILL);
    float* dwte = buf.data() + guard;
    ref::embedding_backward(dwte, G.data(), ids, T, H, vocab_start, vocab_rows, pad_id);
    bool guard_ok = true;
    for (int i = 0; i < guard; i++)
        if (buf[i] != C_FILL || buf[guard + (size_t)vocab_rows * H + i] != C_FILL) guard_ok = false;
    check("embedding backward writes nothing outside the shard buffer", guard_ok, "");

    vector<float> dw(dwte, dwte + (size_t)vocab_rows * H);
    vector<double> a = minus_fill(dw);
    // the pad row gets no gradient at all (even though the forward does read it)
    int pad_row = pad_id - vocab_start;
    bool pad_ok = true;
    for (int c = 0; c < H; c++)
        if (dw[(size_t)pad_row * H + c] != C_FILL) pad_ok = false;
    check("embedding pad id row gets no gradient", pad_ok, "");
    // rows no token maps to (row 4 = id 14) stay untouched
    bool unused_ok = true;
    for (int c = 0; c < H; c++)
        if (dw[(size_t)4 * H + c] != C_FILL) unused_ok = false;
    check("embedding unused row gets no gradient", unused_ok, "");

    auto objective = [&]() {
        ref::embedding_forward(out.data(), ids, wte.data(), T, H, vocab_start, vocab_rows);
        return dot(G, out);
    };
    vector<double> n = numeric_grad(wte, objective, 1e-2);
    vector<char> skip((size_t)vocab_rows * H, 0);
    for (int c = 0; c < H; c++) skip[(size_t)pad_row * H + c] = 1;  // the pad row is checked above
    // linear op: the difference quotient is exact up to fp32 rounding of x ± h → tight tolerance
    grad_check("embedding dwte (non-pad rows, repeated ids accumulate)", a, n, {1e-5, 1e-5}, &skip);
}

// ---------------------------------------------------------------------------------------------------------
// layernorm: N = 3, C = 8, eps 1e-5
static void test_layernorm() {
    const int N = 3, C = 8;
    const float eps = 1e-5f;
    vector<float> inp = random_vec((size_t)N * C, -2.0f, 2.0f);
    vector<float> w = random_vec(C, 0.5f, 1.5f);
    vector<float> G = random_vec((size_t)N * C);
    vector<float> out((size_t)N * C), mean(N), rstd(N);

    // forward against a double transcription
    ref::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), N, C, eps);
    double worst = 0.0;
    for (int n = 0; n < N; n++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += inp[n * C + c];
        m /= C;
        for (int c = 0; c < C; c++) v += (inp[n * C + c] - m) * (inp[n * C + c] - m);
        v /= C;
        for (int c = 0; c < C; c++) {
            double y = (inp[n * C + c] - m) / sqrt(v + eps) * w[c];
            worst = std::max(worst, fabs(y - out[n * C + c]));
        }
    }
    check("layernorm forward vs double", worst <= 1e-5, "(max abs err %.2e, tol 1e-5)", worst);

    vector<float> dinp((size_t)N * C, C_FILL), dw(C, C_FILL);
    ref::layernorm_backward(dinp.data(), dw.data(), G.data(), inp.data(), w.data(), mean.data(), rstd.data(), N, C,
                            true);
    vector<double> a_inp = minus_fill(dinp), a_w = minus_fill(dw);
    // without accumulate, dinp is written: the same gradient whatever the buffer held
    vector<float> dinp_written((size_t)N * C, C_FILL);
    ref::layernorm_backward(dinp_written.data(), nullptr, G.data(), inp.data(), w.data(), mean.data(), rstd.data(), N,
                            C, false);
    check_written("layernorm dinp (accumulate false)", dinp_written, a_inp);

    auto objective = [&]() {
        vector<float> o((size_t)N * C), mm(N), rs(N);
        ref::layernorm_forward(o.data(), mm.data(), rs.data(), inp.data(), w.data(), N, C, eps);
        return dot(G, o);
    };
    const Tol tol{2e-5, 2e-4};
    vector<double> n_inp = numeric_grad(inp, objective, H_NL, RICH);
    vector<double> n_w = numeric_grad(w, objective, H_NL, RICH);
    grad_check("layernorm dinp", a_inp, n_inp, tol);
    grad_check("layernorm dweight", a_w, n_w, tol);
    self_checks("layernorm dinp", a_inp, n_inp, tol);
    self_checks("layernorm dweight", a_w, n_w, tol);

    // null gradient pointers: each output alone equals its part of the full call
    vector<float> dinp2((size_t)N * C, C_FILL), dw2(C, C_FILL);
    ref::layernorm_backward(dinp2.data(), nullptr, G.data(), inp.data(), w.data(), mean.data(), rstd.data(), N, C,
                            true);
    ref::layernorm_backward(nullptr, dw2.data(), G.data(), inp.data(), w.data(), mean.data(), rstd.data(), N, C, true);
    ref::layernorm_backward(nullptr, nullptr, G.data(), inp.data(), w.data(), mean.data(), rstd.data(), N, C, true);
    check("layernorm null gradient pointers skipped", dinp2 == dinp && dw2 == dw, "");
}

// ---------------------------------------------------------------------------------------------------------
// matmul: N = 5, C = 6, OC = 4, with and without bias, null gradient pointers
static void test_matmul() {
    const int N = 5, C = 6, OC = 4;
    vector<float> inp = random_vec((size_t)N * C), w = random_vec((size_t)OC * C), b = random_vec(OC);
    vector<float> G = random_vec((size_t)N * OC);
    vector<float> out((size_t)N * OC);

    for (int with_bias = 0; with_bias < 2; with_bias++) {
        ref::matmul_forward(out.data(), inp.data(), w.data(), with_bias ? b.data() : nullptr, N, C, OC);
        double worst = 0;
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) {
                double acc = with_bias ? b[o] : 0.0;
                for (int c = 0; c < C; c++) acc += (double)inp[n * C + c] * w[o * C + c];
                worst = std::max(worst, fabs(acc - out[n * OC + o]));
            }
        check(with_bias ? "matmul forward (bias) vs loops" : "matmul forward (no bias) vs loops", worst <= 1e-5,
              "(max abs err %.2e, tol 1e-5)", worst);
    }

    vector<float> dinp((size_t)N * C, C_FILL), dw((size_t)OC * C, C_FILL), db(OC, C_FILL);
    ref::matmul_backward(dinp.data(), dw.data(), db.data(), G.data(), inp.data(), w.data(), N, C, OC, true);
    vector<double> a_inp = minus_fill(dinp), a_w = minus_fill(dw), a_b = minus_fill(db);
    vector<float> dinp_written((size_t)N * C, C_FILL);
    ref::matmul_backward(dinp_written.data(), nullptr, nullptr, G.data(), inp.data(), w.data(), N, C, OC, false);
    check_written("matmul dinp (accumulate false)", dinp_written, a_inp);

    auto objective = [&]() {
        ref::matmul_forward(out.data(), inp.data(), w.data(), b.data(), N, C, OC);
        return dot(G, out);
    };
    // linear in each input: the quotient is exact up to fp32 rounding of the outputs (~1e-7 / 2h)
    const Tol tol{1e-4, 1e-4};
    vector<double> n_inp = numeric_grad(inp, objective, 1e-2);
    vector<double> n_w = numeric_grad(w, objective, 1e-2);
    vector<double> n_b = numeric_grad(b, objective, 1e-2);
    grad_check("matmul dinp", a_inp, n_inp, tol);
    grad_check("matmul dweight", a_w, n_w, tol);
    grad_check("matmul dbias", a_b, n_b, tol);
    self_checks("matmul dweight", a_w, n_w, tol);

    // null gradient pointers: each combination gives exactly the non-null parts of the full call
    auto same = [](const vector<float>& x, const vector<float>& y) {
        for (size_t i = 0; i < x.size(); i++)
            if (fabs(x[i] - y[i]) > 1e-6) return false;
        return true;
    };
    // all 8 combinations of null / non-null (dinp, dweight, dbias)
    for (int mask = 0; mask < 8; mask++) {
        vector<float> di((size_t)N * C, C_FILL), dww((size_t)OC * C, C_FILL), dbb(OC, C_FILL);
        ref::matmul_backward((mask & 1) ? di.data() : nullptr, (mask & 2) ? dww.data() : nullptr,
                             (mask & 4) ? dbb.data() : nullptr, G.data(), inp.data(), w.data(), N, C, OC, true);
        bool ok = same(di, (mask & 1) ? dinp : vector<float>((size_t)N * C, C_FILL)) &&
                  same(dww, (mask & 2) ? dw : vector<float>((size_t)OC * C, C_FILL)) &&
                  same(dbb, (mask & 4) ? db : vector<float>(OC, C_FILL));
        char name[128];
        snprintf(name, sizeof name, "matmul backward with dinp %s, dweight %s, dbias %s", (mask & 1) ? "set" : "null",
                 (mask & 2) ? "set" : "null", (mask & 4) ? "set" : "null");
        check(name, ok, "");
    }
}

// ---------------------------------------------------------------------------------------------------------
// RoPE on the q and k parts of qkv (T, 3, nh, hd) as the attention ops apply it: ref::rope_rotate
// with the table of positions < 8 (direction −1: the transpose).
static void rope_qk(float* qkv, const int* pos, int T, int nh, int hd, float theta, float direction) {
    vector<float> table((size_t)8 * hd);
    ref::rope_table(table.data(), 8, hd, theta);
    for (int part = 0; part < 2; part++)
        ref::rope_rotate(qkv + part * nh * hd, 3 * nh * hd, T, pos, nh, hd, table.data(), direction);
}
// rope: qkv (T, 3, nh, hd), checked as a linear map
static void test_rope() {
    const int T = 5, nh = 2, hd = 8, W = 3 * nh * hd;
    const float theta = 10000.0f;
    const int pos[T] = {0, 3, 1, 7, 0};
    const size_t n = (size_t)T * W;

    // hand calculation, hd = 8, θ = 10000, pos = 3:
    //   i = 1: inv_freq = 10000^(−2/8) = 0.1, angle 0.3: cos 0.955336489125606, sin 0.29552020666133955
    //          q = (x1, x2) = (0.5, −0.25) → (0.5 cos + 0.25 sin, −0.25 cos + 0.5 sin)
    //            = (0.5515482962281378, −0.09107401895073172)
    //   i = 0: inv_freq = 1, angle 3 (k part, head 1): cos −0.9899924966004454, sin 0.1411200080598672
    //          k = (1, 2) → (cos − 2 sin, 2 cos + sin) = (−1.272232512720180, −1.838864985141024)
    {
        vector<float> qkv(n, 0.0f);
        float* q = qkv.data() + (size_t)1 * W;                       // token 1 (pos 3), head 0, q part
        float* k = qkv.data() + (size_t)1 * W + nh * hd + 1 * hd;    // token 1, head 1, k part
        q[1] = 0.5f;
        q[1 + hd / 2] = -0.25f;
        k[0] = 1.0f;
        k[0 + hd / 2] = 2.0f;
        rope_qk(qkv.data(), pos, T, nh, hd, theta, 1.0f);
        double e1 = fabs(q[1] - 0.5515482962281378), e2 = fabs(q[1 + hd / 2] - (-0.09107401895073172));
        double e3 = fabs(k[0] - (-1.272232512720180)), e4 = fabs(k[hd / 2] - (-1.838864985141024));
        double worst = std::max(std::max(e1, e2), std::max(e3, e4));
        check("rope forward vs hand calculation (theta 10000, pos 3, i = 0 and 1)", worst <= 2e-6,
              "(max abs err %.2e, tol 2e-6)", worst);
    }

    vector<float> x = random_vec(n), y = random_vec(n);
    vector<float> Rx = x, RTy = y;
    rope_qk(Rx.data(), pos, T, nh, hd, theta, 1.0f);
    rope_qk(RTy.data(), pos, T, nh, hd, theta, -1.0f);

    // ⟨R x, y⟩ = ⟨x, Rᵀ y⟩
    {
        double lhs = dot(Rx, y), rhs = dot(x, RTy), scale = 0;
        for (size_t i = 0; i < n; i++) scale += fabs((double)x[i] * y[i]);
        check("rope <Rx,y> = <x,R^T y>", fabs(lhs - rhs) <= 1e-6 * scale, "(%.9g vs %.9g, tol 1e-6*%.3g)", lhs, rhs,
              scale);
    }
    // element by element: (Rᵀ y)_k = ⟨R e_k, y⟩ for every basis vector e_k (the full transpose)
    {
        vector<double> a(n), num(n);
        for (size_t k = 0; k < n; k++) {
            vector<float> e(n, 0.0f);
            e[k] = 1.0f;
            rope_qk(e.data(), pos, T, nh, hd, theta, 1.0f);
            num[k] = dot(e, y);
            a[k] = RTy[k];
        }
        grad_check("rope backward = transpose of forward (every element)", a, num, {1e-6, 1e-6});
    }
    // the backward also accumulates correctly when used as a gradient: dqkv is rotated in place
    // (rope has no += contract: it transforms the gradient buffer in place), so check R (Rᵀ y) = y
    {
        vector<float> z = RTy;
        rope_qk(z.data(), pos, T, nh, hd, theta, 1.0f);
        double worst = 0;
        for (size_t i = 0; i < n; i++) worst = std::max(worst, (double)fabs(z[i] - y[i]));
        check("rope forward(backward(y)) = y", worst <= 1e-6, "(max abs err %.2e, tol 1e-6)", worst);
    }
    // norm preservation, per token row
    {
        double worst = 0;
        for (int t = 0; t < T; t++) {
            double a = 0, b = 0;
            for (int c = 0; c < W; c++) {
                a += (double)x[(size_t)t * W + c] * x[(size_t)t * W + c];
                b += (double)Rx[(size_t)t * W + c] * Rx[(size_t)t * W + c];
            }
            worst = std::max(worst, fabs(sqrt(a) - sqrt(b)) / sqrt(a));
        }
        check("rope preserves norms", worst <= 1e-6, "(max rel err %.2e, tol 1e-6)", worst);
    }
    // position 0 is the identity (exactly), v is untouched (exactly), in forward and backward
    {
        bool pos0 = true, v_untouched = true, qk_moved = false;
        for (int t = 0; t < T; t++)
            for (int c = 0; c < W; c++) {
                size_t i = (size_t)t * W + c;
                bool is_v = c >= 2 * nh * hd;
                if ((pos[t] == 0 || is_v) && (Rx[i] != x[i] || RTy[i] != y[i])) (is_v ? v_untouched : pos0) = false;
                if (pos[t] != 0 && !is_v && Rx[i] != x[i]) qk_moved = true;
            }
        check("rope position 0 is the identity", pos0, "");
        check("rope leaves v untouched", v_untouched, "");
        check("rope rotates q and k at pos > 0", qk_moved, "");
    }
}

// ---------------------------------------------------------------------------------------------------------
// attention: brute force with a T×T mask; gradient checks for q, k, v; padding rows
static void attention_brute(vector<double>& out, vector<double>& lse, const vector<float>& qkv, const int* cu,
                            int n_docs, int T, int nh, int hd, int window) {
    const int H = nh * hd;
    vector<int> doc(T, -1);
    for (int d = 0; d < n_docs; d++)
        for (int i = cu[d]; i < cu[d + 1]; i++) doc[i] = d;
    vector<char> mask((size_t)T * T);
    for (int i = 0; i < T; i++)
        for (int j = 0; j < T; j++)
            mask[(size_t)i * T + j] = doc[i] >= 0 && doc[i] == doc[j] && (window < 0 || abs(i - j) <= window);
    out.assign((size_t)T * H, 0.0);
    lse.assign((size_t)T * nh, 0.0);
    const double scale = 1.0 / sqrt((double)hd);
    for (int h = 0; h < nh; h++) {
        vector<double> S((size_t)T * T);
        for (int i = 0; i < T; i++)
            for (int j = 0; j < T; j++) {
                double s = 0;
                for (int c = 0; c < hd; c++)
                    s += (double)qkv[(size_t)i * 3 * H + h * hd + c] * qkv[(size_t)j * 3 * H + H + h * hd + c];
                S[(size_t)i * T + j] = s * scale;
            }
        for (int i = 0; i < T; i++) {
            double denom = 0;
            for (int j = 0; j < T; j++)
                if (mask[(size_t)i * T + j]) denom += exp(S[(size_t)i * T + j]);
            if (denom == 0) continue;  // padding row: no keys, zero output
            lse[(size_t)i * nh + h] = log(denom);
            for (int j = 0; j < T; j++) {
                if (!mask[(size_t)i * T + j]) continue;
                double p = exp(S[(size_t)i * T + j]) / denom;
                for (int c = 0; c < hd; c++)
                    out[(size_t)i * H + h * hd + c] += p * qkv[(size_t)j * 3 * H + 2 * H + h * hd + c];
            }
        }
    }
}

static void test_attention() {
    // 3 documents of lengths 6, 1, 4 and 2 padding rows
    const int n_docs = 3, T = 13, nh = 2, hd = 4, H = nh * hd;
    const int cu[n_docs + 1] = {0, 6, 7, 11};
    const size_t nq = (size_t)T * 3 * H;
    vector<float> qkv = random_vec(nq, -1.5f, 1.5f);
    vector<float> G = random_vec((size_t)T * H);  // nonzero on the padding rows too
    const int windows[2] = {-1, 2};
    const Tol tol{2e-5, 2e-4};
    // RoPE is part of the op (wi ≥ 2): positions restart per document, padding at 0; the brute force
    // runs on q, k turned beforehand, and the gradient check covers the backward's turn back
    vector<int> pos(T, 0);
    for (int d = 0; d < n_docs; d++)
        for (int i = cu[d]; i < cu[d + 1]; i++) pos[i] = i - cu[d];
    vector<float> table((size_t)T * hd), turned = qkv;
    ref::rope_table(table.data(), T, hd, 10000.0f);
    rope_qk(turned.data(), pos.data(), T, nh, hd, 10000.0f, 1.0f);

    for (int wi = 0; wi < 4; wi++) {
        const int window = windows[wi % 2];
        const bool rope = wi >= 2;
        const int* positions = rope ? pos.data() : nullptr;
        const float* rope_table = rope ? table.data() : nullptr;
        const std::string tag = std::string("attention window ") + (window < 0 ? "-1" : "2") + (rope ? " rope" : "");
        vector<float> out((size_t)T * H, 123.0f), lse((size_t)T * nh, 123.0f);
        ref::attention_forward(out.data(), lse.data(), qkv.data(), cu, n_docs, positions, rope_table, T, nh, hd, window);

        // forward against the brute force
        vector<double> bo, bl;
        attention_brute(bo, bl, rope ? turned : qkv, cu, n_docs, T, nh, hd, window);
        double eo = 0, el = 0;
        for (size_t i = 0; i < out.size(); i++) eo = std::max(eo, fabs(out[i] - bo[i]));
        for (size_t i = 0; i < lse.size(); i++)
            if (i / nh < (size_t)cu[n_docs]) el = std::max(el, fabs(lse[i] - bl[i]));
        check(tag + " forward vs brute force (out, lse)", eo <= 1e-5 && el <= 1e-5,
              "(max abs err out %.2e lse %.2e, tol 1e-5)", eo, el);
        bool pad_zero = true;
        for (int i = cu[n_docs]; i < T; i++)
            for (int c = 0; c < H; c++)
                if (out[(size_t)i * H + c] != 0.0f) pad_zero = false;
        for (int i = cu[n_docs]; i < T; i++)
            for (int h = 0; h < nh; h++)
                if (lse[(size_t)i * nh + h] != -INFINITY) pad_zero = false;
        check(tag + " padding rows give zero output and lse -inf (they see nothing)", pad_zero, "");

        // analytic gradient, written over a buffer of C_FILL (an op that accumulated would be off by C_FILL)
        vector<float> dqkv(nq, C_FILL);
        ref::attention_backward(dqkv.data(), G.data(), out.data(), lse.data(), qkv.data(), cu, n_docs, positions, rope_table, T, nh, hd,
                                window);
        bool pad_nograd = true;
        for (int i = cu[n_docs]; i < T; i++)
            for (int c = 0; c < 3 * H; c++)
                if (dqkv[(size_t)i * 3 * H + c] != 0.0f) pad_nograd = false;
        check(tag + " padding rows get zero gradient", pad_nograd, "");

        vector<double> a = as_double(dqkv);
        auto objective = [&]() {
            vector<float> o((size_t)T * H), l((size_t)T * nh);
            ref::attention_forward(o.data(), l.data(), qkv.data(), cu, n_docs, positions, rope_table, T, nh, hd, window);
            return dot(G, o);
        };
        vector<double> n = numeric_grad(qkv, objective, H_NL, RICH);
        // split q, k, v parts
        vector<double> ap[3], np[3];
        for (int t = 0; t < T; t++)
            for (int part = 0; part < 3; part++)
                for (int c = 0; c < H; c++) {
                    size_t i = (size_t)t * 3 * H + part * H + c;
                    ap[part].push_back(a[i]);
                    np[part].push_back(n[i]);
                }
        const char* names[3] = {"dq", "dk", "dv"};
        for (int part = 0; part < 3; part++) grad_check(tag + " " + names[part], ap[part], np[part], tol);
        if (wi == 1)
            for (int part = 0; part < 3; part++) self_checks(tag + " " + names[part], ap[part], np[part], tol);

        // a missing term: the backward fed out = 0 computes D_i = dout_i · out_i = 0, i.e. drops the
        // "− D_i" of ds_ij = p_ij (dout_i · v_j − D_i); the dq/dk check must reject that gradient
        if (wi == 1) {
            vector<float> zero_out((size_t)T * H, 0.0f), dbad(nq, C_FILL);
            ref::attention_backward(dbad.data(), G.data(), zero_out.data(), lse.data(), qkv.data(), cu, n_docs, positions, rope_table, T, nh,
                                    hd, window);
            vector<double> bad = as_double(dbad), bq, bk;
            for (int t = 0; t < T; t++)
                for (int c = 0; c < H; c++) {
                    bq.push_back(bad[(size_t)t * 3 * H + c]);
                    bk.push_back(bad[(size_t)t * 3 * H + H + c]);
                }
            CompareResult rq = compare(bq, np[0], tol), rk = compare(bk, np[1], tol);
            check("selfcheck " + tag + " missing D term detected (dq and dk)", !rq.ok && !rk.ok,
                  "(err/tol dq %.2f dk %.2f)", rq.worst_ratio, rk.worst_ratio);
        }

        // the band really matters for window 2 (guards against a test that cannot tell the windows apart)
        if (wi == 1) {
            vector<float> og((size_t)T * H), lg((size_t)T * nh);
            ref::attention_forward(og.data(), lg.data(), qkv.data(), cu, n_docs, nullptr, nullptr, T, nh, hd, -1);
            double diff = 0;
            for (size_t i = 0; i < og.size(); i++) diff = std::max(diff, (double)fabs(og[i] - out[i]));
            check(tag + " differs from global attention", diff > 1e-3, "(max diff %.3g)", diff);
        }
    }
}

// The plain per-query loops (double accumulation) that the blocked attention replaced: the oracle for
// shapes that span several blocks, windows narrower and wider than a block, and documents that end
// mid-block.
static void loops_attention_forward(float* out, float* lse, const float* qkv, const int* cu_seqlens, int n_docs, int T,
                              int nh, int hd, int window) {
    const int H = nh * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    memset(out, 0, (size_t)T * H * sizeof(float));
    for (int t = 0; t < T * nh; t++) lse[t] = -INFINITY;  // padding rows see nothing
    double* scores = static_cast<double*>(malloc(sizeof(double) * (size_t)(T > 0 ? T : 1)));
    for (int d = 0; d < n_docs; d++)
        for (int i = cu_seqlens[d]; i < cu_seqlens[d + 1]; i++)
            for (int h = 0; h < nh; h++) {
                const float* q = qkv + (size_t)i * 3 * H + (size_t)h * hd;
                int j0, j1;
                ref::attention_key_range(i, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
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
// dqkv (T, 3, nh, hd) += gradients of q, k, v (the caller zeroes it). With p_ij = exp(s_ij − lse_i)
// and D_i = dout_i · out_i: dv_j += p_ij dout_i; ds_ij = p_ij (dout_i · v_j − D_i);
// dq_i += scale Σ_j ds_ij k_j; dk_j += scale ds_ij q_i.
static void loops_attention_backward(float* dqkv, const float* dout, const float* out, const float* lse, const float* qkv,
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
                ref::attention_key_range(i, cu_seqlens[d], cu_seqlens[d + 1], window, &j0, &j1);
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

static void test_attention_blocks() {
    const int n_docs = 4, T = 330, nh = 2, hd = 8, H = nh * hd;
    const int cu[n_docs + 1] = {0, 150, 250, 251, 317};  // 150, 100, 1, 66 tokens, then 13 padding rows
    const size_t nq = (size_t)T * 3 * H;
    vector<float> qkv = random_vec(nq, -1.5f, 1.5f), G = random_vec((size_t)T * H);
    for (int window : {-1, 16, 64, 70, 200}) {
        vector<float> out((size_t)T * H), lse((size_t)T * nh), lout((size_t)T * H), llse((size_t)T * nh);
        ref::attention_forward(out.data(), lse.data(), qkv.data(), cu, n_docs, nullptr, nullptr, T, nh, hd, window);
        loops_attention_forward(lout.data(), llse.data(), qkv.data(), cu, n_docs, T, nh, hd, window);
        double eo = 0, el = 0;
        for (size_t i = 0; i < out.size(); i++) eo = std::max(eo, (double)fabs(out[i] - lout[i]));
        for (size_t i = 0; i < lse.size(); i++) el = std::max(el, (double)fabs(lse[i] - llse[i]));
        check("attention blocks window " + std::to_string(window) + ": forward equals the plain loops",
              eo <= 1e-5 && el <= 1e-5, "(max abs diff out %.2e lse %.2e, tol 1e-5)", eo, el);
        vector<float> d(nq, 0.25f), ld(nq, 0.0f);  // the blocks write over garbage, the loops add into zeros
        ref::attention_backward(d.data(), G.data(), out.data(), lse.data(), qkv.data(), cu, n_docs, nullptr, nullptr, T, nh, hd, window);
        loops_attention_backward(ld.data(), G.data(), out.data(), lse.data(), qkv.data(), cu, n_docs, T, nh, hd, window);
        double ed = 0, scale = 0;
        for (size_t i = 0; i < nq; i++) {
            ed = std::max(ed, (double)fabs(d[i] - ld[i]));
            scale = std::max(scale, (double)fabs(ld[i]));
        }
        check("attention blocks window " + std::to_string(window) + ": backward equals the plain loops",
              ed <= 1e-5 * std::max(1.0, scale), "(max abs diff %.2e, largest gradient %.2f, tol 1e-5 relative)", ed, scale);
    }
}

// attention against key blocks (context parallelism): 2 query shards × 3 uneven key blocks, forward per
// pair, merged in key order, against ref::attention_forward on the whole batch; an empty block; the
// blocks' backward shares summed against ref::attention_backward; central differences through the
// merged forward for one block's k and v.
static void test_attention_ring_blocks() {
    const int n_docs = 3, T = 128, nh = 2, hd = 8, H = nh * hd;
    const int cu[n_docs + 1] = {0, 37, 107, 128};  // 37, 70, 21 tokens
    const int q_cut[3] = {0, 60, 128}, k_cut[4] = {0, 45, 100, 128};
    const size_t nq = (size_t)T * 3 * H;
    vector<float> qkv = random_vec(nq, -1.5f, 1.5f), G = random_vec((size_t)T * H);
    // merged forward over the blocks, the shards' rows written into (T, H) / (T, nh)
    // RoPE as the ring runs it: every block op reads the whole micro-batch's positions (restarting per
    // document) by token index, so shards and blocks that cut documents must still agree with the whole
    vector<int> pos(T, 0);
    for (int d = 0; d < n_docs; d++)
        for (int i = cu[d]; i < cu[d + 1]; i++) pos[i] = i - cu[d];
    vector<float> table((size_t)T * hd);
    ref::rope_table(table.data(), T, hd, 160000.0f);
    const int* positions = nullptr;
    const float* rope_table = nullptr;
    auto ring_forward = [&](vector<float>& out, vector<float>& lse, int window) {
        out.assign((size_t)T * H, 0.0f);
        lse.assign((size_t)T * nh, -INFINITY);
        for (int s = 0; s < 2; s++) {
            const int q0 = q_cut[s], Tq = q_cut[s + 1] - q0;
            for (int b = 0; b < 3; b++) {
                const int k0 = k_cut[b], Tk = k_cut[b + 1] - k0;
                vector<float> ob((size_t)Tq * H, 9.0f), lb((size_t)Tq * nh, 9.0f);
                ref::attention_block_forward(ob.data(), lb.data(), qkv.data() + (size_t)q0 * 3 * H, 3 * H, q0, Tq,
                                             qkv.data() + (size_t)k0 * 3 * H + H, qkv.data() + (size_t)k0 * 3 * H + 2 * H,
                                             3 * H, k0, Tk, cu, n_docs, positions, rope_table, nh, hd, window);
                ref::attention_merge(out.data() + (size_t)q0 * H, lse.data() + (size_t)q0 * nh, ob.data(), lb.data(), Tq,
                                     nh, hd);
            }
        }
    };
    for (int variant = 0; variant < 3; variant++) {
        const int window = variant == 0 ? -1 : 5;
        positions = variant == 2 ? pos.data() : nullptr;
        rope_table = variant == 2 ? table.data() : nullptr;
        const std::string tag = "attention ring blocks window " + std::to_string(window) + (variant == 2 ? " rope" : "");
        vector<float> out((size_t)T * H), lse((size_t)T * nh), ro, rl;
        ref::attention_forward(out.data(), lse.data(), qkv.data(), cu, n_docs, positions, rope_table, T, nh, hd, window);
        ring_forward(ro, rl, window);
        double eo = 0, el = 0;
        for (size_t i = 0; i < out.size(); i++) eo = std::max(eo, fabs(ro[i] - out[i]) / std::max(1.0f, fabsf(out[i])));
        for (size_t i = 0; i < lse.size(); i++) el = std::max(el, fabs(rl[i] - lse[i]) / std::max(1.0f, fabsf(lse[i])));
        check(tag + ": merged forward equals attention_forward (out, lse)", eo <= 1e-5 && el <= 1e-5,
              "(max rel err out %.2e lse %.2e, tol 1e-5 relative to max(1, |x|))", eo, el);

        // an empty block: queries [0, 30) (document 0) against keys [50, 128) (documents 1, 2)
        {
            vector<float> ob((size_t)30 * H, 9.0f), lb((size_t)30 * nh, 9.0f);
            ref::attention_block_forward(ob.data(), lb.data(), qkv.data(), 3 * H, 0, 30, qkv.data() + (size_t)50 * 3 * H + H,
                                         qkv.data() + (size_t)50 * 3 * H + 2 * H, 3 * H, 50, 78, cu, n_docs, positions, rope_table, nh, hd,
                                         window);
            bool empty = true;
            for (float x : ob) empty = empty && x == 0.0f;
            for (float x : lb) empty = empty && x == -INFINITY;
            check(tag + ": a block without visible keys gives lse -inf and zero out", empty, "");
            vector<float> mo(ro.begin(), ro.begin() + (size_t)30 * H), ml(rl.begin(), rl.begin() + (size_t)30 * nh);
            ref::attention_merge(mo.data(), ml.data(), ob.data(), lb.data(), 30, nh, hd);
            const bool same = memcmp(mo.data(), ro.data(), mo.size() * sizeof(float)) == 0 &&
                              memcmp(ml.data(), rl.data(), ml.size() * sizeof(float)) == 0;
            check(tag + ": merging the empty block changes nothing (bitwise)", same, "");
            // and the other way round: the empty block as the running result takes the real one as it is
            vector<float> eo2 = ob, el2 = lb;
            ref::attention_merge(eo2.data(), el2.data(), ro.data(), rl.data(), 30, nh, hd);
            const bool copied = memcmp(eo2.data(), ro.data(), eo2.size() * sizeof(float)) == 0 &&
                                memcmp(el2.data(), rl.data(), el2.size() * sizeof(float)) == 0;
            check(tag + ": merging into an empty running result copies the block (bitwise)", copied, "");
        }

        // backward: every (shard, block) share added into one dqkv from C_FILL, against attention_backward
        vector<float> d(nq, C_FILL), want(nq, 0.0f);
        ref::attention_backward(want.data(), G.data(), out.data(), lse.data(), qkv.data(), cu, n_docs, positions, rope_table, T, nh, hd, window);
        for (int s = 0; s < 2; s++)
            for (int b = 0; b < 3; b++) {
                const int q0 = q_cut[s], Tq = q_cut[s + 1] - q0, k0 = k_cut[b], Tk = k_cut[b + 1] - k0;
                ref::attention_block_backward(d.data() + (size_t)q0 * 3 * H, d.data() + (size_t)k0 * 3 * H + H,
                                              d.data() + (size_t)k0 * 3 * H + 2 * H, 3 * H, 3 * H, G.data() + (size_t)q0 * H,
                                              ro.data() + (size_t)q0 * H, rl.data() + (size_t)q0 * nh,
                                              qkv.data() + (size_t)q0 * 3 * H, 3 * H, q0, Tq,
                                              qkv.data() + (size_t)k0 * 3 * H + H, qkv.data() + (size_t)k0 * 3 * H + 2 * H,
                                              3 * H, k0, Tk, cu, n_docs, positions, rope_table, nh, hd, window);
            }
        double ed = 0, big = 0;
        for (size_t i = 0; i < nq; i++) {
            ed = std::max(ed, fabs((double)d[i] - C_FILL - want[i]));
            big = std::max(big, (double)fabs(want[i]));
        }
        check(tag + ": summed block backward equals attention_backward (dq, dk, dv)", ed <= 1e-5 * std::max(1.0, big),
              "(max abs diff %.2e, largest gradient %.2f, tol 1e-5 relative)", ed, big);

        // central differences through the merged forward: k and v of block 1 ([45, 100)), whose gradient is
        // that block's share only (from both shards)
        vector<float> dblk(nq, C_FILL);
        for (int s = 0; s < 2; s++) {
            const int q0 = q_cut[s], Tq = q_cut[s + 1] - q0, k0 = k_cut[1], Tk = k_cut[2] - k0;
            ref::attention_block_backward(nullptr, dblk.data() + (size_t)k0 * 3 * H + H,
                                          dblk.data() + (size_t)k0 * 3 * H + 2 * H, 3 * H, 3 * H, G.data() + (size_t)q0 * H,
                                          ro.data() + (size_t)q0 * H, rl.data() + (size_t)q0 * nh,
                                          qkv.data() + (size_t)q0 * 3 * H, 3 * H, q0, Tq,
                                          qkv.data() + (size_t)k0 * 3 * H + H, qkv.data() + (size_t)k0 * 3 * H + 2 * H,
                                          3 * H, k0, Tk, cu, n_docs, positions, rope_table, nh, hd, window);
        }
        auto objective = [&]() {
            vector<float> o, l;
            ring_forward(o, l, window);
            return dot(G, o);
        };
        auto numeric = [&](size_t i) {  // Richardson-extrapolated, as numeric_grad(…, RICH) does
            double s1, s2;
            const double d1 = central(qkv, i, objective, H_NL, &s1), d2 = central(qkv, i, objective, 2 * H_NL, &s2);
            const double r = s2 / s1;
            return d1 + (d1 - d2) / (r * r - 1.0);
        };
        vector<double> ak, nk, av, nv;
        for (int t = k_cut[1]; t < k_cut[2]; t += 3)  // every third token of the block, all columns
            for (int c = 0; c < H; c++) {
                size_t ik = (size_t)t * 3 * H + H + c, iv = ik + H;
                ak.push_back((double)dblk[ik] - C_FILL);
                nk.push_back(numeric(ik));
                av.push_back((double)dblk[iv] - C_FILL);
                nv.push_back(numeric(iv));
            }
        grad_check(tag + " block 1 dk vs central differences", ak, nk, Tol{2e-5, 2e-4});
        grad_check(tag + " block 1 dv vs central differences", av, nv, Tol{2e-5, 2e-4});
    }
}

// ---------------------------------------------------------------------------------------------------------
// gelu and geglu
static double gelu_exact(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

static void test_gelu() {
    const size_t n = 24;
    vector<float> x = random_vec(n, -4.0f, 4.0f), G = random_vec(n), out(n);
    ref::gelu_forward(out.data(), x.data(), n);
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = std::max(worst, fabs(out[i] - gelu_exact(x[i])));
    check("gelu forward vs erf form in double", worst <= 1e-6, "(max abs err %.2e, tol 1e-6)", worst);

    vector<float> dx(n, C_FILL);
    ref::gelu_backward(dx.data(), G.data(), x.data(), n);  // written over C_FILL
    vector<double> a = as_double(dx);
    auto objective = [&]() {
        ref::gelu_forward(out.data(), x.data(), n);
        return dot(G, out);
    };
    vector<double> num = numeric_grad(x, objective, H_NL, RICH);
    grad_check("gelu dinp", a, num, {2e-5, 2e-4});
}

static void test_geglu() {
    const int N = 3, I = 5;
    vector<float> inp = random_vec((size_t)N * 2 * I, -3.0f, 3.0f), G = random_vec((size_t)N * I);
    vector<float> out((size_t)N * I);
    ref::geglu_forward(out.data(), inp.data(), N, I);
    double worst = 0;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < I; i++)
            worst = std::max(worst, fabs(out[n * I + i] - gelu_exact(inp[n * 2 * I + i]) * inp[n * 2 * I + I + i]));
    check("geglu forward vs gelu(x)*g in double", worst <= 1e-5, "(max abs err %.2e, tol 1e-5)", worst);

    vector<float> dinp((size_t)N * 2 * I, C_FILL);
    ref::geglu_backward(dinp.data(), G.data(), inp.data(), N, I);  // written over C_FILL
    vector<double> a = as_double(dinp);
    auto objective = [&]() {
        ref::geglu_forward(out.data(), inp.data(), N, I);
        return dot(G, out);
    };
    vector<double> num = numeric_grad(inp, objective, H_NL, RICH);
    vector<double> ax, nx, ag, ng;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < 2 * I; i++) {
            (i < I ? ax : ag).push_back(a[n * 2 * I + i]);
            (i < I ? nx : ng).push_back(num[n * 2 * I + i]);
        }
    const Tol tol{2e-5, 2e-4};
    grad_check("geglu dx (activation half)", ax, nx, tol);
    grad_check("geglu dg (gate half)", ag, ng, tol);
    self_checks("geglu dinp (both halves)", a, num, tol);
}

// ---------------------------------------------------------------------------------------------------------
// gather_rows / scatter_rows_backward
static void test_gather_scatter() {
    const int R = 6, C = 3, n_rows = 5;
    const int rows[n_rows] = {4, 1, 4, 0, 5};  // row 4 twice, rows 2, 3 never
    vector<float> inp = random_vec((size_t)R * C), G = random_vec((size_t)n_rows * C), out((size_t)n_rows * C);
    ref::gather_rows(out.data(), inp.data(), rows, n_rows, C);
    bool ok = true;
    for (int r = 0; r < n_rows; r++)
        for (int c = 0; c < C; c++)
            if (out[r * C + c] != inp[rows[r] * C + c]) ok = false;
    check("gather_rows forward copies rows", ok, "");

    vector<float> dinp((size_t)R * C, C_FILL);
    ref::scatter_rows_backward(dinp.data(), G.data(), rows, n_rows, C);
    vector<double> a = minus_fill(dinp);
    auto objective = [&]() {
        ref::gather_rows(out.data(), inp.data(), rows, n_rows, C);
        return dot(G, out);
    };
    vector<double> num = numeric_grad(inp, objective, 1e-2);
    grad_check("scatter_rows_backward = gradient of gather_rows (repeated row accumulates)", a, num, {1e-5, 1e-5});
}

// ---------------------------------------------------------------------------------------------------------
// kv_pack / kv_unpack_add (context parallelism's K/V blocks). Expectations are built here independently: per
// row, std::copy of qkv's k part then its v part (pack); k and v parts added in two separate loops (unpack).
// q, k, v are drawn from disjoint ranges ([10, 11), [-1, 1), [2, 3)) so a shifted column range cannot match by
// chance. Buffers carry a guard of KV_GUARD elements past their end, which neither op may touch.
static const int KV_GUARD = 16;
static const float KV_SENTINEL = -123.25f;
static vector<float> kv_random_qkv(int T, int Hl) {
    vector<float> x((size_t)T * 3 * Hl + KV_GUARD, KV_SENTINEL);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < 3 * Hl; c++)
            x[(size_t)t * 3 * Hl + c] = c < Hl ? uniform(10.0f, 11.0f) : c < 2 * Hl ? uniform(-1.0f, 1.0f) : uniform(2.0f, 3.0f);
    return x;
}
// the expected kv block of rows [row0, row0 + n), plus the guard
static vector<float> kv_expected_pack(const vector<float>& qkv, int row0, int n, int Hl) {
    vector<float> kv((size_t)n * 2 * Hl + KV_GUARD, KV_SENTINEL);
    for (int r = 0; r < n; r++) {
        const float* row = qkv.data() + (size_t)(row0 + r) * 3 * Hl;
        float* dst = kv.data() + (size_t)r * 2 * Hl;
        std::copy(row + Hl, row + 2 * Hl, dst);           // k
        std::copy(row + 2 * Hl, row + 3 * Hl, dst + Hl);  // v
    }
    return kv;
}
static size_t count_bit_diffs(const vector<float>& a, const vector<float>& b, size_t from = 0, size_t to = SIZE_MAX) {
    if (a.size() != b.size()) return SIZE_MAX;
    size_t d = 0;
    for (size_t i = from; i < std::min(to, a.size()); i++) d += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return d;
}
static void test_kv_blocks_one(int T, int Hl, int row0, int n) {
    char tag[96];
    snprintf(tag, sizeof tag, "(T=%d Hl=%d row0=%d n=%d)", T, Hl, row0, n);
    const std::string t = tag;
    const size_t W = (size_t)3 * Hl, KW = (size_t)2 * Hl;

    // pack: exact copy of the k/v columns, guard and qkv untouched
    const vector<float> qkv = kv_random_qkv(T, Hl);
    vector<float> qkv_in = qkv, kv((size_t)n * KW + KV_GUARD, KV_SENTINEL);
    ref::kv_pack(kv.data(), qkv_in.data(), row0, n, Hl);
    const vector<float> want = kv_expected_pack(qkv, row0, n, Hl);
    const size_t d_body = count_bit_diffs(kv, want, 0, (size_t)n * KW);
    const size_t d_guard = count_bit_diffs(kv, want, (size_t)n * KW);
    check("kv_pack = per-row copy of k, v " + t, d_body == 0, "%zu of %zu elements differ", d_body, (size_t)n * KW);
    check("kv_pack writes nothing past n rows " + t, d_guard == 0, "%zu guard elements changed", d_guard);
    check("kv_pack leaves qkv unchanged " + t, count_bit_diffs(qkv_in, qkv) == 0, "");
    size_t q_like = 0;  // a q value (≥ 10) in the block means a q column leaked in
    for (size_t i = 0; i < (size_t)n * KW; i++) q_like += kv[i] >= 10.0f;
    check("kv_pack output holds no q column " + t, q_like == 0, "%zu q-range values", q_like);
    if (n > 0) {  // self-check: the same comparison against the block one row off, or q|k instead of k|v, fails
        const vector<float> shifted = kv_expected_pack(qkv, row0 == 0 ? 1 : row0 - 1, std::min(n, T - 1), Hl);
        vector<float> qk((size_t)n * KW + KV_GUARD, KV_SENTINEL);
        for (int r = 0; r < n; r++) std::copy_n(qkv.data() + (size_t)(row0 + r) * W, KW, qk.data() + (size_t)r * KW);
        const bool caught = (shifted.size() != kv.size() || count_bit_diffs(kv, shifted, 0, (size_t)n * KW) > 0) &&
                            count_bit_diffs(kv, qk, 0, (size_t)n * KW) > 0;
        check("self-check: kv_pack comparison rejects a row shift and q|k " + t, caught, "");
    }

    // unpack_add: k/v columns of rows [row0, row0 + n) get exactly dqkv + dkv; all else bit-identical
    vector<float> dqkv0 = random_vec(T * W + KV_GUARD), dkv = random_vec((size_t)n * KW);
    for (int i = 0; i < KV_GUARD; i++) dqkv0[T * W + i] = KV_SENTINEL;
    const vector<float> dkv_in = dkv;
    vector<float> dqkv = dqkv0;
    ref::kv_unpack_add(dqkv.data(), dkv.data(), row0, n, Hl);
    vector<float> want_d = dqkv0;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < Hl; j++) {
            float& dk = want_d[(size_t)(row0 + r) * W + Hl + j];
            dk = dk + dkv[(size_t)r * KW + j];
        }
    for (int r = 0; r < n; r++)
        for (int j = 0; j < Hl; j++) {
            float& dv = want_d[(size_t)(row0 + r) * W + 2 * Hl + j];
            dv = dv + dkv[(size_t)r * KW + Hl + j];
        }
    size_t d_kv = 0, d_q = 0, d_rows = 0, d_g = 0, n_kv = 0, n_q = 0, n_rows = 0;
    for (size_t i = 0; i < dqkv.size(); i++) {
        const bool differs = memcmp(&dqkv[i], &want_d[i], sizeof(float)) != 0;
        if (i >= (size_t)T * W) d_g += differs;
        else if ((int)(i / W) < row0 || (int)(i / W) >= row0 + n) d_rows += differs, n_rows++;
        else if (i % W < (size_t)Hl) d_q += differs, n_q++;
        else d_kv += differs, n_kv++;
    }
    check("kv_unpack_add adds dkv into k, v columns " + t, d_kv == 0, "%zu of %zu differ", d_kv, n_kv);
    check("kv_unpack_add leaves q columns of its rows bit-identical " + t, d_q == 0, "%zu of %zu differ", d_q, n_q);
    check("kv_unpack_add leaves other rows bit-identical " + t, d_rows == 0 && d_g == 0,
          "%zu of %zu differ, %zu guard elements changed", d_rows, n_rows, d_g);
    check("kv_unpack_add leaves dkv unchanged " + t, count_bit_diffs(dkv, dkv_in) == 0, "");
    if (n > 0) {  // self-check: it must have changed something (an op that did nothing would pass the rest only if
                  // the expectation were equally wrong)
        check("self-check: kv_unpack_add changed the k/v block " + t, count_bit_diffs(dqkv, dqkv0) > 0, "");
    }

    // adjoint: <pack(x), y> = <x, unpack_add(0, y)>, in double
    const vector<float> x = random_vec(T * W), y = random_vec((size_t)n * KW);
    vector<float> px((size_t)n * KW), uy(T * W, 0.0f);
    ref::kv_pack(px.data(), x.data(), row0, n, Hl);
    ref::kv_unpack_add(uy.data(), y.data(), row0, n, Hl);
    double lhs = 0.0, rhs = 0.0, scale = 0.0;
    for (size_t i = 0; i < px.size(); i++) lhs += (double)px[i] * y[i], scale += fabs((double)px[i] * y[i]);
    for (size_t i = 0; i < x.size(); i++) rhs += (double)x[i] * uy[i];
    const double err = fabs(lhs - rhs);
    check("kv_unpack_add is the adjoint of kv_pack " + t, err <= 1e-12 * scale && (n == 0 || scale > 0),
          "<pack x, y> %.17g  <x, unpack y> %.17g  |diff| %.3g  (1e-12 · Σ|terms| = %.3g)", lhs, rhs, err, 1e-12 * scale);
}
static void test_kv_blocks() {
    test_kv_blocks_one(37, 8, 5, 20);
    test_kv_blocks_one(37, 8, 0, 37);   // the whole shard
    test_kv_blocks_one(37, 8, 11, 0);   // nothing
    test_kv_blocks_one(50, 64, 37, 13); // the last rows: row0 = T − n
    test_kv_blocks_one(1, 1, 0, 1);     // smallest
}

// ---------------------------------------------------------------------------------------------------------
// crossentropy: N = 5, V = 7, one ignored target; backward overwrites (documented), may alias logits.
// The forward runs as its three pieces (row_max, sum_exp, finish); ce_shards() runs them vocab-parallel, doing on
// the host what the two all-reduces do (max of row_max, sum of partial, in shard order).
static void ce_one_shard(float* losses, float* lse, const float* logits, const int* targets, int N, int V) {
    vector<float> row_max(N), partial(2 * (size_t)N);
    ref::crossentropy_row_max(row_max.data(), logits, targets, N, V, V);
    ref::crossentropy_sum_exp(partial.data(), logits, row_max.data(), targets, N, V, V, 0);
    ref::crossentropy_finish(losses, lse, row_max.data(), partial.data(), targets, N);
}
// One layout: n_shards shards of `width` columns (n_shards · width ≥ V); shard k holds global ids
// [k·width, k·width + width), its first min(width, V − k·width) columns valid, the rest padding set to PAD.
struct CeShards {
    int N, V, width, n_shards;
    vector<vector<float>> logits;  // per shard (N, width)
    vector<int> valid;             // V_valid per shard
};
static const float CE_PAD = 1e4f;  // exp(1e4 − max) is inf: any padding that reached a max or a sum would show
static CeShards ce_split(const vector<float>& logits, int N, int V, int width, int n_shards) {
    CeShards s{N, V, width, n_shards, {}, {}};
    for (int k = 0; k < n_shards; k++) {
        const int start = k * width, valid = std::max(0, std::min(width, V - start));
        vector<float> shard((size_t)N * width, CE_PAD);
        for (int n = 0; n < N; n++)
            for (int v = 0; v < valid; v++) shard[(size_t)n * width + v] = logits[(size_t)n * V + start + v];
        s.logits.push_back(shard);
        s.valid.push_back(valid);
    }
    return s;
}
static void ce_shards(float* losses, float* lse, const CeShards& s, const int* targets) {
    const int N = s.N;
    vector<float> row_max(N, -INFINITY), partial(2 * (size_t)N, 0.0f), m(N), p(2 * (size_t)N);
    for (int k = 0; k < s.n_shards; k++) {  // all-reduce max
        ref::crossentropy_row_max(m.data(), s.logits[k].data(), targets, N, s.width, s.valid[k]);
        for (int n = 0; n < N; n++) row_max[n] = std::max(row_max[n], m[n]);
    }
    for (int k = 0; k < s.n_shards; k++) {  // all-reduce sum
        ref::crossentropy_sum_exp(p.data(), s.logits[k].data(), row_max.data(), targets, N, s.width, s.valid[k],
                                  k * s.width);
        for (size_t i = 0; i < p.size(); i++) partial[i] += p[i];
    }
    ref::crossentropy_finish(losses, lse, row_max.data(), partial.data(), targets, N);
}

static void test_crossentropy() {
    const int N = 5, V = 7;
    const int targets[N] = {2, -100, 6, 0, 4};
    const float dloss = 0.37f;
    vector<float> logits = random_vec((size_t)N * V, -3.0f, 3.0f), losses(N), lse(N, 123.0f);

    ce_one_shard(losses.data(), lse.data(), logits.data(), targets, N, V);
    double worst = 0, worst_lse = 0;
    vector<double> want(N, 0.0), want_lse(N, 0.0);
    for (int n = 0; n < N; n++) {
        if (targets[n] >= 0) {
            double s = 0;
            for (int v = 0; v < V; v++) s += exp((double)logits[n * V + v]);
            want_lse[n] = log(s);
            want[n] = want_lse[n] - logits[n * V + targets[n]];
        }
        worst = std::max(worst, fabs(losses[n] - want[n]));
        worst_lse = std::max(worst_lse, fabs(lse[n] - want_lse[n]));
    }
    check("crossentropy forward (row_max, sum_exp, finish; one shard) vs double (ignored row: loss 0, lse 0)",
          worst <= 1e-5 && worst_lse <= 1e-5 && losses[1] == 0.0f && lse[1] == 0.0f,
          "(max abs err loss %.2e lse %.2e, tol 1e-5)", worst, worst_lse);

    vector<float> dlogits((size_t)N * V, C_FILL);  // the backward overwrites: C_FILL must disappear
    ref::crossentropy_backward(dlogits.data(), logits.data(), lse.data(), targets, dloss, N, V, V, 0);
    vector<double> a(dlogits.begin(), dlogits.end());
    bool ignored_zero = true;
    for (int v = 0; v < V; v++)
        if (dlogits[1 * V + v] != 0.0f) ignored_zero = false;
    check("crossentropy ignored target (-100) gets zero gradient", ignored_zero, "");

    auto objective = [&]() {
        vector<float> l(N), l_lse(N);
        ce_one_shard(l.data(), l_lse.data(), logits.data(), targets, N, V);
        double acc = 0;
        for (int n = 0; n < N; n++) acc += (double)dloss * l[n];
        return acc;
    };
    vector<double> num = numeric_grad(logits, objective, H_NL, RICH);
    const Tol tol{2e-5, 2e-4};
    grad_check("crossentropy dlogits (overwrite semantics)", a, num, tol);
    self_checks("crossentropy dlogits", a, num, tol);

    // aliasing: dlogits == logits gives the same gradient
    vector<float> alias = logits;
    ref::crossentropy_backward(alias.data(), alias.data(), lse.data(), targets, dloss, N, V, V, 0);
    check("crossentropy backward in place (dlogits aliases logits)", alias == dlogits, "");

    // vocab-parallel: 3 shards of 3 columns (the last: 1 valid, 2 padding) and 5 shards of 2 (the fourth: 1 valid,
    // 1 padding; the fifth: padding only, V_valid = 0). Every row's target lies in one shard, so each shard sees
    // rows whose target is in another. The shards' sums differ from one shard's only in rounding (float partials,
    // added in shard order): losses and lse within 2e-6 abs of the one-shard result (values ~1-5, ulp ≤ 4.8e-7),
    // 1e-5 of double.
    for (const auto& layout : vector<std::pair<int, int>>{{3, 3}, {2, 5}}) {
        const int width = layout.first, n_shards = layout.second;
        const std::string tag = " (" + std::to_string(n_shards) + " shards of " + std::to_string(width) + ")";
        CeShards s = ce_split(logits, N, V, width, n_shards);
        vector<float> tl(N, 123.0f), tlse(N, 123.0f);
        ce_shards(tl.data(), tlse.data(), s, targets);
        double d_one = 0, d_double = 0;
        for (int n = 0; n < N; n++) {
            d_one = std::max({d_one, (double)fabsf(tl[n] - losses[n]), (double)fabsf(tlse[n] - lse[n])});
            d_double = std::max({d_double, fabs(tl[n] - want[n]), fabs(tlse[n] - want_lse[n])});
        }
        check("crossentropy vocab-parallel forward vs one shard and vs double, padding ignored" + tag,
              d_one <= 2e-6 && d_double <= 1e-5 && tl[1] == 0.0f && tlse[1] == 0.0f,
              "(max abs diff vs one shard %.2e tol 2e-6, vs double %.2e tol 1e-5)", d_one, d_double);

        // per-shard pieces: ignored row and padding-only shard give row_max −∞ and zero partials; a target outside
        // the shard contributes no target logit
        bool pieces_ok = true;
        for (int k = 0; k < n_shards; k++) {
            vector<float> m(N), p(2 * (size_t)N, 9.0f);
            ref::crossentropy_row_max(m.data(), s.logits[k].data(), targets, N, width, s.valid[k]);
            vector<float> global_max(N);
            for (int n = 0; n < N; n++) global_max[n] = targets[n] < 0 ? -INFINITY : (float)(want_lse[n] - 2.0);
            ref::crossentropy_sum_exp(p.data(), s.logits[k].data(), global_max.data(), targets, N, width, s.valid[k],
                                      k * width);
            for (int n = 0; n < N; n++) {
                const bool ignored = targets[n] < 0, empty = s.valid[k] == 0;
                const int local = targets[n] - k * width;
                const bool mine = !ignored && local >= 0 && local < s.valid[k];
                if ((ignored || empty) && m[n] != -INFINITY) pieces_ok = false;
                if ((ignored || empty) && p[n] != 0.0f) pieces_ok = false;
                if (!mine && p[N + n] != 0.0f) pieces_ok = false;
                if (mine && p[N + n] != logits[(size_t)n * V + targets[n]]) pieces_ok = false;
                if (!ignored && !empty && !(m[n] < CE_PAD && std::isfinite(p[n]) && p[n] > 0.0f)) pieces_ok = false;
            }
        }
        check("crossentropy vocab-parallel pieces: ignored row, padding-only shard, target in another shard" + tag,
              pieces_ok, "");

        // backward per shard with the one-shard lse: exactly the matching columns of the one-shard gradient; the
        // padding columns 0 (they start at C_FILL)
        bool cols_equal = true, pad_zero = true;
        vector<float> assembled((size_t)N * V);
        for (int k = 0; k < n_shards; k++) {
            vector<float> d((size_t)N * width, C_FILL);
            ref::crossentropy_backward(d.data(), s.logits[k].data(), lse.data(), targets, dloss, N, width, s.valid[k],
                                       k * width);
            for (int n = 0; n < N; n++)
                for (int v = 0; v < width; v++) {
                    const float g = d[(size_t)n * width + v];
                    if (v >= s.valid[k]) pad_zero = pad_zero && g == 0.0f;
                    else cols_equal = cols_equal && g == dlogits[(size_t)n * V + k * width + v];
                }
            // with the shards' own lse, for the gradient check below
            ref::crossentropy_backward(d.data(), s.logits[k].data(), tlse.data(), targets, dloss, N, width, s.valid[k],
                                       k * width);
            for (int n = 0; n < N; n++)
                for (int v = 0; v < s.valid[k]; v++)
                    assembled[(size_t)n * V + k * width + v] = d[(size_t)n * width + v];
        }
        check("crossentropy vocab-parallel backward = one-shard columns (bitwise), padding columns 0" + tag,
              cols_equal && pad_zero, "(columns equal %d, padding zero %d)", (int)cols_equal, (int)pad_zero);

        // finite differences through the sharded forward (split again at every evaluation)
        auto sharded_objective = [&]() {
            CeShards t = ce_split(logits, N, V, width, n_shards);
            vector<float> l(N), l_lse(N);
            ce_shards(l.data(), l_lse.data(), t, targets);
            double acc = 0;
            for (int n = 0; n < N; n++) acc += (double)dloss * l[n];
            return acc;
        };
        vector<double> sa(assembled.begin(), assembled.end());
        vector<double> snum = numeric_grad(logits, sharded_objective, H_NL, RICH);
        grad_check("crossentropy vocab-parallel dlogits" + tag, sa, snum, tol);
        self_checks("crossentropy vocab-parallel dlogits" + tag, sa, snum, tol);
    }
}

// ---------------------------------------------------------------------------------------------------------
// adamw_update_pieces (one piece) against torch.optim.AdamW (single-tensor path) transcribed in double, 3 steps
static void test_adamw() {
    const size_t n = 8;
    const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.98f, eps = 1e-6f, wd = 0.1f, grad_scale = 0.5f;
    vector<float> p = random_vec(n), m(n, 0.0f), v(n, 0.0f);
    vector<double> P(p.begin(), p.end()), M(n, 0.0), Vv(n, 0.0);
    double worst_p = 0, worst_m = 0, worst_v = 0;
    for (int t = 1; t <= 3; t++) {
        vector<float> g = random_vec(n, -2.0f, 2.0f);
        g[0] = 0.0f;   // a zero gradient (decay only, eps matters)
        g[1] = 1e-7f;  // a tiny one
        const AdamwPiece whole = {0, 0, n, 0, 0, g.data(), true};
        ref::adamw_update_pieces(p.data(), m.data(), v.data(), &whole, 1, n, &lr, beta1, beta2, eps, wd, t, grad_scale);
        // torch.optim.adamw._single_tensor_adamw:
        //   param.mul_(1 - lr * weight_decay)
        //   exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        //   bias_correction1 = 1 - beta1 ** step; bias_correction2 = 1 - beta2 ** step
        //   step_size = lr / bias_correction1; bias_correction2_sqrt = sqrt(bias_correction2)
        //   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        //   param.addcdiv_(exp_avg, denom, value=-step_size)
        const double LR = lr, B1 = beta1, B2 = beta2, EPS = eps, WD = wd;
        double bc1 = 1.0 - pow(B1, t), bc2 = 1.0 - pow(B2, t);
        double step_size = LR / bc1, bc2_sqrt = sqrt(bc2);
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] * grad_scale;
            P[i] *= 1.0 - LR * WD;
            M[i] += (gi - M[i]) * (1.0 - B1);
            Vv[i] = Vv[i] * B2 + (1.0 - B2) * gi * gi;
            double denom = sqrt(Vv[i]) / bc2_sqrt + EPS;
            P[i] += -step_size * M[i] / denom;
        }
        for (size_t i = 0; i < n; i++) {
            worst_p = std::max(worst_p, fabs(p[i] - P[i]));
            worst_m = std::max(worst_m, fabs(m[i] - M[i]) / (1e-12 + fabs(M[i])));
            worst_v = std::max(worst_v, fabs(v[i] - Vv[i]) / (1e-20 + fabs(Vv[i])));
        }
    }
    // the per-step update is ~lr = 1e-2; 2e-6 absolute is 2e-4 of it (fp32 state allows ~1e-7)
    check("adamw_update_pieces vs torch.optim.AdamW in double, 3 steps, wd 0.1", worst_p <= 2e-6 && worst_m <= 1e-5 &&
          worst_v <= 1e-5, "(param max abs err %.2e tol 2e-6; m, v max rel err %.2e, %.2e tol 1e-5)", worst_p,
          worst_m, worst_v);
}

// Many pieces in one call = each piece on its own (its own copies of the buffers, its tensor's lr, weight
// decay or none), bit for bit; elements outside every piece untouched. Pieces: an empty one, one element, a tensor
// cut in two, the state in reverse order, two gradient buffers (as ZeRO-1 lays them out).
static void test_adamw_pieces() {
    const float beta1 = 0.9f, beta2 = 0.98f, eps = 1e-6f, wd = 0.1f, grad_scale = 0.5f;
    const int t = 2;
    const vector<float> lr = {1e-2f, 3e-3f, 2e-2f};
    vector<float> p0 = random_vec(40), m0 = random_vec(30, 0.0f, 0.1f), v0 = random_vec(30, 0.0f, 0.1f);
    vector<float> g_flat = random_vec(40, -2.0f, 2.0f), g_shard = random_vec(30, -2.0f, 2.0f);
    //                      tensor offset n  state  start grad                      decay
    const vector<AdamwPiece> pieces = {{0, 2, 9, 21, 0, g_flat.data() + 2, true},
                                       {1, 12, 0, 21, 9, g_flat.data() + 12, false},
                                       {1, 12, 1, 20, 9, g_shard.data() + 20, false},
                                       {2, 15, 12, 8, 10, g_shard.data() + 8, true},
                                       {2, 30, 8, 0, 22, g_flat.data() + 30, true}};
    vector<float> p = p0, m = m0, v = v0;
    ref::adamw_update_pieces(p.data(), m.data(), v.data(), pieces.data(), (int)pieces.size(), 30, lr.data(), beta1,
                             beta2, eps, wd, t, grad_scale);
    vector<float> want_p = p0, want_m = m0, want_v = v0;
    for (const AdamwPiece& piece : pieces) {
        vector<float> pp(p0.begin() + piece.offset, p0.begin() + piece.offset + piece.n);
        vector<float> pm(m0.begin() + piece.state_offset, m0.begin() + piece.state_offset + piece.n);
        vector<float> pv(v0.begin() + piece.state_offset, v0.begin() + piece.state_offset + piece.n);
        const AdamwPiece alone = {0, 0, piece.n, 0, 0, piece.grad, true};  // the decay flag as the weight decay
        ref::adamw_update_pieces(pp.data(), pm.data(), pv.data(), &alone, 1, piece.n, &lr[piece.param], beta1, beta2,
                                 eps, piece.decay ? wd : 0.0f, t, grad_scale);
        std::copy(pp.begin(), pp.end(), want_p.begin() + piece.offset);
        std::copy(pm.begin(), pm.end(), want_m.begin() + piece.state_offset);
        std::copy(pv.begin(), pv.end(), want_v.begin() + piece.state_offset);
    }
    check("adamw_update_pieces over 5 pieces = each piece alone, bit for bit (gaps untouched)",
          p == want_p && m == want_m && v == want_v, "");
}

// add_layernorm_forward = add_inplace, then layernorm_forward, bit for bit (one row, and rows not a
// multiple of anything)
static void test_add_layernorm() {
    for (int N : {1, 5}) {
        const int C = 13;
        const vector<float> resid0 = random_vec((size_t)N * C, -2.0f, 2.0f), add = random_vec((size_t)N * C);
        const vector<float> w = random_vec(C, 0.5f, 1.5f);
        vector<float> resid = resid0, out((size_t)N * C), mean(N), rstd(N);
        ref::add_layernorm_forward(out.data(), mean.data(), rstd.data(), resid.data(), add.data(), w.data(), N, C, 1e-5f);
        vector<float> want_resid = resid0, want_out((size_t)N * C), want_mean(N), want_rstd(N);
        ref::add_inplace(want_resid.data(), add.data(), want_resid.size());
        ref::layernorm_forward(want_out.data(), want_mean.data(), want_rstd.data(), want_resid.data(), w.data(), N, C,
                               1e-5f);
        check("add_layernorm_forward = add_inplace + layernorm_forward, bit for bit, N " + std::to_string(N),
              resid == want_resid && out == want_out && mean == want_mean && rstd == want_rstd, "");
    }
}

// stable_adamw_rms: RMS over the tensor of g / sqrt(max(v̂, ε²)), v̂ = (β2 v + (1−β2) g²) / (1 − β2^t)
static void test_stable_adamw_rms() {
    const size_t n = 10;
    const float beta2 = 0.95f, eps = 1e-6f, grad_scale = 0.25f;
    const int t = 4;
    vector<float> g = random_vec(n, -1.0f, 1.0f), v = random_vec(n, 0.0f, 0.1f);
    g[0] = 0.0f;  v[0] = 0.0f;   // 0 / max(0, ε²) = 0
    g[1] = 1e-9f; v[1] = 0.0f;   // v̂ < ε²: the clamp decides
    g[2] = 3.0f;  v[2] = 1e-4f;  // a large gradient against a small history: rms well above 1
    double got = ref::stable_adamw_rms(g.data(), v.data(), n, beta2, eps, t, grad_scale);
    double acc = 0;
    const double B2 = beta2, EPS = eps;
    for (size_t i = 0; i < n; i++) {
        double gi = (double)g[i] * grad_scale;
        double v_new = B2 * v[i] + (1.0 - B2) * gi * gi;
        double v_hat = v_new / (1.0 - pow(B2, t));
        double u = gi / sqrt(std::max(v_hat, EPS * EPS));
        acc += u * u;
    }
    double want = sqrt(acc / n);
    check("stable_adamw_rms vs definition", fabs(got - want) <= 1e-9 * want, "(%.12g vs %.12g, rel tol 1e-9)", got,
          want);
    double empty = ref::stable_adamw_rms(g.data(), v.data(), 0, beta2, eps, t, grad_scale);
    check("stable_adamw_rms of an empty tensor is 0", empty == 0.0, "(%g)", empty);
}

// ---------------------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------------------
// exp_vec (the vectorizable exp of the softmax loops) against exp in double over its whole range
static void test_exp_vec() {
    double worst_ulp = 0.0, worst_x = 0.0;
    for (double x = -87.3; x <= 88.7; x += 1.37e-4) {
        const float xf = (float)x;
        const double want = exp((double)xf);
        const double ulp = (double)nextafterf((float)want, INFINITY) - (double)(float)want;
        const double err = fabs((double)ref::exp_vec(xf) - want) / ulp;
        if (err > worst_ulp) worst_ulp = err, worst_x = xf;
    }
    check("exp_vec within 2 ulp of exp over [-87.3, 88.7]", worst_ulp <= 2.0, "(worst %.2f ulp at x = %.4f)", worst_ulp,
          worst_x);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    check("exp_vec: exp(0) = 1, underflow and -inf give 0, NaN stays NaN",
          ref::exp_vec(0.0f) == 1.0f && ref::exp_vec(-88.0f) == 0.0f && ref::exp_vec(-1e30f) == 0.0f &&
              ref::exp_vec(-INFINITY) == 0.0f && std::isnan(ref::exp_vec(nan)),
          "");
}

// ---------------------------------------------------------------------------------------------------------
// Thread count: every op split over OpenMP threads gives the same bits with 1, 2, 3 and 5 threads (each
// output element has one writer; sums over rows run in fixed chunks; GEMMs are cut into fixed slices),
// on shapes with several chunks and slices (N = 600 rows: two GEMM slices).
static void test_thread_count() {
#ifdef _OPENMP
    const int N = 600, C = 40, OC = 24, V = 300, I = 20, n_docs = 3, nh = 2, hd = 8, H = nh * hd;
    const int T = 290, cu[n_docs + 1] = {0, 150, 151, 280};  // the last 10 rows are padding
    vector<float> x = random_vec((size_t)N * C), w = random_vec(C, 0.5f, 1.5f), G = random_vec((size_t)N * C);
    vector<float> wm = random_vec((size_t)OC * C), Gm = random_vec((size_t)N * OC), big = random_vec(3 * 4096 + 17);
    vector<float> qkv = random_vec((size_t)T * 3 * H, -1.5f, 1.5f), Ga = random_vec((size_t)T * H);
    vector<float> logits = random_vec((size_t)N * V, -3.0f, 3.0f), gg = random_vec((size_t)N * 2 * I, -3.0f, 3.0f);
    vector<int> ids(N), targets(N);
    for (int n = 0; n < N; n++) ids[n] = (int)(next_u64() % 7), targets[n] = n % 5 == 0 ? -100 : (int)(next_u64() % V);
    auto run_all = [&]() {
        vector<float> out((size_t)N * C), mean(N), rstd(N), dinp((size_t)N * C, C_FILL), dw(C, C_FILL);
        ref::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
        ref::layernorm_backward(dinp.data(), dw.data(), G.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C,
                                true);
        vector<float> mo((size_t)N * OC), mdi((size_t)N * C), mdw((size_t)OC * C, C_FILL), mdb(OC, C_FILL);
        ref::matmul_forward(mo.data(), x.data(), wm.data(), w.data(), N, C, OC);
        ref::matmul_backward(mdi.data(), mdw.data(), mdb.data(), Gm.data(), x.data(), wm.data(), N, C, OC, false);
        vector<float> emb((size_t)7 * C, C_FILL);
        ref::embedding_backward(emb.data(), G.data(), ids.data(), N, C, 0, 7, 3);
        vector<float> ao((size_t)T * H), al((size_t)T * nh), ad((size_t)T * 3 * H, C_FILL);
        ref::attention_forward(ao.data(), al.data(), qkv.data(), cu, n_docs, nullptr, nullptr, T, nh, hd, 20);
        ref::attention_backward(ad.data(), Ga.data(), ao.data(), al.data(), qkv.data(), cu, n_docs, nullptr, nullptr, T, nh, hd, 20);
        // one query shard [100, 290) against one key block [40, 200), merged into the whole-batch result
        // (only the bits matter here), and the block backward
        vector<float> bo((size_t)190 * H), bl((size_t)190 * nh), bd((size_t)T * 3 * H, C_FILL);
        ref::attention_block_forward(bo.data(), bl.data(), qkv.data() + (size_t)100 * 3 * H, 3 * H, 100, 190,
                                     qkv.data() + (size_t)40 * 3 * H + H, qkv.data() + (size_t)40 * 3 * H + 2 * H, 3 * H,
                                     40, 160, cu, n_docs, nullptr, nullptr, nh, hd, -1);
        ref::attention_merge(bo.data(), bl.data(), ao.data() + (size_t)100 * H, al.data() + (size_t)100 * nh, 190, nh, hd);
        ref::attention_block_backward(bd.data() + (size_t)100 * 3 * H, bd.data() + (size_t)40 * 3 * H + H,
                                      bd.data() + (size_t)40 * 3 * H + 2 * H, 3 * H, 3 * H, Ga.data() + (size_t)100 * H,
                                      bo.data(), bl.data(), qkv.data() + (size_t)100 * 3 * H, 3 * H, 100, 190,
                                      qkv.data() + (size_t)40 * 3 * H + H, qkv.data() + (size_t)40 * 3 * H + 2 * H, 3 * H,
                                      40, 160, cu, n_docs, nullptr, nullptr, nh, hd, -1);
        vector<float> losses(N), lse(N), dl((size_t)N * V);
        vector<float> row_max(N), partial(2 * (size_t)N), dl_shard((size_t)N * V);
        ref::crossentropy_row_max(row_max.data(), logits.data(), targets.data(), N, V, V - 3);
        ref::crossentropy_sum_exp(partial.data(), logits.data(), row_max.data(), targets.data(), N, V, V - 3, 2);
        ref::crossentropy_finish(losses.data(), lse.data(), row_max.data(), partial.data(), targets.data(), N);
        ref::crossentropy_backward(dl.data(), logits.data(), lse.data(), targets.data(), 0.5f, N, V, V, 0);
        ref::crossentropy_backward(dl_shard.data(), logits.data(), lse.data(), targets.data(), 0.5f, N, V, V - 3, 2);
        vector<float> geo((size_t)N * I), gdi((size_t)N * 2 * I);
        ref::geglu_forward(geo.data(), gg.data(), N, I);
        ref::geglu_backward(gdi.data(), geo.data(), gg.data(), N, I);
        vector<float> p = big, m(big.size(), 0.01f), v(big.size(), 0.02f);
        double rms = ref::stable_adamw_rms(big.data(), v.data(), big.size(), 0.98f, 1e-6f, 3, 0.5f);
        const AdamwPiece whole = {0, 0, big.size(), 0, 0, big.data(), true};
        const float lr = 1e-3f;
        ref::adamw_update_pieces(p.data(), m.data(), v.data(), &whole, 1, big.size(), &lr, 0.9f, 0.98f, 1e-6f, 0.1f, 3,
                                 0.5f);
        vector<double> sums = {ref::sum(big.data(), big.size()), ref::sum_squares(big.data(), big.size()), rms};
        vector<vector<float>> all = {out, mean, rstd, dinp, dw, mo, mdi, mdw, mdb, emb, ao, al, ad, bo, bl, bd, row_max, partial,
                                     losses, lse, dl, dl_shard, geo, gdi, p, m, v};
        for (double d : sums) all.push_back({(float)d, (float)(d - (float)d)});
        return all;
    };
    const int before = omp_get_max_threads();
    omp_set_num_threads(1);
    const auto one = run_all();
    for (int threads : {2, 3, 5}) {
        omp_set_num_threads(threads);
        const auto many = run_all();
        std::string differ;
        for (size_t k = 0; k < one.size(); k++)
            if (many[k] != one[k]) differ += " " + std::to_string(k);
        check("every op gives the same bits with " + std::to_string(threads) + " threads as with 1", differ.empty(),
              "%s%s", differ.empty() ? "" : "(outputs that differ:", differ.empty() ? "" : (differ + ")").c_str());
    }
    omp_set_num_threads(before);
#else
    check("thread count (built without OpenMP: nothing to split)", true, "");
#endif
}

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    test_embedding();
    test_layernorm();
    test_matmul();
    test_rope();
    test_attention();
    test_attention_blocks();
    test_attention_ring_blocks();
    test_gelu();
    test_geglu();
    test_gather_scatter();
    test_kv_blocks();
    test_crossentropy();
    test_adamw();
    test_adamw_pieces();
    test_add_layernorm();
    test_stable_adamw_rms();
    test_exp_vec();
    test_thread_count();
    printf("%d passed, %d failed\n", g_passed, g_failed);
    fflush(stdout);
    MPI_Finalize();
    return g_failed ? 1 : 0;
}
