"""Pruning criteria beyond magnitude (jft/prune_criteria.py) and the GMP* schedule options (initial sparsity,
learning-rate rewinding), each against numbers worked out here by hand or in NumPy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jft import optim, prune_criteria, pruning, pruning_hook, rules
from jft.errors import UserError
from jft.state import create_train_state

W = np.array([[1.0, -2.0], [3.0, -4.0]], np.float32)
GRADS = [np.array([[0.5, 0.5], [-1.0, 1.0]], np.float32), np.array([[1.5, -0.5], [0.0, 2.0]], np.float32)]


def accumulated(criterion, params, grads_per_step):
  """The ScoreState after feeding `grads_per_step` through accumulate_scores at fixed `params`."""
  prunable = jax.tree.map(lambda _: True, params)
  tx = prune_criteria.accumulate_scores(criterion, prunable)
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    assert updates is grads  # the gradients pass unchanged
  return state


@pytest.mark.parametrize('criterion,expected', [
    # movement: mean over steps of -g * w
    ('movement', -(GRADS[0] * W + GRADS[1] * W) / 2),
    # saliency: mean of |g * w|
    ('saliency', (np.abs(GRADS[0] * W) + np.abs(GRADS[1] * W)) / 2),
    # fisher: w^2 * mean(g^2) / 2
    ('fisher', W**2 * (GRADS[0]**2 + GRADS[1]**2) / 2 / 2),
])
def test_scores_by_hand(criterion, expected):
  state = accumulated(criterion, {'k': jnp.asarray(W)}, [{'k': jnp.asarray(g)} for g in GRADS])
  assert int(state.score_steps) == 2
  masks = {'k': jnp.array([[True, True], [True, False]])}  # the last weight is already pruned
  scores = prune_criteria.scores(criterion, {'k': jnp.asarray(W)}, state, masks)['k']
  np.testing.assert_allclose(scores[:1], expected[:1], rtol=1e-6)
  np.testing.assert_allclose(scores[1, 0], expected[1, 0], rtol=1e-6)
  assert scores[1, 1] == -np.inf


def test_movement_keeps_the_weights_moving_away_from_zero():
  # w = [[1, -2], [3, -4]], g = 1 everywhere: -g * w = [[-1, 2], [-3, 4]], so 3 (moving toward zero) and 1 go,
  # where magnitude prunes 1 and -2.
  grads = [{'k': jnp.array([[1.0, 1.0], [1.0, 1.0]])}]
  state = accumulated('movement', {'k': jnp.asarray(W)}, grads)
  masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), {'k': W})
  scores = prune_criteria.scores('movement', {'k': jnp.asarray(W)}, state, masks)
  kept = pruning.compute_masks({'k': jnp.asarray(W)}, {'k': True}, 0.5, 'layer', 'unstructured', scores)['k']
  np.testing.assert_array_equal(kept, [[False, True], [False, True]])  # 1 and 3 go although |3| > |-2|
  by_magnitude = pruning.compute_masks({'k': jnp.asarray(W)}, {'k': True}, 0.5, 'layer', 'unstructured')['k']
  np.testing.assert_array_equal(by_magnitude, [[False, False], [True, True]])


def test_ranking_orders_negative_scores_and_minus_infinity_and_breaks_ties_by_index():
  scores = jnp.array([0.5, -3.0, -jnp.inf, -0.0, 0.0, -3.0, 2.0, -1e-30])
  # the lowest four: -inf, then -3 (index 1), -3 (index 5), -1e-30
  np.testing.assert_array_equal(pruning._keep(scores, jnp.int32(4)), [1, 0, 0, 1, 1, 0, 1, 0])
  # -0.0 and 0.0 are one value: the earlier goes first
  np.testing.assert_array_equal(pruning._keep(scores, jnp.int32(5)), [1, 0, 0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(pruning._keep(scores, jnp.int32(0)), [1] * 8)
  np.testing.assert_array_equal(pruning._keep(scores, jnp.int32(8)), [0] * 8)


def test_global_channel_and_n_m_rankings_use_the_scores():
  params = {'a': jnp.ones((2, 2)), 'b': jnp.ones((2, 4))}
  scores = {'a': jnp.array([[5.0, -1.0], [1.0, 0.5]]), 'b': jnp.array([[0.1, 2.0, -2.0, 3.0], [0.2, 0.0, 4.0, 1.0]])}
  prunable = {'a': True, 'b': True}
  # global, 6 of 12: -2, -1, 0, 0.1, 0.2, 0.5
  kept = pruning.compute_masks(params, prunable, 0.5, 'global', 'unstructured', scores)
  np.testing.assert_array_equal(kept['a'], [[1, 0], [1, 0]])
  np.testing.assert_array_equal(kept['b'], [[0, 1, 0, 1], [0, 0, 1, 1]])
  # channels score the sum over their inputs: a: [6, -0.5]; b: [0.3, 2, 2, 4]; global 3 of 6 channels
  kept = pruning.compute_masks(params, prunable, 0.5, 'global', 'channel', scores)
  np.testing.assert_array_equal(kept['a'][0], [1, 0])
  np.testing.assert_array_equal(kept['b'][0], [0, 0, 1, 1])  # of the equal 2s, the earlier goes
  # 1:2 along the inputs (axis -2): the higher score of each column pair
  kept = pruning.compute_masks(params, prunable, 0.5, 'layer', '1:2', scores)
  np.testing.assert_array_equal(kept['b'], [[0, 1, 0, 1], [1, 0, 1, 0]])


def test_the_optimizer_sums_scores_of_prunable_weights_only_and_a_mask_update_resets_them():
  params = {'dense': {'kernel': jnp.asarray(W), 'bias': jnp.ones(2)}}
  prunable = pruning.prunable(params)
  config = ml_collections.ConfigDict(dict(name='sgd', lr=0.1, weight_decay=0.0, momentum=0.0, warmup_steps=0,
                                          schedule='constant', clip_norm=None, accumulate_steps=1))
  tx = optim.make_optimizer(config, 10, rules.resolve(params), prunable, prune_criterion='saliency')
  state = create_train_state(params, {}, tx, jax.random.PRNGKey(0))
  grads = {'dense': {'kernel': jnp.asarray(GRADS[0]), 'bias': jnp.ones(2)}}
  _, opt_state = tx.update(grads, state.opt_state, state.params)
  sums = prune_criteria.score_state_of(opt_state)
  assert sums.score_sums['dense']['bias'] is None and int(sums.score_steps) == 1
  np.testing.assert_allclose(sums.score_sums['dense']['kernel'], np.abs(GRADS[0] * W))
  schedule = pruning_hook.MaskSchedule(prunable, 0.5, 'layer', 'unstructured', 'oneshot', 2, 2,
                                       criterion='saliency')
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))  # the loop's states live on a mesh
  on_mesh = jax.device_put(state.replace(opt_state=opt_state),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  pruned = schedule.before_step(2, on_mesh)
  # |g w| = [[0.5, 1], [3, 4]]: the two lowest go
  np.testing.assert_array_equal(pruned.params['dense']['kernel'], [[0, 0], [3, -4]])
  after = prune_criteria.score_state_of(pruned.opt_state)
  assert int(after.score_steps) == 0 and not np.any(after.score_sums['dense']['kernel'])


def test_a_gradient_criterion_needs_gradients_before_its_first_pruning_step():
  prunable, trainable = {'k': True, 'b': False}, {'k': True, 'b': True}
  prune_criteria.check('fisher', prunable, [trainable], first_pruning_step=11)
  prune_criteria.check('magnitude', prunable, [{'k': False, 'b': True}], first_pruning_step=1)
  with pytest.raises(UserError, match=r"'fisher' ranks weights by their gradients, but k .* frozen in stage 1"):
    prune_criteria.check('fisher', prunable, [trainable, {'k': False, 'b': True}], first_pruning_step=11)
  with pytest.raises(UserError, match='before step 1, when none has run: set config.prune.start_step later'):
    prune_criteria.check('movement', prunable, [trainable], first_pruning_step=1)
  with pytest.raises(UserError, match="unknown config.prune.criterion 'taylor'"):
    prune_criteria.check('taylor', prunable, [trainable], first_pruning_step=11)


def test_gradual_schedule_from_an_initial_sparsity_by_hand():
  at = lambda step: pruning.sparsity_at(step, 0.9, 'gradual', 10, 40, every=10, initial=0.7)
  # 0.9 + (0.7 - 0.9) * (1 - (t - 10) / 30) ** 3 at t = 10, 20, 30; 0.9 from 40 on
  expected = {9: 0.0, 10: 0.7, 19: 0.7, 20: 0.9 - 0.2 * (2 / 3)**3, 30: 0.9 - 0.2 * (1 / 3)**3, 40: 0.9, 99: 0.9}
  np.testing.assert_allclose([at(step) for step in expected], list(expected.values()), atol=1e-12)
  assert pruning.update_steps('gradual', 10, 40, every=10, initial=0.7) == [10, 20, 30, 40]
  assert pruning.update_steps('gradual', 10, 35, every=10) == [10, 20, 30, 35]
  assert pruning.update_steps('iterative', 10, 21, cycles=2) == [10, 15]
  with pytest.raises(UserError, match="only the 'gradual' schedule starts from an initial sparsity"):
    pruning.sparsity_at(5, 0.9, 'oneshot', 10, 10, initial=0.5)
  with pytest.raises(UserError, match='initial_sparsity 0.95 is above config.prune.sparsity 0.9'):
    pruning.check_settings(0.9, 'gradual', 'layer', 'unstructured', 10, 40, every=10, initial=0.95)


def test_learning_rate_rewinds_at_each_restart_by_hand():
  config = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=2, schedule='linear'))
  schedule = optim.make_schedule(config, 10, restarts=[0, 4, 7])  # 0 is no restart
  # [0, 4): warmup 0, 0.5, then linear 1 -> 0 over 2: 1, 0.5; [4, 7): 1, 2/3, 1/3; [7, 10): 1, 2/3, 1/3
  expected = [0, 0.5, 1, 0.5, 1, 2 / 3, 1 / 3, 1, 2 / 3, 1 / 3]
  np.testing.assert_allclose([schedule(count) for count in range(10)], expected, atol=1e-6)
  plain = optim.make_schedule(config, 10)
  np.testing.assert_allclose([plain(count) for count in range(10)], [0, 0.5] + [1 - k / 8 for k in range(8)],
                             atol=1e-6)


def test_mask_updates_become_learning_rate_restarts_of_the_stage():
  schedule = pruning_hook.MaskSchedule({'k': True}, 0.9, 'layer', 'unstructured', 'gradual', 10, 40, every=10,
                                       initial=0.5, rewind_lr=True)
  # the update before step u is applied by update number u - first_step (of the stage), over accumulate_steps
  assert schedule.optimizer_options(1, 100)['lr_restarts'] == [9, 19, 29, 39]
  assert schedule.optimizer_options(21, 100, accumulate_steps=2)['lr_restarts'] == [4, 9]
  assert schedule.optimizer_options(1, 100)['prune_criterion'] == 'magnitude'
  no_rewind = pruning_hook.MaskSchedule({'k': True}, 0.9, 'layer', 'unstructured', 'gradual', 10, 40, every=10)
  assert no_rewind.optimizer_options(1, 100)['lr_restarts'] == ()
