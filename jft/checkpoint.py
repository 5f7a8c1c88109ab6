"""Checkpoints with orbax: async saves of the train state, data iterator position and config; exact resume.

Each step directory holds three items, readable with plain orbax: `state` (the `TrainState`: step,
params, opt_state, model_state, rng), `data` (the data iterator's JSON state) and `config` (JSON).
Every process of a multi-host run takes part in each save and restore; the data state is one global position,
checked equal on every host. A restore lays the arrays out on the shardings of the abstract state it is given,
so a run saved on one mesh or process count resumes on any other.
"""

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jft import tree_paths
from jft.errors import UserError
from jft.state import TrainState


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
                    config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best validation metric (the latest step if none has metrics)."""
    return self.manager.best_step()

  def save(self, state: TrainState, data_state: Any, config: dict, metrics: dict | None = None) -> None:
    """Starts an async save of `state` at its step; returns once the arrays are copied off the device."""
    step = int(state.step)
    if jax.process_count() > 1:  # one data state is saved for all hosts: it must be the same on each
      digest = np.frombuffer(hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).digest(), np.uint32)
      multihost_utils.assert_equal(digest, 'the data iterator states of the hosts differ')
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any]:
    """(state, data iterator state) of `step`, restored onto `abstract_state` (shapes, dtypes, shardings)."""
    saved = self.manager.item_metadata(step)['state'].tree
    mismatches = tree_paths.shape_mismatches(abstract_state.params, saved['params'])
    if mismatches:
      raise UserError(
          f'the checkpoint at step {step} in {self.directory} does not fit the configured model:\n'
          + '\n'.join(mismatches)
          + '\nuse the config the checkpoint was written with, or a new --workdir')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'the checkpoint at step {step} in {self.directory} does not fit the configured train '
                      f'state ({type(e).__name__}: {e}); use the config it was written with, or a new --workdir'
                      ) from None
    return restored['state'], restored['data']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
