"""The MiniLM train step with the attention in chunks of heads (jft's default on one CPU device) against the
attention in one piece, both compiled in one process and timed interleaved, at each given length.

python benchmarks/attention_chunks.py [--lengths=17,33,64,128] [--steps=20] [--chunks=2]
Prints each length's median step time both ways, their ratio (chunks / one piece), the seconds XLA took to compile
each and whether the first step's loss and gradient norm agree to the bit. The chunk count comes from
`bert.CPU_ATTENTION_CHUNKS` unless `--chunks` is given; they are used at every length here, also below
`bert.CPU_ATTENTION_MIN_LENGTH`, where jft itself keeps one piece (this script shows why). Why chunks:
`jft.models.bert.attention_head_chunks`.
"""

from unittest import mock

import jax
import jax.monitoring
from absl import app, flags
from minilm_setup import MiniLMSetup, median_step_times
from timing import machine

from jft import host_memory
from jft.models import bert

_LENGTHS = flags.DEFINE_list('lengths', ['17', '33', '64', '128'], 'tokens per example (batch 32)')
_STEPS = flags.DEFINE_integer('steps', 20, 'timed steps of each kind per length')
_CHUNKS = flags.DEFINE_integer('chunks', None, 'chunks of heads (default: bert.CPU_ATTENTION_CHUNKS)')


COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # XLA's compilation of a program
_compile_seconds = []


def _record_compile(event: str, duration_secs: float, **_) -> None:
  if event == COMPILE_EVENT:
    _compile_seconds.append(duration_secs)


def compiled_run(setup: MiniLMSetup, chunks: int) -> tuple[list, float]:
  """([state, train step, first metrics], seconds XLA spent compiling the step) with the attention in `chunks`
  chunks of heads."""
  _compile_seconds.clear()
  with mock.patch.object(bert, 'CPU_ATTENTION_CHUNKS', chunks), mock.patch.object(bert, 'CPU_ATTENTION_MIN_LENGTH', 0):
    state, train_step = setup.state_and_step()
    state, metrics = train_step(state, setup.device_batch)  # traced and compiled here, with the patch in force
    jax.block_until_ready(metrics)
  return [state, train_step, metrics], sum(_compile_seconds)


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  jax.monitoring.register_event_duration_secs_listener(_record_compile)
  chunks = _CHUNKS.value or bert.CPU_ATTENTION_CHUNKS
  print(machine())
  print(f'attention in {chunks} chunks of heads against one piece, on {jax.devices()[0].platform}')
  print('| length | one piece s | chunks s | chunks / one piece | XLA compile: one piece / chunks s '
        '| same first step |')
  print('|---|---|---|---|---|---|')
  for length in map(int, _LENGTHS.value):
    setup = MiniLMSetup(32, length)
    runs, compile_s = {}, {}
    for name, count in (('one piece', 1), ('chunks', chunks)):
      runs[name], compile_s[name] = compiled_run(setup, count)
    same = all(float(runs['one piece'][2][k]) == float(runs['chunks'][2][k]) for k in ('loss', 'grad_norm'))
    medians = median_step_times(setup, {name: tuple(run[:2]) for name, run in runs.items()}, _STEPS.value)
    one, split = medians['one piece'], medians['chunks']
    print(f'| 32 x {length} | {one:.3f} | {split:.3f} | **{split / one:.3f}** | '
          f'{compile_s["one piece"]:.1f} / {compile_s["chunks"]:.1f} | {"yes" if same else "NO"} |', flush=True)


if __name__ == '__main__':
  app.run(main)
