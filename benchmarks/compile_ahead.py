"""A cold run's training with the step for its coming batch lengths made ahead on threads, against none made ahead.

python benchmarks/compile_ahead.py [--config=configs/minilm_fortunes.py] [--steps=30] [--workers=2] [--rounds=3]
Runs the command-line job `rounds` times with `JFT_COMPILE_AHEAD=workers` and with `JFT_COMPILE_AHEAD=0`
(jft/compile_ahead.py), alternately, each a fresh process and work directory with the compilation cache off, cut to
`steps` steps (the main job's eight batch lengths first come within its first 28 at seed 0), and prints each run's
training phase (the test record's `seconds.train`: the steps and the programs made for them), its whole wall time,
the medians and their ratios.
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
_STEPS = flags.DEFINE_integer('steps', 30, 'steps of each run')
_WORKERS = flags.DEFINE_integer('workers', 2, 'JFT_COMPILE_AHEAD of the runs that make programs ahead')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'runs of each kind')


def run(workers: int, workdir: str, data_dir: str) -> tuple[float, float, float]:
  """(training phase s, wall s, test accuracy) of one cold run with JFT_COMPILE_AHEAD=`workers`."""
  command = [sys.executable, '-m', 'jft.main', f'--config={_CONFIG.value}', f'--workdir={workdir}',
             '--compilation_cache=off', f'--config.data.data_dir={data_dir}', f'--config.total_steps={_STEPS.value}',
             f'--config.eval_every={_STEPS.value}', f'--config.checkpoint_every={_STEPS.value}']
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, cwd=pathlib.Path(__file__).parent.parent,
                          env={**os.environ, 'JFT_COMPILE_AHEAD': str(workers)})
  wall = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    test = [line for line in map(json.loads, f) if line['split'] == 'test'][-1]
  return test['seconds']['train'], wall, test['accuracy']


def main(_):
  kinds = {f'ahead, {_WORKERS.value} at a time': _WORKERS.value, 'none ahead': 0}
  runs = {name: [] for name in kinds}
  print(f'machine: {machine()}; {_CONFIG.value}, {_STEPS.value} steps, cold, {_ROUNDS.value} rounds', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, 'tfds')
    run(0, os.path.join(tmp, 'prepare'), data_dir)  # builds the dataset, outside the timings
    for i in range(_ROUNDS.value):
      for name, workers in kinds.items():
        train, wall, accuracy = run(workers, os.path.join(tmp, f'{workers}_{i}'), data_dir)
        runs[name].append((train, wall))
        print(f'round {i}  {name:20s} train {train:6.1f} s  wall {wall:6.1f} s  test accuracy {accuracy:.4f}',
              flush=True)
  median = {name: [statistics.median(r[k] for r in rs) for k in (0, 1)] for name, rs in runs.items()}
  print(f'{"median":27s} {"train s":>8s} {"wall s":>8s}')
  for name, (train, wall) in median.items():
    print(f'{name:27s} {train:8.1f} {wall:8.1f}')
  (ahead_train, ahead_wall), (none_train, none_wall) = median.values()
  print(f'ahead / none: train {ahead_train / none_train:.3f}, wall {ahead_wall / none_wall:.3f}')
  print(json.dumps({'machine': machine(), 'steps': _STEPS.value, 'runs': runs}))


if __name__ == '__main__':
  app.run(main)
