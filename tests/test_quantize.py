"""int8 quantization (jft/int8.py, python -m jft.quantize): the arithmetic against NumPy and by hand, the
straight-through gradient, zeros kept, the pruned + int8 export bit-exact, and a quantization-aware run end to
end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import run_main

from jft import components, export, int8, pruning, tree_paths
from jft import init as init_lib
from jft.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
  """The reference: per-channel symmetric int8 written out in NumPy, loop over channels."""
  w = np.moveaxis(w.astype(np.float32), axis, 0)
  q, s = np.zeros(w.shape, np.int8), np.zeros(w.shape[0], np.float32)
  for c in range(w.shape[0]):
    amax = np.abs(w[c]).max()
    s[c] = amax * np.float32(1 / 127) if amax > 0 else 1.0
    q[c] = np.clip(np.round(w[c] * (np.float32(1) / s[c])), -127, 127)
  return np.moveaxis(q, 0, axis), s


def test_int8_by_hand():
  w = jnp.array([[0.5, -2.54], [-0.25, 1.0], [0.0, 0.01]])
  q = int8.quantize(w, axis=1)
  # column 0: scale 0.5 / 127, so 0.5 -> 127, -0.25 -> -63.5 -> -64 (half to even), 0 -> 0
  # column 1: scale 2.54 / 127 = 0.02: -2.54 -> -127, 1.0 -> 50, 0.01 -> 0.5 -> 0 (half to even)
  np.testing.assert_array_equal(q.values, [[127, -127], [-64, 50], [0, 0]])
  np.testing.assert_allclose(q.scales, [[0.5 / 127, 0.02]], rtol=1e-7)
  assert q.values.dtype == jnp.int8 and q.scales.dtype == jnp.float32


@pytest.mark.parametrize('shape,axis', [((7, 5), 1), ((3, 3, 4, 6), 3), ((11, 4), 0)])
def test_int8_matches_numpy_and_dequantizes_exactly(shape, axis):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w[..., 0] = 0.0 if axis != 0 else w[..., 0]  # a column of zeros in some channels
  w.reshape(-1)[:3] = 0.0
  q = int8.quantize(jnp.asarray(w), axis)
  want_q, want_s = numpy_int8(w, axis)
  np.testing.assert_array_equal(q.values, want_q)
  np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), want_s)
  deq = int8.dequantize(q)
  np.testing.assert_array_equal(deq, want_q.astype(np.float32) * np.expand_dims(
      want_s, tuple(a for a in range(len(shape)) if a != axis)))
  assert np.all(np.asarray(deq)[w == 0] == 0)  # zeros stay zeros: pruning composes
  assert np.max(np.abs(np.asarray(deq) - w)) <= np.max(np.abs(w)) / 254 * 1.0001  # half a step at most


def test_weights_half_a_step_from_a_rounding_boundary_quantize_alike_in_xla_and_numpy():
  """XLA turns a division by the broadcast scales into a product with their reciprocals and NumPy does not, so
  `round(w / s)` gave one weight in about a million another int8 value in a jitted step than in the exported file;
  `round(w * (1 / s))` is the same in both. Weights at (k + 1/2) s and a few float32 steps either side."""
  columns = []
  for amax in (1.0, 0.0343, 0.7071, 3.3):
    step = np.float32(amax) * np.float32(1 / 127)
    middles = ((np.arange(-126, 127, dtype=np.float32) + np.float32(0.5)) * step).astype(np.float32)
    column, up, down = [middles], middles, middles
    for _ in range(3):
      up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
      column += [up, down]
    columns.append(np.concatenate([*column, [np.float32(amax)]]))  # the channel's max sets its scale
  w = np.stack(columns, axis=1)
  jitted = np.asarray(jax.jit(lambda w: int8.quantize(w, 1).values)(w))
  np.testing.assert_array_equal(jitted, int8.quantize(w, 1, xp=np).values)
  np.testing.assert_array_equal(jitted, numpy_int8(w, 1)[0])


def test_a_channel_of_zeros_gets_scale_one():
  q = int8.quantize(jnp.zeros((3, 2)).at[0, 1].set(1.0), axis=1)
  np.testing.assert_array_equal(q.scales, np.array([[1.0, 1 / 127]], np.float32))
  np.testing.assert_array_equal(q.values[:, 0], [0, 0, 0])


def test_channels_are_output_columns_for_kernels_and_rows_for_embeddings():
  assert int8.channel_axis('encoder/layer_0/mlp/intermediate/kernel', (384, 1536)) == 1
  assert int8.channel_axis('conv_0/kernel', (3, 3, 1, 32)) == 3
  assert int8.channel_axis('embeddings/word_embeddings/embedding', (30522, 384)) == 0


def test_fake_quantization_is_exact_forward_and_straight_through_backward():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)
  forward = int8.fake_quantize(w, axis=1)
  np.testing.assert_array_equal(forward, int8.dequantize(int8.quantize(w, 1)))  # bit for bit
  upstream = jnp.arange(24.0).reshape(6, 4)
  grad = jax.grad(lambda w: jnp.sum(int8.fake_quantize(w, 1) * upstream))(w)
  np.testing.assert_array_equal(grad, upstream)  # the rounding passes the gradient unchanged


def test_only_targets_are_quantized_and_patterns_that_match_nothing_are_refused():
  params = {'dense': {'kernel': jnp.full((2, 2), 0.3), 'bias': jnp.full((2,), 0.3)}}
  out = int8.fake_quantize_params(params, (r'.*kernel',))
  assert out['dense']['bias'] is params['dense']['bias']
  np.testing.assert_array_equal(out['dense']['kernel'], np.float32(127) * np.float32(0.3 / 127))
  with pytest.raises(UserError, match=r"config.quantize.targets pattern 'nope/.\*' matches no parameter"):
    int8.target_paths(['dense/kernel', 'dense/bias'], ('nope/.*',))
  assert int8.target_paths(['dense/kernel', 'dense/bias'], int8.DEFAULT_TARGETS) == ['dense/kernel']  # may miss


def test_pruned_int8_export_loads_bit_exact_and_is_small(tmp_path):
  rng = np.random.default_rng(2)
  params = {'dense/kernel': rng.normal(size=(64, 32)).astype(np.float32),
            'embed/embedding': rng.normal(size=(50, 32)).astype(np.float32),
            'dense/bias': rng.normal(size=(32,)).astype(np.float32)}
  masks = {'dense/kernel': np.asarray(pruning._keep(jnp.abs(jnp.asarray(params['dense/kernel'])).ravel(),
                                                    jnp.int32(1638))).reshape(64, 32)}  # 80% pruned
  params['dense/kernel'] = params['dense/kernel'] * masks['dense/kernel']
  quantized = int8.quantize_flat(params, int8.DEFAULT_TARGETS)
  assert sorted(quantized) == ['dense/kernel', 'embed/embedding']
  path = str(tmp_path / 'model.safetensors')
  sizes = export.save(path, params, masks, quantized)
  loaded = tree_paths.flatten(export.load(path))
  for name in quantized:
    want = int8.dequantize(int8.quantize(jnp.asarray(params[name]), int8.channel_axis(name, params[name].shape)))
    np.testing.assert_array_equal(loaded[name], want)
    assert loaded[name].dtype == np.float32
  np.testing.assert_array_equal(loaded['dense/bias'], params['dense/bias'])
  assert np.count_nonzero(loaded['dense/kernel']) <= 2048 - 1638  # the zeros survive
  # kernel: 410 int8 + 256 bitmask bytes + 32 scales; embedding 1600 + 50 scales; bias dense
  assert sizes['compressed_bytes'] == 410 + 256 + 32 * 4 + 1600 + 50 * 4 + 32 * 4


@pytest.fixture(scope='module')
def qat_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('qat'))
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}', '--config.quantize.mode=qat',
                    '--config.prune.sparsity=0.5', '--config.prune.end_step=20', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_a_qat_run_tests_the_int8_model_that_quantize_and_export_reproduce(qat_run, tmp_path):
  with open(os.path.join(qat_run, 'metrics.jsonl')) as f:
    (test,) = [json.loads(line) for line in f if '"split": "test"' in line]
  out = subprocess.run([sys.executable, '-m', 'jft.quantize', f'--workdir={qat_run}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  evaluated = json.loads(out.stdout.strip().splitlines()[-1])
  assert evaluated['step'] == test['tested_step']
  with open(os.path.join(qat_run, 'test_predictions.json')) as f:  # each test example's prediction
    predictions = json.load(f)
  assert predictions['step'] == test['tested_step'] and predictions['index'] == list(range(test['count']))
  assert np.mean(np.equal(predictions['prediction'], predictions['label'])) == test['accuracy']
  # the run's own test evaluation computed with the int8 weights: the PTQ tool's int8 model is that model
  assert evaluated['int8']['accuracy'] == test['accuracy']
  assert evaluated['int8']['loss'] == pytest.approx(test['loss'], rel=1e-6)
  with open(os.path.join(qat_run, 'quantized.json')) as f:  # per example, for paired tests against other runs
    saved = json.load(f)['predictions']
  assert saved['index'] == predictions['index'] and saved['int8'] == predictions['prediction']
  exported = str(tmp_path / 'qat.safetensors')  # int8 by default for a QAT run
  out = subprocess.run([sys.executable, '-m', 'jft.export', f'--workdir={qat_run}', f'--out={exported}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  run = init_lib.read_run(qat_run, items=('params', 'masks'), step=test['tested_step'])
  loaded = export.load(exported)
  for name in ('hidden', 'conv_1'):
    want = int8.fake_quantize_params(run.params, int8.DEFAULT_TARGETS)[name]['kernel']
    np.testing.assert_array_equal(loaded[name]['kernel'], want)
    assert np.mean(loaded[name]['kernel'] == 0) >= 0.5  # pruned to 50%; int8 keeps the zeros
  refused = subprocess.run([sys.executable, '-m', 'jft.export', f'--workdir={qat_run}', f'--out={tmp_path}/hf',
                            '--format=hf', '--int8'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and 'int8 weights are stored by --format=jft-pruned' in refused.stderr


def test_a_qat_run_as_a_distillation_teacher_computes_with_its_int8_weights(qat_run):
  student = components.Model(module=None, num_classes=10, init_variables=None,
                             example_inputs={'image': np.zeros((1, 28, 28, 1), np.float32)}, apply_fn=None)
  teacher = components.build_teacher(qat_run, student)
  masters = init_lib.read_run(qat_run, items=('params',)).params
  quantized = int8.fake_quantize_params(masters, int8.DEFAULT_TARGETS)
  for name in ('conv_0', 'hidden', 'head'):
    np.testing.assert_array_equal(teacher.params[name]['kernel'], quantized[name]['kernel'])
    assert not np.array_equal(teacher.params[name]['kernel'], masters[name]['kernel'])  # not the float masters
  np.testing.assert_array_equal(teacher.params['hidden']['bias'], masters['hidden']['bias'])  # not a target
