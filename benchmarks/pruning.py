"""What pruning costs on MiniLM: the pruned training step (masks in the optimizer, gradients and updates
masked) as a ratio to the dense step on the same batch in the same run, and the cost of one mask update.

python benchmarks/pruning.py [--batch_size=32] [--length=128] [--steps=8] [--sparsity=0.9]
The pruned model is first pruned to --sparsity (layer scope, magnitude), so its step does the same dense
matmuls on weights that are mostly zero: jft keeps the masks out of the forward pass and prunes on schedule,
never inside the step. The mask update (magnitudes -> masks -> params and optimizer state) is timed apart.
"""

import json
import statistics
import time

import jax
from absl import app, flags
from minilm_setup import MiniLMSetup
from timing import interleaved_times

from jft import host_memory, pruning

_BATCH = flags.DEFINE_integer('batch_size', 32, 'examples per step')
_LENGTH = flags.DEFINE_integer('length', 128, 'tokens per example')
_STEPS = flags.DEFINE_integer('steps', 8, 'timed steps of each kind')
_ROUND = flags.DEFINE_integer('round', 2, 'steps of one kind before switching to the other')
_SPARSITY = flags.DEFINE_float('sparsity', 0.9, 'sparsity of the pruned model')


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  setup = MiniLMSetup(_BATCH.value, _LENGTH.value)
  prunable = pruning.prunable(setup.params)
  runs = {'dense': list(setup.state_and_step()), 'pruned': list(setup.state_and_step(prunable=prunable))}

  set_masks = jax.jit(lambda state, masks: state.replace(
      params=pruning.apply_masks(state.params, masks), opt_state=pruning.with_new_masks(state.opt_state, masks)),
      donate_argnums=0)

  def update_masks():
    state = runs['pruned'][0]
    masks = pruning.compute_masks(state.params, prunable, _SPARSITY.value, 'layer', 'unstructured')
    runs['pruned'][0] = set_masks(state, masks)
    jax.block_until_ready(runs['pruned'][0].params)

  start = time.perf_counter()
  update_masks()
  first_update_s = time.perf_counter() - start
  mask_update_s = []
  for _ in range(3):
    start = time.perf_counter()
    update_masks()
    mask_update_s.append(time.perf_counter() - start)

  def run(name):
    state, train_step = runs[name]
    state, metrics = train_step(state, setup.device_batch)
    jax.block_until_ready(metrics)
    runs[name][0] = state

  for name in runs:
    run(name)  # compile and warm up
  times = interleaved_times({name: lambda name=name: run(name) for name in runs}, _STEPS.value, _ROUND.value)
  median = {name: statistics.median(t) for name, t in times.items()}
  report = pruning.sparsity_report(runs['pruned'][0].params, pruning.masks_of(runs['pruned'][0].opt_state))
  result = {
      'batch_size': _BATCH.value, 'length': _LENGTH.value, 'steps_each': len(times['dense']),
      'dense_step_s': round(median['dense'], 4), 'pruned_step_s': round(median['pruned'], 4),
      'ratio_pruned_over_dense': round(median['pruned'] / median['dense'], 3),
      'sparsity_prunable_after_training': round(report['sparsity/prunable'], 4),
      'mask_update_s': round(statistics.median(mask_update_s), 3), 'first_mask_update_s (compile)':
      round(first_update_s, 2),
  }
  print(f"pruned step {result['pruned_step_s']} s, dense step {result['dense_step_s']} s (median of "
        f"{result['steps_each']} each): ratio {result['ratio_pruned_over_dense']}; one mask update "
        f"{result['mask_update_s']} s ({result['mask_update_s'] / result['dense_step_s']:.2f} dense steps)")
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
