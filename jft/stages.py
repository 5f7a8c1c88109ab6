"""Staged fine-tuning: consecutive stages, each with its own rules and schedule (e.g. a linear probe, then all).

`config.stages` is a sequence of dicts, each with `steps` and any of `freeze`, `lr_mults` and `optim`
(fields of `config.optim` to override, such as `lr` or `warmup_steps`); their steps add up to
`total_steps`. Each stage's learning-rate schedule runs over its own steps. A parameter's optimizer
group is the stage since which it has trained without a break, so a parameter that stays trainable
keeps its moments and step count across a boundary, and one that becomes trainable starts fresh.
Without `config.stages` the run is one stage with the top-level `freeze`, `lr_mults` and `optim`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from jft import lora, optim, rules, tree_paths
from jft.errors import UserError

PyTree = Any
STAGE_FIELDS = ('steps', 'freeze', 'lr_mults', 'optim')


@dataclasses.dataclass(frozen=True)
class Stage:
  """Train steps `first_step`..`last_step` (1-based, inclusive) with `optim` and the parameters' `labels`."""

  index: int
  first_step: int
  last_step: int
  optim: ml_collections.ConfigDict
  labels: rules.ParamLabels

  @property
  def steps(self) -> int:
    return self.last_step - self.first_step + 1


def _labels(params: PyTree, optim: ml_collections.ConfigDict, freeze, lr_mults) -> rules.ParamLabels:
  return rules.resolve(params, freeze=tuple(freeze), lr_mults=tuple(tuple(rule) for rule in lr_mults),
                       decay=optim.get('decay'), layer_decay=optim.get('layer_decay'))


def _stage_configs(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  stages = config.get('stages') or ()
  if not stages:
    return [dict(steps=config.total_steps, freeze=config.get('freeze', ()), lr_mults=config.get('lr_mults', ()))]
  if config.get('freeze') or config.get('lr_mults'):
    raise UserError('config.stages is set, and so is the top-level config.freeze or config.lr_mults: put the rules '
                    'in each stage and leave the top-level ones empty')
  stages = [dict(stage) for stage in stages]
  for i, stage in enumerate(stages):
    unknown = set(stage) - set(STAGE_FIELDS)
    if unknown:
      raise UserError(f'config.stages[{i}] has unknown field(s) {sorted(unknown)}; use {STAGE_FIELDS}')
    if not isinstance(stage.get('steps'), int) or stage['steps'] <= 0:
      raise UserError(f'config.stages[{i}].steps must be a positive integer, got {stage.get("steps")!r}')
  if sum(stage['steps'] for stage in stages) != config.total_steps:
    raise UserError(f'the steps of config.stages add up to {sum(s["steps"] for s in stages)}, not '
                    f'config.total_steps {config.total_steps}: make them agree')
  return stages


def plan(config: ml_collections.ConfigDict, params: PyTree) -> list[Stage]:
  """The stages of the run, with every rule resolved on `params` (arrays or shapes); fails on any bad rule."""
  stages, first_step, since = [], 1, {}
  accumulate = config.optim.get('accumulate_steps', 1)
  adapters = lora.settings(config)
  adapters_only = (lora.freeze_rule(adapters),) if adapters else ()  # LoRA: the base weights are frozen throughout
  for i, stage in enumerate(_stage_configs(config)):
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    try:
      optim.update(stage.get('optim', {}))
    except (KeyError, AttributeError) as e:
      raise UserError(f'config.stages[{i}].optim: {e}; use fields of config.optim') from None
    if stage['steps'] % accumulate:
      raise UserError(f'config.stages[{i}] has {stage["steps"]} steps, not a multiple of optim.accumulate_steps '
                      f'{accumulate}: an accumulated update must not straddle a stage boundary')
    labels = _labels(params, optim, (*stage.get('freeze', ()), *adapters_only), stage.get('lr_mults', ()))
    trainable = tree_paths.flatten(labels.trainable)
    since = {path: (i if since.get(path) is None else since[path]) if is_trainable else None
             for path, is_trainable in trainable.items()}
    groups = {path: 'frozen' if k is None else f'stage_{k}' for path, k in since.items()}
    labels = dataclasses.replace(labels, group=jax.tree.unflatten(jax.tree.structure(labels.trainable),
                                                                   [groups[path] for path in trainable]))
    last_step = first_step + stage['steps'] - 1
    stages.append(Stage(index=i, first_step=first_step, last_step=last_step, optim=optim, labels=labels))
    first_step = last_step + 1
  return stages


def stage_of_step(stages: list[Stage], step: int) -> Stage:
  """The stage that runs train step `step`; a state saved after step s was made by `stage_of_step(s)`
  (and a fresh state, s = 0, belongs to the first stage)."""
  for stage in stages:
    if step <= stage.last_step:
      return stage
  return stages[-1]


@dataclasses.dataclass(frozen=True)
class CompiledStage:
  """A stage with its optimizer, the sharding of a train state under that optimizer, and its compiled train step."""

  stage: Stage
  tx: optax.GradientTransformation
  state_sharding: Any
  train_step: Callable


class StageRunner:
  """The stage at hand during a run: its compiled step, and at each boundary the carry-over into the next stage.

  `compile_stage(stage)` builds a stage's optimizer, state sharding and jitted step. At a boundary the optimizer
  state is rebuilt for the next stage with moments carried over where training goes on (`optim.carry_over`), in
  one jitted function from the old stage's state sharding to the new one's, the old state donated.
  """

  def __init__(self, stages: list[Stage], compile_stage: Callable[[Stage], CompiledStage], last_done_step: int = 0):
    self.stages, self.compile_stage = stages, compile_stage
    self.current = compile_stage(stage_of_step(stages, last_done_step))

  def before_step(self, step: int, state: Any) -> Any:
    """`state`, moved into the stage of `step` if a boundary lies before it."""
    if step <= self.current.stage.last_step:
      return state
    previous, self.current = self.current, self.compile_stage(self.stages[self.current.stage.index + 1])
    carry = lambda state: state.replace(opt_state=optim.carry_over(state.opt_state, self.current.tx.init(state.params)))
    logging.info('stage %d from step %d', self.current.stage.index, step)
    return jax.jit(carry, in_shardings=(previous.state_sharding,), out_shardings=self.current.state_sharding,
                   donate_argnums=0)(state)

  def train_step(self, state: Any, batch: Any) -> Any:
    return self.current.train_step(state, batch)
