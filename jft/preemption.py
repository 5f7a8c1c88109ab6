"""Preemption: on SIGTERM (what a preemptible TPU VM or a SLURM job gets before it is taken away) or SIGINT
(Ctrl-C), the run finishes its current step, saves a checkpoint at that step, waits for it and exits with
`EXIT_CODE`; the same command resumes from that step exactly.

One process: the signals set a flag here (a second Ctrl-C stops at once). Several processes (jax.distributed):
JAX's preemption service catches SIGTERM on any host, and `multihost_utils.reached_preemption_sync_point`
names one step at which every host stops and saves together; SIGINT keeps Python's default there.
"""

import signal
import sys

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later": run the same command to resume.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run saved its checkpoint after a preemption signal; the message says which step and how to resume."""


class PreemptionWatch:
  """`reached(step)`: whether the run should save at `step` and exit. A context manager that installs the
  signal handlers (one process only) and puts the previous ones back."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.signal: signal.Signals | None = None
    self._previous = {}

  def __enter__(self) -> 'PreemptionWatch':
    if not self.multi_process:
      self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum)
    print(f'jft: got {self.signal.name}: finishing the current step, saving a checkpoint, then exiting with code '
          f'{EXIT_CODE}' + (' (Ctrl-C again stops at once, without saving)' if signum == signal.SIGINT else ''),
          file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
    return self.signal is not None
