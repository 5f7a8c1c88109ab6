"""The command-line contract for the tests: where its checks live (../shared/tools beside the checkout, or the
copies in tests/contract_tools), and how to run the command line."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOOLS = os.path.join(os.path.dirname(ROOT), 'shared', 'tools')
TOOLS = SHARED_TOOLS if os.path.isdir(SHARED_TOOLS) else os.path.join(ROOT, 'tests', 'contract_tools')


def run_main(*args: str, data_dir: str) -> subprocess.CompletedProcess:
  """`python -m jft.main ARGS` from the project root with the tests' tfds data directory; output captured."""
  command = [sys.executable, '-m', 'jft.main', *args, f'--config.data.data_dir={data_dir}']
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
