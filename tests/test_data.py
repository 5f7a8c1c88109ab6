"""Tests of the image builders, the train and eval pipelines and the image ops."""

import gzip
import json
import pathlib

import jax
import numpy as np
import pytest
from sklearn import datasets

from jft import data
from jft.errors import UserError

FASHION_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')


def _raw_idx(name: str, header_bytes: int) -> np.ndarray:
  with gzip.open(FASHION_DIR / name, 'rb') as f:
    return np.frombuffer(f.read(), np.uint8, offset=header_bytes)


@pytest.fixture(scope='module', autouse=True)
def built(data_dir) -> None:
  for name in ('fashion', 'digits'):
    data.data_source(name, 'train', data_dir)


def _config(data_dir, name='fashion', **overrides):
  config = data.default_image_config(name)
  config.data_dir = data_dir
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _fashion_ids(data_dir, split='train[:1000]'):
  """Maps each image's bytes to its index in `split`, to identify examples in batches."""
  source = data.data_source('fashion', split, data_dir)
  ids = {source[i]['image'].tobytes(): i for i in range(len(source))}
  assert len(ids) == len(source)  # The images are distinct, so bytes identify them.
  return ids


def _batch_ids(ids, batch):
  return [ids[np.rint(image * 255).astype(np.uint8).tobytes()] for image in batch['image']]


def _assert_batches_equal(want, got):
  assert len(want) == len(got)
  for want_batch, got_batch in zip(want, got, strict=True):
    assert set(want_batch) == set(got_batch)
    for key in want_batch:
      np.testing.assert_array_equal(got_batch[key], want_batch[key])


def _rows(batches, rows):
  return [{key: value[rows] for key, value in batch.items()} for batch in batches]


def _concat(per_host):
  return [{key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
          for batches in zip(*per_host, strict=True)]


def test_fashion_matches_idx_files(data_dir):
  train = data.data_source('fashion', 'train', data_dir)
  test = data.data_source('fashion', 'test', data_dir)
  assert (len(train), len(test)) == (60000, 10000)
  train_images = _raw_idx('train-images-idx3-ubyte.gz', 16).reshape(-1, 28, 28, 1)
  train_labels = _raw_idx('train-labels-idx1-ubyte.gz', 8)
  for i in (0, 1, 31337, 59999):
    np.testing.assert_array_equal(train[i]['image'], train_images[i])
    assert train[i]['label'] == train_labels[i]
  test_labels = [example['label'] for example in test.__getitems__(list(range(10000)))]
  np.testing.assert_array_equal(test_labels, _raw_idx('t10k-labels-idx1-ubyte.gz', 8))
  np.testing.assert_array_equal(test[9999]['image'],
                                _raw_idx('t10k-images-idx3-ubyte.gz', 16).reshape(-1, 28, 28, 1)[9999])
  assert data.num_classes('fashion', data_dir) == 10


def test_digits_split_rule(data_dir):
  digits = datasets.load_digits()
  for split, keep in (('test', lambda i: i % 5 == 0), ('train', lambda i: i % 5 != 0)):
    indices = [i for i in range(len(digits.target)) if keep(i)]
    source = data.data_source('digits', split, data_dir)
    examples = source.__getitems__(list(range(len(source))))
    assert len(examples) == len(indices)
    np.testing.assert_array_equal(np.stack([e['image'][..., 0] for e in examples]),
                                  digits.images[indices])
    np.testing.assert_array_equal([e['label'] for e in examples], digits.target[indices])
  assert (len(data.data_source('digits', 'train', data_dir)), len(examples)) == (1437, 1437)
  assert data.num_classes('digits', data_dir) == 10


def test_split_slices_keep_source_order(data_dir):
  train = data.data_source('fashion', 'train', data_dir)
  head = data.data_source('fashion', 'train[:5000]', data_dir)
  tail = data.data_source('fashion', 'train[5000:]', data_dir)
  assert (len(head), len(tail)) == (5000, 55000)
  np.testing.assert_array_equal(head[4999]['image'], train[4999]['image'])
  np.testing.assert_array_equal(tail[0]['image'], train[5000]['image'])


def test_user_errors_name_the_fix(data_dir):
  with pytest.raises(UserError, match="'mnist'.*fashion, digits"):
    data.data_source('mnist', 'train', data_dir)
  with pytest.raises(UserError, match="'validation'.*train, test"):
    data.data_source('fashion', 'validation', data_dir)
  with pytest.raises(UserError, match='multiple of 3'):
    data.train_iterator(_config(data_dir), 128, seed=0, process_count=3)
  with pytest.raises(UserError, match='50 training examples, fewer than one batch of 64'):
    data.train_iterator(_config(data_dir, train_split='train[:50]'), 64, seed=0)
  with pytest.raises(UserError, match="'rotate'.*'crop', 'flip', 'shift'"):
    data.train_iterator(_config(data_dir, augment=('flip', 'rotate')), 8, seed=0)


def test_missing_fashion_files_name_the_package(tmp_path, monkeypatch):
  monkeypatch.setattr(data.Fashion, 'SOURCE_DIR', tmp_path / 'absent')
  with pytest.raises(UserError, match=r'dataset-fashion-mnist.*apt-get install dataset-fashion-mnist'):
    data.data_source('fashion', 'train', str(tmp_path / 'tfds'))


def test_default_image_config():
  config = data.default_image_config('fashion')
  assert set(config) == {'name', 'data_dir', 'train_split', 'validation_split', 'test_split',
                         'augment', 'crop_padding', 'max_shift', 'image_size', 'examples_per_class'}
  assert (config.train_split, config.validation_split) == ('train[5000:]', 'train[:5000]')


def test_eval_batches_cover_split_in_order_with_padding(data_dir):
  config = _config(data_dir, name='digits')
  batches = list(data.eval_batches(config, 'test', 64))
  assert len(batches) == 6  # ceil(360 / 64)
  assert all(b['mask'].all() for b in batches[:-1]) and batches[-1]['mask'].sum() == 360 - 5 * 64
  assert {b['image'].shape for b in batches} == {(64, 8, 8, 1)} and batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].dtype == np.int32 and batches[-1]['mask'].dtype == bool
  digits = datasets.load_digits()
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  np.testing.assert_allclose(images[..., 0], digits.images[::5] / 16, rtol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in batches]),
                                digits.target[::5])
  assert not batches[-1]['image'][~batches[-1]['mask']].any()


def test_eval_batches_over_hosts(data_dir):
  config = _config(data_dir, name='digits')
  one = list(data.eval_batches(config, 'test', 66))
  per_host = [list(data.eval_batches(config, 'test', 66, i, 3)) for i in range(3)]
  assert [len(batches) for batches in per_host] == [6, 6, 6]  # ceil(360 / 66): hosts must step together.
  _assert_batches_equal(one, _concat(per_host))  # Global batch j is the concatenation of the hosts' batch j.
  together = np.concatenate([batch['label'][batch['mask']] for batch in one])
  np.testing.assert_array_equal(together, datasets.load_digits().target[::5])


def test_train_shuffles_each_epoch_and_seed(data_dir):
  ids = _fashion_ids(data_dir)
  config = _config(data_dir, train_split='train[:1000]')
  first = [_batch_ids(ids, b) for b in _take(data.train_iterator(config, 96, seed=7), 20)]
  again = [_batch_ids(ids, b) for b in _take(data.train_iterator(config, 96, seed=7), 20)]
  other = [_batch_ids(ids, b) for b in _take(data.train_iterator(config, 96, seed=8), 10)]
  assert first == again
  assert first[:10] != other
  # 10 full batches per epoch (drop_remainder): each epoch sees distinct examples, in a new order.
  epoch_0, epoch_1 = sum(first[:10], []), sum(first[10:], [])
  assert len(set(epoch_0)) == len(set(epoch_1)) == 960
  assert epoch_0 != epoch_1


@pytest.mark.parametrize('process_count', [2, 4])
def test_hosts_rows_make_the_global_batch(data_dir, monkeypatch, process_count):
  config = _config(data_dir, train_split='train[:1000]', augment=('crop', 'flip', 'shift'))
  one = data.train_iterator(config, 96, seed=5)
  global_batches = _take(one, 12)  # 10 batches an epoch: crosses into the second.
  plain = _take(data.train_iterator(_config(data_dir, train_split='train[:1000]'), 96, seed=5), 12)
  assert not np.array_equal(plain[0]['image'], global_batches[0]['image'])  # The augmentation moves images.
  np.testing.assert_array_equal(plain[0]['label'], global_batches[0]['label'])
  read = []  # The example indices each host asks its source for.

  class RecordingSource:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitems__(self, indices):
      read.append(indices)
      return self.source.__getitems__(indices)

  data_source = data.builders.data_source
  monkeypatch.setattr(data.builders, 'data_source', lambda *args: RecordingSource(data_source(*args)))
  per_host, states = [], []
  for host in range(process_count):
    read.clear()
    iterator = data.train_iterator(config, 96, seed=5, process_index=host, process_count=process_count)
    per_host.append(_take(iterator, 12))
    states.append(iterator.get_state())
    assert per_host[-1][0]['image'].shape == (96 // process_count, 28, 28, 1)
    assert {len(indices) for indices in read} == {96 // process_count}  # Only this host's rows are read.
  _assert_batches_equal(global_batches, _concat(per_host))
  assert states == [one.get_state()] * process_count  # The state is the global position alone.


def test_resume_reproduces_batches_bit_for_bit_on_any_number_of_hosts(data_dir):
  config = _config(data_dir, train_split='train[:1000]', augment=('crop', 'flip', 'shift'))
  iterator = data.train_iterator(config, 96, seed=3)
  _take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 5)  # Crosses the end of the first epoch.
  restored = data.train_iterator(config, 96, seed=3)
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 5))
  second_of_two = data.train_iterator(config, 96, seed=3, process_index=1, process_count=2)
  second_of_two.set_state(state)  # 1 host -> 2 hosts: host 1 goes on with rows 48..95.
  _assert_batches_equal(_rows(expected, slice(48, 96)), _take(second_of_two, 5))
  back_to_one = data.train_iterator(config, 96, seed=3)
  back_to_one.set_state(json.loads(json.dumps(second_of_two.get_state())))  # 2 hosts -> 1 host.
  _assert_batches_equal(_take(iterator, 3), _take(back_to_one, 3))


def test_augmenting_rows_of_a_batch_augments_them_as_the_whole_batch():
  augment = data.make_augment(('crop', 'flip', 'shift'), crop_padding=3, max_shift=2)
  images = np.random.default_rng(1).random((12, 9, 9, 1), np.float32)
  whole = augment(images, np.random.default_rng(0))
  for rows in (slice(0, 4), slice(4, 8), slice(8, 12)):
    np.testing.assert_array_equal(augment(images[rows], np.random.default_rng(0), rows, 12), whole[rows])


def test_digits_resized_for_fashion_models(data_dir):
  config = _config(data_dir, name='digits', image_size=28, augment=('crop',))
  batch = next(data.train_iterator(config, 32, seed=0))
  assert batch['image'].shape == (32, 28, 28, 1) and batch['image'].dtype == np.float32
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1


@pytest.mark.parametrize('in_hw,out_hw', [((8, 8), (28, 28)), ((28, 28), (10, 14)), ((5, 9), (5, 9))])
def test_resize_bilinear_matches_jax(in_hw, out_hw):
  images = np.random.default_rng(0).random((3, *in_hw, 2), np.float32)
  expected = jax.image.resize(images, (3, *out_hw, 2), method='bilinear')
  np.testing.assert_allclose(data.resize_bilinear(images, out_hw), expected, atol=1e-6)


def _dots(n: int, y: int = 4, x: int = 4) -> np.ndarray:
  images = np.zeros((n, 9, 9, 1), np.float32)
  images[:, y, x] = 1
  return images


def _dot_moves(images):
  """The (dy, dx) by which each image's single lit pixel moved from (4, 4)."""
  batch, y, x, _ = np.nonzero(images)
  np.testing.assert_array_equal(batch, np.arange(len(images)))  # One pixel each, none lost.
  return set(zip(y - 4, x - 4, strict=True))


def test_translate_moves_content_and_fills_zeros():
  images = _dots(2, y=1, x=7)
  moved = data.translate(images, np.array([2, -1]), np.array([-3, 2]))
  assert moved.shape == images.shape
  assert moved[0, 3, 4, 0] == 1 and moved[0].sum() == 1
  assert not moved[1].any()  # Moved off the right edge.


def test_flip_is_an_exact_mirror():
  images = np.random.default_rng(1).random((64, 5, 7, 3), np.float32)
  flipped = data.random_flip(images, np.random.default_rng(0))
  mirrored = (flipped == images[:, :, ::-1]).all(axis=(1, 2, 3))
  kept = (flipped == images).all(axis=(1, 2, 3))
  assert (mirrored | kept).all() and mirrored.any() and kept.any()


@pytest.mark.parametrize('name,reach', [('crop', 3), ('shift', 2)])
def test_crop_and_shift_move_within_reach(name, reach):
  augment = data.make_augment((name,), crop_padding=3, max_shift=2)
  moved = augment(_dots(400), np.random.default_rng(0))
  assert moved.shape == (400, 9, 9, 1)
  assert _dot_moves(moved) == {(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)}


def test_first_per_class_keeps_the_first_of_each_class_in_order():
  labels = np.array([2, 0, 2, 1, 0, 2, 0])
  np.testing.assert_array_equal(data.first_per_class(labels, 2), [0, 1, 2, 3, 4])


def test_few_shot_training_reads_only_the_first_examples_of_each_class(data_dir):
  config = _config(data_dir, 'digits', train_split='train', examples_per_class=3)
  labels = np.concatenate([batch['label'] for batch in _take(data.train_iterator(config, 10, seed=0), 3)])
  assert np.bincount(labels, minlength=10).tolist() == [3] * 10  # one epoch: 30 examples, each once
  images = np.concatenate([batch['image'] for batch in _take(data.train_iterator(config, 10, seed=0), 3)])
  digits = datasets.load_digits()
  train_images = digits.images[np.arange(len(digits.images)) % 5 != 0] / 16.0
  first_three = np.concatenate([train_images[digits.target[np.arange(1797) % 5 != 0] == d][:3] for d in range(10)])
  assert {img.tobytes() for img in images[..., 0].astype(np.float32)} == \
         {img.tobytes() for img in first_three.astype(np.float32)}
  with pytest.raises(UserError, match='examples_per_class'):
    data.train_iterator(_config(data_dir, 'digits', examples_per_class=0), 10, seed=0)
