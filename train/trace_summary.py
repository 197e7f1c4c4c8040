"""Summarise a JAX profiler trace by GPU kernel: `python -m train.trace_summary DIR [--top 40]
[--json OUT]`.

Reads the Chrome/Perfetto trace JSON that `jax.profiler.stop_trace()` writes when the trace
was started with `create_perfetto_trace=True` (as `train` does with `run.profile_steps > 0`):
the newest `<host>.trace.json.gz` (or `perfetto_trace.json.gz`) found recursively under DIR,
typically `DIR/plugins/profile/<timestamp>/`. DIR may also be the file itself. The
`.xplane.pb` beside it is not read (that is for TensorBoard / xprof).

GPU device tracks are the processes whose name mentions "/device:GPU" (only their "Stream"
threads when they have any, so derived lines such as "XLA Ops" are not counted twice) and
any thread named "...Stream...". Complete events ("ph": "X") on them are aggregated by
kernel name: total time, count, share of all kernel time, plus busy time (the union of the
kernel intervals per device), the wall span from the first to the last kernel, and the
number of profiled steps when the trace has `StepTraceAnnotation` step numbers. A CPU-only
trace has no device tracks: the host XLA op events (those carrying an `hlo_op` argument)
are summarised instead, and the output says so. Kernels are also grouped into coarse
categories by name (matmul, attention kernels, collectives, XLA fusions, copies, other).
Output is markdown; --json also writes the summary as JSON.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

# (category, name pattern), first match wins; matched case-insensitively against the name.
CATEGORIES = (
    ("collectives", r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|"
                    r"collective-permute|send|recv"),
    ("copies", r"memcpy|memset|^copy(\.\d+)?$"),
    ("attention kernels", r"parallax|mosaic|_fwd_kernel|_dq|_dkv|softmax_(fwd|bwd|decode)|"
                          r"flash|attention|fmha"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|matmul|(^|_)dot([._-]|$)"),
    ("XLA fusions", r"fusion|reduce|^loop_|^input_|transpose|concatenate|scatter|gather|"
                    r"dynamic-update-slice|broadcast|convert|iota|select"),
)
_CATEGORY_RES = tuple((c, re.compile(p, re.I)) for c, p in CATEGORIES)
# Lines that xprof derives from the stream events; never count them as kernels.
DERIVED_LINES = ("xla ops", "xla modules", "steps", "framework", "source code", "launch stats",
                 "tensorflow", "name scope", "xla traceme")


def category(name: str) -> str:
  for cat, rx in _CATEGORY_RES:
    if rx.search(name):
      return cat
  return "other"


def find_trace(path: str) -> str:
  """The newest trace JSON at/under `path`; FileNotFoundError saying what is missing."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  if found:
    return max(found, key=os.path.getmtime)
  xplanes = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if xplanes:
    newest = max(xplanes, key=os.path.getmtime)
    raise FileNotFoundError(
        f"{path}: found {newest} but no Perfetto/Chrome trace (*.trace.json.gz) to read: "
        "the Perfetto trace is missing. Record with jax.profiler.start_trace(..., "
        "create_perfetto_trace=True), or open the .xplane.pb in TensorBoard / xprof.")
  raise FileNotFoundError(f"{path}: no *.trace.json.gz or *.xplane.pb under it")


def load_events(trace_path: str) -> list[dict]:
  with gzip.open(trace_path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def _busy(intervals) -> float:
  """Length of the union of (start, end) intervals."""
  total, cur_s, cur_e = 0.0, None, None
  for s, e in sorted(intervals):
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        total += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    total += cur_e - cur_s
  return total


def summarise(events: list[dict]) -> dict:
  """Aggregate kernel (or host XLA op) events; times in microseconds."""
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") != "M":
      continue
    name = (e.get("args") or {}).get("name", "")
    if e.get("name") == "process_name":
      procs[e.get("pid")] = name
    elif e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = name
  gpu_pids = {p for p, n in procs.items() if "/device:GPU" in n}
  has_streams = {p for (p, _), n in threads.items() if p in gpu_pids and "stream" in n.lower()}

  def on_gpu(e):
    pid, tname = e.get("pid"), threads.get((e.get("pid"), e.get("tid")), "")
    low = tname.lower()
    if "stream" in low:
      return True
    if pid not in gpu_pids:
      return False
    if pid in has_streams:
      return False
    return not any(d in low for d in DERIVED_LINES)

  complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
  sel = [e for e in complete if on_gpu(e)]
  source = "gpu"
  if not sel:
    source = "host"
    sel = [e for e in complete if "hlo_op" in (e.get("args") or {})]

  per = collections.defaultdict(lambda: [0.0, 0])
  by_dev = collections.defaultdict(list)
  for e in sel:
    d = float(e["dur"])
    per[e["name"]][0] += d
    per[e["name"]][1] += 1
    by_dev[e.get("pid")].append((float(e["ts"]), float(e["ts"]) + d))
  total = sum(t for t, _ in per.values())
  kernels = [{"name": n, "category": category(n), "total_us": t, "count": c,
              "mean_us": t / c, "share": t / total if total else 0.0}
             for n, (t, c) in sorted(per.items(), key=lambda kv: -kv[1][0])]
  cats = collections.defaultdict(lambda: [0.0, 0, 0])
  for k in kernels:
    cats[k["category"]][0] += k["total_us"]
    cats[k["category"]][1] += k["count"]
    cats[k["category"]][2] += 1
  categories = [{"category": c, "total_us": t, "count": n, "kernels": nk,
                 "share": t / total if total else 0.0}
                for c, (t, n, nk) in sorted(cats.items(), key=lambda kv: -kv[1][0])]
  starts = [s for iv in by_dev.values() for s, _ in iv]
  ends = [e for iv in by_dev.values() for _, e in iv]
  span = (max(ends) - min(starts)) if starts else 0.0
  busy = sum(_busy(iv) for iv in by_dev.values())
  step_nums = {str((e.get("args") or {}).get("step_num")) for e in complete
               if "step_num" in (e.get("args") or {})}
  devices = sorted(procs.get(p, str(p)) for p in by_dev) if source == "gpu" else []
  return {"source": source, "devices": devices, "kernel_time_us": total, "busy_us": busy,
          "span_us": span, "events": len(sel), "steps": len(step_nums) or None,
          "categories": categories, "kernels": kernels}


def _ms(us: float) -> str:
  return f"{us / 1e3:,.3f}"


def to_markdown(s: dict, top: int = 40, trace_path: str | None = None) -> str:
  what = "kernel" if s["source"] == "gpu" else "host XLA op"
  out = []
  if trace_path:
    out.append(f"trace: `{trace_path}`")
  if s["source"] == "gpu":
    out.append(f"GPU device tracks: {len(s['devices'])} ({', '.join(s['devices'])})")
  else:
    out.append("no GPU device tracks in this trace (CPU run?): summarising the host XLA op "
               "events (those with an `hlo_op` argument) instead")
  ndev = max(len(s["devices"]), 1)
  util = s["busy_us"] / (s["span_us"] * ndev) if s["span_us"] else 0.0
  out.append(f"{s['events']} {what} events; {what} time {_ms(s['kernel_time_us'])} ms, busy "
             f"{_ms(s['busy_us'])} ms over a span of {_ms(s['span_us'])} ms "
             f"({util:.1%} busy" + (" per device" if ndev > 1 else "") + ")")
  if s["steps"]:
    out.append(f"profiled steps: {s['steps']}; per step: span {_ms(s['span_us'] / s['steps'])}"
               f" ms, {what} time {_ms(s['kernel_time_us'] / s['steps'])} ms")
  out += ["", "| category | time (ms) | share | events | distinct names |",
          "| --- | ---: | ---: | ---: | ---: |"]
  for c in s["categories"]:
    out.append(f"| {c['category']} | {_ms(c['total_us'])} | {c['share']:.1%} | {c['count']} | "
               f"{c['kernels']} |")
  shown = s["kernels"][:top]
  out += ["", f"top {len(shown)} of {len(s['kernels'])} {what}s by total time:", "",
          f"| # | {what} | category | time (ms) | share | count | mean (us) |",
          "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
  for i, k in enumerate(shown, 1):
    name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
    name = name.replace("|", "\\|")
    out.append(f"| {i} | `{name}` | {k['category']} | {_ms(k['total_us'])} | "
               f"{k['share']:.1%} | {k['count']} | {k['mean_us']:,.1f} |")
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m train.trace_summary",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("path", help="profile directory (e.g. <out_dir>/profile) or a trace file")
  ap.add_argument("--top", type=int, default=40, help="kernels to list (default 40)")
  ap.add_argument("--json", default=None, help="also write the summary as JSON here")
  a = ap.parse_args(argv)
  try:
    trace = find_trace(a.path)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  s = summarise(load_events(trace))
  print(to_markdown(s, a.top, trace))
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"trace": trace, **s}, f, indent=1)
  return 0 if s["kernels"] else 2


if __name__ == "__main__":
  sys.exit(main())
