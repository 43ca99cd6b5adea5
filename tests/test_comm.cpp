// The communication layer and the data-parallel gradient sync, on 4 MPI ranks (mpirun -np 4):
// every collective against the sum/copy it must equal, the byte counts against the ring formulas,
// and the bucketed sync (ZeRO-0 and ZeRO-1) against a plain sum of every rank's gradient.
// Values are small integers, so float sums are exact and comparisons are equality.
#define PICOTRON_NO_MAIN
#include "../picotron.cu"

static int n_pass = 0, n_fail = 0, world_rank = 0;
static void check(bool ok, const std::string& name, const std::string& detail = "") {
    int all_ok = ok, ok_everywhere = 0;
    MPI_Allreduce(&all_ok, &ok_everywhere, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (world_rank == 0) printf("%s %s%s%s\n", ok_everywhere ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    (ok_everywhere ? n_pass : n_fail)++;
}
static float* device_copy(const std::vector<float>& v) {
    float* d = ops::alloc_floats(v.size());
    ops::copy_to_device(d, v.data(), v.size() * sizeof(float));
    return d;
}

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    TrainConfig c;
    MPI_Comm_size(MPI_COMM_WORLD, &c.dp);
    ProcessGrid grid = make_grid(c);
    world_rank = grid.world_rank;
    Comm comm{&grid, nullptr, {}};
    Group& g = grid.dp_group;
    const int n = g.size, r = g.rank;
    check(n >= 2, "at least 2 ranks", std::to_string(n));
    check(grid.dp_rank == grid.world_rank && grid.tp_group.size == 1 && grid.dp_cp_group.size == n &&
          g.world_ranks.size() == (size_t)n && g.world_ranks[r] == grid.world_rank, "grid coordinates and groups");

    {  // the group rule on a 2×3×2×2 layout (no MPI needed): brute force over coordinates, built the
       // way DESIGN.md §4 writes the placement, must give the same members in the same order
        ProcessGrid q;
        q.dp = 2; q.pp = 3; q.cp = 2; q.tp = 2;
        bool ok = true;
        for (int d = 0; d < q.dp; d++) for (int p = 0; p < q.pp; p++) for (int x = 0; x < q.cp; x++) for (int t = 0; t < q.tp; t++) {
            int r = ((d * q.pp + p) * q.cp + x) * q.tp + t;
            std::vector<int> tp, cp, pp, dp, dpcp, emb;
            for (int i = 0; i < q.tp; i++) tp.push_back(((d * q.pp + p) * q.cp + x) * q.tp + i);
            for (int i = 0; i < q.cp; i++) cp.push_back(((d * q.pp + p) * q.cp + i) * q.tp + t);
            for (int i = 0; i < q.pp; i++) pp.push_back(((d * q.pp + i) * q.cp + x) * q.tp + t);
            for (int i = 0; i < q.dp; i++) dp.push_back(((i * q.pp + p) * q.cp + x) * q.tp + t);
            for (int i = 0; i < q.dp; i++) for (int j = 0; j < q.cp; j++) dpcp.push_back(((i * q.pp + p) * q.cp + j) * q.tp + t);
            if (p == 0 || p == q.pp - 1) emb = {((d * q.pp + 0) * q.cp + x) * q.tp + t, ((d * q.pp + q.pp - 1) * q.cp + x) * q.tp + t};
            ok &= group_members(q, "tp", r) == tp && group_members(q, "cp", r) == cp && group_members(q, "pp", r) == pp &&
                  group_members(q, "dp", r) == dp && group_members(q, "dp_cp", r) == dpcp && group_members(q, "embedding", r) == emb;
        }
        check(ok, "group membership on a dp 2 × pp 3 × cp 2 × tp 2 layout");
    }

    const size_t N = 1000;  // not a multiple of the rank count
    {  // all-reduce sum
        g.bytes_sent = 0;
        std::vector<float> v(N);
        for (size_t i = 0; i < N; i++) v[i] = (float)(r * 1000 + i % 97);
        float* d = device_copy(v);
        comm_all_reduce(comm, g, d, N, Reduce::sum, "test all-reduce");
        std::vector<float> got = device_to_vector(d, N);
        bool ok = true;
        for (size_t i = 0; i < N; i++) ok &= got[i] == (float)(1000.0 * n * (n - 1) / 2 + (double)n * (i % 97));
        check(ok, "all-reduce sum");
        check(g.bytes_sent == 2.0 * (n - 1) / n * N * 4, "all-reduce bytes = 2(n-1)/n S");
    }
    {  // all-reduce max (tp cross-entropy's row max), with -inf on some ranks
        std::vector<float> v(N);
        for (size_t i = 0; i < N; i++) v[i] = (i + r) % n == 0 ? (float)(i + r) : -INFINITY;
        float* d = device_copy(v);
        comm_all_reduce(comm, g, d, N, Reduce::max, "test all-reduce max");
        std::vector<float> got = device_to_vector(d, N);
        bool ok = true;
        for (size_t i = 0; i < N; i++) {  // the one rank q with (i + q) % n == 0 holds i + q
            size_t q = (n - i % n) % n;
            ok &= got[i] == (float)(i + q);
        }
        check(ok, "all-reduce max");
    }
    {  // host gather to group rank 0 (checkpoints assemble tp shards this way)
        g.bytes_sent = 0;
        std::vector<float> mine(N, (float)r), all(r == 0 ? N * n : 0);
        comm_gather_host(comm, g, mine.data(), N, all.data(), "test gather");
        bool ok = true;
        if (r == 0)
            for (size_t i = 0; i < N * n; i++) ok &= all[i] == (float)(i / N);
        check(ok, "host gather to rank 0, in rank order");
        check(g.bytes_sent == (r == 0 ? 0.0 : N * 4.0), "gather bytes: S from every rank but the root");
    }
    {  // reduce-scatter: block b of the result = Σ_ranks send[b·N + i]
        g.bytes_sent = 0;
        std::vector<float> v(N * n);
        for (size_t j = 0; j < N * n; j++) v[j] = (float)(r + 10 * (j % 53));
        float* send = device_copy(v);
        float* recv = ops::alloc_floats(N);
        CommRequest q = comm_reduce_scatter_start(comm, g, send, recv, N, "test reduce-scatter");
        comm_wait(comm, q);
        std::vector<float> got = device_to_vector(recv, N);
        bool ok = true;
        for (size_t i = 0; i < N; i++) ok &= got[i] == (float)(n * (n - 1) / 2 + 10.0 * n * ((r * N + i) % 53));
        check(ok, "reduce-scatter");
        check(g.bytes_sent == (double)(n - 1) / n * N * n * 4, "reduce-scatter bytes = (n-1)/n S");
    }
    {  // all-gather
        g.bytes_sent = 0;
        std::vector<float> v(N);
        for (size_t i = 0; i < N; i++) v[i] = (float)(r * 7 + i);
        float* send = device_copy(v);
        float* recv = ops::alloc_floats(N * n);
        CommRequest q = comm_all_gather_start(comm, g, send, recv, N, "test all-gather");
        comm_wait(comm, q);
        std::vector<float> got = device_to_vector(recv, N * n);
        bool ok = true;
        for (int src = 0; src < n; src++)
            for (size_t i = 0; i < N; i++) ok &= got[src * N + i] == (float)(src * 7 + i);
        check(ok, "all-gather");
        check(g.bytes_sent == (double)(n - 1) / n * N * n * 4, "all-gather bytes = (n-1)/n S");
    }
    {  // broadcast from the last rank
        std::vector<float> v(N, (float)r);
        float* d = device_copy(v);
        comm_broadcast(comm, g, d, N, n - 1, "test broadcast");
        std::vector<float> got = device_to_vector(d, N);
        check(std::all_of(got.begin(), got.end(), [&](float x) { return x == (float)(n - 1); }), "broadcast");
    }
    {  // ring exchange: send to the next rank, receive from the previous one
        g.bytes_sent = 0;
        std::vector<float> v(N, (float)(r + 1));
        float* send = device_copy(v);
        float* recv = ops::alloc_floats(N);
        CommRequest q = comm_sendrecv_start(comm, g, send, (r + 1) % n, recv, (r + n - 1) % n, N, "test ring");
        comm_wait(comm, q);
        std::vector<float> got = device_to_vector(recv, N);
        int prev = (r + n - 1) % n;
        check(std::all_of(got.begin(), got.end(), [&](float x) { return x == (float)(prev + 1); }), "paired send-recv");
        check(g.bytes_sent == (double)N * 4, "send bytes = S");
        // one-sided ends of a pipeline: the first rank only sends, the last only receives
        std::vector<float> zero(N, 0.f);
        float* recv2 = device_copy(zero);
        int dst = r + 1 < n ? r + 1 : -1, src = r > 0 ? r - 1 : -1;
        CommRequest q2 = comm_sendrecv_start(comm, g, send, dst, recv2, src, N, "test chain");
        comm_wait(comm, q2);
        std::vector<float> got2 = device_to_vector(recv2, N);
        check(got2[0] == (r > 0 ? (float)r : 0.f), "send-recv with an absent side");
    }
    {  // host scalars
        double v[2] = {(double)r, (double)r};
        comm_all_reduce_host(comm, g, v, 1, MPI_SUM, "test sum");
        comm_all_reduce_host(comm, g, v + 1, 1, MPI_MAX, "test max");
        check(v[0] == n * (n - 1) / 2.0 && v[1] == n - 1, "host all-reduce sum and max");
    }

    // The bucketed gradient sync on the tiny model's table: rank r's gradient element i is
    // (r + 1)·(i mod 13); the sum over ranks is n(n+1)/2·(i mod 13), exact in fp32.
    ModelConfig m;
    model_preset("tiny", &m);
    m.V = 1000;  // a small vocabulary keeps the buffers small; the table's shape is what matters
    std::vector<float> host_params(make_param_table(m).total, 0.5f);
    for (int zero = 0; zero <= 1; zero++) {
        Model model;
        model.cfg = m;
        model_allocate(&model, host_params);
        size_t P = model.table.total;
        GradSync* sync = make_grad_sync(&comm, &g, model, zero == 1, 0.05f);  // ~13k floats a bucket
        std::vector<float> grad(P);
        for (size_t i = 0; i < P; i++) grad[i] = (float)((r + 1) * (i % 13));
        ops::copy_to_device(model.grads, grad.data(), P * sizeof(float));
        g.bytes_sent = 0;
        // the backward's watermarks, in its order: head, layers from the last, embedding
        grad_sync_ready(sync, model.table.head_first);
        for (int l = m.L - 1; l >= 0; l--) grad_sync_ready(sync, model.table.layer_first[l]);
        int early = sync->launched_during_backward;
        grad_sync_finish(sync);
        double sent = g.bytes_sent;
        std::string tag = zero ? "ZeRO-1" : "ZeRO-0";
        check(sync->buckets.size() > 4 && early > 0 && early < (int)sync->buckets.size(),
              tag + ": buckets launch during the backward",
              std::to_string(early) + " of " + std::to_string(sync->buckets.size()) + " before the end");
        double want_sum = n * (n + 1) / 2.0;
        bool ok = true;
        double padded = 0;
        if (!zero) {
            std::vector<float> got = device_to_vector(model.grads, P);
            for (size_t i = 0; i < P; i++) ok &= got[i] == (float)(want_sum * (i % 13));
        } else {
            for (const AdamwPiece& p : model.pieces) {
                std::vector<float> got = device_to_vector(p.grad, p.n);
                for (size_t j = 0; j < p.n; j++) ok &= got[j] == (float)(want_sum * ((p.offset + j) % 13));
            }
            size_t owned = 0;  // the shares of all ranks tile the buffer exactly once
            for (const AdamwPiece& p : model.pieces) owned += p.n;
            double total_owned = (double)owned;
            comm_all_reduce_host(comm, g, &total_owned, 1, MPI_SUM, "test owned");
            check(total_owned == (double)P, "ZeRO-1: the shards cover every parameter once");
            for (const Bucket& b : sync->buckets) padded += (double)n * b.chunk;
        }
        check(ok, tag + ": bucketed sync equals the sum of every rank's gradient");
        double formula = zero ? (double)(n - 1) / n * padded * 4 : 2.0 * (n - 1) / n * P * 4;
        check(sent == formula, tag + ": bytes sent match the formula",
              std::to_string((long)sent) + " vs " + std::to_string((long)formula));
        if (zero) {  // every rank changes its share of the weights; the gather brings all shares to all
            for (const AdamwPiece& p : model.pieces) {
                std::vector<float> mine(p.n);
                for (size_t j = 0; j < p.n; j++) mine[j] = (float)((p.offset + j) % 29);
                ops::copy_to_device(model.params + p.offset, mine.data(), p.n * sizeof(float));
            }
            gather_params(sync, model.params);
            std::vector<float> got = device_to_vector(model.params, P);
            bool same = true;
            for (size_t i = 0; i < P; i++) same &= got[i] == (float)(i % 29);
            check(same, "ZeRO-1: parameter all-gather rebuilds the whole model on every rank");
        }
    }
    if (world_rank == 0) printf("%d passed, %d failed\n", n_pass, n_fail);
    MPI_Finalize();
    return n_fail ? 1 : 0;
}
