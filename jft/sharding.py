"""Device mesh and shardings: the batch over the data axes, parameters by rules over their paths, then FSDP.

The mesh has three named axes (`config.mesh`, one of them -1 for the rest of the devices):
  data   data parallelism: the batch is split over it, the state replicated along it
  fsdp   fully sharded data parallelism: the batch is split over it too, and each large parameter (with its
         optimizer moments and pruning mask) is split along one of its dimensions
  model  tensor parallelism, by explicit rules only (e.g. `('.*intermediate/kernel', (None, 'model'))`)
A parameter's partition spec comes from the first `config.sharding.rules` entry `(regex, spec)` whose regex
`re.fullmatch`es its path; failing that, a parameter of at least `sharding.min_bytes` is split over `fsdp`
along its largest dimension that the axis divides; the rest are replicated. Every leaf of the train state
that holds a parameter's value, moment or mask (found by its path ending in the parameter's path, with the
parameter's shape) follows the parameter's spec; counts, scalars and the rng are replicated.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jft import rules, tree_paths
from jft.errors import UserError

PyTree = Any
DATA_AXIS, FSDP_AXIS, MODEL_AXIS = 'data', 'fsdp', 'model'
AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # FSDP is data parallelism with the state split: the batch splits over both
DEFAULT_MIN_BYTES = 2**20


def mesh_shape(sizes: Mapping[str, int] | None, device_count: int) -> dict[str, int]:
  """{axis: size} for `device_count` devices: at most one size is -1 (the rest of the devices); default all data."""
  sizes = dict(sizes or {DATA_AXIS: -1})
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise UserError(f'config.mesh has unknown axes {sorted(unknown)}; its axes are {AXES}')
  sizes = {axis: int(sizes.get(axis, 1)) for axis in AXES}
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise UserError(f'config.mesh {sizes}: give each axis a positive size, and at most one -1 (the rest)')
  known = int(np.prod([size for size in sizes.values() if size != -1]))
  if rest:
    if device_count % known:
      raise UserError(f'config.mesh {sizes} does not fit {device_count} devices: {device_count} is not a '
                      f'multiple of {known}; pick sizes whose product divides the device count')
    sizes[rest[0]] = device_count // known
  if int(np.prod(list(sizes.values()))) != device_count:
    raise UserError(f'config.mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices but there are '
                    f'{device_count}; make one axis -1 (the rest of the devices) or fix the sizes')
  return sizes


def make_mesh(devices: Sequence[jax.Device] | None = None, shape: Mapping[str, int] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh over `devices` (default: every device of every host); default all data-parallel.

  Devices are laid out in order (jax orders them by process), so each process holds a contiguous block of the
  batch rows: its share of every global batch.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[axis] for axis in AXES]), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's data and fsdp axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise UserError(f'batch_size {batch_size} is not divisible by the {shards} batch shards of the mesh '
                    f'{dict(mesh.shape)} (data x fsdp); set config.batch_size to a multiple of {shards}')


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's numpy batch into global arrays sharded over the batch axes."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def _as_spec(spec: Any) -> PartitionSpec:
  if isinstance(spec, PartitionSpec):
    return spec
  if spec is None or isinstance(spec, str):
    return PartitionSpec(spec)
  return PartitionSpec(*[tuple(entry) if isinstance(entry, list) else entry for entry in spec])


def _spec_axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> None:
  """A UserError unless `spec` names mesh axes (each once) and each split dimension divides by its axes."""
  where = f'sharding of {path} (shape {shape}) as {spec} on the mesh {dict(axis_sizes)}'
  if len(spec) > len(shape):
    raise UserError(f'{where}: the spec has more entries than the parameter has dimensions; fix config.sharding.rules')
  used = [axis for entry in spec for axis in _spec_axes(entry)]
  for axis in used:
    if axis not in axis_sizes:
      raise UserError(f'{where}: {axis!r} is no mesh axis; use axes of {tuple(axis_sizes)}')
  if len(set(used)) != len(used):
    raise UserError(f'{where}: a mesh axis appears twice; split each axis over one dimension only')
  for dim, entry in zip(shape, spec, strict=False):
    parts = int(np.prod([axis_sizes[axis] for axis in _spec_axes(entry)]))
    if dim % parts:
      raise UserError(f'{where}: dimension {dim} is not divisible by the {parts} devices of {entry!r}; change '
                      'the rule in config.sharding.rules or the mesh in config.mesh')


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  """`fsdp` over the largest dimension it divides (the first of equal ones); replicated if it divides none."""
  candidates = [(dim, -i) for i, dim in enumerate(shape) if dim % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  axis = -max(candidates)[1]
  return PartitionSpec(*[FSDP_AXIS if i == axis else None for i in range(axis + 1)])


def param_specs(params: PyTree, axis_sizes: Mapping[str, int], sharding_rules: Sequence[tuple[str, Any]] = (),
                min_bytes: int = DEFAULT_MIN_BYTES) -> PyTree:
  """A `PartitionSpec` per parameter (arrays or shapes): the first matching rule, else FSDP above `min_bytes`.

  `axis_sizes` is a mesh's `shape` (a concrete `Mesh` or an `AbstractMesh`, so a plan can be checked for
  devices this machine does not have).
  """
  flat = tree_paths.flatten(params)
  compiled = []
  for rule in sharding_rules:
    if len(rule) != 2:
      raise UserError(f'config.sharding.rules entry {rule!r} is not a (regex, partition spec) pair')
    rules.check_matches('sharding.rules', rule[0], list(flat))
    compiled.append((re.compile(rule[0]), _as_spec(rule[1])))
  fsdp = axis_sizes.get(FSDP_AXIS, 1)
  specs = {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    spec = next((spec for pattern, spec in compiled if pattern.fullmatch(path)), None)
    if spec is None:
      big = np.prod(shape, dtype=np.int64) * np.dtype(leaf.dtype).itemsize >= min_bytes
      spec = _fsdp_spec(shape, fsdp) if fsdp > 1 and big else PartitionSpec()
    check_spec(path, shape, spec, axis_sizes)
    specs[path] = spec
  return jax.tree.unflatten(jax.tree.structure(params), list(specs.values()))


def tree_specs(tree: PyTree, params: PyTree, specs: PyTree) -> PyTree:
  """A spec for every leaf of `tree` (a train state, an optimizer state): the spec of the parameter whose path ends
  its path and whose shape it has (a moment, a mask, the parameter itself), else replicated."""
  shapes = {path: tuple(leaf.shape) for path, leaf in tree_paths.flatten(params).items()}
  param_spec = tree_paths.flatten(specs)

  def spec_of(key_path, leaf):
    parts = tree_paths.path_str(key_path).split('/')
    for start in range(len(parts)):  # the longest parameter path that ends this leaf's path
      path = '/'.join(parts[start:])
      if path in shapes and shapes[path] == tuple(leaf.shape):
        return param_spec[path]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def state_sharding(mesh: Mesh, abstract_state: Any, param_specs: PyTree) -> Any:
  """`NamedSharding`s for every leaf of a train state (arrays or shapes) with `params`: see `tree_specs`."""
  return named(mesh, tree_specs(abstract_state, abstract_state.params, param_specs))


def named(mesh: Mesh, specs: PyTree) -> PyTree:
  """`NamedSharding`s on `mesh` for a tree of specs."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  """Shape-dtype structs of `tree` (arrays or shapes) carrying `shardings`: a restore or init target."""
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Host arrays onto their shardings, each device (of every process) given only its own slice."""

  def one(leaf, sharding):
    if isinstance(leaf, jax.Array):
      return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree: PyTree, specs: PyTree, axis_sizes: Mapping[str, int]) -> int:
  """The bytes one device holds of `tree` (arrays or shapes) laid out by `specs`."""

  def shard_bytes(leaf, spec):
    shape = list(leaf.shape)
    for i, entry in enumerate(spec):
      shape[i] //= int(np.prod([axis_sizes[axis] for axis in _spec_axes(entry)]))
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize

  sizes = jax.tree.map(shard_bytes, tree, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return int(sum(jax.tree.leaves(sizes)))
