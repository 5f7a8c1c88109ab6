"""How long a preempted run needs between SIGTERM and its exit: the grace period a scheduler must give it.

python benchmarks/preemption_grace.py [--config=configs/minilm_fortunes.py] [--trials=3] [--after_steps=5,13,21]
Starts the job (compilation cache on, as users run it), waits until the run has logged a train line at or past
each given step (its metrics.jsonl), sends SIGTERM, and times until the process exits (code 75, the checkpoint
of the current step saved and waited for). The time is the rest of the current step, the save and the shutdown.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from timing import machine

_CONFIG = flags.DEFINE_string('config', 'configs/minilm_fortunes.py', 'the job')
_AFTER = flags.DEFINE_list('after_steps', ['5', '13', '21'], 'send SIGTERM once a train line at or past this step')
_LOG_EVERY = flags.DEFINE_integer('log_every', 1, 'config.log_every of the job (1: SIGTERM right after a step)')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logged_step(metrics_path: str) -> int:
  if not os.path.exists(metrics_path):
    return 0
  with open(metrics_path) as f:
    steps = [json.loads(line)['step'] for line in f if line.strip() and '"train"' in line]
  return max(steps, default=0)


def trial(after: int, workdir: str) -> tuple[float, int, str]:
  command = [sys.executable, '-m', 'jft.main', f'--config={_CONFIG.value}', f'--workdir={workdir}',
             f'--config.log_every={_LOG_EVERY.value}', '--config.eval_every=100000', '--config.checkpoint_every=100000']
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    while logged_step(os.path.join(workdir, 'metrics.jsonl')) < after:
      if process.poll() is not None:
        raise RuntimeError(f'the job ended before step {after}:\n{process.stderr.read()[-3000:]}')
      time.sleep(0.05)
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    return time.perf_counter() - start, process.returncode, stderr.strip().splitlines()[-1]
  finally:
    process.kill()


def main(_):
  print(f'machine: {machine()}; job: {_CONFIG.value}', flush=True)
  times = []
  for after in map(int, _AFTER.value):
    with tempfile.TemporaryDirectory() as workdir:
      seconds, code, last_line = trial(after, workdir)
    times.append(seconds)
    print(f'SIGTERM after step {after}: exited with code {code} after {seconds:.1f} s ({last_line[:120]})', flush=True)
  print(f'grace needed: median {statistics.median(times):.1f} s, max {max(times):.1f} s')
  print(json.dumps({'machine': machine(), 'config': _CONFIG.value, 'seconds': times}))


if __name__ == '__main__':
  app.run(main)
