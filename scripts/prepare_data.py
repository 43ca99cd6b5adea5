#!/usr/bin/env python3
"""Tokenize text into picotron token shards.

    python scripts/prepare_data.py --tokenizer PATH --out DIR [--shard-tokens N] input.txt [more.txt ...]

PATH is a local tokenizer.json file, or a local directory holding tokenizer.json (read with the
`tokenizers` library) or any other tokenizer files that transformers' AutoTokenizer can load.
Nothing is downloaded.

Documents: each input file is split into documents at blank lines (empty or whitespace-only) and at
lines that are exactly "%". The lines of a document are joined with "\\n", tokenized without special
tokens, and written as [CLS] tokens [SEP]. Documents are never split across shards; a new shard is
started when the next document would push the current one past --shard-tokens (a single document
longer than that gets a shard of its own).

Shard format (DIR/shard_00000.bin, ...; little endian): a 32-byte header, then the tokens.
    bytes  0-7   magic b"PICOTOK1"
    bytes  8-11  uint32 version = 1
    bytes 12-15  uint32 token width in bytes (2 if vocab_size <= 65536 else 4)
    bytes 16-23  uint64 n_tokens
    bytes 24-27  uint32 vocab_size
    bytes 28-31  uint32 reserved = 0
    then n_tokens unsigned integers of token-width bytes each.
"""
import argparse
import os
import struct
import sys

import numpy as np

MAGIC = b"PICOTOK1"
VERSION = 1
HEADER = struct.Struct("<8sIIQII")  # 32 bytes
assert HEADER.size == 32

MODERNBERT_VOCAB = 50368
DEFAULT_CLS = 50281
DEFAULT_SEP = 50282


# ----------------------------------------------------------------------------- tokenizer


class Tok:
    """A thin wrapper over either a tokenizers.Tokenizer or a transformers tokenizer."""

    def __init__(self, path):
        path = os.path.abspath(path)
        tj = None
        if os.path.isfile(path):
            tj = path
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            tj = os.path.join(path, "tokenizer.json")
        elif not os.path.isdir(path):
            sys.exit(f"--tokenizer: {path}: no such file or directory")

        self.hf = None
        self.tk = None
        if tj is not None:
            from tokenizers import Tokenizer

            try:
                self.tk = Tokenizer.from_file(tj)
            except Exception as e:  # malformed tokenizer.json
                sys.exit(f"--tokenizer: cannot load {tj}: {e}")
            self.tk.no_padding()
            self.tk.no_truncation()
            self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
            self.cls_id = self._lookup(["[CLS]", "<cls>", "<s>"])
            self.sep_id = self._lookup(["[SEP]", "<sep>", "</s>"])
        else:
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                sys.exit(f"--tokenizer: cannot load a tokenizer from {path}: {e}")
            self.vocab_size = len(self.hf)
            self.cls_id = self.hf.cls_token_id
            self.sep_id = self.hf.sep_token_id

    def _lookup(self, names):
        for n in names:
            i = self.tk.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode_batch(self, texts):
        if self.tk is not None:
            return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- documents


def iter_documents(paths):
    """Yield documents (strings) from text files; blank lines and lines equal to '%' separate them."""
    for p in paths:
        lines = []
        with open(p, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip() == "" or line == "%":
                    if lines:
                        yield "\n".join(lines)
                        lines = []
                else:
                    lines.append(line)
        if lines:
            yield "\n".join(lines)


def batched(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# ----------------------------------------------------------------------------- shards


class ShardWriter:
    def __init__(self, out_dir, shard_tokens, vocab_size):
        self.out_dir = out_dir
        self.shard_tokens = shard_tokens
        self.vocab_size = vocab_size
        self.width = 2 if vocab_size <= 65536 else 4
        self.dtype = np.dtype("<u2") if self.width == 2 else np.dtype("<u4")
        self.index = 0
        self.f = None
        self.n = 0
        self.written = []  # (path, n_tokens)

    def _open(self):
        self.path = os.path.join(self.out_dir, f"shard_{self.index:05d}.bin")
        self.tmp = self.path + ".tmp"
        self.f = open(self.tmp, "wb")
        self.f.write(HEADER.pack(MAGIC, VERSION, self.width, 0, self.vocab_size, 0))
        self.n = 0

    def _close(self):
        if self.f is None:
            return
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, VERSION, self.width, self.n, self.vocab_size, 0))
        self.f.close()
        os.replace(self.tmp, self.path)
        self.written.append((self.path, self.n))
        self.f = None
        self.index += 1

    def add(self, doc):
        """doc: 1-D array of token ids, already framed with CLS/SEP."""
        if self.f is not None and self.n > 0 and self.n + len(doc) > self.shard_tokens:
            self._close()
        if self.f is None:
            self._open()
        self.f.write(np.asarray(doc, dtype=self.dtype).tobytes())
        self.n += len(doc)

    def finish(self):
        self._close()
        return self.written


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description="Tokenize text files into picotron token shards.")
    ap.add_argument("--tokenizer", required=True, help="local tokenizer.json, or a local tokenizer directory")
    ap.add_argument("--out", required=True, help="output directory for shard_NNNNN.bin")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard (default 1e8)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size in the header")
    ap.add_argument("--cls-id", type=int, default=None, help="override the [CLS] id")
    ap.add_argument("--sep-id", type=int, default=None, help="override the [SEP] id")
    ap.add_argument("--batch-docs", type=int, default=1024, help="documents per tokenizer call")
    ap.add_argument("inputs", nargs="+", help="UTF-8 text files")
    args = ap.parse_args()

    for p in args.inputs:
        if not os.path.isfile(p):
            sys.exit(f"{p}: no such file")
    if args.shard_tokens <= 0:
        sys.exit("--shard-tokens must be positive")

    tok = Tok(args.tokenizer)
    cls_id = args.cls_id if args.cls_id is not None else tok.cls_id
    sep_id = args.sep_id if args.sep_id is not None else tok.sep_id
    if cls_id is None:
        print(f"warning: tokenizer has no CLS token; using {DEFAULT_CLS}", file=sys.stderr)
        cls_id = DEFAULT_CLS
    if sep_id is None:
        print(f"warning: tokenizer has no SEP token; using {DEFAULT_SEP}", file=sys.stderr)
        sep_id = DEFAULT_SEP

    vocab_size = tok.vocab_size
    if args.vocab_size is not None:
        vocab_size = args.vocab_size
    elif cls_id == DEFAULT_CLS and sep_id == DEFAULT_SEP and vocab_size < MODERNBERT_VOCAB:
        # ModernBERT's tokenizer reports 50280-odd tokens; the model's embedding has 50368 rows.
        vocab_size = MODERNBERT_VOCAB
    if vocab_size <= 0 or vocab_size > 0xFFFFFFFF:
        sys.exit(f"bad vocabulary size {vocab_size}")
    for name, i in (("CLS", cls_id), ("SEP", sep_id)):
        if not 0 <= i < vocab_size:
            sys.exit(f"{name} id {i} is outside the vocabulary (size {vocab_size})")

    os.makedirs(args.out, exist_ok=True)
    w = ShardWriter(args.out, args.shard_tokens, vocab_size)
    n_docs = 0
    n_tokens = 0
    for docs in batched(iter_documents(args.inputs), args.batch_docs):
        for ids in tok.encode_batch(docs):
            a = np.empty(len(ids) + 2, dtype=np.int64)
            a[0] = cls_id
            a[1:-1] = ids
            a[-1] = sep_id
            if len(ids) and (a.min() < 0 or a.max() >= vocab_size):
                sys.exit(f"token id {int(a.max())} is outside the vocabulary (size {vocab_size})")
            w.add(a)
            n_docs += 1
            n_tokens += len(a)
    shards = w.finish()
    if not shards:
        sys.exit("no documents found in the input")
    for path, n in shards:
        print(f"{path}: {n} tokens")
    print(
        f"{n_docs} documents, {n_tokens} tokens, {len(shards)} shard(s), vocab {vocab_size}, "
        f"token width {w.width} bytes, CLS {cls_id}, SEP {sep_id}"
    )


if __name__ == "__main__":
    main()
