// tests/test_data.cpp — unit tests of data.h: shards, dataset loading and its errors,
// packing, MLM masking, the word tokenizer and text corpus preparation.
//
//   g++ -std=c++17 -O2 -Wall -Wextra -I. tests/test_data.cpp -o tests/test_data && tests/test_data
//
// Prints "PASS name" or "FAIL name: why" per check and ends with "N passed, M failed";
// exits 1 if anything failed. Needs no GPU, no network, no data: every file it reads it
// writes first, under a fresh temporary directory that it removes at the end.
#include "data.h"

#include <chrono>
#include <cmath>
#include <cstring>

namespace fs = std::filesystem;

// ---- test harness ----
// A Checker counts results; each check names itself and, when it fails, says why.

struct Checker {
    int passed = 0, failed = 0;
    bool check(bool ok, const std::string& name, const std::string& why = "") {
        if (ok) {
            passed++;
            std::printf("PASS %s\n", name.c_str());
        } else {
            failed++;
            std::printf("FAIL %s: %s\n", name.c_str(), why.empty() ? "check failed" : why.c_str());
        }
        return ok;
    }
};

static std::string str(uint64_t x) { return std::to_string(x); }

static bool write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write((const char*)bytes.data(), (std::streamsize)bytes.size());
    return (bool)f;
}

static std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
static std::string num(double x) { return std::to_string(x); }

static bool write_text(const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << text;
    return (bool)f;
}

// A shard built byte by byte, so each header field can be broken on purpose.
static std::vector<unsigned char> raw_shard(const char* magic, uint32_t version, uint32_t width,
                                            uint64_t n_tokens, uint32_t vocab,
                                            const std::vector<uint32_t>& tokens) {
    std::vector<unsigned char> bytes(32, 0);
    std::memcpy(bytes.data(), magic, 8);
    put_le(&bytes[8], version, 4);
    put_le(&bytes[12], width, 4);
    put_le(&bytes[16], n_tokens, 8);
    put_le(&bytes[24], vocab, 4);
    const uint32_t w = (width == 2 || width == 4) ? width : 2;
    for (uint32_t t : tokens) {
        unsigned char b[4];
        put_le(b, t, (int)w);
        bytes.insert(bytes.end(), b, b + w);
    }
    return bytes;
}

// A synthetic dataset: n_docs documents [CLS] w w ... [SEP] with lengths in [min_len,
// max_len], ordinary ids in [0, 1000). Returned through load_dataset so the test uses the
// real document cutting.
static Dataset synthetic_dataset(const std::string& dir, const std::string& name, int n_docs,
                                 int min_len, int max_len, int seq_len, uint64_t seed) {
    std::vector<uint32_t> tokens;
    for (int d = 0; d < n_docs; d++) {
        const int len = min_len + (int)(hash4(seed, (uint64_t)d, 7, 7) % (uint64_t)(max_len - min_len + 1));
        tokens.push_back(kClsId);
        for (int p = 0; p < len - 2; p++) tokens.push_back((uint32_t)(hash4(seed, (uint64_t)d, (uint64_t)p, 8) % 1000));
        tokens.push_back(kSepId);
    }
    const std::string path = dir + "/" + name;
    std::string err;
    Dataset ds;
    if (!write_shard(path, tokens, kModernBertVocab, &err) ||
        !load_dataset(path, seq_len, kModernBertVocab, kModernBertSpecialIds, &ds, &err)) {
        std::printf("synthetic dataset failed: %s\n", err.c_str());
        std::exit(1);
    }
    return ds;
}

static bool same_batch(const MicroBatch& a, const MicroBatch& b) {
    return a.T == b.T && a.ids == b.ids && a.labels == b.labels && a.positions == b.positions &&
           a.cu_seqlens == b.cu_seqlens && a.n_docs == b.n_docs && a.n_real == b.n_real &&
           a.n_masked == b.n_masked && a.masked_rows == b.masked_rows &&
           a.sample_index == b.sample_index;
}

// The packing rule, written out a second time as plainly as possible: shuffle, then best
// fit over at most 16 open bins, emit the fullest on overflow, flush in opening order.
static std::vector<std::vector<uint32_t>> reference_bins(const Dataset& ds, int T, uint64_t seed, uint64_t epoch) {
    std::vector<uint32_t> order(ds.docs.size());
    for (size_t i = 0; i < order.size(); i++) order[i] = (uint32_t)i;
    for (size_t i = order.size() - 1; i > 0; i--)
        std::swap(order[i], order[hash4(seed, epoch, i, kShuffleStream) % (i + 1)]);
    std::vector<std::vector<uint32_t>> emitted, open;
    std::vector<int> room;
    for (uint32_t d : order) {
        const int len = ds.docs[d].len;
        int best = -1;
        for (int k = 0; k < (int)open.size(); k++)
            if (room[k] >= len && (best == -1 || room[k] < room[best])) best = k;
        if (best != -1) {
            open[best].push_back(d);
            room[best] -= len;
            continue;
        }
        open.push_back({d});
        room.push_back(T - len);
        if (open.size() > 16) {
            const int fullest = (int)(std::min_element(room.begin(), room.end()) - room.begin());
            emitted.push_back(open[fullest]);
            open.erase(open.begin() + fullest);
            room.erase(room.begin() + fullest);
        }
    }
    emitted.insert(emitted.end(), open.begin(), open.end());
    return emitted;
}

static std::vector<std::vector<uint32_t>> bins_of_epoch(Loader& loader, uint64_t epoch) {
    std::vector<std::vector<uint32_t>> bins;
    for (uint64_t s = loader.epoch_start(epoch); s < loader.epoch_start(epoch + 1); s++)
        bins.push_back(loader.docs_of(s));
    return bins;
}

// ---- shards ----

static void test_shards(Checker& c, const std::string& dir) {
    std::string err;
    // width 2: the ModernBERT vocabulary fits 16 bits
    std::vector<uint32_t> small = {kClsId, 0, 1, 65, 50279, kMaskId, kSepId, 50367};
    const std::string p2 = dir + "/w2.bin";
    bool ok = write_shard(p2, small, kModernBertVocab, &err);
    c.check(ok && fs::file_size(p2) == 32 + 2 * small.size() && !fs::exists(p2 + ".tmp"),
            "shard_write_width2", ok ? "size " + str(fs::exists(p2) ? fs::file_size(p2) : 0) : err);
    Dataset ds;
    ok = load_dataset(p2, 128, kModernBertVocab, kModernBertSpecialIds, &ds, &err);
    c.check(ok && ds.tokens == small && ds.vocab_size == kModernBertVocab, "shard_roundtrip_width2",
            ok ? "tokens differ" : err);

    // width 4: a vocabulary beyond 65536
    std::vector<uint32_t> big = {kClsId, 70000, 99999, 65536, 3, kSepId};
    const std::string p4 = dir + "/w4.bin";
    ok = write_shard(p4, big, 100000, &err);
    c.check(ok && fs::file_size(p4) == 32 + 4 * big.size(), "shard_write_width4", err);
    ok = load_dataset(p4, 128, 100000, kModernBertSpecialIds, &ds, &err);
    c.check(ok && ds.tokens == big && ds.vocab_size == 100000, "shard_roundtrip_width4",
            ok ? "tokens differ" : err);

    // the header fields, byte by byte
    std::ifstream f(p4, std::ios::binary);
    unsigned char h[32];
    f.read((char*)h, 32);
    c.check(std::memcmp(h, "PICOTOK1", 8) == 0 && get_le(h + 8, 4) == 1 && get_le(h + 12, 4) == 4 &&
                get_le(h + 16, 8) == big.size() && get_le(h + 24, 4) == 100000 && get_le(h + 28, 4) == 0,
            "shard_header_layout");

    ok = write_shard(dir + "/bad_write.bin", {1, 2, 500}, 500, &err);
    c.check(!ok && err.find("bad_write.bin") != std::string::npos && !fs::exists(dir + "/bad_write.bin"),
            "shard_write_rejects_id_beyond_vocab", ok ? "accepted" : err);
}

// ---- load errors ----
// Each malformed input must give false and one line that names the offending file.

static void expect_load_error(Checker& c, const std::string& name, const std::string& path,
                              const std::string& must_name, const std::string& must_say,
                              uint32_t model_vocab = kModernBertVocab) {
    Dataset ds;
    std::string err;
    const bool ok = load_dataset(path, 128, model_vocab, kModernBertSpecialIds, &ds, &err);
    const bool good = !ok && err.find(must_name) != std::string::npos &&
                      err.find(must_say) != std::string::npos && err.find('\n') == std::string::npos &&
                      ds.tokens.empty() && ds.docs.empty();
    c.check(good, name, ok ? "load succeeded" : "message: " + err);
}

static void test_load_errors(Checker& c, const std::string& dir) {
    const std::vector<uint32_t> toks = {kClsId, 1, 2, 3, kSepId};
    expect_load_error(c, "load_error_missing_path", dir + "/nope.bin", "nope.bin", "no such");

    const std::string empty_dir = dir + "/empty_dir";
    fs::create_directories(empty_dir);
    write_text(empty_dir + "/notes.txt", "not a shard");
    expect_load_error(c, "load_error_dir_without_bin", empty_dir, "empty_dir", ".bin");

    const std::string short_path = dir + "/short.bin";
    write_bytes(short_path, std::vector<unsigned char>(20, 0));
    expect_load_error(c, "load_error_short_file", short_path, "short.bin", "shorter");

    const std::string magic_path = dir + "/magic.bin";
    write_bytes(magic_path, raw_shard("PICOTOK2", 1, 2, toks.size(), kModernBertVocab, toks));
    expect_load_error(c, "load_error_wrong_magic", magic_path, "magic.bin", "magic");

    const std::string version_path = dir + "/version.bin";
    write_bytes(version_path, raw_shard("PICOTOK1", 2, 2, toks.size(), kModernBertVocab, toks));
    expect_load_error(c, "load_error_version", version_path, "version.bin", "version 2");

    const std::string width_path = dir + "/width.bin";
    write_bytes(width_path, raw_shard("PICOTOK1", 1, 3, toks.size(), kModernBertVocab, toks));
    expect_load_error(c, "load_error_token_width", width_path, "width.bin", "width 3");

    const std::string size_path = dir + "/size.bin";
    write_bytes(size_path, raw_shard("PICOTOK1", 1, 2, toks.size() + 3, kModernBertVocab, toks));
    expect_load_error(c, "load_error_size_mismatch", size_path, "size.bin", "promises 8 tokens");

    const std::string vocab_path = dir + "/vocab.bin";
    write_bytes(vocab_path, raw_shard("PICOTOK1", 1, 4, toks.size(), 60000, toks));
    expect_load_error(c, "load_error_shard_vocab_too_big", vocab_path, "vocab.bin", "60000");

    const std::string id_path = dir + "/bad_id.bin";
    write_bytes(id_path, raw_shard("PICOTOK1", 1, 2, 5, 1000, {kClsId % 1000, 1, 2, 1500, 4}));
    expect_load_error(c, "load_error_token_beyond_model_vocab", id_path, "bad_id.bin",
                      "token 3 has id 1500 >= model vocabulary 1000", 1000);

    const std::string empty_path = dir + "/no_tokens.bin";
    std::string err;
    write_shard(empty_path, {}, kModernBertVocab, &err);
    expect_load_error(c, "load_error_empty_dataset", empty_path, "no_tokens.bin", "no tokens");

    // a directory with one good and one bad shard names the bad one
    const std::string mixed = dir + "/mixed";
    fs::create_directories(mixed);
    write_shard(mixed + "/a.bin", toks, kModernBertVocab, &err);
    write_bytes(mixed + "/b.bin", raw_shard("PICOTOK1", 7, 2, toks.size(), kModernBertVocab, toks));
    expect_load_error(c, "load_error_names_bad_shard_in_dir", mixed, "b.bin", "version 7");
}

// ---- documents ----

static void test_documents(Checker& c, const std::string& dir) {
    std::string err;
    // 2 tokens before the first CLS, a doc of 4, a doc of 3, a doc of 12 (split 4+4+4 at seq_len 4)
    std::vector<uint32_t> toks = {5, 6, kClsId, 1, 2, kSepId, kClsId, 3, kSepId, kClsId};
    for (int i = 0; i < 10; i++) toks.push_back((uint32_t)(100 + i));
    toks.push_back(kSepId);
    const std::string path = dir + "/docs.bin";
    write_shard(path, toks, kModernBertVocab, &err);
    Dataset ds;
    bool ok = load_dataset(path, 4, kModernBertVocab, kModernBertSpecialIds, &ds, &err);
    std::vector<std::pair<uint64_t, int>> got, want = {{0, 2}, {2, 4}, {6, 3}, {9, 4}, {13, 4}, {17, 4}};
    for (const Dataset::Doc& d : ds.docs) got.push_back({d.offset, d.len});
    std::string seen;
    for (auto& g : got) seen += "(" + str(g.first) + "," + str((uint64_t)g.second) + ")";
    c.check(ok && got == want, "documents_split_at_cls_and_seq_len", ok ? "got " + seen : err);

    // shards never share a document: b.bin starts without CLS and is its own document
    const std::string two = dir + "/two_shards";
    fs::create_directories(two);
    write_shard(two + "/a.bin", {kClsId, 1, 2}, kModernBertVocab, &err);
    write_shard(two + "/b.bin", {3, 4, kSepId, kClsId, 9, kSepId}, kModernBertVocab, &err);
    write_text(two + "/readme.txt", "ignored");
    ok = load_dataset(two, 100, kModernBertVocab, kModernBertSpecialIds, &ds, &err);
    got.clear();
    for (const Dataset::Doc& d : ds.docs) got.push_back({d.offset, d.len});
    want = {{0, 3}, {3, 3}, {6, 3}};
    c.check(ok && ds.tokens.size() == 9 && got == want, "documents_dir_shards_in_name_order",
            ok ? "unexpected documents" : err);
}

// ---- packing ----

static void test_packing(Checker& c, const std::string& dir) {
    const int seq_len = 100, T = 256;
    const Dataset ds = synthetic_dataset(dir, "pack.bin", 3000, 3, 160, seq_len, 11);
    const uint64_t seed = 1234;
    Loader forward(ds, T, seed, kModernBertSpecialIds);
    const uint64_t n_epochs = 3;
    const uint64_t n_samples = forward.epoch_start(n_epochs);

    // every piece of an epoch in exactly one bin of that epoch; bins within T
    bool cover_ok = true, shuffled = false;
    std::string why;
    std::vector<uint32_t> previous_order;
    uint64_t real_tokens = 0;
    for (uint64_t e = 0; e < n_epochs; e++) {
        std::vector<int> seen(ds.docs.size(), 0);
        std::vector<uint32_t> order;
        for (uint64_t s = forward.epoch_start(e); s < forward.epoch_start(e + 1); s++) {
            if (forward.epoch_of(s) != e) cover_ok = false, why = "epoch_of(" + str(s) + ") wrong";
            int used = 0;
            for (uint32_t d : forward.docs_of(s)) {
                seen[d]++;
                order.push_back(d);
                used += ds.docs[d].len;
            }
            if (used > T) cover_ok = false, why = "bin " + str(s) + " holds " + str((uint64_t)used);
            real_tokens += (uint64_t)used;
        }
        for (size_t d = 0; d < seen.size(); d++)
            if (seen[d] != 1) cover_ok = false, why = "epoch " + str(e) + " doc " + str(d) + " seen " + str((uint64_t)seen[d]);
        if (e > 0 && order != previous_order) shuffled = true;
        previous_order = order;
    }
    c.check(cover_ok, "packing_each_piece_once_per_epoch", why);
    c.check(shuffled, "packing_epochs_shuffle_differently");
    const double fill = (double)real_tokens / (double)(n_samples * (uint64_t)T);
    char fill_text[64];
    std::snprintf(fill_text, sizeof(fill_text), "real tokens / slots = %.4f", fill);
    std::printf("     packing: %s\n", fill_text);
    c.check(fill > 0.95, "packing_best_fit_fill", fill_text);

    // the bin table of epoch 0 against a direct transcription of the rule in data.h
    c.check(forward.epoch_start(1) > 0 && reference_bins(ds, T, seed, 0) == bins_of_epoch(forward, 0) &&
                reference_bins(ds, T, seed, 2) == bins_of_epoch(forward, 2),
            "packing_matches_reference_rule");

    // contents: cu_seqlens, positions, padding and tokens agree with the dataset
    bool content_ok = true;
    why.clear();
    for (uint64_t s = 0; s < n_samples && content_ok; s++) {
        const MicroBatch mb = forward.get(s);
        const std::vector<uint32_t> docs = forward.docs_of(s);
        auto bad = [&](const std::string& what) { content_ok = false, why = "sample " + str(s) + ": " + what; };
        if (mb.T != T || (int)mb.ids.size() != T || (int)mb.labels.size() != T || (int)mb.positions.size() != T)
            { bad("sizes"); break; }
        if (mb.n_docs != (int)docs.size() || (int)mb.cu_seqlens.size() != mb.n_docs + 1 ||
            mb.cu_seqlens.front() != 0 || mb.cu_seqlens.back() != mb.n_real || mb.n_real > T)
            { bad("cu_seqlens/n_docs/n_real"); break; }
        for (int k = 0; k < mb.n_docs && content_ok; k++) {
            const Dataset::Doc& doc = ds.docs[docs[k]];
            if (mb.cu_seqlens[k + 1] - mb.cu_seqlens[k] != doc.len) { bad("doc length"); break; }
            for (int p = 0; p < doc.len; p++) {
                const int i = mb.cu_seqlens[k] + p;
                const int original = (int)ds.tokens[doc.offset + p];
                if (mb.positions[i] != p) { bad("position"); break; }
                if (mb.labels[i] == kIgnoreLabel ? mb.ids[i] != original : mb.labels[i] != original)
                    { bad("token/label vs dataset"); break; }
            }
        }
        for (int i = mb.n_real; i < T && content_ok; i++)
            if (mb.ids[i] != kPadId || mb.labels[i] != kIgnoreLabel || mb.positions[i] != 0) bad("padding");
        std::vector<int> rows;
        for (int i = 0; i < T; i++)
            if (mb.labels[i] != kIgnoreLabel) rows.push_back(i);
        if (rows != mb.masked_rows || mb.n_masked != (int)rows.size()) bad("masked_rows");
        if (mb.sample_index != s) bad("sample_index");
    }
    c.check(content_ok, "packing_batch_contents_consistent", why);

    // purity: the same batches from a fresh loader asked backwards, and from one asked in
    // a scattered order starting deep in the last epoch
    Loader backward(ds, T, seed, kModernBertSpecialIds);
    Loader scattered(ds, T, seed, kModernBertSpecialIds);
    std::vector<MicroBatch> reference;
    for (uint64_t s = 0; s < n_samples; s++) reference.push_back(forward.get(s));
    bool pure = true;
    for (uint64_t s = n_samples; s-- > 0;)
        if (!same_batch(backward.get(s), reference[s])) pure = false, why = "backward sample " + str(s);
    for (uint64_t k = 0; k < 3 * n_samples; k++) {
        const uint64_t s = (n_samples - 1 + 7919 * k) % n_samples;
        if (!same_batch(scattered.get(s), reference[s])) pure = false, why = "scattered sample " + str(s);
    }
    c.check(pure, "loader_get_is_pure", why);

    Loader other_seed(ds, T, seed + 1, kModernBertSpecialIds);
    c.check(!same_batch(other_seed.get(0), reference[0]), "loader_seed_changes_batches");
}

// ---- masking ----

static void test_masking(Checker& c, const std::string& dir) {
    const int T = 512;
    const Dataset ds = synthetic_dataset(dir, "mask.bin", 4000, 20, 200, 200, 5);
    Loader loader(ds, T, 99, kModernBertSpecialIds);
    uint64_t ordinary = 0, selected = 0, as_mask = 0, as_random = 0, kept = 0;
    bool specials_safe = true, labels_ok = true, random_ok = true;
    std::string why;
    for (uint64_t s = 0; s < loader.epoch_start(1); s++) {
        const MicroBatch mb = loader.get(s);
        const std::vector<uint32_t> docs = loader.docs_of(s);
        std::vector<int> original;  // the unmasked micro-batch
        for (uint32_t d : docs)
            for (int p = 0; p < ds.docs[d].len; p++) original.push_back((int)ds.tokens[ds.docs[d].offset + p]);
        for (int i = 0; i < T; i++) {
            const bool real = i < mb.n_real;
            const bool special = !real || kModernBertSpecialIds.is_special(original[i]);
            if (special) {
                if (mb.labels[i] != kIgnoreLabel || (real && mb.ids[i] != original[i]))
                    specials_safe = false, why = "sample " + str(s) + " position " + str((uint64_t)i);
                continue;
            }
            ordinary++;
            if (mb.labels[i] == kIgnoreLabel) {
                if (mb.ids[i] != original[i]) labels_ok = false;
                continue;
            }
            selected++;
            if (mb.labels[i] != original[i]) labels_ok = false;
            if (mb.ids[i] == kMaskId) {
                as_mask++;
            } else if (mb.ids[i] == original[i]) {
                kept++;
            } else {
                as_random++;
                if (mb.ids[i] < 0 || mb.ids[i] >= (int)ds.vocab_size || kModernBertSpecialIds.is_special(mb.ids[i]))
                    random_ok = false;
            }
        }
    }
    const double rate = (double)selected / (double)ordinary;
    const double f_mask = (double)as_mask / (double)selected, f_random = (double)as_random / (double)selected,
                 f_kept = (double)kept / (double)selected;
    char stats[160];
    std::snprintf(stats, sizeof(stats), "%llu ordinary tokens, rate %.4f, mask/random/kept %.4f/%.4f/%.4f",
                  (unsigned long long)ordinary, rate, f_mask, f_random, f_kept);
    std::printf("     masking: %s\n", stats);
    c.check(ordinary > 100000 && std::abs(rate - 0.30) <= 0.015, "masking_rate_30_percent", stats);
    c.check(std::abs(f_mask - 0.8) <= 0.02 && std::abs(f_random - 0.1) <= 0.02 && std::abs(f_kept - 0.1) <= 0.02,
            "masking_80_10_10_split", stats);
    c.check(specials_safe, "masking_never_touches_specials_or_padding", why);
    c.check(labels_ok, "masking_labels_only_on_masked_positions");
    c.check(random_ok, "masking_random_tokens_ordinary_and_in_vocab");

    // a dataset of nothing but special tokens gets no labels at all
    std::string err;
    Dataset specials;
    write_shard(dir + "/specials.bin", {kClsId, kMaskId, kUnkId, kPadId, kSepId, kClsId, kSepId},
                kModernBertVocab, &err);
    bool refused = !load_dataset(dir + "/specials.bin", 16, kModernBertVocab, kModernBertSpecialIds, &specials, &err);
    c.check(refused && err.find("nothing to train on") != std::string::npos, "load_refuses_dataset_with_nothing_to_mask", err);
    specials.tokens = {kClsId, kMaskId, kUnkId, kPadId, kSepId, kClsId, kSepId};  // the loader itself still copes
    specials.vocab_size = kModernBertVocab;
    cut_documents(&specials, 0, specials.tokens.size(), 16, kClsId);
    Loader special_loader(specials, 16, 3, kModernBertSpecialIds);
    int labelled = 0;
    for (uint64_t s = 0; s < 50; s++) labelled += special_loader.get(s).n_masked;
    c.check(labelled == 0, "masking_all_special_dataset_unmasked");

    // custom special ids: a loader told ids 10..14 are special leaves them alone
    const SpecialIds custom = {10, 11, 12, 13, 14};
    Dataset small;
    std::vector<uint32_t> toks = {11};
    for (int i = 0; i < 3000; i++) toks.push_back((uint32_t)(i % 20 == 11 ? 0 : i % 20));  // one document
    write_shard(dir + "/custom.bin", toks, 20, &err);
    bool loaded = load_dataset(dir + "/custom.bin", 4000, 20, custom, &small, &err);
    Loader custom_loader(small, 4096, 8, custom);
    const MicroBatch mb = custom_loader.get(0);
    bool custom_ok = loaded && mb.n_docs == 1 && mb.ids[mb.n_real] == 13 && mb.n_masked > 0;
    for (int i = 0; i < mb.n_real; i++) {
        const int orig = (int)toks[i];
        if (custom.is_special(orig) && mb.labels[i] != kIgnoreLabel) custom_ok = false;
        if (mb.labels[i] != kIgnoreLabel && mb.ids[i] != 14 && mb.ids[i] != orig && custom.is_special(mb.ids[i]))
            custom_ok = false;
    }
    c.check(custom_ok, "masking_uses_given_special_ids", loaded ? "" : err);
}

// ---- tokenizer ----

static void test_tokenizer(Checker& c, const std::string& dir) {
    const std::string sentence =
        "The quick brown fox (who was 3 years old) didn't jump; it ran, slowly! Really?";
    const std::vector<std::string> docs = {sentence, sentence, "zebra once", "the the the"};
    const WordTokenizer tok = WordTokenizer::build(docs, 1000);

    c.check(!tok.words.empty() && tok.words[0] == "the" && tok.index.count("zebra") == 0 &&
                tok.index.count("fox") == 1,
            "tokenizer_build_frequency_order_drops_singletons",
            tok.words.empty() ? "empty" : "first word " + tok.words[0]);
    // every word but "the" appears exactly twice, so after "the" they must be in string order
    bool ties_sorted = true;
    for (size_t i = 1; i + 1 < tok.words.size(); i++)
        if (tok.words[i] > tok.words[i + 1]) ties_sorted = false;
    c.check(ties_sorted, "tokenizer_ties_by_string_order");

    const std::vector<int> ids = tok.encode(sentence);
    bool no_unk = true;
    for (int id : ids) no_unk = no_unk && id != kUnkId;
    std::string lower = sentence;
    for (char& ch : lower) ch = ascii_lower(ch);
    const std::string back = tok.decode(ids);
    c.check(no_unk && back == lower, "tokenizer_roundtrip_sentence", "decoded: " + back);

    const std::vector<int> masked = tok.encode("The [MASK] fox, [mask] zebra");
    // "[mask]" (lowercase) is not the literal but "[" "mask" "]", all three unknown, as is "zebra"
    const std::vector<int> want = {tok.index.at("the"), kMaskId, tok.index.at("fox"), tok.index.at(","),
                                   kUnkId, kUnkId, kUnkId, kUnkId};
    c.check(masked == want && tok.decode(masked) == "the [MASK] fox, [UNK] [UNK] [UNK] [UNK]",
            "tokenizer_mask_literal_and_unknown", "decoded: " + tok.decode(masked));

    c.check(tok.decode_piece(kClsId) == "[CLS]" && tok.decode_piece(kSepId) == "[SEP]" &&
                tok.decode_piece(kPadId) == "[PAD]" && tok.decode_piece(kUnkId) == "[UNK]" &&
                tok.decode_piece(kMaskId) == "[MASK]" && tok.decode_piece(50300) == "[UNK]",
            "tokenizer_decode_specials");

    const std::vector<std::string> pieces = split_pieces("Don't\tstop-\xc3\xa9t\xc3\xa9 R2D2\x01!");
    const std::vector<std::string> want_pieces = {"don", "'", "t", "stop", "-", "t", "r2d2", "!"};
    c.check(pieces == want_pieces, "tokenizer_pieces_ascii_only");

    std::string err;
    const std::string vocab_path = dir + "/vocab.txt";
    WordTokenizer loaded;
    bool ok = tok.save(vocab_path, &err) && WordTokenizer::load(vocab_path, &loaded, &err);
    c.check(ok && loaded.words == tok.words && loaded.encode(sentence) == ids, "tokenizer_save_load", err);

    write_text(dir + "/dup_vocab.txt", "a\nb\na\n");
    ok = WordTokenizer::load(dir + "/dup_vocab.txt", &loaded, &err);
    c.check(!ok && err.find("dup_vocab.txt: line 3") != std::string::npos, "tokenizer_load_rejects_duplicates", err);

    std::vector<std::string> many;
    for (int i = 0; i < 10; i++) many.push_back("a b c d e f");
    c.check(WordTokenizer::build(many, 3).words.size() == 3 && WordTokenizer::build(many, -5).words.empty(),
            "tokenizer_max_words");
}

// ---- text corpus ----

static void test_corpus(Checker& c, const std::string& dir) {
    const std::vector<std::string> split = split_documents(
        "  First fortune,\nsecond line.\n%\nSecond one\n\n\nThird _\b_\b_\bbold text\r\n%\n%\n   \n");
    const std::vector<std::string> want = {"First fortune,\nsecond line.", "Second one", "Third bold text"};
    c.check(split == want, "split_documents_percent_blank_overstrike",
            "got " + str(split.size()) + " documents");

    const std::string text_dir = dir + "/text";
    fs::create_directories(text_dir);
    std::string a, b;
    for (int i = 0; i < 30; i++) a += "The cat sat on mat number " + std::to_string(i % 5) + ".\n%\n";
    for (int i = 0; i < 20; i++) b += "A dog barked at the cat.\nThe cat ran.\n\n";
    write_text(text_dir + "/a", a);
    write_text(text_dir + "/b", b);
    const std::string out = dir + "/corpus";
    fs::create_directories(out);
    std::string err;
    write_shard(out + "/shard_00099.bin", {1, 2}, kModernBertVocab, &err);  // stale, from a larger run
    write_text(out + "/shard_notes.bin.txt", "kept");                          // not ours
    bool ok = prepare_text_corpus({text_dir}, out, kModernBertVocab, kModernBertSpecialIds, 100, &err, 40);
    Dataset ds;
    ok = ok && load_dataset(out, 64, kModernBertVocab, kModernBertSpecialIds, &ds, &err);
    WordTokenizer tok;
    ok = ok && WordTokenizer::load(out + "/vocab.txt", &tok, &err);
    c.check(ok, "prepare_text_corpus_runs", err);
    if (!ok) return;
    // 30 documents of 10 tokens, then 20 of 13, under a 40-token cap: 7 shards of 4 short ones,
    // one of 2 short + 1 long, 7 of (up to) 3 long ones = 15 shards
    int n_shards = 0;
    bool shards_small = true;
    for (const auto& entry : fs::directory_iterator(out)) {
        if (entry.path().extension() != ".bin") continue;
        n_shards++;
        if (fs::file_size(entry.path()) > 32 + 2 * 40) shards_small = false;
    }
    bool docs_ok = ds.docs.size() == 50 && ds.vocab_size == kModernBertVocab;
    for (const Dataset::Doc& d : ds.docs)
        if (ds.tokens[d.offset] != (uint32_t)kClsId || ds.tokens[d.offset + d.len - 1] != (uint32_t)kSepId) docs_ok = false;
    c.check(docs_ok, "prepare_text_corpus_documents_cls_sep", "documents " + str(ds.docs.size()));
    c.check(n_shards == 15 && shards_small && !fs::exists(out + "/shard_00099.bin") &&
                fs::exists(out + "/shard_notes.bin.txt") && fs::exists(out + "/shard_00014.bin"),
            "prepare_text_corpus_sharding", "shards " + str((uint64_t)n_shards));
    const Dataset::Doc& first = ds.docs[0];
    const std::vector<int> first_ids(ds.tokens.begin() + (int64_t)first.offset + 1,
                                     ds.tokens.begin() + (int64_t)first.offset + first.len - 1);
    c.check(tok.decode(first_ids) == "the cat sat on mat number 0.", "prepare_text_corpus_decodes",
            tok.decode(first_ids));

    std::vector<std::string> listed;
    write_text(text_dir + "/.hidden", "skipped");
    ok = list_text_files(text_dir, &listed, &err);
    c.check(ok && listed == std::vector<std::string>{text_dir + "/a", text_dir + "/b"}, "list_text_files", err);
    ok = list_text_files(out + "/empty_text_dir_missing", &listed, &err);
    c.check(!ok && err.find("empty_text_dir_missing") != std::string::npos, "list_text_files_missing", err);

    ok = prepare_text_corpus({dir + "/no_such_file"}, dir + "/corpus2", kModernBertVocab, kModernBertSpecialIds, 100, &err);
    c.check(!ok && err.find("no_such_file") != std::string::npos, "prepare_text_corpus_missing_file", err);

    // A small model's vocabulary: 16 ids, specials 11..15, so at most 11 words; every token < 16.
    const SpecialIds small = {11, 12, 13, 14, 15};
    const std::string out_small = dir + "/corpus_small";
    ok = prepare_text_corpus({text_dir}, out_small, 16, small, 1000, &err);
    Dataset ds_small;
    WordTokenizer tok_small;
    ok = ok && load_dataset(out_small, 64, 16, small, &ds_small, &err) &&
         WordTokenizer::load(out_small + "/vocab.txt", &tok_small, &err, small);
    bool small_ok = ok && tok_small.words.size() == 11 && ds_small.vocab_size == 16;
    for (uint32_t id : ds_small.tokens) small_ok = small_ok && id < 16;
    small_ok = small_ok && ds_small.tokens[0] == 12 && tok_small.encode("[MASK]") == std::vector<int>{15};
    c.check(small_ok, "prepare_text_corpus_small_vocabulary", err + " words " + str((uint64_t)tok_small.words.size()));
    // ... and its vocabulary does not load for a model whose special ids start lower
    ok = WordTokenizer::load(out_small + "/vocab.txt", &tok_small, &err, {5, 6, 7, 8, 9});
    c.check(!ok && err.find("special ids") != std::string::npos, "vocab_refused_for_other_special_ids", err);

    // A failing run changes nothing: a binary file among the inputs leaves the dataset as it was.
    const std::string before = read_file(out_small + "/vocab.txt");
    write_text(text_dir + "/c", std::string("binary\0data", 11));
    ok = prepare_text_corpus({text_dir}, out_small, 16, small, 1000, &err);
    c.check(!ok && err.find("not a text file") != std::string::npos && read_file(out_small + "/vocab.txt") == before,
            "prepare_text_corpus_binary_refused_nothing_changed", err);
    fs::remove(text_dir + "/c");
}

// The unigram baseline is the entropy of the ordinary tokens' frequencies: a a b c → p = ½, ¼, ¼.
void test_unigram_entropy(Checker& c) {
    Dataset ds;
    ds.tokens = {(uint32_t)kClsId, 7, 7, 8, 9, (uint32_t)kSepId, (uint32_t)kMaskId};
    const double want = -(0.5 * std::log(0.5) + 2 * 0.25 * std::log(0.25));
    const double got = unigram_entropy(ds, kModernBertSpecialIds);
    c.check(std::fabs(got - want) < 1e-12, "unigram_entropy", num(got) + " vs " + num(want));
}

int main() {
    const std::string dir =
        (fs::temp_directory_path() /
         ("picotron_test_data_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count())))
            .string();
    fs::create_directories(dir);
    Checker c;
    test_shards(c, dir);
    test_load_errors(c, dir);
    test_documents(c, dir);
    test_packing(c, dir);
    test_masking(c, dir);
    test_tokenizer(c, dir);
    test_corpus(c, dir);
    test_unigram_entropy(c);
    std::error_code ec;
    fs::remove_all(dir, ec);
    std::printf("%d passed, %d failed\n", c.passed, c.failed);
    return c.failed ? 1 : 0;
}
