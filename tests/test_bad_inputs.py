"""A catalogue of bad command-line inputs: each exits 2 with one message that names the problem and the fix, no
traceback, and leaves the work directory as it was. (Faults during a run: tests/test_reliability.py.)"""

import os
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from contract import ROOT
from ml_collections import config_flags

from jft import cli_errors, config_checks
from jft.errors import UserError

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
    ([DIGITS, '--config.prune.sparsty=0.5'],
     'did you mean --config.prune.sparsity or --config.prune.initial_sparsity?'),
    ([DIGITS, '--config.optim.lr=abc'], "--config.optim.lr=abc: could not convert string to float: 'abc'"),
    ([DIGITS, '--config.total_steps=ten'], '--config.total_steps=ten'),
    ([DIGITS, '--config.total_steps=0'], 'config.total_steps is 0 (int): make it an integer >= 1'),
    ([DIGITS, '--config.optim.b2=1.5'], 'config.optim.b2 is 1.5 (float): make it a number in [0, 1)'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.schedule=oneshot', '--config.prune.start_step=0'],
     'use start_step=1 to prune before the first update'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.end_step=100'],
     'config.prune.end_step is 100, after the last step (30)'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.criterion=taylor'],
     "unknown config.prune.criterion 'taylor'; use one of ('magnitude', 'movement', 'saliency', 'fisher')"),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.criterion=movement', '--config.prune.schedule=oneshot'],
     'the first update that prunes comes before step 1, when none has run'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.criterion=fisher', '--config.prune.start_step=5',
      '--config.lora.rank=2'], 'is frozen in stage 0 and gets none (LoRA freezes the weights it adapts)'),
    ([DIGITS, '--config.prune.sparsity=0.5', '--config.prune.schedule=oneshot', '--config.prune.initial_sparsity=0.2'],
     "only the 'gradual' schedule starts from an initial sparsity"),
    ([DIGITS, '--config.quantize.mode=int4'], "unknown config.quantize.mode 'int4'; use one of ('none', 'qat')"),
    ([DIGITS, '--config.quantize.mode=qat', '--config.quantize.targets=(\'dense.*\',)'],
     "config.quantize.targets pattern 'dense.*' matches no parameter"),
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
    (lambda d: replace(d, 'config.json', b'{"model_type": "bert", "num_attention_heads": 0}'),
     'the BERT config.num_attention_heads is 0 (int): make it an integer >= 1'),
    (lambda d: (os.remove(d / 'model.safetensors'), (d / 'pytorch_model.bin').write_bytes(b'\x80\x04.')),
     'is a pickle file, which jft never loads'),
], ids=['safetensors-truncated', 'config-not-json', 'config-of-gpt2', 'config-zero-heads', 'pickle-only'])
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


# --- every numeric field: the wrong type or out of range ------------------------------------------------------

CONFIGS = {'configs/digits_cnn.py': (None, 'quick'), 'configs/fashion_cnn.py': (None, 'quick'),
           'configs/digits_transfer.py': (None, 'quick'),
           'configs/minilm_fortunes.py': (None, 'quick', 'scratch', 'probe', 'top2', 'staged', 'llrd', 'lora')}
# Values a user could type for each numeric field that a run cannot use, written out by hand (not derived from
# the rules they test). The first config of the two below that has the field takes the override.
BAD_VALUES = {
    'seed': ['-1', '4294967296', 'abc'],
    'batch_size': ['0', '-8', '1.5'],
    'total_steps': ['0', 'ten'],
    'log_every': ['0'],
    'eval_every': ['0'],
    'checkpoint_every': ['-1'],
    'skip_nonfinite': ['-1'],
    'checkpoint.keep_latest': ['0'],
    'checkpoint.keep_best': ['-1'],
    'data.crop_padding': ['-1'],
    'data.max_shift': ['-2'],
    'data.image_size': ['0', '28.5'],
    'data.examples_per_class': ['0'],
    'data.max_len': ['0'],
    'data.buckets': ['abc', '(32,64.5)', '(0,128)'],
    'data.num_buckets': ['-1', '2.5'],
    'data.sort_window': ['0'],
    'model.features': ['(32,0)', '(1,x)', '()'],
    'model.hidden': ['0'],
    'model.dropout': ['1.0', '-0.1', 'nan'],
    'model.head_dropout': ['1.5', 'True'],
    'optim.lr': ['0', '-1e-3', 'nan', 'inf', 'abc'],
    'optim.weight_decay': ['-0.01'],
    'optim.b1': ['1.0'],
    'optim.b2': ['1.5', '-0.1'],
    'optim.warmup_steps': ['-3'],
    'optim.clip_norm': ['0', '-1'],
    'optim.accumulate_steps': ['0'],
    'optim.layer_decay': ['0', '1.5'],
    'prune.sparsity': ['1.0', '-0.5'],
    'prune.start_step': ['0'],
    'prune.end_step': ['0'],
    'prune.every': ['0'],
    'prune.cycles': ['0'],
    'prune.initial_sparsity': ['1.0', '-0.1', 'nan'],
    'distill.weight': ['1.5', '-0.1'],
    'distill.temperature': ['0'],
    'early_stopping.patience': ['0', '1.5'],
    'early_stopping.min_delta': ['-0.01'],
    'lora.rank': ['-1', '2.5'],
    'lora.alpha': ['0', '-16'],
    'mesh.data': ['0', '-2'],
    'mesh.fsdp': ['0'],
    'mesh.model': ['-3'],
    'sharding.min_bytes': ['-1'],
}


def config_variants():
  for path, variants in CONFIGS.items():
    for variant in variants:
      yield f'{path}:{variant}' if variant else path


def load(config_arg: str) -> ml_collections.ConfigDict:
  return parse_and_check(config_arg)[0]


def parse_and_check(config_arg: str, *overrides: str) -> tuple[ml_collections.ConfigDict | None, str | None]:
  """The command line's two checks in this process: absl + ml_collections parse the overrides (types), then
  `config_checks.check` (ranges). Returns the config, or None and the message jft.main would print."""
  argv = ['jft.main', f'--config={config_arg}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, ValueError, TypeError, KeyError) as e:
    return None, cli_errors.explain_flag_error(e, argv)
  try:
    config_checks.check(flag_values.config)
  except UserError as e:
    return None, str(e)
  return flag_values.config, None


def numeric_fields(node, prefix=''):
  """Paths of the numeric leaves (numbers, placeholders of a number type, tuples of numbers) of a config."""
  for name in node.keys():
    path, value = prefix + name, node[name]
    if isinstance(value, ml_collections.ConfigDict):
      yield from numeric_fields(value, path + '.')
    elif path == 'stages':
      for i, stage in enumerate(value):
        yield from (f'stages[{i}].optim.{key}' for key in dict(stage).get('optim', {}))
    elif node.get_type(name) in (int, float) or (
        isinstance(value, tuple) and value and all(isinstance(v, (int, float)) for v in value)):
      yield path


@pytest.mark.parametrize('config_arg', list(config_variants()))
def test_every_numeric_field_of_every_config_has_a_range_and_the_shipped_values_are_in_it(config_arg):
  config, problem = parse_and_check(config_arg)
  assert problem is None, problem
  for path in numeric_fields(config):
    stage_optim = re.fullmatch(r'stages\[\d+\]\.optim\.(\w+)', path)
    assert (stage_optim and stage_optim.group(1) in config_checks.OPTIM) or path in config_checks.FIELDS, path
    assert path in BAD_VALUES or stage_optim, f'{path} has no bad values in this test'


def test_every_field_with_a_range_has_bad_values_tried():
  assert set(BAD_VALUES) == set(config_checks.FIELDS) - {'optim.momentum'}  # momentum: SGD's, in no config


@pytest.mark.parametrize('field,value', [(f, v) for f, values in BAD_VALUES.items() for v in values])
def test_a_numeric_field_of_the_wrong_type_or_out_of_range_is_refused_naming_it(field, value):
  config_arg = next(arg for arg in ('configs/minilm_fortunes.py:quick', 'configs/digits_cnn.py:quick')
                    if field.split('.')[0] in load(arg) and field.split('.')[-1] in _parent(load(arg), field))
  config, problem = parse_and_check(config_arg, f'--config.{field}={value}')
  assert config is None, f'--config.{field}={value} was accepted'
  assert f'config.{field}' in problem and 'Traceback' not in problem


def _parent(config, field):
  for name in field.split('.')[:-1]:
    config = config[name]
  return config


def test_a_config_built_in_python_with_a_string_or_a_bool_for_a_number_is_refused():
  for field, value, message in [('total_steps', '10', "config.total_steps is '10' (str): make it an integer >= 1"),
                                ('batch_size', True, 'config.batch_size is True (bool)')]:
    config = load('configs/digits_cnn.py:quick')
    with config.unlocked(), config.ignore_type():
      config[field] = value
    with pytest.raises(UserError, match=re.escape(message)):
      config_checks.check(config)
  config = load('configs/digits_cnn.py:quick')
  with config.unlocked():
    config.optim.name, config.optim.momentum = 'sgd', 1.0
  with pytest.raises(UserError, match=re.escape('config.optim.momentum is 1.0 (float): make it a number in [0, 1)')):
    config_checks.check(config)
  config = load('configs/minilm_fortunes.py:staged')
  with config.unlocked():
    config.stages = (dict(steps=175, optim=dict(lr=-1.0)), dict(steps=525))
  with pytest.raises(UserError, match=re.escape('config.stages[0].optim.lr is -1.0 (float): make it a number > 0')):
    config_checks.check(config)


def test_a_bert_override_out_of_range_is_refused_before_the_model_is_built():
  from jft.models.bert import BertConfig
  with pytest.raises(UserError, match=re.escape('the BERT config.hidden_dropout_prob is 1.5 (float): make it a '
                                                'number in [0, 1)')):
    BertConfig.from_source('minilm', hidden_dropout_prob=1.5)
