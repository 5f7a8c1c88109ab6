"""The files of jft's caches on disk (jft/executable_cache.py, jft/data/token_cache.py): an entry is written whole
or not at all, and a directory over its size loses its least recently used entries first."""

import contextlib
import os
import pathlib
import threading


def write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes `path` whole or not at all (a reader never sees half an entry)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f'.{path.name}.{os.getpid()}.{threading.get_ident()}')
  partial.write_bytes(data)
  os.replace(partial, path)


def mark_used(path: pathlib.Path) -> None:
  """Marks the entry `path` recently used: the last to go when its directory is over its size."""
  with contextlib.suppress(OSError):  # e.g. a cache on a read-only disk
    os.utime(path)


def evict(directory: pathlib.Path, suffix: str, max_bytes: int) -> None:
  """Deletes the least recently used entries (files ending in `suffix`) until `directory` holds at most
  `max_bytes` of them."""
  entries = []
  for path in directory.glob(f'*{suffix}'):
    try:
      stat = path.stat()
    except FileNotFoundError:  # another process evicted it
      continue
    entries.append((stat.st_mtime, stat.st_size, path))
  total = sum(size for _, size, _ in entries)
  for _, size, path in sorted(entries):
    if total <= max_bytes:
      break
    path.unlink(missing_ok=True)
    total -= size
