"""The training core with any Flax model: linen directly, NNX through nnx.split / nnx.merge."""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jft import sharding
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_nnx, split_variables
from jft.models import ResNet, SmallCNN
from jft.state import create_train_state


def make_batch(n=16, seed=0, size=8):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  images = rng.normal(size=(n, size, size, 1)).astype(np.float32) + labels[:, None, None, None]
  return {'image': images, 'label': labels}


def linen_state(module, tx, batch):
  params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=batch['image'][:1]))
  return create_train_state(params, model_state, tx, jax.random.PRNGKey(1))


def train(apply_fn, state, tx, batch, steps):
  mesh = sharding.make_mesh(jax.devices()[:1])
  train_step = step_lib.jit_train_step(step_lib.make_train_step(apply_fn, tx), mesh)
  losses = []
  for _ in range(steps):
    state, metrics = train_step(state, sharding.put_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return state, losses


def test_linen_train_step_learns_and_is_deterministic():
  module, tx, batch = SmallCNN(num_classes=3, features=(4,), hidden=8), optax.adam(1e-2), make_batch()
  runs = [train(linen_apply_fn(module), linen_state(module, tx, batch), tx, batch, steps=20) for _ in range(2)]
  (state, losses), (state_again, _) = runs
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 20
  jax.tree.map(np.testing.assert_array_equal, state.params, state_again.params)


def test_step_updates_batchnorm_statistics_only_in_training():
  module, tx, batch = ResNet(num_classes=3, stage_features=(4,), blocks_per_stage=1), optax.sgd(0.1), make_batch()
  state = linen_state(module, tx, batch)
  before = jax.device_get(state.model_state)
  state, _ = train(linen_apply_fn(module), state, tx, batch, steps=1)
  mean_before = before['batch_stats']['stem_norm']['mean']
  assert not np.allclose(state.model_state['batch_stats']['stem_norm']['mean'], mean_before)

  # Eval uses the running statistics: each example's logits do not depend on the rest of the batch.
  eval_step = step_lib.make_eval_step(linen_apply_fn(module), num_classes=3)
  apply = linen_apply_fn(module)
  whole, _ = apply(state.params, state.model_state, {'image': batch['image']}, False, state.rng)
  alone, kept = apply(state.params, state.model_state, {'image': batch['image'][:1]}, False, state.rng)
  np.testing.assert_allclose(whole[:1], alone, rtol=1e-5, atol=1e-6)
  assert kept is state.model_state
  sums = eval_step(state, {**batch, 'mask': np.ones(16, bool)})
  assert float(sums['count']) == 16


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, image):
    return self.head(nnx.relu(self.norm(self.hidden(image.reshape(image.shape[0], -1)))))


def test_nnx_model_trains_through_split_and_merge():
  apply_fn, params, model_state = split_nnx(NnxMLP(nnx.Rngs(0)))
  assert set(params) == {'hidden', 'norm', 'head'} and 'mean' in model_state['norm']
  tx, batch = optax.adam(1e-2), make_batch()
  state = create_train_state(params, model_state, tx, jax.random.PRNGKey(1))
  state, losses = train(apply_fn, state, tx, batch, steps=20)
  assert losses[-1] < 0.5 * losses[0]
  assert not np.allclose(state.model_state['norm']['mean'], 0)  # BatchNorm statistics moved
  # The trained pytrees load back into an NNX module that gives the same eval logits.
  graphdef = nnx.graphdef(NnxMLP(nnx.Rngs(0)))
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.model_state))
  model.eval()
  logits, _ = apply_fn(state.params, state.model_state, {'image': batch['image']}, False, state.rng)
  np.testing.assert_allclose(model(jnp.asarray(batch['image'])), logits, rtol=1e-5, atol=1e-6)


def test_eval_over_padded_batches_equals_unpadded_metrics():
  module, batch = SmallCNN(num_classes=3, features=(4,), hidden=8), make_batch(n=10)
  state = linen_state(module, optax.sgd(0.1), batch)
  mesh = sharding.make_mesh(jax.devices()[:1])
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(linen_apply_fn(module), 3), mesh)
  pad = {k: np.concatenate([v[6:], np.zeros_like(v[:2])]) for k, v in batch.items()}
  batches = [{**{k: v[:6] for k, v in batch.items()}, 'mask': np.ones(6, bool)},
             {**pad, 'mask': np.array([True] * 4 + [False] * 2)}]
  padded = step_lib.evaluate(eval_step, state, batches, mesh)
  whole = step_lib.evaluate(eval_step, state, [{**batch, 'mask': np.ones(10, bool)}], mesh)
  assert padded['count'] == 10
  assert padded['confusion_matrix'] == whole['confusion_matrix']
  np.testing.assert_allclose(padded['loss'], whole['loss'], rtol=1e-6)
  # per-example predictions, padding dropped, put back in index order (here the batches hold 9..0)
  indexed = [{**b, 'index': np.arange(9 - 6 * i, 3 - 6 * i, -1).clip(0)} for i, b in enumerate(batches)]
  _, predictions = step_lib.evaluate(eval_step, state, indexed, mesh, keep_predictions=True)
  np.testing.assert_array_equal(predictions['index'], np.arange(10))
  logits = linen_apply_fn(module)(state.params, state.model_state, {'image': batch['image']}, False, state.rng)[0]
  np.testing.assert_array_equal(predictions['prediction'], np.argmax(logits, -1)[::-1])
  np.testing.assert_array_equal(predictions['label'], batch['label'][::-1])


def test_state_is_donated():
  module, tx, batch = SmallCNN(num_classes=3, features=(4,), hidden=8), optax.sgd(0.1), make_batch()
  state = linen_state(module, tx, batch)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = sharding.put_replicated(state, mesh)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh)
  old_kernel = state.params['head']['kernel']
  train_step(state, sharding.put_batch(batch, mesh))
  assert old_kernel.is_deleted()


def test_a_step_compiled_in_the_background_is_what_the_jitted_call_then_runs():
  module, tx, batch = SmallCNN(num_classes=3, features=(4,), hidden=8), optax.adam(1e-2), make_batch()
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = sharding.put_replicated(linen_state(module, tx, batch), mesh)
  reference_state = jax.tree.map(jnp.copy, state)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh)
  compiled_by = []  # threads in which XLA compiled a program of the step

  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration' and 'train_step' in kwargs.get('fun_name', ''):
      compiled_by.append(threading.current_thread().name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    compiling = step_lib.compile_in_background(train_step, abstract_state, sharding.put_batch(batch, mesh))
    compiling.result()
    assert len(compiled_by) == 1 and compiled_by[0].startswith('jft-compile')
    state, metrics = train_step(state, sharding.put_batch(batch, mesh))
    assert len(compiled_by) == 1  # the call ran that program: not compiled again
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  fresh_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh)
  expected_state, expected = fresh_step(reference_state, sharding.put_batch(batch, mesh))
  assert float(metrics['loss']) == float(expected['loss'])
  jax.tree.map(np.testing.assert_array_equal, state.params, expected_state.params)


class ClassifierWithDropout(nn.Module):

  @nn.compact
  def __call__(self, image, train=False):
    x = nn.Dropout(0.5, deterministic=not train)(image.reshape(image.shape[0], -1))
    return nn.Dense(3)(x)


def test_dropout_rng_changes_every_step_but_not_across_runs():
  module, tx, batch = ClassifierWithDropout(), optax.sgd(0.0), make_batch()
  state = linen_state(module, tx, batch)
  _, losses = train(linen_apply_fn(module), state, tx, batch, steps=3)
  _, losses_again = train(linen_apply_fn(module), linen_state(module, tx, batch), tx, batch, steps=3)
  assert len(set(losses)) == 3  # lr 0: only the dropout masks differ between steps
  assert losses == losses_again
