"""`config.backend = 'pmap'`: the same pure train step under `jax.pmap`, for code migrating from it.

Data-parallel only (a mesh of `data` devices in one process; FSDP, model axes and several processes are
`jit`'s). The train state keeps the loop's layout, replicated over the mesh, so checkpoints, evaluation and
the hooks are exactly the jit backend's; around each step each device's copy is viewed as one row of a
stacked array (and back), and each device's rows of the batch as its row, with no copy across devices.
Where the two backends differ:
  - jit differentiates the loss of the global batch; pmap averages the devices' gradients (`pmean`): the
    same for a mean loss over equal shares, up to float rounding;
  - BatchNorm normalises each device's share with that share's statistics under pmap (the global batch's
    under jit), and the running statistics are the mean of the devices';
  - each device draws its own dropout bits (the step's key folded with the device index), so the random
    numbers differ from jit's;
  - the train metrics are means of the devices' means.
"""

from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jft import sharding
from jft.errors import UserError

AXIS = 'devices'
BACKENDS = ('jit', 'pmap')


def check_backend(backend: str, mesh: Mesh) -> None:
  if backend not in BACKENDS:
    raise UserError(f'unknown config.backend {backend!r}; use one of {BACKENDS}')
  if backend == 'pmap' and (mesh.shape[sharding.FSDP_AXIS] > 1 or mesh.shape[sharding.MODEL_AXIS] > 1):
    raise UserError(f"config.backend 'pmap' is data-parallel only, but config.mesh is {dict(mesh.shape)}: set "
                    "config.backend='jit' for FSDP or model axes, or config.mesh to dict(data=-1, fsdp=1, model=1)")
  if backend == 'pmap' and jax.process_count() > 1:
    raise UserError("config.backend 'pmap' runs in one process here; use config.backend='jit' (the default) for "
                    'multi-process runs')


def _ordered_shards(x: jax.Array, devices: list[jax.Device]) -> list[jax.Array]:
  by_device = {shard.device: shard.data for shard in x.addressable_shards}
  return [by_device[device] for device in devices]


def pmap_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """`step(state, batch) -> (state, metrics)` running `train_step` (made with `axis_name=AXIS`) under `jax.pmap`
  over the mesh's devices: the state replicated on the mesh in and out (donated), the batch split over it."""
  devices = list(mesh.devices.flat)
  count, replicated = len(devices), sharding.replicated(mesh)
  pmapped = jax.pmap(train_step, axis_name=AXIS, devices=devices, donate_argnums=0)
  # What jax.pmap (built on shard_map since JAX 0.8) takes and gives: one row per device over a 1-D mesh.
  rows_sharding = NamedSharding(Mesh(devices, (AXIS,)), PartitionSpec(AXIS))

  def stack(rows: list[jax.Array]) -> jax.Array:
    shape = (count, *rows[0].shape)
    return jax.make_array_from_single_device_arrays(shape, rows_sharding, [row[None] for row in rows])

  def unstack(x: jax.Array, target: NamedSharding) -> jax.Array:
    rows = [row.reshape(x.shape[1:]) for row in _ordered_shards(x, devices)]
    return jax.make_array_from_single_device_arrays(x.shape[1:], target, rows)

  def step(state, batch):
    stacked_state = jax.tree.map(lambda x: stack(_ordered_shards(x, devices)), state)
    stacked_batch = jax.tree.map(lambda x: stack(_ordered_shards(x, devices)), batch)
    new_state, metrics = pmapped(stacked_state, stacked_batch)
    return jax.tree.map(lambda x: unstack(x, replicated), new_state), jax.tree.map(
        lambda x: unstack(x, replicated), metrics)

  return step
