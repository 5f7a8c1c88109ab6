"""How fast jft fine-tunes MiniLM: step time at batch 32 x 128 tokens, compile time, examples per second,
and the fraction of this machine's matmul peak, measured in the same run.

python benchmarks/minilm_step.py [--batch_size=32] [--length=128] [--steps=10]
FLOPs are counted analytically (the matmuls of a BERT forward pass, times 3 for forward + backward) and
cross-checked against XLA's own count of the compiled step. The peak is the best of several large
float32 `jnp.dot`s timed in this process, so both numbers see the same machine and the same load.
"""

import json
import statistics
import time

import jax
from absl import app, flags
from minilm_setup import NUM_CLASSES, MiniLMSetup, forward_flops, matmul_peak_flops

from jft import host_memory

_BATCH = flags.DEFINE_integer('batch_size', 32, 'examples per step')
_LENGTH = flags.DEFINE_integer('length', 128, 'tokens per example')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps after the warm-up')


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  batch_size, length = _BATCH.value, _LENGTH.value
  setup = MiniLMSetup(batch_size, length)
  state, train_step = setup.state_and_step()
  device_batch = setup.device_batch

  start = time.perf_counter()
  compiled = train_step.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  xla_flops = (compiled.cost_analysis() or {}).get('flops')

  state, metrics = compiled(state, device_batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  peak = matmul_peak_flops()
  step_flops = 3 * forward_flops(setup.config, batch_size, length, NUM_CLASSES)
  result = {
      'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'batch_size': batch_size, 'length': length,
      'step_s_median': round(step_s, 4), 'step_s_min': round(min(times), 4), 'compile_s': round(compile_s, 2),
      'examples_per_s': round(batch_size / step_s, 2),
      'step_gflop_analytic': round(step_flops / 1e9, 1),
      'step_gflop_xla': round(xla_flops / 1e9, 1) if xla_flops else None,
      'achieved_gflop_per_s': round(step_flops / step_s / 1e9, 1),
      'matmul_peak_gflop_per_s': round(peak / 1e9, 1),
      'fraction_of_peak': round(step_flops / step_s / peak, 3),
  }
  print(f"MiniLM fine-tuning step at {batch_size} x {length}: {result['step_s_median']} s (median of "
        f"{len(times)}), compile {result['compile_s']} s, {result['examples_per_s']} examples/s, "
        f"{result['achieved_gflop_per_s']} GFLOP/s = {result['fraction_of_peak']:.1%} of the measured matmul peak "
        f"({result['matmul_peak_gflop_per_s']} GFLOP/s)")
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
