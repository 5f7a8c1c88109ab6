"""jft against PyTorch + transformers on the same CPU: the MiniLM fine-tuning step and the eval forward pass,
or (--mode=end_to_end) the whole main job.

python benchmarks/vs_pytorch.py [--lengths=32,64,128] [--rounds=5] [--round_size=2]
                                [--torch_venv=~/.cache/jft/torch-venv] [--batch_size=32] [--model=minilm]
                                [--matmul_precision=default|float32] [--dtype=float32|bfloat16]
                                [--torch_allocator=system|jft]
python benchmarks/vs_pytorch.py --mode=end_to_end [--pairs=1] [--torch_allocator=system|jft]
                                [--config=configs/minilm_fortunes.py] [--dtype=float32|bfloat16] [--config.FIELD=VALUE]

Both fine-tune the same classifier on the same batch of 32 token sequences: the pretrained MiniLM encoder,
mean pooling, a new 8-way head, dropout on, AdamW with linear warmup/decay, clipping at global norm 1.0.
PyTorch runs in its own process (benchmarks/pytorch_minilm.py) inside its own virtual environment, created on
first use with `torch==2.13.0` (CPU wheel) and `transformers`; jft never imports torch. The two take turns in
rounds (`round_size` steps of one, then of the other) so that noise on a shared machine hits both alike. Each
turn starts with one more step that is timed apart (`first step of a turn`): it maps again memory the other
process just used and gave back, a cost neither program has when it runs alone (on the 2-core VMs here jft's first
step of a turn at 32 x 128 spent 3.3-4.1 s of system time mapping its 1.6 GB of temporaries, the next 0.13-0.23 s;
benchmarks/README.md).
Prints, per shape, each median step time, the ratio jft / PyTorch and each one's achieved matmul FLOP/s as a
fraction of the matmul peak measured in the same run (the best of jax's and PyTorch's 2048^3 float32 matmul,
8192^3 on a GPU), then the same for the eval-mode forward pass at (2 x batch_size) x 64.

On a GPU (jax's default backend), PyTorch runs on CUDA too. `--matmul_precision=default` leaves JAX's default,
which computes float32 matmuls on TF32 tensor cores on recent GPUs, and sets PyTorch's to match ('high');
`float32` makes both exact float32. `--dtype=bfloat16` runs jft with `config.model.dtype='bfloat16'` and PyTorch
under `torch.autocast(dtype=torch.bfloat16)`: both mixed precision, the weights and optimizer float32.
Host memory: jft runs as `python -m jft.main` does (jft/host_memory.py: jemalloc keeping freed memory where the
system has it); PyTorch with `--torch_allocator=system` (the default) runs as it does out of the box (glibc), with
`jft` on the same setting (PyTorch's own CPU tuning guide recommends jemalloc too). Both are printed.
`--model=DIR` times any BERT directory of the same shape, e.g. randomly initialised weights saved by `transformers`
where the pretrained package is not installed.

End to end: the wall time from launch to the final test metrics of `python -m jft.main --config=...` (a cold
start: its compilation cache off) and of benchmarks/pytorch_fortunes.py, the same recipe in PyTorch on the same
texts (exported from jft's fortunes8 builder beforehand, so neither pays for building the dataset), run one after
the other: `--pairs=N` runs each N times, taking turns jft, PyTorch, PyTorch, jft, jft, ... (these VMs can run a
program 10% slower an hour later; with an even N a steady drift adds alike to both programs' sums, whose ratio is
printed, with each pair's); prints the times, their ratio, each one's peak resident memory, where each one's time
went (setup, training, validation, checkpoints, test; for jft also its compilations, from the test record's
`seconds`) and both test accuracies: of the weights the config's `test_on` picks for both (the main job's: those of
the best validation accuracy), and, tested after the timed runs, of the other rule's (the last weights) too (of the
first run of each; a seed's runs test alike, and a note says where they do not). With `--dtype=bfloat16` both run in
bf16 mixed precision, as in the step mode. Runs of several seeds (`--config.seed=N`), kept as logs, are
summarised with error bars by benchmarks/end_to_end_seeds.py.
"""

import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from minilm_setup import NUM_CLASSES, OPTIM, MiniLMSetup, forward_flops, matmul_peak_flops
from ml_collections import config_flags
from timing import alternating_order, machine, timed_run

from jft import early_stopping, host_memory, model_files
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn

_LENGTHS = flags.DEFINE_list('lengths', ['32', '64', '128'], 'sequence lengths of the training steps (batch 32)')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'turns each framework takes per shape')
_ROUND_SIZE = flags.DEFINE_integer('round_size', 2, 'timed steps per turn, after its first')
_MODE = flags.DEFINE_enum('mode', 'steps', ['steps', 'end_to_end'], 'step times, or the whole main job')
DEFAULT_CONFIG = 'configs/minilm_fortunes.py'
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'the job of --mode=end_to_end')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'examples per training step (the eval forward: twice as many)')
_MODEL = flags.DEFINE_string('model', 'minilm', 'the encoder: a registered name or a Hugging Face BERT directory')
_MATMUL_PRECISION = flags.DEFINE_enum('matmul_precision', 'default', ['default', 'float32'],
                                      "float32 matmuls: each framework's GPU default (TF32), or exact float32")
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'compute dtype: float32, or bf16 mixed precision in both (jft model.dtype, torch.autocast)')
_TORCH_ALLOCATOR = flags.DEFINE_enum(
    'torch_allocator', 'system', ['system', 'jft'],
    "PyTorch's host allocator: the system's (as PyTorch runs by default) or the setting jft restarts itself with")
_PAIRS = flags.DEFINE_integer(
    'pairs', 1, 'end to end: runs of each program, taking turns jft, PyTorch, PyTorch, jft, jft, ...; an even number '
    "cancels a steady drift of the machine's speed in the ratio of the sums", lower_bound=1)
_TORCH_VENV = flags.DEFINE_string('torch_venv', '~/.cache/jft/torch-venv',
                                  'virtual environment with torch and transformers; created if missing')
TORCH_PACKAGES = ('torch==2.13.0', 'transformers', 'numpy')
TORCH_INDEX = 'https://download.pytorch.org/whl/cpu'
EVAL_LENGTH = 64
WORKER = pathlib.Path(__file__).with_name('pytorch_minilm.py')


def torch_python(venv: str) -> str:
  """The python of `venv`, after creating it with torch (CPU wheel) and transformers if it does not exist."""
  venv = pathlib.Path(venv).expanduser()
  python = venv / 'bin' / 'python'
  if not python.exists():
    print(f'creating the PyTorch environment {venv} (once) ...', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    # One retry: where PyTorch's index cannot be reached (a wheel of torch on disk or PyPI mirrors only), pip's
    # default five retries with backoff on every package made this take minutes.
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--retries=1', '--extra-index-url', TORCH_INDEX,
                    *TORCH_PACKAGES], check=True)
  return str(python)


def torch_environment() -> dict[str, str]:
  """The environment of the PyTorch processes (see --torch_allocator)."""
  environ = os.environ if _TORCH_ALLOCATOR.value == 'jft' else host_memory.without_setting(
      os.environ, host_memory.find_jemalloc())
  return {**environ, 'HF_HUB_OFFLINE': '1'}


def host_memory_line() -> str:
  return f'host memory: jft {host_memory.describe()}, PyTorch {host_memory.describe(torch_environment())}'


class TorchWorker:
  """benchmarks/pytorch_minilm.py in the PyTorch environment, one JSON command at a time."""

  def __init__(self, python: str):
    self.process = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=torch_environment())

  def __call__(self, op: str, **kwargs) -> dict:
    self.process.stdin.write(json.dumps({'op': op, **kwargs}) + '\n')
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'the PyTorch worker exited (code {self.process.wait()}); see its error above')
    return json.loads(line)

  def close(self):
    with contextlib.suppress(BrokenPipeError, OSError):
      self.process.stdin.write(json.dumps({'op': 'quit'}) + '\n')
      self.process.stdin.close()
    try:
      self.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.process.kill()


def as_lists(batch: dict[str, np.ndarray]) -> dict[str, list]:
  return {k: v.tolist() for k, v in batch.items()}


def jft_train(setup: MiniLMSetup):
  """A callable that runs `n` jft steps and returns their times, and the step's compile time."""
  state, train_step = setup.state_and_step()
  start = time.perf_counter()
  compiled = train_step.lower(state, setup.device_batch).compile()
  compile_s = time.perf_counter() - start
  holder = {'state': state}

  def run(n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      holder['state'], metrics = compiled(holder['state'], setup.device_batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    return times

  return run, compile_s


def jft_eval(setup: MiniLMSetup):
  logits_fn = step_lib.jit_logits_fn(step_lib.make_logits_fn(linen_apply_fn(setup.module)), setup.mesh)
  params, model_state = jax.device_put((setup.params, setup.model_state))  # once, as a trained state would be

  def run(n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      jax.block_until_ready(logits_fn(params, model_state, setup.device_batch))
      times.append(time.perf_counter() - start)
    return times

  return run


def take_turns(jft_run, torch_run, rounds: int, round_size: int) -> tuple[list[float], ...]:
  """(jft's, PyTorch's) step times after the first of each turn, then (jft's, PyTorch's) first steps of the turns."""
  jft_run(1), torch_run(1)  # warm-up: first calls allocate
  jft_times, torch_times, jft_first, torch_first = [], [], [], []
  for _ in range(rounds):
    first, *rest = jft_run(round_size + 1)
    jft_first.append(first)
    jft_times += rest
    first, *rest = torch_run(round_size + 1)
    torch_first.append(first)
    torch_times += rest
  return jft_times, torch_times, jft_first, torch_first


def export_texts(config, path: str) -> None:
  """The train, validation and test texts and labels of `config.data`, as jft's builder stores them."""
  from jft import data  # here: the step mode needs no tfds or grain (e.g. on an accelerator machine without them)

  splits = {}
  for name in (config.data.train_split, config.data.validation_split, config.data.test_split):
    source = data.data_source(config.data.name, name, config.data.data_dir, config.data.get('classes'))
    records = source.__getitems__(list(range(len(source))))
    splits[name.split('[')[0]] = {'texts': [r['text'].decode('utf-8') for r in records],
                                  'labels': [int(r['label']) for r in records]}
  with open(path, 'w') as f:
    json.dump(splits, f)


def end_to_end(python: str) -> None:
  config = _CONFIG.value
  repo = pathlib.Path(__file__).resolve().parent.parent
  order = alternating_order('jft', 'PyTorch', _PAIRS.value)
  runs = {'jft': [], 'PyTorch': []}  # (wall s, peak GB, the test record) of each run, in order
  with tempfile.TemporaryDirectory() as tmp:
    if not config.data.data_dir:
      config.data.data_dir = os.path.join(tmp, 'tfds')
    texts = os.path.join(tmp, 'texts.json')
    export_texts(config, texts)
    config_arg = next((arg for arg in sys.argv[1:] if arg.startswith('--config=')), f'--config={DEFAULT_CONFIG}')
    overrides = [config_arg] + [arg for arg in sys.argv[1:] if arg.startswith('--config.')]
    jft_command = [sys.executable, '-m', 'jft.main', *overrides, '--compilation_cache=off',
                   f'--config.data.data_dir={config.data.data_dir}']
    if _DTYPE.value != 'float32':
      jft_command.append(f'--config.model.dtype={_DTYPE.value}')
    torch_command = [python, str(WORKER.with_name('pytorch_fortunes.py')), f'--data={texts}',
                     f'--model_dir={model_files.pretrained_dir(config.init)}', f'--steps={config.total_steps}',
                     f'--warmup_steps={config.optim.warmup_steps}', f'--eval_every={config.eval_every}',
                     f'--lr={config.optim.lr}', f'--weight_decay={config.optim.weight_decay}',
                     f'--seed={config.seed}', f'--max_len={config.data.max_len}',
                     f'--test_on={early_stopping.test_on(config)}',
                     *([f'--autocast={_DTYPE.value}'] if _DTYPE.value != 'float32' else [])]
    print(f'machine: {machine()}; {host_memory_line()}\njft: {" ".join(jft_command[1:])} --workdir=...\n'
          f'PyTorch: {" ".join(torch_command[1:])}\norder: {", ".join(order)}', flush=True)
    for turn, name in enumerate(order):
      if name == 'jft':
        workdir = os.path.join(tmp, f'jft_{len(runs["jft"])}')
        seconds, out, peak_gb = timed_run(jft_command + [f'--workdir={workdir}'], cwd=repo)
        runs['jft'].append((seconds, peak_gb, json.loads(out.strip().splitlines()[-1])))
      else:
        seconds, out, peak_gb = timed_run(torch_command, env=torch_environment())
        result = json.loads(out.strip().splitlines()[-1])
        seconds -= result['seconds'].get('other_test', 0.0)  # the other rule's test, after its timed run
        runs['PyTorch'].append((seconds, peak_gb, result))
      print(f'  turn {turn + 1}: {name} {seconds:.0f} s', flush=True)
    jft_test, torch_result = runs['jft'][0][2], runs['PyTorch'][0][2]
    jft_workdir = os.path.join(tmp, 'jft_0')
    with open(os.path.join(jft_workdir, 'metrics.jsonl')) as f:
      jft_curve = [{'step': line['step'], 'validation_accuracy': line['accuracy']} for line in map(json.loads, f)
                   if line['split'] == 'validation']
    # The other rule's test (best validation checkpoint or last state), after the timed runs: the same command
    # with the other `test_on` tests the finished run again without training on.
    other = 'last' if jft_test['test_on'] == 'best' else 'best'
    _, out, _ = timed_run(jft_command + [f'--workdir={jft_workdir}', f'--config.test_on={other}'], cwd=repo)
    jft_tests = {jft_test['test_on']: jft_test, other: json.loads(out.strip().splitlines()[-1])}
    jft_tests = {rule: {'step': test['tested_step'], 'accuracy': test['accuracy']} for rule, test in jft_tests.items()}
  test_accuracy = {'jft': lambda record: record['accuracy'], 'PyTorch': lambda record: record['test_accuracy']}
  print(f'\n{"":8s} {"wall s":>8s} {"test accuracy":>13s} {"peak memory GB":>14s}')
  for name, program_runs in runs.items():
    for seconds, peak_gb, record in program_runs:
      print(f'{name:8s} {seconds:8.0f} {test_accuracy[name](record):13.3f} {peak_gb:14.2f}')
  for name, program_runs in runs.items():
    if len({test_accuracy[name](record) for _, _, record in program_runs}) > 1:
      print(f'NOTE: {name} tested at different accuracies in its runs of the same seed (not deterministic)')
  jft_s, torch_s = (statistics.mean(seconds for seconds, _, _ in runs[name]) for name in ('jft', 'PyTorch'))
  per_pair = ' '.join(f'{a[0] / b[0]:.2f}' for a, b in zip(runs['jft'], runs['PyTorch'], strict=True))
  print(f'jft / PyTorch wall time: {jft_s / torch_s:.2f}' + (f' (of the sums; pair by pair {per_pair})'
                                                           if _PAIRS.value > 1 else ''))
  print(f'both tested on the {jft_test["test_on"]} weights (config.test_on); by each rule, test accuracy (step):')
  for rule in ('best', 'last'):
    theirs = torch_result['tests'][rule]
    print(f'  {rule:4s}  jft {jft_tests[rule]["accuracy"]:.3f} ({jft_tests[rule]["step"]})  '
          f'PyTorch {theirs["accuracy"]:.3f} ({theirs["step"]})')
  phases = ('setup', 'train', 'validation', 'checkpoint', 'test', 'compile')
  print(f'where the wall time went (s; compile: jft making its programs, inside the other phases):\n'
        f'{"":8s} ' + ' '.join(f'{name:>10s}' for name in phases))
  for name, program_runs in runs.items():
    for _, _, record in program_runs:
      seconds = record.get('seconds', {})
      cells = (f'{seconds[phase]:10.1f}' if phase in seconds else f'{"-":>10s}' for phase in phases)
      print(f'{name:8s} ' + ' '.join(cells))
  print('validation accuracy by step:')
  for ours, theirs in zip(jft_curve, torch_result['validation'], strict=False):
    print(f'  {ours["step"]:5d}  jft {ours["validation_accuracy"]:.3f}  PyTorch {theirs["validation_accuracy"]:.3f}')
  print(json.dumps({'machine': machine(), 'host_memory': host_memory_line(), 'seed': config.seed,
                    'dtype': _DTYPE.value, 'jft_s': jft_s, 'torch_s': torch_s, 'order': order,
                    'jft_runs_s': [seconds for seconds, _, _ in runs['jft']],
                    'torch_runs_s': [seconds for seconds, _, _ in runs['PyTorch']],
                    'jft_peak_gb': max(peak for _, peak, _ in runs['jft']),
                    'torch_peak_gb': max(peak for _, peak, _ in runs['PyTorch']), 'jft_test': jft_test,
                    'jft_tests': jft_tests, 'jft_validation': jft_curve, 'torch': torch_result}))


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  python = torch_python(_TORCH_VENV.value)
  if _MODE.value == 'end_to_end':
    return end_to_end(python)
  on_gpu = jax.default_backend() == 'gpu'
  if _MATMUL_PRECISION.value == 'float32':
    jax.config.update('jax_default_matmul_precision', 'float32')
  worker = TorchWorker(python)
  try:
    rows = []
    model_dir = model_files.pretrained_dir(_MODEL.value)
    info = worker('setup', model_dir=model_dir, num_classes=NUM_CLASSES, head_dropout=0.1, lr=OPTIM['lr'],
                  weight_decay=OPTIM['weight_decay'], warmup_steps=OPTIM['warmup_steps'], total_steps=1000,
                  clip_norm=OPTIM['clip_norm'], device='cuda' if on_gpu else 'cpu',
                  matmul_precision='high' if on_gpu and _MATMUL_PRECISION.value == 'default' else 'highest',
                  autocast=None if _DTYPE.value == 'float32' else _DTYPE.value)
    print(f'machine: {machine()}; jax {jax.__version__} on {jax.devices()[0].device_kind}; PyTorch {info["torch"]} '
          f'on {info["device"]} ({info["threads"]} threads, attention {info["attention"]}), transformers '
          f'{info["transformers"]}; float32 matmuls: {_MATMUL_PRECISION.value}; compute dtype: {_DTYPE.value}; '
          f'{host_memory_line()}',
          flush=True)
    batch = _BATCH_SIZE.value
    shapes = [('train', batch, int(length)) for length in _LENGTHS.value if length] + [('eval', 2 * batch, EVAL_LENGTH)]
    for kind, batch_size, length in shapes:
      setup = MiniLMSetup(batch_size, length, _MODEL.value, _DTYPE.value)
      torch_batch = as_lists(setup.batch)
      if kind == 'train':
        jft_run, compile_s = jft_train(setup)
        torch_run = lambda n, b=torch_batch: worker('train', batch=b, steps=n)['times']
        flops = 3 * forward_flops(setup.config, batch_size, length, NUM_CLASSES)
      else:
        jft_run, compile_s = jft_eval(setup), None
        torch_run = lambda n, b=torch_batch: worker('eval', batch=b, steps=n)['times']
        flops = forward_flops(setup.config, batch_size, length, NUM_CLASSES)
      jft_times, torch_times, jft_first, torch_first = take_turns(jft_run, torch_run, _ROUNDS.value,
                                                                  _ROUND_SIZE.value)
      row = {'kind': kind, 'batch': batch_size, 'length': length, 'flops': flops, 'compile_s': compile_s,
             'jft_s': statistics.median(jft_times), 'torch_s': statistics.median(torch_times),
             'jft_s_range': [min(jft_times), max(jft_times)], 'torch_s_range': [min(torch_times), max(torch_times)],
             'jft_first_s': statistics.median(jft_first), 'torch_first_s': statistics.median(torch_first)}
      row['ratio'] = row['jft_s'] / row['torch_s']
      rows.append(row)
      print(f'{kind} {batch_size} x {length}: jft {row["jft_s"]:.3f} s, PyTorch {row["torch_s"]:.3f} s, '
            f'jft / PyTorch {row["ratio"]:.2f} (first step of a turn: jft {row["jft_first_s"]:.3f} s, PyTorch '
            f'{row["torch_first_s"]:.3f} s)', flush=True)
    peak_size = 8192 if on_gpu else 2048  # a GPU needs a larger product to reach its peak
    jax_peak = matmul_peak_flops(peak_size)
    torch_peak = worker('matmul', size=peak_size, repeats=10)['flop_per_s']
  finally:
    worker.close()
  peak = max(jax_peak, torch_peak)
  print(f'\nmatmul peak ({peak_size}^3 float32): jax {jax_peak / 1e9:.0f} GFLOP/s, '
        f'PyTorch {torch_peak / 1e9:.0f} GFLOP/s')
  print(f'{"":6s} {"shape":>9s} {"jft s":>7s} {"PyTorch s":>9s} {"jft/PyTorch":>11s} '
        f'{"jft %peak":>9s} {"PyTorch %peak":>13s} {"jft compile s":>13s}')
  for row in rows:
    compile_s = f'{row["compile_s"]:.1f}' if row['compile_s'] is not None else '-'
    jft_fraction, torch_fraction = row['flops'] / row['jft_s'] / peak, row['flops'] / row['torch_s'] / peak
    print(f'{row["kind"]:6s} {row["batch"]:>4d} x {row["length"]:<3d} {row["jft_s"]:7.3f} {row["torch_s"]:9.3f} '
          f'{row["ratio"]:11.2f} {jft_fraction:9.1%} {torch_fraction:13.1%} {compile_s:>13s}')
  print(json.dumps({'machine': machine(), 'device': jax.devices()[0].device_kind, 'torch_device': info['device'],
                    'matmul_precision': _MATMUL_PRECISION.value, 'dtype': _DTYPE.value, 'jax_peak': jax_peak,
                    'torch_peak': torch_peak, 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
