"""Failures and recovery: preemption (SIGTERM), divergence (exit 3), damaged checkpoints, one run per work
directory. The command-line cases use digits_cnn:quick (about 10 s a run)."""

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from contract import ROOT, TOOLS, run_main, sigterm_after_step
from test_checkpoint import small_state

from jft import divergence, fingerprint, preemption, sharding
from jft import step as step_lib
from jft.checkpoint import Checkpoints, DamagedCheckpoint
from jft.errors import UserError
from jft.metric_writer import TrainLog
from jft.state import create_train_state
from jft.workdir_lock import WorkdirLock

DIGITS = '--config=configs/digits_cnn.py:quick'


# --- fingerprints ------------------------------------------------------------------------------------------


def test_fingerprint_is_the_weighted_sum_of_the_bits_and_sees_one_flipped_bit():
  x = np.linspace(-3, 3, 1000, dtype=np.float32)
  bits = x.view(np.uint32).astype(np.uint64)
  weights = (np.arange(x.size, dtype=np.uint64) * 0x9E3779B1 * 2 + 1) % 2**32
  expected = int((bits * weights).sum() % 2**32)
  tree = {'w': jnp.asarray(x), 'half': jnp.asarray(x[:10], jnp.bfloat16), 'key': jnp.array([1, 2], jnp.uint32)}
  saved = fingerprint.of(tree)
  assert saved['w'] == expected
  assert fingerprint.mismatches(saved, tree) == []
  for index in (0, 517, 999):
    for bit in (0, 13, 31):
      flipped = x.copy()
      flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert fingerprint.mismatches(saved, {**tree, 'w': jnp.asarray(flipped)}) == ['w']
  assert fingerprint.mismatches(saved, {**tree, 'key': jnp.array([2, 1], jnp.uint32)}) == ['key']


# --- damaged checkpoints: detected on restore, set aside, never deleted --------------------------------------


def saved_steps(tmp_path, steps=(5, 10)):
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'), keep_latest=5, keep_best=0)
  for step in steps:
    checkpoints.save(small_state(step=step, width=4096)[0], {'position': step}, {})
  checkpoints.wait()
  return checkpoints, jax.eval_shape(lambda: small_state(width=4096)[0])


def largest_array_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state')) for f in fs]
  return max(files, key=os.path.getsize)


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def overwrite_middle(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b'\x5a' * 64)


@pytest.mark.parametrize('damage', [
    lambda step_dir: truncate(largest_array_file(step_dir)),
    lambda step_dir: overwrite_middle(largest_array_file(step_dir)),  # reads back silently: the fingerprint tells
    lambda step_dir: os.remove(os.path.join(step_dir, 'state', '_METADATA')),
], ids=['truncated', 'overwritten', 'metadata-missing'])
def test_damaged_checkpoint_is_detected_and_set_aside_not_deleted(tmp_path, damage):
  checkpoints, target = saved_steps(tmp_path)
  damage(str(tmp_path / 'checkpoints' / '10'))
  with pytest.raises(DamagedCheckpoint, match='step 10'):
    checkpoints.restore(10, target)
  moved = checkpoints.set_aside(10)
  assert moved == tmp_path / 'damaged_checkpoints' / '10' and os.path.isdir(os.path.join(moved, 'state'))
  assert checkpoints.all_steps() == [5]
  state, data_state = checkpoints.restore(5, target)
  assert int(state.step) == 5 and data_state == {'position': 5}
  checkpoints.save(small_state(step=10, width=4096)[0], {'position': 10}, {})  # no collision with the damaged one
  checkpoints.wait()
  assert checkpoints.all_steps() == [5, 10]


def test_a_checkpoint_of_another_state_is_a_user_error_not_damage(tmp_path):
  checkpoints, _ = saved_steps(tmp_path, steps=(5,))
  state, _ = small_state(width=4096)
  other = state.replace(opt_state=optax.sgd(0.1).init(state.params))  # same params, another optimizer
  with pytest.raises(UserError, match='optimizer state'):
    checkpoints.restore(5, jax.eval_shape(lambda: other))


# --- divergence: a non-finite update is never applied --------------------------------------------------------


def linear_apply(params, model_state, inputs, train, rng):
  del train, rng
  return inputs['x'] @ params['w'], model_state


def test_update_with_a_nonfinite_loss_is_not_applied_but_the_step_counts():
  tx = optax.adam(0.1)
  state = create_train_state({'w': jnp.ones((2, 3))}, {}, tx, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh(jax.devices()[:1])
  train_step = step_lib.jit_train_step(step_lib.make_train_step(linear_apply, tx), mesh)
  good = {'x': np.ones((4, 2), np.float32), 'label': np.zeros(4, np.int32)}
  bad = {'x': np.array([[1, np.nan]] * 4, np.float32), 'label': np.zeros(4, np.int32)}
  state, metrics = train_step(state, sharding.put_batch(good, mesh))
  assert int(metrics['nonfinite']) == 0
  before = jax.device_get(state)
  state, metrics = train_step(state, sharding.put_batch(bad, mesh))
  assert int(metrics['nonfinite']) == 1 and not np.isfinite(float(metrics['loss']))
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), before.opt_state)
  state, metrics = train_step(state, sharding.put_batch(good, mesh))
  assert int(metrics['nonfinite']) == 0 and int(state.opt_state[0].count) == 2  # the skipped step left no trace


def test_the_skip_copies_no_optimizer_state():
  """The update runs under one `lax.cond` (`divergence.update_if_finite`), so XLA writes the new parameters and
  moments over the donated old ones: a select between new and old state copied every moment on every step."""
  tx = optax.adamw(0.1)
  state = create_train_state({'w': jnp.ones((64, 32)), 'b': jnp.ones((32,))}, {}, tx, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh(jax.devices()[:1])
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(lambda p, s, x, t, r: (x['x'] @ p['w'] + p['b'], s), tx), mesh)
  batch = sharding.put_batch({'x': np.ones((4, 64), np.float32), 'label': np.zeros(4, np.int32)}, mesh)
  program = train_step.lower(state, batch).compile().as_text()
  entry = program[program.index('ENTRY'):]
  assert not re.findall(r'= f32\[[\d,]*\]\S* copy\(', entry)


def test_nonfinite_watch_skips_up_to_its_budget_then_names_the_step():
  watch = divergence.NonfiniteWatch(budget=2, advice='a lower learning rate')
  for step, flag in zip(range(1, 8), [0, 1, 0, 0, 1, 0, 0], strict=True):
    watch.add(step, jnp.int32(flag))
  watch.check()  # two skipped: within the budget
  watch.add(8, jnp.int32(0))
  watch.add(9, jnp.int32(1))
  with pytest.raises(divergence.Diverged, match=r'at step 9; .*3 such step\(s\): 2, 5, 9'):
    watch.check()


def test_train_log_averages_the_applied_steps_and_counts_the_skipped():
  log = TrainLog()
  for loss, nonfinite in ((1.0, 0), (float('nan'), 1), (3.0, 0)):
    log.add({'loss': jnp.float32(loss), 'nonfinite': jnp.int32(nonfinite)})
  means = log.flush()
  assert means['loss'] == 2.0 and means['nonfinite_steps'] == 1


# --- preemption: the signal handlers -----------------------------------------------------------------------


def test_first_ctrl_c_asks_for_a_save_and_the_second_stops_at_once(capsys):
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with preemption.PreemptionWatch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.reached(2) and watch.signal == signal.SIGINT
    assert 'got SIGINT: finishing the current step, saving a checkpoint' in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the previous ones are back


# --- the command line ---------------------------------------------------------------------------------------


def params_sha(workdir, step=None):
  args = [sys.executable, os.path.join(TOOLS, 'check_workdir.py'), str(workdir)] + ([str(step)] if step else [])
  out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])['params_sha256']


def steps_in(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory, data_dir):
  """An uninterrupted digits_cnn:quick run (30 steps, checkpoints at 15 and 30)."""
  workdir = tmp_path_factory.mktemp('digits') / 'run'
  result = run_main(DIGITS, f'--workdir={workdir}', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sigterm_saves_the_current_step_and_the_same_command_resumes_exactly(digits_run, tmp_path, data_dir):
  args = [DIGITS, '--config.checkpoint_every=1000', '--config.log_every=5']  # the same updates as digits_run
  workdir = tmp_path / 'preempted'
  command = [sys.executable, '-m', 'jft.main', *args, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  stderr = sigterm_after_step(process, workdir, 5)  # training, past its first steps
  assert process.returncode == 75, stderr[-3000:]
  (saved,) = steps_in(workdir)  # checkpoint_every is 1000: this checkpoint is the preemption's
  assert 5 <= saved < 30
  assert f'saved the checkpoint of step {saved}' in stderr and 'Traceback' not in stderr

  resumed = run_main(*args, f'--workdir={workdir}', data_dir=data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert params_sha(workdir, 30) == params_sha(digits_run, 30)


def test_diverging_run_exits_3_and_keeps_its_last_good_checkpoint(digits_run, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(digits_run, workdir)
  good = params_sha(workdir, 30)
  result = run_main(DIGITS, f'--workdir={workdir}', '--config.total_steps=60', '--config.optim.lr=1e8',
                    data_dir=data_dir)
  assert result.returncode == 3, result.stderr[-3000:]
  assert re.search(r'not finite \(NaN or inf\) at step (3[1-9]|[45]\d);', result.stderr)  # after step 30
  assert f'The last good checkpoint, step 30 in {workdir / "checkpoints"}' in result.stderr
  assert '--config.optim.lr' in result.stderr and 'Traceback' not in result.stderr
  assert steps_in(workdir)[-1] == 30 and params_sha(workdir, 30) == good

  skipping = run_main(DIGITS, f'--workdir={workdir}', '--config.total_steps=45', '--config.optim.lr=1e8',
                      '--config.skip_nonfinite=100', data_dir=data_dir)
  assert skipping.returncode == 0, skipping.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert sum(line.get('nonfinite_steps', 0) for line in lines if line['split'] == 'train') > 0
  # The one update of lr 1e8 that was finite blew the weights up (the test loss is inf), but every array saved
  # stays finite: the NaN updates after it were skipped.
  dump = tmp_path / 'params.npz'
  subprocess.run([sys.executable, os.path.join(TOOLS, 'check_workdir.py'), str(workdir), '45', '--dump', str(dump)],
                 check=True, capture_output=True, timeout=300, cwd=ROOT)
  with np.load(dump) as params:
    assert params.files and all(np.isfinite(params[name]).all() for name in params.files)


def test_damaged_latest_checkpoint_falls_back_to_the_one_before_and_ends_identical(digits_run, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(digits_run, workdir)
  overwrite_middle(largest_array_file(str(workdir / 'checkpoints' / '30')))
  result = run_main(DIGITS, f'--workdir={workdir}', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'the checkpoint at step 30' in result.stderr and 'damaged_checkpoints/30' in result.stderr
  assert 'Traceback' not in result.stderr
  assert os.path.isdir(workdir / 'damaged_checkpoints' / '30')
  assert params_sha(workdir, 30) == params_sha(digits_run, 30)  # retrained from 15, bit for bit


def test_no_readable_checkpoint_left_exits_2_naming_the_directory(digits_run, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(digits_run, workdir)
  for step in steps_in(workdir):
    os.remove(workdir / 'checkpoints' / str(step) / 'state' / '_METADATA')
  result = run_main(DIGITS, f'--workdir={workdir}', data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'no readable checkpoint is left' in result.stderr and 'Traceback' not in result.stderr
  assert sorted(os.listdir(workdir / 'damaged_checkpoints')) == ['15', '30']


def test_a_live_run_holds_its_workdir_and_a_killed_one_does_not(digits_run, data_dir, tmp_path):
  with WorkdirLock(str(digits_run)):
    result = run_main(DIGITS, f'--workdir={digits_run}', data_dir=data_dir)
  assert result.returncode == 2 and 'is in use by a live run (pid' in result.stderr
  holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from jft.workdir_lock import WorkdirLock\n'
                             'with WorkdirLock(sys.argv[1]): print("held", flush=True); time.sleep(600)',
                             str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(UserError, match='in use'):
    WorkdirLock(str(tmp_path)).__enter__()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with WorkdirLock(str(tmp_path)):  # the killed holder left nothing stuck
    pass


@pytest.mark.parametrize('below,message', [('', 'is a file, not a directory'),
                                           ('/run', 'cannot create the work directory')])
def test_workdir_that_is_a_file_or_cannot_be_made_exits_2(tmp_path, data_dir, below, message):
  path = tmp_path / 'a_file'
  path.write_text('keep me')
  result = run_main(DIGITS, f'--workdir={path}{below}', data_dir=data_dir)
  assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and path.read_text() == 'keep me'


def root_obeys_file_permissions():
  """Runs in a child before exec: if it is root, it gives up the capabilities to ignore file permissions
  (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) for good, so a read-only directory is read-only to it too."""
  if os.geteuid() != 0:
    return
  libc = ctypes.CDLL(None, use_errno=True)
  for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP: needs CAP_SETPCAP
      raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')


def test_a_workdir_that_is_not_writable_exits_2_and_is_left_as_it_was(tmp_path, data_dir):
  workdir = tmp_path / 'read_only'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept')
  workdir.chmod(0o555)
  try:
    try:
      probe = subprocess.run(['touch', str(workdir / 'probe')], preexec_fn=root_obeys_file_permissions,
                             capture_output=True)
    except subprocess.SubprocessError:
      pytest.skip('root here cannot give up CAP_DAC_OVERRIDE (no CAP_SETPCAP), so no directory is read-only to it')
    assert probe.returncode != 0
    command = [sys.executable, '-m', 'jft.main', DIGITS, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            preexec_fn=root_obeys_file_permissions)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f'the work directory {workdir} is not writable' in result.stderr and 'Traceback' not in result.stderr
    assert os.listdir(workdir) == ['notes.txt']
  finally:
    workdir.chmod(0o755)


def test_sigkill_at_several_moments_even_during_a_save_resumes_bit_identical(digits_run, tmp_path, data_dir):
  """Killed twice (once while an async save is being written, once at a random moment of training),
  restarted each time with the same command: the final parameters are those of the uninterrupted run."""
  args = [DIGITS, '--config.checkpoint_every=5', f'--config.data.data_dir={data_dir}']
  workdir = tmp_path / 'killed'
  command = [sys.executable, '-m', 'jft.main', *args, f'--workdir={workdir}']
  checkpoints = workdir / 'checkpoints'
  saving = lambda: checkpoints.exists() and any('tmp' in name for name in os.listdir(checkpoints))
  delays = iter(np.random.default_rng(0).uniform(0.05, 0.5, 1))
  killed_while = []
  for moment in ('saving', 'training'):
    first_steps = steps_in(workdir)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
      deadline = time.monotonic() + 300
      if moment == 'saving':
        while not saving() and process.poll() is None and time.monotonic() < deadline:
          time.sleep(0.005)
      else:  # once it has saved a step of its own: training, then a random moment later
        while steps_in(workdir) == first_steps and process.poll() is None and time.monotonic() < deadline:
          time.sleep(0.01)
        time.sleep(next(delays))
      assert process.poll() is None, 'the run ended before it could be killed'
      killed_while.append(moment if moment == 'training' or saving() else 'after a save')
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
  assert killed_while[0] in ('saving', 'after a save')
  finished = run_main(DIGITS, '--config.checkpoint_every=5', f'--workdir={workdir}', data_dir=data_dir)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert params_sha(workdir, 30) == params_sha(digits_run, 30)


def test_a_disk_filling_up_during_a_save_exits_2_and_keeps_the_earlier_checkpoints(tmp_path, data_dir):
  disk = tmp_path / 'small_disk'
  disk.mkdir()
  # 14 MiB: the run's config, metrics and first checkpoint (8.7 MiB) fit, the second does not.
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=14m', 'tmpfs', str(disk)], capture_output=True).returncode:
    pytest.skip('mounting a small tmpfs needs root with CAP_SYS_ADMIN')
  try:
    workdir = disk / 'run'
    result = run_main(DIGITS, f'--workdir={workdir}', data_dir=data_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'saving the checkpoint of step 30' in result.stderr and 'No space left on device' in result.stderr
    assert 'intact (steps: 15)' in result.stderr and 'Traceback' not in result.stderr
    assert os.listdir(workdir / 'checkpoints') == ['15']  # the partial files of step 30 are gone
    assert params_sha(workdir, 15)  # and step 15 reads back
  finally:
    subprocess.run(['umount', str(disk)], check=True)
