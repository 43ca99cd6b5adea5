#!/usr/bin/env python3
"""Times picotron_cpu against PyTorch + transformers training the same model on the same batches.

    python3 scripts/bench_cpu.py [--rows 0,2] [--steps 4] [--warmup-steps 2] [--binary ./picotron_cpu] [--out out/bench]

Each row (micro-batch tokens, document length, threads) trains the `tiny` preset (H 256, L 6,
V 50368) on a synthetic shard whose documents are exactly one document length long, so that
picotron's packed micro-batch and torch's (tokens / doc_len, doc_len) batch hold the same whole
documents and neither side pads. Both run as child processes with the thread count in their
environment, and peak memory is each child's own ru_maxrss (os.wait4). Writes OUT/bench.md.
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time

import numpy as np

ROWS = [(1024, 512, 1), (4096, 512, 1), (4096, 512, 2), (4096, 2048, 2), (4096, 4096, 2)]
# The tiny preset's ids (picotron.cu model_preset keeps ModernBERT's, data.h kModernBertSpecialIds).
CLS, SEP, MASK, UNK = 50281, 50282, 50284, 50280
VOCAB = 50368
ORDINARY_BELOW = 16000  # document ids are drawn below this: far from every special id
WEIGHT_DECAY = 1e-5  # picotron's --weight-decay default (TrainConfig), on matrices only
RESULT = "BENCH_RESULT "  # prefixes the torch worker's JSON line, so warnings on the same pipe don't matter


def write_shard(path, n_docs, doc_len):
    """A PICOTOK1 shard (data.h): 32-byte little-endian header, then uint32 ids; [CLS] … [SEP] documents."""
    docs = np.random.default_rng(1234).integers(0, ORDINARY_BELOW, size=(n_docs, doc_len), dtype=np.uint32)
    docs[:, 0], docs[:, -1] = CLS, SEP
    with open(path, "wb") as f:  # magic, version 1, token width 4, n_tokens, vocab_size, reserved
        f.write(struct.pack("<8sIIQII", b"PICOTOK1", 1, 4, docs.size, VOCAB, 0))
        f.write(docs.astype("<u4").tobytes())


def run_measured(cmd, env):
    """Runs cmd; returns (merged stdout+stderr, peak RSS in MB of that child, from wait4's ru_maxrss in KiB)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0:
        sys.exit(f"bench_cpu: {shlex.join(cmd)} exited with {proc.returncode}:\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1024


def thread_env(n):
    return dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def torch_worker(a):
    """One row's torch side, in its own process: prints RESULT + {"step_s": [...], ...}."""
    import torch  # imported here so the parent never loads torch: its threads and memory stay the child's

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)  # must precede any parallel work; one row = one intra-op pool
    import transformers
    from transformers import AutoConfig, ModernBertForMaskedLM

    # transformers 5.x ModernBERT no longer unpads: it runs on the (B, S) tensor as given. With an
    # all-ones mask, sdpa's full-attention layers get no mask at all (create_bidirectional_mask
    # returns None), but the sliding layers get a dense (B, 1, S, S) boolean band whenever S >= 64,
    # so torch computes all S² scores there and masks them, where picotron computes only the band
    # (±64). That is how transformers does the work, so it is what we time.
    config = AutoConfig.from_pretrained(a.config, attn_implementation="sdpa", sparse_prediction=True)
    model = ModernBertForMaskedLM(config).float().train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    docs = torch.from_numpy(np.fromfile(a.shard, dtype="<u4", offset=32).astype(np.int64)).view(-1, a.doc_len)
    rows = a.tokens // a.doc_len
    g = torch.Generator().manual_seed(0)
    step_s = []
    for step in range(a.warmup_steps + a.steps):
        # A new batch of whole documents each step, masked as data.h does: 30% of the ordinary
        # tokens, of those 80% [MASK], 10% a random ordinary id, 10% kept; labels -100 elsewhere.
        ids = docs[step * rows:(step + 1) * rows].clone()  # the shard has enough for every step
        chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (ids != CLS) & (ids != SEP)
        labels = torch.where(chosen, ids, -100)
        r = torch.rand(ids.shape, generator=g)
        ids = torch.where(chosen & (r < 0.8), MASK, ids)
        ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), torch.randint(0, UNK, ids.shape, generator=g), ids)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
    print(RESULT + json.dumps({"step_s": step_s, "loss": loss.item(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "transformers": transformers.__version__}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", help="comma-separated row indices into " + str(ROWS))
    p.add_argument("--steps", type=int, default=4, help="measured steps (default 4)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--binary", default="./picotron_cpu")
    p.add_argument("--out", default="out/bench")
    # --torch-worker: internal, one row's torch side (see torch_worker)
    for flag in ("--shard", "--config"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--tokens", "--doc-len", "--threads"):
        p.add_argument(flag, type=int, help=argparse.SUPPRESS)
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_worker:
        return torch_worker(a)
    if a.steps < 1 or a.warmup_steps < 0:
        sys.exit("bench_cpu: --steps must be >= 1 and --warmup-steps >= 0")
    try:
        rows = [ROWS[int(i)] for i in a.rows.split(",")] if a.rows else ROWS
    except (ValueError, IndexError):
        sys.exit(f"bench_cpu: --rows wants comma-separated indices in 0..{len(ROWS) - 1}, got '{a.rows}'")
    cores = os.cpu_count()
    for _, _, n in rows:
        if n > cores:
            sys.exit(f"bench_cpu: a row wants {n} threads but this machine has {cores} CPUs; pick others with --rows")
    os.makedirs(a.out, exist_ok=True)
    total = a.warmup_steps + a.steps

    # One shard per document length, big enough for every step of its largest batch without
    # repeating a document; its document count is a multiple of every batch's documents (powers of
    # two here), so picotron's best-fit packing fills each micro-batch with whole documents.
    shards = {}
    for doc_len in sorted({d for _, d, _ in rows}):
        most = max(t for t, d, _ in rows if d == doc_len) // doc_len
        shards[doc_len] = os.path.join(a.out, f"docs_{doc_len}.bin")
        write_shard(shards[doc_len], max(total + 1, 4) * most, doc_len)
    for tokens, doc_len in sorted({(t, d) for t, d, _ in rows}):
        log = os.path.join(a.out, f"check_{tokens}_{doc_len}.jsonl")
        run_measured([a.binary, "--model", "tiny", "--data", shards[doc_len], "--seq-len", str(doc_len),
                      "--micro-batch-tokens", str(tokens), "--steps", "1", "--log", log], thread_env(1))
        packed = read_log(log)[0]["tokens"]
        print(f"check: {tokens // doc_len} × {doc_len}-token documents per micro-batch: picotron packed {packed} tokens")
        if packed != tokens:
            sys.exit(f"bench_cpu: picotron packed {packed} tokens, not {tokens}: the shapes would differ")

    # torch's model is picotron's tiny preset as picotron exports it (same config.json fields).
    hf_dir = os.path.join(a.out, "tiny_hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    any_shard = next(iter(shards.values()))
    run_measured([a.binary, "--model", "tiny", "--data", any_shard, "--seq-len", "512", "--micro-batch-tokens", "1024",
                  "--steps", "1", "--export", hf_dir], thread_env(1))

    results, versions = [], None
    for i, (tokens, doc_len, n) in enumerate(rows):
        log = os.path.join(a.out, f"picotron_{ROWS.index((tokens, doc_len, n))}.jsonl")
        if os.path.exists(log):
            os.remove(log)
        cmd = [a.binary, "--model", "tiny", "--data", shards[doc_len], "--seq-len", str(doc_len),
               "--micro-batch-tokens", str(tokens), "--steps", str(total), "--threads", str(n), "--log", log]
        _, pico_mb = run_measured(cmd, thread_env(n))
        steps = read_log(log)
        assert all(s["tokens"] == tokens for s in steps), "picotron packed a partial micro-batch"
        pico_s = statistics.median(s["step_ms"] for s in steps[-a.steps:]) / 1e3

        out, torch_mb = run_measured([sys.executable, os.path.abspath(__file__), "--torch-worker", "--shard", shards[doc_len],
                                      "--config", hf_dir, "--tokens", str(tokens), "--doc-len", str(doc_len),
                                      "--threads", str(n), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps)],
                                     thread_env(n))
        worker = json.loads(next(line for line in out.splitlines() if line.startswith(RESULT))[len(RESULT):])
        assert worker["threads"] == n, f"torch runs {worker['threads']} threads, not {n}"
        torch_s = statistics.median(worker["step_s"][-a.steps:])
        versions = f"torch {worker['torch']}, transformers {worker['transformers']}"
        results.append((f"{tokens // doc_len}×{doc_len} ({tokens} tokens)", n, pico_s, torch_s, pico_mb, torch_mb))
        print(f"row {i + 1}/{len(rows)}: {results[-1][0]}, {n} thread(s): picotron {pico_s:.3f} s/step, "
              f"torch {torch_s:.3f} s/step", flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown")
    lines = [f"machine: {cpu}, {cores} CPUs; {datetime.datetime.now().isoformat(timespec='seconds')}; {versions}",
             f"command: {shlex.join([os.path.basename(sys.executable)] + sys.argv)}",
             f"tiny preset (H 256, L 6, V 50368), fp32, AdamW; median of {a.steps} steps after {a.warmup_steps} warm-up; "
             "peak MB = the process's max RSS",
             "",
             "| shape | threads | picotron_cpu s/step | torch s/step | speed ratio (torch / picotron; > 1: picotron faster) "
             "| picotron peak MB | torch peak MB |",
             "|---|---|---|---|---|---|---|"]
    for shape, n, pico_s, torch_s, pico_mb, torch_mb in results:
        lines.append(f"| {shape} | {n} | {pico_s:.3f} | {torch_s:.3f} | {torch_s / pico_s:.2f} | {pico_mb:.0f} | {torch_mb:.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table, end="")
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
