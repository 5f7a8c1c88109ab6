"""Knowledge distillation: the loss against NumPy, its gradient against the closed form, the step, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from contract import ROOT, TOOLS, run_main

from jft import components, distill, models, sharding
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.checkpoint import Checkpoints
from jft.errors import UserError
from jft.state import create_train_state


def numpy_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize('weight,temperature', [(0.0, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 0.5)])
def test_loss_matches_a_numpy_reference(weight, temperature):
  rng = np.random.default_rng(0)
  logits, teacher = rng.normal(size=(2, 6, 5)) * 3
  labels = rng.integers(0, 5, 6)
  hard = -numpy_log_softmax(logits)[np.arange(6), labels]
  p_teacher = np.exp(numpy_log_softmax(teacher / temperature))
  kl = (p_teacher * (np.log(p_teacher) - numpy_log_softmax(logits / temperature))).sum(-1)
  expected = (1 - weight) * hard + weight * temperature**2 * kl
  got = distill.distillation_loss(jnp.asarray(logits), jnp.asarray(teacher), jnp.asarray(labels), weight,
                                  temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_soft_term_gradient_is_temperature_times_the_probability_gap():
  # d/ds T^2 KL(softmax(t/T) || softmax(s/T)) = T * (softmax(s/T) - softmax(t/T)): Hinton et al.'s eq. 2.
  logits, teacher, temperature = jnp.array([[1.0, -2.0, 0.5]]), jnp.array([[3.0, 0.0, -1.0]]), 3.0
  grad = jax.grad(lambda s: distill.distillation_loss(s, teacher, jnp.array([0]), 1.0, temperature).sum())(logits)
  expected = temperature * (jax.nn.softmax(logits / temperature) - jax.nn.softmax(teacher / temperature))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # The teacher's own logits are a minimum: nothing left to learn.
  assert float(distill.distillation_loss(teacher, teacher, jnp.array([2]), 1.0, temperature)[0]) == pytest.approx(0)


def test_unlabelled_examples_count_only_in_the_soft_term():
  rng = np.random.default_rng(1)
  logits, teacher = rng.normal(size=(2, 6, 4)).astype(np.float32)
  labels = np.array([1, -1, 3, -1, 0, 2], np.int32)
  batch = {'label': jnp.asarray(labels), distill.TEACHER_LOGITS: jnp.asarray(teacher)}
  labelled = labels >= 0
  per_hard = np.asarray(distill.distillation_loss(logits[labelled], teacher[labelled], labels[labelled], 0.0, 2.0))
  per_soft = np.asarray(distill.distillation_loss(logits, teacher, np.maximum(labels, 0), 1.0, 2.0))
  expected = 0.3 * per_hard.mean() + 0.7 * per_soft.mean()
  assert float(distill.make_loss(0.7, 2.0)(jnp.asarray(logits), batch)) == pytest.approx(expected, rel=1e-5)
  assert np.isfinite(float(distill.make_loss(1.0, 2.0)(jnp.asarray(logits), batch)))


@pytest.mark.parametrize('weight,temperature,field', [(1.5, 2.0, 'weight'), (0.5, 0.0, 'temperature')])
def test_settings_out_of_range_are_user_errors(weight, temperature, field):
  with pytest.raises(UserError, match=f'config.distill.{field}'):
    distill.make_loss(weight, temperature)


def test_the_step_learns_the_teachers_predictions_not_the_labels():
  # Labels all say class 0, the teacher says class 2: with weight 1 only the teacher is learned.
  module = models.SmallCNN(num_classes=3, features=(4,), hidden=8)
  images = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
  batch = {'image': images, 'label': np.zeros(16, np.int32),
           distill.TEACHER_LOGITS: np.tile(np.float32([[0.0, 0.0, 4.0]]), (16, 1))}
  params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=images[:1]))
  tx = optax.adam(1e-2)
  state = create_train_state(params, model_state, tx, jax.random.PRNGKey(1))
  mesh = sharding.make_mesh(jax.devices()[:1])
  apply_fn = linen_apply_fn(module)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(apply_fn, tx, loss_fn=distill.make_loss(1.0, 1.0)),
                                       mesh)
  for _ in range(60):
    state, _ = train_step(state, sharding.put_batch(batch, mesh))
  logits = step_lib.make_logits_fn(apply_fn)(state.params, state.model_state, batch)
  assert np.all(np.argmax(logits, -1) == 2)
  np.testing.assert_allclose(jax.nn.softmax(logits)[:, 2], jax.nn.softmax(jnp.array([0.0, 0.0, 4.0]))[2], atol=0.05)


def test_a_teacher_with_batchnorm_keeps_its_statistics(tmp_path):
  # A ResNet teacher needs its running statistics as well as its parameters.
  module = models.ResNet(num_classes=3, stage_features=(4,), blocks_per_stage=1)
  images = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=images, train=False))
  model_state = jax.tree.map(lambda x: x + 0.5, model_state)  # not the initial values
  state = create_train_state(params, model_state, optax.sgd(0.1), jax.random.PRNGKey(1))
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'))
  checkpoints.save(state, {}, {'model': {'name': 'resnet', 'stage_features': [4], 'blocks_per_stage': 1}})
  checkpoints.close()
  student = components.Model(module=module, num_classes=3, init_variables=None, example_inputs={'image': images[:1]},
                             apply_fn=None)
  teacher = components.build_teacher(str(tmp_path), student)
  jax.tree.map(np.testing.assert_array_equal, teacher.model_state, jax.device_get(model_state))
  logits = step_lib.make_logits_fn(teacher.apply_fn)(teacher.params, teacher.model_state, {'image': images})
  np.testing.assert_allclose(logits, module.apply({'params': params, **model_state}, image=images, train=False),
                             rtol=1e-5, atol=1e-6)



@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_teacher_that_predicts_other_classes_is_a_user_error(teacher_run):
  student = components.Model(module=None, num_classes=5, init_variables=None,
                             example_inputs={'image': np.zeros((1, 28, 28, 1), np.float32)}, apply_fn=None)
  with pytest.raises(UserError, match=r'head/kernel: expected \(256, 5\), found \(256, 10\)'):
    components.build_teacher(teacher_run, student)


def test_distilled_and_pruned_run_resumes_bit_identical(teacher_run, tmp_path, data_dir):
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, 'kill_resume.py'), sys.executable, 'configs/fashion_cnn.py:quick',
       str(tmp_path), f'--config.data.data_dir={data_dir}', f'--config.distill.teacher={teacher_run}',
       '--config.distill.weight=0.8', '--config.prune.sparsity=0.5'],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  verdict = json.loads(out.stdout.strip().splitlines()[-1])
  assert verdict['identical'], (verdict, out.stderr[-2000:])


def test_a_student_that_starts_as_its_teacher_has_nothing_to_learn(teacher_run, tmp_path, data_dir):
  # Initialised from the teacher itself (no dropout, no BatchNorm: train and eval logits agree), the
  # distillation loss of the first step is 0, where cross-entropy would not be: the teacher's logits of
  # this very batch reach the step.
  workdir = str(tmp_path / 'student')
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}', '--config.total_steps=2',
                    '--config.log_every=1', f'--config.init={teacher_run}', '--config.init_skip=()',
                    f'--config.distill.teacher={teacher_run}', '--config.distill.weight=1.0', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    train = [json.loads(line) for line in f if json.loads(line)['split'] == 'train']
  assert train[0]['step'] == 1 and train[0]['loss'] < 1e-5
  assert train[0]['accuracy'] < 1.0  # the cross-entropy of the same logits would be far from 0


@pytest.mark.parametrize('teacher', ['missing', 'w/checkpoints'])
def test_a_missing_or_own_teacher_exits_2_before_writing_anything(tmp_path, data_dir, teacher):
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={tmp_path / "w"}',
                    f'--config.distill.teacher={tmp_path / teacher}', data_dir=data_dir)
  assert result.returncode == 2
  assert 'config.distill.teacher' in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_unlabelled_texts_without_a_teacher_exit_2(tmp_path, data_dir):
  result = run_main('--config=configs/minilm_fortunes.py:quick', f'--workdir={tmp_path / "w"}',
                    '--config.data.unlabeled.name=fortunes', "--config.data.unlabeled.classes=('zippy',)",
                    data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'data.unlabeled' in result.stderr and 'config.distill.teacher' in result.stderr
  assert 'Traceback' not in result.stderr
