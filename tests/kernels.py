"""Helpers of the kernel tests: devices, the Mosaic GPU interpreter's parameters, lowering for
CUDA on an abstract H100 (no GPU needed) and the kernels of a lowered module.

Compiled and interpret-mode runs of one test share a class (as jax's
tests/pallas/gpu_ops_test.py): the class runs the kernels compiled (`INTERPRET = False`, the
device it needs in `NEEDS`) and a subclass with `INTERPRET = True` reruns its tests in
interpret mode. tests/conftest.py parametrises a class's `name` over its own `CASES` (those
outside its `CI_CASES`, where it names some, marked slow) and marks the compiled class's tests
`gpu`, skipping them without the device.
"""
from __future__ import annotations

import functools
import itertools

import jax
import pytest


@functools.cache
def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@functools.cache
def has_hopper() -> bool:
  if not has_gpu():
    return False
  return str(getattr(jax.devices("gpu")[0], "compute_capability", "")).startswith("9.")


DEVICES = {"gpu": (has_gpu, "needs a CUDA GPU"), "hopper": (has_hopper, "needs a Hopper GPU")}


def ci_subset(names, keep):
  """The cases (names or tuples of values), those outside `keep` marked slow: CI runs a few
  that cover every kind and dtype; `-m slow` (or no -m) runs the rest."""
  assert set(keep) <= set(names), set(keep) - set(names)
  return [n if n in keep else pytest.param(*(n if isinstance(n, tuple) else (n,)),
                                           marks=pytest.mark.slow) for n in names]


def checkerboard(names: str, *axes):
  """The cases of a grid, those whose axis indices sum to an odd number marked slow: CI runs
  half of the grid, with every value of every axis; `-m slow` (or no -m) runs the rest."""
  out = []
  for idx in itertools.product(*(range(len(a)) for a in axes)):
    vals = [a[i] for a, i in zip(axes, idx)]
    flat = [x for v in vals for x in (v if isinstance(v, tuple) else (v,))]
    marks = [pytest.mark.slow] if sum(idx) % 2 else []
    out.append(pytest.param(*flat, marks=marks, id="-".join(str(getattr(x, "__name__", x)) for x in flat)))
  return pytest.mark.parametrize(names, out)


def interpret_params(races=False):
  """The Mosaic GPU interpreter (simulated warpgroups, SMEM, TMA, barriers), optionally with
  its race detector."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.InterpretGPUParams(detect_races=races)


def lower_h100(f, *args):
  """f(*args) jitted and lowered for CUDA on an abstract H100 (args: arrays or
  ShapeDtypeStructs)."""
  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def custom_call_configs(lowered, target: str):
  """`mhlo.backend_config` of every custom call whose target name contains `target`."""
  out = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          o = o.operation
          if o.name == "stablehlo.custom_call" and target in str(
              o.attributes["call_target_name"]):
            out.append(o.attributes["mhlo.backend_config"])
          walk(o)

  walk(lowered.compiler_ir("stablehlo").operation)
  return out


def triton_modules(lowered):
  """(name, TTIR bytecode) of every Triton custom call in a lowered module."""
  from jax._src.lib.mlir import ir
  return [(ir.StringAttr(bc["name"]).value, ir.StringAttr(bc["ir"]).value_bytes)
          for bc in custom_call_configs(lowered, "triton")]


def mosaic_modules(lowered):
  """Serialized Mosaic GPU modules of every mosaic_gpu custom call in a lowered module."""
  from jax._src.lib.mlir import ir
  return [ir.StringAttr(cfg["module"]).value_bytes
          for cfg in custom_call_configs(lowered, "mosaic_gpu")]


def verify_triton_modules(mods, dot=True):
  """Each kernel's Triton IR parses, verifies and (dot) contains a tensor-core dot."""
  from jax._src.interpreters import mlir
  from jax._src.lib import triton as tlib
  from jax._src.lib.mlir import ir
  for name, raw in mods:
    ctx = mlir.make_ir_context()
    tlib.dialect.register_dialect(ctx)
    with ctx:
      module = ir.Module.parse(raw)
      assert module.operation.verify(), name
      assert not dot or "tt.dot" in str(module), name
