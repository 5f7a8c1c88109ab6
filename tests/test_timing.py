"""benchmarks/timing.py's `timed_run` (vs_pytorch.py's end-to-end runner): each program's wall time, output and own
peak memory, and a failing program reported with its error; the order of the runner's turns. (vs_pytorch.py itself
defines command-line flags, so it is not imported here.)"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import timing  # noqa: E402

# Fills 400 MB, holds it half a second (the runner reads the peak every 0.1 s), prints, and ends.
_ALLOCATE = ('import numpy as np, time; a = np.ones(100_000_000, np.float32); time.sleep(0.5); '
             'print("done", a[::1024].sum() > 0)')


def test_timed_run_gives_the_output_and_the_programs_own_peak_memory():
  seconds, out, peak_gb = timing.timed_run([sys.executable, '-c', _ALLOCATE])
  assert out.strip() == 'done True'
  assert seconds > 0
  assert 0.4 < peak_gb < 2.0, peak_gb
  # The next program's peak is its own, not this process's (which it shares until its exec) nor the first one's.
  _, out, small_gb = timing.timed_run([sys.executable, '-c', 'import time; time.sleep(0.5); print("small")'])
  assert out.strip() == 'small' and small_gb < 0.1, small_gb


def test_timed_run_reports_a_failing_program_with_its_error():
  with pytest.raises(RuntimeError, match=r'failed \(3\):\n.*what went wrong'):
    timing.timed_run([sys.executable, '-c', 'import sys; print("what went wrong", file=sys.stderr); sys.exit(3)'])


def test_alternating_order_cancels_a_steady_drift_over_an_even_number_of_pairs():
  assert timing.alternating_order('jft', 'PyTorch', 1) == ['jft', 'PyTorch']
  order = timing.alternating_order('jft', 'PyTorch', 4)
  assert order == ['jft', 'PyTorch', 'PyTorch', 'jft'] * 2
  # A run's time grows by one unit per turn: both programs' sums take the same drift.
  drift = {name: sum(turn for turn, each in enumerate(order) if each == name) for name in ('jft', 'PyTorch')}
  assert drift['jft'] == drift['PyTorch']
