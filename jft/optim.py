"""The optimizer: one optax transformation built from `config.optim`."""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax

from jft import prune_criteria, pruning, rules, tree_paths
from jft.errors import UserError

PyTree = Any
SCHEDULES = ('cosine', 'linear', 'constant')
FIRST_GROUP = 'stage_0'  # the optimizer group of parameters that train from the first stage on
# Where a group's moments and count sit in the state of the per-group `optax.partition`; the freeze partition
# (`inner_states/train/`), accumulated gradients and the schedule's count lie outside it.
GROUP_STATE = re.compile(r'(^|/)inner_states/stage_\d+/')
SCORE_STATE = re.compile(r'(^|/)score_(sums/|steps$)')  # prune_criteria.ScoreState


def _decay(optim: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  if optim.schedule == 'cosine':
    return optax.cosine_decay_schedule(optim.lr, steps)
  if optim.schedule == 'linear':
    return optax.linear_schedule(optim.lr, 0.0, steps)
  return optax.constant_schedule(optim.lr)


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int, restarts: Sequence[int] = ()) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to 0 (or constant).

  `restarts` (update counts, e.g. a pruning schedule's mask updates): learning-rate rewinding (GMP*). The run is cut
  into cycles at those counts; the first is the schedule above over its own length, each later one the decay alone
  from `lr` over its length, so the rate jumps back to `lr` at each restart.
  """
  if optim.schedule not in SCHEDULES:
    raise UserError(f'unknown config.optim.schedule {optim.schedule!r}; use one of {SCHEDULES}')
  bounds = sorted({count for count in restarts if 0 < count < total_steps}) + [total_steps]
  warmup = min(optim.warmup_steps, bounds[0])
  first = _decay(optim, max(bounds[0] - warmup, 1))
  if warmup:
    first = optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), first], [warmup])
  cycles = [_decay(optim, end - start) for start, end in zip(bounds, bounds[1:], strict=False)]
  return optax.join_schedules([first] + cycles, bounds[:-1]) if cycles else first


def lookup_by_path(table: dict[str, Any]) -> Callable[[PyTree], PyTree]:
  """A function from any view of the parameters (holes allowed) to the tree of their `table` values."""
  return lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: table[tree_paths.path_str(path)], tree)


def scale_by_mults(mults: Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its own constant (per-parameter learning-rate multipliers)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, mults(updates)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, labels: rules.ParamLabels | None = None,
                   prunable: PyTree | None = None, prune_criterion: str = 'magnitude',
                   lr_restarts: Sequence[int] = ()) -> optax.GradientTransformation:
  """[prune]([scores] -> freeze(accumulate(clip -> per-group AdamW or SGD with momentum -> schedule -> lr
  multipliers))).

  With `prunable`, pruned weights stay zero (`pruning.masked_by`), and a criterion other than magnitude sums its
  scores from the gradients (`prune_criteria.accumulate_scores`). `lr_restarts`: see `make_schedule`.

  Freezing is `optax.selective_transform`: frozen parameters get zero updates and no optimizer state, and the
  optimizer inside sees only the trainable ones (the others are `optax.MaskedNode` holes).

  Weight decay applies where `labels.decay`; each group of `labels.group` (the stage since which its
  parameters train) has its own moments and step count. Without `labels` every parameter trains, in one
  group, at the base rate, and kernels and embeddings decay.
  """
  if optim.lr <= 0:
    raise UserError(f'config.optim.lr must be positive, got {optim.lr}')
  schedule = make_schedule(optim, total_steps, lr_restarts)
  if labels is None:
    decay = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: rules.matches_any(tree_paths.path_str(path), rules.DEFAULT_DECAY), params)
    groups, group_of, mults = [FIRST_GROUP], lambda params: jax.tree.map(lambda _: FIRST_GROUP, params), None
  else:
    flat = {name: tree_paths.flatten(getattr(labels, name)) for name in ('decay', 'group', 'lr_mult')}
    decay, group_of = lookup_by_path(flat['decay']), lookup_by_path(flat['group'])
    trainable = tree_paths.flatten(labels.trainable)
    groups = sorted({group for path, group in flat['group'].items() if trainable[path]})
    mults = lookup_by_path(flat['lr_mult']) if any(m != 1.0 for m in flat['lr_mult'].values()) else None
  if optim.name == 'adamw':
    mu_dtype = optim.get('mu_dtype')  # e.g. 'bfloat16': the first moment stored in it, halving its memory
    if mu_dtype is not None and mu_dtype not in ('float32', 'bfloat16'):
      raise UserError(f"config.optim.mu_dtype is {mu_dtype!r}; use 'float32', 'bfloat16' or None (the parameters')")
    core = [optax.scale_by_adam(b1=optim.get('b1', 0.9), b2=optim.get('b2', 0.999), mu_dtype=mu_dtype),
            optax.add_decayed_weights(optim.weight_decay, mask=decay)]
  elif optim.name == 'sgd':
    core = [optax.add_decayed_weights(optim.weight_decay, mask=decay),
            optax.trace(decay=optim.get('momentum', 0.9), nesterov=True)]
  else:
    raise UserError(f"unknown config.optim.name {optim.name!r}; use 'adamw' or 'sgd'")
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.get('clip_norm') else []
  parts += [optax.partition({group: optax.chain(*core) for group in groups}, group_of),
            optax.scale_by_learning_rate(schedule)]
  if mults is not None:
    parts.append(scale_by_mults(mults))
  tx = optax.chain(*parts)
  if optim.get('accumulate_steps', 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulate_steps).gradient_transformation()
  if labels is not None:
    tx = optax.transforms.selective_transform(tx, freeze_mask=jax.tree.map(lambda t: not t, labels.trainable))
  if prunable is not None:
    if prune_criteria.uses_gradients(prune_criterion):
      tx = optax.chain(prune_criteria.accumulate_scores(prune_criterion, prunable), tx)
    tx = pruning.masked_by(tx, prunable)
  return tx


def carry_over(old_opt_state: optax.OptState, new_opt_state: optax.OptState) -> optax.OptState:
  """`new_opt_state` (of the next stage's optimizer) with the pruning masks and the moments and counts of every
  group that both stages share copied from `old_opt_state`; new groups start fresh, and so does the schedule."""
  old = tree_paths.flatten(old_opt_state)

  def carry(path, leaf):
    name = tree_paths.path_str(path)
    carried = GROUP_STATE.search(name) or name.startswith('masks/') or SCORE_STATE.search(name)
    kept = carried and name in old and old[name].shape == leaf.shape
    return old[name] if kept else leaf

  return jax.tree_util.tree_map_with_path(carry, new_opt_state)
