"""The compute dtype of a model (`config.model.dtype`): parameters stay float32, the matmuls run in it."""

import jax.numpy as jnp

from jft.errors import UserError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise UserError(f'config.model.dtype is {name!r}; use one of {tuple(DTYPES)} (parameters stay float32 either way)')
  return DTYPES[name]
