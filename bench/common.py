"""Shared benchmark plumbing: timing (CUPTI kernel time, wall clock), compiled-memory readout,
the environment a result records (device, versions, date, command) and result files, and the
pieces of an A/B against another version of the kernels.

jax is imported inside the functions: bench/muon.py sets XLA_FLAGS / JAX_PLATFORMS before jax
starts, after parsing its mode.

A/B against an older checkout of the kernels, in two processes (public entry points only):

  git archive REV pallas_kernels | tar -x -C /tmp/old
  PYTHONPATH=/tmp/old:. python bench/SCRIPT.py MODE ...

The script's own directory (bench/) comes first on sys.path and holds no pallas_kernels, so
the old copy is the one imported; `environment()` records it ("pallas_kernels") and the
command with its PYTHONPATH. One source file of the kernels can instead be loaded next to the
working tree's in one process (`load_module`, bench/decode.py ab).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import textwrap
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
T0 = time.time()


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- command line


def mode_parser(doc):
  """(parser, its subparsers): a script whose modes are subcommands; `doc` (the module's
  docstring) is the script's --help."""
  ap = argparse.ArgumentParser(description=doc,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  return ap, ap.add_subparsers(dest="mode", required=True, metavar="MODE")


def add_mode(modes, name, fn, help):
  """Subcommand `name` running fn(args); its --help: `help`, then fn's docstring."""
  doc = inspect.cleandoc(fn.__doc__ or "")
  p = modes.add_parser(name, help=help,
                       description=textwrap.fill(help, 79) + (f"\n\n{doc}" if doc else ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  p.set_defaults(run=fn)
  return p


# ----------------------------------------------------------------------------- environment


def command() -> str:
  """This run's command line, with PYTHONPATH when set (an A/B names the old checkout there)."""
  cmd = "python " + shlex.join(sys.argv)
  pp = os.environ.get("PYTHONPATH")
  return f"PYTHONPATH={pp} {cmd}" if pp else cmd


def kernels_source() -> str | None:
  """Where pallas_kernels is imported from, if not from this checkout (None otherwise)."""
  spec = importlib.util.find_spec("pallas_kernels")
  if spec is None or spec.origin is None:
    return None
  path = os.path.dirname(os.path.abspath(spec.origin))
  return None if path == os.path.join(REPO, "pallas_kernels") else path


def environment():
  import jax
  dev = jax.devices()[0]
  env = {
      "device": getattr(dev, "device_kind", dev.platform),
      "platform": dev.platform,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": command(),
  }
  if kernels_source():
    env["pallas_kernels"] = kernels_source()
  return env


# ----------------------------------------------------------------------------- timing


def time_fn(fn, *args, min_iters=3, min_seconds=1.0, max_iters=100):
  """Median wall time (s) of jitted `fn(*args)` after a warm-up call (compile excluded)."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < max_iters and (len(times) < min_iters or
                                    time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def cupti_calls(fn, args, iters=1):
  """[(kernel name, ms)] for each of `iters` calls of fn(*args): CUPTI kernel times (GPU only;
  `profiler.measure` makes one untimed call first)."""
  from jax.experimental.mosaic.gpu import profiler
  _, ts = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
  return [ts] if iters == 1 else ts


# mode: "wall" once CUPTI failed in a sticky call, or when set so (a CPU check); last: the
# timer the last call used.
TIMER = {"mode": "cupti", "last": None}


def time_ms(fn, args, iters=20, warmup=2, sticky=True):
  """(median, all calls) in ms of fn(*args) (jitted): the sum of one call's kernel times
  (CUPTI), or wall-clock time per call where CUPTI fails; sticky: then wall clock for every
  later call too (TIMER says which)."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  if TIMER["mode"] == "cupti":
    try:
      ts = [sum(float(t) for _, t in call) for call in cupti_calls(fn, args, iters)]
      TIMER["last"] = "cupti"
      return statistics.median(ts), ts
    except Exception as e:  # noqa: BLE001
      log("CUPTI timing failed, falling back to wall clock:", repr(e)[:300])
      if sticky:
        TIMER["mode"] = "wall"
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t0) * 1e3)
  TIMER["last"] = "wall"
  return statistics.median(ts), ts


def kernel_medians_us(fn, args, iters=20, warmup=1):
  """{kernel name: median CUPTI time in us} over `iters` calls of fn(*args) (GPU only)."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  by_name = {}
  for call in cupti_calls(fn, args, iters):
    for name, t in call:
      by_name.setdefault(name, []).append(float(t) * 1e3)
  return {name: statistics.median(ts) for name, ts in by_name.items()}


def kernel_breakdown(fn, args):
  """[(kernel name, ms)] of one call (CUPTI), or [("unavailable", why)]."""
  try:
    return [(n, float(t)) for n, t in cupti_calls(fn, args)[0]]
  except Exception as e:  # noqa: BLE001
    return [("unavailable", repr(e)[:200])]


def kernel_breakdown_eager(fn):
  """kernel_breakdown of `fn()`, a Python callable run as is: `profiler.measure` jits what it
  is given, which fails for a callable that calls compiled executables (a donating MAD
  program fed fresh buffers each call). Uses the CUPTI hooks `profiler.measure` uses."""
  import jax
  try:
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib
    ext = mosaic_gpu_lib._mosaic_gpu_ext
    jax.block_until_ready(fn())  # warm-up, outside the measurement
    ext._cupti_init()
    try:
      jax.block_until_ready(fn())
    finally:
      timings = ext._cupti_get_timings(True)
    return [(n, float(t)) for n, t in timings or []]
  except Exception as e:  # noqa: BLE001
    return [("unavailable", repr(e)[:200])]


def compiled_bytes(jitted, *args):
  """Temp + output bytes of the compiled program: its peak working set beyond the inputs."""
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def rel_err(x, ref) -> float:
  """max |x - ref| / max |ref| in float32; nan where x has a non-finite value."""
  import numpy as np
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# ----------------------------------------------------------------------------- results


def _platform_of(path):
  """The platform a results file records, or None."""
  try:
    with open(path) as f:
      return json.load(f).get("environment", {}).get("platform")
  except (OSError, ValueError, AttributeError):
    return None


def write_results(name, env, rows, table_md, notes="", out=None):
  """bench/results/<name>.json and .md (a header line from env, the table, notes); `out`: a
  directory to copy both into as well (e.g. $OUT on a device machine)."""
  os.makedirs(RESULTS, exist_ok=True)
  base = os.path.join(RESULTS, name)
  if env.get("platform") != "gpu" and _platform_of(base + ".json") == "gpu":
    # a CPU smoke run of a GPU bench must not replace the GPU's results of record
    base += "." + str(env.get("platform"))
    print(f"{name}: bench/results/{name}.json holds GPU results; writing this "
          f"{env.get('platform')} run to {base}.json instead")
  with open(base + ".json", "w") as f:
    json.dump({"environment": env, "results": rows}, f, indent=1)
  with open(base + ".md", "w") as f:
    f.write(f"# {name}\n\n")
    f.write(", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n")
    f.write(table_md + "\n")
    if notes:
      f.write("\n" + notes + "\n")
  print(f"wrote {base}.json and .md")
  if out:
    os.makedirs(out, exist_ok=True)
    for ext in (".json", ".md"):
      shutil.copy(base + ext, out)


def load_module(path: str, name: str):
  """A module from another source file of a kernel module (its imports resolve in this tree),
  to time next to the working tree's in one process."""
  mod = types.ModuleType(name)
  mod.__file__ = path
  sys.modules[name] = mod
  with open(path) as f:
    exec(compile(f.read(), path, "exec"), mod.__dict__)
  return mod


def read_rows(path):
  """Rows of a results JSON file ({"rows": [...]}), or of the JSON lines a run printed (so a
  run cut short still counts)."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)["rows"]
  except (json.JSONDecodeError, KeyError):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


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
