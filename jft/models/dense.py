"""A dense layer whose backward pass gives XLA the weight gradient in the form its CPU backend runs fastest.

`matmul(x, kernel)` is `x @ kernel` with a hand-written VJP: the same two products autodiff would form
(dx = dy kernel^T, dkernel = x^T dy over every leading axis), but the kernel's gradient is one `dot_general`
contracting the token axis of `x` and `dy`, laid out [in, out] as the kernel is. Autodiff transposes the
forward `dot_general` instead, and XLA's CPU backend then copies the [tokens, out] gradient into a transposed
layout and runs the product at as little as half the speed (59 against 116 GFLOP/s for MiniLM's [384, 1536]
kernel on a 2-core Zen 3; benchmarks/README.md). Same arithmetic, same results;
only the program XLA is handed differs.

bf16 on CPU (`Dense(dtype=jnp.bfloat16)`, `config.model.dtype='bfloat16'`): XLA's CPU backend gives a bf16 product
to YNNPACK's bf16 kernels (AMX, AVX512-BF16) only if it accumulates into a float32 result and contracts the minor
axis of both operands; otherwise it converts both operands and multiplies in float32. So there each product sums
in float32 and is rounded once to bf16 (what a bf16 matmul on an accelerator does too), the weight gradient
multiplies a transposed copy of x, and `add_bias` sums the bias gradient in float32 (a bf16 sum became a slow
reduce-window). On an Intel Xeon with AMX that made the bf16 MiniLM step 1.7x faster (benchmarks/README.md).
Other backends and float32 get the same program as before.

`Dense` is `flax.linen.Dense` (same `kernel` and `bias` parameters, initialisers and dtype handling) on top of it.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x @ kernel` for x [..., in] and kernel [in, out]."""
  return _product(x, kernel, ((x.ndim - 1,), (0,)))


def _matmul_forward(x, kernel):
  return _product(x, kernel, ((x.ndim - 1,), (0,))), (x, kernel)


def _matmul_backward(residuals, dy):
  x, kernel = residuals
  dx = _product(dy, kernel, ((dy.ndim - 1,), (1,)))  # dy kernel^T
  dy_tokens = dy.reshape(-1, dy.shape[-1])
  if _bf16_on_cpu(x.dtype) and x.ndim >= 3:
    # x^T [in, tokens] written out (a transpose XLA cannot fold into the dot: it goes through [batch, length]),
    # so the product contracts the minor axis of both operands, the form YNNPACK runs in bf16. A 2-D x keeps the
    # plain form.
    x_t = jnp.moveaxis(x.reshape(-1, *x.shape[-2:]), -1, 0).reshape(x.shape[-1], -1)
    dkernel = _product(x_t, dy_tokens, ((1,), (0,)))
  else:
    dkernel = _product(x.reshape(-1, x.shape[-1]), dy_tokens, ((0,), (0,)))  # [in, out]: x^T dy over the tokens
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _bf16_on_cpu(dtype) -> bool:
  """Whether the CPU program forms above apply: bf16 operands on XLA's CPU backend."""
  return dtype == jnp.bfloat16 and jax.default_backend() == 'cpu'


def _product(a: jax.Array, b: jax.Array, contracting: tuple) -> jax.Array:
  """`lax.dot_general` of `a` and `b` over the `contracting` axes, in their dtype. bf16 on CPU accumulates into
  a float32 result, then rounds it to bf16: the only bf16 product XLA's CPU backend hands to YNNPACK (AMX or
  AVX512-BF16 kernels); a bf16 result makes XLA convert both operands and multiply in float32."""
  if _bf16_on_cpu(a.dtype):
    return lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32).astype(a.dtype)
  return lax.dot_general(a, b, (contracting, ((), ())))


matmul.defvjp(_matmul_forward, _matmul_backward)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` for y [..., out] and bias [out], the bias gradient summed over the tokens in float32."""
  return y + bias


def _add_bias_forward(y, bias):
  return y + bias, None


def _add_bias_backward(_, dy):
  return dy, jnp.sum(dy.reshape(-1, dy.shape[-1]), axis=0, dtype=jnp.float32).astype(dy.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def plus_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias`, through `add_bias` where it is bf16 on CPU (for any layer whose bias follows a product)."""
  return add_bias(y, bias) if _bf16_on_cpu(y.dtype) else y + bias


class Dense(nn.Module):
  """`nn.Dense(features)`: y = x @ kernel + bias, with the inputs and parameters cast to `dtype`."""

  features: int
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    return plus_bias(matmul(x.astype(self.dtype), kernel.astype(self.dtype)), bias.astype(self.dtype))
