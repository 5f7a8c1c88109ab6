"""Rules over parameter paths, freezing, per-parameter learning rates and stages, on small hand-worked trees."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jft import optim, rules, sharding, stages, tree_paths
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.errors import UserError
from jft.models import SmallCNN
from jft.state import create_train_state


def encoder_like():
  """A tree with the shape of a 3-layer encoder's parameter paths."""
  layer = lambda: {'attention': {'query': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}},
                   'mlp': {'layer_norm': {'scale': jnp.ones(2)}}}
  return {'embeddings': {'word_embeddings': {'embedding': jnp.ones((5, 2))}},
          'encoder': {f'layer_{i}': layer() for i in range(3)},
          'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}


def labels_of(labels, field):
  return tree_paths.flatten(getattr(labels, field))


def test_resolve_by_hand():
  labels = rules.resolve(encoder_like(), freeze=('embeddings/.*', 'encoder/layer_0/.*'),
                         lr_mults=(('head/.*', 10.0), ('encoder/layer_2/attention/.*', 0.5)))
  trainable, mult, decay = (labels_of(labels, f) for f in ('trainable', 'lr_mult', 'decay'))
  assert not trainable['embeddings/word_embeddings/embedding'] and not trainable['encoder/layer_0/mlp/layer_norm/scale']
  assert trainable['encoder/layer_1/attention/query/kernel'] and trainable['head/bias']
  assert mult['head/kernel'] == 10.0 and mult['encoder/layer_2/attention/query/bias'] == 0.5
  assert mult['encoder/layer_2/mlp/layer_norm/scale'] == 1.0
  # default weight decay: kernels and embeddings, not biases or normalisation scales
  assert decay['head/kernel'] and decay['embeddings/word_embeddings/embedding']
  assert not decay['head/bias'] and not decay['encoder/layer_1/mlp/layer_norm/scale']


def test_a_rule_matches_whole_paths_only():
  assert rules.matches_any('encoder/layer_1/attention/query/kernel', (r'head/.*', r'.*query/kernel'))
  # A prefix or a substring is not a match: `re.fullmatch`, not `re.match` or `re.search`.
  assert not rules.matches_any('encoder/layer_1/attention/query/kernel', (r'encoder/layer_1', r'query'))
  assert not rules.matches_any('encoder/layer_10/mlp/output/kernel', (r'encoder/layer_1/.*',))
  assert not rules.matches_any('head/kernel', ())


def test_layer_wise_decay_by_hand():
  mult = labels_of(rules.resolve(encoder_like(), layer_decay=0.5, lr_mults=(('head/.*', 2.0),)), 'lr_mult')
  # L = 3: embeddings are layer 0 -> 0.5**3, layer_i is layer i+1 -> 0.5**(2-i), the head layer 3 -> 1 (x its rule)
  assert mult['embeddings/word_embeddings/embedding'] == 0.125
  assert mult['encoder/layer_0/attention/query/kernel'] == 0.25
  assert mult['encoder/layer_1/mlp/layer_norm/scale'] == 0.5
  assert mult['encoder/layer_2/attention/query/bias'] == 1.0
  assert mult['head/kernel'] == 2.0


def sgd(lr=1.0, **fields):
  defaults = dict(name='sgd', lr=lr, weight_decay=0.0, momentum=0.0, warmup_steps=0, schedule='constant',
                  clip_norm=None, accumulate_steps=1)
  return ml_collections.ConfigDict({**defaults, **fields})


def test_layer_wise_learning_rates_reach_the_updates_exactly():
  params = encoder_like()
  labels = rules.resolve(params, layer_decay=0.5)
  tx = optim.make_optimizer(sgd(lr=0.1), 10, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates = tree_paths.flatten(tx.update(grads, tx.init(params), params)[0])
  np.testing.assert_allclose(updates['embeddings/word_embeddings/embedding'], -0.1 * 0.125, rtol=1e-6)
  np.testing.assert_allclose(updates['encoder/layer_0/attention/query/kernel'], -0.1 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(updates['encoder/layer_2/attention/query/kernel'], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates['head/kernel'], -0.1, rtol=1e-6)


@pytest.mark.parametrize('kwargs,message', [
    (dict(freeze=('encoder/layer_9/.*',)), "matches no parameter .* closest paths are: encoder/layer_"),
    (dict(freeze=('head',)), 'closest paths are: head/'),
    (dict(freeze=('head/.*',), lr_mults=(('head/kernel', 2.0),)), 'rules conflict on head/kernel'),
    (dict(lr_mults=(('head/.*', 2.0), ('.*/kernel', 3.0))), 'rules conflict on head/kernel'),
    (dict(freeze=('.*',)), 'freezes every parameter'),
    (dict(lr_mults=(('head/.*', 0.0),)), 'must be positive'),
    (dict(lr_mults=(('head/.*', -1.0),)), 'must be positive'),
    (dict(freeze=('head/(',)), 'not a valid regex'),
    (dict(layer_decay=1.5), 'layer_decay'),
])
def test_bad_rules_are_user_errors(kwargs, message):
  with pytest.raises(UserError, match=message):
    rules.resolve(encoder_like(), **kwargs)


def cnn_setup(freeze=(), optim_fields=None, seed=0):
  module = SmallCNN(num_classes=3, features=(4, 8), hidden=16)
  rng = np.random.default_rng(seed)
  batch = {'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32), 'label': rng.integers(0, 3, 8).astype(np.int32)}
  params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=batch['image'][:1]))
  labels = rules.resolve(params, freeze=freeze)
  fields = dict(name='adamw', lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule='constant', clip_norm=1.0)
  config = ml_collections.ConfigDict({**fields, **(optim_fields or {})})
  tx = optim.make_optimizer(config, 100, labels)
  state = create_train_state(params, model_state, tx, jax.random.PRNGKey(1))
  return module, tx, labels, state, batch


def run_steps(module, tx, labels, state, batches):
  mesh = sharding.make_mesh(jax.devices()[:1])
  train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx, labels.trainable), mesh)
  for batch in batches:
    state, _ = train_step(state, sharding.put_batch(batch, mesh))
  return state


def test_frozen_parameters_stay_bit_identical_and_carry_no_state():
  module, tx, labels, state, batch = cnn_setup(freeze=('conv_.*',))
  before = jax.device_get(state.params)
  after = jax.device_get(run_steps(module, tx, labels, state, [batch] * 30).params)
  for path in ('conv_0/kernel', 'conv_0/bias', 'conv_1/kernel'):
    assert tree_paths.flatten(after)[path].tobytes() == tree_paths.flatten(before)[path].tobytes()
  assert not np.array_equal(after['hidden']['kernel'], before['hidden']['kernel'])
  # AdamW's two moments for each of the 4 trainable leaves, plus counts: nothing shaped like a conv parameter
  leaves = jax.tree.leaves(state.opt_state)
  shapes = {tuple(leaf.shape) for leaf in leaves}
  assert (3, 3, 1, 4) not in shapes and (3, 3, 4, 8) not in shapes
  assert sum(leaf.size for leaf in leaves if leaf.ndim) == 2 * sum(
      p.size for p, t in zip(jax.tree.leaves(state.params), jax.tree.leaves(labels.trainable), strict=True) if t)


def count_convolutions(step, state, batch):
  return jax.jit(step).lower(state, batch).as_text().count('stablehlo.convolution')


def test_no_backward_pass_through_frozen_layers():
  module, tx, labels, state, batch = cnn_setup(freeze=('conv_.*',))
  frozen_step = step_lib.make_train_step(linen_apply_fn(module), tx, labels.trainable)
  full_tx = optim.make_optimizer(sgd(), 10)
  full_step = step_lib.make_train_step(linen_apply_fn(module), full_tx)
  full_state = create_train_state(state.params, state.model_state, full_tx, state.rng)
  frozen_convs = count_convolutions(frozen_step, state, batch)
  full_convs = count_convolutions(full_step, full_state, batch)
  assert frozen_convs == 2  # the forward pass only
  assert full_convs == 5  # + two kernel gradients + the input gradient of conv_1


def test_accumulated_small_batches_give_the_large_batch_update():
  module, tx, labels, state, batch = cnn_setup(freeze=('conv_0/.*',))
  big = run_steps(module, tx, labels, state, [batch])
  module, tx, labels, state, _ = cnn_setup(freeze=('conv_0/.*',), optim_fields=dict(accumulate_steps=2))
  initial = np.asarray(state.params['hidden']['kernel'])
  halves = [jax.tree.map(lambda x: x[:4], batch), jax.tree.map(lambda x: x[4:], batch)]
  small = run_steps(module, tx, labels, state, halves)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), small.params, big.params)
  assert not np.allclose(small.params['hidden']['kernel'], initial)


def test_clipping_is_global_over_the_trainable_parameters_only():
  params = {'a': jnp.zeros(2), 'b': jnp.zeros(2)}
  labels = rules.resolve(params, freeze=('b',))
  tx = optim.make_optimizer(sgd(clip_norm=1.0), 10, labels)
  grads = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([100.0, 100.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], [-0.6, -0.8], rtol=1e-6)  # norm 5 -> 1; b's gradient plays no part
  np.testing.assert_array_equal(updates['b'], 0)


def staged_config(total=10, **stage_fields):
  return ml_collections.ConfigDict(dict(
      total_steps=total, freeze=(), lr_mults=(),
      optim=dict(name='adamw', lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule='constant', clip_norm=None,
                 accumulate_steps=1),
      stages=(dict(steps=4, freeze=('encoder/.*', 'embeddings/.*'), optim=dict(lr=0.1)), dict(steps=total - 4))))


def test_stages_plan_groups_by_the_stage_since_which_parameters_train():
  first, second = stages.plan(staged_config(), encoder_like())
  assert (first.first_step, first.last_step, second.first_step, second.last_step) == (1, 4, 5, 10)
  assert first.optim.lr == 0.1 and second.optim.lr == 1e-2
  group = labels_of(second.labels, 'group')
  assert group['head/kernel'] == 'stage_0' and group['encoder/layer_0/attention/query/kernel'] == 'stage_1'
  assert labels_of(first.labels, 'group')['encoder/layer_0/attention/query/kernel'] == 'frozen'
  assert stages.stage_of_step([first, second], 4) is first and stages.stage_of_step([first, second], 5) is second


def test_carry_over_keeps_moments_of_continuing_parameters_and_starts_new_ones_fresh():
  params = encoder_like()
  first, second = stages.plan(staged_config(), params)
  tx_first = optim.make_optimizer(first.optim, first.steps, first.labels)
  opt_state = tx_first.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    _, opt_state = tx_first.update(grads, opt_state, params)
  tx_second = optim.make_optimizer(second.optim, second.steps, second.labels)
  carried = optim.carry_over(opt_state, tx_second.init(params))
  flat = tree_paths.flatten(carried)
  head_mu = [v for k, v in flat.items() if 'stage_0' in k and k.endswith('mu/head/kernel')]
  encoder_mu = [v for k, v in flat.items()
                if 'stage_1' in k and k.endswith('mu/encoder/layer_0/attention/query/kernel')]
  counts = {k: int(v) for k, v in flat.items() if k.endswith('/count') and optim.GROUP_STATE.search(k)}
  np.testing.assert_allclose(head_mu[0], 1 - 0.9**3, rtol=1e-6)  # three steps of gradient 1
  np.testing.assert_array_equal(encoder_mu[0], 0)
  assert sorted(counts.values()) == [0, 3]  # the encoder's group counts from its own first step
  schedule_counts = [int(v) for k, v in flat.items() if k.endswith('/count') and not optim.GROUP_STATE.search(k)]
  assert schedule_counts == [0]  # the next stage's schedule starts from its own warmup
  updates, _ = tx_second.update(grads, carried, params)
  assert np.all(np.asarray(updates['encoder']['layer_0']['attention']['query']['kernel']) != 0)


@pytest.mark.parametrize('change,message', [
    (dict(total=12), 'add up to 10, not config.total_steps 12'),
])
def test_bad_stages_are_user_errors(change, message):
  config = staged_config()
  config.total_steps = change['total']
  with pytest.raises(UserError, match=message):
    stages.plan(config, encoder_like())
  config = staged_config()
  config.freeze = ('head/.*',)
  with pytest.raises(UserError, match='leave the top-level ones empty'):
    stages.plan(config, encoder_like())


def test_masked_optax_alone_would_move_frozen_leaves():
  """Why freezing is optax.selective_transform, not optax.masked: masked passes the other leaves' gradients
  through, where selective_transform zeroes them."""
  params = {'a': jnp.ones(2), 'b': jnp.ones(2)}
  updates, _ = optax.masked(optax.sgd(1.0), {'a': True, 'b': False}).update(
      {'a': jnp.ones(2), 'b': jnp.ones(2)}, optax.masked(optax.sgd(1.0), {'a': True, 'b': False}).init(params))
  assert np.all(np.asarray(updates['b']) != 0)
  tx = optim.make_optimizer(sgd(), 10, rules.resolve(params, freeze=('b',)))
  frozen_updates, _ = tx.update({'a': jnp.ones(2), 'b': jnp.ones(2)}, tx.init(params), params)
  np.testing.assert_array_equal(frozen_updates['b'], 0)


def test_importing_the_rules_loads_no_models_orbax_or_safetensors():
  heavy = ('[m for m in sys.modules if m.split(".")[0] in ("orbax", "safetensors") or m.startswith("jft.models")]')
  code = (f'import sys, jft.rules; print({heavy}); '
          'import jft; from jft import optim, sharding; print(callable(jft.step.make_train_step))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['[]', 'True']  # and every public module is still an attribute of jft
