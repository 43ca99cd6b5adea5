// compare_runs — do two training runs agree? Losses step by step, final weights tensor by tensor.
//
//   compare_runs REF.jsonl RUN.jsonl REF_model.safetensors RUN_model.safetensors
//                [--loss-rel 1e-5] [--weight-rel 1e-4] [--rms]
//
// Losses: the "loss" field of every line of both logs; same number of steps; per step
// |ref - run| / |ref| <= loss-rel. Weights: same tensor names and shapes; per tensor
// max|ref - run| / max|ref| <= weight-rel; with --rms, RMS(ref - run) / RMS(ref) instead: the
// measure for runs in other precisions (bf16 against fp32), where Adam moves the few elements whose
// gradient is below its roundoff by up to ±lr a step, so the max says little about the run. Prints one line, "OK ..." (exit 0) or "MISMATCH ..."
// (exit 1) naming the worst offender; a usage or file error is one line and exit 2.
// Integer tensors (a --dump's ids and labels) must be equal. Used to check that a parallel layout
// (dp, tp, ...) trains the same model as one rank, and writes the same --dump.
//
// Build: g++ -std=c++17 -O2 -Wall -Wextra -I. tests/compare_runs.cpp -o tests/compare_runs
#include "safetensors.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& msg) {
    std::printf("compare_runs: %s\n", msg.c_str());
    std::exit(2);
}

void usage() {
    die("usage: compare_runs REF.jsonl RUN.jsonl REF_model.safetensors RUN_model.safetensors "
        "[--loss-rel 1e-5] [--weight-rel 1e-4] [--rms]");
}

std::string fmt(double x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3g", x);
    return buf;
}

std::string fmt_full(double x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", x);
    return buf;
}

// One step of a log: its "step" field (or the line's ordinal when absent) and its loss.
struct Step {
    long step;
    double loss;
};

std::vector<Step> read_losses(const std::string& path) {
    std::string text, err;
    if (!read_text_file(path, &text, &err)) die(err);
    std::vector<Step> steps;
    std::istringstream in(text);
    std::string line;
    long lineno = 0;
    while (std::getline(in, line)) {
        lineno++;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank line
        Json j;
        std::string perr;
        if (!json_parse(line, &j, &perr)) die(path + ":" + std::to_string(lineno) + ": " + perr);
        const Json* loss = j.get("loss");
        if (!loss || !loss->is_number())
            die(path + ":" + std::to_string(lineno) + ": no numeric \"loss\" field");
        const Json* step = j.get("step");
        long s = (step && step->is_integer()) ? (long)step->num : (long)steps.size() + 1;
        steps.push_back({s, loss->num});
    }
    if (steps.empty()) die(path + ": no steps");
    return steps;
}

// |a - b| / |a|; 0 when both are equal (0 / 0 included), +inf when a is 0 and b is not, NaN
// when either is NaN (NaN never passes a <= test, so it counts as a mismatch).
double rel(double diff, double scale) {
    if (std::isnan(diff) || std::isnan(scale)) return std::numeric_limits<double>::quiet_NaN();
    if (diff == 0) return 0;
    if (scale == 0) return std::numeric_limits<double>::infinity();
    return diff / scale;
}

// a is worse than b (NaN is worst of all)
bool worse(double a, double b) { return std::isnan(a) ? !std::isnan(b) : (!std::isnan(b) && a > b); }

std::string shape_str(const std::vector<int64_t>& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); i++) r += (i ? "," : "") + std::to_string(s[i]);
    return r + "]";
}

// the tensor's values as doubles, whatever its dtype
std::vector<double> values(const Tensor& t) {
    if (!t.f.empty()) return std::vector<double>(t.f.begin(), t.f.end());
    return std::vector<double>(t.i.begin(), t.i.end());
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    double loss_tol = 1e-5, weight_tol = 1e-4;
    bool rms = false;
    for (int a = 1; a < argc; a++) {
        std::string s = argv[a];
        if (s == "--rms") {
            rms = true;
        } else if (s == "--loss-rel" || s == "--weight-rel") {
            if (a + 1 >= argc) usage();
            char* end = nullptr;
            double v = std::strtod(argv[++a], &end);
            if (!end || *end != '\0' || !(v >= 0)) die("bad value for " + s + ": " + argv[a]);
            (s == "--loss-rel" ? loss_tol : weight_tol) = v;
        } else if (s.size() > 1 && s[0] == '-') {
            usage();
        } else {
            pos.push_back(s);
        }
    }
    if (pos.size() != 4) usage();

    // ---- losses ----
    std::vector<Step> ref = read_losses(pos[0]), run = read_losses(pos[1]);
    if (ref.size() != run.size()) {
        std::printf("MISMATCH step count: %s has %zu steps, %s has %zu\n", pos[0].c_str(), ref.size(),
                    pos[1].c_str(), run.size());
        return 1;
    }
    double loss_worst = 0;
    size_t loss_at = 0;
    for (size_t k = 0; k < ref.size(); k++) {
        double r = rel(std::fabs(ref[k].loss - run[k].loss), std::fabs(ref[k].loss));
        if (worse(r, loss_worst)) { loss_worst = r; loss_at = k; }
    }
    long loss_step = ref[loss_at].step;

    // ---- weights ----
    TensorMap ta, tb;
    std::string err;
    if (!safetensors_read(pos[2], &ta, nullptr, &err)) die(err);
    if (!safetensors_read(pos[3], &tb, nullptr, &err)) die(err);
    for (const auto& kv : ta)
        if (!tb.count(kv.first)) {
            std::printf("MISMATCH tensor %s is in %s but not in %s\n", kv.first.c_str(), pos[2].c_str(),
                        pos[3].c_str());
            return 1;
        }
    for (const auto& kv : tb)
        if (!ta.count(kv.first)) {
            std::printf("MISMATCH tensor %s is in %s but not in %s\n", kv.first.c_str(), pos[3].c_str(),
                        pos[2].c_str());
            return 1;
        }
    double weight_worst = 0;
    std::string weight_at = "(no tensors)";
    for (const auto& kv : ta) {
        const Tensor& a = kv.second;
        const Tensor& b = tb.at(kv.first);
        if (a.shape != b.shape) {
            std::printf("MISMATCH tensor %s has shape %s in %s but %s in %s\n", kv.first.c_str(),
                        shape_str(a.shape).c_str(), pos[2].c_str(), shape_str(b.shape).c_str(), pos[3].c_str());
            return 1;
        }
        std::vector<double> va = values(a), vb = values(b);
        if (va.size() != vb.size()) die(kv.first + ": element counts differ despite equal shapes");
        double maxdiff = 0, maxabs = 0, sum_sq_diff = 0, sum_sq = 0;
        bool nan = false;
        for (size_t k = 0; k < va.size(); k++) {
            if (std::isnan(va[k]) || std::isnan(vb[k])) nan = true;
            maxdiff = std::max(maxdiff, std::fabs(va[k] - vb[k]));
            maxabs = std::max(maxabs, std::fabs(va[k]));
            sum_sq_diff += (va[k] - vb[k]) * (va[k] - vb[k]);
            sum_sq += va[k] * va[k];
        }
        double r = nan ? std::numeric_limits<double>::quiet_NaN()
                       : rms ? rel(std::sqrt(sum_sq_diff), std::sqrt(sum_sq)) : rel(maxdiff, maxabs);
        if (a.f.empty() && maxdiff != 0) {  // integer tensors (a --dump's ids, labels) must be equal
            std::printf("MISMATCH integer tensor %s differs (max |diff| %s)\n", kv.first.c_str(), fmt(maxdiff).c_str());
            return 1;
        }
        if (weight_at == "(no tensors)" || worse(r, weight_worst)) { weight_worst = r; weight_at = kv.first; }
    }

    bool loss_ok = loss_worst <= loss_tol;      // false for NaN
    bool weight_ok = weight_worst <= weight_tol;
    if (loss_ok && weight_ok) {
        std::printf("OK max loss rel %s at step %ld, max weight %srel %s at %s\n", fmt(loss_worst).c_str(),
                    loss_step, rms ? "rms " : "", fmt(weight_worst).c_str(), weight_at.c_str());
        return 0;
    }
    // failing parts first, then the part that passed in parentheses
    std::string loss_part = "loss rel " + fmt(loss_worst) + (loss_ok ? "" : " > " + fmt(loss_tol)) + " at step " +
                            std::to_string(loss_step);
    if (!loss_ok) loss_part += " (ref " + fmt_full(ref[loss_at].loss) + ", run " + fmt_full(run[loss_at].loss) + ")";
    std::string weight_part = std::string(rms ? "weight rms rel " : "weight rel ") + fmt(weight_worst) + (weight_ok ? "" : " > " + fmt(weight_tol)) +
                              " at " + weight_at;
    std::string msg = "MISMATCH ";
    if (!loss_ok && !weight_ok) msg += loss_part + "; " + weight_part;
    else if (!loss_ok) msg += loss_part + " (max " + weight_part + ")";
    else msg += weight_part + " (max " + loss_part + ")";
    std::printf("%s\n", msg.c_str());
    return 1;
}
