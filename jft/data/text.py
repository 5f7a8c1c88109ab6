"""Per-host numpy batches of the text datasets: tokenized once, grouped by length, padded to a few bucket lengths.

A random batch of short texts pads to its one long text, so the train batches are grouped (DESIGN.md): each
epoch shuffles the examples, sorts them by length within windows of `sort_window` batches, cuts batches
and shuffles their order. An epoch's plan is a pure function of (seed, epoch): resuming needs only the position.

Each batch pads to the smallest bucket length that holds its longest text: `data.buckets` given, or
`data.num_buckets` of them chosen from the training texts' lengths (`choose_buckets`), so that padding each text
to its bucket costs the fewest tokens. Every bucket is one more shape of the step to compile.
"""

import functools
import hashlib
import itertools
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
import tokenizers
from absl import logging

from jft import model_files
from jft.data import builders, token_cache
from jft.errors import UserError

MAX_POSITIONS = 512  # The position embeddings of BERT-family encoders such as minilm.
LENGTH_KEYS = ('input_ids', 'attention_mask', 'token_type_ids')  # a batch's arrays [batch, length]


def default_text_config(name: str) -> ml_collections.ConfigDict:
  """The `data` config of a text dataset: its own train, validation and test splits, minilm's tokenizer."""
  if not builders.is_text(name):
    raise UserError(f'{name!r} is an image dataset: use default_image_config({name!r}) for it.')
  return ml_collections.ConfigDict({
      'name': name,
      'data_dir': ml_collections.config_dict.placeholder(str),  # None: $TFDS_DATA_DIR or tfds's default.
      'train_split': 'train',
      'validation_split': 'validation',
      'test_split': 'test',
      'tokenizer': 'minilm',  # A registered name, a directory holding tokenizer.json, or a tokenizer.json.
      'max_len': 128,  # Tokens per text, [CLS] and [SEP] included; longer texts are cut.
      'buckets': (32, 64, 128),  # The lengths a batch pads to: increasing, the last at least max_len.
      'num_buckets': 0,  # N > 0: pad to N lengths chosen from the training texts instead (buckets then ()).
      'sort_window': 64,  # Batches whose examples are sorted by length together; 1 gives random batches.
      'classes': ml_collections.config_dict.placeholder(tuple),  # Categories of the dataset fortunes only.
      'unlabeled': unlabeled_config(),
  })


def unlabeled_config() -> ml_collections.ConfigDict:
  """`data.unlabeled`: a text dataset whose `split` joins the training texts without labels (label -1), for a
  teacher to label (`config.distill`); `name` None: none."""
  return ml_collections.ConfigDict({'name': ml_collections.config_dict.placeholder(str), 'split': 'train',
                                    'classes': ml_collections.config_dict.placeholder(tuple)})


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """Fails on lengths a text pipeline cannot batch: max_len, buckets (or num_buckets), sort_window."""
  max_len, buckets = data_config.max_len, tuple(data_config.buckets)
  num_buckets = data_config.get('num_buckets', 0)
  if not 0 < max_len <= MAX_POSITIONS:
    raise UserError(f'data.max_len is {max_len}: the encoder has {MAX_POSITIONS} positions, so make it '
                    f'1..{MAX_POSITIONS}.')
  if num_buckets and buckets:
    raise UserError(f'data.buckets {buckets} and data.num_buckets {num_buckets} are both set: give the lengths '
                    '(and data.num_buckets=0) or how many to choose from the training texts (and data.buckets=()).')
  if not num_buckets:  # the lengths given (chosen ones are increasing and end at max_len: choose_buckets)
    if not buckets or buckets[0] <= 0 or any(a >= b for a, b in itertools.pairwise(buckets)):
      raise UserError(f'data.buckets {buckets} must be positive and strictly increasing, such as (32, 64, 128), '
                      'or () with data.num_buckets > 0 to choose them from the training texts.')
    if buckets[-1] < max_len:
      raise UserError(f'data.max_len {max_len} is longer than the largest of data.buckets {buckets}: add a bucket '
                      f'of {max_len} or more, or lower data.max_len.')
  if data_config.sort_window < 1:
    raise UserError(f'data.sort_window is {data_config.sort_window}: make it a number of batches, 1 or more '
                    '(1: no length grouping).')


def tokenizer_file(source: str) -> str:
  """The tokenizer.json of `source`: a registered name, a directory holding one, or the file itself."""
  model_files.refuse_pickle(source, 'data.tokenizer')
  if os.path.isfile(source):
    return source
  if model_files.is_registered(source) or os.path.isdir(source):
    return model_files.pretrained_file(source, 'tokenizer.json')
  raise UserError(f'data.tokenizer {source!r} is neither a registered name ({", ".join(model_files.REGISTERED)}), '
                  'a directory holding tokenizer.json, nor a tokenizer.json file: give one of these.')


def tokenize(texts: Sequence[str], tokenizer: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [N, max_len] (right-padded) and lengths [N] of `texts`, cut to max_len by the tokenizer."""
  path = tokenizer_file(tokenizer)
  try:
    encoder = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on a file it cannot parse.
    raise UserError(f'{path} is not a tokenizer.json that the tokenizers library reads ({e}): give another '
                    'data.tokenizer.') from e
  pad_id = encoder.padding['pad_id'] if encoder.padding else 0
  # minilm's file pads every text to 128: pad each batch to its bucket instead. The tokenizer's own
  # truncation cuts the text and keeps the special tokens ([CLS] ... [SEP]).
  encoder.no_padding()
  encoder.enable_truncation(max_len)
  encodings = encoder.encode_batch(list(texts))
  lengths_N = np.array([len(e.ids) for e in encodings], np.int32)
  if lengths_N.max(initial=0) > max_len:
    raise UserError(f'data.max_len {max_len} leaves no room for the tokenizer\'s special tokens: make it larger.')
  ids_NxL = np.full((len(encodings), max_len), pad_id, np.int32)
  for row, encoding in zip(ids_NxL, encodings, strict=True):
    row[:len(encoding.ids)] = encoding.ids
  return ids_NxL, lengths_N


UNLABELED = -1  # The label of a training text that only a teacher labels.


@functools.cache
def _source_digest() -> str:
  """This module's source, hashed: part of a token cache entry's key (an edit to the pipeline makes new ones)."""
  return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()


def _read_texts(source: Sequence[dict], name: str, split: str) -> tuple[list[str], np.ndarray]:
  """(texts, labels) of `source`, split `split` of dataset `name`, in the source's order."""
  examples = source.__getitems__(list(range(len(source))))
  if not examples:
    raise UserError(f'split {split!r} of dataset {name!r} has no examples: choose another split.')
  return [e['text'].decode('utf-8') for e in examples], np.array([e['label'] for e in examples], np.int32)


class _TokenizedSplit:
  """A whole split, tokenized: ids [N, max_len], lengths [N], labels [N] (-1: unlabeled); read from the token cache
  of an earlier run where there is one (jft/data/token_cache.py)."""

  def __init__(self, data_config: ml_collections.ConfigDict, split: str, with_unlabeled: bool = False):
    check_config(data_config)
    read = [(data_config.name, split, data_config.get('classes'))]  # (dataset, split, classes)
    unlabeled = data_config.get('unlabeled')
    if with_unlabeled and unlabeled and unlabeled.name:
      read.append((unlabeled.name, unlabeled.split, unlabeled.get('classes')))
    sources = [builders.data_source(name, split_name, data_config.data_dir, classes)
               for name, split_name, classes in read]
    tokenizer = tokenizer_file(data_config.tokenizer)

    def read_and_tokenize():
      texts, labels_N = _read_texts(sources[0], *read[0][:2])
      if len(sources) > 1:
        extra, _ = _read_texts(sources[1], *read[1][:2])
        labelled = set(texts)
        extra = [text for text in extra if text not in labelled]  # a labelled text keeps its label
        texts = texts + extra
        labels_N = np.concatenate([labels_N, np.full(len(extra), UNLABELED, np.int32)])
      return *tokenize(texts, data_config.tokenizer, data_config.max_len), labels_N

    self.ids_NxL, self.lengths_N, self.labels_N = token_cache.tokenized(
        read_and_tokenize, [source.dataset_info.data_dir for source in sources], tokenizer, read=read,
        max_len=data_config.max_len, code=_source_digest())

  def padded_length(self, indices_B: np.ndarray, buckets: Sequence[int]) -> int:
    """The length the global batch of examples `indices_B` pads to: the bucket of its longest example."""
    return buckets[np.searchsorted(buckets, self.lengths_N[indices_B].max())]

  def batch(self, indices_B: np.ndarray, rows: slice, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch of examples `indices_B`, padded to the bucket of its longest example."""
    length = self.padded_length(indices_B, buckets)  # of the global batch: every host's part has the same shape
    indices = indices_B[rows]
    input_ids = self.ids_NxL[indices, :length]
    attention_mask = (np.arange(length) < self.lengths_N[indices, None]).astype(np.int32)
    return {'input_ids': input_ids, 'attention_mask': attention_mask,
            'token_type_ids': np.zeros_like(input_ids),  # One segment per text.
            'label': self.labels_N[indices]}


@functools.lru_cache(maxsize=4)
def _tokenized_split(data_config_json: str, split_name: str, with_unlabeled: bool = False) -> _TokenizedSplit:
  """A split read and tokenized once per process and data config: a run evaluates it many times, and reads the
  training split for its batches and its bucket lengths."""
  return _TokenizedSplit(ml_collections.ConfigDict(json.loads(data_config_json)), split_name, with_unlabeled)


def _training_split(data_config: ml_collections.ConfigDict) -> _TokenizedSplit:
  """The training texts, with the unlabelled ones that join them (`data.unlabeled`)."""
  return _tokenized_split(data_config.to_json(), data_config.train_split, with_unlabeled=True)


def choose_buckets(lengths_N: np.ndarray, count: int, max_len: int) -> tuple[int, ...]:
  """The `count` bucket lengths, the last `max_len`, that pad the texts of `lengths_N`, each to the smallest bucket
  that holds it, to the fewest tokens in all (fewer lengths if the texts have fewer distinct lengths below max_len).

  A dynamic programme over the distinct lengths: cost[m][j], the fewest tokens of the texts up to the j-th length
  in m buckets, the largest of them that length. A length-grouped batch pads to its longest text, which differs
  little from its others' lengths, so the texts' own lengths stand in for the batches' (within 0.5% of the
  padding of the buckets chosen from a seed's own batches on fortunes8, benchmarks/README.md); the choice then
  depends on the training texts alone, the same for every seed, step, host and evaluation.
  """
  values, counts = np.unique(np.append(np.minimum(lengths_N, max_len), max_len), return_counts=True)
  counts[-1] -= 1  # max_len is always a bucket (an evaluated text may be that long), whether or not a text is
  texts_upto = np.cumsum(counts).astype(np.float64)
  n = len(values)
  cost = texts_upto * values  # one bucket: every text up to the j-th length pads to it
  choices = []
  for _ in range(min(count, n) - 1):
    # with_more[i, j]: the texts up to length i in the buckets so far, those after it up to j padded to j.
    with_more = cost[:, None] + (texts_upto[None, :] - texts_upto[:, None]) * values[None, :]
    with_more[np.tril_indices(n)] = np.inf  # the bucket before j is shorter than j
    choices.append(np.argmin(with_more, axis=0))
    cost = with_more.min(axis=0)
    cost[0] = texts_upto[0] * values[0]  # the shortest length in more buckets: the same one
  buckets, j = [int(values[-1])], n - 1
  for before in reversed(choices):
    j = before[j]
    buckets.append(int(values[j]))
  return tuple(sorted(set(buckets)))


def bucket_lengths(data_config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The lengths a batch pads to: `data.buckets`, or `data.num_buckets` of them chosen from the training texts."""
  check_config(data_config)
  if not data_config.get('num_buckets', 0):
    return tuple(data_config.buckets)
  return _chosen_buckets(data_config.to_json())


@functools.lru_cache(maxsize=4)
def _chosen_buckets(data_config_json: str) -> tuple[int, ...]:
  """The `data.num_buckets` lengths of a data config, chosen (and logged) once per process."""
  data_config = ml_collections.ConfigDict(json.loads(data_config_json))
  buckets = choose_buckets(_training_split(data_config).lengths_N, data_config.num_buckets, data_config.max_len)
  logging.info('data.num_buckets %d: the batches pad to %s (chosen from the training texts)',
               data_config.num_buckets, buckets)
  return buckets


def epoch_plan(lengths_N: np.ndarray, batch_size: int, sort_window: int, seed: int, epoch: int) -> np.ndarray:
  """The example indices [batches, batch_size] of a training epoch, grouped by length; the remainder dropped."""
  rng = np.random.default_rng((seed, epoch))
  num_batches = len(lengths_N) // batch_size
  # Dropping the remainder before sorting drops random examples rather than the longest of the last window.
  order = rng.permutation(len(lengths_N))[:num_batches * batch_size]
  window = sort_window * batch_size
  for start in range(0, len(order), window):
    chunk = order[start:start + window]
    order[start:start + window] = chunk[np.argsort(lengths_N[chunk], kind='stable')]
  return order.reshape(num_batches, batch_size)[rng.permutation(num_batches)]


def _training_plan(data_config: ml_collections.ConfigDict, batch_size: int,
                   seed: int) -> tuple[_TokenizedSplit, int, Callable[[int], np.ndarray]]:
  """(the training split, its batches per epoch, epoch -> its batches' example indices)."""
  split = _training_split(data_config)
  num_batches = len(split.lengths_N) // batch_size
  if num_batches == 0:
    raise UserError(f'{data_config.train_split!r} has {len(split.lengths_N)} examples, fewer than one batch of '
                    f'{batch_size}: use a larger train_split or a smaller batch_size.')
  plan = functools.lru_cache(maxsize=2)(
      functools.partial(epoch_plan, split.lengths_N, batch_size, data_config.sort_window, seed))
  return split, num_batches, plan


def train_iterator(data_config: ml_collections.ConfigDict, batch_size: int, rows: slice,
                   seed: int) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of rows `rows` of the global training batches of `batch_size`."""
  (split, num_batches, plan), buckets = _training_plan(data_config, batch_size, seed), bucket_lengths(data_config)

  def read(step: int, batch_index: int) -> dict[str, np.ndarray]:
    return split.batch(plan(step // num_batches)[batch_index], rows, buckets)

  dataset = grain.MapDataset.range(num_batches).repeat().map_with_index(read)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def batch_lengths(data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                  positions: Sequence[int]) -> list[int]:
  """The length (axis 1 of `LENGTH_KEYS`) each training batch at `positions` pads to: the batches `train_iterator`
  yields, counted from 0 over the epochs."""
  (split, num_batches, plan), buckets = _training_plan(data_config, batch_size, seed), bucket_lengths(data_config)
  return [split.padded_length(plan(p // num_batches)[p % num_batches], buckets) for p in positions]


def eval_batches(data_config: ml_collections.ConfigDict, split_name: str, batch_size: int,
                 rows: slice) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a split sorted by length, longest first; the last batch is padded by rereading, and `mask` is
  False there. `index`: each text's position in the split."""
  split, buckets = _tokenized_split(data_config.to_json(), split_name), bucket_lengths(data_config)
  size = len(split.lengths_N)
  # Sorted by length, a batch pads to the bucket of texts like its own; metrics need no order. Longest first, the
  # one part-filled batch, whose padding rows cost as much as texts, holds the shortest texts (on fortunes8's
  # validation split 8% fewer padded tokens than shortest first, where it padded 23 rows to 128 tokens).
  order = np.argsort(-split.lengths_N, kind='stable')
  for start in range(0, size, batch_size):
    positions = np.arange(start, start + batch_size)
    # Padding rows reread the shortest text, which the last batch holds anyway: its pad length stays.
    indices = order[np.minimum(positions, size - 1)]
    batch = split.batch(indices, rows, buckets)
    mask = (positions < size)[rows]
    yield {**batch, 'label': np.where(mask, batch['label'], 0), 'mask': mask, 'index': indices[rows].astype(np.int32)}
