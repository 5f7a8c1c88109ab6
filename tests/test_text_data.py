"""Tests of the fortunes builders (TASKS.md) and the length-grouped text pipeline."""

import hashlib
import itertools
import json
import pathlib

import numpy as np
import pytest
import tokenizers

from jft import data, model_files
from jft.errors import UserError

FORTUNES_DIR = pathlib.Path('/usr/share/games/fortunes')
CLS, SEP = 101, 102  # minilm's [CLS] and [SEP]; [PAD] is 0.


@pytest.fixture(scope='module', autouse=True)
def built(data_dir) -> None:
  data.data_source('fortunes8', 'train', data_dir)


def _config(data_dir, name='fortunes8', **overrides):
  config = data.default_text_config(name)
  config.data_dir = data_dir
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _records(name, split, data_dir, classes=None):
  source = data.data_source(name, split, data_dir, classes)
  return [(e['text'].decode('utf-8'), int(e['label'])) for e in source.__getitems__(list(range(len(source))))]


def _sha256(text):
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _expected_split(text):
  h = int(_sha256(text)[:8], 16) % 10
  return 'test' if h == 0 else 'validation' if h == 1 else 'train'


def _blocks(path):
  """TASKS.md's records of one file, read line by line (independently of the builder's regex)."""
  blocks, lines = [], []
  for line in path.read_bytes().decode('utf-8', errors='replace').split('\n'):
    if line == '%':
      blocks.append('\n'.join(lines))
      lines = []
    else:
      lines.append(line)
  return [text for text in (b.strip() for b in [*blocks, '\n'.join(lines)]) if text]


def _padded_fraction(batches):
  return 1 - sum(b['attention_mask'].sum() for b in batches) / sum(b['attention_mask'].size for b in batches)


def test_fortunes8_follows_tasks_md(data_dir):
  per_class = {label: list(dict.fromkeys(_blocks(FORTUNES_DIR / name)))
               for label, name in enumerate(data.FORTUNES8_CLASSES)}
  labels_of = {}
  for label, texts in per_class.items():
    for text in texts:
      labels_of.setdefault(text, set()).add(label)
  assert any(len(labels) > 1 for labels in labels_of.values())  # The cross-class rule has work to do.
  splits = {split: _records('fortunes8', split, data_dir) for split in ('train', 'validation', 'test')}
  for split, records in splits.items():
    # Texts under two classes dropped; split recomputed from sha256; records in the order of their sha256.
    expected = [(text, label) for label, texts in per_class.items() for text in texts
                if len(labels_of[text]) == 1 and _expected_split(text) == split]
    assert records == sorted(expected, key=lambda record: _sha256(record[0]))
  assert {split: len(records) for split, records in splits.items()} == {'train': 3702, 'validation': 457,
                                                                        'test': 458}
  texts = [text for records in splits.values() for text, _ in records]
  assert len(texts) == len(set(texts))  # No text in two splits, none with two labels.
  assert np.bincount([label for _, label in splits['test']]).tolist() == [46, 88, 15, 83, 63, 70, 23, 70]
  assert len({label for _, label in splits['test'][:64]}) == 8  # The order mixes the classes: slices hold all.
  assert data.num_classes('fortunes8', data_dir) == 8
  assert data.Fortunes8(data_dir=data_dir).info.features['label'].names == list(data.FORTUNES8_CLASSES)


def test_dedup_and_separators_on_handmade_files(tmp_path, monkeypatch):
  source = tmp_path / 'fortunes'
  source.mkdir()
  (source / 'a').write_bytes(b'x\n%\n  y  \n%\n\n%\nx\n%\nshared\n%\n\xff bad\n%%\nstill one\n %\n%\n')
  (source / 'b').write_bytes(b'shared\n%\nz')
  (source / 'b.dat').write_bytes(b'\0')
  monkeypatch.setattr(data.FortunesBuilder, 'SOURCE_DIR', source)
  data_dir = str(tmp_path / 'tfds')
  expected = [('x', 0), ('y', 0), ('\ufffd bad\n%%\nstill one\n %', 0), ('z', 1)]
  got = []
  for split in ('train', 'validation', 'test'):
    if any(_expected_split(text) == split for text, _ in expected):
      got += [(text, label, split) for text, label in _records('fortunes', split, data_dir, ('a', 'b'))]
    else:  # tfds cannot hold an empty split: it is left out, and asking for it names the others.
      with pytest.raises(UserError, match=f"'{split}'"):
        data.data_source('fortunes', split, data_dir, ('a', 'b'))
  assert sorted(got) == sorted((text, label, _expected_split(text)) for text, label in expected)
  assert data.num_classes('fortunes', data_dir, ['b', 'a']) == 2
  with pytest.raises(UserError, match=r"'c'.*apt-get install fortunes.*categories: a, b\."):
    data.data_source('fortunes', 'train', data_dir, ('a', 'c'))


def test_class_lists_are_separate_datasets(tmp_path):
  data_dir = str(tmp_path)
  startrek = sorted(((text, 0) for text in dict.fromkeys(_blocks(FORTUNES_DIR / 'startrek'))
                     if _expected_split(text) == 'test'), key=lambda record: _sha256(record[0]))
  assert _records('fortunes', 'test', data_dir, ('startrek',)) == startrek
  work_first = _records('fortunes', 'test', data_dir, ('work', 'startrek'))
  assert [(text, 0) for text, label in work_first if label == 1] == startrek
  assert len(work_first) > len(startrek) and {label for _, label in work_first} == {0, 1}
  assert sorted(p.name for p in (tmp_path / 'fortunes').iterdir()) == ['startrek', 'work+startrek']


def test_fortunes_user_errors(tmp_path, monkeypatch):
  with pytest.raises(UserError, match=r"'nosuch'.*apt-get install fortunes.*art, ascii-art, computers"):
    data.data_source('fortunes', 'train', str(tmp_path), ('art', 'nosuch'))
  with pytest.raises(UserError, match='data.classes is None.*tuple of category names'):
    data.num_classes('fortunes', str(tmp_path))
  with pytest.raises(UserError, match='distinct'):
    data.num_classes('fortunes', str(tmp_path), ('art', 'art'))
  with pytest.raises(UserError, match='classes of dataset .fortunes8. are fixed'):
    data.num_classes('fortunes8', str(tmp_path), ('art',))
  monkeypatch.setattr(data.FortunesBuilder, 'SOURCE_DIR', tmp_path / 'absent')
  with pytest.raises(UserError, match=r'Debian package fortunes.*apt-get install fortunes.*\(none installed\)'):
    data.data_source('fortunes8', 'train', str(tmp_path / 'tfds'))


def test_truncation_keeps_cls_and_sep():
  long_text, short_text = 'the quick brown fox jumps over the lazy dog ' * 10, 'hello world'
  ids, lengths = data.tokenize([long_text, short_text], 'minilm', 16)
  assert ids.shape == (2, 16) and ids.dtype == np.int32 and lengths.tolist() == [16, 4]
  full = tokenizers.Tokenizer.from_file(model_files.pretrained_file('minilm', 'tokenizer.json'))
  full.no_truncation()
  full.no_padding()
  np.testing.assert_array_equal(ids[0], full.encode(long_text).ids[:15] + [SEP])
  np.testing.assert_array_equal(ids[1], full.encode(short_text).ids + [0] * 12)
  assert ids[1, 0] == CLS and ids[1, 3] == SEP


def test_train_batches_are_bucketed_and_masked(data_dir):
  batches = _take(data.train_iterator(_config(data_dir), 32, seed=0), 30)
  assert {b['input_ids'].shape[1] for b in batches} == {32, 64, 128}
  for batch in batches:
    length = batch['input_ids'].shape[1]
    assert set(batch) == {'input_ids', 'attention_mask', 'token_type_ids', 'label'}
    assert all(v.dtype == np.int32 for v in batch.values()) and batch['label'].shape == (32,)
    np.testing.assert_array_equal(batch['attention_mask'], batch['input_ids'] != 0)
    lengths = batch['attention_mask'].sum(axis=1)
    np.testing.assert_array_equal(batch['attention_mask'], np.arange(length) < lengths[:, None])  # A prefix.
    assert (batch['input_ids'][:, 0] == CLS).all() and (batch['input_ids'][np.arange(32), lengths - 1] == SEP).all()
    assert length == min(b for b in (32, 64, 128) if b >= lengths.max())  # The smallest bucket that fits.
    assert not batch['token_type_ids'].any()


def test_batch_lengths_foretell_the_padded_length_of_each_training_batch(data_dir):
  config = _config(data_dir, train_split='train[:320]')  # 10 batches an epoch: positions 0-24 span three epochs
  batches = _take(data.train_iterator(config, 32, seed=3), 25)
  lengths = [b['input_ids'].shape[1] for b in batches]
  assert data.batch_lengths(config, 32, 3, range(25)) == lengths and len(set(lengths)) > 1
  assert data.batch_lengths(config, 32, 3, [24, 7, 13]) == [lengths[24], lengths[7], lengths[13]]
  assert data.batch_lengths(data.default_image_config('digits'), 32, 3, range(5)) is None  # one shape


def test_length_grouping_cuts_padding(data_dir):
  epoch = 3702 // 32
  grouped = _padded_fraction(_take(data.train_iterator(_config(data_dir), 32, seed=0), epoch))
  random = _padded_fraction(_take(data.train_iterator(_config(data_dir, sort_window=1), 32, seed=0), epoch))
  # Measured: 0.26 grouped, 0.64 random.
  assert grouped < 0.32 and random > 0.58


def test_epoch_plan_is_a_seeded_permutation():
  lengths = np.random.default_rng(0).integers(3, 128, size=1000)
  plan = data.epoch_plan(lengths, 32, 4, seed=5, epoch=2)
  assert plan.shape == (31, 32) and len(set(plan.ravel().tolist())) == 31 * 32  # Remainder of 8 dropped.
  np.testing.assert_array_equal(plan, data.epoch_plan(lengths, 32, 4, seed=5, epoch=2))
  assert not np.array_equal(plan, data.epoch_plan(lengths, 32, 4, seed=5, epoch=3))
  assert not np.array_equal(plan, data.epoch_plan(lengths, 32, 4, seed=6, epoch=2))
  # Sorted within windows of 4 batches: a batch spans about a quarter of the lengths (random: nearly all)..
  random = data.epoch_plan(lengths, 32, 1, seed=5, epoch=2)
  assert np.ptp(lengths[plan], axis=1).mean() < 0.35 * np.ptp(lengths[random], axis=1).mean()


def test_same_seed_same_batches_and_epochs_cover_train(data_dir):
  config = _config(data_dir, train_split='train[:320]')
  first = _take(data.train_iterator(config, 32, seed=7), 20)
  again = _take(data.train_iterator(config, 32, seed=7), 20)
  other = _take(data.train_iterator(config, 32, seed=8), 10)
  for want, got in zip(first, again, strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert any(a['input_ids'].shape != b['input_ids'].shape or (a['input_ids'] != b['input_ids']).any()
             for a, b in zip(first[:10], other, strict=True))
  rows = [[tuple(row[row != 0]) for row in b['input_ids']] for b in first]
  epoch_0, epoch_1 = sum(rows[:10], []), sum(rows[10:], [])
  assert len(set(epoch_0)) == len(set(epoch_1)) == 320 and set(epoch_0) == set(epoch_1)
  assert epoch_0 != epoch_1


def test_resume_reproduces_batches(data_dir):
  config = _config(data_dir, train_split='train[:320]')
  iterator = data.train_iterator(config, 32, seed=3)
  _take(iterator, 8)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 5)  # Crosses the end of the first epoch.
  restored = data.train_iterator(config, 32, seed=3)
  restored.set_state(state)
  for want, got in zip(expected, _take(restored, 5), strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_eval_covers_each_example_once(data_dir):
  config = _config(data_dir)
  batches = list(data.eval_batches(config, 'validation', 64))
  assert len(batches) == 8  # ceil(457 / 64)
  assert all(b['mask'].all() for b in batches[:-1]) and batches[-1]['mask'].sum() == 457 - 7 * 64
  assert batches[-1]['mask'].dtype == bool and batches[-1]['input_ids'].shape[0] == 64
  assert (batches[-1]['attention_mask'].sum(axis=1) > 0).all()  # Padding rows are real rows too.
  assert not batches[-1]['label'][~batches[-1]['mask']].any()
  # Longest first: the part-filled last batch holds the shortest texts, and so pads to the shortest bucket.
  longest = [b['attention_mask'].sum(axis=1).max() for b in batches]
  assert longest == sorted(longest, reverse=True) and batches[-1]['input_ids'].shape[1] == 32
  assert batches[-1]['attention_mask'].sum(axis=1).max() <= batches[-2]['attention_mask'].sum(axis=1).min()
  records = _records('fortunes8', 'validation', data_dir)
  ids, lengths = data.tokenize([text for text, _ in records], 'minilm', 128)
  expected = sorted((label, tuple(row[:n])) for (_, label), row, n in zip(records, ids, lengths, strict=True))
  got = sorted((int(label), tuple(row[row != 0])) for b in batches
               for label, row in zip(b['label'][b['mask']], b['input_ids'][b['mask']], strict=True))
  assert got == expected
  assert sum(b['input_ids'].size for b in batches) < 0.7 * 8 * 64 * 128  # Sorted by length: most pad short.


def test_eval_split_is_tokenized_once_per_run(data_dir, monkeypatch):
  calls = []
  tokenize = data.text.tokenize
  monkeypatch.setattr(data.text, 'tokenize', lambda *args: calls.append(args[1:]) or tokenize(*args))
  config = _config(data_dir, max_len=96)  # a data config no other test evaluated in this process
  first = list(data.eval_batches(config, 'validation', 64))
  again = list(data.eval_batches(config, 'validation', 64))
  assert len(calls) == 1
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
  list(data.eval_batches(_config(data_dir, max_len=80), 'validation', 64))  # another config: tokenized anew
  assert calls == [('minilm', 96), ('minilm', 80)]


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_two_hosts_slices_make_the_global_batch(data_dir, split):
  config = _config(data_dir)
  if split == 'train':
    one = _take(data.train_iterator(config, 32, seed=1), 30)
    hosts = [_take(data.train_iterator(config, 32, seed=1, process_index=p, process_count=2), 30) for p in (0, 1)]
  else:
    one = list(data.eval_batches(config, split, 64))
    hosts = [list(data.eval_batches(config, split, 64, process_index=p, process_count=2)) for p in (0, 1)]
  assert len(hosts[0]) == len(hosts[1]) == len(one)
  for j, want in enumerate(one):
    assert hosts[0][j]['input_ids'].shape == hosts[1][j]['input_ids'].shape
    for key in want:
      np.testing.assert_array_equal(np.concatenate([hosts[0][j][key], hosts[1][j][key]]), want[key])
  assert {b['input_ids'].shape[1] for b in hosts[0]} != {128}  # Pad lengths vary, and hosts agree on them.


def test_state_is_host_independent_and_resumes_on_another_number_of_hosts(data_dir):
  config = _config(data_dir, train_split='train[:320]')
  one = data.train_iterator(config, 32, seed=3)
  hosts = [data.train_iterator(config, 32, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for iterator in (one, *hosts):
    _take(iterator, 8)
  state = json.loads(json.dumps(one.get_state()))
  assert [host.get_state() for host in hosts] == [state, state]  # The global position alone.
  expected = _take(one, 5)  # Crosses the end of the first epoch.
  second_of_two = data.train_iterator(config, 32, seed=3, process_index=1, process_count=2)
  second_of_two.set_state(state)  # 1 host -> 2 hosts: host 1 goes on with rows 16..31.
  for want, got in zip(expected, _take(second_of_two, 5), strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key][16:])


def test_chosen_buckets_pad_the_fewest_tokens_hand_worked():
  # Texts of 3, 3, 5, 8, 8, 8 and 10 tokens, cut at 10. Two buckets: (3, 10) pads to 6 + 50 = 56 tokens, (5, 10)
  # to 15 + 40 = 55, (8, 10) to 48 + 10 = 58. Three: (3, 8, 10) to 6 + 32 + 10 = 48, (5, 8, 10) to 49.
  lengths = np.array([8, 3, 10, 5, 8, 3, 8])
  assert data.choose_buckets(lengths, 1, 10) == (10,)
  assert data.choose_buckets(lengths, 2, 10) == (5, 10)
  assert data.choose_buckets(lengths, 3, 10) == (3, 8, 10)
  assert data.choose_buckets(lengths, 9, 10) == (3, 5, 8, 10)  # no more than the distinct lengths
  assert data.choose_buckets(lengths, 2, 12) == (8, 12)  # max_len is always the last, though no text is that long
  assert data.choose_buckets(np.array([30, 40]), 2, 16) == (16,)  # texts longer than max_len are cut to it


def test_chosen_buckets_match_a_search_of_every_choice():
  def tokens(buckets, lengths):
    return np.asarray(buckets)[np.searchsorted(buckets, lengths)].sum()

  rng = np.random.default_rng(0)
  for _ in range(100):
    max_len, count = int(rng.integers(4, 12)), int(rng.integers(1, 5))
    lengths = np.minimum(rng.integers(1, max_len + 3, int(rng.integers(1, 25))), max_len)
    chosen = data.choose_buckets(lengths, count, max_len)
    assert chosen[-1] == max_len and len(chosen) <= count and list(chosen) == sorted(set(chosen))
    fewest = min(tokens((*others, max_len), lengths) for size in range(count)
                 for others in itertools.combinations(range(1, max_len), size))
    assert tokens(chosen, lengths) == fewest


def test_num_buckets_pads_train_and_eval_batches_to_lengths_chosen_from_the_training_texts(data_dir, monkeypatch):
  lengths = data.tokenize([text for text, _ in _records('fortunes8', 'train', data_dir)], 'minilm', 128)[1]
  calls = []
  tokenize = data.text.tokenize
  monkeypatch.setattr(data.text, 'tokenize', lambda *args: calls.append(len(args[0])) or tokenize(*args))
  config = _config(data_dir, buckets=(), num_buckets=5, sort_window=32)  # a data config no other test reads
  chosen = data.choose_buckets(lengths, 5, 128)
  assert data.bucket_lengths(config) == chosen and len(chosen) == 5 and chosen[-1] == 128
  hand_picked = (32, 48, 64, 96, 128)  # as many lengths, picked by hand: pads more
  assert (np.asarray(chosen)[np.searchsorted(chosen, lengths)].sum()
          < np.asarray(hand_picked)[np.searchsorted(hand_picked, lengths)].sum())
  train = _take(data.train_iterator(config, 32, seed=0), 60)
  evaluated = list(data.eval_batches(config, 'validation', 32))
  for batch in train + evaluated:  # the smallest chosen length that holds the batch's longest text
    longest = batch['attention_mask'].sum(axis=1).max()
    assert batch['input_ids'].shape[1] == min(b for b in chosen if b >= longest)
  assert {b['input_ids'].shape[1] for b in train} == set(chosen)
  assert calls == [len(lengths), 457]  # the training texts tokenized once, for the buckets and the batches
  # the same texts in the same batches as with lengths given: only the padding differs
  given = _take(data.train_iterator(_config(data_dir, sort_window=32), 32, seed=0), 60)
  for a, b in zip(train, given, strict=True):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['attention_mask'].sum(axis=1), b['attention_mask'].sum(axis=1))


def test_text_config_errors(data_dir):
  cases = [
      (dict(max_len=200), 'longer than the largest of data.buckets'),
      (dict(buckets=(64, 32, 128)), 'strictly increasing'),
      (dict(buckets=()), r'or \(\) with data.num_buckets > 0'),
      (dict(num_buckets=4), 'both set'),
      (dict(max_len=1024, buckets=(128, 1024)), '512 positions'),
      (dict(sort_window=0), 'sort_window'),
      (dict(tokenizer='/nonexistent/tok'), 'neither a registered name'),
  ]
  for overrides, message in cases:
    with pytest.raises(UserError, match=message):
      next(data.train_iterator(_config(data_dir, **overrides), 32, seed=0))
    with pytest.raises(UserError, match=message):
      next(data.eval_batches(_config(data_dir, **overrides), 'test', 32))
  with pytest.raises(UserError, match='multiple of 2'):
    data.train_iterator(_config(data_dir), 33, seed=0, process_count=2)
  with pytest.raises(UserError, match='fewer than one batch'):
    data.train_iterator(_config(data_dir, train_split='train[:10]'), 32, seed=0)


def test_default_text_config():
  config = data.default_text_config('fortunes8')
  assert set(config) == {'name', 'data_dir', 'train_split', 'validation_split', 'test_split', 'tokenizer',
                         'max_len', 'buckets', 'num_buckets', 'sort_window', 'classes', 'unlabeled'}
  assert config.unlabeled.name is None  # no unlabelled texts unless asked
  assert (config.tokenizer, config.max_len, tuple(config.buckets), config.classes) == ('minilm', 128,
                                                                                       (32, 64, 128), None)
  config.classes = ['art', 'law']  # A list from a config file is kept as a tuple.
  assert config.classes == ('art', 'law')
  with pytest.raises(UserError, match='default_image_config'):
    data.default_text_config('fashion')
  with pytest.raises(UserError, match='default_text_config'):
    data.default_image_config('fortunes8')


def test_unlabeled_texts_join_training_only_with_label_minus_1(data_dir):
  # 'fortunes' over two other categories: its train texts join fortunes8's train split, unlabelled;
  # a text that fortunes8 labels keeps its label; evaluation reads fortunes8 alone.
  config = _config(data_dir, train_split='train[:96]')
  config.unlabeled.update(name='fortunes', split='train', classes=('zippy', 'goedel'))
  labelled = {text for text, _ in _records('fortunes8', 'train[:96]', data_dir)}
  extra = [text for text, _ in _records('fortunes', 'train', data_dir, ('zippy', 'goedel')) if text not in labelled]
  tokenizer = tokenizers.Tokenizer.from_file(model_files.pretrained_file('minilm', 'tokenizer.json'))
  tokenizer.no_padding()
  tokenizer.enable_truncation(config.max_len)
  expected = {tuple(e.ids): label for e, label in
              zip(tokenizer.encode_batch(extra), [-1] * len(extra), strict=True)}
  epoch_batches = (96 + len(extra)) // 32
  seen = {}
  for batch in _take(data.train_iterator(config, 32, seed=0), epoch_batches):
    for row, mask, label in zip(batch['input_ids'], batch['attention_mask'], batch['label'], strict=True):
      seen[tuple(row[mask == 1])] = int(label)
  unlabelled_seen = {ids for ids, label in seen.items() if label == -1}
  assert unlabelled_seen and unlabelled_seen <= set(expected)
  assert sum(label >= 0 for label in seen.values()) > 0.5 * 96  # one epoch minus the dropped remainder
  assert len(unlabelled_seen) > 0.5 * len(extra)
  eval_labels = np.concatenate([b['label'] for b in data.eval_batches(config, 'validation', 32)])
  assert eval_labels.min() >= 0
