"""What pruning ranks weights by (`config.prune.criterion`): each criterion scores a weight by an estimate of how
much the loss would change without it, so that scores of different tensors compare (scope 'global').

  magnitude  |w|                                  (no state; jft/pruning.py ranks it directly)
  movement   mean over steps of -g * w            (Sanh et al. 2020: weights moving away from zero are kept)
  saliency   mean over steps of |g * w|           (first-order Taylor saliency; Molchanov et al. 2019)
  fisher     w^2 * mean over steps of g^2 / 2     (the diagonal empirical-Fisher estimate of the loss increase
                                                   of removing w, as in oBERT's diagonal case, Kurtic et al. 2022)

g is the gradient of the training loss at each step since the last mask update, w the weight when the masks are
recomputed (movement and saliency use the w of each step). The sums live in the optimizer state
(`ScoreState`, through `accumulate_scores`), so they are sharded, checkpointed and resumed with it, skipped on a
step whose update is not applied (jft/divergence.py), and reset at each mask update. A weight already pruned
scores -inf: masks only shrink, as with magnitude (where its |w| is 0). At a stage boundary the sums carry over
(jft/optim.py `carry_over`).
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft import tree_paths
from jft.errors import UserError

PyTree = Any
CRITERIA = ('magnitude', 'movement', 'saliency', 'fisher')


def uses_gradients(criterion: str) -> bool:
  """Whether `criterion` needs the gradients seen between mask updates (all but magnitude)."""
  if criterion not in CRITERIA:
    raise UserError(f'unknown config.prune.criterion {criterion!r}; use one of {CRITERIA}')
  return criterion != 'magnitude'


class ScoreState(NamedTuple):
  """The state of `accumulate_scores`: per prunable weight, the sum of its criterion's per-step term (None for the
  other parameters), and how many steps were summed."""

  score_sums: PyTree
  score_steps: jax.Array


def _step_term(criterion: str, grad: jax.Array, weight: jax.Array) -> jax.Array:
  grad, weight = grad.astype(jnp.float32), weight.astype(jnp.float32)
  if criterion == 'movement':
    return -grad * weight
  if criterion == 'saliency':
    return jnp.abs(grad * weight)
  return jnp.square(grad)  # fisher: the weight enters when the scores are read


def accumulate_scores(criterion: str, prunable: PyTree) -> optax.GradientTransformation:
  """Adds each step's `criterion` term of the prunable weights to a `ScoreState`; the updates pass unchanged.

  Put it before the optimizer (it must see gradients, not updates): `optax.chain(accumulate_scores(...), tx)`.
  """
  uses_gradients(criterion)

  def init(params):
    sums = jax.tree.map(lambda chosen, p: jnp.zeros(p.shape, jnp.float32) if chosen else None, prunable, params)
    return ScoreState(score_sums=sums, score_steps=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('accumulate_scores needs the params: call update(grads, state, params)')
    add = lambda total, g, w: None if total is None else total + _step_term(criterion, g, w)
    sums = jax.tree.map(add, state.score_sums, updates, params, is_leaf=lambda x: x is None)
    return updates, ScoreState(score_sums=sums, score_steps=state.score_steps + 1)

  return optax.GradientTransformation(init, update)


def _in_score_state(path: tuple, _: Any) -> bool:
  return getattr(path[-1], 'tuple_name', None) == ScoreState.__name__


def score_state_of(opt_state: optax.OptState) -> ScoreState | None:
  """The `ScoreState` in `opt_state`, or None where the optimizer has no `accumulate_scores`."""
  sums = optax.tree.get(opt_state, 'score_sums', default=None, filtering=_in_score_state)
  if sums is None:
    return None
  return ScoreState(sums, optax.tree.get(opt_state, 'score_steps', filtering=_in_score_state))


def reset(opt_state: optax.OptState) -> optax.OptState:
  """`opt_state` with its score sums (if any) back to zero: a mask update starts a new window."""
  state = score_state_of(opt_state)
  if state is None:
    return opt_state
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return optax.tree.set(opt_state, _in_score_state, score_sums=zeros(state.score_sums),
                        score_steps=zeros(state.score_steps))


def scores(criterion: str, params: PyTree, state: ScoreState, masks: PyTree) -> PyTree:
  """A float32 score per weight of each prunable parameter (None for the others): the criterion's mean over the
  steps summed in `state`, -inf where `masks` (True = kept) has already pruned the weight."""
  steps = jnp.maximum(state.score_steps, 1).astype(jnp.float32)

  def score(total, weight, mask):
    if total is None:
      return None
    mean = total / steps
    value = jnp.square(weight.astype(jnp.float32)) * mean / 2 if criterion == 'fisher' else mean
    return jnp.where(mask, value, -jnp.inf)

  return jax.tree.map(score, state.score_sums, params, masks, is_leaf=lambda x: x is None)


def check(criterion: str, prunable: PyTree, trainable_per_stage: Sequence[PyTree], first_pruning_step: int) -> None:
  """UserErrors for a gradient criterion that could not see gradients: a prunable parameter frozen in some stage
  (LoRA freezes the weights it adapts), or masks due before the first step has run."""
  if not uses_gradients(criterion):
    return
  chosen = [path for path, selected in tree_paths.flatten(prunable).items() if selected]
  for index, trainable in enumerate(trainable_per_stage):
    trains = tree_paths.flatten(trainable)
    frozen = [path for path in chosen if not trains[path]]
    if frozen:
      raise UserError(f"config.prune.criterion {criterion!r} ranks weights by their gradients, but {frozen[0]} (and "
                      f'{len(frozen) - 1} other pruned parameters) is frozen in stage {index} and gets none (LoRA '
                      "freezes the weights it adapts): use criterion 'magnitude', or leave them out of "
                      'config.prune.include, or do not freeze them')
  if first_pruning_step <= 1:
    raise UserError(f"config.prune.criterion {criterion!r} ranks weights by the gradients of the steps before a mask "
                    f'update, but the first update that prunes comes before step {first_pruning_step}, when none has '
                    'run: set config.prune.start_step later (e.g. 10% of total_steps)')
