"""Data parallelism over every device: one mesh axis, batch split, parameters replicated.

Every process holds a *process-local* slice of the global batch (it loads only that slice) and
`shard_batch` assembles the global `jax.Array` from the slices of all processes. Because the
loss is computed on that global array inside one jitted function, a sum over the batch is a sum
over every device and process: the `(total, weight)` contract then makes one device and many
devices give the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over all devices (of all processes), in `jax.devices()` order."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, *, mesh: Mesh | None = None) -> int:
  """Rows of the global batch that this process loads.

  Raises a ValueError naming `batch_size` when the global batch does not divide evenly over
  the devices (every device must get the same number of rows) or over the processes.
  """
  mesh = make_mesh() if mesh is None else mesh
  n_dev, n_proc = mesh.size, jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n_dev:
    raise ValueError(
      f"batch_size={global_batch_size} must be a positive multiple of the number of devices"
      f" ({n_dev}); set --config.train.batch_size to a multiple of {n_dev}."
    )
  return global_batch_size // n_proc


def process_slice(global_batch_size: int) -> slice:
  """The rows [start, stop) of each global batch that belong to this process."""
  n_proc, index = jax.process_count(), jax.process_index()
  if global_batch_size % n_proc:
    raise ValueError(f"batch_size={global_batch_size} does not divide over {n_proc} processes.")
  per = global_batch_size // n_proc
  return slice(index * per, (index + 1) * per)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Process-local NumPy batch (pytree, leading axis = local rows) -> global sharded arrays.

  In: every leaf `[B_local, ...]`. Out: every leaf `[B_local * process_count, ...]`, split over
  the `data` axis. Works unchanged for one process.
  """
  sharding = batch_sharding(mesh)
  n_proc = jax.process_count()

  def to_global(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("every batch entry needs a leading batch axis; got a scalar.")
    global_shape = (x.shape[0] * n_proc,) + x.shape[1:]
    if global_shape[0] % mesh.size:
      raise ValueError(
        f"global batch of {global_shape[0]} rows does not divide over {mesh.size} devices;"
        " set --config.train.batch_size to a multiple of the device count."
      )
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, batch)


def process_flag(flag: bool, mesh: Mesh) -> jax.Array:
  """`bool[D]` over the `data` axis: this process's `flag` on each of its own devices.

  Reducing it with `jnp.any` inside a jitted step gives, on every process, whether *some*
  process raised its flag: how processes agree on a step (preemption) with no other channel.
  """
  sharding = batch_sharding(mesh)
  local = np.full((len(sharding.addressable_devices),), bool(flag))
  return jax.make_array_from_process_local_data(sharding, local, (mesh.size,))


def make_any_process(mesh: Mesh) -> Callable[[bool], jax.Array]:
  """`any_process(flag) -> bool[]` (replicated): True everywhere iff some process passed True.

  A tiny all-reduce, dispatched asynchronously; reading the result waits for every process.
  Works unchanged for one process.
  """
  reduce_any = jax.jit(jnp.any, out_shardings=replicated(mesh))
  return lambda flag: reduce_any(process_flag(flag, mesh))


def to_host(tree: Any) -> Any:
  """Fully replicated device arrays -> NumPy (safe on every process of a multi-host job)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
