"""LoRA (Hu et al. 2021) as a transformation of the parameters, not of the model.

For every parameter whose path matches one of `config.lora.targets` (`re.fullmatch`, as the other rules), two
factors live beside it in the params: `lora_a` [fan_in, rank], random, and `lora_b` [rank, fan_out], zeros, where
fan_out is the last dimension and fan_in the product of the others (a dense kernel [in, out]; a convolution
kernel [h, w, in, out] reads as [h * w * in, out]). For `.../query/kernel` they are `.../query/lora_a` and
`.../query/lora_b` (for a leaf not named `kernel`, `NAME_lora_a` and `NAME_lora_b`).

The model sees `W + (alpha / rank) * (lora_a @ lora_b)`, reshaped to W's shape: `wrap_apply_fn` merges the
factors into the parameters before every call of the apply function, so any model gets adapters without an edit.
The base weights are frozen (jft's freezing: no gradient and no optimizer state); the adapters and the
parameters named by `config.lora.train` (default: the new head) train. `merge` is also the export: its result is
a plain parameter tree of the base model's shape.

With pruning, a pruned base weight is zero and stays so: `merge(..., keep_zeros=True)` adds the adapters only
where the base weight is non-zero, so the merged kernel is `(W + s * A @ B) * mask` and a merge keeps the
sparsity. (A pretrained weight that is exactly 0.0 is then treated as pruned.)

PEFT's `lora_dropout` drops the adapters' input activations, which a transformation of the parameters never sees;
jft's LoRA has none.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jft import pruning, rules, tree_paths
from jft.apply_fn import ApplyFn
from jft.errors import UserError

PyTree = Any
# BERT's attention and MLP kernels: PEFT's target_modules query, key, value and the dense layers.
DEFAULT_TARGETS = (r'encoder/layer_\d+/attention/(query|key|value|output)/kernel',
                   r'encoder/layer_\d+/mlp/(intermediate|output)/kernel')
DEFAULT_TRAIN = (r'head/.*',)
ADAPTER = r'.*lora_[ab]'  # the paths of every adapter factor
ADAPTER_STREAM = 0x10AA  # folded into the init key: the adapters' draws do not shift the model's


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """`config.lora` once checked: factors of `rank` on `targets`, scaled by `alpha / rank`; `train` also trains."""

  rank: int
  alpha: float
  targets: tuple[str, ...]
  train: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def settings(config: ml_collections.ConfigDict) -> LoraSettings | None:
  """The LoRA settings of a run's config; None when `config.lora` is absent or its rank is 0 (off)."""
  lora = config.get('lora')
  if not lora or not lora.get('rank'):
    return None
  targets = tuple(lora.get('targets') or DEFAULT_TARGETS)
  train = DEFAULT_TRAIN if lora.get('train') is None else tuple(lora.train)
  return LoraSettings(rank=int(lora.rank), alpha=float(lora.get('alpha', lora.rank)), targets=targets, train=train)


def adapter_paths(path: str) -> tuple[str, str]:
  """The paths of the two factors of the parameter at `path`: beside a `kernel`, `lora_a` and `lora_b`."""
  parent, _, name = path.rpartition('/')
  prefix = f'{parent}/' if parent else ''
  if name == 'kernel':
    return f'{prefix}lora_a', f'{prefix}lora_b'
  return f'{prefix}{name}_lora_a', f'{prefix}{name}_lora_b'


def target_paths(params: PyTree, targets: Sequence[str]) -> list[str]:
  """The paths of `params` (arrays or shapes) that `targets` select; fails on a pattern that selects nothing or
  a parameter of fewer than 2 dimensions."""
  flat = tree_paths.flatten(params)
  for pattern in targets:
    rules.check_matches('lora.targets', pattern, list(flat))
  selected = [path for path in flat if rules.matches_any(path, targets)]
  flat_ones = [path for path in selected if len(flat[path].shape) < 2]
  if flat_ones:
    raise UserError(f'config.lora.targets select {", ".join(flat_ones)}, of fewer than 2 dimensions: a low-rank '
                    'update needs a matrix (a kernel or an embedding); narrow the patterns')
  return selected


def _fan_in_out(shape: tuple[int, ...]) -> tuple[int, int]:
  return math.prod(shape[:-1]), shape[-1]


def add_adapters(params: PyTree, lora: LoraSettings, rng: jax.Array) -> PyTree:
  """`params` with the two factors beside each target: `lora_a` uniform in +-1/sqrt(fan_in) (PEFT's
  Kaiming-uniform with a = sqrt(5)), each from its own key folded from `rng` by the target's position, and
  `lora_b` zeros, so the model starts as the base model exactly."""
  flat = tree_paths.flatten(params)
  targets = target_paths(params, lora.targets)
  for i, path in enumerate(targets):
    kernel = flat[path]
    fan_in, fan_out = _fan_in_out(kernel.shape)
    path_a, path_b = adapter_paths(path)
    if path_a in flat or path_b in flat:
      raise UserError(f'{path} already has adapters ({path_a}): LoRA is applied once')
    bound = 1 / math.sqrt(fan_in)
    flat[path_a] = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, lora.rank), kernel.dtype, -bound, bound)
    flat[path_b] = jnp.zeros((lora.rank, fan_out), kernel.dtype)
  return tree_paths.unflatten(flat)


def with_adapters(init_variables: Callable[[jax.Array], tuple[PyTree, PyTree]],
                  lora: LoraSettings) -> Callable[[jax.Array], tuple[PyTree, PyTree]]:
  """`init_variables(rng) -> (params, model_state)` of the adapted model: the base model's, plus adapters drawn
  from a key of their own."""

  def init(rng):
    params, model_state = init_variables(rng)
    return add_adapters(params, lora, jax.random.fold_in(rng, ADAPTER_STREAM)), model_state

  return init


def merged_for_run(params: PyTree, run_config: dict) -> PyTree:
  """The parameters of a saved run as its model saw them: adapters merged with that run's `lora` settings (pruned
  weights kept zero if it pruned), as numpy arrays; a run without adapters comes back unchanged."""
  if not has_adapters(params):
    return params
  config = ml_collections.ConfigDict(run_config)
  lora = settings(config)
  if lora is None:
    raise UserError('a run whose parameters hold LoRA adapters has no config.lora to merge them with')
  return jax.tree.map(np.asarray, merge(params, lora.scale, keep_zeros=pruning.is_on(config.get('prune'))))


def has_adapters(params: PyTree) -> bool:
  return any(re.fullmatch(ADAPTER, path) for path in tree_paths.flatten(params))


def merge(params: PyTree, scale: float, keep_zeros: bool = False) -> PyTree:
  """The base model's parameters: each adapted `W` replaced by `W + scale * (lora_a @ lora_b)` (in W's shape and
  dtype), the factors removed. `keep_zeros`: the update is added only where W is non-zero (pruned weights stay
  zero). A tree without adapters comes back unchanged. Pure: works under `jax.jit` and in `jax.grad`."""
  flat = tree_paths.flatten(params)
  merged, used = {}, set()
  for path, leaf in flat.items():
    if re.fullmatch(ADAPTER, path):
      continue
    path_a, path_b = adapter_paths(path)
    if path_a in flat:
      update = (flat[path_a] @ flat[path_b]).reshape(leaf.shape).astype(leaf.dtype)
      leaf = leaf + scale * (jnp.where(leaf != 0, update, 0) if keep_zeros else update)
      used.update((path_a, path_b))
    merged[path] = leaf
  orphans = [path for path in flat if re.fullmatch(ADAPTER, path) and path not in used]
  if orphans:
    raise UserError(f'adapter factors without the parameter they adapt: {", ".join(orphans)}')
  return tree_paths.unflatten(merged)


def merge_in_place(params: PyTree, scale: float, keep_zeros: bool = False) -> PyTree:
  """`params` with each adapted weight replaced by its merge, the factors kept: the same tree structure (what
  pruning ranks when the model sees merged weights)."""
  merged = tree_paths.flatten(merge(params, scale, keep_zeros))
  return tree_paths.unflatten({path: merged.get(path, leaf) for path, leaf in tree_paths.flatten(params).items()})


def wrap_apply_fn(apply_fn: ApplyFn, scale: float, keep_zeros: bool = False) -> ApplyFn:
  """The apply function of the adapted model: `apply_fn` of the merged parameters."""

  def lora_apply_fn(params, model_state, inputs, train, rng):
    return apply_fn(merge(params, scale, keep_zeros), model_state, inputs, train, rng)

  return lora_apply_fn


def freeze_rule(lora: LoraSettings) -> str:
  """A `config.freeze` regex for every parameter but the adapters and those `lora.train` names."""
  trained = '|'.join(f'(?:{p})' for p in (ADAPTER, *lora.train))
  return f'(?!(?:{trained})$).*'
