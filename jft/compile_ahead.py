"""The train step's programs for the batch lengths a stage's coming steps pad to, made on threads ahead of them.

Text batches pad to a few bucket lengths (jft/data/text.py), and each length is a program of its own. Made when
its first batch arrives, each one stops the loop while it is traced, lowered and compiled (about 5 s for the
MiniLM step on a 2-core CPU), and XLA's compiler keeps mostly one core of the machine busy meanwhile. Once a
stage's first step has run, `CompileAhead` makes the step's program for each other length its batches will pad
to (`data.batch_lengths`, from the data's own plan), in the order they first need them, on threads
(`jft-compile-ahead`), while the steps run: compiled, or loaded from jft/executable_cache.py. A step whose
program is still being made waits for it instead of making it twice; one whose length is still queued makes its
own. At most `workers` programs are in the making at a time (`JFT_COMPILE_AHEAD=N`; 0 makes none ahead), started
from the loop (`before_step`), so that a run that ends (preempted, stopped early, diverged) waits for no more than
those.
"""

import collections
import concurrent.futures
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from jft import executable_cache
from jft.data.text import LENGTH_KEYS
from jft.errors import UserError

VARIABLE = 'JFT_COMPILE_AHEAD'


def workers(environ: Mapping[str, str] = os.environ) -> int:
  """Programs made at a time: `JFT_COMPILE_AHEAD` (0: none made ahead), else half the cores, at least two (a text
  run's lengths mostly come within its first steps, while the loop waits for them: two at a time keep both cores
  of a 2-core host busy, benchmarks/compile_ahead.py)."""
  value = environ.get(VARIABLE, '')
  if not value:
    return max(2, (os.cpu_count() or 1) // 2)
  if not value.isdigit():
    raise UserError(f'{VARIABLE}={value!r} is not a count: give how many programs to make ahead at a time '
                    '(0: none), or unset it')
  return int(value)


def batch_length(batch: dict[str, Any]) -> int | None:
  """The length a text batch is padded to (None for a batch without `LENGTH_KEYS`)."""
  key = next((k for k in LENGTH_KEYS if k in batch), None)
  return None if key is None else batch[key].shape[1]


def at_length(batch: dict[str, Any], length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes, dtypes and shardings of `batch` (arrays on the mesh) padded to `length` instead."""
  def leaf(key, x):
    shape = (x.shape[0], length, *x.shape[2:]) if key in LENGTH_KEYS else x.shape
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)
  return {key: leaf(key, x) for key, x in batch.items()}


def make_program(train_step: Callable, *abstract_args: Any) -> Any:
  """`train_step`'s program for arguments like `abstract_args`, traced, lowered and compiled here; a later call
  on such arguments runs it (a `jax.jit` function keeps it in jax's caches, an `Executables` in its own)."""
  if isinstance(train_step, executable_cache.Executables):
    return train_step.compile(*abstract_args)
  return train_step.lower(*abstract_args).compile()


class CompileAhead:
  """Makes `train_step`'s programs for the lengths in `coming` (the lengths of the stage's next batches, in step
  order) other than `batch`'s, `workers` at a time, for a state like `state`."""

  def __init__(self, train_step: Callable, state: Any, batch: dict[str, Any], coming: Sequence[int],
               workers: int):
    own = batch_length(batch)
    self.train_step, self.batch = train_step, at_length(batch, own)
    self.state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    self.queue = collections.deque(dict.fromkeys(length for length in coming if length != own))
    self.workers = workers
    self.making: dict[int, concurrent.futures.Future] = {}
    self._start()

  def _start(self) -> None:
    """Starts the next queued lengths while fewer than `workers` are being made."""
    for length, future in list(self.making.items()):
      if future.done():
        del self.making[length]
    while self.queue and len(self.making) < self.workers:
      length = self.queue.popleft()
      self.making[length] = executable_cache.run_on_thread(
          make_program, self.train_step, self.state, at_length(self.batch, length))

  def before_step(self, batch: dict[str, Any]) -> None:
    """Before `batch`'s step: waits for its program if it is being made (or takes its length off the queue: the
    step makes it), then starts the next."""
    length = batch_length(batch)
    if length in self.making:
      try:
        self.making.pop(length).result()
      except Exception as e:  # noqa: BLE001 (the step makes its program itself, and raises what went wrong)
        logging.warning('jft: making the train step ahead for length %d failed (%s: %s)', length,
                        type(e).__name__, e)
    elif length in self.queue:
      self.queue.remove(length)
    self._start()
