// tests/cuda_emu_mma.h — the tensor-core and copy primitives of kernels.cuh ("tensor-core primitives")
// under the CPU emulator: mma.sync m16n8k16 bf16, ldmatrix, cp.async, bf16 conversions. Included at the
// end of tests/cuda_emu.h and built on its machinery (threads, warps, __syncwarp, shared memory, poison).
//
// Warp-collective instructions (mma, ldmatrix) are a two-phase exchange: every lane deposits its
// words (fragment registers, row addresses) in its slot, then waits at a __syncwarp of the full warp;
// once all 32 lanes have arrived each computes its own result from every lane's deposit, by the
// layouts of the PTX ISA below, then waits at a second __syncwarp so that no lane overwrites its slot
// (at its next mma) before the slowest one has read it. So a missing lane, divergence, a partial warp
// or a lane that exited is reported as for __syncwarp (the sites named are in this file). Both phases
// sit at one site per instruction kind, so two calls of the same wrapper from different places of a
// kernel are not told apart (kernels.cuh's wrappers are one function each).
//
// Sources of the layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "Warp-level matrix load instruction: ldmatrix"; the same in CuTe's SM80_16x8x16 MMA_Traits
// (A: ((4,8),(2,2,2)):((32,1),(16,8,128)), B: ((4,8),(2,2)):((16,1),(8,64)), C: ((4,8),(2,2)):((32,1),(16,8)),
// column-major (M,K)/(N,K)/(M,N) coordinates of thread t = t0 + 4·t1 and value v) and in CuTe's
// copy_traits_sm75.hpp (SM75_U32x1_LDSM_N source layout ((8,4),128):((128,0),1): lanes 0-7 give the
// row addresses; x2: lanes 0-15; x4: all 32).
//   groupID = lane >> 2, tig = lane % 4 (threadID_in_group). Registers hold two 16-bit elements, the
//   lower-indexed element in the low half.
//   A (16×16, row): a[j] = {A[row][col], A[row][col+1]}, row = groupID + 8·(j%2), col = 2·tig + 8·(j/2)
//       (PTX: row = groupID for a0,a1,a4,a5, else groupID+8; col = 2·tig + (i&1), +8 for i ≥ 4).
//   B (16×8, col):  b[j] = {B[k][n], B[k+1][n]}, k = 2·tig + 8·j, n = groupID.
//   C, D (16×8 f32): c[i] = C[groupID + 8·(i/2)][2·tig + i%2].
//   ldmatrix .m8n8 .b16, .x{1,2,4}: matrix m's 8 rows (16 bytes each) start at the addresses of lanes
//   8m..8m+7; register r[m] of lane l = {M[l/4][2·(l%4)], M[l/4][2·(l%4)+1]}; with .trans
//   r[m] = {M[2·(l%4)][l/4], M[2·(l%4)+1][l/4]} (the transpose's row l/4).
// Arithmetic of the emulated mma: each bf16 product is exact in fp32; they are added to c in fp32 in
// k order (k = 0..15; -ffp-contract=off). The hardware's order and rounding inside the tensor core
// are not specified, so tests compare with a tolerance, never bitwise against hardware.
//
// cp.async.cg 16 bytes: the issue checks the pointers (destination 16-byte aligned in shared memory,
// source 16 bytes of device memory, 16-byte aligned) and poisons the destination; the copy itself
// happens when the issuing thread's cp_async_wait<N> retires its group (the source is read then).
// Copies of a thread that exits without waiting are dropped (detected, and discarded, at that thread
// slot's next cp.async call in a later block or kernel).
#pragma once
#include <array>

namespace emu {

// ---- the exchange: every lane of the (full) warp deposits up to 8 words, then each reads all ----
struct MmaSlots {
    std::vector<std::array<uint64_t, 8>> word;  // by thread index in the block
};
inline MmaSlots& mma_slots() {
    static MmaSlots s;
    return s;
}
// Deposit `mine` (n words), wait for the whole warp at `arrive`; returns the first thread index of
// the warp, whose slots hold every lane's deposit until the caller's exchange_done.
inline int exchange_begin(const char* what, Site arrive, const uint64_t* mine, int n) {
    Thread* t = current_thread(what);
    const int k = (int)(t - run.threads.data()), first = k - lane_of(t);
    auto& w = mma_slots().word;
    if ((int)w.size() < run.n_threads) w.resize(run.n_threads);
    for (int i = 0; i < n; i++) w[k][i] = mine[i];
    syncwarp(arrive, 0xffffffffu);
    return first;
}
inline void exchange_done(Site leave) { syncwarp(leave, 0xffffffffu); }
inline const std::array<uint64_t, 8>& slot(int first, int lane) { return mma_slots().word[first + lane]; }

// inside the __shared__ arrays, or inside the running launch's dynamic shared memory
inline bool in_shared(const void* p, size_t bytes) {
    const SharedMemory& m = shared_memory();
    const char *c = (const char*)p, *dyn = (const char*)run.dynamic_shared;
    return (m.base && c >= m.base && c + bytes <= m.base + m.bytes) ||
           (dyn && c >= dyn && c + bytes <= dyn + run.dynamic_shared_bytes);
}

// ---- bf16 (bf16_to_float, float_to_bf16_rn: tests/cuda_emu.h) ----
inline uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)float_to_bf16_rn(lo) | (uint32_t)float_to_bf16_rn(hi) << 16;
}
inline float bf16_lo(uint32_t r) { return bf16_to_float((uint16_t)(r & 0xffffu)); }
inline float bf16_hi(uint32_t r) { return bf16_to_float((uint16_t)(r >> 16)); }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ----
inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const float cc[4] = {c[0], c[1], c[2], c[3]};  // (d may alias c)
    const int first = exchange_begin("mma_m16n8k16_bf16", EMU_SITE, mine, 6);
    float A[16][16], B[16][8];
    for (int l = 0; l < warpSize; l++) {
        const auto& s = slot(first, l);
        const int g = l >> 2, tig = l & 3;
        for (int j = 0; j < 4; j++) {
            const int row = g + 8 * (j % 2), col = 2 * tig + 8 * (j / 2);
            A[row][col] = bf16_lo((uint32_t)s[j]);
            A[row][col + 1] = bf16_hi((uint32_t)s[j]);
        }
        for (int j = 0; j < 2; j++) {
            const int k = 2 * tig + 8 * j;
            B[k][g] = bf16_lo((uint32_t)s[4 + j]);
            B[k + 1][g] = bf16_hi((uint32_t)s[4 + j]);
        }
    }
    const int lane = lane_of(run.current), g = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * tig + i % 2;
        float acc = cc[i];
        for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
    exchange_done(EMU_SITE);
}

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 ----
template <int N, bool TRANS>
inline void ldmatrix(uint32_t r[N], const void* row_address) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const uint64_t mine[1] = {(uint64_t)(uintptr_t)row_address};
    const int first = exchange_begin("ldmatrix", EMU_SITE, mine, 1);
    const int lane = lane_of(run.current);
    if (lane < 8 * N && ((uintptr_t)row_address % 16 || !in_shared(row_address, 16)))
        fail("ldmatrix: lane %d's row address %p is not 16 bytes of shared memory, 16-byte aligned", lane,
             row_address);
    for (int m = 0; m < N; m++) {
        uint16_t e[2];
        for (int h = 0; h < 2; h++) {
            const int row = TRANS ? 2 * (lane % 4) + h : lane / 4, col = TRANS ? lane / 4 : 2 * (lane % 4) + h;
            const char* p = (const char*)(uintptr_t)slot(first, 8 * m + row)[0];
            memcpy(&e[h], p + 2 * col, 2);
        }
        r[m] = (uint32_t)e[0] | (uint32_t)e[1] << 16;
    }
    exchange_done(EMU_SITE);
}

// ---- cp.async.cg.shared.global (16 bytes), commit_group, wait_group ----
struct AsyncCopy {
    void* dst;
    const void* src;
};
struct AsyncState {
    const char* kernel = nullptr;  // where the copies were issued: the kernel and block
    uint3 block{0, 0, 0};
    std::vector<AsyncCopy> open;                 // issued, not yet committed
    std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first
};
inline AsyncState& async_state(const char* what) {
    static std::vector<AsyncState> states;
    Thread* t = current_thread(what);
    const size_t k = (size_t)(t - run.threads.data());
    if (states.size() < run.threads.size()) states.resize(run.threads.size());
    AsyncState& s = states[k];
    if (s.kernel != run.kernel || s.block.x != blockIdx.x || s.block.y != blockIdx.y || s.block.z != blockIdx.z) {
        s.open.clear();  // left by an exited thread of another block: dropped
        s.groups.clear();
        s.kernel = run.kernel;
        s.block = blockIdx;
    }
    return s;
}
inline void cp_async_16(void* smem, const void* gmem) {
    AsyncState& s = async_state("cp_async_16");
    if ((uintptr_t)smem % 16 || !in_shared(smem, 16))
        fail("cp_async_16: destination %p is not 16 bytes of shared memory, 16-byte aligned", smem);
    if ((uintptr_t)gmem % 16 || !is_device(gmem, 16))
        fail("cp_async_16: source %p is not 16 bytes of device memory, 16-byte aligned", gmem);
    poison(smem, 16);
    s.open.push_back({smem, gmem});
}
inline void cp_async_commit() {
    AsyncState& s = async_state("cp_async_commit");
    s.groups.push_back(std::move(s.open));
    s.open.clear();
}
inline void cp_async_wait(int n) {
    AsyncState& s = async_state("cp_async_wait");
    while ((int)s.groups.size() > n) {
        for (const AsyncCopy& c : s.groups.front()) memcpy(c.dst, c.src, 16);
        s.groups.erase(s.groups.begin());
    }
}

}  // namespace emu
