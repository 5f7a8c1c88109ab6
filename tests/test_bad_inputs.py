"""A catalogue of bad command-line inputs: each exits 2 with one message that names the problem and the fix, no
traceback, and leaves the work directory as it was. (Faults during a run: tests/test_reliability.py.)"""

import os
import re
import subprocess
import sys

import pytest
from contract import ROOT

DIGITS = '--config=configs/digits_cnn.py:quick'


def run(*args, data_dir=None):
  """`python -m jft.main ARGS` exactly as a user types it (no extra overrides unless `data_dir`)."""
  extra = [f'--config.data.data_dir={data_dir}'] if data_dir else []
  return subprocess.run([sys.executable, '-m', 'jft.main', *args, *extra], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def snapshot(directory):
  """Every file and its size, but the lock file any run creates (jft/workdir_lock.py)."""
  return {os.path.relpath(os.path.join(d, f), directory): os.path.getsize(os.path.join(d, f))
          for d, _, files in os.walk(directory) for f in files if f != 'jft.lock'}


@pytest.mark.parametrize('args,message', [
    (['--config=configs/nope.py'], 'the config file configs/nope.py does not exist'),
    (['--config=configs/digits_cnn.py:quik'], "unknown variant 'quik' of digits_cnn: the only one is 'quick'"),
    (['--config=configs/fashion_cnn.py:full'], "unknown variant 'full' of fashion_cnn"),
    (['--config=configs/digits_transfer.py:quik'], "unknown variant 'quik' of digits_cnn"),
    (['--config=configs/minilm_fortunes.py:quik'], "unknown variant(s) ['quik'] of minilm_fortunes"),
    ([DIGITS, '--config.no_such=1'], "the config has no field 'no_such'; its fields are: backend"),
    ([DIGITS, '--config.optim.lrr=1'], "config.optim has no field 'lrr'; did you mean --config.optim.lr?"),
    ([DIGITS, '--config.prune.sparsty=0.5'], 'did you mean --config.prune.sparsity?'),
    ([DIGITS, '--config.optim.lr=abc'], "--config.optim.lr=abc: could not convert string to float: 'abc'"),
    ([DIGITS, '--config.total_steps=ten'], '--config.total_steps=ten'),
    ([DIGITS, '--config.total_steps=0'], 'config.total_steps must be a positive integer'),
    ([DIGITS, '--config.skip_nonfinite=-1'], 'config.skip_nonfinite must be 0 or more'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.schedule=oneshot', '--config.prune.start_step=0'],
     'use start_step=1 to prune before the first update'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.end_step=100'],
     'config.prune.end_step is 100, after the last step (30)'),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_input_exits_2_with_one_message_and_touches_nothing(tmp_path, data_dir, args, message):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept')
  before = snapshot(workdir)
  result = run(*args, f'--workdir={workdir}', data_dir=data_dir if '--config=configs/nope.py' not in args else None)
  assert result.returncode == 2, result.stderr[-3000:]
  assert message in result.stderr
  assert 'Traceback' not in result.stderr and 'jft: error: ' in result.stderr
  assert snapshot(workdir) == before


def bert_dir(tmp_path, damage):
  """A copy of the installed MiniLM's files with one of them damaged by `damage(directory)`."""
  from jft import model_files
  source = model_files.pretrained_dir('minilm')
  directory = tmp_path / 'bert'
  directory.mkdir()
  for name in ('config.json', 'tokenizer.json', 'model.safetensors'):
    os.symlink(os.path.join(source, name), directory / name)
  damage(directory)
  return directory


def replace(directory, name, content):
  os.remove(directory / name)
  (directory / name).write_bytes(content)


@pytest.mark.parametrize('damage,message', [
    (lambda d: replace(d, 'model.safetensors', open(d.parent / 'original.safetensors', 'rb').read(1_000_000)),
     'is not a readable safetensors file (Error while deserializing header: incomplete metadata, file not fully '
     'covered)'),
    (lambda d: replace(d, 'config.json', b'{"model_type": '), 'is not a readable JSON config'),
    (lambda d: replace(d, 'config.json', b'{"model_type": "gpt2"}'), "model_type 'gpt2' is not a BERT"),
    (lambda d: (os.remove(d / 'model.safetensors'), (d / 'pytorch_model.bin').write_bytes(b'\x80\x04.')),
     'is a pickle file, which jft never loads'),
], ids=['safetensors-truncated', 'config-not-json', 'config-of-gpt2', 'pickle-only'])
def test_bad_pretrained_directory_is_a_user_error_naming_the_file(tmp_path, damage, message):
  from jft import init, model_files
  from jft.errors import UserError
  os.symlink(os.path.join(model_files.pretrained_dir('minilm'), 'model.safetensors'), tmp_path / 'original.safetensors')
  with pytest.raises(UserError, match=re.escape(message)):
    init.load_params(str(bert_dir(tmp_path, damage)))


def test_bad_pretrained_directory_exits_2_from_the_command_line(tmp_path, data_dir):
  init = bert_dir(tmp_path, lambda d: replace(d, 'config.json', b'{"model_type": '))
  result = run('--config=configs/minilm_fortunes.py:quick', f'--config.init={init}', f'--workdir={tmp_path / "run"}',
               data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'is not a readable JSON config' in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('field', ['--config.init', '--config.distill.teacher'])
def test_a_pickle_file_offered_as_weights_is_refused(tmp_path, data_dir, field):
  pickle = tmp_path / 'weights.pkl'
  pickle.write_bytes(b'\x80\x04K\x01.')
  result = run('--config=configs/digits_transfer.py:quick', f'{field}={pickle}', f'--workdir={tmp_path / "run"}',
               data_dir=data_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'is a pickle file, which jft never loads' in result.stderr and 'Traceback' not in result.stderr
