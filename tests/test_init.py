"""Initial parameters from a source: merged by path, `init_skip` kept fresh, every misfit named."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jft import init as init_lib
from jft import pretrained, pruning, sharding, train
from jft.checkpoint import Checkpoints
from jft.errors import UserError
from jft.state import create_train_state


def fresh():
  return {'body': {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros(3)}, 'head': {'kernel': jnp.zeros((3, 4))}}


def test_takes_every_parameter_but_the_skipped_ones():
  loaded = {'body': {'kernel': np.full((2, 3), 7.0, np.float64), 'bias': np.ones(3)},
            'head': {'kernel': np.ones((3, 9))}, 'extra': {'w': np.ones(1)}}
  merged = init_lib.merge_params(fresh(), loaded, skip=('head/.*',))
  np.testing.assert_array_equal(merged['body']['kernel'], np.full((2, 3), 7.0))
  assert merged['body']['kernel'].dtype == np.float32  # the model's dtype, not the source's
  np.testing.assert_array_equal(merged['body']['bias'], np.ones(3))
  np.testing.assert_array_equal(merged['head']['kernel'], np.zeros((3, 4)))  # fresh: skipped
  assert 'extra' not in merged


def test_a_fresh_state_from_a_source_draws_only_the_skipped_parameters_as_the_whole_initialisation_would(tmp_path):
  def init_variables(rng):  # a body the source gives, a head it does not
    return {'body': {'kernel': jax.random.normal(jax.random.fold_in(rng, 0), (4, 3))},
            'head': {'kernel': jax.random.normal(jax.random.fold_in(rng, 1), (3, 2)),
                     'bias': jax.random.uniform(jax.random.fold_in(rng, 2), (2,))}}, {}

  source = {'body': {'kernel': jnp.arange(12.0).reshape(4, 3)},
            'head': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'))
  checkpoints.save(create_train_state(source, {}, optax.sgd(1.0), jax.random.PRNGKey(0)), {}, {})
  checkpoints.close()
  config = ml_collections.ConfigDict({'init': str(tmp_path), 'init_skip': ('head/.*',)})
  rng, tx = jax.random.PRNGKey(7), optax.adam(1e-3)
  make_state = lambda params, model_state, tx: create_train_state(params, model_state, tx, rng)
  abstract = jax.eval_shape(lambda rng: make_state(*init_variables(rng), tx), rng)
  replicated = jax.tree.map(lambda _: sharding.replicated(sharding.make_mesh()), abstract)
  model = type('Model', (), {'init_variables': staticmethod(init_variables)})
  state = train.init_state(config, model, rng, make_state, tx, replicated, abstract.params)
  whole = jax.jit(init_variables)(rng)[0]
  jax.tree.map(np.testing.assert_array_equal, state.params['head'], whole['head'])  # the same draws, bit for bit
  np.testing.assert_array_equal(state.params['body']['kernel'], source['body']['kernel'])
  assert jax.tree.leaves(state.params)[0].sharding == jax.tree.leaves(replicated.params)[0]


def test_misfits_are_listed_one_by_one():
  loaded = {'body': {'kernel': np.ones((2, 5))}, 'head': {'kernel': np.ones((3, 4))}}
  with pytest.raises(UserError) as error:
    init_lib.merge_params(fresh(), loaded, skip=(), source='run X')
  message = str(error.value)
  assert 'run X does not fit the model' in message
  assert 'missing   body/bias (3,)' in message
  assert 'shape     body/kernel: model (2, 3), run X (2, 5)' in message
  assert 'head' not in message.split('\n', 1)[1].split('add regexes')[0]  # the head fits: not listed


def test_skip_pattern_matching_nothing_is_an_error():
  with pytest.raises(UserError, match="'classifier/.\\*' matches no parameter"):
    init_lib.merge_params(fresh(), fresh(), skip=('classifier/.*',))


@pytest.mark.parametrize('where', ['workdir', 'root', 'step', 'relative'])
def test_loads_params_of_an_earlier_jft_run(tmp_path, where, monkeypatch):
  params = {'body': {'kernel': jnp.arange(6.0).reshape(2, 3)}}
  state = create_train_state(params, {}, optax.adam(1e-3), jax.random.PRNGKey(0))
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'))
  for step in (3, 8):
    checkpoints.save(state.replace(step=jnp.asarray(step, jnp.int32),
                                   params=jax.tree.map(lambda x, s=step: x + s, params)), {}, {})
  checkpoints.close()
  monkeypatch.chdir(tmp_path.parent)
  source = {'workdir': tmp_path, 'root': tmp_path / 'checkpoints', 'step': tmp_path / 'checkpoints' / '3',
            'relative': tmp_path.name}[where]
  loaded, description = init_lib.load_params(str(source))
  expected = 3.0 if where == 'step' else 8.0  # a run or its root: the latest step
  np.testing.assert_array_equal(loaded['body']['kernel'], np.arange(6.0).reshape(2, 3) + expected)
  assert 'jft checkpoint' in description


def test_loads_a_hugging_face_directory(tmp_path):
  loaded, description = init_lib.load_params('tests/fixtures/bert_small')
  reference = pretrained.load('tests/fixtures/bert_small').variables['params']
  jax.tree.map(np.testing.assert_array_equal, loaded, reference)
  assert description == 'pretrained tests/fixtures/bert_small'
  with pytest.raises(UserError, match='neither a registered pretrained model'):
    init_lib.load_params(str(tmp_path))


def pruned_run(workdir):
  """A run saved at steps 3 and 8 with BatchNorm-like model state and pruning masks (the dense kernel's)."""
  params = {'dense': {'kernel': jnp.arange(6.0).reshape(2, 3) - 2, 'bias': jnp.ones(3)}}
  tx = pruning.masked_by(optax.adam(1e-3), {'dense': {'kernel': True, 'bias': False}})
  state = create_train_state(params, {'batch_stats': {'mean': jnp.full(3, 0.5)}}, tx, jax.random.PRNGKey(0))
  checkpoints = Checkpoints(str(workdir / 'checkpoints'))
  for step in (3, 8):
    masks = pruning.compute_masks(state.params, {'dense': {'kernel': True, 'bias': False}}, step / 10)
    checkpoints.save(state.replace(step=jnp.asarray(step, jnp.int32),
                                   opt_state=pruning.with_new_masks(state.opt_state, masks)), {}, {'seed': step})
  checkpoints.close()
  return params


def test_read_run_gives_each_part_as_host_arrays_with_the_config(tmp_path):
  params = pruned_run(tmp_path)
  run = init_lib.read_run(str(tmp_path))  # the latest step
  assert (run.step, run.config, run.state_dir.name, run.state_dir.parent.name) == (8, {'seed': 8}, 'state', '8')
  assert isinstance(run.params['dense']['kernel'], np.ndarray)
  np.testing.assert_array_equal(run.params['dense']['kernel'], params['dense']['kernel'])
  np.testing.assert_array_equal(run.model_state['batch_stats']['mean'], np.full(3, 0.5))
  assert run.masks['dense']['bias'] is None and int(np.sum(~run.masks['dense']['kernel'])) == 4  # floor(0.8 * 6)
  third = init_lib.read_run(str(tmp_path / 'checkpoints'), items=('masks',), step=3)
  assert third.params is None and third.model_state is None and third.config == {'seed': 3}
  assert int(np.sum(~third.masks['dense']['kernel'])) == 1  # floor(0.3 * 6)
  with pytest.raises(UserError, match='no checkpoint at step 5 .steps: 3, 8.'):
    init_lib.read_run(str(tmp_path), step=5)
  assert init_lib.read_run(str(tmp_path / 'elsewhere')) is None
  assert init_lib.read_run('tests/fixtures/bert_small') is None


def test_read_run_of_a_run_without_model_state_or_masks(tmp_path):
  state = create_train_state({'w': jnp.ones(2)}, {}, optax.sgd(1.0), jax.random.PRNGKey(0))
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'))
  checkpoints.save(state, {}, {})
  checkpoints.close()
  run = init_lib.read_run(str(tmp_path / 'checkpoints' / '0'))
  assert run.model_state == {} and run.masks is None
  np.testing.assert_array_equal(run.params['w'], np.ones(2))


SAVE_ON_EIGHT_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jft import pruning
from jft.checkpoint import Checkpoints
from jft.state import create_train_state
mesh = Mesh(np.array(jax.devices()), ('fsdp',))
kernel = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, PartitionSpec('fsdp')))
tx = pruning.masked_by(optax.adam(1e-3), {'kernel': True})
state = create_train_state({'kernel': kernel}, {}, tx, jax.random.PRNGKey(0))
assert len(state.opt_state.masks['kernel'].sharding.device_set) == 8
checkpoints = Checkpoints(sys.argv[1])
checkpoints.save(state, {}, {'mesh': 'fsdp=8'})
checkpoints.close()
"""


def test_read_run_of_a_run_saved_on_another_mesh(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', SAVE_ON_EIGHT_DEVICES, str(tmp_path / 'checkpoints')], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  run = init_lib.read_run(str(tmp_path))  # this process: its own devices, host arrays back
  assert run.config == {'mesh': 'fsdp=8'} and isinstance(run.params['kernel'], np.ndarray)
  np.testing.assert_array_equal(run.params['kernel'], np.arange(64.0).reshape(16, 4))
  assert run.masks['kernel'].dtype == bool and run.masks['kernel'].all()
