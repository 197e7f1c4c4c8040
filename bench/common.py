"""Shared benchmark plumbing: timing, compiled-memory readout, result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax


def environment():
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", dev.platform),
      "platform": dev.platform,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  }


def time_fn(fn, *args, min_iters=3, min_seconds=1.0, max_iters=100):
  """Median wall time (s) of jitted `fn(*args)` after a warm-up call (compile excluded)."""
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < max_iters and (len(times) < min_iters or
                                    time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def kernel_medians_us(fn, args, iters=20):
  """{kernel name: median CUPTI time in us} over `iters` calls of fn(*args) (GPU only)."""
  from jax.experimental.mosaic.gpu import profiler
  jax.block_until_ready(fn(*args))
  _, per_call = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
  by_name = {}
  for call in per_call:
    for name, t in call:
      by_name.setdefault(name, []).append(float(t) * 1e3)
  return {name: statistics.median(ts) for name, ts in by_name.items()}


def compiled_bytes(jitted, *args):
  """Temp + output bytes of the compiled program: its peak working set beyond the inputs."""
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def write_results(name, env, rows, table_md, notes=""):
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  base = os.path.join(os.path.dirname(__file__), "results", name)
  with open(base + ".json", "w") as f:
    json.dump({"environment": env, "results": rows}, f, indent=1)
  with open(base + ".md", "w") as f:
    f.write(f"# {name}\n\n")
    f.write(", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n")
    f.write(table_md + "\n")
    if notes:
      f.write("\n" + notes + "\n")
  print(f"wrote {base}.json and .md")


def document_context(segment_ids) -> float:
  """Mean number of keys a query sees inside its own document under a causal mask, over
  packed rows [N, T] of segment ids (ids are runs; 0 = padding, not counted)."""
  import numpy as np
  seg = np.asarray(segment_ids)
  ctx = []
  for row in seg:
    _, n = np.unique(row[row > 0], return_counts=True)
    ctx.append(float((n * (n + 1) / 2).sum()) / seg.shape[1])
  return sum(ctx) / len(ctx)

