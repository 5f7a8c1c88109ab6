"""jft's Dropout (Philox bits): the same semantics as nn.Dropout, bit for bit the mask of jax's own Philox 4x32
generator, a mask XLA can fuse on CPU, and one that compiles on an array sharded over several devices."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jft.models import dropout
from jft.models.dropout import Dropout


def apply(rate, x, seed=0, deterministic=False):
  return Dropout(rate, deterministic=deterministic).apply({}, x, rngs={'dropout': jax.random.PRNGKey(seed)})


def test_drops_at_the_rate_and_scales_the_rest():
  rate, n = 0.1, 1_000_000
  out = np.asarray(apply(rate, jnp.ones(n)))
  dropped = np.mean(out == 0)
  # Binomial(n, 0.1): standard deviation 3e-4; 5 sigma.
  assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_array_equal(np.unique(out), np.array([0.0, 1 / (1 - rate)], np.float32))


def test_deterministic_and_rate_zero_are_the_identity():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  np.testing.assert_array_equal(apply(0.5, x, deterministic=True), x)
  np.testing.assert_array_equal(apply(0.0, x), x)


def test_a_mask_drawn_first_and_applied_in_slices_is_the_mask_of_one_call():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 8))

  class InSlices(nn.Module):
    @nn.compact
    def __call__(self, x):
      drop = Dropout(0.3)
      keep = drop.mask(x.shape)
      return jnp.concatenate([drop(x[:, :2], keep[:, :2]), drop(x[:, 2:], keep[:, 2:])], axis=1)

  class OneCall(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dropout(0.3)(x)

  rngs = {'dropout': jax.random.PRNGKey(5)}
  assert Dropout(0.3).draws and not Dropout(0.3, deterministic=True).draws and not Dropout(0.0).draws
  assert not Dropout(1.0).draws
  np.testing.assert_array_equal(InSlices().apply({}, x, rngs=rngs), OneCall().apply({}, x, rngs=rngs))


def test_masks_follow_the_rng():
  x = jnp.ones((64, 64))
  np.testing.assert_array_equal(apply(0.5, x, seed=3), apply(0.5, x, seed=3))
  assert not np.array_equal(apply(0.5, x, seed=3), apply(0.5, x, seed=4))


def test_two_layers_draw_different_masks():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dropout(0.5)(x), Dropout(0.5)(x)

  a, b = Twice().apply({}, jnp.ones((64, 64)), rngs={'dropout': jax.random.PRNGKey(0)})
  mask_a, mask_b = np.asarray(a) == 0, np.asarray(b) == 0
  assert not np.array_equal(mask_a, mask_b)
  # Independent masks agree on about half the elements (rate 0.5): 4096 elements, 5 sigma = 0.04.
  assert abs(np.mean(mask_a == mask_b) - 0.5) < 0.04


def test_neighbouring_elements_are_uncorrelated():
  mask = np.asarray(apply(0.5, jnp.ones(200_000))) == 0
  correlation = np.corrcoef(mask[:-1], mask[1:])[0, 1]
  assert abs(correlation) < 5 / np.sqrt(mask.size)


def test_gradient_is_the_mask_over_the_keep_probability():
  x = jnp.arange(1.0, 65.0)
  out = apply(0.25, x)
  grad = jax.grad(lambda x: jnp.sum(apply(0.25, x)))(x)
  np.testing.assert_allclose(grad, np.where(np.asarray(out) == 0, 0.0, 1 / 0.75), rtol=1e-6)


def _loop_shapes(fn) -> list[str]:
  """The operand types of every while loop in `fn`'s lowering for a [32, 128] input."""
  lowered = jax.jit(fn).lower(jnp.ones((32, 128))).as_text()
  return [line.split(') : ', 1)[1] for line in lowered.splitlines() if 'stablehlo.while' in line]


def test_mask_has_no_loop_for_xla_to_run():
  # nn.Dropout draws the mask's threefry bits in a while loop on CPU, which XLA cannot fuse (8-10x slower
  # masks); the Philox bits are one elementwise computation. Only the tiny key derivation loops, as before.
  ours = _loop_shapes(lambda x: apply(0.1, x))
  assert all('32x128' not in shapes for shapes in ours), ours
  reference = _loop_shapes(lambda x: nn.Dropout(0.1, deterministic=False).apply(
      {}, x, rngs={'dropout': jax.random.PRNGKey(0)}))
  assert any('32x128' in shapes for shapes in reference), reference  # what this guards against is still there


def philox_key(key_data):
  return jax.random.wrap_key_data(key_data, impl='philox4x32')


@pytest.mark.parametrize('shape', [(7,), (3, 5), (4, 3, 16, 16), (2, 33, 65)])
def test_bits_are_those_of_jax_philox4x32(shape):
  for seed in range(3):
    key_data = jax.random.bits(jax.random.PRNGKey(seed), (2,), jnp.uint32)
    ours = jax.jit(dropout.random_bits, static_argnums=1)(key_data, shape)
    np.testing.assert_array_equal(ours, jax.random.bits(philox_key(key_data), shape, jnp.uint32))


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.3, 1e-7, 0.999])
def test_masks_are_nn_dropout_with_a_philox_key(rate):
  # The module's Philox key is the data of its key from the 'dropout' stream; nn.Dropout with that Philox key is the
  # reference (what jft's Dropout was before its Philox rounds were written out), in float32 and bfloat16.
  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      key = philox_key(jax.random.key_data(self.make_rng('dropout')))
      return nn.Dropout(rate, deterministic=False)(x, rng=key)

  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 6, 16, 16), dtype)
    rngs = {'dropout': jax.random.PRNGKey(3)}
    np.testing.assert_array_equal(Dropout(rate).apply({}, x, rngs=rngs), Reference().apply({}, x, rngs=rngs))


def test_philox_key_is_the_site_keys_own_data_or_drawn_from_it():
  threefry = jax.random.fold_in(jax.random.PRNGKey(7), 3)
  np.testing.assert_array_equal(dropout.philox_key_data(threefry), threefry)
  np.testing.assert_array_equal(dropout.philox_key_data(jax.random.key(7)), jax.random.key_data(jax.random.key(7)))
  rbg = jax.random.key(7, impl='rbg')  # four words: two are drawn from it instead
  np.testing.assert_array_equal(dropout.philox_key_data(rbg), jax.random.bits(rbg, (2,), jnp.uint32))
  out = Dropout(0.5).apply({}, jnp.ones((8, 8)), rngs={'dropout': rbg})
  assert 0 < np.mean(np.asarray(out) == 0) < 1


def _philox_fusions(keep_fn) -> int:
  """How many of the compiled program's computations run Philox rounds (hold an xor) for a dropout mask read by
  a layer norm and by the backward pass, as in a BERT layer."""
  shape = (8, 16, 32)

  def loss(x, key_data):
    y = lax.select(keep_fn(key_data, shape), x / 0.9, jnp.zeros_like(x))
    centred = y - y.mean(-1, keepdims=True)
    return jnp.sum(centred * lax.rsqrt((centred**2).mean(-1, keepdims=True) + 1e-12))

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(shape), jnp.array([1, 2], jnp.uint32)).compile().as_text()
  computations = compiled.split('\n\n')
  return sum(' xor(' in computation for computation in computations)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="the stored mask is XLA's CPU program")
def test_each_mask_is_computed_once_on_cpu():
  assert _philox_fusions(lambda key_data, shape: dropout.keep_mask(key_data, 0.9, shape)) == 1
  # What this guards against: the same mask without stored_once is computed again by each op that reads it.
  recomputed = _philox_fusions(lambda key_data, shape: dropout.bernoulli_keep(key_data, 0.9, shape))
  assert recomputed >= 2, recomputed


def test_products_and_index_words_are_exact_64_bit_arithmetic():
  x = np.array([0, 1, 0xFFFF, 0x10000, 0xDEADBEEF, 0xFFFFFFFF], np.uint32)
  for multiplier in dropout.PHILOX_MULTIPLIERS + (1, 0xFFFFFFFF):
    expected = (x.astype(np.uint64) * np.uint64(multiplier)) >> np.uint64(32)
    np.testing.assert_array_equal(dropout.mulhi(jnp.asarray(x), multiplier), expected.astype(np.uint32))
  # A counter past 2^32 (arrays of more than 4G elements): (high, low) + x * stride, against Python's integers.
  start = [(0, 0xFFFFFFF0), (5, 0xFFFFFFFF), (0, 0)]
  for stride in (1, 3 * 2**32 + 7, 2**40, 0xFFFFFFFF):
    for high, low in start:
      words = (jnp.full(x.shape, high, jnp.uint32), jnp.full(x.shape, low, jnp.uint32))
      new_high, new_low = dropout.add_product(words, jnp.asarray(x), stride)
      total = [(high << 32) + low + int(v) * stride for v in x]
      np.testing.assert_array_equal(new_high, np.array([(t >> 32) & 0xFFFFFFFF for t in total], np.uint32))
      np.testing.assert_array_equal(new_low, np.array([t & 0xFFFFFFFF for t in total], np.uint32))
  high, low = dropout.flat_index((3, 4, 5))
  np.testing.assert_array_equal(low, np.arange(60, dtype=np.uint32).reshape(3, 4, 5))
  assert not np.any(high)


SHARDED_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from jft import optim, sharding, step as step_lib
    from jft.apply_fn import linen_apply_fn, split_variables
    from jft.models import BertClassifier, BertConfig
    from jft.models.dropout import Dropout
    from jft.state import create_train_state

    assert jax.device_count() == 2, jax.devices()
    x = np.ones((8, 16), np.float32)
    apply = jax.jit(lambda x: Dropout(0.5).apply({}, x, rngs={'dropout': jax.random.PRNGKey(0)}))
    mesh = sharding.make_mesh()
    np.testing.assert_array_equal(apply(sharding.put_batch({'x': x}, mesh)['x']), apply(x))

    # A BERT step with dropout on, its batch split over the two devices, against the same step on one device.
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
    module = BertClassifier(config, num_classes=3, pooling='mean')
    rng = np.random.default_rng(0)
    batch = {'input_ids': rng.integers(1, 100, (8, 16)).astype(np.int32),
             'attention_mask': np.ones((8, 16), np.int32), 'label': rng.integers(0, 3, 8).astype(np.int32)}
    params, model_state = split_variables(module.init(jax.random.PRNGKey(0), input_ids=batch['input_ids'][:1]))
    tx = optim.make_optimizer(ml_collections.ConfigDict(dict(name='adamw', lr=1e-3, weight_decay=0.01,
        warmup_steps=0, schedule='constant', clip_norm=1.0)), 10)
    losses = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.make_mesh(devices)
      fresh = jax.tree.map(np.array, params)  # a copy: the step donates the state
      state = sharding.put_replicated(create_train_state(fresh, model_state, tx, jax.random.PRNGKey(1)), mesh)
      train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh)
      for _ in range(2):
        state, metrics = train_step(state, sharding.put_batch(batch, mesh))
      losses.append(float(metrics['loss']))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    print('sharded dropout ok', losses)
''')


def test_compiles_on_a_sharded_batch_with_the_one_device_masks():
  # jax's own Philox rounds (lax.mulhi -> chlo.mulhi) fail to compile for a sharded array under Shardy in jaxlib
  # 0.10.2; with the rounds written out, a BERT step with dropout on two devices matches the one-device step.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sharded dropout ok' in result.stdout
