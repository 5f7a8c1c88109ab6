"""Joining a multi-process run: `jax.distributed.initialize` from the command line's flags, checked first.

Importing this module defines the flags --coordinator_address, --num_processes, --process_id, --distributed
and --distributed_timeout. `initialize_from_flags()` must run before anything asks JAX about devices.

At exit JAX waits, up to its shutdown timeout (five minutes), until every process reaches a shutdown barrier;
a process that fails alone would sit there and then abort, hiding its exit code. So in a multi-process run
a failing process ends at once: through `exit_process` for a deliberate code, through the hook `initialize` installs
for an uncaught exception. Its peers then stop when their heartbeats go unanswered, or at once under jft.launch.
"""

import os
import re
import sys
import traceback
from typing import NoReturn

from absl import flags

from jft.errors import UserError

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, where the coordinator listens (multi-process runs)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'how many processes take part (multi-process runs)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "this process's index, 0 to num_processes - 1")
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'join the cluster that jax.distributed.initialize() detects (Cloud TPU, SLURM, Open MPI)')
_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', None,
    'seconds to wait for all processes to join, and for a silent one to be declared dead (default: JAX\'s own, '
    '300 and 100)')

_EXPLICIT_FLAGS = '--coordinator_address=HOST:PORT --num_processes=N --process_id=I'


def _check_explicit(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                    auto: bool) -> None:
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  missing = [name for name, value in given.items() if value is None]
  if missing and not auto:
    raise UserError(f'a multi-process run needs all of {_EXPLICIT_FLAGS}; {", ".join(missing)} missing. Give all '
                    'three on every process (process 0 runs the coordinator at HOST:PORT), or --distributed on a '
                    'cluster that jax.distributed.initialize() detects, or run `python -m jft.launch` on one machine')
  if coordinator_address is not None:
    match = re.fullmatch(r'(.+):(\d+)', coordinator_address)
    if not match or not 0 < int(match.group(2)) < 65536:
      raise UserError(f'--coordinator_address={coordinator_address} is not HOST:PORT: give process 0\'s host name '
                      'or IP address and a free port, e.g. --coordinator_address=10.0.0.1:1234')
  if num_processes is not None and num_processes < 1:
    raise UserError(f'--num_processes={num_processes} must be at least 1')
  if process_id is not None and (process_id < 0 or num_processes is not None and process_id >= num_processes):
    raise UserError(f'--process_id={process_id} must be between 0 and --num_processes - 1 '
                    f'({"--num_processes - 1" if num_processes is None else num_processes - 1})')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, timeout_s: int | None = None) -> None:
  """Joins a multi-process run through `jax.distributed`; does nothing when no argument asks for one."""
  if not auto and (coordinator_address, num_processes, process_id) == (None, None, None):
    return
  _check_explicit(coordinator_address, num_processes, process_id, auto)
  if timeout_s is not None and timeout_s < 1:
    raise UserError(f'--distributed_timeout={timeout_s} must be a positive number of seconds')
  import jax  # here, not at the top: the command line parses its flags without loading JAX

  timeouts = {} if timeout_s is None else dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=timeout_s)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **timeouts)
  except ValueError as e:
    # jax raises ValueError when neither the flags nor a detected cluster say where the coordinator is.
    raise UserError(f'--distributed found no cluster to join ({e}): jax.distributed.initialize() detects Cloud '
                    f'TPU, SLURM and Open MPI only. Elsewhere give {_EXPLICIT_FLAGS} on every process instead, or '
                    'run `python -m jft.launch --processes=N --devices_per_process=K -- ARGS` on one machine') from e
  sys.excepthook = _exit_on_uncaught_exception


def exit_process(code: int) -> NoReturn:
  """`sys.exit(code)`; a failing process of a multi-process run ends at once, not at JAX's shutdown barrier."""
  jax = sys.modules.get('jax')  # not imported yet: no multi-process run joined
  if code and jax is not None and jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def _exit_on_uncaught_exception(kind, value, tb) -> None:
  traceback.print_exception(kind, value, tb)
  exit_process(1)


def initialize_from_flags() -> None:
  """`initialize` from --coordinator_address, --num_processes, --process_id, --distributed and --distributed_timeout."""
  initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value,
             _TIMEOUT.value)
