"""int8 weights: per-channel symmetric quantization, after training (PTQ) or during it (quantization-aware
training, QAT), as a transformation of the parameters like LoRA's (jft/lora.py), so any model gets it unedited.

A target parameter w (`config.quantize.targets`, `re.fullmatch` over paths; default every kernel and embedding)
is stored as int8 q = clip(round(w / s), -127, 127) with one float32 scale s = max|w| * float32(1/127) per
channel (0 -> 1): per output channel (the last axis) for kernels, per row (token) for embedding tables
(`channel_axis`). The model
computes with dequantize(q, s) = float32(q) * s, exactly the values `jft.export --int8` stores and `load()` gives
back. Zeros stay zeros (round(0) = 0), so pruning composes.

QAT (`config.quantize.mode = 'qat'`): `wrap_apply_fn` makes the model compute with those values in training and
evaluation; the float weights are the masters the optimizer moves, and the gradient passes the rounding unchanged
(the straight-through estimator). With LoRA the merged weights are quantized.

PTQ: `python -m jft.quantize --workdir=RUN [--step=N] [--split=test]` evaluates a finished run's checkpoint (by
default the step its test line tested) in float32 and in int8 on the same texts, and writes both to
RUN/quantized.json.
"""

import json
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jft import tree_paths
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


def target_paths(params: PyTree, targets: Sequence[str]) -> list[str]:
  """The paths of the parameters `targets` select (at least one per pattern given, or a UserError; the defaults
  may match nothing, as a CNN has no embedding)."""
  paths = list(tree_paths.flatten(params))
  for pattern in () if tuple(targets) == DEFAULT_TARGETS else targets:
    if not any(re.fullmatch(pattern, path) for path in paths):
      raise UserError(f'config.quantize.targets pattern {pattern!r} matches no parameter; `python -m jft.inspect` '
                      'lists the paths')
  return [path for path in paths if any(re.fullmatch(pattern, path) for pattern in targets)]


class Quantized(NamedTuple):
  """int8 values shaped like the weight and float32 scales with 1s on every axis but `axis`."""

  values: Any
  scales: Any
  axis: int


def quantize(weight: jax.Array, axis: int, xp=jnp) -> Quantized:
  """Per-channel symmetric int8 of `weight` along `axis` (`xp`: jax.numpy, or numpy for exported files)."""
  weight = xp.asarray(weight, dtype=xp.float32)
  others = tuple(a for a in range(weight.ndim) if a != axis % max(weight.ndim, 1))
  # times the float32 of 1/127, not / 127: XLA and NumPy then round alike (XLA may turn a division into this)
  scales = xp.max(xp.abs(weight), axis=others, keepdims=True) * xp.float32(1 / QMAX)
  scales = xp.where(scales > 0, scales, xp.float32(1)).astype(xp.float32)
  values = xp.clip(xp.round(weight / scales), -QMAX, QMAX).astype(xp.int8)
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
    if not any(re.fullmatch(pattern, name) for pattern in targets):
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
  chosen = target_paths(tree_paths.unflatten(params), targets)
  return {path: quantize(params[path], channel_axis(path, params[path].shape), xp=np) for path in chosen}


class EvalState(NamedTuple):
  """What an eval step reads of a train state."""

  params: PyTree
  model_state: PyTree
  rng: jax.Array


def evaluate_run(workdir: str, step: int | None = None, split: str | None = None,
                 targets: Sequence[str] | None = None) -> dict[str, Any]:
  """{'float32': metrics, 'int8': metrics, 'mcnemar_int8_vs_float32': the paired test, ...} of a run's checkpoint
  on `split` (default: the test split): its float32 weights (a QAT run's masters), and those with the `targets`
  (default: the run's, or every kernel and embedding) quantized. `step` None: the step the run's test line
  tested, else its latest."""
  from jft import components, data, lora, metrics, sharding  # here: jft.components imports this module
  from jft import init as init_lib
  from jft import step as step_lib

  step = tested_step(workdir) if step is None else step
  run = init_lib.read_run(workdir, items=('params', 'model_state'), step=step)
  if run is None:
    raise UserError(f'{workdir} has no checkpoint{"" if step is None else f" at step {step}"}; give the work '
                    'directory of a finished jft run')
  config = ml_collections.ConfigDict(run.config)
  run_targets = settings(config)
  targets = tuple(targets or run_targets or DEFAULT_TARGETS)
  if config.get('lora'):
    config.lora.rank = 0  # the merged weights are evaluated below
  if config.get('quantize'):
    config.quantize.mode = 'none'
  model = components.build_model(config)
  params = jax.tree.map(jnp.asarray, lora.merged_for_run(run.params, run.config))
  mesh = sharding.make_mesh(shape=config.get('mesh'))
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model.apply_fn, model.num_classes), mesh)
  split = split or config.data.test_split
  results, correct = {'step': run.step, 'split': split, 'targets': list(targets)}, {}
  for name, weights in (('float32', params), ('int8', fake_quantize_params(params, targets))):
    state = EvalState(weights, jax.tree.map(jnp.asarray, run.model_state or {}), jax.random.PRNGKey(0))
    batches = data.eval_batches(config.data, split, config.batch_size)
    results[name], predictions = step_lib.evaluate(eval_step, state, batches, mesh, keep_predictions=True)
    correct[name] = predictions['prediction'] == predictions['label']
  results['mcnemar_int8_vs_float32'] = metrics.mcnemar(correct['int8'], correct['float32'])
  return results


def tested_step(workdir: str) -> int | None:
  """The step the run's test line tested (its best or last checkpoint), None if it has no test line."""
  try:
    with open(f'{workdir}/metrics.jsonl') as f:
      tests = [json.loads(line) for line in f if '"split": "test"' in line]
  except FileNotFoundError:
    return None
  return tests[-1].get('tested_step', tests[-1]['step']) if tests else None


def main() -> None:
  from absl import flags

  workdir = flags.DEFINE_string('workdir', None, 'a finished jft run')
  step = flags.DEFINE_integer('step', None, 'the checkpoint (default: the one its test line tested)')
  split = flags.DEFINE_string('split', None, 'the split to evaluate (default: the run\'s test split)')
  usage = 'usage: python -m jft.quantize --workdir=RUN [--step=N] [--split=SPLIT]'
  try:
    flags.FLAGS(sys.argv)
  except flags.Error as e:
    print(f'jft: error: {e}\n{usage}', file=sys.stderr)
    sys.exit(2)
  if not workdir.value:
    print(f'jft: error: --workdir=RUN is required\n{usage}', file=sys.stderr)
    sys.exit(2)
  try:
    results = evaluate_run(workdir.value, step.value, split.value)
  except UserError as e:
    print(f'jft: error: {e}', file=sys.stderr)
    sys.exit(2)
  with open(f'{workdir.value}/quantized.json', 'w') as f:
    json.dump(results, f, indent=2)
  for name in ('float32', 'int8'):
    print(f"{name:<8} {results['split']} accuracy {results[name]['accuracy']:.4f} "
          f"macro-F1 {results[name]['macro_f1']:.4f} loss {results[name]['loss']:.4f}")
  test = results['mcnemar_int8_vs_float32']
  print(f"int8 - float32: {test['difference']:+.4f} (right only with int8: {test['a_only']}, only with float32: "
        f"{test['b_only']}; McNemar exact p = {test['p_value']:.3g})")
  print(json.dumps({k: results[k] for k in ('step', 'split', 'mcnemar_int8_vs_float32')} | {
      name: {m: results[name][m] for m in ('accuracy', 'macro_f1', 'loss')} for name in ('float32', 'int8')}))


if __name__ == '__main__':
  main()
