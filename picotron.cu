// picotron.cu — ModernBERT masked-language-model pretraining, one source for GPU (nvcc) and CPU (g++).
//
// Reads top to bottom in the order data flows:
//   config and command line → process grid → tracing → communication → tensor parallel →
//   parameters → activations → model forward → model backward → pipeline parallel → gradient sync
//   (data parallel) → optimizer → HF import/export → checkpoints → dump → predictions → training loop.
// Every numeric op lives in kernels.cuh (reference and CUDA twin); token shards, packing and masking
// in data.h; the JSON and safetensors formats in safetensors.h.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <dirent.h>
#include <cinttypes>
#include <map>
#include <sched.h>
#include <string>
#include <type_traits>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#include "data.h"
#include "kernels.cuh"
#include "safetensors.h"
#ifdef __CUDACC__
#ifndef PICOTRON_EMULATE  // tests/cuda_emu.h (via kernels.cuh) declares the NCCL subset
#include <nccl.h>
#endif
#define NCCL_CHECK(call)                                                                            \
    do {                                                                                            \
        ncclResult_t nccl_status_ = (call);                                                         \
        if (nccl_status_ != ncclSuccess)                                                            \
            fatal("NCCL error %s at %s:%d", ncclGetErrorString(nccl_status_), __FILE__, __LINE__);  \
    } while (0)
#endif

// ---- config and command line ----
// ModelConfig is the architecture (a preset, or read from an HF config.json); TrainConfig is every
// flag. Parsing checks everything up front so that a bad flag costs one line, not a crashed run.

struct ModelConfig {
    int V = 50368;      // vocabulary (rows of the tied embedding)
    int H = 256;        // hidden size
    int I = 384;        // MLP intermediate size (Wi has 2·I rows: GELU half, then gate half)
    int L = 6;          // layers
    int nh = 4;         // attention heads
    int hd = 64;        // head dim, H / nh
    std::vector<char> layer_global;  // (L) 1: layer attends globally, 0: sliding window (layer_types)
    int global_every = 3;          // transformers' global_attn_every_n_layers, kept as read for export
    int local_attention = 128;     // transformers' full window; local layers see |i − j| ≤ local_attention / 2
    int max_position_embeddings = 8192;  // kept as read for export (positions restart per document)
    float theta_global = 160000.f; // RoPE base on global layers
    float theta_local = 10000.f;   // RoPE base on local layers
    float norm_eps = 1e-5f;
    float init_std = 0.02f;        // transformers' initializer_range
    float init_cutoff = 2.0f;      // truncation at ±cutoff·σ
    SpecialIds special = kModernBertSpecialIds;  // UNK, CLS, SEP, PAD, MASK
    int bos = kClsId, eos = kSepId;              // transformers' bos/eos_token_id, kept for export
    bool is_global(int layer) const { return layer_global[layer] != 0; }
    int window() const { return local_attention / 2; }
};

// Presets. tiny keeps the real vocabulary (the default tokenizer's ids) so that a tiny model and
// base share data; it is small enough for the CPU tests. mini is the `make run` demo, sized so that
// 2 CPU cores get well past word frequencies in 5 minutes: one 64-dim head, 2 layers (global, then
// local), and a vocabulary of 4096 ids (the 4091 most frequent words of the corpus, then the special
// ids), so that the decoder, which dominates a small model's cost, stays cheap. Layer l is global
// iff l % 3 == 0, as in ModernBERT.
static bool model_preset(const std::string& name, ModelConfig* m) {
    *m = ModelConfig{};
    if (name == "tiny") { m->H = 256; m->I = 384; m->L = 6; m->nh = 4; }
    else if (name == "mini") { m->H = 64; m->I = 128; m->L = 2; m->nh = 1; m->V = 4096; }
    else if (name == "base") { m->H = 768; m->I = 1152; m->L = 22; m->nh = 12; }
    else if (name == "large") { m->H = 1024; m->I = 2624; m->L = 28; m->nh = 16; }
    else return false;
    if (name == "mini") {
        m->special = {4091, 4092, 4093, 4094, 4095};
        m->bos = m->special.cls;
        m->eos = m->special.sep;
    }
    m->hd = m->H / m->nh;
    for (int l = 0; l < m->L; l++) m->layer_global.push_back(l % m->global_every == 0);
    return true;
}

struct TrainConfig {
    std::string model = "tiny", init_from, data = "data/default";
    bool model_given = false;  // --model on the command line (a resumed checkpoint must then match it)
    int seq_len = 512, micro_batch_tokens = 2048, grad_accum = 1, steps = 100;
    float lr = 1e-3f, decay_frac = 0.1f, weight_decay = 1e-5f, beta1 = 0.9f, beta2 = 0.98f, eps = 1e-6f, clip = 0.f;
    int warmup = 10;
    std::string optimizer = "adamw";
    uint64_t seed = 42;
    std::string save_dir, resume_dir, export_dir, log_path, dump_dir, prepare_text;
    int save_every = 0;
    std::vector<std::string> predict;
    double peak_tflops = 0.0;  // for MFU; 0 → the build's default
    int threads = 0;           // CPU threads per rank; 0 → OMP_NUM_THREADS, else the default of set_cpu_threads
    // layout and communication
    int dp = 1, tp = 1, pp = 1, cp = 1, zero = 0;
    bool sp = false;  // sequence parallel inside the tp group
    std::string pp_schedule = "1f1b";
    float bucket_mb = 25.f;
#ifdef __CUDACC__
    std::string comm = "nccl";
#else
    std::string comm = "mpi";
#endif
    std::string trace_dir;
};

static const char* kUsage =
    "usage: mpirun -np N ./picotron[_cpu] [flags]   (N = dp·pp·cp·tp)\n"
    "model:\n"
    "  --model tiny|mini|base|large  architecture preset (default tiny; mini: the make run demo, V 4096)\n"
    "  --init-from DIR             start from a Hugging Face ModernBertForMaskedLM dir (config.json + model.safetensors)\n"
    "data:\n"
    "  --data PATH                 token shard or directory of *.bin shards (default data/default)\n"
    "  --seq-len N                 longest document piece; longer documents are split (default 512)\n"
    "  --micro-batch-tokens N      packed tokens per micro-batch (default 2048)\n"
    "  --grad-accum N              micro-batches per optimizer step (default 1)\n"
    "  --prepare-text DIR          tokenize every text file in DIR with the default word tokenizer into --data,\n"
    "                              for the vocabulary and special ids of --model / --init-from, then exit\n"
    "training:\n"
    "  --steps N                   optimizer steps (default 100)\n"
    "  --lr X                      peak learning rate (default 1e-3)\n"
    "  --warmup N                  linear warmup steps (default 10)\n"
    "  --decay-frac X              final fraction of steps with 1-sqrt decay to 0 (default 0.1)\n"
    "  --weight-decay X            decoupled weight decay on matrices (default 1e-5)\n"
    "  --optimizer adamw|stable-adamw   (default adamw; betas 0.9/0.98, eps 1e-6)\n"
    "  --clip X                    clip the global gradient norm to X (default 0: off)\n"
    "  --seed N                    data order, masking and initialisation (default 42)\n"
    "  --threads N                 CPU build: threads per rank for BLAS and every op (default OMP_NUM_THREADS,\n"
    "                              else 1 per rank when several ranks share a machine, else every core it may use)\n"
    "layout (world = dp·pp·cp·tp ranks):\n"
    "  --dp N --tp N --pp N --cp N data / tensor / pipeline / context parallel sizes (default 1). --cp cuts each\n"
    "                              micro-batch into equal contiguous token shards (it must divide\n"
    "                              --micro-batch-tokens). --tp must divide the attention heads and intermediate_size; a\n"
    "                              vocabulary it does not divide is padded (never trained, saved or exported).\n"
    "                              --pp cuts the layers into contiguous stages (at most one stage per layer)\n"
    "  --pp-schedule afab|1f1b     pipeline schedule over a step's grad-accum micro-batches (default 1f1b)\n"
    "  --sp                        sequence parallel: cut the residual stream and the LayerNorms over the tp ranks'\n"
    "                              token slices (needs --tp > 1 and --micro-batch-tokens divisible by it; refused\n"
    "                              otherwise; --predict runs without it)\n"
    "  --zero 0|1                  1: shard the optimizer state over data parallel ranks (default 0)\n"
    "  --bucket-mb X               gradient all-reduce bucket size in MiB (default 25)\n"
    "  --comm nccl|mpi             collectives backend (default nccl on GPU, mpi on CPU; GPU + mpi stages\n"
    "                              through host memory so that many ranks can share one GPU)\n"
    "output:\n"
    "  --log FILE.jsonl            one JSON object per step\n"
    "  --save DIR --save-every N   checkpoints DIR/step_N (written to a temporary name, then renamed)\n"
    "  --resume DIR                continue exactly from DIR's latest checkpoint\n"
    "  --export DIR                write the trained model as HF config.json + model.safetensors\n"
    "  --dump DIR                  write step 1's whole global batch, its loss and every gradient as DIR/dump.safetensors\n"
    "  --predict \"TEXT [MASK] …\"   show the top predictions for each [MASK] (repeatable) and exit;\n"
    "                              the tokenizer is --data's vocab.txt\n"
    "  --trace DIR                 Chrome trace per rank (merge with scripts/merge_traces.py)\n"
    "  --peak-tflops X             peak device throughput used for MFU (default: 989 on GPU, none on CPU)\n"
    "  --help                      this text\n";

static int parse_int(const std::string& flag, const std::string& v, long lo, long hi) {
    char* end = nullptr;
    errno = 0;
    long x = strtol(v.c_str(), &end, 10);
    if (v.empty() || *end || errno || x < lo || x > hi)
        fatal("%s wants an integer in [%ld, %ld], got '%s'", flag.c_str(), lo, hi, v.c_str());
    return (int)x;
}
static float parse_float(const std::string& flag, const std::string& v, double lo, double hi) {
    char* end = nullptr;
    errno = 0;
    double x = strtod(v.c_str(), &end);
    if (v.empty() || *end || errno || !(x >= lo && x <= hi))
        fatal("%s wants a number in [%g, %g], got '%s'", flag.c_str(), lo, hi, v.c_str());
    return (float)x;
}

static TrainConfig parse_args(int argc, char** argv) {
    TrainConfig c;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            int rank = 0;
            MPI_Comm_rank(MPI_COMM_WORLD, &rank);
            if (rank == 0) fputs(kUsage, stdout);
            MPI_Finalize();
            exit(0);
        }
        if (flag.rfind("--", 0) != 0) fatal("unexpected argument '%s' (see --help)", flag.c_str());
        if (flag == "--sp") {  // the one flag without a value
            c.sp = true;
            continue;
        }
        if (i + 1 >= argc) fatal("flag %s needs a value (see --help)", flag.c_str());
        std::string v = argv[++i];
        if (flag == "--model") { c.model = v; c.model_given = true; }
        else if (flag == "--init-from") c.init_from = v;
        else if (flag == "--data") c.data = v;
        else if (flag == "--seq-len") c.seq_len = parse_int(flag, v, 1, 1 << 20);
        else if (flag == "--micro-batch-tokens") c.micro_batch_tokens = parse_int(flag, v, 1, 1 << 24);
        else if (flag == "--grad-accum") c.grad_accum = parse_int(flag, v, 1, 1 << 16);
        else if (flag == "--steps") c.steps = parse_int(flag, v, 0, 1 << 30);
        else if (flag == "--lr") c.lr = parse_float(flag, v, 0.0, 10.0);
        else if (flag == "--warmup") c.warmup = parse_int(flag, v, 0, 1 << 30);
        else if (flag == "--decay-frac") c.decay_frac = parse_float(flag, v, 0.0, 1.0);
        else if (flag == "--weight-decay") c.weight_decay = parse_float(flag, v, 0.0, 1.0);
        else if (flag == "--optimizer") c.optimizer = v;
        else if (flag == "--clip") c.clip = parse_float(flag, v, 0.0, 1e9);
        else if (flag == "--seed") c.seed = (uint64_t)parse_int(flag, v, 0, 2147483647);
        else if (flag == "--log") c.log_path = v;
        else if (flag == "--save") c.save_dir = v;
        else if (flag == "--save-every") c.save_every = parse_int(flag, v, 0, 1 << 30);
        else if (flag == "--resume") c.resume_dir = v;
        else if (flag == "--export") c.export_dir = v;
        else if (flag == "--dump") c.dump_dir = v;
        else if (flag == "--predict") c.predict.push_back(v);
        else if (flag == "--prepare-text") c.prepare_text = v;
        else if (flag == "--peak-tflops") c.peak_tflops = parse_float(flag, v, 0.0, 1e6);
        else if (flag == "--threads") c.threads = parse_int(flag, v, 1, 4096);
        else if (flag == "--dp") c.dp = parse_int(flag, v, 1, 1 << 20);
        else if (flag == "--tp") c.tp = parse_int(flag, v, 1, 1 << 20);
        else if (flag == "--pp") c.pp = parse_int(flag, v, 1, 1 << 20);
        else if (flag == "--cp") c.cp = parse_int(flag, v, 1, 1 << 20);
        else if (flag == "--zero") c.zero = parse_int(flag, v, 0, 1);
        else if (flag == "--bucket-mb") c.bucket_mb = parse_float(flag, v, 1e-6, 1e6);
        else if (flag == "--comm") c.comm = v;
        else if (flag == "--pp-schedule") c.pp_schedule = v;
        else if (flag == "--trace") c.trace_dir = v;
        else fatal("unknown flag %s (see --help)", flag.c_str());
    }
    ModelConfig preset;
    if (!model_preset(c.model, &preset)) fatal("--model must be tiny, mini, base or large, got '%s'", c.model.c_str());
    if (c.model_given && !c.init_from.empty()) fatal("--model and --init-from both name the architecture; give one");
    if (!c.predict.empty() && !c.resume_dir.empty())
        fatal("--predict reads its model from --init-from (a checkpoint's step_N directory works); --resume is for training");
    if (c.optimizer != "adamw" && c.optimizer != "stable-adamw")
        fatal("--optimizer must be adamw or stable-adamw, got '%s'", c.optimizer.c_str());
    if (c.seq_len > c.micro_batch_tokens)
        fatal("--seq-len %d is longer than --micro-batch-tokens %d: a document piece must fit a micro-batch",
              c.seq_len, c.micro_batch_tokens);
    if (c.save_every > 0 && c.save_dir.empty()) fatal("--save-every needs --save DIR");
    if (c.sp && c.tp == 1) fatal("--sp cuts token rows over the tensor-parallel ranks: it needs --tp > 1");
    if (c.micro_batch_tokens % c.cp)
        fatal("--cp: --micro-batch-tokens %d is not divisible by --cp %d (each cp rank takes an equal contiguous shard)",
              c.micro_batch_tokens, c.cp);
    if (c.sp && c.cp == 1 && c.micro_batch_tokens % c.tp)
        fatal("--sp: --micro-batch-tokens %d is not divisible by --tp %d (each tp rank takes an equal token slice)",
              c.micro_batch_tokens, c.tp);
    if (c.sp && (c.micro_batch_tokens / c.cp) % c.tp)
        fatal("--sp: a --cp shard of %d tokens (--micro-batch-tokens %d / --cp %d) is not divisible by --tp %d (each tp "
              "rank takes an equal token slice)", c.micro_batch_tokens / c.cp, c.micro_batch_tokens, c.cp, c.tp);
    if (c.pp_schedule != "afab" && c.pp_schedule != "1f1b")
        fatal("--pp-schedule must be afab or 1f1b, got '%s'", c.pp_schedule.c_str());
    if (c.comm != "nccl" && c.comm != "mpi") fatal("--comm must be nccl or mpi, got '%s'", c.comm.c_str());
#ifndef __CUDACC__
    if (c.comm == "nccl") fatal("--comm nccl needs the GPU build; picotron_cpu communicates with MPI");
#endif
    return c;
}

// ---- process grid ----
// world = dp·pp·cp·tp, rank = ((dp_i·pp + pp_i)·cp + cp_i)·tp + tp_i: tensor parallel innermost
// (its ranks talk every layer, so they sit on the fastest links), data parallel outermost.
// Each group is the set of ranks that differ in one coordinate only; dp×cp is the gradient group
// (weights are replicated over both), and with pp > 1 the first and last stages share the tied
// embedding. The groups are built once, here; every collective names the group it runs on.

enum class CommBackend { mpi, nccl };

struct Group {
    const char* name = "";         // "tp", "cp", "pp", "dp", "dp_cp", "embedding"
    int size = 1, rank = 0;        // this rank's place in the group
    std::vector<int> world_ranks;  // members, in group-rank order
    MPI_Comm mpi = MPI_COMM_NULL;
#ifdef __CUDACC__
    ncclComm_t nccl = nullptr;
#endif
    double bytes_sent = 0;         // this step's traffic, by the ring formulas of the comm section
};

struct ProcessGrid {
    int world_rank = 0, world_size = 1;
    int dp = 1, pp = 1, cp = 1, tp = 1;                  // sizes
    int dp_rank = 0, pp_rank = 0, cp_rank = 0, tp_rank = 0;  // coordinates
    CommBackend backend = CommBackend::mpi;
    Group tp_group, cp_group, pp_group, dp_group, dp_cp_group, embedding_group;
#ifdef __CUDACC__
    cudaStream_t comm_stream = nullptr;  // NCCL collectives run here, overlapping the compute stream
#endif
    int rank_of(int dp_i, int pp_i, int cp_i, int tp_i) const { return ((dp_i * pp + pp_i) * cp + cp_i) * tp + tp_i; }
    std::vector<Group*> groups() { return {&tp_group, &cp_group, &pp_group, &dp_group, &dp_cp_group, &embedding_group}; }
};

// The members of world rank r's group of one kind, in group-rank order (empty: r is in no such
// group; only first and last stages share the embedding).
static std::vector<int> group_members(const ProcessGrid& g, const std::string& kind, int r) {
    int t = r % g.tp, x = (r / g.tp) % g.cp, p = (r / (g.tp * g.cp)) % g.pp, d = r / (g.tp * g.cp * g.pp);
    std::vector<int> v;
    if (kind == "tp") for (int i = 0; i < g.tp; i++) v.push_back(g.rank_of(d, p, x, i));
    if (kind == "cp") for (int i = 0; i < g.cp; i++) v.push_back(g.rank_of(d, p, i, t));
    if (kind == "pp") for (int i = 0; i < g.pp; i++) v.push_back(g.rank_of(d, i, x, t));
    if (kind == "dp") for (int i = 0; i < g.dp; i++) v.push_back(g.rank_of(i, p, x, t));
    if (kind == "dp_cp")
        for (int i = 0; i < g.dp; i++)
            for (int j = 0; j < g.cp; j++) v.push_back(g.rank_of(i, p, j, t));
    if (kind == "embedding" && g.pp > 1 && (p == 0 || p == g.pp - 1)) v = {g.rank_of(d, 0, x, t), g.rank_of(d, g.pp - 1, x, t)};
    return v;
}

// MPI_Comm_split needs a colour shared by exactly the members: the smallest member's world rank.
static void make_group(ProcessGrid& g, Group& group, const char* name) {
    group.name = name;
    group.world_ranks = group_members(g, name, g.world_rank);
    auto it = std::find(group.world_ranks.begin(), group.world_ranks.end(), g.world_rank);
    int colour = group.world_ranks.empty() ? MPI_UNDEFINED : *std::min_element(group.world_ranks.begin(), group.world_ranks.end());
    int key = group.world_ranks.empty() ? 0 : (int)(it - group.world_ranks.begin());
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, colour, key, &group.mpi));
    group.size = (int)group.world_ranks.size();
    group.rank = key;
}

static ProcessGrid make_grid(const TrainConfig& c) {
    ProcessGrid g;
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &g.world_rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &g.world_size));
    g.dp = c.dp; g.pp = c.pp; g.cp = c.cp; g.tp = c.tp;
    if ((long)g.dp * g.pp * g.cp * g.tp != g.world_size)
        fatal("layout dp %d × pp %d × cp %d × tp %d = %ld ranks, but mpirun started %d", g.dp, g.pp, g.cp, g.tp,
              (long)g.dp * g.pp * g.cp * g.tp, g.world_size);
    int r = g.world_rank;
    g.tp_rank = r % g.tp;
    g.cp_rank = (r / g.tp) % g.cp;
    g.pp_rank = (r / (g.tp * g.cp)) % g.pp;
    g.dp_rank = r / (g.tp * g.cp * g.pp);
    g.backend = c.comm == "nccl" ? CommBackend::nccl : CommBackend::mpi;
    const char* kinds[] = {"tp", "cp", "pp", "dp", "dp_cp", "embedding"};
    std::vector<Group*> groups = g.groups();
    for (size_t i = 0; i < groups.size(); i++) make_group(g, *groups[i], kinds[i]);
#ifdef __CUDACC__
    if (g.backend == CommBackend::nccl) {
        // one GPU per rank: NCCL refuses two ranks on one device (use --comm mpi for that)
        MPI_Comm node;
        int local_rank, local_size, devices;
        MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g.world_rank, MPI_INFO_NULL, &node));
        MPI_CHECK(MPI_Comm_rank(node, &local_rank));
        MPI_CHECK(MPI_Comm_size(node, &local_size));
        MPI_CHECK(MPI_Comm_free(&node));
        CUDA_CHECK(cudaGetDeviceCount(&devices));
        if (local_size > devices)
            fatal("--comm nccl needs one GPU per rank: %d ranks on a node with %d GPU(s); use --comm mpi", local_size, devices);
        CUDA_CHECK(cudaSetDevice(local_rank));
        for (Group* group : g.groups()) {
            if (group->size <= 1) continue;
            ncclUniqueId id;
            if (group->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
            MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, group->mpi));
            NCCL_CHECK(ncclCommInitRank(&group->nccl, group->size, id, group->rank));
        }
    } else {
        int devices;
        CUDA_CHECK(cudaGetDeviceCount(&devices));
        CUDA_CHECK(cudaSetDevice(g.world_rank % devices));  // --comm mpi: ranks may share a GPU
    }
    // NCCL's collectives, or MPI's staging copies, run here beside the compute stream
    CUDA_CHECK(cudaStreamCreateWithFlags(&g.comm_stream, cudaStreamNonBlocking));
#endif
    return g;
}

// Before MPI_Finalize: the NCCL communicators and the communication stream go first (NCCL may
// still hold the MPI-bootstrapped state and device resources), then the groups' MPI communicators.
static void destroy_grid(ProcessGrid& g) {
    for (Group* group : g.groups()) {
#ifdef __CUDACC__
        if (group->nccl) NCCL_CHECK(ncclCommDestroy(group->nccl));
        group->nccl = nullptr;
#endif
        if (group->mpi != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_free(&group->mpi));
    }
#ifdef __CUDACC__
    if (g.comm_stream) CUDA_CHECK(cudaStreamDestroy(g.comm_stream));
    g.comm_stream = nullptr;
#endif
}

static void print_grid(ProcessGrid& g) {
    if (g.world_rank != 0) return;
    printf("rank grid: world %d = dp %d × pp %d × cp %d × tp %d   (rank = ((dp_i·pp + pp_i)·cp + cp_i)·tp + tp_i)\n",
           g.world_size, g.dp, g.pp, g.cp, g.tp);
    for (Group* group : g.groups()) {  // every group of each kind: the same rule applied to every rank
        std::vector<std::vector<int>> seen;
        std::string line;
        for (int r = 0; r < g.world_size; r++) {
            std::vector<int> members = group_members(g, group->name, r);
            if (members.empty() || std::find(seen.begin(), seen.end(), members) != seen.end()) continue;
            seen.push_back(members);
            line += " {";
            for (size_t i = 0; i < members.size(); i++) line += (i ? "," : "") + std::to_string(members[i]);
            line += "}";
        }
        printf("  %-9s%s\n", group->name, line.empty() ? " (none)" : line.c_str());
    }
}

// ---- tracing ----
// --trace DIR: each rank records spans (each layer's forward and backward, inside them every op
// call named by its class — "matmul", "attention", … —, the optimizer, every collective with its
// group and bytes) and writes DIR/trace_rank{R}.json in Chrome's trace-event format;
// scripts/merge_traces.py puts the ranks side by side for Perfetto. Thread 0 is compute, thread 1
// communication. At the end rank 0 prints its time per op class. On the GPU build tracing
// synchronises at span ends so that a span covers the work, not just its launch.

struct Tracer {
    int rank = 0;
    double t0_us = 0, t0_unix_us = 0;
    std::string events;                     // comma-separated JSON objects
    std::map<std::string, double> class_us;  // time per op class, all steps
    double steps_us = 0;                    // all steps' wall time
    void span(const std::string& name, int tid, double t_start_us, double t_end_us, const std::string& args) {
        char buf[512];
        snprintf(buf, sizeof buf, "%s{\"name\": \"%s\", \"ph\": \"X\", \"pid\": %d, \"tid\": %d, \"ts\": %.3f, \"dur\": %.3f%s%s%s}",
                 events.empty() ? "" : ",\n", name.c_str(), rank, tid, t_start_us - t0_us, t_end_us - t_start_us,
                 args.empty() ? "" : ", \"args\": {", args.c_str(), args.empty() ? "" : "}");
        events += buf;
    }
};

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Waits for the compute stream's work only: the communication stream's collectives keep running, so
// a traced span does not absorb them and the trace still shows the overlap.
static void sync_compute_stream() {
#ifdef __CUDACC__
    CUDA_CHECK(cudaStreamSynchronize(0));
#endif
}
// A compute span from t_start_us to now (after the device finished the work).
static void trace_compute(Tracer* t, const std::string& name, double t_start_us) {
    if (!t) return;
    sync_compute_stream();
    t->span(name, 0, t_start_us, now_us(), "");
}
// An op call's span, also added to its class's total.
static void trace_op(Tracer* t, const char* op_class, double t_start_us) {
    if (!t) return;
    sync_compute_stream();
    const double t_end_us = now_us();
    t->span(op_class, 0, t_start_us, t_end_us, "");
    t->class_us[op_class] += t_end_us - t_start_us;
}
#define TRACED(tracer, op_class, ...)                      \
    do {                                                   \
        const double t_op_us_ = (tracer) ? now_us() : 0.0; \
        __VA_ARGS__;                                       \
        trace_op(tracer, op_class, t_op_us_);              \
    } while (0)
// Rank 0's time per op class over the run, largest first; "other" is the rest of the steps' time
// (batches, waiting for communication, the loss and norm reductions).
static void print_op_classes(const Tracer& t) {
    std::vector<std::pair<double, std::string>> order;
    double traced = 0;
    for (const auto& [name, us] : t.class_us) order.push_back({us, name}), traced += us;
    std::sort(order.rbegin(), order.rend());
    order.push_back({t.steps_us - traced, "other"});
    printf("time per op class (rank %d, every step):", t.rank);
    for (const auto& [us, name] : order)
        printf("  %s %.1f%% (%.2f s)", name.c_str(), 100.0 * us / (t.steps_us > 0 ? t.steps_us : 1), us / 1e6);
    printf("\n");
}

// ---- communication ----
// One small interface, two backends. NCCL (GPU): collectives on a communication stream, ordered
// after the compute stream with events, so they overlap the backward. MPI (CPU, or GPU with
// --comm mpi): host buffers; on the GPU build the data is staged through host memory, which lets
// many ranks share one GPU. Every call is non-blocking (…_start returns a request; comm_wait ends
// it) or a blocking wrapper, names what it does in the model, counts the bytes this rank sends by
// the ring formulas (n ranks, S bytes of data):
//   all-reduce 2(n−1)/n·S, reduce-scatter and all-gather (n−1)/n·S (S the full, unscattered
//   buffer), broadcast (n−1)/n·S, send S,
// and, with --trace, leaves a span naming its group and bytes. A group of one rank does nothing.
// (comm is the grid's backend and streams; only the GPU build's NCCL path reads it.)


struct CommRequest {
    Group* group = nullptr;
    std::string what;  // the collective's name in the model, e.g. "tp attention-out all-reduce"
    double bytes = 0;
    double t_start_us = 0;
    MPI_Request mpi[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};  // (send, recv for paired send-recv)
    float* device_dst = nullptr;  // GPU + MPI: where the staged result goes back ...
    size_t device_n = 0;          // ... and how many floats of it
    float* host = nullptr;        // GPU + MPI: pinned staging for the received (or in-place) data ...
    size_t host_n = 0;
    float* host_send = nullptr;   // ... and for sent data (paired send-recv)
    size_t host_send_n = 0;
#ifdef __CUDACC__
    cudaEvent_t done = nullptr;   // NCCL: recorded on the comm stream after the collective
#endif
    bool active = false;
};

struct Comm {
    ProcessGrid* grid = nullptr;
    Tracer* tracer = nullptr;
    std::multimap<size_t, float*> pinned_free;  // GPU + MPI: staging buffers by size, kept for reuse
};

static void trace_comm(Tracer* t, const CommRequest& r, double t_end_us) {
    if (!t || !r.group) return;
    char args[160];
    snprintf(args, sizeof args, "\"group\": \"%s\", \"bytes\": %.0f", r.group->name, r.bytes);
    t->span(r.what, 1, r.t_start_us, t_end_us, args);
}

#ifdef __CUDACC__
static bool use_nccl(const Comm& comm) { return comm.grid->backend == CommBackend::nccl; }
#endif

#ifdef __CUDACC__
// GPU + MPI staging. The host copies are pinned (a copy from pageable memory would wait for the
// whole device) and run on the communication stream: the copy to the host first waits for what the
// compute stream has queued so far (the data), then the host waits for that copy only, and the
// compute stream keeps running. Buffers return to comm.pinned_free when their request ends (each
// bucket asks for the same size every step).
static float* pinned_take(Comm& comm, size_t n) {
    auto it = comm.pinned_free.lower_bound(n);
    if (it != comm.pinned_free.end()) {
        float* p = it->second;
        comm.pinned_free.erase(it);
        return p;
    }
    void* p = nullptr;
    CUDA_CHECK(cudaMallocHost(&p, (n ? n : 1) * sizeof(float)));
    return static_cast<float*>(p);
}
static void pinned_give(Comm& comm, float*& p, size_t& n) {
    if (p) comm.pinned_free.insert({n, p});
    p = nullptr;
    n = 0;
}
// The communication stream, made to wait for everything the compute stream has queued so far.
static cudaStream_t comm_stream_after_compute(Comm& comm) {
    cudaStream_t stream = comm.grid->comm_stream;
    cudaEvent_t ready;
    CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(ready, 0));
    CUDA_CHECK(cudaStreamWaitEvent(stream, ready, 0));
    CUDA_CHECK(cudaEventDestroy(ready));
    return stream;
}
static void stage_to_host(Comm& comm, float* host, const float* device, size_t n) {
    cudaStream_t stream = comm_stream_after_compute(comm);
    CUDA_CHECK(cudaMemcpyAsync(host, device, n * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
}
// The way back; the host waits for the copy, so the pinned buffer is free and the compute stream's
// later kernels (queued after this returns) see the data.
static void stage_to_device(Comm& comm, float* device, const float* host, size_t n) {
    cudaStream_t stream = comm.grid->comm_stream;
    CUDA_CHECK(cudaMemcpyAsync(device, host, n * sizeof(float), cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
}
#endif
static void comm_release_staging([[maybe_unused]] Comm& comm) {
#ifdef __CUDACC__
    for (auto& [n, p] : comm.pinned_free) CUDA_CHECK(cudaFreeHost(p));
    comm.pinned_free.clear();
#endif
}

// Where MPI reads and writes: the buffer itself on the CPU build, a pinned host copy (in *slot, of
// *slot_n floats) on the GPU build, filled from device_buf when copy_in.
static float* mpi_buffer([[maybe_unused]] Comm& comm, [[maybe_unused]] float** slot, [[maybe_unused]] size_t* slot_n,
                         float* device_buf, [[maybe_unused]] size_t n, [[maybe_unused]] bool copy_in) {
#ifdef __CUDACC__
    *slot = pinned_take(comm, n);
    *slot_n = n;
    if (copy_in) stage_to_host(comm, *slot, device_buf, n);
    return *slot;
#else
    return device_buf;
#endif
}
// GPU + MPI: on completion, copy n floats of the staged result to dst.
static void stage_back(CommRequest& r, float* host, float* dst, size_t n) {
    if (host == dst) return;
    r.device_dst = dst;
    r.device_n = n;
}

static CommRequest begin_request(Group& g, const std::string& what, double bytes) {
    CommRequest r;
    r.group = &g;
    r.what = what;
    r.bytes = bytes;
    r.t_start_us = now_us();
    r.active = true;
    g.bytes_sent += bytes;
    return r;
}
#ifdef __CUDACC__
// Every NCCL collective goes through here: the comm stream first waits for everything the compute
// stream queued so far (the data the collective reads), launch(stream) enqueues it, and the event
// recorded after it is what comm_wait orders the compute stream on.
template <typename Launch>
static CommRequest nccl_request(Comm& comm, CommRequest r, Launch launch) {
    cudaStream_t stream = comm_stream_after_compute(comm);
    launch(stream);
    CUDA_CHECK(cudaEventCreateWithFlags(&r.done, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(r.done, stream));
    return r;
}
#endif

// Finishes a request: MPI waits (and copies a staged result back); NCCL makes the compute stream
// wait for the collective's event, so later kernels see its result.
static void comm_wait(Comm& comm, CommRequest& r) {
    if (!r.active) return;
#ifdef __CUDACC__
    if (use_nccl(comm)) {
        CUDA_CHECK(cudaStreamWaitEvent(0, r.done, 0));
        if (comm.tracer) CUDA_CHECK(cudaEventSynchronize(r.done));  // so the span ends when the data arrived
        CUDA_CHECK(cudaEventDestroy(r.done));
    } else
#endif
    {
        MPI_CHECK(MPI_Waitall(2, r.mpi, MPI_STATUSES_IGNORE));
#ifdef __CUDACC__
        if (r.device_dst) stage_to_device(comm, r.device_dst, r.host, r.device_n);
        pinned_give(comm, r.host, r.host_n);
        pinned_give(comm, r.host_send, r.host_send_n);
#endif
    }
    r.active = false;
    trace_comm(comm.tracer, r, now_us());
}

// Lets MPI progress a pending request while the backward computes (MPI moves data only inside
// MPI calls); true when it has completed.
static bool comm_test(Comm& comm, CommRequest& r) {
    if (!r.active) return true;
#ifdef __CUDACC__
    if (use_nccl(comm)) {  // not ready yet is the one non-success that is not a fault
        const cudaError_t status = cudaEventQuery(r.done);
        if (status == cudaErrorNotReady) return false;
        CUDA_CHECK(status);
        return true;
    }
#else
    (void)comm;
#endif
    int done = 0;
    MPI_CHECK(MPI_Testall(2, r.mpi, &done, MPI_STATUSES_IGNORE));
    return done != 0;
}

// buf (n) ← Σ (or max) over the group of buf (n), in place.
enum class Reduce { sum, max };
static CommRequest comm_all_reduce_start([[maybe_unused]] Comm& comm, Group& g, float* buf, size_t n, Reduce op,
                                         const std::string& what) {
    if (g.size <= 1) return CommRequest{};
    CommRequest r = begin_request(g, what, 2.0 * (g.size - 1) / g.size * n * sizeof(float));
#ifdef __CUDACC__
    if (use_nccl(comm))
        return nccl_request(comm, r, [&](cudaStream_t st) {
            NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, op == Reduce::max ? ncclMax : ncclSum, g.nccl, st));
        });
#endif
    float* host = mpi_buffer(comm, &r.host, &r.host_n, buf, n, true);
    stage_back(r, host, buf, n);
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, host, (int)n, MPI_FLOAT, op == Reduce::max ? MPI_MAX : MPI_SUM, g.mpi, &r.mpi[0]));
    return r;
}
// recv (n) ← group-rank r's block of Σ over the group of send (n·size).
static CommRequest comm_reduce_scatter_start([[maybe_unused]] Comm& comm, Group& g, float* send, float* recv, size_t n,
                                             const std::string& what) {
    if (g.size <= 1) {
        ops::copy_on_device(recv, send, n * sizeof(float));
        return CommRequest{};
    }
    CommRequest r = begin_request(g, what, (double)(g.size - 1) / g.size * n * g.size * sizeof(float));
#ifdef __CUDACC__
    if (use_nccl(comm))
        return nccl_request(comm, r, [&](cudaStream_t st) { NCCL_CHECK(ncclReduceScatter(send, recv, n, ncclFloat, ncclSum, g.nccl, st)); });
#endif
    float* host_send = mpi_buffer(comm, &r.host, &r.host_n, send, n * g.size, true);
    if (host_send == send) {
        MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, (int)n, MPI_FLOAT, MPI_SUM, g.mpi, &r.mpi[0]));
    } else {  // staged: reduce in place, the result lands in the first n floats
        stage_back(r, host_send, recv, n);
        MPI_CHECK(MPI_Ireduce_scatter_block(MPI_IN_PLACE, host_send, (int)n, MPI_FLOAT, MPI_SUM, g.mpi, &r.mpi[0]));
    }
    return r;
}
// The two collectives that only copy also carry activations of the GPU build's act type (bf16),
// as the 4-byte words they are made of: n values of T are words_of<T>(n) floats on the wire.
template <typename T>
static size_t words_of(size_t n) {
    if (n * sizeof(T) % sizeof(float)) fatal("internal: %zu values of %zu bytes are not whole words", n, sizeof(T));
    return n * sizeof(T) / sizeof(float);
}
// recv (n·size) ← the send (n) blocks of every group rank, in group-rank order.
template <typename T>
static CommRequest comm_all_gather_start([[maybe_unused]] Comm& comm, Group& g, const T* send_values, T* recv_values,
                                         size_t count, const std::string& what) {
    const float* send = reinterpret_cast<const float*>(send_values);
    float* recv = reinterpret_cast<float*>(recv_values);
    const size_t n = words_of<T>(count);
    if (g.size <= 1) {
        ops::copy_on_device(recv, send, n * sizeof(float));
        return CommRequest{};
    }
    CommRequest r = begin_request(g, what, (double)(g.size - 1) / g.size * n * g.size * sizeof(float));
#ifdef __CUDACC__
    if (use_nccl(comm))
        return nccl_request(comm, r, [&](cudaStream_t st) { NCCL_CHECK(ncclAllGather(send, recv, n, ncclFloat, g.nccl, st)); });
#endif
    float* host_recv = mpi_buffer(comm, &r.host, &r.host_n, recv, n * g.size, false);
    if (host_recv != recv) {
        stage_back(r, host_recv, recv, n * g.size);
#ifdef __CUDACC__
        stage_to_host(comm, host_recv + (size_t)g.rank * n, send, n);
#endif
        MPI_CHECK(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, host_recv, (int)n, MPI_FLOAT, g.mpi, &r.mpi[0]));
    } else {
        MPI_CHECK(MPI_Iallgather(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, g.mpi, &r.mpi[0]));
    }
    return r;
}
// buf (n) ← group-rank root's buf.
static CommRequest comm_broadcast_start([[maybe_unused]] Comm& comm, Group& g, float* buf, size_t n, int root, const char* what) {
    if (g.size <= 1) return CommRequest{};
    CommRequest r = begin_request(g, what, (double)(g.size - 1) / g.size * n * sizeof(float));
#ifdef __CUDACC__
    if (use_nccl(comm))
        return nccl_request(comm, r, [&](cudaStream_t st) { NCCL_CHECK(ncclBroadcast(buf, buf, n, ncclFloat, root, g.nccl, st)); });
#endif
    float* host = mpi_buffer(comm, &r.host, &r.host_n, buf, n, g.rank == root);
    stage_back(r, host, buf, n);
    MPI_CHECK(MPI_Ibcast(host, (int)n, MPI_FLOAT, root, g.mpi, &r.mpi[0]));
    return r;
}
// Paired exchange with group neighbours: send (n) to group-rank dst while recv (n) arrives from
// group-rank src; either side may be absent (< 0). Pipeline stages pass activations and their
// gradients this way, ring attention its K/V blocks, the halos their rows.
template <typename T>
static CommRequest comm_sendrecv_start([[maybe_unused]] Comm& comm, Group& g, T* send_values, int dst, T* recv_values,
                                       int src, size_t count, const char* what) {
    float* send = reinterpret_cast<float*>(send_values);
    float* recv = reinterpret_cast<float*>(recv_values);
    const size_t n = words_of<T>(count);
    if (dst < 0 && src < 0) return CommRequest{};
    CommRequest r = begin_request(g, what, dst >= 0 ? (double)n * sizeof(float) : 0.0);
#ifdef __CUDACC__
    if (use_nccl(comm))
        return nccl_request(comm, r, [&](cudaStream_t st) {
            NCCL_CHECK(ncclGroupStart());
            if (dst >= 0) NCCL_CHECK(ncclSend(send, n, ncclFloat, dst, g.nccl, st));
            if (src >= 0) NCCL_CHECK(ncclRecv(recv, n, ncclFloat, src, g.nccl, st));
            NCCL_CHECK(ncclGroupEnd());
        });
#endif
    if (src >= 0) {
        float* host_recv = mpi_buffer(comm, &r.host, &r.host_n, recv, n, false);
        stage_back(r, host_recv, recv, n);
        MPI_CHECK(MPI_Irecv(host_recv, (int)n, MPI_FLOAT, src, 0, g.mpi, &r.mpi[1]));
    }
    if (dst >= 0) MPI_CHECK(MPI_Isend(mpi_buffer(comm, &r.host_send, &r.host_send_n, send, n, true), (int)n, MPI_FLOAT, dst, 0, g.mpi, &r.mpi[0]));
    return r;
}

// Blocking forms: tensor parallel's collectives sit between two ops of the model, nothing to overlap.
static void comm_all_reduce(Comm& comm, Group& g, float* buf, size_t n, Reduce op, const std::string& what) {
    CommRequest r = comm_all_reduce_start(comm, g, buf, n, op, what);
    comm_wait(comm, r);
}
static void comm_reduce_scatter(Comm& comm, Group& g, float* send, float* recv, size_t n, const std::string& what) {
    CommRequest r = comm_reduce_scatter_start(comm, g, send, recv, n, what);
    comm_wait(comm, r);
}
template <typename T>
static void comm_all_gather(Comm& comm, Group& g, const T* send, T* recv, size_t n, const std::string& what) {
    CommRequest r = comm_all_gather_start(comm, g, send, recv, n, what);
    comm_wait(comm, r);
}
static void comm_broadcast(Comm& comm, Group& g, float* buf, size_t n, int root, const char* what) {
    CommRequest r = comm_broadcast_start(comm, g, buf, n, root, what);
    comm_wait(comm, r);
}
// Host scalars (loss sums, token counts, squared norms, step times) always go through MPI: they
// live on the host, and a few doubles are not worth a device round trip.
static void comm_all_reduce_host(Comm& comm, Group& g, double* values, int n, MPI_Op op, const char* what) {
    if (g.size <= 1) return;
    CommRequest r = begin_request(g, what, 2.0 * (g.size - 1) / g.size * n * sizeof(double));
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, values, n, MPI_DOUBLE, op, g.mpi));
    r.active = false;
    trace_comm(comm.tracer, r, now_us());
}

// Host floats to group-rank 0: recv (n·size, on group-rank 0 only) ← every rank's send (n), in
// group-rank order. Checkpoints and exports assemble full tensors from their tp shards this way:
// they are written from host memory anyway, so no device holds a full tensor.
static void comm_gather_host(Comm& comm, Group& g, const float* send, size_t n, float* recv, const char* what) {
    if (g.size <= 1) {
        std::copy(send, send + n, recv);
        return;
    }
    CommRequest r = begin_request(g, what, g.rank == 0 ? 0.0 : (double)n * sizeof(float));
    MPI_CHECK(MPI_Gather(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, 0, g.mpi));
    r.active = false;
    trace_comm(comm.tracer, r, now_us());
}
// Host floats summed onto group-rank 0: buf (n) there ← Σ over the group (every other rank sends n).
static void comm_reduce_host(Comm& comm, Group& g, float* buf, size_t n, const char* what) {
    if (g.size <= 1) return;
    CommRequest r = begin_request(g, what, g.rank == 0 ? 0.0 : (double)n * sizeof(float));
    MPI_CHECK(MPI_Reduce(g.rank == 0 ? MPI_IN_PLACE : buf, buf, (int)n, MPI_FLOAT, MPI_SUM, 0, g.mpi));
    r.active = false;
    trace_comm(comm.tracer, r, now_us());
}

// ---- tensor parallel ----
// Megatron's split of a layer over the tp group. Column-parallel GEMMs (Wqkv, by heads; Wi, the
// GELU half and the gate half cut alike; the tied decoder, by vocabulary rows) give each rank its
// own output columns; row-parallel GEMMs (attention Wo, MLP Wo; the vocab-parallel embedding) give
// each rank a partial sum of the full output. Every tp collective of the model goes through one of
// two conjugate functions:
//   tp_region_in   before a column-parallel GEMM: forward identity,  backward all-reduce
//   tp_region_out  after a row-parallel GEMM:     forward all-reduce, backward identity
// With sequence parallel (--sp) the token rows outside the regions (the residual stream, the
// LayerNorms, the sparse head's inputs) are cut into tp contiguous slices, and the pair becomes
//   tp_region_in   forward all-gather (T/tp → T rows),      backward reduce-scatter (T → T/tp)
//   tp_region_out  forward reduce-scatter (T → T/tp rows),  backward all-gather
// The cross-entropy over the vocabulary shards all-reduces the row max, then the sums of
// exponentials and the target logits: full logits never exist on one rank. The collectives are
// named "tp <region> <collective>" (with "grad" in the backward) in the trace and the byte counts.

enum class Pass { forward, backward };

struct TensorParallel {
    Comm* comm = nullptr;    // null on one rank (the tests' model, --predict on one rank)
    Group* group = nullptr;  // the tp group
    int size = 1, rank = 0;
    bool sp = false;         // sequence parallel: token rows cut over the group outside the regions
    int token_slices() const { return sp ? size : 1; }
};

// The two moves of the pair, on a region's (rows, W) local and (rows·n, W) full tensors (n = tp with
// --sp, else 1, when local and full are one buffer). Summing partial results: reduce-scatter full
// into local with --sp, all-reduce in place without. Handing rows on: all-gather local into full
// with --sp, nothing without (every rank already has every row).
static void tp_sum(TensorParallel& tp, float* local, float* full, size_t n, const std::string& name) {
    if (tp.sp) comm_reduce_scatter(*tp.comm, *tp.group, full, local, n, name + "reduce-scatter");
    else comm_all_reduce(*tp.comm, *tp.group, full, n, Reduce::sum, name + "all-reduce");
}
template <typename T>
static void tp_gather(TensorParallel& tp, T* local, T* full, size_t n, const std::string& name) {
    if (tp.sp) comm_all_gather(*tp.comm, *tp.group, local, full, n, name + "all-gather");
}
// Entering a tp region (the input of a column-parallel GEMM): forward the rows are handed on,
// backward the GEMM's partial input gradients (full) are summed into local. The forward's rows are
// activations (act), the backward's sums fp32.
template <typename T>
static void tp_region_in(TensorParallel& tp, Pass pass, T* local, T* full, size_t rows, int width, const char* region) {
    if (tp.size == 1) return;
    const std::string name = std::string("tp ") + region + (pass == Pass::forward ? " " : " grad ");
    if (pass == Pass::forward) tp_gather(tp, local, full, rows * width, name);
    else if constexpr (std::is_same_v<T, float>) tp_sum(tp, local, full, rows * width, name);
    else fatal("internal: tp %s: gradients are summed in fp32", region);
}
// Leaving a tp region (the output of a row-parallel GEMM): forward its partial outputs (full) are
// summed into local, backward the output gradient's rows (local) are handed on.
static void tp_region_out(TensorParallel& tp, Pass pass, float* local, float* full, size_t rows, int width,
                          const char* region) {
    if (tp.size == 1) return;
    const std::string name = std::string("tp ") + region + (pass == Pass::forward ? " " : " grad ");
    if (pass == Pass::forward) tp_sum(tp, local, full, rows * width, name);
    else tp_gather(tp, local, full, rows * width, name);
}
// Vocab-parallel cross-entropy of N rows whose logits (N, V) are this rank's V vocabulary rows
// from id vocab_start (the first V_valid real, the rest padding): the row max is all-reduced (max),
// then Σ exp(logit − max) and the target logits (each row's target lives on one rank) are
// all-reduced (sum), so every rank gets every row's loss (N) and lse (N), the backward's input.
static void vocab_parallel_cross_entropy(TensorParallel& tp, float* losses, float* lse, float* row_max, float* partial,
                                         const ops::act* logits, const int* targets, int N, int V, int V_valid,
                                         int vocab_start) {
    ops::crossentropy_row_max(row_max, logits, targets, N, V, V_valid);
    if (tp.size > 1) comm_all_reduce(*tp.comm, *tp.group, row_max, N, Reduce::max, "tp cross-entropy max all-reduce");
    ops::crossentropy_sum_exp(partial, logits, row_max, targets, N, V, V_valid, vocab_start);
    if (tp.size > 1)
        comm_all_reduce(*tp.comm, *tp.group, partial, 2 * (size_t)N, Reduce::sum, "tp cross-entropy sum-exp all-reduce");
    ops::crossentropy_finish(losses, lse, row_max, partial, targets, N);
}
// Where a region's full-row tensor lives: its own scratch buffer with --sp, else the local one.
static float* tp_full(const TensorParallel& tp, float* local, float* scratch) { return tp.sp ? scratch : local; }

// ---- parameters ----
// Each rank's weights live in one flat fp32 buffer, in the order of the table below (transformers'
// names, shapes and initialisation), each tensor as this rank's tp shard. Gradients and the two Adam
// moments are flat buffers of the same layout, so an optimizer step, a checkpoint or a gradient
// bucket is a walk over one table. How each tensor is cut over tp (global_index maps a shard's
// element to its place in the full tensor):
//   rows         Wqkv (3 row blocks q|k|v, each cut by heads), Wi (2 blocks GELU|gate, each cut by I),
//                the embedding and the decoder bias (vocabulary rows, padded to a multiple of tp)
//   cols         attention Wo and MLP Wo (their input columns: the heads, the intermediate units)
//   replicated   the LayerNorms and the head's dense layer: every tp rank holds the whole tensor

enum class Split { replicated, rows, cols };

struct ParamInfo {
    std::string name;            // transformers' parameter name
    std::vector<int> shape;      // the full tensor, e.g. (3H, H)
    size_t full_offset = 0, full_numel = 0;  // in a flat buffer of full tensors (checkpoints, export)
    size_t offset = 0, numel = 0;            // this rank's shard in the flat buffers
    size_t id = 0;               // index in the whole model's table (the initialiser's key)
    Split split = Split::replicated;
    int row_blocks = 1;          // rows: the tensor's rows are this many equal blocks, each cut over tp
    float init_std = 0.f;        // 0: LayerNorm weight (ones) or bias (zeros)
    bool is_norm = false;        // LayerNorm weights start at one
    bool decay() const { return shape.size() >= 2; }  // no weight decay on 1-D tensors
};

struct LayerWeights {  // shapes of the full tensors; each rank holds its shard (see the table)
    float* attn_norm;  // (H), null on layer 0 (transformers has Identity there)
    float* wqkv;       // (3H, H) rows: q heads | k heads | v heads; shard (3·H/tp, H)
    float* wo;         // (H, H); shard (H, H/tp)
    float* mlp_norm;   // (H)
    float* wi;         // (2I, H) rows: GELU half | gate half; shard (2·I/tp, H)
    float* mlp_wo;     // (H, I); shard (H, I/tp)
};
struct ModelWeights {
    float* tok_embeddings;  // (V, H), tied to the decoder; shard (⌈V/tp⌉, H)
    float* emb_norm;        // (H)
    std::vector<LayerWeights> layers;
    float* final_norm;      // (H)
    float* head_dense;      // (H, H)
    float* head_norm;       // (H)
    float* decoder_bias;    // (V); shard (⌈V/tp⌉)
};

struct ParamTable {
    std::vector<ParamInfo> params;
    size_t total = 0, full_total = 0;  // this rank's floats; the full model's
    int tp_size = 1, tp_rank = 0;
    // this rank's pipeline stage: global layers [layer_begin, layer_end); the first stage holds the
    // embedding, the last the final norm, the head and the tied embedding again (the decoder)
    int layer_begin = 0, layer_end = 0;
    bool first_stage = true, last_stage = true;
    // this rank's share of the model's dimensions
    int heads = 0, I = 0;              // local attention heads, local intermediate units
    int V = 0, vocab_start = 0, V_valid = 0;  // vocabulary rows held (⌈V/tp⌉), the first one's id, how many are real
    // The backward finishes gradients in decreasing table order (head, last layer, …, embedding);
    // these indices mark the watermarks at which the data-parallel sync may launch buckets.
    std::vector<size_t> layer_first;  // (stage layers) index of each layer's first tensor
    size_t head_first = 0;            // index of model.final_norm.weight (last stage)
    const ParamInfo* find(const std::string& name) const {
        for (const auto& p : params)
            if (p.name == name) return &p;
        return nullptr;
    }
};

// The index in the full tensor of element i of tp rank r's shard, or −1 for vocabulary padding.
static long global_index(const ParamInfo& p, int tp_size, int r, size_t i) {
    const size_t rows = p.shape[0], cols = p.shape.size() > 1 ? p.shape[1] : 1;
    if (p.split == Split::replicated) return (long)i;
    if (p.split == Split::cols) {
        const size_t local_cols = cols / tp_size, row = i / local_cols, col = i % local_cols;
        return (long)(row * cols + r * local_cols + col);
    }
    const size_t block_rows = rows / p.row_blocks, local_block = (block_rows + tp_size - 1) / tp_size;
    const size_t local_row = i / cols, block = local_row / local_block;
    const size_t row_in_block = r * local_block + local_row % local_block;
    if (row_in_block >= block_rows) return -1;  // padding past the vocabulary
    return (long)((block * block_rows + row_in_block) * cols + i % cols);
}

// Pipeline stage s of n holds a contiguous range of layers; the first L % n stages one more.
static void stage_layers(int L, int n, int s, int* begin, int* end) {
    const int base = L / n, extra = L % n;
    *begin = s * base + std::min(s, extra);
    *end = *begin + base + (s < extra ? 1 : 0);
}

// The table of tp rank tp_rank's shards of pipeline stage pp_rank's tensors (all tensors whole by
// default). full_offset places every tensor in the flat buffer of the whole model, whichever stage.
static ParamTable make_param_table(const ModelConfig& m, int tp_size = 1, int tp_rank = 0, int pp_size = 1,
                                   int pp_rank = 0) {
    ParamTable t;
    t.tp_size = tp_size;
    t.tp_rank = tp_rank;
    stage_layers(m.L, pp_size, pp_rank, &t.layer_begin, &t.layer_end);
    t.first_stage = pp_rank == 0;
    t.last_stage = pp_rank == pp_size - 1;
    t.heads = m.nh / tp_size;
    t.I = m.I / tp_size;
    t.V = (m.V + tp_size - 1) / tp_size;
    t.vocab_start = tp_rank * t.V;
    t.V_valid = std::max(0, std::min(t.V, m.V - t.vocab_start));
    // transformers' _init_weights: "in" σ for inputs, "out" σ/√(2L) for projections into the residual
    float std_in = m.init_std, std_out = m.init_std / sqrtf(2.0f * m.L);
    size_t id = 0;
    auto add = [&](bool here, const std::string& name, std::vector<int> shape, float std, bool is_norm,
                   Split split = Split::replicated, int row_blocks = 1) {
        ParamInfo p;
        p.id = id++;
        p.name = name;
        p.shape = shape;
        p.split = split;
        p.row_blocks = row_blocks;
        p.full_numel = 1;
        for (int d : shape) p.full_numel *= (size_t)d;
        const size_t rows = shape[0], cols = shape.size() > 1 ? shape[1] : 1;
        if (split == Split::replicated) p.numel = p.full_numel;
        if (split == Split::cols) p.numel = rows * (cols / tp_size);
        if (split == Split::rows) p.numel = row_blocks * ((rows / row_blocks + tp_size - 1) / tp_size) * cols;
        p.full_offset = t.full_total;
        p.offset = t.total;
        p.init_std = std;
        p.is_norm = is_norm;
        t.full_total += p.full_numel;
        if (!here) return;
        t.total += p.numel;
        t.params.push_back(p);
    };
    const bool first = t.first_stage, last = t.last_stage;
    add(first || last, "model.embeddings.tok_embeddings.weight", {m.V, m.H}, std_in, false, Split::rows);
    add(first, "model.embeddings.norm.weight", {m.H}, 0.f, true);
    for (int l = 0; l < m.L; l++) {
        const bool here = l >= t.layer_begin && l < t.layer_end;
        std::string p = "model.layers." + std::to_string(l) + ".";
        if (here) t.layer_first.push_back(t.params.size());
        if (l > 0) add(here, p + "attn_norm.weight", {m.H}, 0.f, true);
        add(here, p + "attn.Wqkv.weight", {3 * m.H, m.H}, std_in, false, Split::rows, 3);
        add(here, p + "attn.Wo.weight", {m.H, m.H}, std_out, false, Split::cols);
        add(here, p + "mlp_norm.weight", {m.H}, 0.f, true);
        add(here, p + "mlp.Wi.weight", {2 * m.I, m.H}, std_in, false, Split::rows, 2);
        add(here, p + "mlp.Wo.weight", {m.H, m.I}, std_out, false, Split::cols);
    }
    t.head_first = t.params.size();
    add(last, "model.final_norm.weight", {m.H}, 0.f, true);
    add(last, "head.dense.weight", {m.H, m.H}, std_out, false);
    add(last, "head.norm.weight", {m.H}, 0.f, true);
    add(last, "decoder.bias", {m.V}, 0.f, false, Split::rows);
    return t;
}

// This rank's shards (total) of a flat buffer of full tensors (full_total); padding is zero.
static std::vector<float> shards_of(const ParamTable& t, const std::vector<float>& full) {
    std::vector<float> local(t.total, 0.f);
    for (const ParamInfo& p : t.params)
        for (size_t i = 0; i < p.numel; i++) {
            long g = global_index(p, t.tp_size, t.tp_rank, i);
            if (g >= 0) local[p.offset + i] = full[p.full_offset + g];
        }
    return local;
}
// …and back: the full tensors from every tp rank's shards (tp_size · total, in tp-rank order). A
// replicated tensor is taken from tp rank 0.
static std::vector<float> full_of(const ParamTable& t, const std::vector<float>& shards) {
    std::vector<float> full(t.full_total);
    for (int r = t.tp_size - 1; r >= 0; r--)
        for (const ParamInfo& p : t.params)
            for (size_t i = 0; i < p.numel; i++) {
                long g = global_index(p, t.tp_size, r, i);
                if (g >= 0) full[p.full_offset + g] = shards[(size_t)r * t.total + p.offset + i];
            }
    return full;
}

// Pointers into a flat buffer (parameters, or gradients: same layout).
static ModelWeights view_weights(const ParamTable& t, float* base) {
    auto at = [&](const std::string& name) -> float* {
        const ParamInfo* p = t.find(name);
        return p ? base + p->offset : nullptr;
    };
    ModelWeights w;
    w.tok_embeddings = at("model.embeddings.tok_embeddings.weight");
    w.emb_norm = at("model.embeddings.norm.weight");
    for (int l = t.layer_begin; l < t.layer_end; l++) {  // this stage's layers, w.layers[l − layer_begin]
        std::string p = "model.layers." + std::to_string(l) + ".";
        w.layers.push_back({at(p + "attn_norm.weight"), at(p + "attn.Wqkv.weight"), at(p + "attn.Wo.weight"),
                            at(p + "mlp_norm.weight"), at(p + "mlp.Wi.weight"), at(p + "mlp.Wo.weight")});
    }
    w.final_norm = at("model.final_norm.weight");
    w.head_dense = at("head.dense.weight");
    w.head_norm = at("head.norm.weight");
    w.decoder_bias = at("decoder.bias");
    return w;
}

// Deterministic initialisation: a counter-based normal draw per (seed, tensor, element of the full
// tensor), truncated at ±cutoff·σ by redrawing, so that a weight's initial value depends on nothing
// else: a tp shard holds the very numbers one rank would, and no rank builds a full tensor.
static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static double uniform01(uint64_t h) { return ((h >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static void init_params(const ParamTable& t, const ModelConfig& m, uint64_t seed, std::vector<float>* host) {
    host->assign(t.total, 0.f);
    for (size_t pi = 0; pi < t.params.size(); pi++) {
        const ParamInfo& p = t.params[pi];
        float* w = host->data() + p.offset;
        for (size_t li = 0; li < p.numel; li++) {
            const long i = global_index(p, t.tp_size, t.tp_rank, li);
            if (i < 0) continue;  // vocabulary padding stays zero
            if (p.is_norm) { w[li] = 1.f; continue; }
            if (p.init_std == 0.f) continue;
            for (uint64_t attempt = 0;; attempt++) {  // Box–Muller, redrawn until inside the cutoff
                uint64_t key = mix64(mix64(mix64(seed) ^ p.id) ^ (uint64_t)i) ^ (attempt * 0x2545F4914F6CDD1Dull);
                double u1 = uniform01(mix64(key)), u2 = uniform01(mix64(key ^ 0xD1B54A32D192ED03ull));
                double z = sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
                if (fabs(z) <= m.init_cutoff) { w[li] = (float)(z * p.init_std); break; }
            }
        }
    }
}

// This rank's pipeline stage and its groups (the "pipeline parallel" section schedules the stages).
struct PipelineParallel {
    Comm* comm = nullptr;
    Group* group = nullptr;      // the pp group: stage r is group-rank r
    Group* embedding = nullptr;  // {first stage, last stage}: the tied embedding's two copies
    int size = 1, rank = 0;
};

// This rank's context shard and its group (the "context parallel" section runs attention across
// the shards), with the scratch its ring and halo exchanges use: one attention runs at a time, so
// every layer and micro-batch shares it (allocated by cp_allocate when cp > 1).
struct ContextParallel {
    Comm* comm = nullptr;
    Group* group = nullptr;  // the cp group: shard r is group-rank r
    int size = 1, rank = 0;
    int window = 0;          // the local layers' window w (keys at most w tokens away)
    ops::act* kv[2] = {};    // (Tc, 2·H/tp) ring blocks: the one attended to, the one arriving
    float* out = nullptr;    // (Tc, H/tp)     the attention output, merged over the blocks in fp32
    float* dqkv = nullptr;   // (Tc, 3·H/tp)   the q, k, v gradients, summed over the blocks in fp32
    float* out_b = nullptr;  // (Tc, H/tp)     one block's partial attention output, before its merge
    float* lse_b = nullptr;  // (Tc, heads/tp) and its log-sum-exp
    float* dkv[2] = {};      // (Tc, 2·H/tp) a block's gradient from this shard's queries, going to its owner
    float* dkv_in = nullptr; // (max(Tc, 2w), 2·H/tp) gradients arriving for this shard's own keys and values
    ops::act* kv_ext = nullptr; // (Tc + 2w, 2·H/tp) local layers: left halo | this shard's K/V | right halo
    float* dkv_ext = nullptr;// (Tc + 2w, 2·H/tp) and its gradient
    double ring_bytes = 0, halo_bytes = 0;  // sent this step by the ring and by the halos
};

// The whole trainable state of this rank: its shards of its stage's parameters, gradients (raw sums
// over the masked tokens of the step), Adam moments; all on the compute device.
struct Model {
    ModelConfig cfg;
    ParamTable table;
    TensorParallel tp;
    PipelineParallel pp;
    ContextParallel cp;
    float* params = nullptr;  // (total)
    float* grads = nullptr;   // (total)
    float* adam_m = nullptr;  // (total)
    float* adam_v = nullptr;  // (total)
    ModelWeights w, g;        // views of params and grads
    int adam_step = 0;        // optimizer steps taken (Adam's t)
    std::vector<AdamwPiece> pieces;       // what this rank updates: whole tensors, or (make_grad_sync) its ZeRO-1 share
    AdamwPiece* device_pieces = nullptr;  // the same table, on the compute device
    float* tensor_lr = nullptr;           // (table.params) each tensor's learning rate this step
    // the weights as the GEMMs read them (bf16 operands on the GPU build): params rounded to act,
    // refreshed by weights_changed whenever params change; on the CPU build params itself
    ops::act* params_act = nullptr;  // (total)
    const ops::act* operand(const float* weight) const { return params_act + (weight - params); }
};
static void weights_changed(Model& model) { ops::to_act(model.params_act, model.params, model.table.total); }

// The optimizer's table, its starts filled in, to the compute device (once per layout).
static void set_pieces(Model* model, std::vector<AdamwPiece> pieces) {
    size_t start = 0;
    for (AdamwPiece& p : pieces) p.start = start, start += p.n;
    ops::free_buffer(model->device_pieces);
    model->device_pieces = ops::alloc_array<AdamwPiece>(pieces.size(), "optimizer pieces");
    ops::copy_to_device(model->device_pieces, pieces.data(), pieces.size() * sizeof(AdamwPiece));
    model->pieces = std::move(pieces);
}

// host_params: this rank's shards (table.total floats, the layout of make_param_table for model->tp).
static void model_allocate(Model* model, const std::vector<float>& host_params) {
    model->table = make_param_table(model->cfg, model->tp.size, model->tp.rank, model->pp.size, model->pp.rank);
    size_t n = model->table.total;
    if (host_params.size() != n) fatal("internal: %zu initial values for %zu parameters", host_params.size(), n);
    model->params = ops::alloc_floats(n);
    model->grads = ops::alloc_floats(n);
    model->adam_m = ops::alloc_floats(n);
    model->adam_v = ops::alloc_floats(n);
    ops::copy_to_device(model->params, host_params.data(), n * sizeof(float));
    model->params_act =
        std::is_same_v<ops::act, float> ? reinterpret_cast<ops::act*>(model->params) : ops::alloc_acts(n);
    weights_changed(*model);
    model->w = view_weights(model->table, model->params);
    model->g = view_weights(model->table, model->grads);
    model->tensor_lr = ops::alloc_floats(model->table.params.size());
    std::vector<AdamwPiece> whole;  // gradient and state at the tensor's offset
    for (size_t i = 0; i < model->table.params.size(); i++) {
        const ParamInfo& p = model->table.params[i];
        whole.push_back({i, p.offset, p.numel, p.offset, 0, model->grads + p.offset, p.decay()});
    }
    set_pieces(model, std::move(whole));
}

// An act value on the host as the fp32 it widens to: act is fp32 itself, or bf16, an fp32's high half.
static float widen(ops::act x) {
    uint32_t bits = 0;
    memcpy(reinterpret_cast<char*>(&bits) + sizeof bits - sizeof x, &x, sizeof x);  // little-endian
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static std::vector<float> device_to_vector(const float* p, size_t n) {
    std::vector<float> v(n);
    ops::copy_to_host(v.data(), p, n * sizeof(float));
    return v;
}

// The whole model's full tensors (full_total; on the rank that is tp rank 0 of the first stage,
// empty elsewhere) from every rank's shards (total, on the host): the tp ranks' shards meet on tp
// rank 0, then the stages' tensors on the first stage. Every rank of the tp × pp block takes part.
static std::vector<float> gather_full(const Model& model, const std::vector<float>& local, const char* what) {
    const TensorParallel& tp = model.tp;
    std::vector<float> shards = local;
    if (tp.size > 1) {
        shards.assign(tp.rank == 0 ? (size_t)tp.size * local.size() : 0, 0.f);
        comm_gather_host(*tp.comm, *tp.group, local.data(), local.size(), shards.data(), what);
    }
    if (tp.rank != 0) return {};
    std::vector<float> full = full_of(model.table, shards);  // this stage's tensors; zeros for the others'
    const PipelineParallel& pp = model.pp;
    if (pp.size == 1) return full;
    if (!model.table.first_stage)  // the last stage's copy of the tied embedding equals the first's: sent as zeros
        for (const ParamInfo& p : model.table.params)
            if (p.id == 0) std::fill(full.begin() + p.full_offset, full.begin() + p.full_offset + p.full_numel, 0.f);
    comm_reduce_host(*pp.comm, *pp.group, full.data(), full.size(), what);  // every tensor is non-zero on one stage only
    return pp.rank == 0 ? full : std::vector<float>{};
}

// ---- activations ----
// What one micro-batch's forward keeps for its backward, sized for T tokens (micro_batch_tokens, or a
// cp shard of micro_batch_tokens / cp).
// Scratch buffers for gradients are shared by all layers: the backward visits one layer at a time.
// Under tp a rank holds its heads' and intermediate units' columns (H/tp, I/tp below stand for the
// table's local counts) and its vocabulary rows (V/tp); with --sp the residual stream and the
// LayerNorms hold this rank's slice of Tl = T/tp token rows (without sp Tl = T), and each "full"
// buffer is that slice gathered over tp (without sp it is the same buffer as its local one).
// What a GEMM or the attention reads is stored as ops::act (DESIGN.md §5: bf16 on the GPU build, fp32
// on the CPU build); the residual stream, the statistics and what is summed stay fp32.
struct LayerActivations {
    ops::act* ln_attn;       // (Tl, H) attn_norm output (layer 0: the residual as act; the CPU build: the residual)
    ops::act* ln_attn_full;  // (T, H)  what Wqkv reads: ln_attn gathered
    float* ln_attn_mean;     // (Tl)
    float* ln_attn_rstd;     // (Tl)
    ops::act* qkv;           // (T, 3·H/tp) this rank's heads: q | k | v, before RoPE (the attention ops turn q and k)
    float* lse;              // (T, heads/tp) attention log-sum-exp
    ops::act* kv_halo;       // cp, local layers: (≤ 2w, 2·H/tp) the K/V rows of the neighbours' shards this one sees
    ops::act* atty;          // (T, H/tp) attention output before Wo
    float* resid_mid;        // (Tl, H) residual after the attention block
    ops::act* ln_mlp;        // (Tl, H)
    ops::act* ln_mlp_full;   // (T, H)  what Wi reads
    float* ln_mlp_mean;      // (Tl)
    float* ln_mlp_rstd;      // (Tl)
    ops::act* mlp_in;        // (T, 2·I/tp) Wi output [x | gate]
    ops::act* mlp_act;       // (T, I/tp) GELU(x) ⊙ gate
};
struct Activations {
    int T = 0, M = 0;        // token capacity, masked-row capacity of this rank's head (Tl)
    double bytes = 0;        // device memory of this set (a pipeline stage keeps several)
    // this micro-batch's head rows (set by the forward): with --sp each tp rank runs the head on the
    // masked rows of its own token slice, padded with zero rows to the most any rank has, so that
    // the decoder's all-gather moves equal blocks; without sp every rank runs all masked rows
    int head_local = 0;      // masked rows in this rank's slice
    int head_rows = 0;       // rows of this rank's head (head_local + zero padding)
    int decoder_rows = 0;    // rows the decoder and the loss see: head_rows · tp with --sp, else head_rows
    int* ids;                // (T)
    int* positions;          // (T·cp) the whole micro-batch's tokens' positions (each < T·cp)
    int* cu_seqlens;         // (T·cp + 1) the whole micro-batch's documents
    float* rope_global;      // (T·cp, hd/2, 2) RoPE's cos and sin of every position, global layers' base
    float* rope_local;       // (T·cp, hd/2, 2) the same, local layers' base
    int* masked_rows;        // (M) local row indices of this rank's masked rows
    int* targets;            // (T) labels of the decoder's rows; −100 on padding rows
    float* emb;              // (T, H)  embedding lookup of this rank's vocabulary rows (a partial sum over tp)
    float* emb_sum;          // (Tl, H) the lookup summed over tp (in emb's buffer without sp)
    float* emb_mean;         // (Tl)
    float* emb_rstd;         // (Tl)
    // this stage's layers l = 0 … n−1 (global layer_begin + l); the first stage's residual[0] is the
    // LN_emb output, another stage's is what the previous stage sent
    std::vector<float*> residual;  // n + 1 of (Tl, H): residual[l+1] = layer l output
    std::vector<LayerActivations> layers;
    float* partial;          // (T, H)  --sp: a row-parallel GEMM's partial output before its reduce-scatter
    ops::act* final_out;     // (Tl, H) final_norm output
    float* final_mean;       // (Tl)
    float* final_rstd;       // (Tl)
    ops::act* head_in;       // (M, H)  masked rows of final_out
    float* head_pre;         // (M, H)  dense output
    float* head_act;         // (M, H)  GELU
    ops::act* head_out;      // (M, H)  head norm output
    ops::act* head_out_full; // (T, H)  what the decoder reads: head_out gathered over tp with --sp
    float* head_mean;        // (M)
    float* head_rstd;        // (M)
    ops::act* logits;        // (R, V/tp) a tile of decoder rows' logits over this rank's vocabulary; then their gradient
    float* row_max;          // (R)     each logits row's max over the whole vocabulary
    float* ce_partial;       // (2R)    Σ exp(logit − max) over this rank's vocabulary | the target's logit if here
    float* lse;              // (T)     log-sum-exp of each row of logits
    float* losses;           // (T)
    // backward scratch
    float* d_resid;          // (Tl, H) gradient flowing down the residual stream
    float* d_ln;             // (Tl, H)
    float* d_full;           // (T, H)  d_resid gathered (--sp), else d_resid
    ops::act* d_full_act;    // (T, H)  d_full as the row-parallel GEMMs' backward reads it (the CPU build: d_full)
    float* d_ln_full;        // (T, H)  a column-parallel GEMM's partial input gradient (--sp), else d_ln
    // a layer's MLP gradients are dead before its attention's are made: they share memory
    ops::act* d_mlp_act;     // (T, I/tp)
    ops::act* d_atty;        // (T, H/tp)  in d_mlp_act's buffer
    ops::act* d_mlp_in;      // (T, 2·I/tp)
    ops::act* d_qkv;         // (T, 3·H/tp) in d_mlp_in's buffer
    float* d_head_a;         // (M, H)
    float* d_head_b;         // (M, H)
    ops::act* d_head_act;    // (M, H)  the head dense output's gradient
    float* d_head_full;      // (T, H)  the decoder's partial input gradient (--sp), else d_head_a
};

// R, the decoder's rows per tile: the head's logits exist for one tile at a time, never for all masked
// rows (8192 tokens' worth of base's would be 1.6 GB a set). 256 rows keep each tile's GEMM
// (256, H)·(H, V/tp) big enough to fill a GPU, and the decoder weight is re-read once a tile: ~10
// times a base micro-batch, little next to the GEMMs' arithmetic.
constexpr int HEAD_TILE_ROWS = 256;

// One set of activations for this rank's stage: the embedding's buffers on the first stage only,
// the head's and the logits on the last only.
static Activations alloc_activations(const Model& model, int T) {
    const ModelConfig& m = model.cfg;
    const ParamTable& t = model.table;
    const TensorParallel& tp = model.tp;
    Activations a;
    a.T = T;
    const int Tl = T / tp.token_slices(), n_layers = t.layer_end - t.layer_begin;
    a.M = Tl;  // every row could be masked; the head buffers are small next to the layers
    const size_t TH = (size_t)T * m.H, TlH = (size_t)Tl * m.H, MH = (size_t)a.M * m.H;
    const int Hl = t.heads * m.hd;  // this rank's share of the hidden size
    auto floats = [&](size_t n) { a.bytes += 4.0 * n; return ops::alloc_floats(n); };
    auto ints = [&](size_t n) { a.bytes += 4.0 * n; return ops::alloc_ints(n); };
    auto acts = [&](size_t n) { a.bytes += (double)sizeof(ops::act) * n; return ops::alloc_acts(n); };
    auto head = [&](size_t n) { return t.last_stage ? floats(n) : nullptr; };
    auto head_acts = [&](size_t n) { return t.last_stage ? acts(n) : nullptr; };
    auto full = [&](auto* local) -> decltype(local) {  // a gathered buffer of local's type with --sp
        if (!tp.sp) return local;
        if constexpr (std::is_same_v<decltype(local), float*>) return floats(TH);
        else return acts(TH);
    };
    // an act copy of an fp32 buffer: the buffer itself on the CPU build, where act is fp32
    auto as_act = [&](float* f, size_t n) {
        return std::is_same_v<ops::act, float> ? reinterpret_cast<ops::act*>(f) : acts(n);
    };
    a.ids = ints(T);
    const int T_whole = T * model.cp.size;
    a.positions = ints(T_whole);
    a.cu_seqlens = ints((size_t)T_whole + 1);
    a.rope_global = floats((size_t)T_whole * m.hd);
    a.rope_local = floats((size_t)T_whole * m.hd);
    ops::rope_table(a.rope_global, T_whole, m.hd, m.theta_global);
    ops::rope_table(a.rope_local, T_whole, m.hd, m.theta_local);
    a.masked_rows = ints(a.M);
    a.targets = ints(T);
    a.emb = t.first_stage ? floats(TH) : nullptr;
    a.emb_sum = !t.first_stage ? nullptr : tp.sp ? floats(TlH) : a.emb;
    a.emb_mean = t.first_stage ? floats(Tl) : nullptr;
    a.emb_rstd = t.first_stage ? floats(Tl) : nullptr;
    for (int l = 0; l <= n_layers; l++) a.residual.push_back(floats(TlH));
    for (int l = 0; l < n_layers; l++) {
        LayerActivations la;
        const bool has_norm = t.layer_begin + l > 0;  // global layer 0 has no attn_norm
        la.ln_attn = has_norm ? acts(TlH) : as_act(a.residual[0], TlH);
        la.ln_attn_full = full(la.ln_attn);
        la.ln_attn_mean = floats(Tl);
        la.ln_attn_rstd = floats(Tl);
        la.qkv = acts((size_t)T * 3 * Hl);
        la.lse = floats((size_t)T * t.heads);
        const bool halo = model.cp.size > 1 && !m.is_global(t.layer_begin + l);
        la.kv_halo = halo ? acts((size_t)2 * model.cp.window * 2 * Hl) : nullptr;
        la.atty = acts((size_t)T * Hl);
        la.resid_mid = floats(TlH);
        la.ln_mlp = acts(TlH);
        la.ln_mlp_full = full(la.ln_mlp);
        la.ln_mlp_mean = floats(Tl);
        la.ln_mlp_rstd = floats(Tl);
        la.mlp_in = acts((size_t)T * 2 * t.I);
        la.mlp_act = acts((size_t)T * t.I);
        a.layers.push_back(la);
    }
    a.partial = tp.sp ? floats(TH) : nullptr;
    a.final_out = head_acts(TlH);
    a.final_mean = head(Tl);
    a.final_rstd = head(Tl);
    a.head_in = head_acts(MH);
    a.head_pre = head(MH);
    a.head_act = head(MH);
    a.head_out = head_acts(MH);
    a.head_out_full = t.last_stage ? full(a.head_out) : nullptr;
    a.head_mean = head(a.M);
    a.head_rstd = head(a.M);
    const int R = std::min(T, HEAD_TILE_ROWS);  // a tile never has more rows than the micro-batch
    a.logits = head_acts((size_t)R * t.V);
    a.row_max = head(R);
    a.ce_partial = head(2 * (size_t)R);
    a.lse = head(T);
    a.losses = head(T);
    a.d_resid = floats(TlH);
    a.d_ln = floats(TlH);
    a.d_full = full(a.d_resid);
    a.d_full_act = as_act(a.d_full, TH);
    a.d_ln_full = full(a.d_ln);
    a.d_mlp_act = acts((size_t)T * std::max(t.I, Hl));
    a.d_atty = a.d_mlp_act;
    a.d_mlp_in = acts((size_t)T * std::max(2 * t.I, 3 * Hl));
    a.d_qkv = a.d_mlp_in;
    a.d_head_a = head(MH);
    a.d_head_b = head(MH);
    a.d_head_act = t.last_stage ? as_act(a.d_head_a, MH) : nullptr;
    a.d_head_full = t.last_stage ? full(a.d_head_a) : nullptr;
    return a;
}

// The batch metadata one forward needs, on the host (see data.h's MicroBatch): the whole
// micro-batch, on every tp rank.
// Under cp a rank's view is its shard (see the context parallel section): T of its tokens from
// token_start, with the whole micro-batch's document table.
struct BatchView {
    int T = 0, n_docs = 0, n_masked = 0, n_real = 0;  // tokens, documents, masked and real tokens here
    int token_start = 0, T_whole = 0;  // this view's first token in the micro-batch, the micro-batch's tokens
    std::vector<int> ids, masked_rows, targets;  // (T), (n_masked), (n_masked): this view's
    std::vector<int> positions, cu_seqlens;      // (T_whole), (n_docs + 1): the whole micro-batch's
    std::vector<double> cp_pairs;  // (cp, cp) [r·cp + o]: same-document pairs of shard r's queries with shard o's keys
    double cp_ring_work = 0, cp_ring_work_unbalanced = 0;  // the ring's critical path (see cp_ring_work), in pairs
};

static BatchView batch_view(const MicroBatch& mb) {
    BatchView b;
    b.T = b.T_whole = mb.T;
    b.n_real = mb.n_real;
    b.n_docs = mb.n_docs;
    b.ids = mb.ids;
    b.positions = mb.positions;
    b.cu_seqlens = mb.cu_seqlens;
    b.masked_rows = mb.masked_rows;
    for (int r : mb.masked_rows) b.targets.push_back(mb.labels[r]);
    b.n_masked = (int)b.masked_rows.size();
    return b;
}

// Uploads the batch and decides the head's rows. With --sp, tp rank r's slice is token rows
// [r·Tl, (r+1)·Tl); its masked rows go through its head, padded to the most masked rows any slice
// has (every rank knows the whole batch, so all agree), and the decoder sees the slices' rows in
// rank order, padding rows with target −100 (no loss, no gradient).
static void upload_batch(Activations* a, const BatchView& b, const ModelConfig& m, const TensorParallel& tp) {
    if (b.T > a->T) fatal("internal: batch of %d tokens in buffers of %d", b.T, a->T);
    for (int id : b.ids)
        if (id < 0 || id >= m.V) fatal("token id %d outside the model's vocabulary of %d", id, m.V);
    const int slices = tp.token_slices(), Tl = b.T / slices;
    std::vector<std::vector<int>> rows(slices), targets(slices);  // per slice: local row indices, labels
    for (int k = 0; k < b.n_masked; k++) {
        int slice = b.masked_rows[k] / Tl;
        rows[slice].push_back(b.masked_rows[k] - slice * Tl);
        targets[slice].push_back(b.targets[k]);
    }
    const int mine = tp.sp ? tp.rank : 0;
    a->head_local = (int)rows[mine].size();
    a->head_rows = 0;
    for (const auto& r : rows) a->head_rows = std::max(a->head_rows, (int)r.size());
    a->decoder_rows = a->head_rows * slices;
    std::vector<int> decoder_targets;
    for (auto& tg : targets) {
        tg.resize(a->head_rows, -100);
        decoder_targets.insert(decoder_targets.end(), tg.begin(), tg.end());
    }
    ops::copy_to_device(a->ids, b.ids.data(), sizeof(int) * b.T);
    if ((int)b.positions.size() != b.T_whole) fatal("internal: %zu positions for %d tokens", b.positions.size(), b.T_whole);
    for (int p : b.positions)  // a document fits in the micro-batch, so its positions fit the RoPE tables
        if (p < 0 || p >= b.T_whole) fatal("internal: position %d outside the RoPE tables", p);
    ops::copy_to_device(a->positions, b.positions.data(), sizeof(int) * b.T_whole);
    ops::copy_to_device(a->cu_seqlens, b.cu_seqlens.data(), sizeof(int) * (b.n_docs + 1));
    if (a->head_local) ops::copy_to_device(a->masked_rows, rows[mine].data(), sizeof(int) * a->head_local);
    if (a->decoder_rows) ops::copy_to_device(a->targets, decoder_targets.data(), sizeof(int) * a->decoder_rows);
}

// What the attention ops read of a micro-batch besides q, k and v (device pointers): its document
// table, its tokens' positions (the whole micro-batch's, under cp too) and the layer's RoPE table.
struct AttentionTables {
    const int* cu_seqlens;
    const int* positions;
    const float* rope;
};
static AttentionTables attention_tables(const Activations& a, const ModelConfig& m, int layer) {
    return {a.cu_seqlens, a.positions, m.is_global(layer) ? a.rope_global : a.rope_local};
}

// ---- context parallel ----
// A micro-batch's packed buffer of T tokens is cut into cp contiguous shards of Tc = T/cp tokens:
// cp rank r owns tokens [r·Tc, (r+1)·Tc). Everything but attention works token by token, so the
// embedding, the LayerNorms, the GEMMs, the MLP and the sparse head run on the shard alone (tp and
// pp then cut the shard as they cut a micro-batch). Every rank knows the whole micro-batch's
// document table, so positions (restarting per document), document boundaries and masked rows
// are right across shard edges, and every rank can tell which shards share a document.
//   Global layers: ring attention. At step s = 0 … cp−1 rank r attends to the K/V block of shard
//     r − s, which arrived from rank r − 1 while step s − 1 computed ("cp ring kv" send/recv); the
//     partial outputs merge by their log-sum-exp. The backward sends the blocks round again; the
//     gradient of block r − s goes straight back to its owner ("cp ring grad dkv"). A block with no
//     same-document pair is not computed and has no gradient to return, and a block no rank
//     further along the ring needs is not passed on.
//   Local layers (a ±w window): no ring. A query sees keys at most w tokens away, so rank r needs
//     the w tokens either side of its shard, from more than one rank when Tc < w: each rank sends
//     its neighbours those rows ("cp halo kv") and gets their gradients back ("cp halo grad dkv").
// Balance: the documents of a micro-batch may be laid out in any order (attention stays inside a
// document, positions restart in each, the loss is a sum), and the order decides how much of
// each ring step's work falls on each rank; cp_balance picks the order with the shortest ring.
// Loss, masked-token count and gradients are sums over the shards: the dp×cp gradient sync and
// the step's all-reduces add them up as they add up data-parallel replicas.

// The length of [a0, a1) ∩ [b0, b1).
static int overlap(int a0, int a1, int b0, int b1) { return std::max(0, std::min(a1, b1) - std::max(a0, b0)); }

// pairs (cp, cp): [r·cp + o] = Σ over documents of (its tokens in shard r)·(its tokens in shard o):
// the (query, key) pairs a global layer computes for shard r's queries against shard o's block.
static std::vector<double> cp_pairs(const std::vector<int>& cu_seqlens, int n_docs, int T, int cp) {
    const int Tc = T / cp;
    std::vector<double> pairs((size_t)cp * cp, 0.0);
    for (int d = 0; d < n_docs; d++) {
        const int d0 = cu_seqlens[d], d1 = cu_seqlens[d + 1];
        for (int r = d0 / Tc; r < cp && r * Tc < d1; r++)
            for (int o = d0 / Tc; o < cp && o * Tc < d1; o++)
                pairs[(size_t)r * cp + o] +=
                    (double)overlap(d0, d1, r * Tc, (r + 1) * Tc) * overlap(d0, d1, o * Tc, (o + 1) * Tc);
    }
    return pairs;
}
// The ring's critical path: every step waits for its slowest rank, so Σ_s max_r pairs(r, r − s).
static double cp_ring_work(const std::vector<double>& pairs, int cp) {
    double total = 0;
    for (int s = 0; s < cp; s++) {
        double slowest = 0;
        for (int r = 0; r < cp; r++) slowest = std::max(slowest, pairs[(size_t)r * cp + (r - s + cp) % cp]);
        total += slowest;
    }
    return total;
}
static bool cp_needs(const BatchView& b, int cp, int r, int owner) { return b.cp_pairs[(size_t)r * cp + owner] > 0; }
// How far along the ring the block of shard owner must travel: the largest d ≤ cp − 1 such that
// rank owner + d needs it (0: nobody else does).
static int cp_reach(const BatchView& b, int cp, int owner) {
    int reach = 0;
    for (int d = 1; d < cp; d++)
        if (cp_needs(b, cp, (owner + d) % cp, owner)) reach = d;
    return reach;
}

// The micro-batch with its documents in the given order (padding stays at the end): ids and
// positions move with their tokens, masked rows with their labels.
static BatchView reorder_documents(const BatchView& b, const std::vector<int>& order) {
    BatchView r = b;
    std::vector<int> new_row(b.T, -1);
    r.cu_seqlens.assign(1, 0);
    int at = 0;
    for (int d : order) {
        for (int i = b.cu_seqlens[d]; i < b.cu_seqlens[d + 1]; i++, at++) {
            r.ids[at] = b.ids[i];
            r.positions[at] = b.positions[i];
            new_row[i] = at;
        }
        r.cu_seqlens.push_back(at);
    }
    std::vector<std::pair<int, int>> masked;  // (row, label), sorted by the new row
    for (int k = 0; k < b.n_masked; k++) masked.push_back({new_row[b.masked_rows[k]], b.targets[k]});
    std::sort(masked.begin(), masked.end());
    for (int k = 0; k < b.n_masked; k++) r.masked_rows[k] = masked[k].first, r.targets[k] = masked[k].second;
    return r;
}
// The ring critical path of the micro-batch with its documents (lengths) laid out in this order.
static double order_ring_work(const std::vector<int>& lengths, const std::vector<int>& order, int T, int cp) {
    std::vector<int> cu(1, 0);
    for (int d : order) cu.push_back(cu.back() + lengths[d]);
    return cp_ring_work(cp_pairs(cu, (int)order.size(), T, cp), cp);
}
// Document-aware cut: the order starts as the better of the packer's and a greedy one (longest
// document first, each into the shard with the fewest pairs so far among those it still fits in,
// the shards then laid end to end); then, while it shortens the ring's critical path, one document
// at a time moves to another place in the order (a long document straddling a shard edge shares
// its work with the next rank, which runs it in parallel at a later ring step). Bounded work:
// at most 8·n_docs² orders are tried. Every cp rank computes the same order from the same table.
static BatchView cp_balance(const BatchView& b, int cp) {
    const int Tc = b.T / cp, n = b.n_docs;
    std::vector<int> lengths(n), natural(n), by_length(n);
    for (int d = 0; d < n; d++) lengths[d] = b.cu_seqlens[d + 1] - b.cu_seqlens[d], natural[d] = by_length[d] = d;
    std::stable_sort(by_length.begin(), by_length.end(), [&](int x, int y) { return lengths[x] > lengths[y]; });
    std::vector<std::vector<int>> shard_docs(cp);
    std::vector<double> work(cp, 0.0), room(cp, (double)Tc);
    for (int d : by_length) {
        int best = -1;
        for (int r = 0; r < cp; r++)
            if (room[r] >= lengths[d] && (best < 0 || work[r] < work[best])) best = r;
        if (best < 0)  // fits nowhere whole: where most room is left (it spills into the next shard)
            best = (int)(std::max_element(room.begin(), room.end()) - room.begin());
        shard_docs[best].push_back(d);
        work[best] += (double)lengths[d] * lengths[d];
        room[best] -= lengths[d];
    }
    std::vector<int> greedy;
    for (const auto& docs : shard_docs) greedy.insert(greedy.end(), docs.begin(), docs.end());
    const double unbalanced = order_ring_work(lengths, natural, b.T, cp);
    std::vector<int> order = natural;
    double cost = unbalanced, greedy_cost = order_ring_work(lengths, greedy, b.T, cp);
    if (greedy_cost < cost) order = greedy, cost = greedy_cost;
    long budget = 8L * n * n;
    for (bool improved = true; improved && budget > 0;) {
        improved = false;
        for (int i = 0; i < n && !improved && budget > 0; i++)
            for (int j = 0; j < n && !improved && budget > 0; j++, budget--) {
                if (i == j) continue;
                std::vector<int> moved = order;
                const int d = moved[i];
                moved.erase(moved.begin() + i);
                moved.insert(moved.begin() + j, d);
                const double c = order_ring_work(lengths, moved, b.T, cp);
                if (c < cost) order = moved, cost = c, improved = true;
            }
    }
    BatchView out = order == natural ? b : reorder_documents(b, order);
    out.cp_pairs = cp_pairs(out.cu_seqlens, out.n_docs, out.T, cp);
    out.cp_ring_work = cost;
    out.cp_ring_work_unbalanced = unbalanced;
    return out;
}
// Shard r of a (balanced) micro-batch: its Tc tokens, its masked rows (as rows of the shard), and the
// whole document table and positions (the attention ops index them by the token's place in the whole).
static BatchView cp_shard(const BatchView& whole, int cp, int r) {
    const int Tc = whole.T / cp, start = r * Tc;
    BatchView s = whole;
    s.T = Tc;
    s.token_start = start;
    s.ids.assign(whole.ids.begin() + start, whole.ids.begin() + start + Tc);
    s.masked_rows.clear();
    s.targets.clear();
    for (int k = 0; k < whole.n_masked; k++)
        if (whole.masked_rows[k] >= start && whole.masked_rows[k] < start + Tc) {
            s.masked_rows.push_back(whole.masked_rows[k] - start);
            s.targets.push_back(whole.targets[k]);
        }
    s.n_masked = (int)s.masked_rows.size();
    s.n_real = overlap(0, whole.cu_seqlens[whole.n_docs], start, start + Tc);
    return s;
}

static void cp_allocate(ContextParallel* cp, int Tc, int Hl, int heads) {
    const size_t width = 2 * (size_t)Hl, w = cp->window;
    for (int i = 0; i < 2; i++) {
        cp->kv[i] = ops::alloc_acts((size_t)Tc * width);
        cp->dkv[i] = ops::alloc_floats((size_t)Tc * width);
    }
    cp->out = ops::alloc_floats((size_t)Tc * Hl);
    cp->dqkv = ops::alloc_floats((size_t)Tc * 3 * Hl);
    cp->out_b = ops::alloc_floats((size_t)Tc * Hl);
    cp->lse_b = ops::alloc_floats((size_t)Tc * heads);
    cp->dkv_in = ops::alloc_floats(std::max((size_t)Tc, 2 * w) * width);
    cp->kv_ext = ops::alloc_acts((Tc + 2 * w) * width);
    cp->dkv_ext = ops::alloc_floats((Tc + 2 * w) * width);
}

// One ring hop, started at the top of step s (the block for step s travels while step s − 1
// computes): this rank passes on the block it attended to at step s − 1, kv[(s − 1) % 2], to rank
// r + 1 if its travel goes on, and receives the block of shard r − s from rank r − 1 into kv[s % 2]
// if it comes this far. Both sides decide from the document table alone.
static CommRequest ring_pass(ContextParallel& cp, const BatchView& b, int s, size_t n, const char* what) {
    const int p = cp.size, r = cp.rank;
    if (s >= p) return CommRequest{};
    const int sent = (r - s + 1 + p) % p, arriving = (r - s + p) % p;  // owners of the two blocks
    const bool send = s <= cp_reach(b, p, sent), recv = s <= cp_reach(b, p, arriving);
    CommRequest req = comm_sendrecv_start(*cp.comm, *cp.group, cp.kv[(s - 1) % 2], send ? (r + 1) % p : -1,
                                          cp.kv[s % 2], recv ? (r - 1 + p) % p : -1, n, what);
    cp.ring_bytes += req.bytes;
    return req;
}

// Global-layer attention of this shard's queries over the whole micro-batch. qkv (Tc, 3·Hl) as the
// GEMM wrote it (the attention ops apply RoPE to q and k, so the blocks travel unturned); out (Tc,
// Hl), lse (Tc, heads).
static void ring_attention_forward(ContextParallel& cp, float* out, float* lse, const ops::act* qkv,
                                   const AttentionTables& tables, const BatchView& b, int heads, int hd) {
    const int p = cp.size, r = cp.rank, Tc = b.T, Hl = heads * hd, S = 3 * Hl;
    const size_t n = (size_t)Tc * 2 * Hl;
    ops::kv_pack(cp.kv[0], qkv, 0, Tc, Hl);
    for (int s = 0; s < p; s++) {
        const int owner = (r - s + p) % p;  // the block in kv[s % 2]
        CommRequest next = ring_pass(cp, b, s + 1, n, "cp ring kv send/recv");
        if (s == 0) {
            ops::attention_block_forward(out, lse, qkv, S, b.token_start, Tc, qkv + Hl, qkv + 2 * Hl, S, b.token_start, Tc,
                                         tables.cu_seqlens, b.n_docs, tables.positions, tables.rope, heads, hd, -1);
        } else if (cp_needs(b, p, r, owner)) {
            const ops::act* kv = cp.kv[s % 2];
            ops::attention_block_forward(cp.out_b, cp.lse_b, qkv, S, b.token_start, Tc, kv, kv + Hl, 2 * Hl, owner * Tc,
                                         Tc, tables.cu_seqlens, b.n_docs, tables.positions, tables.rope, heads, hd, -1);
            ops::attention_merge(out, lse, cp.out_b, cp.lse_b, Tc, heads, hd);
        }
        comm_wait(*cp.comm, next);
    }
}
// Its backward: dqkv (Tc, 3·Hl) ← the gradients of this shard's q, k and v,
// from dout (Tc, Hl) and the forward's final out and lse. Step s computes against block r − s and
// sends that block's gradient to its owner, while the gradient of this shard's block arrives
// from rank r + s (which attended to it at its step s); arrivals are added in step order.
static void ring_attention_backward(ContextParallel& cp, float* dqkv, const ops::act* dout, const ops::act* out,
                                    const float* lse, const ops::act* qkv, const AttentionTables& tables,
                                    const BatchView& b, int heads, int hd) {
    const int p = cp.size, r = cp.rank, Tc = b.T, Hl = heads * hd, S = 3 * Hl;
    const size_t n = (size_t)Tc * 2 * Hl;
    ops::zero_floats(dqkv, (size_t)Tc * S);
    ops::kv_pack(cp.kv[0], qkv, 0, Tc, Hl);
    CommRequest back;      // the previous step's gradient exchange
    bool arriving = false; // whether it brings a gradient for this shard
    auto finish_back = [&]() {
        comm_wait(*cp.comm, back);
        if (arriving) ops::kv_unpack_add(dqkv, cp.dkv_in, 0, Tc, Hl);
    };
    for (int s = 0; s < p; s++) {
        const int owner = (r - s + p) % p, user = (r + s) % p;  // the block here, the rank attending to ours
        CommRequest next = ring_pass(cp, b, s + 1, n, "cp ring kv send/recv");
        const bool computes = s > 0 && cp_needs(b, p, r, owner);
        float* dkv = cp.dkv[s % 2];
        if (s == 0) {
            ops::attention_block_backward(dqkv, dqkv + Hl, dqkv + 2 * Hl, S, S, dout, out, lse, qkv, S, b.token_start, Tc,
                                          qkv + Hl, qkv + 2 * Hl, S, b.token_start, Tc, tables.cu_seqlens, b.n_docs,
                                          tables.positions, tables.rope, heads, hd, -1);
        } else if (computes) {
            const ops::act* kv = cp.kv[s % 2];
            ops::zero_floats(dkv, n);
            ops::attention_block_backward(dqkv, dkv, dkv + Hl, S, 2 * Hl, dout, out, lse, qkv, S, b.token_start, Tc, kv,
                                          kv + Hl, 2 * Hl, owner * Tc, Tc, tables.cu_seqlens, b.n_docs, tables.positions,
                                          tables.rope, heads, hd, -1);
        }
        comm_wait(*cp.comm, next);
        if (s == 0) continue;
        finish_back();
        arriving = cp_needs(b, p, user, r);
        back = comm_sendrecv_start(*cp.comm, *cp.group, dkv, computes ? owner : -1, cp.dkv_in, arriving ? user : -1, n,
                                   "cp ring grad dkv send/recv");
        cp.ring_bytes += back.bytes;
    }
    finish_back();
}

// The halo of shard r (Tc tokens from start, in a micro-batch of T tokens) under a window w:
// the left rows [start − left, start) and the right rows [start + Tc, start + Tc + right). Rank
// r + d's left halo holds this shard's last rows(d) rows and rank r − d's right halo its first
// rows(d) rows, rows(d) = min(Tc, w − (d − 1)·Tc), for d = 1 … reach (more than one rank each side
// when Tc < w). kv_ext holds left halo | this shard | right halo, each row 2·Hl wide (k | v).
struct Halo {
    int Tc = 0, w = 0, left = 0, right = 0, reach = 0;
    int rows(int d) const { return std::max(0, std::min(Tc, w - (d - 1) * Tc)); }
    int from_left_at(int d) const { return left - (d - 1) * Tc - rows(d); }  // kv_ext row of rank r − d's rows
    int from_right_at(int d) const { return left + Tc + (d - 1) * Tc; }     // kv_ext row of rank r + d's rows
};
static Halo halo_of(const ContextParallel& cp, const BatchView& b) {
    Halo h;
    h.Tc = b.T;
    h.w = cp.window;
    h.left = std::min(h.w, b.token_start);
    h.right = std::min(h.w, b.T_whole - b.token_start - b.T);
    while (h.reach < cp.size - 1 && h.rows(h.reach + 1) > 0) h.reach++;
    return h;
}
// For d = 1 … reach, both directions at once: forward, this shard's edge rows (kv_ext's middle) go
// to ranks r ± d and theirs land in kv_ext's ends; backward, dkv_ext's ends go back to their
// owners and the gradients of this shard's edge rows arrive in `in` (dkv_in: from rank r + d at row
// Σ_{d' < d} rows(d'), from rank r − d at w plus that). K/V travel as act, gradients as fp32.
template <typename T>
static void halo_exchange(ContextParallel& cp, const Halo& h, Pass pass, T* ext, T* in, int Hl) {
    const int p = cp.size, r = cp.rank;
    const size_t width = 2 * (size_t)Hl;
    std::vector<CommRequest> reqs;
    int at = 0;  // backward: rows of dkv_in used by the nearer ranks
    for (int d = 1; d <= h.reach; d++) {
        const int n = h.rows(d), left = r - d >= 0 ? r - d : -1, right = r + d < p ? r + d : -1;
        const size_t floats = (size_t)n * width;
        if (pass == Pass::forward) {
            T* mine = ext + (size_t)h.left * width;  // this shard's rows in kv_ext
            reqs.push_back(comm_sendrecv_start(*cp.comm, *cp.group, mine + (size_t)(h.Tc - n) * width, right,
                                               ext + (size_t)h.from_left_at(d) * width, left, floats, "cp halo kv send/recv"));
            reqs.push_back(comm_sendrecv_start(*cp.comm, *cp.group, mine, left, ext + (size_t)h.from_right_at(d) * width,
                                               right, floats, "cp halo kv send/recv"));
        } else {
            reqs.push_back(comm_sendrecv_start(*cp.comm, *cp.group, ext + (size_t)h.from_left_at(d) * width, left,
                                               in + (size_t)at * width, right, floats,
                                               "cp halo grad dkv send/recv"));
            reqs.push_back(comm_sendrecv_start(*cp.comm, *cp.group, ext + (size_t)h.from_right_at(d) * width, right,
                                               in + (size_t)(h.w + at) * width, left, floats,
                                               "cp halo grad dkv send/recv"));
            at += n;
        }
    }
    for (CommRequest& req : reqs) {
        cp.halo_bytes += req.bytes;
        comm_wait(*cp.comm, req);
    }
}
// Local-layer attention of this shard's queries: its K/V and the halo, one block. kv_halo (left +
// right rows, 2·Hl) keeps the halo for the backward.
static void halo_attention_forward(ContextParallel& cp, float* out, float* lse, ops::act* kv_halo, const ops::act* qkv,
                                   const AttentionTables& tables, const BatchView& b, int heads, int hd) {
    const Halo h = halo_of(cp, b);
    const int Hl = heads * hd;
    const size_t width = 2 * (size_t)Hl;
    ops::kv_pack(cp.kv_ext + (size_t)h.left * width, qkv, 0, b.T, Hl);
    halo_exchange(cp, h, Pass::forward, cp.kv_ext, (ops::act*)nullptr, Hl);
    ops::copy_on_device(kv_halo, cp.kv_ext, (size_t)h.left * width * sizeof(ops::act));
    ops::copy_on_device(kv_halo + (size_t)h.left * width, cp.kv_ext + (size_t)(h.left + b.T) * width,
                        (size_t)h.right * width * sizeof(ops::act));
    ops::attention_block_forward(out, lse, qkv, 3 * Hl, b.token_start, b.T, cp.kv_ext, cp.kv_ext + Hl, 2 * Hl,
                                 b.token_start - h.left, h.left + b.T + h.right, tables.cu_seqlens, b.n_docs,
                                 tables.positions, tables.rope, heads, hd, cp.window);
}
// Its backward: dqkv (Tc, 3·Hl) ← q, k, v gradients. The halo rows'
// gradients go back to their owners; this shard's own, then those arriving, are added in order.
static void halo_attention_backward(ContextParallel& cp, float* dqkv, const ops::act* dout, const ops::act* out,
                                    const float* lse, const ops::act* kv_halo, const ops::act* qkv,
                                    const AttentionTables& tables, const BatchView& b, int heads, int hd) {
    const Halo h = halo_of(cp, b);
    const int Hl = heads * hd, rows = h.left + b.T + h.right;
    const size_t width = 2 * (size_t)Hl;
    ops::copy_on_device(cp.kv_ext, kv_halo, (size_t)h.left * width * sizeof(ops::act));
    ops::kv_pack(cp.kv_ext + (size_t)h.left * width, qkv, 0, b.T, Hl);
    ops::copy_on_device(cp.kv_ext + (size_t)(h.left + b.T) * width, kv_halo + (size_t)h.left * width,
                        (size_t)h.right * width * sizeof(ops::act));
    ops::zero_floats(dqkv, (size_t)b.T * 3 * Hl);
    ops::zero_floats(cp.dkv_ext, (size_t)rows * width);
    ops::attention_block_backward(dqkv, cp.dkv_ext, cp.dkv_ext + Hl, 3 * Hl, 2 * Hl, dout, out, lse, qkv, 3 * Hl,
                                  b.token_start, b.T, cp.kv_ext, cp.kv_ext + Hl, 2 * Hl, b.token_start - h.left, rows,
                                  tables.cu_seqlens, b.n_docs, tables.positions, tables.rope, heads, hd, cp.window);
    halo_exchange(cp, h, Pass::backward, cp.dkv_ext, cp.dkv_in, Hl);
    ops::kv_unpack_add(dqkv, cp.dkv_ext + (size_t)h.left * width, 0, b.T, Hl);
    int at = 0;
    for (int d = 1; d <= h.reach; d++) {
        const int n = h.rows(d);
        if (cp.rank + d < cp.size) ops::kv_unpack_add(dqkv, cp.dkv_in + (size_t)at * width, b.T - n, n, Hl);
        if (cp.rank - d >= 0) ops::kv_unpack_add(dqkv, cp.dkv_in + (size_t)(h.w + at) * width, 0, n, Hl);
        at += n;
    }
}

// The attention of one layer under cp (model_forward and model_backward call these when cp > 1). The
// blocks' results are summed in fp32 (cp.out, cp.dqkv), then stored as act.
static void cp_attention_forward(ContextParallel& cp, LayerActivations& la, const AttentionTables& tables, const BatchView& b,
                                 bool global, int heads, int hd) {
    if (global) ring_attention_forward(cp, cp.out, la.lse, la.qkv, tables, b, heads, hd);
    else halo_attention_forward(cp, cp.out, la.lse, la.kv_halo, la.qkv, tables, b, heads, hd);
    ops::to_act(la.atty, cp.out, (size_t)b.T * heads * hd);
}
static void cp_attention_backward(ContextParallel& cp, ops::act* dqkv, const ops::act* datty, const LayerActivations& la,
                                  const AttentionTables& tables, const BatchView& b, bool global, int heads, int hd) {
    if (global) ring_attention_backward(cp, cp.dqkv, datty, la.atty, la.lse, la.qkv, tables, b, heads, hd);
    else halo_attention_backward(cp, cp.dqkv, datty, la.atty, la.lse, la.kv_halo, la.qkv, tables, b, heads, hd);
    ops::to_act(dqkv, cp.dqkv, (size_t)b.T * 3 * heads * hd);
}

// ---- model forward ----
// Embedding → LayerNorm → L pre-norm layers (attention, GeGLU MLP, each added to the residual) →
// final norm → (masked rows only) head dense → GELU → LayerNorm → tied decoder → cross-entropy.
// Returns the SUM of the masked tokens' losses: normalisation happens once, per optimizer step.
// Under tp each GEMM runs on this rank's shard and the regions' collectives join the shards (see
// the tensor parallel section); every tp rank returns the same loss. Under pp this runs one stage:
// the first embeds, another starts from residual[0] as the previous stage sent it; the last ends
// with the loss, another leaves its output in residual[n] for the next (0 is returned).

// The tied decoder on decoder rows [r0, r0 + n) of head_out_full (n ≤ R): their logits, (n, V/tp),
// into the logits tile.
static void decoder_tile(const Model& model, Activations& a, int r0, int n, Tracer* trace) {
    const int H = model.cfg.H;
    TRACED(trace, "matmul",
           ops::matmul_forward(a.logits, a.head_out_full + (size_t)r0 * H, model.operand(model.w.tok_embeddings),
                               model.operand(model.w.decoder_bias), n, H, model.table.V));
}

static double model_forward(Model& model, Activations& a, const BatchView& b, Tracer* trace = nullptr) {
    const ModelConfig& m = model.cfg;
    const ModelWeights& w = model.w;
    const ParamTable& t = model.table;
    TensorParallel& tp = model.tp;
    const int T = b.T, Tl = T / tp.token_slices(), H = m.H, Hl = t.heads * m.hd, Il = t.I;
    const int n_layers = t.layer_end - t.layer_begin;
    upload_batch(&a, b, m, tp);

    if (t.first_stage) {
        TRACED(trace, "embedding", ops::embedding_forward(a.emb, a.ids, w.tok_embeddings, T, H, t.vocab_start, t.V));
        tp_region_out(tp, Pass::forward, a.emb_sum, a.emb, Tl, H, "embedding-out");
        TRACED(trace, "layernorm",
               ops::layernorm_forward(a.residual[0], a.emb_mean, a.emb_rstd, a.emb_sum, w.emb_norm, Tl, H, m.norm_eps));
    }

    for (int l = 0; l < n_layers; l++) {
        const int layer = t.layer_begin + l;  // the global index: its kind, its name in the trace
        double t_layer = trace ? now_us() : 0;
        const LayerWeights& lw = w.layers[l];
        LayerActivations& la = a.layers[l];
        float* h = a.residual[l];
        // attention block: Wqkv column-parallel (this rank's heads), Wo row-parallel. Past the stage's first
        // layer the attention norm (every layer but the model's first has one) ran with the residual add;
        // the model's first layer reads the residual itself, as act.
        if (lw.attn_norm && l == 0)
            TRACED(trace, "layernorm",
                   ops::layernorm_forward(la.ln_attn, la.ln_attn_mean, la.ln_attn_rstd, h, lw.attn_norm, Tl, H, m.norm_eps));
        if (!lw.attn_norm) TRACED(trace, "residual", ops::to_act(la.ln_attn, h, (size_t)Tl * H));
        tp_region_in(tp, Pass::forward, la.ln_attn, la.ln_attn_full, Tl, H, "attention-in");
        TRACED(trace, "matmul", ops::matmul_forward(la.qkv, la.ln_attn_full, model.operand(lw.wqkv), nullptr, T, H, 3 * Hl));
        const int window = m.is_global(layer) ? -1 : m.window();
        const AttentionTables tables = attention_tables(a, m, layer);
        if (model.cp.size > 1)
            TRACED(trace, "attention", cp_attention_forward(model.cp, la, tables, b, m.is_global(layer), t.heads, m.hd));
        else
            TRACED(trace, "attention",
                   ops::attention_forward(la.atty, la.lse, la.qkv, tables.cu_seqlens, b.n_docs, tables.positions, tables.rope, T,
                                          t.heads, m.hd, window));
        float* attn_out = tp_full(tp, la.resid_mid, a.partial);
        TRACED(trace, "matmul", ops::matmul_forward(attn_out, la.atty, model.operand(lw.wo), nullptr, T, Hl, H));
        tp_region_out(tp, Pass::forward, la.resid_mid, attn_out, Tl, H, "attention-out");
        // MLP block (its norm fused with the residual add): Wi column-parallel (this rank's units of both
        // halves), Wo row-parallel
        TRACED(trace, "residual+layernorm",
               ops::add_layernorm_forward(la.ln_mlp, la.ln_mlp_mean, la.ln_mlp_rstd, la.resid_mid, h, lw.mlp_norm, Tl, H,
                                          m.norm_eps));
        tp_region_in(tp, Pass::forward, la.ln_mlp, la.ln_mlp_full, Tl, H, "mlp-in");
        TRACED(trace, "matmul", ops::matmul_forward(la.mlp_in, la.ln_mlp_full, model.operand(lw.wi), nullptr, T, H, 2 * Il));
        TRACED(trace, "gelu/geglu", ops::geglu_forward(la.mlp_act, la.mlp_in, T, Il));
        float* mlp_out = tp_full(tp, a.residual[l + 1], a.partial);
        TRACED(trace, "matmul", ops::matmul_forward(mlp_out, la.mlp_act, model.operand(lw.mlp_wo), nullptr, T, Il, H));
        tp_region_out(tp, Pass::forward, a.residual[l + 1], mlp_out, Tl, H, "mlp-out");
        // the residual add, fused with the norm that reads the sum next on this stage: the next layer's
        // attention norm, or the final norm; at a stage boundary the next stage's first layer norms it
        float* next = a.residual[l + 1];
        if (l + 1 < n_layers) {
            LayerActivations& nla = a.layers[l + 1];
            TRACED(trace, "residual+layernorm",
                   ops::add_layernorm_forward(nla.ln_attn, nla.ln_attn_mean, nla.ln_attn_rstd, next, la.resid_mid,
                                              w.layers[l + 1].attn_norm, Tl, H, m.norm_eps));
        } else if (t.last_stage) {
            TRACED(trace, "residual+layernorm",
                   ops::add_layernorm_forward(a.final_out, a.final_mean, a.final_rstd, next, la.resid_mid, w.final_norm,
                                              Tl, H, m.norm_eps));
        } else {
            TRACED(trace, "residual", ops::add_inplace(next, la.resid_mid, (size_t)Tl * H));
        }
        trace_compute(trace, "layer " + std::to_string(layer) + " forward", t_layer);
    }
    if (!t.last_stage || b.n_masked == 0) return 0.0;
    double t_head = trace ? now_us() : 0;

    // sparse prediction: only masked rows go through the head (replicated weights) and the decoder
    // (column-parallel over the vocabulary); padding rows (--sp) are zero rows that stay zero
    const int M = a.head_rows, N = a.decoder_rows;
    if (a.head_local < M) TRACED(trace, "memset", ops::zero_acts(a.head_in, (size_t)M * H));
    TRACED(trace, "gather/scatter", ops::gather_rows(a.head_in, a.final_out, a.masked_rows, a.head_local, H));
    TRACED(trace, "matmul", ops::matmul_forward(a.head_pre, a.head_in, model.operand(w.head_dense), nullptr, M, H, H));
    TRACED(trace, "gelu/geglu", ops::gelu_forward(a.head_act, a.head_pre, (size_t)M * H));
    TRACED(trace, "layernorm",
           ops::layernorm_forward(a.head_out, a.head_mean, a.head_rstd, a.head_act, w.head_norm, M, H, m.norm_eps));
    tp_region_in(tp, Pass::forward, a.head_out, a.head_out_full, M, H, "decoder-in");
    // the decoder and the loss a tile of R rows at a time: a tile's logits are dead once its rows'
    // losses (N) and lse (N) are written, which is all the backward keeps of them
    for (int r0 = 0; r0 < N; r0 += HEAD_TILE_ROWS) {
        const int n = std::min(HEAD_TILE_ROWS, N - r0);
        decoder_tile(model, a, r0, n, trace);  // (n, V/tp)
        TRACED(trace, "cross-entropy",
               vocab_parallel_cross_entropy(tp, a.losses + r0, a.lse + r0, a.row_max, a.ce_partial, a.logits,
                                            a.targets + r0, n, t.V, t.V_valid, t.vocab_start));
    }
    double loss_sum = ops::sum(a.losses, N);
    trace_compute(trace, "head forward", t_head);
    return loss_sum;
}

// ---- model backward ----
// The forward in reverse. Gradients are sums over this micro-batch's masked tokens (dloss = 1 per
// token) added into model.grads, so micro-batches accumulate and the step normalises once.
// The tied embedding collects the decoder's gradient and the lookup's scatter in one tensor.
// With a GradSync (the last micro-batch of a step), each time a stretch of gradients is final the
// backward says so, and the sync sums them over the ranks that share them. Under pp a stage other
// than the last starts from d_resid as the next stage sent it, and one other than the first ends
// with the gradient of its input, residual[0], in d_resid.

struct GradSync;
static void grad_sync_ready(GradSync* sync, size_t first_final_param);

static void model_backward(Model& model, Activations& a, const BatchView& b, GradSync* sync = nullptr,
                           Tracer* trace = nullptr) {
    const ModelConfig& m = model.cfg;
    const ModelWeights& w = model.w;
    const ParamTable& t = model.table;
    TensorParallel& tp = model.tp;
    ModelWeights& g = model.g;
    const int T = b.T, Tl = T / tp.token_slices(), H = m.H, Hl = t.heads * m.hd, Il = t.I;
    const size_t TlH = (size_t)Tl * H;
    const int n_layers = t.layer_end - t.layer_begin;
    double t_head = trace ? now_us() : 0;
    if (!t.last_stage) {
        // d_resid already holds ∂loss/∂(this stage's output)
    } else if (b.n_masked > 0) {
        const int M = a.head_rows, N = a.decoder_rows;
        // tile by tile as in the forward, whose logits tiles are gone: each is recomputed (one more decoder
        // GEMM, ~4% of a base step) rather than its gradient made in the forward, so that the forward
        // stays free of gradients (evaluation, --predict, the tests' finite differences) and the backward
        // alone adds them. The gradient overwrites the tile's logits; dW and db add up over the tiles.
        for (int r0 = 0; r0 < N; r0 += HEAD_TILE_ROWS) {
            const int n = std::min(HEAD_TILE_ROWS, N - r0);
            const ops::act* rows_in = a.head_out_full + (size_t)r0 * H;  // (n, H)
            decoder_tile(model, a, r0, n, trace);                      // (n, V/tp)
            TRACED(trace, "cross-entropy",
                   ops::crossentropy_backward(a.logits, a.logits, a.lse + r0, a.targets + r0, 1.0f, n, t.V, t.V_valid,
                                              t.vocab_start));
            TRACED(trace, "matmul",
                   ops::matmul_backward(a.d_head_full + (size_t)r0 * H, g.tok_embeddings, g.decoder_bias, a.logits,
                                        rows_in, model.operand(w.tok_embeddings), n, H, t.V, false));
        }
        tp_region_in(tp, Pass::backward, a.d_head_a, a.d_head_full, M, H, "decoder-in");
        TRACED(trace, "layernorm",
               ops::layernorm_backward(a.d_head_b, g.head_norm, a.d_head_a, a.head_act, w.head_norm, a.head_mean,
                                       a.head_rstd, M, H, false));
        TRACED(trace, "gelu/geglu", ops::gelu_backward(a.d_head_act, a.d_head_b, a.head_pre, (size_t)M * H));
        TRACED(trace, "matmul",
               ops::matmul_backward(a.d_head_b, g.head_dense, nullptr, a.d_head_act, a.head_in, model.operand(w.head_dense),
                                    M, H, H, false));
        TRACED(trace, "memset", ops::zero_floats(a.d_ln, TlH));  // the scatter fills only the masked rows
        TRACED(trace, "gather/scatter", ops::scatter_rows_backward(a.d_ln, a.d_head_b, a.masked_rows, a.head_local, H));
        TRACED(trace, "layernorm",
               ops::layernorm_backward(a.d_resid, g.final_norm, a.d_ln, a.residual[n_layers], w.final_norm, a.final_mean,
                                       a.final_rstd, Tl, H, false));
    } else {
        TRACED(trace, "memset", ops::zero_floats(a.d_resid, TlH));  // nothing masked: no gradient reaches the layers
    }
    if (t.last_stage) {
        trace_compute(trace, "head backward", t_head);
        grad_sync_ready(sync, model.table.head_first);
    }
    for (int l = n_layers - 1; l >= 0; l--) {
        const int layer = t.layer_begin + l;
        double t_layer = trace ? now_us() : 0;
        const LayerWeights& lw = w.layers[l];
        LayerWeights& lg = g.layers[l];
        LayerActivations& la = a.layers[l];
        // d_resid holds ∂loss/∂residual[l+1]; the MLP branch adds its share of ∂/∂resid_mid
        tp_region_out(tp, Pass::backward, a.d_resid, a.d_full, Tl, H, "mlp-out");
        TRACED(trace, "residual", ops::to_act(a.d_full_act, a.d_full, (size_t)T * H));
        TRACED(trace, "matmul",
               ops::matmul_backward(a.d_mlp_act, lg.mlp_wo, nullptr, a.d_full_act, la.mlp_act, model.operand(lw.mlp_wo), T,
                                    Il, H, false));
        TRACED(trace, "gelu/geglu", ops::geglu_backward(a.d_mlp_in, a.d_mlp_act, la.mlp_in, T, Il));
        TRACED(trace, "matmul",
               ops::matmul_backward(a.d_ln_full, lg.wi, nullptr, a.d_mlp_in, la.ln_mlp_full, model.operand(lw.wi), T, H,
                                    2 * Il, false));
        tp_region_in(tp, Pass::backward, a.d_ln, a.d_ln_full, Tl, H, "mlp-in");
        TRACED(trace, "layernorm",
               ops::layernorm_backward(a.d_resid, lg.mlp_norm, a.d_ln, la.resid_mid, lw.mlp_norm, la.ln_mlp_mean,
                                       la.ln_mlp_rstd, Tl, H, true));
        // now ∂/∂resid_mid; the attention branch adds its share of ∂/∂residual[l]
        tp_region_out(tp, Pass::backward, a.d_resid, a.d_full, Tl, H, "attention-out");
        TRACED(trace, "residual", ops::to_act(a.d_full_act, a.d_full, (size_t)T * H));
        TRACED(trace, "matmul",
               ops::matmul_backward(a.d_atty, lg.wo, nullptr, a.d_full_act, la.atty, model.operand(lw.wo), T, Hl, H, false));
        const int window = m.is_global(layer) ? -1 : m.window();
        const AttentionTables tables = attention_tables(a, m, layer);
        if (model.cp.size > 1)
            TRACED(trace, "attention",
                   cp_attention_backward(model.cp, a.d_qkv, a.d_atty, la, tables, b, m.is_global(layer), t.heads, m.hd));
        else
            TRACED(trace, "attention",
                   ops::attention_backward(a.d_qkv, a.d_atty, la.atty, la.lse, la.qkv, tables.cu_seqlens, b.n_docs,
                                           tables.positions, tables.rope, T, t.heads, m.hd, window));
        TRACED(trace, "matmul",
               ops::matmul_backward(a.d_ln_full, lg.wqkv, nullptr, a.d_qkv, la.ln_attn_full, model.operand(lw.wqkv), T, H,
                                    3 * Hl, false));
        tp_region_in(tp, Pass::backward, a.d_ln, a.d_ln_full, Tl, H, "attention-in");
        if (lw.attn_norm) {
            TRACED(trace, "layernorm",
                   ops::layernorm_backward(a.d_resid, lg.attn_norm, a.d_ln, a.residual[l], lw.attn_norm, la.ln_attn_mean,
                                           la.ln_attn_rstd, Tl, H, true));
        } else {  // layer 0: the attention reads the residual itself
            TRACED(trace, "residual", ops::add_inplace(a.d_resid, a.d_ln, TlH));
        }
        trace_compute(trace, "layer " + std::to_string(layer) + " backward", t_layer);
        grad_sync_ready(sync, model.table.layer_first[l]);
    }
    if (!t.first_stage) return;  // d_resid: ∂loss/∂residual[0], for the previous stage
    double t_emb = trace ? now_us() : 0;
    TRACED(trace, "layernorm",
           ops::layernorm_backward(a.d_ln, g.emb_norm, a.d_resid, a.emb_sum, w.emb_norm, a.emb_mean, a.emb_rstd, Tl, H, false));
    tp_region_out(tp, Pass::backward, a.d_ln, a.d_ln_full, Tl, H, "embedding-out");
    TRACED(trace, "embedding",
           ops::embedding_backward(g.tok_embeddings, a.d_ln_full, a.ids, T, H, t.vocab_start, t.V, m.special.pad));
    trace_compute(trace, "embedding backward", t_emb);
    grad_sync_ready(sync, 0);
}

// ---- pipeline parallel ----
// Stage s of pp holds layers [layer_begin, layer_end) (stage_layers: contiguous, the first L % pp
// stages one more); the first stage embeds, the last computes the head and the loss, and both hold
// the tied embedding, whose two gradients are summed over the embedding group every step
// ("pp embedding grad all-reduce", in the gradient sync), so the copies stay identical. A step's
// grad-accum micro-batches flow through the stages; every stage draws every micro-batch's metadata
// from the deterministic loader, so only activations ((T/tp, H) floats, stage s → s+1) and their
// gradients (s+1 → s) travel, each exchange one paired send-recv with one neighbour ("pp send
// activation", "pp recv gradient", …). Each stage runs a program of ops:
//   afab  all forwards, then all backwards: every micro-batch's activations are alive at once;
//   1f1b  pp − s − 1 warm-up forwards, then one forward and one backward in turn, then the last
//         backwards: at most pp − s micro-batches alive on stage s, whatever grad-accum is.
// An exchange waits for its neighbour's matching one; the programs are built so that neighbours'
// exchanges meet in the same order, with any number of micro-batches (tests/test_model simulates
// every stage of many layouts and finds no deadlock).

enum class PipeKind { forward, backward, exchange };
struct PipeOp {
    PipeKind kind;
    int micro = -1;  // forward / backward: the micro-batch
    int peer = 0;    // exchange: −1 the previous stage, +1 the next
    int send = -1;   // exchange: the micro-batch whose activation (to next) or gradient (to previous) leaves
    int recv = -1;   // exchange: the micro-batch whose gradient (from next) or activation (from previous) arrives
};

// Stage s's program for m micro-batches ("forward": forwards only, for --predict). Exchanges with a
// stage that does not exist are left out.
static std::vector<PipeOp> pipeline_program(const std::string& schedule, int pp, int s, int m) {
    const bool first = s == 0, last = s == pp - 1;
    std::vector<PipeOp> ops;
    auto exchange = [&](int peer, int send, int recv) {
        if ((peer < 0 && first) || (peer > 0 && last) || (send < 0 && recv < 0)) return;
        ops.push_back({PipeKind::exchange, -1, peer, send, recv});
    };
    auto forward = [&](int i) { exchange(-1, -1, i), ops.push_back({PipeKind::forward, i}); };
    auto backward = [&](int i) { exchange(+1, -1, i), ops.push_back({PipeKind::backward, i}); };
    if (schedule != "1f1b") {  // afab, forward
        for (int i = 0; i < m; i++) forward(i), exchange(+1, i, -1);
        if (schedule == "afab")
            for (int i = 0; i < m; i++) backward(i), exchange(-1, i, -1);
        return ops;
    }
    const int warmup = std::min(pp - s - 1, m), steady = m - warmup;
    for (int i = 0; i < warmup; i++) forward(i), exchange(+1, i, -1);
    if (steady > 0) exchange(-1, -1, warmup);
    for (int i = 0; i < steady; i++) {  // forward warmup + i, then backward i
        ops.push_back({PipeKind::forward, warmup + i});
        exchange(+1, warmup + i, i);  // its activation out, the gradient of the oldest in
        ops.push_back({PipeKind::backward, i});
        exchange(-1, i, i + 1 < steady ? warmup + i + 1 : -1);  // that gradient out, the next input in
    }
    for (int i = steady; i < m; i++) backward(i), exchange(-1, i, -1);
    return ops;
}

// A stage's pipeline state: activation sets for the micro-batches in flight (grown on demand, so
// their number is the schedule's peak), the buffers exchanges land in, and what a step measured.
struct Pipeline {
    int T = 0;                  // token capacity of a set (micro_batch_tokens / cp; --predict: seq_len)
    std::vector<Activations> pool;
    float* act_in = nullptr;    // (Tl, H) activation received from the previous stage
    float* grad_in = nullptr;   // (Tl, H) gradient received from the next stage
    float* grad_out = nullptr;  // (Tl, H) this stage's input gradient, for the previous stage
    double busy_ms = 0, total_ms = 0;  // this step: compute time, the whole program
    int peak_live = 0;                 // this step: most micro-batches alive at once
    double activation_bytes() const { return pool.empty() ? 0.0 : peak_live * pool[0].bytes; }
};

// Runs this stage's program over the step's micro-batches (batches: all of them, every stage knows
// the metadata). Arriving data is copied into the micro-batch's set and leaving gradients out of it,
// so a set is free as soon as its backward ran. The last backward carries the gradient sync.
// Returns the sum of the micro-batches' losses on the last stage, 0 elsewhere.
static double run_pipeline(Model& model, Pipeline& pipe, const std::vector<BatchView>& batches,
                           const std::string& schedule, GradSync* sync, Tracer* trace) {
    PipelineParallel& pp = model.pp;
    const ParamTable& t = model.table;
    const int m = (int)batches.size(), n_layers = t.layer_end - t.layer_begin;
    const size_t n = (size_t)batches[0].T / model.tp.token_slices() * model.cfg.H;  // floats an exchange moves
    if (!pipe.act_in) {
        const size_t capacity = (size_t)pipe.T / model.tp.token_slices() * model.cfg.H;
        pipe.act_in = ops::alloc_floats(capacity);
        pipe.grad_in = ops::alloc_floats(capacity);
        pipe.grad_out = ops::alloc_floats(capacity);
    }
    std::vector<int> set_of(m, -1);
    std::vector<char> in_use(pipe.pool.size(), 0);
    int live = 0;
    auto take = [&](int i) -> Activations& {
        size_t k = 0;
        while (k < in_use.size() && in_use[k]) k++;
        if (k == pipe.pool.size()) pipe.pool.push_back(alloc_activations(model, pipe.T)), in_use.push_back(0);
        in_use[k] = 1;
        set_of[i] = (int)k;
        pipe.peak_live = std::max(pipe.peak_live, ++live);
        return pipe.pool[k];
    };
    const size_t bytes = n * sizeof(float);
    double loss = 0, t_start = now_us();
    pipe.busy_ms = 0;
    pipe.peak_live = 0;
    for (const PipeOp& op : pipeline_program(schedule, pp.size, pp.rank, m)) {
        const double t_op = now_us();
        if (op.kind == PipeKind::forward) {
            Activations& a = take(op.micro);
            if (!t.first_stage) ops::copy_on_device(a.residual[0], pipe.act_in, bytes);
            loss += model_forward(model, a, batches[op.micro], trace);
        } else if (op.kind == PipeKind::backward) {
            Activations& a = pipe.pool[set_of[op.micro]];
            if (!t.last_stage) ops::copy_on_device(a.d_resid, pipe.grad_in, bytes);
            model_backward(model, a, batches[op.micro], op.micro == m - 1 ? sync : nullptr, trace);
            if (!t.first_stage) ops::copy_on_device(pipe.grad_out, a.d_resid, bytes);
            in_use[set_of[op.micro]] = 0;
            live--;
        } else {
            const bool next = op.peer > 0;
            float* send = op.send < 0 ? nullptr : next ? pipe.pool[set_of[op.send]].residual[n_layers] : pipe.grad_out;
            float* recv = op.recv < 0 ? nullptr : next ? pipe.grad_in : pipe.act_in;
            std::string what = "pp";
            if (send) what += next ? " send activation" : " send gradient";
            if (recv) what += next ? " recv gradient" : " recv activation";
            const int peer = pp.rank + op.peer;
            CommRequest r = comm_sendrecv_start(*pp.comm, *pp.group, send, send ? peer : -1, recv, recv ? peer : -1, n,
                                                what.c_str());
            comm_wait(*pp.comm, r);
            continue;
        }
        sync_compute_stream();  // a compute op's time is its work's, not its launch's
        pipe.busy_ms += (now_us() - t_op) / 1e3;
        if (trace)
            trace->span("micro-batch " + std::to_string(op.micro) + (op.kind == PipeKind::forward ? " forward" : " backward"),
                        0, t_op, now_us(), "");
    }
    pipe.total_ms = (now_us() - t_start) / 1e3;
    return loss;
}

// ---- gradient sync (data parallel) ----
// Every rank of the dp×cp group holds the same weights and trains on its own micro-batches; their
// gradient sums are added up in fixed-size buckets of the flat gradient buffer. Buckets are cut from
// the end of the buffer, the order in which the backward finishes gradients, and each is launched
// (non-blocking) as soon as its last gradient is final during the last micro-batch's backward, so
// communication overlaps the rest of the backward. Named collectives:
//   ZeRO-0  "dp grad all-reduce"       every rank gets the whole summed gradient;
//   ZeRO-1  "dp grad reduce-scatter"   every rank gets the sum of its 1/n share of each bucket,
//                                      updates only that share (Adam state is sharded too), then
//           "dp param all-gather"      every rank gets the updated weights back.
// With --sp the replicated tensors' gradients (LayerNorms, the head's dense layer) are partial sums
// over the tp ranks' token slices: as each stretch becomes final they are summed first
// ("tp replicated grad all-reduce"), so that the dp buckets and the optimizer see whole gradients.

struct Bucket {
    size_t first_param, end_param;  // tensors [first, end) of the table
    size_t offset, numel;           // the stretch of the flat buffers they occupy
    size_t chunk = 0;               // ZeRO-1: each rank's share, ⌈numel / n⌉ (the last one padded)
    size_t shard_offset = 0;        // ZeRO-1: where this rank's share lives in the sharded buffers
    size_t staging_offset = 0;      // ZeRO-1: where the bucket's n·chunk staging lives
    CommRequest request;
};

struct GradSync {
    Comm* comm = nullptr;
    Group* group = nullptr;         // dp×cp: the ranks that hold the same weights
    const ParamTable* table = nullptr;
    TensorParallel* tp = nullptr;
    size_t tp_summed_from = 0;      // --sp: tensors [tp_summed_from, end) have had their tp sum this step
    Group* embedding = nullptr;     // pp > 1, first or last stage: the tied embedding's two copies
    bool tied_pending = false;      // this step's embedding gradient still lacks the other copy's
    bool zero = false;
    float* grads = nullptr;         // the model's flat gradient buffer
    std::vector<Bucket> buckets;    // launch order
    size_t next = 0;                // first bucket not launched yet
    int launched_during_backward = 0;  // overlap: buckets launched before the backward ended
    float* staging = nullptr;       // ZeRO-1: (Σ n·chunk) buckets laid out for reduce-scatter / all-gather
    float* shard_grad = nullptr;    // ZeRO-1: (Σ chunk) this rank's summed gradient share
    float* shard_param = nullptr;   // ZeRO-1: (Σ chunk) this rank's updated weights, to be gathered
    size_t shard_total = 0;
};

// This rank's share of a bucket under ZeRO-1: [begin, begin + n) of the flat buffer (n may be 0).
static void owned_range(const Bucket& b, int rank, size_t* begin, size_t* n) {
    size_t start = (size_t)rank * b.chunk;
    *begin = b.offset + std::min(start, b.numel);
    *n = start >= b.numel ? 0 : std::min(b.chunk, b.numel - start);
}

static GradSync* make_grad_sync(Comm* comm, Group* group, Model& model, bool zero, float bucket_mb) {
    GradSync* s = new GradSync;
    s->comm = comm;
    s->group = group;
    s->table = &model.table;
    s->tp = &model.tp;
    s->tp_summed_from = model.table.params.size();
    if (model.pp.embedding && model.pp.embedding->size > 1) s->embedding = model.pp.embedding;
    s->tied_pending = s->embedding != nullptr;
    s->zero = zero;
    s->grads = model.grads;
    const ParamTable& t = model.table;
    size_t bucket_floats = std::max<size_t>(1, (size_t)(bucket_mb * 1024.0 * 1024.0 / sizeof(float)));
    for (size_t end = t.params.size(); end > 0;) {  // whole tensors, from the back, until the bucket is full
        size_t first = end, numel = 0;
        while (first > 0 && (numel == 0 || numel + t.params[first - 1].numel <= bucket_floats))
            numel += t.params[--first].numel;
        Bucket b;
        b.first_param = first;
        b.end_param = end;
        b.offset = t.params[first].offset;
        b.numel = numel;
        s->buckets.push_back(b);
        end = first;
    }
    if (!zero) return s;
    int n = group->size;
    size_t staging_total = 0;
    std::vector<AdamwPiece> pieces;
    for (Bucket& b : s->buckets) {
        b.chunk = (b.numel + n - 1) / n;
        b.shard_offset = s->shard_total;
        b.staging_offset = staging_total;
        s->shard_total += b.chunk;
        staging_total += (size_t)n * b.chunk;
        size_t own_begin, own_n;
        owned_range(b, group->rank, &own_begin, &own_n);
        for (size_t i = b.first_param; i < b.end_param; i++) {  // the owned share, cut at tensor borders
            const ParamInfo& p = t.params[i];
            size_t lo = std::max(p.offset, own_begin), hi = std::min(p.offset + p.numel, own_begin + own_n);
            if (lo >= hi) continue;
            size_t state = b.shard_offset + (lo - own_begin);
            pieces.push_back({i, lo, hi - lo, state, 0, nullptr, p.decay()});
        }
    }
    s->staging = ops::alloc_floats(staging_total);
    s->shard_grad = ops::alloc_floats(s->shard_total);
    s->shard_param = ops::alloc_floats(s->shard_total);
    for (AdamwPiece& piece : pieces) piece.grad = s->shard_grad + piece.state_offset;
    set_pieces(&model, std::move(pieces));
    // the Adam state shrinks to this rank's share
    ops::free_buffer(model.adam_m);
    ops::free_buffer(model.adam_v);
    model.adam_m = ops::alloc_floats(s->shard_total);
    model.adam_v = ops::alloc_floats(s->shard_total);
    return s;
}

static void launch_bucket(GradSync* s, Bucket& b) {
    if (!s->zero) {
        b.request = comm_all_reduce_start(*s->comm, *s->group, s->grads + b.offset, b.numel, Reduce::sum, "dp grad all-reduce");
        return;
    }
    float* send = s->staging + b.staging_offset;  // (n·chunk); the padding past numel stays zero
    ops::copy_on_device(send, s->grads + b.offset, b.numel * sizeof(float));
    b.request = comm_reduce_scatter_start(*s->comm, *s->group, send, s->shard_grad + b.shard_offset, b.chunk,
                                          "dp grad reduce-scatter");
}

// Called by the backward: every tensor from first_final_param on has its final gradient.
static void grad_sync_ready(GradSync* s, size_t first_final_param) {
    if (!s) return;
    if (s->tied_pending) first_final_param = std::max<size_t>(first_final_param, 1);  // tensor 0: the embedding
    if (s->tp->sp && s->tp->size > 1) {
        for (size_t i = first_final_param; i < s->tp_summed_from; i++) {
            const ParamInfo& p = s->table->params[i];
            if (p.split == Split::replicated)
                comm_all_reduce(*s->comm, *s->tp->group, s->grads + p.offset, p.numel, Reduce::sum,
                                "tp replicated grad all-reduce");
        }
        s->tp_summed_from = std::min(s->tp_summed_from, first_final_param);
    }
    while (s->next < s->buckets.size() && s->buckets[s->next].first_param >= first_final_param) {
        launch_bucket(s, s->buckets[s->next++]);
        if (first_final_param > 0) s->launched_during_backward++;
    }
    for (size_t i = 0; i < s->next; i++) comm_test(*s->comm, s->buckets[i].request);
}

// After the last backward (every stage's: the embedding's two gradients are complete only then):
// the tied embedding's copies summed, every bucket launched and complete.
static void grad_sync_finish(GradSync* s) {
    if (s->tied_pending) {
        const ParamInfo& emb = s->table->params[0];
        comm_all_reduce(*s->comm, *s->embedding, s->grads + emb.offset, emb.numel, Reduce::sum, "pp embedding grad all-reduce");
        s->tied_pending = false;
        grad_sync_ready(s, 0);
        s->tied_pending = true;
    }
    grad_sync_ready(s, 0);
    for (Bucket& b : s->buckets) comm_wait(*s->comm, b.request);
    s->next = 0;
    s->tp_summed_from = s->table->params.size();
}

// ZeRO-1: every rank's share of each bucket (shares: Σ chunk, laid out like the Adam state) to every
// rank, into the flat buffer dest. All buckets are launched before the first wait.
static void gather_buckets(GradSync* s, const float* shares, float* dest, const char* what) {
    for (Bucket& b : s->buckets)
        b.request = comm_all_gather_start(*s->comm, *s->group, shares + b.shard_offset, s->staging + b.staging_offset,
                                          b.chunk, what);
    for (Bucket& b : s->buckets) {
        comm_wait(*s->comm, b.request);
        ops::copy_on_device(dest + b.offset, s->staging + b.staging_offset, b.numel * sizeof(float));
    }
}

// After the update: this rank's share of the new weights, to every rank.
static void gather_params(GradSync* s, float* params) {
    for (Bucket& b : s->buckets) {
        size_t own_begin, own_n;
        owned_range(b, s->group->rank, &own_begin, &own_n);
        ops::copy_on_device(s->shard_param + b.shard_offset, params + own_begin, own_n * sizeof(float));
    }
    gather_buckets(s, s->shard_param, params, "dp param all-gather");
}

// Checkpoints hold full tensors: the sharded state (shard_total) of every rank → full (total).
// The state's padding past each share stays zero (the update never writes it), so it is sent as is.
static std::vector<float> gather_state(GradSync* s, const float* state, size_t total) {
    float* full = ops::alloc_floats(total);
    gather_buckets(s, state, full, "checkpoint state all-gather");
    std::vector<float> host = device_to_vector(full, total);
    ops::free_buffer(full);
    return host;
}
// …and back: each rank keeps its share of full tensors read from a checkpoint.
static void scatter_state(GradSync* s, const std::vector<float>& full, float* state) {
    for (Bucket& b : s->buckets) {
        size_t own_begin, own_n;
        owned_range(b, s->group->rank, &own_begin, &own_n);
        ops::copy_to_device(state + b.shard_offset, full.data() + own_begin, own_n * sizeof(float));
    }
}

// ---- optimizer ----
// Warmup-stable-decay learning rate; global-norm clipping; AdamW (or StableAdamW) with fp32 state,
// no weight decay on 1-D tensors. The raw gradient sums are normalised by the step's masked-token
// count inside the update (grad_scale), the one place the loss's mean is taken. Under ZeRO-1 the
// squared norm and StableAdamW's per-tensor sums are added up over the shards ("grad norm
// all-reduce", "stable-adamw rms all-reduce"), under tp over the tp shards ("… tp all-reduce"),
// where a replicated tensor counts once (tp rank 0's copy; every tp rank holds the same).

static float learning_rate(const TrainConfig& c, int step) {  // step counts from 1
    if (c.warmup > 0 && step <= c.warmup) return c.lr * (float)step / (float)c.warmup;
    int decay_steps = (int)(c.decay_frac * c.steps);
    int decay_start = c.steps - decay_steps;
    if (decay_steps > 0 && step > decay_start) {
        float progress = (float)(step - decay_start - 1) / (float)decay_steps;  // in [0, 1)
        return c.lr * (1.0f - sqrtf(progress));
    }
    return c.lr;
}

// Returns the global gradient norm of the normalised gradient (before clipping). Without a sync
// (one rank) the whole model is this rank's to update.
static double optimizer_step(Model& model, const TrainConfig& c, float lr, long masked_tokens, GradSync* sync = nullptr) {
    const std::vector<AdamwPiece>& pieces = model.pieces;
    bool sharded = sync && sync->zero;
    double inv_count = masked_tokens > 0 ? 1.0 / (double)masked_tokens : 0.0;
    TensorParallel& tp = model.tp;
    PipelineParallel& pp = model.pp;
    // a tensor's share of this rank's sums: all of it, but a replicated one only on tp rank 0; the
    // global norm also counts the tied embedding once (the first stage's copy)
    auto counted = [&](const AdamwPiece& p) { return tp.rank == 0 || model.table.params[p.param].split != Split::replicated; };
    auto counted_once = [&](const AdamwPiece& p) { return counted(p) && (model.table.first_stage || model.table.params[p.param].id != 0); };
    double sum_sq = 0.0;
    for (const AdamwPiece& p : pieces)
        if (counted_once(p)) sum_sq += ops::sum_squares(p.grad, p.n);
    if (sharded) comm_all_reduce_host(*sync->comm, *sync->group, &sum_sq, 1, MPI_SUM, "grad norm all-reduce");
    if (tp.size > 1) comm_all_reduce_host(*tp.comm, *tp.group, &sum_sq, 1, MPI_SUM, "grad norm tp all-reduce");
    if (pp.size > 1) comm_all_reduce_host(*pp.comm, *pp.group, &sum_sq, 1, MPI_SUM, "grad norm pp all-reduce");
    double norm = sqrt(sum_sq) * inv_count;
    if (!std::isfinite(norm))  // every rank holds the same norm, so every rank stops here, before any update
        fatal_all_ranks("step %d: the gradient norm is %g: training diverged (a lower --lr, --clip or "
                        "--optimizer stable-adamw may help); no weights were updated", model.adam_step + 1, norm);
    double clip_factor = (c.clip > 0.f && norm > c.clip) ? c.clip / norm : 1.0;
    float grad_scale = (float)(inv_count * clip_factor);
    model.adam_step++;
    std::vector<float> tensor_lr(model.table.params.size(), lr);
    if (c.optimizer == "stable-adamw") {  // RMS over each whole tensor, whichever ranks hold its pieces
        std::vector<double> sums(model.table.params.size(), 0.0);
        for (const AdamwPiece& p : pieces) {
            double rms = ops::stable_adamw_rms(p.grad, model.adam_v + p.state_offset, p.n, c.beta2, c.eps,
                                               model.adam_step, grad_scale);
            if (counted(p)) sums[p.param] += rms * rms * (double)p.n;
        }
        if (sharded)
            comm_all_reduce_host(*sync->comm, *sync->group, sums.data(), (int)sums.size(), MPI_SUM,
                                 "stable-adamw rms all-reduce");
        if (tp.size > 1)
            comm_all_reduce_host(*tp.comm, *tp.group, sums.data(), (int)sums.size(), MPI_SUM, "stable-adamw rms tp all-reduce");
        for (size_t i = 0; i < sums.size(); i++)  // vocabulary padding adds zeros: divide by the real count
            tensor_lr[i] = (float)(lr / std::max(1.0, sqrt(sums[i] / (double)model.table.params[i].full_numel)));
    }
    ops::copy_to_device(model.tensor_lr, tensor_lr.data(), tensor_lr.size() * sizeof(float));
    const size_t total = pieces.empty() ? 0 : pieces.back().start + pieces.back().n;
    ops::adamw_update_pieces(model.params, model.adam_m, model.adam_v, model.device_pieces, (int)pieces.size(), total,
                             model.tensor_lr, c.beta1, c.beta2, c.eps, c.weight_decay, model.adam_step, grad_scale);
    if (sharded) gather_params(sync, model.params);
    weights_changed(model);
    return norm;
}

// ---- HF import/export ----
// transformers' format: config.json (ModernBertConfig) + model.safetensors with its parameter names.
// The tied decoder weight is stored once, as the embedding (decoder.weight is accepted on import).

static bool dir_exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
static void make_dirs(const std::string& path) {
    std::string cur;
    for (size_t i = 0; i <= path.size(); i++) {
        if (i == path.size() || path[i] == '/') {
            if (!cur.empty() && !dir_exists(cur) && mkdir(cur.c_str(), 0755) != 0 && !dir_exists(cur))
                fatal("cannot create directory %s: %s", cur.c_str(), strerror(errno));
        }
        if (i < path.size()) cur += path[i];
    }
}

static double json_number(const Json& cfg, const std::string& path, const char* key, double fallback, bool required) {
    const Json* v = cfg.get(key);
    if (!v || v->kind == Json::Null) {
        if (required) fatal("%s: missing \"%s\"", path.c_str(), key);
        return fallback;
    }
    if (v->kind != Json::Number) fatal("%s: \"%s\" must be a number", path.c_str(), key);
    return v->num;
}
static int json_int(const Json& cfg, const std::string& path, const char* key, int fallback, bool required, int lo,
                    int hi) {
    double x = json_number(cfg, path, key, fallback, required);
    if (x != floor(x) || x < lo || x > hi)
        fatal("%s: \"%s\" must be an integer in [%d, %d], got %g", path.c_str(), key, lo, hi, x);
    return (int)x;
}
static void json_expect(const Json& cfg, const std::string& path, const char* key, bool want) {
    const Json* v = cfg.get(key);
    if (v && v->kind == Json::Bool && v->b != want)
        fatal("%s: \"%s\": %s is not supported (ModernBERT uses %s)", path.c_str(), key, v->b ? "true" : "false",
              want ? "true" : "false");
}
static void json_expect_string(const Json& cfg, const std::string& path, const char* key, const char* want) {
    const Json* v = cfg.get(key);
    if (v && v->kind == Json::String && v->str != want)
        fatal("%s: \"%s\": \"%s\" is not supported (only \"%s\")", path.c_str(), key, v->str.c_str(), want);
}

// A number that must be finite and inside (lo, hi] (exclusive_lo) or [lo, hi].
static double json_bounded(const Json& cfg, const std::string& path, const char* key, double fallback, double lo,
                           double hi, bool exclusive_lo) {
    double x = json_number(cfg, path, key, fallback, false);
    if (!std::isfinite(x) || (exclusive_lo ? x <= lo : x < lo) || x > hi)
        fatal("%s: \"%s\" must be a number in %s%g, %g], got %g", path.c_str(), key, exclusive_lo ? "(" : "[", lo, hi, x);
    return x;
}

static ModelConfig read_hf_config(const std::string& dir) {
    std::string path = dir + "/config.json", text, err;
    Json cfg;
    if (!read_text_file(path, &text, &err)) fatal("%s", err.c_str());
    if (!json_parse(text, &cfg, &err)) fatal("%s: %s", path.c_str(), err.c_str());
    if (cfg.kind != Json::Object) fatal("%s: not a JSON object", path.c_str());
    ModelConfig m;
    m.V = json_int(cfg, path, "vocab_size", 0, true, 1, 1 << 24);
    m.H = json_int(cfg, path, "hidden_size", 0, true, 1, 1 << 16);
    m.I = json_int(cfg, path, "intermediate_size", 0, true, 1, 1 << 18);
    m.L = json_int(cfg, path, "num_hidden_layers", 0, true, 1, 1024);
    m.nh = json_int(cfg, path, "num_attention_heads", 0, true, 1, 1024);
    if (m.H % m.nh) fatal("%s: hidden_size %d is not divisible by num_attention_heads %d", path.c_str(), m.H, m.nh);
    m.hd = m.H / m.nh;
    if (m.hd % 2) fatal("%s: head dim %d must be even for RoPE", path.c_str(), m.hd);
    m.global_every = json_int(cfg, path, "global_attn_every_n_layers", 3, false, 1, 1 << 20);
    m.local_attention = json_int(cfg, path, "local_attention", 128, false, 0, 1 << 24);
    m.max_position_embeddings = json_int(cfg, path, "max_position_embeddings", 8192, false, 1, 1 << 30);
    m.theta_global = (float)json_bounded(cfg, path, "global_rope_theta", 160000.0, 0.0, 1e30, true);
    m.theta_local = (float)json_bounded(cfg, path, "local_rope_theta", 10000.0, 0.0, 1e30, true);
    // transformers ≥ 5 writes the thetas per layer type, and the layer kinds as a list
    if (const Json* rope = cfg.get("rope_parameters")) {
        for (const char* kind : {"full_attention", "sliding_attention"})
            if (const Json* params = rope->get(kind)) json_expect_string(*params, path, "rope_type", "default");
        if (const Json* full = rope->get("full_attention"))
            m.theta_global = (float)json_bounded(*full, path, "rope_theta", m.theta_global, 0.0, 1e30, true);
        if (const Json* sliding = rope->get("sliding_attention"))
            m.theta_local = (float)json_bounded(*sliding, path, "rope_theta", m.theta_local, 0.0, 1e30, true);
    }
    // the per-layer pattern: layer_types when given (any mix), else every global_every-th layer
    const Json* types = cfg.get("layer_types");
    if (types && types->kind != Json::Null) {
        if (types->kind != Json::Array || (int)types->arr.size() != m.L)
            fatal("%s: \"layer_types\" must list %d layer kinds (num_hidden_layers)", path.c_str(), m.L);
        for (int l = 0; l < m.L; l++) {
            const Json& kind = types->arr[l];
            bool global = kind.kind == Json::String && kind.str == "full_attention";
            bool local = kind.kind == Json::String && kind.str == "sliding_attention";
            if (!global && !local)
                fatal("%s: \"layer_types\"[%d] must be \"full_attention\" or \"sliding_attention\"", path.c_str(), l);
            m.layer_global.push_back(global);
        }
    } else {
        for (int l = 0; l < m.L; l++) m.layer_global.push_back(l % m.global_every == 0);
    }
    m.norm_eps = (float)json_bounded(cfg, path, "norm_eps", 1e-5, 0.0, 1.0, true);
    m.init_std = (float)json_bounded(cfg, path, "initializer_range", 0.02, 0.0, 1e3, false);
    m.init_cutoff = (float)json_bounded(cfg, path, "initializer_cutoff_factor", 2.0, 0.0, 1e3, true);
    m.special.pad = json_int(cfg, path, "pad_token_id", m.special.pad, false, 0, m.V - 1);
    m.special.cls = json_int(cfg, path, "cls_token_id", m.special.cls, false, 0, m.V - 1);
    m.special.sep = json_int(cfg, path, "sep_token_id", m.special.sep, false, 0, m.V - 1);
    m.special.mask = json_int(cfg, path, "mask_token_id", m.special.mask, false, 0, m.V - 1);
    m.bos = json_int(cfg, path, "bos_token_id", m.special.cls, false, 0, m.V - 1);
    m.eos = json_int(cfg, path, "eos_token_id", m.special.sep, false, 0, m.V - 1);
    // ModernBertConfig has no unk id; ours is written beside the others so that a model whose
    // vocabulary is not ModernBERT's (mini) keeps its unknown-word token through an export
    if (m.special.unk >= m.V) m.special.unk = m.special.pad;
    m.special.unk = json_int(cfg, path, "unk_token_id", m.special.unk, false, 0, m.V - 1);
    const int ids[4] = {m.special.cls, m.special.sep, m.special.pad, m.special.mask};
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            if (ids[i] == ids[j])
                fatal("%s: cls, sep, pad and mask token ids must differ (they are %d, %d, %d, %d)", path.c_str(),
                      ids[0], ids[1], ids[2], ids[3]);
    // the parts of ModernBertConfig this trainer does not implement are refused, not ignored
    json_expect(cfg, path, "norm_bias", false);
    json_expect(cfg, path, "attention_bias", false);
    json_expect(cfg, path, "mlp_bias", false);
    json_expect(cfg, path, "classifier_bias", false);
    json_expect(cfg, path, "decoder_bias", true);
    json_expect(cfg, path, "tie_word_embeddings", true);
    json_expect_string(cfg, path, "hidden_activation", "gelu");
    json_expect_string(cfg, path, "classifier_activation", "gelu");
    return m;
}

// The shortest decimal that reads back as the same fp32 value (1e-05, not 9.99999975e-06), with a
// decimal point: transformers validates float fields strictly and refuses 2 where 2.0 is expected.
static std::string json_float(float x) {
    char b[64];
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(b, sizeof b, "%.*g", digits, x);
        if (strtof(b, nullptr) == x) break;
    }
    std::string s = b;
    if (s.find_first_of(".en") == std::string::npos) s += ".0";
    return s;
}

static void write_hf_config(const std::string& path, const ModelConfig& m) {
    std::string layer_types;
    for (int l = 0; l < m.L; l++)
        layer_types += std::string(l ? ", " : "") + (m.is_global(l) ? "\"full_attention\"" : "\"sliding_attention\"");
    char head[4096];
    snprintf(head, sizeof head,
             "{\n"
             "  \"architectures\": [\"ModernBertForMaskedLM\"],\n"
             "  \"model_type\": \"modernbert\",\n"
             "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n  \"intermediate_size\": %d,\n"
             "  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n"
             "  \"global_attn_every_n_layers\": %d,\n  \"local_attention\": %d,\n"
             "  \"global_rope_theta\": %s,\n  \"local_rope_theta\": %s,\n  \"norm_eps\": %s,\n"
             "  \"initializer_range\": %s,\n  \"initializer_cutoff_factor\": %s,\n"
             "  \"pad_token_id\": %d,\n  \"cls_token_id\": %d,\n  \"sep_token_id\": %d,\n"
             "  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n  \"mask_token_id\": %d,\n  \"unk_token_id\": %d,\n"
             "  \"hidden_activation\": \"gelu\",\n  \"classifier_activation\": \"gelu\",\n"
             "  \"norm_bias\": false,\n  \"attention_bias\": false,\n  \"mlp_bias\": false,\n"
             "  \"classifier_bias\": false,\n  \"decoder_bias\": true,\n  \"tie_word_embeddings\": true,\n"
             "  \"attention_dropout\": 0.0,\n  \"embedding_dropout\": 0.0,\n  \"mlp_dropout\": 0.0,\n"
             "  \"classifier_dropout\": 0.0,\n  \"max_position_embeddings\": %d,\n"
             "  \"torch_dtype\": \"float32\",\n",
             m.V, m.H, m.I, m.L, m.nh, m.global_every, m.local_attention, json_float(m.theta_global).c_str(),
             json_float(m.theta_local).c_str(), json_float(m.norm_eps).c_str(), json_float(m.init_std).c_str(),
             json_float(m.init_cutoff).c_str(), m.special.pad, m.special.cls, m.special.sep, m.bos, m.eos,
             m.special.mask, m.special.unk, m.max_position_embeddings);
    std::string text = std::string(head) + "  \"layer_types\": [" + layer_types + "]\n}\n";
    std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) fatal("cannot write %s: %s", tmp.c_str(), strerror(errno));
    bool ok = fputs(text.c_str(), f) >= 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp.c_str(), path.c_str()) != 0) fatal("cannot write %s", path.c_str());
}

// Flat host vector of full tensors (full_total) ← tensors named as in the table. Every parameter must be present with its shape
// and finite values, and every tensor under prefix must be one the config uses: a file whose
// weights disagree with its config (a sixth layer where the config says five) is refused, not
// partly loaded. The tied decoder weight may appear as decoder.weight, alone or equal to the
// embedding.
static std::vector<float> params_from_tensors(const ParamTable& t, const TensorMap& tensors, const std::string& path,
                                             const std::string& prefix) {
    const std::string tied = "model.embeddings.tok_embeddings.weight";
    for (const auto& [name, x] : tensors) {
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        std::string bare = name.substr(prefix.size());
        if (t.find(bare)) continue;
        if (prefix.empty() && bare == "decoder.weight") {
            auto emb = tensors.find(tied);
            if (emb == tensors.end() || emb->second.f == x.f) continue;
            fatal("%s: decoder.weight differs from %s, but ModernBERT ties them", path.c_str(), tied.c_str());
        }
        fatal("%s: tensor %s is not part of the model its config.json describes (num_hidden_layers %d): the "
              "weights and the config disagree", path.c_str(), name.c_str(), (int)t.layer_first.size());
    }
    std::vector<const Tensor*> found;
    for (const ParamInfo& p : t.params) {
        auto it = tensors.find(prefix + p.name);
        if (it == tensors.end() && prefix.empty() && p.name == tied)
            it = tensors.find("decoder.weight");  // tied: either name carries it
        if (it == tensors.end()) fatal("%s: missing tensor %s%s", path.c_str(), prefix.c_str(), p.name.c_str());
        const Tensor& x = it->second;
        std::vector<int64_t> want(p.shape.begin(), p.shape.end());
        if (x.shape != want) {
            std::string got, expected;
            for (int64_t d : x.shape) got += std::to_string(d) + " ";
            for (int d : p.shape) expected += std::to_string(d) + " ";
            fatal("%s: tensor %s%s has shape [ %s] but the config needs [ %s]", path.c_str(), prefix.c_str(),
                  p.name.c_str(), got.c_str(), expected.c_str());
        }
        if (x.f.size() != p.full_numel) fatal("%s: tensor %s%s is not a float tensor", path.c_str(), prefix.c_str(), p.name.c_str());
        for (size_t i = 0; i < x.f.size(); i++)
            if (!std::isfinite(x.f[i]))
                fatal("%s: tensor %s%s holds a non-finite value (%g at element %zu)", path.c_str(), prefix.c_str(),
                      p.name.c_str(), x.f[i], i);
        found.push_back(&x);
    }
    std::vector<float> flat(t.full_total);
    for (size_t i = 0; i < t.params.size(); i++)
        std::copy(found[i]->f.begin(), found[i]->f.end(), flat.begin() + t.params[i].full_offset);
    return flat;
}

static TensorMap tensors_from_flat(const ParamTable& t, const std::vector<float>& flat, const std::string& prefix) {
    TensorMap out;
    for (const ParamInfo& p : t.params) {
        Tensor x;
        x.dtype = "F32";
        x.shape.assign(p.shape.begin(), p.shape.end());
        x.f.assign(flat.begin() + p.full_offset, flat.begin() + p.full_offset + p.full_numel);
        out[prefix + p.name] = std::move(x);
    }
    return out;
}

static std::vector<float> load_hf_weights(const std::string& dir, const ParamTable& t) {
    std::string path = dir + "/model.safetensors", err;
    TensorMap tensors;
    if (!safetensors_read(path, &tensors, nullptr, &err)) fatal("%s", err.c_str());
    return params_from_tensors(t, tensors, path, "");
}

// full_params: the full tensors (full_total), as gather_full assembles them.
static void export_hf(const std::string& dir, const Model& model, const std::vector<float>& full_params) {
    make_dirs(dir);
    std::string err;
    TensorMap tensors = tensors_from_flat(make_param_table(model.cfg), full_params, "");
    if (!safetensors_write(dir + "/model.safetensors", tensors, {{"format", "pt"}}, &err)) fatal("%s", err.c_str());
    write_hf_config(dir + "/config.json", model.cfg);
}

// ---- checkpoints ----
// DIR/step_N/ holds the model in HF format, the Adam moments and the step; DIR/latest names the
// newest. Each is written under a temporary name and renamed, so a crash never damages the last one.
// optimizer.safetensors also records a checksum of the weights it was saved with, so a model that
// was replaced afterwards (an --export into the checkpoint, a hand copy) is refused on resume
// instead of being trained on with another model's optimizer state.

// FNV-1a over the weights' bits: equal weights, equal checksum, on every build.
static std::string weights_checksum(const std::vector<float>& w) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (float x : w) {
        uint32_t bits;
        memcpy(&bits, &x, sizeof bits);
        for (int b = 0; b < 4; b++) h = (h ^ ((bits >> (8 * b)) & 0xff)) * 0x100000001b3ull;
    }
    char buf[17];
    snprintf(buf, sizeof buf, "%016" PRIx64, h);
    return buf;
}

// Full tensors whatever the layout: under ZeRO-1 the Adam state is first gathered over dp, then
// every tp group assembles full tensors from its shards, then world rank 0 alone writes, so a
// checkpoint resumes under any dp and tp. Every rank takes part. Weights that are not finite are
// never saved: the run stops instead, and latest keeps naming the last good one.
static void save_checkpoint(const std::string& dir, const Model& model, int step, GradSync* sync, int world_rank) {
    size_t n = model.table.total;
    bool sharded = sync && sync->zero;
    // Every rank checks its weights and its share of the state (a sum of squares is finite iff every
    // value is), and the verdict is shared, so that all ranks stop together.
    size_t state_n = sharded ? sync->shard_total : n;
    double non_finite = !(std::isfinite(ops::sum_squares(model.params, n)) &&
                          std::isfinite(ops::sum_squares(model.adam_m, state_n)) &&
                          std::isfinite(ops::sum_squares(model.adam_v, state_n)));
    if (sync) comm_all_reduce_host(*sync->comm, *sync->group, &non_finite, 1, MPI_MAX, "checkpoint finite-check all-reduce");
    if (model.tp.size > 1)
        comm_all_reduce_host(*model.tp.comm, *model.tp.group, &non_finite, 1, MPI_MAX, "checkpoint finite-check tp all-reduce");
    if (model.pp.size > 1)
        comm_all_reduce_host(*model.pp.comm, *model.pp.group, &non_finite, 1, MPI_MAX, "checkpoint finite-check pp all-reduce");
    if (non_finite)
        fatal_all_ranks("step %d: training diverged: the weights or the optimizer state hold a non-finite value; not "
                        "saving (latest still names the last good checkpoint)", step);
    std::vector<float> m = sharded ? gather_state(sync, model.adam_m, n) : device_to_vector(model.adam_m, n);
    std::vector<float> v = sharded ? gather_state(sync, model.adam_v, n) : device_to_vector(model.adam_v, n);
    std::vector<float> params = gather_full(model, device_to_vector(model.params, n), "checkpoint tp gather");
    m = gather_full(model, m, "checkpoint tp gather");
    v = gather_full(model, v, "checkpoint tp gather");
    if (world_rank != 0) return;
    char name[64];
    snprintf(name, sizeof name, "step_%08d", step);
    std::string final_dir = dir + "/" + name, tmp_dir = final_dir + ".tmp";
    if (dir_exists(final_dir)) fatal("checkpoint %s already exists; refusing to overwrite it", final_dir.c_str());
    make_dirs(tmp_dir);
    export_hf(tmp_dir, model, params);
    std::string err;
    const ParamTable whole = make_param_table(model.cfg);
    TensorMap state = tensors_from_flat(whole, m, "adam_m.");
    TensorMap vt = tensors_from_flat(whole, v, "adam_v.");
    state.insert(vt.begin(), vt.end());
    if (!safetensors_write(tmp_dir + "/optimizer.safetensors", state,
                           {{"step", std::to_string(step)}, {"adam_step", std::to_string(model.adam_step)},
                            {"model_checksum", weights_checksum(params)}}, &err))
        fatal("%s", err.c_str());
    if (rename(tmp_dir.c_str(), final_dir.c_str()) != 0) fatal("cannot rename %s: %s", tmp_dir.c_str(), strerror(errno));
    std::string latest = dir + "/latest", latest_tmp = latest + ".tmp";
    FILE* f = fopen(latest_tmp.c_str(), "wb");
    if (!f || fprintf(f, "%s\n", name) < 0 || fclose(f) != 0 || rename(latest_tmp.c_str(), latest.c_str()) != 0)
        fatal("cannot write %s", latest.c_str());
}

// A decimal count in [0, hi]: digits only, no sign, no overflow.
static bool parse_count(const std::string& text, long hi, long* out) {
    if (text.empty() || text.size() > 18 || text.find_first_not_of("0123456789") != std::string::npos) return false;
    *out = std::stol(text);
    return *out <= hi;
}

// The directory DIR/latest names, checked: latest is a small file holding one name step_N (no
// path), and that directory exists. Its N is returned through *step.
static std::string latest_checkpoint(const std::string& dir, long* step) {
    std::string text, err;
    if (!dir_exists(dir)) fatal("--resume %s: no such directory", dir.c_str());
    if (!read_text_file(dir + "/latest", &text, &err)) fatal("--resume: %s", err.c_str());
    while (!text.empty() && isspace((unsigned char)text.back())) text.pop_back();
    if (text.compare(0, 5, "step_") != 0 || !parse_count(text.substr(5), 1 << 30, step))
        fatal("--resume: %s/latest must hold a checkpoint name step_N, got '%.60s'", dir.c_str(), text.c_str());
    std::string ckpt = dir + "/" + text;
    if (!dir_exists(ckpt)) fatal("--resume: %s/latest names %s, which is not a directory", dir.c_str(), ckpt.c_str());
    return ckpt;
}

// Every rank reads the full tensors and keeps its shards. Returns the step the checkpoint was
// taken after; everything read is checked before any of it is used.
static int load_checkpoint(const std::string& dir, Model* model, GradSync* sync) {
    long named_step = 0;
    std::string ckpt = latest_checkpoint(dir, &named_step), err;
    const ParamTable whole = make_param_table(model->cfg);  // the files hold every tensor, whole
    std::vector<float> params = load_hf_weights(ckpt, whole);
    TensorMap state;
    std::map<std::string, std::string> meta;
    std::string path = ckpt + "/optimizer.safetensors";
    if (!safetensors_read(path, &state, &meta, &err)) fatal("%s", err.c_str());
    long step = 0, adam_step = 0;
    if (!meta.count("step") || !parse_count(meta["step"], 1 << 30, &step))
        fatal("%s: metadata \"step\" must be a count in [0, 2^30], got '%.40s'", path.c_str(), meta["step"].c_str());
    if (!meta.count("adam_step") || !parse_count(meta["adam_step"], step, &adam_step))
        fatal("%s: metadata \"adam_step\" must be a count in [0, step %ld], got '%.40s'", path.c_str(), step,
              meta["adam_step"].c_str());
    if (step != named_step) fatal("%s: metadata says step %ld but the directory is named for step %ld", path.c_str(), step, named_step);
    if (!meta.count("model_checksum"))  // written before checksums existed: nothing to verify against
        fprintf(stderr, "picotron: warning: %s has no model_checksum; cannot verify that model.safetensors belongs "
                        "to it\n", path.c_str());
    else if (meta["model_checksum"] != weights_checksum(params))
        fatal("%s: model.safetensors is not the model this optimizer state was saved with (checksum mismatch): "
              "was the checkpoint's model replaced, e.g. by --export?", path.c_str());
    std::vector<float> m = params_from_tensors(whole, state, path, "adam_m.");
    std::vector<float> v = params_from_tensors(whole, state, path, "adam_v.");
    for (size_t i = 0; i < v.size(); i++)
        if (v[i] < 0.f) fatal("%s: adam_v holds a negative second moment (%g at element %zu)", path.c_str(), v[i], i);
    params = shards_of(model->table, params);
    m = shards_of(model->table, m);
    v = shards_of(model->table, v);
    size_t n = model->table.total;
    ops::copy_to_device(model->params, params.data(), n * sizeof(float));
    weights_changed(*model);
    if (sync && sync->zero) {
        scatter_state(sync, m, model->adam_m);
        scatter_state(sync, v, model->adam_v);
    } else {
        ops::copy_to_device(model->adam_m, m.data(), n * sizeof(float));
        ops::copy_to_device(model->adam_v, v.data(), n * sizeof(float));
    }
    model->adam_step = (int)adam_step;
    return (int)step;
}

// ---- dump ----
// --dump DIR: step 1's whole global batch (every micro-batch of every data-parallel rank, in sample
// order), the step's loss and every normalised gradient, for inspection from Python
// (safetensors.torch.load_file; scripts/check_hf_export.py checks it against transformers):
//   input_ids, labels, positions  (n_micro, T)
//   cu_seqlens                    (n_micro, D + 1), D the most documents of any micro-batch;
//                                 shorter rows repeat their last boundary (empty documents)
//   loss (1), masked_tokens (1), grad.<parameter name> (the parameter's shape)
// Every layout writes the same file, up to the summation order of the gradients.

static void write_dump(const std::string& dir, const ParamTable& table, const std::vector<MicroBatch>& batches,
                       double loss, long masked_tokens, std::vector<float> grads) {
    int n = (int)batches.size(), T = batches[0].T, max_docs = 0;
    for (const MicroBatch& mb : batches) max_docs = std::max(max_docs, mb.n_docs);
    TensorMap out;
    auto ints = [&](const std::string& name, std::vector<int64_t> shape, auto row_of) {
        Tensor x;
        x.dtype = "I32";
        x.shape = shape;
        for (const MicroBatch& mb : batches) {
            std::vector<int> row = row_of(mb);
            row.resize((size_t)shape[1], row.empty() ? 0 : row.back());
            x.i.insert(x.i.end(), row.begin(), row.end());
        }
        out[name] = std::move(x);
    };
    ints("input_ids", {n, T}, [](const MicroBatch& mb) { return mb.ids; });
    ints("labels", {n, T}, [](const MicroBatch& mb) { return mb.labels; });
    ints("positions", {n, T}, [](const MicroBatch& mb) { return mb.positions; });
    ints("cu_seqlens", {n, max_docs + 1}, [](const MicroBatch& mb) { return mb.cu_seqlens; });
    out["loss"] = tensor_f32({1}, {(float)loss});
    out["masked_tokens"] = tensor_i32({1}, {(int32_t)masked_tokens});
    for (float& x : grads) x = (float)(x / (double)masked_tokens);
    TensorMap g = tensors_from_flat(table, grads, "grad.");
    out.insert(g.begin(), g.end());
    std::string err;
    if (!safetensors_write(dir + "/dump.safetensors", out, {}, &err)) fatal("%s", err.c_str());
}

// ---- predictions ----
// --predict: run the forward on one sentence and show the top guesses for each [MASK]. Under tp
// the last stage's tp rank 0 assembles the rows' logits from every rank's vocabulary shard
// ("predict tp gather") and prints them.

static void predict(Model& model, Pipeline& pipe, const WordTokenizer& tok, const std::string& text) {
    const ModelConfig& m = model.cfg;
    std::vector<int> ids = {m.special.cls};
    for (int id : tok.encode(text)) ids.push_back(id);
    ids.push_back(m.special.sep);
    if ((int)ids.size() > pipe.T) fatal("--predict: sentence of %zu tokens is longer than %d", ids.size(), pipe.T);
    BatchView b;
    b.T = b.T_whole = (int)ids.size();
    b.n_docs = 1;
    b.ids = ids;
    for (int t = 0; t < b.T; t++) b.positions.push_back(t);
    b.cu_seqlens = {0, b.T};
    for (int t = 0; t < b.T; t++)
        if (ids[t] == m.special.mask) {
            b.masked_rows.push_back(t);
            b.targets.push_back(m.special.mask);
        }
    b.n_masked = (int)b.masked_rows.size();
    if (b.n_masked == 0) fatal("--predict: \"%s\" has no [MASK]", text.c_str());
    run_pipeline(model, pipe, {b}, "forward", nullptr, nullptr);  // the stages in turn; the last has the head's rows
    const ParamTable& t = model.table;
    if (!t.last_stage) return;
    Activations& a = pipe.pool[0];
    std::vector<float> shard((size_t)b.n_masked * t.V), shards((size_t)t.tp_size * shard.size());  // (n_masked, V/tp)
    std::vector<ops::act> tile((size_t)HEAD_TILE_ROWS * t.V);
    for (int r0 = 0; r0 < b.n_masked; r0 += HEAD_TILE_ROWS) {  // the forward kept only its last tile's logits
        const int n = std::min(HEAD_TILE_ROWS, b.n_masked - r0);
        decoder_tile(model, a, r0, n, nullptr);
        ops::copy_to_host(tile.data(), a.logits, (size_t)n * t.V * sizeof(ops::act));
        std::transform(tile.begin(), tile.begin() + (size_t)n * t.V, shard.begin() + (size_t)r0 * t.V, widen);
    }
    if (model.tp.size > 1) comm_gather_host(*model.tp.comm, *model.tp.group, shard.data(), shard.size(), shards.data(), "predict tp gather");
    else shards = shard;
    if (model.tp.rank != 0) return;
    std::vector<float> logits((size_t)b.n_masked * m.V);  // (n_masked, V): tp rank r's shard holds ids [r·t.V, (r+1)·t.V)
    for (int r = 0; r < t.tp_size; r++)
        for (int row = 0; row < b.n_masked; row++)
            for (int j = 0; j < t.V && r * t.V + j < m.V; j++)
                logits[(size_t)row * m.V + r * t.V + j] = shards[((size_t)r * b.n_masked + row) * t.V + j];
    printf("%s\n", text.c_str());
    for (int r = 0; r < b.n_masked; r++) {
        const float* row = logits.data() + (size_t)r * m.V;
        std::vector<int> order;  // candidate words: special tokens are never an answer
        for (int v = 0; v < m.V; v++)
            if (!m.special.is_special(v)) order.push_back(v);
        std::partial_sort(order.begin(), order.begin() + 5, order.end(), [&](int x, int y) { return row[x] > row[y]; });
        double mx = row[order[0]], z = 0.0;
        for (int v = 0; v < m.V; v++) z += exp(row[v] - mx);
        printf("  [MASK] #%d:", r + 1);
        for (int k = 0; k < 5; k++)
            printf("  %s (%.1f%%)", tok.decode_piece(order[k]).c_str(), 100.0 * exp(row[order[k]] - mx) / z);
        printf("\n");
    }
}

// ---- run set-up: which model, does it fit, can the outputs be written ----
// Everything a run reads or will write is checked here, before step 1, so that a bad path or a
// contradiction costs one line and a few seconds, never a finished training run. A resumed run
// takes its architecture from the checkpoint; flags that contradict it are refused.

// Empty when a and b are the same architecture, else the first difference.
static std::string architecture_difference(const ModelConfig& a, const ModelConfig& b) {
    char buf[160];
    auto differs = [&](const char* what, double x, double y) {
        if (x == y) return false;
        snprintf(buf, sizeof buf, "%s %g vs %g", what, x, y);
        return true;
    };
    if (differs("vocab_size", a.V, b.V) || differs("hidden_size", a.H, b.H) || differs("intermediate_size", a.I, b.I) ||
        differs("num_hidden_layers", a.L, b.L) || differs("num_attention_heads", a.nh, b.nh) ||
        differs("local_attention", a.local_attention, b.local_attention) ||
        differs("global_rope_theta", a.theta_global, b.theta_global) ||
        differs("local_rope_theta", a.theta_local, b.theta_local) || differs("norm_eps", a.norm_eps, b.norm_eps) ||
        differs("cls_token_id", a.special.cls, b.special.cls) || differs("sep_token_id", a.special.sep, b.special.sep) ||
        differs("pad_token_id", a.special.pad, b.special.pad) || differs("mask_token_id", a.special.mask, b.special.mask))
        return buf;
    if (a.layer_global != b.layer_global) return "layer_types differ";
    return "";
}

static ModelConfig resolve_model_config(const TrainConfig& c) {
    ModelConfig preset;
    model_preset(c.model, &preset);
    if (c.resume_dir.empty()) return c.init_from.empty() ? preset : read_hf_config(c.init_from);
    long step;
    std::string ckpt = latest_checkpoint(c.resume_dir, &step);
    ModelConfig m = read_hf_config(ckpt);
    std::string diff;
    if (!c.init_from.empty() && !(diff = architecture_difference(m, read_hf_config(c.init_from))).empty())
        fatal("--resume %s holds another architecture than --init-from %s (%s)", ckpt.c_str(), c.init_from.c_str(), diff.c_str());
    if (c.model_given && !(diff = architecture_difference(m, preset)).empty())
        fatal("--resume %s holds another architecture than --model %s (%s)", ckpt.c_str(), c.model.c_str(), diff.c_str());
    return m;
}

// Refuses a model whose weights, optimizer state and activations would not fit in this machine's
// memory (the GPU's on the GPU build), before anything is allocated.
// Under tp: this rank's shards, and its share of the activations.
static void check_memory(const ModelConfig& m, int tokens, int tp) {
    double P = make_param_table(m, tp).total, T = tokens, I = m.I / tp, V = (m.V + tp - 1) / tp;
    double per_layer = T * m.H * 7 + T * I * 3 + T * (2.0 + m.nh);
    double activations = m.L * per_layer + T * m.H * 16 + std::min(T, (double)HEAD_TILE_ROWS) * V + T * I * 3 + T * 12;
    // fp32 weights, gradients, Adam moments and (an upper bound: some are bf16 on the GPU) activations,
    // plus the GEMMs' copy of the weights where act is not fp32
    double need = 4.0 * (4.0 * P + activations) + (std::is_same_v<ops::act, float> ? 0.0 : sizeof(ops::act) * P);
#ifdef __CUDACC__
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    double have = (double)total_bytes;
    const char* where = "this GPU";
#else
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGE_SIZE);
    const char* where = "this machine";
#endif
    if (need > have)
        fatal("the model (%.3g parameters) with %d tokens a micro-batch needs about %.1f GiB, but %s has %.1f GiB",
              P, tokens, need / 1073741824.0, where, have / 1073741824.0);
}

// An output directory: created now (with its parents) and shown to be writable.
static void check_output_dir(const char* flag, const std::string& dir) {
    struct stat st;
    if (stat(dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
        fatal("%s %s: exists and is not a directory", flag, dir.c_str());
    make_dirs(dir);
    std::string probe = dir + "/.picotron_write_test";
    FILE* f = fopen(probe.c_str(), "wb");
    if (!f || fclose(f) != 0 || remove(probe.c_str()) != 0)
        fatal("%s %s: cannot write there: %s", flag, dir.c_str(), strerror(errno));
}

static bool same_path(const std::string& a, const std::string& b) {
    struct stat x, y;
    return stat(a.c_str(), &x) == 0 && stat(b.c_str(), &y) == 0 && x.st_dev == y.st_dev && x.st_ino == y.st_ino;
}
static bool path_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}
// A checkpoint directory (step_N) or a directory of them (latest, step_N).
static bool holds_checkpoints(const std::string& dir) {
    if (path_exists(dir + "/latest") || path_exists(dir + "/optimizer.safetensors")) return true;
    DIR* d = opendir(dir.c_str());
    if (!d) return false;
    bool found = false;
    while (dirent* e = readdir(d))
        if (strncmp(e->d_name, "step_", 5) == 0) found = true;
    closedir(d);
    return found;
}

// Rank 0 checks every path the run will write before step 1 (the others wait at its broadcast
// of the weights, or die with it).
static void check_outputs(const TrainConfig& c) {
    if (!c.save_dir.empty()) {
        check_output_dir("--save", c.save_dir);
        bool continuing = !c.resume_dir.empty() && same_path(c.save_dir, c.resume_dir);
        if (!continuing && holds_checkpoints(c.save_dir))
            fatal("--save %s already holds another run's checkpoints; continue it with --resume %s, or save into an "
                  "empty directory", c.save_dir.c_str(), c.save_dir.c_str());
    }
    if (!c.export_dir.empty()) {
        if (path_exists(c.export_dir) && holds_checkpoints(c.export_dir))
            fatal("--export %s is a checkpoint directory: exporting there would replace its model and leave its "
                  "optimizer state; export somewhere else", c.export_dir.c_str());
        check_output_dir("--export", c.export_dir);
        if (!c.save_dir.empty() && same_path(c.export_dir, c.save_dir))
            fatal("--export and --save name the same directory %s; give the export its own", c.export_dir.c_str());
    }
    if (!c.trace_dir.empty()) check_output_dir("--trace", c.trace_dir);
    if (!c.dump_dir.empty()) check_output_dir("--dump", c.dump_dir);
    if (!c.log_path.empty()) {
        struct stat st;
        if (stat(c.log_path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
            fatal("--log %s: exists and is not a regular file", c.log_path.c_str());
        FILE* f = fopen(c.log_path.c_str(), "a");
        if (!f || fclose(f) != 0) fatal("--log %s: cannot write: %s", c.log_path.c_str(), strerror(errno));
    }
}

// ---- training loop and logging ----
// Each step: grad_accum micro-batches (forward + backward into the raw gradient sums), then one
// optimizer step normalised by the step's masked-token count. Rank 0 prints a line per step and,
// with --log, appends one JSON object per step.

// Model FLOPs of one step (forward + backward = 3× forward; a GEMM of N×C×OC costs 2·N·C·OC).
static double step_flops(const ModelConfig& m, const std::vector<BatchView>& batches) {
    double flops = 0.0;
    for (const BatchView& b : batches) {
        double T = b.T, M = b.n_masked;
        double per_layer = 2.0 * T * ((double)m.H * 3 * m.H + (double)m.H * m.H + (double)m.H * 2 * m.I + (double)m.I * m.H);
        flops += m.L * per_layer;
        for (int l = 0; l < m.L; l++)  // attention: q·k and p·v over the keys each query sees
            for (int d = 0; d < b.n_docs; d++) {
                double len = b.cu_seqlens[d + 1] - b.cu_seqlens[d];
                double keys = m.is_global(l) ? len * len : std::min(len * len, len * (2.0 * m.window() + 1));
                flops += 2.0 * 2.0 * keys * m.H;
            }
        flops += 2.0 * M * ((double)m.H * m.H + (double)m.H * m.V);
    }
    return 3.0 * flops;
}

// The stages' layer ranges (rank 0, at start).
static void print_stages(const ModelConfig& m, int pp, const std::string& schedule) {
    if (pp == 1) return;
    printf("pipeline: %d stages, %s:", pp, schedule.c_str());
    for (int s = 0; s < pp; s++) {
        int begin, end;
        stage_layers(m.L, pp, s, &begin, &end);
        printf("%s stage %d layers %d-%d%s", s ? "," : "", s, begin, end - 1,
               s == 0 && s == pp - 1 ? "" : s == 0 ? " + embedding" : s == pp - 1 ? " + head and tied embedding" : "");
    }
    printf("\n");
}

// pp > 1, after training: the first and last stages' copies of the tied embedding must be the
// same bits (their gradients are summed every step, their updates alike); a difference is a bug.
static void check_tied_embedding(const Model& model, int world_rank) {
    const PipelineParallel& pp = model.pp;
    if (!pp.embedding || (!model.table.first_stage && !model.table.last_stage)) return;
    const ParamInfo& emb = model.table.params[0];
    std::string hash = weights_checksum(device_to_vector(model.params + emb.offset, emb.numel));
    double h = (double)(strtoull(hash.c_str(), nullptr, 16) & ((1ull << 52) - 1)), both[2] = {h, -h};  // exact in a double
    comm_all_reduce_host(*pp.comm, *pp.embedding, both, 2, MPI_MAX, "pp tied embedding check all-reduce");
    if (both[0] != -both[1]) fatal("the first and last stages' copies of the tied embedding differ after training");
    if (world_rank == 0) printf("tied embedding: the first and last stages' copies are bit-identical\n");
}

// This rank's parameter bytes: the tp-sharded tensors (they fall as 1/tp) and the replicated ones.
static void print_parameter_bytes(const Model& model, const GradSync* sync) {
    double sharded = 0, replicated = 0;
    for (const ParamInfo& p : model.table.params) (p.split == Split::replicated ? replicated : sharded) += 4.0 * p.numel;
    const ModelConfig& m = model.cfg;
    printf("parameters per rank: %.0f bytes sharded over tp %d + %.0f bytes replicated; gradients alike, Adam state "
           "%s%s\n", sharded, model.tp.size, replicated, sync && sync->zero ? "sharded over dp (ZeRO-1)" : "twice that",
           model.tp.sp ? "; sequence parallel" : "");
    if (model.table.V * model.tp.size != m.V)
        printf("vocabulary %d padded to %d for tp %d (padding rows are never trained, saved or exported)\n", m.V,
               model.table.V * model.tp.size, model.tp.size);
}

// One optimizer step: this dp rank's grad_accum micro-batches (forward + backward into the raw
// gradient sums; the last backward launches the gradient sync), the step's loss and token counts
// summed over the replicas, --dump on step 1, then the update.
struct StepStats {
    int step = 0;
    double loss = 0, grad_norm = 0;
    float lr = 0;
    long masked = 0, real_tokens = 0;
    double ms = 0, ms_here = 0;     // the slowest rank's step time, this rank's
    std::vector<BatchView> views;   // this dp rank's micro-batches (their FLOPs)
    std::vector<BatchView> shards;  // what this rank computes of them: its cp shard (the whole without cp)
    double cp_ring_bytes = 0, cp_halo_bytes = 0;  // this rank's context-parallel traffic
    // the ring's critical path in same-document pairs (cp_ring_work) over its ideal (the pairs / cp),
    // in the packer's document order and in the balanced one
    double cp_imbalance_before = 0, cp_imbalance_after = 0;
    std::vector<double> bubble;            // (pp) each stage's idle fraction of its pipeline program
    std::vector<double> activation_bytes;  // (pp) each stage's peak of live activation sets, in bytes
};

static StepStats train_step(Model& model, Pipeline& pipe, Loader& loader, GradSync* sync, Comm& comm,
                            ProcessGrid& grid, const TrainConfig& c, int step, Tracer* trace) {
    StepStats s;
    s.step = step;
    auto t0 = std::chrono::steady_clock::now();
    for (Group* g : grid.groups()) g->bytes_sent = 0;
    if (sync) sync->launched_during_backward = 0;
    ops::zero_floats(model.grads, model.table.total);
    const int n_micro = grid.dp * c.grad_accum;  // micro-batches in one global batch
    ContextParallel& cp = model.cp;
    cp.ring_bytes = cp.halo_bytes = 0;
    double ring_before = 0, ring_after = 0, ring_ideal = 0;
    for (int k = 0; k < c.grad_accum; k++) {  // this dp rank's share of the global batch
        MicroBatch mb = loader.get((uint64_t)(step - 1) * n_micro + (uint64_t)grid.dp_rank * c.grad_accum + k);
        s.views.push_back(batch_view(mb));
        if (cp.size > 1) {  // every cp rank balances alike, then takes its shard
            BatchView balanced = cp_balance(s.views.back(), cp.size);
            ring_before += balanced.cp_ring_work_unbalanced;
            ring_after += balanced.cp_ring_work;
            for (double pairs : balanced.cp_pairs) ring_ideal += pairs / cp.size;
            s.shards.push_back(cp_shard(balanced, cp.size, cp.rank));
        } else {
            s.shards.push_back(s.views.back());
        }
        s.masked += s.shards.back().n_masked;  // summed over dp×cp below
        s.real_tokens += s.shards.back().n_real;
    }
    double loss_sum = run_pipeline(model, pipe, s.shards, c.pp_schedule, sync, trace);
    s.cp_ring_bytes = cp.ring_bytes;
    s.cp_halo_bytes = cp.halo_bytes;
    if (ring_ideal > 0) s.cp_imbalance_before = ring_before / ring_ideal, s.cp_imbalance_after = ring_after / ring_ideal;
    if (sync) grad_sync_finish(sync);
    // each stage's bubble and activation peak, to every stage (rank 0 logs them)
    const int pp = model.pp.size;
    std::vector<double> per_stage(2 * pp, 0.0);
    per_stage[model.pp.rank] = pipe.total_ms > 0 ? 1.0 - pipe.busy_ms / pipe.total_ms : 0.0;
    per_stage[pp + model.pp.rank] = pipe.activation_bytes();
    if (pp > 1) comm_all_reduce_host(comm, *model.pp.group, per_stage.data(), 2 * pp, MPI_SUM, "pp stage stats all-reduce");
    s.bubble.assign(per_stage.begin(), per_stage.begin() + pp);
    s.activation_bytes.assign(per_stage.begin() + pp, per_stage.end());
    // the loss lives on the last stage: every stage gets it, so that every rank has the true loss
    if (model.pp.size > 1) comm_all_reduce_host(comm, *model.pp.group, &loss_sum, 1, MPI_SUM, "pp loss all-reduce");
    Group& grad_group = grid.dp_cp_group;
    double totals[3] = {loss_sum, (double)s.masked, (double)s.real_tokens};
    comm_all_reduce_host(comm, grad_group, totals, 3, MPI_SUM, "loss and token count all-reduce");
    s.loss = totals[1] > 0 ? totals[0] / totals[1] : 0.0;
    s.masked = (long)totals[1];
    s.real_tokens = (long)totals[2];
    if (!std::isfinite(s.loss))  // all-reduced: every rank sees it
        fatal_all_ranks("step %d: the loss is %g: training diverged (a lower --lr, --clip or --optimizer "
                        "stable-adamw may help); no weights were updated", step, s.loss);
    if (step == 1 && !c.dump_dir.empty()) {  // the whole global batch: rank 0 recomputes every rank's share
        bool sharded = sync && sync->zero;   // every rank takes part in the gathers
        std::vector<float> grads = sharded ? gather_state(sync, sync->shard_grad, model.table.total)
                                           : device_to_vector(model.grads, model.table.total);
        grads = gather_full(model, grads, "dump tp gather");
        if (grid.world_rank == 0) {
            std::vector<MicroBatch> batches;
            for (int k = 0; k < n_micro; k++) batches.push_back(loader.get((uint64_t)k));
            write_dump(c.dump_dir, make_param_table(model.cfg), batches, s.loss, s.masked, std::move(grads));
        }
    }
    s.lr = learning_rate(c, step);
    double t_opt = now_us();
    s.grad_norm = optimizer_step(model, c, s.lr, s.masked, sync);
    trace_op(trace, "optimizer", t_opt);
    ops::synchronize();
    s.ms = s.ms_here = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    comm_all_reduce_host(comm, grad_group, &s.ms, 1, MPI_MAX, "step time max");  // the slowest rank sets the pace
    return s;
}

// Rank 0's line per step and, with --log, its JSON object (with every group's bytes this step).
static void report_step(const StepStats& s, const ModelConfig& m, ProcessGrid& grid, const TrainConfig& c,
                        const GradSync* sync, double peak_tflops, double unigram, FILE* log) {
    double tokens_per_s = s.real_tokens / (s.ms / 1e3);
    double flops_per_s = step_flops(m, s.views) * grid.dp / (s.ms / 1e3);  // every dp rank's share is alike in cost
    double mfu = peak_tflops > 0 ? flops_per_s / (peak_tflops * 1e12 * grid.world_size) : 0.0;
    std::string bytes_json;
    double bytes_total = 0;
    for (Group* g : grid.groups()) {
        if (g->size <= 1) continue;
        char b[96];
        snprintf(b, sizeof b, "%s\"%s\": %.0f", bytes_json.empty() ? "" : ", ", g->name, g->bytes_sent);
        bytes_json += b;
        bytes_total += g->bytes_sent;
    }
    char speed[64];  // MFU only against a known peak; else what was measured
    if (peak_tflops > 0) snprintf(speed, sizeof speed, "MFU %.1f%%", 100.0 * mfu);
    else snprintf(speed, sizeof speed, "%.1f GFLOP/s", flops_per_s / 1e9);
    printf("step %5d/%d | loss %.6f (unigram %.3f) | grad norm %.4f | lr %.3e | %.0f tok/s | %s | %.1f ms", s.step,
           c.steps, s.loss, unigram, s.grad_norm, s.lr, tokens_per_s, speed, s.ms);
    if (grid.world_size > 1) printf(" | sent %.2f MB", bytes_total / 1e6);
    if (grid.dp_cp_group.size > 1)
        printf(", %d/%zu buckets during backward", sync->launched_during_backward, sync->buckets.size());
    std::string bubble_json, act_json;
    for (size_t i = 0; i < s.bubble.size(); i++) {
        char b[64];
        snprintf(b, sizeof b, "%s%.4f", i ? ", " : "", s.bubble[i]);
        bubble_json += b;
        snprintf(b, sizeof b, "%s%.0f", i ? ", " : "", s.activation_bytes[i]);
        act_json += b;
    }
    if (grid.pp > 1) printf(" | bubble [%s]", bubble_json.c_str());
    if (grid.cp > 1) printf(" | cp ring work/ideal %.3f (unbalanced %.3f)", s.cp_imbalance_after, s.cp_imbalance_before);
    printf("\n");
    fflush(stdout);
    if (!log) return;
    char mfu_json[32] = "null", device_json[32] = "null";
    if (peak_tflops > 0) snprintf(mfu_json, sizeof mfu_json, "%.6g", mfu);
#ifdef __CUDACC__  // the GPU's memory in use (buffers are allocated before step 1 or once at a first use: its peak)
    size_t free_bytes, total_bytes;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    snprintf(device_json, sizeof device_json, "%zu", total_bytes - free_bytes);
#endif
    fprintf(log,
            "{\"step\": %d, \"loss\": %.17g, \"unigram_loss\": %.9g, \"grad_norm\": %.9g, \"lr\": %.9g, "
            "\"tokens\": %ld, \"masked_tokens\": %ld, \"tokens_per_s\": %.6g, \"flops_per_s\": %.6g, "
            "\"mfu\": %s, \"step_ms\": %.6g, \"bytes_sent\": {%s}, \"buckets\": %zu, "
            "\"buckets_during_backward\": %d, \"pp_bubble\": [%s], \"activation_bytes\": [%s], "
            "\"cp_bytes\": {\"ring\": %.0f, \"halo\": %.0f}, \"cp_imbalance\": [%.6g, %.6g], \"gpu_used_bytes\": %s}\n",
            s.step, s.loss, unigram, s.grad_norm, s.lr, s.real_tokens, s.masked, tokens_per_s, flops_per_s, mfu_json,
            s.ms, bytes_json.c_str(), sync ? sync->buckets.size() : 0, sync ? sync->launched_during_backward : 0,
            bubble_json.c_str(), act_json.c_str(), s.cp_ring_bytes, s.cp_halo_bytes, s.cp_imbalance_before,
            s.cp_imbalance_after, device_json);
    fflush(log);
}

// --trace DIR: this rank's spans as DIR/trace_rank{R}.json; rank 0 also prints its time per op class.
static void write_trace(const Tracer& tracer, const std::string& dir) {
    if (tracer.rank == 0) print_op_classes(tracer);
    make_dirs(dir);
    std::string path = dir + "/trace_rank" + std::to_string(tracer.rank) + ".json";
    FILE* f = fopen(path.c_str(), "wb");
    if (!f || fprintf(f, "{\"otherData\": {\"t0_unix_us\": %.0f}, \"traceEvents\": [\n%s\n]}\n", tracer.t0_unix_us,
                      tracer.events.c_str()) < 0 || fclose(f) != 0)
        fatal("cannot write %s", path.c_str());
}

#ifndef PICOTRON_NO_MAIN  // the tests include this file for its functions and bring their own main
// PICOTRON_FAIL_AT=RANK:STEP makes that rank fail at the start of that step: the fault tests use it
// to check that one rank's error ends every rank.
static void maybe_inject_failure(int world_rank, int step) {
    const char* spec = getenv("PICOTRON_FAIL_AT");
    int rank = -1, at = -1;
    if (spec && sscanf(spec, "%d:%d", &rank, &at) == 2 && rank == world_rank && at == step)
        fatal("injected failure at step %d", step);
}

// OpenBLAS picks its kernels when it is loaded, from the CPU it detects; on a CPU it does not know
// (Sapphire Rapids under a hypervisor, for one) it falls back to Prescott's SSE3 kernels, which run
// sgemm 6× slower than its AVX-512 ones on the same core. Before anything else, a CPU build that got
// Prescott on an AVX-512 (or AVX2) CPU, with OPENBLAS_CORETYPE unset, restarts itself once with
// the kernels named. A value the user set is kept. (The weak symbol: another BLAS has no such call.)
extern "C" char* openblas_get_corename(void) __attribute__((weak));
static void choose_blas_kernels(char** argv) {
#ifndef __CUDACC__
    if (getenv("OPENBLAS_CORETYPE") || !openblas_get_corename || strcmp(openblas_get_corename(), "Prescott") != 0) return;
    const char* core = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : nullptr;
    if (!core) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then the Prescott kernels it is
#else
    (void)argv;
#endif
}

// ---- CPU threads ----
// The CPU build runs each rank's GEMMs and its ops' loops on one pool of OpenMP threads (kernels.cuh
// splits every GEMM over them and calls BLAS single-threaded, so no second pool competes for the
// cores). Its size: --threads, else OMP_NUM_THREADS, else 1 per rank when several ranks share the
// machine (MPI_Comm_split_type finds them), else every core this process may run on. A rank bound
// to fewer cores than threads (mpirun binds each rank to one core by default) gets a warning: its
// threads would take turns on one core.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
static int set_cpu_threads(const TrainConfig& c, int world_rank) {
#ifdef __CUDACC__
    (void)c;
    (void)world_rank;
    return 1;  // the GPU build computes on the device
#else
    cpu_set_t mask;
    int cores = sched_getaffinity(0, sizeof mask, &mask) == 0 ? CPU_COUNT(&mask) : 1;
    MPI_Comm node;
    int ranks_here = 1;
    MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_size(node, &ranks_here));
    MPI_CHECK(MPI_Comm_free(&node));
    int threads = c.threads;
    const char* env = getenv("OMP_NUM_THREADS");
    if (!threads && env && *env) threads = parse_int("OMP_NUM_THREADS", env, 1, 4096);
    if (!threads) threads = ranks_here > 1 ? 1 : cores;
    if (threads > cores)
        fprintf(stderr,
                "picotron: rank %d: warning: %d threads on %d core%s this rank may use; bind the ranks to enough "
                "cores (mpirun --map-by slot:PE=%d) or not at all (mpirun --bind-to none)\n",
                world_rank, threads, cores, cores == 1 ? "" : "s", threads);
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    if (openblas_set_num_threads) openblas_set_num_threads(1);
    return threads;
#endif
}

int main(int argc, char** argv) {
    choose_blas_kernels(argv);
    MPI_CHECK(MPI_Init(&argc, &argv));
    TrainConfig c = parse_args(argc, argv);
    ProcessGrid grid = make_grid(c);
    const int threads = set_cpu_threads(c, grid.world_rank);
    bool one_rank = grid.world_size == 1;

    Model model;
    model.cfg = resolve_model_config(c);
    const ModelConfig& m = model.cfg;
    if (!c.prepare_text.empty()) {  // tokenize a folder of text with the default word tokenizer, for this model
        if (!one_rank) fatal("--prepare-text runs on one rank");
        std::vector<std::string> files;
        std::string err;
        if (!list_text_files(c.prepare_text, &files, &err)) fatal("--prepare-text: %s", err.c_str());
        if (!prepare_text_corpus(files, c.data, (uint32_t)m.V, m.special, first_special_id(m.special), &err))
            fatal("--prepare-text: %s", err.c_str());
        printf("prepared %zu text files into %s (vocabulary of %d ids for this model)\n", files.size(), c.data.c_str(), m.V);
        destroy_grid(grid);
        MPI_Finalize();
        return 0;
    }
    if (m.nh % grid.tp) fatal("--tp %d does not divide the model's %d attention heads", grid.tp, m.nh);
    if (m.I % grid.tp) fatal("--tp %d does not divide the model's intermediate_size %d", grid.tp, m.I);
    if (grid.pp > m.L) fatal("--pp %d is more than the model's %d layers (a stage needs at least one)", grid.pp, m.L);
#ifdef __CUDACC__
    if (m.hd != cuda::FLASH_HD)  // the tensor-core attention kernels are built for one head size
        fatal("the GPU build's attention runs head dim %d only; this model's is %d (hidden_size %d / %d heads)",
              cuda::FLASH_HD, m.hd, m.H, m.nh);
#endif
    check_memory(m, std::max(c.micro_batch_tokens / grid.cp, c.seq_len), grid.tp);

    Tracer tracer;
    Tracer* trace = c.trace_dir.empty() ? nullptr : &tracer;
    tracer.rank = grid.world_rank;
    tracer.t0_us = now_us();
    tracer.t0_unix_us = std::chrono::duration<double, std::micro>(std::chrono::system_clock::now().time_since_epoch()).count();
    Comm comm{&grid, trace, {}};
    model.tp = {&comm, &grid.tp_group, grid.tp, grid.tp_rank, c.sp && c.predict.empty()};
    model.pp = {&comm, &grid.pp_group, grid.embedding_group.size > 1 ? &grid.embedding_group : nullptr, grid.pp, grid.pp_rank};
    model.cp.comm = &comm;
    model.cp.group = &grid.cp_group;
    model.cp.size = grid.cp;
    model.cp.rank = grid.cp_rank;
    model.cp.window = m.window();
    // this rank's shards of its stage only: drawn, or cut from the full tensors read from disk
    const ParamTable shard_table = make_param_table(m, grid.tp, grid.tp_rank, grid.pp, grid.pp_rank);
    std::vector<float> host_params;  // a resumed run's weights come from its checkpoint, below
    if (!c.resume_dir.empty()) host_params.assign(shard_table.total, 0.f);
    else if (!c.init_from.empty()) host_params = shards_of(shard_table, load_hf_weights(c.init_from, make_param_table(m)));
    else init_params(shard_table, m, c.seed, &host_params);
    model_allocate(&model, host_params);

    if (!c.predict.empty()) {
        if (grid.dp > 1 || grid.cp > 1) fatal("--predict runs on one model replica: --tp and --pp, but not --dp or --cp");
        WordTokenizer tok;
        std::string err;
        if (!WordTokenizer::load(c.data + "/vocab.txt", &tok, &err, m.special)) fatal("--predict: %s", err.c_str());
        Pipeline pipe;
        pipe.T = c.seq_len;
        for (const std::string& text : c.predict) predict(model, pipe, tok, text);
        destroy_grid(grid);
        MPI_Finalize();
        return 0;
    }

    if (grid.world_rank == 0) check_outputs(c);
    print_grid(grid);
#ifndef __CUDACC__
    if (grid.world_rank == 0) printf("threads per rank: %d (BLAS and ops)\n", threads);
#else
    (void)threads;
#endif
    Dataset data;
    std::string err;
    if (!load_dataset(c.data, c.seq_len, (uint32_t)m.V, m.special, &data, &err)) fatal("%s", err.c_str());
    Loader loader(data, c.micro_batch_tokens, c.seed, m.special);
    Pipeline pipe;
    pipe.T = c.micro_batch_tokens / grid.cp;  // a shard under cp
    if (grid.cp > 1) cp_allocate(&model.cp, pipe.T, model.table.heads * m.hd, model.table.heads);

    Group& grad_group = grid.dp_cp_group;  // the ranks that hold the same weights
    GradSync* sync = (!one_rank || c.zero) ? make_grad_sync(&comm, &grad_group, model, c.zero, c.bucket_mb) : nullptr;

    int start_step = 0;
    if (!c.resume_dir.empty()) start_step = load_checkpoint(c.resume_dir, &model, sync);  // every rank reads the same files
    else {  // replicas start identical whatever each rank computed: rank 0's weights win
        comm_broadcast(comm, grad_group, model.params, model.table.total, 0, "initial weights broadcast");
        weights_changed(model);
    }
    if (!c.dump_dir.empty() && start_step > 0)
        fatal("--dump writes step 1's batch, but this run resumes after step %d", start_step);

    FILE* log = nullptr;
    if (!c.log_path.empty() && grid.world_rank == 0) {
        log = fopen(c.log_path.c_str(), start_step > 0 ? "a" : "w");
        if (!log) fatal("cannot open --log %s: %s", c.log_path.c_str(), strerror(errno));
    }
#ifdef __CUDACC__
    double peak_tflops = c.peak_tflops > 0 ? c.peak_tflops : 989.0;  // H100/H200 dense bf16
#else
    double peak_tflops = c.peak_tflops;  // no default: a CPU's peak is not known here
#endif
    const int n_micro = grid.dp * c.grad_accum;  // micro-batches in one global batch
    const double unigram = unigram_entropy(data, m.special);
    if (grid.world_rank == 0)
        printf("model: H %d, I %d, L %d, heads %d, V %d, %.2fM parameters; global batch %d micro-batch(es) of %d "
               "tokens (dp %d × grad-accum %d)%s\n"
               "data: %zu documents, %zu tokens; unigram baseline %.3f (the loss of predicting word frequencies)\n",
               m.H, m.I, m.L, m.nh, m.V, model.table.full_total / 1e6, n_micro, c.micro_batch_tokens, grid.dp, c.grad_accum,
               grad_group.size > 1 || c.zero ? (", " + std::to_string(sync->buckets.size()) + " gradient buckets" + (c.zero ? ", ZeRO-1" : "")).c_str() : "",
               data.docs.size(), data.tokens.size(), unigram);
    if (grid.world_rank == 0) print_parameter_bytes(model, sync), print_stages(m, grid.pp, c.pp_schedule);
    if (!c.resume_dir.empty() && start_step >= c.steps && grid.world_rank == 0)
        printf("the checkpoint is at step %d, --steps is %d: nothing to train\n", start_step, c.steps);

    for (int step = start_step + 1; step <= c.steps; step++) {
        maybe_inject_failure(grid.world_rank, step);
        StepStats stats = train_step(model, pipe, loader, sync, comm, grid, c, step, trace);
        tracer.steps_us += stats.ms_here * 1e3;
        if (grid.world_rank == 0) report_step(stats, m, grid, c, sync, peak_tflops, unigram, log);
        bool save_now = (c.save_every > 0 && step % c.save_every == 0) || step == c.steps;
        if (!c.save_dir.empty() && save_now) save_checkpoint(c.save_dir, model, step, sync, grid.world_rank);
    }
    if (log) fclose(log);
    check_tied_embedding(model, grid.world_rank);
    if (!c.export_dir.empty()) {  // every tp rank sends its shards; rank 0 writes
        std::vector<float> full = gather_full(model, device_to_vector(model.params, model.table.total), "export tp gather");
        if (grid.world_rank == 0) export_hf(c.export_dir, model, full);
    }
    if (trace) write_trace(tracer, c.trace_dir);
    MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));  // nobody finalizes while rank 0 may still fail writing
    comm_release_staging(comm);
    destroy_grid(grid);
    MPI_CHECK(MPI_Finalize());
    return 0;
}
#endif  // PICOTRON_NO_MAIN
