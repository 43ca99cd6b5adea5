// tests/cuda_emu.h — the CUDA execution model on the CPU, so that g++ compiles kernels.cuh's CUDA
// section unchanged and runs every kernel thread by thread (make test-emu). kernels.cuh includes
// this file first when PICOTRON_EMULATE is defined; it defines __CUDACC__, so every `#ifdef
// __CUDACC__` branch compiles as it does under nvcc. Build with -ffp-contract=off (the Makefile's
// flags): the _rn intrinsics below are plain IEEE operations and must not be fused into FMAs.
//
// The model, and what it catches:
//   - One fiber per CUDA thread: its own 64 KiB stack (guard page below it, so an overflow faults)
//     and a context switch of a few instructions (callee-saved registers and rsp; ucontext would cost
//     ~200 ns a switch by saving the signal mask with a system call). A thread runs until it waits (a
//     barrier, a warp collective) or returns; then the next one runs.
//   - Blocks run one after another. The threads of a block, and the blocks of a grid, are resumed in
//     forward, reverse or random order (PICOTRON_EMU_ORDER=forward|reverse|random, default forward;
//     PICOTRON_EMU_SEED for random, default 1), so a missing barrier shows up as a wrong result or a
//     read of poison in some order, and a kernel that depends on block order fails in another.
//   - __shared__ arrays are `static thread_local`: one copy, seen by every fiber (they all run on the
//     main thread), in the executable's TLS block, which every block start fills with poison; so is
//     new device memory (cudaMalloc). (A linker section would not do: g++ drops section attributes on
//     statics inside templates, such as block_sum<T>'s. The price: nothing else in a test binary may
//     be thread_local.) The poison word 0xFFF5A5A5 is a NaN as a float and, doubled, as a double, and
//     an odd negative int (-678491): unlike 0xFF bytes it is not -1, a value kernels use as a marker.
//   - __syncthreads completes when every thread of the block waits at the same barrier (the same
//     call site). Threads waiting at different barriers, a barrier that exited threads never reach,
//     and a deadlock are errors that name the kernel, block and thread; the process exits 1.
//   - Warp collectives (__shfl*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp) complete when
//     every lane of the mask waits at the same call with the same mask (other lanes may be ahead or
//     behind, as under independent thread scheduling). Lanes that wait for each other at different
//     calls (divergence), a mask that names an exited lane or leaves out its caller, and a shuffle
//     reading a lane outside the mask are errors.
//   - Runtime: device memory is host memory, remembered per allocation, so copies check that their
//     kind matches where the pointers point and a kernel refuses a host pointer argument. Streams and
//     events exist, and since every call completes before it returns, they are in order.
//   - cuBLASLt: the matmul subset kernels.cuh uses, computed with plain loops from the column-major
//     layouts it is given (transposes, leading dimensions, beta, the bias epilogue), so the layout
//     logic is exercised: CUBLAS_COMPUTE_32F on bf16 A and B (CUDA_R_16BF), D (= C) and the bias in
//     bf16 or fp32, D rounded to nearest even when bf16 (and, as before, CUBLAS_COMPUTE_32F_FAST_16BF
//     on fp32 A and B, rounded to bf16 first). Type combinations real cuBLASLt refuses and that a
//     caller could pass by mistake are refused too: A and B of different types, bf16 A and B under
//     CUBLAS_COMPUTE_32F_FAST_16BF (a mode for fp32 operands), C not of D's type, a bias type other
//     than D's.
// The tensor-core and async-copy primitives (mma, ldmatrix, cp.async, bf16 packing) are emulated in
// tests/cuda_emu_mma.h, NCCL only enough to build (the emulated trainer runs --comm mpi).
//   - Dynamic shared memory: dynamic_shared<T>() (kernels.cuh; a kernel never writes `extern
//     __shared__`) is the launch's buffer, allocated with exactly the byte count CUDA_LAUNCH_SHARED
//     gives (so the ASan build catches a read past it), 16-byte aligned, poisoned at every block
//     start. Asking for more than 227 KiB is an invalid configuration; static shared memory is not
//     counted against that limit, nor is the 48 KiB above which CUDA wants cudaFuncSetAttribute.
//   - half: __half as its 16 bits, with __float2half_rn / __half2float (exact, round to nearest
//     even) and __half_as_ushort / __ushort_as_half; no half arithmetic or half2.
// Not modelled: memory races between warps (threads switch only at barriers and collectives), half
// arithmetic.
#pragma once
#if !defined(__x86_64__)
#error "tests/cuda_emu.h: the fiber context switch is written for x86-64"
#endif
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#endif

#define __CUDACC__ 1

// ---- qualifiers ----
// Device code is host code. A __shared__ array becomes a thread-local static: one copy, seen by every
// thread of the running block, in the TLS block that run_block poisons.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static thread_local

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Read by kernels as in CUDA; the scheduler sets threadIdx before it resumes each thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// the runtime's errors (the subset this emulator returns)
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
};

// ---- the context switch ----
// emu_switch_context(save, load): push the callee-saved registers, store rsp in *save, load rsp from
// `load`, pop that fiber's registers, return into it. Everything else is caller-saved, so the
// compiler has spilled it around the call. (The MXCSR and x87 control words are callee-saved too, but
// no fiber changes them.) Weak, so that two translation units may both include this header.
extern "C" void emu_switch_context(void** save, void* load);
asm(R"(
    .pushsection .text
    .weak emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
    .popsection
)");

namespace emu {

inline cudaError_t last_error = cudaSuccess;
// every failing call also leaves its error for cudaGetLastError, as in CUDA
inline cudaError_t result(cudaError_t e) {
    if (e != cudaSuccess) last_error = e;
    return e;
}

constexpr uint32_t POISON_WORD = 0xFFF5A5A5u;
// Whole words copied from a poisoned pattern a chunk at a time (every block start poisons all kernels'
// __shared__ arrays, a few hundred KiB: memcpy runs ~7× faster than a loop of 4-byte stores), then 0xFF
// bytes for a tail shorter than a word.
inline void poison(void* p, size_t bytes) {
    static const std::vector<uint32_t> pattern(4096, POISON_WORD);
    const size_t chunk = pattern.size() * sizeof(uint32_t);
    unsigned char* b = static_cast<unsigned char*>(p);
    size_t i = 0;
    for (; i + chunk <= bytes; i += chunk) memcpy(b + i, pattern.data(), chunk);
    const size_t words = (bytes - i) / sizeof(uint32_t) * sizeof(uint32_t);
    memcpy(b + i, pattern.data(), words);
    for (i += words; i < bytes; i++) b[i] = 0xFF;
}

// A call site (barriers and collectives are told apart by where they are written).
struct Site {
    const char* file;
    int line;
};
inline bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || !strcmp(a.file, b.file)); }

enum class Op : uint8_t { shfl, shfl_up, shfl_down, shfl_xor, ballot, any, all, syncwarp };
inline const char* op_name(Op op) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
    return names[(int)op];
}

enum class State : uint8_t { ready, at_barrier, at_warp, exited };
struct Thread {
    void* sp;  // saved stack pointer while switched out
    void* asan_fake;  // AddressSanitizer's fake stack of this fiber while switched out
    uint3 idx;
    State state;
    // at a warp collective: its argument (source lane, delta or lane mask), width, this lane's
    // contribution and, once complete, its result
    int arg, width;
    uint64_t value, result;
};
// A warp collective that lanes wait at: it completes when every lane of the mask has arrived.
struct Collective {
    Site site;
    Op op;
    unsigned mask, arrived;
};
struct Warp {
    unsigned exited, at_barrier;  // lanes
    int n_pending;                // lanes ahead of others may wait at a second collective
    Collective pending[32];
};

// ---- the run: configuration, the block being run ----
enum class Order { forward, reverse, random };
struct Config {
    Order order = Order::forward;
    uint64_t seed = 1;
};
inline const Config& config() {
    static const Config c = [] {
        Config k;
        const char* order = getenv("PICOTRON_EMU_ORDER");
        if (order && *order) {
            if (!strcmp(order, "forward")) k.order = Order::forward;
            else if (!strcmp(order, "reverse")) k.order = Order::reverse;
            else if (!strcmp(order, "random")) k.order = Order::random;
            else {
                fprintf(stderr, "cuda_emu: PICOTRON_EMU_ORDER=%s: expected forward, reverse or random\n", order);
                exit(1);
            }
        }
        if (const char* seed = getenv("PICOTRON_EMU_SEED")) k.seed = strtoull(seed, nullptr, 10);
        return k;
    }();
    return c;
}
struct Rng {  // xorshift64*: the random order, reproducible from the seed
    uint64_t s;
    uint64_t next() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return s * 0x2545F4914F6CDD1Dull;
    }
    uint64_t below(uint64_t n) { return next() % n; }
};
// The main thread's TLS block of the executable (the first object dl_iterate_phdr reports): the
// __shared__ arrays. Empty if there are none.
struct SharedMemory {
    char* base = nullptr;
    size_t bytes = 0;
};
inline const SharedMemory& shared_memory() {
    static const SharedMemory m = [] {
        SharedMemory found;
        dl_iterate_phdr(
            [](dl_phdr_info* info, size_t, void* out) {
                for (int i = 0; i < info->dlpi_phnum; i++)
                    if (info->dlpi_phdr[i].p_type == PT_TLS)
                        *static_cast<SharedMemory*>(out) = {static_cast<char*>(info->dlpi_tls_data),
                                                            (size_t)info->dlpi_phdr[i].p_memsz};
                return 1;  // stop after the executable
            },
            &found);
        return found;
    }();
    return m;
}
inline Rng& rng() {
    static Rng r{config().seed * 0x9E3779B97F4A7C15ull + 1};
    return r;
}

constexpr size_t STACK_BYTES = 64 << 10;
struct Run {
    const char* kernel = nullptr;  // while a kernel runs: its name
    void (*body)(void*) = nullptr;  // runs the kernel for the current thread
    void* body_arg = nullptr;
    int n_threads = 0, n_exited = 0, n_at_barrier = 0;
    Site barrier_site{};
    Thread* current = nullptr;  // the running thread, null on the scheduler
    void* scheduler_sp = nullptr;
    void* scheduler_asan_fake = nullptr;      // (AddressSanitizer: the scheduler's fake stack, and its stack
    const void* scheduler_stack = nullptr;   //  bounds, learnt on the first switch into a fiber)
    size_t scheduler_stack_bytes = 0;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<char*> stacks;  // tops of the fiber stacks, kept across launches
    std::vector<int> order;     // the resume order of one round
    unsigned char* dynamic_shared = nullptr;  // while a kernel runs: its dynamic shared memory, exactly
    size_t dynamic_shared_bytes = 0;          //  the launch's byte count (so ASan catches a read past it)
};
inline Run run;

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
    fflush(stdout);
    if (run.kernel) {
        fprintf(stderr, "cuda_emu: kernel %s, block (%u,%u,%u)", run.kernel, blockIdx.x, blockIdx.y, blockIdx.z);
        if (run.current)
            fprintf(stderr, ", thread (%u,%u,%u)", run.current->idx.x, run.current->idx.y, run.current->idx.z);
        fprintf(stderr, ": ");
    } else {
        fprintf(stderr, "cuda_emu: ");
    }
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
    fflush(stderr);
    _exit(1);  // possibly on a fiber's stack: no destructors, no atexit handlers
}

inline Thread* current_thread(const char* what) {
    if (!run.current) fail("%s called outside a kernel", what);
    return run.current;
}
// AddressSanitizer must hear of every switch of stacks, or it reports errors that are not there:
// asan_leave before a switch (the stack being entered; fake null for a fiber that never returns),
// asan_arrive right after one (it gives back the stack just left).
inline void asan_leave([[maybe_unused]] void** fake, [[maybe_unused]] const void* bottom,
                       [[maybe_unused]] size_t bytes) {
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_start_switch_fiber(fake, bottom, bytes);
#endif
}
inline void asan_arrive([[maybe_unused]] void* fake, [[maybe_unused]] const void** left,
                        [[maybe_unused]] size_t* left_bytes) {
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(fake, left, left_bytes);
#endif
}
// switch from the running thread back to the scheduler; it returns when the scheduler resumes it
inline void wait(Thread* t) {
    asan_leave(&t->asan_fake, run.scheduler_stack, run.scheduler_stack_bytes);
    emu_switch_context(&t->sp, run.scheduler_sp);
    asan_arrive(t->asan_fake, nullptr, nullptr);
}

[[noreturn]] inline void thread_exit(Thread* t);
// Every fiber starts here (entered by emu_switch_context's ret, with rsp as after a call).
[[noreturn]] inline void fiber_main() {
    asan_arrive(nullptr, &run.scheduler_stack, &run.scheduler_stack_bytes);
    run.body(run.body_arg);
    thread_exit(run.current);
}

inline int lane_of(const Thread* t) { return (int)(t - run.threads.data()) % warpSize; }
inline Warp& warp_of(const Thread* t) { return run.warps[(t - run.threads.data()) / warpSize]; }
// the pending collective of a warp that waits for `lane`, if any
inline const Collective* waiting_for(const Warp& w, int lane) {
    for (int i = 0; i < w.n_pending; i++)
        if (w.pending[i].mask >> lane & 1) return &w.pending[i];
    return nullptr;
}

// ---- __syncthreads ----
inline void syncthreads(Site s) {
    Thread* t = current_thread("__syncthreads");
    if (run.n_exited)
        fail("__syncthreads at %s:%d, which %d thread(s) of the block exited without reaching", s.file, s.line,
             run.n_exited);
    if (run.n_at_barrier && !same_site(run.barrier_site, s))
        fail("divergent __syncthreads: this thread is at %s:%d, %d thread(s) wait at %s:%d", s.file, s.line,
             run.n_at_barrier, run.barrier_site.file, run.barrier_site.line);
    Warp& w = warp_of(t);
    if (const Collective* c = waiting_for(w, lane_of(t)))
        fail("deadlock: this thread is at __syncthreads %s:%d while lanes 0x%08x of its warp wait for it at %s %s:%d",
             s.file, s.line, c->arrived, op_name(c->op), c->site.file, c->site.line);
    run.barrier_site = s;
    if (++run.n_at_barrier == run.n_threads) {  // the last one: release the others and go on
        for (Thread& o : run.threads)
            if (o.state == State::at_barrier) o.state = State::ready;
        for (Warp& o : run.warps) o.at_barrier = 0;
        run.n_at_barrier = 0;
        return;
    }
    w.at_barrier |= 1u << lane_of(t);
    t->state = State::at_barrier;
    wait(t);
}

// ---- warp collectives ----
// The lane a lane reads, or itself where CUDA returns the caller's own value; width is a power of two
// ≤ 32 that cuts the warp into segments.
inline int source_lane(Op op, int lane, int arg, int width) {
    const int segment = lane & ~(width - 1), in_segment = lane - segment;
    switch (op) {
        case Op::shfl: return segment + (arg & (width - 1));
        case Op::shfl_up: return in_segment >= arg ? lane - arg : lane;
        case Op::shfl_down: return in_segment + arg < width ? lane + arg : lane;
        case Op::shfl_xor: return (lane ^ arg) < segment + width ? lane ^ arg : lane;
        default: return lane;
    }
}
// Every lane of the mask has arrived: compute each one's result and let them all go on.
inline void complete_collective(int first, const Collective& c) {
    unsigned votes = 0;  // ballot, any, all: the lanes whose predicate holds
    for (int l = 0; l < warpSize; l++)
        if ((c.mask >> l & 1) && run.threads[first + l].value) votes |= 1u << l;
    for (int l = 0; l < warpSize; l++) {
        if (!(c.mask >> l & 1)) continue;
        Thread& t = run.threads[first + l];
        switch (c.op) {
            case Op::ballot: t.result = votes; break;
            case Op::any: t.result = votes != 0; break;
            case Op::all: t.result = votes == c.mask; break;
            case Op::syncwarp: t.result = 0; break;
            default: {
                const int src = source_lane(c.op, l, t.arg, t.width);
                if (src != l && !(c.mask >> src & 1)) {
                    run.current = &t;
                    fail("%s at %s:%d: lane %d reads lane %d, which the mask 0x%08x leaves out", op_name(c.op),
                         c.site.file, c.site.line, l, src, c.mask);
                }
                t.result = run.threads[first + src].value;
            }
        }
        if (t.state == State::at_warp) t.state = State::ready;
    }
}
inline uint64_t warp_collective(Site s, Op op, unsigned mask, uint64_t value, int arg, int width) {
    Thread* t = current_thread(op_name(op));
    Warp& w = warp_of(t);
    const int lane = lane_of(t), first = (int)(t - run.threads.data()) - lane;
    const int lanes = run.n_threads - first < warpSize ? run.n_threads - first : warpSize;
    if (width < 1 || width > warpSize || (width & (width - 1)))
        fail("%s at %s:%d: width %d is not a power of two in [1, 32]", op_name(op), s.file, s.line, width);
    if (!(mask >> lane & 1))
        fail("%s at %s:%d: the mask 0x%08x leaves out the calling lane %d", op_name(op), s.file, s.line, mask, lane);
    if (lanes < warpSize && (mask >> lanes))
        fail("%s at %s:%d: the mask 0x%08x names lanes beyond the block's last thread (lane %d)", op_name(op), s.file,
             s.line, mask, lanes - 1);
    if (mask & w.exited)
        fail("%s at %s:%d: the mask 0x%08x names lane %d, which has exited", op_name(op), s.file, s.line, mask,
             __builtin_ctz(mask & w.exited));
    if (mask & w.at_barrier)
        fail("deadlock: %s at %s:%d waits for lane %d, which waits at __syncthreads %s:%d", op_name(op), s.file,
             s.line, __builtin_ctz(mask & w.at_barrier), run.barrier_site.file, run.barrier_site.line);
    // Join the pending collective of this call and mask, or start one. Lanes waiting elsewhere may be
    // behind or ahead of this one (independent thread scheduling), unless they wait for this lane
    // while it now waits for them: then the warp has diverged.
    Collective* c = nullptr;
    for (int i = 0; i < w.n_pending; i++) {
        Collective& p = w.pending[i];
        if (same_site(p.site, s) && p.op == op && p.mask == mask) c = &p;
        else if ((p.mask >> lane & 1) && (p.arrived & mask))
            fail("divergent warp collective: lane %d is at %s %s:%d (mask 0x%08x), lanes 0x%08x wait for it at %s "
                 "%s:%d (mask 0x%08x)",
                 lane, op_name(op), s.file, s.line, mask, p.arrived, op_name(p.op), p.site.file, p.site.line, p.mask);
    }
    if (!c) {
        c = &w.pending[w.n_pending++];
        *c = {s, op, mask, 0};
    }
    c->arrived |= 1u << lane;
    t->arg = arg;
    t->width = width;
    t->value = value;
    if (c->arrived == mask) {
        complete_collective(first, *c);
        *c = w.pending[--w.n_pending];
    } else {
        t->state = State::at_warp;
        wait(t);
    }
    return t->result;
}
template <typename T>
inline T shuffle(Site s, Op op, unsigned mask, T var, int arg, int width = warpSize) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = warp_collective(s, op, mask, bits, arg, width);
    memcpy(&var, &bits, sizeof(T));
    return var;
}
inline unsigned vote(Site s, Op op, unsigned mask, int predicate) {
    return (unsigned)warp_collective(s, op, mask, predicate != 0, 0, warpSize);
}
inline void syncwarp(Site s, unsigned mask = 0xffffffffu) { vote(s, Op::syncwarp, mask, 0); }

// ---- threads and blocks ----
[[noreturn]] inline void thread_exit(Thread* t) {
    t->state = State::exited;
    run.n_exited++;
    warp_of(t).exited |= 1u << lane_of(t);
    if (run.n_at_barrier)
        fail("exits while %d thread(s) wait at __syncthreads %s:%d, which it never reaches", run.n_at_barrier,
             run.barrier_site.file, run.barrier_site.line);
    if (const Collective* c = waiting_for(warp_of(t), lane_of(t)))
        fail("exits while lanes 0x%08x wait for it at %s %s:%d (mask 0x%08x)", c->arrived, op_name(c->op),
             c->site.file, c->site.line, c->mask);
    asan_leave(nullptr, run.scheduler_stack, run.scheduler_stack_bytes);
    emu_switch_context(&t->sp, run.scheduler_sp);
    __builtin_unreachable();  // an exited thread is never resumed
}

inline char* new_stack() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) fail("cannot map a %zu-byte fiber stack", STACK_BYTES);
    return static_cast<char*>(p) + page + STACK_BYTES;  // the top (stacks grow down onto the guard page)
}
// A fresh fiber whose first resumption enters fiber_main: the six registers emu_switch_context pops,
// then its return address, then the slot where fiber_main's own return address would be. The top
// is 16-byte aligned, so fiber_main starts with rsp ≡ 8 (mod 16), as after a call.
inline void start_fiber(Thread& t, char* top) {
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&fiber_main);
    for (int r = 0; r < 6; r++) *--sp = nullptr;
    t.sp = sp;
}

inline void report_deadlock() {
    run.current = nullptr;
    for (const Warp& w : run.warps)
        if (w.n_pending) {
            const Collective& c = w.pending[0];
            fail("deadlock: lanes 0x%08x of warp %d wait at %s %s:%d (mask 0x%08x) for lanes that never come",
                 c.arrived, (int)(&w - run.warps.data()), op_name(c.op), c.site.file, c.site.line, c.mask);
        }
    fail("deadlock: no thread can run");
}

// Run one block: poison shared memory, start every thread, then resume the ready ones in the run's
// order until all have exited.
inline void run_block() {
    if (shared_memory().base) poison(shared_memory().base, shared_memory().bytes);
    poison(run.dynamic_shared, run.dynamic_shared_bytes);
    const int n = run.n_threads;
    while ((int)run.stacks.size() < n) run.stacks.push_back(new_stack());
    run.threads.resize(n);
    run.warps.resize((n + warpSize - 1) / warpSize);
    for (Warp& w : run.warps) w.exited = w.at_barrier = 0, w.n_pending = 0;  // (pending[] is dead until used)
    run.order.resize(n);
    for (int k = 0; k < n; k++) {
        Thread& t = run.threads[k];
        t = Thread{};
        t.idx = {k % blockDim.x, k / blockDim.x % blockDim.y, k / (blockDim.x * blockDim.y)};
        start_fiber(t, run.stacks[k]);
        run.order[k] = config().order == Order::reverse ? n - 1 - k : k;
    }
    run.n_exited = run.n_at_barrier = 0;
    while (run.n_exited < n) {
        if (config().order == Order::random)
            for (int k = n - 1; k > 0; k--) std::swap(run.order[k], run.order[rng().below(k + 1)]);
        bool resumed = false;
        for (int k : run.order) {
            Thread& t = run.threads[k];
            if (t.state != State::ready) continue;
            resumed = true;
            run.current = &t;
            threadIdx = t.idx;
            asan_leave(&run.scheduler_asan_fake, run.stacks[k] - STACK_BYTES, STACK_BYTES);
            emu_switch_context(&run.scheduler_sp, t.sp);
            asan_arrive(run.scheduler_asan_fake, nullptr, nullptr);
        }
        run.current = nullptr;
        if (!resumed) report_deadlock();
    }
}

// ---- device memory ----
struct Memory {
    std::map<uintptr_t, size_t> allocations;  // base → bytes
    size_t bytes_in_use = 0;
};
inline Memory& memory() {
    static Memory m;
    return m;
}
// whether [p, p + bytes) lies inside one device allocation
inline bool is_device(const void* p, size_t bytes = 0) {
    auto& a = memory().allocations;
    const uintptr_t address = (uintptr_t)p;
    auto it = a.upper_bound(address);
    if (it == a.begin()) return false;
    --it;
    return address + bytes <= it->first + it->second;
}
inline bool is_device_range(const void* p, size_t bytes) {  // zero bytes: any pointer counts
    return !bytes || is_device(p, bytes);
}

// ---- launch ----
template <typename T>
inline void check_argument(const char* kernel, int k, const T& arg) {
    if constexpr (std::is_pointer<T>::value)
        if (arg && !is_device(arg))
            fail("kernel %s: argument %d (%p) is not device memory", kernel, k, (const void*)arg);
}
template <typename Closure>
inline void call_closure(void* c) {
    auto& closure = *static_cast<Closure*>(c);
    std::apply(closure.first, closure.second);
}
// The launch (the kernel's name, its configuration, a callable that runs it for the current thread
// on copies of the arguments): an invalid configuration is the error cudaGetLastError returns, as
// in CUDA; otherwise every block runs, in the run's order, before the launch returns.
// The dynamic shared memory a launch may ask for: sm_90's 227 KiB a block (the opt-in maximum; the
// static __shared__ arrays are not counted, as the emulator keeps all kernels' in one TLS block).
constexpr size_t MAX_DYNAMIC_SHARED_BYTES = 227 << 10;
template <typename F, typename... Args>
inline void launch(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, F f, Args... args) {
    if (run.kernel) fail("kernel %s launched from inside kernel %s", kernel, run.kernel);
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    const uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
    if (!threads || threads > 1024 || block.z > 64 || !blocks || grid.x > 0x7fffffffu || grid.y > 65535 ||
        grid.z > 65535 || shared_bytes > MAX_DYNAMIC_SHARED_BYTES) {
        result(cudaErrorInvalidConfiguration);
        return;
    }
    // exactly shared_bytes, 16-byte aligned (posix_memalign keeps the requested size, so ASan's
    // redzone starts right past it); a launch without dynamic shared memory gets a zero-byte buffer
    void* smem = nullptr;
    if (posix_memalign(&smem, 16, shared_bytes) != 0) fail("cannot allocate %zu bytes of dynamic shared memory", shared_bytes);
    run.dynamic_shared = static_cast<unsigned char*>(smem);
    run.dynamic_shared_bytes = shared_bytes;
    int k = 0;
    (check_argument(kernel, k++, args), ...);
    auto closure = std::make_pair(f, std::make_tuple(args...));
    run.kernel = kernel;
    run.body = &call_closure<decltype(closure)>;
    run.body_arg = &closure;
    run.n_threads = (int)threads;
    blockDim = block;
    gridDim = grid;
    // blocks in order, reversed, or permuted by b → (a·b + c) mod n with a coprime to n
    uint64_t a = 1, c = 0;
    if (config().order == Order::random && blocks > 1) {
        auto gcd = [](uint64_t x, uint64_t y) { while (y) { uint64_t r = x % y; x = y; y = r; } return x; };
        do a = 1 + rng().below(blocks - 1); while (gcd(a, blocks) != 1);
        c = rng().below(blocks);
    }
    for (uint64_t i = 0; i < blocks; i++) {
        const uint64_t b = config().order == Order::reverse ? blocks - 1 - i : (a * i + c) % blocks;
        blockIdx = {(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
        run_block();
    }
    run.kernel = nullptr;
    free(run.dynamic_shared);
    run.dynamic_shared = nullptr;
    run.dynamic_shared_bytes = 0;
}

// the running block's dynamic shared memory (kernels.cuh's dynamic_shared<T>() under the emulator)
template <typename T>
inline T* dynamic_shared() {
    if (!run.kernel) fail("dynamic shared memory asked for outside a kernel");
    return reinterpret_cast<T*>(run.dynamic_shared);
}

}  // namespace emu

// kernel<<<grid, block>>>(args...) under the emulator; kernels.cuh's CUDA_LAUNCH expands to this,
// and CUDA_LAUNCH_SHARED to EMU_LAUNCH_SHARED, kernel<<<grid, block, shared_bytes>>>(args...).
// The generic lambda lets a kernel template deduce its arguments as at a <<<>>> launch.
#define EMU_LAUNCH_SHARED(kernel, grid, block, shared_bytes, ...)                                         \
    ::emu::launch(#kernel, grid, block, shared_bytes, [](auto... emu_args_) { kernel(emu_args_...); } \
                  __VA_OPT__(, ) __VA_ARGS__)
#define EMU_LAUNCH(kernel, grid, block, ...) EMU_LAUNCH_SHARED(kernel, grid, block, 0 __VA_OPT__(, ) __VA_ARGS__)

// ---- barriers, warp collectives, atomics ----
#define EMU_SITE (::emu::Site{__FILE__, __LINE__})
#define __syncthreads() ::emu::syncthreads(EMU_SITE)
#define __syncwarp(...) ::emu::syncwarp(EMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, var, ...) ::emu::shuffle(EMU_SITE, ::emu::Op::shfl, mask, var, __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...) ::emu::shuffle(EMU_SITE, ::emu::Op::shfl_up, mask, var, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) ::emu::shuffle(EMU_SITE, ::emu::Op::shfl_down, mask, var, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) ::emu::shuffle(EMU_SITE, ::emu::Op::shfl_xor, mask, var, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::emu::vote(EMU_SITE, ::emu::Op::ballot, mask, predicate)
#define __any_sync(mask, predicate) (::emu::vote(EMU_SITE, ::emu::Op::any, mask, predicate) != 0)
#define __all_sync(mask, predicate) (::emu::vote(EMU_SITE, ::emu::Op::all, mask, predicate) != 0)

// A thread runs alone until it waits, so a read-modify-write is atomic as it stands.
template <typename T>
inline T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
    const T old = *address;
    if (value > old) *address = value;
    return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
    const T old = *address;
    if (old == compare) *address = value;
    return old;
}

// ---- math ----
// expf, logf, erff, sinf, … are the host's <cmath> (within a few ulp of the device's); the _rn
// intrinsics are single IEEE operations (no fusing, given -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }

// ---- half ----
// __half is its IEEE binary16 bits (cuda_fp16.h's conversions only, no arithmetic operators).
// __float2half_rn rounds to nearest even, overflows to ±inf (from 65520 up), rounds into and within
// the subnormals (2^-24 the smallest), and turns every NaN into the canonical 0x7fff, as CUDA does.
struct __half {
    unsigned short __x;
};
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline __half __float2half_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
    const uint32_t u = x & 0x7fffffffu;
    if (u > 0x7f800000u) return __half{0x7fff};
    if (u < 0x00800000u) return __half{sign};  // zeros and float subnormals (below 2^-126)
    const int e = (int)(u >> 23) - 127;         // value = m · 2^(e - 23), m in [2^23, 2^24)
    if (e > 15) return __half{(unsigned short)(sign | 0x7c00u)};
    const int shift = e >= -14 ? 13 : 13 + (-14 - e);  // the bits of m below the half's quantum
    if (shift > 24) return __half{sign};               // below 2^-25: rounds to zero
    const uint32_t m = (u & 0x7fffffu) | 0x800000u;
    uint32_t q = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), tie = 1u << (shift - 1);
    if (rest > tie || (rest == tie && (q & 1))) q++;
    // a normal q carries the implicit bit (0x400), so adding the exponent field less one builds the
    // bits, carries into the next binade or to inf included; a subnormal q is the bits itself
    const uint32_t bits = e >= -14 ? ((uint32_t)(e + 14) << 10) + q : q;
    return __half{(unsigned short)(sign | (bits >= 0x7c00u ? 0x7c00u : bits))};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
    uint32_t x;
    if (e == 31) x = sign | 0x7f800000u | (m << 13);  // inf, or NaN with its payload
    else if (e) x = sign | ((e + 112) << 23) | (m << 13);
    else {
        const float v = ldexpf((float)m, -24);  // zero or subnormal: exact
        memcpy(&x, &v, 4);
        x |= sign;
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

// ---- runtime ----
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
struct CUstream_st {};
struct CUevent_st {
    unsigned flags;
    bool recorded;
    std::chrono::steady_clock::time_point when;
};
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;

namespace emu {
// whether a copy of `bytes` from src to dst matches its kind
inline bool copy_matches(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    const bool dst_dev = is_device_range(dst, bytes), src_dev = is_device_range(src, bytes);
    const bool dst_host = !bytes || !is_device(dst), src_host = !bytes || !is_device(src);
    switch (kind) {
        case cudaMemcpyHostToHost: return dst_host && src_host;
        case cudaMemcpyHostToDevice: return dst_dev && src_host;
        case cudaMemcpyDeviceToHost: return dst_host && src_dev;
        case cudaMemcpyDeviceToDevice: return dst_dev && src_dev;
        default: return (dst_dev || dst_host) && (src_dev || src_host);  // Default: whole ranges either way
    }
}
}  // namespace emu

inline const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorNotReady: return "cudaErrorNotReady";
    }
    return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorNotReady: return "device not ready";
    }
    return "unknown error";
}
inline cudaError_t cudaGetLastError() {
    const cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return emu::result(device == 0 ? cudaSuccess : cudaErrorInvalidDevice); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// device memory: 256-byte aligned like cudaMalloc's, poisoned
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    if (!p) return emu::result(cudaErrorInvalidValue);
    *p = nullptr;
    if (!bytes) return cudaSuccess;
    // exactly `bytes`, so that AddressSanitizer (the ASan build of the emulated tests) sees a read
    // one past the end
    if (posix_memalign(p, 256, bytes) != 0) *p = nullptr;
    if (!*p) return emu::result(cudaErrorMemoryAllocation);
    emu::poison(*p, bytes);
    emu::memory().allocations[(uintptr_t)*p] = bytes;
    emu::memory().bytes_in_use += bytes;
    return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    auto& m = emu::memory();
    auto it = m.allocations.find((uintptr_t)p);
    if (it == m.allocations.end()) return emu::result(cudaErrorInvalidValue);
    m.bytes_in_use -= it->second;
    m.allocations.erase(it);
    free(p);
    return cudaSuccess;
}
// The opt-in to more than 48 KiB of shared memory a block: checked for its range only (the emulator
// knows no kernel's static shared memory, so it cannot tell whether a launch needed it).
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel*, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || (size_t)value > emu::MAX_DYNAMIC_SHARED_BYTES)
        return emu::result(cudaErrorInvalidValue);
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    *total_bytes = (size_t)16 << 30;
    const size_t used = emu::memory().bytes_in_use;
    *free_bytes = used < *total_bytes ? *total_bytes - used : 0;
    return cudaSuccess;
}
// pinned host memory is host memory
inline cudaError_t cudaMallocHost(void** p, size_t bytes) {
    *p = malloc(bytes ? bytes : 1);
    return emu::result(*p ? cudaSuccess : cudaErrorMemoryAllocation);
}
template <typename T>
inline cudaError_t cudaMallocHost(T** p, size_t bytes) {
    return cudaMallocHost(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFreeHost(void* p) {
    free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
    if (!emu::is_device_range(p, bytes)) return emu::result(cudaErrorInvalidValue);
    if (bytes) memset(p, value, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if ((unsigned)kind > cudaMemcpyDefault) return emu::result(cudaErrorInvalidMemcpyDirection);
    if (!emu::copy_matches(dst, src, bytes, kind)) return emu::result(cudaErrorInvalidValue);
    if (bytes) memmove(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t = 0) {
    return cudaMemcpy(dst, src, bytes, kind);
}
// a __device__ variable is a host variable here
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t bytes, size_t offset = 0,
                                      cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
    if (offset + bytes > sizeof(T) || (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToDevice))
        return emu::result(cudaErrorInvalidValue);
    memcpy(reinterpret_cast<char*>(&symbol) + offset, src, bytes);
    return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t bytes, size_t offset = 0,
                                        cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
    if (offset + bytes > sizeof(T) || (kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDeviceToDevice))
        return emu::result(cudaErrorInvalidValue);
    memcpy(dst, reinterpret_cast<const char*>(&symbol) + offset, bytes);
    return cudaSuccess;
}

// streams and events: every call has finished when it returns, so each stream is in order and an
// event is complete once recorded
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
    *s = new CUstream_st{};
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s) return emu::result(cudaErrorInvalidResourceHandle);
    delete s;
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    *e = new CUevent_st{flags, false, {}};
    return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    if (!e) return emu::result(cudaErrorInvalidResourceHandle);
    delete e;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = 0) {
    if (!e) return emu::result(cudaErrorInvalidResourceHandle);
    e->recorded = true;
    e->when = std::chrono::steady_clock::now();
    return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) { return e ? cudaSuccess : emu::result(cudaErrorInvalidResourceHandle); }
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaEventQuery(e); }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t e, unsigned = 0) { return cudaEventQuery(e); }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (!start || !end) return emu::result(cudaErrorInvalidResourceHandle);
    if ((start->flags | end->flags) & cudaEventDisableTiming || !start->recorded || !end->recorded)
        return emu::result(cudaErrorInvalidResourceHandle);
    *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
    return cudaSuccess;
}

// ---- bf16 (the GEMMs round to it here; the tensor-core primitives in cuda_emu_mma.h too) ----
namespace emu {
inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
// round to nearest, ties to even; NaN stays NaN (quieted, sign kept); overflow rounds to ±inf
inline uint16_t float_to_bf16_rn(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}
inline float bf16_round(float f) { return bf16_to_float(float_to_bf16_rn(f)); }
}  // namespace emu

// ---- cuBLASLt: the matmul subset (fp32 in memory, bf16 operands, fp32 accumulation, bias epilogue) ----
enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
typedef cudaDataType_t cudaDataType;
enum cublasLtMatmulDescAttributes_t {
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,
};
enum cublasLtEpilogue_t { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 };
enum cublasLtMatmulPreferenceAttributes_t {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};
struct cublasLtContext {};
struct cublasLtMatmulDescOpaque_t {
    cublasComputeType_t compute;
    cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void* bias = nullptr;  // (m), of bias_type
    int32_t bias_type = -1;      // −1 (the default): D's type; any other must be D's type too
};
struct cublasLtMatrixLayoutOpaque_t {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
};
// the pointer alignments (A, B, C, D) the chosen algorithm may assume: 256 unless the preference says less
struct cublasLtMatmulPreferenceOpaque_t {
    uint64_t max_workspace_bytes = 0;
    uint32_t min_alignment[4] = {256, 256, 256, 256};
};
struct cublasLtMatmulAlgo_t {
    uint32_t min_alignment[5];  // A, B, C, D, bias
};
struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
};
typedef cublasLtContext* cublasLtHandle_t;
typedef cublasLtMatmulDescOpaque_t* cublasLtMatmulDesc_t;
typedef cublasLtMatrixLayoutOpaque_t* cublasLtMatrixLayout_t;
typedef cublasLtMatmulPreferenceOpaque_t* cublasLtMatmulPreference_t;

inline const char* cublasLtGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
    *h = new cublasLtContext{};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute,
                                               cudaDataType_t scale) {
    if ((compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF) || scale != CUDA_R_32F)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    *d = new cublasLtMatmulDescOpaque_t{};
    (*d)->compute = compute;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                     const void* buf, size_t bytes) {
    if (attr == CUBLASLT_MATMUL_DESC_BIAS_POINTER) {
        if (bytes != sizeof(void*)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->bias, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr != CUBLASLT_MATMUL_DESC_TRANSA && attr != CUBLASLT_MATMUL_DESC_TRANSB &&
        attr != CUBLASLT_MATMUL_DESC_EPILOGUE && attr != CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (bytes != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;  // the others are 32-bit enums
    int32_t value;
    memcpy(&value, buf, sizeof value);
    if (attr == CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE) {  // checked against D's type when the matmul is planned
        if (value != -1 && value != CUDA_R_32F && value != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
        d->bias_type = value;
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr == CUBLASLT_MATMUL_DESC_EPILOGUE) {
        if (value != CUBLASLT_EPILOGUE_DEFAULT && value != CUBLASLT_EPILOGUE_BIAS) return CUBLAS_STATUS_NOT_SUPPORTED;
        d->epilogue = (cublasLtEpilogue_t)value;
        return CUBLAS_STATUS_SUCCESS;
    }
    if (value != CUBLAS_OP_N && value != CUBLAS_OP_T) return CUBLAS_STATUS_INVALID_VALUE;
    (attr == CUBLASLT_MATMUL_DESC_TRANSA ? d->trans_a : d->trans_b) = (cublasOperation_t)value;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
    if (type != CUDA_R_32F && type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (ld < (int64_t)(rows ? rows : 1)) return CUBLAS_STATUS_INVALID_VALUE;  // column-major: ld ≥ rows
    *l = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
    *p = new cublasLtMatmulPreferenceOpaque_t{};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                           size_t bytes) {
    if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
        if (bytes != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&p->max_workspace_bytes, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr < CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES || attr > CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (bytes != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&p->min_alignment[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, bytes);
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}

namespace emu {
inline const char* type_name(int32_t t) { return t == CUDA_R_32F ? "CUDA_R_32F" : t == CUDA_R_16BF ? "CUDA_R_16BF" : "?"; }
// The types: A and B alike, fp32 under CUBLAS_COMPUTE_32F_FAST_16BF (the fast modes round fp32
// operands; cuBLASLt has no such mode for bf16 ones), C of D's type, the bias of D's type (cublasLt.h:
// "Bias vector elements are the same type as the elements of output matrix (Dtype)"). Prints why not.
inline bool matmul_types(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                         cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d) {
    const bool fast = desc->compute == CUBLAS_COMPUTE_32F_FAST_16BF;
    const char* why = a->type != b->type                                    ? "A and B differ in type"
                      : fast && a->type != CUDA_R_32F                       ? "a FAST_16BF compute type on bf16 A and B"
                      : c->type != d->type                                  ? "C is not of D's type"
                      : desc->bias_type != -1 && desc->bias_type != d->type ? "the bias is not of D's type"
                                                                            : nullptr;
    if (why)
        fprintf(stderr, "cuda_emu: cuBLASLt: %s (compute %s, A %s, B %s, C %s, D %s, bias %s)\n", why,
                desc->compute == CUBLAS_COMPUTE_32F ? "32F" : "32F_FAST_16BF", type_name(a->type), type_name(b->type),
                type_name(c->type), type_name(d->type), desc->bias_type == -1 ? "D's" : type_name(desc->bias_type));
    return !why;
}
// D (m, n) = op(A) (m, k) · op(B) (k, n) [+ C]: the layouts must agree; prints why not
inline bool matmul_shapes(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                          cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d) {
    const bool ta = desc->trans_a == CUBLAS_OP_T, tb = desc->trans_b == CUBLAS_OP_T;
    const uint64_t m = d->rows, n = d->cols, k = ta ? a->rows : a->cols;
    const bool ok = (ta ? a->cols : a->rows) == m && (tb ? b->cols : b->rows) == k && (tb ? b->rows : b->cols) == n &&
                    c->rows == m && c->cols == n;
    if (!ok)
        fprintf(stderr,
                "cuda_emu: cuBLASLt layouts disagree: op(A) %llux%llu, op(B) %llux%llu, C %llux%llu, D %llux%llu\n",
                (unsigned long long)(ta ? a->cols : a->rows), (unsigned long long)k,
                (unsigned long long)(tb ? b->cols : b->rows), (unsigned long long)(tb ? b->rows : b->cols),
                (unsigned long long)c->rows, (unsigned long long)c->cols, (unsigned long long)m,
                (unsigned long long)n);
    return ok;
}
}  // namespace emu

inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t desc,
                                                     cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                     cublasLtMatmulPreference_t pref, int requested,
                                                     cublasLtMatmulHeuristicResult_t* results, int* returned) {
    *returned = 0;
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    if (!emu::matmul_shapes(desc, a, b, c, d) || !emu::matmul_types(desc, a, b, c, d)) return CUBLAS_STATUS_NOT_SUPPORTED;
    results[0] = {};
    memcpy(results[0].algo.min_alignment, pref->min_alignment, sizeof pref->min_alignment);
    // cuBLASLt reads the bias pointer's alignment off the descriptor here (cublasLt.h): the algorithm
    // may assume it, up to 256 bytes
    uint32_t& bias_alignment = results[0].algo.min_alignment[4];
    for (bias_alignment = 256; bias_alignment > 1 && (uintptr_t)desc->bias % bias_alignment;) bias_alignment /= 2;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}
// Column-major: element (i, j) of a matrix with leading dimension ld is at [i + j·ld]. A and B as they
// are (bf16 widened exactly, or fp32), or rounded to bf16 (nearest even) under
// CUBLAS_COMPUTE_32F_FAST_16BF; sums the products in fp32 in k order (bf16 · bf16 is exact in fp32),
// then D = alpha·sum + beta·C [+ bias[i]] in fp32, rounded to nearest even once when D is bf16; with
// beta = 0, C is not read (it may hold anything, as in cuBLAS).
inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                                     cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b,
                                     const void* beta, const void* C, cublasLtMatrixLayout_t c, void* D,
                                     cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t* algo, void* /*workspace*/,
                                     size_t /*workspace_bytes*/, cudaStream_t /*stream*/) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!emu::matmul_shapes(desc, a, b, c, d) || !emu::matmul_types(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta = desc->trans_a == CUBLAS_OP_T, tb = desc->trans_b == CUBLAS_OP_T;
    const int64_t m = d->rows, n = d->cols, k = ta ? a->rows : a->cols;
    // element e of a matrix (or the bias) of type t, widened to fp32 (exact); D's elements rounded once
    auto get = [](const void* p, cudaDataType_t t, int64_t e) {
        return t == CUDA_R_16BF ? emu::bf16_to_float(static_cast<const uint16_t*>(p)[e]) : static_cast<const float*>(p)[e];
    };
    const bool with_bias = desc->epilogue == CUBLASLT_EPILOGUE_BIAS;
    const void* bias = desc->bias;
    const void* pointers[5] = {A, B, C, D, bias};
    const char* names[5] = {"A", "B", "C", "D", "bias"};
    const uint64_t extents[5] = {a->cols * a->ld, b->cols * b->ld, c->cols * c->ld, d->cols * d->ld, (uint64_t)m};
    const cudaDataType_t types[5] = {a->type, b->type, c->type, d->type, d->type};
    for (int p = 0; p < (with_bias ? 5 : 4); p++) {
        const size_t element = types[p] == CUDA_R_16BF ? 2 : 4;
        if (!pointers[p] || !emu::is_device_range(pointers[p], extents[p] * element)) {
            fprintf(stderr, "cuda_emu: cuBLASLt: %s (%p, %llu elements of %s) is not inside one device allocation\n",
                    names[p], pointers[p], (unsigned long long)extents[p], emu::type_name(types[p]));
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if ((uintptr_t)pointers[p] % algo->min_alignment[p]) {
            fprintf(stderr, "cuda_emu: cuBLASLt: %s (%p) is less aligned than the %u bytes the algorithm assumes\n",
                    names[p], pointers[p], algo->min_alignment[p]);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    if (C == D && c->ld != d->ld) return CUBLAS_STATUS_INVALID_VALUE;  // in place needs one layout
    // fp32 copies of op(A)'s rows and op(B)'s columns, each contiguous in k: widened (and rounded) once,
    // not in the inner loop, which then reads both sequentially
    const bool fast = desc->compute == CUBLAS_COMPUTE_32F_FAST_16BF;
    auto operand = [&](const void* p, cudaDataType_t t, int64_t e) { return fast ? emu::bf16_round(get(p, t, e)) : get(p, t, e); };
    std::vector<float> rows_a((size_t)(m * k)), cols_b((size_t)(n * k));
    for (int64_t i = 0; i < m; i++)
        for (int64_t p = 0; p < k; p++) rows_a[i * k + p] = operand(A, a->type, ta ? p + i * a->ld : i + p * a->ld);
    for (int64_t j = 0; j < n; j++)
        for (int64_t p = 0; p < k; p++) cols_b[j * k + p] = operand(B, b->type, tb ? j + p * b->ld : p + j * b->ld);
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < m; i++) {
            const float *x = rows_a.data() + i * k, *y = cols_b.data() + j * k;
            float acc = 0.0f;
            for (int64_t p = 0; p < k; p++) acc += x[p] * y[p];
            float v = be == 0.0f ? al * acc : al * acc + be * get(C, c->type, i + j * c->ld);
            if (with_bias) v += get(bias, d->type, i);
            const int64_t at = i + j * d->ld;
            if (d->type == CUDA_R_16BF) static_cast<uint16_t*>(D)[at] = emu::float_to_bf16_rn(v);
            else static_cast<float*>(D)[at] = v;
        }
    return CUBLAS_STATUS_SUCCESS;
}

// ---- NCCL: the subset picotron.cu references, enough to build ----
// The emulator has one device and no NCCL: the emulated trainer communicates with --comm mpi (the
// GPU build's MPI path, staged through pinned host memory). Every NCCL call that would communicate
// fails with ncclInvalidUsage and says why, so a run that reaches one stops with a clear error
// (picotron.cu's NCCL_CHECK) instead of silently computing on one rank's data.
enum ncclResult_t {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
};
enum ncclDataType_t { ncclFloat32 = 7, ncclFloat = 7 };
enum ncclRedOp_t { ncclSum = 0, ncclMax = 3 };
struct ncclComm;
typedef ncclComm* ncclComm_t;
struct ncclUniqueId {
    char internal[128];
};
namespace emu {
inline ncclResult_t no_nccl(const char* call) {
    fprintf(stderr, "cuda_emu: %s: NCCL is not emulated; run the emulated trainer with --comm mpi\n", call);
    return ncclInvalidUsage;
}
}  // namespace emu
inline const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage (NCCL is not emulated: use --comm mpi)";
    }
    return "unknown result code";
}
inline ncclResult_t ncclGetUniqueId(ncclUniqueId*) { return emu::no_nccl("ncclGetUniqueId"); }
inline ncclResult_t ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int) { return emu::no_nccl("ncclCommInitRank"); }
inline ncclResult_t ncclCommDestroy(ncclComm_t c) { return c ? emu::no_nccl("ncclCommDestroy") : ncclSuccess; }
inline ncclResult_t ncclAllReduce(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) {
    return emu::no_nccl("ncclAllReduce");
}
inline ncclResult_t ncclReduceScatter(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                                      cudaStream_t) {
    return emu::no_nccl("ncclReduceScatter");
}
inline ncclResult_t ncclAllGather(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t) {
    return emu::no_nccl("ncclAllGather");
}
inline ncclResult_t ncclBroadcast(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
    return emu::no_nccl("ncclBroadcast");
}
inline ncclResult_t ncclSend(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
    return emu::no_nccl("ncclSend");
}
inline ncclResult_t ncclRecv(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
    return emu::no_nccl("ncclRecv");
}
inline ncclResult_t ncclGroupStart() { return emu::no_nccl("ncclGroupStart"); }
inline ncclResult_t ncclGroupEnd() { return emu::no_nccl("ncclGroupEnd"); }
#include "cuda_emu_mma.h"  // mma, ldmatrix, cp.async, bf16 (tensor-core primitives of kernels.cuh)
