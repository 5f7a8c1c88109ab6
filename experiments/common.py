"""Shared by the experiment scripts: run the command line in experiments/runs/NAME, read its results."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, 'experiments', 'runs')
RESULTS = os.path.join(ROOT, 'experiments', 'results')


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


def load_config(spec: str):
  """The config of `configs/NAME.py[:ARG]`, as `--config=` would load it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
