"""The one interface between a model and the training core: an apply function over plain pytrees.

`apply_fn(params, model_state, inputs, train, rng) -> (logits, new_model_state)`, where `inputs` is the
batch's model inputs as keyword arguments (e.g. `{'image': x}`) and `model_state` holds everything that
is not trained by gradients (BatchNorm statistics, ...). Linen modules and NNX modules both fit.
"""

from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
from flax import nnx

PyTree = Any


class ApplyFn(Protocol):

  def __call__(self, params: PyTree, model_state: PyTree, inputs: Mapping[str, jax.Array], train: bool,
               rng: jax.Array) -> tuple[jax.Array, PyTree]:
    ...


def split_variables(variables: Mapping[str, PyTree]) -> tuple[PyTree, dict[str, PyTree]]:
  """Splits linen variables into (params, model_state: every other collection)."""
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  return variables['params'], model_state


def linen_apply_fn(module: nn.Module) -> ApplyFn:
  """Apply function of a linen module whose `__call__` takes the inputs and `train`."""

  def apply_fn(params, model_state, inputs, train, rng):
    variables = {'params': params, **model_state}
    rngs = {'dropout': rng}
    if train and model_state:
      logits, updates = module.apply(variables, **inputs, train=True, rngs=rngs, mutable=list(model_state))
      return logits, {**model_state, **updates}
    return module.apply(variables, **inputs, train=train, rngs=rngs), model_state

  return apply_fn


def nnx_apply_fn(graphdef: nnx.GraphDef) -> ApplyFn:
  """Apply function of an NNX module split as `graphdef, params, model_state` (see `split_nnx`)."""

  def apply_fn(params, model_state, inputs, train, rng):
    del rng  # An NNX module carries its own rng streams in `model_state`.
    model = nnx.merge(graphdef, params, model_state)
    if train:
      model.train()
    else:
      model.eval()
    logits = model(**inputs)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return logits, nnx.to_pure_dict(new_model_state)

  return apply_fn


def split_nnx(model: nnx.Module) -> tuple[ApplyFn, PyTree, PyTree]:
  """(apply_fn, params, model_state) of an NNX module, with the state as plain nested dicts."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return nnx_apply_fn(graphdef), nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
