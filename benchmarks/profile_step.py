"""Where the MiniLM fine-tuning step's time goes: a jax.profiler trace of the compiled step, per-op times summed.

python benchmarks/profile_step.py [--length=128] [--top=30]
Compiles the step with XLA's per-thunk trace events on, traces two steps, and prints the milliseconds per step
of each kind of op (fusion names without their numbers) and of each model part (the op's `op_name` metadata:
forward or backward, matmul or elementwise, the module path), summed over XLA's worker threads (which overlap,
so the sum exceeds the wall time). The tables in benchmarks/README.md come from this script.
"""

import collections
import glob
import re
import tempfile

import jax
from absl import app, flags
from jax._src.lib import _profile_data
from minilm_setup import MiniLMSetup

_LENGTH = flags.DEFINE_integer('length', 128, 'tokens per example (batch 32)')
_TOP = flags.DEFINE_integer('top', 30, 'rows of each table')
STEPS = 2


def op_metadata(hlo_text: str) -> dict[str, str]:
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
    if match:
      names.setdefault(match.group(1), match.group(2))
  return names


def model_part(op_name: str, event: str) -> str:
  direction = 'backward' if 'transpose(jvp' in op_name else 'forward'
  kind = 'matmul' if event.startswith(('ynn', 'dot')) else 'elementwise'
  path = re.sub(r'layer_\d+', 'layer_N', op_name)
  path = re.sub(r'transpose\(jvp\(\w+\)\)/|jvp\(\w+\)/|^jit\(train_step\)/', '', path)
  return f'{direction:8s} {kind:11s} {"/".join(path.split("/")[:4])}'


def main(_):
  setup = MiniLMSetup(32, _LENGTH.value)
  state, train_step = setup.state_and_step()
  lowered = train_step.lower(state, setup.device_batch)
  compiled = lowered.compile(compiler_options={'xla_cpu_enable_xprof_traceme': True})  # per-op trace events
  metadata = op_metadata(compiled.as_text())
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, setup.device_batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(STEPS):
        state, metrics = compiled(state, setup.device_batch)
      jax.block_until_ready(metrics)
    profile = _profile_data.ProfileData.from_file(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0])
    by_kind, by_part = collections.Counter(), collections.Counter()
    for plane in profile.planes:
      for line in plane.lines:
        if 'XLAEigen' not in line.name:
          continue
        for event in line.events:
          if event.name.startswith(('ThunkExecutor', 'Slinky', 'end:')):
            continue
          by_kind[re.sub(r'\.\d+$', '', event.name)] += event.duration_ns
          by_part[model_part(metadata.get(event.name, '?'), event.name)] += event.duration_ns
  total = sum(by_kind.values())
  print(f'MiniLM step at 32 x {_LENGTH.value}: {total / STEPS / 1e6:.0f} ms of op time per step over all threads')
  for title, table in (('by op kind', by_kind), ('by model part', by_part)):
    print(f'\n{title}:')
    for name, ns in table.most_common(_TOP.value):
      print(f'{ns / STEPS / 1e6:9.1f} ms {100 * ns / total:5.1f}%  {name}')


if __name__ == '__main__':
  app.run(main)
