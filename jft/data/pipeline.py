"""Per-host numpy batches of every dataset from its tfds array_record source: images here, text in `text`."""

import functools
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from jft.data import builders, image_ops, text
from jft.errors import UserError

Batch = dict[str, np.ndarray]


def default_image_config(name: str) -> ml_collections.ConfigDict:
  """The `data` config of an image dataset: validation is held out from the start of train."""
  if builders.is_text(name):
    raise UserError(f'{name!r} is a text dataset: use default_text_config({name!r}) for it.')
  holdout = builders.BUILDERS[name].VALIDATION_SIZE
  return ml_collections.ConfigDict({
      'name': name,
      'data_dir': ml_collections.config_dict.placeholder(str),  # None: $TFDS_DATA_DIR or tfds's default.
      'train_split': f'train[{holdout}:]',
      'validation_split': f'train[:{holdout}]',
      'test_split': 'test',
      'augment': (),  # Names of ops applied in order: 'crop', 'flip', 'shift'.
      'crop_padding': 4,
      'max_shift': 2,
      'image_size': ml_collections.config_dict.placeholder(int),  # None keeps the stored size.
      'examples_per_class': ml_collections.config_dict.placeholder(int),  # None: every training example.
  })


def _per_host_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(f'batch_size {batch_size} does not split evenly over {process_count} hosts: '
                    f'make it a positive multiple of {process_count}.')
  return batch_size // process_count


def _batch_reader(data_config: ml_collections.ConfigDict, source) -> Callable[[np.ndarray], Batch]:
  """A function from example indices to a preprocessed batch: images scaled to [0, 1], resized."""
  pixel_max = builders.BUILDERS[data_config.name].PIXEL_MAX
  size = data_config.image_size
  if size is not None and size <= 0:
    raise UserError(f'data.image_size is {size}: make it a positive number of pixels, or None.')

  def read(indices: np.ndarray) -> Batch:
    # One batched read: tfds decodes a list of records about 3x faster than one record at a time.
    examples = source.__getitems__(indices.tolist())
    images = np.stack([e['image'] for e in examples]).astype(np.float32) * np.float32(1 / pixel_max)
    if size is not None and images.shape[1:3] != (size, size):
      images = image_ops.resize_bilinear(images, (size, size))
    return {'image': images, 'label': np.array([e['label'] for e in examples], np.int32)}

  return read


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
  """The indices of the first `count` examples of each class, in their original order."""
  rank_in_class = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    where = labels == label
    rank_in_class[where] = np.arange(where.sum())
  return np.flatnonzero(rank_in_class < count)


def _train_indices(source, examples_per_class: int | None) -> np.ndarray:
  """Every index of `source`, or only the first `examples_per_class` of each class (a few-shot subset)."""
  if examples_per_class is None:
    return np.arange(len(source))
  if examples_per_class <= 0:
    raise UserError(f'data.examples_per_class is {examples_per_class}: make it a positive number, or None for all.')
  labels = np.array([e['label'] for e in source.__getitems__(list(range(len(source))))])
  return first_per_class(labels, examples_per_class)


def train_iterator(data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this host's rows of the shuffled (and augmented, or length-grouped)
  global training batches: the same global batches, and the same state, whatever the number of hosts."""
  per_host = _per_host_batch_size(batch_size, process_count)
  rows = slice(process_index * per_host, (process_index + 1) * per_host)
  if builders.is_text(data_config.name):
    return text.train_iterator(data_config, batch_size, rows, seed)
  augment = image_ops.make_augment(data_config.augment, data_config.crop_padding, data_config.max_shift)
  source = builders.data_source(data_config.name, data_config.train_split, data_config.data_dir)
  indices = _train_indices(source, data_config.get('examples_per_class'))
  num_batches = len(indices) // batch_size
  if num_batches == 0:
    raise UserError(f'{data_config.train_split!r} gives {len(indices)} training examples, fewer than one batch '
                    f'of {batch_size}: use a larger train_split or a smaller batch_size.')
  # Unrelated random streams for the shuffle and the augmentation, each a pure function of the seed.
  shuffle_seed, augment_seed = map(int, np.random.SeedSequence(seed).generate_state(2))
  read_rows = _batch_reader(data_config, source)

  @functools.lru_cache(maxsize=2)
  def plan(epoch: int) -> np.ndarray:
    """The example indices [num_batches, batch_size] of an epoch's global batches: a new permutation each
    epoch, the remainder dropped."""
    order = np.random.default_rng((shuffle_seed, epoch)).permutation(len(indices))[:num_batches * batch_size]
    return indices[order].reshape(num_batches, batch_size)

  def read(step: int, batch_index: int) -> Batch:
    # One global plan: every host cuts the same global batch `step` and reads only its own rows of it.
    batch = read_rows(plan(step // num_batches)[batch_index, rows])
    if augment is not None:
      # Seeded by the global batch and drawn for all of it: a resumed run, or one over another number of
      # hosts, augments every example identically.
      rng = np.random.default_rng((augment_seed, step))
      batch['image'] = augment(batch['image'], rng, rows, batch_size)
    return batch

  # The state is the global position alone ({'next_index': step}), the same on every host.
  dataset = grain.MapDataset.range(num_batches).repeat().map_with_index(read)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def batch_lengths(data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                  positions: Sequence[int]) -> list[int] | None:
  """The length each training batch at `positions` (counted from 0 as `train_iterator` yields them) pads to, on
  axis 1 of `text.LENGTH_KEYS`; None for images (one shape)."""
  return text.batch_lengths(data_config, batch_size, seed, positions) if builders.is_text(data_config.name) else None


def eval_batches(data_config: ml_collections.ConfigDict, split: str, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """One pass over `split` (images in order); the last batch is padded, and `mask` is False on padding; `index` is
  each example's position in the split (for paired comparisons of predictions)."""
  per_host = _per_host_batch_size(batch_size, process_count)
  if builders.is_text(data_config.name):
    yield from text.eval_batches(data_config, split, batch_size,
                                 slice(process_index * per_host, (process_index + 1) * per_host))
    return
  source = builders.data_source(data_config.name, split, data_config.data_dir)
  read = _batch_reader(data_config, source)
  size = len(source)
  # Global batch j holds examples [j * batch_size, (j + 1) * batch_size); each host reads its own
  # part of it, so every host yields the same number of batches.
  for start in range(process_index * per_host, size + process_index * per_host, batch_size):
    indices = np.arange(start, start + per_host)
    mask = indices < size
    batch = read(np.minimum(indices, size - 1))  # Padding rereads the last example, then zeroed.
    yield {'image': np.where(mask[:, None, None, None], batch['image'], 0),
           'label': np.where(mask, batch['label'], 0), 'mask': mask,
           'index': np.minimum(indices, size - 1).astype(np.int32)}
