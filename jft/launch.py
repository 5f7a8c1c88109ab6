"""Runs one command as N real JAX processes on this machine, talking through the CPU collectives.

  python -m jft.launch --processes=N --devices_per_process=K [--port=P] [--timeout=S] [--grace=S]
      [--module=jft.main] -- ARGS

starts `python -m MODULE --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I
--distributed_timeout=60 ARGS` for I = 0..N-1, each seeing K CPU devices (the MODULE takes jft.distributed's
flags), so multi-host behaviour can be debugged on one machine. Process 0's stdout and stderr pass through
unchanged, so the launcher's stdout is process 0's; every line of the other processes goes to stderr
prefixed `[process I] `.
If any process fails, all are killed and the launcher exits with that process's code (2 for a user error,
128 + N for a process killed by signal N); 124 after --timeout; when the launcher itself gets SIGINT or SIGTERM,
it forwards it to every process, which get --grace seconds to stop, and exits with their common exit code (75
when jft.main saved a preemption checkpoint), else 128 + N.
"""

import argparse
import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# The processes start together, so a minute is ample for all of them to join even on a loaded machine; a
# process that never gets there (or goes silent) then fails the run after a minute, not JAX's five (100 s).
DISTRIBUTED_TIMEOUT_S = 60
# Flags the launcher gives every process itself.
_OWN_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'distributed', 'distributed_timeout')
_POLL_S = 0.05


def _positive_int(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
  return int(text)


def _port(text: str) -> int:
  if not text.isdigit() or not 0 < int(text) < 65536:
    raise argparse.ArgumentTypeError(f'{text!r} is not a port number (1-65535)')
  return int(text)


def _seconds(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise argparse.ArgumentTypeError(f'{text!r} is not a positive number of seconds')
  return value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m jft.launch', allow_abbrev=False,
      usage='python -m jft.launch --processes=N --devices_per_process=K [--port=P] [--timeout=S] [--grace=S] '
            '[--module=jft.main] -- ARGS',
      description='Runs `python -m MODULE ARGS` as N JAX processes on this machine (CPU collectives).')
  parser.add_argument('--processes', type=_positive_int, required=True, help='how many processes')
  parser.add_argument('--devices_per_process', type=_positive_int, required=True, help='CPU devices each process sees')
  parser.add_argument('--port', type=_port, help="the coordinator's port (default: a free one)")
  parser.add_argument('--timeout', type=_seconds, help='kill everything and exit 124 after this many seconds')
  parser.add_argument('--grace', type=_seconds, default=30.0,
                      help='seconds the processes get to stop after the launcher is interrupted (default 30)')
  parser.add_argument('--module', default='jft.main', help='the module to run (default jft.main)')
  return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """The launcher's options and the module's arguments (those after `--`); exits 2 with a message if bad."""
  parser = _parser()
  split = argv.index('--') if '--' in argv else len(argv)
  args, unknown = parser.parse_known_args(argv[:split])
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)} (the arguments for {args.module} go after --)')
  if not re.fullmatch(r'[A-Za-z_][\w.]*', args.module):
    parser.error(f'--module={args.module} is not a Python module name such as jft.main')
  module_args = argv[split + 1:]
  for arg in module_args:
    name = arg.lstrip('-').split('=', 1)[0]
    if arg.startswith('-') and (name in _OWN_FLAGS or name.removeprefix('no') in _OWN_FLAGS):
      parser.error(f'{arg}: the launcher sets this flag itself; leave it out')
  return args, module_args


def free_port() -> int:
  """A TCP port that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: ours) for a CPU-only JAX process that sees `devices` devices."""
  env = dict(os.environ if env is None else env)
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', env.get('XLA_FLAGS', '')).split()
  # JAX_NUM_CPU_DEVICES overrides the XLA flag, so both say the same.
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED='1',
             XLA_FLAGS=' '.join([*xla_flags, f'--xla_force_host_platform_device_count={devices}']))
  return env


def _die_with_parent(prctl, parent: int) -> None:
  # Runs in the child before exec: a SIGKILLed launcher, which cannot clean up, still takes its processes along.
  prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
  if os.getppid() != parent:  # the launcher died before prctl
    os._exit(1)


def _prefix_lines(stream, prefix: bytes, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b''):
    with lock:
      sys.stderr.buffer.write(prefix + line if line.endswith(b'\n') else prefix + line + b'\n')
      sys.stderr.buffer.flush()
  stream.close()


def _kill(children: list[subprocess.Popen], sig: int) -> None:
  for child in children:
    try:  # the whole process group: a child's own subprocesses go too
      os.killpg(child.pid, sig)
    except (ProcessLookupError, PermissionError):
      pass


def _say(message: str) -> None:
  print(f'jft.launch: {message}', file=sys.stderr, flush=True)


def supervise(children: list[subprocess.Popen], timeout: float | None, grace: float,
              signals: list[int]) -> int:
  """Waits for all children; on the first failure, timeout or signal (appended to `signals`) stops them all."""
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    if signals:
      sig = signals[0]
      _say(f'got {signal.Signals(sig).name}: passing it on to every process ({grace:g} s to stop)')
      _kill(children, sig)
      end = time.monotonic() + grace
      while len(signals) == 1 and time.monotonic() < end and any(c.poll() is None for c in children):
        time.sleep(_POLL_S)
      codes = {child.poll() for child in children}
      if len(codes) == 1 and None not in codes and codes != {0}:  # e.g. all saved and exited 75: pass that on
        return codes.pop() if min(codes) > 0 else 128 - min(codes)
      return 128 + sig
    codes = [child.poll() for child in children]
    failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      i, code = failed[0]
      how = f'was killed by {signal.Signals(-code).name}' if code < 0 else f'exited with code {code}'
      _say(f'process {i} {how}; stopping the others')
      return 128 - code if code < 0 else code
    if all(code == 0 for code in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      _say(f'timed out after {timeout:g} s; stopping every process')
      return 124
    time.sleep(_POLL_S)


def launch(module: str, module_args: list[str], processes: int, devices_per_process: int, port: int | None = None,
           timeout: float | None = None, grace: float = 30.0) -> int:
  """Runs `python -m module module_args` as `processes` JAX processes; returns the exit code to pass on."""
  address = f'127.0.0.1:{port or free_port()}'
  env = child_env(devices_per_process)
  signals: list[int] = []
  handlers = {sig: signal.signal(sig, lambda sig, _: signals.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
  children, pumps = [], []
  lock = threading.Lock()
  # prctl is looked up here, not in the forked child, where only plain calls are safe.
  die_with_us = (functools.partial(_die_with_parent, ctypes.CDLL(None).prctl, os.getpid())
                 if sys.platform.startswith('linux') else None)
  try:
    for i in range(processes):
      # The launcher's flags first: absl reads no flags after a `--` among the module's arguments.
      command = [sys.executable, '-m', module, f'--coordinator_address={address}', f'--num_processes={processes}',
                 f'--process_id={i}', f'--distributed_timeout={DISTRIBUTED_TIMEOUT_S}', *module_args]
      piped = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT) if i else {}
      children.append(subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_us, **piped))
    for i, child in enumerate(children[1:], start=1):  # threads only now: preexec_fn and threads do not mix
      pumps.append(threading.Thread(target=_prefix_lines, args=(child.stdout, f'[process {i}] '.encode(), lock),
                                    daemon=True))
      pumps[-1].start()
    return supervise(children, timeout, grace, signals)
  finally:
    _kill(children, signal.SIGKILL)
    for child in children:
      child.wait()
    for pump in pumps:
      pump.join(timeout=5)
    for sig, handler in handlers.items():
      signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
  args, module_args = parse_args(sys.argv[1:] if argv is None else argv)
  sys.exit(launch(args.module, module_args, args.processes, args.devices_per_process, args.port, args.timeout,
                  args.grace))


if __name__ == '__main__':
  main()
