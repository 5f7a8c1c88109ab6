"""Early stopping and the test of the best checkpoint (jft/early_stopping.py): the patience arithmetic on scripted
metric sequences, and the command line's stop, best-checkpoint test and resume."""

import json
import os

import pytest
from contract import run_main

from jft.early_stopping import Best, EarlyStopping
from jft.errors import UserError

DIGITS = '--config=configs/digits_cnn.py:quick'


def without_seconds(record):
  return {k: v for k, v in record.items() if k != 'seconds'}


def feed(tracker, values, metric='accuracy'):
  """The evaluations (1-based) at which `tracker` improved, and the one at which it says stop (the feed ends
  there, as the train loop does), or None."""
  improved = []
  for i, value in enumerate(values, start=1):
    if tracker.update(step=10 * i, metrics={metric: value}):
      improved.append(i)
    if getattr(tracker, 'stop', False):
      return improved, i
  return improved, None


def test_patience_counts_evaluations_without_an_improvement_larger_than_min_delta():
  # 0.50 best; 0.60 best; 0.60 ties (1); 0.604 is within min_delta (2): stop at the 4th evaluation.
  stopper = EarlyStopping(metric='accuracy', mode='max', min_delta=0.005, patience=2)
  assert feed(stopper, [0.50, 0.60, 0.60, 0.604, 0.70]) == ([1, 2], 4)
  assert (stopper.value, stopper.step) == (0.60, 20)
  # An improvement resets the count: 1, then reset, then 1, 2, 3.
  stopper = EarlyStopping(metric='accuracy', mode='max', patience=3)
  assert feed(stopper, [0.5, 0.4, 0.6, 0.6, 0.5, 0.55, 0.9]) == ([1, 3], 6)


def test_mode_min_and_nan_never_counting_as_best():
  stopper = EarlyStopping(metric='loss', mode='min', patience=2)
  assert feed(stopper, [1.0, 0.8, float('nan'), 0.9, 0.7], metric='loss') == ([1, 2], 4)
  best = Best(metric='loss', mode='min')
  assert feed(best, [float('nan'), 2.0, 1.5], metric='loss') == ([2, 3], None)


def test_the_record_resumes_where_it_was():
  stopper = EarlyStopping(metric='accuracy', mode='max', patience=3)
  feed(stopper, [0.5, 0.7, 0.6])
  resumed = EarlyStopping(metric='accuracy', mode='max', patience=3)
  resumed.load(json.loads(json.dumps(stopper.to_json())))
  assert (resumed.value, resumed.step, resumed.evals_since) == (0.7, 20, 1)
  assert not resumed.update(40, {'accuracy': 0.65}) and not resumed.stop
  assert not resumed.update(50, {'accuracy': 0.65}) and resumed.stop
  # What a rerun reads off a checkpoint's record before it restores it: had that run stopped?
  assert resumed.stopped(resumed.to_json()) and not resumed.stopped(stopper.to_json())
  assert not resumed.stopped(None) and not resumed.stopped({})


def test_a_metric_the_evaluation_lacks_or_a_bad_mode_is_a_user_error():
  with pytest.raises(UserError, match="no 'f1' to pick the best by; use one of \\['accuracy'"):
    Best(metric='f1').update(1, {'accuracy': 0.5})
  with pytest.raises(UserError, match="use one of \\('max', 'min'\\)"):
    Best(metric='accuracy', mode='maximum')


def lines(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [line for line in map(json.loads, f) if line['split'] == split]


def best_validation_steps(workdir):
  """The steps of the best validation accuracy (all of them when several tie)."""
  validation = lines(workdir, 'validation')
  best = max(line['accuracy'] for line in validation)
  return [line['step'] for line in validation if line['accuracy'] == best]


def test_a_run_stops_early_tests_its_best_checkpoint_and_a_rerun_does_not_train_on(tmp_path, data_dir, monkeypatch):
  # min_delta 1.0: no evaluation after the first can improve on it, so patience 2 stops at the 3rd (step 15); the
  # test takes the best validation accuracy of the three (config.checkpoint.best_metric, no min_delta).
  args = [DIGITS, '--config.eval_every=5', '--config.log_every=5', '--config.checkpoint_every=100',
          '--config.early_stopping.patience=2', '--config.early_stopping.min_delta=1.0', f'--workdir={tmp_path}']
  first = run_main(*args, data_dir=data_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert [line['step'] for line in lines(tmp_path, 'validation')] == [5, 10, 15]
  (test,) = lines(tmp_path, 'test')
  assert test['step'] == 15 and test['test_on'] == 'best' and test['stopped_early']
  assert test['tested_step'] in best_validation_steps(tmp_path)
  # Saved: each new best and the stop, nothing else (checkpoint_every=100).
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert test['tested_step'] in saved and saved[-1] == 15
  monkeypatch.setenv('JAX_LOG_COMPILES', '1')
  again = run_main(*args, '--compilation_cache=off', data_dir=data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert [line['step'] for line in lines(tmp_path, 'train')][-1] == 15  # no step after the stop
  assert 'Compiling jit(train_step)' not in again.stderr  # nor is one made ahead while the checkpoint is read
  monkeypatch.delenv('JAX_LOG_COMPILES')
  (retest,) = lines(tmp_path, 'test')
  assert without_seconds(retest) == without_seconds(test)  # the same record; only the run's timings differ
  # test_on='last': the state the run stopped with.
  last = run_main(*args, '--config.test_on=last', data_dir=data_dir)
  assert last.returncode == 0, last.stderr[-3000:]
  (last_test,) = lines(tmp_path, 'test')
  assert last_test['tested_step'] == 15 and last_test['test_on'] == 'last'
  assert (last_test['accuracy'] == test['accuracy']) == (test['tested_step'] == 15)


def test_a_pruning_run_tests_its_best_state_at_the_final_sparsity(tmp_path, data_dir):
  from jft.pruning_hook import MaskSchedule
  schedule = MaskSchedule(None, 0.5, 'layer', 'unstructured', 'gradual', start_step=1, end_step=20, every=5)
  assert [schedule.at_target(step) for step in (1, 15, 19, 20, 30)] == [False, False, False, True, True]
  result = run_main(DIGITS, '--config.eval_every=5', '--config.prune.sparsity=0.5', '--config.prune.end_step=20',
                    '--config.prune.every=5', f'--workdir={tmp_path}', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  (test,) = lines(tmp_path, 'test')
  at_target = [line for line in lines(tmp_path, 'validation') if line['step'] >= 20]
  best = max(line['accuracy'] for line in at_target)
  assert test['tested_step'] in [line['step'] for line in at_target if line['accuracy'] == best]
  assert test['sparsity/prunable'] == pytest.approx(0.5, abs=1e-3)
