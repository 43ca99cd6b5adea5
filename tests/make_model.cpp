// make_model — writes DIR/model.safetensors for the architecture in DIR/config.json, initialised
// as the trainer initialises (tp 1), so that the tests can train any architecture (an odd
// vocabulary, two heads on a small model) through --init-from without Python.
//
//   make_model DIR [SEED]
//
// Build: make tests/make_model (it includes picotron.cu for its config reader and initialiser).
#define PICOTRON_NO_MAIN
#include "../picotron.cu"

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);  // fatal() aborts through MPI
    if (argc < 2) fatal("usage: make_model DIR [SEED]");
    const std::string dir = argv[1];
    const uint64_t seed = argc > 2 ? (uint64_t)parse_int("SEED", argv[2], 0, 2147483647) : 42;
    const ModelConfig m = read_hf_config(dir);
    const ParamTable t = make_param_table(m);
    std::vector<float> flat;
    init_params(t, m, seed, &flat);
    std::string err;
    if (!safetensors_write(dir + "/model.safetensors", tensors_from_flat(t, flat, ""), {{"format", "pt"}}, &err))
        fatal("%s", err.c_str());
    printf("make_model: %s/model.safetensors, %zu parameters\n", dir.c_str(), t.full_total);
    MPI_Finalize();
    return 0;
}
