"""What freezing saves on MiniLM: the step time of a linear probe and of training the top 2 layers + head, each
as a ratio to the full fine-tuning step on the same batch in the same run, and each one's optimizer-state bytes.

python benchmarks/freezing.py [--batch_size=32] [--length=128] [--steps=8]
The three steps run in interleaved rounds, so machine noise hits them alike. A frozen parameter gets no
gradient (the backward pass stops at the lowest trainable layer) and no optimizer state.
"""

import json
import statistics
import time

import jax
from absl import app, flags
from minilm_setup import MiniLMSetup
from timing import interleaved_times

from jft import host_memory, tree_paths

_BATCH = flags.DEFINE_integer('batch_size', 32, 'examples per step')
_LENGTH = flags.DEFINE_integer('length', 128, 'tokens per example')
_STEPS = flags.DEFINE_integer('steps', 8, 'timed steps of each kind')
_ROUND = flags.DEFINE_integer('round', 2, 'steps of one kind before switching to the next')

FREEZE = {
    'full': (),
    'linear_probe': (r'(?!head/).*',),
    'top2_and_head': ('embeddings/.*', 'encoder/layer_[0-3]/.*'),
}


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  setup = MiniLMSetup(_BATCH.value, _LENGTH.value)
  runs = {name: list(setup.state_and_step(freeze)) for name, freeze in FREEZE.items()}

  def run(name):
    state, train_step = runs[name]
    state, metrics = train_step(state, setup.device_batch)
    jax.block_until_ready(metrics)
    runs[name][0] = state

  compile_s = {}
  for name in runs:  # compile and warm up each
    start = time.perf_counter()
    run(name)
    compile_s[name] = round(time.perf_counter() - start, 2)
  times = interleaved_times({name: lambda name=name: run(name) for name in runs}, _STEPS.value, _ROUND.value)
  median = {name: statistics.median(t) for name, t in times.items()}
  result = {'batch_size': _BATCH.value, 'length': _LENGTH.value, 'steps_each': len(times['full'])}
  for name in runs:
    state = runs[name][0]
    trainable = sum(leaf.size for leaf, t in zip(jax.tree.leaves(state.params),
                                                 jax.tree.leaves(setup.labels(FREEZE[name]).trainable), strict=True)
                    if t)
    result[name] = {'step_s_median': round(median[name], 4), 'ratio_to_full': round(median[name] / median['full'], 3),
                    'trainable_params': int(trainable), 'optimizer_state_bytes': tree_paths.tree_bytes(state.opt_state),
                    'first_step_s (compile)': compile_s[name]}
  print(f"{'step':<15} {'median s':>9} {'/ full':>7} {'trainable':>12} {'opt state MiB':>14}")
  for name in runs:
    r = result[name]
    print(f"{name:<15} {r['step_s_median']:>9.3f} {r['ratio_to_full']:>7.3f} {r['trainable_params']:>12,} "
          f"{r['optimizer_state_bytes'] / 2**20:>14.2f}")
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
