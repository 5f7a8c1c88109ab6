"""A module for `python -m jft.launch --module=launch_target` in tests/test_launch.py (with tests/ on PYTHONPATH).

It joins the run through jft.distributed's flags like jft.main and writes its pid (and its helper's) to
--pid_dir. Then it either checks the topology and runs two cross-process collectives (process 0 prints the
results), or, to test the launcher's supervision, one process fails (--fail_process: exit code 2, or an
uncaught exception with --raise) while every other sleeps with a `sleep` subprocess beside it (all sleep
with --sleep).
"""

import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from jft import distributed

_PID_DIR = flags.DEFINE_string('pid_dir', None, 'write this process\'s pid (and its helper\'s) here')
_FAIL_PROCESS = flags.DEFINE_integer('fail_process', None, 'this process fails; the others sleep')
_RAISE = flags.DEFINE_bool('raise', False, 'fail with an uncaught exception rather than exit code 2')
_SLEEP = flags.DEFINE_bool('sleep', False, 'every process sleeps (to be stopped by the launcher)')


def _write_pid(name: str, pid: int) -> None:
  if _PID_DIR.value:
    with open(os.path.join(_PID_DIR.value, name), 'w') as f:
      f.write(str(pid))


def main() -> None:
  flags.FLAGS(sys.argv)
  distributed.initialize_from_flags()  # before anything asks JAX about devices
  index = jax.process_index()
  _write_pid(f'process_{index}', os.getpid())
  if _FAIL_PROCESS.value is not None or _SLEEP.value:
    if index == _FAIL_PROCESS.value:
      if _RAISE.value:
        raise RuntimeError('launch_target was told to raise')
      print('jft: error: launch_target was told to fail', file=sys.stderr)
      distributed.exit_process(2)
    helper = subprocess.Popen(['sleep', '600'])
    _write_pid(f'helper_{index}', helper.pid)
    print(f'process {index} sleeping', flush=True)
    time.sleep(600)
    return
  gathered = multihost_utils.process_allgather(np.array([10 ** index]))
  # A jitted sum over a global array whose shards live in different processes: one value per device.
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = np.full(jax.local_device_count(), index + 1, np.float32)
  total = jax.jit(lambda x: x.sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(
      jax.make_array_from_process_local_data(sharding, local))
  if index == 0:
    print(f'processes={jax.process_count()} local_devices={jax.local_device_count()} devices={jax.device_count()} '
          f'gathered={gathered.ravel().tolist()} total={float(total)}')


if __name__ == '__main__':
  main()
