// tests/test_gpu.cu — every CUDA kernel against its reference (kernels.cuh, namespace ref).
//
// For each op: random inputs on the host, ref:: on the host, cuda:: on the device, compare with the
// tolerance stated at the call (|got − want| ≤ atol + rtol·|want| for every element; the GEMMs: a bound
// per element from the rounding done, check_within). The activations the CUDA build keeps in bf16 (act)
// are random values rounded to bf16 first: ref reads their exact fp32 widening, cuda their bits, so both
// start from the same numbers and only the rounding the op itself does is left (a bf16 output: see
// check_act). Backward ops start from prefilled gradient
// buffers (they must ADD), null gradient pointers are exercised, and
// every backward op runs twice from the same state and must give bit-identical results.
// Prints "PASS name" / "FAIL name: …" per check and ends with "N passed, M failed"; exit 1 on failure.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -DOMPI_SKIP_MPICXX -I<mpi include> -x cu tests/test_gpu.cu
//        -o tests/test_gpu -lcublasLt -lcublas -L<mpi lib> -lmpi      (one line; see `mpicxx --showme`)
// Without a GPU, `make test-emu` builds it with g++ under the CPU emulator (tests/cuda_emu.h) and runs
// it in forward, reverse and random thread order (same shapes; about 15-20 s an order on 2 cores).
#include "../kernels.cuh"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

// ---- test harness ----
static int n_passed = 0, n_failed = 0;

static void record(bool ok, const std::string& name, const char* detail) {
    if (ok) {
        n_passed++;
        printf("PASS %s%s%s\n", name.c_str(), detail[0] ? "  " : "", detail);
    } else {
        n_failed++;
        printf("FAIL %s: %s\n", name.c_str(), detail);
    }
    fflush(stdout);
}

// With $PICOTRON_DIGEST set (tests/emu_tests.sh does, for each thread order of the emulated run),
// every checked device output is hashed (FNV-1a of its bytes) into that file, one line per check:
// the files of different orders must be equal, or some kernel's result depends on thread order.
static void record_digest(const std::string& name, const void* data, size_t bytes) {
    static FILE* digest = getenv("PICOTRON_DIGEST") ? fopen(getenv("PICOTRON_DIGEST"), "w") : nullptr;
    if (!digest) return;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < bytes; i++) h = (h ^ static_cast<const unsigned char*>(data)[i]) * 1099511628211ull;
    fprintf(digest, "%016llx %s\n", (unsigned long long)h, name.c_str());
    fflush(digest);
}
// every element within atol + rtol·|want|; NaN anywhere fails. Reports the largest error and the
// largest error / tolerance (an exact check, tolerance 0, reports only the error).
static bool check(const std::string& name, const std::vector<float>& got, const std::vector<float>& want, double atol,
                  double rtol) {
    record_digest(name, got.data(), got.size() * sizeof(float));
    char detail[256];
    if (got.size() != want.size()) {
        snprintf(detail, sizeof detail, "size %zu != %zu", got.size(), want.size());
        record(false, name, detail);
        return false;
    }
    double max_err = 0.0, max_ratio = 0.0;
    size_t worst = 0, n_bad = 0;
    for (size_t i = 0; i < got.size(); i++) {
        double err = std::fabs((double)got[i] - (double)want[i]);
        const double tol = atol + rtol * std::fabs((double)want[i]);
        bool bad = !(err <= tol);  // also catches NaN
        if (std::isnan(err)) err = INFINITY;
        if (bad) n_bad++;
        if (tol > 0 && err / tol > max_ratio) max_ratio = err / tol;
        if (err > max_err) {
            max_err = err;
            worst = i;
        }
    }
    bool ok = n_bad == 0;
    if (ok)
        snprintf(detail, sizeof detail, "(max err %.3g, worst err/tol %.3g)", max_err, max_ratio);
    else
        snprintf(detail, sizeof detail, "max err %.3g at %zu (got %.9g want %.9g), %zu bad of %zu", max_err, worst,
                 (double)got[worst], (double)want[worst], n_bad, got.size());
    record(ok, name, detail);
    return ok;
}
// bf16 (8 significant bits, round to nearest even): unit roundoff u = 2⁻⁸, |rn(y) − y| ≤ u·|y| for |y| in
// the normal range, ≤ 2⁻¹³⁴ (half the smallest subnormal spacing, 2⁻¹³³) below it.
const double BF16_U = std::ldexp(1.0, -8), BF16_TINY = std::ldexp(1.0, -134);
// An op whose fp32 result y is within atol + rtol·|want| of the reference and then stored in bf16:
// |rn(y) − want| ≤ u·|y| + |y − want| ≤ u·(|want| + atol + rtol·|want|) + atol + rtol·|want|
//                = atol·(1 + u) + (rtol·(1 + u) + u)·|want|   (+ 2⁻¹³⁴ for subnormal y).
static bool check_act(const std::string& name, const std::vector<float>& got, const std::vector<float>& want,
                      double atol, double rtol) {
    return check(name, got, want, atol * (1 + BF16_U) + BF16_TINY, rtol * (1 + BF16_U) + BF16_U);
}
static bool check_scalar(const std::string& name, double got, double want, double tol) {
    record_digest(name, &got, sizeof got);
    char detail[256];
    double err = std::fabs(got - want);
    bool ok = err <= tol;
    snprintf(detail, sizeof detail, "got %.17g want %.17g err %.3g tol %.3g", got, want, err, tol);
    record(ok, name, ok ? "" : detail);
    return ok;
}
static bool check_bitwise(const std::string& name, const std::vector<float>& a, const std::vector<float>& b) {
    bool ok = a.size() == b.size() && (a.empty() || memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    size_t n_diff = 0;
    if (!ok && a.size() == b.size())
        for (size_t i = 0; i < a.size(); i++) n_diff += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    char detail[128];
    snprintf(detail, sizeof detail, "%zu elements differ between two runs", n_diff);
    record(ok, name, ok ? "" : detail);
    return ok;
}

// deterministic random numbers (splitmix64)
struct Rng {
    uint64_t state;
    explicit Rng(uint64_t seed) : state(seed) {}
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    float uniform() { return (float)((next() >> 40) * (1.0 / 16777216.0)); }  // [0, 1)
    float symmetric(float scale = 1.0f) { return scale * (2.0f * uniform() - 1.0f); }
    int below(int n) { return (int)(next() % (uint64_t)n); }
};
static std::vector<float> random_floats(Rng& rng, size_t n, float scale = 1.0f, float offset = 0.0f) {
    std::vector<float> x(n);
    for (auto& v : x) v = offset + rng.symmetric(scale);
    return x;
}

// the host's own round-to-nearest-even float → bf16 (NaN quieted), independent of kernels.cuh's
static uint16_t host_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1)) >> 16);
}
static float host_bf16_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static std::vector<float> bf16_rounded(std::vector<float> x) {
    for (float& e : x) e = host_bf16_float(host_bf16(e));
    return x;
}
// random activations: bf16 values (what the CUDA build stores), as floats for ref
static std::vector<float> random_acts(Rng& rng, size_t n, float scale = 1.0f, float offset = 0.0f) {
    return bf16_rounded(random_floats(rng, n, scale, offset));
}

// device buffers through the helpers under test
static float* upload(const std::vector<float>& h) {
    float* d = cuda::alloc_floats(h.size());
    cuda::copy_to_device(d, h.data(), h.size() * sizeof(float));
    return d;
}
static int* upload_ints(const std::vector<int>& h) {
    int* d = cuda::alloc_ints(h.size());
    cuda::copy_to_device(d, h.data(), h.size() * sizeof(int));
    return d;
}
static void reset(float* d, const std::vector<float>& h) { cuda::copy_to_device(d, h.data(), h.size() * sizeof(float)); }
static std::vector<float> download(const float* d, size_t n) {
    std::vector<float> h(n);
    cuda::copy_to_host(h.data(), d, n * sizeof(float));
    return h;
}
// act buffers: h rounded to bf16 (exact for random_acts), uploaded as bits; downloaded widened (exact)
static void reset_acts(cuda::act* d, const std::vector<float>& h) {
    std::vector<cuda::act> bits(h.size());
    for (size_t i = 0; i < h.size(); i++) bits[i].bits = host_bf16(h[i]);
    cuda::copy_to_device(d, bits.data(), bits.size() * sizeof(cuda::act));
}
static cuda::act* upload_acts(const std::vector<float>& h) {
    cuda::act* d = cuda::alloc_acts(h.size());
    reset_acts(d, h);
    return d;
}
static std::vector<float> download_acts(const cuda::act* d, size_t n) {
    std::vector<cuda::act> bits(n);
    cuda::copy_to_host(bits.data(), d, n * sizeof(cuda::act));
    std::vector<float> h(n);
    for (size_t i = 0; i < n; i++) h[i] = host_bf16_float(bits[i].bits);
    return h;
}

// Run a device op twice from the same starting contents of its output buffers; the outputs must be
// bit-identical. outputs: (device buffer, initial contents, whether it is an act buffer).
struct Output {
    void* d;
    const std::vector<float>* init;
    bool is_act = false;
};
static void reset_output(const Output& o) {
    if (o.is_act) reset_acts(static_cast<cuda::act*>(o.d), *o.init);
    else reset(static_cast<float*>(o.d), *o.init);
}
static std::vector<float> download_output(const Output& o) {
    return o.is_act ? download_acts(static_cast<cuda::act*>(o.d), o.init->size())
                    : download(static_cast<float*>(o.d), o.init->size());
}
static void check_deterministic(const std::string& name, const std::vector<Output>& outputs,
                                const std::function<void()>& run) {
    std::vector<std::vector<float>> first;
    for (const auto& o : outputs) reset_output(o);
    run();
    for (const auto& o : outputs) first.push_back(download_output(o));
    for (const auto& o : outputs) reset_output(o);
    run();
    std::vector<float> a, b;
    for (size_t k = 0; k < outputs.size(); k++) {
        auto second = download_output(outputs[k]);
        a.insert(a.end(), first[k].begin(), first[k].end());
        b.insert(b.end(), second.begin(), second.end());
    }
    check_bitwise("determinism " + name, a, b);
}

static std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
static std::string fmt(const char* f, ...) {
    char buf[256];
    va_list args;
    va_start(args, f);
    vsnprintf(buf, sizeof buf, f, args);
    va_end(args);
    return buf;
}

// ---- memory ----
static void test_memory() {
    Rng rng(1);
    const size_t n = 1000;
    float* a = cuda::alloc_floats(n);
    check("alloc_floats zeroed", download(a, n), std::vector<float>(n, 0.0f), 0, 0);
    int* ids = cuda::alloc_ints(77);
    std::vector<int> ids_host(77, -1);
    cuda::copy_to_host(ids_host.data(), ids, 77 * sizeof(int));
    bool ints_zero = std::all_of(ids_host.begin(), ids_host.end(), [](int v) { return v == 0; });
    record(ints_zero, "alloc_ints zeroed", "");
    auto x = random_floats(rng, n);
    cuda::copy_to_device(a, x.data(), n * sizeof(float));
    float* b = cuda::alloc_floats(n);
    cuda::copy_on_device(b, a, n * sizeof(float));
    check("copy_to_device / copy_on_device / copy_to_host", download(b, n), x, 0, 0);
    cuda::zero_floats(b + 100, 500);
    std::vector<float> want = x;
    std::fill(want.begin() + 100, want.begin() + 600, 0.0f);
    check("zero_floats", download(b, n), want, 0, 0);
    float* empty = cuda::alloc_floats(0);
    record(empty != nullptr, "alloc_floats(0) non-null", "");
    cuda::act* acts = cuda::alloc_acts(n);
    check("alloc_acts zeroed", download_acts(acts, n), std::vector<float>(n, 0.0f), 0, 0);
    const auto y = random_acts(rng, n);
    reset_acts(acts, y);
    cuda::zero_acts(acts + 100, 500);
    std::vector<float> want_acts = y;
    std::fill(want_acts.begin() + 100, want_acts.begin() + 600, 0.0f);
    check("zero_acts", download_acts(acts, n), want_acts, 0, 0);
    cuda::synchronize();
    for (void* p : std::initializer_list<void*>{empty, a, b, ids, acts}) cuda::free_buffer(p);
}

// to_act: fp32 → bf16, round to nearest even, bit for bit: hand-written cases (ties both ways, just
// off a tie, rounding up across a binade, overflow to inf, ±inf, ±0, subnormal ties, NaN of either
// kind staying NaN), then random values over many binades against the host's rounding; n past one
// block of threads, so the grid-stride loop runs.
static void test_to_act() {
    auto f = [](uint32_t bits) {
        float x;
        memcpy(&x, &bits, 4);
        return x;
    };
    // (input bits, expected bf16 bits); 0xFFFF = expect some NaN
    const std::vector<std::pair<uint32_t, uint16_t>> cases = {
        {0x3f800000u, 0x3f80}, {0xc0000000u, 0xc000},  // 1, -2: exact
        {0x3f808000u, 0x3f80}, {0x3f818000u, 0x3f82},  // ties: to even, down then up
        {0xbf808000u, 0xbf80}, {0xbf818000u, 0xbf82},  // negative ties
        {0x3f808001u, 0x3f81}, {0x3f807fffu, 0x3f80},  // just above / below a tie
        {0x3fffffffu, 0x4000}, {0x3fff8000u, 0x4000},  // up across a binade: 2 − 2⁻²³ → 2; a tie onto 2
        {0xbfffc000u, 0xc000}, {0x3f7f8000u, 0x3f80},  // −(2 − 2⁻⁹) → −2; a tie below 1 → 1
        {0x7f7fffffu, 0x7f80}, {0x7f7f7fffu, 0x7f7f},  // FLT_MAX → inf; below the top tie stays finite
        {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80},  // ±inf
        {0x00000000u, 0x0000}, {0x80000000u, 0x8000},  // ±0
        {0x00008000u, 0x0000}, {0x00018000u, 0x0002},  // subnormal ties
        {0x007fffffu, 0x0080}, {0x7fc00000u, 0xffff},  // the largest subnormal up to FLT_MIN; a quiet NaN
        {0x7f800001u, 0xffff}, {0xff800001u, 0xffff},  // signalling NaNs (only the lowest payload bit set)
        {0xffc00001u, 0xffff}, {0x7fffffffu, 0xffff},
    };
    std::vector<float> in;
    for (auto& c : cases) in.push_back(f(c.first));
    Rng rng(31);
    const size_t n_random = 3000;
    for (size_t i = 0; i < n_random; i++) in.push_back(std::ldexp(rng.symmetric(), rng.below(80) - 40));
    float* d_in = upload(in);
    cuda::act* d_out = upload_acts(std::vector<float>(in.size(), 7.0f));
    cuda::to_act(d_out, d_in, in.size());
    std::vector<cuda::act> out(in.size());
    cuda::copy_to_host(out.data(), d_out, out.size() * sizeof(cuda::act));
    record_digest("to_act", out.data(), out.size() * sizeof(cuda::act));
    int bad = 0;
    char detail[200] = "";
    for (size_t i = 0; i < in.size(); i++) {
        const uint16_t got = out[i].bits, want = i < cases.size() ? cases[i].second : host_bf16(in[i]);
        const bool nan = (got & 0x7f80) == 0x7f80 && (got & 0x7f);
        const bool ok = want == 0xffff ? nan : got == want;
        if (!ok && !bad++) {
            uint32_t bits;
            memcpy(&bits, &in[i], 4);
            snprintf(detail, sizeof detail, "0x%08x -> 0x%04x, want 0x%04x", bits, got, want);
        }
    }
    record(bad == 0, fmt("to_act: round to nearest even, bit for bit (%zu hand-written cases, %zu random)", cases.size(),
                         n_random),
           detail);
    cuda::free_buffer(d_in);
    cuda::free_buffer(d_out);
}

// ---- embedding ----
static void test_embedding(int T, int H, int vocab_start, int vocab_rows, int id_range, int pad_id, uint64_t seed) {
    Rng rng(seed);
    std::string tag = fmt("T=%d H=%d shard=[%d,%d) pad=%d", T, H, vocab_start, vocab_start + vocab_rows, pad_id);
    std::vector<int> ids(T);
    for (auto& id : ids) id = rng.below(id_range);
    for (int t = 0; t < T; t += 7) ids[t] = pad_id;  // plenty of padding ids
    auto wte = random_floats(rng, (size_t)vocab_rows * H);
    int* d_ids = upload_ints(ids);
    float* d_wte = upload(wte);

    std::vector<float> out((size_t)T * H);
    ref::embedding_forward(out.data(), ids.data(), wte.data(), T, H, vocab_start, vocab_rows);
    float* d_out = upload(std::vector<float>((size_t)T * H, 7.0f));  // garbage: must be overwritten
    cuda::embedding_forward(d_out, d_ids, d_wte, T, H, vocab_start, vocab_rows);
    check("embedding_forward " + tag, download(d_out, out.size()), out, 0, 0);

    // backward: adds into a prefilled dwte; same token order as ref, so it is exact up to rounding
    auto dout = random_floats(rng, (size_t)T * H);
    auto dwte0 = random_floats(rng, (size_t)vocab_rows * H);
    std::vector<float> dwte = dwte0;
    ref::embedding_backward(dwte.data(), dout.data(), ids.data(), T, H, vocab_start, vocab_rows, pad_id);
    float* d_dout = upload(dout);
    float* d_dwte = upload(dwte0);
    cuda::embedding_backward(d_dwte, d_dout, d_ids, T, H, vocab_start, vocab_rows, pad_id);
    check("embedding_backward " + tag, download(d_dwte, dwte.size()), dwte, 1e-6, 1e-6);
    check_deterministic("embedding_backward " + tag, {{d_dwte, &dwte0}},
                        [&] { cuda::embedding_backward(d_dwte, d_dout, d_ids, T, H, vocab_start, vocab_rows, pad_id); });
    for (void* p : std::initializer_list<void*>{d_ids, d_wte, d_out, d_dout, d_dwte}) cuda::free_buffer(p);
}

// ---- layernorm ----
static void test_layernorm(int N, int C, uint64_t seed) {
    Rng rng(seed);
    std::string tag = fmt("N=%d C=%d", N, C);
    const float eps = 1e-5f;
    auto inp = random_floats(rng, (size_t)N * C, 2.0f, 0.5f);
    auto weight = random_floats(rng, C, 0.5f, 1.0f);
    std::vector<float> out((size_t)N * C), mean(N), rstd(N);
    ref::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), N, C, eps);
    float *d_inp = upload(inp), *d_weight = upload(weight);
    float* d_out = upload(std::vector<float>(out.size(), 7.0f));
    float *d_mean = cuda::alloc_floats(N), *d_rstd = cuda::alloc_floats(N);
    cuda::layernorm_forward(d_out, d_mean, d_rstd, d_inp, d_weight, N, C, eps);
    const std::vector<float> got_out = download(d_out, out.size());
    check("layernorm_forward out " + tag, got_out, out, 1e-5, 1e-5);
    check("layernorm_forward mean " + tag, download(d_mean, N), mean, 1e-6, 1e-5);
    check("layernorm_forward rstd " + tag, download(d_rstd, N), rstd, 1e-6, 1e-5);
    // into bf16 (the norms before a GEMM): the same arithmetic, then rounded; so the fp32 tolerance
    // widened for the rounding (check_act), and bit for bit the fp32 output rounded
    cuda::act* d_out_act = upload_acts(std::vector<float>(out.size(), 7.0f));
    cuda::layernorm_forward(d_out_act, d_mean, d_rstd, d_inp, d_weight, N, C, eps);
    const std::vector<float> got_act = download_acts(d_out_act, out.size());
    check_act("layernorm_forward<act> out " + tag, got_act, out, 1e-5, 1e-5);
    check_bitwise("layernorm_forward<act> out = bf16(layernorm_forward<float> out) " + tag, got_act,
                  bf16_rounded(got_out));
    cuda::free_buffer(d_out_act);

    // backward from the reference's mean/rstd, into prefilled buffers, then with each pointer null
    float *d_mean_ref = upload(mean), *d_rstd_ref = upload(rstd);
    auto dout = random_floats(rng, (size_t)N * C);
    auto dinp0 = random_floats(rng, (size_t)N * C);
    auto dweight0 = random_floats(rng, C);
    float* d_dout = upload(dout);
    float *d_dinp = upload(dinp0), *d_dweight = upload(dweight0);
    for (int variant = 0; variant < 4; variant++) {  // both (+= and =), dinp only, dweight only
        bool with_dinp = variant != 2, with_dweight = variant != 1, accumulate = variant != 3;
        std::string v = tag + (variant == 0 ? "" : variant == 1 ? " (dweight null)" : variant == 2 ? " (dinp null)"
                                                                                                   : " (dinp written)");
        std::vector<float> dinp = dinp0, dweight = dweight0;
        ref::layernorm_backward(with_dinp ? dinp.data() : nullptr, with_dweight ? dweight.data() : nullptr,
                                dout.data(), inp.data(), weight.data(), mean.data(), rstd.data(), N, C, accumulate);
        reset(d_dinp, dinp0);
        reset(d_dweight, dweight0);
        cuda::layernorm_backward(with_dinp ? d_dinp : nullptr, with_dweight ? d_dweight : nullptr, d_dout, d_inp,
                                 d_weight, d_mean_ref, d_rstd_ref, N, C, accumulate);
        check("layernorm_backward dinp " + v, download(d_dinp, dinp.size()), dinp, 1e-5, 1e-4);
        check("layernorm_backward dweight " + v, download(d_dweight, C), dweight, 1e-4, 1e-4);
    }
    check_deterministic("layernorm_backward " + tag, {{d_dinp, &dinp0}, {d_dweight, &dweight0}}, [&] {
        cuda::layernorm_backward(d_dinp, d_dweight, d_dout, d_inp, d_weight, d_mean_ref, d_rstd_ref, N, C, true);
    });
    for (void* p : std::initializer_list<void*>{d_inp, d_weight, d_out, d_mean, d_rstd, d_mean_ref, d_rstd_ref, d_dout,
                                                d_dinp, d_dweight})
        cuda::free_buffer(p);
}

// ---- matmul ----
// The GEMMs multiply bf16 A and B (activations, and the bf16 copies of the weights) on the tensor cores
// with fp32 accumulation. The inputs here are bf16 values, so op and reference multiply the same
// numbers, and each product is exact in fp32 (8 + 8 significant bits ≤ 24). The K products are summed
// in fp32 in an order the hardware does not specify; allowing each addition an error of one fp32 unit in
// the last place (2⁻²³ relative: tensor cores may truncate rather than round as they align and add),
// any order errs by at most γ_K·Σ|a||b|, γ_K = K·2⁻²³/(1 − K·2⁻²³). The reference sums in double, so
// with S = Σ_k |a_k||b_k| (double) the op is off from it by γ_K·S, plus the roundings of what is added
// after the sum: the op's + beta·C and + bias, the reference's float conversion and float +=: at most 4
// roundings of 2⁻²⁴ of a value < 2(S + |bias| + |C|): 2⁻²¹·(S + |bias| + |C|). A bf16 D is rounded once
// more by the epilogue: that bound b becomes b·(1 + u) + u·|want| (check_act's argument, u = 2⁻⁸).
// A layout or plan bug gives errors of the size of S, a missing bias of |bias|, a D of the wrong type
// garbage (or a range error under the emulator): far above the bound.
template <class X, class Y>
static std::vector<double> abs_products(int rows, int cols, int K, X x, Y y) {  // S of each (rows, cols) element
    std::vector<double> s((size_t)rows * cols, 0.0);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            for (int k = 0; k < K; k++) s[(size_t)r * cols + c] += std::fabs((double)x(r, k) * (double)y(k, c));
    return s;
}
// the bound above for one element: S over K products, added = |bias| + |C| (what the op adds to the sum);
// want: the reference's value, for a bf16 D
static double gemm_bound(int K, double S, double added, bool bf16_d = false, double want = 0.0) {
    const double ulp = std::ldexp(1.0, -23), gamma = K * ulp / (1.0 - K * ulp);
    const double b = gamma * S + std::ldexp(1.0, -21) * (S + added) + FLT_MIN;
    return bf16_d ? b * (1 + BF16_U) + BF16_U * std::fabs(want) + BF16_TINY : b;
}
// every |got − want| ≤ bound (NaN fails); reports the worst |got − want| / bound
static bool check_within(const std::string& name, const std::vector<float>& got, const std::vector<float>& want,
                         const std::vector<double>& bound) {
    record_digest(name, got.data(), got.size() * sizeof(float));
    double worst = 0.0;
    size_t at = 0, n_bad = 0;
    for (size_t i = 0; i < got.size(); i++) {
        double ratio = std::fabs((double)got[i] - (double)want[i]) / bound[i];
        if (!(ratio <= 1.0)) n_bad++;  // also catches NaN
        if (std::isnan(ratio)) ratio = INFINITY;
        if (ratio > worst) worst = ratio, at = i;
    }
    char detail[256];
    if (n_bad == 0)
        snprintf(detail, sizeof detail, "(worst error/bound %.3g)", worst);
    else
        snprintf(detail, sizeof detail, "worst error/bound %.3g at %zu (got %.9g want %.9g bound %.3g), %zu bad of %zu",
                 worst, at, (double)got[at], (double)want[at], bound[at], n_bad, got.size());
    record(n_bad == 0, name, detail);
    return n_bad == 0;
}

// One linear layer: host inputs (inp, weight, dout: bf16 values; the bias fp32, and rounded to bf16 for a
// bf16 D), the gradients the backward starts from, and the S of each product (computed once: every
// check of the layer shares them); its device copies.
struct Linear {
    int N, C, OC;
    std::vector<float> inp, weight, bias, bias_act, dout, dinp0, dweight0, dbias0;
    std::vector<double> s_out, s_dinp, s_dweight;  // S of out (N, OC), dinp (N, C), dweight (OC, C)
    Linear(int N_, int C_, int OC_, Rng& rng)
        : N(N_), C(C_), OC(OC_), inp(random_acts(rng, (size_t)N * C)), weight(random_acts(rng, (size_t)OC * C)),
          bias(random_floats(rng, OC)), bias_act(bf16_rounded(bias)), dout(random_acts(rng, (size_t)N * OC)),
          dinp0(random_floats(rng, (size_t)N * C)), dweight0(random_floats(rng, (size_t)OC * C)),
          dbias0(random_floats(rng, OC)) {
        s_out = abs_products(
            N, OC, C, [&](int n, int c) { return inp[(size_t)n * C + c]; },
            [&](int c, int o) { return weight[(size_t)o * C + c]; });
        s_dinp = abs_products(
            N, C, OC, [&](int n, int o) { return dout[(size_t)n * OC + o]; },
            [&](int o, int c) { return weight[(size_t)o * C + c]; });
        s_dweight = abs_products(
            OC, C, N, [&](int o, int n) { return dout[(size_t)n * OC + o]; },
            [&](int n, int c) { return inp[(size_t)n * C + c]; });
    }
};
struct LinearDevice {
    cuda::act *inp, *weight, *dout, *bias_act, *out_act, *dinp_act;
    float *bias, *out, *dinp, *dweight, *dbias;
};
// the forward into fp32 (bias fp32) or bf16 (bias bf16)
static void check_matmul_forward(const std::string& tag, const Linear& l, const LinearDevice& d, bool with_bias,
                                 bool bf16_out) {
    const std::vector<float>& bias = bf16_out ? l.bias_act : l.bias;
    std::vector<float> out((size_t)l.N * l.OC), got;
    ref::matmul_forward(out.data(), l.inp.data(), l.weight.data(), with_bias ? bias.data() : nullptr, l.N, l.C, l.OC);
    const std::vector<float> garbage(out.size(), 7.0f);
    if (bf16_out) {
        reset_acts(d.out_act, garbage);
        cuda::matmul_forward(d.out_act, d.inp, d.weight, with_bias ? d.bias_act : nullptr, l.N, l.C, l.OC);
        got = download_acts(d.out_act, out.size());
    } else {
        reset(d.out, garbage);
        cuda::matmul_forward(d.out, d.inp, d.weight, with_bias ? d.bias : nullptr, l.N, l.C, l.OC);
        got = download(d.out, out.size());
    }
    std::vector<double> bound(out.size());
    for (size_t e = 0; e < bound.size(); e++)
        bound[e] = gemm_bound(l.C, l.s_out[e], with_bias ? std::fabs(bias[e % l.OC]) : 0.0, bf16_out, out[e]);
    check_within("matmul_forward " + tag + (with_bias ? " bias" : " no bias") + (bf16_out ? " -> bf16" : " -> fp32"),
                 got, out, bound);
}
// the backward with dinp, dweight, dbias each on (or null); dinp fp32 += or =, or bf16 = (bf16_dinp)
static void check_matmul_backward(const std::string& tag, const Linear& l, const LinearDevice& d, bool wi, bool ww,
                                  bool wb, bool accumulate, bool bf16_dinp = false) {
    const int N = l.N, C = l.C, OC = l.OC;
    std::string v = tag + fmt(" (dinp %s, dweight %s, dbias %s)",
                              wi ? (bf16_dinp ? "= bf16" : accumulate ? "+=" : "=") : "null", ww ? "on" : "null",
                              wb ? "on" : "null");
    std::vector<float> dinp = l.dinp0, dweight = l.dweight0, dbias = l.dbias0;
    ref::matmul_backward(wi ? dinp.data() : nullptr, ww ? dweight.data() : nullptr, wb ? dbias.data() : nullptr,
                         l.dout.data(), l.inp.data(), l.weight.data(), N, C, OC, accumulate);
    reset(d.dinp, l.dinp0);
    reset_acts(d.dinp_act, l.dinp0);
    reset(d.dweight, l.dweight0);
    reset(d.dbias, l.dbias0);
    if (bf16_dinp)
        cuda::matmul_backward(wi ? d.dinp_act : nullptr, ww ? d.dweight : nullptr, wb ? d.dbias : nullptr, d.dout, d.inp,
                              d.weight, N, C, OC, accumulate);
    else
        cuda::matmul_backward(wi ? d.dinp : nullptr, ww ? d.dweight : nullptr, wb ? d.dbias : nullptr, d.dout, d.inp,
                              d.weight, N, C, OC, accumulate);
    std::vector<double> dinp_bound(dinp.size()), dweight_bound(dweight.size());
    for (size_t e = 0; e < dinp_bound.size(); e++)
        dinp_bound[e] = gemm_bound(OC, l.s_dinp[e], wi && accumulate ? std::fabs(l.dinp0[e]) : 0.0, bf16_dinp, dinp[e]);
    for (size_t e = 0; e < dweight_bound.size(); e++)
        dweight_bound[e] = gemm_bound(N, l.s_dweight[e], std::fabs(l.dweight0[e]));
    if (bf16_dinp) {  // untouched when null: the bf16 of dinp0 (exact compare against the same rounding)
        check_within("matmul_backward dinp " + v, download_acts(d.dinp_act, dinp.size()),
                     wi ? dinp : bf16_rounded(dinp), dinp_bound);
    } else {
        check_within("matmul_backward dinp " + v, download(d.dinp, dinp.size()), dinp, dinp_bound);
    }
    check_within("matmul_backward dweight " + v, download(d.dweight, dweight.size()), dweight, dweight_bound);
    // dbias is no GEMM but a fixed-order fp32 column sum (column_sum_add) of the same bf16 values: fp32's tolerance
    check("matmul_backward dbias " + v, download(d.dbias, dbias.size()), dbias, 1e-3, 1e-4);
}
static LinearDevice upload_linear(const Linear& l) {
    const size_t n_out = (size_t)l.N * l.OC;
    return {upload_acts(l.inp),    upload_acts(l.weight), upload_acts(l.dout),
            upload_acts(l.bias_act), cuda::alloc_acts(n_out), upload_acts(l.dinp0),
            upload(l.bias),        cuda::alloc_floats(n_out), upload(l.dinp0),
            upload(l.dweight0),    upload(l.dbias0)};
}
static void free_linear(const LinearDevice& d) {
    for (void* p : std::initializer_list<void*>{d.inp, d.weight, d.dout, d.bias_act, d.out_act, d.dinp_act, d.bias,
                                                d.out, d.dinp, d.dweight, d.dbias})
        cuda::free_buffer(p);
}
static void test_matmul(int N, int C, int OC, uint64_t seed) {
    Rng rng(seed);
    const std::string tag = fmt("N=%d C=%d OC=%d", N, C, OC);
    const Linear l(N, C, OC, rng);
    const LinearDevice d = upload_linear(l);
    for (int bf16_out = 0; bf16_out < 2; bf16_out++)
        for (int with_bias = 0; with_bias < 2; with_bias++) check_matmul_forward(tag, l, d, with_bias, bf16_out);
    for (int mask = 15; mask >= 1; mask--) {  // subsets of {dinp, dweight, dbias}; bit 8: dinp written, not added
        if (mask != 15 && mask != 7 && mask != 9 && mask != 1 && mask != 2 && mask != 4 && mask != 6) continue;
        check_matmul_backward(tag, l, d, mask & 1, mask & 2, mask & 4, !(mask & 8));
    }
    check_matmul_backward(tag, l, d, true, true, true, false, true);  // dinp written in bf16
    check_matmul_backward(tag, l, d, false, true, false, false, true);
    check_deterministic("matmul_backward " + tag, {{d.dinp, &l.dinp0}, {d.dweight, &l.dweight0}, {d.dbias, &l.dbias0}},
                        [&] { cuda::matmul_backward(d.dinp, d.dweight, d.dbias, d.dout, d.inp, d.weight, N, C, OC, true); });
    check_deterministic("matmul_backward bf16 dinp " + tag, {{d.dinp_act, &l.dinp0, true}, {d.dweight, &l.dweight0}},
                        [&] { cuda::matmul_backward(d.dinp_act, d.dweight, nullptr, d.dout, d.inp, d.weight, N, C, OC,
                                                    false); });
    free_linear(d);
}
// The GEMM plans (kernels.cuh gemm_plan) are cached by configuration: every call must run its own.
// Shapes that differ in one dimension (so in one of m, n, k) alternate, each met again later, and one
// shape runs with its pointers 256-byte aligned, all offset by 1 element (2-byte aligned bf16, 4-byte
// aligned fp32: the heuristic may pick other kernels), one kind offset at a time, and aligned again.
// Forward with the bias into fp32 and into bf16 (the same shape and alignments: only D's type tells the
// plans apart), then the backward (dinp +=, dweight, dbias) and with a bf16 dinp. Offsets in elements:
// inp and dinp, weight and dweight, out and dout, bias and dbias; so the forward's A (weight), B (inp),
// D (out) and bias each change alone once, and so do the backward's A, B, D.
static void test_matmul_plans(uint64_t seed) {
    Rng rng(seed);
    struct Case {
        int N, C, OC, inp, weight, out, bias;  // shape, then the offsets
    };
    const Case cases[] = {{40, 72, 24, 0, 0, 0, 0}, {40, 64, 24, 0, 0, 0, 0}, {40, 72, 24, 0, 0, 0, 0},
                          {33, 72, 24, 0, 0, 0, 0}, {40, 72, 20, 0, 0, 0, 0}, {40, 64, 24, 0, 0, 0, 0},
                          {40, 72, 24, 1, 1, 1, 1}, {40, 72, 24, 1, 1, 1, 1}, {40, 72, 24, 0, 1, 0, 0},
                          {40, 72, 24, 1, 0, 0, 0}, {40, 72, 24, 0, 0, 1, 0}, {40, 72, 24, 0, 0, 0, 1},
                          {40, 72, 24, 0, 0, 0, 0}, {33, 72, 24, 0, 0, 0, 0}, {40, 72, 24, 3, 2, 1, 2}};
    const size_t room = 40 * 72 + 4;  // the largest array (40·72) and the largest offset
    LinearDevice big;
    for (cuda::act** p : {&big.inp, &big.weight, &big.dout, &big.bias_act, &big.out_act, &big.dinp_act})
        *p = cuda::alloc_acts(room);
    for (float** p : {&big.bias, &big.out, &big.dinp, &big.dweight, &big.dbias}) *p = cuda::alloc_floats(room);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const Case& c = cases[i];
        const Linear l(c.N, c.C, c.OC, rng);
        const LinearDevice d{big.inp + c.inp,      big.weight + c.weight, big.dout + c.out,   big.bias_act + c.bias,
                             big.out_act + c.out,  big.dinp_act + c.inp,  big.bias + c.bias,  big.out + c.out,
                             big.dinp + c.inp,     big.dweight + c.weight, big.dbias + c.bias};
        reset_acts(d.inp, l.inp);
        reset_acts(d.weight, l.weight);
        reset_acts(d.dout, l.dout);
        reset(d.bias, l.bias);
        reset_acts(d.bias_act, l.bias_act);
        const std::string tag = fmt("plans #%zu N=%d C=%d OC=%d offsets inp %d weight %d out %d bias %d", i, c.N, c.C,
                                    c.OC, c.inp, c.weight, c.out, c.bias);
        check_matmul_forward(tag, l, d, true, false);
        check_matmul_forward(tag, l, d, true, true);
        check_matmul_backward(tag, l, d, true, true, true, true);
        check_matmul_backward(tag, l, d, true, true, true, false, true);
    }
    free_linear(big);
}

// ---- residual ----
static void test_add_inplace(size_t n) {
    Rng rng(5);
    auto x = random_floats(rng, n), y = random_floats(rng, n);
    float *d_x = upload(x), *d_y = upload(y);
    ref::add_inplace(x.data(), y.data(), n);
    cuda::add_inplace(d_x, d_y, n);
    check(fmt("add_inplace n=%zu", n), download(d_x, n), x, 0, 0);
    cuda::free_buffer(d_x);
    cuda::free_buffer(d_y);
}

// The residual add fused with the next LayerNorm. resid: exact (the add is one rounding on both sides);
// mean, rstd: test_layernorm's tolerances, for the same reason (fp32 sums of ≤ C/32 terms a lane plus 5
// butterfly levels, ~40 roundings ≈ 2.4e-6 relative on |out| ≲ 6, against ref's double); out, stored in
// bf16: that tolerance widened by the rounding (check_act); and bit for bit the unfused kernels' result
// (the same float operations in the same order, then the same rounding). C > 1024 takes the two kernels.
static void test_add_layernorm(int N, int C, uint64_t seed) {
    Rng rng(seed);
    std::string tag = fmt("N=%d C=%d", N, C);
    const float eps = 1e-5f;
    const auto resid0 = random_floats(rng, (size_t)N * C, 1.5f, 0.5f), add = random_floats(rng, (size_t)N * C);
    const auto weight = random_floats(rng, C, 0.5f, 1.0f);
    const std::vector<float> out0((size_t)N * C, 7.0f), stats0(N, 7.0f);
    std::vector<float> resid = resid0, out((size_t)N * C), mean(N), rstd(N);
    ref::add_layernorm_forward(out.data(), mean.data(), rstd.data(), resid.data(), add.data(), weight.data(), N, C, eps);
    float *d_resid = upload(resid0), *d_add = upload(add), *d_weight = upload(weight);
    cuda::act* d_out = upload_acts(out0);
    float *d_mean = upload(stats0), *d_rstd = upload(stats0);
    auto fused = [&] { cuda::add_layernorm_forward(d_out, d_mean, d_rstd, d_resid, d_add, d_weight, N, C, eps); };
    fused();
    const std::vector<float> got_resid = download(d_resid, resid.size()), got_out = download_acts(d_out, out.size()),
                             got_mean = download(d_mean, N), got_rstd = download(d_rstd, N);
    check("add_layernorm_forward resid " + tag, got_resid, resid, 0, 0);
    check_act("add_layernorm_forward out (bf16) " + tag, got_out, out, 1e-5, 1e-5);
    check("add_layernorm_forward mean " + tag, got_mean, mean, 1e-6, 1e-5);
    check("add_layernorm_forward rstd " + tag, got_rstd, rstd, 1e-6, 1e-5);
    reset(d_resid, resid0);
    cuda::add_inplace(d_resid, d_add, resid.size());
    cuda::layernorm_forward(d_out, d_mean, d_rstd, d_resid, d_weight, N, C, eps);
    check_bitwise("add_layernorm_forward out = add_inplace + layernorm_forward " + tag, got_out,
                  download_acts(d_out, out.size()));
    check_bitwise("add_layernorm_forward mean = unfused " + tag, got_mean, download(d_mean, N));
    check_bitwise("add_layernorm_forward rstd = unfused " + tag, got_rstd, download(d_rstd, N));
    check_deterministic("add_layernorm_forward " + tag,
                        {{d_resid, &resid0}, {d_out, &out0, true}, {d_mean, &stats0}, {d_rstd, &stats0}}, fused);
    for (void* p : std::initializer_list<void*>{d_resid, d_add, d_weight, d_out, d_mean, d_rstd}) cuda::free_buffer(p);
}

// ---- rope ----
// ---- rope ----
// The table the attention kernels read: built by ref's code on the host and uploaded, so it must be
// bit-identical to ref's (which the CPU build's attention reads).
static void test_rope_table(int P, int hd, float theta) {
    std::vector<float> want((size_t)P * hd);
    ref::rope_table(want.data(), P, hd, theta);
    float* d = cuda::alloc_floats(want.size());
    cuda::rope_table(d, P, hd, theta);
    check_bitwise(fmt("rope_table P=%d hd=%d theta=%g identical to ref", P, hd, theta), download(d, want.size()), want);
    cuda::free_buffer(d);
}

// attention_merge: cuda vs ref, merging the reference's result of one (query shard, key block) pair
// of a packed batch with padding into a random running result (some rows −inf), then an empty block
// (the keys of padding) into that: element-wise fp32 arithmetic, 1e-6 absolute, 1e-5 relative.
static std::vector<float> finite_or(const std::vector<float>& x, float inf_as);  // below, with crossentropy
static void test_attention_merge(const std::vector<int>& doc_lengths, int T, int nh, int hd, int window, int q0,
                                 int Tq, int k0, int Tk, uint64_t seed) {
    Rng rng(seed);
    std::vector<int> cu_seqlens(1, 0);
    for (int len : doc_lengths) cu_seqlens.push_back(cu_seqlens.back() + len);
    const int n_docs = (int)doc_lengths.size();
    std::string tag = fmt("T=%d used=%d nh=%d hd=%d window=%d q [%d,+%d) k [%d,+%d)", T, cu_seqlens.back(), nh, hd,
                          window, q0, Tq, k0, Tk);
    const size_t H = (size_t)nh * hd;
    const int S = 3 * (int)H, pad0 = cu_seqlens.back(), npad = T - pad0;
    auto qkv = random_floats(rng, (size_t)T * S, 1.5f);
    const float *q = qkv.data() + (size_t)q0 * S, *k = qkv.data() + (size_t)k0 * S + H, *v = k + H;
    std::vector<float> out((size_t)Tq * H), lse((size_t)Tq * nh), eout(out.size()), else_(lse.size());
    ref::attention_block_forward(out.data(), lse.data(), q, S, q0, Tq, k, v, S, k0, Tk, cu_seqlens.data(), n_docs,
                                 nullptr, nullptr, nh, hd, window);
    ref::attention_block_forward(eout.data(), else_.data(), q, S, q0, Tq, qkv.data() + (size_t)pad0 * S + H,
                                 qkv.data() + (size_t)pad0 * S + 2 * H, S, pad0, npad, cu_seqlens.data(), n_docs, nullptr,
                                 nullptr, nh, hd, window);
    std::vector<float> mout = random_floats(rng, out.size()), mlse = random_floats(rng, lse.size(), 2.0f, 1.0f);
    for (size_t i = 0; i < mlse.size(); i += 5) mlse[i] = -INFINITY;
    std::vector<float> want_out = mout, want_lse = mlse;
    ref::attention_merge(want_out.data(), want_lse.data(), out.data(), lse.data(), Tq, nh, hd);
    ref::attention_merge(want_out.data(), want_lse.data(), eout.data(), else_.data(), Tq, nh, hd);
    float *d_mout = upload(mout), *d_mlse = upload(mlse), *d_bout = upload(out), *d_blse = upload(lse);
    float *d_eout = upload(eout), *d_else = upload(else_);
    cuda::attention_merge(d_mout, d_mlse, d_bout, d_blse, Tq, nh, hd);
    cuda::attention_merge(d_mout, d_mlse, d_eout, d_else, Tq, nh, hd);
    check("attention_merge out " + tag, download(d_mout, mout.size()), want_out, 1e-6, 1e-5);
    check("attention_merge lse " + tag, finite_or(download(d_mlse, mlse.size()), -1e30f), finite_or(want_lse, -1e30f),
          1e-6, 1e-5);
    for (void* p : std::initializer_list<void*>{d_mout, d_mlse, d_bout, d_blse, d_eout, d_else}) cuda::free_buffer(p);
}

// ---- gelu, geglu ----
static void test_gelu(size_t n) {
    Rng rng(11);
    auto inp = random_floats(rng, n, 6.0f);
    inp[0] = 0.0f;
    inp[1] = 20.0f;
    inp[2] = -20.0f;
    inp[3] = 1e-30f;
    std::vector<float> out(n);
    ref::gelu_forward(out.data(), inp.data(), n);
    float* d_inp = upload(inp);
    float* d_out = upload(std::vector<float>(n, 7.0f));
    cuda::gelu_forward(d_out, d_inp, n);
    check(fmt("gelu_forward n=%zu", n), download(d_out, n), out, 1e-6, 1e-5);
    auto dout = random_floats(rng, n);
    auto dinp0 = random_floats(rng, n);
    std::vector<float> dinp = dinp0;
    ref::gelu_backward(dinp.data(), dout.data(), inp.data(), n);
    float* d_dout = upload(dout);
    cuda::act* d_dinp = upload_acts(dinp0);  // written in bf16 (the input of the head's dense backward)
    cuda::gelu_backward(d_dinp, d_dout, d_inp, n);
    check_act(fmt("gelu_backward n=%zu (bf16)", n), download_acts(d_dinp, n), dinp, 1e-6, 1e-5);
    check_deterministic("gelu_backward", {{d_dinp, &dinp0, true}}, [&] { cuda::gelu_backward(d_dinp, d_dout, d_inp, n); });
    for (void* p : std::initializer_list<void*>{d_inp, d_out, d_dout, d_dinp}) cuda::free_buffer(p);
}
static void test_geglu(int N, int I) {
    Rng rng(13);
    std::string tag = fmt("N=%d I=%d", N, I);
    auto inp = random_acts(rng, (size_t)N * 2 * I, 4.0f);
    std::vector<float> out((size_t)N * I);
    ref::geglu_forward(out.data(), inp.data(), N, I);
    cuda::act* d_inp = upload_acts(inp);
    cuda::act* d_out = upload_acts(std::vector<float>(out.size(), 7.0f));
    cuda::geglu_forward(d_out, d_inp, N, I);
    check_act("geglu_forward " + tag, download_acts(d_out, out.size()), out, 1e-6, 1e-5);
    auto dout = random_acts(rng, (size_t)N * I);
    auto dinp0 = random_floats(rng, (size_t)N * 2 * I);
    std::vector<float> dinp = dinp0;
    ref::geglu_backward(dinp.data(), dout.data(), inp.data(), N, I);
    cuda::act *d_dout = upload_acts(dout), *d_dinp = upload_acts(dinp0);
    cuda::geglu_backward(d_dinp, d_dout, d_inp, N, I);
    check_act("geglu_backward " + tag, download_acts(d_dinp, dinp.size()), dinp, 1e-6, 1e-5);
    check_deterministic("geglu_backward " + tag, {{d_dinp, &dinp0, true}},
                        [&] { cuda::geglu_backward(d_dinp, d_dout, d_inp, N, I); });
    for (void* p : std::initializer_list<void*>{d_inp, d_out, d_dout, d_dinp}) cuda::free_buffer(p);
}

// ---- gather / scatter rows ----
static void test_rows(int T, int C, int n_rows) {
    Rng rng(17);
    std::string tag = fmt("T=%d C=%d rows=%d", T, C, n_rows);
    std::vector<int> all(T);
    for (int t = 0; t < T; t++) all[t] = t;
    for (int t = T - 1; t > 0; t--) std::swap(all[t], all[rng.below(t + 1)]);  // distinct rows, shuffled order
    std::vector<int> rows(all.begin(), all.begin() + n_rows);
    auto inp = random_acts(rng, (size_t)T * C);
    std::vector<float> out((size_t)n_rows * C);
    ref::gather_rows(out.data(), inp.data(), rows.data(), n_rows, C);
    int* d_rows = upload_ints(rows);
    cuda::act* d_inp = upload_acts(inp);
    cuda::act* d_out = upload_acts(std::vector<float>(out.size(), 7.0f));
    cuda::gather_rows(d_out, d_inp, d_rows, n_rows, C);
    check("gather_rows (bf16 bits) " + tag, download_acts(d_out, out.size()), out, 0, 0);
    auto dout = random_floats(rng, (size_t)n_rows * C);
    auto dinp0 = random_floats(rng, (size_t)T * C);
    std::vector<float> dinp = dinp0;
    ref::scatter_rows_backward(dinp.data(), dout.data(), rows.data(), n_rows, C);
    float *d_dout = upload(dout), *d_dinp = upload(dinp0);
    cuda::scatter_rows_backward(d_dinp, d_dout, d_rows, n_rows, C);
    check("scatter_rows_backward " + tag, download(d_dinp, dinp.size()), dinp, 0, 0);
    check_deterministic("scatter_rows_backward " + tag, {{d_dinp, &dinp0}},
                        [&] { cuda::scatter_rows_backward(d_dinp, d_dout, d_rows, n_rows, C); });
    for (void* p : std::initializer_list<void*>{d_rows, d_inp, d_out, d_dout, d_dinp}) cuda::free_buffer(p);
}

// ---- K/V blocks (context parallelism) ----
// kv_pack and kv_unpack_add against ref, exactly (pure copies and one float add per element). The kv and dqkv
// buffers carry GUARD extra elements past the op's range, prefilled, that must come back unchanged; n = 0 must
// launch nothing (a zero-block grid is a launch error on the GPU) and change nothing, null pointers included.
static void test_kv_blocks(int T, int Hl, int row0, int n, uint64_t seed) {
    const size_t GUARD = 16, W = (size_t)3 * Hl, KW = (size_t)2 * Hl;
    Rng rng(seed);
    std::string tag = fmt("T=%d Hl=%d row0=%d n=%d", T, Hl, row0, n);
    auto qkv = random_acts(rng, T * W + GUARD);
    std::vector<float> kv0((size_t)n * KW + GUARD, 7.0f), kv = kv0;
    ref::kv_pack(kv.data(), qkv.data(), row0, n, Hl);
    cuda::act *d_qkv = upload_acts(qkv), *d_kv = upload_acts(kv0);
    cuda::kv_pack(d_kv, d_qkv, row0, n, Hl);
    check("kv_pack (bf16 bits) " + tag, download_acts(d_kv, kv.size()), kv, 0, 0);
    check("kv_pack leaves qkv unchanged " + tag, download_acts(d_qkv, qkv.size()), qkv, 0, 0);

    auto dkv = random_floats(rng, (size_t)n * KW + GUARD);
    auto dqkv0 = random_floats(rng, T * W + GUARD);
    std::vector<float> dqkv = dqkv0;
    ref::kv_unpack_add(dqkv.data(), dkv.data(), row0, n, Hl);
    float *d_dkv = upload(dkv), *d_dqkv = upload(dqkv0);
    cuda::kv_unpack_add(d_dqkv, d_dkv, row0, n, Hl);
    check("kv_unpack_add " + tag, download(d_dqkv, dqkv.size()), dqkv, 0, 0);
    check("kv_unpack_add leaves dkv unchanged " + tag, download(d_dkv, dkv.size()), dkv, 0, 0);
    check_deterministic("kv_unpack_add " + tag, {{d_dqkv, &dqkv0}},
                        [&] { cuda::kv_unpack_add(d_dqkv, d_dkv, row0, n, Hl); });
    if (n == 0) {  // no launch at all: null buffers are never touched
        cuda::kv_pack(nullptr, d_qkv, row0, 0, Hl);
        cuda::kv_unpack_add(d_dqkv, nullptr, row0, 0, Hl);
        cuda::synchronize();
        check("kv_pack/kv_unpack_add n=0 with null block " + tag, download(d_dqkv, dqkv.size()), dqkv0, 0, 0);
    }
    for (void* p : std::initializer_list<void*>{d_qkv, d_kv, d_dkv, d_dqkv}) cuda::free_buffer(p);
}

// ---- cross-entropy ----
// logits (N, V) a vocabulary shard: global ids [vocab_start, vocab_start + V), the first V_valid columns real, the
// rest padding (filled with 1e4, which would overflow any sum it reached). Each CUDA piece is compared with its
// reference on the same inputs: row_max exactly; sum_exp given the "global" max (the shard's own, raised on
// some rows as if another shard held a larger logit); finish on the device's partial plus, for a true shard,
// what the other shards would add (the host does the all-reduce); backward from the reference's lse.
// −∞ → a number check() can compare (|−∞ − −∞| is NaN)
static std::vector<float> finite_or(const std::vector<float>& x, float inf_as) {
    std::vector<float> y = x;
    for (auto& v : y)
        if (v == -INFINITY) v = inf_as;
    return y;
}
static void test_crossentropy(int N, int V, int V_valid, int vocab_start, uint64_t seed) {
    Rng rng(seed);
    const bool sharded = V_valid < V || vocab_start > 0;
    std::string tag = fmt("N=%d V=%d V_valid=%d vocab_start=%d", N, V, V_valid, vocab_start);
    auto logits = random_acts(rng, (size_t)N * V, 5.0f);
    for (int n = 0; n < N; n++)
        for (int v = V_valid; v < V; v++) logits[(size_t)n * V + v] = 1e4f;
    logits = bf16_rounded(logits);
    std::vector<int> targets(N);
    if (!sharded) {
        for (auto& t : targets) t = rng.below(V);
        targets[0] = V - 1;
    } else {  // around the shard: before it, in it, after it
        const int lo = std::max(0, vocab_start - V);
        for (auto& t : targets) t = lo + rng.below(vocab_start + 2 * V - lo);
        if (V_valid > 0) targets[0] = vocab_start + V_valid - 1;  // the last valid column
        targets[2] = vocab_start > 0 ? vocab_start - 1 : vocab_start + V;  // in another shard
        if (V_valid > 0) targets[3] = vocab_start;                          // the first column
    }
    targets[1] = -100;  // ignored rows
    targets[N - 1] = -100;
    cuda::act* d_logits = upload_acts(logits);
    int* d_targets = upload_ints(targets);

    // row_max: exact
    std::vector<float> row_max(N);
    ref::crossentropy_row_max(row_max.data(), logits.data(), targets.data(), N, V, V_valid);
    float* d_row_max = upload(std::vector<float>(N, 7.0f));
    cuda::crossentropy_row_max(d_row_max, d_logits, d_targets, N, V, V_valid);
    check("crossentropy_row_max " + tag, finite_or(download(d_row_max, N), -1e30f), finite_or(row_max, -1e30f), 0, 0);

    // sum_exp from the global max
    std::vector<float> global_max(N);
    for (int n = 0; n < N; n++)
        global_max[n] = targets[n] < 0 ? -INFINITY
                        : !sharded     ? row_max[n]
                                       : (V_valid > 0 ? row_max[n] : 4.0f) + (n % 2 ? 2.0f * rng.uniform() : 0.0f);
    std::vector<float> partial(2 * (size_t)N), partial0(2 * (size_t)N, 7.0f);
    ref::crossentropy_sum_exp(partial.data(), logits.data(), global_max.data(), targets.data(), N, V, V_valid,
                              vocab_start);
    float* d_global_max = upload(global_max);
    float* d_partial = upload(partial0);
    cuda::crossentropy_sum_exp(d_partial, d_logits, d_global_max, d_targets, N, V, V_valid, vocab_start);
    std::vector<float> got_partial = download(d_partial, partial.size());
    check("crossentropy_sum_exp " + tag, got_partial, partial, 1e-6, 1e-5);
    check_deterministic("crossentropy_sum_exp " + tag, {{d_partial, &partial0}},
                        [&] { cuda::crossentropy_sum_exp(d_partial, d_logits, d_global_max, d_targets, N, V, V_valid,
                                                         vocab_start); });

    // finish: the all-reduce adds the other shards' exp sums and, where the target is elsewhere, its logit
    if (sharded)
        for (int n = 0; n < N; n++) {
            if (targets[n] < 0) continue;
            const float other_sum = 0.5f + (float)V * rng.uniform(), other_target = rng.symmetric(5.0f);
            const int local = targets[n] - vocab_start;
            const bool mine = local >= 0 && local < V_valid;
            partial[n] += other_sum, got_partial[n] += other_sum;
            if (!mine) partial[N + n] += other_target, got_partial[N + n] += other_target;
        }
    std::vector<float> losses(N), lse(N);
    ref::crossentropy_finish(losses.data(), lse.data(), global_max.data(), partial.data(), targets.data(), N);
    float* d_reduced = upload(got_partial);
    float* d_losses = upload(std::vector<float>(N, 7.0f));
    float* d_lse = upload(std::vector<float>(N, 7.0f));
    cuda::crossentropy_finish(d_losses, d_lse, d_global_max, d_reduced, d_targets, N);
    check("crossentropy forward (row_max, sum_exp, finish) " + tag, download(d_losses, N), losses, 1e-5, 1e-5);
    check("crossentropy forward lse " + tag, download(d_lse, N), lse, 1e-5, 1e-6);
    float* d_lse_ref = upload(lse);  // the backward starts from the reference's lse

    const float dloss = 1.0f / 37.0f;
    std::vector<float> dlogits((size_t)N * V);
    ref::crossentropy_backward(dlogits.data(), logits.data(), lse.data(), targets.data(), dloss, N, V, V_valid,
                               vocab_start);
    std::vector<float> garbage(dlogits.size(), 7.0f);
    cuda::act* d_dlogits = upload_acts(garbage);  // overwritten, not accumulated
    auto backward = [&] {
        cuda::crossentropy_backward(d_dlogits, d_logits, d_lse_ref, d_targets, dloss, N, V, V_valid, vocab_start);
    };
    auto backward_in_place = [&](cuda::act* d) {
        cuda::crossentropy_backward(d, d, d_lse_ref, d_targets, dloss, N, V, V_valid, vocab_start);
    };
    backward();
    check_act("crossentropy_backward (bf16) " + tag, download_acts(d_dlogits, dlogits.size()), dlogits, 1e-9, 1e-4);
    // in place: dlogits == logits
    cuda::act* d_inplace = upload_acts(logits);
    backward_in_place(d_inplace);
    check_act("crossentropy_backward in place (dlogits == logits) " + tag, download_acts(d_inplace, dlogits.size()),
              dlogits, 1e-9, 1e-4);
    check_deterministic("crossentropy_backward " + tag, {{d_dlogits, &garbage, true}}, backward);
    check_deterministic("crossentropy_backward in place " + tag, {{d_inplace, &logits, true}},
                        [&] { backward_in_place(d_inplace); });
    for (void* p : std::initializer_list<void*>{d_logits, d_targets, d_row_max, d_global_max, d_partial, d_reduced,
                                                d_losses, d_lse, d_lse_ref, d_dlogits, d_inplace})
        cuda::free_buffer(p);
}

// ---- reductions ----
// The device sums in a different (fixed) order: tolerance relative to Σ|term|.
static void test_reductions(size_t n) {
    Rng rng(19 + n);
    auto x = random_floats(rng, n, 3.0f, 0.1f);
    float* d_x = upload(x);
    double abs_sum = 0.0, sq_sum = 0.0;
    for (float v : x) {
        abs_sum += std::fabs(v);
        sq_sum += (double)v * v;
    }
    double s1 = cuda::sum(d_x, n), s2 = cuda::sum_squares(d_x, n);
    check_scalar(fmt("sum n=%zu", n), s1, ref::sum(x.data(), n), 1e-12 * abs_sum + 1e-300);
    check_scalar(fmt("sum_squares n=%zu", n), s2, ref::sum_squares(x.data(), n), 1e-12 * sq_sum + 1e-300);
    bool same = cuda::sum(d_x, n) == s1 && cuda::sum_squares(d_x, n) == s2;
    record(same, fmt("determinism sum / sum_squares n=%zu", n), "");
    cuda::free_buffer(d_x);
}

// ---- AdamW ----
static void test_stable_adamw_rms(size_t n) {
    Rng rng(23);
    const float beta2 = 0.98f, eps = 1e-6f, grad_scale = 1.0f / 37.0f;
    const int t = 3;
    auto grad = random_floats(rng, n, 10.0f);
    std::vector<float> v0(n);
    for (auto& v : v0) v = 0.01f * rng.uniform();
    v0[0] = 0.0f;
    grad[0] = 0.0f;  // g = 0, v = 0: the ε² floor in the RMS
    float *d_grad = upload(grad), *d_v = upload(v0);
    double rms_ref = ref::stable_adamw_rms(grad.data(), v0.data(), n, beta2, eps, t, grad_scale);
    double rms = cuda::stable_adamw_rms(d_grad, d_v, n, beta2, eps, t, grad_scale);
    check_scalar(fmt("stable_adamw_rms n=%zu", n), rms, rms_ref, 1e-10 * rms_ref);
    record(cuda::stable_adamw_rms(d_grad, d_v, n, beta2, eps, t, grad_scale) == rms, "determinism stable_adamw_rms", "");
    cuda::free_buffer(d_grad);
    cuda::free_buffer(d_v);
}

// One update over a table of pieces of the given sizes, laid out as ZeRO-1 leaves them: tensors cut into
// several pieces (each tensor its own lr and decay flag), gaps in the parameter buffer that no piece
// covers (other ranks' shares: they must stay as they were), the state in another order than the
// pieces', and gradients in two buffers (the flat one at the parameter offset, a shard at the state
// offset). The kernel mirrors ref's float operations one by one: expect agreement to the last bit or so
// (test_adamw's tolerances; a wrong lr, decay or offset moves a weight by ~1e-4 or more).
static void test_adamw_pieces(const std::vector<size_t>& sizes, uint64_t seed) {
    Rng rng(seed);
    std::string tag = fmt("%zu pieces", sizes.size());
    const float beta1 = 0.9f, beta2 = 0.98f, eps = 1e-6f, wd = 0.1f, grad_scale = 1.0f / 37.0f;
    const int t = 3;
    size_t P = 0, S = 0;
    for (size_t n : sizes) S += n;
    std::vector<AdamwPiece> pieces;
    std::vector<float> lr;
    for (size_t k = 0, state_end = S; k < sizes.size(); k++) {
        if (lr.empty() || rng.below(3) == 0) lr.push_back(1e-3f * (1.0f + rng.uniform()));  // the next tensor
        P += rng.below(4);  // a gap
        state_end -= sizes[k];
        pieces.push_back({lr.size() - 1, P, sizes[k], state_end, S - state_end - sizes[k], nullptr, lr.size() % 2 == 1});
        P += sizes[k];
    }
    const auto param0 = random_floats(rng, P), m0 = random_floats(rng, S, 0.1f);
    const auto grad_flat = random_floats(rng, P, 10.0f), grad_shard = random_floats(rng, S, 10.0f);
    std::vector<float> v0(S);
    for (auto& v : v0) v = 0.01f * rng.uniform();
    float *d_param = upload(param0), *d_m = upload(m0), *d_v = upload(v0), *d_lr = upload(lr);
    float *d_grad_flat = upload(grad_flat), *d_grad_shard = upload(grad_shard);
    std::vector<AdamwPiece> device_table = pieces;
    for (size_t k = 0; k < pieces.size(); k++) {
        const bool flat = k % 2 == 0;
        pieces[k].grad = flat ? grad_flat.data() + pieces[k].offset : grad_shard.data() + pieces[k].state_offset;
        device_table[k].grad = flat ? d_grad_flat + pieces[k].offset : d_grad_shard + pieces[k].state_offset;
    }
    AdamwPiece* d_pieces = cuda::alloc_array<AdamwPiece>(pieces.size(), "pieces");
    cuda::copy_to_device(d_pieces, device_table.data(), pieces.size() * sizeof(AdamwPiece));

    std::vector<float> param = param0, m = m0, v = v0;
    ref::adamw_update_pieces(param.data(), m.data(), v.data(), pieces.data(), (int)pieces.size(), S, lr.data(), beta1,
                             beta2, eps, wd, t, grad_scale);
    auto update = [&] {
        cuda::adamw_update_pieces(d_param, d_m, d_v, d_pieces, (int)pieces.size(), S, d_lr, beta1, beta2, eps, wd, t,
                                  grad_scale);
    };
    update();
    check("adamw_update_pieces param " + tag, download(d_param, P), param, 1e-7, 1e-6);
    check("adamw_update_pieces m " + tag, download(d_m, S), m, 1e-9, 1e-6);
    check("adamw_update_pieces v " + tag, download(d_v, S), v, 1e-12, 1e-6);
    check_deterministic("adamw_update_pieces " + tag, {{d_param, &param0}, {d_m, &m0}, {d_v, &v0}}, update);
    for (void* p : std::initializer_list<void*>{d_param, d_m, d_v, d_lr, d_grad_flat, d_grad_shard, d_pieces})
        cuda::free_buffer(p);
}

// ---- tensor-core primitives ----
// The wrappers of kernels.cuh's "tensor-core primitives": on a GPU this checks the emulator's layouts
// (tests/cuda_emu_mma.h) against the hardware; under the emulator, the models themselves.
static uint16_t* upload_u16(const std::vector<uint16_t>& h) {
    void* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, h.size() * 2));
    CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    return static_cast<uint16_t*>(d);
}
template <typename T>
static T* device_array(size_t n) {
    void* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, n * sizeof(T)));
    return static_cast<T*>(d);
}
template <typename T>
static std::vector<T> download_array(const T* d, size_t n) {
    std::vector<T> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// One warp: Q, K, V (16×16 bf16, row-major) → shared memory by cp.async; S = Q·Kᵀ (A = Q by
// ldmatrix_x4, B = K rows by ldmatrix_x4: two n8 tiles); P = bf16(S) packed from S's accumulator
// fragments straight into an A fragment; O = P·V (B = V by ldmatrix_x4_trans). Writes S and O (fp32).
__global__ void tile_qkv_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, float* s_out, float* o_out) {
    alignas(16) __shared__ uint16_t Q[16 * 16], K[16 * 16], V[16 * 16];
    const int lane = threadIdx.x, g = lane >> 2, tig = lane & 3, m = lane / 8, r = lane % 8;
    cuda::cp_async_16(Q + 8 * lane, q + 8 * lane);  // 32 chunks of 16 bytes each
    cuda::cp_async_16(K + 8 * lane, k + 8 * lane);
    cuda::cp_async_16(V + 8 * lane, v + 8 * lane);
    cuda::cp_async_commit();
    cuda::cp_async_wait<0>();
    __syncthreads();
    uint32_t a[4], b[4];
    cuda::ldmatrix_x4(a, Q + (r + 8 * (m % 2)) * 16 + 8 * (m / 2));  // (rows 0-7 | 8-15) × (cols 0-7 | 8-15)
    cuda::ldmatrix_x4(b, K + (r + 8 * (m / 2)) * 16 + 8 * (m % 2));  // n tile m/2, k half m%2
    const float zero[4] = {0, 0, 0, 0};
    float s0[4], s1[4];
    cuda::mma_m16n8k16_bf16(s0, a, b, zero);
    cuda::mma_m16n8k16_bf16(s1, a, b + 2, zero);
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * tig + i % 2;
        s_out[row * 16 + col] = s0[i];
        s_out[row * 16 + 8 + col] = s1[i];
    }
    const uint32_t p[4] = {cuda::pack_bf16x2(s0[0], s0[1]), cuda::pack_bf16x2(s0[2], s0[3]), cuda::pack_bf16x2(s1[0], s1[1]),
                           cuda::pack_bf16x2(s1[2], s1[3])};
    cuda::ldmatrix_x4_trans(b, V + (r + 8 * (m % 2)) * 16 + 8 * (m / 2));  // k half m%2, n tile m/2
    float o0[4], o1[4];
    cuda::mma_m16n8k16_bf16(o0, p, b, zero);
    cuda::mma_m16n8k16_bf16(o1, p, b + 2, zero);
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * tig + i % 2;
        o_out[row * 16 + col] = o0[i];
        o_out[row * 16 + 8 + col] = o1[i];
    }
}
// Every ldmatrix variant on four 8×8 matrices M[m][i][j] = 64m + 8i + j (exact in bf16): per lane
// x1, x2, x4, x1.trans, x2.trans, x4.trans → 14 registers.
__global__ void ldmatrix_layout_kernel(uint32_t* out) {
    alignas(16) __shared__ uint16_t M[4 * 64];
    const int lane = threadIdx.x;
    for (int e = lane; e < 256; e += 32) M[e] = cuda::pack_bf16x2((float)e, 0.0f) & 0xffffu;
    __syncthreads();
    const uint16_t* row = M + 8 * lane;  // lane 8m+i: row i of matrix m
    uint32_t r[14];
    cuda::ldmatrix_x1(r, row);
    cuda::ldmatrix_x2(r + 1, row);
    cuda::ldmatrix_x4(r + 3, row);
    cuda::ldmatrix_x1_trans(r + 7, row);
    cuda::ldmatrix_x2_trans(r + 8, row);
    cuda::ldmatrix_x4_trans(r + 10, row);
    for (int i = 0; i < 14; i++) out[lane * 14 + i] = r[i];
}
static std::vector<int> document_table(const std::vector<int>& doc_lengths) {  // cu_seqlens
    std::vector<int> cu_seqlens(1, 0);
    for (int len : doc_lengths) cu_seqlens.push_back(cu_seqlens.back() + len);
    return cu_seqlens;
}
static std::string flash_tag(const std::vector<int>& cu_seqlens, int T, int nh, int window, int q0, int Tq, int k0, int Tk) {
    return fmt("T=%d used=%d nh=%d window=%d q [%d,+%d) k [%d,+%d)", T, cu_seqlens.back(), nh, window, q0, Tq, k0, Tk);
}
// RoPE for the flash tests: positions restarting per document from `offset` (0 on padding; a large
// offset reaches large angles), the table of every position, and q, k of qkv (T, 3H) turned by ref:
// the kernels widen the stored bf16 q and k, turn them with the same fp32 arithmetic as they load
// them, then round to bf16 again (a turned value is rounded twice: by the GEMM that stored it, and
// after the turn; unturned values pass exactly).
struct FlashRope {
    std::vector<int> positions;
    std::vector<float> table;
    int* d_positions = nullptr;
    float* d_table = nullptr;
};
static FlashRope flash_rope(const std::vector<int>& cu_seqlens, int T, int offset) {
    FlashRope r;
    if (offset < 0) return r;  // no RoPE: null positions and table
    r.positions.assign(T, 0);
    for (size_t d = 0; d + 1 < cu_seqlens.size(); d++)
        for (int i = cu_seqlens[d]; i < cu_seqlens[d + 1]; i++) r.positions[i] = offset + i - cu_seqlens[d];
    r.table.resize((size_t)(T + offset) * 64);
    ref::rope_table(r.table.data(), T + offset, 64, 10000.0f);
    r.d_positions = upload_ints(r.positions);
    r.d_table = upload(r.table);
    return r;
}
static void turn_qk(std::vector<float>& qkv, const FlashRope& r, int T, int nh, float direction) {
    if (r.table.empty()) return;
    const int H = nh * 64;
    for (int part = 0; part < 2; part++)
        ref::rope_rotate(qkv.data() + part * H, 3 * H, T, r.positions.data(), nh, 64, r.table.data(), direction);
}
// The tensor-core flash forward against the block reference. qkv holds bf16 values (as stored); the
// kernel turns q and k by RoPE (when given a table) in fp32 as ref does and rounds them to bf16 again,
// and rounds P to bf16 before P·V; the reference runs without RoPE on the same turned, bf16-rounded
// inputs in fp32/double, so what is left is P's rounding: bf16 keeps 8 significant bits, so each weight
// p_j/Σp is off by at most 2⁻⁸ relative and |Δout| ≤ 2⁻⁸·max|v| (Σ p_j |v_j| / Σ p_j), plus fp32
// accumulation (≪ 1e-4). The whole-batch op stores out in bf16: that bound widened by the rounding
// (check_act); the block op's out is fp32.
// lse comes from fp32 sums of exact bf16 products either way: 1e-5 relative, 1e-4 absolute.
// whole: the whole-batch op (attention_forward, q, k and v of all T rows) against ref's whole-batch
// op, instead of the block op on [q0, q0 + Tq) × [k0, k0 + Tk). rope_offset < 0: no RoPE.
static void test_flash_forward(const std::vector<int>& doc_lengths, int T, int nh, int window, int q0, int Tq, int k0,
                               int Tk, uint64_t seed, bool whole = false, int rope_offset = 0) {
    const int hd = 64;
    Rng rng(seed);
    const std::vector<int> cu_seqlens = document_table(doc_lengths);
    const int n_docs = (int)doc_lengths.size();
    if (whole) q0 = k0 = 0, Tq = Tk = T;
    const std::string tag = (whole ? "whole batch " : "") + flash_tag(cu_seqlens, T, nh, window, q0, Tq, k0, Tk) +
                            (rope_offset < 0 ? " no rope" : fmt(" rope from %d", rope_offset));
    const size_t H = (size_t)nh * hd;
    const int S = 3 * (int)H;
    const float v_max = 1.5f;
    const auto qkv = random_acts(rng, (size_t)T * S, v_max);
    const FlashRope rope = flash_rope(cu_seqlens, T, rope_offset);
    std::vector<float> turned = qkv;
    turn_qk(turned, rope, T, nh, 1.0f);
    const std::vector<float> rounded = bf16_rounded(turned);
    std::vector<float> out((size_t)Tq * H), lse((size_t)Tq * nh);
    if (whole)
        ref::attention_forward(out.data(), lse.data(), rounded.data(), cu_seqlens.data(), n_docs, nullptr, nullptr, T, nh,
                               hd, window);
    else
        ref::attention_block_forward(out.data(), lse.data(), rounded.data() + (size_t)q0 * S, S, q0, Tq,
                                     rounded.data() + (size_t)k0 * S + H, rounded.data() + (size_t)k0 * S + 2 * H, S, k0,
                                     Tk, cu_seqlens.data(), n_docs, nullptr, nullptr, nh, hd, window);
    int* d_cu = upload_ints(cu_seqlens);
    cuda::act* d_qkv = upload_acts(qkv);
    const std::vector<float> init_out(out.size(), 7.0f), init_lse(lse.size(), 7.0f);
    float *d_out = upload(init_out), *d_lse = upload(init_lse);
    cuda::act* d_out_act = upload_acts(init_out);  // the whole-batch op's
    auto run = [&]() {
        if (whole)
            cuda::attention_forward(d_out_act, d_lse, d_qkv, d_cu, n_docs, rope.d_positions, rope.d_table, T, nh, hd,
                                    window);
        else
            cuda::attention_block_forward(d_out, d_lse, d_qkv + (size_t)q0 * S, S, q0, Tq, d_qkv + (size_t)k0 * S + H,
                                          d_qkv + (size_t)k0 * S + 2 * H, S, k0, Tk, d_cu, n_docs, rope.d_positions,
                                          rope.d_table, nh, hd, window);
    };
    run();
    if (whole)
        check_act("flash attention forward out in bf16 (tol 2^-8·max|v|, widened) " + tag,
                  download_acts(d_out_act, out.size()), out, v_max / 256.0 + 1e-4, 0.0);
    else
        check("flash attention forward out (tol 2^-8·max|v|) " + tag, download(d_out, out.size()), out,
              v_max / 256.0 + 1e-4, 0.0);
    check("flash attention forward lse " + tag, finite_or(download(d_lse, lse.size()), -1e30f), finite_or(lse, -1e30f),
          1e-4, 1e-5);
    const Output out_buffer = whole ? Output{d_out_act, &init_out, true} : Output{d_out, &init_out};
    check_deterministic("flash attention forward " + tag, {out_buffer, {d_lse, &init_lse}}, run);
    for (void* p : {(void*)d_cu, (void*)d_qkv, (void*)d_out, (void*)d_out_act, (void*)d_lse, (void*)rope.d_positions,
                    (void*)rope.d_table})
        CUDA_CHECK(cudaFree(p));
}

// The tensor-core flash backward against the block backward, both on the same turned (RoPE) and
// bf16-rounded q, k, v, bf16 dout and bf16 out (out rounded from the reference forward's, lse that
// forward's). The kernels round P
// and dS to bf16 before their products (everything else is exact bf16 products summed in fp32), so
// each output element is off by at most 2⁻⁸ (bf16's unit roundoff) × its sum of |terms|:
// Σ_i p_ij |dO_i| for dV, scale·Σ |dS| |q| for dK, scale·Σ |dS| |k| for dQ, computed below from the
// reference's P and dS; the check allows 2⁻⁷ × that (fp32 rounding of P and of the sums, second
// order), plus what the fp32 sums of dP and D (kernel and reference alike) can move dS by where
// dP − D cancels, plus 1e-6. With RoPE both sides turn dq and dk back by Rᵀ, which mixes each pair
// (c, c + 32): the bound of c becomes |cos|·bound(c) + |sin|·bound(c + 32) (and the other way for
// c + 32), plus the turn's own fp32 rounding (2⁻²³ of the value). The op adds: dq, dk and dv start
// from random values. null_dq / null_dkv: that side is skipped and must stay as it was.
// whole: the whole-batch op (attention_backward), which writes dqkv in bf16 (padding rows: zeros) over
// the random values, against ref's whole-batch op; its bound widened by that rounding: b·(1 + u) + u·|want|
// (check_act's argument). rope_offset < 0: no RoPE.
static void test_flash_backward(const std::vector<int>& doc_lengths, int T, int nh, int window, int q0, int Tq, int k0,
                                int Tk, uint64_t seed, bool null_dq = false, bool null_dkv = false, bool whole = false,
                                int rope_offset = 0) {
    const int hd = 64;
    Rng rng(seed);
    const std::vector<int> cu_seqlens = document_table(doc_lengths);
    const int n_docs = (int)doc_lengths.size();
    if (whole) q0 = k0 = 0, Tq = Tk = T;
    const std::string tag = (whole ? "whole batch " : "") + flash_tag(cu_seqlens, T, nh, window, q0, Tq, k0, Tk) +
                            (null_dq ? " (no dq)" : "") + (null_dkv ? " (no dk, dv)" : "") +
                            (rope_offset < 0 ? " no rope" : fmt(" rope from %d", rope_offset));
    const size_t H = (size_t)nh * hd;
    const int S = 3 * (int)H;
    const float scale = 1.0f / sqrtf((float)hd);
    const std::vector<float> input = random_acts(rng, (size_t)T * S, 1.5f);
    const std::vector<float> dout = random_acts(rng, (size_t)Tq * H, 1.0f);
    const std::vector<float> init = random_floats(rng, (size_t)T * S, 0.1f);
    const FlashRope rope = flash_rope(cu_seqlens, T, rope_offset);
    std::vector<float> qkv = input;  // what the kernels compute on: q, k turned, then rounded
    turn_qk(qkv, rope, T, nh, 1.0f);
    qkv = bf16_rounded(qkv);
    const float *q = qkv.data() + (size_t)q0 * S, *k = qkv.data() + (size_t)k0 * S + H, *v = k + H;
    std::vector<float> out((size_t)Tq * H), lse((size_t)Tq * nh);
    ref::attention_block_forward(out.data(), lse.data(), q, S, q0, Tq, k, v, S, k0, Tk, cu_seqlens.data(), n_docs,
                                 nullptr, nullptr, nh, hd, window);
    out = bf16_rounded(out);  // as the whole-batch forward stores it
    std::vector<float> grad(init.size(), 0.0f);  // the reference's gradients of the turned q, k (and of v)
    if (whole)
        ref::attention_backward(grad.data(), dout.data(), out.data(), lse.data(), qkv.data(), cu_seqlens.data(), n_docs,
                                nullptr, nullptr, T, nh, hd, window);
    else
        ref::attention_block_backward(null_dq ? nullptr : grad.data() + (size_t)q0 * S,
                                      null_dkv ? nullptr : grad.data() + (size_t)k0 * S + H,
                                      null_dkv ? nullptr : grad.data() + (size_t)k0 * S + 2 * H, S, S, dout.data(),
                                      out.data(), lse.data(), q, S, q0, Tq, k, v, S, k0, Tk, cu_seqlens.data(), n_docs,
                                      nullptr, nullptr, nh, hd, window);
    std::vector<double> abs_sum(init.size(), 0.0);  // Σ |terms| of each output element
    std::vector<double> dot_err(init.size(), 0.0);  // what the fp32 sums of dP and D can move dS by, through it
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < Tq; i++) {
            int a, b;
            ref::attention_visible(q0 + i, cu_seqlens.data(), n_docs, window, k0, k0 + Tk, &a, &b);
            const float* gi = dout.data() + (size_t)i * H + (size_t)h * hd;
            double D = 0, D_abs = 0;
            for (int c = 0; c < hd; c++) {
                D += (double)gi[c] * out[(size_t)i * H + (size_t)h * hd + c];
                D_abs += fabs((double)gi[c] * out[(size_t)i * H + (size_t)h * hd + c]);
            }
            for (int j = a; j < b; j++) {
                const float *qi = qkv.data() + (size_t)(q0 + i) * S + h * hd, *kj = qkv.data() + (size_t)j * S + H + h * hd;
                const float* vj = kj + H;
                double sc = 0, dp = 0, dp_abs = 0;
                for (int c = 0; c < hd; c++)
                    sc += (double)qi[c] * kj[c], dp += (double)gi[c] * vj[c], dp_abs += fabs((double)gi[c] * vj[c]);
                const double p = exp(sc * scale - lse[(size_t)i * nh + h]), ds = fabs(p * (dp - D));
                // dP and D are fp32 sums of hd products in the kernel and in the reference: each off by
                // up to hd·2⁻²⁴ of its Σ|terms|, which dS = P·(dP − D) carries even where dP − D cancels
                const double ds_err = p * 2.0 * hd * std::ldexp(1.0, -24) * (dp_abs + D_abs);
                for (int c = 0; c < hd; c++) {
                    if (!null_dq) abs_sum[(size_t)(q0 + i) * S + h * hd + c] += scale * ds * fabs(kj[c]);
                    if (!null_dq) dot_err[(size_t)(q0 + i) * S + h * hd + c] += scale * ds_err * fabs(kj[c]);
                    if (!null_dkv) {
                        dot_err[(size_t)j * S + H + h * hd + c] += scale * ds_err * fabs(qi[c]);
                        abs_sum[(size_t)j * S + H + h * hd + c] += scale * ds * fabs(qi[c]);
                        abs_sum[(size_t)j * S + 2 * H + h * hd + c] += p * fabs(gi[c]);
                    }
                }
            }
        }
    std::vector<double> bound(init.size());
    for (size_t e = 0; e < bound.size(); e++) bound[e] = abs_sum[e] / 128.0 + dot_err[e];
    if (!rope.table.empty()) {  // Rᵀ on the reference's dq, dk and on their bounds (pairs c, c + 32)
        turn_qk(grad, rope, T, nh, -1.0f);
        std::vector<double> turned = bound;
        for (int t = 0; t < T; t++)
            for (size_t col = 0; col < 2 * H; col++) {
                const int c = (int)(col % hd), pair = c % 32;
                const float* cs = &rope.table[((size_t)rope.positions[t] * 32 + pair) * 2];
                const size_t at = (size_t)t * S + col, partner = c < 32 ? at + 32 : at - 32;
                turned[at] = fabs(cs[0]) * bound[at] + fabs(cs[1]) * bound[partner] + std::ldexp(fabs(grad[at]), -23);
            }
        bound = turned;
    }
    std::vector<float> want(init.size());
    for (size_t e = 0; e < want.size(); e++) want[e] = whole ? grad[e] : init[e] + grad[e];
    std::vector<double> tol(bound.size());  // the bound + 1e-6, widened for bf16 storage (whole)
    for (size_t e = 0; e < tol.size(); e++)
        tol[e] = whole ? (bound[e] + 1e-6) * (1 + BF16_U) + BF16_U * std::fabs(want[e]) + BF16_TINY : bound[e] + 1e-6;
    int* d_cu = upload_ints(cu_seqlens);
    cuda::act *d_qkv = upload_acts(input), *d_dout = upload_acts(dout), *d_out = upload_acts(out);
    cuda::act* d_grad_act = upload_acts(init);  // the whole-batch op's dqkv
    float *d_lse = upload(lse), *d_grad = upload(init);
    auto run = [&]() {
        if (whole)
            cuda::attention_backward(d_grad_act, d_dout, d_out, d_lse, d_qkv, d_cu, n_docs, rope.d_positions,
                                     rope.d_table, T, nh, hd, window);
        else
            cuda::attention_block_backward(null_dq ? nullptr : d_grad + (size_t)q0 * S,
                                           null_dkv ? nullptr : d_grad + (size_t)k0 * S + H,
                                           null_dkv ? nullptr : d_grad + (size_t)k0 * S + 2 * H, S, S, d_dout, d_out, d_lse,
                                           d_qkv + (size_t)q0 * S, S, q0, Tq, d_qkv + (size_t)k0 * S + H,
                                           d_qkv + (size_t)k0 * S + 2 * H, S, k0, Tk, d_cu, n_docs, rope.d_positions,
                                           rope.d_table, nh, hd, window);
    };
    run();
    const std::vector<float> got = whole ? download_acts(d_grad_act, init.size()) : download(d_grad, init.size());
    record_digest("flash attention backward output " + tag, got.data(), got.size() * sizeof(float));
    std::vector<float> err_over_tol(got.size()), zeros(got.size(), 0.0f);
    for (size_t e = 0; e < got.size(); e++) err_over_tol[e] = (float)(fabs((double)got[e] - want[e]) / tol[e]);
    check(std::string("flash attention backward dq dk dv, |error| / (2^-7·Σ|terms| + fp32 dot error + 1e-6") +
              (whole ? ", widened for bf16) " : ") ") + tag,
          err_over_tol, zeros, 1.0, 0.0);
    const Output grad_buffer = whole ? Output{d_grad_act, &init, true} : Output{d_grad, &init};
    check_deterministic("flash attention backward " + tag, {grad_buffer}, run);
    for (void* p : {(void*)d_cu, (void*)d_qkv, (void*)d_dout, (void*)d_out, (void*)d_lse, (void*)d_grad,
                    (void*)d_grad_act, (void*)rope.d_positions, (void*)rope.d_table})
        CUDA_CHECK(cudaFree(p));
}
static void test_tensor_core_tile(uint64_t seed) {
    Rng rng(seed);
    std::vector<uint16_t> q(256), k(256), v(256);
    for (auto* x : {&q, &k, &v})
        for (auto& e : *x) e = host_bf16(rng.symmetric());
    uint16_t *dq = upload_u16(q), *dk = upload_u16(k), *dv = upload_u16(v);
    float *ds = device_array<float>(256), *dout = device_array<float>(256);
    CUDA_LAUNCH(tile_qkv_kernel, 1, 32, dq, dk, dv, ds, dout);
    auto s = download_array(ds, 256), o = download_array(dout, 256);
    // S against double on the same bf16 inputs: |q|, |k| < 1, so Σ|q·k| < 16 and fp32 accumulation
    // of 16 exact products errs by < 16·16·2⁻²⁴ ≈ 1.5e-5; 1e-4 leaves room for the tensor core's rounding.
    std::vector<float> s_want(256), o_want(256);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            double acc = 0;
            for (int p = 0; p < 16; p++) acc += (double)host_bf16_float(q[i * 16 + p]) * host_bf16_float(k[j * 16 + p]);
            s_want[i * 16 + j] = (float)acc;
        }
    check(fmt("tensor core S = Q·K^T 16x16 (ldmatrix_x4, mma) seed %llu", (unsigned long long)seed), s, s_want, 1e-4, 1e-4);
    // O against double from the kernel's own S rounded to bf16 (so a tie in that rounding cannot
    // differ): Σ|p·v| < 16·max|S| < 256, fp32 accumulation errs < 16·256·2⁻²⁴ ≈ 2.5e-4; tolerance 1e-3.
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            double acc = 0;
            for (int p = 0; p < 16; p++)
                acc += (double)host_bf16_float(host_bf16(s[i * 16 + p])) * host_bf16_float(v[p * 16 + j]);
            o_want[i * 16 + j] = (float)acc;
        }
    check(fmt("tensor core O = bf16(S)·V 16x16 (pack_bf16x2, ldmatrix_x4_trans, mma) seed %llu", (unsigned long long)seed), o, o_want, 1e-3, 1e-4);

    uint32_t* dl = device_array<uint32_t>(32 * 14);
    CUDA_LAUNCH(ldmatrix_layout_kernel, 1, 32, dl);
    auto l = download_array(dl, 32 * 14);
    std::vector<float> got, want;  // element values (exact small integers), low half then high half
    for (int lane = 0; lane < 32; lane++) {
        const int counts[6] = {1, 2, 4, 1, 2, 4};
        int reg = 0;
        for (int variant = 0; variant < 6; variant++)
            for (int mat = 0; mat < counts[variant]; mat++, reg++)
                for (int h = 0; h < 2; h++) {
                    const uint32_t word = l[lane * 14 + reg];
                    got.push_back(host_bf16_float((uint16_t)(h ? word >> 16 : word & 0xffff)));
                    const bool trans = variant >= 3;
                    const int i = trans ? 2 * (lane % 4) + h : lane / 4, j = trans ? lane / 4 : 2 * (lane % 4) + h;
                    want.push_back((float)(64 * mat + 8 * i + j));
                }
    }
    check(fmt("ldmatrix x1/x2/x4 and .trans layouts (run %llu)", (unsigned long long)seed), got, want, 0, 0);
    for (void* p : {(void*)dq, (void*)dk, (void*)dv, (void*)ds, (void*)dout, (void*)dl}) CUDA_CHECK(cudaFree(p));
}

__global__ void pack_bf16x2_kernel(const float* in, uint32_t* out, int n_pairs) {
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) out[i] = cuda::pack_bf16x2(in[2 * i], in[2 * i + 1]);
}
static void test_pack_bf16x2() {
    auto f = [](uint32_t bits) {
        float x;
        memcpy(&x, &bits, 4);
        return x;
    };
    // (input bits, expected bf16 bits), written out by hand; 0xFFFF = expect some NaN
    const std::vector<std::pair<uint32_t, uint16_t>> cases = {
        {0x3f800000u, 0x3f80}, {0x40000000u, 0x4000},  // 1, 2: exact
        {0x3f808000u, 0x3f80}, {0x3f818000u, 0x3f82},  // ties: to even (down, then up)
        {0x3f808001u, 0x3f81}, {0x3f807fffu, 0x3f80},  // just above / below a tie
        {0xbf808000u, 0xbf80}, {0xbf818000u, 0xbf82},  // negative ties
        {0x7f7fffffu, 0x7f80}, {0x7f7f8000u, 0x7f80},  // FLT_MAX and the top tie round to inf
        {0x7f7f7fffu, 0x7f7f}, {0x7f800000u, 0x7f80},  // below the top tie; inf
        {0xff800000u, 0xff80}, {0x80000000u, 0x8000},  // -inf, -0
        {0x00008000u, 0x0000}, {0x00018000u, 0x0002},  // subnormal ties
        {0x7fc00000u, 0xffff}, {0x7f800001u, 0xffff},  // quiet NaN, signalling NaN (low payload bit only)
        {0xffc00001u, 0xffff}, {0x3f800000u, 0x3f80},
    };
    std::vector<float> in;
    for (auto& c : cases) in.push_back(f(c.first));
    const int n_pairs = (int)cases.size() / 2;
    float* din = upload(in);
    uint32_t* dout = device_array<uint32_t>(n_pairs);
    CUDA_LAUNCH(pack_bf16x2_kernel, 1, 32, din, dout, n_pairs);
    auto out = download_array(dout, n_pairs);
    int bad = 0;
    char detail[200] = "";
    for (size_t c = 0; c < cases.size(); c++) {
        const uint16_t got = (uint16_t)(c % 2 ? out[c / 2] >> 16 : out[c / 2] & 0xffff);
        const bool nan = (got & 0x7f80) == 0x7f80 && (got & 0x7f);
        const bool ok = cases[c].second == 0xffff ? nan : got == cases[c].second;
        if (!ok && !bad++)
            snprintf(detail, sizeof detail, "0x%08x -> 0x%04x, want 0x%04x", cases[c].first, got, cases[c].second);
    }
    record(bad == 0, "pack_bf16x2 rounding (ties to even, overflow, subnormals, NaN; lo/hi halves)", detail);
    const uint32_t one_two = out[0];
    record(cuda::bf16x2_lo(one_two) == 1.0f && cuda::bf16x2_hi(one_two) == 2.0f && cuda::bf16_to_float(0xbf82) == -1.015625f,
           "bf16x2_lo / bf16x2_hi / bf16_to_float", "");
    CUDA_CHECK(cudaFree(din));
    CUDA_CHECK(cudaFree(dout));
}

// 64 threads, two commit groups (chunk 0, then chunk 1, 16 bytes each per thread); after wait<1>
// and a barrier every thread reads a neighbour's chunk-0 copy, after wait<0> its chunk 1. Under the
// emulator, also: a destination reads as poison between issue and wait.
__global__ void cp_async_kernel(const float* src, float* out, int* poisoned) {
    alignas(16) __shared__ float buf[2][64 * 4];
    const int t = threadIdx.x, n = blockDim.x;
    cuda::cp_async_16(&buf[0][4 * t], src + 4 * t);
    cuda::cp_async_commit();
    cuda::cp_async_16(&buf[1][4 * t], src + 4 * (n + t));
    cuda::cp_async_commit();
#ifdef PICOTRON_EMULATE
    uint32_t w;
    memcpy(&w, &buf[1][4 * t], 4);
    if (w != emu::POISON_WORD) atomicAdd(poisoned, 1);
#else
    (void)poisoned;
#endif
    cuda::cp_async_wait<1>();
    __syncthreads();
    const int u = (t + 1) % n;
    for (int i = 0; i < 4; i++) out[4 * t + i] = buf[0][4 * u + i];
    cuda::cp_async_wait<0>();
    __syncthreads();
    for (int i = 0; i < 4; i++) out[4 * (n + t) + i] = buf[1][4 * u + i];
}
static void test_cp_async() {
    Rng rng(77);
    auto src = random_floats(rng, 2 * 64 * 4);
    float *dsrc = upload(src), *dout = cuda::alloc_floats(src.size());
    int* dpoison = cuda::alloc_ints(1);
    CUDA_LAUNCH(cp_async_kernel, 1, 64, dsrc, dout, dpoison);
    std::vector<float> want(src.size());
    for (int c = 0; c < 2; c++)
        for (int t = 0; t < 64; t++)
            for (int i = 0; i < 4; i++) want[4 * (64 * c + t) + i] = src[4 * (64 * c + (t + 1) % 64) + i];
    check("cp_async_16 / commit / wait<1>, wait<0> (two groups, read by another thread)", download(dout, src.size()),
          want, 0, 0);
    int not_poisoned = -1;
    cuda::copy_to_host(&not_poisoned, dpoison, sizeof(int));
    record(not_poisoned == 0, "cp_async destination reads as poison before the wait (emulator; 0 on a GPU)",
           not_poisoned ? "some destination was not poisoned" : "");
    cuda::free_buffer(dsrc);
    cuda::free_buffer(dout);
    cuda::free_buffer(dpoison);
}

int main(int argc, char** argv) {
    MPI_CHECK(MPI_Init(&argc, &argv));
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) fatal("no CUDA device");
    CUDA_CHECK(cudaSetDevice(0));

    test_memory();
    test_to_act();

    // shard [50, 120) of a 200-id range, pad id inside the shard; a 0-based shard with the pad id last;
    // a shard that the pad id is outside of; a large run with H not a multiple of the 128-column tile
    test_embedding(333, 100, 50, 70, 200, 60, 101);
    test_embedding(1500, 768, 0, 1000, 1100, 999, 102);
    test_embedding(257, 64, 100, 37, 300, 5, 103);
    test_embedding(4100, 200, 1000, 3000, 5000, 2000, 104);

    test_layernorm(37, 300, 201);
    test_layernorm(130, 768, 202);
    test_layernorm(1, 33, 203);

    test_matmul(67, 129, 35, 301);
    test_matmul(5, 768, 2304, 302);
    test_matmul(128, 64, 1, 303);
    test_matmul(300, 200, 257, 304);
    test_matmul(7, 0, 5, 305);  // an empty sum: out is the bias, dinp zero, dweight empty
    test_matmul_plans(306);

    test_add_inplace(1000003);
    // a row narrower than a warp and fewer rows than a block's warps; C not a multiple of 32; the widest
    // fused row; a row wider (the two kernels)
    test_add_layernorm(1, 7, 211);
    test_add_layernorm(37, 300, 212);
    test_add_layernorm(130, 768, 213);
    test_add_layernorm(6, 1024, 214);
    test_add_layernorm(3, 1100, 215);

    test_rope_table(300, 64, 160000.0f);
    test_rope_table(8192, 64, 10000.0f);

    // documents of different lengths (one > 200, one of length 1, one empty), 13 padding tokens
    const std::vector<int> docs = {37, 230, 1, 64, 0, 5};
    // one (query shard, key block) pair: shard and block cutting documents, window ≥ 0, hd up to 128
    test_attention_merge(docs, 350, 3, 64, -1, 20, 200, 30, 250, 511);
    test_attention_merge(docs, 350, 3, 64, 5, 200, 137, 100, 150, 512);
    test_attention_merge({100, 250}, 360, 2, 40, 70, 90, 170, 0, 120, 513);
    test_attention_merge({37, 70, 21}, 140, 2, 128, -1, 0, 140, 50, 60, 514);  // padding queries too
    // the tensor-core flash forward: documents shorter than a tile and of one token, padding, windows
    // cutting tiles, T and blocks not multiples of 64, an external key block, a block nobody sees
    test_flash_forward({1, 30, 60, 7, 22}, 140, 2, -1, 0, 140, 0, 140, 521);
    test_flash_forward({1, 30, 60, 7, 22}, 140, 1, 5, 13, 100, 0, 140, 522);
    test_flash_forward({200}, 200, 1, 64, 30, 100, 10, 150, 523);
    test_flash_forward({37, 70, 21}, 140, 2, -1, 0, 140, 50, 60, 524);
    test_flash_forward({37, 70, 21}, 140, 1, -1, 0, 40, 128, 12, 525);  // keys: padding only
    test_flash_forward({1, 30, 60, 7, 22}, 140, 1, 5, 13, 100, 0, 140, 526, false, -1);  // no RoPE
    test_flash_forward({200}, 200, 1, -1, 0, 200, 0, 200, 527, false, 7000);  // positions up to 7199
    test_flash_backward({1, 30, 60, 7, 22}, 140, 2, -1, 0, 140, 0, 140, 531);
    test_flash_backward({1, 30, 60, 7, 22}, 140, 1, 5, 13, 100, 0, 140, 532);
    test_flash_backward({200}, 200, 1, 64, 30, 100, 10, 150, 533);
    test_flash_backward({37, 70, 21}, 140, 1, -1, 0, 140, 50, 60, 534, true, false);
    test_flash_backward({37, 70, 21}, 140, 1, -1, 0, 140, 50, 60, 535, false, true);
    test_flash_backward({1, 30, 60, 7, 22}, 140, 1, 5, 13, 100, 0, 140, 536, false, false, false, -1);  // no RoPE
    test_flash_backward({200}, 200, 1, 64, 30, 100, 10, 150, 537, false, false, false, 7000);  // positions up to 7199
    // the whole-batch ops (forward written, backward written over random values): documents of
    // different lengths, one > 200, one of length 1, one empty, padding or none, global and ±64
    const std::vector<int> whole_docs = {37, 130, 1, 64, 0, 5};  // 237 tokens; 130 spans three tiles
    test_flash_forward(whole_docs, 250, 2, -1, 0, 0, 0, 0, 541, true);
    test_flash_forward(whole_docs, 237, 1, 64, 0, 0, 0, 0, 542, true);  // no padding
    test_flash_backward(whole_docs, 250, 1, -1, 0, 0, 0, 0, 543, false, false, true);
    test_flash_backward(whole_docs, 237, 1, 64, 0, 0, 0, 0, 544, false, false, true);

    test_gelu(10007);
    test_geglu(33, 257);
    test_rows(300, 129, 91);
    test_kv_blocks(37, 8, 5, 20, 621);
    test_kv_blocks(37, 8, 0, 37, 622);    // the whole shard
    test_kv_blocks(37, 8, 11, 0, 623);    // nothing: no launch
    test_kv_blocks(50, 64, 37, 13, 624);  // the last rows: row0 = T - n
    test_kv_blocks(700, 64, 3, 600, 625); // 76800 elements: 300 blocks

    test_crossentropy(9, 50368, 50368, 0, 601);
    test_crossentropy(20, 1000, 1000, 0, 602);
    test_crossentropy(3, 7, 7, 0, 603);
    test_crossentropy(9, 16790, 16788, 33580, 604);  // 50368 over tp 3: the last shard, 2 padding columns
    test_crossentropy(20, 1000, 1000, 1000, 605);    // a middle shard
    test_crossentropy(6, 7, 3, 14, 606);
    test_crossentropy(5, 8, 0, 48, 607);             // padding only

    test_reductions(0);
    test_reductions(1);
    test_reductions(1000);
    test_reductions(1000003);
    test_reductions(5000000);

    test_stable_adamw_rms(10007);
    // one large piece; empty pieces first, inside and last, one-element pieces, sizes around the block
    // size; many pieces; none at all (no launch)
    test_adamw_pieces({10007}, 801);
    test_adamw_pieces({0, 1, 300, 0, 1, 255, 256, 257, 31, 5000, 0}, 802);
    std::vector<size_t> many(300);
    Rng sizes(803);
    for (size_t& n : many) n = sizes.below(5) == 0 ? sizes.below(3) : sizes.below(700);
    test_adamw_pieces(many, 804);
    test_adamw_pieces({}, 805);

    test_pack_bf16x2();
    test_cp_async();
    test_tensor_core_tile(701);
    test_tensor_core_tile(702);

    cuda::synchronize();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    fflush(stdout);
    MPI_CHECK(MPI_Finalize());
    return n_failed ? 1 : 0;
}
