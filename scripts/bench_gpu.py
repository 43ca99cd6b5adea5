#!/usr/bin/env python3
"""The GPU benchmark (`make bench`): picotron's `base` on one GPU, its attention kernels, and torch.

    python3 scripts/bench_gpu.py [--steps 30] [--skip 10] [--rows 0,1] [--out out/bench]
    python3 scripts/bench_gpu.py --parse-only LOG STDOUT TRACE_DIR [--skip N]   # check the parsers on any run

For each row (seq 1024: 16 documents × 1024, seq 8192: 2 × 8192; 16384 tokens a step either way):
  1. picotron timing run: `mpirun -np 1 ./picotron --model base` on a synthetic shard whose documents
     are exactly seq tokens long, so that every packed micro-batch holds B whole documents (the
     corpus in data/default has ~35-token documents, which would make "seq 8192" attend over short
     documents and differ from torch's batch). tokens/s, MFU, ms/step: the medians of the --log
     fields over the steps after --skip; peak GPU memory: nvidia-smi polled during the run.
  2. picotron traced run (--trace): rank 0's time per op class, per step over the steps after
     --trace-skip, from the Chrome trace (the totals picotron prints include the warm-up steps).
     Tracing synchronizes after every op, so these steps are slower than the timing run's.
  3. torch: scripts/bench_torch.py with the same B × seq (transformers ModernBertForMaskedLM, sdpa,
     bf16 autocast, torch.compile, fused AdamW); its median step after --skip warm-up steps.
Then out/bench/bench_attention (scripts/bench_attention.cu): the attention kernels' TFLOP/s.
Writes OUT/bench_gpu.md (and every run's full output as OUT/*.log) and prints it. A part that fails
is reported as such in the table (never a number it did not measure) and the exit status is 1.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import write_shard  # noqa: E402  (PICOTOK1 shards of equal-length [CLS] … [SEP] documents)

ROWS = [(1024, 16), (8192, 2)]  # (seq = document length, documents per micro-batch)
# picotron.cu's presets (model_preset) as bench_torch.py's shape flags; base is the benchmark, tiny the CPU dry run
PRESETS = {"base": {"hidden": 768, "intermediate": 1152, "layers": 22, "heads": 12},
           "tiny": {"hidden": 256, "intermediate": 384, "layers": 6, "heads": 4}}
TARGETS = {"flash_fwd_8k": 330.0, "flash_bwd_8k": 290.0, "mfu_1024": 0.50, "speedup": 2.0}
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def gpu_names():
    """The GPUs nvidia-smi lists ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: …)"), or the reason there are none."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None, "nvidia-smi not found"
    except subprocess.TimeoutExpired:
        return None, "nvidia-smi -L timed out"
    gpus = [line for line in r.stdout.splitlines() if line.startswith("GPU ")]
    if r.returncode != 0 or not gpus:
        return None, f"nvidia-smi -L lists no GPU ({(r.stdout + r.stderr).strip()[:200] or 'exit ' + str(r.returncode)})"
    return gpus, None


# ---- parsers (also run by --parse-only on a picotron_cpu run) ----

def read_log(path):
    """picotron's --log: one JSON object per step (report_step in picotron.cu)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_log(steps, skip):
    """Medians over the steps after the first `skip`: step_ms, tokens_per_s, flops_per_s, mfu (None if not logged)."""
    kept = steps[skip:]
    if not kept:
        raise ValueError(f"the log has {len(steps)} steps, none after the first {skip}")
    out = {"steps": len(kept), "first_step": kept[0]["step"], "tokens": sorted({s["tokens"] for s in kept})}
    for key in ("step_ms", "tokens_per_s", "flops_per_s", "mfu"):
        values = [s[key] for s in kept if s.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    used = [s["gpu_used_bytes"] for s in steps if s.get("gpu_used_bytes") is not None]
    out["gpu_used_mb"] = max(used) / 2**20 if used else None  # picotron's own count: the device's memory in use
    return out


def parse_op_classes(stdout):
    """picotron's closing "time per op class (rank 0, every step):  NAME P% (S s)  …" line: [(name, seconds)]."""
    line = next((l for l in stdout.splitlines() if l.startswith("time per op class")), None)
    if line is None:
        raise ValueError("no 'time per op class' line in picotron's output")
    found = re.findall(r"\s{2}(\S(?:.*?\S)?) (-?[\d.]+)% \((-?[\d.]+) s\)", line.split(":", 1)[1])
    if not found:
        raise ValueError(f"cannot parse: {line}")
    return [(name, float(seconds)) for name, _, seconds in found]


def op_ms_per_step(trace_path, classes, skip):
    """Each op class's ms per step over the steps after the first `skip`, from rank 0's Chrome trace.
    A step ends with its optimizer span (one per step on one rank), so the steps after `skip` are the
    class spans that start after the skip-th optimizer span ends. Returns ({class: ms}, steps counted)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("tid") == 0]
    step_ends = sorted(e["ts"] + e["dur"] for e in events if e["name"] == "optimizer")
    if len(step_ends) <= skip:
        raise ValueError(f"the trace has {len(step_ends)} optimizer spans, none after the first {skip}")
    start = step_ends[skip - 1] if skip > 0 else float("-inf")
    n = len(step_ends) - skip
    ms = {c: 0.0 for c in classes}
    for e in events:
        if e["name"] in ms and e["ts"] >= start:
            ms[e["name"]] += e["dur"] / 1e3 / n
    return ms, n


def op_table_column(log_steps, stdout, trace_path, skip):
    """{class: ms per step}, "other" being the traced steps' mean time minus the classes (as picotron's line)."""
    classes = [name for name, _ in parse_op_classes(stdout) if name != "other"]
    ms, n = op_ms_per_step(trace_path, classes, skip)
    step_ms = statistics.mean(s["step_ms"] for s in log_steps[skip:])
    if len(log_steps) - skip != n:
        raise ValueError(f"the log has {len(log_steps) - skip} steps after {skip}, the trace {n}")
    ms["other"] = step_ms - sum(ms.values())
    return ms, step_ms


# ---- running things ----

class MemoryPoll:
    """Peak GPU memory of a process tree while it runs, polling nvidia-smi every `period` s: its own
    processes' used_memory when nvidia-smi shows their pids (it may not inside a container's pid
    namespace), else the GPU's memory.used above what it was before the run."""

    def __init__(self, period=0.2):
        self.period, self.pid, self.peak_proc, self.peak_gpu = period, None, 0, 0
        self.base_gpu = self._gpu_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _query(args):
        try:
            r = subprocess.run(["nvidia-smi"] + args + ["--format=csv,noheader,nounits"], capture_output=True,
                               text=True, timeout=10)
            return [line.split(",") for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            return []

    def _gpu_used(self):
        rows = self._query(["--query-gpu=memory.used", "-i", "0"])
        return int(rows[0][0]) if rows and rows[0][0].strip().isdigit() else 0

    def _tree(self):  # pid and its descendants, from /proc
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, grew = {self.pid}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        return tree

    def _run(self):
        while not self._stop.is_set():
            tree = self._tree()
            used = sum(int(m) for p, m in self._query(["--query-compute-apps=pid,used_memory"])
                       if p.strip().isdigit() and int(p) in tree and m.strip().isdigit())
            self.peak_proc = max(self.peak_proc, used)
            self.peak_gpu = max(self.peak_gpu, self._gpu_used() - self.base_gpu)
            self._stop.wait(self.period)

    def start(self, pid):
        self.pid = pid
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        if self.peak_proc > 0:
            return self.peak_proc, "nvidia-smi used_memory of the run's processes"
        if self.peak_gpu > 0:
            return self.peak_gpu, "nvidia-smi memory.used of GPU 0 above its level before the run"
        return None, "nvidia-smi reported no memory for the run"


def run_logged(cmd, log_path, timeout, poll_memory=True):
    """Runs cmd with its output teed to log_path; returns (exit status, output, (peak MB, how) or None)."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, **MPI_ENV)
    poll = MemoryPoll() if poll_memory else None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if poll:
            poll.start(proc.pid)
        killer = threading.Timer(timeout, proc.kill)  # a hung run ends with a non-zero status, not a hung bench
        killer.start()
        out = []
        for line in proc.stdout:
            out.append(line)
            log.write(line)
            if line.startswith(("step ", "RESULT", "torch:")) or "error" in line.lower():
                print("  " + line.rstrip()[:160], flush=True)
        rc = proc.wait()
        killer.cancel()
    memory = poll.stop() if poll else None
    return rc, "".join(out), memory


def picotron_cmd(a, shard, seq, docs, steps, extra):
    return (["mpirun", "-np", "1", a.binary, "--model", a.model, "--data", shard, "--seq-len", str(seq),
             "--micro-batch-tokens", str(seq * docs), "--steps", str(steps)] + extra)


def bench_row(a, seq, docs, failures):
    """One row's picotron timing run, traced run and torch run; a part that failed is absent (and in failures)."""
    row = {"seq": seq, "docs": docs, "tokens": seq * docs}
    tag = f"seq{seq}"
    shard = os.path.join(a.out, f"docs_{seq}.bin")
    write_shard(shard, docs * (max(a.steps, a.trace_steps) + 2), seq)  # enough documents for every step

    log = os.path.join(a.out, f"picotron_{tag}.jsonl")
    rc, out, memory = run_logged(picotron_cmd(a, shard, seq, docs, a.steps, ["--log", log]),
                                 os.path.join(a.out, f"picotron_{tag}.log"), a.timeout)
    try:
        if rc != 0:
            raise RuntimeError(f"exit status {rc}")
        summary = summarize_log(read_log(log), a.skip)
        if summary["tokens"] != [seq * docs]:
            raise RuntimeError(f"packed {summary['tokens']} tokens a step, not {seq * docs}: the batch would differ from torch's")
        if summary["gpu_used_mb"] is not None:  # the log's field (cudaMemGetInfo) is exact; nvidia-smi polls
            memory = (summary["gpu_used_mb"], "picotron's log: gpu_used_bytes, the GPU's memory in use after each step")
        row["picotron"] = dict(summary, peak_mb=memory[0], peak_how=memory[1])
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        failures.append(f"picotron {tag}: {e} (see {a.out}/picotron_{tag}.log)")

    trace_log, trace_dir = os.path.join(a.out, f"picotron_{tag}_trace.jsonl"), os.path.join(a.out, f"trace_{tag}")
    rc, out, _ = run_logged(picotron_cmd(a, shard, seq, docs, a.trace_steps, ["--log", trace_log, "--trace", trace_dir]),
                            os.path.join(a.out, f"picotron_{tag}_trace.log"), a.timeout, poll_memory=False)
    try:
        if rc != 0:
            raise RuntimeError(f"exit status {rc}")
        row["ops"], row["ops_step_ms"] = op_table_column(read_log(trace_log), out, os.path.join(trace_dir, "trace_rank0.json"),
                                                         a.trace_skip)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        failures.append(f"picotron --trace {tag}: {e} (see {a.out}/picotron_{tag}_trace.log)")

    rc, out, memory = run_logged([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_torch.py"),
                                  "--batch", str(docs), "--seq", str(seq), "--steps", str(a.steps - a.skip),
                                  "--warmup-steps", str(a.skip)] + [f"--{k}={v}" for k, v in PRESETS[a.model].items()]
                                 + shlex.split(a.torch_args), os.path.join(a.out, f"torch_{tag}.log"), a.timeout)
    line = next((l for l in out.splitlines() if l.startswith("BENCH_TORCH ")), None)
    if rc == 0 and line:
        row["torch"] = dict(json.loads(line[len("BENCH_TORCH "):]), peak_mb=memory[0], peak_how=memory[1])
    else:
        failures.append(f"torch {tag}: exit status {rc} (see {a.out}/torch_{tag}.log)")
    return row


def bench_attention(a, failures):
    if not a.attention_binary:
        return []
    rc, out, _ = run_logged([a.attention_binary, "--runs", "20", "--warmup", "3"], os.path.join(a.out, "attention.log"),
                            a.timeout, poll_memory=False)
    results = [json.loads(l[len("RESULT "):]) for l in out.splitlines() if l.startswith("RESULT ")]
    if rc != 0 or not results:
        failures.append(f"bench_attention: exit status {rc}, {len(results)} results (see {a.out}/attention.log)")
    return results


# ---- the report ----

def model_shape(name):
    m = PRESETS[name]
    return f"H {m['hidden']}, {m['layers']} layers, {m['heads']} heads × 64, I {m['intermediate']}, V 50368"


def fmt(x, spec, none="not measured"):
    return none if x is None else format(x, spec)


def verdict(measured, target):
    return "not measured" if measured is None else ("met" if measured >= target else "not met")


def report(a, gpus, rows, attention, failures):
    def pico(r, k):
        return r.get("picotron", {}).get(k)

    def torch_(r, k):
        return r.get("torch", {}).get(k)

    t0 = next((r["torch"] for r in rows if "torch" in r), None)
    versions = f"torch {t0['torch']}, transformers {t0['transformers']}" if t0 else "torch did not run"
    torch_how = (f"{'torch.compile' if t0['compiled'] else 'eager (no torch.compile)'}, "
                 f"{'fused' if t0['fused_adamw'] else 'unfused'} AdamW") if t0 else "torch.compile, fused AdamW"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    L = [f"# picotron GPU benchmark", "",
         f"{'; '.join(gpus)}", f"{datetime.datetime.now().isoformat(timespec='seconds')}; commit {commit}; {versions}",
         f"command: {shlex.join([os.path.basename(sys.executable)] + sys.argv)}", "",
         f"## Training step: {a.model} ({model_shape(a.model)}), 1 GPU", "",
         f"picotron: `mpirun -np 1 {a.binary} --model {a.model}` on documents exactly seq tokens long, median of steps "
         f"{a.skip + 1}–{a.steps}; MFU = picotron's model FLOPs (GEMMs, the attention pairs computed, the sparse head; "
         "backward 2× forward) / (step time × 989 TFLOP/s, picotron's default peak). torch: transformers "
         f"ModernBertForMaskedLM, sdpa, bf16 autocast, {torch_how}, sparse prediction; median of {a.steps - a.skip} steps after {a.skip} warm-up. "
         "Both count every token of the batch (no padding). Peak MB: nvidia-smi while the run ran (context and "
         "allocator caches included); torch's max_memory_allocated beside it.", "",
         "| shape | picotron tokens/s | picotron MFU | picotron ms/step | picotron peak MB | torch tokens/s | torch ms/step "
         "| torch peak MB | torch max_memory_allocated MB | picotron / torch tokens/s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pt, tt = pico(r, "tokens_per_s"), torch_(r, "tokens_per_s")
        ratio = pt / tt if pt is not None and tt is not None else None
        r["ratio"] = ratio
        mfu = pico(r, "mfu")
        L.append(f"| {r['docs']}×{r['seq']} ({r['tokens']} tokens) | {fmt(pt, '.0f')} | {fmt(mfu and 100 * mfu, '.1f')}"
                 f"{'%' if mfu is not None else ''} | {fmt(pico(r, 'step_ms'), '.1f')} | {fmt(pico(r, 'peak_mb'), '.0f')} "
                 f"| {fmt(tt, '.0f')} | {fmt(torch_(r, 'step_ms'), '.1f')} | {fmt(torch_(r, 'peak_mb'), '.0f')} "
                 f"| {fmt(torch_(r, 'peak_allocated_mb'), '.0f')} | {fmt(ratio, '.2f')} |")
    hows = sorted({x["peak_how"] for r in rows for x in (r.get("picotron", {}), r.get("torch", {})) if "peak_how" in x})
    if hows:
        L += ["", "peak MB measured as: " + "; ".join(hows)]

    if any("ops" in r for r in rows):
        traced = [r for r in rows if "ops" in r]
        classes = list(dict.fromkeys(c for r in traced for c in sorted(r["ops"], key=lambda c: -r["ops"][c]) if c != "other"))
        L += ["", f"## Step time per op class (picotron --trace, mean of steps {a.trace_skip + 1}–{a.trace_steps})", "",
              "Tracing waits for the GPU after every op, so these steps take longer than the timing run's.", "",
              "| op class | " + " | ".join(f"{r['docs']}×{r['seq']} ms/step | %" for r in traced) + " |",
              "|---|" + "---|---|" * len(traced)]
        for c in classes + ["other", "step"]:
            cells = []
            for r in traced:
                ms = r["ops_step_ms"] if c == "step" else r["ops"].get(c)
                cells.append(f"{fmt(ms, '.2f', '')} | {fmt(ms and 100 * ms / r['ops_step_ms'], '.1f', '')}")
            L.append(f"| {c} | " + " | ".join(cells) + " |")

    flash8 = next((x for x in attention if x["impl"] == "flash" and x["T"] == 8192 and x["window"] < 0), None)
    if attention:
        L += ["", "## Attention kernels (12 heads × 64, one document of T tokens)", "",
              "FLOPs: forward 4·hd·(visible query-key pairs)·heads (global: T², window 64: the pairs with |i − j| ≤ 64), "
              "backward 2.5× forward; median of 20 cudaEvent-timed launches after 3 warm-up, of "
              "cuda::attention_forward/_backward (the flash kernels on bf16 tensor cores the training step calls).", "",
              "| kernels | T | window | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |",
              "|---|---|---|---|---|---|---|"]
        for x in attention:
            L.append(f"| {x['impl']} | {x['T']} | {'global' if x['window'] < 0 else '±' + str(x['window'])} | {x['fwd_ms']:.3f} "
                     f"| {x['fwd_tflops']:.1f} | {x['bwd_ms']:.3f} | {x['bwd_tflops']:.1f} |")

    r1024 = next((r for r in rows if r["seq"] == 1024), {})
    checks = [("flash attention forward, 8k tokens, global", "≥ 330 TFLOP/s", flash8 and flash8["fwd_tflops"], TARGETS["flash_fwd_8k"], ".1f"),
              ("flash attention backward, 8k tokens, global", "≥ 290 TFLOP/s", flash8 and flash8["bwd_tflops"], TARGETS["flash_bwd_8k"], ".1f"),
              ("base MFU at seq 1024", "≥ 50%", pico(r1024, "mfu"), TARGETS["mfu_1024"], ".3f")]
    checks += [(f"picotron / torch tokens/s at seq {r['seq']}", "≥ 2×", r.get("ratio"), TARGETS["speedup"], ".2f") for r in rows]
    L += ["", "## Targets", "", "| what | target | measured | |", "|---|---|---|---|"]
    for what, target, measured, bound, spec in checks:
        L.append(f"| {what} | {target} | {fmt(measured, spec)} | {verdict(measured, bound)} |")
    if failures:
        L += ["", "## Failed parts (no numbers for them above)", ""] + [f"- {f}" for f in failures]
    return "\n".join(L) + "\n"


def parse_only(a):
    """--parse-only LOG STDOUT TRACE_DIR: the parsers on an existing run (e.g. picotron_cpu's), printed."""
    log_path, stdout_path, trace_dir = a.parse_only
    steps = read_log(log_path)
    print("log summary:", json.dumps(summarize_log(steps, a.skip)))
    stdout = open(stdout_path).read()
    print("op classes (picotron's totals, every step):", parse_op_classes(stdout))
    ops, step_ms = op_table_column(steps, stdout, os.path.join(trace_dir, "trace_rank0.json"), a.skip)
    print(f"ms per step after {a.skip} step(s): " + ", ".join(f"{c} {ms:.2f}" for c, ms in ops.items()) + f"; step {step_ms:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="steps of each timing run (default 30)")
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the medians (default 10)")
    p.add_argument("--trace-steps", type=int, default=15, help="steps of each traced run (default 15)")
    p.add_argument("--trace-skip", type=int, default=5, help="warm-up steps left out of the op table (default 5)")
    p.add_argument("--rows", help="comma-separated indices into " + str(ROWS) + " or SEQxDOCS (default all)")
    p.add_argument("--binary", default="./picotron")
    p.add_argument("--attention-binary", default="out/bench/bench_attention")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each run (default 1800)")
    p.add_argument("--out", default="out/bench")
    # a dry run of the whole pipeline on a CPU (see README): --no-gpu-check --binary ./picotron_cpu --model tiny
    # --attention-binary '' --torch-args '--device cpu --no-compile'
    p.add_argument("--model", default="base", choices=sorted(PRESETS))
    p.add_argument("--torch-args", default="", help="more flags for bench_torch.py")
    p.add_argument("--no-gpu-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parse-only", nargs=3, metavar=("LOG", "STDOUT", "TRACE_DIR"), help="only run the parsers on these")
    a = p.parse_args()
    if a.parse_only:
        return parse_only(a)
    if not (0 <= a.skip < a.steps and 0 <= a.trace_skip < a.trace_steps):
        p.error("need 0 <= --skip < --steps and 0 <= --trace-skip < --trace-steps")
    gpus, why = gpu_names()
    if not gpus and not a.no_gpu_check:
        sys.exit(f"make bench needs an NVIDIA GPU: {why}")
    gpus = gpus or [f"no GPU ({why}): a dry run of the pipeline, not a GPU benchmark"]
    try:  # an index into ROWS, or SEQxDOCS (smaller shapes for a dry run)
        rows = [tuple(map(int, r.split("x"))) if "x" in r else ROWS[int(r)] for r in a.rows.split(",")] if a.rows else ROWS
    except (ValueError, IndexError):
        p.error(f"--rows: indices into {ROWS} or SEQxDOCS, got {a.rows}")
    os.makedirs(a.out, exist_ok=True)

    failures = []
    attention = bench_attention(a, failures)
    results = [bench_row(a, seq, docs, failures) for seq, docs in rows]
    text = report(a, gpus, results, attention, failures)
    with open(os.path.join(a.out, "bench_gpu.md"), "w") as f:
        f.write(text)
    print("\n" + text, end="")
    print(f"(written to {os.path.join(a.out, 'bench_gpu.md')})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
