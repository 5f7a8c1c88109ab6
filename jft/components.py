"""Config -> model pieces, shared by the command-line tools (`jft.main`, `jft.inspect`)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jft import data, models, tree_paths
from jft import init as init_lib
from jft import step as step_lib
from jft.apply_fn import ApplyFn, linen_apply_fn, split_variables
from jft.errors import UserError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """The configured module, its class count, `init_variables(rng) -> (params, model_state)`, and one example's
  model inputs (what the shapes come from)."""

  module: nn.Module
  num_classes: int
  init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]]
  example_inputs: dict[str, Any]


def build_model(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> Model:
  """The model of `config`, initialised on the shapes of one example of the data."""
  classes = config.data.get('classes')
  num_classes = data.num_classes(config.data.name, config.data.data_dir, classes=classes)
  module = models.get_model(config.model, num_classes)
  example = next(iter(data.eval_batches(config.data, config.data.test_split, config.batch_size,
                                        process_index=process_index, process_count=process_count)))
  example_inputs = step_lib.model_inputs({k: v[:1] for k, v in example.items()})
  init_variables = lambda rng: split_variables(module.init(rng, **example_inputs, train=False))
  return Model(module=module, num_classes=num_classes, init_variables=init_variables, example_inputs=example_inputs)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A trained model whose eval-mode logits a student learns from (`config.distill`)."""

  apply_fn: ApplyFn
  params: PyTree
  model_state: PyTree
  source: str


def build_teacher(source: str, student: Model) -> Teacher:
  """The teacher in the jft run `source`: its model from the run's config, its trained variables.

  The teacher reads the student's batches, so it must take the same inputs and predict the same classes.
  """
  run = init_lib.jft_run(source)
  if run is None:
    raise UserError(f'config.distill.teacher {source!r} is not a jft work directory or checkpoint; give the '
                    'work directory of a finished run of the teacher')
  state_dir, teacher_config = run
  module = models.get_model(ml_collections.ConfigDict(teacher_config['model']), student.num_classes)
  params, model_state = init_lib.read_checkpoint_variables(state_dir)
  # The shapes the teacher's model has on the student's inputs: a different class count shows in the head.
  expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **student.example_inputs, train=False))
  mismatches = tree_paths.shape_mismatches(expected['params'], params)
  if mismatches:
    raise UserError(f'the teacher {state_dir} does not fit its configured model on this data:\n'
                    + '\n'.join(mismatches) + '\na teacher must take the same inputs and predict the same '
                    f'{student.num_classes} classes as the model it teaches')
  return Teacher(linen_apply_fn(module), params, model_state, state_dir)
