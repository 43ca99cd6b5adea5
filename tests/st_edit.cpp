// st_edit — makes broken safetensors files for the bad-input tests (no Python in make test).
//
//   st_edit IN OUT [--meta KEY=VALUE]... [--set NAME INDEX VALUE]... [--drop NAME]...
//
// --meta sets (or adds) a metadata string; --set overwrites one float element (VALUE may be nan
// or inf); --drop removes a tensor. Writes OUT (which may be IN). One line and exit 2 on error.
//
// Build: g++ -std=c++17 -O2 -I. tests/st_edit.cpp -o tests/st_edit
#include "safetensors.h"

#include <cstdio>
#include <cstdlib>
#include <string>

[[noreturn]] static void die(const std::string& msg) {
    std::printf("st_edit: %s\n", msg.c_str());
    std::exit(2);
}

int main(int argc, char** argv) {
    if (argc < 3) die("usage: st_edit IN OUT [--meta KEY=VALUE]... [--set NAME INDEX VALUE]... [--drop NAME]...");
    TensorMap tensors;
    std::map<std::string, std::string> meta;
    std::string err;
    if (!safetensors_read(argv[1], &tensors, &meta, &err)) die(err);
    for (int a = 3; a < argc; a++) {
        std::string flag = argv[a];
        if (flag == "--meta" && a + 1 < argc) {
            std::string kv = argv[++a];
            size_t eq = kv.find('=');
            if (eq == std::string::npos) die("--meta wants KEY=VALUE, got " + kv);
            meta[kv.substr(0, eq)] = kv.substr(eq + 1);
        } else if (flag == "--set" && a + 3 < argc) {
            std::string name = argv[a + 1];
            size_t index = std::strtoull(argv[a + 2], nullptr, 10);
            float value = std::strtof(argv[a + 3], nullptr);
            a += 3;
            auto it = tensors.find(name);
            if (it == tensors.end() || index >= it->second.f.size()) die("no float element " + name + "[" + std::to_string(index) + "]");
            it->second.f[index] = value;
        } else if (flag == "--drop" && a + 1 < argc) {
            if (!tensors.erase(argv[++a])) die(std::string("no tensor ") + argv[a]);
        } else {
            die("unknown or incomplete argument " + flag);
        }
    }
    if (!safetensors_write(argv[2], tensors, meta, &err)) die(err);
    return 0;
}
