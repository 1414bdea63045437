"""Data parallelism with `jax.sharding`: one `data` mesh axis over every device.

The batch is sharded on `data`; parameters, optimizer state and the digit
tables are replicated. Everything goes through plain `jax.jit`: the sharding
constraint on the batch inside the jitted step lets XLA's SPMD partitioner
split canvas synthesis, forward and backward passes across devices and insert
the gradient all-reduce. With partitionable threefry (jax's default), each
device, and so each process of a multi-host run, draws only its own shard of
every batch, and the values equal those of a single-device run.

With several processes (`jax.distributed.initialize`), `replicate` builds global
arrays from the same host values on every process, and `to_host` gathers results
that are spread over the processes' devices.

Replica members (several models in one program) are pytrees with a leading member axis:
`stack` makes one, `member` takes one out (device or host arrays alike).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxloc.errors import UserError

DATA = "data"


def data_mesh() -> Mesh:
  """A 1-D mesh over all devices (of every process), axis name `data`."""
  # Mesh() keeps the axis in "auto" mode, where with_sharding_constraint applies.
  return Mesh(np.asarray(jax.devices()), (DATA,))


def check_divisible(batch_size: int, name: str = "batch_size") -> None:
  n = jax.device_count()
  if batch_size % n:
    raise UserError(
      f"config.{name}={batch_size} does not divide by the {n} devices; "
      f"use a multiple of {n} (e.g. {max(n, batch_size // n * n)})"
    )


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` on all devices of `mesh` (every process passes the same)."""
  sharding = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(lambda x: _global_copy(x, sharding), tree)


def _global_copy(x, sharding: NamedSharding) -> jax.Array:
  """A global array over `sharding`'s devices of every process, holding this host's `x`."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _global_copy(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
  """Numpy copies of the arrays of `tree`; with several processes, arrays split over their
  devices are gathered (every process must call this at the same point)."""

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree_util.tree_map(get, tree)


def shard_batch(tree, mesh: Mesh | None):
  """Inside jit: constrain the leading (batch) axis of every leaf to the `data` axis."""
  if mesh is None or mesh.size == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec(DATA)))


def stack(trees):
  """Members' pytrees (train states, keys, metrics) as one with a leading member axis; the
  first member's static fields (apply_fn, tx) serve all."""
  leaves = [jax.tree_util.tree_leaves(t) for t in trees]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trees[0]), _stack(leaves))


def member(tree, i: int):
  """Member `i` of a stacked pytree (`stack`); numpy leaves stay numpy."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  on_device = [x for x in leaves if isinstance(x, jax.Array)]
  taken = iter(_take(on_device, i) if on_device else ())
  return treedef.unflatten([next(taken) if isinstance(x, jax.Array) else x[i] for x in leaves])


# Each one compiled program over a list of leaves, not one eager operation per leaf shape: the
# list (not the pytree, whose static fields differ from run to run) keys jit's cache.
@jax.jit
def _stack(leaves):
  return [jax.numpy.stack(xs) for xs in zip(*leaves, strict=True)]


@jax.jit
def _take(leaves, i):
  return [x[i] for x in leaves]
