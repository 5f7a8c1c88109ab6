"""benchmarks/end_to_end_seeds.py: runs read from vs_pytorch logs (old and new), accuracies compared under one
rule (best validation weights or last), seeds counted once, logs of different code refused, and the error bars
against hand-worked values."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'end_to_end_seeds.py')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import end_to_end_seeds  # noqa: E402

ZEN4 = 'AMD EPYC (family 25 model 17, Zen 4), 2 cores, AVX-512'
INTEL = 'Intel(R) Xeon(R) Processor (family 6 model 167), 2 cores, AVX-512 + AMX'


def curve(*accuracies):
  return [{'step': 100 * (i + 1), 'validation_accuracy': a} for i, a in enumerate(accuracies)]


def old_record(machine, jft_s, torch_s, jft_accuracy, tested_step, torch_accuracy, torch_curve):
  """As vs_pytorch.py wrote them before 2026-12-06: jft tested by its config ('best'), PyTorch its last weights."""
  return json.dumps({'machine': machine, 'host_memory': 'host memory: jft jemalloc, PyTorch glibc', 'jft_s': jft_s,
                     'torch_s': torch_s, 'jft_test': {'split': 'test', 'accuracy': jft_accuracy, 'test_on': 'best',
                                                      'tested_step': tested_step},
                     'jft_validation': [], 'torch': {'test_accuracy': torch_accuracy, 'steps': 700,
                                                     'validation': torch_curve}})


def new_record(machine, seed, jft_s, torch_s, jft_tests, torch_tests):
  """As vs_pytorch.py writes them now: both rules' tests for both, the seed and dtype in the JSON."""
  as_tests = lambda tests: {rule: {'step': step, 'accuracy': a} for rule, (step, a) in tests.items()}
  return json.dumps({'machine': machine, 'host_memory': '', 'seed': seed, 'dtype': 'float32', 'jft_s': jft_s,
                     'torch_s': torch_s, 'jft_test': {'accuracy': jft_tests['best'][1], 'test_on': 'best'},
                     'jft_tests': as_tests(jft_tests), 'jft_validation': [],
                     'torch': {'test_accuracy': torch_tests['best'][1], 'steps': 700, 'test_on': 'best',
                               'tests': as_tests(torch_tests), 'validation': []}})


def write_logs(tmp_path):
  """An old log (seed and dtype only on the command line) and a new one (in the JSON), sharing seed 3."""
  old = tmp_path / 'old.log'
  old.write_text('\n'.join([
      '# python benchmarks/vs_pytorch.py --mode=end_to_end --config.seed=3',
      f'machine: {INTEL}; host memory: jft jemalloc, PyTorch glibc',
      'jft: -m jft.main --config=configs/minilm_fortunes.py --config.seed=3 --workdir=/tmp/x/jft',
      'PyTorch: benchmarks/pytorch_fortunes.py --seed=3',
      'jft           500         0.800',
      # jft's best at the last step: its best and last weights are one; so are PyTorch's (its curve peaks at 700)
      old_record(INTEL, 500.0, 400.0, 0.80, 700, 0.77, curve(0.70, 0.75, 0.74, 0.76, 0.75, 0.75, 0.78)),
      'jft: -m jft.main --config=configs/minilm_fortunes.py --workdir=/tmp/y/jft --config.model.dtype=bfloat16',
      old_record(INTEL, 300.0, 250.0, 0.76, 700, 0.78, curve(0.7)),
      'jft: -m jft.main --config=configs/minilm_fortunes.py --config.seed=5 --workdir=/tmp/z/jft',
      # jft tested step 600 (its last unknown); PyTorch's curve ties 400 and 700: its best weights are step 400's
      old_record(INTEL, 520.0, 400.0, 0.79, 600, 0.78, curve(0.70, 0.75, 0.74, 0.79, 0.75, 0.75, 0.79)),
  ]) + '\n')
  new = tmp_path / 'new.log'
  new.write_text('\n'.join([
      'jft: -m jft.main --config=configs/minilm_fortunes.py --config.seed=3 --workdir=/tmp/z/jft',
      new_record(ZEN4, 3, 690.0, 736.0, {'best': (700, 0.80), 'last': (700, 0.80)},
                 {'best': (700, 0.77), 'last': (700, 0.77)}),
      new_record(ZEN4, 4, 700.0, 700.0, {'best': (600, 0.78), 'last': (700, 0.76)},  # no command line: the JSON
                 {'best': (500, 0.78), 'last': (700, 0.79)}),
  ]) + '\n')
  return str(old), str(new)


def test_runs_are_read_with_their_seed_dtype_and_the_accuracies_their_logs_tell(tmp_path):
  old, new = write_logs(tmp_path)
  runs = end_to_end_seeds.read_runs(old) + end_to_end_seeds.read_runs(new)
  assert [(run.seed, run.dtype, run.machine) for run in runs] == [
      (3, 'float32', INTEL), (0, 'bfloat16', INTEL), (5, 'float32', INTEL), (3, 'float32', ZEN4), (4, 'float32', ZEN4)]
  assert runs[0].ratio == pytest.approx(1.25) and runs[3].ratio == pytest.approx(690 / 736)
  assert (runs[0].jft_tests, runs[0].torch_tests) == ({'best': 0.80, 'last': 0.80}, {'best': 0.77, 'last': 0.77})
  assert (runs[2].jft_tests, runs[2].torch_tests) == ({'best': 0.79}, {'last': 0.78})
  # Seed 3 ran on both machines with the same accuracies: counted once; seed 5 pairs under neither rule.
  float32 = [run for run in runs if run.dtype == 'float32']
  assert end_to_end_seeds.accuracies_by_seed(float32, 'best') == {3: (0.80, 0.77), 4: (0.78, 0.78)}
  assert end_to_end_seeds.accuracies_by_seed(float32, 'last') == {3: (0.80, 0.77), 4: (0.76, 0.79)}


def test_runs_of_one_seed_that_disagree_are_refused(tmp_path):
  old, _ = write_logs(tmp_path)
  other = tmp_path / 'other_code.log'
  other.write_text(new_record(ZEN4, 3, 600.0, 700.0, {'best': (600, 0.79), 'last': (700, 0.80)},
                              {'best': (700, 0.77), 'last': (700, 0.77)}) + '\n')
  runs = end_to_end_seeds.read_runs(old) + end_to_end_seeds.read_runs(str(other))
  with pytest.raises(ValueError, match=r'seed 3: jft tests its best weights at 0.8000 .* but 0.7900 .*different code'):
    end_to_end_seeds.accuracies_by_seed(runs, 'last')
  # A disagreement with any earlier run, not only the first of the seed: seed 5's first run tells jft's best only.
  later = tmp_path / 'later.log'
  later.write_text('\n'.join(new_record(ZEN4, 5, 600.0, 700.0, {'best': (600, 0.79), 'last': (700, last)},
                                         {'best': (400, 0.78), 'last': (700, 0.78)}) for last in (0.80, 0.81)) + '\n')
  with pytest.raises(ValueError, match=r'seed 5: jft tests its last weights at 0.8000 .* but 0.8100'):
    end_to_end_seeds.accuracies_by_seed(end_to_end_seeds.read_runs(old) + end_to_end_seeds.read_runs(str(later)),
                                        'best')
  result = subprocess.run([sys.executable, SCRIPT, old, str(other)], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and 'different code' in result.stderr and 'Traceback' not in result.stderr


def test_the_t_interval_of_a_mean_by_hand():
  # mean 0.02, sample std 0.01, t(0.975, 2 degrees of freedom) = 4.302653: half width 0.01 * 4.302653 / sqrt(3).
  mean, low, high = end_to_end_seeds.mean_interval([0.01, 0.02, 0.03])
  assert mean == pytest.approx(0.02)
  assert (low, high) == pytest.approx((0.02 - 0.0248414, 0.02 + 0.0248414), abs=1e-6)


def run_script(*args):
  result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_the_summary_under_each_rule_and_its_plot(tmp_path):
  old, new = write_logs(tmp_path)
  plot = tmp_path / 'seeds.png'
  out = run_script(old, new, f'--plot={plot}')
  assert 'old.log' in out and '| 3 | 500 | 400 | 1.25 | 0.800 | 0.770 |' in out
  assert '| 5 | 520 | 400 | 1.30 | 0.790 | - |' in out  # shown, not paired
  assert '| 0 |' not in out  # the bf16 run is left out (--dtype=float32)
  assert f'{ZEN4}: median 0.97 of 2 run(s), 0.94-1.00' in out  # 690 / 736 = 0.9375 and 1.0
  assert f'{INTEL}: median 1.27 of 2 run(s), 1.25-1.30' in out
  # best: jft 80, 78; PyTorch 77, 78: differences +3.0 and 0.0 points, mean +1.5, std 2.1213; t(0.975, 1) = 12.7062.
  half = 12.7062 * 2.1213 / np.sqrt(2)
  assert 'best weights over 2 seed(s) [3, 4]' in out and 'jft 79.0 ± 1.4, PyTorch 77.5 ± 0.7' in out
  assert (f'jft - PyTorch, paired by seed: +1.5 ± 2.1, 95% interval [{1.5 - half:+.1f}, {1.5 + half:+.1f}]; '
          'jft ahead at 1, level at 1, behind at 0 seed(s)') in out
  assert 'jft against 77.7: mean 79.0' in out and '(contains it)' in out
  assert plot.stat().st_size > 10_000
  # last: jft 80, 76; PyTorch 77, 79: differences +3.0 and -3.0, mean 0.0, std 4.2426.
  out = run_script(old, new, '--test_on=last')
  half = 12.7062 * 4.2426 / np.sqrt(2)
  assert '| 5 | 520 | 400 | 1.30 | - | 0.780 |' in out
  assert (f'jft - PyTorch, paired by seed: +0.0 ± 4.2, 95% interval [{-half:+.1f}, {half:+.1f}]; jft ahead at 1, '
          'level at 0, behind at 1 seed(s)') in out
