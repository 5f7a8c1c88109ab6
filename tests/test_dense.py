"""jft's dense matmul with its hand-written backward pass: the gradients of x @ kernel, checked against NumPy, and
`Dense` against `flax.linen.Dense`; plus the weight gradient's form in the compiled program (the reason it exists)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models.dense import Dense, matmul


def arrays(*shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


@pytest.mark.parametrize('x_shape', [(5, 3), (2, 5, 3), (2, 2, 5, 3)])
def test_value_and_gradients_match_numpy(x_shape):
  x, kernel = arrays(x_shape, (3, 4))
  upstream = arrays((*x_shape[:-1], 4), seed=1)[0]
  out, vjp = jax.vjp(matmul, jnp.asarray(x), jnp.asarray(kernel))
  dx, dkernel = vjp(jnp.asarray(upstream))
  np.testing.assert_allclose(out, x @ kernel, rtol=1e-5, atol=1e-5)
  # d/dx sum(upstream * (x @ kernel)) = upstream @ kernel^T; d/dkernel = sum over tokens of x^T upstream.
  np.testing.assert_allclose(dx, upstream @ kernel.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dkernel, x.reshape(-1, 3).T @ upstream.reshape(-1, 4), rtol=1e-5, atol=1e-5)


def test_gradients_equal_autodiff_of_the_plain_matmul():
  x, kernel, weights = arrays((4, 6, 8), (8, 16), (4, 6, 16))
  loss = lambda product: lambda x, kernel: jnp.sum(jnp.tanh(product(x, kernel)) * weights)
  ours = jax.grad(loss(matmul), argnums=(0, 1))(x, kernel)
  plain = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, kernel)
  for a, b in zip(ours, plain, strict=True):
    # The same sums in another order (the weight gradient as one dot over the 24 tokens): float32 rounding, which on
    # an Intel Xeon with AMX reached 1.6e-6 on an entry of 0.044 (atol 1e-6 failed there, 2026-12-02).
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_cotangents_keep_the_primal_dtypes():
  x, kernel = (jnp.asarray(a, jnp.bfloat16) for a in arrays((2, 3, 8), (8, 4)))
  dx, dkernel = jax.grad(lambda x, k: jnp.sum(matmul(x, k).astype(jnp.float32)), argnums=(0, 1))(x, kernel)
  assert dx.dtype == dkernel.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dkernel, np.float32),
                             np.asarray(x, np.float32).reshape(-1, 8).sum(0)[:, None].repeat(4, 1), rtol=2e-2)


def test_dense_is_flax_dense():
  x = jnp.asarray(arrays((3, 5, 8))[0])
  ours, theirs = Dense(6, dtype=jnp.float32), nn.Dense(6, dtype=jnp.float32)
  variables, flax_variables = (module.init(jax.random.PRNGKey(0), x) for module in (ours, theirs))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_variables)
  jax.tree.map(np.testing.assert_array_equal, variables, flax_variables)  # the same initial values
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-6, atol=1e-6)
  grads = [jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2))(variables) for m in (ours, theirs)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


def test_weight_gradient_is_one_dot_over_the_tokens_without_a_transposed_copy():
  """The kernel's gradient reaches XLA as x^T dy contracting the token axis of both operands: on CPU no copy of
  the [tokens, out] gradient into a transposed layout is made for it (what autodiff's program gets)."""
  x, kernel = arrays((32, 16, 64), (64, 256))
  grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(matmul(jnp.asarray(x), k)))))
  program = grad.lower(jnp.asarray(kernel)).compile().as_text()
  entry = program[program.index('ENTRY'):]
  assert 'f32[256,512]' not in entry  # the [tokens=512, out=256] gradient, transposed
  np.testing.assert_allclose(grad(jnp.asarray(kernel)),
                             x.reshape(-1, 64).T @ np.cos(x.reshape(-1, 64) @ kernel), rtol=1e-4, atol=1e-4)
