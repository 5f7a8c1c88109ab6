"""Pruning on small hand-worked tensors: which weights, exact counts per scope and structure, the schedules, masks that
hold through AdamW, the report and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft import pruning, tree_paths
from jft.errors import UserError

T, F = True, False


def encoder_like():
  return {'encoder': {'layer_0': {'attention': {'query': {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones(4)}}}},
          'embeddings': {'word_embeddings': {'embedding': jnp.ones((6, 4))}},
          'conv_0': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.ones(4)},
          'head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)}}


def masks_for(params, sparsity, scope='layer', structure='unstructured'):
  """The masks of every leaf of `params` as numpy arrays."""
  every_leaf = jax.tree.map(lambda _: True, params)
  return jax.device_get(pruning.compute_masks(params, every_leaf, sparsity, scope, structure))


def test_default_selection_is_the_kernels_but_the_heads():
  selected = tree_paths.flatten(pruning.prunable(encoder_like()))
  assert [path for path, chosen in selected.items() if chosen] == [
      'conv_0/kernel', 'encoder/layer_0/attention/query/kernel']
  assert len(selected) == 7


def test_given_patterns_replace_the_defaults():
  selected = tree_paths.flatten(pruning.prunable(encoder_like(), include=('.*query/.*',), exclude=()))
  assert [path for path, chosen in selected.items() if chosen] == [
      'encoder/layer_0/attention/query/bias', 'encoder/layer_0/attention/query/kernel']
  selected = tree_paths.flatten(pruning.prunable(encoder_like(), exclude=('encoder/.*', 'conv_0/.*')))
  assert [path for path, chosen in selected.items() if chosen] == ['head/kernel']


@pytest.mark.parametrize('kwargs,message', [
    (dict(include=('.*querry/kernel',)), 'prune.include pattern .* matches no parameter .* closest .*/query/kernel'),
    (dict(exclude=('.*/query',)), 'prune.exclude pattern .* closest paths are: .*encoder/layer_0/attention/query/'),
    (dict(exclude=('.*',)), 'leaves no parameter to prune'),
    (dict(include=('(',)), 'not a valid regex'),
])
def test_bad_selections_are_user_errors(kwargs, message):
  with pytest.raises(UserError, match=message):
    pruning.prunable(encoder_like(), **kwargs)


def test_layer_scope_prunes_exactly_floor_s_n_smallest_with_ties_by_index():
  params = {'a': jnp.array([[0.3, -0.1, 2.0], [-0.5, 0.2, 1.0]]), 'b': jnp.full((2, 5), 0.7),
            'c': jnp.arange(1.0, 101.0)}
  masks = masks_for(params, 0.5)
  np.testing.assert_array_equal(masks['a'], [[F, F, T], [T, F, T]])  # 3 of 6: |w| 0.1, 0.2, 0.3
  np.testing.assert_array_equal(masks['b'], [[F] * 5, [T] * 5])  # 5 of 10 equal ones: the first 5
  np.testing.assert_array_equal(masks['c'], np.arange(100) >= 50)
  masks = masks_for(params, 0.29)
  np.testing.assert_array_equal(masks['a'], [[T, F, T], [T, T, T]])  # floor(1.74) = 1
  np.testing.assert_array_equal(masks['b'], [[F, F, T, T, T], [T] * 5])  # floor(2.9) = 2
  np.testing.assert_array_equal(masks['c'], np.arange(100) >= 29)  # 0.29 * 100 is 28.999999999999996 in floats
  assert all(m.all() for m in masks_for(params, 0.0).values())


def test_global_scope_prunes_the_smallest_magnitudes_across_tensors():
  params = {'a': jnp.array([[0.1, -0.2], [0.3, 0.4]]), 'b': jnp.array([[5.0, 6.0, -7.0], [8.0, 9.0, 0.05]])}
  masks = masks_for(params, 0.5, 'global')  # 5 of 10: 0.05, then all of a
  np.testing.assert_array_equal(masks['a'], [[F, F], [F, F]])
  np.testing.assert_array_equal(masks['b'], [[T, T, T], [T, T, F]])
  layer = masks_for(params, 0.5, 'layer')  # the layer scope takes 2 of a and 3 of b instead
  assert (~layer['a']).sum() == 2 and (~layer['b']).sum() == 3
  ties = masks_for({'a': jnp.ones(2), 'b': jnp.ones(2)}, 0.75, 'global')  # equal: tree order, then index
  np.testing.assert_array_equal(ties['a'], [F, F])
  np.testing.assert_array_equal(ties['b'], [F, T])


def test_erk_densities_by_hand():
  shapes = [(4, 4), (8, 8), (2, 2)]  # sum(shape) / prod(shape): 1/2, 1/4, 1; sizes 16, 64, 4 (84 weights)
  # s = 0.75 keeps 21 = eps * (8 + 16 + 4): eps = 0.75
  np.testing.assert_allclose(pruning.erk_densities(shapes, 0.75), [0.375, 0.1875, 0.75])
  # s = 0.5 keeps 42: eps = 1.5 would make (2, 2) 1.5 dense, so it stays dense and 38 = eps * (8 + 16): eps = 19/12
  np.testing.assert_allclose(pruning.erk_densities(shapes, 0.5), [19 / 24, 19 / 48, 1.0])


@pytest.mark.parametrize('sparsity,pruned', [(0.75, [10, 52, 1]), (0.5, [3, 38, 0])])
def test_erk_scope_prunes_each_tensor_to_its_floor_count(sparsity, pruned):
  rng = np.random.default_rng(0)
  params = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
            for name, shape in (('a', (4, 4)), ('b', (8, 8)), ('c', (2, 2)))}
  masks = masks_for(params, sparsity, 'erk')
  assert [int((~masks[name]).sum()) for name in 'abc'] == pruned  # floor((1 - density) * n) from the densities above
  for name in 'abc':
    magnitudes = np.abs(np.asarray(params[name]))
    assert magnitudes[masks[name]].min() > magnitudes[~masks[name]].max(initial=0)


def test_two_of_four_keeps_the_two_largest_of_each_input_group():
  kernel = jnp.array([[1.0, -5.0], [-2.0, 6.0], [3.0, 0.5], [-4.0, 7.0]])  # [in 4, out 2]
  np.testing.assert_array_equal(masks_for({'k': kernel}, 0.5, 'layer', '2:4')['k'], [[F, F], [F, T], [T, F], [T, T]])
  ties = masks_for({'k': jnp.ones((8, 1))}, 0.5, 'layer', '2:4')['k'][:, 0]
  np.testing.assert_array_equal(ties, [F, F, T, T, F, F, T, T])
  conv = np.random.default_rng(0).normal(size=(3, 3, 8, 5)).astype(np.float32)  # [h, w, in, out]: groups along in
  masks = masks_for({'k': jnp.asarray(conv)}, 0.5, 'layer', '2:4')['k'].reshape(3, 3, 2, 4, 5)
  groups = np.abs(conv).reshape(3, 3, 2, 4, 5)
  assert np.all((~masks).sum(axis=3) == 2)
  assert np.all(np.where(masks, groups, np.inf).min(axis=3) > np.where(masks, -np.inf, groups).max(axis=3))


def test_channel_pruning_removes_whole_output_channels_of_smallest_norm():
  kernel = jnp.array([[1.0, 2.0, 0.0, 4.0], [0.0, 2.0, 0.5, 0.0], [0.0, 1.0, 0.0, 3.0]])  # column norms 1, 3, 0.5, 5
  np.testing.assert_array_equal(masks_for({'k': kernel}, 0.5, 'layer', 'channel')['k'], [[F, T, F, T]] * 3)
  np.testing.assert_array_equal(masks_for({'k': kernel}, 0.75, 'layer', 'channel')['k'], [[F, F, F, T]] * 3)


def test_global_channel_pruning_ranks_channels_by_norm_over_sqrt_fan_in():
  # RMS: a 3 and 1.8, b 1 and 1.5; plain L2 norms would be a 3 and 1.8, b 2 and 3 (and prune a's second instead)
  params = {'a': jnp.array([[3.0, 1.8]]), 'b': jnp.tile(jnp.array([1.0, 1.5]), (4, 1))}
  masks = masks_for(params, 0.5, 'global', 'channel')
  np.testing.assert_array_equal(masks['a'], [[T, T]])
  np.testing.assert_array_equal(masks['b'], np.zeros((4, 2), bool))


@pytest.mark.parametrize('scope,structure,sparsity', [
    ('layer', 'unstructured', 0.5), ('global', 'unstructured', 0.7), ('erk', 'channel', 0.5), ('layer', '2:4', 0.5)])
def test_compute_masks_runs_under_jit(scope, structure, sparsity):
  rng = np.random.default_rng(0)
  params = {'a': {'kernel': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), 'bias': jnp.zeros(4)},
            'b': {'kernel': jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}}
  selected = pruning.prunable(params, exclude=())
  jitted = jax.jit(lambda p: pruning.compute_masks(p, selected, sparsity, scope, structure))(params)
  eager = pruning.compute_masks(params, selected, sparsity, scope, structure)
  assert jitted['a']['bias'] is None and jitted['a']['kernel'].dtype == bool
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)
  assert 0 < sum(int((~m).sum()) for m in jax.tree.leaves(jitted)) < 64


@pytest.mark.parametrize('params,sparsity,scope,structure,message', [
    ({'k': jnp.ones((4, 4))}, 1.0, 'layer', 'unstructured', r'sparsity is 1.0: make it a fraction in \[0, 1\)'),
    ({'k': jnp.ones((4, 4))}, -0.1, 'layer', 'unstructured', 'sparsity is -0.1'),
    ({'k': jnp.ones((4, 4))}, 0.5, 'local', 'unstructured', 'unknown config.prune.scope'),
    ({'k': jnp.ones((4, 4))}, 0.5, 'layer', '4:2', 'unknown config.prune.structure'),
    ({'k': jnp.ones((4, 4))}, 0.5, 'layer', 'blocks', 'unknown config.prune.structure'),
    ({'k': jnp.ones((4, 4))}, 0.5, 'global', '2:4', "set config.prune.scope to 'layer'"),
    ({'k': jnp.ones((4, 4))}, 0.7, 'layer', '2:4', 'prunes exactly 0.5 of the weights'),
    ({'k': jnp.ones((6, 4))}, 0.5, 'layer', '2:4', r'k of shape \(6, 4\) has 6 inputs, not a multiple of 4'),
    ({'k': jnp.ones(4)}, 0.5, 'layer', 'channel', r'needs kernels of 2 or more dims, but k has shape \(4,\)'),
])
def test_bad_mask_settings_are_user_errors(params, sparsity, scope, structure, message):
  with pytest.raises(UserError, match=message):
    masks_for(params, sparsity, scope, structure)


def test_gradual_schedule_by_hand():
  at = lambda step: pruning.sparsity_at(step, 0.8, 'gradual', 100, 200, every=10)
  # 0.8 * (1 - (1 - (t - 100) / 100) ** 3) at t = 100, 110, ...; held between updates
  expected = {99: 0.0, 100: 0.0, 105: 0.0, 110: 0.8 * (1 - 0.9**3), 150: 0.7, 159: 0.7, 190: 0.8 * 0.999,
              199: 0.8 * 0.999, 200: 0.8, 1000: 0.8}
  np.testing.assert_allclose([at(step) for step in expected], list(expected.values()), atol=1e-12)
  updates = lambda end: [s for s in range(300) if pruning.is_update_step(s, 'gradual', 100, end, every=10)]
  assert updates(200) == list(range(100, 201, 10))
  assert updates(195) == [*range(100, 191, 10), 195]  # the last update reaches the target at end_step


def test_oneshot_and_iterative_schedules_by_hand():
  assert [pruning.sparsity_at(s, 0.9, 'oneshot', 50, 0) for s in (0, 49, 50, 500)] == [0.0, 0.0, 0.9, 0.9]
  assert [s for s in range(300) if pruning.is_update_step(s, 'oneshot', 50, 0)] == [50]
  # 3 cycles over [10, 40): prune to 1/3, 2/3, 3/3 of the target at 10, 20, 30, fine-tune in between and after
  at = lambda step: pruning.sparsity_at(step, 0.6, 'iterative', 10, 40, cycles=3)
  np.testing.assert_allclose([at(s) for s in (9, 10, 19, 20, 30, 39, 100)], [0, 0.2, 0.2, 0.4, 0.6, 0.6, 0.6])
  assert [s for s in range(100) if pruning.is_update_step(s, 'iterative', 10, 40, cycles=3)] == [10, 20, 30]
  assert [s for s in range(100) if pruning.is_update_step(s, 'iterative', 10, 21, cycles=2)] == [10, 15]


@pytest.mark.parametrize('kwargs,message', [
    (dict(target=1.2), 'sparsity is 1.2'),
    (dict(schedule='cubic'), 'unknown config.prune.schedule'),
    (dict(end_step=5), 'make 0 <= start_step <= end_step'),
    (dict(start_step=-1), 'make 0 <= start_step <= end_step'),
    (dict(every=0), 'config.prune.every is 0'),
    (dict(schedule='iterative', cycles=0), 'config.prune.cycles is 0'),
    (dict(schedule='iterative', cycles=11), r'between 1 and end_step - start_step \(10\)'),
])
def test_bad_schedules_are_user_errors(kwargs, message):
  settings = dict(target=0.5, schedule='gradual', start_step=10, end_step=20, every=2, cycles=1) | kwargs
  with pytest.raises(UserError, match=message):
    pruning.sparsity_at(15, **settings)


def test_check_settings_rejects_an_n_m_structure_on_a_gradual_schedule():
  pruning.check_settings(0.5, 'oneshot', 'layer', '2:4', 10, 10)
  with pytest.raises(UserError, match="set config.prune.schedule to 'oneshot', not 'gradual'"):
    pruning.check_settings(0.5, 'gradual', 'layer', '2:4', 10, 20)
  with pytest.raises(UserError, match='unknown config.prune.scope'):
    pruning.check_settings(0.5, 'gradual', 'row', 'unstructured', 10, 20)


def test_pruned_weights_stay_exactly_zero_through_adamw_and_new_masks():
  rng = np.random.default_rng(0)
  normal = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {'dense': {'kernel': normal((8, 6)), 'bias': normal(6)}, 'head': {'kernel': normal((6, 3))}}
  selected = pruning.prunable(params)
  tx = pruning.masked_by(optax.adamw(1e-2, weight_decay=0.1), selected)

  @jax.jit
  def train(params, opt_state, grads_Sx):
    def step(carry, grads):
      params, opt_state = carry
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, opt_state), grads_Sx)[0]

  random_grads = lambda steps: jax.tree.map(lambda p: normal((steps, *p.shape)), params)  # nonzero everywhere
  params, opt_state = train(params, tx.init(params), random_grads(20))  # momentum builds up on every weight
  for sparsity in (0.25, 0.5):  # the second masks prune weights that carry momentum from the steps before
    masks = pruning.compute_masks(params, selected, sparsity)
    params, opt_state = pruning.apply_masks(params, masks), pruning.with_new_masks(opt_state, masks)
    before = jax.device_get(params)
    params, opt_state = jax.device_get(train(params, opt_state, random_grads(100)))
    keep = np.asarray(masks['dense']['kernel'])
    assert (~keep).sum() == int(sparsity * 48)
    assert np.all(params['dense']['kernel'][~keep] == 0)
    assert np.all(params['dense']['kernel'][keep] != before['dense']['kernel'][keep])
    assert np.all(params['head']['kernel'] != before['head']['kernel'])
    np.testing.assert_array_equal(pruning.masks_of(opt_state)['dense']['kernel'], keep)
    assert pruning.masks_of(opt_state)['dense']['bias'] is None


def test_gradients_of_pruned_weights_never_reach_the_inner_optimizer():
  params = {'kernel': jnp.ones((2, 2))}
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
  tx = optax.chain(optax.identity(), pruning.masked_by(inner, {'kernel': True}))  # masks found inside a chain
  opt_state = pruning.with_new_masks(tx.init(params), {'kernel': jnp.array([[T, F], [T, T]])})
  grads = {'kernel': jnp.array([[0.3, 1000.0], [0.0, 0.4]])}
  updates, _ = tx.update(grads, opt_state, params)
  # the kept gradients' norm is 0.5: no clipping, as if the pruned 1000 had never been there
  np.testing.assert_allclose(updates['kernel'], [[-0.3, 0.0], [0.0, -0.4]], rtol=1e-6)


def test_apply_masks_and_the_sparsity_report_by_hand():
  params = {'a': {'kernel': jnp.array([[1.0, 2.0], [3.0, 0.0]]), 'bias': jnp.array([0.0, 5.0])},
            'b': {'kernel': jnp.array([[1.0, 2.0, 3.0, 4.0]])}}
  masks = {'a': {'kernel': jnp.array([[T, F], [T, T]]), 'bias': None}, 'b': {'kernel': jnp.array([[F, T, T, T]])}}
  pruned = pruning.apply_masks(params, masks)
  np.testing.assert_array_equal(pruned['a']['kernel'], [[1.0, 0.0], [3.0, 0.0]])
  np.testing.assert_array_equal(pruned['a']['bias'], [0.0, 5.0])
  assert pruning.sparsity_report(pruned, masks) == {
      'sparsity/a/kernel': 0.5, 'sparsity/b/kernel': 0.25,
      'sparsity/prunable': 3 / 8,  # over the 8 prunable weights
      'sparsity/all': 4 / 10}  # over all 10 parameters: the zero bias counts
  view = pruning.apply_masks({'a': {'kernel': None, 'bias': jnp.ones(2)}, 'b': params['b']}, masks)  # None holes
  assert view['a']['kernel'] is None
  np.testing.assert_array_equal(view['b']['kernel'], [[0.0, 2.0, 3.0, 4.0]])


def test_masks_are_found_in_the_prune_state_not_in_a_parameter_named_masks():
  params = {'masks': {'kernel': jnp.ones((2, 2))}, 'bias': jnp.ones(2)}
  tx = pruning.masked_by(optax.adam(1.0), {'masks': {'kernel': True}, 'bias': False})
  new = {'masks': {'kernel': jnp.array([[T, F], [T, T]])}, 'bias': None}
  opt_state = pruning.with_new_masks(tx.init(params), new)
  np.testing.assert_array_equal(pruning.masks_of(opt_state)['masks']['kernel'], new['masks']['kernel'])
  assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(opt_state.inner_state))  # moments untouched
  with pytest.raises(ValueError, match='no PruneState'):
    pruning.masks_of(optax.adam(1.0).init(params))
