"""Command line: `python -m jft.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]`.

The only place that turns a config into components (data, model, optimizer, state, checkpoints) and runs
the train loop. Running the same command again in the same DIR resumes from the latest checkpoint.
"""

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from jft import components, data, distill, optim, pruning, sharding
from jft import init as init_lib
from jft import stages as stages_lib
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn
from jft.checkpoint import Checkpoints
from jft.errors import UserError
from jft.metric_writer import MetricWriter
from jft.state import create_train_state

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/NAME.py[:ARG]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'work directory: config.json, metrics.jsonl, checkpoints/')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() (multi-host runs)')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before anything is written when a field is out of range."""
  for field in ('total_steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every'):
    if config[field] <= 0:
      raise UserError(f'config.{field} must be a positive integer, got {config[field]}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir`; returns the final test metrics."""
  validate_config(config)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.batch_size, mesh)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())

  if jax.process_count() > 1:
    # One host builds the tfds dataset (a shared data_dir); the others wait rather than race to write it.
    if jax.process_index() == 0:
      data.data_source(config.data.name, config.data.train_split, config.data.data_dir, config.data.get('classes'))
    multihost_utils.sync_global_devices('jft: data prepared')
  model = components.build_model(config, **process)
  num_classes, init_variables = model.num_classes, model.init_variables
  apply_fn = linen_apply_fn(model.module)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  # Every rule (freeze, lr_mults, decay, stages, pruning) is resolved here, before anything is written.
  abstract_params = jax.eval_shape(init_variables, init_rng)[0]
  stages = stages_lib.plan(config, abstract_params)
  prune = config.get('prune')
  prunable, prune_schedule = None, {}
  if prune and prune.sparsity > 0:
    end_step = config.total_steps if prune.end_step is None else prune.end_step  # None: the last step
    prune_schedule = dict(schedule=prune.schedule, start_step=prune.start_step, end_step=end_step,
                          every=prune.every, cycles=prune.get('cycles', 1))
    pruning.check_settings(prune.sparsity, scope=prune.scope, structure=prune.structure, **prune_schedule)
    prunable = pruning.prunable(abstract_params, prune.get('include'), prune.get('exclude'))
  distillation = config.get('distill')
  teacher, loss_fn = None, step_lib.cross_entropy_loss
  unlabeled = config.data.get('unlabeled')
  if unlabeled and unlabeled.name and not (distillation and distillation.teacher):
    raise UserError(f'data.unlabeled adds texts without labels ({unlabeled.name}), which only a teacher can '
                    'label: set config.distill.teacher to a trained run, or data.unlabeled.name to None')
  if unlabeled and unlabeled.name and not data.is_text(config.data.name):
    raise UserError(f'data.unlabeled works with text datasets; {config.data.name!r} is an image dataset')
  if distillation and distillation.teacher:  # the teacher's logits become a batch feature before each step
    if os.path.abspath(distillation.teacher).startswith(os.path.join(os.path.abspath(workdir), '')):
      raise UserError(f'config.distill.teacher {distillation.teacher} is inside this run\'s --workdir: a teacher '
                      'is a finished run of its own; give its work directory')
    loss_fn = distill.make_loss(distillation.weight, distillation.temperature)
    teacher = components.build_teacher(distillation.teacher, model)
    teacher_variables = sharding.put_replicated((teacher.params, teacher.model_state), mesh)
    teacher_logits = step_lib.jit_logits_fn(step_lib.make_logits_fn(teacher.apply_fn), mesh)
    logging.info('distilling from %s', teacher.source)

  replicated = sharding.replicated(mesh)
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'), **config.checkpoint)
  train_batches = data.train_iterator(config.data, config.batch_size, config.seed, **process)
  resume_step = checkpoints.latest_step()
  stage = stages_lib.stage_of_step(stages, resume_step or 0)
  tx = optim.make_optimizer(stage.optim, stage.steps, stage.labels, prunable)
  make_state = lambda params, model_state: create_train_state(params, model_state, tx, train_rng)
  if resume_step is None:
    params, model_state = jax.jit(init_variables)(init_rng)
    if config.init:
      loaded, source = init_lib.load_params(config.init)
      params = init_lib.merge_params(params, loaded, config.init_skip, source)
      logging.info('initialised from %s, except %s', source, config.init_skip)
    state = jax.jit(make_state, out_shardings=replicated)(params, model_state)
  else:
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                  jax.eval_shape(lambda rng: make_state(*init_variables(rng)), init_rng))
    state, data_state = checkpoints.restore(resume_step, abstract_state)
    train_batches.set_state(data_state)
    logging.info('resumed from step %d (stage %d)', resume_step, stage.index)

  config_json = json.loads(config.to_json())
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config_json, f, indent=2)
  writer = MetricWriter(workdir, resume_step, enabled=jax.process_index() == 0)
  compile_train_step = lambda stage, tx: step_lib.jit_train_step(
      step_lib.make_train_step(apply_fn, tx, stage.labels.trainable, loss_fn), mesh)
  train_step = compile_train_step(stage, tx)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(apply_fn, num_classes), mesh)

  set_masks = jax.jit(lambda state, masks: state.replace(
      params=pruning.apply_masks(state.params, masks), opt_state=pruning.with_new_masks(state.opt_state, masks)),
      out_shardings=replicated, donate_argnums=0)

  def sparsity():
    return pruning.sparsity_report(state.params, pruning.masks_of(state.opt_state)) if prunable is not None else {}

  def evaluate(split):
    batches = data.eval_batches(config.data, split, config.batch_size, **process)
    return step_lib.evaluate(eval_step, state, batches, mesh)

  first_step = int(state.step) + 1
  pending, window_start = [], time.perf_counter()
  bar = tqdm.tqdm(range(first_step, config.total_steps + 1), initial=first_step - 1, total=config.total_steps,
                  unit='step', mininterval=1.0, disable=jax.process_index() != 0)
  for step in bar:
    if step > stage.last_step:  # the next stage: its rules, its schedule; moments kept where training goes on
      stage = stages[stage.index + 1]
      tx = optim.make_optimizer(stage.optim, stage.steps, stage.labels, prunable)
      carry = lambda state, tx=tx: state.replace(opt_state=optim.carry_over(state.opt_state, tx.init(state.params)))
      state = jax.jit(carry, out_shardings=replicated, donate_argnums=0)(state)
      train_step = compile_train_step(stage, tx)
      logging.info('stage %d from step %d', stage.index, step)
    if prunable is not None and pruning.is_update_step(step, **prune_schedule):  # masks change only on schedule
      target = pruning.sparsity_at(step, prune.sparsity, **prune_schedule)
      state = set_masks(state, pruning.compute_masks(state.params, prunable, target, prune.scope, prune.structure))
    batch = sharding.put_batch(next(train_batches), mesh)
    if teacher is not None:
      batch[distill.TEACHER_LOGITS] = teacher_logits(*teacher_variables, batch)
    state, metrics = train_step(state, batch)
    pending.append(metrics)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      means = {k: float(v) for k, v in jax.tree.map(lambda *x: np.mean(x), *jax.device_get(pending)).items()}
      means['steps_per_sec'] = len(pending) / (time.perf_counter() - window_start)
      means.update(sparsity())
      writer.write(step, 'train', means)
      bar.set_postfix(loss=f"{means['loss']:.4f}")
      pending, window_start = [], time.perf_counter()
    validation = None
    if config.data.validation_split and (step % config.eval_every == 0 or last):
      validation = evaluate(config.data.validation_split)
      writer.write(step, 'validation', validation)
    if step % config.checkpoint_every == 0 or last:
      checkpoints.save(state, train_batches.get_state(), config_json, metrics=validation)
    if not pending:  # steps_per_sec counts training alone, not the evaluations and saves between windows
      window_start = time.perf_counter()
  bar.close()
  checkpoints.wait()

  overall = {k: v for k, v in sparsity().items() if k in ('sparsity/all', 'sparsity/prunable')}
  test = {**evaluate(config.data.test_split), **overall}
  writer.write(int(state.step), 'test', test)
  checkpoints.close()
  writer.close()
  return test


def _fail(message: str) -> None:
  print(f'jft: error: {message}', file=sys.stderr)
  sys.exit(2)


def main() -> None:
  try:
    flags.FLAGS(sys.argv)
  except (flags.Error, ValueError, OSError, AttributeError, KeyError, TypeError) as e:
    _fail(f'{e}\nusage: python -m jft.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE]')
  if _CONFIG.value is None or not _WORKDIR.value:
    _fail('both --config=configs/NAME.py[:ARG] and --workdir=DIR are required')
  logging.use_absl_handler()
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    test = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    _fail(str(e))
  print(json.dumps({'split': 'test', **{k: v for k, v in test.items() if k != 'confusion_matrix'}}))


if __name__ == '__main__':
  main()
