import zlib

import jax
import numpy as np
import pytest


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


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for one module: every `train()` builds a fresh Trainer,
  and the cache lets its repeated identical steps compile once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Token shards of a ~0.25 MB slice of the Python stdlib (BPE 320) for the loop's tests."""
  from train.prepare import prepare
  out = str(tmp_path_factory.mktemp("shards"))
  prepare(out, None, vocab_size=320, max_mb=0.25, val_fraction=0.1, quiet=True)
  return out
