#!/usr/bin/env python3
"""Merge per-rank Chrome trace-event files into one file for Perfetto / chrome://tracing.

    python scripts/merge_traces.py TRACE_DIR [-o merged.json]

TRACE_DIR holds trace_rank{R}.json, one per rank, each either {"traceEvents": [...]} or a bare
list of events (tid 0 = compute, tid 1 = communication). The output is one JSON object
{"traceEvents": [...], "displayTimeUnit": "ms"}: every event with pid set to the rank from the
file name, plus metadata so that each rank is one process row named "rank R" (sorted by rank)
with threads "compute" and "comm".

Clocks: a file may carry {"otherData": {"t0_unix_us": T}}, the wall clock (microseconds since
the epoch) at which that rank's trace time 0 was taken. When it does, the rank's timestamps are
shifted by T - min(T over ranks) so that all ranks share one time axis starting at the earliest
t0. A file without it is left as it is.

Standard library only. Default output TRACE_DIR/merged.json. Prints one summary line.
"""
import argparse
import json
import os
import re
import sys

FILE_RE = re.compile(r"^trace_rank(\d+)\.json$")
THREAD_NAMES = {0: "compute", 1: "comm"}
# metadata that this script writes itself; copies found in the inputs are dropped
OWN_METADATA = {"process_name", "process_sort_index", "thread_name"}


def fail(msg):
    print(f"merge_traces: {msg}", file=sys.stderr)
    sys.exit(2)


def load(path):
    """Return (events, t0_unix_us or None) for one rank's file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # The JSON array format may legally lack its closing bracket (a rank that died while
        # tracing); accept that, nothing else.
        stripped = text.rstrip().rstrip(",")
        doc = None
        if stripped.lstrip().startswith("[") and not stripped.endswith("]"):
            try:
                doc = json.loads(stripped + "]")
            except json.JSONDecodeError:
                pass
        if doc is None:
            fail(f"{path}: not valid JSON: {e}")
    t0 = None
    if isinstance(doc, list):
        events = doc
    elif isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list):
        events = doc["traceEvents"]
        other = doc.get("otherData")
        if isinstance(other, dict) and other.get("t0_unix_us") is not None:
            t0 = other["t0_unix_us"]
            if isinstance(t0, str):
                try:
                    t0 = float(t0)
                except ValueError:
                    fail(f"{path}: otherData.t0_unix_us is not a number: {t0!r}")
            if isinstance(t0, bool) or not isinstance(t0, (int, float)):
                fail(f"{path}: otherData.t0_unix_us is not a number: {t0!r}")
    else:
        fail(f'{path}: expected {{"traceEvents": [...]}} or a list of events')
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            fail(f"{path}: event {i} is not an object")
    return events, t0


def main():
    ap = argparse.ArgumentParser(description="Merge trace_rank{R}.json files into one Chrome trace.")
    ap.add_argument("trace_dir", help="directory with trace_rank{R}.json files")
    ap.add_argument("-o", "--output", help="output file (default TRACE_DIR/merged.json)")
    args = ap.parse_args()

    if not os.path.isdir(args.trace_dir):
        fail(f"{args.trace_dir}: not a directory")
    ranks = {}
    for name in os.listdir(args.trace_dir):
        m = FILE_RE.match(name)
        if m:
            ranks[int(m.group(1))] = os.path.join(args.trace_dir, name)
    if not ranks:
        fail(f"{args.trace_dir}: no trace_rank{{R}}.json files")

    loaded = {r: load(ranks[r]) for r in sorted(ranks)}
    t0s = [t0 for _, t0 in loaded.values() if t0 is not None]
    base = min(t0s) if t0s else None

    out = []
    n_events = 0
    for r, (events, t0) in loaded.items():
        out.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        for tid, tname in THREAD_NAMES.items():
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": {"name": tname}})
            out.append({"name": "thread_sort_index", "ph": "M", "pid": r, "tid": tid, "args": {"sort_index": tid}})
        shift = (t0 - base) if t0 is not None else 0
        for ev in events:
            if ev.get("ph") == "M" and ev.get("name") in OWN_METADATA:
                continue
            ev = dict(ev)
            ev["pid"] = r
            if shift and isinstance(ev.get("ts"), (int, float)) and not isinstance(ev["ts"], bool):
                ev["ts"] = ev["ts"] + shift
            out.append(ev)
            n_events += 1

    path = args.output or os.path.join(args.trace_dir, "merged.json")
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"traceEvents": out, "displayTimeUnit": "ms"}, f)
            f.write("\n")
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    clock = (f"clocks aligned to t0 {base:.0f} us ({len(t0s)} of {len(loaded)} ranks had t0)"
             if t0s else "no t0 in any file, timestamps as they were")
    print(f"merged {len(loaded)} rank{'s' if len(loaded) != 1 else ''} ({', '.join(map(str, loaded))}), {n_events} events -> {path}; {clock}")


if __name__ == "__main__":
    main()
