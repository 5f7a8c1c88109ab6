"""Command line: `python -m jft.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]`.

Multi-host: add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on every host, or
`--distributed` where JAX detects the cluster (jft/distributed.py); `python -m jft.launch` runs N local processes.

Parses the flags, joins a multi-process run, holds the work directory and runs `jft.train.train_and_evaluate`;
turns its failures into the documented exit codes (README, Failures and recovery). JAX and the rest of jft are
imported only once the flags parsed, so a mistake on the command line is reported in well under a second.
Running the same command again in the same DIR resumes from the latest checkpoint.
"""

import contextlib
import gc
import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from jft import cli_errors, compilation_cache, distributed, host_memory
from jft.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/NAME.py[:ARG]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'work directory: config.json, metrics.jsonl, checkpoints/')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None, 'where compiled steps (and tokenized text splits) are kept between runs (default '
    f'$JFT_COMPILATION_CACHE, else {compilation_cache.DEFAULT_DIR}); {compilation_cache.OFF!r}: compile (and '
    'tokenize) every time')


@contextlib.contextmanager
def _workdir(path: str):
  """Creates the work directory if needed and holds its lock (process 0, local directories) for the run."""
  import jax
  from etils import epath

  from jft.workdir_lock import WorkdirLock

  workdir = epath.Path(path)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f'--workdir={path} is a file, not a directory: give a directory (it is created if missing)')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the work directory {path} ({e.strerror or e}): give a --workdir you can '
                    'write to') from None
  if '://' in path or jax.process_index() != 0:
    yield
    return
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f'the work directory {path} is not writable: fix its permissions or give another --workdir')
  with WorkdirLock(path):
    yield


def _fail(message: str, code: int = 2) -> None:
  print(f'jft: error: {message}', file=sys.stderr)
  distributed.exit_process(code)  # a lone failing process of a multi-host run must not wait for the others


def main() -> None:
  usage = 'usage: python -m jft.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE]'
  if problem := cli_errors.config_file_problem(sys.argv):
    _fail(f'{problem}\n{usage}')
  try:
    flags.FLAGS(sys.argv)
  except (flags.Error, ValueError, OSError, AttributeError, KeyError, TypeError) as e:
    _fail(f'{cli_errors.explain_flag_error(e, sys.argv)}\n{usage}')
  if _CONFIG.value is None or not _WORKDIR.value:
    _fail('both --config=configs/NAME.py[:ARG] and --workdir=DIR are required')
  logging.use_absl_handler()
  if __name__ == '__main__':  # run as the program (python -m jft.main), not called from a user's own script
    try:
      host_memory.reexec()  # the allocator and glibc read it only at start: before JAX (jft/host_memory.py)
    except ValueError as e:
      _fail(str(e))
  import jax  # noqa: I001 (heavy: only once the command line is known to be well-formed)

  from jft import divergence, preemption, train

  # What the imports built (JAX, flax, optax, orbax, tfds: some 220,000 objects the collector tracks) lives as
  # long as the run: the collector's full passes, which tracing the steps sets off several times, need not walk it
  # again (benchmarks/README.md, Outside the step).
  gc.freeze()
  compilation_cache.enable(_COMPILATION_CACHE.value)
  try:
    host_memory.run_programs_inline()  # one step's temporaries at a time on CPU, before jax makes its client
  except ValueError as e:
    _fail(str(e))
  try:
    distributed.initialize_from_flags()  # before anything asks jax about devices
    with preemption.PreemptionWatch() as preempted, _workdir(_WORKDIR.value):
      test = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, preempted)
  except UserError as e:
    _fail(str(e))
  except divergence.Diverged as e:
    _fail(str(e), divergence.EXIT_CODE)
  except preemption.Preempted as e:
    print(f'jft: preempted by {e}', file=sys.stderr, flush=True)
    distributed.exit_process(preemption.EXIT_CODE)
  if jax.process_index() == 0:
    print(json.dumps({'split': 'test', **{k: v for k, v in test.items() if k != 'confusion_matrix'}}))


if __name__ == '__main__':
  main()
