"""Mixed precision and rematerialisation: bf16 runs the matmuls and convolutions in bf16 with float32 parameters,
optimizer state, statistics and logits; remat keeps every parameter path and gives the same outputs and gradients."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jft import models, optim, tree_paths
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.errors import UserError
from jft.models import BertClassifier, BertConfig, ResNet, SmallCNN, bert
from jft.state import create_train_state

CONFIG = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64)
NUM_CLASSES = 3


def text_batch(batch: int = 4, length: int = 16) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  mask = (np.arange(length)[None] < rng.integers(4, length + 1, batch)[:, None]).astype(np.int32)
  return {'input_ids': rng.integers(1, 100, (batch, length)).astype(np.int32), 'attention_mask': mask,
          'label': rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}


def image_batch(batch: int = 4, size: int = 8) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'image': rng.normal(size=(batch, size, size, 1)).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}


MODELS = {
    'bert': (BertClassifier(CONFIG, num_classes=NUM_CLASSES), text_batch),
    'cnn': (SmallCNN(num_classes=NUM_CLASSES, features=(4, 8), hidden=16), image_batch),
    'resnet': (ResNet(num_classes=NUM_CLASSES, stage_features=(4, 8), blocks_per_stage=1), image_batch),
}


def state_and_step(module, batch):
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), **step_lib.model_inputs(batch))
  tx = optax.adamw(1e-3)
  state = create_train_state(*split_variables(variables), tx, jax.random.PRNGKey(1))
  return state, jax.jit(step_lib.make_train_step(linen_apply_fn(module), tx))


def dots(lowered_text: str, element_type: str) -> list[str]:
  """The operand types of each dot_general and convolution in StableHLO text whose operands are all `element_type`."""
  ops = re.findall(r'stablehlo\.(?:dot_general|convolution).*?:\s*\((tensor<[^)]*)\)', lowered_text)
  return [op for op in ops if set(re.findall(r'x([a-z]+[0-9]+)>', op)) == {element_type}]


def float_dtypes(tree) -> set[jnp.dtype]:
  return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize('name', MODELS)
def test_bfloat16_runs_the_dots_in_bf16_and_keeps_float32_parameters(name):
  float32_module, make_batch = MODELS[name]
  module, batch = float32_module.clone(dtype='bfloat16'), make_batch()
  state, train_step = state_and_step(module, batch)
  float32_state, float32_step = state_and_step(float32_module, batch)
  assert float_dtypes((state.params, state.model_state)) == {jnp.dtype('float32')}

  lowered = train_step.lower(state, batch).as_text()
  float32_lowered = float32_step.lower(float32_state, batch).as_text()
  float32_dots, head_dots = dots(float32_lowered, 'f32'), dots(lowered, 'f32')
  assert not dots(float32_lowered, 'bf16')
  # In bf16 only the head's matmul and its two gradients stay float32; every other one runs on bf16 operands.
  assert len(head_dots) == 3 and all(f'x{NUM_CLASSES}xf32>' in op for op in head_dots), head_dots
  assert len(dots(lowered, 'bf16')) == len(float32_dots) - 3 >= 6

  new_state, metrics = train_step(state, batch)
  assert float_dtypes((new_state.params, new_state.opt_state, new_state.model_state)) == {jnp.dtype('float32')}
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(metrics['loss'])
  inputs = step_lib.model_inputs(batch)
  variables = {'params': new_state.params, **new_state.model_state}
  logits, reference = module.apply(variables, **inputs), float32_module.apply(variables, **inputs)
  assert logits.dtype == jnp.float32
  error = np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
  assert 0 < error < 5e-2  # bf16 really ran, and stays close


def test_layer_norm_statistics_stay_float32_in_bfloat16():
  # Far from zero mean, bf16 statistics are off by about 0.25; float32 ones give the float32 result rounded to bf16.
  x = (jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64)) + 100.0).astype(jnp.bfloat16)
  layer_norm = bert._layer_norm(CONFIG, 'layer_norm', jnp.bfloat16)
  variables = layer_norm.init(jax.random.PRNGKey(0), x)
  y = layer_norm.apply(variables, x)
  reference = bert._layer_norm(CONFIG, 'layer_norm').apply(variables, x.astype(jnp.float32))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), reference, rtol=2**-7, atol=1e-6)


def test_masked_tokens_are_ignored_in_bfloat16():
  module = BertClassifier(CONFIG, num_classes=NUM_CLASSES, dtype='bfloat16')
  batch = text_batch()
  inputs = step_lib.model_inputs(batch)
  variables = module.init(jax.random.PRNGKey(0), **inputs)
  changed = {**inputs, 'input_ids': np.where(batch['attention_mask'] > 0, batch['input_ids'], 7)}
  np.testing.assert_array_equal(module.apply(variables, **changed), module.apply(variables, **inputs))


def test_unknown_dtype_is_a_user_error():
  for name in ('cnn', 'resnet'):
    with pytest.raises(UserError, match=r"config.model.dtype is 'float16'; use one of \('float32', 'bfloat16'\)"):
      models.get_model(ml_collections.ConfigDict(dict(name=name, dtype='float16')), NUM_CLASSES)
  batch = text_batch()
  with pytest.raises(UserError, match="config.model.dtype is 'float16'"):
    BertClassifier(CONFIG, num_classes=NUM_CLASSES, dtype='float16').init(jax.random.PRNGKey(0),
                                                                          **step_lib.model_inputs(batch))


def loss_and_grads(module, variables, batch):
  params, model_state = split_variables(variables)
  apply_fn = linen_apply_fn(module)

  def objective(params):
    logits, new_model_state = apply_fn(params, model_state, step_lib.model_inputs(batch), True, jax.random.PRNGKey(2))
    return step_lib.cross_entropy_loss(logits, batch), (logits, new_model_state)

  return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)


@pytest.mark.parametrize('name', ['bert', 'resnet'])
def test_remat_keeps_paths_outputs_and_gradients(name):
  plain, make_batch = MODELS[name]
  remat, batch = plain.clone(remat=True), make_batch()
  inputs = step_lib.model_inputs(batch)
  variables = jax.jit(plain.init)(jax.random.PRNGKey(0), **inputs)
  remat_shapes = jax.eval_shape(remat.init, jax.random.PRNGKey(0), **inputs)
  assert list(tree_paths.flatten(remat_shapes)) == list(tree_paths.flatten(variables))
  # Dropout (BERT) and the BatchNorm statistics (ResNet) run too: train=True.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               loss_and_grads(remat, variables, batch), loss_and_grads(plain, variables, batch))
  # The train step really rematerialises: the recomputed forward pass sits behind optimization barriers.
  state, train_step = state_and_step(plain, batch)
  lower = lambda step: step.lower(state, batch).as_text()
  assert 'stablehlo.optimization_barrier' in lower(state_and_step(remat, batch)[1])
  assert 'stablehlo.optimization_barrier' not in lower(train_step)


def test_remat_is_a_bert_classifier_field():
  module = models.bert_classifier(NUM_CLASSES, architecture='minilm', dtype='bfloat16', remat=True)
  assert (module.dtype, module.remat) == ('bfloat16', True)


def test_mu_dtype_stores_the_first_moment_in_bf16_and_the_rest_in_float32():
  params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros((3,))}
  config = ml_collections.ConfigDict(dict(name='adamw', lr=1e-3, weight_decay=0.0, warmup_steps=0,
                                          schedule='constant', mu_dtype='bfloat16'))
  tx = optim.make_optimizer(config, 10)
  state = tx.init(params)
  flat = tree_paths.flatten(state)
  assert {leaf.dtype for path, leaf in flat.items() if '/mu/' in f'/{path}/'} == {jnp.dtype('bfloat16')}
  assert {leaf.dtype for path, leaf in flat.items() if '/nu/' in f'/{path}/'} == {jnp.dtype('float32')}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype('float32')}
  with pytest.raises(UserError, match='config.optim.mu_dtype'):
    optim.make_optimizer(ml_collections.ConfigDict({**config.to_dict(), 'mu_dtype': 'int8'}), 10)


def test_bfloat16_bert_step_on_cpu_sums_no_bias_gradient_as_a_reduce_window():
  """Every bias after a product, the attention output's too (an einsum, not a `Dense`), sums its bf16 gradient over
  the tokens in float32 (`dense.plus_bias`); a bf16 sum compiles on CPU to a reduce-window over the [batch, length,
  hidden] gradient (343 ms of the 32 x 128 bf16 step's op time before the Dense layers' change, benchmarks/README.md
  item 5)."""
  module, batch = MODELS['bert'][0].clone(dtype='bfloat16'), text_batch(16, 64)
  state, train_step = state_and_step(module, batch)
  program = train_step.lower(state, batch).compile().as_text()
  computations = re.findall(r'^%\S+ \(([^)]*)\) -> \S+ \{\n(.*?)^\}', program, re.M | re.S)
  over_tokens = [params for params, body in computations
                 if ' reduce-window(' in body and f'[16,64,{CONFIG.hidden_size}]' in params]
  assert not over_tokens, over_tokens
