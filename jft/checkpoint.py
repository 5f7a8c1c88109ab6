"""Checkpoints with orbax: async saves of the train state, data iterator position and config; exact resume.

Each step directory holds five items, readable with plain orbax: `state` (the `TrainState`: step,
params, opt_state, model_state, rng), `data` (the data iterator's JSON state), `config` (JSON),
`fingerprint` (JSON: a 32-bit fingerprint of each array, jft/fingerprint.py, checked on restore) and
`progress` (JSON: the loop's records that must survive a restart, such as the best validation result so far).
Every process of a multi-host run takes part in each save and restore; the data state is one global position,
checked equal on every host. A restore lays the arrays out on the shardings of the abstract state it is given,
so a run saved on one mesh or process count resumes on any other.
"""

import contextlib
import hashlib
import json
import logging as std_logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jft import fingerprint, tree_paths
from jft.errors import UserError
from jft.state import TrainState


class DamagedCheckpoint(Exception):
  """A checkpoint that fits the train state but cannot be read."""

  def __init__(self, step: int, directory: epath.Path, reason: str):
    super().__init__(f'the checkpoint at step {step} in {directory} cannot be read: {reason}')
    self.step = step


PARTIAL_REMOVAL_TRIES = 20  # passes over a failed save's unfinished directories, 50 ms apart
# What a save's root cause says when the storage, not jft, failed.
_STORAGE_FAILURES = ('No space left on device', 'RESOURCE_EXHAUSTED', 'Disk quota exceeded', 'Read-only file system',
                     'Permission denied', 'PERMISSION_DENIED')


class _StorageFailureLogs(std_logging.Filter):
  """Drops orbax's own error logs (each with a traceback, from each of its writer threads) of a save that failed
  on the storage, and asyncio's "Task exception was never retrieved" reports of orbax's other writer tasks of that
  save (printed when the tasks are collected, often at exit): `Checkpoints` reports that failure once, in plain
  words."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    from_orbax = 'orbax' in record.pathname or (record.name == 'asyncio' and 'orbax' in record.getMessage())
    if not from_orbax or record.levelno < std_logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    text = record.getMessage() + (_root_cause(error, limit=None) if error else '')
    return not any(sign in text for sign in _STORAGE_FAILURES)


def _root_cause(error: BaseException, limit: int | None = 400) -> str:
  """The first line (its first `limit` characters) of the innermost cause of `error` (orbax wraps tensorstore's
  precise message)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return f'{type(error).__name__}: {str(error).splitlines()[0][:limit]}'


def _drop_reports_of_failed_background_io() -> None:
  """When one of orbax's reads or writes fails, the others fail after it (their coroutines, or tensorstore's
  callbacks into orbax's closed event loop), and Python prints each with a traceback. Those reports, and only
  those, go to the debug log; `Checkpoints` reports the failure itself, once, in plain words."""
  if getattr(sys.unraisablehook, 'drops_failed_reads', False):
    return

  def of_failed_read(value, obj=None) -> bool:
    return (getattr(obj, '__qualname__', '') == '_read_array_index_and_device_put'
            or (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'))

  unraisable, excepthook, thread_excepthook = sys.unraisablehook, sys.excepthook, threading.excepthook

  def unraisable_hook(report):
    if of_failed_read(report.exc_value, report.object):
      logging.debug('an orbax read or write failed after an earlier one: %r', report.exc_value)
    else:
      unraisable(report)

  def except_hook(kind, value, tb):
    if of_failed_read(value):
      logging.debug('an orbax read or write failed after an earlier one: %r', value)
    else:
      excepthook(kind, value, tb)

  def thread_except_hook(report):
    if of_failed_read(report.exc_value):
      logging.debug('an orbax read or write failed after an earlier one: %r', report.exc_value)
    else:
      thread_excepthook(report)

  unraisable_hook.drops_failed_reads = True
  sys.unraisablehook, sys.excepthook, threading.excepthook = unraisable_hook, except_hook, thread_except_hook


def _leaf_shapes(tree: Any) -> list[tuple[int, ...]]:
  """The sorted shapes of a tree's arrays: equal for a saved tree and the state it was saved from, whatever the
  containers (orbax stores named tuples and dataclasses as dicts)."""
  return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'shape'))


class Checkpoints:
  """An orbax `CheckpointManager` that keeps the latest `keep_latest` steps and the best `keep_best`."""

  def __init__(self, directory: str | os.PathLike, *, keep_latest: int = 2, keep_best: int = 1,
               best_metric: str = 'accuracy', best_mode: str = 'max', async_save: bool = True):
    if best_mode not in ('max', 'min'):
      raise UserError(f"config.checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
    best_fn = lambda metrics: metrics[best_metric]
    preserve = [policies.LatestN(n=keep_latest)]
    if keep_best:
      preserve.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min', n=keep_best,
                                     keep_checkpoints_without_metrics=False))
    # best_fn also makes orbax store each step's metrics, so the best survive a restart.
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save, create=True)
    # orbax finds no tree metadata under a relative path; a remote one (gs://...) is absolute already.
    self.directory = epath.Path(directory) if '://' in str(directory) else epath.Path(os.path.abspath(directory))
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler(), fingerprint=ocp.JsonCheckpointHandler(),
                    progress=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    for logger in (logging.get_absl_logger(), std_logging.getLogger('asyncio')):
      if not any(isinstance(f, _StorageFailureLogs) for f in logger.filters):
        logger.addFilter(_StorageFailureLogs())
    _drop_reports_of_failed_background_io()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best validation metric (the latest step if none has metrics)."""
    return self.manager.best_step()

  def save(self, state: TrainState, data_state: Any, config: dict, metrics: dict | None = None,
           progress: dict | None = None) -> None:
    """Starts an async save of `state` at its step (with the validation `metrics` orbax ranks the best by, and the
    loop's `progress` records); returns once the arrays are copied off the device."""
    step = int(state.step)
    if jax.process_count() > 1:  # one data state is saved for all hosts: it must be the same on each
      digest = np.frombuffer(hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).digest(), np.uint32)
      multihost_utils.assert_equal(digest, 'the data iterator states of the hosts differ')
    items = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config),
        fingerprint=ocp.args.JsonSave(fingerprint.of(state)), progress=ocp.args.JsonSave(progress or {}))
    with self._storage_errors_explained():  # the previous async save's failure surfaces here too
      self.manager.save(step, args=items, metrics=metrics, force=True)
    self._saving = step

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any]:
    """(state, data iterator state) of `step`, restored onto `abstract_state` (shapes, dtypes, shardings).

    Raises `UserError` if the checkpoint holds another model or train state, and `DamagedCheckpoint` if it
    fits but cannot be read (missing metadata, a truncated or corrupt array file)."""
    try:
      saved = self.manager.item_metadata(step)['state'].tree
    except Exception as e:  # whatever orbax raises on unreadable metadata
      raise DamagedCheckpoint(step, self.directory, f'its metadata cannot be read ({type(e).__name__}: {e})'
                              ) from None
    mismatches = tree_paths.shape_mismatches(abstract_state.params, saved['params'])
    if mismatches:
      raise UserError(
          f'the checkpoint at step {step} in {self.directory} does not fit the configured model:\n'
          + '\n'.join(mismatches)
          + '\nuse the config the checkpoint was written with, or a new --workdir')
    if _leaf_shapes(saved) != _leaf_shapes(abstract_state):
      raise UserError(f'the checkpoint at step {step} in {self.directory} does not fit the configured train state '
                      '(its optimizer state or model state differs); use the config it was written with, or a new '
                      '--workdir')
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if self._has_fingerprint(step):  # older checkpoints have none: they restore unchecked
      items['fingerprint'] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # the tree fits: what failed is reading the files
      raise DamagedCheckpoint(step, self.directory, _root_cause(e)) from None
    changed = fingerprint.mismatches(restored['fingerprint'], restored['state']) if 'fingerprint' in items else []
    if changed:
      raise DamagedCheckpoint(step, self.directory, f'{len(changed)} array(s) read back other than they were saved '
                              f'(their fingerprints differ: {", ".join(changed[:3])}{", ..." * (len(changed) > 3)}); '
                              'the files were changed or corrupted on disk')
    return restored['state'], restored['data']

  def _has_fingerprint(self, step: int) -> bool:
    return (self.directory / str(step) / 'fingerprint').exists()

  def progress(self, step: int) -> dict:
    """The loop's records saved with `step` ({} for a checkpoint written before they were)."""
    if not (self.directory / str(step) / 'progress').exists():
      return {}
    try:
      return self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))['progress']
    except Exception as e:
      raise DamagedCheckpoint(step, self.directory, f'its progress record cannot be read ({_root_cause(e)})') from None

  def set_aside(self, step: int) -> epath.Path:
    """Moves the damaged `step` out of the manager's directory into `damaged_checkpoints/` beside it (kept, not
    deleted: it may hold something worth recovering), so later saves of that step do not collide with it."""
    target = self.directory.parent / 'damaged_checkpoints' / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      suffix = 1
      while target.exists():
        target, suffix = self.directory.parent / 'damaged_checkpoints' / f'{step}.{suffix}', suffix + 1
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'jft: checkpoint {step} set aside')
    self.manager.reload()
    return target

  def wait(self) -> None:
    with self._storage_errors_explained():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _storage_errors_explained(self):
    """A save that fails on the storage (disk full, read-only, no permission) becomes a `UserError` that says
    which step failed, that the earlier checkpoints are intact, and what to do; its partial files are removed."""
    try:
      yield
    except Exception as e:
      cause = _root_cause(e, limit=None)
      sign = next((sign for sign in _STORAGE_FAILURES if sign in cause), None)
      if sign is None:
        raise
      failed = getattr(self, '_saving', None)
      if jax.process_index() == 0:
        self._remove_partial_writes()
      intact = ', '.join(map(str, self.all_steps())) or 'none'
      raise UserError(
          f'saving the checkpoint of step {failed} in {self.directory} failed: {sign} ({cause[:300]}...). The '
          f'checkpoints saved before it are intact (steps: {intact}); its partial files were removed. Free space on '
          'that disk or fix its permissions (or run again with a --workdir elsewhere), then run the same command: it '
          'resumes from the latest of them') from None

  def _remove_partial_writes(self) -> None:
    """Removes the unfinished checkpoint directories of this run's failed save. orbax's other writer threads may
    still be finishing files of it when the first one fails: wait for them, then remove until none is left."""
    with contextlib.suppress(Exception):  # the same failure again, or another of the same save
      self.manager.wait_until_finished()
    for _ in range(PARTIAL_REMOVAL_TRIES):
      partials = list(self.directory.glob('*.orbax-checkpoint-tmp*'))
      if not partials:
        return
      for partial in partials:
        shutil.rmtree(partial, ignore_errors=True)
      time.sleep(0.05)

  def close(self) -> None:
    self.manager.close()
