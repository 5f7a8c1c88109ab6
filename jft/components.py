"""Config -> the run's pieces: the model, the parameter specs and the train loop's hooks (pruning, teacher); shared by
the command-line tools (`jft.main`, `jft.inspect`). Every check of a config runs while these are built."""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from jft import (
  data,
  distill,
  int8,
  lora,
  model_files,
  models,
  prune_criteria,
  pruning,
  pruning_hook,
  sharding,
  teacher_hook,
  tree_paths,
)
from jft import init as init_lib
from jft import stages as stages_lib
from jft import step as step_lib
from jft.apply_fn import ApplyFn, linen_apply_fn, split_variables
from jft.errors import UserError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """The configured module, its class count, `init_variables(rng) -> (params, model_state)`, one example's
  model inputs (what the shapes come from) and the apply function the train and eval steps call. With
  `config.lora` the params hold adapters and `apply_fn` merges them (jft/lora.py); with `config.quantize.mode`
  'qat' it computes with int8 weights (jft/int8.py)."""

  module: nn.Module
  num_classes: int
  init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]]
  example_inputs: dict[str, Any]
  apply_fn: ApplyFn


def build_model(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> Model:
  """The model of `config`, initialised on the shapes of one example of the data."""
  classes = config.data.get('classes')
  num_classes = data.num_classes(config.data.name, config.data.data_dir, classes=classes)
  module = models.get_model(config.model, num_classes)
  example = next(iter(data.eval_batches(config.data, config.data.test_split, config.batch_size,
                                        process_index=process_index, process_count=process_count)))
  example_inputs = step_lib.model_inputs({k: v[:1] for k, v in example.items()})
  init_variables = lambda rng: split_variables(module.init(rng, **example_inputs, train=False))
  apply_fn = linen_apply_fn(module)
  quantized = int8.settings(config)
  if quantized is not None:  # inside LoRA's wrapper: the merged weights are quantized
    int8.target_paths(list(tree_paths.flatten(jax.eval_shape(init_variables, jax.random.PRNGKey(0))[0])), quantized)
    apply_fn = int8.wrap_apply_fn(apply_fn, quantized)
  adapters = lora.settings(config)
  if adapters is not None:
    init_variables = lora.with_adapters(init_variables, adapters)
    apply_fn = lora.wrap_apply_fn(apply_fn, adapters.scale, keep_zeros=pruning.is_on(config.get('prune')))
  return Model(module=module, num_classes=num_classes, init_variables=init_variables, example_inputs=example_inputs,
               apply_fn=apply_fn)


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
  model_files.refuse_pickle(source, 'config.distill.teacher')
  run = init_lib.read_run(source, items=('params', 'model_state'))
  if run is None:
    raise UserError(f'config.distill.teacher {source!r} is not a jft work directory or checkpoint; give the '
                    'work directory of a finished run of the teacher')
  state_dir, teacher_config = run.state_dir, run.config
  module = models.get_model(ml_collections.ConfigDict(teacher_config['model']), student.num_classes)
  params, model_state = lora.merged_for_run(run.params, teacher_config), run.model_state
  quantized = int8.settings(ml_collections.ConfigDict(teacher_config))
  if quantized is not None:  # a teacher trained with int8 weights computes with them, as in its run
    params = jax.device_get(int8.fake_quantize_params(params, quantized))
  # The shapes the teacher's model has on the student's inputs: a different class count shows in the head.
  expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **student.example_inputs, train=False))
  mismatches = tree_paths.shape_mismatches(expected['params'], params)
  if mismatches:
    raise UserError(f'the teacher {state_dir} does not fit its configured model on this data:\n'
                    + '\n'.join(mismatches) + '\na teacher must take the same inputs and predict the same '
                    f'{student.num_classes} classes as the model it teaches')
  return Teacher(linen_apply_fn(module), params, model_state, state_dir)


def param_specs(config: ml_collections.ConfigDict, params: PyTree, mesh: Mesh) -> PyTree:
  """Each parameter's partition spec under `config.sharding` (rules, then FSDP above `min_bytes`) on `mesh`."""
  settings = config.get('sharding') or {}
  return sharding.param_specs(params, mesh.shape, tuple(settings.get('rules') or ()), _min_bytes(config))


def _min_bytes(config: ml_collections.ConfigDict) -> int:
  return (config.get('sharding') or {}).get('min_bytes', sharding.DEFAULT_MIN_BYTES)


def build_pruner(config: ml_collections.ConfigDict, params: PyTree,
                 stages: Sequence[stages_lib.Stage]) -> pruning_hook.MaskSchedule | None:
  """The pruning schedule of `config.prune` over `params` (arrays or shapes), checked against the run's `stages`;
  None when it is off."""
  if not pruning.is_on(config.get('prune')):
    return None
  prune = config.prune
  end_step = config.total_steps if prune.end_step is None else prune.end_step  # None: the last step
  schedule = dict(schedule=prune.schedule, start_step=prune.start_step, end_step=end_step, every=prune.every,
                  cycles=prune.get('cycles', 1), initial=prune.get('initial_sparsity', 0.0))
  pruning.check_settings(prune.sparsity, scope=prune.scope, structure=prune.structure, **schedule)
  last = prune.start_step if prune.schedule == 'oneshot' else end_step
  if last > config.total_steps:
    field = 'start_step' if prune.schedule == 'oneshot' else 'end_step'
    raise UserError(f'config.prune.{field} is {last}, after the last step ({config.total_steps}): the schedule '
                    f'would never reach its sparsity; make {field} at most config.total_steps')
  prunable = pruning.prunable(params, prune.get('include'), prune.get('exclude'))
  criterion = prune.get('criterion', 'magnitude')
  first_pruning = min(step for step in pruning.update_steps(**schedule)
                      if pruning.sparsity_at(step, prune.sparsity, **schedule) > 0)
  prune_criteria.check(criterion, prunable, [stage.labels.trainable for stage in stages], first_pruning)
  adapters = lora.settings(config)  # with LoRA the model's weights are the merged ones: rank those
  ranked = (lambda params: lora.merge_in_place(params, adapters.scale, keep_zeros=True)) if adapters else None
  return pruning_hook.MaskSchedule(prunable, prune.sparsity, prune.scope, prune.structure, criterion=criterion,
                                   rewind_lr=prune.get('rewind_lr', False), ranked=ranked, **schedule)


def build_teacher_hook(config: ml_collections.ConfigDict, student: Model, mesh: Mesh,
                       workdir: os.PathLike) -> teacher_hook.TeacherLogits | None:
  """The teacher of `config.distill`, its variables sharded on `mesh` (FSDP as the student's); None when off."""
  distillation, unlabeled = config.get('distill'), config.data.get('unlabeled')
  has_teacher = bool(distillation and distillation.teacher)
  if unlabeled and unlabeled.name and not has_teacher:
    raise UserError(f'data.unlabeled adds texts without labels ({unlabeled.name}), which only a teacher can '
                    'label: set config.distill.teacher to a trained run, or data.unlabeled.name to None')
  if unlabeled and unlabeled.name and not data.is_text(config.data.name):
    raise UserError(f'data.unlabeled works with text datasets; {config.data.name!r} is an image dataset')
  if not has_teacher:
    return None
  distill.check_settings(distillation.weight, distillation.temperature)
  if os.path.abspath(distillation.teacher).startswith(os.path.join(os.path.abspath(workdir), '')):
    raise UserError(f"config.distill.teacher {distillation.teacher} is inside this run's --workdir: a teacher "
                    'is a finished run of its own; give its work directory')
  teacher = build_teacher(distillation.teacher, student)
  specs = sharding.param_specs(teacher.params, mesh.shape, (), _min_bytes(config))  # the student's rules name its paths
  logging.info('distilling from %s', teacher.source)
  return teacher_hook.TeacherLogits(teacher.apply_fn, teacher.params, teacher.model_state, mesh, specs)
