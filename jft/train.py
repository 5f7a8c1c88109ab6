"""The train loop: a config becomes components (data, model, optimizer, state, checkpoints), and the loop runs
them from the first (or the restored) step to the test evaluation. `python -m jft.main` is its command line.

Running it again in the same work directory resumes from the newest readable checkpoint.
"""

import json
import os
import sys
import time

import jax
import ml_collections
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jft import (
  compilation_cache,
  compile_ahead,
  components,
  config_checks,
  data,
  distill,
  divergence,
  early_stopping,
  executable_cache,
  host_memory,
  lora,
  metric_writer,
  optim,
  pmap_backend,
  preemption,
  run_time,
  sharding,
  tree_paths,
)
from jft import init as init_lib
from jft import stages as stages_lib
from jft import step as step_lib
from jft.checkpoint import Checkpoints, DamagedCheckpoint
from jft.errors import UserError
from jft.metric_writer import MetricWriter
from jft.state import TrainState, create_train_state

PREDICTIONS = 'test_predictions.json'  # in the work directory: the tested checkpoint's prediction per test example


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       preempted: preemption.PreemptionWatch | None = None) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir` (a local path or e.g. gs://); returns the final test metrics.

  Raises `divergence.Diverged` after more than `config.skip_nonfinite` steps with a NaN or inf loss or gradient,
  and `preemption.Preempted` after saving the step at which `preempted` (the command line's signal watch) fired.
  """
  clock = run_time.RunTime(('setup', 'validation', 'checkpoint', 'test'))  # the test record's `seconds`
  workdir = epath.Path(workdir) if '://' in str(workdir) else epath.Path(os.path.abspath(workdir))
  # Setup: every config check runs here, before anything is written.
  config_checks.check(config)
  mesh = sharding.make_mesh(shape=config.get('mesh'))
  sharding.check_batch_size(config.batch_size, mesh)
  backend = config.get('backend', 'jit')
  ahead_workers = compile_ahead.workers() if backend == 'jit' else 0
  pmap_backend.check_backend(backend, mesh)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() > 1:
    # One host builds the tfds dataset (a shared data_dir); the others wait rather than race to write it.
    if jax.process_index() == 0:
      data.data_source(config.data.name, config.data.train_split, config.data.data_dir, config.data.get('classes'))
    multihost_utils.sync_global_devices('jft: data prepared')
  model = components.build_model(config, **process)
  # What the steps are built from besides the code and their arguments: the key of the compiled steps a repeated
  # run loads without tracing them (jft/executable_cache.py).
  built_from = (config.to_json(sort_keys=True), repr(model.module))
  step_name = lambda stage_index: f'train_step {stage_index}'
  checkpoint_dir = workdir / 'checkpoints'
  if not (checkpoint_dir.exists() and any(checkpoint_dir.iterdir())):
    # A fresh run: its first step's program (as the last such run ran it) loads on a thread from here on, while
    # the model is traced for its shapes, the data read and the state made.
    executable_cache.prefetch(step_name(0), *built_from)
  apply_fn = model.apply_fn
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  # The model's initialisation traced once for its shapes: every stage's state shapes follow from these.
  abstract_variables = jax.eval_shape(model.init_variables, init_rng)  # (params, model state)
  abstract_params = abstract_variables[0]
  param_specs = components.param_specs(config, abstract_params, mesh)
  stages = stages_lib.plan(config, abstract_params)
  pruner = components.build_pruner(config, abstract_params, stages)
  teacher = components.build_teacher_hook(config, model, mesh, workdir)
  hooks = [hook for hook in (pruner, teacher) if hook is not None]
  loss_fn = step_lib.cross_entropy_loss
  if teacher is not None:
    loss_fn = distill.make_loss(config.distill.weight, config.distill.temperature)

  make_state = lambda params, model_state, tx: create_train_state(params, model_state, tx, train_rng)
  abstract_state = lambda tx: jax.eval_shape(lambda variables: make_state(*variables, tx), abstract_variables)

  def compile_stage(stage: stages_lib.Stage) -> stages_lib.CompiledStage:
    pruning_options = pruner.optimizer_options(stage.first_step, stage.last_step,
                                               stage.optim.get('accumulate_steps', 1)) if pruner else {}
    tx = optim.make_optimizer(stage.optim, stage.steps, stage.labels, **pruning_options)
    state_sharding = sharding.state_sharding(mesh, abstract_state(tx), param_specs)
    if backend == 'pmap':
      train_step = step_lib.make_train_step(apply_fn, tx, stage.labels.trainable, loss_fn, pmap_backend.AXIS)
      return stages_lib.CompiledStage(stage, tx, state_sharding, pmap_backend.pmap_train_step(train_step, mesh))
    train_step = step_lib.jit_train_step(step_lib.make_train_step(apply_fn, tx, stage.labels.trainable, loss_fn), mesh,
                                         state_sharding)
    train_step = executable_cache.cached(train_step, step_name(stage.index), *built_from)
    return stages_lib.CompiledStage(stage, tx, state_sharding, train_step)

  checkpoints = Checkpoints(checkpoint_dir, **config.checkpoint)
  # The best validation result so far (a new best is always saved, for the test of config.test_on='best'), and
  # early stopping: both resume from the checkpoint's progress record.
  test_on = early_stopping.test_on(config)
  best = early_stopping.Best(config.checkpoint.best_metric, config.checkpoint.best_mode)
  stopper = early_stopping.from_config(config)
  train_batches = data.train_iterator(config.data, config.batch_size, config.seed, **process)

  def on_mesh(local_batch):
    """A host's batch as the step sees it: on the mesh, with what the hooks add (e.g. a teacher's logits)."""
    batch = sharding.put_batch(local_batch, mesh)
    for hook in hooks:
      batch = hook.on_batch(batch)
    return batch

  def restore(step: int, resuming: bool = False):
    """(the stage runner from `step` on, (state, data state) of checkpoint `step`, the program of the step after
    it being made where `resuming`, else None), the state on this run's mesh in the layout of the stage that saved
    it."""
    runner = stages_lib.StageRunner(stages, compile_stage, step)
    target = sharding.abstract(abstract_state(runner.current.tx), runner.current.state_sharding)
    making = None
    # While the checkpoint is read, the next step's program loads (or compiles) on a thread; not where that step
    # lies past the run's end or opens a new stage (whose first step makes its own).
    if resuming and backend == 'jit' and step < runner.current.stage.last_step:
      unread = train_batches.get_state()
      probe = on_mesh(next(train_batches))  # the batches' structure, read and then unread
      train_batches.set_state(unread)
      lengths = data.batch_lengths(config.data, config.batch_size, config.seed, [step])  # step + 1 reads `step`
      batch = probe if lengths is None else compile_ahead.at_length(probe, lengths[0])
      making = step_lib.compile_in_background(runner.current.train_step, target, batch)
    return runner, checkpoints.restore(step, target), making

  resume_step, restored, first_batch = None, None, None
  for step in reversed(checkpoints.all_steps()):  # the newest readable checkpoint; damaged ones are set aside
    try:
      progress = checkpoints.progress(step)
      # A run that stopped early trains no further step: none is made ahead for it.
      trains_on = stopper is None or not stopper.stopped(progress.get('early_stopping'))
      runner, restored, compiling = restore(step, resuming=trains_on)
      resume_step = step
      break
    except DamagedCheckpoint as e:
      moved = checkpoints.set_aside(step)
      _warn(f'{e}\nmoved it to {moved} (kept for inspection) and trying the step before it')
  if resume_step is None:
    if (workdir / 'damaged_checkpoints').exists():
      raise UserError(f'no readable checkpoint is left in {checkpoints.directory} (the damaged ones are in '
                      f'{workdir / "damaged_checkpoints"}), so this run cannot resume: give a new --workdir to start '
                      'over, or move damaged_checkpoints/ away to start over in this one')
    runner, compiling = stages_lib.StageRunner(stages, compile_stage, 0), None
    if backend == 'jit':  # the first step's program compiles (or loads) on a thread while the state is made
      first_batch = on_mesh(next(train_batches))  # its shape picks the program; the loop's step 1 takes it
      target = sharding.abstract(abstract_state(runner.current.tx), runner.current.state_sharding)
      compiling = step_lib.compile_in_background(runner.current.train_step, target, first_batch)
    state = init_state(config, model, init_rng, make_state, runner.current.tx, runner.current.state_sharding,
                       abstract_params, built_from)
    if compiling is not None:
      compiling.result()  # raises its error, if any; the loop's first call of the step runs the program
  else:
    state, data_state = restored
    train_batches.set_state(data_state)
    if compiling is not None:
      compiling.result()  # raises its error, if any
    best.load(progress.get('best'))
    if stopper is not None:
      stopper.load(progress.get('early_stopping'))
    logging.info('resumed from step %d (stage %d)', resume_step, runner.current.stage.index)

  config_json = json.loads(config.to_json())
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(json.dumps(config_json, indent=2))
  writer = MetricWriter(workdir, resume_step, enabled=jax.process_index() == 0)
  eval_step = step_lib.make_eval_step(apply_fn, model.num_classes)
  compiled_eval_steps = {}

  def evaluate(split: str, state, keep_predictions: bool = False):
    key = jax.tree.structure(state)  # compiled per layout of the state: a stage boundary changes it
    if key not in compiled_eval_steps:
      compiled_eval_steps[key] = executable_cache.cached(
          step_lib.jit_eval_step(eval_step, mesh, jax.tree.map(lambda x: x.sharding, state)), 'eval_step', *built_from)
    batches = data.eval_batches(config.data, split, config.batch_size, **process)
    return step_lib.evaluate(compiled_eval_steps[key], state, batches, mesh, keep_predictions)

  def make_programs_ahead(step: int, state, batch) -> compile_ahead.CompileAhead | None:
    """The current stage's programs for the lengths its batches after `step` pad to, made on threads while the
    steps run (text data; step s reads the batch at position s - 1)."""
    positions = range(step, runner.current.stage.last_step)
    coming = data.batch_lengths(config.data, config.batch_size, config.seed, positions)
    return None if coming is None else compile_ahead.CompileAhead(runner.current.train_step, state, batch, coming,
                                                                  ahead_workers)

  # The loop: next batch -> on the mesh -> hooks -> step -> log / evaluate / save.
  log = metric_writer.TrainLog()
  nonfinite = divergence.NonfiniteWatch(config.get('skip_nonfinite', 0), advice=_divergence_advice(config))
  first_step = int(state.step) + 1
  last_step = config.total_steps if stopper is None or not stopper.stop else first_step - 1  # stopped early before
  bar = tqdm.tqdm(range(first_step, last_step + 1), initial=first_step - 1, total=config.total_steps,
                  unit='step', mininterval=1.0, disable=jax.process_index() != 0)
  clock.since_start('setup')
  ahead, ahead_stage = None, None
  for step in bar:
    state = runner.before_step(step, state)
    for hook in hooks:
      state = hook.before_step(step, state)
    batch = on_mesh(next(train_batches)) if first_batch is None else first_batch
    first_batch = None
    if ahead is not None and ahead_stage is runner.current:  # (a new stage's first step makes its own)
      ahead.before_step(batch)
    state, metrics = runner.train_step(state, batch)
    log.add(metrics)
    nonfinite.add(step, metrics['nonfinite'])
    if step == first_step:  # the one wait outside logging: setup, data, compilation (or its cache), one step
      jax.block_until_ready(metrics)
      log.first_step_done({'seconds_to_first_step': time.perf_counter() - clock.start,
                           'host_memory': host_memory.describe(),
                           **({'cpu_dispatch': 'async' if jax.config.values['jax_cpu_enable_async_dispatch']
                               else 'inline'} if jax.default_backend() == 'cpu' else {}),
                           **{f'compilation_cache_{k}': v for k, v in compilation_cache.counts().items()
                              if jax.config.jax_compilation_cache_dir},
                           **{f'executable_cache_{k}': v for k, v in executable_cache.counts().items()
                              if executable_cache.directory()}})
    if ahead_workers and ahead_stage is not runner.current:  # once a stage's first step has run
      ahead, ahead_stage = make_programs_ahead(step, state, batch), runner.current
    last = step == config.total_steps
    stop = preempted is not None and preempted.reached(step)
    evaluate_now = bool(config.data.validation_split) and (step % config.eval_every == 0 or last)
    save = step % config.checkpoint_every == 0 or last or stop
    if step % config.log_every == 0 or last:
      means = log.flush()
      writer.write(step, 'train', {**means, **{k: v for hook in hooks for k, v in hook.report(state).items()}})
      bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
    if step % config.log_every == 0 or save or evaluate_now:  # where the loop waits anyway
      try:
        nonfinite.check()
      except divergence.Diverged as e:
        bar.close()
        checkpoints.wait()  # the saves already started hold good states: let them finish
        checkpoints.close()
        writer.close()
        raise divergence.Diverged(f'{e} {_last_good_checkpoint(checkpoints)}') from None
    validation, stopped_early, rank = None, False, False
    if evaluate_now:
      with clock.phase('validation'):
        validation = evaluate(config.data.validation_split, state)
      writer.write(step, 'validation', validation)
      # A pruning run's best is picked among its states at the final sparsity: the others are not ranked.
      rank = pruner is None or pruner.at_target(step)
      save |= rank and best.update(step, validation) and test_on == 'best'
      if stopper is not None and rank:
        stopper.update(step, validation)
        stopped_early = stopper.stop
        save |= stopped_early
    if save:
      records = {'best': best.to_json(), **({'early_stopping': stopper.to_json()} if stopper else {})}
      with clock.phase('checkpoint'):
        checkpoints.save(state, train_batches.get_state(), config_json, metrics=validation if rank else None,
                         progress=records)
    if stop:
      bar.close()
      checkpoints.wait()
      checkpoints.close()
      writer.close()
      raise preemption.Preempted(f'{preempted.signal.name}: saved the checkpoint of step {step} in '
                                 f'{checkpoints.directory}; run the same command to resume from it')
    if stopped_early:
      logging.info('early stopping at step %d: %s has not improved on %s (step %d) for %d evaluations', step,
                   stopper.metric, stopper.value, stopper.step, stopper.evals_since)
      break
    log.resume_clock()  # steps_per_sec counts training alone, not the evaluations and saves
  bar.close()
  with clock.phase('checkpoint'):
    checkpoints.wait()

  with clock.phase('test'):
    tested, tested_step = state, int(state.step)
    if test_on == 'best':  # the first step of the best result, if orbax kept it among equals
      tested_step = best.step if best.step in checkpoints.all_steps() else checkpoints.best_step() or tested_step
    if tested_step != int(state.step):
      tested, _ = restore(tested_step)[1]
    test, predictions = evaluate(config.data.test_split, tested, keep_predictions=True)
  if jax.process_index() == 0:  # each test example's prediction, for paired tests between runs (metrics.mcnemar)
    (workdir / PREDICTIONS).write_text(json.dumps({
        'step': int(tested.step), 'split': config.data.test_split,
        **{name: column.tolist() for name, column in predictions.items()}}))
  test.update({k: v for hook in hooks for k, v in hook.summary(tested).items()})
  test.update(tested_step=int(tested.step), test_on=test_on)
  if stopper is not None and stopper.stop:
    test['stopped_early'] = True
  test['seconds'] = clock.summary()
  writer.write(int(state.step), 'test', test)
  checkpoints.close()
  writer.close()
  return test


def init_state(config: ml_collections.ConfigDict, model: components.Model, init_rng: jax.Array, make_state,
               tx, state_sharding, abstract_params: init_lib.PyTree, built_from: tuple[str, ...] = ()) -> TrainState:
  """The fresh train state, created sharded: the model's initialisation, with `config.init`'s parameters put
  straight onto their shardings (each device receives only its slices). With `config.init` the program returns
  only the parameters the source does not give (`init_skip`, new adapters): XLA drops the rest of the
  initialisation, so it is neither compiled nor run (the kept parameters are the same draws as in the whole).
  `built_from`: the key of its programs in jft/executable_cache.py (with the config's own fields, the model's)."""
  params_sharding, model_state_sharding = state_sharding.params, state_sharding.model_state
  cached = lambda jitted, name: executable_cache.cached(jitted, name, *built_from) if built_from else jitted
  if not config.init:
    params, model_state = cached(jax.jit(model.init_variables, out_shardings=(params_sharding, model_state_sharding)),
                                 'init_variables')(init_rng)
  else:
    loaded, source = init_lib.load_params(config.init)
    skip = (*config.init_skip, lora.ADAPTER) if lora.settings(config) else config.init_skip  # new adapters
    shapes, shardings = tree_paths.flatten(abstract_params), tree_paths.flatten(params_sharding)
    skipped = sorted(init_lib.skipped_paths(shapes, skip))

    def init_skipped(rng):
      params, model_state = model.init_variables(rng)
      flat = tree_paths.flatten(params)
      return {path: flat[path] for path in skipped}, model_state

    fresh, model_state = cached(jax.jit(init_skipped, out_shardings=({path: shardings[path] for path in skipped},
                                                                     model_state_sharding)), 'init_skipped')(init_rng)
    params = sharding.put(init_lib.merge_params(tree_paths.unflatten({**shapes, **fresh}), loaded, skip, source),
                          params_sharding)
    logging.info('initialised from %s, except %s', source, config.init_skip)
  return cached(jax.jit(lambda params, model_state: make_state(params, model_state, tx),
                        in_shardings=(params_sharding, model_state_sharding), out_shardings=state_sharding,
                        donate_argnums=(0, 1)), 'make_state')(params, model_state)


def _divergence_advice(config: ml_collections.ConfigDict) -> str:
  optim_config = config.get('optim', {})
  return (f"a lower learning rate (--config.optim.lr, now {optim_config.get('lr')}) or gradient clipping "
          f"(--config.optim.clip_norm=1.0, now {optim_config.get('clip_norm')})")


def _last_good_checkpoint(checkpoints: Checkpoints) -> str:
  step = checkpoints.latest_step()
  if step is None:
    return 'No checkpoint had been saved yet: run again, it starts from the beginning.'
  return f'The last good checkpoint, step {step} in {checkpoints.directory}, is kept unchanged.'


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f'jft: warning: {message}', file=sys.stderr, flush=True)


