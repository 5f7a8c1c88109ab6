"""Shared by the experiment scripts: run the command line in experiments/runs/NAME, read its results."""

import json
import os
import subprocess
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from jft import quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, 'experiments', 'runs')
RESULTS = os.path.join(ROOT, 'experiments', 'results')
# Config fields added since some saved runs were made, with the value that does what those runs did (the loop
# reads a missing one as this too): a saved run without the field matches a config that has this value.
ADDED_FIELDS = {'prune.criterion': 'magnitude', 'prune.initial_sparsity': 0.0, 'prune.rewind_lr': False,
                'quantize.mode': 'none', 'quantize.targets': None}


def read_metrics(name: str) -> list[dict]:
  path = os.path.join(RUNS, name, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_jft(name: str, config: str, *overrides: str) -> dict:
  """The final test metrics of `python -m jft.main` in experiments/runs/NAME (run unless already finished;
  a killed run resumes)."""
  tests = [line for line in read_metrics(name) if line['split'] == 'test']
  if tests:
    return tests[-1]
  command = [sys.executable, '-m', 'jft.main', f'--config={config}', f'--workdir={os.path.join(RUNS, name)}',
             *overrides]
  print('$', ' '.join(command), flush=True)
  subprocess.run(command, cwd=ROOT, check=True)
  return run_jft(name, config, *overrides)


def _flat(tree: dict, prefix: str = '') -> dict:
  return {path: leaf for key, value in tree.items()
          for path, leaf in (_flat(value, f'{prefix}{key}.').items() if isinstance(value, dict)
                             else [(f'{prefix}{key}', value)])}


def check_reused(name: str, config) -> None:
  """A finished run is reused only if it was run with this config (seed, steps, rules: the whole of it, but where
  the data lives and fields added since with the value that does what the run did: `ADDED_FIELDS`)."""
  path = os.path.join(RUNS, name, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flat(json.load(f))
  wanted = _flat(json.loads(config.to_json()))
  for flat in (saved, wanted):  # where the data lives is not part of the experiment
    flat.pop('data.data_dir', None)
  for field, value in ADDED_FIELDS.items():
    if field not in saved and wanted.get(field, value) == value:
      wanted.pop(field, None)
  differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k, KeyError) != wanted.get(k, KeyError))
  if differ:
    raise SystemExit(f'{path} was run with another config (fields {differ} differ): move the run away')


def load_config(spec: str, *overrides: str):
  """The config of `--config=configs/NAME.py[:ARG] --config.FIELD=VALUE ...`, parsed as `python -m jft.main`
  parses it (ml_collections' config flag)."""
  argv = ['load_config', f'--config={os.path.join(ROOT, spec)}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'configs/NAME.py[:ARG]', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def evaluated(name: str) -> dict:
  """`jft.quantize.evaluate_run` of run NAME's tested checkpoint: its metrics with float32 and with int8 weights
  and every test example's prediction, saved in RUN/quantized.json (as `python -m jft.quantize` writes it) and read
  back from there next time. The float32 evaluation must reproduce the run's own test accuracy."""
  path = os.path.join(RUNS, name, 'quantized.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if 'predictions' in saved:
      return saved
  results = quantize.evaluate_run(os.path.join(RUNS, name))
  test = [line for line in read_metrics(name) if line['split'] == 'test'][-1]
  if abs(results['float32']['accuracy'] - test['accuracy']) > 1e-9:
    raise SystemExit(f'{name}: evaluating its tested checkpoint gives accuracy {results["float32"]["accuracy"]}, '
                     f'its test line says {test["accuracy"]}')
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  return results


def correct(results: dict, weights: str = 'float32') -> np.ndarray:
  """Whether each test example was right, from `evaluated(...)` (weights 'float32' or 'int8')."""
  predictions = results['predictions']
  return np.equal(predictions[weights], predictions['label'])


def mean_std(values) -> str:
  """Fractions as points: 'mean ± sample std' ('mean' alone for one value)."""
  values = 100 * np.asarray(values)
  return f'{values.mean():.1f} ± {values.std(ddof=1):.1f}' if len(values) > 1 else f'{values.mean():.1f}'


def interval_cell(interval: tuple[float, float]) -> str:
  """A (low, high) interval of fractions as ' [low, high]' in points."""
  return f' [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]'


def mcnemar_cells(tests: list[dict]) -> str:
  """`metrics.mcnemar` results as 'A only/B only, p=...' per pair."""
  return '; '.join(f"{test['a_only']}/{test['b_only']}, p={test['p_value']:.2g}" for test in tests)
