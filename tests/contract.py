"""The command-line contract for the tests: where its checks live (../shared/tools beside the checkout, or the
copies in tests/contract_tools), and how to run the command line."""

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOOLS = os.path.join(os.path.dirname(ROOT), 'shared', 'tools')
TOOLS = SHARED_TOOLS if os.path.isdir(SHARED_TOOLS) else os.path.join(ROOT, 'tests', 'contract_tools')


def run_main(*args: str, data_dir: str) -> subprocess.CompletedProcess:
  """`python -m jft.main ARGS` from the project root with the tests' tfds data directory; output captured."""
  command = [sys.executable, '-m', 'jft.main', *args, f'--config.data.data_dir={data_dir}']
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def sigterm_after_step(process: subprocess.Popen, workdir, step: int, timeout: float = 300) -> str:
  """Waits until `process` (a run with stderr piped as text) has logged a train line of `step` in
  workdir/metrics.jsonl, sends it SIGTERM and returns its stderr once it has exited (it is killed if it has not)."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.monotonic() + timeout
  try:
    while not (os.path.exists(metrics) and f'"step": {step}' in open(metrics).read()):
      assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
      time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=timeout)[1]
  finally:
    process.kill()
