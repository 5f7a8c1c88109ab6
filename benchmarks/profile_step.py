"""Where the MiniLM fine-tuning step's time goes: a jax.profiler trace of the compiled step, per-op times summed.

python benchmarks/profile_step.py [--length=128] [--top=30] [--dtype=float32|bfloat16] [--pytorch]
Compiles the step with XLA's per-thunk trace events on, traces two steps, and prints the milliseconds per step
of each kind of op (fusion names without their numbers) and of each model part (the op's `op_name` metadata:
forward or backward, matmul or elementwise, the module path), summed over XLA's worker threads (which overlap,
so the sum exceeds the wall time). The tables in benchmarks/README.md come from this script. XLA runs some ops
(its own `dot`s) asynchronously on its thread pool: their events end at the launch, so their time shows up as gaps.
`--pytorch`: the same step in PyTorch + transformers (benchmarks/pytorch_minilm.py in the PyTorch environment of
vs_pytorch.py), `torch.profiler`'s self CPU time per aten op, for the same comparison op by op.
"""

import collections
import glob
import re
import tempfile

import jax
from absl import app, flags
from jax._src.lib import _profile_data
from minilm_setup import NUM_CLASSES, OPTIM, MiniLMSetup

from jft import host_memory, model_files

_LENGTH = flags.DEFINE_integer('length', 128, 'tokens per example (batch 32)')
_TOP = flags.DEFINE_integer('top', 30, 'rows of each table')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], "the compute dtype (config.model.dtype)")
_PYTORCH = flags.DEFINE_bool('pytorch', False, "profile PyTorch's step instead (self CPU time per aten op)")
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


def profile_pytorch(setup: MiniLMSetup) -> None:
  import vs_pytorch  # noqa: PLC0415 (only this mode needs the PyTorch worker)

  worker = vs_pytorch.TorchWorker(vs_pytorch.torch_python(vs_pytorch._TORCH_VENV.value))
  try:
    worker('setup', model_dir=str(model_files.pretrained_dir('minilm')), num_classes=NUM_CLASSES, head_dropout=0.1,
           lr=OPTIM['lr'], weight_decay=OPTIM['weight_decay'], warmup_steps=OPTIM['warmup_steps'], total_steps=1000,
           clip_norm=OPTIM['clip_norm'])
    result = worker('profile', batch=vs_pytorch.as_lists(setup.batch), steps=STEPS)
  finally:
    worker.close()
  total = sum(result['ops'].values())
  print(f'PyTorch MiniLM step at 32 x {_LENGTH.value}: {result["wall_ms"]:.0f} ms per step under the profiler, '
        f'{total:.0f} ms of self CPU time')
  for name, ms in sorted(result['ops'].items(), key=lambda item: -item[1])[:_TOP.value]:
    print(f'{ms:9.1f} ms {100 * ms / total:5.1f}%  {name}')


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  setup = MiniLMSetup(32, _LENGTH.value, dtype=_DTYPE.value)
  if _PYTORCH.value:
    profile_pytorch(setup)
    return
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
