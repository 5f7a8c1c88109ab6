"""int8 weights: per-channel symmetric quantization as a transformation of the parameters, like LoRA's
(jft/lora.py), so any model gets it unedited.

A target parameter w (`config.quantize.targets`, `re.fullmatch` over paths; default every kernel and embedding)
is stored as int8 q = clip(round(w * (1/s)), -127, 127) with one float32 scale s = max|w| * float32(1/127) per
channel (0 -> 1): per output channel (the last axis) for kernels, per row (token) for embedding tables
(`channel_axis`). The model computes with dequantize(q, s) = float32(q) * s, exactly the values
`jft.export --int8` stores and `load()` gives back. Zeros stay zeros (round(0) = 0), so pruning composes.

Quantization-aware training (`config.quantize.mode = 'qat'`): `wrap_apply_fn` makes the model compute with those
values in training and evaluation; the float weights are the masters the optimizer moves, and the gradient passes
the rounding unchanged (the straight-through estimator). With LoRA the merged weights are quantized.
Post-training quantization of a finished run: `python -m jft.quantize` (jft/quantize.py).
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jft import rules, tree_paths
from jft.apply_fn import ApplyFn
from jft.errors import UserError

PyTree = Any
DEFAULT_TARGETS = (r'.*kernel', r'.*embedding')
MODES = ('none', 'qat')
QMAX = 127


def settings(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The target regexes of a config whose `quantize.mode` is 'qat'; None when off (mode 'none' or absent)."""
  quantize = config.get('quantize')
  mode = quantize.get('mode', 'none') if quantize else 'none'
  if mode not in MODES:
    raise UserError(f'unknown config.quantize.mode {mode!r}; use one of {MODES} (post-training quantization of a '
                    'finished run is `python -m jft.quantize --workdir=RUN`)')
  return None if mode == 'none' else tuple(quantize.get('targets') or DEFAULT_TARGETS)


def channel_axis(path: str, shape: Sequence[int]) -> int:
  """The axis with one scale per index: rows of an embedding table (one per token), else the last (outputs)."""
  return 0 if path.rpartition('/')[2] == 'embedding' or len(shape) < 2 else len(shape) - 1


def target_paths(paths: Sequence[str], targets: Sequence[str]) -> list[str]:
  """The `paths` that `targets` select (each pattern given must select one, `rules.check_matches`; the defaults
  may match nothing, as a CNN has no embedding)."""
  for pattern in () if tuple(targets) == DEFAULT_TARGETS else targets:
    rules.check_matches('quantize.targets', pattern, paths)
  return [path for path in paths if rules.matches_any(path, targets)]


class Quantized(NamedTuple):
  """int8 values shaped like the weight and float32 scales with 1s on every axis but `axis`."""

  values: Any
  scales: Any
  axis: int


def quantize(weight: jax.Array, axis: int, xp=jnp) -> Quantized:
  """Per-channel symmetric int8 of `weight` along `axis` (`xp`: jax.numpy, or numpy for exported files)."""
  weight = xp.asarray(weight, dtype=xp.float32)
  others = tuple(a for a in range(weight.ndim) if a != axis % max(weight.ndim, 1))
  # Products with float32 reciprocals (of 127, of each scale), never divisions: XLA turns a division by a broadcast
  # into such a product and NumPy divides, so `w / s` rounded one weight in about a million otherwise.
  scales = xp.max(xp.abs(weight), axis=others, keepdims=True) * xp.float32(1 / QMAX)
  scales = xp.where(scales > 0, scales, xp.float32(1)).astype(xp.float32)
  values = xp.clip(xp.round(weight * (xp.float32(1) / scales)), -QMAX, QMAX).astype(xp.int8)
  return Quantized(values, scales, axis)


def dequantize(quantized: Quantized, xp=jnp) -> Any:
  """float32(q) * s: the weights the quantized model computes with."""
  return quantized.values.astype(xp.float32) * quantized.scales


def fake_quantize(weight: jax.Array, axis: int) -> jax.Array:
  """dequantize(quantize(weight)) forward, exactly; the identity backward (straight-through estimator)."""
  rounded = dequantize(quantize(jax.lax.stop_gradient(weight), axis)).astype(weight.dtype)
  return rounded + (weight - jax.lax.stop_gradient(weight))  # + exactly 0 forward, gradient 1 backward


def fake_quantize_params(params: PyTree, targets: Sequence[str]) -> PyTree:
  """`params` with every target weight replaced by its int8 values, dequantized (straight-through gradients)."""

  def one(path, leaf):
    name = tree_paths.path_str(path)
    if not rules.matches_any(name, targets):
      return leaf
    return fake_quantize(leaf, channel_axis(name, leaf.shape))

  return jax.tree_util.tree_map_with_path(one, params)


def wrap_apply_fn(apply_fn: ApplyFn, targets: Sequence[str]) -> ApplyFn:
  """The apply function of the quantized model: `apply_fn` of the fake-quantized parameters."""

  def quantized_apply_fn(params, model_state, inputs, train, rng):
    return apply_fn(fake_quantize_params(params, targets), model_state, inputs, train, rng)

  return quantized_apply_fn


def quantize_flat(params: dict[str, np.ndarray], targets: Sequence[str]) -> dict[str, Quantized]:
  """{path: its int8 form} (numpy) for the target paths of a flat {path: array} of host arrays."""
  return {path: quantize(params[path], channel_axis(path, params[path].shape), xp=np)
          for path in target_paths(list(params), targets)}
