"""Config -> model pieces, shared by the command-line tools (`jft.main`, `jft.inspect`)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jft import data, models
from jft import step as step_lib
from jft.apply_fn import split_variables

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """The configured module, its class count, and `init_variables(rng) -> (params, model_state)`."""

  module: nn.Module
  num_classes: int
  init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]]


def build_model(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> Model:
  """The model of `config`, initialised on the shapes of one example of the data."""
  classes = config.data.get('classes')
  num_classes = data.num_classes(config.data.name, config.data.data_dir, classes=classes)
  module = models.get_model(config.model, num_classes)
  example = next(iter(data.eval_batches(config.data, config.data.test_split, config.batch_size,
                                        process_index=process_index, process_count=process_count)))
  example_inputs = step_lib.model_inputs({k: v[:1] for k, v in example.items()})
  init_variables = lambda rng: split_variables(module.init(rng, **example_inputs, train=False))
  return Model(module=module, num_classes=num_classes, init_variables=init_variables)
