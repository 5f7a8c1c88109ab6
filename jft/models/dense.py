"""A dense layer whose backward pass gives XLA the weight gradient in the form its CPU backend runs fastest.

`matmul(x, kernel)` is `x @ kernel` with a hand-written VJP: the same two products autodiff would form
(dx = dy kernel^T, dkernel = x^T dy over every leading axis), but the kernel's gradient is one `dot_general`
contracting the token axis of `x` and `dy`, laid out [in, out] as the kernel is. Autodiff transposes the
forward `dot_general` instead, and XLA's CPU backend then copies the [tokens, out] gradient into a transposed
layout and runs the product at as little as half the speed (59 against 116 GFLOP/s for MiniLM's [384, 1536]
kernel on a 2-core Zen 3; benchmarks/README.md). Same arithmetic, same results;
only the program XLA is handed differs.

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
  return x @ kernel


def _matmul_forward(x, kernel):
  return x @ kernel, (x, kernel)


def _matmul_backward(residuals, dy):
  x, kernel = residuals
  dx = dy @ kernel.T
  x_tokens, dy_tokens = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dkernel = lax.dot_general(x_tokens, dy_tokens, (((0,), (0,)), ((), ())))  # [in, out]: x^T dy
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)


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
    return matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
