// data.h — everything between text on disk and a masked micro-batch (DESIGN.md §5, §8).
//
//   token shards      a 32-byte versioned header, then the token ids (2 or 4 bytes each)
//   dataset           shards read into one token array, cut into documents at every [CLS]
//   packing           documents shuffled per epoch and best-fit packed into micro-batches
//   masking           30% of the ordinary tokens; of those 80% [MASK], 10% random, 10% kept
//   word tokenizer    a tiny whitespace/punctuation tokenizer for the built-in corpus
//
// The one property everything here serves: a micro-batch is a pure function of
// (dataset, micro_batch_tokens, seed, sample index). Every rank of every layout computes
// the batches it needs by itself and they agree, token for token, with a single rank.
//
// Host-only C++17, standard library and safetensors.h's file checks; included by picotron.cu and by
// the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "safetensors.h"  // not_a_regular_file

// ---- constants ----
// ModernBERT's special token ids and vocabulary size. The loader and the masker take the
// special ids as an argument instead, because a model loaded from a Hugging Face config
// may number them differently.

struct SpecialIds {
    int unk, cls, sep, pad, mask;
    bool is_special(int64_t id) const {
        return id == unk || id == cls || id == sep || id == pad || id == mask;
    }
};

inline constexpr int kUnkId = 50280;
inline constexpr int kClsId = 50281;
inline constexpr int kSepId = 50282;
inline constexpr int kPadId = 50283;
inline constexpr int kMaskId = 50284;
inline constexpr SpecialIds kModernBertSpecialIds = {kUnkId, kClsId, kSepId, kPadId, kMaskId};
inline constexpr uint32_t kModernBertVocab = 50368;

inline constexpr int kIgnoreLabel = -100;           // label of every position that is not trained on
inline constexpr double kMaskRate = 0.30;           // fraction of ordinary tokens selected
inline constexpr double kMaskAsMaskToken = 0.80;    // of the selected: replaced by [MASK] ...
inline constexpr double kMaskAsRandomToken = 0.10;  // ... by a random ordinary token; the rest kept
inline constexpr int kMaxOpenBins = 16;             // best-fit packing keeps this many bins open

// ---- hashing ----
// Every random choice (epoch shuffle, which tokens are masked, which random token replaces
// one) is a counter-based hash of integers, not a stateful generator: any sample can be
// computed without computing the ones before it. Python can reproduce it bit for bit:
//   splitmix64(x): x += 0x9E3779B97F4A7C15; x = (x ^ x>>30) * 0xBF58476D1CE4E5B9;
//                  x = (x ^ x>>27) * 0x94D049BB133111EB; return x ^ x>>31   (mod 2^64)
//   hash4(a,b,c,d) = splitmix64(splitmix64(splitmix64(splitmix64(a) ^ b) ^ c) ^ d)
//   hash01(a,b,c,d) = (hash4(a,b,c,d) >> 11) / 2^53, a double in [0, 1)

inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

inline uint64_t hash4(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    return splitmix64(splitmix64(splitmix64(splitmix64(a) ^ b) ^ c) ^ d);
}

inline double hash01(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    return (double)(hash4(a, b, c, d) >> 11) * (1.0 / 9007199254740992.0);  // 53 bits / 2^53
}

// The shuffle hashes (seed, epoch, i, kShuffleStream); masking uses small last arguments
// (0, 1, 2, ...), so the two never draw from the same stream.
inline constexpr uint64_t kShuffleStream = 0x53485546464C4531ull;  // "SHUFFLE1"

// ---- token shards ----
// A shard is one file, little endian:
//   bytes  0-7   magic "PICOTOK1"
//   bytes  8-11  uint32 version = 1
//   bytes 12-15  uint32 token_width, 2 or 4 (bytes per token)
//   bytes 16-23  uint64 n_tokens
//   bytes 24-27  uint32 vocab_size (every token id is below it)
//   bytes 28-31  uint32 reserved, 0
//   then n_tokens token ids of token_width bytes each.
// Documents inside are [CLS] ... [SEP]; the reader cuts them at [CLS] (see dataset).
// Bytes are assembled by hand so the format does not depend on the host's endianness.

inline constexpr char kShardMagic[8] = {'P', 'I', 'C', 'O', 'T', 'O', 'K', '1'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 32;
inline constexpr size_t kShardChunkTokens = 1 << 20;  // tokens converted per read/write call

inline void set_data_error(std::string* err, const std::string& message) {
    if (err) *err = message;
}

inline void put_le(unsigned char* p, uint64_t value, int n_bytes) {
    for (int b = 0; b < n_bytes; b++) p[b] = (unsigned char)(value >> (8 * b));
}

inline uint64_t get_le(const unsigned char* p, int n_bytes) {
    uint64_t value = 0;
    for (int b = 0; b < n_bytes; b++) value |= (uint64_t)p[b] << (8 * b);
    return value;
}

// Writes path + ".tmp" and renames it over path, so a reader never sees half a shard.
inline bool write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                        uint32_t vocab_size, std::string* err) {
    if (vocab_size == 0) {
        set_data_error(err, path + ": vocab_size must be positive");
        return false;
    }
    for (size_t i = 0; i < tokens.size(); i++) {
        if (tokens[i] >= vocab_size) {
            set_data_error(err, path + ": token " + std::to_string(i) + " has id " +
                               std::to_string(tokens[i]) + " >= vocab_size " +
                               std::to_string(vocab_size));
            return false;
        }
    }
    const int width = vocab_size <= 65536 ? 2 : 4;
    unsigned char header[kShardHeaderBytes] = {};
    std::copy(kShardMagic, kShardMagic + 8, header);
    put_le(header + 8, kShardVersion, 4);
    put_le(header + 12, (uint64_t)width, 4);
    put_le(header + 16, tokens.size(), 8);
    put_le(header + 24, vocab_size, 4);

    const std::string tmp_path = path + ".tmp";
    FILE* f = std::fopen(tmp_path.c_str(), "wb");
    if (!f) {
        set_data_error(err, tmp_path + ": cannot open for writing");
        return false;
    }
    bool ok = std::fwrite(header, 1, kShardHeaderBytes, f) == kShardHeaderBytes;
    std::vector<unsigned char> bytes;
    for (size_t start = 0; ok && start < tokens.size(); start += kShardChunkTokens) {
        const size_t n = std::min(kShardChunkTokens, tokens.size() - start);
        bytes.resize(n * width);
        for (size_t i = 0; i < n; i++) put_le(&bytes[i * width], tokens[start + i], width);
        ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    }
    ok = (std::fclose(f) == 0) && ok;
    if (!ok || std::rename(tmp_path.c_str(), path.c_str()) != 0) {
        std::remove(tmp_path.c_str());
        set_data_error(err, path + ": write failed");
        return false;
    }
    return true;
}

// Reads one shard and appends its tokens to *tokens. Every malformation is a one-line
// error naming the file: a bad shard must stop training before step 0, not corrupt it.
inline bool read_shard(const std::string& path, uint32_t model_vocab,
                       std::vector<uint32_t>* tokens, uint32_t* shard_vocab, std::string* err) {
    std::error_code ec;
    const uint64_t file_bytes = std::filesystem::file_size(path, ec);
    if (ec) {
        set_data_error(err, path + ": cannot read shard (" + ec.message() + ")");
        return false;
    }
    if (file_bytes < kShardHeaderBytes) {
        set_data_error(err, path + ": file is " + std::to_string(file_bytes) +
                           " bytes, shorter than the 32-byte shard header");
        return false;
    }
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) {
        set_data_error(err, path + ": cannot open shard");
        return false;
    }
    // One exit for every error after the open, so the file is always closed.
    auto fail = [&](const std::string& message) {
        std::fclose(f);
        set_data_error(err, path + ": " + message);
        return false;
    };
    unsigned char header[kShardHeaderBytes];
    if (std::fread(header, 1, kShardHeaderBytes, f) != kShardHeaderBytes)
        return fail("cannot read the shard header");
    if (!std::equal(kShardMagic, kShardMagic + 8, (const char*)header))
        return fail("wrong magic (not a PICOTOK1 token shard)");
    const uint64_t version = get_le(header + 8, 4);
    const uint64_t width = get_le(header + 12, 4);
    const uint64_t n_tokens = get_le(header + 16, 8);
    const uint64_t vocab = get_le(header + 24, 4);
    if (version != kShardVersion)
        return fail("unsupported shard version " + std::to_string(version) + " (expected 1)");
    if (width != 2 && width != 4)
        return fail("bad token width " + std::to_string(width) + " (expected 2 or 4)");
    if (n_tokens > (UINT64_MAX - kShardHeaderBytes) / width ||
        file_bytes != kShardHeaderBytes + n_tokens * width)
        return fail("file is " + std::to_string(file_bytes) + " bytes but the header promises " +
                    std::to_string(n_tokens) + " tokens of " + std::to_string(width) + " bytes");
    if (vocab == 0) return fail("vocab_size is 0");
    if (vocab > model_vocab)
        return fail("shard vocab_size " + std::to_string(vocab) + " > model vocabulary " +
                    std::to_string(model_vocab));

    const size_t first = tokens->size();
    tokens->resize(first + n_tokens);
    std::vector<unsigned char> bytes;
    for (uint64_t start = 0; start < n_tokens; start += kShardChunkTokens) {
        const size_t n = (size_t)std::min<uint64_t>(kShardChunkTokens, n_tokens - start);
        bytes.resize(n * width);
        if (std::fread(bytes.data(), 1, bytes.size(), f) != bytes.size())
            return fail("read failed");
        for (size_t i = 0; i < n; i++) {
            const uint32_t id = (uint32_t)get_le(&bytes[i * width], (int)width);
            if (id >= vocab) {  // vocab <= model_vocab, so this also catches id >= model_vocab
                const bool beyond_model = id >= model_vocab;
                return fail("token " + std::to_string(start + i) + " has id " + std::to_string(id) +
                            (beyond_model ? " >= model vocabulary " : " >= shard vocab_size ") +
                            std::to_string(beyond_model ? model_vocab : vocab));
            }
            (*tokens)[first + start + i] = id;
        }
    }
    std::fclose(f);
    *shard_vocab = (uint32_t)vocab;
    return true;
}

// ---- dataset ----
// All shards of a path, in one token array, cut into documents. A document starts at every
// [CLS] and runs to the next [CLS] or the end of its shard (shards never share a document);
// tokens before a shard's first [CLS] form a document too. A document longer than seq_len
// becomes consecutive pieces of at most seq_len tokens, and each piece is packed and
// position-numbered as a document of its own.

struct Dataset {
    std::vector<uint32_t> tokens;  // all shards, concatenated in name order
    struct Doc {
        uint64_t offset;  // index of its first token in tokens
        int len;          // 1..seq_len
    };
    std::vector<Doc> docs;    // in dataset order
    uint32_t vocab_size = 0;  // the largest vocab_size of its shards; random tokens are drawn below it
};

// Appends the documents of tokens[begin, end) to ds->docs.
inline void cut_documents(Dataset* ds, uint64_t begin, uint64_t end, int seq_len, int cls_id) {
    auto add_pieces = [&](uint64_t doc_begin, uint64_t doc_end) {
        for (uint64_t p = doc_begin; p < doc_end; p += (uint64_t)seq_len)
            ds->docs.push_back({p, (int)std::min<uint64_t>((uint64_t)seq_len, doc_end - p)});
    };
    uint64_t doc_begin = begin;
    for (uint64_t i = begin; i < end; i++) {
        if ((int64_t)ds->tokens[i] == cls_id && i > doc_begin) {
            add_pieces(doc_begin, i);
            doc_begin = i;
        }
    }
    add_pieces(doc_begin, end);
}

// path: one shard file, or a directory whose *.bin files (sorted by name) are the shards.
inline bool load_dataset(const std::string& path, int seq_len, uint32_t model_vocab,
                         const SpecialIds& sp, Dataset* out, std::string* err) {
    namespace fs = std::filesystem;
    *out = Dataset{};
    if (seq_len < 1) {
        set_data_error(err, path + ": seq_len must be positive, got " + std::to_string(seq_len));
        return false;
    }
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);
    if (ec || !fs::exists(status)) {
        set_data_error(err, path + ": no such file or directory");
        return false;
    }
    std::vector<std::string> shard_paths;
    if (fs::is_directory(status)) {
        for (const fs::directory_entry& entry : fs::directory_iterator(path, ec)) {
            if (entry.path().extension() == ".bin" && entry.is_regular_file(ec))
                shard_paths.push_back(entry.path().string());
        }
        if (ec) {
            set_data_error(err, path + ": cannot list directory (" + ec.message() + ")");
            return false;
        }
        std::sort(shard_paths.begin(), shard_paths.end());
        if (shard_paths.empty()) {
            set_data_error(err, path + ": directory has no .bin shard files");
            return false;
        }
    } else {
        shard_paths.push_back(path);
    }
    for (const std::string& shard_path : shard_paths) {
        const uint64_t begin = out->tokens.size();
        uint32_t shard_vocab = 0;
        if (!read_shard(shard_path, model_vocab, &out->tokens, &shard_vocab, err)) {
            *out = Dataset{};
            return false;
        }
        out->vocab_size = std::max(out->vocab_size, shard_vocab);
        cut_documents(out, begin, out->tokens.size(), seq_len, sp.cls);
    }
    if (out->tokens.empty()) {
        *out = Dataset{};
        set_data_error(err, path + ": dataset has no tokens");
        return false;
    }
    // Only ordinary tokens are ever masked: without one, every step would train on nothing.
    if (std::all_of(out->tokens.begin(), out->tokens.end(), [&](uint32_t id) { return sp.is_special(id); })) {
        *out = Dataset{};
        set_data_error(err, path + ": nothing to train on: every token is a special id ([CLS], [SEP], [PAD], "
                                   "[MASK] or [UNK]), so no token can be masked");
        return false;
    }
    // Documents are [CLS] ... [SEP] in the model's ids; data without one was made for another
    // vocabulary (data/mini for a 50368-id model, say) and would train on misread ids.
    if (std::find(out->tokens.begin(), out->tokens.end(), (uint32_t)sp.cls) == out->tokens.end()) {
        *out = Dataset{};
        set_data_error(err, path + ": holds no [CLS] (id " + std::to_string(sp.cls) + " of this model), so its "
                                   "documents are not this model's: was it prepared for another vocabulary? "
                                   "(prepare text with --prepare-text and this --model or --init-from)");
        return false;
    }
    return true;
}

// The loss of a model that knows only word frequencies: the entropy (nats) of the ordinary
// tokens' unigram distribution. Masked positions are drawn uniformly from the ordinary tokens,
// so predicting p(word) at every one of them costs exactly this; a model below it uses context.
inline double unigram_entropy(const Dataset& ds, const SpecialIds& sp) {
    std::unordered_map<uint32_t, uint64_t> counts;
    uint64_t total = 0;
    for (uint32_t id : ds.tokens)
        if (!sp.is_special(id)) {
            counts[id]++;
            total++;
        }
    double h = 0.0;
    for (const auto& entry : counts) {
        const double p = (double)entry.second / (double)total;
        h -= p * std::log(p);
    }
    return h;
}

// ---- micro-batches ----
// One packed micro-batch: whole documents (or seq_len pieces of them) back to back, then
// padding. Attention stays inside a document (cu_seqlens), RoPE positions restart in each,
// and the loss sees only masked_rows. Padding is PAD, position 0, label -100, and lies
// after cu_seqlens.back(), where nothing attends to it.

struct MicroBatch {
    int T = 0;                    // micro_batch_tokens (padded length)
    std::vector<int> ids;         // (T) token ids; padding = PAD
    std::vector<int> labels;      // (T) original id at masked positions, else -100
    std::vector<int> positions;   // (T) position inside its document, restarting at 0; 0 on padding
    std::vector<int> cu_seqlens;  // (n_docs+1) document boundaries; back() = n_real; padding after
    int n_docs = 0;
    int n_real = 0;               // real (non-padding) tokens: ids[0, n_real)
    int n_masked = 0;             // positions with a label
    std::vector<int> masked_rows; // indices i with labels[i] != -100, increasing
    uint64_t sample_index = 0;
};

// ---- MLM masking ----
// Position i of sample s holding an ordinary (non-special) token is selected when
// hash01(seed, s, i, 0) < 0.30; its label becomes the original id. Then
// r = hash01(seed, s, i, 1): r < 0.8 -> [MASK]; r < 0.9 -> a random ordinary token
// (hash4(seed, s, i, 2+k) % vocab_size for k = 0, 1, ... until not special); else kept.
// Only (seed, s, i) decide, and i is the position in the whole packed micro-batch, so
// no parallel layout changes which tokens are trained on.

// A uniform draw over [0, vocab_size) that is not a special id; -1 if there is none.
inline int random_ordinary_token(uint64_t seed, uint64_t s, uint64_t i, uint32_t vocab_size,
                                 const SpecialIds& sp) {
    if (vocab_size == 0) return -1;
    uint32_t id = 0;
    for (uint64_t k = 0; k < 64; k++) {
        id = (uint32_t)(hash4(seed, s, i, 2 + k) % vocab_size);
        if (!sp.is_special(id)) return (int)id;
    }
    // Only a vocabulary made almost entirely of special ids gets here: walk up from the
    // last draw to the next ordinary id.
    for (uint32_t step = 1; step < vocab_size; step++) {
        const uint32_t candidate = (id + step) % vocab_size;
        if (!sp.is_special(candidate)) return (int)candidate;
    }
    return -1;
}

// Masks ids[0, n_real) in place and fills labels, masked_rows and n_masked.
inline void apply_mlm_mask(MicroBatch* mb, uint64_t seed, uint32_t vocab_size,
                           const SpecialIds& sp) {
    const uint64_t s = mb->sample_index;
    mb->masked_rows.clear();
    for (int i = 0; i < mb->n_real; i++) {
        const int original = mb->ids[i];
        if (sp.is_special(original)) continue;
        if (hash01(seed, s, (uint64_t)i, 0) >= kMaskRate) continue;
        mb->labels[i] = original;
        mb->masked_rows.push_back(i);
        const double r = hash01(seed, s, (uint64_t)i, 1);
        if (r < kMaskAsMaskToken) {
            mb->ids[i] = sp.mask;
        } else if (r < kMaskAsMaskToken + kMaskAsRandomToken) {
            const int replacement = random_ordinary_token(seed, s, (uint64_t)i, vocab_size, sp);
            if (replacement >= 0) mb->ids[i] = replacement;
        }
    }
    mb->n_masked = (int)mb->masked_rows.size();
}

// ---- packing ----
// Sample index s names one micro-batch ("bin"): s = step * n_micro + m. Bins come epoch by
// epoch. An epoch shuffles the documents (Fisher-Yates, each swap drawn by hash4(seed,
// epoch, i, kShuffleStream)) and best-fit packs them in that order: up to kMaxOpenBins
// bins of micro_batch_tokens stay open; a document goes into the open bin with the least
// room that still fits it, else into a newly opened bin; when that makes one bin too many
// the fullest (earliest opened on a tie) is emitted. At the epoch's end the still-open
// bins are emitted in the order they were opened. Emission order numbers the bins; epoch
// e's bins follow epoch e-1's.
//
// Epochs differ in bin count, so finding sample s means packing every epoch up to its
// own: the Loader remembers where each packed epoch starts, and keeps the document lists
// of the last two epochs it used (indices only, never tokens). A cache miss recomputes;
// nothing cached can change an answer.

class Loader {
public:
    // ds must outlive the Loader. Every document must fit one micro-batch (the caller
    // checks seq_len <= micro_batch_tokens; a violation here aborts). get() updates the
    // epoch cache, so one Loader per thread.
    Loader(const Dataset& ds, int micro_batch_tokens, uint64_t seed, const SpecialIds& sp)
        : ds_(&ds), T_(micro_batch_tokens), seed_(seed), sp_(sp) {
        int longest = 0;
        for (const Dataset::Doc& d : ds.docs) longest = std::max(longest, d.len);
        if (ds.docs.empty() || micro_batch_tokens < 1 || longest > micro_batch_tokens ||
            ds.docs.size() >= (size_t)UINT32_MAX) {
            std::fprintf(stderr,
                         "Loader: need 1..2^32-2 documents, each fitting micro_batch_tokens %d "
                         "(got %zu documents, the longest %d tokens)\n",
                         micro_batch_tokens, ds.docs.size(), longest);
            std::abort();
        }
        epoch_first_bin_.push_back(0);
    }

    MicroBatch get(uint64_t sample_index) {
        const std::vector<uint32_t> doc_ids = docs_of(sample_index);
        MicroBatch mb;
        mb.T = T_;
        mb.sample_index = sample_index;
        mb.ids.assign(T_, sp_.pad);
        mb.labels.assign(T_, kIgnoreLabel);
        mb.positions.assign(T_, 0);
        mb.cu_seqlens.assign(1, 0);
        int n = 0;
        for (uint32_t d : doc_ids) {
            const Dataset::Doc& doc = ds_->docs[d];
            for (int p = 0; p < doc.len; p++, n++) {
                mb.ids[n] = (int)ds_->tokens[doc.offset + p];
                mb.positions[n] = p;
            }
            mb.cu_seqlens.push_back(n);
        }
        mb.n_docs = (int)doc_ids.size();
        mb.n_real = n;
        apply_mlm_mask(&mb, seed_, ds_->vocab_size, sp_);
        return mb;
    }

    // The dataset document indices packed into sample s, in packing order.
    std::vector<uint32_t> docs_of(uint64_t sample_index) {
        const uint64_t epoch = epoch_of(sample_index);
        const EpochBins& bins = epoch_bins(epoch);
        const uint64_t b = sample_index - epoch_first_bin_[epoch];
        return std::vector<uint32_t>(bins.doc_ids.begin() + bins.bin_start[b],
                                     bins.doc_ids.begin() + bins.bin_start[b + 1]);
    }

    uint64_t epoch_of(uint64_t sample_index) {
        while (epoch_first_bin_.back() <= sample_index) pack_next_epoch();
        // epoch_first_bin_ is increasing; the epoch is the last start <= sample_index
        return (uint64_t)(std::upper_bound(epoch_first_bin_.begin(), epoch_first_bin_.end(),
                                           sample_index) - epoch_first_bin_.begin()) - 1;
    }

    // Sample index of epoch e's first micro-batch.
    uint64_t epoch_start(uint64_t epoch) {
        while (epoch_first_bin_.size() <= epoch) pack_next_epoch();
        return epoch_first_bin_[epoch];
    }

private:
    struct EpochBins {
        uint64_t epoch;
        std::vector<uint32_t> bin_start;  // (n_bins+1) offsets into doc_ids
        std::vector<uint32_t> doc_ids;    // every document once, bin after bin
    };

    const Dataset* ds_;
    int T_;
    uint64_t seed_;
    SpecialIds sp_;
    std::vector<uint64_t> epoch_first_bin_;  // (packed epochs + 1); [e] = first sample of epoch e
    std::vector<EpochBins> cache_;           // at most two epochs, most recently used last

    EpochBins pack_epoch(uint64_t epoch) const {
        const uint32_t n_docs = (uint32_t)ds_->docs.size();
        std::vector<uint32_t> order(n_docs);
        for (uint32_t i = 0; i < n_docs; i++) order[i] = i;
        for (uint32_t i = n_docs - 1; i > 0; i--) {
            const uint32_t j = (uint32_t)(hash4(seed_, epoch, i, kShuffleStream) % (i + 1));
            std::swap(order[i], order[j]);
        }

        struct OpenBin {
            int room;
            std::vector<uint32_t> docs;
        };
        std::vector<OpenBin> open;  // in order of opening
        EpochBins out;
        out.epoch = epoch;
        out.bin_start.push_back(0);
        out.doc_ids.reserve(n_docs);
        auto emit = [&](size_t k) {
            out.doc_ids.insert(out.doc_ids.end(), open[k].docs.begin(), open[k].docs.end());
            out.bin_start.push_back((uint32_t)out.doc_ids.size());
            open.erase(open.begin() + k);
        };
        for (uint32_t d : order) {
            const int len = ds_->docs[d].len;
            int best = -1;  // best fit: the least room that still holds len
            for (size_t k = 0; k < open.size(); k++)
                if (open[k].room >= len && (best < 0 || open[k].room < open[best].room))
                    best = (int)k;
            if (best >= 0) {
                open[best].room -= len;
                open[best].docs.push_back(d);
                continue;
            }
            open.push_back({T_ - len, {d}});
            if ((int)open.size() > kMaxOpenBins) {
                size_t fullest = 0;
                for (size_t k = 1; k < open.size(); k++)
                    if (open[k].room < open[fullest].room) fullest = k;
                emit(fullest);
            }
        }
        while (!open.empty()) emit(0);
        return out;
    }

    void pack_next_epoch() {
        const uint64_t epoch = epoch_first_bin_.size() - 1;
        EpochBins bins = pack_epoch(epoch);
        epoch_first_bin_.push_back(epoch_first_bin_.back() + (bins.bin_start.size() - 1));
        remember(std::move(bins));
    }

    void remember(EpochBins bins) {
        if (cache_.size() == 2) cache_.erase(cache_.begin());
        cache_.push_back(std::move(bins));
    }

    const EpochBins& epoch_bins(uint64_t epoch) {
        for (size_t k = 0; k < cache_.size(); k++) {
            if (cache_[k].epoch == epoch) {
                std::rotate(cache_.begin() + k, cache_.begin() + k + 1, cache_.end());
                return cache_.back();
            }
        }
        remember(pack_epoch(epoch));
        return cache_.back();
    }
};

// ---- word tokenizer ----
// A stand-in for ModernBERT's BPE tokenizer so the built-in corpus needs no Python. Text
// is lowercased; a piece is a maximal run of ASCII letters/digits or one printable ASCII
// symbol; whitespace, control characters and non-ASCII bytes separate pieces and vanish.
// The literal "[MASK]" is one piece (the [MASK] id). Ordinary pieces take ids
// 0..words.size()-1, most frequent first (ties by string order); pieces seen only once
// stay out and encode as [UNK]. The special ids are the model's (ModernBERT's 50280..50284
// by default); words take the ids below the smallest of them, so a model of V = 50368 keeps up
// to 50280 words and a small-vocabulary model (the mini preset) as many as fit below its own.

inline constexpr const char* kMaskLiteral = "[MASK]";
inline int first_special_id(const SpecialIds& sp) { return std::min({sp.unk, sp.cls, sp.sep, sp.pad, sp.mask}); }

// A path that names a regular file; else a one-line error naming what it is (safetensors.h's check).
inline bool check_regular_file(const std::string& path, const std::string& what, std::string* err) {
    const std::string why = not_a_regular_file(path);
    if (!why.empty()) set_data_error(err, path + ": " + what + " " + why);
    return why.empty();
}

inline bool is_word_char(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

inline char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

inline bool is_symbol_char(unsigned char c) {  // printable ASCII that is not a letter/digit
    return c > ' ' && c < 0x7F && !is_word_char(c);
}

inline std::vector<std::string> split_pieces(const std::string& text) {
    std::vector<std::string> pieces;
    const size_t n = text.size();
    const size_t mask_len = std::char_traits<char>::length(kMaskLiteral);
    size_t i = 0;
    while (i < n) {
        const unsigned char c = (unsigned char)text[i];
        if (c == '[' && text.compare(i, mask_len, kMaskLiteral) == 0) {
            pieces.emplace_back(kMaskLiteral);
            i += mask_len;
        } else if (is_word_char(c)) {
            size_t j = i;
            std::string word;
            while (j < n && is_word_char((unsigned char)text[j]))
                word += ascii_lower(text[j++]);
            pieces.push_back(std::move(word));
            i = j;
        } else {
            if (is_symbol_char(c)) pieces.emplace_back(1, (char)c);
            i++;  // whitespace, control and non-ASCII bytes separate pieces and are dropped
        }
    }
    return pieces;
}

struct WordTokenizer {
    std::vector<std::string> words;             // id -> word for ordinary ids 0..words.size()-1
    std::unordered_map<std::string, int> index; // word -> id
    SpecialIds sp = kModernBertSpecialIds;

    // max_words is clamped to [0, first special id].
    static WordTokenizer build(const std::vector<std::string>& documents, int max_words,
                               const SpecialIds& sp = kModernBertSpecialIds) {
        std::unordered_map<std::string, int64_t> counts;
        for (const std::string& doc : documents)
            for (std::string& piece : split_pieces(doc))
                if (piece != kMaskLiteral) counts[std::move(piece)]++;
        std::vector<std::pair<std::string, int64_t>> ranked;
        for (auto& entry : counts)
            if (entry.second > 1) ranked.emplace_back(entry.first, entry.second);
        std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
            return a.second != b.second ? a.second > b.second : a.first < b.first;
        });
        const size_t n_words = std::min(ranked.size(), (size_t)std::clamp(max_words, 0, first_special_id(sp)));
        WordTokenizer tok;
        tok.sp = sp;
        for (size_t id = 0; id < n_words; id++) tok.add_word(ranked[id].first);
        return tok;
    }

    // vocab.txt: one word per line, id = line number (from 0).
    bool save(const std::string& path, std::string* err) const {
        const std::string tmp_path = path + ".tmp";
        {
            std::ofstream f(tmp_path, std::ios::binary | std::ios::trunc);
            for (const std::string& word : words) f << word << '\n';
            f.flush();
            if (!f) {
                set_data_error(err, tmp_path + ": write failed");
                return false;
            }
        }
        if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
            std::remove(tmp_path.c_str());
            set_data_error(err, path + ": write failed");
            return false;
        }
        return true;
    }

    // sp: the model's special ids; every word's id must lie below them.
    static bool load(const std::string& path, WordTokenizer* out, std::string* err,
                     const SpecialIds& sp = kModernBertSpecialIds) {
        *out = WordTokenizer{};
        out->sp = sp;
        if (!check_regular_file(path, "vocabulary", err)) return false;
        std::ifstream f(path, std::ios::binary);
        if (!f) {
            set_data_error(err, path + ": cannot open vocabulary");
            return false;
        }
        std::string line;
        for (int line_no = 1; std::getline(f, line); line_no++) {
            if (!line.empty() && line.back() == '\r') line.pop_back();
            const std::string where = path + ": line " + std::to_string(line_no);
            if (line.empty()) {
                set_data_error(err, where + " is empty");
                return false;
            }
            if (out->index.count(line)) {
                set_data_error(err, where + " repeats the word '" + line + "'");
                return false;
            }
            if ((int)out->words.size() == first_special_id(sp)) {
                set_data_error(err, path + ": more than " + std::to_string(first_special_id(sp)) +
                                        " words: word ids would reach the model's special ids (is this "
                                        "the vocabulary of another model's data?)");
                return false;
            }
            out->add_word(line);
        }
        if (f.bad()) {
            set_data_error(err, path + ": read failed");
            return false;
        }
        if (out->words.empty()) {
            set_data_error(err, path + ": vocabulary is empty");
            return false;
        }
        return true;
    }

    // No [CLS]/[SEP] added.
    std::vector<int> encode(const std::string& text) const {
        std::vector<int> ids;
        for (const std::string& piece : split_pieces(text)) {
            if (piece == kMaskLiteral) {
                ids.push_back(sp.mask);
                continue;
            }
            auto it = index.find(piece);
            ids.push_back(it == index.end() ? sp.unk : it->second);
        }
        return ids;
    }

    // Ids that are neither a word nor special (the unused tail of a 50368 vocabulary) read [UNK].
    std::string decode_piece(int id) const {
        if (id == sp.mask) return kMaskLiteral;
        if (id == sp.cls) return "[CLS]";
        if (id == sp.sep) return "[SEP]";
        if (id == sp.pad) return "[PAD]";
        if (id >= 0 && id < (int)words.size()) return words[id];
        return "[UNK]";
    }

    // Pieces joined by spaces, except none before . , ; : ! ? ' ) and none after ( ; an
    // apostrophe after a word also glues to a contraction ending: "don ' t" -> "don't".
    std::string decode(const std::vector<int>& ids) const {
        static const char* const kContractionEnds[] = {"s", "t", "re", "ve", "ll", "d", "m"};
        std::string text;
        std::string prev;                    // the previous piece
        bool prev_glued_apostrophe = false;  // prev is an apostrophe written right after a word
        for (int id : ids) {
            const std::string piece = decode_piece(id);
            bool space = !text.empty() && prev != "(";
            if (piece.size() == 1 && std::string(".,;:!?')").find(piece[0]) != std::string::npos)
                space = false;
            if (prev_glued_apostrophe)
                for (const char* end : kContractionEnds)
                    if (piece == end) space = false;
            prev_glued_apostrophe = piece == "'" && !text.empty() && is_word_char((unsigned char)text.back());
            if (space) text += ' ';
            text += piece;
            prev = piece;
        }
        return text;
    }

private:
    void add_word(const std::string& word) {
        index.emplace(word, (int)words.size());
        words.push_back(word);
    }
};

// ---- text corpus ----
// Turns plain-text files into a ready dataset directory: vocab.txt and shard_00000.bin, ...
// Documents are separated by blank lines or by lines that are exactly "%" (the fortune
// file format). Old fortune files underline by overstriking ("___\b\b\bword"); a backspace
// therefore deletes the character before it, so the word survives and the underline does not.

inline std::vector<std::string> split_documents(const std::string& text) {
    std::vector<std::string> documents;
    std::string current;  // the document being collected, line by line
    auto finish = [&]() {
        const size_t first = current.find_first_not_of(" \t\r\n\f\v");
        if (first != std::string::npos) {
            const size_t last = current.find_last_not_of(" \t\r\n\f\v");
            documents.push_back(current.substr(first, last - first + 1));
        }
        current.clear();
    };
    std::istringstream lines(text);
    std::string raw;
    while (std::getline(lines, raw)) {
        std::string line;
        for (char c : raw) {
            if (c == '\b') {
                if (!line.empty()) line.pop_back();
            } else {
                line += c;
            }
        }
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line == "%" || line.find_first_not_of(" \t\f\v") == std::string::npos) {
            finish();
        } else {
            current += line;
            current += '\n';
        }
    }
    finish();
    return documents;
}

// A text file: no NUL byte, and at most 1% control bytes other than tab, newline, carriage
// return, form feed, vertical tab and the fortunes' backspace. Binary files are refused, not
// tokenized into noise.
inline bool read_corpus_text(const std::string& path, std::string* text, std::string* err) {
    if (!check_regular_file(path, "text file", err)) return false;
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        set_data_error(err, path + ": cannot open text file");
        return false;
    }
    std::ostringstream contents;
    contents << f.rdbuf();
    if (f.bad()) {
        set_data_error(err, path + ": read failed");
        return false;
    }
    *text = contents.str();
    size_t control = 0;
    for (size_t i = 0; i < text->size(); i++) {
        const unsigned char c = (unsigned char)(*text)[i];
        if (c == 0) {
            set_data_error(err, path + ": not a text file (NUL byte at offset " + std::to_string(i) + ")");
            return false;
        }
        if ((c < 0x20 && !std::strchr("\t\n\r\f\v\b", (char)c)) || c == 0x7F) control++;
    }
    if (control * 100 > text->size()) {
        set_data_error(err, path + ": not a text file (" + std::to_string(control) + " of " +
                                std::to_string(text->size()) + " bytes are control characters)");
        return false;
    }
    return true;
}

// path: a text file, or a directory whose regular files (sorted by name, dot-files
// skipped) are the text files.
inline bool list_text_files(const std::string& path, std::vector<std::string>* files,
                            std::string* err) {
    namespace fs = std::filesystem;
    files->clear();
    std::error_code ec;
    if (!fs::is_directory(path, ec)) {
        if (!fs::is_regular_file(path, ec)) {
            set_data_error(err, path + ": no such file or directory");
            return false;
        }
        files->push_back(path);
        return true;
    }
    for (const fs::directory_entry& entry : fs::directory_iterator(path, ec))
        if (entry.is_regular_file(ec) && entry.path().filename().string()[0] != '.')
            files->push_back(entry.path().string());
    std::sort(files->begin(), files->end());
    if (ec || files->empty()) {
        set_data_error(err, path + ": directory has no text files");
        return false;
    }
    return true;
}

inline constexpr uint64_t kMaxShardTokens = 16ull << 20;  // 16M tokens per shard

// text_files: files, or directories expanded by list_text_files. Writes out_dir/vocab.txt and
// out_dir/shard_NNNNN.bin (every document as [CLS] ... [SEP], no document split across shards)
// for a model of vocab_size ids whose special ids are sp, and deletes stale shard_NNNNN.bin
// files left by an earlier, larger run. Creates out_dir if missing. Nothing in out_dir changes
// unless every input was read and tokenized: all files are first written as NAME.new, then
// renamed.
inline bool prepare_text_corpus(const std::vector<std::string>& text_files, const std::string& out_dir,
                                uint32_t vocab_size, const SpecialIds& sp, int max_words, std::string* err,
                                uint64_t max_shard_tokens = kMaxShardTokens) {
    namespace fs = std::filesystem;
    std::error_code ec;
    std::vector<std::string> files;
    for (const std::string& path : text_files) {
        if (!fs::is_directory(path, ec)) {
            files.push_back(path);  // a missing file is reported when it is read
            continue;
        }
        std::vector<std::string> inside;
        if (!list_text_files(path, &inside, err)) return false;
        files.insert(files.end(), inside.begin(), inside.end());
    }
    if (files.empty()) {
        set_data_error(err, out_dir + ": no text files given");
        return false;
    }
    const int highest_special = std::max({sp.unk, sp.cls, sp.sep, sp.pad, sp.mask});
    if (highest_special < 0 || (uint32_t)highest_special >= vocab_size) {
        set_data_error(err, out_dir + ": special id " + std::to_string(highest_special) +
                                " outside the model's vocabulary of " + std::to_string(vocab_size));
        return false;
    }
    std::vector<std::string> documents;
    for (const std::string& file : files) {
        std::string text;
        if (!read_corpus_text(file, &text, err)) return false;
        for (std::string& doc : split_documents(text)) documents.push_back(std::move(doc));
    }
    if (documents.empty()) {
        set_data_error(err, files[0] + ": no documents in the text files");
        return false;
    }
    const WordTokenizer tok = WordTokenizer::build(documents, max_words, sp);
    if (tok.words.empty()) {
        set_data_error(err, files[0] + ": the text files repeat no word, so the vocabulary would be empty");
        return false;
    }

    // Everything in memory first: shards of whole documents.
    std::vector<std::vector<uint32_t>> shards(1);
    for (const std::string& doc : documents) {
        const std::vector<int> ids = tok.encode(doc);
        if (ids.empty()) continue;  // nothing but dropped bytes
        if (!shards.back().empty() && shards.back().size() + ids.size() + 2 > max_shard_tokens) shards.emplace_back();
        shards.back().push_back((uint32_t)sp.cls);
        for (int id : ids) shards.back().push_back((uint32_t)id);
        shards.back().push_back((uint32_t)sp.sep);
    }
    if (shards.back().empty()) {
        set_data_error(err, files[0] + ": the text files hold no encodable text");
        return false;
    }

    if (fs::exists(out_dir, ec) && !fs::is_directory(out_dir, ec)) {
        set_data_error(err, out_dir + ": exists and is not a directory");
        return false;
    }
    fs::create_directories(out_dir, ec);
    if (ec) {
        set_data_error(err, out_dir + ": cannot create directory (" + ec.message() + ")");
        return false;
    }
    auto shard_name = [&](size_t k) {
        char name[32];
        std::snprintf(name, sizeof(name), "shard_%05zu.bin", k);
        return (fs::path(out_dir) / name).string();
    };
    const std::string staging = ".new";  // shards and vocabulary first land as NAME.new
    std::vector<std::string> written;
    auto discard = [&]() {
        for (const std::string& path : written) fs::remove(path + staging, ec);
        return false;
    };
    for (size_t k = 0; k < shards.size(); k++) {
        written.push_back(shard_name(k));
        if (!write_shard(shard_name(k) + staging, shards[k], vocab_size, err)) return discard();
    }
    const std::string vocab_path = (fs::path(out_dir) / "vocab.txt").string();
    written.push_back(vocab_path);
    if (!tok.save(vocab_path + staging, err)) return discard();
    for (const std::string& path : written)
        if (std::rename((path + staging).c_str(), path.c_str()) != 0) {
            set_data_error(err, path + ": cannot rename " + path + staging + " into place");
            return discard();
        }
    // Stale shards of an earlier, larger run would otherwise be loaded with the new ones.
    for (const fs::directory_entry& entry : fs::directory_iterator(out_dir, ec)) {
        const std::string name = entry.path().filename().string();
        int k = -1;
        char tail = 0;
        if (name.size() == 15 && std::sscanf(name.c_str(), "shard_%5d.bi%c", &k, &tail) == 2 &&
            tail == 'n' && (size_t)k >= shards.size() && shard_name(k) == entry.path().string())
            fs::remove(entry.path(), ec);
    }
    return true;
}
