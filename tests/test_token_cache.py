"""Tests of the tokenized splits kept on disk between runs (jft/data/token_cache.py)."""

import io
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jft import data, model_files
from jft.data import text, token_cache


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> pathlib.Path:
  monkeypatch.setattr(token_cache, '_directory', tmp_path / 'tokens')
  return tmp_path / 'tokens'


@pytest.fixture
def tokenized(monkeypatch) -> list:
  """The (tokenizer, max_len) of each split tokenized from here on."""
  calls, tokenize = [], text.tokenize
  monkeypatch.setattr(text, 'tokenize', lambda *args: calls.append(args[1:]) or tokenize(*args))
  return calls


def _config(data_dir, **overrides):
  config = data.default_text_config('fortunes8')
  config.update(data_dir=str(data_dir), **overrides)
  return config


def _split(config, name='train'):
  """A split made as a run makes it (uncached within the process: text._tokenized_split caches per process)."""
  split = text._TokenizedSplit(config, name, with_unlabeled=True)
  return split.ids_NxL, split.lengths_N, split.labels_N


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_a_split_is_tokenized_once_then_read_back_as_tokenized(data_dir, cache, tokenized, monkeypatch):
  config = _config(data_dir, train_split='train[:400]')
  config.unlabeled.update(name='fortunes', split='train', classes=('zippy', 'goedel'))
  monkeypatch.setattr(token_cache, '_directory', None)
  uncached = _split(config)  # the reference: read and tokenized, nothing kept
  monkeypatch.setattr(token_cache, '_directory', cache)
  before = token_cache.counts()
  first, second = _split(config), _split(config)
  assert len(tokenized) == 2  # the reference and the first cached run; the second tokenized nothing
  assert {k: v - before[k] for k, v in token_cache.counts().items()} == {'hits': 1, 'misses': 1}
  _assert_same(first, uncached)
  _assert_same(second, uncached)
  assert (second[2] == text.UNLABELED).any()  # the unlabelled texts came back with their label
  assert len(list(cache.glob(f'*{token_cache.SUFFIX}'))) == 1


def test_whatever_the_ids_come_from_makes_a_new_entry(data_dir, cache, tokenized, tmp_path, monkeypatch):
  _split(_config(data_dir))
  _split(_config(data_dir, max_len=96))
  assert len(tokenized) == 2
  # The tokenizer counts by its bytes: a copy elsewhere reads the entry back, an edited copy does not.
  tokenizer = tmp_path / 'tokenizer.json'
  shutil.copy(model_files.pretrained_file('minilm', 'tokenizer.json'), tokenizer)
  _split(_config(data_dir, tokenizer=str(tokenizer)))
  assert len(tokenized) == 2
  tokenizer.write_text(tokenizer.read_text() + '\n')
  _split(_config(data_dir, tokenizer=str(tokenizer)))
  assert len(tokenized) == 3
  # The dataset counts by its prepared files: a copy is another dataset, and a rebuilt (touched) file changes it.
  copy = tmp_path / 'tfds'
  shutil.copytree(pathlib.Path(data_dir) / 'fortunes8', copy / 'fortunes8')
  _split(_config(copy))
  _split(_config(copy))
  assert len(tokenized) == 4
  (records,) = (copy / 'fortunes8').glob('*/fortunes8-train.array_record*')
  records.touch()
  _split(_config(copy))
  assert len(tokenized) == 5
  # So do the split and an edit to the text pipeline's source.
  _split(_config(data_dir), 'validation')
  monkeypatch.setattr(text, '_source_digest', lambda: 'edited')
  _split(_config(data_dir))
  assert len(tokenized) == 7
  assert len(list(cache.glob(f'*{token_cache.SUFFIX}'))) == 7


@pytest.mark.parametrize('damage', ['not a zip file', 'arrays that do not fit together'])
def test_a_damaged_entry_is_reported_deleted_and_made_again(data_dir, cache, tokenized, caplog, damage):
  config = _config(data_dir)
  expected = _split(config)
  (entry,) = cache.glob(f'*{token_cache.SUFFIX}')
  if damage == 'not a zip file':
    entry.write_bytes(entry.read_bytes()[:1000])
  else:
    ids_NxL, lengths_N, labels_N = expected
    entry.write_bytes(token_cache._pack(ids_NxL, lengths_N, labels_N[:-1]))
  with caplog.at_level(logging.WARNING):
    _assert_same(_split(config), expected)
  assert 'could not read the tokenized split' in caplog.text and len(tokenized) == 2
  _assert_same(_split(config), expected)  # kept whole again
  assert len(tokenized) == 2


def test_an_entry_holds_each_text_once_and_its_padding_id_once_by_hand():
  ids_NxL = np.array([[5, 6, 9, 9], [7, 9, 9, 9], [1, 2, 3, 4]], np.int32)  # padding id 9; a text of all 4
  lengths_N, labels_N = np.array([2, 1, 4], np.int32), np.array([0, -1, 3], np.int32)
  entry = token_cache._pack(ids_NxL, lengths_N, labels_N)
  with np.load(io.BytesIO(entry)) as arrays:
    np.testing.assert_array_equal(arrays['tokens'], [5, 6, 7, 1, 2, 3, 4])
    assert int(arrays['pad_id']) == 9
  _assert_same(token_cache._unpack(entry), (ids_NxL, lengths_N, labels_N))
  # Padding of more than one id cannot be rebuilt from one: such arrays are not kept.
  assert token_cache._pack(np.array([[5, 0, 9]], np.int32), np.array([1], np.int32), labels_N[:1]) is None


def test_a_cache_that_cannot_be_written_still_tokenizes(data_dir, cache, tokenized, caplog, monkeypatch):
  def refuse(*_, **__):
    raise PermissionError('read-only file system')

  monkeypatch.setattr(token_cache.cache_files, 'write_atomically', refuse)
  with caplog.at_level(logging.WARNING):
    _assert_same(_split(_config(data_dir)), _split(_config(data_dir)))
  assert len(tokenized) == 2 and 'could not keep the tokenized split' in caplog.text


def test_the_compilation_cache_keeps_the_tokenized_splits_beside_the_steps(tmp_path):
  environment = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'JFT_'))}
  program = ('import sys; from jft import compilation_cache; from jft.data import token_cache; '
             'compilation_cache.enable(sys.argv[1]); print(token_cache.directory())')
  on, off = (subprocess.run([sys.executable, '-c', program, where], capture_output=True, text=True, check=True,
                            env=environment).stdout.strip() for where in (str(tmp_path), 'off'))
  assert on == str(tmp_path / token_cache.SUBDIRECTORY) and off == 'None'
