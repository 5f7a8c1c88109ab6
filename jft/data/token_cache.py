"""Tokenized splits kept on disk between runs: a repeated run reads a split's token ids instead of reading its
records and tokenizing them again (for the main job's training split about 0.3 s of a 2.1 s warm start on a
2-core Zen 4, benchmarks/README.md).

`python -m jft.main --compilation_cache=DIR` keeps them in DIR/jft_tokenized beside the compiled steps (`off`:
every run tokenizes, as does a script that never calls `enable`). An entry is keyed by everything its arrays
come from: the files of each prepared dataset read (name, size and modification time of every file in its
directory), what the caller names (jft/data/text.py: the datasets and splits, max_len and its own source), the
tokenizer file's bytes, and the versions of tokenizers, tensorflow-datasets and numpy. A rebuilt dataset,
another tokenizer or an edit to the text pipeline so makes a new entry; an entry is never rewritten. Entries are
written whole (a temporary file renamed: a killed run or another process never leaves half of one); one that
does not read is reported, deleted and made again, never a failure. The directory is capped at `MAX_BYTES`,
least recently used entries going first. Entries are plain numpy arrays (no pickles).
"""

import collections
import contextlib
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from absl import logging

from jft import cache_files

SUBDIRECTORY = 'jft_tokenized'
SUFFIX = '.tokens.npz'
MAX_BYTES = 1 << 30
_directory: pathlib.Path | None = None
_counts = collections.Counter()

Tokenized = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [N, max_len] (right-padded), lengths [N], labels [N]


def enable(directory: str | os.PathLike | None) -> None:
  """Keeps tokenized splits in `directory` (None: off)."""
  global _directory
  _directory = None if directory is None else pathlib.Path(directory)


def directory() -> pathlib.Path | None:
  return _directory


def counts() -> dict[str, int]:
  """Splits read from this cache (`hits`) and tokenized and kept in it (`misses`) since the process started."""
  return {'hits': _counts['hits'], 'misses': _counts['misses']}


def tokenized(make: Callable[[], Tokenized], dataset_dirs: Sequence[str], tokenizer_file: str,
              **parts) -> Tokenized:
  """`make()`'s (ids, lengths, labels), read from the entry of what they come from (the prepared datasets in
  `dataset_dirs`, the tokenizer in `tokenizer_file`, `parts`: JSON values) where there is one, else made and
  kept."""
  if _directory is None or any('://' in str(d) for d in dataset_dirs):  # remote datasets: no cheap file listing
    return make()
  path = _directory / (_key(dataset_dirs, tokenizer_file, parts) + SUFFIX)
  try:
    arrays = _unpack(path.read_bytes())
  except FileNotFoundError:
    pass
  except Exception as e:  # noqa: BLE001 (any unreadable entry is made again, never a failure)
    logging.warning('jft: could not read the tokenized split %s (%s: %s); deleting it and tokenizing again', path,
                    type(e).__name__, e)
    with contextlib.suppress(OSError):  # e.g. a cache on a read-only disk
      path.unlink(missing_ok=True)
  else:
    cache_files.mark_used(path)
    _counts['hits'] += 1
    return arrays
  arrays = make()
  _counts['misses'] += 1
  entry = _pack(*arrays)
  if entry is not None:
    try:
      cache_files.write_atomically(path, entry)
      cache_files.evict(_directory, SUFFIX, MAX_BYTES)
    except OSError as e:
      logging.warning('jft: could not keep the tokenized split in %s: %s', _directory, e)
  return arrays


def _key(dataset_dirs: Sequence[str], tokenizer_file: str, parts: dict) -> str:
  datasets = [(str(d), sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(d)))
              for d in dataset_dirs]
  versions = [module.__version__ for module in (tokenizers, tfds, np)]
  tokenizer = hashlib.sha256(pathlib.Path(tokenizer_file).read_bytes()).hexdigest()
  described = json.dumps({'datasets': datasets, 'tokenizer': tokenizer, 'versions': versions, 'parts': parts},
                         sort_keys=True)
  return hashlib.sha256(described.encode()).hexdigest()


def _pack(ids_NxL: np.ndarray, lengths_N: np.ndarray, labels_N: np.ndarray) -> bytes | None:
  """An entry: each text's tokens, end to end, and its length (the padding is one id, kept once); None where the
  padding is not one id (such arrays are not kept)."""
  tokens_N = np.arange(ids_NxL.shape[1]) < lengths_N[:, None]
  padding = ids_NxL[~tokens_N]
  pad_id = padding[0] if padding.size else 0
  if np.any(padding != pad_id):
    return None
  buffer = io.BytesIO()
  np.savez(buffer, tokens=ids_NxL[tokens_N], lengths_N=lengths_N, labels_N=labels_N,
           shape=np.array(ids_NxL.shape), pad_id=np.array(pad_id, ids_NxL.dtype))
  return buffer.getvalue()


def _unpack(entry: bytes) -> Tokenized:
  with np.load(io.BytesIO(entry), allow_pickle=False) as arrays:
    tokens, lengths_N, labels_N = arrays['tokens'], arrays['lengths_N'], arrays['labels_N']
    (n, length), pad_id = arrays['shape'], arrays['pad_id']
  if lengths_N.shape != (n,) or labels_N.shape != (n,) or lengths_N.max(initial=0) > length or \
      lengths_N.sum() != tokens.size:
    raise ValueError(f'its arrays do not fit together: {n} texts of at most {length} tokens, lengths '
                     f'{lengths_N.shape} summing to {lengths_N.sum()}, labels {labels_N.shape}, {tokens.size} tokens')
  ids_NxL = np.full((n, length), pad_id, tokens.dtype)
  ids_NxL[np.arange(length) < lengths_N[:, None]] = tokens
  return ids_NxL, lengths_N, labels_N
