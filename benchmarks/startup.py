"""Time to the first training step, cold (empty compilation cache) against warm (the cache a first run left).

python benchmarks/startup.py [--config=configs/minilm_fortunes.py] [--steps=3] [--repeats=2]
Runs the command-line job `repeats` times cold and warm, alternately, each in a fresh work directory and a fresh
process, `steps` steps each, and prints the `seconds_to_first_step` it logged (from the start of training, after
the imports and the command line, to the end of its first step: setup, data, compilation or the cache, one step),
the whole process's wall time, and their ratios.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from timing import machine

_CONFIG = flags.DEFINE_string('config', 'configs/minilm_fortunes.py', 'the job')
_STEPS = flags.DEFINE_integer('steps', 3, 'steps of each run')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'cold and warm runs each')


def run(config: str, workdir: str, cache: str, data_dir: str, steps: int) -> tuple[float, float]:
  """(seconds_to_first_step, wall seconds) of one run."""
  command = [sys.executable, '-m', 'jft.main', f'--config={config}', f'--workdir={workdir}',
             f'--compilation_cache={cache}', f'--config.data.data_dir={data_dir}', f'--config.total_steps={steps}',
             '--config.log_every=1', f'--config.eval_every={steps}', f'--config.checkpoint_every={steps}',
             "--config.data.test_split=test[:32]"]
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, cwd=pathlib.Path(__file__).parent.parent)
  wall = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first = next(line for line in map(json.loads, f) if line['split'] == 'train')
  return first['seconds_to_first_step'], wall


def main(_):
  cold, warm = [], []
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, 'tfds')
    run(_CONFIG.value, os.path.join(tmp, 'prepare'), 'off', data_dir, 1)  # builds the dataset, outside the timings
    for i in range(_REPEATS.value):
      cache = os.path.join(tmp, f'cache{i}')
      cold.append(run(_CONFIG.value, os.path.join(tmp, f'cold{i}'), cache, data_dir, _STEPS.value))
      warm.append(run(_CONFIG.value, os.path.join(tmp, f'warm{i}'), cache, data_dir, _STEPS.value))
  median = lambda runs, i: statistics.median(r[i] for r in runs)
  print(f'machine: {machine()}; {_CONFIG.value}, {_STEPS.value} steps, median of {_REPEATS.value}')
  print(f'{"":5s} {"to first step s":>15s} {"whole run s":>11s}')
  for name, runs in (('cold', cold), ('warm', warm)):
    print(f'{name:5s} {median(runs, 0):15.1f} {median(runs, 1):11.1f}')
  print(f'cold / warm: first step {median(cold, 0) / median(warm, 0):.2f}x, whole run '
        f'{median(cold, 1) / median(warm, 1):.2f}x')
  print(json.dumps({'machine': machine(), 'cold': cold, 'warm': warm}))


if __name__ == '__main__':
  app.run(main)
