"""Mesh settings a user types with --set: a bad one is refused in one line naming the key it
is about, before any device is touched."""
from __future__ import annotations

import pytest

from train.config import MeshConfig, TrainConfig, apply_overrides
from train.mesh import mesh_shape


@pytest.mark.parametrize("sets, key", [
    # the presets' data=-1 plus a user's fsdp=-1: the usual way to get two
    (["mesh.fsdp=-1"], "mesh.fsdp"),
    (["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=-1"], "mesh.tensor"),
    (["mesh.tensor=-1"], "mesh.tensor"),
])
def test_two_remaining_device_axes_name_one_that_is_minus_one(sets, key):
  """Naming mesh.data when the user set fsdp and tensor to -1 points at the wrong key; the
  message shows all three sizes, so either fix is visible."""
  with pytest.raises(ValueError) as e:
    apply_overrides(TrainConfig(mesh=MeshConfig(data=-1)), sets)
  msg = str(e.value)
  assert msg.startswith(f"{key}: at most one mesh axis may be -1") and "\n" not in msg, msg
  assert "data=" in msg and "fsdp=" in msg and "tensor=" in msg, msg


@pytest.mark.parametrize("value", ["0", "-2", "true", "1.5"])
def test_mesh_size_that_is_not_a_size_is_refused(value):
  with pytest.raises(ValueError, match=r"^mesh.fsdp: "):
    apply_overrides(TrainConfig(), [f"mesh.fsdp={value}"])


def test_mesh_that_does_not_fit_the_devices_says_both_counts():
  """8 devices: one -1 takes the rest; a fixed product must match or divide."""
  assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=8), 8) == (1, 1, 8)
  with pytest.raises(ValueError, match=r"data\*fsdp\*tensor = 16 but there are 8 devices"):
    mesh_shape(MeshConfig(data=2, fsdp=4, tensor=2), 8)
  with pytest.raises(ValueError, match=r"8 devices are not divisible .* \(product 3\)"):
    mesh_shape(MeshConfig(data=-1, tensor=3), 8)


def test_grad_accum_must_split_each_process_rows(monkeypatch):
  """Each process reshapes its own rows into grad_accum micro-batches: 6 rows over 2
  processes leave 3 a process, which 2 micro-batches do not split (a NumPy reshape error
  before), even though the 3 rows a micro-batch split over the mesh."""
  import jax
  from train.loop import check_batch
  from train.mesh import make_mesh
  from train.config import DataConfig
  cfg = TrainConfig(data=DataConfig(global_batch_size=6, grad_accum=2))
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  check_batch(cfg, mesh)
  from train import loop
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop, "batch_groups", lambda mesh: (0, 2))  # both read their own rows
  with pytest.raises(ValueError, match=r"^data.grad_accum: 2 does not split the 3 rows of each "
                     r"of 2 processes reading distinct rows"):
    check_batch(cfg, mesh)
