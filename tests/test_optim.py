import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jft import optim
from jft.errors import UserError


def optim_config(**overrides):
  fields = dict(name='sgd', lr=1.0, weight_decay=0.0, momentum=0.0, warmup_steps=2, schedule='linear',
                clip_norm=None, accumulate_steps=1)
  return ml_collections.ConfigDict({**fields, **overrides})


def test_warmup_then_linear_and_cosine_decay_by_hand():
  linear = optim.make_schedule(optim_config(lr=0.8), total_steps=6)
  # warmup 0 -> 0.8 over 2 steps, then 0.8 -> 0 over the remaining 4
  np.testing.assert_allclose([linear(s) for s in range(7)], [0, 0.4, 0.8, 0.6, 0.4, 0.2, 0.0], atol=1e-7)
  cosine = optim.make_schedule(optim_config(lr=1.0, schedule='cosine'), total_steps=6)
  np.testing.assert_allclose([cosine(s) for s in (2, 4, 6)], [1.0, 0.5, 0.0], atol=1e-7)


def test_weight_decay_only_on_kernels():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}, 'norm': {'scale': jnp.ones(2)}}
  tx = optim.make_optimizer(optim_config(weight_decay=0.5, warmup_steps=0, schedule='constant'), 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5 * np.ones((2, 2)))
  np.testing.assert_array_equal(updates['dense']['bias'], 0)
  np.testing.assert_array_equal(updates['norm']['scale'], 0)


def test_accumulation_matches_one_large_batch():
  params = {'w': jnp.array([1.0, -2.0])}
  grads = [{'w': jnp.array([0.5, 1.0])}, {'w': jnp.array([-1.5, 3.0])}]
  config = optim_config(name='adamw', lr=0.1, warmup_steps=0, schedule='constant')
  big = optim.make_optimizer(config, 10)
  mean_grad = {'w': (grads[0]['w'] + grads[1]['w']) / 2}
  expected, _ = big.update(mean_grad, big.init(params), params)

  config.accumulate_steps = 2
  small = optim.make_optimizer(config, 10)
  state = small.init(params)
  first, state = small.update(grads[0], state, params)
  second, _ = small.update(grads[1], state, params)
  np.testing.assert_array_equal(first['w'], 0)
  np.testing.assert_allclose(second['w'], expected['w'], rtol=1e-6)


@pytest.mark.parametrize('field,value', [('lr', 0.0), ('schedule', 'step'), ('name', 'lamb')])
def test_bad_optimizer_fields_are_user_errors(field, value):
  with pytest.raises(UserError, match=field):
    optim.make_optimizer(optim_config(**{field: value}), 10)
