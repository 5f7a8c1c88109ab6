"""What jft/host_memory.py weighs: the MiniLM fine-tuning step with XLA's large host buffers from glibc in its default
4 KiB pages, from glibc on transparent huge pages (`glibc.malloc.hugetlb=1`), and from jemalloc keeping freed memory
(where installed), back to back and after a pause.

python benchmarks/host_memory.py [--lengths=64,128] [--rounds=3] [--steps=6] [--pause=2.5]

Each measurement is a fresh process (glibc and the loader read the setting at start only), the settings alternating,
one process of each per round, so noise hits them alike. Prints per shape and setting the median step time of steps run
back to back, the minor page faults and system CPU seconds per step (`getrusage`), the median time of a step that
follows a `pause` (as after an evaluation or a step of another length: where a hypervisor with free page reporting
has taken the freed memory back, jft/host_memory.py), and the process's peak resident memory; then the ratios of
each setting to glibc's default pages.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags
from timing import machine

from jft import host_memory

_LENGTHS = flags.DEFINE_list('lengths', ['64', '128'], 'sequence lengths of the training step (batch 32)')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'processes of each setting per shape')
_STEPS = flags.DEFINE_integer('steps', 6, 'timed steps per process, after two warm-up steps')
_PAUSE = flags.DEFINE_float('pause', 2.5, 'seconds of sleep before each of the steps after a pause')
_WORKER_LENGTH = flags.DEFINE_integer('worker_length', 0, 'internal: time the step at this length in this process')
GLIBC = {host_memory.ALLOCATOR_VARIABLE: 'glibc'}
SETTINGS = {'glibc': {**GLIBC, host_memory.SWITCH_VARIABLE: '0'},
            'glibc, huge pages': {**GLIBC, host_memory.SWITCH_VARIABLE: '1'},
            'jemalloc': {host_memory.ALLOCATOR_VARIABLE: 'jemalloc'}}
PAUSED_STEPS = 3


def time_steps(length: int, steps: int, pause: float) -> dict:
  """Times the jitted MiniLM step in this process (restarted with the setting its environment asks for)."""
  host_memory.reexec()
  host_memory.run_programs_inline()  # as python -m jft.main does (JFT_CPU_DISPATCH=async: jax's default)
  import jax  # noqa: PLC0415 (after the restart)
  from minilm_setup import MiniLMSetup  # noqa: PLC0415

  setup = MiniLMSetup(32, length)
  state, train_step = setup.state_and_step()
  compiled = train_step.lower(state, setup.device_batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, setup.device_batch)
    jax.block_until_ready(metrics)
  times, faults, system = [], [], []
  for _ in range(steps):
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state, metrics = compiled(state, setup.device_batch)
    jax.block_until_ready(metrics)
    after = resource.getrusage(resource.RUSAGE_SELF)
    times.append(time.perf_counter() - start)
    faults.append(after.ru_minflt - before.ru_minflt)
    system.append(after.ru_stime - before.ru_stime)
  after_pause = []
  for _ in range(PAUSED_STEPS):
    time.sleep(pause)
    start = time.perf_counter()
    state, metrics = compiled(state, setup.device_batch)
    jax.block_until_ready(metrics)
    after_pause.append(time.perf_counter() - start)
  return {'setting': host_memory.describe(), 'step_s': times, 'faults': faults, 'system_s': system,
          'after_pause_s': after_pause,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(length: int, steps: int, pause: float, environ: dict[str, str]) -> dict:
  env = host_memory.without_setting(os.environ, host_memory.find_jemalloc())
  for variable in (host_memory.SWITCH_VARIABLE, host_memory.ALLOCATOR_VARIABLE):
    env.pop(variable, None)
  command = [sys.executable, __file__, f'--worker_length={length}', f'--steps={steps}', f'--pause={pause}']
  result = subprocess.run(command, env={**env, **environ}, capture_output=True, text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(_):
  if _WORKER_LENGTH.value:
    print(json.dumps(time_steps(_WORKER_LENGTH.value, _STEPS.value, _PAUSE.value)))
    return
  print(f'machine: {machine()}; {host_memory.glibc_version()=}, transparent huge pages: '
        f'{host_memory.transparent_huge_pages_mode()}, free page reporting: {host_memory.free_page_reporting()}',
        flush=True)
  settings = {name: environ for name, environ in SETTINGS.items()
              if name != 'jemalloc' or host_memory.find_jemalloc() is not None}
  print(f'{"shape":>9s} {"setting":>17s} {"step s":>7s} {"faults/step":>11s} {"sys s/step":>10s} '
        f'{"after " + str(_PAUSE.value) + " s pause":>17s} {"peak RSS MB":>11s}')
  for length in map(int, _LENGTHS.value):
    results = {name: [] for name in settings}
    for _ in range(_ROUNDS.value):
      for name, environ in settings.items():
        results[name].append(run_worker(length, _STEPS.value, _PAUSE.value, environ))
    step_s, paused_s = {}, {}
    for name, runs in results.items():
      median = lambda key, runs=runs: statistics.median(x for run in runs for x in run[key])
      step_s[name], paused_s[name] = median('step_s'), median('after_pause_s')
      print(f'{32:>4d} x {length:<3d} {name:>17s} {step_s[name]:7.3f} {median("faults"):11.0f} '
            f'{median("system_s"):10.3f} {paused_s[name]:17.3f} {max(run["peak_rss_mb"] for run in runs):11.0f}',
            flush=True)
    for name in list(settings)[1:]:
      print(f'{32:>4d} x {length:<3d} {name} / glibc: back to back {step_s[name] / step_s["glibc"]:.2f}, after a '
            f'pause {paused_s[name] / paused_s["glibc"]:.2f}', flush=True)


if __name__ == '__main__':
  app.run(main)
