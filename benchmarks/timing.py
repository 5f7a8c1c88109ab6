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
