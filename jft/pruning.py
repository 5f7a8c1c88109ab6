"""Pruning: which weights, how sparse when (schedules), the masks, and the optax transformation that keeps pruned
weights at exactly zero. Weights are ranked by magnitude, or by the scores of another criterion
(jft/prune_criteria.py: movement, saliency, fisher) passed to `compute_masks`.

Masks are a tree shaped like the params: a bool array (True = kept) for each prunable parameter, None for the others.
They live in the optimizer state (`PruneState`), so they are sharded, checkpointed and restored with it. The train
loop recomputes them only on the steps where `is_update_step` says so:

  masks = compute_masks(params, prunable_tree, sparsity_at(step, ...), scope, structure[, scores])
  params, opt_state = apply_masks(params, masks), with_new_masks(opt_state, masks)

and every step runs the optimizer wrapped in `masked_by`, whose zero updates keep the pruned weights at 0.

Scopes: 'layer' prunes each tensor to the sparsity; 'global' ranks all prunable weights (or channels) together;
'erk' gives each tensor its Erdos-Renyi-Kernel share (`erk_densities`). Structures: 'unstructured' (single weights);
'N:M' such as '2:4' (in every group of M consecutive weights along the input axis -2, the N largest are kept; it fixes
the sparsity at 1 - N/M, so any other sparsity is a UserError, and needs scope 'layer' and schedule 'oneshot');
'channel' (whole output channels, the last axis, ranked by their root-mean-square, i.e. their L2 norm over
sqrt(fan-in), so 'global' compares tensors of different fan-in fairly; the channel's bias is left alone). A tensor of
n units (weights or channels) at sparsity s loses exactly floor(s * n) units, the smallest first; 'global' prunes
floor(s * N) of all N units; ties go to the earlier tensor in tree order, then the lower flat index.
"""

import bisect
import functools
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft import rules, tree_paths
from jft.errors import UserError

PyTree = Any
DEFAULT_INCLUDE = (r'.*kernel',)  # dense and convolution kernels: not embeddings, biases or normalisation
DEFAULT_EXCLUDE = (r'head/.*',)  # the new classification head
SCHEDULES = ('oneshot', 'gradual', 'iterative')
SCOPES = ('layer', 'global', 'erk')


def is_on(prune_config: Any) -> bool:
  """Whether a run's `config.prune` prunes (absent or sparsity 0: off)."""
  return bool(prune_config) and prune_config.get('sparsity', 0) > 0


def prunable(params: PyTree, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> PyTree:
  """A bool per parameter (arrays or shapes): its path matches an `include` regex and no `exclude` regex.

  None: the defaults `DEFAULT_INCLUDE` and `DEFAULT_EXCLUDE`, which (unlike patterns given) may match nothing.
  """
  paths = list(tree_paths.flatten(params))
  for field, patterns in (('prune.include', include), ('prune.exclude', exclude)):
    for pattern in patterns or ():
      rules.check_matches(field, pattern, paths)
  include = DEFAULT_INCLUDE if include is None else tuple(include)
  exclude = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
  selected = [rules.matches_any(path, include) and not rules.matches_any(path, exclude) for path in paths]
  if not any(selected):
    raise UserError(f'config.prune.include {include} less config.prune.exclude {exclude} leaves no parameter to '
                    'prune; widen include or narrow exclude (`python -m jft.inspect` lists the paths)')
  return jax.tree.unflatten(jax.tree.structure(params), selected)


def _check_sparsity(sparsity: float, field: str = 'sparsity') -> None:
  if not 0 <= sparsity < 1:
    raise UserError(f'config.prune.{field} is {sparsity}: make it a fraction in [0, 1), e.g. 0.8')


def _check_schedule(schedule: str, start_step: int, end_step: int, every: int, cycles: int,
                    initial: float = 0.0) -> None:
  if schedule not in SCHEDULES:
    raise UserError(f'unknown config.prune.schedule {schedule!r}; use one of {SCHEDULES}')
  if start_step < 0 or (schedule != 'oneshot' and end_step < start_step):
    raise UserError(f'config.prune.start_step {start_step} and end_step {end_step}: make 0 <= start_step <= end_step')
  if schedule == 'gradual' and every <= 0:
    raise UserError(f'config.prune.every is {every}: make it a positive number of steps between mask updates')
  if schedule == 'iterative' and not 1 <= cycles <= max(end_step - start_step, 1):
    raise UserError(f'config.prune.cycles is {cycles}: make it between 1 and end_step - start_step '
                    f'({end_step - start_step}), so that each cycle has a step')
  if initial and schedule != 'gradual':
    raise UserError(f"config.prune.initial_sparsity is {initial}, but only the 'gradual' schedule starts from an "
                    f"initial sparsity: set it to 0 or the schedule to 'gradual', not {schedule!r}")


def _last_update(step: int, target: float, schedule: str, start_step: int, end_step: int, every: int, cycles: int,
                 initial: float) -> tuple[int, float] | None:
  """(the latest mask update at or before `step`, the sparsity it prunes to); None before the first."""
  if step < start_step:
    return None
  if schedule == 'oneshot':
    return start_step, target
  if schedule == 'gradual':
    if step >= end_step:
      return end_step, target
    last = start_step + (step - start_step) // every * every
    return last, target + (initial - target) * (1 - (last - start_step) / (end_step - start_step)) ** 3
  jumps = [start_step + k * (end_step - start_step) // cycles for k in range(cycles)]
  k = bisect.bisect_right(jumps, step) - 1
  return jumps[k], target * (k + 1) / cycles


def sparsity_at(step: int, target: float, schedule: str, start_step: int, end_step: int, every: int = 1,
                cycles: int = 1, initial: float = 0.0) -> float:
  """The sparsity of the masks at `step`: 0 before `start_step`, then the schedule's value at the latest update.

  'oneshot': `target` from `start_step` on. 'gradual' (Zhu & Gupta 2017): target + (initial - target) * (1 - (t -
  start_step) / (end_step - start_step)) ** 3 at t = start_step, start_step + every, ... (`initial` at start_step:
  0 by default, or GMP*'s large first step), and `target` from `end_step` on. 'iterative': `cycles` equal
  prune-then-fine-tune cycles; cycle k = 0, ..., cycles - 1 starts at start_step + floor(k * (end_step -
  start_step) / cycles) by pruning to (k + 1) / cycles of `target`.
  """
  _check_sparsity(target)
  _check_sparsity(initial, 'initial_sparsity')
  _check_schedule(schedule, start_step, end_step, every, cycles, initial)
  last = _last_update(step, target, schedule, start_step, end_step, every, cycles, initial)
  return 0.0 if last is None else last[1]


def is_update_step(step: int, schedule: str, start_step: int, end_step: int, every: int = 1,
                   cycles: int = 1, initial: float = 0.0) -> bool:
  """Whether the masks are recomputed at `step`: oneshot at `start_step`; gradual at `start_step`,
  `start_step + every`, ... before `end_step`, and at `end_step`; iterative at the start of each cycle."""
  _check_schedule(schedule, start_step, end_step, every, cycles, initial)
  last = _last_update(step, 0.0, schedule, start_step, end_step, every, cycles, initial)
  return last is not None and last[0] == step


def update_steps(schedule: str, start_step: int, end_step: int, every: int = 1, cycles: int = 1,
                 initial: float = 0.0) -> list[int]:
  """Every step at which the masks are recomputed, in order (see `is_update_step`)."""
  _check_schedule(schedule, start_step, end_step, every, cycles, initial)
  if schedule == 'oneshot':
    return [start_step]
  if schedule == 'gradual':
    return sorted(set(range(start_step, end_step, every)) | {end_step})
  return sorted({start_step + k * (end_step - start_step) // cycles for k in range(cycles)})


def _n_m(structure: str) -> tuple[int, int] | None:
  """(N, M) of an 'N:M' structure; None for 'unstructured' and 'channel'."""
  if structure in ('unstructured', 'channel'):
    return None
  match = re.fullmatch(r'(\d+):(\d+)', str(structure))
  if not match or not 0 < int(match[1]) < int(match[2]):
    raise UserError(f"unknown config.prune.structure {structure!r}; use 'unstructured', 'channel' or 'N:M' with "
                    "0 < N < M, such as '2:4'")
  return int(match[1]), int(match[2])


def _check_method(sparsity: float, scope: str, structure: str) -> tuple[int, int] | None:
  """The (N, M) of `structure` or None, after a UserError for any bad or unsupported combination."""
  _check_sparsity(sparsity)
  if scope not in SCOPES:
    raise UserError(f'unknown config.prune.scope {scope!r}; use one of {SCOPES}')
  n_m = _n_m(structure)
  if n_m and scope != 'layer':
    raise UserError(f"config.prune.structure {structure!r} keeps N of every M weights in each tensor: set "
                    f"config.prune.scope to 'layer', not {scope!r}")
  if n_m and not math.isclose(sparsity, 1 - n_m[0] / n_m[1], abs_tol=1e-6):
    raise UserError(f'config.prune.structure {structure!r} prunes exactly {1 - n_m[0] / n_m[1]} of the weights: set '
                    f'config.prune.sparsity to that, not {sparsity}')
  return n_m


def check_settings(sparsity: float, schedule: str, scope: str, structure: str, start_step: int, end_step: int,
                   every: int = 1, cycles: int = 1, initial: float = 0.0) -> None:
  """Raises a UserError for any bad or unsupported pruning setting; call it once before training."""
  _check_schedule(schedule, start_step, end_step, every, cycles, initial)
  if initial > sparsity:
    raise UserError(f'config.prune.initial_sparsity {initial} is above config.prune.sparsity {sparsity}: the '
                    'schedule prunes from the initial sparsity up to the target, so make it at most the target')
  if _check_method(sparsity, scope, structure) and schedule != 'oneshot':
    raise UserError(f"config.prune.structure {structure!r} fixes the sparsity, so it prunes in one shot: set "
                    f"config.prune.schedule to 'oneshot', not {schedule!r}")


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> np.ndarray:
  """Per-tensor densities (kept fractions) of the Erdos-Renyi-Kernel distribution of overall density 1 - sparsity.

  Each is eps * sum(shape) / prod(shape), for the eps that keeps 1 - sparsity of all weights; a tensor that this
  would make denser than 1 stays dense and eps is solved again over the others (as in RigL and jaxpruner).
  """
  sizes = np.array([math.prod(shape) for shape in shapes], float)
  sums = np.array([sum(shape) for shape in shapes], float)
  dense = np.zeros(len(shapes), bool)
  while not dense.all():
    eps = ((1 - sparsity) * sizes.sum() - sizes[dense].sum()) / sums[~dense].sum()
    # Densifying a tensor frees budget, so eps only grows: every tensor over 1 now stays over 1.
    over = ~dense & (eps * sums / sizes > 1)
    if not over.any():
      return np.where(dense, 1.0, eps * sums / sizes)
    dense |= over
  return np.ones(len(shapes))


def _pruned_counts(shapes: Sequence[tuple[int, ...]], sparsity: float, scope: str, structure: str) -> np.ndarray:
  """How many units (weights or channels) to prune: one count per tensor, or one in all for scope 'global'."""
  units = np.array([shape[-1] if structure == 'channel' else math.prod(shape) for shape in shapes], float)
  if scope == 'global':
    units, fractions = units.sum(keepdims=True), np.array([sparsity])
  elif scope == 'erk':
    fractions = 1 - erk_densities(shapes, sparsity)
  else:
    fractions = np.full(len(shapes), sparsity)
  # Forgive the float rounding in a product that should be whole: 0.29 * 100 is 28.999999999999996.
  return np.floor(fractions * units * (1 + 1e-12)).astype(np.int32)


def _order_keys(scores: jax.Array) -> jax.Array:
  """uint32 keys that order as the float32 `scores` do, negative ones and -inf included (NaN excluded)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32) + 0.0, jnp.uint32)  # + 0.0: -0.0 becomes 0.0
  negative = (bits >> 31).astype(bool)
  return jnp.where(negative, ~bits, bits | jnp.uint32(2**31))


def _keep(scores: jax.Array, count: jax.Array) -> jax.Array:
  """False for the `count` lowest scores (of equal ones, the lower index first), True for the others."""
  # The count-th lowest score by bisection over the bits of its order key: 32 passes of counting instead of a
  # sort, which takes seconds on CPU for millions of weights.
  keys = _order_keys(scores)

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    enough = jnp.sum(keys <= mid) >= count
    return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

  threshold, _ = jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(2**32 - 1)))
  below, ties = keys < threshold, keys == threshold
  return ~(below | (ties & (jnp.cumsum(ties) <= count - jnp.sum(below))))


def _n_m_keep(scores: jax.Array, n: int, m: int) -> jax.Array:
  """True for the `n` highest scores (kernel-shaped) of each group of `m` consecutive weights along the input axis
  (-2)."""
  x = jnp.moveaxis(scores, -2, -1)
  groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m, 1)
  others = jnp.swapaxes(groups, -1, -2)
  # A weight's rank in its group: the weights below it, and the equal ones before it (faster than argsort on CPU).
  rank = jnp.sum((others < groups) | ((others == groups) & jnp.tri(m, k=-1, dtype=bool)), axis=-1)
  return jnp.moveaxis((rank >= m - n).reshape(x.shape), -1, -2)


def _unit_scores(kernel: jax.Array, structure: str, scores: jax.Array | None) -> jax.Array:
  """One score per unit (weight or output channel). Magnitude (`scores` None): |w| per weight, or the
  root-mean-square of each output channel. Given per-weight `scores` (estimates of the loss change, see
  jft/prune_criteria.py): those, or their sum over each output channel."""
  if scores is None:
    kernel = kernel.astype(jnp.float32)
    if structure == 'channel':
      return jnp.sqrt(jnp.mean(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1))))
    return jnp.abs(kernel).ravel()
  if structure == 'channel':
    return jnp.sum(scores, axis=tuple(range(scores.ndim - 1)))
  return scores.ravel()


@functools.partial(jax.jit, static_argnames=('selected', 'scope', 'structure'))
def _masks(params: PyTree, scores: PyTree, counts: jax.Array, selected: tuple[bool, ...], scope: str,
           structure: str) -> PyTree:
  """The masks of `compute_masks`, given the pruned counts of `_pruned_counts`."""
  leaves, treedef = jax.tree.flatten(params)
  kernels = [leaf for leaf, chosen in zip(leaves, selected, strict=True) if chosen]
  chosen_scores = ([None] * len(kernels) if scores is None else
                   [s for s, chosen in zip(treedef.flatten_up_to(scores), selected, strict=True) if chosen])
  n_m = _n_m(structure)
  if n_m:
    kept = [_n_m_keep(jnp.abs(kernel) if s is None else s, *n_m)
            for kernel, s in zip(kernels, chosen_scores, strict=True)]
  else:
    units = [_unit_scores(kernel, structure, s) for kernel, s in zip(kernels, chosen_scores, strict=True)]
    if scope == 'global':
      kept_units = jnp.split(_keep(jnp.concatenate(units), counts[0]), np.cumsum([u.size for u in units])[:-1])
    else:
      kept_units = [_keep(u, count) for u, count in zip(units, counts, strict=True)]
    expand = jnp.broadcast_to if structure == 'channel' else jnp.reshape
    kept = [expand(k, kernel.shape) for k, kernel in zip(kept_units, kernels, strict=True)]
  kept = iter(kept)
  return jax.tree.unflatten(treedef, [next(kept) if chosen else None for chosen in selected])


def compute_masks(params: PyTree, prunable_tree: PyTree, sparsity: float, scope: str = 'layer',
                  structure: str = 'unstructured', scores: PyTree = None) -> PyTree:
  """Masks (True = kept) for the prunable parameters, None for the others (see the module doc).

  `scores`: None ranks by magnitude; else a tree shaped like `params` holding a float32 score per weight of each
  prunable parameter (higher = kept first; None for the others), e.g. from `jft.prune_criteria.scores`.

  `sparsity` is a Python number: the counts are worked out exactly on the host and passed to one jitted
  computation per tree, scope and structure, which any sparsity reuses. Inside a jit, `params` may be traced.
  """
  n_m = _check_method(sparsity, scope, structure)
  treedef = jax.tree.structure(params)
  selected = tuple(bool(chosen) for chosen in treedef.flatten_up_to(prunable_tree))
  shapes = {path: tuple(leaf.shape) for (path, leaf), chosen in zip(tree_paths.flatten(params).items(), selected,
                                                                     strict=True) if chosen}
  for path, shape in shapes.items():
    if structure != 'unstructured' and len(shape) < 2:
      raise UserError(f'config.prune.structure {structure!r} needs kernels of 2 or more dims, but {path} has shape '
                      f'{shape}: leave it out with config.prune.exclude')
    if n_m and shape[-2] % n_m[1]:
      raise UserError(f'config.prune.structure {structure!r} groups {n_m[1]} weights along the input axis (-2), '
                      f'but {path} of shape {shape} has {shape[-2]} inputs, not a multiple of {n_m[1]}: leave it '
                      'out with config.prune.exclude')
  counts = _pruned_counts(list(shapes.values()), sparsity, scope, structure)
  return _masks(params, scores, jnp.asarray(counts), selected=selected, scope=scope, structure=structure)


def apply_masks(tree: PyTree, masks: PyTree) -> PyTree:
  """`tree` (params, gradients or updates; None holes allowed) with the pruned entries set to exactly 0."""
  zero_pruned = lambda mask, x: x if mask is None or x is None else jnp.where(mask, x, 0)
  return jax.tree.map(zero_pruned, masks, tree, is_leaf=lambda x: x is None)


class PruneState(NamedTuple):
  """The state of `masked_by`: the masks and the state of the transformation inside."""

  masks: PyTree
  inner_state: optax.OptState


def masked_by(inner: optax.GradientTransformation, prunable_tree: PyTree) -> optax.GradientTransformation:
  """`inner` between two maskings: pruned weights get zero gradients in and zero updates out, so they stay 0.

  `inner` sees full trees (wrap the whole optimizer, freezing included). The masks start all kept and change only
  through `with_new_masks`.
  """

  def init(params):
    masks = jax.tree.map(lambda chosen, p: jnp.ones_like(p, dtype=bool) if chosen else None, prunable_tree, params)
    return PruneState(masks=masks, inner_state=inner.init(params))

  def update(updates, state, params=None):
    updates, inner_state = inner.update(apply_masks(updates, state.masks), state.inner_state, params)
    return apply_masks(updates, state.masks), PruneState(masks=state.masks, inner_state=inner_state)

  return optax.GradientTransformation(init, update)


def _in_prune_state(path: tuple, _: Any) -> bool:
  """Whether `path` (an `optax.tree` key path) ends at a field of a `PruneState`, not at a parameter named 'masks'."""
  return getattr(path[-1], 'tuple_name', None) == PruneState.__name__


def masks_of(opt_state: optax.OptState) -> PyTree:
  """The masks held in `opt_state`, the state of an optimizer with one `masked_by` in it."""
  masks = optax.tree.get(opt_state, 'masks', filtering=_in_prune_state)
  if masks is None:
    raise ValueError('found no PruneState in the optimizer state: build the optimizer with pruning.masked_by')
  return masks


def with_new_masks(opt_state: optax.OptState, masks: PyTree) -> optax.OptState:
  """`opt_state` with `masks` in its `PruneState`."""
  if jax.tree.structure(masks_of(opt_state)) != jax.tree.structure(masks):
    raise ValueError('the new masks are not shaped like those in the optimizer state; make them with '
                     'compute_masks from the same params and prunable tree')
  return optax.tree.set(opt_state, _in_prune_state, masks=masks)


def sparsity_report(params: PyTree, masks: PyTree) -> dict[str, float]:
  """Fractions of exact zeros: 'sparsity/<path>' per prunable tensor, 'sparsity/prunable' and 'sparsity/all'."""
  flat = tree_paths.flatten(params)
  zeros = jax.device_get({path: jnp.sum(p == 0) for path, p in flat.items()})
  sizes = {path: p.size for path, p in flat.items()}
  pruned = list(tree_paths.flatten(masks))
  report = {f'sparsity/{path}': float(zeros[path] / sizes[path]) for path in pruned}
  report['sparsity/prunable'] = float(sum(zeros[p] for p in pruned) / sum(sizes[p] for p in pruned))
  report['sparsity/all'] = float(sum(zeros.values()) / sum(sizes.values()))
  return report
