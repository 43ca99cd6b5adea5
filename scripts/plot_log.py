#!/usr/bin/env python3
"""Plot a picotron JSONL training log.

    python scripts/plot_log.py run.jsonl out.png

The log holds one JSON object per line with at least
step, loss, grad_norm, lr, tokens, tokens_per_s, mfu, step_ms (DESIGN.md §9).
Draws three stacked panels against step: loss, learning rate, tokens/s.
Blank lines and lines that are not JSON objects are skipped (with a warning).
"""
import argparse
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"{path}:{lineno}: skipping line that is not JSON ({e})", file=sys.stderr)
                continue
            if not isinstance(obj, dict) or "step" not in obj:
                print(f"{path}:{lineno}: skipping line without a 'step' field", file=sys.stderr)
                continue
            rows.append(obj)
    rows.sort(key=lambda r: r["step"])
    return rows


def series(rows, key):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def main():
    ap = argparse.ArgumentParser(description="Plot loss, learning rate and tokens/s from a picotron JSONL log.")
    ap.add_argument("log", help="JSONL training log (--log FILE.jsonl)")
    ap.add_argument("out", help="output image (PNG)")
    ap.add_argument("--title", default=None, help="figure title (default: the log's file name)")
    args = ap.parse_args()

    rows = read_log(args.log)
    if not rows:
        sys.exit(f"{args.log}: no log records found")

    panels = [
        ("loss", "loss", "tab:blue"),
        ("lr", "learning rate", "tab:orange"),
        ("tokens_per_s", "tokens / s", "tab:green"),
    ]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(8, 9))
    for ax, (key, label, color) in zip(axes, panels):
        xs, ys = series(rows, key)
        if xs:
            ax.plot(xs, ys, color=color, linewidth=1.2)
            if len(xs) == 1:
                ax.scatter(xs, ys, color=color, s=12)
        else:
            ax.text(0.5, 0.5, f"no '{key}' values", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].ticklabel_format(axis="y", useOffset=False)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("step")

    last = rows[-1]
    summary = [f"step {last['step']}"]
    if "loss" in last:
        summary.append(f"loss {float(last['loss']):.4f}")
    if "mfu" in last and last["mfu"] is not None:
        mfu = float(last["mfu"])
        summary.append(f"MFU {100 * mfu:.1f}%" if mfu <= 1.0 else f"MFU {mfu:.1f}%")
    if "step_ms" in last and last["step_ms"] is not None:
        summary.append(f"{float(last['step_ms']):.1f} ms/step")
    title = args.title if args.title is not None else args.log
    fig.suptitle(f"{title}\n" + ", ".join(summary), fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(rows)} steps)")


if __name__ == "__main__":
    main()
