// dump_info — what a --dump's batch holds, for the tests' traffic formulas (tests/parallel_tests.sh).
//
//   dump_info DIR/dump.safetensors N
//
// For every micro-batch k of the dump's labels (n_micro, T) — −100 where a token is not masked —
// prints one line
//   micro K tokens T masked M max_slice R
// M the micro-batch's masked tokens, R the most masked tokens any of N contiguous token slices
// holds (slice r = rows [r·T/N, (r+1)·T/N), the token slices of N sequence-parallel ranks).
// N must divide T. Exit 0, or 2 with one line on a usage or file error.
//
// Build: make tests/dump_info
#include "safetensors.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& msg) {
    std::printf("dump_info: %s\n", msg.c_str());
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) die("usage: dump_info DIR/dump.safetensors N");
    char* end = nullptr;
    long n = std::strtol(argv[2], &end, 10);
    if (!end || *end || n < 1) die(std::string("N must be a positive integer, got '") + argv[2] + "'");
    TensorMap t;
    std::string err;
    if (!safetensors_read(argv[1], &t, nullptr, &err)) die(err);
    if (!t.count("labels")) die(std::string(argv[1]) + ": no tensor 'labels'");
    const Tensor& labels = t.at("labels");
    if (labels.shape.size() != 2 || labels.i.empty() || (int64_t)labels.i.size() != labels.numel())
        die(std::string(argv[1]) + ": 'labels' is not an integer (n_micro, T) tensor");
    const int64_t micro = labels.shape[0], T = labels.shape[1];
    if (T % n) die("N " + std::to_string(n) + " does not divide the micro-batch's " + std::to_string(T) + " tokens");
    const int64_t slice = T / n;
    for (int64_t k = 0; k < micro; k++) {
        long masked = 0, most = 0;
        for (int64_t s = 0; s < n; s++) {
            long in_slice = 0;
            for (int64_t i = s * slice; i < (s + 1) * slice; i++) in_slice += labels.i[k * T + i] != -100;
            masked += in_slice;
            most = std::max(most, in_slice);
        }
        std::printf("micro %lld tokens %lld masked %ld max_slice %ld\n", (long long)k, (long long)T, masked, most);
    }
    return 0;
}
