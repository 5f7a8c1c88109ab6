"""Initial parameters from a source: merged by path, `init_skip` kept fresh, every misfit named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft import init as init_lib
from jft import pretrained
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
