"""The pruning schedule in the train loop: new masks on the schedule's steps, and the sparsity report.

A `Hook` (jft/hooks.py) around `jft.pruning`: before each step where `pruning.is_update_step` says so, the
masks are recomputed from the current weights at the schedule's sparsity, the pruned weights zeroed and the
masks put into the optimizer state, in one jitted update from the state's shardings to the same, the old state
donated. Never inside the train step: the step only keeps pruned weights at zero.
"""

from collections.abc import Callable
from typing import Any

import jax

from jft import hooks, pruning, rules, sharding

PyTree = Any


def _set_masks(state, masks):
  return state.replace(params=pruning.apply_masks(state.params, masks),
                       opt_state=pruning.with_new_masks(state.opt_state, masks))


class MaskSchedule(hooks.Hook):
  """Prunes the `prunable` parameters (a bool tree) to `sparsity` per `schedule` from `start_step` to `end_step`."""

  def __init__(self, prunable: PyTree, sparsity: float, scope: str, structure: str, schedule: str, start_step: int,
               end_step: int, every: int = 1, cycles: int = 1, ranked: Callable[[PyTree], PyTree] | None = None):
    """`ranked(params)`: the weights to rank, shaped like `params` (e.g. LoRA's merged kernels); None: `params`."""
    self.prunable, self.sparsity, self.scope, self.structure = prunable, sparsity, scope, structure
    self.ranked = ranked
    self.schedule = dict(schedule=schedule, start_step=start_step, end_step=end_step, every=every, cycles=cycles)
    self._updates = {}

  def _update(self, state):
    """The jitted mask update for states laid out as `state` (a stage boundary changes the optimizer state)."""
    key = jax.tree.structure(state)
    if key not in self._updates:
      shardings = jax.tree.map(lambda x: x.sharding, state)
      self._updates[key] = jax.jit(_set_masks, in_shardings=(shardings, None), out_shardings=shardings,
                                   donate_argnums=0)
    return self._updates[key]

  @staticmethod
  def _mesh(state):
    return jax.tree.leaves(state.params)[0].sharding.mesh

  def before_step(self, step: int, state):
    if not pruning.is_update_step(step, **self.schedule):
      return state
    target = pruning.sparsity_at(step, self.sparsity, **self.schedule)
    # Ranking weights split over devices is slow in XLA (on 8 CPU devices, FSDP-split MiniLM-sized kernels took
    # 46 s against 0.3 s gathered): rank a gathered copy of the prunable weights, a transient cost on the
    # schedule's steps only.
    prunable_params, others = rules.split_trainable(state.params, self.prunable)
    gathered = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(self._mesh(state)))(prunable_params)
    params = rules.merge_trainable(gathered, others)
    if self.ranked is not None:
      params = self.ranked(params)
    masks = pruning.compute_masks(params, self.prunable, target, self.scope, self.structure)
    return self._update(state)(state, masks)

  def at_target(self, step: int) -> bool:
    """Whether the state after step `step` is pruned to the final sparsity (only such a state can be the run's
    best checkpoint: an earlier, denser one would win on accuracy without being the model asked for)."""
    return pruning.sparsity_at(step, self.sparsity, **self.schedule) == self.sparsity

  def report(self, state) -> dict[str, float]:
    return pruning.sparsity_report(state.params, pruning.masks_of(state.opt_state))

  def summary(self, state) -> dict[str, float]:
    report = self.report(state)
    return {key: report[key] for key in ('sparsity/all', 'sparsity/prunable')}
