import importlib.util
import os
import zlib


def _cpu_only() -> bool:
  """No GPU backend can run here (JAX_PLATFORMS=cpu, or no CUDA / ROCm plugin installed)."""
  if os.environ.get("JAX_PLATFORMS"):
    return os.environ["JAX_PLATFORMS"] == "cpu"
  for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
               "jax_rocm7_plugin", "jax_plugins"):
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      pass
  return True


# On CPU most of a test's time is XLA compiling small programs, and most of that is LLVM
# optimising them: compile them unoptimised (about 2x faster to compile). Set before JAX
# creates its backend; subprocesses started with os.environ inherit it.
if _cpu_only() and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run a test with 64-bit floats enabled (CPU), restoring the default afterwards."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def rng(request):
  """A fresh NumPy generator per test, seeded from the test's name (reproducible, distinct)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# On GPUs XLA's default float32 matmul uses TF32; the tests compare float32 paths to 1e-5,
# so ask for full precision (a no-op on CPU).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def shared_compile_cache(tmp_path_factory):
  """One persistent compilation cache for the whole run, shared by the xdist workers.

  Most of the suite's time is XLA compiling, and tests build the same programs again: every
  `train()` builds a fresh Trainer, the same eager ops and models appear in many tests, and
  each worker would compile them once more. JAX keys an entry by the program, the compile
  options, the XLA flags and the backend. An entry the other worker is still writing fails
  to decompress (a warning) and is compiled again."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the run's directory, above each worker's own
  path = root / "xla_cache"
  path.mkdir(exist_ok=True)
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield str(path)
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def compile_cache(shared_compile_cache):
  """The persistent compilation cache, for the modules that name it (always on: above)."""
  return shared_compile_cache


def pytest_generate_tests(metafunc):
  """A kernel test class's `name` runs over the class's own `CASES` (tests/kernels.py): the
  compiled class and its interpret-mode subclass each bring their table; where the class
  names `CI_CASES`, the other cases are `slow`."""
  cls = metafunc.cls
  if "name" in metafunc.fixturenames and hasattr(cls, "INTERPRET") and hasattr(cls, "CASES"):
    from tests.kernels import ci_subset
    keep = getattr(cls, "CI_CASES", None)
    names = list(cls.CASES)
    metafunc.parametrize("name", names if keep is None else ci_subset(names, keep))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
  """Tests of a kernel class that runs compiled (`INTERPRET = False`, tests/kernels.py) are
  `gpu` tests, skipped without the device its `NEEDS` names."""
  from tests.kernels import DEVICES
  for item in items:
    cls = getattr(item, "cls", None)
    if getattr(cls, "INTERPRET", None) is False:
      found, reason = DEVICES[cls.NEEDS]
      item.add_marker(pytest.mark.gpu)
      if not found():
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
  """Token shards of a ~0.25 MB slice of the Python stdlib (BPE 320) for the loop's tests."""
  from train.prepare import prepare
  out = str(tmp_path_factory.mktemp("shards"))
  prepare(out, None, vocab_size=320, max_mb=0.25, val_fraction=0.1, quiet=True)
  return out
