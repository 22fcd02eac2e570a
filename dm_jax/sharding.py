"""Data parallelism with JAX's own sharding: one mesh axis ``data`` over the devices.

Training and certification use the same three facts, written here once:

* :func:`data_mesh` -- a 1-D :class:`jax.sharding.Mesh` named ``("data",)`` over the
  first ``num_devices`` of ``jax.devices()`` (all by default). After
  :func:`initialize_distributed`, ``jax.devices()`` holds every host's devices, so the
  same mesh spans several hosts unchanged.
* :func:`shard_batch` -- a host array (the *global* batch, the same on every host) as a
  global :class:`jax.Array` split along its leading axis over ``data``: each device
  receives only its rows (``jax.make_array_from_callback``), so on several hosts each
  process transfers only its own shard, and the global batch order is the single-host
  order because every host draws the same seeded permutation.
* :func:`replicate` -- a pytree (parameters, optimizer state) copied to every device.

The jit-compiled step then runs under XLA's SPMD partitioner: the mean over the batch
in every loss becomes a cross-device reduction, so parameters and updates stay
replicated and equal on every device, and equal (to float reduction order) to a
one-device run. ``None`` for a mesh everywhere means "no sharding": the one-device code
path, unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int]) -> bool:
  """``jax.distributed.initialize`` for a multi-host run; a no-op without an address.

  On CPU the cross-process collectives use gloo. Returns whether it initialised.

  Raises:
    ValueError: an address without the process count and id, or an id out of range.
  """
  if not coordinator_address:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError("--num_processes/--process_id need --coordinator_address "
                       "(host:port of process 0).")
    return False
  if num_processes is None or process_id is None:
    raise ValueError("a multi-host run needs --coordinator_address, --num_processes and "
                     "--process_id (0 .. num_processes - 1) on every host.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}); got {process_id}.")
  # CPU devices need a collectives backend across processes (GPU/TPU ignore this).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def data_mesh(num_devices: Optional[int] = None) -> Optional[Mesh]:
  """The ``("data",)`` mesh over the first ``num_devices`` devices (None: all of them).

  Returns None for one device (the unsharded code path).

  Raises:
    ValueError: more devices asked for than there are, or fewer than 1.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if n < 1 or n > len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}] (the devices JAX sees: "
                     f"{len(devices)} {devices[0].platform}); got {num_devices}.")
  if n == 1:
    return None
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"a multi-host run uses every device ({len(devices)}); got "
                     f"num_devices={num_devices}.")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def mesh_size(mesh: Optional[Mesh]) -> int:
  return 1 if mesh is None else int(mesh.devices.size)


def check_divisible(batch_size: int, mesh: Optional[Mesh], what: str = "batch_size") -> None:
  """A batch split over the mesh must divide evenly: a clear error otherwise."""
  n = mesh_size(mesh)
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} is not divisible by the {n} devices of the "
                     f"data mesh; use a multiple of {n} or --num_devices dividing it.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _global_array(value, sharding: NamedSharding) -> jax.Array:
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_batch(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Every array leaf of ``tree`` (leading axis = batch) split over the mesh's ``data``
  axis; scalars are replicated. ``mesh=None`` returns ``tree`` unchanged.

  Raises:
    ValueError: a leading axis not divisible by the number of devices.
  """
  if mesh is None:
    return tree

  def place(leaf):
    leaf = np.asarray(leaf)
    if leaf.ndim == 0:
      return _global_array(leaf, replicated_sharding(mesh))
    check_divisible(leaf.shape[0], mesh, "the batch axis")
    return _global_array(leaf, batch_sharding(mesh))

  return jax.tree_util.tree_map(place, tree)


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Every leaf of ``tree`` copied to every device of the mesh (None: unchanged)."""
  if mesh is None:
    return tree
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda leaf: _global_array(jax.device_get(leaf), sharding), tree)


def to_host(tree: Any) -> Any:
  """Numpy copies of a pytree of (possibly multi-host) global arrays, on every host."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
