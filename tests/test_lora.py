"""LoRA as a transformation of the parameters (jft/lora.py): the merge against hand-worked numbers and a NumPy
side-path reference, the freezing it implies, and a LoRA run of the command line that resumes exactly."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from contract import ROOT, sigterm_after_step
from test_reliability import params_sha

from jft import init as init_lib
from jft import lora, models, optim, rules, stages, tree_paths
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.errors import UserError
from jft.state import create_train_state

DIGITS = '--config=configs/digits_cnn.py:quick'
SETTINGS = lora.LoraSettings(rank=2, alpha=8.0, targets=(r'(conv_\d+|hidden)/kernel',), train=(r'head/.*',))


def test_merge_is_w_plus_scaled_a_times_b_worked_by_hand():
  params = {'dense': {'kernel': jnp.array([[1., 2., 3.], [4., 5., 6.]]), 'bias': jnp.zeros(3),
                      'lora_a': jnp.array([[1.], [2.]]), 'lora_b': jnp.array([[0.5, -1., 2.]])}}
  # alpha 4, rank 1: W + 4 * [[0.5, -1, 2], [1, -2, 4]]
  merged = lora.merge(params, scale=4.0)
  np.testing.assert_array_equal(merged['dense']['kernel'], [[3., -2., 11.], [8., -3., 22.]])
  assert set(merged['dense']) == {'kernel', 'bias'}
  # A pruned (zero) weight stays zero when the run prunes.
  params['dense']['kernel'] = params['dense']['kernel'].at[0, 1].set(0.)
  np.testing.assert_array_equal(lora.merge(params, 4.0, keep_zeros=True)['dense']['kernel'],
                                [[3., 0., 11.], [8., -3., 22.]])


def test_a_convolution_kernel_reads_as_fan_in_by_fan_out():
  kernel = jnp.arange(6.).reshape(1, 2, 1, 3)  # [h, w, in, out]: fan_in 2
  a, b = jnp.array([[1.], [-1.]]), jnp.array([[1., 2., 3.]])
  merged = lora.merge({'conv': {'kernel': kernel, 'lora_a': a, 'lora_b': b}}, scale=0.5)['conv']['kernel']
  expected = np.arange(6.).reshape(2, 3) + 0.5 * np.array([[1., 2., 3.], [-1., -2., -3.]])
  np.testing.assert_array_equal(merged, expected.reshape(1, 2, 1, 3))


def test_adapted_dense_layer_equals_the_numpy_side_path():
  """PEFT computes x @ W + b + s * (x @ A) @ B; the merged kernel must give the same outputs."""
  module = nn.Dense(5)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  params = module.init(jax.random.PRNGKey(0), x)['params']
  settings = lora.LoraSettings(rank=3, alpha=6.0, targets=('kernel',), train=())
  params = lora.add_adapters(params, settings, jax.random.PRNGKey(1))
  params['lora_b'] = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  apply_fn = lora.wrap_apply_fn(lambda p, s, inputs, train, rng: (module.apply({'params': p}, inputs['x']), s),
                                settings.scale)
  logits, _ = apply_fn(params, {}, {'x': x}, False, None)
  p = jax.tree.map(np.asarray, params)
  reference = x @ p['kernel'] + p['bias'] + settings.scale * (x @ p['lora_a']) @ p['lora_b']
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


def cnn():
  config = ml_collections.ConfigDict(dict(name='cnn', features=(8, 16), hidden=32, dropout=0.0, dtype='float32'))
  module = models.get_model(config, 10)
  image = jnp.zeros((1, 28, 28, 1))
  params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=image, train=False))
  return module, params, model_state


def test_adapters_start_at_zero_so_the_model_is_the_base_model_exactly():
  module, params, model_state = cnn()
  adapted = lora.add_adapters(params, SETTINGS, jax.random.PRNGKey(1))
  assert set(tree_paths.flatten(adapted)) - set(tree_paths.flatten(params)) == {
      f'{layer}/lora_{ab}' for layer in ('conv_0', 'conv_1', 'hidden') for ab in 'ab'}
  assert adapted['conv_1']['lora_a'].shape == (3 * 3 * 8, 2) and adapted['conv_1']['lora_b'].shape == (2, 16)
  bound = 1 / np.sqrt(3 * 3 * 8)
  assert np.all(np.abs(adapted['conv_1']['lora_a']) <= bound) and np.all(adapted['conv_1']['lora_b'] == 0)
  images = {'image': jax.random.uniform(jax.random.PRNGKey(2), (4, 28, 28, 1))}
  base = linen_apply_fn(module)
  with_lora = lora.wrap_apply_fn(base, SETTINGS.scale)
  rng = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(with_lora(adapted, model_state, images, False, rng)[0],
                                base(params, model_state, images, False, rng)[0])


def test_only_adapters_and_the_head_train_and_the_base_has_no_optimizer_state():
  module, params, model_state = cnn()
  params = lora.add_adapters(params, SETTINGS, jax.random.PRNGKey(1))
  config = ml_collections.ConfigDict(dict(
      total_steps=3, freeze=(), lr_mults=(), stages=(),
      optim=dict(name='adamw', lr=1e-2, weight_decay=0.0, b1=0.9, b2=0.999, warmup_steps=0, schedule='constant',
                 clip_norm=None, accumulate_steps=1),
      lora=dict(rank=2, alpha=8.0, targets=SETTINGS.targets, train=SETTINGS.train)))
  (stage,) = stages.plan(config, params)
  trainable = tree_paths.flatten(stage.labels.trainable)
  assert {path for path, t in trainable.items() if t} == {
      *(f'{layer}/lora_{ab}' for layer in ('conv_0', 'conv_1', 'hidden') for ab in 'ab'), 'head/kernel', 'head/bias'}
  tx = optim.make_optimizer(stage.optim, stage.steps, stage.labels)
  state = create_train_state(params, model_state, tx, jax.random.PRNGKey(3))
  # Adam's moments exist for the trainable parameters only.
  moments = sum(leaf.size for path, leaf in tree_paths.flatten(state.opt_state).items() if '/mu/' in f'/{path}/')
  assert moments == sum(params_size for path, params_size in
                        ((p, leaf.size) for p, leaf in tree_paths.flatten(params).items()) if trainable[path])
  train_step = jax.jit(step_lib.make_train_step(lora.wrap_apply_fn(linen_apply_fn(module), SETTINGS.scale), tx,
                                                stage.labels.trainable))
  rng = np.random.default_rng(0)
  before = tree_paths.flatten(jax.tree.map(np.asarray, params))
  for _ in range(3):
    batch = {'image': jnp.asarray(rng.uniform(size=(8, 28, 28, 1)), jnp.float32),
             'label': jnp.asarray(rng.integers(0, 10, 8))}
    state, _ = train_step(state, batch)
  after = tree_paths.flatten(jax.tree.map(np.asarray, state.params))
  for path in before:
    if trainable[path]:
      assert not np.array_equal(before[path], after[path]), f'{path} did not train'
    else:
      np.testing.assert_array_equal(before[path], after[path], err_msg=f'{path} moved')


def test_the_freeze_rule_keeps_adapters_and_train_patterns_trainable():
  rule = lora.freeze_rule(SETTINGS)
  frozen = lambda path: rules.re.fullmatch(rule, path) is not None
  assert frozen('hidden/kernel') and frozen('conv_0/bias') and frozen('head_extra/kernel')
  assert not frozen('hidden/lora_a') and not frozen('conv_0/lora_b') and not frozen('head/kernel')


def test_targets_that_match_nothing_or_a_vector_are_refused():
  _, params, _ = cnn()
  with pytest.raises(UserError, match="config.lora.targets pattern 'attention/.*' matches no parameter"):
    lora.add_adapters(params, lora.LoraSettings(2, 4.0, ('attention/.*',), ()), jax.random.PRNGKey(0))
  with pytest.raises(UserError, match='of fewer than 2 dimensions'):
    lora.add_adapters(params, lora.LoraSettings(2, 4.0, ('hidden/.*',), ()), jax.random.PRNGKey(0))


def test_a_pruned_lora_run_resumes_exactly_merges_keeping_its_zeros_and_is_read_merged(tmp_path, data_dir):
  from jft import export
  args = [sys.executable, '-m', 'jft.main', DIGITS, '--config.lora.rank=4', '--config.checkpoint_every=1000',
          '--config.prune.sparsity=0.5', '--config.prune.schedule=oneshot', f'--config.data.data_dir={data_dir}']
  whole, interrupted = tmp_path / 'whole', tmp_path / 'interrupted'
  assert subprocess.run([*args, f'--workdir={whole}'], cwd=ROOT, capture_output=True).returncode == 0
  process = subprocess.Popen([*args, f'--workdir={interrupted}'], cwd=ROOT, stderr=subprocess.PIPE, text=True)
  sigterm_after_step(process, interrupted, 10)
  assert process.returncode == 75
  assert subprocess.run([*args, f'--workdir={interrupted}'], cwd=ROOT, capture_output=True).returncode == 0
  assert params_sha(interrupted, 30) == params_sha(whole, 30)
  # The merge (what jft.export writes) keeps exactly the pruned zeros of the base weights.
  merged, masks = export.read_params_and_masks(str(whole))
  run = init_lib.read_run(str(whole), items=('params',))
  raw = tree_paths.flatten(run.params)
  assert set(masks) == {'conv_0/kernel', 'conv_1/kernel', 'hidden/kernel'}
  for path, mask in masks.items():
    mask = np.asarray(mask, bool)
    assert np.sum(~mask) == mask.size // 2, path  # exactly half pruned (scope 'layer')
    assert np.all(merged[path][~mask] == 0) and np.all(raw[path][~mask] == 0), path
    assert np.all(merged[path][mask] != 0), path
    assert not np.array_equal(merged[path][mask], raw[path][mask]), f'{path}: the adapters did not train'
  # As `init` (or a teacher) of another run, the adapters come merged: the plain CNN's parameters.
  loaded, source = init_lib.load_params(str(whole))
  assert not lora.has_adapters(loaded) and 'jft checkpoint' in source
  for path, value in tree_paths.flatten(lora.merge(run.params, scale=8.0 / 4, keep_zeros=True)).items():
    np.testing.assert_array_equal(tree_paths.flatten(loaded)[path], value)
    np.testing.assert_array_equal(merged[path], value)


def test_inspect_lists_the_adapters_and_the_trainable_fraction(data_dir):
  import importlib.util

  from jft import inspect
  spec = importlib.util.spec_from_file_location('digits_cnn', f'{ROOT}/configs/digits_cnn.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('quick')
  config.lora.rank, config.data.data_dir = 4, data_dir
  report = inspect.describe(config, device_count=1)
  rows = {line.split()[0]: [cell.split() for cell in line.split(' | ')] for line in report.splitlines()
          if '/' in line.split(' ')[0]}
  assert rows['hidden/lora_a'][0][1:] == ['(3136,', '4)', '12,544'] and rows['hidden/lora_a'][1][0] == 'train'
  assert rows['hidden/lora_b'][0][1:] == ['(4,', '256)', '1,024'] and rows['conv_1/lora_a'][0][1:3] == ['(288,', '4)']
  assert rows['hidden/kernel'][1][0] == 'frozen' and rows['head/kernel'][1][0] == 'train'
  # adapters: 9*4 + 4*32 + 288*4 + 4*64 + 3136*4 + 4*256 = 15,140; the head 256*10 + 10
  assert 'trainable 17,710 (2.1%), frozen 821,888' in report
