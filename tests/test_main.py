"""The command line end to end on the :quick configs: work directory contract, exact resume, user errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from contract import ROOT, TOOLS, run_main

from jft import executable_cache, host_memory


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('fashion_quick'))
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_workdir_follows_the_contract(quick_run):
  workdir, result = quick_run
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['total_steps'] == 40
  lines = read_metrics(workdir)
  assert {line['split'] for line in lines} == {'train', 'validation', 'test'}
  (test,) = [line for line in lines if line['split'] == 'test']
  assert test['step'] == 40 and test['count'] == 1000  # the whole test slice, nothing dropped
  assert test['accuracy'] > 0.5  # 40 steps already learn far more than chance (0.1)
  assert 0 < test['macro_f1'] <= 1 and len(test['confusion_matrix']) == 10
  assert sum(map(sum, test['confusion_matrix'])) == 1000
  assert json.loads(result.stdout.strip().splitlines()[-1])['accuracy'] == test['accuracy']
  # Where the run's time went: disjoint phases adding up to the total, and the compilations inside them.
  seconds = test['seconds']
  assert set(seconds) == {'total', 'setup', 'train', 'validation', 'checkpoint', 'test', 'compile'}
  assert all(value > 0 for value in seconds.values()), seconds
  phases = sum(value for name, value in seconds.items() if name not in ('total', 'compile'))
  assert phases == pytest.approx(seconds['total'], rel=1e-6)
  assert seconds['compile'] < seconds['total']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_checkpoints_readable_with_plain_orbax(quick_run):
  workdir, _ = quick_run
  out = subprocess.run([sys.executable, os.path.join(TOOLS, 'check_workdir.py'), workdir],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  facts = json.loads(out.stdout.strip().splitlines()[-1])
  assert facts['latest'] == 40
  assert 40 in facts['steps'] and len(facts['steps']) <= 3  # keep latest 2 + best 1
  assert facts['paths']['head/kernel'][0] == [256, 10]


def test_rerun_of_a_finished_run_resumes_without_training(quick_run, data_dir):
  workdir, _ = quick_run
  before = [line for line in read_metrics(workdir) if line['split'] != 'test']
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-2000:]
  after = read_metrics(workdir)
  assert [line for line in after if line['split'] != 'test'] == before
  assert [line['split'] for line in after].count('test') == 1


def test_killed_and_restarted_run_ends_bit_identical(tmp_path, data_dir):
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, 'kill_resume.py'), sys.executable, 'configs/digits_cnn.py:quick',
       str(tmp_path), f'--config.data.data_dir={data_dir}'],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  verdict = json.loads(out.stdout.strip().splitlines()[-1])
  assert verdict['identical'], verdict
  assert 0 < verdict['killed_after_step'] < 30


@pytest.mark.parametrize('args,message', [
    (['--config=configs/fashion_cnn.py:quick', '--config.batch_size=0'], 'batch_size'),
    (['--config=configs/fashion_cnn.py:quick', '--config.optim.lr=-1.0'], 'lr'),
    (['--config=configs/fashion_cnn.py:quick', '--config.model.name=vgg'], 'vgg'),
    (['--config=configs/fashion_cnn.py:quick', '--config.no_such_field=1'], 'no_such_field'),
    (['--config=configs/no_such_config.py'], 'no_such_config'),
    (['--config=configs/fashion_cnn.py:quick'], 'workdir'),
    (['--config=configs/fashion_cnn.py:quick', '--config.prune.sparsity=1.5'], 'sparsity'),
    (['--config=configs/fashion_cnn.py:quick', "--config.lr_mults=(('head/.*', 0.0),)"], 'must be positive'),
    (['--config=configs/fashion_cnn.py:quick', "--config.freeze=('.*',)"], 'freezes every parameter'),
])
def test_user_errors_exit_2_without_traceback(tmp_path, data_dir, args, message):
  if not any(a.startswith('--workdir') for a in args) and message != 'workdir':
    args = [*args, f'--workdir={tmp_path / "w"}']
  result = run_main(*args, data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


def test_incompatible_checkpoint_is_a_user_error_and_damages_nothing(quick_run, data_dir):
  workdir, _ = quick_run
  before = {name: open(os.path.join(workdir, name)).read() for name in ('config.json', 'metrics.jsonl')}
  steps_before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  result = run_main('--config=configs/fashion_cnn.py:quick', f'--workdir={workdir}', '--config.model.hidden=64',
                    data_dir=data_dir)
  assert result.returncode == 2
  assert 'hidden/kernel: expected (3136, 64), found (3136, 256)' in result.stderr
  assert 'Traceback' not in result.stderr
  assert {name: open(os.path.join(workdir, name)).read() for name in before} == before
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == steps_before


def checkpoint_params(workdir, step):
  out = subprocess.run([sys.executable, os.path.join(TOOLS, 'check_workdir.py'), workdir, str(step), '--dump',
                        os.path.join(workdir, f'params_{step}.npz')], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with np.load(os.path.join(workdir, f'params_{step}.npz')) as params:
    return {k.replace('|', '/'): params[k] for k in params.files}


def test_digits_transfer_takes_the_fashion_run_except_the_head(quick_run, data_dir, tmp_path):
  fashion, _ = quick_run
  workdir = str(tmp_path / 'digits')
  # With warmup the first update has learning rate 0, so the step-1 checkpoint holds the initial parameters.
  result = run_main('--config=configs/digits_transfer.py:quick', f'--workdir={workdir}', f'--config.init={fashion}',
                    '--config.total_steps=1', '--config.checkpoint_every=1', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  initial, source = checkpoint_params(workdir, 1), checkpoint_params(fashion, 40)
  for path in ('conv_0/kernel', 'conv_1/bias', 'hidden/kernel'):
    np.testing.assert_array_equal(initial[path], source[path])
  assert not np.array_equal(initial['head/kernel'], source['head/kernel'])  # a new head


def test_checkpoint_that_does_not_fit_the_model_exits_2_listing_names_and_shapes(quick_run, data_dir, tmp_path):
  fashion, _ = quick_run
  result = run_main('--config=configs/digits_transfer.py:quick', f'--workdir={tmp_path / "w"}',
                    f'--config.init={fashion}', '--config.model.hidden=64', data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'hidden/kernel: model (3136, 64)' in result.stderr and '(3136, 256)' in result.stderr
  assert 'Traceback' not in result.stderr


def test_minilm_fine_tunes_on_fortunes8_making_its_second_length_ahead(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_LOG_COMPILES', '1')
  workdir = str(tmp_path / 'minilm')
  result = run_main('--config=configs/minilm_fortunes.py:quick', f'--workdir={workdir}', '--compilation_cache=off',
                    '--config.data.buckets=(32,64)', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  (test,) = [line for line in read_metrics(workdir) if line['split'] == 'test']
  assert test['count'] == 64 and len(test['confusion_matrix']) == 8
  train = [line['loss'] for line in read_metrics(workdir) if line['split'] == 'train']
  assert train[-1] < train[0]
  # Both lengths' steps made once; the second traced, lowered and compiled on a thread of its own while the first
  # steps ran (jft/compile_ahead.py), so the loop's thread only lowered the first (jft/step.py, compile_in_background).
  thread_id = lambda line: line.split()[2]  # absl's prefix: level+date, time, thread id, file:line]
  lines = result.stderr.splitlines()
  lowered = [thread_id(line) for line in lines if 'Compiling jit(train_step)' in line]
  compiled = [thread_id(line) for line in lines if 'Finished XLA compilation of jit(train_step)' in line]
  assert len(lowered) == len(compiled) == 2, (lowered, compiled)
  assert lowered[1] == compiled[1] and lowered[0] not in (lowered[1], *compiled)


def test_the_train_step_compiles_once_ahead_of_the_state_or_the_restore_and_the_loop_runs_it(data_dir, tmp_path,
                                                                                              monkeypatch):
  # A fresh run compiles its first step on a thread while it initialises the state, a resumed run the step after
  # its checkpoint while it reads the checkpoint (jft/step.py, compile_in_background); the loop must then run that
  # program, not compile it again (:quick has one batch shape).
  monkeypatch.setenv('JAX_LOG_COMPILES', '1')
  last_losses = []
  for run in ('fresh', 'resumed'):
    if run == 'resumed':  # as if stopped after the checkpoint of step 15 (of 30)
      shutil.rmtree(tmp_path / 'checkpoints' / '30')
    result = run_main('--config=configs/digits_cnn.py:quick', f'--workdir={tmp_path}', '--compilation_cache=off',
                      data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ('15/30 [00:00<?, ?step/s]' in result.stderr) == (run == 'resumed')  # the bar starts where it resumed
    lines = result.stderr.splitlines()
    lowered = [line for line in lines if 'Compiling jit(train_step)' in line]
    compiled = [line for line in lines if 'Finished XLA compilation of jit(train_step)' in line]
    assert len(lowered) == 1 and len(compiled) == 1, (run, lowered, compiled)
    thread_id = lambda line: line.split()[2]  # absl's prefix: level+date, time, thread id, file:line]
    assert thread_id(compiled[0]) != thread_id(lowered[0])  # lowered on the main thread, compiled on another
    train = [line for line in read_metrics(tmp_path) if line['split'] == 'train']
    assert train[-1]['step'] == 30
    last_losses.append(train[-1]['loss'])
  assert last_losses[0] == last_losses[1]  # the batches read ahead for the program's shapes were read again


PROGRAMS = ('train_step', 'eval_step', '_fingerprints')  # what a run traces: jft/executable_cache.py keeps them


def test_a_second_run_loads_its_steps_from_the_compilation_cache(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_LOG_COMPILES', '1')
  cache = tmp_path / 'xla'
  first_lines, losses, traced = [], [], []
  for run in ('cold', 'warm', 'off'):
    flag = f'--compilation_cache={cache}' if run != 'off' else '--compilation_cache=off'
    result = run_main('--config=configs/digits_cnn.py:quick', f'--workdir={tmp_path / run}', flag, data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    first_lines.append(next(line for line in read_metrics(tmp_path / run) if line['split'] == 'train'))
    losses.append([line['loss'] for line in read_metrics(tmp_path / run)])
    traced.append({program for program in PROGRAMS if f'Compiling jit({program})' in result.stderr})
  cold, warm, off = first_lines
  assert cold['compilation_cache_hits'] == 0 and any(cache.iterdir())
  assert warm['compilation_cache_hits'] >= 1  # the train step at least, loaded rather than compiled
  assert 'compilation_cache_hits' not in off
  # The steps themselves come whole from jft's own cache, neither traced nor lowered (jft/executable_cache.py).
  assert cold['executable_cache_hits'] == 0 and cold['executable_cache_misses'] >= 1
  assert warm['executable_cache_hits'] >= 1 and warm['executable_cache_misses'] == 0
  # The warm run's first step ran the program it had started loading before it read its data.
  assert cold['executable_cache_prefetched'] == 0 and warm['executable_cache_prefetched'] == 1
  assert 'executable_cache_hits' not in off
  assert traced == [set(PROGRAMS), set(), set(PROGRAMS)]  # the checkpoints' fingerprints too (jft/fingerprint.py)
  assert losses[0] == losses[1] == losses[2]  # every train, validation and test loss, to the last bit
  assert list((cache / executable_cache.SUBDIRECTORY).glob(f'*{executable_cache.FIRST}'))  # what loads ahead
  # Without jft's entries (as after an edit to a source file that leaves the programs alone: a new key) the steps
  # come from jax's cache, and are kept as jax's cache holds them (XLA would write the loaded copy without its
  # kernels: running it would fail), so the run after that loads them whole and runs them, to the same losses.
  shutil.rmtree(cache / executable_cache.SUBDIRECTORY)
  for run in ('jax', 'kept'):
    result = run_main('--config=configs/digits_cnn.py:quick', f'--workdir={tmp_path / run}',
                      f'--compilation_cache={cache}', data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    first = next(line for line in read_metrics(tmp_path / run) if line['split'] == 'train')
    if run == 'jax':
      assert first['compilation_cache_hits'] >= 1 and first['executable_cache_hits'] == 0
      assert first['executable_cache_misses'] >= 1 and 'Compiling jit(train_step)' in result.stderr
      assert list((cache / executable_cache.SUBDIRECTORY).glob(f'*{executable_cache.SUFFIX}'))
    else:
      assert first['executable_cache_hits'] >= 1 and first['executable_cache_misses'] == 0
      assert not any(f'Compiling jit({program})' in result.stderr for program in PROGRAMS)
    assert [line['loss'] for line in read_metrics(tmp_path / run)] == losses[0]
  assert all(line['seconds_to_first_step'] > 0 for line in first_lines)
  # python -m jft.main restarted itself with the host memory setting that helps here (jft/host_memory.py)
  added = host_memory.restart_environment(os.environ, host_memory.find_jemalloc(), host_memory.glibc_version(),
                                          host_memory.transparent_huge_pages_mode(), host_memory.free_page_reporting())
  assert all(line['host_memory'] == host_memory.describe({**os.environ, **(added or {})}) for line in first_lines)
  assert all(line['cpu_dispatch'] == host_memory.cpu_dispatch() for line in first_lines)  # 'inline' unless asked


def test_weights_that_do_not_fit_the_architecture_exit_2(data_dir, tmp_path):
  result = run_main('--config=configs/minilm_fortunes.py:quick', f'--workdir={tmp_path / "w"}',
                    '--config.init=tests/fixtures/bert_small', data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'encoder/layer_0/attention/query/kernel: model (384, 384), pretrained tests/fixtures/bert_small (48, 48)' \
      in result.stderr
  assert 'missing   encoder/layer_5/mlp/output/bias (384,)' in result.stderr
  assert 'Traceback' not in result.stderr


def test_inspect_prints_each_parameter_and_the_totals(data_dir):
  command = [sys.executable, '-m', 'jft.inspect', '--config=configs/digits_cnn.py:quick',
             "--config.freeze=('conv_.*',)", f'--config.data.data_dir={data_dir}']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {line.split()[0]: [cell.split() for cell in line.split(' | ')] for line in result.stdout.splitlines()
          if '/' in line.split(' ')[0]}
  assert rows['conv_1/kernel'][1] == ['frozen', '-', '-'] and rows['conv_1/kernel'][-1] == ['P()']
  assert rows['hidden/kernel'][1] == ['train', '1', 'yes'] and rows['hidden/bias'][1][-1] == 'no'
  # conv_0: 3*3*1*32 + 32, conv_1: 3*3*32*64 + 64; hidden: 3136*256 + 256, head: 256*10 + 10
  assert 'trainable 805,642 (97.7%), frozen 18,816' in result.stdout
  opt_bytes = int(result.stdout.split('optimizer state ')[1].split(' bytes')[0].replace(',', ''))
  assert 2 * 4 * 805_642 <= opt_bytes < 2 * 4 * 805_642 + 64  # AdamW's two moments, only for trainable ones


def test_inspect_shows_the_fsdp_layout_for_devices_this_machine_lacks(data_dir):
  command = [sys.executable, '-m', 'jft.inspect', '--config=configs/digits_cnn.py:quick', '--devices=8',
             '--config.mesh.fsdp=4', '--config.sharding.min_bytes=4096', f'--config.data.data_dir={data_dir}']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  specs = {line.split()[0]: line.split(' | ')[-1] for line in result.stdout.splitlines() if '/' in line.split(' ')[0]}
  assert specs['hidden/kernel'] == "P('fsdp',)" and specs['conv_1/kernel'] == "P(None, None, None, 'fsdp')"
  assert specs['conv_0/kernel'] == 'P()'  # 1 KiB: under min_bytes
  assert "on the mesh {'data': 2, 'fsdp': 4, 'model': 1}" in result.stdout
  sharded, replicated = (float(x) for x in result.stdout.split('MiB sharded vs ')[0].split()[-1:] +
                         result.stdout.split('MiB sharded vs ')[1].split()[:1])
  assert 0.25 <= sharded / replicated < 0.27  # nearly all of it (the hidden kernel) split 4 ways


def test_freeze_pattern_matching_nothing_exits_2_with_the_closest_paths(data_dir, tmp_path):
  result = run_main('--config=configs/digits_cnn.py:quick', f'--workdir={tmp_path / "w"}',
                    "--config.freeze=('conv_9/.*',)", data_dir=data_dir)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert "'conv_9/.*' matches no parameter" in result.stderr and 'conv_0/' in result.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')  # nothing written


def test_staged_run_killed_at_the_stage_boundary_resumes_bit_identical(tmp_path, data_dir):
  # A linear probe of the head for 10 steps, then everything (LP-FT, as minilm_fortunes:staged; the stage
  # machinery is the model's business not at all, so the fast digits CNN): the first checkpoint is the boundary.
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, 'kill_resume.py'), sys.executable, 'configs/digits_cnn.py:quick',
       str(tmp_path), f'--config.data.data_dir={data_dir}', '--config.checkpoint_every=10',
       """--config.stages=({'steps': 10, 'freeze': ('(?!head/).*',)}, {'steps': 20})"""],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  verdict = json.loads(out.stdout.strip().splitlines()[-1])
  assert verdict['identical'], verdict
  assert verdict['killed_after_step'] == 10
