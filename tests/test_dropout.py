"""jft's Dropout (Philox bits): the same semantics as nn.Dropout, and a mask XLA can fuse on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
