"""The main job against PyTorch over seeds: the end-to-end runs of `vs_pytorch.py --mode=end_to_end` in some logs,
their wall-time ratios by machine, and the two test accuracies paired by seed, with error bars.

python benchmarks/end_to_end_seeds.py LOG [LOG ...] [--test_on=best|last] [--dtype=float32|bfloat16]
                                      [--reference=0.777] [--plot=FILE.png]

Reads every run's closing JSON line (its seed and dtype from the JSON, or, in logs written before the JSON carried
them, from the `jft:` command line printed above it) and keeps the runs of `--dtype`. Accuracies are compared under
one rule for both frameworks, `--test_on`: the weights of the best validation accuracy (the first of equals, the
main job's `config.test_on`) or the last ones. Logs since 2026-12-06 carry both rules' tests for both; in older
ones jft tested by its config (`best` since 2026-11-26) and PyTorch its last weights, so a rule's accuracy is known
there only where it is the other's too (the best validation accuracy at the last step). One seed gives the same
arithmetic on every machine (the runs of a seed on different CPUs have matched to the last validation accuracy), so
a seed's accuracies are counted once however often it ran, and runs of one seed that disagree are refused: they come
from different code, which this summary must not mix. Prints a row per run, the ratios per machine, then over the
seeds each framework's mean ± sample std, the paired difference jft - PyTorch with its 95% t interval (seeds are
the unit: the test texts are the same in every run), and jft's mean against `--reference`, the accuracy the issue
asks the main job to keep. `--plot` draws both: accuracy per seed, and each run's wall-time ratio by machine.
"""

import dataclasses
import json
import re
import statistics
from collections.abc import Iterable

import numpy as np
from absl import app, flags
from scipy import stats

_TEST_ON = flags.DEFINE_enum('test_on', 'best', ['best', 'last'], 'the weights whose test accuracies are compared')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'the runs to summarise (vs_pytorch --dtype)')
_REFERENCE = flags.DEFINE_float('reference', 0.777, "the test accuracy jft's main job is to keep (issue 10)")
_PLOT = flags.DEFINE_string('plot', None, 'a PNG to draw the accuracies per seed and the wall-time ratios into')


@dataclasses.dataclass(frozen=True)
class Run:
  log: str
  machine: str
  seed: int
  dtype: str
  jft_s: float
  torch_s: float
  jft_tests: dict[str, float]  # {'best' or 'last': test accuracy}, the rules this run's log makes known
  torch_tests: dict[str, float]

  @property
  def ratio(self) -> float:
    return self.jft_s / self.torch_s


def _first_best_step(curve: list[dict]) -> int | None:
  """The step of the first highest validation accuracy (the `best` rule's weights)."""
  return max(curve, key=lambda point: point['validation_accuracy'])['step'] if curve else None  # max: the first


def _tests(record: dict) -> tuple[dict[str, float], dict[str, float]]:
  """(jft's, PyTorch's) test accuracy by rule, as far as the record tells."""
  torch, steps = record['torch'], record['torch']['steps']
  if 'jft_tests' in record:
    jft_tests = {rule: test['accuracy'] for rule, test in record['jft_tests'].items()}
  else:  # the rule of jft's config; it is the other's too where both pick the same step
    test = record['jft_test']
    rule, step = test.get('test_on', 'last'), test.get('tested_step', steps)
    jft_tests = {rule: test['accuracy']}
    if step == steps and rule == 'best':
      jft_tests['last'] = test['accuracy']
    if rule == 'last' and _first_best_step(record.get('jft_validation', [])) == steps:
      jft_tests['best'] = test['accuracy']
  if 'tests' in torch:
    torch_tests = {rule: test['accuracy'] for rule, test in torch['tests'].items()}
  else:  # the last weights
    torch_tests = {'last': torch['test_accuracy']}
    if _first_best_step(torch.get('validation', [])) == steps:
      torch_tests['best'] = torch['test_accuracy']
  return jft_tests, torch_tests


def read_runs(path: str) -> list[Run]:
  """The end-to-end runs of one `vs_pytorch.py --mode=end_to_end` log, in order."""
  runs, command = [], ''
  with open(path) as f:
    for line in f:
      if line.startswith('jft: '):
        command = line
      elif line.startswith('{') and '"jft_s"' in line:
        record = json.loads(line)
        seed = record.get('seed', int(next(iter(re.findall(r'--config\.seed=(\d+)', command)), 0)))
        dtype = record.get('dtype', next(iter(re.findall(r'--config\.model\.dtype=(\w+)', command)), 'float32'))
        runs.append(Run(path, record['machine'], int(seed), dtype, record['jft_s'], record['torch_s'],
                        *_tests(record)))
  return runs


def accuracies_by_seed(runs: Iterable[Run], rule: str) -> dict[int, tuple[float, float]]:
  """{seed: (jft's, PyTorch's) test accuracy under `rule`} of the seeds where both are known; ValueError where two
  runs of a seed disagree on any accuracy both know."""
  known: dict[tuple[int, str], dict[str, tuple[float, str]]] = {}  # (seed, framework) -> {rule: (accuracy, log)}
  for run in runs:
    for name, tests in (('jft', run.jft_tests), ('PyTorch', run.torch_tests)):
      seen = known.setdefault((run.seed, name), {})
      for which, accuracy in tests.items():
        earlier, log = seen.setdefault(which, (accuracy, run.log))
        if earlier != accuracy:
          raise ValueError(f'seed {run.seed}: {name} tests its {which} weights at {earlier:.4f} in {log} but '
                           f'{accuracy:.4f} in {run.log}: the two runs come from different code; summarise the '
                           'logs of one version')
  seeds = sorted({seed for seed, _ in known})
  return {seed: (known[seed, 'jft'][rule][0], known[seed, 'PyTorch'][rule][0]) for seed in seeds
          if rule in known[seed, 'jft'] and rule in known[seed, 'PyTorch']}


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the Student t interval of the mean of `values` (at least two)."""
  values = np.asarray(values, np.float64)
  half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return values.mean(), values.mean() - half, values.mean() + half


def points(value: float) -> str:
  return f'{100 * value:.1f}'


def summary(runs: list[Run], rule: str, reference: float) -> str:
  known = lambda tests: f'{tests[rule]:.3f}' if rule in tests else '-'
  lines = [f'test accuracies of the {rule} weights (- where the log does not tell them)',
           '| log | machine | seed | jft s | PyTorch s | jft / PyTorch | jft test | PyTorch test |',
           '|---|---|---|---|---|---|---|---|']
  for run in runs:
    lines.append(f'| {run.log.rsplit("/", 1)[-1]} | {run.machine} | {run.seed} | {run.jft_s:.0f} | '
                 f'{run.torch_s:.0f} | {run.ratio:.2f} | {known(run.jft_tests)} | {known(run.torch_tests)} |')
  lines.append('\nwall time, jft / PyTorch, per machine:')
  for machine in dict.fromkeys(run.machine for run in runs):
    ratios = [run.ratio for run in runs if run.machine == machine]
    lines.append(f'  {machine}: median {statistics.median(ratios):.2f} of {len(ratios)} run(s), '
                 f'{min(ratios):.2f}-{max(ratios):.2f}')
  by_seed = accuracies_by_seed(runs, rule)
  jft = np.array([pair[0] for pair in by_seed.values()])
  torch = np.array([pair[1] for pair in by_seed.values()])
  lines.append(f'\ntest accuracy of the {rule} weights over {len(by_seed)} seed(s) {list(by_seed)} (points; '
               'mean ± sample std):')
  if len(by_seed) < 2:
    lines.append('  fewer than two seeds with both accuracies known: no error bars')
    return '\n'.join(lines)
  difference, low, high = mean_interval(jft - torch)
  jft_mean, jft_low, jft_high = mean_interval(jft)
  lines += [f'  jft {points(jft.mean())} ± {points(jft.std(ddof=1))}, PyTorch {points(torch.mean())} ± '
            f'{points(torch.std(ddof=1))}',
            f'  jft - PyTorch, paired by seed: {100 * difference:+.1f} ± {100 * (jft - torch).std(ddof=1):.1f}, '
            f'95% interval [{100 * low:+.1f}, {100 * high:+.1f}]; jft ahead at {int(np.sum(jft > torch))}, '
            f'level at {int(np.sum(jft == torch))}, behind at {int(np.sum(jft < torch))} seed(s)',
            f'  jft against {points(reference)}: mean {points(jft_mean)}, 95% interval [{points(jft_low)}, '
            f'{points(jft_high)}] ({"contains" if jft_low <= reference <= jft_high else "excludes"} it)']
  return '\n'.join(lines)


def short_name(machine: str) -> str:
  """'AMD EPYC (family 25 model 17, Zen 4), 2 cores, AVX-512' -> 'AMD EPYC\n(family 25 model 17, Zen 4)'."""
  return re.sub(r', \d+ cores.*', '', machine).replace(' (', '\n(')


def plot(runs: list[Run], rule: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  by_seed = accuracies_by_seed(runs, rule)
  if not by_seed:
    raise ValueError(f'no seed has both test accuracies of the {rule} weights: nothing to plot on the left')
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  seeds = np.array(list(by_seed))
  jft, torch = (100 * np.array([pair[i] for pair in by_seed.values()]) for i in (0, 1))
  left.vlines(seeds, np.minimum(jft, torch), np.maximum(jft, torch), color='0.75', zorder=1)
  left.scatter(seeds, jft, label=f'jft (mean {jft.mean():.1f})', zorder=2)
  left.scatter(seeds, torch, marker='s', label=f'PyTorch (mean {torch.mean():.1f})', zorder=2)
  left.axhline(jft.mean(), color='C0', lw=0.8, ls='--')
  left.axhline(torch.mean(), color='C1', lw=0.8, ls='--')
  left.set(xlabel='seed', ylabel='test accuracy (%)', xticks=seeds,
           title=f'the main job, {rule} weights, paired by seed')
  left.margins(x=0.15, y=0.25)
  left.legend(loc='upper center', ncols=2, fontsize=8)
  machines = list(dict.fromkeys(run.machine for run in runs))
  for i, machine in enumerate(machines):
    ratios = [run.ratio for run in runs if run.machine == machine]
    right.scatter(np.full(len(ratios), i) + np.linspace(-0.15, 0.15, len(ratios)), ratios, color=f'C{i}')
  right.axhline(1.0, color='0.4', lw=0.8)
  right.set(xticks=range(len(machines)), xticklabels=[short_name(m) for m in machines], ylabel='jft / PyTorch',
            title='wall time, launch to test metrics')
  right.tick_params(axis='x', labelsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give the logs of vs_pytorch.py --mode=end_to_end runs')
  runs = [run for path in paths for run in read_runs(path) if run.dtype == _DTYPE.value]
  if not runs:
    raise app.UsageError(f'no {_DTYPE.value} end-to-end runs in {paths}')
  try:
    print(summary(runs, _TEST_ON.value, _REFERENCE.value))
    if _PLOT.value:
      plot(runs, _TEST_ON.value, _PLOT.value)
      print(f'plot: {_PLOT.value}')
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
