"""Timing several steps against each other in one process: rounds of each in turn, so noise hits all alike."""

import time
from collections.abc import Callable


def interleaved_times(runs: dict[str, Callable[[], None]], steps: int, round_size: int) -> dict[str, list[float]]:
  """Seconds of each call of each run (which must block until done), `steps` of each, in rounds of `round_size`."""
  times = {name: [] for name in runs}
  while min(len(t) for t in times.values()) < steps:
    for name, run in runs.items():
      for _ in range(round_size):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  return times


def machine() -> str:
  """This machine in one line, for every number printed: CPU model, cores jax sees, the widest vector ISA."""
  import os  # noqa: PLC0415 (only this helper needs them)
  import platform  # noqa: PLC0415
  model, flags, family = platform.processor() or platform.machine(), set(), {}
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() in ('cpu family', 'model'):
          family[key.strip()] = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
  except OSError:
    pass
  isa = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'
  family = f" (family {family['cpu family']} model {family['model']})" if len(family) == 2 else ''
  return f'{model}{family}, {os.cpu_count()} cores, {isa}'
