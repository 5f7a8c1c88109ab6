"""Sharding rules on an abstract mesh: specs divide their shapes, moments and masks follow their parameter,
scalars are replicated, the FSDP size threshold holds, and bad specs are UserErrors."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jft import optim, pruning, rules, sharding, tree_paths
from jft.errors import UserError
from jft.state import create_train_state

P = PartitionSpec
MESH = AbstractMesh((2, 4, 1), sharding.AXES)  # data 2, fsdp 4: 8 devices this machine need not have


def shapes(**paths: tuple[int, ...]) -> dict:
  return tree_paths.unflatten({path.replace('__', '/'): jax.ShapeDtypeStruct(shape, jnp.float32)
                               for path, shape in paths.items()})


PARAMS = shapes(embed__embedding=(1000, 64), layer__kernel=(64, 256), layer__bias=(256,), head__kernel=(64, 3),
                odd__kernel=(7, 9))


def test_mesh_shape_fills_the_rest_and_rejects_bad_sizes():
  assert sharding.mesh_shape(None, 8) == {'data': 8, 'fsdp': 1, 'model': 1}
  assert sharding.mesh_shape(dict(data=-1, fsdp=4), 8) == {'data': 2, 'fsdp': 4, 'model': 1}
  assert sharding.mesh_shape(dict(data=1, fsdp=-1, model=2), 8) == {'data': 1, 'fsdp': 4, 'model': 2}
  for bad in (dict(data=-1, fsdp=-1), dict(data=3), dict(fsdp=3, data=-1), dict(data=0), dict(pipe=2)):
    with pytest.raises(UserError, match='config.mesh'):
      sharding.mesh_shape(bad, 8)


def test_fsdp_splits_the_largest_divisible_dimension_above_the_threshold():
  specs = tree_paths.flatten(sharding.param_specs(PARAMS, MESH.shape, min_bytes=1024))
  assert specs['embed/embedding'] == P('fsdp')  # 1000 x 64: the larger dimension
  assert specs['layer/kernel'] == P(None, 'fsdp')  # 64 x 256
  assert specs['layer/bias'] == P('fsdp')  # 256 float32 = 1024 bytes: the threshold is inclusive
  assert specs['head/kernel'] == P()  # 768 bytes
  assert specs['odd/kernel'] == P()  # 7 x 9 = 252 bytes
  specs = tree_paths.flatten(sharding.param_specs(PARAMS, MESH.shape, min_bytes=1025))
  assert specs['layer/bias'] == P() and specs['layer/kernel'] == P(None, 'fsdp')
  specs = tree_paths.flatten(sharding.param_specs(PARAMS, MESH.shape, min_bytes=0))
  assert specs['odd/kernel'] == P()  # no dimension divisible by 4
  assert specs['head/kernel'] == P('fsdp')


def test_every_spec_divides_its_shape():
  specs = sharding.param_specs(PARAMS, MESH.shape, min_bytes=0)
  for leaf, spec in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(specs), strict=True):
    for dim, entry in zip(leaf.shape, spec, strict=False):
      if entry is not None:
        assert dim % MESH.shape[entry] == 0


def test_rules_come_first_and_bad_specs_name_path_shape_and_mesh():
  specs = tree_paths.flatten(sharding.param_specs(
      PARAMS, MESH.shape, (('layer/kernel', (None, 'model')), ('head/.*', ())), min_bytes=0))
  assert specs['layer/kernel'] == P(None, 'model') and specs['head/kernel'] == P()
  with pytest.raises(UserError, match=r'odd/kernel \(shape \(7, 9\)\).*fsdp.*divisible'):
    sharding.param_specs(PARAMS, MESH.shape, (('odd/kernel', ('fsdp', None)),))
  with pytest.raises(UserError, match="'tensor' is no mesh axis"):
    sharding.param_specs(PARAMS, MESH.shape, (('layer/kernel', ('tensor',)),))
  with pytest.raises(UserError, match='more entries than the parameter has dimensions'):
    sharding.param_specs(PARAMS, MESH.shape, (('layer/bias', ('fsdp', None)),))
  with pytest.raises(UserError, match='appears twice'):
    sharding.param_specs(PARAMS, MESH.shape, (('layer/kernel', ('fsdp', 'fsdp')),))
  with pytest.raises(UserError, match='matches no parameter'):
    sharding.param_specs(PARAMS, MESH.shape, (('nothing/.*', ()),))


def test_moments_masks_and_accumulators_follow_their_parameter_scalars_replicated():
  labels = rules.resolve(PARAMS, freeze=('odd/.*',))
  config = ml_collections.ConfigDict(dict(name='adamw', lr=1e-3, weight_decay=0.1, warmup_steps=0,
                                          schedule='constant', clip_norm=1.0, accumulate_steps=2))
  tx = optim.make_optimizer(config, 10, labels, pruning.prunable(PARAMS))
  state = jax.eval_shape(lambda: create_train_state(
      jax.tree.map(lambda s: jnp.zeros(s.shape), PARAMS), {}, tx, jax.random.PRNGKey(0)))
  param_specs = sharding.param_specs(PARAMS, MESH.shape, min_bytes=1024)
  specs = tree_paths.flatten(sharding.tree_specs(state, PARAMS, param_specs))
  by_param = tree_paths.flatten(param_specs)
  followed = {path: spec for path, spec in specs.items() if spec != P()}
  for path, spec in specs.items():
    matches = [param for param in by_param if path.endswith('/' + param)]
    if matches:
      assert spec == by_param[max(matches, key=len)], path
    else:
      assert spec == P(), path  # counts, the schedule's step, the rng
  assert any('/mu/' in path for path in followed) and any('/nu/' in path for path in followed)
  assert any(path.startswith('opt_state/masks/') for path in followed)
  assert any('acc_grads' in path for path in followed)  # optax.MultiSteps' accumulated gradients
  assert 'params' in {path.split('/')[0] for path in followed}
  assert specs['step'] == P() and specs['rng'] == P()


def test_bytes_per_device_counts_each_shard():
  specs = sharding.param_specs(PARAMS, MESH.shape, min_bytes=0)
  total = tree_paths.tree_bytes(PARAMS)
  per_device = sharding.bytes_per_device(PARAMS, specs, MESH.shape)
  replicated = sharding.bytes_per_device(PARAMS, jax.tree.map(lambda _: P(), PARAMS), MESH.shape)
  assert replicated == total
  # Everything splits 4 ways except odd/kernel (7 x 9) and head/kernel (64 x 3 splits its 64).
  expected = (1000 * 64 + 64 * 256 + 256 + 64 * 3) * 4 // 4 + 7 * 9 * 4
  assert per_device == expected
