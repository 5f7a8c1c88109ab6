"""jft.launch runs real JAX processes that talk through the CPU collectives, and never leaves one behind;
jft.distributed checks its flags before JAX sees them."""

import os
import signal
import subprocess
import sys
import time

import jax
import pytest
from contract import ROOT

from jft import distributed, launch
from jft.errors import UserError

TESTS = os.path.join(ROOT, 'tests')


def launcher_command(*args: str) -> list[str]:
  return [sys.executable, '-m', 'jft.launch', *args]


def target_env() -> dict[str, str]:
  """Our environment with tests/ importable, so that --module=launch_target resolves."""
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')]))}


def run_launcher(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(launcher_command(*args), cwd=ROOT, env=target_env(), capture_output=True, text=True,
                        timeout=timeout)


def alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def read_pids(pid_dir) -> dict[str, int]:
  texts = {path.name: path.read_text() for path in pid_dir.iterdir()}
  return {name: int(text) for name, text in texts.items() if text}


def wait_for_pids(pid_dir, names: set[str], timeout: float = 120) -> dict[str, int]:
  deadline = time.monotonic() + timeout
  while not names <= set(read_pids(pid_dir)):
    assert time.monotonic() < deadline, f'only {sorted(read_pids(pid_dir))} of {sorted(names)} started'
    time.sleep(0.2)
  time.sleep(0.2)  # let a file just created get its pid written
  return read_pids(pid_dir)


def assert_all_gone(pids: dict[str, int], within: float = 10) -> None:
  deadline = time.monotonic() + within
  while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not {name: pid for name, pid in pids.items() if alive(pid)}


def test_two_processes_share_a_global_mesh():
  result = run_launcher('--processes=2', '--devices_per_process=2', '--module=launch_target', '--timeout=240')
  assert result.returncode == 0, result.stderr[-3000:]
  # Process 0 gathered [10**0, 10**1] from the two processes, and the jitted sum over a 4-device array whose
  # shards live in both processes is 1 + 1 + 2 + 2.
  assert result.stdout.splitlines()[-1] == 'processes=2 local_devices=2 devices=4 gathered=[1, 10] total=6.0'


@pytest.mark.parametrize('how, code, message', [
    ('--noraise', 2, '[process 1] jft: error: launch_target was told to fail'),
    # an uncaught exception ends the process at once too, rather than at JAX's shutdown barrier
    ('--raise', 1, '[process 1] RuntimeError: launch_target was told to raise'),
])
def test_a_failing_process_stops_the_others(tmp_path, how, code, message):
  start = time.monotonic()
  result = run_launcher('--processes=2', '--devices_per_process=1', '--module=launch_target', '--',
                        '--fail_process=1', how, f'--pid_dir={tmp_path}')
  assert result.returncode == code, result.stderr[-3000:]
  assert time.monotonic() - start < 90  # the other sleeps 600 s; a lone failure could wait 300 s at exit
  assert message in result.stderr
  assert f'jft.launch: process 1 exited with code {code}' in result.stderr
  pids = read_pids(tmp_path)
  assert {'process_0', 'process_1'} <= set(pids)
  assert_all_gone(pids, within=2)  # helper_0, the sleeping process's own subprocess, too: killed with its group


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_launcher_leaves_no_process(tmp_path, sig):
  pid_dir = tmp_path / 'pids'
  pid_dir.mkdir()
  # Output to a file, not a pipe: after a SIGKILL the orphaned helpers would hold a pipe open.
  with open(tmp_path / 'stderr', 'w') as stderr:
    launcher = subprocess.Popen(
        launcher_command('--processes=2', '--devices_per_process=1', '--module=launch_target', '--grace=1', '--',
                         '--sleep', f'--pid_dir={pid_dir}'),
        cwd=ROOT, env=target_env(), stdout=subprocess.DEVNULL, stderr=stderr)
  try:
    pids = wait_for_pids(pid_dir, {'process_0', 'process_1', 'helper_0', 'helper_1'})
    launcher.send_signal(sig)
    launcher.wait(timeout=60)
  finally:
    launcher.kill()
  if sig == signal.SIGTERM:
    assert launcher.returncode == 128 + signal.SIGTERM, (tmp_path / 'stderr').read_text()[-3000:]
    assert_all_gone(pids, within=2)
  else:  # a launcher that cannot clean up: its own children still die with it
    try:
      assert_all_gone({name: pid for name, pid in pids.items() if name.startswith('process_')})
    finally:  # the helpers, adopted by init, are beyond its reach
      for name, pid in pids.items():
        if name.startswith('helper_') and alive(pid):
          os.kill(pid, signal.SIGKILL)


def test_timeout_kills_everything_and_exits_124(tmp_path):
  result = run_launcher('--processes=2', '--devices_per_process=1', '--module=launch_target', '--timeout=3', '--',
                        '--sleep', f'--pid_dir={tmp_path}')
  assert result.returncode == 124, result.stderr[-3000:]
  assert 'jft.launch: timed out after 3 s' in result.stderr
  assert_all_gone(read_pids(tmp_path), within=2)


@pytest.mark.parametrize('args, message', [
    (['--devices_per_process=2', '--', '--workdir=w'], 'the following arguments are required: --processes'),
    (['--processes=0', '--devices_per_process=2'], "'0' is not a positive integer"),
    (['--processes=2', '--devices_per_process=2', '--port=70000'], "'70000' is not a port number"),
    (['--processes=2', '--devices_per_process=2', '--timeout=-1'], "'-1' is not a positive number of seconds"),
    (['--processes=2', '--devices_per_process=2', '--workdir=w'], 'the arguments for jft.main go after --'),
    (['--processes=2', '--devices_per_process=2', '--', '--process_id=1'], 'the launcher sets this flag itself'),
    (['--processes=2', '--devices_per_process=2', '--', '--nodistributed'], 'the launcher sets this flag itself'),
    (['--processes=2', '--devices_per_process=2', '--module=jft/main.py'], 'is not a Python module name'),
])
def test_bad_launcher_arguments_exit_2(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    launch.parse_args(args)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_bad_launcher_arguments_on_the_command_line_exit_2_before_starting_anything():
  result = run_launcher('--processes=two', '--devices_per_process=2', '--', '--config=x', timeout=120)
  assert result.returncode == 2
  assert "argument --processes: 'two' is not a positive integer" in result.stderr
  assert 'Traceback' not in result.stderr


def test_module_arguments_pass_through_unchanged():
  args, module_args = launch.parse_args(['--processes=3', '--devices_per_process=4', '--port=1234', '--',
                                         '--config=configs/fashion_cnn.py:quick', '--workdir=w', '--', 'x'])
  assert (args.processes, args.devices_per_process, args.port, args.module) == (3, 4, 1234, 'jft.main')
  assert module_args == ['--config=configs/fashion_cnn.py:quick', '--workdir=w', '--', 'x']


def test_child_env_sets_the_device_count_and_keeps_other_xla_flags():
  env = launch.child_env(4, {'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=8 --xla_bar',
                             'JAX_PLATFORMS': 'cuda', 'HOME': '/h'})
  assert env['XLA_FLAGS'].split() == ['--xla_foo=1', '--xla_bar', '--xla_force_host_platform_device_count=4']
  assert (env['JAX_PLATFORMS'], env['JAX_NUM_CPU_DEVICES'], env['HOME']) == ('cpu', '4', '/h')


@pytest.mark.parametrize('kwargs, message', [
    (dict(process_id=0), '--coordinator_address, --num_processes missing'),
    (dict(coordinator_address='localhost:1234', num_processes=2), '--process_id missing'),
    (dict(coordinator_address='localhost', num_processes=2, process_id=0), 'is not HOST:PORT'),
    (dict(coordinator_address='localhost:99999', num_processes=2, process_id=0), 'is not HOST:PORT'),
    (dict(coordinator_address='localhost:1234', num_processes=0, process_id=0), 'must be at least 1'),
    (dict(coordinator_address='localhost:1234', num_processes=2, process_id=2), 'between 0 and --num_processes - 1'),
    (dict(coordinator_address='localhost:1234', num_processes=2, process_id=-1), 'between 0 and'),
    (dict(coordinator_address='localhost:1234', num_processes=2, process_id=0, timeout_s=0), 'positive number'),
])
def test_bad_distributed_flags_are_user_errors(kwargs, message):
  with pytest.raises(UserError, match=message):
    distributed.initialize(**kwargs)


def test_no_distributed_flag_is_a_single_process_run():
  distributed.initialize()
  assert not jax.distributed.is_initialized()


def test_distributed_without_a_cluster_is_a_user_error():
  # In a fresh process: jax.distributed.initialize refuses to run once this one has used a device.
  env = {name: value for name, value in os.environ.items()
         if not name.startswith(('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'JAX_COORDINATOR'))}
  script = ('from jft import distributed, errors\n'
            'try:\n'
            '  distributed.initialize(auto=True)\n'
            'except errors.UserError as e:\n'
            '  print(e)\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('--distributed found no cluster to join')
  assert '--coordinator_address=HOST:PORT --num_processes=N --process_id=I' in result.stdout
