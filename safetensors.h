// safetensors.h — a small JSON value type and safetensors read/write.
//
// Header-only, C++17 standard library only, so the CPU build, the CUDA build (host code)
// and the tests share it. It serves config.json and model.safetensors (HF in and out),
// checkpoints and --dump.
//
// Errors never exit: every function that can fail returns bool and fills `err` with one
// line naming the file and the problem. The caller prints it and aborts all ranks.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <sys/stat.h>
#include <set>
#include <string>
#include <utility>
#include <vector>

// ---- json value ----
// One tagged struct for every JSON value. Objects are a vector of pairs rather than a map
// so that key order survives parse → dump (config.json stays diffable against HF's).
// Numbers are doubles, as in JavaScript and Python's json; integers are exact up to 2^53.

struct Json {
    enum Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Null;
    bool b = false;
    double num = 0.0;
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;  // keeps key order

    bool is_null() const { return kind == Null; }
    bool is_bool() const { return kind == Bool; }
    bool is_number() const { return kind == Number; }
    bool is_string() const { return kind == String; }
    bool is_array() const { return kind == Array; }
    bool is_object() const { return kind == Object; }
    // an integral number that a double holds exactly (|x| <= 2^53)
    bool is_integer() const {
        return kind == Number && std::floor(num) == num && std::fabs(num) <= 9007199254740992.0;
    }

    // nullptr if absent or if this is not an object (linear scan: objects here are small)
    const Json* get(const std::string& key) const {
        if (kind != Object) return nullptr;
        for (const auto& kv : obj)
            if (kv.first == key) return &kv.second;
        return nullptr;
    }
    // replace the value under key, or append it (keeps the original position); makes this an object
    void set(const std::string& key, Json value) {
        if (kind != Object) { *this = object(); }
        for (auto& kv : obj)
            if (kv.first == key) { kv.second = std::move(value); return; }
        obj.emplace_back(key, std::move(value));
    }
    void push(Json value) {
        if (kind != Array) { *this = array(); }
        arr.push_back(std::move(value));
    }

    static Json null() { return Json(); }
    static Json boolean(bool v) { Json j; j.kind = Bool; j.b = v; return j; }
    static Json number(double v) { Json j; j.kind = Number; j.num = v; return j; }
    static Json string(std::string v) { Json j; j.kind = String; j.str = std::move(v); return j; }
    static Json array() { Json j; j.kind = Array; return j; }
    static Json object() { Json j; j.kind = Object; return j; }
};

// ---- json parser ----
// Strict RFC 8259: one value surrounded by optional whitespace, nothing after it.
// Rejected: trailing commas, single quotes, leading zeros, NaN/Infinity, raw control
// characters in strings, bad escapes, lone surrogates, invalid UTF-8, duplicate object keys
// (RFC says "should be unique"; for a safetensors header a duplicate name is corruption).
// Nesting is capped so hostile input cannot overflow the stack. Errors give the byte offset.

namespace json_internal {

struct Parser {
    const std::string& s;
    size_t pos = 0;
    std::string msg;  // first error only
    size_t msg_pos = 0;

    explicit Parser(const std::string& text) : s(text) {}

    static constexpr int kMaxDepth = 512;

    bool fail(const std::string& m, size_t at) {
        if (msg.empty()) { msg = m; msg_pos = at; }
        return false;
    }
    bool eof() const { return pos >= s.size(); }
    void skip_ws() {
        while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r')) pos++;
    }
    bool literal(const char* word, Json* out, Json::Kind kind, bool b) {
        size_t n = std::strlen(word);
        if (s.compare(pos, n, word) != 0) return fail("invalid literal", pos);
        pos += n;
        out->kind = kind;
        out->b = b;
        return true;
    }

    bool value(Json* out, int depth) {
        skip_ws();
        if (eof()) return fail("unexpected end of input", pos);
        char c = s[pos];
        switch (c) {
            case '{': return object(out, depth);
            case '[': return array(out, depth);
            case '"': out->kind = Json::String; return string(&out->str);
            case 't': return literal("true", out, Json::Bool, true);
            case 'f': return literal("false", out, Json::Bool, false);
            case 'n': return literal("null", out, Json::Null, false);
            default:
                if (c == '-' || (c >= '0' && c <= '9')) return number(out);
                return fail(std::string("unexpected character '") + printable(c) + "'", pos);
        }
    }

    static std::string printable(char c) {
        unsigned char u = (unsigned char)c;
        if (u >= 0x20 && u < 0x7f) return std::string(1, c);
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\x%02x", u);
        return buf;
    }

    bool object(Json* out, int depth) {
        if (depth >= kMaxDepth) return fail("nesting too deep", pos);
        pos++;  // '{'
        *out = Json::object();
        std::set<std::string> seen;
        skip_ws();
        if (!eof() && s[pos] == '}') { pos++; return true; }
        for (;;) {
            skip_ws();
            if (eof()) return fail("unexpected end of input in object", pos);
            if (s[pos] != '"') return fail("expected string key", pos);
            size_t key_pos = pos;
            std::string key;
            if (!string(&key)) return false;
            if (!seen.insert(key).second) return fail("duplicate key \"" + key + "\"", key_pos);
            skip_ws();
            if (eof()) return fail("unexpected end of input in object", pos);
            if (s[pos] != ':') return fail("expected ':'", pos);
            pos++;
            Json v;
            if (!value(&v, depth + 1)) return false;
            out->obj.emplace_back(std::move(key), std::move(v));
            skip_ws();
            if (eof()) return fail("unexpected end of input in object", pos);
            if (s[pos] == ',') { pos++; continue; }
            if (s[pos] == '}') { pos++; return true; }
            return fail("expected ',' or '}'", pos);
        }
    }

    bool array(Json* out, int depth) {
        if (depth >= kMaxDepth) return fail("nesting too deep", pos);
        pos++;  // '['
        *out = Json::array();
        skip_ws();
        if (!eof() && s[pos] == ']') { pos++; return true; }
        for (;;) {
            Json v;
            if (!value(&v, depth + 1)) return false;
            out->arr.push_back(std::move(v));
            skip_ws();
            if (eof()) return fail("unexpected end of input in array", pos);
            if (s[pos] == ',') { pos++; continue; }
            if (s[pos] == ']') { pos++; return true; }
            return fail("expected ',' or ']'", pos);
        }
    }

    // Check the grammar by hand (strtod alone would accept "1.", ".5", "0x10", "inf"),
    // then let strtod do the correctly rounded conversion.
    bool number(Json* out) {
        size_t start = pos;
        auto digit = [&](size_t p) { return p < s.size() && s[p] >= '0' && s[p] <= '9'; };
        if (s[pos] == '-') pos++;
        if (!digit(pos)) return fail("invalid number", start);
        if (s[pos] == '0') {
            pos++;
            if (digit(pos)) return fail("invalid number (leading zero)", start);
        } else {
            while (digit(pos)) pos++;
        }
        if (pos < s.size() && s[pos] == '.') {
            pos++;
            if (!digit(pos)) return fail("invalid number (no digits after '.')", start);
            while (digit(pos)) pos++;
        }
        if (pos < s.size() && (s[pos] == 'e' || s[pos] == 'E')) {
            pos++;
            if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) pos++;
            if (!digit(pos)) return fail("invalid number (no digits in exponent)", start);
            while (digit(pos)) pos++;
        }
        std::string text = s.substr(start, pos - start);
        double v = std::strtod(text.c_str(), nullptr);
        if (std::isinf(v)) return fail("number out of range", start);
        out->kind = Json::Number;
        out->num = v;
        return true;
    }

    static void put_utf8(std::string* o, uint32_t cp) {
        if (cp < 0x80) {
            o->push_back((char)cp);
        } else if (cp < 0x800) {
            o->push_back((char)(0xC0 | (cp >> 6)));
            o->push_back((char)(0x80 | (cp & 0x3F)));
        } else if (cp < 0x10000) {
            o->push_back((char)(0xE0 | (cp >> 12)));
            o->push_back((char)(0x80 | ((cp >> 6) & 0x3F)));
            o->push_back((char)(0x80 | (cp & 0x3F)));
        } else {
            o->push_back((char)(0xF0 | (cp >> 18)));
            o->push_back((char)(0x80 | ((cp >> 12) & 0x3F)));
            o->push_back((char)(0x80 | ((cp >> 6) & 0x3F)));
            o->push_back((char)(0x80 | (cp & 0x3F)));
        }
    }

    bool hex4(size_t p, uint32_t* v) {
        if (p + 4 > s.size()) return fail("truncated \\u escape", p);
        uint32_t r = 0;
        for (size_t i = p; i < p + 4; i++) {
            char c = s[i];
            r <<= 4;
            if (c >= '0' && c <= '9') r |= (uint32_t)(c - '0');
            else if (c >= 'a' && c <= 'f') r |= (uint32_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') r |= (uint32_t)(c - 'A' + 10);
            else return fail("invalid hex digit in \\u escape", i);
        }
        *v = r;
        return true;
    }

    // Length of the well-formed UTF-8 sequence at p (RFC 3629: no overlongs, no surrogates,
    // nothing above U+10FFFF), or 0 if it is malformed.
    size_t utf8_len(size_t p) const {
        auto byte = [&](size_t i) { return i < s.size() ? (unsigned char)s[i] : 0u; };
        auto cont = [&](size_t i) { return (byte(i) & 0xC0) == 0x80; };
        unsigned c = byte(p);
        if (c >= 0xC2 && c <= 0xDF) return cont(p + 1) ? 2 : 0;
        if (c >= 0xE0 && c <= 0xEF) {
            unsigned c1 = byte(p + 1);
            if (c == 0xE0 && c1 < 0xA0) return 0;  // overlong
            if (c == 0xED && c1 > 0x9F) return 0;  // UTF-16 surrogate
            return cont(p + 1) && cont(p + 2) ? 3 : 0;
        }
        if (c >= 0xF0 && c <= 0xF4) {
            unsigned c1 = byte(p + 1);
            if (c == 0xF0 && c1 < 0x90) return 0;  // overlong
            if (c == 0xF4 && c1 > 0x8F) return 0;  // above U+10FFFF
            return cont(p + 1) && cont(p + 2) && cont(p + 3) ? 4 : 0;
        }
        return 0;
    }

    bool string(std::string* out) {
        size_t start = pos;
        pos++;  // opening quote
        out->clear();
        for (;;) {
            if (eof()) return fail("unterminated string", start);
            unsigned char c = (unsigned char)s[pos];
            if (c == '"') { pos++; return true; }
            if (c < 0x20) return fail("raw control character in string", pos);
            if (c >= 0x80) {
                size_t n = utf8_len(pos);
                if (n == 0) return fail("invalid UTF-8 in string", pos);
                out->append(s, pos, n);
                pos += n;
                continue;
            }
            if (c != '\\') { out->push_back((char)c); pos++; continue; }
            size_t esc = pos;
            pos++;
            if (eof()) return fail("unterminated string", start);
            char e = s[pos++];
            switch (e) {
                case '"': out->push_back('"'); break;
                case '\\': out->push_back('\\'); break;
                case '/': out->push_back('/'); break;
                case 'b': out->push_back('\b'); break;
                case 'f': out->push_back('\f'); break;
                case 'n': out->push_back('\n'); break;
                case 'r': out->push_back('\r'); break;
                case 't': out->push_back('\t'); break;
                case 'u': {
                    uint32_t cp;
                    if (!hex4(pos, &cp)) return false;
                    pos += 4;
                    if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("lone low surrogate in \\u escape", esc);
                    if (cp >= 0xD800 && cp <= 0xDBFF) {
                        // a high surrogate must be followed by \u and a low surrogate
                        if (pos + 1 >= s.size() || s[pos] != '\\' || s[pos + 1] != 'u')
                            return fail("lone high surrogate in \\u escape", esc);
                        uint32_t lo;
                        if (!hex4(pos + 2, &lo)) return false;
                        if (lo < 0xDC00 || lo > 0xDFFF) return fail("lone high surrogate in \\u escape", esc);
                        pos += 6;
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    put_utf8(out, cp);
                    break;
                }
                default: return fail(std::string("invalid escape '\\") + printable(e) + "'", esc);
            }
        }
    }
};

}  // namespace json_internal

// Parse text into *out. On failure *out is untouched and err reads
// "JSON parse error at byte N: <problem>" (callers prefix the file name).
inline bool json_parse(const std::string& text, Json* out, std::string* err) {
    json_internal::Parser p(text);
    Json v;
    bool ok = p.value(&v, 0);
    if (ok) {
        p.skip_ws();
        if (!p.eof()) ok = p.fail("trailing characters after the JSON value", p.pos);
    }
    if (!ok) {
        if (err) *err = "JSON parse error at byte " + std::to_string(p.msg_pos) + ": " + p.msg;
        return false;
    }
    *out = std::move(v);
    return true;
}

// ---- json writer ----
// indent 0 writes compact JSON ({"a":1,"b":[1,2]}), as serde_json does for safetensors
// headers; indent > 0 writes one item per line, like Python's json.dumps(indent=n).
// Integral numbers print without a fraction so that 768 stays 768 and never "768.0";
// others print in the shortest of %.15g/%.16g/%.17g that reads back to the same double
// (%.17g alone always round-trips but turns 1e-05 into 1.0000000000000001e-05).
// JSON has no NaN or infinity; they are written as null, as JavaScript does.

namespace json_internal {

inline void dump_number(std::string* o, double v) {
    char buf[40];
    if (!std::isfinite(v)) {
        *o += "null";
        return;
    }
    if (std::floor(v) == v && std::fabs(v) < 1e16 && !(v == 0.0 && std::signbit(v))) {
        std::snprintf(buf, sizeof buf, "%lld", (long long)v);
        *o += buf;
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        std::snprintf(buf, sizeof buf, "%.*g", prec, v);
        if (prec == 17 || std::strtod(buf, nullptr) == v) break;
    }
    *o += buf;
}

inline void dump_string(std::string* o, const std::string& s) {
    o->push_back('"');
    for (char ch : s) {
        unsigned char c = (unsigned char)ch;
        switch (c) {
            case '"': *o += "\\\""; break;
            case '\\': *o += "\\\\"; break;
            case '\b': *o += "\\b"; break;
            case '\f': *o += "\\f"; break;
            case '\n': *o += "\\n"; break;
            case '\r': *o += "\\r"; break;
            case '\t': *o += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    *o += buf;
                } else {
                    o->push_back(ch);  // UTF-8 passes through unchanged
                }
        }
    }
    o->push_back('"');
}

inline void newline(std::string* o, int indent, int level) {
    if (indent <= 0) return;
    o->push_back('\n');
    o->append((size_t)indent * (size_t)level, ' ');
}

inline void dump(std::string* o, const Json& v, int indent, int level) {
    switch (v.kind) {
        case Json::Null: *o += "null"; break;
        case Json::Bool: *o += v.b ? "true" : "false"; break;
        case Json::Number: dump_number(o, v.num); break;
        case Json::String: dump_string(o, v.str); break;
        case Json::Array:
            if (v.arr.empty()) { *o += "[]"; break; }
            o->push_back('[');
            for (size_t i = 0; i < v.arr.size(); i++) {
                if (i) o->push_back(',');
                newline(o, indent, level + 1);
                dump(o, v.arr[i], indent, level + 1);
            }
            newline(o, indent, level);
            o->push_back(']');
            break;
        case Json::Object:
            if (v.obj.empty()) { *o += "{}"; break; }
            o->push_back('{');
            for (size_t i = 0; i < v.obj.size(); i++) {
                if (i) o->push_back(',');
                newline(o, indent, level + 1);
                dump_string(o, v.obj[i].first);
                *o += indent > 0 ? ": " : ":";
                dump(o, v.obj[i].second, indent, level + 1);
            }
            newline(o, indent, level);
            o->push_back('}');
            break;
    }
}

}  // namespace json_internal

inline std::string json_dump(const Json& v, int indent) {
    std::string o;
    json_internal::dump(&o, v, indent, 0);
    return o;
}

// ---- files ----
// Whole-file reading for config.json and friends, plus the json_parse wrapper that puts the
// file name into the error, since the file name is what the user needs to see.

// Empty when path names a regular file; else why not ("is a directory", "no such file", ...).
inline std::string not_a_regular_file(const std::string& path) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return std::string("cannot open: ") + std::strerror(errno);
    if (S_ISDIR(st.st_mode)) return "is a directory, not a file";
    if (!S_ISREG(st.st_mode)) return "is not a regular file";
    return "";
}

inline constexpr int64_t kMaxTextFileBytes = 64ll << 20;  // config.json, latest: far smaller

inline bool read_text_file(const std::string& path, std::string* out, std::string* err) {
    const std::string why = not_a_regular_file(path);
    if (!why.empty()) {
        if (err) *err = path + ": " + why;
        return false;
    }
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && st.st_size > kMaxTextFileBytes) {
        if (err) *err = path + ": " + std::to_string((long long)st.st_size) + " bytes is too large for a text file";
        return false;
    }
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        if (err) *err = path + ": cannot open: " + std::strerror(errno);
        return false;
    }
    std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (f.bad()) {
        if (err) *err = path + ": read error";
        return false;
    }
    *out = std::move(data);
    return true;
}

inline bool json_parse_file(const std::string& path, Json* out, std::string* err) {
    std::string text, perr;
    if (!read_text_file(path, &text, err)) return false;
    if (!json_parse(text, out, &perr)) {
        if (err) *err = path + ": " + perr;
        return false;
    }
    return true;
}

// ---- tensor ----
// What a safetensors file holds, widened to the two types the trainer computes with:
// every float dtype arrives as fp32 in f, every integer dtype as int32 in i (token ids,
// labels, cu_seqlens). dtype keeps the name found in the file ("BF16", "I64", ...).

struct Tensor {
    std::string dtype;            // "F32", "BF16", "I32", ... (on write only F32/I32 come out)
    std::vector<int64_t> shape;   // [] is a scalar with one element
    std::vector<float> f;         // data of float dtypes
    std::vector<int32_t> i;       // data of integer dtypes
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        return n;
    }
};

using TensorMap = std::map<std::string, Tensor>;

inline Tensor tensor_f32(std::vector<int64_t> shape, std::vector<float> data) {
    Tensor t;
    t.dtype = "F32";
    t.shape = std::move(shape);
    t.f = std::move(data);
    return t;
}

inline Tensor tensor_i32(std::vector<int64_t> shape, std::vector<int32_t> data) {
    Tensor t;
    t.dtype = "I32";
    t.shape = std::move(shape);
    t.i = std::move(data);
    return t;
}

// ---- dtype conversion ----
// Bytes are assembled little-endian one at a time, so the code means the same on any host.
// bf16 is the top half of an fp32, so widening is a shift. fp16 has its own exponent bias
// (15) and subnormals, which become normal fp32 numbers.

namespace st_internal {

template <int N>
inline uint64_t load_le_n(const unsigned char* p) {
    uint64_t v = 0;
    for (int k = N - 1; k >= 0; k--) v = (v << 8) | p[k];
    return v;
}

// Dispatch to a fixed width so the compiler turns each case into one load.
inline uint64_t load_le(const unsigned char* p, int nbytes) {
    switch (nbytes) {
        case 1: return p[0];
        case 2: return load_le_n<2>(p);
        case 4: return load_le_n<4>(p);
        default: return load_le_n<8>(p);
    }
}

inline void store_le(unsigned char* p, uint64_t v, int nbytes) {
    for (int k = 0; k < nbytes; k++) { p[k] = (unsigned char)(v & 0xFF); v >>= 8; }
}

inline float bits_to_float(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

inline uint32_t float_to_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24, exactly representable in fp32
        float mag = std::ldexp((float)mant, -24);
        return sign ? -mag : mag;
    }
    if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf, nan (payload kept)
    return bits_to_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

// Everything the reader knows about a dtype: its size in bytes and how its bits decode.
enum class Enc { F64, F32, BF16, F16, Signed, Unsigned, Boolean };

struct DType {
    const char* name;
    int size;
    Enc enc;
    bool is_float() const { return enc == Enc::F64 || enc == Enc::F32 || enc == Enc::BF16 || enc == Enc::F16; }
};

inline const DType* find_dtype(const std::string& name) {
    static const DType table[] = {
        {"F64", 8, Enc::F64},     {"F32", 4, Enc::F32},     {"BF16", 2, Enc::BF16},  {"F16", 2, Enc::F16},
        {"I64", 8, Enc::Signed},  {"I32", 4, Enc::Signed},  {"I16", 2, Enc::Signed}, {"I8", 1, Enc::Signed},
        {"U64", 8, Enc::Unsigned}, {"U32", 4, Enc::Unsigned}, {"U16", 2, Enc::Unsigned}, {"U8", 1, Enc::Unsigned},
        {"BOOL", 1, Enc::Boolean},
    };
    for (const DType& d : table)
        if (name == d.name) return &d;
    return nullptr;
}

// Widen n elements of raw little-endian bytes into t->f or t->i (already sized), starting at
// element `first`. Integers that do not fit int32 (from I64, U32, U64) are an error rather
// than a silent wrap.
inline bool convert(const DType& dt, const unsigned char* p, int64_t n, int64_t first, Tensor* t, std::string* why) {
    if (dt.is_float()) {
        float* out = t->f.data() + first;
        for (int64_t k = 0; k < n; k++) {
            const uint64_t u = load_le(p + k * dt.size, dt.size);
            float x = 0.0f;
            switch (dt.enc) {
                case Enc::F32: x = bits_to_float((uint32_t)u); break;
                case Enc::BF16: x = bf16_to_f32((uint16_t)u); break;
                case Enc::F16: x = f16_to_f32((uint16_t)u); break;
                default: {  // F64, rounded to nearest fp32
                    double d;
                    std::memcpy(&d, &u, 8);
                    x = (float)d;
                }
            }
            out[k] = x;
        }
        return true;
    }
    int32_t* out = t->i.data() + first;
    const int shift = 64 - 8 * dt.size;  // for sign extension of narrower signed types
    for (int64_t k = 0; k < n; k++) {
        const uint64_t u = load_le(p + k * dt.size, dt.size);
        int64_t v;
        if (dt.enc == Enc::Boolean) v = u != 0;
        else if (dt.enc == Enc::Signed) v = (int64_t)(u << shift) >> shift;
        else v = u > (uint64_t)INT32_MAX ? INT64_MAX : (int64_t)u;  // too big: flagged below
        if (v < INT32_MIN || v > INT32_MAX) {
            *why = "element " + std::to_string(first + k) + " of " + dt.name + " does not fit in int32";
            return false;
        }
        out[k] = (int32_t)v;
    }
    return true;
}

}  // namespace st_internal

// ---- safetensors read ----
// Layout: u64 little-endian N, N bytes of JSON header, then the byte buffer. The header maps
// each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative
// to the buffer, plus an optional "__metadata__" object of string → string.
// Everything is validated before any tensor is trusted: a corrupt file must produce one
// clear line, never a crash or a silently wrong model. Tensors are read one at a time by
// seeking, so a 600 MB model never sits in memory twice.

inline bool safetensors_read(const std::string& path, TensorMap* out,
                             std::map<std::string, std::string>* metadata, std::string* err) {
    using namespace st_internal;
    auto fail = [&](const std::string& m) {
        if (err) *err = path + ": " + m;
        return false;
    };
    const std::string why = not_a_regular_file(path);
    if (!why.empty()) return fail(why);
    std::ifstream f(path, std::ios::binary);
    if (!f) return fail(std::string("cannot open: ") + std::strerror(errno));
    f.seekg(0, std::ios::end);
    const int64_t file_size = (int64_t)f.tellg();
    f.seekg(0, std::ios::beg);
    if (!f || file_size < 0) return fail("cannot determine file size");
    if (file_size < 8) return fail("file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");

    unsigned char len_bytes[8];
    if (!f.read((char*)len_bytes, 8)) return fail("read error in header length");
    const uint64_t header_len = load_le(len_bytes, 8);
    if (header_len > (uint64_t)(file_size - 8))
        return fail("header length " + std::to_string(header_len) + " is larger than the file (" +
                    std::to_string(file_size) + " bytes)");
    // The Rust library caps headers at 100 MB too; a bigger one is corruption, not a model.
    if (header_len > 100000000ull) return fail("header length " + std::to_string(header_len) + " exceeds 100 MB");
    std::string header((size_t)header_len, '\0');
    if (header_len > 0 && !f.read(&header[0], (std::streamsize)header_len)) return fail("read error in header");
    const int64_t data_start = 8 + (int64_t)header_len;
    const int64_t buffer_size = file_size - data_start;

    Json root;
    std::string perr;
    if (!json_parse(header, &root, &perr)) return fail("header: " + perr);
    if (!root.is_object()) return fail("header is not a JSON object");

    // First pass: validate every entry and collect (begin, end, name) for the layout checks.
    struct Entry {
        int64_t begin, end;
        std::string name;
        const DType* dt;
        std::vector<int64_t> shape;
    };
    std::vector<Entry> entries;
    std::map<std::string, std::string> meta;
    for (const auto& kv : root.obj) {
        const std::string& name = kv.first;
        const Json& v = kv.second;
        if (name == "__metadata__") {
            if (!v.is_object()) return fail("__metadata__ is not an object");
            for (const auto& m : v.obj) {
                if (!m.second.is_string()) return fail("__metadata__ value for \"" + m.first + "\" is not a string");
                meta[m.first] = m.second.str;
            }
            continue;
        }
        const std::string where = "tensor \"" + name + "\": ";
        if (!v.is_object()) return fail(where + "entry is not an object");
        const Json* dtype = v.get("dtype");
        const Json* shape = v.get("shape");
        const Json* offs = v.get("data_offsets");
        if (!dtype) return fail(where + "missing dtype");
        if (!shape) return fail(where + "missing shape");
        if (!offs) return fail(where + "missing data_offsets");
        if (!dtype->is_string()) return fail(where + "dtype is not a string");
        Entry e;
        e.name = name;
        e.dt = find_dtype(dtype->str);
        if (!e.dt) return fail(where + "unknown dtype \"" + dtype->str + "\"");
        if (!shape->is_array()) return fail(where + "shape is not an array");
        // numel and byte size with overflow checks: a hostile shape must not wrap around
        int64_t numel = 1;
        for (const Json& d : shape->arr) {
            if (!d.is_integer()) return fail(where + "shape has a non-integer dimension");
            if (d.num < 0) return fail(where + "shape has a negative dimension (" + json_dump(d, 0) + ")");
            int64_t dim = (int64_t)d.num;
            e.shape.push_back(dim);
            if (dim != 0 && numel > INT64_MAX / dim) return fail(where + "shape is too large");
            numel *= dim;
        }
        if (numel > INT64_MAX / e.dt->size) return fail(where + "shape is too large");
        const int64_t nbytes = numel * e.dt->size;
        if (!offs->is_array() || offs->arr.size() != 2 || !offs->arr[0].is_integer() || !offs->arr[1].is_integer() ||
            offs->arr[0].num < 0 || offs->arr[1].num < 0)
            return fail(where + "data_offsets is not a pair of non-negative integers");
        e.begin = (int64_t)offs->arr[0].num;
        e.end = (int64_t)offs->arr[1].num;
        const std::string range = "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
        if (e.begin > e.end) return fail(where + range + " out of order (begin > end)");
        if (e.end > buffer_size)
            return fail(where + range + " beyond the data buffer (" + std::to_string(buffer_size) + " bytes)");
        if (e.end - e.begin != nbytes)
            return fail(where + range + " span " + std::to_string(e.end - e.begin) + " bytes but shape x " +
                        dtype->str + " needs " + std::to_string(nbytes));
        entries.push_back(std::move(e));
    }

    // Second pass: no two tensors may share bytes (sorted by begin, each starts at or after
    // the previous end). Holes are tolerated; they cost nothing to skip.
    std::vector<const Entry*> order;
    for (const Entry& e : entries) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
        return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    for (size_t k = 1; k < order.size(); k++)
        if (order[k]->begin < order[k - 1]->end)
            return fail("tensors \"" + order[k - 1]->name + "\" and \"" + order[k]->name + "\" overlap in the data buffer");

    // Third pass: read and widen each tensor, in 1 MiB chunks so the raw bytes never need a
    // second copy of the tensor in memory.
    TensorMap result;
    std::vector<unsigned char> raw;
    for (const Entry& e : entries) {
        Tensor t;
        t.dtype = e.dt->name;
        t.shape = e.shape;
        const int64_t numel = (e.end - e.begin) / e.dt->size;
        if (e.dt->is_float()) t.f.resize((size_t)numel);
        else t.i.resize((size_t)numel);
        f.seekg(data_start + e.begin, std::ios::beg);
        const int64_t per_chunk = (1 << 20) / e.dt->size;
        for (int64_t k0 = 0; k0 < numel; k0 += per_chunk) {
            const int64_t n = std::min(per_chunk, numel - k0);
            raw.resize((size_t)(n * e.dt->size));
            if (!f.read((char*)raw.data(), (std::streamsize)raw.size()))
                return fail("tensor \"" + e.name + "\": read error");
            std::string why;
            if (!convert(*e.dt, raw.data(), n, k0, &t, &why)) return fail("tensor \"" + e.name + "\": " + why);
        }
        result[e.name] = std::move(t);
    }
    *out = std::move(result);
    if (metadata) *metadata = std::move(meta);
    return true;
}

// ---- safetensors write ----
// Writes F32 for tensors that hold f and I32 for tensors that hold i (an empty tensor goes
// by its dtype field). Names in sorted order (std::map), data contiguous in that order, the
// header padded with spaces to a multiple of 8 bytes as the Rust library does, so the
// buffer is 8-byte aligned for anyone who mmaps it.
// Everything is checked before the file is opened, the bytes go to path + ".tmp", and only a
// complete file is renamed over path: a failed write never leaves a half file under path.

inline bool safetensors_write(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata, std::string* err) {
    using namespace st_internal;
    auto fail = [&](const std::string& m) {
        if (err) *err = path + ": " + m;
        return false;
    };

    // Decide each tensor's dtype and check its data size against its shape.
    std::vector<bool> is_int;
    for (const auto& kv : tensors) {
        const std::string& name = kv.first;
        const Tensor& t = kv.second;
        const std::string where = "tensor \"" + name + "\": ";
        if (name == "__metadata__") return fail("\"__metadata__\" is reserved and cannot name a tensor");
        if (!t.f.empty() && !t.i.empty()) return fail(where + "holds both float and integer data");
        const DType* dt = find_dtype(t.dtype);
        bool integer = !t.i.empty() || (t.f.empty() && dt && !dt->is_float());
        int64_t numel = 1;
        for (int64_t d : t.shape) {
            if (d < 0) return fail(where + "negative dimension in shape");
            if (d != 0 && numel > INT64_MAX / d) return fail(where + "shape is too large");
            numel *= d;
        }
        size_t have = integer ? t.i.size() : t.f.size();
        if ((uint64_t)numel != (uint64_t)have)
            return fail(where + "shape needs " + std::to_string(numel) + " elements but data has " + std::to_string(have));
        is_int.push_back(integer);
    }

    // Header: __metadata__ first (omitted when empty, like the Rust library), then the tensors.
    Json header = Json::object();
    if (!metadata.empty()) {
        Json m = Json::object();
        for (const auto& kv : metadata) m.obj.emplace_back(kv.first, Json::string(kv.second));
        header.obj.emplace_back("__metadata__", std::move(m));
    }
    int64_t offset = 0;
    size_t idx = 0;
    for (const auto& kv : tensors) {
        const Tensor& t = kv.second;
        const int64_t nbytes = (int64_t)(is_int[idx] ? t.i.size() : t.f.size()) * 4;
        Json e = Json::object();
        e.set("dtype", Json::string(is_int[idx] ? "I32" : "F32"));
        Json shape = Json::array();
        for (int64_t d : t.shape) shape.push(Json::number((double)d));
        e.set("shape", std::move(shape));
        Json offs = Json::array();
        offs.push(Json::number((double)offset));
        offs.push(Json::number((double)(offset + nbytes)));
        e.set("data_offsets", std::move(offs));
        header.obj.emplace_back(kv.first, std::move(e));
        offset += nbytes;
        idx++;
    }
    std::string text = json_dump(header, 0);
    while (text.size() % 8 != 0) text.push_back(' ');

    const std::string tmp = path + ".tmp";
    std::FILE* fp = std::fopen(tmp.c_str(), "wb");
    if (!fp) return fail("cannot create " + tmp + ": " + std::strerror(errno));
    errno = 0;
    bool ok = true;
    unsigned char len_bytes[8];
    store_le(len_bytes, (uint64_t)text.size(), 8);
    ok = ok && std::fwrite(len_bytes, 1, 8, fp) == 8;
    ok = ok && std::fwrite(text.data(), 1, text.size(), fp) == text.size();
    // Data in chunks, converted to little-endian bytes (a no-op copy on every host we run on).
    std::vector<unsigned char> chunk;
    idx = 0;
    for (const auto& kv : tensors) {
        const Tensor& t = kv.second;
        const size_t n = is_int[idx] ? t.i.size() : t.f.size();
        const size_t per = 1 << 16;
        for (size_t k0 = 0; ok && k0 < n; k0 += per) {
            size_t k1 = std::min(n, k0 + per);
            chunk.resize((k1 - k0) * 4);
            for (size_t k = k0; k < k1; k++) {
                uint32_t u = is_int[idx] ? (uint32_t)t.i[k] : float_to_bits(t.f[k]);
                store_le(&chunk[(k - k0) * 4], u, 4);
            }
            ok = std::fwrite(chunk.data(), 1, chunk.size(), fp) == chunk.size();
        }
        idx++;
    }
    ok = (std::fflush(fp) == 0) && ok;
    const int write_errno = errno;
    ok = (std::fclose(fp) == 0) && ok;
    if (!ok) {
        std::remove(tmp.c_str());
        return fail("write error on " + tmp + ": " + std::strerror(write_errno ? write_errno : errno));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int e = errno;
        std::remove(tmp.c_str());
        return fail("cannot rename " + tmp + " to " + path + ": " + std::strerror(e));
    }
    return true;
}
