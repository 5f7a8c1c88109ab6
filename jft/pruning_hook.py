"""The pruning schedule in the train loop: new masks on the schedule's steps, and the sparsity report.

A `Hook` (jft/hooks.py) around `jft.pruning`: before each step where `pruning.is_update_step` says so, the
masks are recomputed at the schedule's sparsity from the current weights (or the scores of the criterion,
jft/prune_criteria.py), the pruned weights zeroed, the masks put into the optimizer state and the scores reset,
in one jitted update from the state's shardings to the same, the old state donated. Never inside the train step:
the step only keeps pruned weights at zero.
"""

from collections.abc import Callable
from typing import Any

import jax

from jft import hooks, prune_criteria, pruning, rules, sharding

PyTree = Any


def _set_masks(state, masks):
  opt_state = prune_criteria.reset(pruning.with_new_masks(state.opt_state, masks))
  return state.replace(params=pruning.apply_masks(state.params, masks), opt_state=opt_state)


class MaskSchedule(hooks.Hook):
  """Prunes the `prunable` parameters (a bool tree) to `sparsity` per `schedule` from `start_step` to `end_step`."""

  def __init__(self, prunable: PyTree, sparsity: float, scope: str, structure: str, schedule: str, start_step: int,
               end_step: int, every: int = 1, cycles: int = 1, initial: float = 0.0, criterion: str = 'magnitude',
               rewind_lr: bool = False, ranked: Callable[[PyTree], PyTree] | None = None):
    """`criterion`: see jft/prune_criteria.py. `rewind_lr`: the learning rate goes back to its peak at each mask
    update (`optim.make_schedule`'s restarts). Both reach the optimizer through `optimizer_options`.
    `ranked(params)`: the weights to rank by magnitude, shaped like `params` (e.g. LoRA's merged kernels); None:
    `params`."""
    self.prunable, self.sparsity, self.scope, self.structure = prunable, sparsity, scope, structure
    self.criterion, self.rewind_lr, self.ranked = criterion, rewind_lr, ranked
    self.schedule = dict(schedule=schedule, start_step=start_step, end_step=end_step, every=every, cycles=cycles,
                         initial=initial)
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
    gather = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(self._mesh(state)))
    prunable_params, others = rules.split_trainable(state.params, self.prunable)
    params = rules.merge_trainable(gather(prunable_params), others)
    scores = None
    if prune_criteria.uses_gradients(self.criterion):
      sums = gather(prune_criteria.score_state_of(state.opt_state))
      scores = prune_criteria.scores(self.criterion, params, sums, pruning.masks_of(state.opt_state))
    elif self.ranked is not None:
      params = self.ranked(params)
    masks = pruning.compute_masks(params, self.prunable, target, self.scope, self.structure, scores)
    return self._update(state)(state, masks)

  def optimizer_options(self, first_step: int, last_step: int, accumulate_steps: int = 1) -> dict[str, Any]:
    """The keyword arguments of `optim.make_optimizer` for the stage of steps `first_step`..`last_step`: the
    prunable tree, the criterion, and with `rewind_lr` the update counts at which the rate restarts."""
    updates = pruning.update_steps(**self.schedule)
    restarts = [(step - first_step) // accumulate_steps for step in updates if first_step <= step <= last_step]
    return dict(prunable=self.prunable, prune_criterion=self.criterion,
                lr_restarts=restarts if self.rewind_lr else ())

  def at_target(self, step: int) -> bool:
    """Whether the state after step `step` is pruned to the final sparsity (only such a state can be the run's
    best checkpoint: an earlier, denser one would win on accuracy without being the model asked for)."""
    return pruning.sparsity_at(step, self.sparsity, **self.schedule) == self.sparsity

  def report(self, state) -> dict[str, float]:
    return pruning.sparsity_report(state.params, pruning.masks_of(state.opt_state))

  def summary(self, state) -> dict[str, float]:
    report = self.report(state)
    return {key: report[key] for key in ('sparsity/all', 'sparsity/prunable')}
