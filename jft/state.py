"""The train state: one pytree holding everything a step reads and writes."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Step counter, trained `params`, `opt_state`, untrained `model_state` (e.g. BatchNorm statistics), rng.

  `rng` is a raw uint32 key; each step folds in the step number, so the rng itself never changes and a
  resumed run draws exactly the random numbers of an uninterrupted one.
  """

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  model_state: PyTree
  rng: jax.Array


def create_train_state(params: PyTree, model_state: PyTree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """A fresh state at step 0 with the optimizer initialised on `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=model_state, rng=rng)
