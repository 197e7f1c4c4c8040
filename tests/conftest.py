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
