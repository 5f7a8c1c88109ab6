"""Pruning end to end: the command line prunes on schedule, keeps zeros, checkpoints the masks, resumes exactly,
and exports a compressed model that loads back bit-identical."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from contract import TOOLS

from jft import export, optim, pruning, rules, tree_paths
from jft.checkpoint import Checkpoints
from jft.state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRUNE = ['--config.prune.sparsity=0.8', '--config.prune.end_step=30', '--config.prune.every=5']


@pytest.fixture(scope='module')
def pruned_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('pruned'))
  command = [sys.executable, '-m', 'jft.main', '--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}',
             f'--config.data.data_dir={data_dir}', *PRUNE]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def checkpoint_facts(workdir, dump=None):
  command = [sys.executable, os.path.join(TOOLS, 'check_workdir.py'), workdir] + (['--dump', dump] if dump else [])
  out = subprocess.run(command, capture_output=True, text=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_gradual_pruning_reaches_exact_counts_and_zeros_survive_training(pruned_run):
  facts = checkpoint_facts(pruned_run)  # step 40: ten more training steps after the last mask update at 30
  assert facts['latest'] == 40
  for path, (_shape, zeros, size) in facts['paths'].items():
    if path.endswith('kernel') and not path.startswith('head/'):
      assert zeros == int(0.8 * size), (path, zeros, size)  # layer scope: exactly floor(s * n) per tensor
    if path.startswith('head/'):
      assert zeros == 0  # excluded by default
  with open(os.path.join(pruned_run, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  train = {line['step']: line for line in lines if line['split'] == 'train'}
  # the cubic schedule, 0.8 * (1 - (1 - (t - 1) / 29) ** 3) at the last update before each log step
  assert train[10]['sparsity/prunable'] == pytest.approx(0.8 * (1 - (1 - 5 / 29) ** 3), abs=1e-4)
  assert train[40]['sparsity/prunable'] == pytest.approx(0.8, abs=1e-4)
  assert 'sparsity/hidden/kernel' in train[40]
  (test,) = [line for line in lines if line['split'] == 'test']
  assert test['sparsity/prunable'] == pytest.approx(0.8, abs=1e-4)


def test_export_is_compressed_and_loads_bit_identical(pruned_run, tmp_path):
  out = str(tmp_path / 'pruned.safetensors')
  result = subprocess.run([sys.executable, '-m', 'jft.export', f'--workdir={pruned_run}', f'--out={out}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  sizes = {row['module']: row for row in json.loads(result.stdout.strip().splitlines()[-1])['sizes']}
  hidden = sizes['hidden']
  # 20% of the values (float32) + one bit per weight: 0.2 + 1/32 of the dense bytes
  assert hidden['compressed_bytes'] / hidden['dense_bytes'] == pytest.approx(0.2 + 1 / 32, abs=2e-3)
  assert sizes['head']['compressed_bytes'] == sizes['head']['dense_bytes']
  checkpoint_facts(pruned_run, dump=str(tmp_path / 'dense.npz'))
  with np.load(tmp_path / 'dense.npz') as saved:
    expected = {k.replace('|', '/'): saved[k] for k in saved.files}
  loaded = tree_paths.flatten(export.load(out))
  assert set(loaded) == set(expected)
  for path, value in expected.items():
    assert loaded[path].dtype == value.dtype and loaded[path].tobytes() == value.tobytes(), path


# GMP* with a gradient criterion: a large first step (50% at step 5), cubic to 80% by step 30, the learning rate
# rewound at each mask update, movement scores summed in the optimizer state between updates.
GMP_MOVEMENT = ['--config.prune.sparsity=0.8', '--config.prune.start_step=5', '--config.prune.end_step=30',
                '--config.prune.every=5', '--config.prune.initial_sparsity=0.5', '--config.prune.rewind_lr=True',
                '--config.prune.criterion=movement']


@pytest.mark.parametrize('prune', [PRUNE, GMP_MOVEMENT], ids=['magnitude', 'gmp-movement'])
def test_pruned_run_killed_and_resumed_ends_bit_identical(tmp_path, data_dir, prune):
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, 'kill_resume.py'), sys.executable, 'configs/fashion_cnn.py:quick',
       str(tmp_path), f'--config.data.data_dir={data_dir}', *prune],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  verdict = json.loads(out.stdout.strip().splitlines()[-1])
  assert verdict['identical'], verdict
  assert 0 < verdict['killed_after_step'] < 40
  for path, (_shape, zeros, size) in checkpoint_facts(str(tmp_path / 'uninterrupted'))['paths'].items():
    if path.endswith('kernel') and not path.startswith('head/'):
      assert zeros == int(0.8 * size), (path, zeros, size)


def test_masks_survive_a_checkpoint_round_trip(tmp_path):
  params = {'dense': {'kernel': jnp.arange(12.0).reshape(3, 4) - 5, 'bias': jnp.ones(4)}}
  optim_config = ml_collections.ConfigDict(dict(name='adamw', lr=1e-2, weight_decay=0.1, warmup_steps=0,
                                                schedule='constant', clip_norm=None, accumulate_steps=1))
  prunable = pruning.prunable(params)
  tx = optim.make_optimizer(optim_config, 10, rules.resolve(params), prunable)
  state = create_train_state(params, {}, tx, jax.random.PRNGKey(0))
  masks = pruning.compute_masks(state.params, prunable, 0.5, 'layer', 'unstructured')
  state = state.replace(params=pruning.apply_masks(state.params, masks),
                        opt_state=pruning.with_new_masks(state.opt_state, masks))
  checkpoints = Checkpoints(str(tmp_path))
  checkpoints.save(state, {}, {})
  checkpoints.wait()
  restored, _ = Checkpoints(str(tmp_path)).restore(0, jax.eval_shape(lambda: state))
  restored_masks = pruning.masks_of(restored.opt_state)
  assert restored_masks['dense']['kernel'].dtype == bool and restored_masks['dense']['bias'] is None
  np.testing.assert_array_equal(restored_masks['dense']['kernel'], masks['dense']['kernel'])
  assert int(np.sum(~np.asarray(restored_masks['dense']['kernel']))) == 6  # |w| = 0, 1, 1, 2, 2, 3 pruned


def test_export_reads_params_and_the_pruned_masks_and_names_a_missing_step(tmp_path):
  params = {'dense': {'kernel': jnp.arange(12.0).reshape(3, 4) - 5, 'bias': jnp.ones(4)}}
  prunable = pruning.prunable(params)
  tx = pruning.masked_by(optim.make_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', lr=0.1, weight_decay=0.0, warmup_steps=0, schedule='constant')), 10), prunable)
  state = create_train_state(params, {}, tx, jax.random.PRNGKey(0))
  masks = pruning.compute_masks(state.params, prunable, 0.5)
  checkpoints = Checkpoints(str(tmp_path / 'run' / 'checkpoints'))
  checkpoints.save(state.replace(step=jnp.asarray(4, jnp.int32), opt_state=pruning.with_new_masks(state.opt_state,
                                                                                                  masks)), {}, {})
  checkpoints.close()
  flat_params, flat_masks = export.read_params_and_masks(str(tmp_path / 'run'))
  assert set(flat_params) == {'dense/kernel', 'dense/bias'} and set(flat_masks) == {'dense/kernel'}
  np.testing.assert_array_equal(flat_masks['dense/kernel'], masks['dense']['kernel'])
  for workdir, step, message in ((tmp_path / 'run', 3, 'no checkpoint at step 3 (steps: 4)'),
                                 (tmp_path / 'none', None, 'has no checkpoint; give the work directory')):
    result = subprocess.run([sys.executable, '-m', 'jft.export', f'--workdir={workdir}', f'--out={tmp_path}/x',
                             *([f'--step={step}'] if step else [])], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and message in result.stderr and 'Traceback' not in result.stderr, result.stderr
