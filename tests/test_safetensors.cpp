// test_safetensors.cpp — checks for safetensors.h: the JSON parser and writer, safetensors
// round trips, hand-built BF16/F16/... files, every validation error, and atomic writes.
//
// Build and run:  g++ -std=c++17 -O2 -Wall -Wextra tests/test_safetensors.cpp -o tests/test_safetensors
//                 ./tests/test_safetensors
// Prints "PASS name" or "FAIL name: why" per check, then "N passed, M failed"; exits 1 on failure.

#include "../safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;

// ---- harness ----
// A check records its outcome on a small counter object passed around (no globals).

struct Results {
    int passed = 0, failed = 0;
    void check(const std::string& name, bool ok, const std::string& why) {
        if (ok) { passed++; std::printf("PASS %s\n", name.c_str()); }
        else { failed++; std::printf("FAIL %s: %s\n", name.c_str(), why.c_str()); }
    }
};

static bool json_equal(const Json& a, const Json& b) {
    if (a.kind != b.kind) return false;
    switch (a.kind) {
        case Json::Null: return true;
        case Json::Bool: return a.b == b.b;
        case Json::Number: return a.num == b.num;
        case Json::String: return a.str == b.str;
        case Json::Array:
            if (a.arr.size() != b.arr.size()) return false;
            for (size_t k = 0; k < a.arr.size(); k++)
                if (!json_equal(a.arr[k], b.arr[k])) return false;
            return true;
        case Json::Object:
            if (a.obj.size() != b.obj.size()) return false;
            for (size_t k = 0; k < a.obj.size(); k++)
                if (a.obj[k].first != b.obj[k].first || !json_equal(a.obj[k].second, b.obj[k].second)) return false;
            return true;
    }
    return false;
}

static uint32_t bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}

// Writes a raw safetensors file: 8-byte little-endian header length, header text, data.
static void write_raw(const std::string& path, const std::string& header, const std::vector<unsigned char>& data,
                      int64_t header_len_override = -1) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    uint64_t n = header_len_override >= 0 ? (uint64_t)header_len_override : header.size();
    for (int k = 0; k < 8; k++) f.put((char)((n >> (8 * k)) & 0xFF));
    f.write(header.data(), (std::streamsize)header.size());
    f.write((const char*)data.data(), (std::streamsize)data.size());
}

static void put_le(std::vector<unsigned char>* v, uint64_t x, int nbytes) {
    for (int k = 0; k < nbytes; k++) v->push_back((unsigned char)((x >> (8 * k)) & 0xFF));
}

// ---- json tests ----

static void test_json_parse(Results* R) {
    const std::string doc =
        "  {\"name\": \"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\/ \\b\\f\\n\\r\\t\","
        " \"raw\": \"h\xc3\xa9llo\","
        " \"nums\": [0, -0.5, 1.5e3, -2E-2, 1e+2, 12345678901234, 0.1],"
        " \"nested\": {\"a\": [true, false, null, [], {}], \"b\": {\"c\": [[1], [2, [3]]]}},"
        " \"zeta\": 1, \"alpha\": 2 }\n";
    Json j;
    std::string err;
    bool ok = json_parse(doc, &j, &err);
    R->check("json_parse_nested", ok, err);
    if (!ok) return;

    const Json* name = j.get("name");
    R->check("json_escapes", name && name->is_string() &&
             name->str == "caf\xc3\xa9 \xf0\x9f\x98\x80 \"q\" \\ / \b\f\n\r\t",
             name ? "got " + name->str : "missing");
    const Json* raw = j.get("raw");
    R->check("json_raw_utf8", raw && raw->str == "h\xc3\xa9llo", "raw UTF-8 not preserved");
    const Json* nums = j.get("nums");
    bool nums_ok = nums && nums->is_array() && nums->arr.size() == 7 && nums->arr[0].num == 0 &&
                   nums->arr[1].num == -0.5 && nums->arr[2].num == 1500 && nums->arr[3].num == -0.02 &&
                   nums->arr[4].num == 100 && nums->arr[5].num == 12345678901234.0 && nums->arr[6].num == 0.1;
    R->check("json_numbers", nums_ok, "number values wrong");
    const Json* c = j.get("nested") ? j.get("nested")->get("b") : nullptr;
    c = c ? c->get("c") : nullptr;
    R->check("json_nested_values", c && c->arr.size() == 2 && c->arr[1].arr[1].arr[0].num == 3 &&
             j.get("nested")->get("a")->arr[2].is_null() && j.get("nested")->get("a")->arr[0].b,
             "nested structure wrong");
    R->check("json_key_order", j.obj.size() == 6 && j.obj[4].first == "zeta" && j.obj[5].first == "alpha",
             "object keys reordered");
    R->check("json_get_absent", j.get("nope") == nullptr && j.get("name")->get("x") == nullptr,
             "get() should return nullptr");

    for (int indent : {0, 2}) {
        std::string text = json_dump(j, indent);
        Json back;
        std::string e2;
        bool ok2 = json_parse(text, &back, &e2);
        R->check("json_roundtrip_indent" + std::to_string(indent), ok2 && json_equal(j, back),
                 ok2 ? "values differ after dump/parse: " + text : e2);
    }

    // number formatting: integers without ".0", others round-trip exactly
    Json a = Json::array();
    for (double v : {768.0, -3.0, 0.0, 1e15, 1e-5, 0.1, 1.0 / 3.0, 6.02214076e23, 5e-324, 1e300})
        a.push(Json::number(v));
    std::string text = json_dump(a, 0);
    Json back;
    bool fmt_ok = json_parse(text, &back, &err) && json_equal(a, back) &&
                  text.rfind("[768,-3,0,1000000000000000,1e-05,0.1,", 0) == 0;
    R->check("json_number_format", fmt_ok, "got " + text);

    Json s = Json::string(std::string("a\x01\"\\\n", 5));
    R->check("json_string_escape", json_dump(s, 0) == "\"a\\u0001\\\"\\\\\\n\"", "got " + json_dump(s, 0));

    Json o = Json::object();
    o.set("x", Json::number(1));
    o.set("y", Json::array());
    o.set("x", Json::boolean(true));
    R->check("json_pretty", json_dump(o, 2) == "{\n  \"x\": true,\n  \"y\": []\n}", "got " + json_dump(o, 2));
    R->check("json_compact", json_dump(o, 0) == "{\"x\":true,\"y\":[]}", "got " + json_dump(o, 0));
}

static void test_json_malformed(Results* R) {
    const std::vector<std::string> bad = {
        "", "   ", "{", "[1,2", "{\"a\":1,}", "[1,]", "[,1]", "\"\\x\"", "{} x", "[1] [2]",
        "01", "1.", ".5", "+1", "-", "1e", "1e+", "0x10", "NaN", "Infinity", "tru", "nul",
        "{'a':1}", "[1 2]", "{\"a\" 1}", "{\"a\":}", "{1:2}", "\"abc", "\"a\nb\"", "\"\\u12G4\"",
        "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\xff\"", "\"\xc0\xaf\"",
        "\"\xed\xa0\x80\"", "{\"a\":1,\"a\":2}", "1e400",
        std::string(1000000, '['),  // must hit the depth cap, not overflow the stack
    };
    int rejected = 0;
    std::string first_miss, no_offset;
    for (const std::string& text : bad) {
        Json j;
        std::string err;
        if (!json_parse(text, &j, &err)) {
            rejected++;
            if (err.find("byte ") == std::string::npos && no_offset.empty()) no_offset = err;
        } else if (first_miss.empty()) {
            first_miss = text.substr(0, 40);
        }
    }
    R->check("json_malformed_rejected", rejected == (int)bad.size(), "accepted: " + first_miss);
    R->check("json_error_has_offset", no_offset.empty(), "no byte offset in: " + no_offset);

    Json j;
    std::string err;
    json_parse("[1, 2, x]", &j, &err);
    R->check("json_error_offset_value", err.find("byte 7") != std::string::npos, "got " + err);
    bool deep_ok = json_parse(std::string(100, '[') + std::string(100, ']'), &j, &err);
    R->check("json_moderate_nesting_ok", deep_ok, err);
}

// ---- safetensors tests ----

static void test_roundtrip(Results* R, const fs::path& dir) {
    const std::string path = (dir / "rt.safetensors").string();
    TensorMap in;
    const float inf = std::numeric_limits<float>::infinity();
    in["b.weight"] = tensor_f32({2, 3}, {1, -2, 3.5f, 1e-30f, -0.0f, 65504});
    in["a.scalar"] = tensor_f32({}, {42.25f});
    in["c.empty"] = tensor_f32({0, 4}, {});
    in["d.ids"] = tensor_i32({5}, {0, -1, INT32_MAX, INT32_MIN, 7});
    in["e.empty_ids"] = tensor_i32({3, 0}, {});
    in["f.special"] = tensor_f32({1, 1, 4}, {inf, -inf, std::numeric_limits<float>::quiet_NaN(), 1.17549435e-38f});
    std::vector<float> big(3 * 70000);
    for (size_t k = 0; k < big.size(); k++) big[k] = (float)k * 0.25f - 1000.0f;
    in["g.big"] = tensor_f32({3, 70000}, big);
    std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "tab\there \"quoted\""}};

    std::string err;
    bool ok = safetensors_write(path, in, meta, &err);
    R->check("st_write", ok, err);
    if (!ok) return;
    R->check("st_write_no_tmp_left", !fs::exists(path + ".tmp"), "tmp file left behind");

    TensorMap out;
    std::map<std::string, std::string> meta_out;
    ok = safetensors_read(path, &out, &meta_out, &err);
    R->check("st_read", ok, err);
    if (!ok) return;
    R->check("st_metadata", meta_out == meta, "metadata differs");

    std::string bad;
    for (const auto& kv : in) {
        auto it = out.find(kv.first);
        if (it == out.end()) { bad = kv.first + " missing"; break; }
        const Tensor& a = kv.second;
        const Tensor& b = it->second;
        if (a.shape != b.shape) { bad = kv.first + " shape"; break; }
        if (b.dtype != (a.i.empty() && a.dtype != "I32" ? "F32" : "I32")) { bad = kv.first + " dtype " + b.dtype; break; }
        if (a.i != b.i || a.f.size() != b.f.size()) { bad = kv.first + " data"; break; }
        for (size_t k = 0; k < a.f.size(); k++)
            if (bits(a.f[k]) != bits(b.f[k])) { bad = kv.first + " value " + std::to_string(k); break; }
        if (!bad.empty()) break;
    }
    R->check("st_roundtrip_values", bad.empty() && out.size() == in.size(), bad);
    R->check("st_scalar_numel", out["a.scalar"].numel() == 1 && out["c.empty"].numel() == 0, "numel wrong");

    // Layout as the Rust library writes it: header length a multiple of 8, space padded,
    // names sorted, data contiguous and filling the rest of the file exactly.
    std::ifstream f(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    uint64_t n = 0;
    for (int k = 7; k >= 0; k--) n = (n << 8) | (unsigned char)bytes[k];
    std::string header = bytes.substr(8, n);
    Json h;
    bool layout = n % 8 == 0 && json_parse(header, &h, &err) && h.obj.size() == in.size() + 1 &&
                  h.obj[0].first == "__metadata__";
    int64_t expect = 0;
    for (size_t k = 1; layout && k < h.obj.size(); k++) {
        const Json* offs = h.obj[k].second.get("data_offsets");
        layout = layout && (k == 1 || h.obj[k - 1].first < h.obj[k].first) && offs && offs->arr[0].num == expect;
        if (offs) expect = (int64_t)offs->arr[1].num;
    }
    layout = layout && (uint64_t)bytes.size() == 8 + n + (uint64_t)expect;
    R->check("st_layout", layout, "header: " + header.substr(0, 200));

    // no metadata → no __metadata__ key; metadata pointer may be null
    const std::string path2 = (dir / "nometa.safetensors").string();
    ok = safetensors_write(path2, {{"x", tensor_f32({1}, {1})}}, {}, &err) &&
         safetensors_read(path2, &out, nullptr, &err);
    R->check("st_no_metadata", ok && out.size() == 1 && out["x"].f[0] == 1.0f, err);
}

// A file with every non-F32 dtype, built byte by byte, the way torch/Rust would write it.
static void test_handbuilt(Results* R, const fs::path& dir) {
    const std::string path = (dir / "hand.safetensors").string();
    std::vector<unsigned char> d;
    // bf16: 1, -2, inf, 3.140625 (0x4049), smallest bf16 subnormal 0x0001
    for (uint16_t h : {0x3F80, 0xC000, 0x7F80, 0x4049, 0x0001}) put_le(&d, h, 2);  // 0..10
    // f16: 1, -2, 2^-24, 1023*2^-24, 65504, inf, -inf, nan, -0, 2^-14 (smallest normal)
    for (uint16_t h : {0x3C00, 0xC000, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x8000, 0x0400})
        put_le(&d, h, 2);  // 10..30
    // f64: 0.1, -1e10
    for (double x : {0.1, -1e10}) { uint64_t u; std::memcpy(&u, &x, 8); put_le(&d, u, 8); }  // 30..46
    // i64: -5, 2147483647, -2147483648
    for (int64_t x : {(int64_t)-5, (int64_t)2147483647, (int64_t)-2147483648LL}) put_le(&d, (uint64_t)x, 8);  // 46..70
    put_le(&d, (uint64_t)(int16_t)-300, 2); put_le(&d, 300, 2);          // i16 70..74
    d.push_back((unsigned char)(int8_t)-7); d.push_back(100);            // i8 74..76
    d.push_back(255); d.push_back(0);                                    // u8 76..78
    d.push_back(1); d.push_back(0); d.push_back(1);                      // bool 78..81
    const std::string header =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"bf\":{\"dtype\":\"BF16\",\"shape\":[5],\"data_offsets\":[0,10]},"
        "\"hf\":{\"dtype\":\"F16\",\"shape\":[2,5],\"data_offsets\":[10,30]},"
        "\"df\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[30,46]},"
        "\"l\":{\"dtype\":\"I64\",\"shape\":[3,1],\"data_offsets\":[46,70]},"
        "\"s\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[70,74]},"
        "\"c\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[74,76]},"
        "\"u\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[76,78]},"
        "\"m\":{\"dtype\":\"BOOL\",\"shape\":[3],\"data_offsets\":[78,81]}}";
    write_raw(path, header, d);

    TensorMap t;
    std::string err;
    bool ok = safetensors_read(path, &t, nullptr, &err);
    R->check("hand_read", ok, err);
    if (!ok) return;
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float>& bf = t["bf"].f;
    R->check("hand_bf16", t["bf"].dtype == "BF16" && bf.size() == 5 && bf[0] == 1 && bf[1] == -2 && bf[2] == inf &&
             bf[3] == 3.140625f && bits(bf[4]) == 0x00010000u, "bf16 values wrong");
    const std::vector<float>& hf = t["hf"].f;
    bool f16 = hf.size() == 10 && hf[0] == 1 && hf[1] == -2 && hf[2] == std::ldexp(1.0f, -24) &&
               hf[3] == std::ldexp(1023.0f, -24) && hf[4] == 65504 && hf[5] == inf && hf[6] == -inf &&
               std::isnan(hf[7]) && hf[8] == 0 && std::signbit(hf[8]) && hf[9] == std::ldexp(1.0f, -14) &&
               t["hf"].shape == std::vector<int64_t>{2, 5};
    R->check("hand_f16", f16, "f16 values wrong");
    R->check("hand_f64", t["df"].f.size() == 2 && t["df"].f[0] == 0.1f && t["df"].f[1] == -1e10f, "f64 wrong");
    R->check("hand_i64", t["l"].i == std::vector<int32_t>{-5, INT32_MAX, INT32_MIN}, "i64 wrong");
    R->check("hand_i16_i8_u8_bool", t["s"].i == std::vector<int32_t>{-300, 300} &&
             t["c"].i == std::vector<int32_t>{-7, 100} && t["u"].i == std::vector<int32_t>{255, 0} &&
             t["m"].i == std::vector<int32_t>{1, 0, 1}, "small integer dtypes wrong");
}

// Each corrupt file must be rejected with one line that names the file and the problem.
static void test_validation(Results* R, const fs::path& dir) {
    struct Case {
        std::string name, header;
        std::vector<unsigned char> data;
        std::string expect;  // substring the error must contain
        int64_t header_len = -1;
    };
    std::vector<unsigned char> eight(8, 0), i64big;
    put_le(&i64big, (uint64_t)1 << 40, 8);
    auto ent = [](const std::string& body) { return "{\"t\":{" + body + "}}"; };
    std::vector<Case> cases = {
        {"not_json", "{\"t\": [1,", eight, "JSON parse error"},
        {"not_object", "[1, 2]", eight, "not a JSON object"},
        {"entry_not_object", "{\"t\": 5}", eight, "not an object"},
        {"missing_dtype", ent("\"shape\":[2],\"data_offsets\":[0,8]"), eight, "missing dtype"},
        {"missing_shape", ent("\"dtype\":\"F32\",\"data_offsets\":[0,8]"), eight, "missing shape"},
        {"missing_offsets", ent("\"dtype\":\"F32\",\"shape\":[2]"), eight, "missing data_offsets"},
        {"unknown_dtype", ent("\"dtype\":\"F8_E4M3\",\"shape\":[8],\"data_offsets\":[0,8]"), eight, "unknown dtype"},
        {"offsets_order", ent("\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]"), eight, "out of order"},
        {"offsets_beyond", ent("\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]"), eight, "beyond"},
        {"offsets_size", ent("\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]"), eight, "needs 12"},
        {"negative_dim", ent("\"dtype\":\"F32\",\"shape\":[-1, 2],\"data_offsets\":[0,8]"), eight, "negative"},
        {"overlap",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", eight, "overlap"},
        {"i64_too_big", ent("\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]"), i64big, "does not fit in int32"},
        {"bad_metadata", "{\"__metadata__\":{\"k\":1}}", {}, "__metadata__"},
        {"header_len_too_big", "{}", {}, "larger than the file", 1000},
        {"huge_shape", ent("\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]"), eight,
         "too large"},
    };
    for (const Case& c : cases) {
        const std::string path = (dir / ("bad_" + c.name + ".safetensors")).string();
        write_raw(path, c.header, c.data, c.header_len);
        TensorMap t;
        std::string err;
        bool ok = safetensors_read(path, &t, nullptr, &err);
        // the message starts with the file name; the expected words must come after it
        bool good = !ok && err.rfind(path, 0) == 0 && err.find(c.expect, path.size()) != std::string::npos &&
                    err.find('\n') == std::string::npos;
        R->check("invalid_" + c.name, good, ok ? "accepted" : "error was: " + err);
    }

    // files that are missing or too short to hold the header length
    const std::string missing = (dir / "does_not_exist.safetensors").string();
    const std::string shortf = (dir / "short.safetensors").string();
    { std::ofstream(shortf, std::ios::binary) << "abc"; }
    for (const auto& pc : {std::make_pair(missing, std::string("cannot open")),
                           std::make_pair(shortf, std::string("shorter than"))}) {
        TensorMap t;
        std::string err;
        bool ok = safetensors_read(pc.first, &t, nullptr, &err);
        R->check("invalid_" + fs::path(pc.first).stem().string(),
                 !ok && err.rfind(pc.first, 0) == 0 && err.find(pc.second, pc.first.size()) != std::string::npos,
                 ok ? "accepted" : "error was: " + err);
    }

    // write-side validation
    std::string err;
    const std::string wpath = (dir / "w.safetensors").string();
    bool bad1 = !safetensors_write(wpath, {{"x", tensor_f32({2, 2}, {1, 2, 3})}}, {}, &err) &&
                err.find(wpath) != std::string::npos;
    Tensor both = tensor_f32({1}, {1});
    both.i = {1};
    bool bad2 = !safetensors_write(wpath, {{"x", both}}, {}, &err);
    bool bad3 = !safetensors_write(wpath, {{"__metadata__", tensor_f32({1}, {1})}}, {}, &err);
    R->check("write_rejects_bad_tensors", bad1 && bad2 && bad3 && !fs::exists(wpath) && !fs::exists(wpath + ".tmp"),
             "bad tensor accepted or file created");
}

// A failed write must leave the previous file intact and no half file under the path.
static void test_atomic(Results* R, const fs::path& dir) {
    const std::string path = (dir / "ckpt.safetensors").string();
    std::string err;
    bool ok = safetensors_write(path, {{"w", tensor_f32({2}, {1, 2})}}, {{"step", "1"}}, &err);
    R->check("atomic_first_write", ok, err);

    // A directory in the way of the temporary file makes the write fail before rename.
    fs::create_directory(path + ".tmp");
    TensorMap newer = {{"w", tensor_f32({3}, {7, 8, 9})}};
    bool failed = !safetensors_write(path, newer, {{"step", "2"}}, &err);
    R->check("atomic_write_fails", failed && err.find(path) != std::string::npos, failed ? err : "write succeeded");

    TensorMap t;
    std::map<std::string, std::string> meta;
    ok = safetensors_read(path, &t, &meta, &err);
    R->check("atomic_old_file_intact", ok && t["w"].f == std::vector<float>{1, 2} && meta["step"] == "1",
             ok ? "contents changed" : err);

    // An invalid tensor also fails before anything is written.
    failed = !safetensors_write(path, {{"w", tensor_f32({5}, {1})}}, {}, &err);
    ok = safetensors_read(path, &t, &meta, &err);
    R->check("atomic_invalid_tensor_intact", failed && ok && t["w"].f == std::vector<float>{1, 2}, err);

    // Once the obstacle is gone the overwrite goes through.
    fs::remove(path + ".tmp");
    ok = safetensors_write(path, newer, {{"step", "2"}}, &err) && safetensors_read(path, &t, &meta, &err);
    R->check("atomic_overwrite", ok && t["w"].f == std::vector<float>{7, 8, 9} && meta["step"] == "2", err);
}

// ---- main ----

int main() {
    Results R;
    std::random_device rd;
    fs::path dir = fs::temp_directory_path() / ("test_safetensors_" + std::to_string(rd()));
    fs::create_directories(dir);

    test_json_parse(&R);
    test_json_malformed(&R);
    test_roundtrip(&R, dir);
    test_handbuilt(&R, dir);
    test_validation(&R, dir);
    test_atomic(&R, dir);

    std::error_code ec;
    fs::remove_all(dir, ec);
    std::printf("%d passed, %d failed\n", R.passed, R.failed);
    return R.failed ? 1 : 0;
}
