"""jft's dense matmul with its hand-written backward pass: the gradients of x @ kernel, checked against NumPy, and
`Dense` against `flax.linen.Dense`; plus the weight gradient's form in the compiled program (the reason it exists),
and bf16 on CPU: float32 accumulation, every product on bf16 operands in the compiled program."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models.dense import Dense, add_bias, matmul


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


def compiled_dots(program: str) -> list[tuple[str, str]]:
  """(parameter types, result type) of each computation of a compiled HLO program that holds a `dot`."""
  computations = re.findall(r'^%\S+ \(([^)]*)\) -> (\S+) \{\n(.*?)^\}', program, re.M | re.S)
  return [(params, result) for params, result, body in computations if ' dot(' in body]


@pytest.mark.parametrize('x_shape', [(24, 16), (3, 8, 16), (2, 3, 4, 16)])
def test_bfloat16_values_and_gradients_are_float32_sums_of_the_bf16_operands(x_shape):
  """bf16 operands: each product (and the bias gradient) sums in float32 and is rounded once to bf16, here
  against NumPy's float64 sums of the same bf16 values, to bf16's 8 bits. On CPU the weight gradient multiplies a
  transposed copy of x: a wrong transpose would scramble it."""
  x, kernel, bias, upstream = (jnp.asarray(a, jnp.bfloat16) for a in arrays(x_shape, (16, 12), (12,),
                                                                             (*x_shape[:-1], 12)))
  forward = lambda x, kernel, bias: add_bias(matmul(x, kernel), bias)
  out, vjp = jax.vjp(forward, x, kernel, bias)
  grads = vjp(upstream)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  x64, kernel64, upstream64 = (np.asarray(a, np.float64) for a in (x, kernel, upstream))
  tokens, upstream_tokens = x64.reshape(-1, 16), upstream64.reshape(-1, 12)
  expected = (x64 @ kernel64 + np.asarray(bias, np.float64), upstream64 @ kernel64.T, tokens.T @ upstream_tokens,
              upstream_tokens.sum(0))
  for ours, reference in zip((out, *grads), expected, strict=True):
    np.testing.assert_allclose(np.asarray(ours, np.float64), reference, rtol=2**-8,
                               atol=2**-8 * np.abs(reference).max())


def test_bfloat16_dense_on_cpu_multiplies_bf16_operands_into_float32():
  """XLA's CPU backend gives a bf16 product to YNNPACK (AMX / AVX512-BF16 kernels) only with a float32 result and
  the contracted axis minor in both operands; a bf16 result, or the weight gradient contracting the token axis,
  makes it convert both operands and multiply in float32 (3-7x slower on an Intel Xeon with AMX,
  benchmarks/README.md). The bias gradient sums in float32: bf16's became a slow reduce-window."""
  module = Dense(64, dtype=jnp.bfloat16)
  x = jnp.asarray(arrays((8, 16, 32))[0])
  variables = module.init(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32))), argnums=(0, 1)))
  program = grad.lower(variables, x).compile().as_text()
  dots = compiled_dots(program)
  # The forward product, the input's gradient and the kernel's: bf16 operands, float32 results.
  assert len(dots) == 3 and all(set(re.findall(r'(\w+)\[', params)) == {'bf16'} and result.startswith('f32[')
                                for params, result in dots), dots
  assert 'reduce-window' not in program
