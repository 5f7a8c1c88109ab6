"""Post-training int8 quantization of a finished run: `python -m jft.quantize --workdir=RUN [--step=N]
[--split=SPLIT]` evaluates the run's checkpoint (by default the step its test line tested) in float32 and with its
weights in int8 (jft/int8.py) on the same examples, prints both with their paired McNemar test and writes them to
RUN/quantized.json.
"""

import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import flags

from jft import components, data, int8, lora, metrics, sharding
from jft import init as init_lib
from jft import step as step_lib
from jft.errors import UserError
from jft.state import create_train_state


def evaluate_run(workdir: str, step: int | None = None, split: str | None = None,
                 targets: Sequence[str] | None = None) -> dict[str, Any]:
  """{'float32': metrics, 'int8': metrics, 'mcnemar_int8_vs_float32': the paired test, ...} of a run's checkpoint
  on `split` (default: the test split): its float32 weights (a QAT run's masters), and those with the `targets`
  (default: the run's, or every kernel and embedding) quantized. `step` None: the step the run's test line
  tested, else its latest. 'predictions': each example's index, label and the two predictions, for paired tests
  against other runs."""
  step = tested_step(workdir) if step is None else step
  run = init_lib.read_run(workdir, items=('params', 'model_state'), step=step)
  if run is None:
    raise UserError(f'{workdir} has no checkpoint{"" if step is None else f" at step {step}"}; give the work '
                    'directory of a finished jft run')
  config = ml_collections.ConfigDict(run.config)
  targets = tuple(targets or int8.settings(config) or int8.DEFAULT_TARGETS)
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
  for name, weights in (('float32', params), ('int8', int8.fake_quantize_params(params, targets))):
    state = create_train_state(weights, jax.tree.map(jnp.asarray, run.model_state or {}), optax.identity(),
                               jax.random.PRNGKey(0))
    batches = data.eval_batches(config.data, split, config.batch_size)
    results[name], predictions = step_lib.evaluate(eval_step, state, batches, mesh, keep_predictions=True)
    correct[name] = predictions['prediction'] == predictions['label']
    kept = results.setdefault('predictions', {key: predictions[key].tolist() for key in ('index', 'label')})
    kept[name] = predictions['prediction'].tolist()
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
