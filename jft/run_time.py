"""Where a run's wall time went: setting up, the training steps, validation, checkpoints and the test, and how
much of it jax spent making programs (tracing, lowering, and compiling or loading them from the compilation cache).

The train loop reports `RunTime.summary()` as the test record's `seconds` (metrics.jsonl, the command line's last
line), so "why did this run take so long" has an answer without a profiler. The phases are disjoint and add up to
`total` (this process only: a resumed run counts from its restart); `compile` is not a phase of its own but happens
inside them (a new bucket shape compiles in `train`, the eval step's shapes in `validation`), on any thread: the
train step's programs made ahead (jft/compile_ahead.py) are made while the steps run, so not all of `compile` is
time the run waited.
"""

import collections
import contextlib
import time
from collections.abc import Iterator

# jax's duration events for making a program: the outermost trace of a jitted function, its lowering to MLIR,
# and XLA's compilation or the load of the compiled program from the persistent cache.
COMPILE_EVENTS = frozenset({
    '/jax/core/compile/jaxpr_trace_duration',
    '/jax/core/compile/jaxpr_to_mlir_module_duration',
    '/jax/core/compile/backend_compile_duration',
})
_compile_seconds = 0.0
_listening = False


def _add_compile_time(event: str, duration_secs: float, **_) -> None:
  global _compile_seconds
  if event in COMPILE_EVENTS:
    _compile_seconds += duration_secs


class RunTime:
  """A run's wall clock split into named phases (`phases`: reported even when they take no time); whatever no
  phase claims is `train`."""

  def __init__(self, phases: tuple[str, ...] = ()):
    global _listening
    if not _listening:
      import jax.monitoring  # noqa: PLC0415 (the listener is registered once, with the first clock)

      jax.monitoring.register_event_duration_secs_listener(_add_compile_time)
      _listening = True
    self.start, self.compile_start = time.perf_counter(), _compile_seconds
    self.phases = collections.Counter(dict.fromkeys(phases, 0.0))

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Counts the wall time of the `with` block to phase `name`."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.phases[name] += time.perf_counter() - start

  def since_start(self, name: str) -> None:
    """Counts the time from the clock's start to now to phase `name` (e.g. the setup before a loop)."""
    self.phases[name] += time.perf_counter() - self.start - sum(self.phases.values())

  def summary(self) -> dict[str, float]:
    """{'total', each phase, 'train' (the rest), 'compile' (inside the others; all threads together)} in seconds."""
    total = time.perf_counter() - self.start
    return {'total': total, **self.phases, 'train': total - sum(self.phases.values()),
            'compile': _compile_seconds - self.compile_start}
