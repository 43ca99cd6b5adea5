// HF parity: the C++ model against transformers' ModernBertForMaskedLM on the golden batch made by
// scripts/make_golden.py (fp32, eager attention, sparse prediction; 4 layers, 3 packed documents of
// 260/150/90 tokens so that the ±64 window bites). The weights come in through the HF import path.
// Tolerances (relative = max |ours − theirs| / max |theirs| over a tensor):
//   loss ≤ 1e-5, masked-row logits ≤ 1e-4, every parameter gradient ≤ 1e-4,
//   the losses of 3 AdamW steps (torch.optim.AdamW, same hyper-parameters) ≤ 1e-5, and the weight
//   updates of those steps ≤ 1e-3 (see below why the update, not the weight, is compared).
#define PICOTRON_NO_MAIN
#include "../picotron.cu"

static int n_pass = 0, n_fail = 0;
static void check(bool ok, const std::string& name, const std::string& detail) {
    if (ok) { printf("PASS %s (%s)\n", name.c_str(), detail.c_str()); n_pass++; }
    else { printf("FAIL %s: %s\n", name.c_str(), detail.c_str()); n_fail++; }
}
static double rel_err(const float* ours, const std::vector<float>& theirs) {
    double max_diff = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < theirs.size(); i++) {
        max_diff = std::max(max_diff, (double)fabs(ours[i] - theirs[i]));
        max_ref = std::max(max_ref, (double)fabs(theirs[i]));
    }
    return max_diff / std::max(max_ref, 1e-30);
}
static std::string fmt(const char* f, double x) {
    char b[64];
    snprintf(b, sizeof b, f, x);
    return b;
}

// Runs every stage's pipeline program together, an exchange completing only when the neighbour's
// current op is the exact counterpart (strictest pairing: what one sends the other receives, both
// ways), and checks the schedule: no deadlock, each micro-batch forwarded and backwarded once per
// stage in that order, data sent only after it exists and used only after it arrived, and the peak
// of live micro-batches per stage. Returns "" or the first problem; *peaks gets each stage's peak.
static std::string simulate_pipeline(const std::vector<std::vector<PipeOp>>& prog, int m, std::vector<int>* peaks) {
    const int pp = (int)prog.size();
    std::vector<size_t> pc(pp, 0);
    std::vector<std::vector<int>> fwd(pp, std::vector<int>(m, 0)), bwd = fwd, act_in = fwd, grad_in = fwd;
    std::vector<int> live(pp, 0);
    peaks->assign(pp, 0);
    char why[160];
    for (;;) {
        bool progress = false, done = true;
        for (int s = 0; s < pp; s++) {
            if (pc[s] == prog[s].size()) continue;
            done = false;
            const PipeOp& op = prog[s][pc[s]];
            if (op.kind == PipeKind::forward) {
                if (s > 0 && !act_in[s][op.micro]) { snprintf(why, sizeof why, "stage %d forwards %d before its input came", s, op.micro); return why; }
                fwd[s][op.micro]++;
                (*peaks)[s] = std::max((*peaks)[s], ++live[s]);
                pc[s]++, progress = true;
            } else if (op.kind == PipeKind::backward) {
                if (!fwd[s][op.micro] || (s < pp - 1 && !grad_in[s][op.micro])) { snprintf(why, sizeof why, "stage %d backwards %d too early", s, op.micro); return why; }
                bwd[s][op.micro]++;
                live[s]--;
                pc[s]++, progress = true;
            } else {
                const int q = s + op.peer;
                if (q < 0 || q >= pp) { snprintf(why, sizeof why, "stage %d exchanges with missing stage %d", s, q); return why; }
                if (pc[q] == prog[q].size()) continue;
                const PipeOp& o = prog[q][pc[q]];
                if (o.kind != PipeKind::exchange || o.peer != -op.peer || o.send != op.recv || o.recv != op.send) continue;
                if (s > q) continue;  // the lower stage completes the pair
                // s sends its activation op.send to q, q its gradient o.send to s
                if (op.send >= 0 && !fwd[s][op.send]) { snprintf(why, sizeof why, "stage %d sends activation %d before its forward", s, op.send); return why; }
                if (o.send >= 0 && !bwd[q][o.send]) { snprintf(why, sizeof why, "stage %d sends gradient %d before its backward", q, o.send); return why; }
                if (op.send >= 0) act_in[q][op.send] = 1;
                if (o.send >= 0) grad_in[s][o.send] = 1;
                pc[s]++, pc[q]++, progress = true;
            }
        }
        if (done) break;
        if (!progress) {
            std::string at;
            for (int s = 0; s < pp; s++) at += " " + std::to_string(pc[s]) + "/" + std::to_string(prog[s].size());
            return "deadlock at ops" + at;
        }
    }
    for (int s = 0; s < pp; s++)
        for (int i = 0; i < m; i++)
            if (fwd[s][i] != 1 || bwd[s][i] != 1) { snprintf(why, sizeof why, "stage %d ran micro-batch %d %d/%d times", s, i, fwd[s][i], bwd[s][i]); return why; }
    return "";
}

// Context parallel's host side, against brute force over token pairs: cp_pairs (the same-document
// pairs of each shard pair), cp_balance (a reordering of whole documents that keeps every token's
// id, position and label, and whose ring critical path is no longer than the packer's),
// cp_shard (the shards tile the micro-batch) and the halo geometry (what rank r receives from
// rank q is what q sends to r, and it is exactly the tokens within w of r's shard that q owns).
static void test_context_parallel() {
    uint64_t state = 12345;
    auto rnd = [&](int n) { state = state * 6364136223846793005ull + 1442695040888963407ull; return (int)((state >> 33) % n); };
    int cases = 0;
    std::string problem;
    for (int trial = 0; trial < 60 && problem.empty(); trial++) {
        const int cp = std::vector<int>{2, 3, 4, 8}[trial % 4], Tc = 8 + rnd(60), T = cp * Tc;
        BatchView b;
        b.T = b.T_whole = T;
        b.cu_seqlens = {0};
        const int n_real = T - rnd(Tc);  // some padding at the end
        while (b.cu_seqlens.back() < n_real) b.cu_seqlens.push_back(std::min(n_real, b.cu_seqlens.back() + 1 + rnd(2 * Tc)));
        b.n_docs = (int)b.cu_seqlens.size() - 1;
        b.n_real = n_real;
        for (int i = 0; i < T; i++) {
            b.ids.push_back(1000 + i);  // every token its own id: where it went is visible
            int d = 0;
            while (d < b.n_docs && b.cu_seqlens[d + 1] <= i) d++;
            b.positions.push_back(i < n_real ? i - b.cu_seqlens[d] : 0);
            if (i < n_real && rnd(3) == 0) b.masked_rows.push_back(i), b.targets.push_back(5000 + i);
        }
        b.n_masked = (int)b.masked_rows.size();
        auto brute_pairs = [&](const BatchView& v) {
            std::vector<double> pairs((size_t)cp * cp, 0.0);
            auto doc_of = [&](int i) {
                for (int d = 0; d < v.n_docs; d++)
                    if (i >= v.cu_seqlens[d] && i < v.cu_seqlens[d + 1]) return d;
                return -1;
            };
            for (int i = 0; i < T; i++)
                for (int j = 0; j < T; j++)
                    if (doc_of(i) >= 0 && doc_of(i) == doc_of(j)) pairs[(size_t)(i / Tc) * cp + j / Tc] += 1;
            return pairs;
        };
        const std::vector<double> pairs = cp_pairs(b.cu_seqlens, b.n_docs, T, cp);
        if (pairs != brute_pairs(b)) problem = "cp_pairs differs from the brute-force count";
        BatchView bal = cp_balance(b, cp);
        if (bal.cp_pairs != brute_pairs(bal)) problem = "the balanced view's pairs differ from the brute-force count";
        if (bal.cp_ring_work != cp_ring_work(bal.cp_pairs, cp) || bal.cp_ring_work_unbalanced != cp_ring_work(pairs, cp) ||
            bal.cp_ring_work > bal.cp_ring_work_unbalanced)
            problem = "the balanced ring work is not its pairs' critical path, or longer than the packer's";
        // the documents are a permutation of the packer's, each with its tokens, positions and labels
        std::vector<int> seen(b.n_docs, 0);
        for (int d = 0; d < bal.n_docs && problem.empty(); d++) {
            const int s0 = bal.cu_seqlens[d], len = bal.cu_seqlens[d + 1] - s0, first = bal.ids[s0] - 1000;
            int src = 0;
            while (src < b.n_docs && b.cu_seqlens[src] != first) src++;
            if (src == b.n_docs || seen[src]++ || b.cu_seqlens[src + 1] - first != len) { problem = "a document was cut or duplicated"; break; }
            for (int i = 0; i < len; i++)
                if (bal.ids[s0 + i] != b.ids[first + i] || bal.positions[s0 + i] != b.positions[first + i]) problem = "a token moved without its document";
        }
        std::vector<std::pair<int, int>> labels_before, labels_after;
        for (int k = 0; k < b.n_masked; k++) labels_before.push_back({b.ids[b.masked_rows[k]], b.targets[k]});
        for (int k = 0; k < bal.n_masked; k++) labels_after.push_back({bal.ids[bal.masked_rows[k]], bal.targets[k]});
        std::sort(labels_after.begin(), labels_after.end());  // labels_before is sorted: ids increase with rows
        if (labels_before != labels_after || !std::is_sorted(bal.masked_rows.begin(), bal.masked_rows.end()))
            problem = "a label no longer sits on its token, or the masked rows are out of order";
        if (bal.cu_seqlens.back() != n_real) problem = "the padding moved";
        // the shards tile the micro-batch
        std::vector<int> ids, rows;
        int real = 0;
        for (int r = 0; r < cp; r++) {
            BatchView s = cp_shard(bal, cp, r);
            ids.insert(ids.end(), s.ids.begin(), s.ids.end());
            for (int k = 0; k < s.n_masked; k++) rows.push_back(s.masked_rows[k] + r * Tc);
            real += s.n_real;
            if (s.T != Tc || s.token_start != r * Tc || s.cu_seqlens != bal.cu_seqlens) problem = "a shard has the wrong extent or table";
        }
        if (ids != bal.ids || rows != bal.masked_rows || real != n_real) problem = "the shards do not tile the micro-batch";
        // halo geometry, w = 16 and 64 (shards of 8 to 67 tokens: more than one rank each side at times)
        for (int w : {16, 64}) {
            ContextParallel c;
            c.size = cp;
            c.window = w;
            for (int r = 0; r < cp; r++) {
                c.rank = r;
                Halo h = halo_of(c, cp_shard(bal, cp, r));
                int left = 0, right = 0;
                for (int j = std::max(0, r * Tc - w); j < r * Tc; j++) left++;
                for (int j = (r + 1) * Tc; j < std::min(T, (r + 1) * Tc + w); j++) right++;
                int from_left = 0, from_right = 0;
                for (int d = 1; d <= h.reach; d++) from_left += r - d >= 0 ? h.rows(d) : 0, from_right += r + d < cp ? h.rows(d) : 0;
                if (h.left != left || h.right != right || from_left != left || from_right != right)
                    problem = "halo of rank " + std::to_string(r) + " (cp " + std::to_string(cp) + ", Tc " +
                              std::to_string(Tc) + ", w " + std::to_string(w) + "): not the tokens within w";
                for (int d = 1; d <= h.reach; d++)  // rank r − d's rows in r's left halo are r − d's last rows(d)
                    if (r - d >= 0 && h.from_left_at(d) != (r - d + 1) * Tc - h.rows(d) - (r * Tc - h.left))
                        problem = "halo rows of rank r − d land in the wrong place";
            }
        }
        cases++;
    }
    check(problem.empty(), "cp host side: pairs, balance (a reordering of whole documents, never longer), shards, halos",
          problem.empty() ? std::to_string(cases) + " random micro-batches, cp 2/3/4/8, vs brute force" : problem);
}

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    const std::string dir = argc > 1 ? argv[1] : "tests/golden";  // or tests/golden_pattern
    Model model;
    model.cfg = read_hf_config(dir + "/model");
    std::vector<float> host = load_hf_weights(dir + "/model", make_param_table(model.cfg));
    model_allocate(&model, host);
    const ModelConfig& m = model.cfg;

    TensorMap golden;
    std::string err;
    if (!safetensors_read(dir + "/golden.safetensors", &golden, nullptr, &err)) fatal("%s", err.c_str());
    auto ints = [&](const char* name) { return std::vector<int>(golden[name].i.begin(), golden[name].i.end()); };
    BatchView b;
    b.ids = ints("input_ids");
    b.positions = ints("positions");
    b.cu_seqlens = ints("cu_seqlens");
    std::vector<int> labels = ints("labels");
    b.T = b.T_whole = (int)b.ids.size();
    b.n_docs = (int)b.cu_seqlens.size() - 1;
    for (int t = 0; t < b.T; t++)
        if (labels[t] != -100) { b.masked_rows.push_back(t); b.targets.push_back(labels[t]); }
    b.n_masked = (int)b.masked_rows.size();
    check(m.L >= 4 && b.n_docs >= 3 && b.T > 260, "golden batch shape", "L " + std::to_string(m.L) + ", " +
          std::to_string(b.n_docs) + " documents, " + std::to_string(b.n_masked) + " masked of " + std::to_string(b.T));

    Activations a = alloc_activations(model, b.T);
    double loss = model_forward(model, a, b) / b.n_masked;
    double want = golden["loss"].f[0];
    double loss_rel = fabs(loss - want) / fabs(want);
    check(loss_rel <= 1e-5, "loss matches transformers", fmt("rel %.2e", loss_rel) + fmt(", ours %.8f", loss) + fmt(" theirs %.8f", want));

    std::vector<float> logits = device_to_vector(a.logits, (size_t)b.n_masked * m.V);
    double logit_rel = rel_err(logits.data(), golden["logits"].f);
    check(golden["logits"].f.size() == logits.size() && logit_rel <= 1e-4, "masked-row logits match", fmt("rel %.2e", logit_rel));

    ops::zero_floats(model.grads, model.table.total);
    model_backward(model, a, b);
    std::vector<float> grads = device_to_vector(model.grads, model.table.total);
    for (float& x : grads) x /= (float)b.n_masked;
    double worst = 0.0;
    std::string worst_name;
    for (const ParamInfo& p : model.table.params) {
        auto it = golden.find("grad." + p.name);
        if (it == golden.end() || it->second.f.size() != p.numel) {
            check(false, "gradient " + p.name, "missing or wrong size in the golden file");
            continue;
        }
        double r = rel_err(grads.data() + p.offset, it->second.f);
        if (r > worst) { worst = r; worst_name = p.name; }
        if (r > 1e-4) check(false, "gradient " + p.name, fmt("rel %.2e > 1e-4", r));
    }
    check(worst <= 1e-4, "every parameter gradient matches", fmt("worst rel %.2e", worst) + " at " + worst_name);

    // three AdamW steps on the same batch, constant lr, as the golden script ran torch.optim.AdamW
    TrainConfig c;
    c.lr = 1e-3f; c.warmup = 0; c.decay_frac = 0.f; c.steps = 3; c.weight_decay = 1e-5f;
    const std::vector<float>& want_losses = golden["step_losses"].f;
    double step_worst = 0.0;
    std::string got;
    for (int step = 1; step <= 3; step++) {
        ops::zero_floats(model.grads, model.table.total);
        double l = model_forward(model, a, b) / b.n_masked;
        model_backward(model, a, b);
        optimizer_step(model, c, learning_rate(c, step), b.n_masked);
        step_worst = std::max(step_worst, fabs(l - want_losses[step - 1]) / fabs(want_losses[step - 1]));
        got += fmt(" %.7f", l) + fmt("/%.7f", want_losses[step - 1]);
    }
    check(step_worst <= 1e-5, "3 AdamW steps' losses match torch", fmt("worst rel %.2e;", step_worst) + got);
    // Adam divides each gradient by its own running size, so elements whose gradient is near ε
    // turn fp32 noise into visible update differences; the weights are therefore compared through
    // the update itself: max |Δours − Δtorch| ≤ 1e-3 · max |Δtorch| per tensor.
    std::vector<float> final_params = device_to_vector(model.params, model.table.total);
    double final_worst = 0.0;
    std::string final_name;
    for (const ParamInfo& p : model.table.params) {
        auto it = golden.find("final." + p.name);
        if (it == golden.end() || it->second.f.size() != p.numel) {
            check(false, "weights after 3 steps " + p.name, "missing from the golden file");
            continue;
        }
        std::vector<float> ours(p.numel), theirs(p.numel);
        for (size_t i = 0; i < p.numel; i++) {
            ours[i] = final_params[p.offset + i] - host[p.offset + i];
            theirs[i] = it->second.f[i] - host[p.offset + i];
        }
        double r = rel_err(ours.data(), theirs);
        if (r > final_worst) { final_worst = r; final_name = p.name; }
    }
    check(final_worst <= 1e-3, "weight updates of 3 AdamW steps match torch", fmt("worst rel %.2e at ", final_worst) + final_name);

    // Clipping scales the gradient and nothing else: clipping to half the norm must give the same
    // weights as feeding a gradient that is half as large (bit for bit: same float operations).
    {
        Model clipped, scaled;
        clipped.cfg = scaled.cfg = m;
        model_allocate(&clipped, host);
        model_allocate(&scaled, host);
        ops::zero_floats(clipped.grads, clipped.table.total);
        model_forward(clipped, a, b);
        model_backward(clipped, a, b);
        std::vector<float> g = device_to_vector(clipped.grads, clipped.table.total);
        double norm = sqrt(ops::sum_squares(clipped.grads, clipped.table.total)) / b.n_masked;
        TrainConfig cc = c;
        cc.clip = (float)(0.5 * norm);
        optimizer_step(clipped, cc, 1e-3f, b.n_masked);
        // the clip factor cc.clip / norm folds into the grad scale; hand the same scale over directly
        double factor = cc.clip / norm;
        long scaled_count = b.n_masked;
        TrainConfig cs = c;
        cs.clip = 0.f;
        // grad_scale = 1/count · factor = 1/(count/factor): same scale through the masked-token count
        std::vector<float> g2 = g;
        for (float& x : g2) x = (float)(x * factor);
        ops::copy_to_device(scaled.grads, g2.data(), g2.size() * sizeof(float));
        optimizer_step(scaled, cs, 1e-3f, scaled_count);
        std::vector<float> pa = device_to_vector(clipped.params, clipped.table.total);
        std::vector<float> pb = device_to_vector(scaled.params, scaled.table.total);
        double r = rel_err(pa.data(), pb);
        double moved = rel_err(pa.data(), host);
        check(r <= 1e-6 && moved > 0, "clipping equals a pre-scaled gradient", fmt("rel %.2e", r) + fmt(", update rel %.2e", moved));
    }
    // StableAdamW: on step 1 v̂ = g², so RMS ≤ 1 and it equals AdamW. On step 2 with a gradient 100×
    // the first, each tensor's update must be AdamW's divided by its RMS, computed here independently:
    // v1 = (1−β2)g², v2 = β2 v1 + (1−β2)(100g)², RMS = √mean((100g)² / max(v2/(1−β2²), ε²)).
    {
        TrainConfig cs = c;
        cs.optimizer = "stable-adamw";
        Model stable, plain;
        stable.cfg = plain.cfg = m;
        model_allocate(&stable, host);
        model_allocate(&plain, host);
        for (Model* x : {&stable, &plain}) {
            ops::zero_floats(x->grads, x->table.total);
            model_forward(*x, a, b);
            model_backward(*x, a, b);
        }
        std::vector<float> g1 = device_to_vector(plain.grads, plain.table.total);
        optimizer_step(stable, cs, 1e-3f, b.n_masked);
        optimizer_step(plain, c, 1e-3f, b.n_masked);
        std::vector<float> ps = device_to_vector(stable.params, stable.table.total);
        std::vector<float> pp = device_to_vector(plain.params, plain.table.total);
        check(rel_err(ps.data(), pp) == 0.0, "StableAdamW's first step equals AdamW's", "RMS <= 1 on step 1");
        for (Model* x : {&stable, &plain}) {
            std::vector<float> g = g1;
            for (float& v : g) v *= 100.f;
            ops::copy_to_device(x->grads, g.data(), g.size() * sizeof(float));
        }
        optimizer_step(stable, cs, 1e-3f, b.n_masked);
        optimizer_step(plain, c, 1e-3f, b.n_masked);
        std::vector<float> ps2 = device_to_vector(stable.params, stable.table.total);
        std::vector<float> pp2 = device_to_vector(plain.params, plain.table.total);
        double worst = 0.0, smallest_factor = 1.0;
        for (const ParamInfo& p : stable.table.params) {
            double acc = 0.0, b2 = c.beta2, e2 = (double)c.eps * c.eps;
            for (size_t i = p.offset; i < p.offset + p.numel; i++) {
                double g = (double)g1[i] / b.n_masked, v1 = (1 - b2) * g * g, g2 = 100.0 * g;
                double v_hat = (b2 * v1 + (1 - b2) * g2 * g2) / (1 - b2 * b2);
                acc += g2 * g2 / std::max(v_hat, e2);
            }
            double factor = 1.0 / std::max(1.0, sqrt(acc / p.numel));
            smallest_factor = std::min(smallest_factor, factor);
            std::vector<float> d_stable(p.numel), d_expected(p.numel);
            for (size_t i = 0; i < p.numel; i++) {
                d_stable[i] = ps2[p.offset + i] - ps[p.offset + i];
                d_expected[i] = (float)((pp2[p.offset + i] - pp[p.offset + i]) * factor);
            }
            worst = std::max(worst, rel_err(d_stable.data(), d_expected));
        }
        check(worst <= 1e-3 && smallest_factor < 0.9, "StableAdamW divides each tensor's step by its RMS",
              fmt("worst rel %.2e", worst) + fmt(", smallest factor %.3f", smallest_factor));
    }
    // The presets use ModernBERT's special ids (DESIGN.md §6), which the data, the masking, the
    // PAD row's missing gradient and the export all take from the model config.
    {
        ModelConfig tiny;
        model_preset("tiny", &tiny);
        const SpecialIds& sp = tiny.special;
        check(sp.unk == 50280 && sp.cls == 50281 && sp.sep == 50282 && sp.pad == 50283 && sp.mask == 50284 &&
                  tiny.V == 50368 && tiny.hd == 64 && tiny.L >= 6,
              "tiny preset: ModernBERT's vocabulary and special ids", "CLS " + std::to_string(sp.cls) + ", MASK " + std::to_string(sp.mask));
    }
    // Warmup-stable-decay: linear warmup, flat, then 1-sqrt decay over the last decay_frac of steps.
    {
        TrainConfig w;
        w.lr = 1.0f; w.warmup = 10; w.steps = 100; w.decay_frac = 0.1f;
        bool ok = fabsf(learning_rate(w, 5) - 0.5f) < 1e-7f && learning_rate(w, 10) == 1.0f &&
                  learning_rate(w, 50) == 1.0f && learning_rate(w, 90) == 1.0f && learning_rate(w, 91) == 1.0f &&
                  fabsf(learning_rate(w, 100) - (1.0f - sqrtf(0.9f))) < 1e-7f && learning_rate(w, 95) > learning_rate(w, 96);
        check(ok, "learning-rate schedule", fmt("lr(5) %.3f", learning_rate(w, 5)) + fmt(" lr(100) %.4f", learning_rate(w, 100)));
    }

    // Pipeline programs: every pp ≤ 6 and m ≤ 9 micro-batches (fewer, as many and more than stages),
    // both schedules, simulated together. 1F1B keeps at most min(pp − s, m) micro-batches alive on
    // stage s; AFAB keeps all m.
    {
        std::string problem;
        int layouts = 0;
        for (const char* schedule : {"afab", "1f1b"})
            for (int pp = 1; pp <= 6 && problem.empty(); pp++)
                for (int m = 1; m <= 9 && problem.empty(); m++, layouts++) {
                    std::vector<int> peaks;
                    std::vector<std::vector<PipeOp>> prog;
                    for (int s = 0; s < pp; s++) prog.push_back(pipeline_program(schedule, pp, s, m));
                    problem = simulate_pipeline(prog, m, &peaks);
                    for (int s = 0; s < pp && problem.empty(); s++) {
                        int bound = std::string(schedule) == "afab" ? m : std::min(pp - s, m);
                        if (peaks[s] != bound)
                            problem = "stage " + std::to_string(s) + " peak " + std::to_string(peaks[s]) + ", expected " + std::to_string(bound);
                    }
                    if (!problem.empty()) problem = std::string(schedule) + " pp " + std::to_string(pp) + " m " + std::to_string(m) + ": " + problem;
                }
        check(problem.empty(), "pipeline programs: no deadlock, every micro-batch once, 1F1B peak min(pp − s, m), AFAB m",
              problem.empty() ? std::to_string(layouts) + " layouts" : problem);
        // the simulator catches the classic mistake: 1F1B with lone sends and receives, where stage
        // 0 sends its second activation while stage 1 sends its first gradient
        using K = PipeKind;
        std::vector<std::vector<PipeOp>> naive = {
            {{K::forward, 0}, {K::exchange, -1, 1, 0, -1}, {K::forward, 1}, {K::exchange, -1, 1, 1, -1},
             {K::exchange, -1, 1, -1, 0}, {K::backward, 0}, {K::exchange, -1, 1, -1, 1}, {K::backward, 1}},
            {{K::exchange, -1, -1, -1, 0}, {K::forward, 0}, {K::backward, 0}, {K::exchange, -1, -1, 0, -1},
             {K::exchange, -1, -1, -1, 1}, {K::forward, 1}, {K::backward, 1}, {K::exchange, -1, -1, 1, -1}}};
        std::vector<int> peaks;
        std::string verdict = simulate_pipeline(naive, 2, &peaks);
        check(verdict.find("deadlock") == 0, "pipeline simulator finds the deadlock of lone sends in 1F1B", verdict);
    }

    if (dir == "tests/golden") test_context_parallel();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    MPI_Finalize();
    return n_fail ? 1 : 0;
}
