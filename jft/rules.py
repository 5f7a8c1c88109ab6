"""Regex rules over parameter paths, resolved once into per-parameter labels.

A parameter's path is its '/'-joined keys (e.g. `encoder/layer_0/attention/query/kernel`); every rule is a
regex matched with `re.fullmatch`. The rules:
  freeze        regexes: matching parameters never change and carry no optimizer state
  lr_mults      (regex, multiplier) pairs: the parameter's learning rate is multiplied
  decay         regexes of the parameters that get weight decay (default: kernels and embeddings)
  layer_decay   layer-wise learning-rate decay: layer k of L gets `decay ** (L - k)`, where the embeddings are
                layer 0, `encoder/layer_i` is layer i + 1 and everything else (head, pooler) layer L
Resolving them yields `ParamLabels`: three pytrees shaped like the parameters.
"""

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

import jax

from jft import tree_paths
from jft.errors import UserError

PyTree = Any
DEFAULT_DECAY = (r'.*kernel', r'.*embedding', r'.*lora_[ab]')  # LoRA's factors decay, as in PEFT + Trainer
LAYER_PATTERN = r'encoder/layer_(\d+)/.*'
EMBEDDINGS_PATTERN = r'embeddings/.*'


@dataclasses.dataclass(frozen=True)
class ParamLabels:
  """Per parameter: `trainable` (bool), `lr_mult` (float), `decay` (bool) and `group` (the optimizer group:
  'stage_K', K the stage since which it trains); pytrees shaped like the params."""

  trainable: PyTree
  lr_mult: PyTree
  decay: PyTree
  group: PyTree


def matches_any(path: str, patterns: Sequence[str]) -> bool:
  """Whether one of the regexes `patterns` matches the whole of `path` (`re.fullmatch`), as every rule does."""
  return any(re.fullmatch(pattern, path) for pattern in patterns)


def _closest(pattern: str, paths: Sequence[str]) -> str:
  close = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.0)
  return ', '.join(close)


def check_matches(field: str, pattern: str, paths: Sequence[str]) -> None:
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise UserError(f'config.{field} pattern {pattern!r} is not a valid regex ({e}); fix it') from None
  if not any(compiled.fullmatch(path) for path in paths):
    raise UserError(f'config.{field} pattern {pattern!r} matches no parameter (patterns must match a whole path); '
                    f'the closest paths are: {_closest(pattern, paths)}. Run `python -m jft.inspect --config=...` '
                    'for the full list')


def layer_decay_mults(paths: Sequence[str], decay: float, layer_pattern: str = LAYER_PATTERN,
                      embeddings_pattern: str = EMBEDDINGS_PATTERN) -> dict[str, float]:
  """{path: decay ** (L - layer)}: embeddings layer 0, `layer_i` layer i + 1, the rest layer L (multiplier 1)."""
  if not 0 < decay <= 1:
    raise UserError(f'config.optim.layer_decay is {decay}: make it in (0, 1], e.g. 0.8, or None for no decay')
  indices = {path: int(m.group(1)) for path in paths if (m := re.fullmatch(layer_pattern, path))}
  if not indices:
    raise UserError(f'config.optim.layer_decay is set but no parameter path matches the layer pattern '
                    f'{layer_pattern!r}; it applies to encoders with numbered layers')
  num_layers = max(indices.values()) + 1
  mults = {}
  for path in paths:
    if path in indices:
      layer = indices[path] + 1
    elif re.fullmatch(embeddings_pattern, path):
      layer = 0
    else:
      layer = num_layers
    mults[path] = decay ** (num_layers - layer)
  return mults


def resolve(params: PyTree, freeze: Sequence[str] = (), lr_mults: Sequence[tuple[str, float]] = (),
            decay: Sequence[str] | None = None, layer_decay: float | None = None) -> ParamLabels:
  """The labels of every parameter of `params` (arrays or shapes) under the rules; fails on any bad rule.

  `decay` None: the default, kernels and embeddings (of which a model may have none).
  """
  flat = tree_paths.flatten(params)
  paths = list(flat)
  for pattern in freeze:
    check_matches('freeze', pattern, paths)
  for rule in lr_mults:
    if len(rule) != 2:
      raise UserError(f'config.lr_mults entry {rule!r} is not a (regex, multiplier) pair')
    pattern, mult = rule
    check_matches('lr_mults', pattern, paths)
    if not mult > 0:
      raise UserError(f'config.lr_mults multiplier for {pattern!r} is {mult}: it must be positive '
                      '(to keep parameters fixed, freeze them instead)')
  for pattern in decay or ():
    check_matches('optim.decay', pattern, paths)
  decay = DEFAULT_DECAY if decay is None else tuple(decay)

  trainable, lr_mult, decays = {}, {}, {}
  layer_mults = layer_decay_mults(paths, layer_decay) if layer_decay is not None else {}
  for path in paths:
    frozen_by = [p for p in freeze if re.fullmatch(p, path)]
    mult_rules = [(p, m) for p, m in lr_mults if re.fullmatch(p, path)]
    if frozen_by and mult_rules:
      raise UserError(f'rules conflict on {path}: frozen by config.freeze {frozen_by[0]!r} and given a learning rate '
                      f'by config.lr_mults {mult_rules[0][0]!r}; drop one of them')
    if len({m for _, m in mult_rules}) > 1:
      raise UserError(f'rules conflict on {path}: config.lr_mults {mult_rules} give it different multipliers; '
                      'make the patterns disjoint or agree')
    trainable[path] = not frozen_by
    lr_mult[path] = (mult_rules[0][1] if mult_rules else 1.0) * layer_mults.get(path, 1.0)
    decays[path] = matches_any(path, decay)
  if not any(trainable.values()):
    raise UserError(f'config.freeze {tuple(freeze)} freezes every parameter: nothing would train; '
                    'leave some parameters (e.g. the head) out of it')
  treedef = jax.tree.structure(params)
  as_tree = lambda values: jax.tree.unflatten(treedef, [values[path] for path in paths])
  return ParamLabels(trainable=as_tree(trainable), lr_mult=as_tree(lr_mult), decay=as_tree(decays),
                     group=as_tree({p: 'stage_0' if trainable[p] else 'frozen' for p in paths}))


def split_trainable(params: PyTree, trainable: PyTree) -> tuple[PyTree, PyTree]:
  """(trainable leaves, frozen leaves): two trees shaped like `params` with None where the other has a leaf."""
  keep = lambda p, t: p if t else None
  drop = lambda p, t: None if t else p
  return jax.tree.map(keep, params, trainable), jax.tree.map(drop, params, trainable)


def merge_trainable(trainable_part: PyTree, frozen_part: PyTree) -> PyTree:
  """The inverse of `split_trainable`."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable_part, frozen_part, is_leaf=lambda x: x is None)
