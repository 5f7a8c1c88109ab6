"""Shared by the experiment scripts: run the command line in experiments/runs/NAME, read its results."""

import json
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

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
